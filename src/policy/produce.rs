//! Which partitions of a Produce request this region may write, decided against one snapshot of
//! the ownership table.
//!
//! The unit of decision is the record batch: a batch whose records are all writable here is
//! forwarded, a batch with any record owned elsewhere is refused whole (splitting a batch would
//! break offsets, CRCs and idempotent sequence numbers), and a partition is forwarded only when
//! every batch in it is. Records are decoded only for `by: key` and `by: header` rules; topic,
//! partition and `any` rules, and topics no rule matches, are decided without touching a record.
//!
//! Pure: no sockets, clocks or globals.

use std::fmt::Write as _;
use std::ops::ControlFlow;

use crate::codec::produce::ProduceView;
use crate::codec::records::{self, Inflater, RecordView};
use crate::ownership::{By, Claim, DefaultPolicy, OnForeign, RejectReason, Rule, Table, Verdict};
use crate::ownership::{Query, RegionId};

/// Kafka's INVALID_RECORD: non-retriable, and carries per-record errors (KIP-467).
pub const INVALID_RECORD: i16 = 87;
/// Kafka's CORRUPT_MESSAGE: the batch could not be read.
pub const CORRUPT_MESSAGE: i16 = 2;
/// Kafka's NOT_ENOUGH_REPLICAS: retriable, and "not persisted" for every client, so the Java
/// client, librdkafka and franz-go retry a held (frozen) write until their delivery timeout
/// without refreshing metadata or treating the outcome as unknown.
pub const NOT_ENOUGH_REPLICAS: i16 = 19;

/// At most this many records of one batch are listed in `record_errors`; a batch of ten
/// thousand foreign records must not turn into a megabyte of error text.
const MAX_RECORD_ERRORS: usize = 100;
/// Bytes of a key or header value quoted in an error message.
const MAX_QUOTED: usize = 64;

/// Why a partition was refused; the metric label of a rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectKind {
    ForeignOwner,
    MixedBatch,
    NullKey,
    UnmatchedHeader,
    UnownedPartition,
    DefaultReject,
    MalformedBatch,
    /// A rule was asked about something it does not look at; a bug, refused rather than guessed.
    Internal,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::ForeignOwner => "foreign_owner",
            RejectKind::MixedBatch => "mixed_batch",
            RejectKind::NullKey => "null_key",
            RejectKind::UnmatchedHeader => "unmatched_header",
            RejectKind::UnownedPartition => "unowned_partition",
            RejectKind::DefaultReject => "default_reject",
            RejectKind::MalformedBatch => "malformed_batch",
            RejectKind::Internal => "internal",
        }
    }

    fn from_reason(reason: RejectReason) -> Self {
        match reason {
            RejectReason::NullKey => RejectKind::NullKey,
            RejectReason::UnmatchedHeader => RejectKind::UnmatchedHeader,
            RejectReason::UnownedPartition => RejectKind::UnownedPartition,
            RejectReason::DefaultReject => RejectKind::DefaultReject,
            RejectReason::WrongLookup => RejectKind::Internal,
        }
    }
}

/// What happens to one partition of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Written to the local cluster. `audited` counts records owned elsewhere that an
    /// `on_foreign: audit` rule let through.
    Forward { audited: u32 },
    /// Refused with a non-retriable error; never reaches the broker.
    Reject {
        kind: RejectKind,
        error_code: i16,
        message: String,
        /// (index of the record in its batch, why).
        record_errors: Vec<(i32, String)>,
    },
    /// Owned by a frozen region: answered with a retriable error so the client retries.
    Hold { message: String },
}

impl Action {
    pub fn is_forward(&self) -> bool {
        matches!(self, Action::Forward { .. })
    }
}

/// The decision for one partition, with what the metrics need.
#[derive(Debug, Clone)]
pub struct PartitionDecision {
    pub action: Action,
    /// The rule that decided, if any.
    pub rule: Option<usize>,
    /// The owner the decision was about (foreign or frozen owner, or this region).
    pub owner: Option<RegionId>,
    pub batches: u32,
    pub records: u32,
}

/// Decisions for every partition of a request, in request order (topic by topic).
#[derive(Debug)]
pub struct ProducePlan {
    pub partitions: Vec<PartitionDecision>,
}

impl ProducePlan {
    pub fn all_forward(&self) -> bool {
        self.partitions.iter().all(|p| p.action.is_forward())
    }

    pub fn none_forward(&self) -> bool {
        !self.partitions.iter().any(|p| p.action.is_forward())
    }
}

/// Decides every partition of `request` for a proxy writing for `local`.
pub fn decide(
    request: &ProduceView<'_>,
    table: &Table,
    local: RegionId,
    inflater: &mut Inflater,
) -> ProducePlan {
    let mut partitions = Vec::with_capacity(request.partition_count());
    for topic in &request.topics {
        let rule = table.rule_for_topic(topic.name);
        let rule_index = rule.and_then(|r| table.rules().iter().position(|x| std::ptr::eq(x, r)));
        for partition in &topic.partitions {
            let decision = match rule {
                None => decide_default(table, topic.name),
                Some(rule) => decide_rule(
                    table,
                    rule,
                    local,
                    topic.name,
                    partition.index,
                    partition.records.unwrap_or_default(),
                    inflater,
                ),
            };
            partitions.push(PartitionDecision {
                rule: rule_index,
                ..decision
            });
        }
    }
    ProducePlan { partitions }
}

fn decision(action: Action) -> PartitionDecision {
    PartitionDecision {
        action,
        rule: None,
        owner: None,
        batches: 0,
        records: 0,
    }
}

fn decide_default(table: &Table, topic: &str) -> PartitionDecision {
    match table.default_policy() {
        DefaultPolicy::Allow => decision(Action::Forward { audited: 0 }),
        DefaultPolicy::Reject => decision(Action::Reject {
            kind: RejectKind::DefaultReject,
            error_code: INVALID_RECORD,
            message: format!(
                "topic {topic:?} matches no ownership rule and the table's default is reject"
            ),
            record_errors: Vec::new(),
        }),
    }
}

fn decide_rule(
    table: &Table,
    rule: &Rule,
    local: RegionId,
    topic: &str,
    partition: i32,
    records: &[u8],
    inflater: &mut Inflater,
) -> PartitionDecision {
    let whole_partition = match &rule.by {
        By::Key { .. } | By::Header { .. } => None,
        By::Partition { .. } => Some(rule.claim_partition(partition)),
        By::Topic { .. } | By::Any => Some(rule.claim_topic()),
    };
    if let Some(claim) = whole_partition {
        let mut tally = Tally::new(table, rule, local);
        tally.add(0, claim, &Subject::Partition { topic, partition });
        let mut d = tally.finish(topic, partition);
        d.batches = records::batches(records).count() as u32;
        return d;
    }

    let mut total = PartitionDecision {
        action: Action::Forward { audited: 0 },
        rule: None,
        owner: Some(local),
        batches: 0,
        records: 0,
    };
    for batch in records::batches(records) {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return malformed(total, topic, partition, &e),
        };
        let mut tally = Tally::new(table, rule, local);
        let walked = batch.for_each_record(inflater, |index, record| {
            let claim = claim_record(rule, &record);
            tally.add(index as i32, claim, &Subject::Record { rule, record });
            ControlFlow::Continue(())
        });
        if let Err(e) = walked {
            return malformed(total, topic, partition, &e);
        }
        let d = tally.finish(topic, partition);
        total.batches += 1;
        total.records += d.records;
        total.action = match (total.action, d.action) {
            (Action::Forward { audited: a }, Action::Forward { audited: b }) => {
                Action::Forward { audited: a + b }
            }
            // The first refused batch decides the partition: a reject outranks a hold.
            (reject @ Action::Reject { .. }, _) => reject,
            (_, reject @ Action::Reject { .. }) => {
                total.owner = d.owner;
                reject
            }
            (hold @ Action::Hold { .. }, _) => hold,
            (_, hold @ Action::Hold { .. }) => {
                total.owner = d.owner;
                hold
            }
        };
    }
    total
}

fn malformed(
    mut total: PartitionDecision,
    topic: &str,
    partition: i32,
    e: &records::RecordsError,
) -> PartitionDecision {
    total.action = Action::Reject {
        kind: RejectKind::MalformedBatch,
        error_code: CORRUPT_MESSAGE,
        message: format!("keyward could not read the record batch for {topic}-{partition}: {e}"),
        record_errors: Vec::new(),
    };
    total.owner = None;
    total
}

fn claim_record(rule: &Rule, record: &RecordView<'_>) -> Claim {
    match &rule.by {
        By::Key { .. } => rule.claim_key(record.key()),
        By::Header { .. } => {
            let value = rule
                .header_name()
                .and_then(|name| record.header(name))
                .flatten();
            rule.claim_header(value)
        }
        By::Partition { .. } | By::Topic { .. } | By::Any => rule.claim_topic(),
    }
}

/// What a claim was made about, for the error message.
enum Subject<'s, 'r> {
    Record {
        rule: &'s Rule,
        record: RecordView<'r>,
    },
    Partition {
        topic: &'s str,
        partition: i32,
    },
}

/// Accumulates the verdicts of one batch's records.
struct Tally<'t> {
    table: &'t Table,
    rule: &'t Rule,
    local: RegionId,
    records: u32,
    accepted: u32,
    audited: u32,
    refused: u32,
    /// The first refused record decides the reason and the headline message.
    first_refusal: Option<(RejectKind, String, RegionId)>,
    record_errors: Vec<(i32, String)>,
    frozen: Option<(String, RegionId)>,
}

impl<'t> Tally<'t> {
    fn new(table: &'t Table, rule: &'t Rule, local: RegionId) -> Self {
        Self {
            table,
            rule,
            local,
            records: 0,
            accepted: 0,
            audited: 0,
            refused: 0,
            first_refusal: None,
            record_errors: Vec::new(),
            frozen: None,
        }
    }

    fn add(&mut self, index: i32, claim: Claim, subject: &Subject<'_, '_>) {
        self.records += 1;
        match self.table.verdict(claim, self.local) {
            Verdict::Owned | Verdict::Any => self.accepted += 1,
            Verdict::Foreign { owner } if self.rule.on_foreign == OnForeign::Audit => {
                let _ = owner;
                self.accepted += 1;
                self.audited += 1;
            }
            Verdict::Foreign { owner } => {
                let why = format!(
                    "{} is owned by region {}{}; this proxy writes for {}",
                    self.describe(subject),
                    self.table.region_name(owner),
                    self.where_(claim),
                    self.table.region_name(self.local),
                );
                self.refuse(index, RejectKind::ForeignOwner, why, owner);
            }
            Verdict::Reject(reason) => {
                let why = self.describe_reject(reason, subject);
                self.refuse(index, RejectKind::from_reason(reason), why, self.local);
            }
            Verdict::Frozen { owner } => {
                if self.frozen.is_none() {
                    let why = format!(
                        "{} is owned by region {}{}, which is frozen for a planned move; retry later",
                        self.describe(subject),
                        self.table.region_name(owner),
                        self.where_(claim),
                    );
                    self.frozen = Some((why, owner));
                }
            }
        }
    }

    fn refuse(&mut self, index: i32, kind: RejectKind, why: String, owner: RegionId) {
        self.refused += 1;
        if self.record_errors.len() < MAX_RECORD_ERRORS {
            self.record_errors.push((index, why.clone()));
        }
        if self.first_refusal.is_none() {
            self.first_refusal = Some((kind, why, owner));
        }
    }

    fn describe(&self, subject: &Subject<'_, '_>) -> String {
        match subject {
            Subject::Record { rule, record } => match &rule.by {
                By::Key { .. } => match record.key() {
                    Some(key) => format!("key {}", quote(key)),
                    None => "a record with a null key".to_owned(),
                },
                By::Header { header, .. } => {
                    match record.header(header.as_bytes()).flatten() {
                        Some(v) => format!("header {header}={}", quote(v)),
                        None => format!("a record without header {header:?}"),
                    }
                }
                _ => "the record".to_owned(),
            },
            Subject::Partition { topic, partition } => match &self.rule.by {
                By::Partition { .. } => format!("partition {partition} of topic {topic:?}"),
                _ => format!("topic {topic:?}"),
            },
        }
    }

    fn where_(&self, claim: Claim) -> String {
        match claim {
            Claim::Region {
                slot: Some(slot), ..
            } => format!(" (rule {}, slot {slot})", self.rule.name),
            _ => format!(" (rule {})", self.rule.name),
        }
    }

    fn describe_reject(&self, reason: RejectReason, subject: &Subject<'_, '_>) -> String {
        let rule = &self.rule.name;
        match reason {
            RejectReason::NullKey => {
                format!("a record with a null key; rule {rule} rejects null keys (null_key: reject)")
            }
            RejectReason::UnmatchedHeader => match subject {
                Subject::Record { record, .. } => {
                    let header = match &self.rule.by {
                        By::Header { header, .. } => header.as_str(),
                        _ => "",
                    };
                    match record.header(header.as_bytes()) {
                        Some(Some(v)) => format!(
                            "header {header}={} has no owner in rule {rule} (unmatched: reject)",
                            quote(v)
                        ),
                        _ => format!(
                            "a record without header {header:?}; rule {rule} rejects it (unmatched: reject)"
                        ),
                    }
                }
                Subject::Partition { .. } => format!("no owner in rule {rule}"),
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

    fn finish(self, _topic: &str, _partition: i32) -> PartitionDecision {
        let action = if let Some((kind, why, owner)) = self.first_refusal {
            let mixed = kind == RejectKind::ForeignOwner && self.accepted > 0;
            let kind = if mixed { RejectKind::MixedBatch } else { kind };
            let mut message = if mixed {
                format!(
                    "batch mixes regions: {} of {} records are owned elsewhere, first: {why}; keyward never splits a batch",
                    self.refused, self.records
                )
            } else if self.refused > 1 {
                format!("{why} (and {} more records)", self.refused - 1)
            } else {
                why
            };
            if self.refused as usize > MAX_RECORD_ERRORS {
                let _ = write!(message, "; first {MAX_RECORD_ERRORS} records listed");
            }
            return PartitionDecision {
                action: Action::Reject {
                    kind,
                    error_code: INVALID_RECORD,
                    message,
                    record_errors: self.record_errors,
                },
                rule: None,
                owner: Some(owner),
                batches: 1,
                records: self.records,
            };
        } else if let Some((message, owner)) = self.frozen {
            return PartitionDecision {
                action: Action::Hold { message },
                rule: None,
                owner: Some(owner),
                batches: 1,
                records: self.records,
            };
        } else {
            Action::Forward {
                audited: self.audited,
            }
        };
        PartitionDecision {
            action,
            rule: None,
            owner: Some(self.local),
            batches: 1,
            records: self.records,
        }
    }
}

/// A key or header value for an error message: quoted text when printable, hex otherwise,
/// truncated either way.
fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_QUOTED)];
    let more = if bytes.len() > MAX_QUOTED { "…" } else { "" };
    match std::str::from_utf8(shown) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}{more}"),
        _ => {
            let mut hex = String::with_capacity(2 + shown.len() * 2);
            hex.push_str("0x");
            for b in shown {
                let _ = write!(hex, "{b:02x}");
            }
            hex.push_str(more);
            hex
        }
    }
}

/// The one-line answer of `keyward owner`, kept here so the CLI and (later) the admin API give
/// the same answer.
pub fn explain(table: &Table, topic: &str, query: &Query<'_>, local: RegionId) -> String {
    table.explain(topic, query, local)
}
