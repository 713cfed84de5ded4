//! Positions kept for a switch: what lets a consumer group resume where it was when its reads
//! move to another region's cluster.
//!
//! A group of region R has its positions in R's cluster. When R's cluster goes down and C's
//! serves R's reads through the view, the group's OffsetFetch goes to C's coordinator:
//! - on R's own topic `orders`, read from C's copy `R.orders`, C has a position only if MM2's
//!   group-offset sync (`sync.group.offsets.enabled`, off by default) put one there, translated
//!   as of its last checkpoint (a minute apart by default);
//! - on R's copy `C.orders` of C's topic, read from C's own `orders`, C never has one: MM2 carries
//!   positions on R's own topics only.
//!
//! Without one, the group resumes by its `auto.offset.reset`: everything again, or nothing.
//!
//! So every `reads.positions_interval_ms`, while R's cluster answers, keyward reads the positions
//! every group has committed there on those topics (ListGroups on every broker, then OffsetFetch
//! of those groups from the broker that coordinates them), and MirrorMaker 2's offset syncs of
//! both flows (MM2's default `offset-syncs.topic.location: source`): C's topics into R
//! (`mm2-offset-syncs.<R>.internal`, in C's cluster) and R's into C
//! (`mm2-offset-syncs.<C>.internal`, in R's), each read on from where the last round stopped.
//! All of it is kept in memory, the last that was read; nothing is written anywhere.
//!
//! Through the view, where the group's kept position, translated into the serving cluster's
//! topic, is ahead of C's answer (or C has none), it is answered instead: up through the syncs
//! of C's topics for `C.orders` (`OffsetSyncs::translate`), down through ours for `orders`
//! (`OffsetSyncs::translate_downstream`, MM2's own rule). Either way the last sync at or below
//! the position is used, so nothing is skipped and at most the records between the sync and the
//! position are read again. What the group consumed after the last round before R's cluster
//! went down is read again: at most one interval's worth. Once the group commits in C, C's
//! answer is ahead and stands.
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
use crate::policy::region_view::RegionView;
use crate::redirect::client::ClusterClient;

/// Groups asked for in one OffsetFetch request.
const GROUPS_PER_REQUEST: usize = 100;

/// What a round read, as the answers through the view use it.
#[derive(Default)]
pub struct Kept {
    /// When the groups' positions were read from the local cluster (`None`: never).
    pub read_at: Option<SystemTime>,
    /// (group, topic, partition) -> committed offset, on the local cluster's topics that
    /// another cluster holds under another name: its own topics (copied there) and its copies
    /// of other regions' topics.
    positions: Arc<HashMap<(String, String, i32), i64>>,
    /// Per cluster (by index): MM2's offset syncs of its topics into the local cluster.
    syncs: Vec<Option<Arc<OffsetSyncs>>>,
    /// Per cluster (by index): MM2's offset syncs of the local cluster's topics into it.
    own_syncs: Vec<Option<Arc<OffsetSyncs>>>,
}

impl Kept {
    /// The position to answer for `group` on `partition` of the topic a client names `topic`,
    /// read from cluster `cluster` through `view`: the group's kept position on the local
    /// `topic`, translated into the serving cluster's topic. Up through the syncs of that
    /// cluster's topics when `topic` is our copy of one (`eu.orders` is eu's `orders`); down
    /// through the syncs of ours when `topic` is our own (`orders` is eu's `us.orders`).
    /// `None` when no position or no sync at or below it is kept.
    pub fn carried(
        &self,
        cluster: usize,
        view: &RegionView,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Option<Translated> {
        let position = *self
            .positions
            .get(&(group.to_owned(), topic.to_owned(), partition))?;
        let syncs = |all: &[Option<Arc<OffsetSyncs>>]| all.get(cluster)?.clone();
        match view.serving_origin(topic) {
            Some(origin) => syncs(&self.syncs)?.translate(&origin, partition, position),
            None => {
                view.own_copy(topic)?;
                syncs(&self.own_syncs)?.translate_downstream(topic, partition, position)
            }
        }
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
        let held =
            |all: &[Option<Arc<OffsetSyncs>>]| -> serde_json::Map<String, serde_json::Value> {
                all.iter()
                    .enumerate()
                    .filter_map(|(c, s)| {
                        Some((
                            shared.clusters.get(c).name.clone(),
                            serde_json::json!(s.as_ref()?.len()),
                        ))
                    })
                    .collect()
            };
        let mut by_topic: std::collections::BTreeMap<&str, usize> = Default::default();
        for (_, topic, _) in self.positions.keys() {
            *by_topic.entry(topic.as_str()).or_default() += 1;
        }
        serde_json::json!({
            "read_at": self.read_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "groups": groups.len(),
            "partitions": self.positions.len(),
            "partitions_by_topic": by_topic,
            "offset_syncs_kept": held(&self.syncs),
            "own_offset_syncs_kept": held(&self.own_syncs),
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
    // Each other cluster's syncs of its topics into ours, read from it; and ours into it, read
    // from ours (MM2's default `offset-syncs.topic.location: source`).
    let flows = |from_local: bool| -> Vec<Option<Syncs>> {
        (0..shared.clusters.all().len())
            .map(|c| {
                others.contains(&c).then(|| Syncs {
                    client: client(if from_local { 0 } else { c }),
                    topic: format!(
                        "mm2-offset-syncs.{}.internal",
                        match from_local {
                            true => &shared.clusters.get(c).name,
                            false => &shared.config.region,
                        }
                    ),
                    next: None,
                    held: Arc::default(),
                    failing: false,
                    missing_logged: false,
                })
            })
            .collect()
    };
    let mut syncs = flows(false);
    let mut own_syncs = flows(true);
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
                                "consumer groups' positions kept for a switch of serving cluster"
                            );
                        }
                        kept_positions = Arc::new(positions);
                        read_at = Some(SystemTime::now());
                        positions_failing = false;
                    }
                    Err(e) => {
                        counter!("keyward_positions_read_errors_total", "cluster" => shared.clusters.get(0).name.clone()).increment(1);
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
            let flows = syncs
                .iter_mut()
                .enumerate()
                .chain(own_syncs.iter_mut().map(|s| (0, s)));
            for (from, s) in flows {
                let Some(s) = s else { continue };
                if !shared.clusters.get(from).is_up() {
                    continue;
                }
                let name = &shared.clusters.get(from).name;
                match s.read_on().await {
                    Ok(Read::Read) => s.failing = false,
                    // No MirrorMaker 2 writing this flow (yet): nothing to carry through, and
                    // nothing wrong with keyward.
                    Ok(Read::Missing) => {
                        if !std::mem::replace(&mut s.missing_logged, true) {
                            info!(cluster = %name, topic = s.topic, "no MirrorMaker 2 offset syncs topic: positions are carried through it once MirrorMaker 2 creates it");
                        }
                    }
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
            syncs: held(&syncs),
            own_syncs: held(&own_syncs),
        }));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The syncs each flow holds now, by cluster.
fn held(flows: &[Option<Syncs>]) -> Vec<Option<Arc<OffsetSyncs>>> {
    flows
        .iter()
        .map(|s| s.as_ref().map(|s| s.held.clone()))
        .collect()
}

/// Every group's committed positions on the local cluster's topics that another cluster holds
/// under another name: its own, and its copies of other regions' topics.
async fn read_positions(
    shared: &Shared,
    local: &ClusterClient,
) -> anyhow::Result<HashMap<(String, String, i32), i64>> {
    let is_copy = |topic: &str| {
        (0..shared.clusters.all().len())
            .filter_map(|c| shared.view(c))
            .any(|v| v.serving_origin(topic).is_some() || v.own_copy(topic).is_some())
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
    /// That the topic does not exist was logged.
    missing_logged: bool,
}

/// What a round found of a syncs topic.
enum Read {
    Read,
    /// The topic does not exist.
    Missing,
}

impl Syncs {
    async fn read_on(&mut self) -> anyhow::Result<Read> {
        if self.next.is_none() && !self.client.topic_exists(&self.topic).await? {
            return Ok(Read::Missing);
        }
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
        Ok(Read::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::offset_syncs::Sync;
    use crate::proxy::view::tests::view;

    fn syncs(topic: &str, pairs: &[(i64, i64)]) -> Option<Arc<OffsetSyncs>> {
        let mut syncs = OffsetSyncs::default();
        for &(upstream, downstream) in pairs {
            syncs.add(
                topic.into(),
                0,
                Sync {
                    upstream,
                    downstream,
                },
            );
        }
        Some(Arc::new(syncs))
    }

    /// us (`view()`: us's keyward, eu serving, eu at index 1) keeps group g at 7 on `eu.orders`
    /// and at 20 on `orders`, partition 0. eu wrote syncs of its `orders` into us (its record 10
    /// is us's 5, 13 is us's 8), and us syncs of its `orders` into eu (us's 16 is eu's 30).
    fn kept() -> Kept {
        Kept {
            read_at: Some(SystemTime::now()),
            positions: Arc::new(HashMap::from([
                (("g".into(), "eu.orders".into(), 0), 7),
                (("g".into(), "orders".into(), 0), 20),
            ])),
            syncs: vec![None, syncs("orders", &[(10, 5), (13, 8)])],
            own_syncs: vec![None, syncs("orders", &[(16, 30)])],
        }
    }

    #[test]
    fn a_kept_position_on_our_copy_is_carried_up_to_the_serving_cluster_s_own_topic() {
        let (kept, view) = (kept(), view());
        // 7 on us's copy is past the sync (10 -> 5): eu's 11, which reads again at most one
        // record (us's 6, if it is eu's 11).
        assert_eq!(
            kept.carried(1, &view, "g", "eu.orders", 0),
            Some(Translated {
                offset: 11,
                reread_at_most: 1,
            })
        );
        // Another group, partition or cluster: nothing kept.
        assert_eq!(kept.carried(1, &view, "h", "eu.orders", 0), None);
        assert_eq!(kept.carried(1, &view, "g", "eu.orders", 1), None);
        assert_eq!(kept.carried(0, &view, "g", "eu.orders", 0), None);
        assert_eq!(kept.carried(2, &view, "g", "eu.orders", 0), None);
    }

    #[test]
    fn a_kept_position_on_our_own_topic_is_carried_down_to_the_serving_cluster_s_copy() {
        let (kept, view) = (kept(), view());
        // 20 on us's `orders` is past the sync (16 -> 30): eu's 31 on `us.orders`, reading again
        // at most the copies of us's 17 to 19.
        assert_eq!(
            kept.carried(1, &view, "g", "orders", 0),
            Some(Translated {
                offset: 31,
                reread_at_most: 3,
            })
        );
    }

    #[test]
    fn a_position_below_every_sync_is_not_carried() {
        let mut kept = kept();
        kept.positions = Arc::new(HashMap::from([
            (("g".into(), "eu.orders".into(), 0), 4),
            (("g".into(), "orders".into(), 0), 15),
        ]));
        assert_eq!(kept.carried(1, &view(), "g", "eu.orders", 0), None);
        assert_eq!(kept.carried(1, &view(), "g", "orders", 0), None);
    }
}
