//! How far MirrorMaker 2 is behind, as pure functions: which topics of a cluster the table's
//! rules cover, what MM2 names their copies in another region, the lag of one partition, the
//! timestamp of the oldest record not yet copied, and the report `GET /replication` answers.
//! No sockets or clocks: `proxy/replication.rs` asks the clusters and passes the time in.
//!
//! The measure is the end-offset method: MM2 copies a partition record by record, so while it
//! copies every record 1:1 (from offset 0, no filter, no compaction gap, no transaction
//! markers) the mirror's end offset is the source offset it has copied up to, and
//! `lag = source end - mirror end`. Where that does not hold the figure is off; see
//! `lag_records`.

use std::ops::ControlFlow;

use serde::Serialize;

use crate::codec::compression::Inflater;
use crate::codec::records;
use crate::ownership::Table;

/// MM2's `DefaultReplicationPolicy`: topic `T` of region `eu` is `eu<separator>T` in every
/// other region (`replication.policy.separator`, "." by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub separator: String,
}

impl Naming {
    /// The name MM2 gives `topic` of region `source` in the other regions.
    pub fn mirror(&self, source: &str, topic: &str) -> String {
        format!("{source}{}{topic}", self.separator)
    }

    /// Whether `topic` is itself a copy MM2 made of another region's topic (it starts with a
    /// region's name and the separator): such a topic is not replicated again (MM2 refuses the
    /// cycle), so it has no mirror to measure.
    pub fn is_mirror<S: AsRef<str>>(&self, topic: &str, regions: &[S]) -> bool {
        regions.iter().any(|r| {
            topic
                .strip_prefix(r.as_ref())
                .is_some_and(|rest| rest.starts_with(self.separator.as_str()))
        })
    }
}

/// Topics MM2 treats as internal and never replicates (its `DefaultReplicationPolicy`'s
/// `isInternalTopic`): Kafka's own `__` topics, and MM2's `.internal` / `-internal` ones.
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with("__")
        || topic.starts_with('.')
        || topic.ends_with(".internal")
        || topic.ends_with("-internal")
}

/// The topics of `topics` (one cluster's) whose replication keyward measures: those a rule of
/// `table` covers (exact names and globs, as for writes: [`Table::rule_for_topic`]), except
/// copies of other regions' topics and internal topics. Sorted, each once.
pub fn covered_topics<'a, S: AsRef<str>>(
    table: &Table,
    naming: &Naming,
    regions: &[S],
    topics: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut covered: Vec<String> = topics
        .into_iter()
        .filter(|t| !is_internal(t) && !naming.is_mirror(t, regions))
        .filter(|t| table.rule_for_topic(t).is_some())
        .map(str::to_owned)
        .collect();
    covered.sort();
    covered.dedup();
    covered
}

/// Records of the source partition not yet in its mirror: `source_end - mirror_end`, 0 when
/// the mirror is level or ahead.
///
/// Exact only while MM2 copies every record 1:1. The mirror gets behind the source's offsets,
/// and this figure overstates the lag by as much, for every offset MM2 does not copy: records
/// deleted by retention before MM2 read them, gaps left by compaction, transaction markers,
/// records a filter or SMT drops. The mirror gets ahead, and this figure understates the lag by
/// as much, when MM2 writes a record twice (it copies at least once: a task that dies before
/// committing its position copies again) or something else writes the mirror topic. A mirror
/// ahead of its source is reported as lag 0 with both end offsets visible.
pub fn lag_records(source_end: i64, mirror_end: i64) -> i64 {
    source_end.saturating_sub(mirror_end).max(0)
}

/// Seconds the oldest source record not yet mirrored has waited: `now - its timestamp`, 0
/// when nothing waits, never negative (a producer's clock ahead of keyward's). `None` when
/// records wait but their timestamp is unknown.
pub fn lag_seconds(
    lag_records: i64,
    oldest_unmirrored_ms: Option<i64>,
    now_ms: i64,
) -> Option<f64> {
    if lag_records == 0 {
        return Some(0.0);
    }
    let ts = oldest_unmirrored_ms?;
    Some((now_ms.saturating_sub(ts)).max(0) as f64 / 1000.0)
}

/// Attribute bit of a v2 batch whose timestamps are the broker's (`LogAppendTime`): every
/// record's timestamp is the batch's max timestamp.
const LOG_APPEND_TIME: i16 = 0x08;

/// The timestamp (ms) of the record at `offset` in `data`, a Fetch response's record batches,
/// or of the first record after it (an offset compaction removed). `None` when `data` holds no
/// such record (or cannot be read).
pub fn timestamp_at(data: &[u8], offset: i64, inflater: &mut Inflater) -> Option<i64> {
    for batch in records::batches(data) {
        let batch = batch.ok()?;
        let h = batch.header;
        let last = h.base_offset.saturating_add(i64::from(h.last_offset_delta));
        if last < offset || h.is_control() {
            continue;
        }
        if h.attributes & LOG_APPEND_TIME != 0 {
            return Some(h.max_timestamp);
        }
        if h.base_offset >= offset {
            return Some(h.base_timestamp);
        }
        let mut found = None;
        batch
            .for_each_record(inflater, |_, r| {
                if h.base_offset + i64::from(r.offset_delta()) >= offset {
                    found = Some(h.base_timestamp.saturating_add(r.timestamp_delta()));
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .ok()?;
        if found.is_some() {
            return found;
        }
    }
    None
}

/// What `GET /replication` answers: the last measurement of every ordered region pair.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When the last round started (RFC 3339), or null before the first.
    pub measured_at: Option<String>,
    pub interval_ms: u64,
    pub separator: String,
    /// True when every pair, topic and partition was measured in the last round with no record
    /// waiting: what a move can wait for.
    pub caught_up: bool,
    pub pairs: Vec<PairReport>,
}

/// One direction of replication: `source`'s topics copied to `target`.
#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    pub source: String,
    pub target: String,
    /// Why the pair could not be measured at all (a cluster did not answer), or null.
    pub error: Option<String>,
    /// True when the pair and every topic were measured with no record waiting: what a move
    /// of ownership from `source` to `target` waits for.
    pub caught_up: bool,
    pub topics: Vec<TopicReport>,
    /// For a pair that could not be measured (`error` set): its last measurement with both
    /// clusters answering, or null if there was none. When a region goes away, this is the
    /// lag it left behind: what a failover may lose. Never counted as caught up.
    pub last_measured: Option<LastMeasured>,
}

/// A pair's last measurement, kept for when its clusters stop answering.
#[derive(Debug, Clone, Serialize)]
pub struct LastMeasured {
    /// When that round started (RFC 3339).
    pub measured_at: String,
    pub topics: Vec<TopicReport>,
}

/// The last measurement of every pair, carried from round to round: a measured pair replaces
/// its entry; a pair that could not be measured gets the entry as its `last_measured`.
#[derive(Debug, Default)]
pub struct LastMeasurements {
    pairs: std::collections::HashMap<(String, String), LastMeasured>,
}

impl LastMeasurements {
    /// `report`, measured in the round that started at `measured_at`, remembered when it was
    /// measured and completed with the last measurement when it was not.
    pub fn carry(&mut self, mut report: PairReport, measured_at: &str) -> PairReport {
        let key = (report.source.clone(), report.target.clone());
        if report.error.is_none() {
            self.pairs.insert(
                key,
                LastMeasured {
                    measured_at: measured_at.to_owned(),
                    topics: report.topics.clone(),
                },
            );
        } else {
            report.last_measured = self.pairs.get(&key).cloned();
        }
        report
    }
}

impl PairReport {
    pub fn new(source: String, target: String, topics: Vec<TopicReport>) -> Self {
        let caught_up = topics.iter().all(TopicReport::is_caught_up);
        Self {
            source,
            target,
            error: None,
            caught_up,
            topics,
            last_measured: None,
        }
    }

    /// A pair that could not be measured at all.
    pub fn failed(source: String, target: String, error: String) -> Self {
        Self {
            source,
            target,
            error: Some(error),
            caught_up: false,
            topics: Vec::new(),
            last_measured: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicReport {
    pub topic: String,
    /// The copy's name in the target region.
    pub mirror: String,
    /// Sum over partitions measured.
    pub lag_records: i64,
    /// Max over partitions measured; null when unknown.
    pub lag_seconds: Option<f64>,
    /// Why the topic (or some partition) could not be measured: e.g. the mirror does not
    /// exist in the target region. Never reported as lag 0.
    pub error: Option<String>,
    pub partitions: Vec<PartitionReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub source_end: Option<i64>,
    pub mirror_end: Option<i64>,
    pub lag_records: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub error: Option<String>,
}

impl TopicReport {
    /// A topic with its partitions measured: its totals and first error follow from them.
    pub fn new(topic: String, mirror: String, partitions: Vec<PartitionReport>) -> Self {
        let lag_records = partitions.iter().filter_map(|p| p.lag_records).sum();
        let lag_seconds = partitions
            .iter()
            .map(|p| p.lag_seconds)
            .try_fold(0.0_f64, |max, s| s.map(|s| max.max(s)));
        let error = partitions
            .iter()
            .find_map(|p| Some(format!("partition {}: {}", p.partition, p.error.as_ref()?)));
        Self {
            topic,
            mirror,
            lag_records,
            lag_seconds,
            error,
            partitions,
        }
    }

    /// A topic that could not be measured at all.
    pub fn failed(topic: String, mirror: String, error: String) -> Self {
        Self {
            topic,
            mirror,
            lag_records: 0,
            lag_seconds: None,
            error: Some(error),
            partitions: Vec::new(),
        }
    }

    pub fn is_caught_up(&self) -> bool {
        self.error.is_none() && self.lag_records == 0
    }
}

impl PartitionReport {
    /// A partition whose two end offsets are known; `oldest_unmirrored_ms` is the timestamp of
    /// the source record at the mirror's end offset, if it was read.
    pub fn measured(
        partition: i32,
        source_end: i64,
        mirror_end: i64,
        oldest_unmirrored_ms: Option<i64>,
        now_ms: i64,
    ) -> Self {
        let lag = lag_records(source_end, mirror_end);
        let seconds = lag_seconds(lag, oldest_unmirrored_ms, now_ms);
        let error = seconds.is_none().then(|| {
            format!("the source record at offset {mirror_end} could not be read for its timestamp")
        });
        Self {
            partition,
            source_end: Some(source_end),
            mirror_end: Some(mirror_end),
            lag_records: Some(lag),
            lag_seconds: seconds,
            error,
        }
    }

    pub fn failed(
        partition: i32,
        source_end: Option<i64>,
        mirror_end: Option<i64>,
        error: String,
    ) -> Self {
        Self {
            partition,
            source_end,
            mirror_end,
            lag_records: None,
            lag_seconds: None,
            error: Some(error),
        }
    }
}

impl Report {
    pub fn new(
        measured_at: Option<String>,
        interval_ms: u64,
        separator: String,
        pairs: Vec<PairReport>,
    ) -> Self {
        let caught_up = measured_at.is_some() && pairs.iter().all(|p| p.caught_up);
        Self {
            measured_at,
            interval_ms,
            separator,
            caught_up,
            pairs,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn table() -> Table {
        Table::parse(
            r#"
rules:
  - name: orders
    topics: ["orders", "orders.*"]
    by: key
    slots: 4
    owners: { eu: ["0-1"], us: ["2-3"] }
  - name: audit
    topics: ["audit-?"]
    by: topic
    owner: eu
  - name: everything-internal
    topics: ["__*", "*.internal"]
    owner: any
default: allow
"#,
            Path::new("ownership.yaml"),
            &["eu".to_owned(), "us".to_owned()],
        )
        .unwrap()
    }

    const DOT: fn() -> Naming = || Naming {
        separator: ".".into(),
    };

    #[test]
    fn mirrors_are_named_as_mm2s_default_policy_names_them() {
        assert_eq!(DOT().mirror("eu", "orders"), "eu.orders");
        let dash = Naming {
            separator: "__".into(),
        };
        assert_eq!(dash.mirror("us", "orders.x"), "us__orders.x");
        let regions = ["eu", "us"];
        assert!(DOT().is_mirror("eu.orders", &regions));
        assert!(DOT().is_mirror("us.orders.x", &regions));
        assert!(!DOT().is_mirror("europe.orders", &regions));
        assert!(!DOT().is_mirror("orders", &regions));
        assert!(!dash.is_mirror("eu.orders", &regions));
        assert!(dash.is_mirror("eu__orders", &regions));
    }

    #[test]
    fn covered_topics_are_the_rules_topics_without_copies_or_internals() {
        let regions = ["eu", "us"];
        let topics = [
            "orders",
            "orders.eu-shop",
            "audit-1",
            "audit-12",
            "payments",
            "eu.orders",
            "us.orders.x",
            "__consumer_offsets",
            "mm2-offset-syncs.us.internal",
            "orders",
        ];
        assert_eq!(
            covered_topics(&table(), &DOT(), &regions, topics),
            vec!["audit-1", "orders", "orders.eu-shop"]
        );
    }

    #[test]
    fn a_pair_that_stops_answering_keeps_its_last_measurement() {
        let mut last = LastMeasurements::default();
        let lagging = TopicReport::new(
            "orders".into(),
            "us.orders".into(),
            vec![PartitionReport::measured(0, 12, 9, Some(1_000), 2_000)],
        );
        let down =
            || PairReport::failed("us".into(), "eu".into(), "cannot read us's topics".into());
        // Never measured: nothing to carry.
        assert!(last.carry(down(), "t0").last_measured.is_none());
        let measured = last.carry(
            PairReport::new("us".into(), "eu".into(), vec![lagging]),
            "t1",
        );
        assert!(
            measured.last_measured.is_none(),
            "a measured pair is its own measurement"
        );
        let other = last.carry(PairReport::new("eu".into(), "us".into(), vec![]), "t1");
        assert!(other.error.is_none());
        let gone = last.carry(down(), "t2");
        let kept = gone.last_measured.as_ref().expect("the last measurement");
        assert_eq!(kept.measured_at, "t1");
        assert_eq!(kept.topics[0].partitions[0].lag_records, Some(3));
        assert!(
            !gone.caught_up && gone.topics.is_empty(),
            "still not measured now"
        );
        // Still down a round later: the same last measurement, not the failed round's.
        assert_eq!(
            last.carry(down(), "t3").last_measured.unwrap().measured_at,
            "t1"
        );
        // Measured again: that is the new last one.
        last.carry(PairReport::new("us".into(), "eu".into(), vec![]), "t4");
        assert_eq!(
            last.carry(down(), "t5").last_measured.unwrap().measured_at,
            "t4"
        );
    }

    #[test]
    fn lag_is_what_the_mirror_lacks_and_never_negative() {
        assert_eq!(lag_records(10, 10), 0);
        assert_eq!(lag_records(15, 10), 5);
        assert_eq!(
            lag_records(10, 12),
            0,
            "a mirror ahead (MM2 wrote twice) is not negative lag"
        );
        assert_eq!(lag_seconds(0, None, 5_000), Some(0.0));
        assert_eq!(lag_seconds(3, Some(1_500), 5_000), Some(3.5));
        assert_eq!(lag_seconds(3, Some(9_000), 5_000), Some(0.0), "clock skew");
        assert_eq!(lag_seconds(3, None, 5_000), None);
    }

    #[test]
    fn a_topic_sums_records_takes_the_worst_seconds_and_keeps_errors() {
        let t = TopicReport::new(
            "orders".into(),
            "eu.orders".into(),
            vec![
                PartitionReport::measured(0, 10, 10, None, 9_000),
                PartitionReport::measured(1, 20, 17, Some(4_000), 9_000),
                PartitionReport::measured(2, 5, 4, Some(7_000), 9_000),
            ],
        );
        assert_eq!(
            (t.lag_records, t.lag_seconds, t.error.as_deref()),
            (4, Some(5.0), None)
        );
        assert!(!t.is_caught_up());
        let missing =
            PartitionReport::failed(3, Some(8), None, "the mirror has no partition 3".into());
        let t = TopicReport::new("orders".into(), "eu.orders".into(), vec![missing]);
        assert_eq!(t.lag_seconds, None);
        assert_eq!(
            t.error.as_deref(),
            Some("partition 3: the mirror has no partition 3")
        );
        assert!(!t.is_caught_up(), "unmeasured is not caught up");

        let level = TopicReport::new(
            "orders".into(),
            "eu.orders".into(),
            vec![PartitionReport::measured(0, 10, 10, None, 1)],
        );
        let pair = |topics| PairReport::new("eu".into(), "us".into(), topics);
        assert!(pair(vec![level.clone()]).caught_up);
        assert!(pair(vec![]).caught_up, "nothing to copy");
        let down = PairReport::failed("eu".into(), "us".into(), "cannot read us's topics".into());
        assert!(!down.caught_up, "unmeasured is not caught up");
        assert!(!Report::new(Some("t".into()), 1, ".".into(), vec![down]).caught_up);
        assert!(
            Report::new(
                Some("t".into()),
                1,
                ".".into(),
                vec![pair(vec![level.clone()])]
            )
            .caught_up
        );
        assert!(
            !Report::new(None, 1, ".".into(), vec![]).caught_up,
            "never measured"
        );
        let gone = TopicReport::failed("x".into(), "eu.x".into(), "mirror missing".into());
        assert!(
            !Report::new(
                Some("t".into()),
                1,
                ".".into(),
                vec![pair(vec![level, gone])]
            )
            .caught_up
        );
    }

    /// A v2 batch of `n` uncompressed records at `base`, record i at `ts + 10 * i`.
    fn batch(base: i64, n: i32, ts: i64, attributes: i16) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..n {
            let mut r = vec![0u8]; // attributes
            put_varint(&mut r, 10 * i64::from(i)); // timestamp delta
            put_varint(&mut r, i64::from(i)); // offset delta
            put_varint(&mut r, -1); // key
            put_varint(&mut r, -1); // value
            put_varint(&mut r, 0); // headers
            put_varint(&mut records, r.len() as i64);
            records.extend(r);
        }
        let mut b = Vec::new();
        b.extend(base.to_be_bytes());
        b.extend(((49 + records.len()) as i32).to_be_bytes());
        b.extend(0i32.to_be_bytes()); // leader epoch
        b.push(2); // magic
        b.extend(0u32.to_be_bytes()); // crc (not checked here)
        b.extend(attributes.to_be_bytes());
        b.extend((n - 1).to_be_bytes());
        b.extend(ts.to_be_bytes());
        b.extend((ts + 10 * i64::from(n - 1) + 7).to_be_bytes()); // max timestamp
        b.extend((-1i64).to_be_bytes());
        b.extend((-1i16).to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.extend(n.to_be_bytes());
        b.extend(records);
        b
    }

    fn put_varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            if z < 0x80 {
                out.push(z as u8);
                return;
            }
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
    }

    #[test]
    fn the_timestamp_is_the_record_at_the_offset_asked_for() {
        let mut data = batch(100, 5, 1_000, 0);
        data.extend(batch(105, 3, 2_000, 0));
        let mut inflater = Inflater::new(1 << 20);
        assert_eq!(timestamp_at(&data, 100, &mut inflater), Some(1_000));
        assert_eq!(timestamp_at(&data, 103, &mut inflater), Some(1_030));
        assert_eq!(timestamp_at(&data, 105, &mut inflater), Some(2_000));
        assert_eq!(timestamp_at(&data, 107, &mut inflater), Some(2_020));
        assert_eq!(
            timestamp_at(&data, 90, &mut inflater),
            Some(1_000),
            "compacted away: the next"
        );
        assert_eq!(timestamp_at(&data, 108, &mut inflater), None);
        assert_eq!(
            timestamp_at(&data[..20], 100, &mut inflater),
            None,
            "truncated"
        );
        let broker_time = batch(100, 5, 1_000, LOG_APPEND_TIME);
        assert_eq!(timestamp_at(&broker_time, 102, &mut inflater), Some(1_047));
    }
}
