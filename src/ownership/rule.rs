//! One rule of the table and its one lookup, [`Rule::claim`], plus what the rule says about a
//! write in messages. `claim` is the hot path: it runs once per record (or once per partition for
//! rules that do not read records), so it only hashes, indexes and compares; it never allocates
//! and never panics.

use super::murmur2::{murmur2, to_positive};
use super::subject::{Subject, quote};
use super::{Claim, RegionId, RejectReason};
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

    /// Whether the owner of a write depends on what is inside its records (key, headers). When
    /// it does not, the policy decides a whole partition at once without decoding a record.
    pub fn reads_records(&self) -> bool {
        match &self.by {
            By::Key { .. } | By::Header { .. } => true,
            By::Partition { .. } | By::Topic { .. } | By::Any => false,
        }
    }

    /// The raw owner of `subject` under this rule, or `None` when the subject does not say what
    /// the rule needs ([`Rule::needs`]): a query naming a partition for a key rule, another
    /// header than the rule's. A subject built from a record always answers.
    ///
    /// The hot path: called once per record (once per partition when the rule does not read
    /// records); it hashes, indexes and compares, and never allocates or panics.
    pub fn claim(&self, subject: &Subject<'_>) -> Option<Claim> {
        Some(match &self.by {
            By::Key {
                slots,
                owners,
                null_key,
            } => match subject.key()? {
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
            By::Header {
                header,
                owners,
                unmatched,
            } => match subject
                .header(header.as_bytes())?
                .and_then(|v| owners.get(v))
            {
                Some(&region) => Claim::Region { region, slot: None },
                None => unmatched.claim(RejectReason::UnmatchedHeader),
            },
            By::Partition { owners } => {
                let partition = subject.partition()?;
                let i = owners.partition_point(|range| range.last < partition);
                match owners.get(i) {
                    Some(range) if range.first <= partition => Claim::Region {
                        region: range.owner,
                        slot: None,
                    },
                    _ => Claim::Reject(RejectReason::UnownedPartition),
                }
            }
            By::Topic { owner } => Claim::Region {
                region: *owner,
                slot: None,
            },
            By::Any => Claim::Any,
        })
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

    /// What this rule looked at in `subject`, for a message: `key "cust-1"`,
    /// `header tenant="acme"`, `partition 6 of topic "inventory"`, `topic "audit.x"`. Only for
    /// refused or held writes, so it may allocate.
    pub fn describe(&self, subject: &Subject<'_>) -> String {
        match &self.by {
            By::Key { .. } => match subject.key() {
                Some(Some(key)) => format!("key {}", quote(key)),
                Some(None) => "a record with a null key".to_owned(),
                None => "the record".to_owned(),
            },
            By::Header { header, .. } => match subject.header(header.as_bytes()).flatten() {
                Some(value) => format!("header {header}={}", quote(value)),
                None => format!("a record without header {header:?}"),
            },
            By::Partition { .. } => match subject.partition() {
                Some(partition) => {
                    format!("partition {partition} of topic {:?}", subject.topic_name())
                }
                None => format!("topic {:?}", subject.topic_name()),
            },
            By::Topic { .. } | By::Any => format!("topic {:?}", subject.topic_name()),
        }
    }

    /// Why this rule refused `subject` with `reason` (a [`Claim::Reject`] it gave), for the
    /// error the producer sees.
    pub fn refusal(&self, reason: RejectReason, subject: &Subject<'_>) -> String {
        let rule = &self.name;
        match reason {
            RejectReason::NullKey => {
                format!(
                    "a record with a null key; rule {rule} rejects null keys (null_key: reject)"
                )
            }
            RejectReason::UnmatchedHeader => match (&self.by, subject) {
                (By::Header { header, .. }, subject) => {
                    match subject.header(header.as_bytes()).flatten() {
                        Some(value) => format!(
                            "header {header}={} has no owner in rule {rule} (unmatched: reject)",
                            quote(value)
                        ),
                        None => format!(
                            "a record without header {header:?}; rule {rule} rejects it (unmatched: reject)"
                        ),
                    }
                }
                _ => format!("no owner in rule {rule}"),
            },
            RejectReason::UnownedPartition => {
                format!("{} has no owner in rule {rule}", self.describe(subject))
            }
            RejectReason::DefaultReject => {
                "the topic matches no ownership rule and the table's default is reject".to_owned()
            }
            RejectReason::WrongLookup => format!("keyward could not apply rule {rule} (a bug)"),
        }
    }
}
