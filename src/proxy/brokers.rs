//! The clusters keyward knows, their real brokers, and the virtual brokers clients see.
//!
//! Clusters are numbered in id order: the local region's first, then the others by name. Broker
//! node N of cluster number c is advertised to clients as virtual node `c * ports_per_cluster + N`
//! at `advertised_host:(broker_port_base + virtual node)`. For the local cluster that is node N
//! itself, so admin requests that name a broker by id keep working in normal operation; when
//! reads fail over to another cluster, its brokers get ids no client can confuse with the local
//! cluster's. Ports are a pure function of (cluster, node), stable across restarts of keyward and
//! across metadata refreshes.
//!
//! Exactly one cluster is *serving* at a time: it receives bootstrap connections and all
//! non-produce traffic. Switching closes every client connection (see [`Clusters::switch_to`]),
//! so a client never holds connections to brokers of two clusters at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Prefer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "broker node id {node_id} of cluster {cluster} cannot be given a virtual id: node ids must be 0-{} (listen.ports_per_cluster)",
    per_cluster - 1
)]
pub struct UnmappableNode {
    pub cluster: String,
    pub node_id: i32,
    pub per_cluster: u16,
}

/// A real broker address learned from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealBroker {
    pub host: String,
    pub port: i32,
}

impl RealBroker {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One region's cluster, as keyward sees it.
#[derive(Debug)]
pub struct ClusterState {
    pub name: String,
    pub bootstrap: Vec<String>,
    /// Added to real node ids to make virtual ones.
    pub node_offset: i32,
    real: RwLock<HashMap<i32, RealBroker>>,
    up: AtomicBool,
    /// When the cluster last came up (for the hold-down before switching back to it).
    up_since: Mutex<Option<Instant>>,
    rtt_micros: AtomicU64,
    /// Probes failed since the last one that succeeded.
    failed_probes: AtomicU64,
}

impl ClusterState {
    /// Records where node `node_id` really is. Returns true when this is news.
    pub fn learn(&self, node_id: i32, host: &str, port: i32) -> bool {
        let broker = RealBroker {
            host: host.to_owned(),
            port,
        };
        if self.read().get(&node_id) == Some(&broker) {
            return false;
        }
        let mut known = self.real.write().unwrap_or_else(|e| e.into_inner());
        let news = known.get(&node_id) != Some(&broker);
        known.insert(node_id, broker);
        news
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<i32, RealBroker>> {
        self.real.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn real(&self, node_id: i32) -> Option<RealBroker> {
        self.read().get(&node_id).cloned()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn rtt_micros(&self) -> u64 {
        self.rtt_micros.load(Ordering::Relaxed)
    }

    /// Records a probe's outcome. Returns whether a failure is worth a log line: the first of
    /// a run, and then one in 30, so a cluster that stays down keeps saying why.
    pub fn probed(&self, up: bool, rtt_micros: u64, now: Instant) -> bool {
        let failed = if up {
            self.failed_probes.store(0, Ordering::Relaxed);
            0
        } else {
            self.failed_probes.fetch_add(1, Ordering::Relaxed) + 1
        };
        let was_up = self.up.swap(up, Ordering::Relaxed);
        let mut since = self.up_since.lock().unwrap_or_else(|e| e.into_inner());
        match (was_up, up) {
            (false, true) => *since = Some(now),
            (_, false) => *since = None,
            _ => {}
        }
        if up {
            self.rtt_micros.store(rtt_micros, Ordering::Relaxed);
        }
        failed % 30 == 1
    }

    fn up_since(&self) -> Option<Instant> {
        *self.up_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub struct Clusters {
    /// In id order: the local cluster first.
    list: Vec<ClusterState>,
    port_base: u16,
    per_cluster: u16,
    prefer: Prefer,
    serving: AtomicUsize,
    /// Cancelled when the serving cluster changes: every client connection watches it.
    epoch: Mutex<CancellationToken>,
}

impl Clusters {
    pub fn new(config: &Config) -> Self {
        let per_cluster = config.listen.ports_per_cluster;
        let list = config
            .clusters_in_id_order()
            .into_iter()
            .enumerate()
            .map(|(i, name)| ClusterState {
                bootstrap: config.clusters[&name].bootstrap.clone(),
                name,
                node_offset: i as i32 * i32::from(per_cluster),
                real: RwLock::new(HashMap::new()),
                up: AtomicBool::new(false),
                up_since: Mutex::new(None),
                rtt_micros: AtomicU64::new(0),
                failed_probes: AtomicU64::new(0),
            })
            .collect();
        Self {
            list,
            port_base: config.listen.broker_port_base,
            per_cluster,
            prefer: config.reads.prefer.clone(),
            serving: AtomicUsize::new(0),
            epoch: Mutex::new(CancellationToken::new()),
        }
    }

    pub fn all(&self) -> &[ClusterState] {
        &self.list
    }

    /// The index of region `name`'s cluster.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|c| c.name == name)
    }

    pub fn get(&self, index: usize) -> &ClusterState {
        &self.list[index]
    }

    /// The local region's cluster (always index 0).
    pub fn local(&self) -> &ClusterState {
        &self.list[0]
    }

    pub fn serving_index(&self) -> usize {
        self.serving.load(Ordering::Relaxed)
    }

    pub fn serving(&self) -> &ClusterState {
        &self.list[self.serving_index()]
    }

    /// A token cancelled at the next switch of serving cluster.
    pub fn epoch(&self) -> CancellationToken {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `index` the serving cluster and closes every client connection of the old one.
    pub fn switch_to(&self, index: usize) {
        let mut epoch = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        self.serving.store(index, Ordering::Relaxed);
        let old = std::mem::replace(&mut *epoch, CancellationToken::new());
        old.cancel();
    }

    /// The virtual node id clients see for real node `node_id` of cluster `cluster`.
    pub fn virtual_id(&self, cluster: usize, node_id: i32) -> Result<i32, UnmappableNode> {
        if node_id < 0 {
            // -1 means "no node" (no leader, no coordinator): it stays -1.
            return Ok(node_id);
        }
        let c = &self.list[cluster];
        if node_id >= i32::from(self.per_cluster) {
            return Err(UnmappableNode {
                cluster: c.name.clone(),
                node_id,
                per_cluster: self.per_cluster,
            });
        }
        Ok(c.node_offset + node_id)
    }

    /// The port clients reach virtual node `virtual_id` at.
    pub fn port(&self, virtual_id: i32) -> u16 {
        // In range by construction: config validation bounds base + clusters * per_cluster.
        (i32::from(self.port_base) + virtual_id) as u16
    }

    /// The cluster whose turn it is to serve: the first healthy one in preference order, or
    /// the current one if none is healthy. Moving back up the preference order waits until the
    /// candidate has been healthy for `hold_down`; moving away from a dead cluster does not wait.
    pub fn choose(&self, now: Instant, hold_down: std::time::Duration) -> usize {
        let current = self.serving_index();
        let order: Vec<usize> = match &self.prefer {
            Prefer::LocalFirst => (0..self.list.len()).collect(),
            // Only the listed clusters serve reads: `prefer: [eu]` turns read failover off.
            Prefer::Order(names) => names
                .iter()
                .filter_map(|n| self.list.iter().position(|c| &c.name == n))
                .collect(),
            Prefer::Nearest => {
                let mut o: Vec<usize> = (0..self.list.len()).collect();
                o.sort_by_key(|&i| (!self.list[i].is_up(), self.list[i].rtt_micros()));
                o
            }
        };
        let current_rank = order.iter().position(|&i| i == current);
        for (rank, &i) in order.iter().enumerate() {
            let c = &self.list[i];
            if !c.is_up() {
                continue;
            }
            if i == current {
                return current;
            }
            let better = current_rank.is_none_or(|r| rank < r);
            let current_up = self.list[current].is_up();
            if better && current_up {
                // Only switch back up once the candidate has proved itself.
                let settled = c
                    .up_since()
                    .is_some_and(|t| now.duration_since(t) >= hold_down);
                if settled {
                    return i;
                }
                continue;
            }
            return i;
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn clusters(prefer: &str) -> Clusters {
        let config = Config::parse(
            &format!(
                r#"
region: us
listen: {{ bootstrap: "127.0.0.1:9192", advertised_host: 127.0.0.1, broker_port_base: 9200 }}
clusters:
  eu: {{ bootstrap: ["127.0.0.1:1"] }}
  us: {{ bootstrap: ["127.0.0.1:2"] }}
  ap: {{ bootstrap: ["127.0.0.1:3"] }}
ownership_file: o.yaml
{prefer}
"#
            ),
            Path::new("k.yaml"),
        )
        .unwrap();
        Clusters::new(&config)
    }

    #[test]
    fn the_local_cluster_keeps_its_node_ids_and_others_are_offset() {
        let c = clusters("");
        assert_eq!(
            c.all().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["us", "ap", "eu"]
        );
        assert_eq!(c.virtual_id(0, 3), Ok(3));
        assert_eq!(c.virtual_id(1, 3), Ok(103));
        assert_eq!(c.virtual_id(2, -1), Ok(-1));
        assert_eq!(c.port(203), 9403);
        assert!(c.virtual_id(1, 100).is_err());
    }

    #[test]
    fn switches_away_at_once_and_back_only_after_the_hold_down() {
        let c = clusters("reads: { prefer: [us, eu] }");
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        for s in c.all() {
            s.probed(true, 100, t0);
        }
        assert_eq!(c.all()[c.choose(t0, hold)].name, "us");
        // us fails: eu, next in preference, serves at once.
        c.get(0).probed(false, 0, t0);
        let eu = c.choose(t0, hold);
        assert_eq!(c.get(eu).name, "eu");
        c.switch_to(eu);
        // us is back, but not for long enough.
        let t1 = t0 + Duration::from_secs(1);
        c.get(0).probed(true, 100, t1);
        assert_eq!(c.choose(t1 + Duration::from_secs(10), hold), eu);
        assert_eq!(c.choose(t1 + hold, hold), 0);
        // Nothing healthy: stay where we are.
        for s in c.all() {
            s.probed(false, 0, t1);
        }
        assert_eq!(c.choose(t1, hold), eu);
    }

    #[test]
    fn only_listed_clusters_serve_reads() {
        let c = clusters("reads: { prefer: [us] }");
        let t0 = Instant::now();
        c.get(0).probed(false, 0, t0);
        c.get(1).probed(true, 100, t0);
        c.get(2).probed(true, 100, t0);
        assert_eq!(
            c.choose(t0, Duration::ZERO),
            0,
            "no failover when only us is listed"
        );
    }

    #[test]
    fn nearest_prefers_the_lowest_round_trip() {
        let c = clusters("reads: { prefer: nearest }");
        let t0 = Instant::now();
        c.get(0).probed(true, 900, t0);
        c.get(1).probed(true, 100, t0);
        c.get(2).probed(true, 500, t0);
        // Moving to a nearer cluster is a move up: it waits for the hold-down too.
        assert_eq!(c.choose(t0, Duration::ZERO), 1);
    }

    #[test]
    fn a_switch_cancels_the_old_epoch() {
        let c = clusters("");
        let before = c.epoch();
        c.switch_to(1);
        assert!(before.is_cancelled());
        assert!(!c.epoch().is_cancelled());
        assert_eq!(c.serving().name, "ap");
    }
}
