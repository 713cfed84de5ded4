//! Which partitions of a Produce request this region may write, decided against one snapshot of
//! the ownership table.
//!
//! The unit of decision is the record batch: a batch whose records are all writable here is
//! forwarded; under `on_foreign: redirect` a batch owned elsewhere goes to its owner's cluster,
//! and one mixing owners is split by owner ([`Action::Split`], [`split_batch`]); otherwise a
//! batch with any record owned elsewhere is refused whole (the client cannot be told that half
//! of it landed). A partition is forwarded only when every batch in it is. Records are decoded only for rules that read them
//! ([`Rule::reads_records`]); the others, and topics no rule matches, are decided without
//! touching a record. What a rule looks at is the rule's business: this module hands it a
//! [`Subject`] and never asks which `by` it is.
//!
//! Pure: no sockets, clocks or globals.

use std::fmt::Write as _;
use std::ops::ControlFlow;

use crate::codec::produce::ProduceView;
use crate::codec::records::{self, Inflater};
use crate::codec::split;
pub use crate::codec::split::{Split, SplitError};
use crate::ownership::{
    Claim, DefaultPolicy, OnForeign, PartState, RejectReason, Rule, Table, Verdict,
};
use crate::ownership::{RegionId, Subject};
use crate::policy::alignment;

/// A held write is answered with NOT_ENOUGH_REPLICAS: retriable, and "not persisted" for every
/// client, so the Java client, librdkafka and franz-go retry it until their delivery timeout
/// without refreshing metadata or treating the outcome as unknown. A refused one with
/// INVALID_RECORD (non-retriable, with per-record errors); an unreadable one with CORRUPT_MESSAGE.
pub use crate::codec::errors::{CORRUPT_MESSAGE, INVALID_RECORD, NOT_ENOUGH_REPLICAS};

/// At most this many records of one batch are listed in `record_errors`; a batch of ten
/// thousand foreign records must not turn into a megabyte of error text.
const MAX_RECORD_ERRORS: usize = 100;

/// Why a partition was refused; the metric label of a rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectKind {
    ForeignOwner,
    MixedBatch,
    /// The table names no owner (a null key, an unmatched header, an unowned partition, the
    /// table's default...), whatever the region asking; labelled with the reason's own name.
    /// [`RejectReason::WrongLookup`], a bug, is labelled `internal`.
    Unowned(RejectReason),
    MalformedBatch,
    /// A redirect the client may not make: the cluster it connects to does not let it WRITE
    /// the topic (decided in `proxy::handlers::produce`, which asks that cluster).
    NotAuthorized,
    /// A redirect keyward cannot check: the topic does not exist on the cluster the client
    /// connects to, whose ACLs decide.
    UnverifiedTopic,
    /// Owned by a region this proxy has no cluster for, under a redirect rule.
    OwnerHasNoCluster,
    /// Owned elsewhere under a redirect rule, but not one batch keyward may carry to another
    /// cluster (several batches in the partition, or a transaction).
    Unredirectable,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::ForeignOwner => "foreign_owner",
            RejectKind::MixedBatch => "mixed_batch",
            RejectKind::Unowned(RejectReason::WrongLookup) => "internal",
            RejectKind::Unowned(reason) => reason.as_str(),
            RejectKind::MalformedBatch => "malformed_batch",
            RejectKind::NotAuthorized => "not_authorized",
            RejectKind::UnverifiedTopic => "unverified_topic",
            RejectKind::OwnerHasNoCluster => "owner_has_no_cluster",
            RejectKind::Unredirectable => "unredirectable",
        }
    }
}

/// Why a write is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// Its owner is frozen for a planned move.
    Frozen,
    /// Its owner is this region, whose cluster is down: keyward never writes it elsewhere.
    LocalClusterDown,
    /// keyward could not read the batch now: the decompression memory all connections share
    /// (`limits.max_decompressed_bytes_total`) is in use. Nothing was decided about its owner.
    MemoryBudget,
}

impl HoldReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::Frozen => "frozen",
            HoldReason::LocalClusterDown => "local_cluster_down",
            HoldReason::MemoryBudget => "memory_budget",
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
    /// Not writable right now: answered with a retriable error so the client retries.
    Hold { message: String, reason: HoldReason },
    /// Every record is owned by `owner` and the rule says `on_foreign: redirect`: produced to
    /// the owner's cluster instead of the local one.
    Redirect { owner: RegionId },
    /// The batch's records have several owners and the rule says `on_foreign: redirect`: the
    /// batch is split, `local` records to the local cluster and each foreign owner's records
    /// to its cluster, in the batch's order (see [`split_batch`]). Answered as one batch: a
    /// success only once every part has landed.
    Split {
        local: u32,
        /// (owner, records) for every foreign owner, in order of first appearance.
        foreign: Vec<(RegionId, u32)>,
    },
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
    /// The partition holds records this region owns (or audits), which may only be written to
    /// this region's own cluster.
    pub writes_local: bool,
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

    /// Decides where every partition goes, given where the clusters are: the final routes the
    /// proxy carries out, in request order. Partitions that cannot go where the table sends
    /// them become refusals or holds here, so the decisions counted are the ones carried out.
    ///
    /// - While another region's cluster serves this connection, this region's own writes are
    ///   held: they never land in a cluster that does not own them.
    /// - A redirect goes to the owner's cluster: on the client's own connection when that
    ///   cluster serves it, otherwise through keyward's producer, which carries exactly one
    ///   non-transactional batch per partition.
    pub fn place(
        &mut self,
        request: &ProduceView<'_>,
        table: &Table,
        placement: &Placement<'_>,
    ) -> Vec<Destination> {
        let records = request
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.records.unwrap_or_default()));
        self.partitions
            .iter_mut()
            .zip(records)
            .map(|(p, records)| place(p, records, table, placement))
            .collect()
    }

    /// Holds partition `index` after all (a split that cannot be made now): the decision
    /// counted becomes the hold, and so does its destination.
    pub fn hold(&mut self, index: usize, reason: HoldReason, message: String) -> Destination {
        let Some(p) = self.partitions.get_mut(index) else {
            return Destination::Connection;
        };
        p.action = Action::Hold { message, reason };
        answer(&p.action).map_or(Destination::Connection, Destination::Answer)
    }

    /// Refuses partition `index` after all (a redirect the client may not make): the decision
    /// counted becomes the refusal, and so does its destination.
    pub fn refuse(
        &mut self,
        index: usize,
        kind: RejectKind,
        error_code: i16,
        message: String,
    ) -> Destination {
        let Some(p) = self.partitions.get_mut(index) else {
            return Destination::Connection;
        };
        p.action = Action::Reject {
            kind,
            error_code,
            message,
            record_errors: Vec::new(),
        };
        answer(&p.action).map_or(Destination::Connection, Destination::Answer)
    }
}

/// Where the regions' clusters are, as one client connection sees them: what routing needs
/// beyond the table, as plain data.
pub struct Placement<'a> {
    /// The cluster of each region, by region id; `None` where the proxy has no cluster for it.
    pub clusters: &'a [Option<usize>],
    /// The cluster this client connection writes to: the local region's (0) unless reads
    /// failed over.
    pub connection: usize,
    /// Names for messages: the local region, and the cluster serving the connection.
    pub local_name: &'a str,
    pub connection_name: &'a str,
}

/// Where one partition goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// To the broker the client's connection leads to.
    Connection,
    /// Through keyward's own producer, to cluster `cluster` (never the connection's).
    Cluster(usize),
    /// Split ([`Action::Split`]): the local records to the connection (if any), each foreign
    /// owner's through keyward's own producer to its cluster, as (owner, cluster).
    Split(Vec<(RegionId, usize)>),
    /// Answered by keyward.
    Answer(LocalAnswer),
}

/// keyward's own answer for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAnswer {
    pub error_code: i16,
    pub message: String,
    /// (index of the record in its batch, why).
    pub record_errors: Vec<(i32, String)>,
}

fn place(
    p: &mut PartitionDecision,
    records: &[u8],
    table: &Table,
    placement: &Placement<'_>,
) -> Destination {
    let goes_local = p.action.is_forward() || matches!(p.action, Action::Split { .. });
    if placement.connection != 0 && p.writes_local && goes_local {
        let local = placement.local_name;
        p.action = Action::Hold {
            message: format!(
                "region {local}'s cluster is unreachable and keyward serves reads from {}; it never writes {local}-owned records to another cluster; retry later",
                placement.connection_name
            ),
            reason: HoldReason::LocalClusterDown,
        };
    }
    if let Action::Split { foreign, .. } = &p.action {
        let mut parts = Vec::with_capacity(foreign.len());
        let mut refusal = redirectable(records).err().map(|why| {
            (
                RejectKind::Unredirectable,
                format!("the batch mixes records of several regions and cannot be split: {why}"),
            )
        });
        for &(owner, _) in foreign {
            if refusal.is_some() {
                break;
            }
            match placement.clusters.get(owner.index()).copied().flatten() {
                Some(cluster) if cluster != placement.connection => parts.push((owner, cluster)),
                // Only while reads are failed over, and then the local records are held above.
                Some(_) => {}
                None => {
                    refusal = Some((
                        RejectKind::OwnerHasNoCluster,
                        format!(
                            "records of the batch are owned by region {}, which has no cluster in this proxy's config",
                            table.region_name(owner)
                        ),
                    ));
                }
            }
        }
        match refusal {
            None => return Destination::Split(parts),
            Some((kind, message)) => {
                p.action = Action::Reject {
                    kind,
                    error_code: INVALID_RECORD,
                    message,
                    record_errors: Vec::new(),
                };
            }
        }
    }
    if let Action::Redirect { owner } = p.action {
        let name = table.region_name(owner);
        let (kind, message) = match placement.clusters.get(owner.index()).copied().flatten() {
            Some(cluster) if cluster == placement.connection => return Destination::Connection,
            Some(cluster) => match redirectable(records) {
                Ok(()) => return Destination::Cluster(cluster),
                Err(why) => (
                    RejectKind::Unredirectable,
                    format!(
                        "the batch is owned by region {name} but cannot be redirected to its cluster: {why}"
                    ),
                ),
            },
            None => (
                RejectKind::OwnerHasNoCluster,
                format!(
                    "the batch is owned by region {name}, which has no cluster in this proxy's config"
                ),
            ),
        };
        p.action = Action::Reject {
            kind,
            error_code: INVALID_RECORD,
            message,
            record_errors: Vec::new(),
        };
    }
    answer(&p.action).map_or(Destination::Connection, Destination::Answer)
}

/// keyward's own answer for a refused or held partition; `None` for one that goes on.
fn answer(action: &Action) -> Option<LocalAnswer> {
    match action {
        Action::Reject {
            error_code,
            message,
            record_errors,
            ..
        } => Some(LocalAnswer {
            error_code: *error_code,
            message: message.clone(),
            record_errors: record_errors.clone(),
        }),
        Action::Hold { message, .. } => Some(LocalAnswer {
            error_code: NOT_ENOUGH_REPLICAS,
            message: message.clone(),
            record_errors: Vec::new(),
        }),
        Action::Forward { .. } | Action::Redirect { .. } | Action::Split { .. } => None,
    }
}

/// Whether a partition's records are one batch keyward may write to another cluster under its
/// own producer id.
fn redirectable(records: &[u8]) -> Result<(), &'static str> {
    let mut batches = records::batches(records);
    let batch = match (batches.next(), batches.next()) {
        (Some(Ok(b)), None) => b,
        (None, _) => return Err("the partition holds no record batch"),
        (Some(Err(_)), _) => return Err("the record batch is malformed"),
        (Some(Ok(_)), Some(_)) => return Err("the partition holds more than one record batch"),
    };
    if batch.header.is_transactional() {
        return Err("a transaction cannot span clusters");
    }
    Ok(())
}

/// The parts of a batch decided [`Action::Split`] (`foreign` is that action's): part 0 holds
/// the records that stay local (owned here, or by any region), part `i` the records of
/// `foreign[i - 1]`'s owner. Decided again record by record against the same table and
/// `rule` (by index), so a record the decision did not foresee (a bug) fails the split with
/// [`SplitError::PartOutOfRange`] instead of going anywhere.
#[allow(clippy::too_many_arguments)]
pub fn split_batch(
    table: &Table,
    rule: usize,
    local: RegionId,
    topic: &str,
    partition: i32,
    records: &[u8],
    foreign: &[(RegionId, u32)],
    inflater: &mut Inflater,
) -> Result<Split, SplitError> {
    let parts = foreign.len() + 1;
    let Some(rule) = table.rules().get(rule) else {
        return Err(SplitError::PartOutOfRange { part: parts, parts });
    };
    split::split(records, inflater, parts, |_, record| {
        let subject = Subject::record(topic, partition, *record);
        let (claim, part) = claim(rule, &subject);
        match table.judge(claim, part, local) {
            Verdict::Owned | Verdict::Any => 0,
            Verdict::Foreign { owner } => foreign
                .iter()
                .position(|(o, _)| *o == owner)
                .map_or(parts, |i| i + 1),
            Verdict::Frozen { .. } | Verdict::Reject(_) => parts,
        }
    })
}

/// The region owning the first record of a partition that an `on_foreign: audit` rule (by
/// index) let through, or `None` if it holds none. Decided again against the same table, for
/// the audit log line: the decision itself counts audited records, not their owners. Walks the
/// records (inflating a compressed batch again), so call it only for a line that will be
/// logged.
pub fn first_audited_owner(
    table: &Table,
    rule: usize,
    local: RegionId,
    topic: &str,
    partition: i32,
    records: &[u8],
    inflater: &mut Inflater,
) -> Option<RegionId> {
    let rule = table.rules().get(rule)?;
    let foreign = |subject: &Subject<'_>| {
        let (claim, part) = claim(rule, subject);
        match table.judge(claim, part, local) {
            Verdict::Foreign { owner } => Some(owner),
            _ => None,
        }
    };
    if !rule.reads_records() {
        return foreign(&Subject::topic(topic).with_partition(partition));
    }
    for batch in records::batches(records).flatten() {
        let mut found = None;
        let _ = batch.for_each_record_wanting(inflater, rule.header_name(), |_, record| {
            found = foreign(&Subject::record(topic, partition, record));
            if found.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if found.is_some() {
            return found;
        }
    }
    None
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
        let rule_index = rule.and_then(|r| table.rule_index(r));
        for partition in &topic.partitions {
            let decision = match rule {
                None => counted(
                    decide_default(table, topic.name),
                    partition.records.unwrap_or_default(),
                ),
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
        writes_local: false,
    }
}

/// Fills in the batch and record counts of a decision made without decoding records, from the
/// batch headers alone.
///
/// The header's record count is the client's word, unchecked here, so it is believed only as
/// far as the batch's bytes could hold that many records: a lying count cannot inflate the
/// metrics (or overflow them).
fn counted(mut d: PartitionDecision, records: &[u8]) -> PartitionDecision {
    d.batches = 0;
    d.records = 0;
    for batch in records::batches(records).flatten() {
        let room = batch.raw().len().saturating_sub(records::BATCH_HEADER_LEN) / MIN_RECORD_LEN;
        let claimed = usize::try_from(batch.header.records_count).unwrap_or(0);
        let count = u32::try_from(claimed.min(room)).unwrap_or(u32::MAX);
        d.batches = d.batches.saturating_add(1);
        d.records = d.records.saturating_add(count);
    }
    d
}

/// The smallest a record can be on the wire: length, attributes, timestamp delta, offset
/// delta, key length, value length and header count, one byte each.
const MIN_RECORD_LEN: usize = 7;

fn decide_default(table: &Table, topic: &str) -> PartitionDecision {
    match table.default_policy() {
        DefaultPolicy::Allow => decision(Action::Forward { audited: 0 }),
        DefaultPolicy::Reject => decision(Action::Reject {
            kind: RejectKind::Unowned(RejectReason::DefaultReject),
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
    if !rule.reads_records() {
        let subject = Subject::topic(topic).with_partition(partition);
        let mut tally = Tally::new(table, rule, local);
        let (claim, part) = claim(rule, &subject);
        tally.add(0, claim, part, &subject);
        return counted(tally.finish(), records);
    }

    let mut total = PartitionDecision {
        action: Action::Forward { audited: 0 },
        rule: None,
        owner: Some(local),
        batches: 0,
        records: 0,
        writes_local: false,
    };
    for batch in records::batches(records) {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return malformed(total, topic, partition, &e),
        };
        let mut tally = Tally::new(table, rule, local);
        let walked =
            batch.for_each_record_wanting(inflater, rule.header_name(), |index, record| {
                let subject = Subject::record(topic, partition, record);
                let (claim, part) = claim(rule, &subject);
                tally.add(index as i32, claim, part, &subject);
                ControlFlow::Continue(())
            });
        if let Err(e) = walked {
            return malformed(total, topic, partition, &e);
        }
        let d = tally.finish();
        total.batches = total.batches.saturating_add(1);
        total.records = total.records.saturating_add(d.records);
        total.writes_local |= d.writes_local;
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
            // Several batches of one partition go to one place or not at all.
            (Action::Redirect { owner: a }, Action::Redirect { owner: b }) if a == b => {
                Action::Redirect { owner: a }
            }
            (Action::Forward { .. }, redirect @ Action::Redirect { .. }) if total.batches == 1 => {
                total.owner = d.owner;
                redirect
            }
            (Action::Forward { .. }, split @ Action::Split { .. }) if total.batches == 1 => {
                total.owner = d.owner;
                split
            }
            (first, second) => {
                let _ = (first, second);
                let mut message = "the partition's batches belong to different regions; keyward never splits a request's partition".to_owned();
                with_remedy(&mut message, rule);
                Action::Reject {
                    kind: RejectKind::MixedBatch,
                    error_code: INVALID_RECORD,
                    message,
                    record_errors: Vec::new(),
                }
            }
        };
    }
    total
}

/// Ends a mixed-batch refusal with what the producer can change, when a partitioner can keep
/// the rule's owners apart (`by: key`): a client cannot be told that half a batch landed, so
/// the batch is refused whole, and the message is where its developer looks first.
fn with_remedy(message: &mut String, rule: &Rule) {
    if let Some(remedy) = alignment::remedy(rule) {
        message.push_str(". ");
        message.push_str(&remedy);
    }
}

fn malformed(
    mut total: PartitionDecision,
    topic: &str,
    partition: i32,
    e: &records::RecordsError,
) -> PartitionDecision {
    if let records::RecordsError::MemoryBudgetExhausted { .. } = e {
        // Not the batch's fault: answered with a retriable error, never written, so the client
        // sends it again once memory is free.
        total.action = Action::Hold {
            message: format!(
                "keyward could not read the record batch for {topic}-{partition} now: {e}"
            ),
            reason: HoldReason::MemoryBudget,
        };
        total.owner = None;
        total.writes_local = false;
        return total;
    }
    total.action = Action::Reject {
        kind: RejectKind::MalformedBatch,
        error_code: CORRUPT_MESSAGE,
        message: format!("keyward could not read the record batch for {topic}-{partition}: {e}"),
        record_errors: Vec::new(),
    };
    total.owner = None;
    total
}

/// The rule's claim on a write the policy built in full: a rule that cannot answer it is a bug,
/// refused rather than guessed.
fn claim(rule: &Rule, subject: &Subject<'_>) -> (Claim, PartState) {
    rule.decide(subject).unwrap_or((
        Claim::Reject(RejectReason::WrongLookup),
        PartState::default(),
    ))
}

/// Accumulates the verdicts of one batch's records.
struct Tally<'t> {
    table: &'t Table,
    rule: &'t Rule,
    local: RegionId,
    records: u32,
    owned: u32,
    audited: u32,
    refused: u32,
    /// The first refused record decides the reason and the headline message.
    first_refusal: Option<(RejectKind, String, Option<RegionId>)>,
    record_errors: Vec<(i32, String)>,
    frozen: Option<(String, RegionId)>,
    /// Under `on_foreign: redirect`: the foreign owners with their record counts, in order of
    /// first appearance, and the first of those records (listed should the batch be refused).
    foreign: Vec<(RegionId, u32)>,
    redirected: Vec<(i32, String)>,
    redirected_count: u32,
}

impl<'t> Tally<'t> {
    fn new(table: &'t Table, rule: &'t Rule, local: RegionId) -> Self {
        Self {
            table,
            rule,
            local,
            records: 0,
            owned: 0,
            audited: 0,
            refused: 0,
            first_refusal: None,
            record_errors: Vec::new(),
            frozen: None,
            foreign: Vec::new(),
            redirected: Vec::new(),
            redirected_count: 0,
        }
    }

    fn add(&mut self, index: i32, claim: Claim, part: PartState, subject: &Subject<'_>) {
        self.records += 1;
        match self.table.judge(claim, part, self.local) {
            Verdict::Owned => self.owned += 1,
            Verdict::Any => {}
            Verdict::Foreign { .. } if self.rule.on_foreign == OnForeign::Audit => {
                self.audited += 1;
            }
            Verdict::Foreign { owner } => {
                // Worded only for the records whose message is kept: no allocation per record.
                let why = |t: &Self| {
                    format!(
                        "{} is owned by region {}{}; this proxy writes for {}",
                        t.describe(subject),
                        t.table.region_name(owner),
                        t.where_(claim),
                        t.table.region_name(t.local),
                    )
                };
                if self.rule.on_foreign == OnForeign::Redirect {
                    match self.foreign.iter_mut().find(|(o, _)| *o == owner) {
                        Some((_, n)) => *n += 1,
                        None => self.foreign.push((owner, 1)),
                    }
                    self.redirected_count += 1;
                    if self.redirected.len() < MAX_RECORD_ERRORS {
                        let why = why(self);
                        self.redirected.push((index, why));
                    }
                } else {
                    self.refuse(index, RejectKind::ForeignOwner, why, Some(owner));
                }
            }
            Verdict::Reject(reason) => {
                // Refused whatever the region: there is no owner to name.
                let why = |t: &Self| t.describe_reject(reason, subject);
                self.refuse(index, RejectKind::Unowned(reason), why, None);
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

    /// Counts a refused record; `why` words its message, asked only while messages are kept.
    fn refuse(
        &mut self,
        index: i32,
        kind: RejectKind,
        why: impl FnOnce(&Self) -> String,
        owner: Option<RegionId>,
    ) {
        self.refused += 1;
        let listed = self.record_errors.len() < MAX_RECORD_ERRORS;
        if !listed && self.first_refusal.is_some() {
            return;
        }
        let why = why(self);
        if listed {
            self.record_errors.push((index, why.clone()));
        }
        if self.first_refusal.is_none() {
            self.first_refusal = Some((kind, why, owner));
        }
    }

    fn describe(&self, subject: &Subject<'_>) -> String {
        self.rule.describe(subject)
    }

    fn where_(&self, claim: Claim) -> String {
        match claim {
            Claim::Region {
                slot: Some(slot), ..
            } => format!(" (rule {}, slot {slot})", self.rule.name),
            _ => format!(" (rule {})", self.rule.name),
        }
    }

    fn describe_reject(&self, reason: RejectReason, subject: &Subject<'_>) -> String {
        self.rule.refusal(reason, subject)
    }

    fn finish(mut self) -> PartitionDecision {
        let writes_local = self.owned > 0 || self.audited > 0;
        if self.redirected_count > 0 && self.first_refusal.is_none() && self.frozen.is_none() {
            // Every record goes somewhere: to one owner whole, or split between several.
            let foreign = std::mem::take(&mut self.foreign);
            let action = match foreign.as_slice() {
                [(owner, _)] if !writes_local => Action::Redirect { owner: *owner },
                _ => Action::Split {
                    local: self.owned,
                    foreign,
                },
            };
            let owner = match &action {
                Action::Redirect { owner } => Some(*owner),
                _ => Some(self.local),
            };
            return PartitionDecision {
                action,
                rule: None,
                owner,
                batches: 1,
                records: self.records,
                writes_local,
            };
        }
        if self.redirected_count > 0 && self.first_refusal.is_some() {
            // Records bound for another cluster share the batch with records refused: the
            // batch cannot go anywhere.
            let redirected = std::mem::take(&mut self.redirected);
            let count = self.redirected_count;
            for (i, (index, why)) in redirected.into_iter().enumerate() {
                if i == 0 && self.first_refusal.is_none() {
                    let owner = self.foreign.first().map(|(o, _)| *o);
                    self.first_refusal = Some((RejectKind::ForeignOwner, why.clone(), owner));
                }
                if self.record_errors.len() < MAX_RECORD_ERRORS {
                    self.record_errors.push((index, why));
                }
            }
            self.record_errors.sort_by_key(|(i, _)| *i);
            self.refused += count;
        }
        let action = if let Some((kind, why, owner)) = self.first_refusal {
            let mixed = kind == RejectKind::ForeignOwner && self.refused < self.records;
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
            if mixed {
                // Also on the first listed record: the Java client shows each record its own
                // error, and the top-level message only when no record has one.
                with_remedy(&mut message, self.rule);
                if let Some((_, first)) = self.record_errors.first_mut() {
                    with_remedy(first, self.rule);
                }
            }
            return PartitionDecision {
                action: Action::Reject {
                    kind,
                    error_code: INVALID_RECORD,
                    message,
                    record_errors: self.record_errors,
                },
                rule: None,
                owner,
                batches: 1,
                records: self.records,
                writes_local,
            };
        } else if let Some((message, owner)) = self.frozen {
            return PartitionDecision {
                action: Action::Hold {
                    message,
                    reason: HoldReason::Frozen,
                },
                rule: None,
                owner: Some(owner),
                batches: 1,
                records: self.records,
                writes_local,
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
            writes_local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::produce::{PartitionView, TopicView};
    use crate::ownership::murmur2::{murmur2, to_positive};
    use crate::testkit;
    use bytes::Bytes;
    use kafka_protocol::records::{Compression, Record};
    use std::path::Path;

    const TABLE: &str = r#"
rules:
  - name: orders
    topics: ["orders", "orders.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    null_key: reject
  - name: orders-audited
    topics: ["audited"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    on_foreign: audit
  - name: tenants
    topics: ["tenant.*"]
    by: header
    header: tenant
    owners: { eu: [acme], us: [initech] }
  - name: inventory
    topics: ["inventory"]
    by: partition
    owners: { eu: ["0-5"], us: ["6-11"] }
  - name: audit-log
    topics: ["audit.*"]
    by: topic
    owner: eu
  - name: telemetry
    topics: ["metrics.*"]
    owner: any
  - name: accounts
    topics: ["accounts.*"]
    by: key_part
    delimiter: "|"
    owners: { eu: [tenant-1, tenant-42], us: [tenant-7] }
  - name: ledgers
    topics: ["ledger"]
    by: key_part
    pattern: '^(tenant-[0-9]+)/'
    owners: { eu: [tenant-1], us: [tenant-7] }
  - name: hashed-accounts
    topics: ["hashed.*"]
    by: key_part
    delimiter: "|"
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
default: reject
"#;

    fn table(extra: &str) -> Table {
        let regions = ["eu".to_owned(), "us".to_owned()];
        Table::parse(
            &format!("{TABLE}{extra}"),
            Path::new("ownership.yaml"),
            &regions,
        )
        .unwrap()
    }

    /// The first key `k<n>` whose slot (of 16) falls in `range`.
    fn key_in(range: std::ops::Range<u32>) -> String {
        (0..)
            .map(|n| format!("k{n}"))
            .find(|k| range.contains(&(to_positive(murmur2(k.as_bytes())) % 16)))
            .unwrap()
    }

    /// A record for a test batch: key and headers.
    type TestRecord<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)]);

    fn batch(records: &[TestRecord<'_>], compression: Compression) -> Bytes {
        let records: Vec<Record> = records
            .iter()
            .map(|(key, headers)| {
                let headers: Vec<(&str, Option<&[u8]>)> = headers
                    .iter()
                    .map(|(n, v)| (*n, Some(v.as_bytes())))
                    .collect();
                testkit::record(key.map(str::as_bytes), Some(b"value"), &headers)
            })
            .collect();
        testkit::batch(&records, compression)
    }

    fn keys(keys: &[Option<&str>]) -> Bytes {
        let records: Vec<TestRecord<'_>> = keys.iter().map(|k| (*k, &[][..])).collect();
        batch(&records, Compression::None)
    }

    /// A request of one partition of one topic.
    fn one_partition<'a>(topic: &'a str, index: i32, records: &'a [u8]) -> ProduceView<'a> {
        ProduceView {
            transactional_id: None,
            acks: -1,
            timeout_ms: 1000,
            topics: vec![TopicView {
                name: topic,
                partitions: vec![PartitionView {
                    index,
                    records: Some(records),
                }],
            }],
        }
    }

    fn decide_one(
        table: &Table,
        region: &str,
        topic: &str,
        partition: i32,
        records: &[u8],
    ) -> PartitionDecision {
        let view = one_partition(topic, partition, records);
        let local = table.region_id(region).unwrap();
        let mut plan = decide(&view, table, local, &mut Inflater::new(1 << 20));
        plan.partitions.remove(0)
    }

    fn reject_of(d: &PartitionDecision) -> (RejectKind, &str, &[(i32, String)]) {
        match &d.action {
            Action::Reject {
                kind,
                message,
                record_errors,
                error_code,
            } => {
                assert_eq!(
                    *error_code,
                    if *kind == RejectKind::MalformedBatch {
                        CORRUPT_MESSAGE
                    } else {
                        INVALID_RECORD
                    }
                );
                (*kind, message, record_errors)
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn redirect_table() -> Table {
        let regions = ["eu".to_owned(), "us".to_owned(), "ap".to_owned()];
        let yaml = r#"
rules:
  - name: orders
    topics: ["orders"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-11"], ap: ["12-15"] }
    on_foreign: redirect
default: allow
"#;
        Table::parse(yaml, Path::new("ownership.yaml"), &regions).unwrap()
    }

    /// Decides and places one partition for the eu proxy; `clusters` by region id
    /// (eu, us, ap), the connection writing to `connection`.
    fn placed(
        records: &[u8],
        clusters: &[Option<usize>],
        connection: usize,
    ) -> (PartitionDecision, Destination) {
        let t = redirect_table();
        let view = one_partition("orders", 0, records);
        let local = t.region_id("eu").unwrap();
        let mut plan = decide(&view, &t, local, &mut Inflater::new(1 << 20));
        let placement = Placement {
            clusters,
            connection,
            local_name: "eu",
            connection_name: if connection == 0 { "eu" } else { "us" },
        };
        let mut destinations = plan.place(&view, &t, &placement);
        (plan.partitions.remove(0), destinations.remove(0))
    }

    fn transactional(key: &str) -> Bytes {
        let record = Record {
            transactional: true,
            producer_id: 5,
            producer_epoch: 0,
            sequence: 0,
            ..testkit::record(Some(key.as_bytes()), Some(b"v"), &[])
        };
        testkit::batch(&[record], Compression::None)
    }

    #[test]
    fn only_single_non_transactional_batches_are_redirected() {
        let one = keys(&[Some(&key_in(8..12))]);
        assert_eq!(redirectable(&one), Ok(()));
        assert_eq!(
            redirectable(&transactional("k")),
            Err("a transaction cannot span clusters")
        );
        let two = [one.clone(), one.clone()].concat();
        assert_eq!(
            redirectable(&two),
            Err("the partition holds more than one record batch")
        );
        assert_eq!(
            redirectable(&[]),
            Err("the partition holds no record batch")
        );
        assert_eq!(
            redirectable(&one[..20]),
            Err("the record batch is malformed")
        );
    }

    #[test]
    fn placement_gives_every_partition_its_final_route_and_counts_what_is_carried_out() {
        let clusters = [Some(0), Some(1), None];
        let us = keys(&[Some(&key_in(8..12))]);
        let (d, to) = placed(&us, &clusters, 0);
        assert_eq!(to, Destination::Cluster(1));
        assert!(matches!(d.action, Action::Redirect { .. }));

        // A redirect keyward cannot carry is counted as the refusal it is, not as redirected.
        let two = [us.clone(), us.clone()].concat();
        let (d, to) = placed(&two, &clusters, 0);
        assert_eq!(reject_of(&d).0, RejectKind::Unredirectable);
        assert!(
            matches!(to, Destination::Answer(LocalAnswer { error_code, .. }) if error_code == INVALID_RECORD)
        );
        let (d, _) = placed(&transactional(&key_in(8..12)), &clusters, 0);
        assert_eq!(reject_of(&d).0, RejectKind::Unredirectable);

        // ap has no cluster in this proxy.
        let (d, to) = placed(&keys(&[Some(&key_in(12..16))]), &clusters, 0);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::OwnerHasNoCluster);
        assert!(
            message.contains("region ap, which has no cluster"),
            "{message}"
        );
        assert!(matches!(to, Destination::Answer(_)));

        // Reads failed over to us's cluster: us-owned batches go on the client's connection
        // (several batches too), eu-owned ones are held.
        let (_, to) = placed(&two, &clusters, 1);
        assert_eq!(to, Destination::Connection);
        let (d, to) = placed(&keys(&[Some(&key_in(0..8))]), &clusters, 1);
        assert!(matches!(
            d.action,
            Action::Hold {
                reason: HoldReason::LocalClusterDown,
                ..
            }
        ));
        assert!(
            matches!(to, Destination::Answer(LocalAnswer { error_code, .. }) if error_code == NOT_ENOUGH_REPLICAS)
        );
        let (d, to) = placed(&keys(&[Some(&key_in(0..8))]), &clusters, 0);
        assert_eq!(d.action, Action::Forward { audited: 0 });
        assert_eq!(to, Destination::Connection);
    }

    /// The `nth` key (from 0) whose slot is in `range`.
    fn nth_key_in(range: std::ops::Range<u32>, nth: usize) -> String {
        (0..)
            .map(|n| format!("k{n}"))
            .filter(|k| range.contains(&(to_positive(murmur2(k.as_bytes())) % 16)))
            .nth(nth)
            .unwrap()
    }

    #[test]
    fn a_batch_of_several_owners_under_redirect_is_split_in_the_batch_order() {
        let t = redirect_table();
        let (eu, us, ap) = (
            t.region_id("eu").unwrap(),
            t.region_id("us").unwrap(),
            t.region_id("ap").unwrap(),
        );
        // eu, us, eu, ap, us: two foreign owners, us first.
        let batch = keys(&[
            Some(&nth_key_in(0..8, 0)),
            Some(&nth_key_in(8..12, 0)),
            Some(&nth_key_in(0..8, 1)),
            Some(&nth_key_in(12..16, 0)),
            Some(&nth_key_in(8..12, 1)),
        ]);
        let (d, to) = placed(&batch, &[Some(0), Some(1), Some(2)], 0);
        assert_eq!(
            d.action,
            Action::Split {
                local: 2,
                foreign: vec![(us, 2), (ap, 1)]
            }
        );
        assert!(d.writes_local);
        assert_eq!(to, Destination::Split(vec![(us, 1), (ap, 2)]));
        // One foreign owner and no local record is a plain redirect, not a split.
        let only_us = keys(&[Some(&nth_key_in(8..12, 0)), Some(&nth_key_in(8..12, 1))]);
        let (d, _) = placed(&only_us, &[Some(0), Some(1), Some(2)], 0);
        assert_eq!(d.action, Action::Redirect { owner: us });

        // The parts: local first, then each owner's, every record once, in the batch's order.
        let Action::Split { foreign, .. } = &d_split(&t, &batch) else {
            unreachable!()
        };
        let split = split_batch(
            &t,
            0,
            eu,
            "orders",
            0,
            &batch,
            foreign,
            &mut Inflater::new(1 << 20),
        );
        let Ok(Split::Parts(parts)) = split else {
            panic!("{split:?}");
        };
        type Shape = (usize, usize, Vec<(usize, usize)>);
        let shape: Vec<Shape> = parts
            .iter()
            .map(|p| {
                (
                    p.part,
                    p.records,
                    p.runs.iter().map(|r| (r.start, r.end)).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (0, 2, vec![(0, 1), (2, 3)]),
                (1, 2, vec![(1, 2), (4, 5)]),
                (2, 1, vec![(3, 4)])
            ]
        );
    }

    fn d_split(t: &Table, batch: &[u8]) -> Action {
        let view = one_partition("orders", 0, batch);
        let plan = decide(
            &view,
            t,
            t.region_id("eu").unwrap(),
            &mut Inflater::new(1 << 20),
        );
        plan.partitions[0].action.clone()
    }

    #[test]
    fn a_split_that_cannot_be_carried_is_refused_or_held_as_one_batch() {
        let mixed = keys(&[Some(&key_in(0..8)), Some(&key_in(8..12))]);
        // A transaction cannot span clusters.
        let record = |key: String| Record {
            transactional: true,
            producer_id: 5,
            producer_epoch: 0,
            sequence: 0,
            ..testkit::record(Some(key.as_bytes()), Some(b"v"), &[])
        };
        let txn = testkit::batch(
            &[record(key_in(0..8)), record(key_in(8..12))],
            Compression::None,
        );
        let (d, to) = placed(&txn, &[Some(0), Some(1), None], 0);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::Unredirectable);
        assert!(message.contains("cannot be split"), "{message}");
        assert!(matches!(to, Destination::Answer(_)));
        // An owner without a cluster.
        let with_ap = keys(&[Some(&key_in(0..8)), Some(&key_in(12..16))]);
        let (d, _) = placed(&with_ap, &[Some(0), Some(1), None], 0);
        assert_eq!(reject_of(&d).0, RejectKind::OwnerHasNoCluster);
        // Reads failed over: the local records are held, so the batch is.
        let (d, to) = placed(&mixed, &[Some(0), Some(1), None], 1);
        assert!(matches!(
            d.action,
            Action::Hold {
                reason: HoldReason::LocalClusterDown,
                ..
            }
        ));
        assert!(matches!(to, Destination::Answer(_)));
        // Normal: split.
        let (_, to) = placed(&mixed, &[Some(0), Some(1), None], 0);
        assert!(matches!(to, Destination::Split(_)));
    }

    #[test]
    fn a_refused_redirect_is_counted_as_the_refusal() {
        let clusters = [Some(0), Some(1), None];
        let t = redirect_table();
        let us = keys(&[Some(&key_in(8..12))]);
        let view = one_partition("orders", 0, &us);
        let mut plan = decide(
            &view,
            &t,
            t.region_id("eu").unwrap(),
            &mut Inflater::new(1 << 20),
        );
        let placement = Placement {
            clusters: &clusters,
            connection: 0,
            local_name: "eu",
            connection_name: "eu",
        };
        assert_eq!(plan.place(&view, &t, &placement), [Destination::Cluster(1)]);
        let to = plan.refuse(0, RejectKind::NotAuthorized, 29, "no WRITE".into());
        assert!(matches!(
            to,
            Destination::Answer(LocalAnswer { error_code: 29, .. })
        ));
        assert!(matches!(
            plan.partitions[0].action,
            Action::Reject {
                kind: RejectKind::NotAuthorized,
                ..
            }
        ));
    }

    #[test]
    fn owned_keys_are_forwarded_and_foreign_keys_rejected_with_the_owner_named() {
        let t = table("");
        let (eu, us) = (key_in(0..8), key_in(8..16));
        let d = decide_one(&t, "eu", "orders", 0, &keys(&[Some(&eu), Some(&eu)]));
        assert_eq!(d.action, Action::Forward { audited: 0 });
        assert_eq!((d.batches, d.records), (1, 2));

        let d = decide_one(&t, "eu", "orders.v2", 0, &keys(&[Some(&us)]));
        let slot = to_positive(murmur2(us.as_bytes())) % 16;
        let (kind, message, errors) = reject_of(&d);
        assert_eq!(kind, RejectKind::ForeignOwner);
        assert_eq!(
            message,
            format!(
                "key \"{us}\" is owned by region us (rule orders, slot {slot}); this proxy writes for eu"
            )
        );
        assert_eq!(errors, &[(0, message.to_owned())]);
        assert_eq!(d.owner, t.region_id("us"));

        // The same batch is the us proxy's to write.
        let d = decide_one(&t, "us", "orders", 0, &keys(&[Some(&us)]));
        assert!(d.action.is_forward());
    }

    #[test]
    fn a_mixed_batch_is_refused_whole_listing_only_the_foreign_records() {
        let t = table("");
        let (eu, us) = (key_in(0..8), key_in(8..16));
        let d = decide_one(
            &t,
            "eu",
            "orders",
            0,
            &keys(&[Some(&eu), Some(&us), Some(&eu), Some(&us)]),
        );
        let (kind, message, errors) = reject_of(&d);
        assert_eq!(kind, RejectKind::MixedBatch);
        assert!(
            message.starts_with("batch mixes regions: 2 of 4 records are owned elsewhere"),
            "{message}"
        );
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 3]);
        // The remedy comes last, once, and the records' own errors stay short.
        assert!(
            message.ends_with(
                "keyward never splits a batch. To keep each batch to one region, produce with the \
                 murmur2 partitioner (the Java client's default; librdkafka \
                 partitioner=murmur2_random) to a topic whose partition count is a multiple of 16 \
                 (the slots of rule orders)."
            ),
            "{message}"
        );
        // The first listed record carries it too (the Java client shows records their own
        // error); the others stay short.
        assert!(errors[0].1.contains("murmur2 partitioner"), "{errors:?}");
        assert!(!errors[1].1.contains("murmur2"), "{errors:?}");
    }

    /// Under redirect a mixed batch is refused whole too, with the same remedy; a header rule
    /// has no partitioner to name, so its message stays as it was.
    #[test]
    fn a_mixed_batch_names_the_remedy_only_where_a_partitioner_can_follow_the_rule() {
        let moved = "  - name: moved\n    topics: [\"moved\"]\n    by: key\n    slots: 16\n    owners: { eu: [\"0-7\"], us: [\"8-15\"] }\n    on_foreign: redirect\ndefault: reject\n";
        let t = Table::parse(
            &TABLE.replace("default: reject\n", moved),
            Path::new("ownership.yaml"),
            &["eu".to_owned(), "us".to_owned()],
        )
        .unwrap();
        let (eu, us) = (key_in(0..8), key_in(8..16));
        let mixed = keys(&[Some(&eu), Some(&us)]);
        let d = decide_one(&t, "eu", "orders", 0, &mixed);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::MixedBatch);
        assert!(
            message.contains("murmur2 partitioner") && message.contains("multiple of 16"),
            "{message}"
        );
        // Under redirect the same batch is split, not refused.
        let d = decide_one(&t, "eu", "moved", 0, &mixed);
        assert!(
            matches!(d.action, Action::Split { local: 1, .. }),
            "{:?}",
            d.action
        );
        let d = decide_one(
            &t,
            "eu",
            "tenant.billing",
            0,
            &batch(
                &[
                    (Some("x"), &[("tenant", "acme")]),
                    (Some("y"), &[("tenant", "initech")]),
                ],
                Compression::None,
            ),
        );
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::MixedBatch);
        assert!(
            message.ends_with("keyward never splits a batch"),
            "{message}"
        );
    }

    #[test]
    fn null_keys_follow_the_rule() {
        let t = table("");
        let d = decide_one(&t, "eu", "orders", 0, &keys(&[None]));
        assert_eq!(reject_of(&d).0, RejectKind::Unowned(RejectReason::NullKey));
    }

    #[test]
    fn header_rules_read_the_named_header() {
        let t = table("");
        let acme = batch(&[(Some("x"), &[("tenant", "acme")])], Compression::None);
        let initech = batch(
            &[(Some("x"), &[("other", "1"), ("tenant", "initech")])],
            Compression::None,
        );
        let missing = batch(&[(Some("x"), &[("other", "acme")])], Compression::None);
        assert!(
            decide_one(&t, "eu", "tenant.billing", 0, &acme)
                .action
                .is_forward()
        );
        let d = decide_one(&t, "eu", "tenant.billing", 0, &initech);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::ForeignOwner);
        assert_eq!(
            message,
            "header tenant=\"initech\" is owned by region us (rule tenants); this proxy writes for eu"
        );
        assert_eq!(
            reject_of(&decide_one(&t, "eu", "tenant.billing", 0, &missing)).0,
            RejectKind::Unowned(RejectReason::UnmatchedHeader)
        );
    }

    #[test]
    fn partition_topic_any_and_default_rules_need_no_record_decoding() {
        let t = table("");
        // Not a record batch at all: these rules must not look inside.
        let junk = b"not a batch";
        assert!(
            decide_one(&t, "eu", "inventory", 5, junk)
                .action
                .is_forward()
        );
        let d = decide_one(&t, "eu", "inventory", 6, junk);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::ForeignOwner);
        assert_eq!(
            message,
            "partition 6 of topic \"inventory\" is owned by region us (rule inventory); this proxy writes for eu"
        );
        assert_eq!(
            reject_of(&decide_one(&t, "eu", "inventory", 12, junk)).0,
            RejectKind::Unowned(RejectReason::UnownedPartition)
        );
        assert!(
            decide_one(&t, "eu", "audit.login", 0, junk)
                .action
                .is_forward()
        );
        assert_eq!(
            reject_of(&decide_one(&t, "us", "audit.login", 0, junk)).0,
            RejectKind::ForeignOwner
        );
        assert!(
            decide_one(&t, "us", "metrics.cpu", 0, junk)
                .action
                .is_forward()
        );
        let d = decide_one(&t, "eu", "unlisted", 0, junk);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::Unowned(RejectReason::DefaultReject));
        assert_eq!(
            message,
            "topic \"unlisted\" matches no ownership rule and the table's default is reject"
        );
    }

    #[test]
    fn audit_forwards_foreign_records_and_counts_them() {
        let t = table("");
        let (eu, us) = (key_in(0..8), key_in(8..16));
        let d = decide_one(
            &t,
            "eu",
            "audited",
            0,
            &keys(&[Some(&eu), Some(&us), Some(&us)]),
        );
        assert_eq!(d.action, Action::Forward { audited: 2 });
    }

    #[test]
    fn the_first_audited_record_names_its_owner_for_the_log() {
        let t = table("");
        let (eu, us) = (key_in(0..8), key_in(8..16));
        let local = t.region_id("eu").unwrap();
        let rule = t
            .rules()
            .iter()
            .position(|r| r.name == "orders-audited")
            .unwrap();
        let owner = |records: &[u8]| {
            first_audited_owner(
                &t,
                rule,
                local,
                "audited",
                0,
                records,
                &mut Inflater::new(1 << 20),
            )
        };
        assert_eq!(
            owner(&keys(&[Some(&eu), Some(&us)])),
            t.region_id("us"),
            "the us record"
        );
        assert_eq!(owner(&keys(&[Some(&eu), Some(&eu)])), None, "all owned");
        assert_eq!(owner(b"junk"), None, "malformed records name nobody");
    }

    #[test]
    fn frozen_owners_are_held_and_a_reject_outranks_a_hold() {
        let t = table("frozen: [us]\n");
        let (eu, us) = (key_in(0..8), key_in(8..16));
        // A frozen owner's writes are held in every region, its own and the others, so the
        // producers retry across a planned move instead of failing.
        for region in ["us", "eu"] {
            let d = decide_one(&t, region, "orders", 0, &keys(&[Some(&us)]));
            match &d.action {
                Action::Hold { message, .. } => assert_eq!(
                    message,
                    &format!(
                        "key \"{us}\" is owned by region us (rule orders, slot {}), which is frozen for a planned move; retry later",
                        to_positive(murmur2(us.as_bytes())) % 16
                    )
                ),
                other => panic!("expected hold, got {other:?}"),
            }
            assert_eq!(d.owner, t.region_id("us"));
        }
        assert!(
            decide_one(&t, "eu", "orders", 0, &keys(&[Some(&eu)]))
                .action
                .is_forward()
        );
        // A batch with a frozen key and a foreign key is rejected.
        let d = decide_one(&t, "us", "orders", 0, &keys(&[Some(&us), Some(&eu)]));
        assert_eq!(reject_of(&d).0, RejectKind::MixedBatch);
    }

    #[test]
    fn takeover_moves_ownership_to_the_taking_region() {
        let t = table("takeover: { us: eu }\n");
        let us = key_in(8..16);
        assert!(
            decide_one(&t, "eu", "orders", 0, &keys(&[Some(&us)]))
                .action
                .is_forward()
        );
        assert_eq!(
            reject_of(&decide_one(&t, "us", "orders", 0, &keys(&[Some(&us)]))).0,
            RejectKind::ForeignOwner
        );
    }

    #[test]
    fn compressed_batches_of_every_codec_are_read() {
        let t = table("");
        let us = key_in(8..16);
        let eu = key_in(0..8);
        for codec in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let owned = batch(&[(Some(eu.as_str()), &[]), (Some(eu.as_str()), &[])], codec);
            assert!(
                decide_one(&t, "eu", "orders", 0, &owned)
                    .action
                    .is_forward(),
                "{codec:?}"
            );
            let foreign = batch(&[(Some(eu.as_str()), &[]), (Some(us.as_str()), &[])], codec);
            assert_eq!(
                reject_of(&decide_one(&t, "eu", "orders", 0, &foreign)).0,
                RejectKind::MixedBatch,
                "{codec:?}"
            );
        }
    }

    #[test]
    fn an_unreadable_batch_is_refused_as_corrupt() {
        let t = table("");
        let mut b = keys(&[Some("a")]).to_vec();
        b.truncate(b.len() - 3);
        let d = decide_one(&t, "eu", "orders", 0, &b);
        assert_eq!(reject_of(&d).0, RejectKind::MalformedBatch);
    }

    #[test]
    fn a_lying_record_count_is_believed_only_as_far_as_the_bytes_go() {
        let t = table("");
        // A bare batch header (no records) claiming two billion records, three times over.
        let mut one = vec![0u8; 61];
        one[8..12].copy_from_slice(&49i32.to_be_bytes());
        one[16] = 2;
        one[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let three = [one.clone(), one.clone(), one].concat();
        let d = decide_one(&t, "eu", "inventory", 0, &three);
        assert!(d.action.is_forward());
        assert_eq!((d.batches, d.records), (3, 0));
    }

    #[test]
    fn key_part_rules_decide_by_the_part_of_each_key() {
        let t = table("");
        let d = decide_one(
            &t,
            "eu",
            "accounts.v1",
            0,
            &keys(&[
                Some("tenant-42|order-1"),
                Some("tenant-1|order-2"),
                Some("tenant-1"),
            ]),
        );
        assert_eq!(d.action, Action::Forward { audited: 0 });
        assert_eq!((d.batches, d.records), (1, 3));

        let foreign = keys(&[Some("tenant-7|order-1")]);
        let d = decide_one(&t, "eu", "accounts.v1", 0, &foreign);
        let (kind, message, errors) = reject_of(&d);
        assert_eq!(kind, RejectKind::ForeignOwner);
        assert_eq!(
            message,
            "key part \"tenant-7\" of key \"tenant-7|order-1\" is owned by region us (rule accounts); this proxy writes for eu"
        );
        assert_eq!(errors, &[(0, message.to_owned())]);
        assert_eq!(d.owner, t.region_id("us"));
        assert!(
            decide_one(&t, "us", "accounts.v1", 0, &foreign)
                .action
                .is_forward()
        );

        let d = decide_one(
            &t,
            "eu",
            "accounts.v1",
            0,
            &keys(&[Some("tenant-42|a"), Some("tenant-7|b"), Some("tenant-1|c")]),
        );
        let (kind, _, errors) = reject_of(&d);
        assert_eq!(kind, RejectKind::MixedBatch);
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn key_part_rules_ignore_headers_and_read_compressed_batches() {
        let t = table("");
        // A header naming another tenant changes nothing: the key decides.
        let b = batch(
            &[(Some("tenant-1/x"), &[("tenant", "tenant-7")])],
            Compression::None,
        );
        assert!(decide_one(&t, "eu", "ledger", 0, &b).action.is_forward());
        for codec in [Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let owned = batch(
                &[(Some("tenant-1/a"), &[]), (Some("tenant-1/b"), &[])],
                codec,
            );
            assert!(
                decide_one(&t, "eu", "ledger", 0, &owned)
                    .action
                    .is_forward(),
                "{codec:?}"
            );
            let foreign = batch(
                &[(Some("tenant-7/a"), &[]), (Some("tenant-7/b"), &[])],
                codec,
            );
            let d = decide_one(&t, "eu", "ledger", 0, &foreign);
            let (kind, message, errors) = reject_of(&d);
            assert_eq!(kind, RejectKind::ForeignOwner, "{codec:?}");
            assert_eq!(
                message,
                "key part \"tenant-7\" of key \"tenant-7/a\" is owned by region us (rule ledgers); this proxy writes for eu (and 1 more records)"
            );
            assert_eq!(errors.len(), 2);
        }
    }

    #[test]
    fn keys_without_an_owned_part_follow_unmatched_with_a_message_saying_why() {
        let t = table("");
        let cases = [
            (
                "accounts.v1",
                Some("tenant-9|order-1"),
                "key part \"tenant-9\" of key \"tenant-9|order-1\" has no owner in rule accounts (unmatched: reject)",
            ),
            (
                "accounts.v1",
                None,
                "a record with a null key has no key part; rule accounts rejects it (unmatched: reject)",
            ),
            (
                "ledger",
                Some("order-9"),
                "key \"order-9\" has no group 1 of pattern \"^(tenant-[0-9]+)/\"; rule ledgers rejects it (unmatched: reject)",
            ),
        ];
        for (topic, key, expected) in cases {
            let d = decide_one(&t, "eu", topic, 0, &keys(&[key]));
            let (kind, message, _) = reject_of(&d);
            assert_eq!(kind, RejectKind::Unowned(RejectReason::UnmatchedKeyPart));
            assert_eq!(kind.as_str(), "unmatched_key_part");
            assert_eq!(message, expected);
            // Refused whatever the region: there is no owner.
            assert_eq!(d.owner, None);
            assert!(
                !decide_one(&t, "us", topic, 0, &keys(&[key]))
                    .action
                    .is_forward()
            );
        }
    }

    #[test]
    fn hashed_key_parts_name_their_slot() {
        let t = table("");
        // "21" hashes to slot 12 of 16: every key whose part is "21" belongs to us.
        let foreign = keys(&[Some("21|order-1"), Some("21|order-2")]);
        let d = decide_one(&t, "eu", "hashed.v1", 0, &foreign);
        let (kind, message, _) = reject_of(&d);
        assert_eq!(kind, RejectKind::ForeignOwner);
        assert_eq!(
            message,
            "key part \"21\" of key \"21|order-1\" is owned by region us (rule hashed-accounts, slot 12); this proxy writes for eu (and 1 more records)"
        );
        assert!(
            decide_one(&t, "us", "hashed.v1", 0, &foreign)
                .action
                .is_forward()
        );
    }

    #[test]
    fn a_frozen_key_part_owner_is_held() {
        let t = table("frozen: [us]\n");
        let d = decide_one(&t, "eu", "accounts.v1", 0, &keys(&[Some("tenant-7|x")]));
        match &d.action {
            Action::Hold { message, reason } => {
                assert_eq!(*reason, HoldReason::Frozen);
                assert_eq!(
                    message,
                    "key part \"tenant-7\" of key \"tenant-7|x\" is owned by region us (rule accounts), which is frozen for a planned move; retry later"
                );
            }
            other => panic!("expected hold, got {other:?}"),
        }
    }

    #[test]
    fn reject_kinds_keep_their_metric_labels() {
        let labels: Vec<&str> = RejectReason::ALL
            .iter()
            .map(|&r| RejectKind::Unowned(r).as_str())
            .collect();
        assert_eq!(
            labels,
            [
                "null_key",
                "unmatched_header",
                "unmatched_key_part",
                "unowned_partition",
                "default_reject",
                "internal"
            ]
        );
    }

    /// Compressed batches cannot be read while other connections hold the decompression
    /// memory: held with a retriable error, never forwarded, never called corrupt.
    #[test]
    fn a_batch_that_finds_no_decompression_memory_is_held_not_refused() {
        let t = table("");
        let records: Vec<TestRecord<'_>> = (0..200).map(|_| (Some("k1"), &[][..])).collect();
        let data = batch(&records, Compression::Gzip);
        let view = one_partition("orders", 0, &data);
        let budget = crate::codec::records::DecompressionBudget::new(1 << 20);
        // Another connection holds all of it.
        let mut other = Inflater::with_budget(1 << 20, budget.clone());
        let mut inflater = Inflater::with_budget(1 << 20, budget.clone());
        let zeros = vec![0u8; (1 << 20) - 70_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
        let blob = gz.finish().unwrap();
        // (a raw decompression, left mid-batch: its buffer stays taken)
        let _ = other.decompress(crate::codec::records::Compression::Gzip, &blob);
        assert!(budget.used() > (1 << 20) - 70_000);

        let local = t.region_id("eu").unwrap();
        let plan = decide(&view, &t, local, &mut inflater);
        let d = &plan.partitions[0];
        match &d.action {
            Action::Hold { message, reason } => {
                assert_eq!(*reason, HoldReason::MemoryBudget);
                assert!(
                    message.contains("limits.max_decompressed_bytes_total"),
                    "{message}"
                );
            }
            other => panic!("expected a hold, got {other:?}"),
        }
        assert_eq!(d.owner, None);

        // Once the memory is free, the same request is decided on its records.
        other.release_memory();
        let plan = decide(&view, &t, local, &mut inflater);
        assert!(!matches!(plan.partitions[0].action, Action::Hold { .. }));
    }
}
