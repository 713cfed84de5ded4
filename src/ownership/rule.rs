//! One rule of the table and its one lookup, [`Rule::claim`], plus what the rule says about a
//! write in messages. `claim` is the hot path: it runs once per record (or once per partition for
//! rules that do not read records), so it only hashes, indexes and compares; it never allocates
//! and never panics.

use super::murmur2::{murmur2, to_positive};
use super::subject::{Subject, quote};
use super::{Claim, RegionId, RejectReason};
use std::collections::HashMap;

/// A listed header value or key part, as a lookup key: up to 24 bytes are kept in the map's own
/// entry, so looking up a short value (a tenant id, a country code) reads no second cache line
/// for the key; longer values live on the heap.
pub type ValueKey = smallvec::SmallVec<[u8; 24]>;

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
    /// The parts of its ownership held or handed to another region (`frozen`, `takeover`).
    pub(super) states: PartStates,
}

/// What the table does to one part of a rule's ownership (a slot, a value, a partition, or the
/// whole rule), whatever `owners` says: set by the rule's `frozen` and `takeover`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartState {
    /// Written by this region instead of the owner.
    pub takeover: Option<RegionId>,
    /// Writes are held, in every region.
    pub frozen: bool,
}

impl PartState {
    /// `self` (a whole rule's state) with a part's own state on top.
    fn with(self, part: PartState) -> PartState {
        PartState {
            takeover: part.takeover.or(self.takeover),
            frozen: self.frozen || part.frozen,
        }
    }

    pub fn is_set(self) -> bool {
        self.takeover.is_some() || self.frozen
    }
}

/// The states of a rule's parts. Looked up on the hot path beside the owner, so each kind of
/// part is kept the way its owners are: by slot index, by value, by sorted partition run.
#[derive(Debug, Default)]
pub struct PartStates {
    /// The whole rule (`frozen: all`, `takeover: <region>`).
    pub whole: PartState,
    /// By slot, for rules with slots; empty when no slot has a state of its own.
    pub slots: Box<[PartState]>,
    /// Values with a state of their own, for rules with values. As for the owners: built once,
    /// only read on the hot path.
    pub values: HashMap<Box<[u8]>, PartState, foldhash::fast::RandomState>,
    /// Partitions with a state of their own: `(first, last, state)`, sorted and disjoint.
    pub partitions: Box<[(i32, i32, PartState)]>,
}

impl PartStates {
    pub(super) fn slot(&self, slot: u32) -> PartState {
        let own = self.slots.get(slot as usize).copied().unwrap_or_default();
        self.whole.with(own)
    }

    #[inline]
    pub(super) fn value(&self, value: &[u8]) -> PartState {
        if self.values.is_empty() {
            return self.whole;
        }
        self.whole
            .with(self.values.get(value).copied().unwrap_or_default())
    }

    pub(super) fn partition(&self, partition: i32) -> PartState {
        let i = self
            .partitions
            .partition_point(|&(_, last, _)| last < partition);
        let own = match self.partitions.get(i) {
            Some(&(first, _, state)) if first <= partition => state,
            _ => PartState::default(),
        };
        self.whole.with(own)
    }

    /// Whether any part of the rule has a state.
    pub fn any(&self) -> bool {
        self.whole.is_set()
            || self.slots.iter().any(|s| s.is_set())
            || !self.values.is_empty()
            || !self.partitions.is_empty()
    }
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
        owners: HashMap<ValueKey, RegionId, foldhash::fast::RandomState>,
        unmatched: Fallback,
    },
    /// A part of the record key decides (`tenant-42` of the key `tenant-42|order-9`), looked
    /// up like a header value or hashed into slots like a key. The part borrows from the key:
    /// nothing is copied.
    KeyPart {
        part: KeyPart,
        owners: PartOwners,
        /// A null key, a key without the part, or a part nobody lists.
        unmatched: Fallback,
    },
    /// Sorted, disjoint ranges; a partition in none of them is rejected.
    Partition { owners: Box<[PartitionRange]> },
    /// One region owns every write to the topics.
    Topic { owner: RegionId },
    /// Every region may write (`owner: any`).
    Any,
}

/// Who owns a key part: listed values, or slots of its hash.
#[derive(Debug)]
pub enum PartOwners {
    /// Each listed value's owner. As for `Header`: built once, only read on the hot path.
    Values(HashMap<ValueKey, RegionId, foldhash::fast::RandomState>),
    /// `slot = toPositive(murmur2(part)) % slots` (as `by: key` hashes a whole key), indexed
    /// by slot: every slot owned (validated).
    Slots(Box<[RegionId]>),
}

impl PartOwners {
    /// The owner of `part`, or `None` for a value nobody lists.
    fn claim(&self, part: &[u8]) -> Option<Claim> {
        match self {
            PartOwners::Values(values) => values
                .get(part)
                .map(|&region| Claim::Region { region, slot: None }),
            PartOwners::Slots(owners) => {
                // Never empty (validated); `filter` keeps a bug from dividing by zero.
                let slots = u32::try_from(owners.len()).ok().filter(|&n| n > 0)?;
                let slot = to_positive(murmur2(part)) % slots;
                owners.get(slot as usize).map(|&region| Claim::Region {
                    region,
                    slot: Some(slot),
                })
            }
        }
    }
}

/// Where a `by: key_part` rule finds the part of the key that names the owner.
#[derive(Debug)]
pub enum KeyPart {
    /// The key split at every `delimiter`; the part at `index` (from 0).
    Delimited { delimiter: Box<[u8]>, index: u32 },
    /// Capture `group` of the first match of `pattern` in the key (0: the whole match).
    Pattern {
        /// As written, for display and the canonical form.
        pattern: String,
        /// Compiled for byte haystacks: keys need not be UTF-8.
        regex: regex_automata::meta::Regex,
        /// At most [`KeyPart::MAX_GROUP`], and a group the pattern has (validated).
        group: u32,
    },
}

impl KeyPart {
    /// The largest capture group a pattern rule may pick: the search writes group offsets into
    /// an array on the stack, sized for this many.
    pub const MAX_GROUP: u32 = 15;

    /// The part of `key` this rule looks up, borrowed from it; `None` when the key has no such
    /// part (too few delimiters, no match, or the group did not take part in the match).
    /// Allocation-free: the regex's scratch space is pooled inside it and reused.
    pub fn extract<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        match self {
            KeyPart::Delimited { delimiter, index } => {
                let mut rest = key;
                for _ in 0..*index {
                    let at = find(rest, delimiter)?;
                    rest = rest.get(at + delimiter.len()..)?;
                }
                Some(match find(rest, delimiter) {
                    Some(at) => rest.get(..at)?,
                    None => rest,
                })
            }
            KeyPart::Pattern { regex, group, .. } => {
                const SLOTS: usize = 2 * (KeyPart::MAX_GROUP as usize + 1);
                let mut slots = [None; SLOTS];
                // One pattern: group g's start and end are slots 2g and 2g + 1.
                let start = 2 * (*group as usize);
                let slots = slots.get_mut(..start + 2)?;
                regex.search_slots(&regex_automata::Input::new(key), slots)?;
                let (from, to) = (slots.get(start).copied()??, slots.get(start + 1).copied()??);
                key.get(from.get()..to.get())
            }
        }
    }

    /// `index 0 split by "|"` or `group 1 of pattern "^(t-[0-9]+)\|"`, for messages.
    pub fn describe(&self) -> String {
        match self {
            KeyPart::Delimited { delimiter, index } => {
                format!("part {index} split by {}", quote(delimiter))
            }
            KeyPart::Pattern { pattern, group, .. } => {
                format!("group {group} of pattern {pattern:?}")
            }
        }
    }
}

/// Where `needle` (not empty) first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    match needle {
        [byte] => haystack.iter().position(|b| b == byte),
        _ => haystack
            .windows(needle.len().max(1))
            .position(|window| window == needle),
    }
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
    /// Produce the write to the owner's cluster, through keyward's own producer there.
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
            By::KeyPart { .. } => "key_part",
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
            By::Key { .. } | By::Header { .. } | By::KeyPart { .. } => true,
            By::Partition { .. } | By::Topic { .. } | By::Any => false,
        }
    }

    /// The header whose value decides (`by: header`): what a record walk keeps as it validates
    /// each record's headers.
    pub fn header_name(&self) -> Option<&[u8]> {
        match &self.by {
            By::Header { header, .. } => Some(header.as_bytes()),
            _ => None,
        }
    }

    /// The raw owner of `subject` under this rule, or `None` when the subject does not say what
    /// the rule needs ([`Rule::needs`]): a query naming a partition for a key rule, another
    /// header than the rule's. A subject built from a record always answers.
    pub fn claim(&self, subject: &Subject<'_>) -> Option<Claim> {
        self.decide(subject).map(|(claim, _)| claim)
    }

    /// [`Rule::claim`], and the state of the part of the rule the claim falls in (its slot,
    /// value or partition, and the whole rule's), for [`super::Table::judge`].
    ///
    /// The hot path: called once per record (once per partition when the rule does not read
    /// records); it hashes, indexes and compares, and never allocates or panics.
    pub fn decide(&self, subject: &Subject<'_>) -> Option<(Claim, PartState)> {
        let whole = self.states.whole;
        Some(match &self.by {
            By::Key {
                slots,
                owners,
                null_key,
            } => match subject.key()? {
                None => (null_key.claim(RejectReason::NullKey), whole),
                Some(key) => {
                    let slot = to_positive(murmur2(key)) % slots;
                    // `owners` has exactly `slots` entries (built by `validate`), so `get` only
                    // guards against a bug there.
                    match owners.get(slot as usize) {
                        Some(&region) => (
                            Claim::Region {
                                region,
                                slot: Some(slot),
                            },
                            self.states.slot(slot),
                        ),
                        None => (Claim::Reject(RejectReason::WrongLookup), whole),
                    }
                }
            },
            By::Header {
                header,
                owners,
                unmatched,
            } => match subject.header(header.as_bytes())? {
                Some(value) => match owners.get(value) {
                    Some(&region) => (
                        Claim::Region { region, slot: None },
                        self.states.value(value),
                    ),
                    None => (unmatched.claim(RejectReason::UnmatchedHeader), whole),
                },
                None => (unmatched.claim(RejectReason::UnmatchedHeader), whole),
            },
            By::KeyPart {
                part,
                owners,
                unmatched,
            } => match subject
                .key()?
                .and_then(|key| part.extract(key))
                .and_then(|value| Some((owners.claim(value)?, value)))
            {
                Some((
                    claim @ Claim::Region {
                        slot: Some(slot), ..
                    },
                    _,
                )) => (claim, self.states.slot(slot)),
                Some((claim, value)) => (claim, self.states.value(value)),
                None => (unmatched.claim(RejectReason::UnmatchedKeyPart), whole),
            },
            By::Partition { owners } => {
                let partition = subject.partition()?;
                let i = owners.partition_point(|range| range.last < partition);
                match owners.get(i) {
                    Some(range) if range.first <= partition => (
                        Claim::Region {
                            region: range.owner,
                            slot: None,
                        },
                        self.states.partition(partition),
                    ),
                    _ => (Claim::Reject(RejectReason::UnownedPartition), whole),
                }
            }
            By::Topic { owner } => (
                Claim::Region {
                    region: *owner,
                    slot: None,
                },
                whole,
            ),
            By::Any => (Claim::Any, whole),
        })
    }

    /// The states of the rule's parts.
    pub fn states(&self) -> &PartStates {
        &self.states
    }

    /// How many of the rule's parts (slots, values, partitions; a `by: topic` rule is one
    /// part) are frozen, and how many taken over, the whole rule's state counting for all.
    pub fn parts_in_state(&self) -> (u64, u64) {
        let states = &self.states;
        let all = match &self.by {
            By::Key { slots, .. } => u64::from(*slots),
            By::Header { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Values(owners),
                ..
            } => owners.len() as u64,
            By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => owners.len() as u64,
            By::Partition { owners } => owners
                .iter()
                .map(|r| (i64::from(r.last) - i64::from(r.first) + 1) as u64)
                .sum(),
            By::Topic { .. } => 1,
            By::Any => 0,
        };
        let count = |of: fn(PartState) -> bool| -> u64 {
            if of(states.whole) {
                return all;
            }
            let slots = states.slots.iter().filter(|&&s| of(s)).count() as u64;
            let values = states.values.values().filter(|&&s| of(s)).count() as u64;
            let partitions: u64 = states
                .partitions
                .iter()
                .filter(|p| of(p.2))
                .map(|&(f, l, _)| (i64::from(l) - i64::from(f) + 1) as u64)
                .sum();
            slots + values + partitions
        };
        (count(|s| s.frozen), count(|s| s.takeover.is_some()))
    }

    /// What [`Rule::claim`] needs for this rule: `key`, `header:<name>`, `partition` or nothing.
    pub(super) fn needs(&self) -> String {
        match &self.by {
            By::Key { .. } | By::KeyPart { .. } => "key".to_owned(),
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
            By::KeyPart { part, .. } => match subject.key() {
                Some(Some(key)) => match part.extract(key) {
                    Some(value) => format!("key part {} of key {}", quote(value), quote(key)),
                    None => format!("key {}", quote(key)),
                },
                Some(None) => "a record with a null key".to_owned(),
                None => "the record".to_owned(),
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
            RejectReason::UnmatchedKeyPart => match (&self.by, subject.key()) {
                (By::KeyPart { part, .. }, Some(Some(key))) => match part.extract(key) {
                    Some(value) => format!(
                        "key part {} of key {} has no owner in rule {rule} (unmatched: reject)",
                        quote(value),
                        quote(key)
                    ),
                    None => format!(
                        "key {} has no {}; rule {rule} rejects it (unmatched: reject)",
                        quote(key),
                        part.describe()
                    ),
                },
                (By::KeyPart { .. }, Some(None)) => format!(
                    "a record with a null key has no key part; rule {rule} rejects it (unmatched: reject)"
                ),
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
