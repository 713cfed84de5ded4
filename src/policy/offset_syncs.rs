//! Translating a consumer group's position on a copy back to the topic it copies, through
//! MirrorMaker 2's offset syncs: what keyward does at failback (`proxy/failback.rs`).
//!
//! While region R's reads were served by region C's cluster, R's consumer groups committed
//! positions on C's copies of R's topics (`R.orders` in C). MM2 never copies a copy back, so
//! nothing carries those positions home. But MM2 records, as it copies, which offset of the
//! source became which offset of the copy: an *offset sync* (`upstream -> downstream`), in the
//! topic `mm2-offset-syncs.<C>.internal` of R's own cluster (MM2's default
//! `offset-syncs.topic.location: source`), keyed by R's topic and partition.
//!
//! A position `D` on the copy means the group consumed every copied record below `D`. Take the
//! last sync at or below it, `(u, d)` with `d <= D`: the record at `d` is source record `u`, and
//! every record the group had not consumed (`>= D`) came from the source at or after `u`, or
//! after `u` when `d < D`. So `u` (or `u + 1`) skips nothing; it reads again at most the
//! `D - d - 1` records between the sync and the position, which MM2's `offset.lag.max` bounds.
//! This is MM2's own rule for the other direction (`OffsetSyncStore::translateDownstream`),
//! turned around. With no sync at or below `D`, there is no translation: the group keeps its
//! commit in R, and reads again what it read on the copy.
//!
//! The same syncs serve the other way too ([`OffsetSyncs::translate_downstream`]): a group that
//! read C's own topic `orders` during the failover (R's `C.orders`, in the view) comes back to
//! R's copy `C.orders`. MM2 carries such a position itself only while the group has no member
//! in R (`sync.group.offsets.enabled`); keyward carries it from the syncs of C's topics into R
//! (`mm2-offset-syncs.<R>.internal`, in C's cluster), by MM2's own rule: the last sync at or
//! below the position on the source, `(u, d)` with `u <= U`, gives `d`, or `d + 1` when
//! `u < U`.
//!
//! Pure: parsing the records, keeping the syncs, and the translation.

use std::collections::HashMap;

/// The syncs kept per partition. When a partition has more, the older half is thinned to
/// every other sync: recent positions (the groups that kept up) translate exactly, older ones
/// to an earlier sync, reading more again but never skipping.
pub const KEPT_PER_PARTITION: usize = 512;

/// One offset sync: the source's record `upstream` is the copy's record `downstream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    pub upstream: i64,
    pub downstream: i64,
}

/// A sync record's key and value as MM2 writes them (`OffsetSync`: a Kafka `Struct` of topic
/// (INT16 length and UTF-8) and partition (INT32); then upstream and downstream offsets, INT64,
/// big-endian). `None` for anything else.
pub fn parse(key: &[u8], value: &[u8]) -> Option<(String, i32, Sync)> {
    let (len, rest) = key.split_first_chunk::<2>()?;
    let len = usize::try_from(i16::from_be_bytes(*len)).ok()?;
    let topic = std::str::from_utf8(rest.get(..len)?).ok()?;
    let partition = i32::from_be_bytes(rest.get(len..)?.try_into().ok()?);
    let value: &[u8; 16] = value.try_into().ok()?;
    let (upstream, downstream) = value.split_at(8);
    let sync = Sync {
        upstream: i64::from_be_bytes(upstream.try_into().ok()?),
        downstream: i64::from_be_bytes(downstream.try_into().ok()?),
    };
    (sync.upstream >= 0 && sync.downstream >= 0).then(|| (topic.to_owned(), partition, sync))
}

/// A position on a copy, translated to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    /// The position on the source: nothing at or after it was consumed on the copy.
    pub offset: i64,
    /// How many records the group may read again from there: those between the sync used and
    /// its position on the copy.
    pub reread_at_most: i64,
}

/// The offset syncs of one flow (one source region into one copy), by the source's topic and
/// partition, each partition's sorted by downstream offset.
#[derive(Debug, Default, Clone)]
pub struct OffsetSyncs {
    partitions: HashMap<(String, i32), Vec<Sync>>,
}

impl OffsetSyncs {
    /// Keeps a sync, read in the order MM2 wrote it. A later sync for a downstream offset
    /// already held replaces it (MM2 copying again after a restart).
    pub fn add(&mut self, topic: String, partition: i32, sync: Sync) {
        let syncs = self.partitions.entry((topic, partition)).or_default();
        match syncs.binary_search_by_key(&sync.downstream, |s| s.downstream) {
            Ok(at) => syncs[at] = sync,
            Err(at) => syncs.insert(at, sync),
        }
        if syncs.len() > KEPT_PER_PARTITION {
            let newer = syncs.len() - KEPT_PER_PARTITION / 2;
            let mut index = 0;
            syncs.retain(|_| {
                index += 1;
                index > newer || index % 2 == 1
            });
        }
    }

    /// How many syncs are held, over every partition.
    pub fn len(&self) -> usize {
        self.partitions.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// The position on the copy of a group at `position` on the source `topic`'s `partition`
    /// (MM2's `translateDownstream`), or `None` when no sync is at or below it. Reads again at
    /// most the copies of the source records between the sync and the position.
    pub fn translate_downstream(
        &self,
        topic: &str,
        partition: i32,
        position: i64,
    ) -> Option<Translated> {
        let syncs = self.partitions.get(&(topic.to_owned(), partition))?;
        // Sorted by downstream offset; after an MM2 restart upstream offsets may repeat out of
        // order, so the latest sync at or below the position is searched for, not bisected.
        let sync = syncs
            .iter()
            .filter(|s| s.upstream <= position)
            .max_by_key(|s| (s.upstream, s.downstream))?;
        let past = i64::from(position > sync.upstream);
        Some(Translated {
            offset: sync.downstream + past,
            reread_at_most: (position - sync.upstream - past).max(0),
        })
    }

    /// The source position of a group at `position` on the copy of `topic`'s `partition`, or
    /// `None` when no sync is at or below it.
    pub fn translate(&self, topic: &str, partition: i32, position: i64) -> Option<Translated> {
        let syncs = self.partitions.get(&(topic.to_owned(), partition))?;
        let below = syncs.partition_point(|s| s.downstream <= position);
        let sync = syncs.get(below.checked_sub(1)?)?;
        let past = i64::from(position > sync.downstream);
        Some(Translated {
            offset: sync.upstream + past,
            reread_at_most: (position - sync.downstream - past).max(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sync(upstream: i64, downstream: i64) -> Sync {
        Sync {
            upstream,
            downstream,
        }
    }

    fn record(topic: &str, partition: i32, s: Sync) -> (Vec<u8>, Vec<u8>) {
        let mut key = (topic.len() as i16).to_be_bytes().to_vec();
        key.extend_from_slice(topic.as_bytes());
        key.extend_from_slice(&partition.to_be_bytes());
        let mut value = s.upstream.to_be_bytes().to_vec();
        value.extend_from_slice(&s.downstream.to_be_bytes());
        (key, value)
    }

    #[test]
    fn sync_records_read_as_mirrormaker_writes_them() {
        let (key, value) = record("orders", 3, sync(120, 97));
        assert_eq!(
            parse(&key, &value),
            Some(("orders".to_owned(), 3, sync(120, 97)))
        );
        // Anything else is no sync: short, long, a negative length, a negative offset.
        assert_eq!(parse(&key[..key.len() - 1], &value), None);
        assert_eq!(parse(&key, &value[..15]), None);
        assert_eq!(parse(&[&key[..], &[0]].concat(), &value), None);
        assert_eq!(parse(&[0xff, 0xff], &value), None);
        let (_, negative) = record("orders", 3, sync(-1, 97));
        assert_eq!(parse(&key, &negative), None);
    }

    #[test]
    fn a_position_on_a_sync_is_exact_and_one_past_it_is_the_next_record() {
        let mut syncs = OffsetSyncs::default();
        // The copy starts 100 records after the source (MM2 began late) and skips one record
        // of the source (a transaction marker) after source offset 104.
        for (u, d) in [(100, 0), (101, 1), (102, 2), (103, 3), (104, 4), (106, 5)] {
            syncs.add("orders".into(), 0, sync(u, d));
        }
        let at = |p| {
            syncs
                .translate("orders", 0, p)
                .map(|t| (t.offset, t.reread_at_most))
        };
        assert_eq!(at(0), Some((100, 0)));
        assert_eq!(at(3), Some((103, 0)));
        assert_eq!(at(5), Some((106, 0)));
        // Past the last sync: the record after it, whatever the copy holds beyond.
        assert_eq!(at(6), Some((107, 0)));
        assert_eq!(at(9), Some((107, 3)));
        // Other partitions and topics have no syncs.
        assert_eq!(syncs.translate("orders", 1, 3), None);
        assert_eq!(syncs.translate("payments", 0, 3), None);
    }

    #[test]
    fn a_position_before_the_first_sync_has_no_translation() {
        let mut syncs = OffsetSyncs::default();
        syncs.add("orders".into(), 0, sync(50, 10));
        assert_eq!(syncs.translate("orders", 0, 9), None);
        assert_eq!(syncs.translate("orders", 0, 10).unwrap().offset, 50);
    }

    #[test]
    fn a_copy_made_again_after_a_restart_replaces_the_sync_it_repeats() {
        let mut syncs = OffsetSyncs::default();
        syncs.add("orders".into(), 0, sync(10, 10));
        syncs.add("orders".into(), 0, sync(8, 10));
        assert_eq!(syncs.translate("orders", 0, 10).unwrap().offset, 8);
        assert_eq!(syncs.len(), 1);
    }

    #[test]
    fn many_syncs_are_thinned_from_the_oldest_and_the_newest_stay_exact() {
        let mut syncs = OffsetSyncs::default();
        for i in 0..10_000 {
            syncs.add("orders".into(), 0, sync(i, i));
        }
        assert!(syncs.len() <= KEPT_PER_PARTITION);
        for p in 10_000 - KEPT_PER_PARTITION as i64 / 4..10_000 {
            assert_eq!(syncs.translate("orders", 0, p).unwrap().reread_at_most, 0);
        }
        // The oldest translate still, to an earlier sync.
        assert!(syncs.translate("orders", 0, 1).is_some());
    }

    #[test]
    fn a_position_on_the_source_translates_to_the_copy_as_mirror_maker_translates_it() {
        let mut syncs = OffsetSyncs::default();
        for (u, d) in [(100, 0), (101, 1), (102, 2), (103, 3), (104, 4), (106, 5)] {
            syncs.add("orders".into(), 0, sync(u, d));
        }
        let at = |p| {
            syncs
                .translate_downstream("orders", 0, p)
                .map(|t| (t.offset, t.reread_at_most))
        };
        assert_eq!(at(99), None, "before the first sync");
        assert_eq!(at(100), Some((0, 0)));
        assert_eq!(at(104), Some((4, 0)));
        // 105 was never copied (a marker): the record after sync (104, 4).
        assert_eq!(at(105), Some((5, 0)));
        assert_eq!(at(106), Some((5, 0)));
        assert_eq!(at(110), Some((6, 3)));
    }

    proptest! {
        /// From the source to the copy likewise: never past the first record the group had not
        /// consumed, and no more read again than it says.
        #[test]
        fn a_translation_downstream_never_skips(
            gaps in proptest::collection::vec(1i64..4, 1..2_000),
            every in 1usize..50,
            position in 0i64..5_000,
        ) {
            let mut sources = Vec::new();
            let mut u = 0;
            for gap in &gaps {
                u += gap;
                sources.push(u);
            }
            let mut syncs = OffsetSyncs::default();
            for (d, u) in sources.iter().enumerate().step_by(every) {
                syncs.add("t".into(), 0, sync(*u, d as i64));
            }
            if let Some(t) = syncs.translate_downstream("t", 0, position) {
                // The first copied record the group had not consumed on the source.
                let first_unread = sources.partition_point(|u| *u < position) as i64;
                prop_assert!(t.offset <= first_unread, "{t:?} past {first_unread}");
                prop_assert!(first_unread - t.offset <= t.reread_at_most);
            }
        }

        /// Whatever syncs were kept, a translated position never skips a record the group had
        /// not consumed on the copy, and rereads no more than it says.
        #[test]
        fn a_translation_never_skips(
            gaps in proptest::collection::vec((1i64..4, 1i64..3), 1..2_000),
            every in 1usize..50,
            position in 0i64..5_000,
        ) {
            // A copy of a source with gaps (compaction, transaction markers): record i of the
            // copy is source record `sources[i]`.
            let mut sources = Vec::new();
            let mut u = 0;
            for (gap, _) in &gaps {
                u += gap;
                sources.push(u);
            }
            let mut syncs = OffsetSyncs::default();
            for (d, u) in sources.iter().enumerate().step_by(every) {
                syncs.add("t".into(), 0, sync(*u, d as i64));
            }
            if let Some(t) = syncs.translate("t", 0, position) {
                // The first record not consumed on the copy must not be before the translation.
                if let Some(first_unread) = sources.get(position as usize) {
                    prop_assert!(t.offset <= *first_unread);
                }
                // What is read again: consumed records at or after the translated offset.
                let consumed = &sources[..(position as usize).min(sources.len())];
                let reread = consumed.iter().filter(|u| **u >= t.offset).count() as i64;
                prop_assert!(reread <= t.reread_at_most);
            }
        }
    }
}
