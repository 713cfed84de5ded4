//! `on_foreign: redirect`: batches owned by another region are produced to that region's
//! cluster, through keyward's own connections to it.
//!
//! A redirected batch cannot keep the client's producer id: that id was issued by the local
//! cluster. keyward produces it under a producer id it obtains from the target cluster itself,
//! one per client producer, rewriting the batch header (producer id, epoch, base sequence,
//! CRC) to the batch's [`Stamp`], which every later attempt at the batch carries too. Writes to one target
//! partition go through one pipeline task, in the order the client sent them, with up to
//! [`MAX_IN_FLIGHT`] batches in flight as an idempotent Kafka producer keeps them, so a
//! round trip to a distant region is paid once per window rather than once per batch.
//! keyward's own sequence numbers on the target never have a gap and a client producer's order
//! per partition holds. The client's own sequence numbers stay whole on the local cluster too
//! (see [`sequences`]).
//!
//! Pipelines are tasks of the proxy's tracker, each in a `redirect` span naming its cluster,
//! topic and partition. One idle for [`PIPELINE_IDLE`] ends (its next sequence number is kept
//! for the one that follows it), and at shutdown each writes what is queued and ends.
//!
//! Transactional batches are never redirected: a transaction cannot span clusters.

pub mod client;
pub mod journal;
pub mod sequences;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::codec::errors::{
    CORRUPT_MESSAGE, DUPLICATE_SEQUENCE_NUMBER, INVALID_PRODUCER_EPOCH, NOT_ENOUGH_REPLICAS,
    NOT_ENOUGH_REPLICAS_AFTER_APPEND, OUT_OF_ORDER_SEQUENCE_NUMBER, REQUEST_TIMED_OUT,
    UNKNOWN_PRODUCER_ID,
};
use crate::codec::records;
use crate::proxy::meters::Redirected;
use crate::proxy::upstream::{Dialer, Reply};
use client::ClusterClient;
pub use journal::Durable;
use journal::Journal;
use sequences::{Outcome, Redirect, SequenceBook, StreamKey};

/// Batches waiting per target partition before the client connection stops being read: enough
/// for every in-flight batch of a few producers (5 each with idempotence).
const PIPELINE_DEPTH: usize = 64;

/// Batches in flight per target partition: as many as an idempotent Kafka producer may have,
/// and as many as a broker remembers per producer and partition to recognise a resent batch.
const MAX_IN_FLIGHT: usize = 5;

/// How long a pipeline with nothing to write lives on.
const PIPELINE_IDLE: Duration = Duration::from_secs(5 * 60);

/// How a redirected batch's records are booked against the client producer's numbering.
#[derive(Clone, Copy)]
enum Booking {
    /// A whole client batch: its records shift later local batches.
    Batch,
    /// A part of a split batch, whose records [`Redirector::local_part`] booked.
    Part,
}

/// The numbers a redirected batch is written under on its target: keyward's producer id and
/// epoch there, and the batch's base sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub producer_id: i64,
    pub epoch: i16,
    pub seq: i32,
}

/// The stamp of one redirected batch, given when it is first sent and shared by every attempt
/// at it (the pipeline's resends and the client's retries), so the target's broker recognises
/// a batch it already wrote.
pub type StampCell = Arc<Mutex<Option<Stamp>>>;

/// One redirected batch for a pipeline.
struct Job {
    batch: Bytes,
    records: i32,
    acks: i16,
    timeout_ms: i32,
    /// When the client must have its answer: before its own request times out.
    deadline: Instant,
    done: watch::Sender<Option<PartitionProduceResponse>>,
    /// The client stream it belongs to; producer id and epoch -1 for a producer without them.
    stream: StreamKey,
    stamp: StampCell,
}

/// keyward's numbering of one client stream on a target cluster.
struct Numbering {
    /// keyward's producer id and epoch for the stream there.
    producer: (i64, i16),
    next: i32,
    last_used: Instant,
}

/// A target partition: (topic, partition).
type PartitionKey = (String, i32);

/// Where keyward's numbers on one target cluster stand.
///
/// Every client producer gets its own producer id on the target (one InitProducerId, shared by
/// its partitions), and each of its streams (a partition) is numbered on its own: the
/// numbers a batch is given depend on that stream's earlier batches only, never on other
/// clients' writes. A resend, or a client's retry, carries the numbers of the first attempt.
/// Batches of producers without an id of their own (plain, not idempotent) share one
/// stream per partition.
#[derive(Default)]
struct Numbers {
    /// keyward's producer on the target for each client producer (producer id, epoch).
    producers: HashMap<(i64, i16), ((i64, i16), Instant)>,
    streams: HashMap<StreamKey, Numbering>,
    calls: u64,
}

impl Numbers {
    /// Forgets producers and streams unused for [`sequences::STREAM_IDLE`]; a stream written
    /// again after that starts over under a new producer id.
    fn prune(&mut self, now: Instant) {
        self.calls += 1;
        if !self.calls.is_multiple_of(1024) {
            return;
        }
        let idle = |last: &Instant| now.duration_since(*last) < sequences::STREAM_IDLE;
        self.streams.retain(|_, n| idle(&n.last_used));
        self.producers.retain(|_, (_, last)| idle(last));
    }
}

struct Target {
    client: ClusterClient,
    /// `keyward_redirect_failures_total` for this cluster: batches whose client got an error.
    failures: metrics::Counter,
    /// What landed here for other regions' clients (`None` for the local cluster).
    landed: Option<Redirected>,
    numbers: Mutex<Numbers>,
    pipelines: Mutex<HashMap<PartitionKey, mpsc::Sender<Job>>>,
}

impl Target {
    fn pipelines(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, mpsc::Sender<Job>>> {
        self.pipelines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn numbers(&self) -> std::sync::MutexGuard<'_, Numbers> {
        self.numbers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stamp `job` is sent with: the one it has while its stream is still numbered under
    /// that producer id and epoch, or the stream's next numbers (asking the target for a
    /// producer id first if its client producer has none here yet).
    async fn stamp(&self, job: &Job) -> anyhow::Result<Stamp> {
        let stream = &job.stream;
        let client_producer = (stream.producer_id, stream.epoch);
        for _ in 0..2 {
            {
                let now = Instant::now();
                let mut numbers = self.numbers();
                numbers.prune(now);
                if !numbers.streams.contains_key(stream)
                    && let Some(&(producer, _)) = numbers.producers.get(&client_producer)
                {
                    numbers.streams.insert(
                        stream.clone(),
                        Numbering {
                            producer,
                            next: 0,
                            last_used: now,
                        },
                    );
                }
                if let Some(n) = numbers.streams.get_mut(stream) {
                    n.last_used = now;
                    let mut cell = job.stamp.lock().unwrap_or_else(|e| e.into_inner());
                    let stamp = match *cell {
                        Some(stamp) if (stamp.producer_id, stamp.epoch) == n.producer => stamp,
                        _ => {
                            let stamp = Stamp {
                                producer_id: n.producer.0,
                                epoch: n.producer.1,
                                seq: n.next,
                            };
                            n.next = n.next.wrapping_add(job.records);
                            *cell = Some(stamp);
                            stamp
                        }
                    };
                    drop(cell);
                    if let Some((_, last)) = numbers.producers.get_mut(&client_producer) {
                        *last = now;
                    }
                    return Ok(stamp);
                }
            }
            let producer = self.client.init_producer_id().await?;
            debug!(cluster = %self.client.name, ?client_producer, ?producer, "keyward producer id for a client producer's redirected writes");
            self.numbers()
                .producers
                .entry(client_producer)
                .or_insert((producer, Instant::now()));
        }
        anyhow::bail!("no producer id on cluster {}", self.client.name)
    }

    /// The broker no longer knows `stale`'s producer or epoch: the stream starts over under a
    /// new producer id (its client producer's, if that one is newer, or a new one).
    fn forget_producer(&self, stream: &StreamKey, stale: Stamp) {
        let mut numbers = self.numbers();
        let stale_producer = (stale.producer_id, stale.epoch);
        if numbers
            .streams
            .get(stream)
            .is_some_and(|n| n.producer == stale_producer)
        {
            numbers.streams.remove(stream);
        }
        let client_producer = (stream.producer_id, stream.epoch);
        if numbers
            .producers
            .get(&client_producer)
            .is_some_and(|(p, _)| *p == stale_producer)
        {
            numbers.producers.remove(&client_producer);
        }
    }

    /// `refused` was not written and never will be: if it was its stream's last, its numbers
    /// are given again; otherwise the stream starts over (see [`Self::restart`]), so what
    /// follows leaves no gap.
    fn unwritten(&self, stream: &StreamKey, refused: Stamp, records: i32) {
        {
            let mut numbers = self.numbers();
            let Some(n) = numbers.streams.get_mut(stream) else {
                return;
            };
            if n.producer == (refused.producer_id, refused.epoch)
                && n.next == refused.seq.wrapping_add(records)
            {
                n.next = refused.seq;
                return;
            }
        }
        self.restart(stream, refused);
    }

    /// The stream stamped `stale` has a gap that will not be filled: it goes on under the next
    /// epoch of its producer id from 0 (as an idempotent producer bumps its own epoch), or
    /// under a new producer id once the epochs run out.
    fn restart(&self, stream: &StreamKey, stale: Stamp) {
        let mut numbers = self.numbers();
        let Some(n) = numbers.streams.get_mut(stream) else {
            return;
        };
        if n.producer != (stale.producer_id, stale.epoch) {
            return;
        }
        if n.producer.1 < i16::MAX {
            n.producer.1 += 1;
            n.next = 0;
        } else {
            numbers.streams.remove(stream);
        }
    }
}

/// All redirect state of one keyward process.
pub struct Redirector {
    /// By cluster index (see `proxy::brokers::Clusters`); `None` for the serving cluster itself,
    /// which is never a redirect target.
    targets: Vec<Arc<Target>>,
    book: Mutex<SequenceBook>,
    /// Set once any idempotent producer's batch was redirected: until then local writes skip
    /// the sequence book entirely (no lock, no lookup on the hot path).
    active: AtomicBool,
    /// The proxy's tracker and shutdown: pipelines are its tasks.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Where streams are saved for other instances, when the journal is on, and the index of
    /// the cluster it is on (the region's own).
    journal: Option<(Arc<Journal>, usize)>,
    /// This process among the instances that save streams.
    writer: u64,
}

/// What one produce request booked for redirect: the streams it changed, saved before the
/// batches it redirects are queued ([`Redirector::carry_out`]).
#[derive(Default)]
pub struct Bookings {
    streams: Vec<StreamKey>,
    jobs: Vec<(usize, PartitionKey, Job)>,
}

/// A request whose handling stopped before its bookings were carried out (its connection
/// ended meanwhile): every booked batch is answered as timed out, so a retry of it is sent
/// under its stamp rather than left waiting for an answer that never comes.
impl Drop for Bookings {
    fn drop(&mut self) {
        for (_, (_, partition), job) in self.jobs.drain(..) {
            let _ = job
                .done
                .send(Some(error_response(partition, REQUEST_TIMED_OUT)));
        }
    }
}

impl Redirector {
    /// One target per cluster: its bootstrap addresses, how to connect to it, and the counters
    /// of what lands there. Pipelines run on `tasks` and end after `shutdown`, once what is
    /// queued is written.
    ///
    /// With `journal` (the index of the region's own cluster and the topic there), streams are
    /// saved to and adopted from the stream journal, whose reader runs on `tasks` too, from the
    /// first stream that needs it: an instance that redirects nothing never touches the topic.
    pub fn new(
        clusters: impl IntoIterator<Item = (Vec<String>, Dialer, Option<Redirected>)>,
        journal: Option<(usize, String)>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let clusters: Vec<_> = clusters.into_iter().collect();
        let journal = journal.and_then(|(home, topic)| {
            let (bootstrap, dialer, _) = clusters.get(home)?;
            let client = || ClusterClient::new(bootstrap.clone(), dialer.clone());
            let journal = Journal::new(client(), client(), topic);
            Some((journal, home))
        });
        let writer = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 40);
        Self {
            targets: clusters
                .into_iter()
                .map(|(bootstrap, dialer, landed)| {
                    let failures = metrics::counter!("keyward_redirect_failures_total", "cluster" => dialer.cluster.clone());
                    // Exported at 0, so an alert's rate sees the series before the first failure.
                    failures.absolute(0);
                    Arc::new(Target {
                        client: ClusterClient::new(bootstrap, dialer),
                        failures,
                        landed,
                        numbers: Mutex::new(Numbers::default()),
                        pipelines: Mutex::new(HashMap::new()),
                    })
                })
                .collect(),
            book: Mutex::new(SequenceBook::default()),
            active: AtomicBool::new(false),
            tasks,
            shutdown,
            journal,
            writer,
        }
    }

    /// Whether the streams of a connection to cluster `cluster` are kept in the stream
    /// journal: with the journal on, those of the region's own cluster. (While reads are
    /// failed over, a connection writes to another region's cluster, whose producer ids are
    /// that cluster's; its streams stay in this process.)
    pub fn journals(&self, cluster: usize) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|(_, home)| *home == cluster)
    }

    /// The stream a batch of a client producer with an id of its own belongs to.
    pub fn stream_of(topic: &str, partition: i32, batch: &[u8]) -> Option<StreamKey> {
        let h = header(batch)?;
        (h.producer_id >= 0).then(|| StreamKey {
            producer_id: h.producer_id,
            epoch: h.epoch,
            topic: topic.to_owned(),
            partition,
        })
    }

    /// Brings `streams` up to date with the stream journal before their batches are handled
    /// on a connection that has not had them before: what another instance (or this process
    /// before a restart) saved of them is carried on here.
    pub async fn adopt(&self, streams: &[StreamKey]) -> anyhow::Result<()> {
        let Some((journal, _)) = &self.journal else {
            return Ok(());
        };
        self.start_journal(journal);
        journal.catch_up().await?;
        let now = Instant::now();
        for key in streams {
            let Some(saved) = journal.get(key) else {
                continue;
            };
            if !self.book().adopt(key, &saved, now) {
                continue;
            }
            self.active.store(true, Ordering::Relaxed);
            for target in &self.targets {
                let mut numbers = target.numbers();
                numbers.streams.remove(key);
                if let Some(&(_, producer_id, epoch, next)) = saved
                    .targets
                    .iter()
                    .find(|(name, ..)| *name == target.client.name)
                {
                    numbers.streams.insert(
                        key.clone(),
                        Numbering {
                            producer: (producer_id, epoch),
                            next,
                            last_used: now,
                        },
                    );
                }
            }
            debug!(?key, rev = saved.rev, "stream carried on from the journal");
        }
        Ok(())
    }

    /// Starts the journal's reader and writer, unless they run.
    fn start_journal(&self, journal: &Arc<Journal>) {
        if journal.start() {
            self.tasks.spawn(
                journal
                    .clone()
                    .run(self.shutdown.clone())
                    .instrument(info_span!("journal")),
            );
            self.tasks.spawn(
                journal
                    .clone()
                    .write(self.shutdown.clone())
                    .instrument(info_span!("journal_writer")),
            );
        }
    }

    /// Saves the streams a request on a connection to `cluster` changed (when
    /// [`Self::journals`] them) and queues its redirected batches.
    ///
    /// The save is queued, not waited for, and the batches go out meanwhile: what the client
    /// is answered must wait for the returned [`Durable`], and if it fails the connection is
    /// closed unanswered. Until then nothing the request sent is acknowledged, so the client
    /// sends it again, and an instance carrying the stream on from its last save numbers it
    /// the same way (a stream's numbers follow from its saved state and the client's batches
    /// in the client's order). The one thing it could not number the same way is a batch
    /// under a producer id or epoch on a target that no save holds yet: a request that
    /// numbered a stream so is saved first, and its batches are queued once the save landed.
    ///
    /// If the journal cannot take a save, nothing of the request is queued: each redirected
    /// batch is answered as timed out (the client's retry is sent under the same stamp) and
    /// the error is returned, for the connection to be closed.
    pub async fn carry_out(
        &self,
        cluster: usize,
        mut bookings: Bookings,
    ) -> anyhow::Result<Option<Durable>> {
        let mut durable = None;
        if let Some((journal, _)) = &self.journal
            && self.journals(cluster)
            && !bookings.streams.is_empty()
        {
            bookings.streams.sort_by(|a, b| {
                (a.producer_id, a.epoch, &a.topic, a.partition).cmp(&(
                    b.producer_id,
                    b.epoch,
                    &b.topic,
                    b.partition,
                ))
            });
            bookings.streams.dedup();
            // A batch without a stamp yet (the target gave no producer id) would be stamped by
            // its pipeline, under numbers no save holds: its client is answered with a
            // retriable error instead, and the retry is stamped anew.
            let (unstamped, stamped) = std::mem::take(&mut bookings.jobs)
                .into_iter()
                .partition::<Vec<_>, _>(|(_, _, job)| {
                    job.stream.producer_id >= 0 && job.stamp.lock().is_ok_and(|s| s.is_none())
                });
            bookings.jobs = stamped;
            for (target, (_, partition), job) in unstamped {
                self.targets[target].failures.increment(1);
                let _ = job
                    .done
                    .send(Some(error_response(partition, REQUEST_TIMED_OUT)));
            }
            let mut first = false;
            let saved: Vec<_> = bookings
                .streams
                .iter()
                .filter_map(|key| {
                    let mut saved = self.book().save(key, self.writer)?;
                    saved.targets = self
                        .targets
                        .iter()
                        .filter_map(|t| {
                            let numbers = t.numbers();
                            let n = numbers.streams.get(key)?;
                            first |= !journal.numbers(key, &t.client.name, n.producer);
                            Some((t.client.name.clone(), n.producer.0, n.producer.1, n.next))
                        })
                        .collect();
                    Some((key.clone(), saved))
                })
                .collect();
            self.start_journal(journal);
            metrics::counter!("keyward_journal_requests_total", "save" => if first { "before_sending" } else { "with_sending" }).increment(1);
            let queued = if first {
                journal.submit(saved).await.map(|()| None)
            } else {
                Ok(Some(journal.submit(saved)))
            };
            match queued {
                Ok(d) => durable = d,
                Err(e) => {
                    for (target, (_, partition), job) in std::mem::take(&mut bookings.jobs) {
                        self.targets[target].failures.increment(1);
                        let _ = job
                            .done
                            .send(Some(error_response(partition, REQUEST_TIMED_OUT)));
                    }
                    return Err(e);
                }
            }
        }
        for (target, (topic, partition), job) in std::mem::take(&mut bookings.jobs) {
            if let Err(job) = self.enqueue(target, &topic, partition, job).await {
                self.targets[target].failures.increment(1);
                let _ = job
                    .done
                    .send(Some(error_response(partition, REQUEST_TIMED_OUT)));
            }
        }
        Ok(durable)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, SequenceBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch a local write must carry: the client's own, or a copy renumbered because some
    /// of this producer's batches for the partition went to another cluster.
    pub fn local_batch(&self, topic: &str, partition: i32, batch: &[u8]) -> Option<Bytes> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let h = header(batch)?;
        if h.producer_id < 0 {
            return None;
        }
        let mut book = self.book();
        if !book.knows(h.producer_id, h.epoch) {
            return None;
        }
        let key = StreamKey {
            producer_id: h.producer_id,
            epoch: h.epoch,
            topic: topic.to_owned(),
            partition,
        };
        let seq = book.local(&key, h.base_sequence, Instant::now())?;
        // `header` read this batch, so renumbering it cannot fail.
        records::renumbered(batch, None, seq).ok()
    }

    /// Books `batch` for partition `partition` of `topic` on cluster `target`, to be sent once
    /// `bookings` is carried out; the outcome arrives on the returned receiver.
    #[allow(clippy::too_many_arguments)]
    pub async fn redirect(
        &self,
        bookings: &mut Bookings,
        target: usize,
        topic: &str,
        partition: i32,
        batch: Bytes,
        acks: i16,
        timeout_ms: i32,
    ) -> Outcome {
        self.send(
            bookings,
            target,
            topic,
            partition,
            batch,
            acks,
            timeout_ms,
            Booking::Batch,
        )
        .await
    }

    /// Sends one redirected part of a split batch, as [`Self::redirect`] sends a whole one.
    /// The part's records were booked when its local part was numbered
    /// ([`Self::local_part`]); a retry of the client's batch does not send a part again that
    /// is in flight or landed.
    #[allow(clippy::too_many_arguments)]
    pub async fn redirect_part(
        &self,
        bookings: &mut Bookings,
        target: usize,
        topic: &str,
        partition: i32,
        part: Bytes,
        acks: i16,
        timeout_ms: i32,
    ) -> Outcome {
        self.send(
            bookings,
            target,
            topic,
            partition,
            part,
            acks,
            timeout_ms,
            Booking::Part,
        )
        .await
    }

    /// The local part of a split batch, numbered so the local cluster sees the client
    /// producer's records without a gap: `client_batch` is the batch as the client sent it,
    /// `part` the records of it that stay, `local_records` of them. A batch without a producer
    /// id needs no numbering and is returned as it is. Call it before the batch's redirected
    /// parts are sent.
    pub fn local_part(
        &self,
        bookings: &mut Bookings,
        topic: &str,
        partition: i32,
        client_batch: &[u8],
        part: Bytes,
        local_records: i32,
    ) -> Bytes {
        let Some(h) = header(client_batch) else {
            return part;
        };
        if h.producer_id < 0 {
            return part;
        }
        self.active.store(true, Ordering::Relaxed);
        let key = StreamKey {
            producer_id: h.producer_id,
            epoch: h.epoch,
            topic: topic.to_owned(),
            partition,
        };
        let seq = self.book().split(
            &key,
            h.base_sequence,
            h.records,
            local_records,
            Instant::now(),
        );
        bookings.streams.push(key);
        if local_records == 0 {
            return part;
        }
        // The part is a batch the split built; renumbering it cannot fail.
        records::renumbered(&part, None, seq).unwrap_or(part)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        bookings: &mut Bookings,
        target: usize,
        topic: &str,
        partition: i32,
        batch: Bytes,
        acks: i16,
        timeout_ms: i32,
        booking: Booking,
    ) -> Outcome {
        let (client_producer, client_seq, records) = match header(&batch) {
            Some(h) => (
                (h.producer_id >= 0).then_some((h.producer_id, h.epoch)),
                h.base_sequence,
                h.records,
            ),
            None => (None, -1, 0),
        };
        let stream = StreamKey {
            producer_id: client_producer.map_or(-1, |(id, _)| id),
            epoch: client_producer.map_or(-1, |(_, epoch)| epoch),
            topic: topic.to_owned(),
            partition,
        };
        let stamp = if client_producer.is_some() {
            self.active.store(true, Ordering::Relaxed);
            let mut book = self.book();
            let booked = match booking {
                Booking::Batch => book.redirect(&stream, client_seq, records, Instant::now()),
                Booking::Part => book.part(&stream, client_seq),
            };
            match booked {
                Redirect::Existing(outcome) => return outcome,
                Redirect::Send(stamp) => stamp,
            }
        } else {
            StampCell::default()
        };
        let (done, outcome) = watch::channel(None);
        if client_producer.is_some() {
            self.book()
                .attach(&stream, client_seq, outcome.clone(), stamp.clone());
        }
        let mut job = Job {
            batch,
            records,
            // acks=0 clients get no answer, but keyward needs one to keep its own numbering.
            acks: if acks == 0 { 1 } else { acks },
            timeout_ms,
            deadline: Instant::now()
                + Duration::from_millis((timeout_ms.clamp(1_000, 120_000) as u64) * 4 / 5),
            done,
            stream,
            stamp,
        };
        if client_producer.is_some() {
            // Stamped now, so the journal saves the numbers it will be sent under. Without a
            // producer id on the target yet, the pipeline stamps it when it sends it.
            let asked = Instant::now();
            if let Err(e) = self.targets[target].stamp(&job).await {
                debug!(error = %e, "no producer id for a redirected batch yet");
            }
            // Asking the target for a producer id is the pipeline's time, not the batch's.
            job.deadline += asked.elapsed();
            bookings.streams.push(job.stream.clone());
        }
        bookings
            .jobs
            .push((target, (topic.to_owned(), partition), job));
        outcome
    }

    /// Queues `job` on its partition's pipeline, starting one if none runs. The queue is
    /// tried under the pipelines' lock, the same lock an idle pipeline ends under, so a job
    /// never lands in a pipeline that has decided to end; only a full queue (a busy pipeline,
    /// which does not end) is waited on outside it. Errs with the job if it cannot be queued
    /// (the proxy is shutting down).
    async fn enqueue(
        &self,
        target: usize,
        topic: &str,
        partition: i32,
        job: Job,
    ) -> Result<(), Job> {
        let t = &self.targets[target];
        let busy = {
            let mut pipelines = t.pipelines();
            let key = (topic.to_owned(), partition);
            // A closed queue is a pipeline ending at shutdown: the job is refused below, not
            // given to a second pipeline beside it.
            let tx = match pipelines.get(&key) {
                Some(tx) => tx.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
                    let span = info_span!("redirect", cluster = %t.client.name, topic, partition);
                    let pipeline = Pipeline::new(t.clone(), key.clone());
                    self.tasks
                        .spawn(pipeline.run(rx, self.shutdown.clone()).instrument(span));
                    pipelines.insert(key, tx.clone());
                    tx
                }
            };
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(job)) => return Err(job),
                Err(mpsc::error::TrySendError::Full(job)) => (tx, job),
            }
        };
        let (tx, job) = busy;
        tx.send(job)
            .await
            .map_err(|mpsc::error::SendError(job)| job)
    }
}

fn retriable(code: i16) -> bool {
    matches!(
        code,
        REQUEST_TIMED_OUT | NOT_ENOUGH_REPLICAS | NOT_ENOUGH_REPLICAS_AFTER_APPEND
    )
}

/// What became of a batch a pipeline sent.
enum Attempt {
    /// Written (or already written: the broker recognised a retry).
    Landed(PartitionProduceResponse),
    /// The broker lost or fenced keyward's producer state.
    Fenced(PartitionProduceResponse),
    /// Refused for now; sent again after a pause (looking the leader up again if `refresh`).
    Retry {
        answer: PartitionProduceResponse,
        refresh: bool,
    },
    /// Refused for good: the client gets the broker's answer.
    Refused(PartitionProduceResponse),
    /// No answer: whether the broker wrote it is unknown.
    Lost(anyhow::Error),
}

impl Attempt {
    fn of(result: anyhow::Result<PartitionProduceResponse>) -> Self {
        match result {
            Ok(r) if r.error_code == 0 || r.error_code == DUPLICATE_SEQUENCE_NUMBER => {
                Self::Landed(r.with_error_code(0))
            }
            Ok(r)
                if matches!(
                    r.error_code,
                    OUT_OF_ORDER_SEQUENCE_NUMBER | UNKNOWN_PRODUCER_ID | INVALID_PRODUCER_EPOCH
                ) =>
            {
                Self::Fenced(r)
            }
            Ok(r) if client::is_stale_leader(r.error_code) => Self::Retry {
                answer: r,
                refresh: true,
            },
            Ok(r) if retriable(r.error_code) => Self::Retry {
                answer: r,
                refresh: false,
            },
            Ok(r) => Self::Refused(r),
            Err(e) => Self::Lost(e),
        }
    }
}

/// A job a pipeline has taken from its queue.
struct Pending {
    job: Job,
    /// Look the partition's leader up again before sending it.
    refresh: bool,
}

/// A batch written to the target and not yet answered.
struct Sent {
    pending: Pending,
    stamp: Stamp,
    reply: Reply<PartitionProduceResponse>,
}

/// One target partition's writer: its redirected batches in the order clients sent them, up
/// to [`MAX_IN_FLIGHT`] at once, each under the [`Stamp`] of its client stream.
///
/// A batch is stamped when first sent and keeps its stamp: when the oldest in flight fails,
/// every later one is settled before anything is sent again (the broker refuses a stream's
/// batches behind a gap, so those went nowhere), and what did not land is sent again in order
/// with the same stamps, so the broker recognises what it already wrote. A client's retry of a
/// batch whose outcome it was not told carries the same stamp too. A stream goes on under new
/// numbers only where the broker says nothing under the old ones can land: a batch refused for
/// good, or a producer id or epoch the broker no longer knows.
struct Pipeline {
    target: Arc<Target>,
    key: PartitionKey,
    /// Taken from the queue and not in flight: batches sent back by a failure first, in their
    /// order, then new ones.
    waiting: VecDeque<Pending>,
    in_flight: VecDeque<Sent>,
    /// Nothing is sent before then: the pause after a failure that a resend may cure.
    paused_until: Option<tokio::time::Instant>,
}

impl Pipeline {
    fn new(target: Arc<Target>, key: PartitionKey) -> Self {
        Self {
            target,
            key,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            paused_until: None,
        }
    }

    /// Writes jobs until idle for [`PIPELINE_IDLE`] or, after `shutdown`, until the queue is
    /// empty.
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let running = metrics::gauge!("keyward_redirect_pipelines", "cluster" => self.target.client.name.clone());
        running.increment(1.0);
        self.serve(&mut jobs, shutdown).await;
        running.decrement(1.0);
    }

    async fn serve(&mut self, jobs: &mut mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let mut closed = false;
        loop {
            self.send_waiting().await;
            let idle = self.in_flight.is_empty() && self.waiting.is_empty();
            if closed && idle {
                self.target.pipelines().remove(&self.key);
                return;
            }
            let room = self.waiting.is_empty() && self.in_flight.len() < MAX_IN_FLIGHT;
            let paused_until = self.paused_until;
            tokio::select! {
                result = oldest(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.settle(result).await;
                }
                job = jobs.recv(), if room && !closed => match job {
                    Some(job) => self.waiting.push_back(Pending { job, refresh: false }),
                    None => closed = true,
                },
                () = shutdown.cancelled(), if !jobs.is_closed() => {
                    // Nothing new arrives; what is queued is still written.
                    jobs.close();
                }
                () = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)), if paused_until.is_some() => {
                    self.paused_until = None;
                }
                () = tokio::time::sleep(PIPELINE_IDLE), if idle && !closed => {
                    if self.end_if_idle(jobs) {
                        return;
                    }
                }
            }
        }
    }

    /// Sends waiting batches in order while fewer than [`MAX_IN_FLIGHT`] are in flight.
    async fn send_waiting(&mut self) {
        while self.in_flight.len() < MAX_IN_FLIGHT && self.paused_until.is_none() {
            let Some(mut pending) = self.waiting.pop_front() else {
                return;
            };
            if Instant::now() >= pending.job.deadline {
                // Too late for its client, who will have given up on it. A stamp it has stays
                // with it: the client's retry is sent with the same numbers.
                self.answer(pending.job, error_response(self.key.1, REQUEST_TIMED_OUT));
                continue;
            }
            let stamp = match self.target.stamp(&pending.job).await {
                Ok(stamp) => stamp,
                Err(e) => {
                    warn!(cluster = %self.target.client.name, error = %e, "no producer id for redirected writes yet");
                    self.waiting.push_front(pending);
                    self.pause(Duration::from_millis(200));
                    return;
                }
            };
            let producer = Some((stamp.producer_id, stamp.epoch));
            let Ok(batch) = records::renumbered(&pending.job.batch, producer, stamp.seq) else {
                // The request half parsed this batch before queueing it; never expected.
                self.target
                    .unwritten(&pending.job.stream, stamp, pending.job.records);
                self.answer(pending.job, error_response(self.key.1, CORRUPT_MESSAGE));
                continue;
            };
            let job = &pending.job;
            let reply = self
                .target
                .client
                .submit(
                    &self.key.0,
                    self.key.1,
                    batch,
                    job.acks,
                    job.timeout_ms,
                    std::mem::take(&mut pending.refresh),
                )
                .await;
            self.in_flight.push_back(Sent {
                pending,
                stamp,
                reply,
            });
        }
    }

    /// Settles the oldest batch in flight, whose answer is `result`.
    async fn settle(&mut self, result: anyhow::Result<PartitionProduceResponse>) {
        let Some(Sent {
            pending: mut head,
            stamp,
            ..
        }) = self.in_flight.pop_front()
        else {
            return;
        };
        let failure = match Attempt::of(result) {
            Attempt::Landed(answer) => {
                self.answer(head.job, answer);
                return;
            }
            failure => failure,
        };
        // The oldest failed: everything sent after it settles before anything is sent again.
        let mut again = VecDeque::new();
        while let Some(Sent { pending, reply, .. }) = self.in_flight.pop_front() {
            match Attempt::of(reply.await) {
                Attempt::Landed(answer) => self.answer(pending.job, answer),
                _ => again.push_back(pending),
            }
        }
        let in_time = Instant::now() < head.job.deadline;
        let partition = self.key.1;
        let stream = head.job.stream.clone();
        match failure {
            Attempt::Landed(_) => unreachable!("settled above"),
            Attempt::Fenced(_) if stamp_gap(&stream, &failure) => {
                // The batch before it in its stream did not land, and its client was told it
                // timed out: the client sends that one again, then this one, in order.
                self.answer(head.job, error_response(partition, REQUEST_TIMED_OUT));
            }
            Attempt::Fenced(answer) => {
                warn!(cluster = %self.target.client.name, code = answer.error_code, "redirect producer state reset");
                if answer.error_code == OUT_OF_ORDER_SEQUENCE_NUMBER {
                    self.target.restart(&stream, stamp);
                } else {
                    self.target.forget_producer(&stream, stamp);
                }
                if in_time {
                    again.push_front(head);
                } else {
                    self.answer(head.job, error_response(partition, REQUEST_TIMED_OUT));
                }
            }
            Attempt::Retry { refresh, .. } if in_time => {
                head.refresh = refresh;
                again.push_front(head);
                self.pause(Duration::from_millis(100));
            }
            // Not written, and the client may send it again: with the same stamp.
            Attempt::Retry { answer, .. } => self.answer(head.job, answer),
            Attempt::Refused(answer) => {
                // Not written, ever: its stream goes on without a gap.
                self.target.unwritten(&stream, stamp, head.job.records);
                self.answer(head.job, answer);
            }
            Attempt::Lost(e) if in_time => {
                // Sent again with the same stamp: the broker drops it if it did land.
                debug!(cluster = %self.target.client.name, error = %e, "redirected write failed; retrying");
                again.push_front(head);
                self.pause(Duration::from_millis(100));
            }
            Attempt::Lost(e) => {
                // Whether it landed is unknown: it keeps its stamp, and so does what follows
                // it, so the client's retry is recognised if it did land.
                warn!(cluster = %self.target.client.name, error = %e, "redirected write failed");
                self.answer(head.job, error_response(partition, REQUEST_TIMED_OUT));
            }
        }
        while let Some(p) = again.pop_back() {
            self.waiting.push_front(p);
        }
    }

    fn pause(&mut self, pause: Duration) {
        self.paused_until = Some(tokio::time::Instant::now() + pause);
    }

    /// Gives a job's client its answer.
    fn answer(&self, job: Job, answer: PartitionProduceResponse) {
        if answer.error_code != 0 {
            self.target.failures.increment(1);
        } else if let Some(landed) = &self.target.landed {
            landed.landed(job.batch.len(), job.records);
        }
        let _ = job.done.send(Some(answer));
    }

    /// Ends the pipeline if nothing is queued, under the lock jobs are queued under. Its
    /// streams' numbering lives on in the target.
    fn end_if_idle(&self, jobs: &mpsc::Receiver<Job>) -> bool {
        let mut pipelines = self.target.pipelines();
        if !jobs.is_empty() {
            return false;
        }
        pipelines.remove(&self.key);
        debug!("idle redirect pipeline ended");
        true
    }
}

/// Whether `failure` of a client producer's batch is the gap left by an earlier batch of its
/// stream that did not land and that its client will send again (out of order, for a
/// producer with numbers of its own).
fn stamp_gap(stream: &StreamKey, failure: &Attempt) -> bool {
    stream.producer_id >= 0
        && matches!(failure, Attempt::Fenced(a) if a.error_code == OUT_OF_ORDER_SEQUENCE_NUMBER)
}

/// The answer to the oldest batch in flight (there is one).
async fn oldest(in_flight: &mut VecDeque<Sent>) -> anyhow::Result<PartitionProduceResponse> {
    match in_flight.front_mut() {
        Some(sent) => sent.reply.as_mut().await,
        None => std::future::pending().await,
    }
}

fn error_response(partition: i32, code: i16) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(partition)
        .with_error_code(code)
        .with_base_offset(-1)
}

/// The header fields redirect reads from a v2 record batch.
struct BatchFields {
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
    records: i32,
}

fn header(batch: &[u8]) -> Option<BatchFields> {
    let h = records::BatchHeader::parse(batch).ok()?;
    Some(BatchFields {
        producer_id: h.producer_id,
        epoch: h.producer_epoch,
        base_sequence: h.base_sequence,
        records: h.records_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;
    use kafka_protocol::records::{Compression, Record};

    #[test]
    fn a_rewritten_batch_carries_the_new_producer_and_a_valid_crc() {
        let first = Record {
            producer_id: 7,
            producer_epoch: 2,
            sequence: 10,
            ..testkit::record(Some(b"k"), Some(b"v"), &[("h", None)])
        };
        let buf = testkit::batch(&[first.clone(), first.clone(), first], Compression::Lz4);
        let fields = header(&buf).unwrap();
        assert_eq!(
            (
                fields.producer_id,
                fields.epoch,
                fields.base_sequence,
                fields.records
            ),
            (7, 2, 10, 3)
        );

        let out = records::renumbered(&buf, Some((99, 4)), 500).unwrap();
        assert!(records::renumbered(&buf[..60], None, 1).is_err());
        let batch = records::batches(&out).next().unwrap().unwrap();
        assert!(batch.verify_crc());
        assert_eq!(batch.header.producer_id, 99);
        assert_eq!(batch.header.producer_epoch, 4);
        assert_eq!(batch.header.base_sequence, 500);
        let header_len = records::BATCH_HEADER_LEN;
        assert_eq!(&out[header_len..], &buf[header_len..], "records untouched");
    }
}
