//! Failback: consumer groups' positions carried home from the copies they read during a read
//! failover.
//!
//! While another region's cluster C served this region's reads, consumer groups committed their
//! positions on C's copies of this region's topics (the region view: `orders` was `us.orders`
//! in C). Back on the local cluster, a group would resume from its last commit here and read
//! again everything it read on the copy. So for `reads.failback_translation_ms` after reads
//! move back, keyward answers a group's OffsetFetch with the position it reached on the copy,
//! translated through MirrorMaker 2's offset syncs ([`crate::policy::offset_syncs`]), wherever
//! that is ahead of the group's commit here:
//!
//! - at the switch back, a task reads the offset syncs of this region's topics into C
//!   (`mm2-offset-syncs.<C>.internal`, in the local cluster) once, and another those of C's
//!   topics into this region (`mm2-offset-syncs.<R>.internal`, in C's cluster);
//! - an OffsetFetch goes to the broker as it came; its answer waits while keyward asks C, on
//!   keyward's own connection, for the group's commits on the topics the answer names, as C
//!   holds them: the copies of this region's topics (`orders` is `R.orders` there), and C's own
//!   topics, which this region holds as copies (`C.orders` is `orders` there). Each commit that
//!   translates ahead of the answer's replaces it: up the first syncs for this region's topics,
//!   down the second for C's (MM2 would carry those itself, but only while the group has no
//!   member here, which a consumer kept open across the switch always has).
//!
//! Nothing is written: the client commits from the carried position as it commits anyway, and
//! from then on its commit here is ahead. Whatever fails (C unreachable, no sync at or below the
//! position, an answer later than [`ASK_TIMEOUT`]) leaves the broker's answer as it is: the group
//! reads again what it read on the copy, and never skips.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, OffsetFetchRequest, OffsetFetchResponse};
use kafka_protocol::protocol::Encodable;
use metrics::counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::rewrite;
use crate::codec::errors::{UNKNOWN_LEADER_EPOCH, UNKNOWN_MEMBER_ID};
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::policy::offset_syncs::{self, OffsetSyncs};
use crate::policy::region_view::RegionView;
use crate::redirect::client::ClusterClient;

/// OffsetFetch v10 names topics by id, which the local cluster's and C's do not share:
/// connections opened during a window are offered OffsetFetch up to v9.
pub const OFFSET_FETCH_MAX_VERSION: i16 = 9;

/// How long an OffsetFetch answer waits for C and the offset syncs before it goes out as the
/// broker gave it. Well within every client's request timeout.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after reads move back a consumer's offset validation (OffsetForLeaderEpoch) on a
/// local connection is answered "retry" ([`held_validation_answer`]): long enough for the
/// consumers kept open across the switch to hear at their next heartbeat that their group
/// membership is gone (KIP-848's interval is 5 s by default, the classic protocol's 3 s), short
/// enough that a consumer validating for another reason waits little.
pub const VALIDATION_HOLD: Duration = Duration::from_secs(10);

/// At most this many KIP-848 member ids are kept for fencing ([`Fences`]).
const VIEWED_MEMBERS_MAX: usize = 100_000;

/// The KIP-848 members that heartbeat since a switch, on connections where a member's epoch may
/// be another cluster's coordinator's: each is fenced at its first heartbeat above epoch 0.
/// Every member heartbeating through this region's keyward before a switch did so on a
/// connection the switch closed, to the cluster that served before, so the epoch it brings at
/// its first heartbeat after is that cluster's coordinator's, whichever instance it used; a
/// member that joins after the switch (epoch 0) is never fenced, and none twice. The new
/// coordinator may know the member at the same epoch (from before a failover, or from an
/// earlier one), and would let it read on at positions in the other cluster's log. Past
/// `VIEWED_MEMBERS_MAX` members none is fenced.
#[derive(Default)]
pub struct Fences(Mutex<HashSet<String>>);

impl Fences {
    /// Whether this heartbeat of `member_id` at `epoch` is to be answered `FENCED_MEMBER_EPOCH`.
    pub fn fence(&self, member_id: &str, epoch: i32) -> bool {
        let mut settled = lock(&self.0);
        if settled.contains(member_id) || settled.len() >= VIEWED_MEMBERS_MAX {
            return false;
        }
        settled.insert(member_id.to_owned());
        epoch > 0
    }

    /// The members seen, leaving none.
    fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// The window in force, if any: set when reads move back to the local cluster from another
/// region's, cleared at the next switch.
pub struct Failback {
    window: Mutex<Option<Arc<Window>>>,
    /// KIP-848 members that heartbeat through a region view since the last switch. A failback
    /// window takes them: until each heartbeats here, its commits are refused
    /// ([`refused_commit_answer`]).
    pub in_view: Fences,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Where the reading of the offset syncs stands.
#[derive(Clone)]
enum Syncs {
    /// The first attempt is under way: answers wait for it.
    Reading,
    Read(Arc<OffsetSyncs>),
    /// The last attempt failed (another follows): answers do not wait.
    Unreadable,
}

/// One failback: where reads were served, until when positions are carried, and the syncs.
pub struct Window {
    /// The cluster that served (by index, see `super::brokers::Clusters`).
    pub from: usize,
    /// The view the failed-over connections had (C's copies of this region's topics).
    view: RegionView,
    until: Instant,
    /// Until when offset validations are answered "retry" ([`VALIDATION_HOLD`]).
    hold_until: Instant,
    /// The KIP-848 members seen through the view on this instance, not yet heartbeating here:
    /// their commits are refused ([`refused_commit_answer`]).
    members: Mutex<HashSet<String>>,
    /// The KIP-848 members that heartbeat here in this window ([`Window::fence`]).
    settled: Fences,
    /// keyward's own client of C, for the groups' commits there and C's offset syncs.
    copies: Arc<ClusterClient>,
    /// The offset syncs of this region's topics into C, once read.
    syncs: watch::Receiver<Syncs>,
    /// The offset syncs of C's topics into this region, once read.
    origin_syncs: watch::Receiver<Syncs>,
    stop: CancellationToken,
    /// Groups whose carried position was logged in this window.
    logged: Mutex<HashSet<String>>,
}

impl Failback {
    pub fn new(tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            window: Mutex::new(None),
            in_view: Fences::default(),
            tasks,
            shutdown,
        }
    }

    /// Reads moved back to the local cluster from the one `view` maps into: positions are
    /// carried home for `length`. `home` is keyward's client of the local cluster, where the
    /// offset syncs are; `copies` its client of the cluster that served.
    pub fn begin(
        &self,
        from: usize,
        view: RegionView,
        copies: ClusterClient,
        home: ClusterClient,
        length: Duration,
    ) {
        let copies = Arc::new(copies);
        let (loaded, syncs) = watch::channel(Syncs::Reading);
        let (origin_loaded, origin_syncs) = watch::channel(Syncs::Reading);
        let stop = self.shutdown.child_token();
        let topic = format!("mm2-offset-syncs.{}.internal", view.serving());
        let origin_topic = format!("mm2-offset-syncs.{}.internal", view.local());
        info!(
            from = view.serving(),
            window_s = length.as_secs(),
            offset_syncs = %topic,
            origin_offset_syncs = %origin_topic,
            "reads are back on the local cluster: consumer groups' positions on the copies they read are carried home"
        );
        self.tasks
            .spawn(read_syncs(Arc::new(home), topic, loaded, stop.clone()));
        self.tasks.spawn(read_syncs(
            copies.clone(),
            origin_topic,
            origin_loaded,
            stop.clone(),
        ));
        let members = self.in_view.take();
        let begun = Instant::now();
        let window = Arc::new(Window {
            from,
            view,
            until: begun + length,
            hold_until: begun + VALIDATION_HOLD.min(length),
            members: Mutex::new(members),
            settled: Fences::default(),
            copies,
            syncs,
            origin_syncs,
            stop,
            logged: Mutex::new(HashSet::new()),
        });
        if let Some(old) = self.lock().replace(window) {
            old.stop.cancel();
        }
    }

    /// Reads moved elsewhere: no position is carried any more.
    pub fn end(&self) {
        if let Some(old) = self.lock().take() {
            old.stop.cancel();
        }
    }

    /// Reads moved to a cluster other than the local one: the members seen through the view
    /// until now are forgotten (members heartbeating through a view from now on came from the
    /// cluster that served before). A window beginning takes them instead.
    pub fn forget_members(&self) {
        self.in_view.take();
    }

    /// The window in force now.
    pub fn current(&self) -> Option<Arc<Window>> {
        self.lock()
            .as_ref()
            .filter(|w| w.until > Instant::now())
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Window>>> {
        lock(&self.window)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the offset syncs into `loaded`, trying again (every 2 s, then less often, up to once
/// a minute) until it succeeds or the window ends.
async fn read_syncs(
    from: Arc<ClusterClient>,
    topic: String,
    loaded: watch::Sender<Syncs>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut pause = Duration::from_secs(2);
    loop {
        let mut syncs = OffsetSyncs::default();
        let read = from.read_all(&topic, 0, |record| {
            if let (Some(key), Some(value)) = (&record.key, &record.value)
                && let Some((topic, partition, sync)) = offset_syncs::parse(key, value)
            {
                syncs.add(topic, partition, sync);
            }
        });
        let read = tokio::select! {
            read = read => read,
            () = stop.cancelled() => return,
        };
        match read {
            Ok(records) => {
                info!(
                    topic,
                    records,
                    kept = syncs.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "offset syncs read"
                );
                loaded.send_replace(Syncs::Read(Arc::new(syncs)));
                return;
            }
            Err(e) => {
                warn!(
                    topic,
                    error = format!("{e:#}"),
                    retry_s = pause.as_secs(),
                    "cannot read MirrorMaker 2's offset syncs; consumer groups resume from their commits here until they are read"
                );
                loaded.send_replace(Syncs::Unreadable);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

/// An OffsetFetch whose answer may carry positions home.
pub(crate) struct Asked {
    window: Arc<Window>,
    version: i16,
    /// The group of a v1-v7 request (v8+ answers name their groups).
    group: Option<String>,
}

/// Whether the answer to this OffsetFetch request is worth waiting on (`None`: pass it on).
pub(crate) fn ask(window: Arc<Window>, frame: &Bytes, version: i16) -> Option<Asked> {
    Some(Asked {
        window,
        version,
        group: request_group(frame, version)?,
    })
}

/// The group a v1-v7 request names (`Some(None)` from v8: answers name their groups), or
/// `None` for a version or request this module leaves alone.
fn request_group(frame: &Bytes, version: i16) -> Option<Option<String>> {
    if !(1..=OFFSET_FETCH_MAX_VERSION).contains(&version) {
        return None;
    }
    if version >= 8 {
        return Some(None);
    }
    let request: OffsetFetchRequest =
        rewrite::decode_request(frame, ApiKey::OffsetFetch, version).ok()?;
    Some(Some(request.group_id.0.to_string()))
}

/// keyward's answer, in a failback window's first [`VALIDATION_HOLD`], to an offset validation
/// (OffsetForLeaderEpoch) on a local connection: every partition `UNKNOWN_LEADER_EPOCH`, which
/// every client retries after a backoff (librdkafka every 500 ms) without fetching meanwhile.
///
/// A consumer kept open across the switch validates the position it reached on the other
/// cluster's log with that log's leader epoch; the local cluster answers the end of its own
/// epoch of that number, unrelated, and the client seeks there: back, reading again what it
/// read (librdkafka, franz-go and Java's KIP-848 consumer read 12 records twice in the MM2
/// test), or forward, skipping. Held, the client hears at its next heartbeat that its
/// membership is gone (the classic protocol's member id is another coordinator's; a KIP-848
/// member is fenced, [`Window::fence`]), drops the partition and its validation, and takes the
/// partition again from its committed position, carried home. Also returns the partitions held.
pub fn held_validation_answer(
    frame: &Bytes,
    version: i16,
    correlation_id: i32,
) -> anyhow::Result<(Bytes, usize)> {
    use kafka_protocol::messages::offset_for_leader_epoch_response::{
        EpochEndOffset, OffsetForLeaderTopicResult,
    };
    use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};
    let api = ApiKey::OffsetForLeaderEpoch;
    let request: OffsetForLeaderEpochRequest = rewrite::decode_request(frame, api, version)?;
    let mut held = 0;
    let topics = request
        .topics
        .into_iter()
        .map(|t| {
            held += t.partitions.len();
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            EpochEndOffset::default()
                                .with_partition(p.partition)
                                .with_error_code(UNKNOWN_LEADER_EPOCH)
                                .with_leader_epoch(-1)
                                .with_end_offset(-1)
                        })
                        .collect(),
                )
        })
        .collect();
    let answer = OffsetForLeaderEpochResponse::default().with_topics(topics);
    Ok((
        rewrite::answer(api, version, correlation_id, &answer)?,
        held,
    ))
}

/// keyward's answer to an OffsetCommit on a local connection in a failback window from a KIP-848
/// member seen through the view on this instance and not yet fenced here
/// ([`Window::to_fence`]), or `None` for any other commit. Its
/// positions are on the other cluster's log, whose offsets are not this cluster's: committed
/// here (this coordinator may know the member at the same epoch), they would be answered to
/// the group after it joins again, and could lie past records it never read. Every partition
/// is answered `UNKNOWN_MEMBER_ID`, which a client takes as a failed commit (an automatic one
/// is only logged). Also returns the partitions refused.
pub fn refused_commit_answer(
    window: &Window,
    frame: &Bytes,
    version: i16,
    correlation_id: i32,
) -> Option<anyhow::Result<(Bytes, usize)>> {
    use kafka_protocol::messages::offset_commit_response::{
        OffsetCommitResponsePartition, OffsetCommitResponseTopic,
    };
    use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
    if lock(&window.members).is_empty() {
        return None;
    }
    let api = ApiKey::OffsetCommit;
    let request: OffsetCommitRequest = rewrite::decode_request(frame, api, version).ok()?;
    if !window.to_fence(request.member_id.as_str()) {
        return None;
    }
    let mut refused = 0;
    let topics = request
        .topics
        .into_iter()
        .map(|t| {
            refused += t.partitions.len();
            let partitions = t.partitions.iter().map(|p| {
                OffsetCommitResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(UNKNOWN_MEMBER_ID)
            });
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(partitions.collect())
        })
        .collect();
    let answer = OffsetCommitResponse::default().with_topics(topics);
    Some(rewrite::answer(api, version, correlation_id, &answer).map(|a| (a, refused)))
}

/// One partition of the local cluster's answer that may be carried: group, topic, partition,
/// and the offset committed here (-1 for none).
type Here = (String, String, i32, i64);

/// The broker's answer, with positions carried home where they are ahead of it. Never fails:
/// anything that cannot be done leaves the answer as the broker gave it.
pub(crate) async fn respond(asked: Asked, frame: Bytes) -> Bytes {
    let Some(answer) = decoded(&frame, asked.version) else {
        return frame;
    };
    let here = committed_here(&answer, asked.group.as_deref(), &asked.window.view);
    if here.is_empty() {
        return frame;
    }
    let carried = match tokio::time::timeout(ASK_TIMEOUT, asked.window.carry(&here)).await {
        Ok(carried) => carried,
        Err(_) => {
            counter!("keyward_failback_offsets_total", "outcome" => "failed")
                .increment(here.len() as u64);
            warn!(
                timeout_ms = ASK_TIMEOUT.as_millis() as u64,
                "no translated position in time; the group resumes from its commit here"
            );
            return frame;
        }
    };
    if carried.is_empty() {
        return frame;
    }
    carried_into(
        &frame,
        asked.version,
        answer,
        asked.group.as_deref(),
        &carried,
    )
    .unwrap_or(frame)
}

/// The broker's answer, decoded once: what is carried is written into this same value.
fn decoded(frame: &Bytes, version: i16) -> Option<OffsetFetchResponse> {
    rewrite::decode(frame, ApiKey::OffsetFetch, version).ok()
}

/// `answer` (decoded from `frame`) with the `carried` positions, encoded behind `frame`'s own
/// header.
fn carried_into(
    frame: &Bytes,
    version: i16,
    mut answer: OffsetFetchResponse,
    group: Option<&str>,
    carried: &HashMap<(String, String, i32), i64>,
) -> Option<Bytes> {
    let api = ApiKey::OffsetFetch;
    let header_len =
        frame::response_header_len(frame, api.response_header_version(version)).ok()?;
    apply(&mut answer, group, carried);
    let mut body = Vec::with_capacity(frame.len());
    answer.encode(&mut body, version).ok()?;
    Some(frame::assemble(
        &frame[LENGTH_PREFIX..LENGTH_PREFIX + header_len],
        &body,
    ))
}

/// The partitions in an answer, without an error, of topics whose position may be carried: this
/// region's own, and copies of the serving region's.
fn committed_here(
    answer: &OffsetFetchResponse,
    group: Option<&str>,
    view: &RegionView,
) -> Vec<Here> {
    let mut out = Vec::new();
    let mut add = |group: &str, topic: &str, partition: i32, offset: i64| {
        if on_serving(view, topic).is_some() {
            out.push((group.to_owned(), topic.to_owned(), partition, offset));
        }
    };
    match group {
        Some(group) if answer.error_code == 0 => {
            for t in &answer.topics {
                for p in t.partitions.iter().filter(|p| p.error_code == 0) {
                    add(group, &t.name, p.partition_index, p.committed_offset);
                }
            }
        }
        Some(_) => {}
        None => {
            for g in answer.groups.iter().filter(|g| g.error_code == 0) {
                for t in &g.topics {
                    for p in t.partitions.iter().filter(|p| p.error_code == 0) {
                        add(&g.group_id, &t.name, p.partition_index, p.committed_offset);
                    }
                }
            }
        }
    }
    out
}

/// Replaces the committed offsets `carried` has a position for.
fn apply(
    answer: &mut OffsetFetchResponse,
    group: Option<&str>,
    carried: &HashMap<(String, String, i32), i64>,
) {
    let at = |group: &str, topic: &str, partition: i32| {
        carried
            .get(&(group.to_owned(), topic.to_owned(), partition))
            .copied()
    };
    match group {
        Some(group) => {
            for t in &mut answer.topics {
                for p in &mut t.partitions {
                    if let Some(offset) = at(group, &t.name, p.partition_index) {
                        p.committed_offset = offset;
                        // An epoch of the copy's leader means nothing here.
                        p.committed_leader_epoch = -1;
                    }
                }
            }
        }
        None => {
            for g in &mut answer.groups {
                for t in &mut g.topics {
                    for p in &mut t.partitions {
                        if let Some(offset) = at(&g.group_id, &t.name, p.partition_index) {
                            p.committed_offset = offset;
                            p.committed_leader_epoch = -1;
                        }
                    }
                }
            }
        }
    }
}

/// Where a topic of the local cluster was read while C served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Read {
    /// This region's own topic, read on C's copy of it.
    OnCopy,
    /// A copy of C's own topic, read on that topic.
    OnOrigin,
}

/// The topic C holds for the local cluster's `topic`, and how it was read there; `None` for
/// topics whose position is not carried.
fn on_serving(view: &RegionView, topic: &str) -> Option<(String, Read)> {
    match view.own_copy(topic) {
        Some(copy) => Some((copy, Read::OnCopy)),
        None => Some((view.serving_origin(topic)?, Read::OnOrigin)),
    }
}

/// The syncs once read, or `None` when they could not be.
async fn once_read(syncs: &watch::Receiver<Syncs>) -> Option<Arc<OffsetSyncs>> {
    let mut syncs = syncs.clone();
    let read = syncs.wait_for(|s| !matches!(s, Syncs::Reading)).await;
    match read.map(|s| s.clone()) {
        Ok(Syncs::Read(s)) => Some(s),
        _ => None,
    }
}

impl Window {
    /// For `/ownership`: where positions are carried from, for how much longer, and whether
    /// the offset syncs are read.
    pub fn describe(&self) -> serde_json::Value {
        let kept = |syncs: &watch::Receiver<Syncs>| match &*syncs.borrow() {
            Syncs::Read(s) => Some(s.len()),
            Syncs::Reading | Syncs::Unreadable => None,
        };
        serde_json::json!({
            "from": self.view.serving(),
            "remaining_ms": self.until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "offset_syncs_kept": kept(&self.syncs),
            "origin_offset_syncs_kept": kept(&self.origin_syncs),
            "validations_held_ms": self.hold_until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "members_to_fence": lock(&self.members).len(),
        })
    }

    /// Whether offset validations are still answered "retry" ([`VALIDATION_HOLD`]).
    pub fn holds_validations(&self) -> bool {
        Instant::now() < self.hold_until
    }

    /// Whether a KIP-848 heartbeat here of `member_id` at `epoch` is to be fenced ([`Fences`]):
    /// every member heartbeating through this region's keyward before the window did so
    /// through a view.
    pub fn fence(&self, member_id: &str, epoch: i32) -> bool {
        lock(&self.members).remove(member_id);
        self.settled.fence(member_id, epoch)
    }

    /// Whether `member_id` heartbeat through the view on this instance and not yet here: what it
    /// would commit is a position on the other cluster's log ([`refused_commit_answer`]).
    pub fn to_fence(&self, member_id: &str) -> bool {
        lock(&self.members).contains(member_id)
    }

    /// The positions to answer instead of the local commits in `here`, by group, topic and
    /// partition: only those ahead.
    async fn carry(&self, here: &[Here]) -> HashMap<(String, String, i32), i64> {
        let mut out = HashMap::new();
        let reads = |read: Read| {
            here.iter()
                .filter(move |h| on_serving(&self.view, &h.1).is_some_and(|(_, r)| r == read))
        };
        // Each side's syncs, waited for only when a partition needs them.
        let mut syncs = HashMap::new();
        for (read, rx) in [
            (Read::OnCopy, &self.syncs),
            (Read::OnOrigin, &self.origin_syncs),
        ] {
            let needed = reads(read).count();
            if needed == 0 {
                continue;
            }
            match once_read(rx).await {
                Some(s) => {
                    syncs.insert(read, s);
                }
                None => counter!("keyward_failback_offsets_total", "outcome" => "failed")
                    .increment(needed as u64),
            }
        }
        let mut groups: HashMap<&str, Vec<(&Here, String, Read)>> = HashMap::new();
        for h in here {
            if let Some((there, read)) = on_serving(&self.view, &h.1)
                && syncs.contains_key(&read)
            {
                groups
                    .entry(h.0.as_str())
                    .or_default()
                    .push((h, there, read));
            }
        }
        for (group, parts) in groups {
            let mut topics: HashMap<String, Vec<i32>> = HashMap::new();
            for ((_, _, partition, _), there, _) in &parts {
                topics.entry(there.clone()).or_default().push(*partition);
            }
            let topics: Vec<(String, Vec<i32>)> = topics.into_iter().collect();
            let on_serving = match self.copies.committed(group, &topics).await {
                Ok(c) => c,
                Err(e) => {
                    counter!("keyward_failback_offsets_total", "outcome" => "failed")
                        .increment(parts.len() as u64);
                    warn!(
                        group,
                        from = self.view.serving(),
                        error = format!("{e:#}"),
                        "cannot ask for a group's position on the serving cluster's topics; it resumes from its commit here"
                    );
                    continue;
                }
            };
            for ((_, topic, partition, committed), there, read) in parts {
                let translated = on_serving
                    .get(&(there.clone(), *partition))
                    .map(|&position| {
                        let syncs = &syncs[&read];
                        let t = match read {
                            Read::OnCopy => syncs.translate(topic, *partition, position),
                            Read::OnOrigin => {
                                syncs.translate_downstream(&there, *partition, position)
                            }
                        };
                        (position, t)
                    });
                let outcome = match translated {
                    None => "no_commit",
                    Some((_, None)) => "no_sync",
                    Some((position, Some(t))) if t.offset > *committed => {
                        out.insert((group.to_owned(), topic.clone(), *partition), t.offset);
                        counter!("keyward_failback_rereads_at_most_total")
                            .increment(t.reread_at_most as u64);
                        if self.first_for(group) {
                            info!(
                                group,
                                topic = %topic,
                                partition,
                                read_as = %there,
                                position_there = position,
                                committed_here = *committed,
                                answered = t.offset,
                                rereads_at_most = t.reread_at_most,
                                "a consumer group's position carried home from what it read during the failover"
                            );
                        }
                        "carried"
                    }
                    Some(_) => "kept",
                };
                if outcome != "carried" {
                    debug!(
                        group,
                        topic = %topic,
                        partition,
                        read_as = %there,
                        position_there = translated.map(|(p, _)| p),
                        committed_here = *committed,
                        outcome,
                        "a consumer group's position not carried home"
                    );
                }
                counter!("keyward_failback_offsets_total", "outcome" => outcome).increment(1);
            }
        }
        out
    }

    /// Whether `group` has not been logged in this window yet (and is now).
    fn first_for(&self, group: &str) -> bool {
        self.logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::GroupId;
    use kafka_protocol::messages::offset_fetch_response::{
        OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
        OffsetFetchResponseTopic, OffsetFetchResponseTopics,
    };
    use kafka_protocol::protocol::StrBytes;

    use super::*;
    use crate::proxy::rewrite::testing::{decode_body, response_frame};
    use crate::proxy::upstream::encode_request;
    use crate::proxy::view::tests::{name, view};

    /// Every partition an offset validation names is answered "retry", in every version the
    /// region view offers.
    #[test]
    fn a_held_validation_is_answered_unknown_leader_epoch_in_every_version() {
        use kafka_protocol::messages::offset_for_leader_epoch_request::{
            OffsetForLeaderPartition, OffsetForLeaderTopic,
        };
        use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};
        let api = ApiKey::OffsetForLeaderEpoch;
        for v in 2..=4 {
            let partition = |p| {
                OffsetForLeaderPartition::default()
                    .with_partition(p)
                    .with_leader_epoch(0)
                    .with_current_leader_epoch(1)
            };
            let request = OffsetForLeaderEpochRequest::default().with_topics(vec![
                OffsetForLeaderTopic::default()
                    .with_topic(name("eu.orders"))
                    .with_partitions(vec![partition(0), partition(2)]),
                OffsetForLeaderTopic::default()
                    .with_topic(name("orders"))
                    .with_partitions(vec![partition(1)]),
            ]);
            let frame = encode_request("c", 5, api, v, &request).unwrap();
            let (answer, held) = held_validation_answer(&frame, v, 5).unwrap();
            assert_eq!(held, 3);
            assert_eq!(i32::from_be_bytes(answer[4..8].try_into().unwrap()), 5);
            let got: OffsetForLeaderEpochResponse = decode_body(&answer, api, v);
            let shown: Vec<_> = got
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(|p| (t.topic.0.as_str(), p.partition, p.error_code, p.end_offset))
                })
                .collect();
            assert_eq!(
                shown,
                [
                    ("eu.orders", 0, UNKNOWN_LEADER_EPOCH, -1),
                    ("eu.orders", 2, UNKNOWN_LEADER_EPOCH, -1),
                    ("orders", 1, UNKNOWN_LEADER_EPOCH, -1)
                ],
                "v{v}"
            );
            assert!(held_validation_answer(&frame.slice(..frame.len() - 3), v, 5).is_err());
        }
    }

    /// us's `orders` (partition 0 committed at 3, partition 1 never), eu's `eu.orders`
    /// (committed at 5) and an internal topic, as the local cluster answers group `g` at
    /// `version`.
    fn answer(version: i16) -> OffsetFetchResponse {
        let committed = [
            ("orders", 0, 3),
            ("orders", 1, -1),
            ("eu.orders", 0, 5),
            ("mm2-configs.eu.internal", 0, 9),
        ];
        if version >= 8 {
            let topics = committed.iter().map(|(t, p, o)| {
                OffsetFetchResponseTopics::default()
                    .with_name(name(t))
                    .with_partitions(vec![
                        OffsetFetchResponsePartitions::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*o)
                            .with_committed_leader_epoch(4),
                    ])
            });
            OffsetFetchResponse::default().with_groups(vec![
                OffsetFetchResponseGroup::default()
                    .with_group_id(GroupId(StrBytes::from_static_str("g")))
                    .with_topics(topics.collect()),
            ])
        } else {
            let topics = committed.iter().map(|(t, p, o)| {
                OffsetFetchResponseTopic::default()
                    .with_name(name(t))
                    .with_partitions(vec![
                        OffsetFetchResponsePartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*o)
                            .with_committed_leader_epoch(if version >= 5 { 4 } else { -1 }),
                    ])
            });
            OffsetFetchResponse::default().with_topics(topics.collect())
        }
    }

    /// (topic, partition, offset, epoch) of every partition in an answer.
    fn offsets(answer: &OffsetFetchResponse, version: i16) -> Vec<(String, i32, i64, i32)> {
        let mut out = Vec::new();
        if version >= 8 {
            for t in answer.groups.iter().flat_map(|g| &g.topics) {
                for p in &t.partitions {
                    out.push((
                        t.name.to_string(),
                        p.partition_index,
                        p.committed_offset,
                        p.committed_leader_epoch,
                    ));
                }
            }
        } else {
            for t in &answer.topics {
                for p in &t.partitions {
                    out.push((
                        t.name.to_string(),
                        p.partition_index,
                        p.committed_offset,
                        p.committed_leader_epoch,
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn this_region_s_own_topics_and_the_serving_region_s_are_carried_in_every_version() {
        for v in 1..=OFFSET_FETCH_MAX_VERSION {
            let request = if v >= 8 {
                OffsetFetchRequest::default()
            } else {
                OffsetFetchRequest::default().with_group_id(GroupId(StrBytes::from_static_str("g")))
            };
            let frame = encode_request("t", 7, ApiKey::OffsetFetch, v, &request).unwrap();
            let group = request_group(&frame, v).expect("a version that carries");
            assert_eq!(group.as_deref(), (v < 8).then_some("g"), "v{v}");

            let frame = response_frame(ApiKey::OffsetFetch, v, &answer(v));
            let answer = decoded(&frame, v).unwrap();
            let here = committed_here(&answer, group.as_deref(), &view());
            assert_eq!(
                here,
                [
                    ("g".into(), "orders".into(), 0, 3),
                    ("g".into(), "orders".into(), 1, -1),
                    ("g".into(), "eu.orders".into(), 0, 5)
                ],
                "v{v}: an internal topic is not carried"
            );

            let carried = HashMap::from([
                (("g".into(), "orders".into(), 0), 6),
                (("g".into(), "orders".into(), 1), 2),
                (("g".into(), "eu.orders".into(), 0), 8),
            ]);
            let out = carried_into(&frame, v, answer, group.as_deref(), &carried).unwrap();
            // The broker's header (its correlation id) goes back as it came.
            assert_eq!(
                frame::response_correlation_id(&out).unwrap(),
                frame::response_correlation_id(&frame).unwrap()
            );
            let got: OffsetFetchResponse = decode_body(&out, ApiKey::OffsetFetch, v);
            let epoch = if v >= 5 { 4 } else { -1 };
            assert_eq!(
                offsets(&got, v),
                [
                    ("orders".into(), 0, 6, -1),
                    ("orders".into(), 1, 2, -1),
                    ("eu.orders".into(), 0, 8, -1),
                    ("mm2-configs.eu.internal".into(), 0, 9, epoch)
                ],
                "v{v}"
            );
        }
    }

    #[test]
    fn an_answer_with_an_error_carries_nothing() {
        let mut failed = answer(7);
        failed.error_code = 16; // NOT_COORDINATOR
        assert!(committed_here(&failed, Some("g"), &view()).is_empty());
        let mut failed = answer(8);
        failed.groups[0].error_code = 16;
        assert!(committed_here(&failed, None, &view()).is_empty());
    }

    #[test]
    fn versions_that_name_topics_by_id_are_left_alone() {
        // Not even read.
        assert_eq!(request_group(&Bytes::new(), 10), None);
        assert_eq!(request_group(&Bytes::new(), 0), None);
    }
}
