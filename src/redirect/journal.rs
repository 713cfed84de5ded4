//! The stream journal: redirect's per-stream bookkeeping ([`Saved`]), kept in a compacted topic
//! of the region's own cluster, so that any keyward instance of the region can carry a client
//! producer's stream on where another left it: after a restart, a crash, or a load balancer
//! sending the producer's next connection elsewhere.
//!
//! - **Writes.** A stream is saved (one record, keyed by the stream, acks=all) each time a
//!   request changed it. The request's batches go out while the save is in flight, and its
//!   client is answered only once the save landed ([`Journal::submit`]): until then the client
//!   sends the batches again if anything fails, and an instance that carries the stream on from
//!   an older save numbers them the same way. A save that gives a stream numbers under a new
//!   producer id or epoch on a target is waited for before anything is sent, since no other instance could give those numbers again.
//! - **Reads.** Before it handles the first batch of an idempotent stream on a connection, an
//!   instance asks the partition's end offset and reads the topic into memory that far
//!   ([`Journal::catch_up`]): whatever another instance saved before the producer's connection
//!   came here is then known. The reader reads only then, from where it last stopped: a save
//!   costs the cluster no fetch, and a quiet journal costs it nothing.
//!
//! Built on the cluster itself, not on a protocol of keyward's own: Kafka orders the writes
//! and keeps them; compaction keeps the latest record per stream.
//!
//! Limits: a save still in flight when its instance died can land after another instance
//! carried the stream on; every reader then keeps the higher revision, but compaction may keep
//! the later record (see ARCHITECTURE.md). Streams are never deleted from the topic: it holds
//! one record per stream ever redirected, and every instance holds them all in memory.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use metrics::{counter, histogram};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{ClusterClient, batch_end, detail, is_stale_leader, whole_batches};
use super::sequences::{Saved, StreamKey};
use crate::codec::errors::OFFSET_OUT_OF_RANGE;

/// How long a connection's first idempotent batch waits for the journal before its
/// connection is closed (the client retries on a new one).
const CATCH_UP: Duration = Duration::from_secs(10);

pub struct Journal {
    /// For saves and end offsets.
    client: ClusterClient,
    /// For the reader's fetches alone: a broker answers one connection's requests in order, so
    /// a save must not wait behind a fetch the broker holds.
    reader: ClusterClient,
    topic: String,
    saved: Mutex<HashMap<StreamKey, Saved>>,
    /// The next offset the reader will read.
    read_to: watch::Sender<i64>,
    /// The offset a catch-up waits for: the reader reads only while this is ahead of
    /// `read_to`, so a quiet journal costs its cluster nothing, and a busy one no fetch per
    /// save.
    wanted: watch::Sender<i64>,
    /// The reader and the writer have been started.
    started: AtomicBool,
    /// Saves waiting for the writer ([`Self::write`]), and its end of the queue until it starts.
    saves: mpsc::UnboundedSender<Save>,
    queued: Mutex<Option<mpsc::UnboundedReceiver<Save>>>,
}

/// Streams to save, and who waits for them.
struct Save {
    streams: Vec<(StreamKey, Saved)>,
    done: oneshot::Sender<Result<(), String>>,
    queued_at: Instant,
}

/// A queued save, resolving once the cluster has it ([`Journal::submit`]).
pub type Durable = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + Sync>>;

impl Journal {
    pub fn new(client: ClusterClient, reader: ClusterClient, topic: String) -> Arc<Self> {
        let (saves, queued) = mpsc::unbounded_channel();
        Arc::new(Self {
            client,
            reader,
            topic,
            saved: Mutex::new(HashMap::new()),
            read_to: watch::channel(-1).0,
            wanted: watch::channel(-1).0,
            started: AtomicBool::new(false),
            saves,
            queued: Mutex::new(Some(queued)),
        })
    }

    /// Whether the caller is the first to ask, and so must start [`Self::run`] and
    /// [`Self::write`].
    pub fn start(&self) -> bool {
        !self.started.swap(true, Ordering::AcqRel)
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Saved>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest saved state of a stream, as far as this instance has read.
    pub fn get(&self, key: &StreamKey) -> Option<Saved> {
        self.saved().get(key).cloned()
    }

    /// Waits until this instance has read everything saved before now. The topic may still
    /// be in the making (the first stream an instance meets starts the reader, which creates
    /// it): its end offset is asked again until it is there.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let asked = async {
            loop {
                match self.client.end_offset(&self.topic, 0).await {
                    Ok(end) => return end,
                    Err(e) => {
                        debug!(
                            error = format!("{e:#}"),
                            "the stream journal is not there yet"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        let end = tokio::time::timeout(CATCH_UP, asked)
            .await
            .context("the stream journal's end offset took too long")?;
        self.wanted.send_if_modified(|wanted| {
            let ahead = end > *wanted;
            *wanted = (*wanted).max(end);
            ahead
        });
        let mut read_to = self.read_to.subscribe();
        tokio::time::timeout(CATCH_UP, read_to.wait_for(|&at| at >= end))
            .await
            .with_context(|| {
                format!(
                    "reading the stream journal {} to offset {end} took too long",
                    self.topic
                )
            })?
            .context("the stream journal's reader ended")?;
        Ok(())
    }

    /// Queues a save of `streams` behind every save queued before it, and returns what
    /// resolves once the cluster has it (or a later save of the same streams).
    pub fn submit(&self, streams: Vec<(StreamKey, Saved)>) -> Durable {
        if streams.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let (done, saved) = oneshot::channel();
        let queued = self.saves.send(Save {
            streams,
            done,
            queued_at: Instant::now(),
        });
        Box::pin(async move {
            queued.map_err(|_| anyhow!("the stream journal's writer has stopped"))?;
            match saved.await {
                Ok(result) => result.map_err(|e| anyhow!(e)),
                Err(_) => bail!("the stream journal's writer stopped before the save landed"),
            }
        })
    }

    /// Writes the queued saves, one batch at a time (group commit): what is queued while a
    /// batch is in flight goes in the next one, only the latest revision of each stream, so
    /// a busy instance writes far fewer records than it has requests. One batch in flight
    /// also keeps the saves in order when a batch is sent again after a leader moved. At
    /// `shutdown`, what is queued is still written; then the writer ends.
    pub async fn write(self: Arc<Self>, shutdown: CancellationToken) {
        let taken = self.queued.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut queue) = taken else {
            return;
        };
        loop {
            let first = tokio::select! {
                biased;
                save = queue.recv() => match save {
                    Some(save) => save,
                    None => return,
                },
                () = shutdown.cancelled() => return,
            };
            let mut waiting = vec![(first.done, first.queued_at)];
            let mut latest = HashMap::new();
            for (key, state) in first.streams {
                keep_latest(&mut latest, key, state);
            }
            while let Ok(save) = queue.try_recv() {
                waiting.push((save.done, save.queued_at));
                for (key, state) in save.streams {
                    keep_latest(&mut latest, key, state);
                }
            }
            let result = self
                .write_batch(latest.into_iter().collect())
                .await
                .map_err(|e| format!("{e:#}"));
            counter!("keyward_journal_batches_total").increment(1);
            counter!("keyward_journal_saves_total").increment(waiting.len() as u64);
            let waited = histogram!("keyward_journal_save_seconds");
            for (done, queued_at) in waiting {
                waited.record(queued_at.elapsed());
                let _ = done.send(result.clone());
            }
        }
    }

    /// One batch of saves, sent again (up to 3 times) if the leader moved.
    async fn write_batch(&self, streams: Vec<(StreamKey, Saved)>) -> anyhow::Result<()> {
        let batch = encode(&streams)?;
        let started = Instant::now();
        let written = histogram!("keyward_journal_write_seconds");
        let mut refresh = false;
        for _ in 0..3 {
            let answer = self
                .client
                .submit(&self.topic, 0, batch.clone(), -1, 10_000, refresh)
                .await
                .await?;
            if is_stale_leader(answer.error_code) {
                refresh = true;
                continue;
            }
            written.record(started.elapsed());
            return self.saved_if(answer, streams);
        }
        bail!("the stream journal's leader keeps moving")
    }

    /// Whether a stream's own numbering on `cluster` under `producer` is saved here: a
    /// batch sent under a new producer id or epoch cannot be numbered the same way again by
    /// another instance, so the save comes first.
    pub fn numbers(&self, key: &StreamKey, cluster: &str, producer: (i64, i16)) -> bool {
        self.saved().get(key).is_some_and(|s| {
            s.targets
                .iter()
                .any(|(name, id, epoch, _)| name == cluster && (*id, *epoch) == producer)
        })
    }

    /// Takes the cluster's answer to a save: on success the streams are known here at once,
    /// before the reader reads them back.
    fn saved_if(
        &self,
        answer: PartitionProduceResponse,
        streams: Vec<(StreamKey, Saved)>,
    ) -> anyhow::Result<()> {
        if answer.error_code != 0 {
            bail!(
                "cluster {} refused a stream journal write (error {}{})",
                self.client.name,
                answer.error_code,
                detail(&answer.error_message)
            );
        }
        let mut saved = self.saved();
        for (key, state) in streams {
            keep_latest(&mut saved, key, state);
        }
        Ok(())
    }

    /// Creates the topic if it is missing, then reads it from its start, as far as
    /// [`Self::catch_up`] asks each time, until `shutdown`.
    /// The topic has up to 3 replicas (fewer on a smaller cluster), and with more than one a
    /// save needs two of them in sync.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let created = async {
            loop {
                // There already (made by another instance, or by an operator who gives
                // keyward no CREATE permission): nothing to create.
                if self.client.end_offset(&self.topic, 0).await.is_ok() {
                    return;
                }
                // Learns the brokers (the topic may not exist yet: that is no error here).
                let _ = self.client.refresh(&self.topic).await;
                let replication_factor = self.client.brokers_known().clamp(1, 3) as i16;
                let configs = [
                    ("cleanup.policy", "compact"),
                    (
                        "min.insync.replicas",
                        if replication_factor > 1 { "2" } else { "1" },
                    ),
                ];
                match self
                    .client
                    .create_topic(&self.topic, replication_factor, &configs)
                    .await
                {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(
                            error = format!("{e:#}"),
                            "stream journal topic not there yet"
                        );
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = created => {}
            () = shutdown.cancelled() => return,
        }
        info!(topic = %self.topic, cluster = %self.client.name, "reading the stream journal");
        let mut at = 0i64;
        let mut refresh = false;
        let mut wanted = self.wanted.subscribe();
        loop {
            // Read only what a catch-up waits for (this instance's own saves are known without
            // reading them back).
            let read_to = *self.read_to.borrow();
            tokio::select! {
                w = wanted.wait_for(|&w| w > read_to) => if w.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            let fetched = tokio::select! {
                f = self.reader.fetch(&self.topic, 0, at, 500, refresh) => f,
                () = shutdown.cancelled() => return,
            };
            refresh = false;
            match fetched {
                Ok(Ok(data)) => {
                    let before = at;
                    at = self.apply(data, at);
                    if at == before {
                        // Nothing new: read to the end as it stood.
                        if let Ok(end) = self.reader.end_offset(&self.topic, 0).await
                            && end <= at
                        {
                            self.read_to.send_replace(at);
                        }
                    } else {
                        self.read_to.send_replace(at);
                    }
                }
                failed => {
                    match failed {
                        // The log starts past `at` (compaction removed what was there): read
                        // on from its start.
                        Ok(Err(OFFSET_OUT_OF_RANGE)) => {
                            if let Ok(start) = self.reader.start_offset(&self.topic, 0).await {
                                at = at.max(start);
                            }
                        }
                        Ok(Err(code)) => {
                            debug!(code, "reading the stream journal failed");
                            refresh = is_stale_leader(code);
                        }
                        Err(e) => {
                            debug!(
                                error = format!("{e:#}"),
                                "reading the stream journal failed"
                            );
                            refresh = true;
                        }
                        Ok(Ok(_)) => unreachable!("matched above"),
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Takes the records of the whole batches in `data` from offset `at` on; returns the
    /// offset after the last one read.
    fn apply(&self, data: Bytes, mut at: i64) -> i64 {
        let mut saved = self.saved();
        for mut batch in whole_batches(data) {
            // The offset after the batch, whatever compaction left in it.
            let after = batch_end(&batch);
            let Ok(set) = RecordBatchDecoder::decode(&mut batch) else {
                warn!("a stream journal batch could not be read; skipped");
                at = at.max(after);
                continue;
            };
            for record in set.records {
                if record.offset < at {
                    continue;
                }
                at = record.offset + 1;
                let Some(key) = record.key.as_deref().and_then(parse_key) else {
                    continue;
                };
                match record.value.as_deref().map(serde_json::from_slice::<Saved>) {
                    Some(Ok(state)) => keep_latest(&mut saved, key, state),
                    Some(Err(e)) => warn!(error = %e, "a stream journal record could not be read"),
                    None => {
                        saved.remove(&key);
                    }
                }
            }
            at = at.max(after);
        }
        at
    }
}

/// Keeps `state` unless a later revision of the stream is already held.
fn keep_latest(saved: &mut HashMap<StreamKey, Saved>, key: StreamKey, state: Saved) {
    match saved.get(&key) {
        Some(held) if held.rev > state.rev => {}
        _ => {
            saved.insert(key, state);
        }
    }
}

/// One batch of `streams`, each a record keyed by its stream.
fn encode(streams: &[(StreamKey, Saved)]) -> anyhow::Result<Bytes> {
    let now = now_ms();
    let records: Vec<Record> = streams
        .iter()
        .enumerate()
        .map(|(i, (key, saved))| {
            Ok(record(
                i as i64,
                now,
                Bytes::from(key_bytes(key)),
                Bytes::from(serde_json::to_vec(saved)?),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut batch = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .context("encoding a stream journal batch")?;
    Ok(batch.freeze())
}

/// One journal record, at `offset` in the batch being built: no producer id, so no
/// idempotence (a save written twice is the same state twice).
fn record(offset: i64, timestamp: i64, key: Bytes, value: Bytes) -> Record {
    Record {
        transactional: false,
        control: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        // The encoder keeps records in one batch while offset - sequence is the same; the
        // batch's base sequence is the first one's, -1 (no producer).
        sequence: offset as i32 - 1,
        timestamp,
        key: Some(key),
        value: Some(value),
        headers: Default::default(),
        delete_horizon: false,
    }
}

/// A stream's record key: `producer id/epoch/partition/topic` (topic names cannot hold `/`).
fn key_bytes(key: &StreamKey) -> String {
    format!(
        "{}/{}/{}/{}",
        key.producer_id, key.epoch, key.partition, key.topic
    )
}

fn parse_key(raw: &[u8]) -> Option<StreamKey> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut parts = text.splitn(4, '/');
    Some(StreamKey {
        producer_id: parts.next()?.parse().ok()?,
        epoch: parts.next()?.parse().ok()?,
        partition: parts.next()?.parse().ok()?,
        topic: parts.next()?.to_owned(),
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_read_back() {
        let key = StreamKey {
            producer_id: 4001,
            epoch: 3,
            topic: "orders.eu-1".into(),
            partition: 12,
        };
        assert_eq!(parse_key(key_bytes(&key).as_bytes()), Some(key));
        assert_eq!(parse_key(b"1/2/x/t"), None);
    }

    #[test]
    fn a_later_revision_is_never_replaced_by_an_earlier_one() {
        let key = StreamKey {
            producer_id: 1,
            epoch: 0,
            topic: "t".into(),
            partition: 0,
        };
        let state = |rev, writer| Saved {
            rev,
            writer,
            shift: rev as i32,
            local: vec![],
            redirected: vec![],
            targets: vec![],
        };
        let mut saved = HashMap::new();
        keep_latest(&mut saved, key.clone(), state(2, 1));
        // A save of an instance that died, landing late.
        keep_latest(&mut saved, key.clone(), state(1, 9));
        assert_eq!(saved[&key].rev, 2);
        keep_latest(&mut saved, key.clone(), state(3, 9));
        assert_eq!(saved[&key].writer, 9);
    }

    #[test]
    fn only_whole_batches_are_read() {
        let record = record(0, 0, Bytes::from_static(b"k"), Bytes::from_static(b"v"));
        let mut buf = BytesMut::new();
        for _ in 0..2 {
            RecordBatchEncoder::encode(
                &mut buf,
                std::slice::from_ref(&record),
                &RecordEncodeOptions {
                    version: 2,
                    compression: Compression::None,
                },
            )
            .unwrap();
        }
        let whole = buf.freeze();
        let batches = whole_batches(whole.clone());
        assert_eq!(batches.len(), 2);
        assert_eq!(batch_end(&batches[0]), 1, "one record at offset 0");
        assert_eq!(whole_batches(whole.slice(..whole.len() - 3)).len(), 1);
        assert!(whole_batches(whole.slice(..5)).is_empty());
    }
}
