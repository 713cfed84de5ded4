//! Positions kept for a switch: what lets a consumer group that reads another region's topic
//! resume from where it was when reads move to that region's cluster.
//!
//! A group of region R that reads `C.orders` (R's copy of region C's `orders`) has its position
//! on that copy in R's cluster only. When R's cluster goes down and C's serves R's reads, the
//! view reads `C.orders` from C's own `orders`, where the group has no position: MM2's
//! checkpoints carry positions on R's own topics into C, never positions on R's copies of C's.
//! The group would resume by its `auto.offset.reset`: everything again, or nothing.
//!
//! So every `reads.positions_interval_ms`, while R's cluster answers, keyward reads the
//! positions every group has committed there on copies of other regions' topics (ListGroups on
//! every broker, then OffsetFetch of those groups from the broker that coordinates them), and
//! from each other region's cluster the offset syncs MirrorMaker 2 wrote as it copied that
//! region's topics into R (`mm2-offset-syncs.<R>.internal`, in C's cluster with MM2's default
//! `offset-syncs.topic.location: source`; read on from where the last round stopped). Both are
//! kept in memory, the last that was read; nothing is written anywhere.
//!
//! Through the view, an OffsetFetch answer with no position on C's `orders` is answered with the
//! group's kept position on `C.orders`, translated to C's `orders` through the syncs
//! (`OffsetSyncs::translate`: the last sync at or below the position, so nothing is skipped and
//! at most the records between the sync and the position are read again). Only where C has no
//! position: once the group commits there, C's answer stands. What the group consumed after the
//! last round before R's cluster went down is read again: at most one interval's worth.
//!
//! Every instance reads the same cluster, so every instance keeps the same positions whichever
//! instance the group's clients used.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Shared;
use crate::policy::offset_syncs::{self, OffsetSyncs, Translated};
use crate::redirect::client::ClusterClient;

/// Groups asked for in one OffsetFetch request.
const GROUPS_PER_REQUEST: usize = 100;

/// What a round read, as the answers through the view use it.
#[derive(Default)]
pub struct Kept {
    /// When the groups' positions were read from the local cluster (`None`: never).
    pub read_at: Option<SystemTime>,
    /// (group, topic, partition) -> committed offset, on the local cluster's copies of other
    /// regions' topics only.
    positions: Arc<HashMap<(String, String, i32), i64>>,
    /// Per cluster (by index): the offset syncs of its topics into the local cluster.
    syncs: Vec<Option<Arc<OffsetSyncs>>>,
}

impl Kept {
    /// The position to answer for `group` on the serving cluster `cluster`'s own `origin`
    /// topic, which the local cluster copies as `copy`: its kept position on the copy,
    /// translated. `None` when no position or no sync at or below it is kept.
    pub fn carried(
        &self,
        cluster: usize,
        group: &str,
        copy: &str,
        origin: &str,
        partition: i32,
    ) -> Option<Translated> {
        let position = *self
            .positions
            .get(&(group.to_owned(), copy.to_owned(), partition))?;
        self.syncs
            .get(cluster)?
            .as_ref()?
            .translate(origin, partition, position)
    }

    /// How many positions are kept.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// For `/ownership`: what is kept, and since when.
    pub fn describe(&self, shared: &Shared) -> serde_json::Value {
        let groups: std::collections::HashSet<&str> =
            self.positions.keys().map(|(g, _, _)| g.as_str()).collect();
        let syncs: serde_json::Map<String, serde_json::Value> = self
            .syncs
            .iter()
            .enumerate()
            .filter_map(|(c, s)| {
                Some((
                    shared.clusters.get(c).name.clone(),
                    serde_json::json!(s.as_ref()?.len()),
                ))
            })
            .collect();
        serde_json::json!({
            "read_at": self.read_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "groups": groups.len(),
            "partitions": self.positions.len(),
            "offset_syncs_kept": syncs,
        })
    }
}

/// The positions kept, swapped whole after each round.
#[derive(Default)]
pub struct KeptPositions {
    kept: ArcSwap<Kept>,
}

impl KeptPositions {
    pub fn load(&self) -> Arc<Kept> {
        self.kept.load_full()
    }
}

/// Reads the positions and the syncs every `reads.positions_interval_ms` until `shutdown`. Does
/// nothing when it is 0 or no cluster has a region view.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let interval = Duration::from_millis(shared.config.reads.positions_interval_ms);
    let others: Vec<usize> = (0..shared.clusters.all().len())
        .filter(|&c| shared.view(c).is_some())
        .collect();
    if interval.is_zero() || others.is_empty() {
        return;
    }
    let client = |c: usize| {
        ClusterClient::new(
            shared.clusters.get(c).bootstrap.clone(),
            shared.dialers[c].clone(),
        )
    };
    let local = client(0);
    let mut syncs: Vec<Option<Syncs>> = (0..shared.clusters.all().len())
        .map(|c| {
            others.contains(&c).then(|| Syncs {
                client: client(c),
                topic: format!("mm2-offset-syncs.{}.internal", shared.config.region),
                next: None,
                held: Arc::default(),
                failing: false,
            })
        })
        .collect();
    let mut kept_positions = Arc::default();
    let mut read_at = None;
    // A failure is a warning when it starts, then a debug line each round until a read succeeds.
    let mut positions_failing = false;
    loop {
        let round = async {
            if shared.clusters.get(0).is_up() {
                match read_positions(&shared, &local).await {
                    Ok(positions) => {
                        if read_at.is_none() {
                            info!(
                                partitions = positions.len(),
                                every_ms = interval.as_millis() as u64,
                                "consumer groups' positions on copies of other regions' topics kept for a switch"
                            );
                        }
                        kept_positions = Arc::new(positions);
                        read_at = Some(SystemTime::now());
                        positions_failing = false;
                    }
                    Err(e) => {
                        counter!("keyward_positions_read_errors_total", "cluster" => shared.config.region.clone()).increment(1);
                        let error = format!("{e:#}");
                        if std::mem::replace(&mut positions_failing, true) {
                            debug!(error, "cannot read consumer groups' positions");
                        } else {
                            warn!(
                                error,
                                "cannot read consumer groups' positions; the last ones read stay kept"
                            );
                        }
                    }
                }
            }
            for (c, s) in syncs.iter_mut().enumerate() {
                let Some(s) = s else { continue };
                if !shared.clusters.get(c).is_up() {
                    continue;
                }
                let name = &shared.clusters.get(c).name;
                match s.read_on().await {
                    Ok(()) => s.failing = false,
                    Err(e) => {
                        counter!("keyward_positions_read_errors_total", "cluster" => name.clone())
                            .increment(1);
                        let error = format!("{e:#}");
                        if std::mem::replace(&mut s.failing, true) {
                            debug!(cluster = %name, topic = s.topic, error, "cannot read MirrorMaker 2's offset syncs");
                        } else {
                            warn!(cluster = %name, topic = s.topic, error, "cannot read MirrorMaker 2's offset syncs; positions on copies of that cluster's topics are carried through the last ones read, if any");
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = round => {}
            () = shutdown.cancelled() => return,
        }
        shared.positions.kept.store(Arc::new(Kept {
            read_at,
            positions: kept_positions.clone(),
            syncs: syncs
                .iter()
                .map(|s| s.as_ref().map(|s| s.held.clone()))
                .collect(),
        }));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Every group's committed positions on the local cluster's copies of other regions' topics.
async fn read_positions(
    shared: &Shared,
    local: &ClusterClient,
) -> anyhow::Result<HashMap<(String, String, i32), i64>> {
    let is_copy = |topic: &str| {
        (0..shared.clusters.all().len())
            .filter_map(|c| shared.view(c))
            .any(|v| v.serving_origin(topic).is_some())
    };
    let mut out = HashMap::new();
    for node in local.broker_ids().await? {
        let groups = local.groups_of(node).await?;
        for chunk in groups.chunks(GROUPS_PER_REQUEST) {
            for (group, offsets) in local.committed_by(node, chunk).await? {
                for ((topic, partition), offset) in offsets {
                    if is_copy(&topic) {
                        out.insert((group.clone(), topic, partition), offset);
                    }
                }
            }
        }
    }
    debug!(partitions = out.len(), "consumer groups' positions read");
    Ok(out)
}

/// The offset syncs of one cluster's topics into the local cluster, read on from where the last
/// round stopped.
struct Syncs {
    client: ClusterClient,
    topic: String,
    next: Option<i64>,
    /// Shared with the `Kept` published last: copied before a round adds to it.
    held: Arc<OffsetSyncs>,
    /// The last read failed.
    failing: bool,
}

impl Syncs {
    async fn read_on(&mut self) -> anyhow::Result<()> {
        let mut read = Vec::new();
        let (records, next) = self
            .client
            .read_from(&self.topic, 0, self.next, |record| {
                if let (Some(key), Some(value)) = (&record.key, &record.value)
                    && let Some((topic, partition, sync)) = offset_syncs::parse(key, value)
                {
                    read.push((topic, partition, sync));
                }
            })
            .await?;
        if !read.is_empty() {
            let held = Arc::make_mut(&mut self.held);
            for (topic, partition, sync) in read {
                held.add(topic, partition, sync);
            }
            debug!(
                topic = self.topic,
                records,
                kept = held.len(),
                "offset syncs read"
            );
        }
        self.next = Some(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::offset_syncs::Sync;

    /// us keeps group g at 7 on `eu.orders` partition 0; eu (cluster 1) wrote syncs of its
    /// `orders` into us: its record 10 is us's 5, 13 is us's 8.
    fn kept() -> Kept {
        let mut syncs = OffsetSyncs::default();
        for (upstream, downstream) in [(10, 5), (13, 8)] {
            syncs.add(
                "orders".into(),
                0,
                Sync {
                    upstream,
                    downstream,
                },
            );
        }
        Kept {
            read_at: Some(SystemTime::now()),
            positions: Arc::new(HashMap::from([(("g".into(), "eu.orders".into(), 0), 7)])),
            syncs: vec![None, Some(Arc::new(syncs))],
        }
    }

    #[test]
    fn a_kept_position_on_the_copy_is_carried_to_the_origin_through_the_last_sync_below_it() {
        let kept = kept();
        // 7 on us's copy is past the sync (10 -> 5): eu's 11, which reads again at most one
        // record (us's 6, if it is eu's 11).
        assert_eq!(
            kept.carried(1, "g", "eu.orders", "orders", 0),
            Some(Translated {
                offset: 11,
                reread_at_most: 1,
            })
        );
        // Another group, partition, topic or cluster: nothing kept.
        assert_eq!(kept.carried(1, "h", "eu.orders", "orders", 0), None);
        assert_eq!(kept.carried(1, "g", "eu.orders", "orders", 1), None);
        assert_eq!(kept.carried(0, "g", "eu.orders", "orders", 0), None);
        assert_eq!(kept.carried(2, "g", "eu.orders", "orders", 0), None);
    }

    #[test]
    fn a_position_below_every_sync_is_not_carried() {
        let mut kept = kept();
        kept.positions = Arc::new(HashMap::from([(("g".into(), "eu.orders".into(), 0), 4)]));
        assert_eq!(kept.carried(1, "g", "eu.orders", "orders", 0), None);
    }
}
