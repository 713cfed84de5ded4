//! Warns about topics whose partition count does not line up with their `by: key` rule's slots
//! (even the murmur2 partitioner then mixes owners in a batch, which keyward refuses whole).
//!
//! keyward learns partition counts twice: once at start, asking the local cluster for every
//! topic as soon as it answers ([`check_at_start`]), and from every Metadata response that
//! passes through to clients ([`observe`], called by `handlers::metadata`), which is how it sees
//! topics created or grown later, whenever clients refresh their metadata. Each (topic, partition
//! count, slots) is warned about once per cluster, so refreshes do not repeat it; the gauge
//! `keyward_misaligned_topics` counts the topics in that state. Whether a topic is misaligned,
//! and the warning's text, are `crate::policy::alignment`'s: this module only feeds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::gauge;
use tracing::{debug, info, warn};

use super::{Shared, upstream};
use crate::policy::alignment::{self, Misaligned};

/// One cluster's misaligned topics as last seen: topic -> (partitions, slots) warned about.
/// Bounded by the cluster's topics; a topic leaves it when it is seen aligned again.
#[derive(Debug, Default)]
pub struct Warned(Mutex<HashMap<String, (u32, u32)>>);

impl Warned {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, u32)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// At most this many topics are named, one line each, per check; the rest are one line
/// (`keyward check --clusters` lists them all), so a cluster of thousands of misaligned topics
/// does not flood the log at start.
const MAX_LINES: usize = 10;

/// Checks `topics` (name, partition count) of cluster `cluster` against the table in force and
/// warns about those that became misaligned, or changed, since they were last seen.
pub fn observe<'a>(
    shared: &Shared,
    cluster: usize,
    topics: impl IntoIterator<Item = (&'a str, i32)>,
) {
    let snapshot = shared.ownership.snapshot();
    let state = shared.clusters.get(cluster);
    let mut news: Vec<Misaligned> = Vec::new();
    {
        let mut warned = state.misaligned.lock();
        for (topic, partitions) in topics {
            match alignment::check(&snapshot.table, topic, partitions) {
                Some(m) => {
                    let now = (m.partitions, m.slots);
                    if warned.get(topic) != Some(&now) {
                        warned.insert(topic.to_owned(), now);
                        news.push(m);
                    }
                }
                None => {
                    warned.remove(topic);
                }
            }
        }
    }
    publish(shared);
    news.sort_by(|a, b| a.topic.cmp(&b.topic));
    for m in news.iter().take(MAX_LINES) {
        warn!(
            cluster = %state.name,
            topic = %m.topic,
            partitions = m.partitions,
            rule = %m.rule,
            slots = m.slots,
            "{m}"
        );
    }
    if news.len() > MAX_LINES {
        warn!(
            cluster = %state.name,
            "{} more topics have a partition count that is not a multiple of their by: key rule's slots; `keyward check --config <config> --clusters` lists them all",
            news.len() - MAX_LINES
        );
    }
}

fn publish(shared: &Shared) {
    let total: usize = shared
        .clusters
        .all()
        .iter()
        .map(|c| c.misaligned.len())
        .sum();
    gauge!("keyward_misaligned_topics").set(total as f64);
}

/// Asks the local cluster for every topic's partition count once it answers (retrying every
/// `reads.probe_interval_ms`), checks them, and ends; shutdown stops it. The topics' ids are
/// kept (`ClusterState::topic_ids`): the ones this region's clients know, which the region view
/// shows them if the local cluster goes down.
pub async fn check_at_start(shared: Arc<Shared>) {
    let interval = Duration::from_millis(shared.config.reads.probe_interval_ms);
    let stop = shared.shutdown_token();
    let local = shared.clusters.get(0);
    // The series exists from the start (at 0), so an alert on it sees data, not nothing.
    publish(&shared);
    loop {
        let fetched = tokio::select! {
            fetched = upstream::fetch_topics(&shared.dialers[0], &local.bootstrap) => fetched,
            () = stop.cancelled() => return,
        };
        match fetched {
            Ok(topics) => {
                observe(
                    &shared,
                    0,
                    topics
                        .iter()
                        .map(|(name, count, _)| (name.as_str(), *count)),
                );
                local
                    .topic_ids
                    .learn(topics.iter().map(|(name, _, id)| (name.as_str(), *id)));
                info!(
                    cluster = %local.name,
                    topics = topics.len(),
                    misaligned = local.misaligned.len(),
                    "checked the partition counts of the local cluster's topics against the by: key rules"
                );
                return;
            }
            Err(e) => {
                debug!(cluster = %local.name, error = format!("{e:#}"), "cannot list topics yet; trying again")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}
