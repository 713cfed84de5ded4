//! Keeping idempotent producers' sequence numbers whole when some of their batches go to another
//! cluster.
//!
//! An idempotent producer numbers its records per partition: 0, 1, 2, ... across all its
//! batches. When keyward sends some of a partition's batches to another region's cluster, the
//! local cluster would see gaps in that numbering and answer OUT_OF_ORDER_SEQUENCE_NUMBER. So for
//! every (producer id, epoch, topic, partition) that has had a batch redirected, keyward keeps a
//! *stream*: how many records went elsewhere (the shift subtracted from later local batches), the
//! numbers it gave recent local batches (a retry gets the same number again, so the broker can
//! deduplicate it), and the recent redirected batches with their outcome and stamp (a retry of
//! a batch already written elsewhere gets that outcome, not a second write; a retry of one that
//! failed is sent under the same stamp, so the target's broker recognises it if it landed).
//!
//! Streams live in memory: an idle stream is forgotten after [`STREAM_IDLE`]. With the stream
//! journal on ([`super::journal`]), every change to a stream is also saved ([`Saved`]) before
//! anything that depends on it is sent, and a stream this process does not know, or knows
//! only from before another instance took it over, is adopted from the journal
//! ([`SequenceBook::adopt`]). Without the journal, a restart of keyward forgets them all (see
//! the README for what producers then see).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Stamp, StampCell};

/// How long a stream with no traffic is remembered.
pub const STREAM_IDLE: Duration = Duration::from_secs(15 * 60);
/// Recent batches remembered per stream, for retries. A producer has at most 5 batches in
/// flight per partition with idempotence on (Java and librdkafka both enforce it).
const RECENT: usize = 16;

/// The outcome of one redirected batch, once known.
pub type Outcome = watch::Receiver<Option<PartitionProduceResponse>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub producer_id: i64,
    pub epoch: i16,
    pub topic: String,
    pub partition: i32,
}

struct Stream {
    /// Records of this stream written elsewhere so far.
    shift: i32,
    /// (client base sequence, local base sequence) of recent local batches.
    local: VecDeque<(i32, i32)>,
    /// (client base sequence, outcome, stamp) of recent redirected batches, and of the
    /// redirected parts of split batches (keyed by the client's sequence of the part's first
    /// record). The outcome is `None` for a batch adopted from the journal: whether it landed
    /// is not known here.
    redirected: VecDeque<(i32, Option<Outcome>, StampCell)>,
    last_used: Instant,
    /// The journal write this state is: (revision, writer). See [`Saved`].
    version: (u64, u64),
}

/// One stream's bookkeeping as the stream journal keeps it: everything another keyward
/// instance needs to carry the stream on where this one left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// How many times the stream was saved, by whichever instance; an instance that carries a
    /// stream on saves it with the next revision, so the highest is the latest.
    pub rev: u64,
    /// The instance that saved it (a number drawn at start).
    pub writer: u64,
    pub shift: i32,
    /// (client base sequence, local base sequence) of recent local batches.
    pub local: Vec<(i32, i32)>,
    /// (client base sequence, stamp) of recent redirected batches and parts.
    pub redirected: Vec<(i32, Option<Stamp>)>,
    /// keyward's numbering of the stream on each cluster it went to: (cluster, producer id,
    /// epoch, next sequence).
    pub targets: Vec<(String, i64, i16, i32)>,
}

impl Stream {
    /// An earlier attempt at the redirected batch or part `seq`: its outcome if it is in
    /// flight or landed (a retry waits for it, or reuses it, instead of writing again), or its
    /// stamp if it failed (a retry is sent under the same numbers, so the target's broker
    /// recognises it should it have landed after all).
    fn earlier(&self, seq: i32) -> Option<Redirect> {
        let (_, outcome, stamp) = self.redirected.iter().find(|(c, ..)| *c == seq)?;
        // Landed, or still in flight (no answer yet, and someone to give one).
        let pending_or_landed = |outcome: &Outcome| match outcome.borrow().as_ref() {
            Some(answer) => answer.error_code == 0,
            None => outcome.has_changed().is_ok(),
        };
        Some(match outcome {
            Some(outcome) if pending_or_landed(outcome) => Redirect::Existing(outcome.clone()),
            // Failed, never sent, or adopted from the journal: sent (again) under its stamp,
            // so the target's broker recognises it if it landed.
            _ => Redirect::Send(stamp.clone()),
        })
    }

    fn new(now: Instant) -> Self {
        Self {
            shift: 0,
            local: VecDeque::new(),
            redirected: VecDeque::new(),
            last_used: now,
            version: (0, 0),
        }
    }
}

/// What a redirected batch should do.
pub enum Redirect {
    /// A retry of a batch already sent: wait for (or reuse) that outcome.
    Existing(Outcome),
    /// Send it, under this stamp (an earlier attempt's, or a new one to be given); call
    /// [`SequenceBook::attach`] with the outcome's receiver.
    Send(StampCell),
}

#[derive(Default)]
pub struct SequenceBook {
    streams: HashMap<StreamKey, Stream>,
    /// Producers with at least one stream: the fast check on the hot path.
    producers: HashSet<(i64, i16)>,
    calls: u64,
}

impl SequenceBook {
    /// Whether any batch of this producer was ever redirected (cheap; no allocation).
    pub fn knows(&self, producer_id: i64, epoch: i16) -> bool {
        self.producers.contains(&(producer_id, epoch))
    }

    /// The base sequence a local batch must carry, or `None` to leave it as the client wrote it.
    pub fn local(&mut self, key: &StreamKey, client_seq: i32, now: Instant) -> Option<i32> {
        let stream = self.streams.get_mut(key)?;
        stream.last_used = now;
        if let Some(&(_, local)) = stream.local.iter().find(|(c, _)| *c == client_seq) {
            return Some(local);
        }
        let local = client_seq.wrapping_sub(stream.shift);
        if stream.local.len() == RECENT {
            stream.local.pop_front();
        }
        stream.local.push_back((client_seq, local));
        (local != client_seq).then_some(local)
    }

    /// Books a batch for redirect: a new one shifts every later local batch of its stream.
    pub fn redirect(
        &mut self,
        key: &StreamKey,
        client_seq: i32,
        records: i32,
        now: Instant,
    ) -> Redirect {
        let stream = self.stream(key, now);
        // An earlier attempt (one that failed too) counted the records already.
        stream.earlier(client_seq).unwrap_or_else(|| {
            stream.shift = stream.shift.wrapping_add(records);
            Redirect::Send(StampCell::default())
        })
    }

    /// Books a batch that is split: `local_records` of its `records` go to the local cluster as
    /// one batch, the rest to other clusters as parts (each booked with [`Self::part`]).
    /// Returns the base sequence the local part carries: the records the local cluster sees
    /// stay gap-free, and a retry of the same client batch gets the same number (so the broker
    /// deduplicates it). The records that went elsewhere shift every later local batch, once.
    pub fn split(
        &mut self,
        key: &StreamKey,
        client_seq: i32,
        records: i32,
        local_records: i32,
        now: Instant,
    ) -> i32 {
        let stream = self.stream(key, now);
        if let Some(&(_, local)) = stream.local.iter().find(|(c, _)| *c == client_seq) {
            return local;
        }
        let local = client_seq.wrapping_sub(stream.shift);
        stream.shift = stream.shift.wrapping_add(records - local_records);
        if stream.local.len() == RECENT {
            stream.local.pop_front();
        }
        stream.local.push_back((client_seq, local));
        local
    }

    /// Whether the redirected part of a split batch whose first record has the client's
    /// sequence `part_seq` must be sent: not if an earlier attempt is in flight or landed. Its
    /// records were counted by [`Self::split`]; call [`Self::attach`] with its outcome.
    pub fn part(&mut self, key: &StreamKey, part_seq: i32) -> Redirect {
        self.streams
            .get(key)
            .and_then(|stream| stream.earlier(part_seq))
            .unwrap_or_else(|| Redirect::Send(StampCell::default()))
    }

    /// The stream of `key`, made if new; marks it used now.
    fn stream(&mut self, key: &StreamKey, now: Instant) -> &mut Stream {
        self.prune(now);
        self.producers.insert((key.producer_id, key.epoch));
        let stream = self
            .streams
            .entry(key.clone())
            .or_insert_with(|| Stream::new(now));
        stream.last_used = now;
        stream
    }

    /// Remembers the outcome and stamp of the latest attempt at a batch booked with
    /// [`Self::redirect`] or [`Self::part`].
    pub fn attach(&mut self, key: &StreamKey, client_seq: i32, outcome: Outcome, stamp: StampCell) {
        if let Some(stream) = self.streams.get_mut(key) {
            stream.redirected.retain(|(c, ..)| *c != client_seq);
            if stream.redirected.len() == RECENT {
                stream.redirected.pop_front();
            }
            stream
                .redirected
                .push_back((client_seq, Some(outcome), stamp));
        }
    }

    /// The stream's state to save in the journal, as revision `rev` by `writer`; `None` for a
    /// stream not kept. The caller adds the targets' numbering.
    pub fn save(&mut self, key: &StreamKey, writer: u64) -> Option<Saved> {
        let stream = self.streams.get_mut(key)?;
        stream.version = (stream.version.0 + 1, writer);
        Some(Saved {
            rev: stream.version.0,
            writer,
            shift: stream.shift,
            local: stream.local.iter().copied().collect(),
            redirected: stream
                .redirected
                .iter()
                .map(|(seq, _, stamp)| (*seq, *stamp.lock().unwrap_or_else(|e| e.into_inner())))
                .collect(),
            targets: Vec::new(),
        })
    }

    /// Takes the journal's state of a stream unless it is the one this book already holds
    /// (saved or adopted by this process last): another instance carried the stream on since,
    /// or this process never had it. Returns whether it was taken.
    pub fn adopt(&mut self, key: &StreamKey, saved: &Saved, now: Instant) -> bool {
        if let Some(stream) = self.streams.get(key)
            && stream.version == (saved.rev, saved.writer)
        {
            return false;
        }
        let stream = self.stream(key, now);
        stream.shift = saved.shift;
        stream.local = saved.local.iter().copied().collect();
        stream.redirected = saved
            .redirected
            .iter()
            .map(|(seq, stamp)| {
                (
                    *seq,
                    None,
                    std::sync::Arc::new(std::sync::Mutex::new(*stamp)),
                )
            })
            .collect();
        stream.version = (saved.rev, saved.writer);
        true
    }

    fn prune(&mut self, now: Instant) {
        self.calls += 1;
        if !self.calls.is_multiple_of(1024) {
            return;
        }
        self.streams
            .retain(|_, s| now.duration_since(s.last_used) < STREAM_IDLE);
        self.producers = self
            .streams
            .keys()
            .map(|k| (k.producer_id, k.epoch))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey {
            producer_id: 7,
            epoch: 0,
            topic: "orders".into(),
            partition: 0,
        }
    }

    #[test]
    fn local_batches_after_a_redirect_close_the_gap() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        // Batches: [0..2) local, [2..5) redirected, [5..6) local, [6..8) local.
        assert_eq!(book.local(&key(), 0, now), None, "no stream yet: untouched");
        assert!(matches!(
            book.redirect(&key(), 2, 3, now),
            Redirect::Send(_)
        ));
        assert!(book.knows(7, 0));
        assert_eq!(book.local(&key(), 5, now), Some(2));
        assert_eq!(book.local(&key(), 6, now), Some(3));
        // A retry of a local batch gets the same number.
        assert_eq!(book.local(&key(), 5, now), Some(2));
    }

    #[test]
    fn a_retried_redirect_reuses_its_outcome_and_is_counted_once() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        assert!(matches!(
            book.redirect(&key(), 0, 4, now),
            Redirect::Send(_)
        ));
        let (tx, rx) = watch::channel(None);
        book.attach(&key(), 0, rx, StampCell::default());
        // In flight: wait for the same outcome.
        assert!(matches!(
            book.redirect(&key(), 0, 4, now),
            Redirect::Existing(_)
        ));
        tx.send(Some(
            PartitionProduceResponse::default().with_base_offset(42),
        ))
        .unwrap();
        match book.redirect(&key(), 0, 4, now) {
            Redirect::Existing(o) => assert_eq!(o.borrow().as_ref().unwrap().base_offset, 42),
            Redirect::Send(_) => panic!("a written batch must not be sent twice"),
        }
        assert_eq!(book.local(&key(), 4, now), Some(0), "shift counted once");
    }

    #[test]
    fn a_failed_redirect_is_sent_again_without_shifting_twice() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        assert!(matches!(
            book.redirect(&key(), 0, 2, now),
            Redirect::Send(_)
        ));
        let (tx, rx) = watch::channel(None);
        book.attach(&key(), 0, rx, StampCell::default());
        tx.send(Some(PartitionProduceResponse::default().with_error_code(7)))
            .unwrap();
        assert!(matches!(
            book.redirect(&key(), 0, 2, now),
            Redirect::Send(_)
        ));
        assert_eq!(book.local(&key(), 2, now), Some(0));
    }

    #[test]
    fn a_split_batch_keeps_the_local_numbering_whole_and_its_retry_changes_nothing() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        // Batch [0..5): records 1 and 3 owned elsewhere; 3 stay local, numbered 0..3.
        assert_eq!(book.split(&key(), 0, 5, 3, now), 0);
        assert!(book.knows(7, 0));
        // Its redirected part (first record: client sequence 1).
        assert!(matches!(book.part(&key(), 1), Redirect::Send(_)));
        let (tx, rx) = watch::channel(None);
        book.attach(&key(), 1, rx, StampCell::default());
        // The next batch [5..7), wholly local, follows at 3.
        assert_eq!(book.local(&key(), 5, now), Some(3));
        // A retry of the split batch: the same local number, the part not sent again while in
        // flight or once written, and no second shift.
        assert_eq!(book.split(&key(), 0, 5, 3, now), 0);
        assert!(matches!(book.part(&key(), 1), Redirect::Existing(_)));
        tx.send(Some(PartitionProduceResponse::default())).unwrap();
        assert!(matches!(book.part(&key(), 1), Redirect::Existing(_)));
        // The next batch [7..11) is all elsewhere, split between owners: nothing stays, and it
        // starts where the local numbering is (5). A part that failed is sent again.
        let (tx, rx) = watch::channel(None);
        assert_eq!(book.split(&key(), 7, 4, 0, now), 5);
        book.attach(&key(), 7, rx, StampCell::default());
        tx.send(Some(PartitionProduceResponse::default().with_error_code(7)))
            .unwrap();
        assert!(matches!(book.part(&key(), 7), Redirect::Send(_)));
        assert_eq!(book.local(&key(), 11, now), Some(5), "all 4 went elsewhere");
    }

    #[test]
    fn a_redirect_whose_answer_can_never_come_is_sent_again() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        assert!(matches!(
            book.redirect(&key(), 0, 2, now),
            Redirect::Send(_)
        ));
        let (tx, rx) = watch::channel(None);
        book.attach(&key(), 0, rx, StampCell::default());
        assert!(matches!(
            book.redirect(&key(), 0, 2, now),
            Redirect::Existing(_)
        ));
        // Its job was dropped unsent (the request's handling ended with its connection).
        drop(tx);
        assert!(matches!(
            book.redirect(&key(), 0, 2, now),
            Redirect::Send(_)
        ));
        assert_eq!(book.local(&key(), 2, now), Some(0), "shifted once");
    }

    #[test]
    fn a_stream_saved_by_one_book_is_carried_on_by_another() {
        let now = Instant::now();
        let mut first = SequenceBook::default();
        // [0..2) local, [2..5) redirected (stamped 40 on the target), [5..6) local.
        first.local(&key(), 0, now);
        let Redirect::Send(stamp) = first.redirect(&key(), 2, 3, now) else {
            panic!("a new batch is sent");
        };
        *stamp.lock().unwrap() = Some(Stamp {
            producer_id: 90,
            epoch: 0,
            seq: 40,
        });
        let (_tx, rx) = watch::channel(None);
        first.attach(&key(), 2, rx, stamp);
        assert_eq!(first.local(&key(), 5, now), Some(2));
        let saved = first.save(&key(), 1).unwrap();
        assert_eq!(saved.rev, 1);

        // Another instance (or this one after a restart) takes the stream over.
        let mut second = SequenceBook::default();
        assert!(second.adopt(&key(), &saved, now));
        assert!(second.knows(7, 0));
        // The client's retries get what the first book gave: the same local number, and the
        // redirected batch sent again under its stamp (not waited on: its outcome is unknown).
        assert_eq!(second.local(&key(), 5, now), Some(2));
        match second.redirect(&key(), 2, 3, now) {
            Redirect::Send(stamp) => assert_eq!(stamp.lock().unwrap().unwrap().seq, 40),
            Redirect::Existing(_) => panic!("an adopted batch's outcome is unknown"),
        }
        // New batches follow on, shifted by what went elsewhere once.
        assert_eq!(second.local(&key(), 6, now), Some(3));
        // Its own save is the next revision; the journal's copy of it is not taken again.
        let mine = second.save(&key(), 2).unwrap();
        assert_eq!((mine.rev, mine.writer), (2, 2));
        assert!(!second.adopt(&key(), &mine, now));
        // The first book, handed the stream back, takes the newer state.
        assert!(first.adopt(&key(), &mine, now));
        assert_eq!(first.local(&key(), 6, now), Some(3));
    }

    #[test]
    fn other_epochs_and_partitions_are_other_streams() {
        let mut book = SequenceBook::default();
        let now = Instant::now();
        book.redirect(&key(), 0, 3, now);
        let bumped = StreamKey { epoch: 1, ..key() };
        assert_eq!(book.local(&bumped, 3, now), None);
        let other = StreamKey {
            partition: 1,
            ..key()
        };
        assert_eq!(book.local(&other, 3, now), None);
    }
}
