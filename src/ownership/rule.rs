//! One rule of the table and the per-record claims. This is the hot path: the `claim_*` methods
//! run once per record (or once per batch for partitions and topics), so they only hash, index
//! and compare; they never allocate and never panic.

use super::murmur2::{murmur2, to_positive};
use super::{Claim, Query, RegionId, RejectReason};
use std::collections::HashMap;

/// A rule: the topics it covers and how it decides who owns a write to them.
///
/// Only the table builds rules (there is a private field), so the invariants the claims rely on
/// hold: a key rule has exactly `slots` owners, partition ranges are sorted and disjoint.
#[derive(Debug)]
pub struct Rule {
    /// Unique within the table; bounded, so usable as a metric label.
    pub name: String,
    pub by: By,
    pub on_foreign: OnForeign,
    /// The topic patterns as written, for display. Matching is done by the table.
    pub(super) topics: Box<[String]>,
}

/// How a rule finds the owner of a write.
#[derive(Debug)]
pub enum By {
    /// `slot = toPositive(murmur2(key)) % slots`; `owners[slot]` owns it.
    Key {
        slots: u32,
        /// Exactly `slots` entries, indexed by slot: validation requires every slot owned.
        owners: Box<[RegionId]>,
        null_key: Fallback,
    },
    /// The value of one record header decides. Keyed by bytes so the lookup takes the header
    /// value as it sits in the record, without decoding or allocating.
    Header {
        header: String,
        /// A fast hasher: the map is built once from the table and only read on the hot path
        /// (lookups of client-chosen values cannot degrade a map they cannot insert into).
        owners: HashMap<Box<[u8]>, RegionId, foldhash::fast::RandomState>,
        unmatched: Fallback,
    },
    /// Sorted, disjoint ranges; a partition in none of them is rejected.
    Partition { owners: Box<[PartitionRange]> },
    /// One region owns every write to the topics.
    Topic { owner: RegionId },
    /// Every region may write (`owner: any`).
    Any,
}

/// Partitions `first..=last` belong to `owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionRange {
    pub first: i32,
    pub last: i32,
    pub owner: RegionId,
}

/// What to do when a key or header rule cannot decide from the record (`null_key`,
/// `unmatched`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Reject,
    /// The region of the proxy doing the lookup; takeover and frozen then apply to it.
    Local,
    Region(RegionId),
}

/// What a region does with a write it does not own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnForeign {
    Reject,
    /// Parsed so the file format is stable, but rejected by validation until it is implemented.
    Redirect,
    /// Forward the write, and count/log it as foreign.
    Audit,
}

impl OnForeign {
    pub fn as_str(self) -> &'static str {
        match self {
            OnForeign::Reject => "reject",
            OnForeign::Redirect => "redirect",
            OnForeign::Audit => "audit",
        }
    }
}

impl Fallback {
    fn claim(self, reason: RejectReason) -> Claim {
        match self {
            Fallback::Reject => Claim::Reject(reason),
            Fallback::Local => Claim::Local,
            Fallback::Region(region) => Claim::Region { region, slot: None },
        }
    }
}

impl By {
    /// `key`, `header`, `partition`, `topic` or `any`: bounded, usable as a label.
    pub fn kind(&self) -> &'static str {
        match self {
            By::Key { .. } => "key",
            By::Header { .. } => "header",
            By::Partition { .. } => "partition",
            By::Topic { .. } => "topic",
            By::Any => "any",
        }
    }
}

impl Rule {
    /// The topic patterns as written in the file.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The owner of a record with this key (`None`: a null key) under a `by: key` rule.
    /// On `by: topic` and `owner: any` rules the key does not matter and this is
    /// [`Rule::claim_topic`]; on header and partition rules it is `Reject(WrongLookup)`.
    pub fn claim_key(&self, key: Option<&[u8]>) -> Claim {
        match &self.by {
            By::Key {
                slots,
                owners,
                null_key,
            } => match key {
                None => null_key.claim(RejectReason::NullKey),
                Some(key) => {
                    let slot = to_positive(murmur2(key)) % slots;
                    // `owners` has exactly `slots` entries (built by `validate`), so `get` only
                    // guards against a bug there.
                    match owners.get(slot as usize) {
                        Some(&region) => Claim::Region {
                            region,
                            slot: Some(slot),
                        },
                        None => Claim::Reject(RejectReason::WrongLookup),
                    }
                }
            },
            By::Topic { .. } | By::Any => self.claim_topic(),
            By::Header { .. } | By::Partition { .. } => Claim::Reject(RejectReason::WrongLookup),
        }
    }

    /// The owner of a record under a `by: header` rule, given the value of the rule's header
    /// ([`Rule::header_name`]), or `None` when the record does not carry it.
    /// On `by: topic` and `owner: any` rules this is [`Rule::claim_topic`].
    pub fn claim_header(&self, value: Option<&[u8]>) -> Claim {
        match &self.by {
            By::Header {
                owners, unmatched, ..
            } => match value.and_then(|value| owners.get(value)) {
                Some(&region) => Claim::Region { region, slot: None },
                None => unmatched.claim(RejectReason::UnmatchedHeader),
            },
            By::Topic { .. } | By::Any => self.claim_topic(),
            By::Key { .. } | By::Partition { .. } => Claim::Reject(RejectReason::WrongLookup),
        }
    }

    /// The owner of a write to `partition` under a `by: partition` rule.
    /// On `by: topic` and `owner: any` rules this is [`Rule::claim_topic`].
    pub fn claim_partition(&self, partition: i32) -> Claim {
        match &self.by {
            By::Partition { owners } => {
                let i = owners.partition_point(|range| range.last < partition);
                match owners.get(i) {
                    Some(range) if range.first <= partition => Claim::Region {
                        region: range.owner,
                        slot: None,
                    },
                    _ => Claim::Reject(RejectReason::UnownedPartition),
                }
            }
            By::Topic { .. } | By::Any => self.claim_topic(),
            By::Key { .. } | By::Header { .. } => Claim::Reject(RejectReason::WrongLookup),
        }
    }

    /// The owner of any write to the rule's topics, for `by: topic` and `owner: any` rules.
    pub fn claim_topic(&self) -> Claim {
        match &self.by {
            By::Topic { owner } => Claim::Region {
                region: *owner,
                slot: None,
            },
            By::Any => Claim::Any,
            By::Key { .. } | By::Header { .. } | By::Partition { .. } => {
                Claim::Reject(RejectReason::WrongLookup)
            }
        }
    }

    /// The header a `by: header` rule reads, as the bytes to compare record header keys with.
    pub fn header_name(&self) -> Option<&[u8]> {
        match &self.by {
            By::Header { header, .. } => Some(header.as_bytes()),
            _ => None,
        }
    }

    /// The claim for what an operator knows about a write, or `None` when the query does not
    /// answer this rule (a partition for a key rule, another header than the rule's).
    pub fn claim(&self, query: &Query) -> Option<Claim> {
        match (&self.by, *query) {
            (By::Topic { .. } | By::Any, _) => Some(self.claim_topic()),
            (By::Key { .. }, Query::Key(key)) => Some(self.claim_key(key)),
            (By::Header { header, .. }, Query::Header { name, value }) if name == header => {
                Some(self.claim_header(Some(value)))
            }
            (By::Header { .. }, Query::None) => Some(self.claim_header(None)),
            (By::Partition { .. }, Query::Partition(partition)) => {
                Some(self.claim_partition(partition))
            }
            _ => None,
        }
    }

    /// What [`Rule::claim`] needs for this rule: `key`, `header:<name>`, `partition` or nothing.
    pub(super) fn needs(&self) -> String {
        match &self.by {
            By::Key { .. } => "key".to_owned(),
            By::Header { header, .. } => format!("header:{header}"),
            By::Partition { .. } => "partition".to_owned(),
            By::Topic { .. } | By::Any => "nothing".to_owned(),
        }
    }
}
