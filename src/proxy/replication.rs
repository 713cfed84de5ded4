//! Measures how far MirrorMaker 2 is behind, every `replication.interval_ms`, when the config
//! has a `replication` section: for every ordered pair of regions (source, target) and every
//! topic of the source that a rule of the table in force covers, the end offset of each
//! partition against that of its copy in the target (`eu.orders`), and the age of the oldest
//! record not yet copied. What a topic is, what its copy is called and what the lag is are
//! `crate::policy::replication`'s; this module only asks the clusters, on keyward's own
//! connections ([`Dialer::session`]: keyward's credentials and TLS, never a client's).
//!
//! Per round and cluster: one Metadata request (every topic), one ListOffsets request (latest,
//! read_uncommitted: the high watermark, what MM2 can read and has written) per partition
//! leader, and for partitions that lag one Fetch per leader of the offset the copy ends at, for
//! that record's timestamp. Sessions are kept from round to round, one per broker.
//!
//! The last round is kept for `GET /replication` and exported as `keyward_replication_*`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use super::upstream::Session;
use crate::codec::compression::Inflater;
use crate::config::Replication as Config;
use crate::policy::replication::{
    self as policy, LastMeasurements, Naming, PairReport, PartitionReport, Report, TopicReport,
};

const CLIENT_ID: &str = "keyward-replication";
const METADATA_VERSION: i16 = 12;
const LIST_OFFSETS_VERSION: i16 = 7;
/// The last version that names topics (v13 names them by id).
const FETCH_VERSION: i16 = 12;
/// `ListOffsets` timestamp -1: the latest offset (the high watermark under read_uncommitted).
const LATEST: i64 = -1;
/// One record's batch is all a timestamp needs; a broker sends at least one whole batch of
/// the first partition even when it is larger (KIP-74), and the default `max.message.bytes`
/// is 1 MiB.
const FETCH_PARTITION_BYTES: i32 = 1024 * 1024;
const FETCH_MAX_BYTES: i32 = 16 * 1024 * 1024;

/// The last measurement, for `GET /replication`.
#[derive(Default)]
pub struct Lag {
    report: Mutex<Option<Arc<Report>>>,
}

impl Lag {
    /// The last report, or one with no pairs before the first round; `None` when replication
    /// is not measured (no `replication` in the config).
    pub fn report(&self, config: Option<&Config>) -> Option<Arc<Report>> {
        let config = config?;
        let last = self
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(last.unwrap_or_else(|| {
            Arc::new(Report::new(
                None,
                config.interval_ms,
                config.separator.clone(),
                Vec::new(),
            ))
        }))
    }

    fn store(&self, report: Report) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(report));
    }
}

/// Measures every `interval_ms` until shutdown; returns at once when replication is not
/// measured.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(config) = shared.config.replication.clone() else {
        return;
    };
    let names: Vec<String> = shared
        .clusters
        .all()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for (s, t) in pairs(&names) {
        let labels = [("source", names[s].clone()), ("target", names[t].clone())];
        counter!("keyward_replication_check_errors_total", &labels).absolute(0);
        gauge!("keyward_replication_last_check_timestamp_seconds", &labels).set(0.0);
    }
    let mut measurer = Measurer {
        shared: &shared,
        naming: Naming {
            separator: config.separator.clone(),
        },
        config: &config,
        sessions: HashMap::new(),
        published: HashSet::new(),
        last: LastMeasurements::default(),
        inflater: Inflater::new(shared.config.limits.max_decompressed_bytes),
    };
    let interval = Duration::from_millis(config.interval_ms);
    loop {
        tokio::select! {
            () = measurer.round() => {}
            () = shutdown.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Every ordered pair of cluster indices.
fn pairs(names: &[String]) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (0..names.len())
        .flat_map(|s| {
            (0..names.len())
                .filter(move |t| *t != s)
                .map(move |t| (s, t))
        })
        .collect();
    pairs.sort_by(|a, b| (&names[a.0], &names[a.1]).cmp(&(&names[b.0], &names[b.1])));
    pairs
}

/// One cluster as its Metadata answered: brokers, and each topic's partitions and leaders.
struct View {
    brokers: HashMap<i32, String>,
    /// topic -> partition -> leader node id (-1: none).
    topics: HashMap<String, BTreeMap<i32, i32>>,
}

type Key = (String, i32);

/// Partitions (or partitions and offsets) of each topic, by the node id of their leader.
type ByLeader<'t, P> = BTreeMap<i32, BTreeMap<&'t str, Vec<P>>>;

struct Measurer<'a> {
    shared: &'a Shared,
    naming: Naming,
    config: &'a Config,
    /// keyward's sessions by (cluster, node id; -1 for the bootstrap), kept across rounds and
    /// dropped on any error; bounded by the clusters' brokers.
    sessions: HashMap<(usize, i32), Session>,
    /// Series set last round: (source, target, topic, partition).
    published: HashSet<[String; 4]>,
    /// Every pair's last measurement with both clusters answering, for when they stop.
    last: LastMeasurements,
    inflater: Inflater,
}

impl Measurer<'_> {
    async fn round(&mut self) {
        let started = SystemTime::now();
        let shared = self.shared;
        let clusters = shared.clusters.all();
        let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
        let table = shared.ownership.snapshot();

        let mut views: Vec<Result<View, String>> = Vec::with_capacity(clusters.len());
        for c in 0..clusters.len() {
            views.push(self.view(c).await.map_err(|e| format!("{e:#}")));
        }
        let covered: Vec<Vec<String>> = views
            .iter()
            .map(|v| match v {
                Ok(v) => policy::covered_topics(
                    &table.table,
                    &self.naming,
                    &names,
                    v.topics.keys().map(String::as_str),
                ),
                Err(_) => Vec::new(),
            })
            .collect();

        // End offsets: each cluster's covered topics, and the copies it holds of the others'.
        let mut ends: Vec<HashMap<Key, Result<i64, String>>> = Vec::new();
        for (c, view) in views.iter().enumerate() {
            let Ok(view) = view else {
                ends.push(HashMap::new());
                continue;
            };
            let mut wanted: Vec<String> = covered[c].clone();
            for (s, topics) in covered.iter().enumerate() {
                if s != c {
                    wanted.extend(
                        topics
                            .iter()
                            .map(|t| self.naming.mirror(&names[s], t))
                            .filter(|m| view.topics.contains_key(m)),
                    );
                }
            }
            ends.push(self.end_offsets(c, view, &wanted).await);
        }

        // Timestamps of the oldest record not yet copied, per source cluster.
        let mut waiting: Vec<Vec<(Key, i64)>> = vec![Vec::new(); clusters.len()];
        for (s, t) in pairs(&names) {
            for topic in &covered[s] {
                let mirror = self.naming.mirror(&names[s], topic);
                let (Ok(source), Ok(_)) = (&views[s], &views[t]) else {
                    continue;
                };
                for p in source.topics[topic].keys() {
                    let key = (topic.clone(), *p);
                    if let (Some(Ok(se)), Some(Ok(me))) =
                        (ends[s].get(&key), ends[t].get(&(mirror.clone(), *p)))
                        && policy::lag_records(*se, *me) > 0
                    {
                        waiting[s].push((key, *me));
                    }
                }
            }
        }
        let mut stamps: Vec<HashMap<(Key, i64), i64>> = Vec::new();
        for (s, wanted) in waiting.iter().enumerate() {
            stamps.push(match &views[s] {
                Ok(view) if !wanted.is_empty() => self.timestamps(s, view, wanted).await,
                _ => HashMap::new(),
            });
        }

        let now_ms = millis(SystemTime::now());
        let mut reports = Vec::new();
        let mut published = HashSet::new();
        for (s, t) in pairs(&names) {
            let labels = [("source", names[s].clone()), ("target", names[t].clone())];
            let (source, target) = match (&views[s], &views[t]) {
                (Ok(source), Ok(target)) => (source, target),
                (Err(e), _) | (_, Err(e)) => {
                    let which = if views[s].is_err() { s } else { t };
                    let error = format!("cannot read {}'s topics: {e}", names[which]);
                    counter!("keyward_replication_check_errors_total", &labels).increment(1);
                    warn!(source = %names[s], target = %names[t], %error, "replication lag not measured");
                    reports.push(PairReport::failed(
                        names[s].clone(),
                        names[t].clone(),
                        error,
                    ));
                    continue;
                }
            };
            let mut topics = Vec::new();
            for topic in &covered[s] {
                let mirror = self.naming.mirror(&names[s], topic);
                let Some(copy) = target.topics.get(&mirror) else {
                    topics.push(TopicReport::failed(
                        topic.clone(),
                        mirror.clone(),
                        format!(
                            "the mirror topic {mirror} does not exist in {}: MirrorMaker 2 does not replicate {topic} there (yet)",
                            names[t]
                        ),
                    ));
                    continue;
                };
                let mut partitions = Vec::new();
                for p in source.topics[topic].keys() {
                    let key = (topic.clone(), *p);
                    let source_end = ends[s].get(&key).cloned();
                    let mirror_end = ends[t].get(&(mirror.clone(), *p)).cloned();
                    let report = match (source_end, mirror_end) {
                        (Some(Ok(se)), Some(Ok(me))) => {
                            let stamp = stamps[s].get(&(key.clone(), me)).copied();
                            PartitionReport::measured(*p, se, me, stamp, now_ms)
                        }
                        (se, _) if !copy.contains_key(p) => PartitionReport::failed(
                            *p,
                            se.and_then(Result::ok),
                            None,
                            format!("the mirror {mirror} has no partition {p}"),
                        ),
                        (se, me) => {
                            let error = [&se, &me]
                                .into_iter()
                                .find_map(|r| r.as_ref().and_then(|r| r.as_ref().err()).cloned())
                                .unwrap_or_else(|| "no end offset".to_owned());
                            PartitionReport::failed(
                                *p,
                                se.and_then(Result::ok),
                                me.and_then(Result::ok),
                                error,
                            )
                        }
                    };
                    if let Some(records) = report.lag_records {
                        let series = [
                            names[s].clone(),
                            names[t].clone(),
                            topic.clone(),
                            p.to_string(),
                        ];
                        let seconds = report.lag_seconds.unwrap_or(f64::NAN);
                        set_lag(&series, records as f64, seconds);
                        published.insert(series);
                    }
                    partitions.push(report);
                }
                topics.push(TopicReport::new(topic.clone(), mirror, partitions));
            }
            let unmeasured = topics.iter().filter(|t| t.error.is_some()).count();
            gauge!("keyward_replication_unmeasured_topics", &labels).set(unmeasured as f64);
            gauge!("keyward_replication_last_check_timestamp_seconds", &labels)
                .set(millis(started) as f64 / 1000.0);
            if unmeasured > 0 {
                debug!(source = %names[s], target = %names[t], unmeasured, "topics whose replication lag could not be measured");
            }
            reports.push(PairReport::new(names[s].clone(), names[t].clone(), topics));
        }
        // A series measured before and not now (topic deleted or no longer covered, mirror
        // gone, a cluster not answering) is NaN: neither a stale value nor a false 0.
        for gone in self.published.difference(&published) {
            set_lag(gone, f64::NAN, f64::NAN);
        }
        self.published = published;
        let measured_at = humantime::format_rfc3339_millis(started).to_string();
        let reports = reports
            .into_iter()
            .map(|r| self.last.carry(r, &measured_at))
            .collect();
        shared.replication.store(Report::new(
            Some(measured_at),
            self.config.interval_ms,
            self.config.separator.clone(),
            reports,
        ));
    }

    /// A request to cluster `c`'s node `node` (-1: any bootstrap address) on a kept session.
    async fn call<Req, Resp>(
        &mut self,
        c: usize,
        node: i32,
        addr: Option<&str>,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<Resp>
    where
        Req: kafka_protocol::protocol::Encodable,
        Resp: kafka_protocol::protocol::Decodable,
    {
        let key = (c, node);
        // A kept session the broker has closed since (idle, restarted) fails its first
        // request: that one is asked again once, on a new session.
        if let Some(mut session) = self.sessions.remove(&key).filter(Session::is_fresh)
            && let Ok(answer) = session.call(api, version, request).await
        {
            self.sessions.insert(key, session);
            return Ok(answer);
        }
        let dialer = &self.shared.dialers[c];
        let mut session = match addr {
            Some(addr) => dialer.session(addr, CLIENT_ID).await?,
            None => {
                let bootstrap = &self.shared.clusters.get(c).bootstrap;
                dialer.session_any(bootstrap, CLIENT_ID).await?
            }
        };
        let answer = session.call(api, version, request).await?;
        self.sessions.insert(key, session);
        Ok(answer)
    }

    async fn view(&mut self, c: usize) -> anyhow::Result<View> {
        let request = MetadataRequest::default().with_topics(None);
        let response: MetadataResponse = self
            .call(c, -1, None, ApiKey::Metadata, METADATA_VERSION, &request)
            .await?;
        let brokers: HashMap<i32, String> = response
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
            .collect();
        self.sessions.retain(|(cluster, node), _| {
            *cluster != c || *node == -1 || brokers.contains_key(node)
        });
        let topics = response
            .topics
            .iter()
            .filter(|t| t.error_code == 0 && !t.is_internal)
            .filter_map(|t| {
                let name = t.name.as_ref()?.to_string();
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| (p.partition_index, p.leader_id.0))
                    .collect();
                Some((name, partitions))
            })
            .collect();
        Ok(View { brokers, topics })
    }

    /// The latest offset of every partition of `topics` in cluster `c`, asked of each leader.
    async fn end_offsets(
        &mut self,
        c: usize,
        view: &View,
        topics: &[String],
    ) -> HashMap<Key, Result<i64, String>> {
        let mut out = HashMap::new();
        let mut by_leader: ByLeader<'_, i32> = BTreeMap::new();
        for topic in topics {
            for (p, leader) in &view.topics[topic] {
                if view.brokers.contains_key(leader) {
                    by_leader
                        .entry(*leader)
                        .or_default()
                        .entry(topic)
                        .or_default()
                        .push(*p);
                } else {
                    out.insert(
                        (topic.clone(), *p),
                        Err("the partition has no leader".to_owned()),
                    );
                }
            }
        }
        for (leader, topics) in by_leader {
            let request = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_isolation_level(0)
                .with_topics(
                    topics
                        .iter()
                        .map(|(t, ps)| {
                            ListOffsetsTopic::default()
                                .with_name(TopicName(StrBytes::from_string((*t).to_owned())))
                                .with_partitions(
                                    ps.iter()
                                        .map(|p| {
                                            ListOffsetsPartition::default()
                                                .with_partition_index(*p)
                                                .with_current_leader_epoch(-1)
                                                .with_timestamp(LATEST)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let addr = view.brokers[&leader].clone();
            let answer: anyhow::Result<ListOffsetsResponse> = self
                .call(
                    c,
                    leader,
                    Some(&addr),
                    ApiKey::ListOffsets,
                    LIST_OFFSETS_VERSION,
                    &request,
                )
                .await;
            match answer {
                Ok(response) => {
                    for t in &response.topics {
                        for p in &t.partitions {
                            let key = (t.name.to_string(), p.partition_index);
                            let value = if p.error_code == 0 {
                                Ok(p.offset)
                            } else {
                                Err(format!(
                                    "ListOffsets error {} from broker {leader}",
                                    p.error_code
                                ))
                            };
                            out.insert(key, value);
                        }
                    }
                }
                Err(e) => {
                    for (t, ps) in &topics {
                        for p in ps {
                            out.insert(
                                ((*t).to_owned(), *p),
                                Err(format!("broker {leader}: {e:#}")),
                            );
                        }
                    }
                }
            }
        }
        out
    }

    /// The timestamp of the record at each wanted offset of cluster `c`, fetched from each
    /// leader; missing where it could not be read.
    async fn timestamps(
        &mut self,
        c: usize,
        view: &View,
        wanted: &[(Key, i64)],
    ) -> HashMap<(Key, i64), i64> {
        let mut by_leader: ByLeader<'_, (i32, i64)> = BTreeMap::new();
        for ((topic, p), offset) in wanted {
            if let Some(leader) = view.topics.get(topic).and_then(|ps| ps.get(p))
                && view.brokers.contains_key(leader)
            {
                by_leader
                    .entry(*leader)
                    .or_default()
                    .entry(topic)
                    .or_default()
                    .push((*p, *offset));
            }
        }
        let mut out = HashMap::new();
        for (leader, topics) in by_leader {
            let request = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(0)
                .with_min_bytes(0)
                .with_max_bytes(FETCH_MAX_BYTES)
                .with_isolation_level(0)
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(
                    topics
                        .iter()
                        .map(|(t, ps)| {
                            FetchTopic::default()
                                .with_topic(TopicName(StrBytes::from_string((*t).to_owned())))
                                .with_partitions(
                                    ps.iter()
                                        .map(|(p, offset)| {
                                            FetchPartition::default()
                                                .with_partition(*p)
                                                .with_current_leader_epoch(-1)
                                                .with_fetch_offset(*offset)
                                                .with_log_start_offset(-1)
                                                .with_partition_max_bytes(FETCH_PARTITION_BYTES)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let addr = view.brokers[&leader].clone();
            let answer: anyhow::Result<FetchResponse> = self
                .call(
                    c,
                    leader,
                    Some(&addr),
                    ApiKey::Fetch,
                    FETCH_VERSION,
                    &request,
                )
                .await;
            let response = match answer {
                Ok(r) => r,
                Err(e) => {
                    debug!(
                        error = format!("{e:#}"),
                        leader, "fetching timestamps failed"
                    );
                    continue;
                }
            };
            for t in &response.responses {
                let topic = t.topic.to_string();
                for p in &t.partitions {
                    let Some(offset) = topics
                        .get(topic.as_str())
                        .and_then(|ps| ps.iter().find(|(q, _)| *q == p.partition_index))
                        .map(|(_, o)| *o)
                    else {
                        continue;
                    };
                    let stamp = match (&p.records, p.error_code) {
                        (Some(data), 0) => policy::timestamp_at(data, offset, &mut self.inflater),
                        _ => None,
                    };
                    if let Some(stamp) = stamp {
                        out.insert(((topic.clone(), p.partition_index), offset), stamp);
                    }
                }
            }
        }
        out
    }
}

fn set_lag(series: &[String; 4], records: f64, seconds: f64) {
    let labels = [
        ("source", series[0].clone()),
        ("target", series[1].clone()),
        ("topic", series[2].clone()),
        ("partition", series[3].clone()),
    ];
    gauge!("keyward_replication_lag_records", &labels).set(records);
    gauge!("keyward_replication_lag_seconds", &labels).set(seconds);
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ordered_pair_once_by_name() {
        let names = vec!["eu".to_owned(), "ap".to_owned(), "us".to_owned()];
        let named: Vec<(&str, &str)> = pairs(&names)
            .into_iter()
            .map(|(s, t)| (names[s].as_str(), names[t].as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("ap", "eu"),
                ("ap", "us"),
                ("eu", "ap"),
                ("eu", "us"),
                ("us", "ap"),
                ("us", "eu")
            ]
        );
    }
}
