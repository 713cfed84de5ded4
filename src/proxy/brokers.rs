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
//! non-produce traffic. Which one it is lives in `super::serving`; this module keeps each
//! cluster's probe history and [`Clusters::choose`] says whose turn it is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

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

/// What the probes say of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not answered a probe since start, and not yet failed enough of them to be down. Reads
    /// never move to such a cluster, and never away from it either: a cluster still electing
    /// its controller at start is given the same `reads.down_after_failed_probes` as any other.
    Unknown,
    /// Answered a probe, and has not failed `down_after` probes in a row since.
    Up,
    /// Failed `down_after` probes in a row.
    Down,
}

/// The probe history that decides a cluster's [`Health`].
#[derive(Debug)]
struct Probes {
    health: Health,
    /// Probes failed since the last one that succeeded.
    failed_in_a_row: u64,
    /// When the cluster last became up (for the hold-down before switching back to it).
    up_since: Option<Instant>,
}

/// What one probe changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub health: Health,
    /// The health before this probe.
    pub was: Health,
    /// Probes failed in a row, this one included (0 when it succeeded).
    pub failed_in_a_row: u64,
    /// A failure worth a log line: the first of a run, then one in 30, so a cluster that stays
    /// down keeps saying why without a line per probe.
    pub log_failure: bool,
}

/// One region's cluster, as keyward sees it.
#[derive(Debug)]
pub struct ClusterState {
    pub name: String,
    pub bootstrap: Vec<String>,
    /// Added to real node ids to make virtual ones.
    pub node_offset: i32,
    real: RwLock<HashMap<i32, RealBroker>>,
    /// Consecutive failed probes that make the cluster down (`reads.down_after_failed_probes`).
    down_after: u64,
    probes: Mutex<Probes>,
    rtt_micros: AtomicU64,
    /// Topics of this cluster whose partition count does not line up with their `by: key`
    /// rule's slots, as last seen (`super::alignment`).
    pub misaligned: super::alignment::Warned,
    /// This cluster's topic ids, as seen in Metadata (`super::topic_ids`).
    pub topic_ids: super::topic_ids::TopicIds,
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

    fn probes(&self) -> std::sync::MutexGuard<'_, Probes> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn health(&self) -> Health {
        self.probes().health
    }

    /// Answered a probe and not failed `reads.down_after_failed_probes` in a row since.
    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }

    pub fn rtt_micros(&self) -> u64 {
        self.rtt_micros.load(Ordering::Relaxed)
    }

    /// Records a probe's outcome: one answer makes the cluster up, `down_after` failures in a
    /// row make it down; anything between leaves its health as it was.
    pub fn probed(&self, up: bool, rtt_micros: u64, now: Instant) -> Probed {
        let mut p = self.probes();
        let was = p.health;
        if up {
            p.failed_in_a_row = 0;
            if was != Health::Up {
                p.health = Health::Up;
                p.up_since = Some(now);
            }
            self.rtt_micros.store(rtt_micros, Ordering::Relaxed);
        } else {
            p.failed_in_a_row = p.failed_in_a_row.saturating_add(1);
            if p.failed_in_a_row >= self.down_after {
                p.health = Health::Down;
                p.up_since = None;
            }
        }
        Probed {
            health: p.health,
            was,
            failed_in_a_row: p.failed_in_a_row,
            log_failure: p.failed_in_a_row % 30 == 1,
        }
    }

    fn up_since(&self) -> Option<Instant> {
        self.probes().up_since
    }
}

#[derive(Debug)]
pub struct Clusters {
    /// In id order: the local cluster first.
    list: Vec<ClusterState>,
    port_base: u16,
    per_cluster: u16,
    prefer: Prefer,
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
                down_after: u64::from(config.reads.down_after_failed_probes.max(1)),
                probes: Mutex::new(Probes {
                    health: Health::Unknown,
                    failed_in_a_row: 0,
                    up_since: None,
                }),
                rtt_micros: AtomicU64::new(0),
                misaligned: Default::default(),
                topic_ids: Default::default(),
            })
            .collect();
        Self {
            list,
            port_base: config.listen.broker_port_base,
            per_cluster,
            prefer: config.reads.prefer.clone(),
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

    /// The cluster whose turn it is to serve, `current` serving now: the first up one in
    /// preference order, or the current one if none is up. Reads move away from the current cluster only once it is
    /// [`Health::Down`] (several failed probes in a row, never one), and then at once; moving
    /// back up the preference order waits until the candidate has been up for `hold_down`.
    pub fn choose(&self, current: usize, now: Instant, hold_down: std::time::Duration) -> usize {
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
        let current_down = self.list[current].health() == Health::Down;
        for (rank, &i) in order.iter().enumerate() {
            let c = &self.list[i];
            if i == current {
                if current_down {
                    continue;
                }
                return current;
            }
            if !c.is_up() {
                continue;
            }
            let better = current_rank.is_none_or(|r| rank < r);
            if better && !current_down {
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

    /// `down_after` failures in a row, as `reads.down_after_failed_probes` (default 3) says.
    fn fail(c: &ClusterState, times: usize, now: Instant) -> Probed {
        let mut last = None;
        for _ in 0..times {
            last = Some(c.probed(false, 0, now));
        }
        last.expect("at least one probe")
    }

    #[test]
    fn switches_away_after_three_failures_in_a_row_and_back_only_after_the_hold_down() {
        let c = clusters("reads: { prefer: [us, eu] }");
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        for s in c.all() {
            s.probed(true, 100, t0);
        }
        let current = 0;
        assert_eq!(c.all()[c.choose(current, t0, hold)].name, "us");
        // us misses two probes: still up, reads stay.
        fail(c.get(0), 2, t0);
        assert_eq!(c.get(0).health(), Health::Up);
        assert_eq!(c.choose(current, t0, hold), 0);
        // The third in a row: down, and eu, next in preference, serves at once.
        assert_eq!(fail(c.get(0), 1, t0).health, Health::Down);
        let eu = c.choose(current, t0, hold);
        assert_eq!(c.get(eu).name, "eu");
        let current = eu;
        // us is back, but not for long enough.
        let t1 = t0 + Duration::from_secs(1);
        c.get(0).probed(true, 100, t1);
        assert_eq!(c.choose(current, t1 + Duration::from_secs(10), hold), eu);
        assert_eq!(c.choose(current, t1 + hold, hold), 0);
        // Nothing healthy: stay where we are.
        for s in c.all() {
            fail(s, 3, t1);
        }
        assert_eq!(c.choose(current, t1, hold), eu);
    }

    #[test]
    fn one_lost_probe_in_five_never_moves_reads_nor_restarts_the_hold_down() {
        let c = clusters("reads: { prefer: [us, eu] }");
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        for s in c.all() {
            s.probed(true, 100, t0);
        }
        let current = 0;
        for round in 1..=100u64 {
            let now = t0 + Duration::from_secs(2 * round);
            let p = c.get(0).probed(round % 5 != 0, 100, now);
            assert_eq!(p.health, Health::Up, "round {round}");
            assert_eq!(c.choose(current, now, hold), 0, "round {round}");
        }
        // A lost probe is not a new "up since": the hold-down counts from the first answer.
        assert_eq!(c.get(0).up_since(), Some(t0));
    }

    #[test]
    fn the_probe_state_machine() {
        let c = clusters("reads: { down_after_failed_probes: 2 }");
        let s = c.get(1);
        let t = Instant::now();
        // Start: unknown, and one failure does not make it down.
        assert_eq!(s.health(), Health::Unknown);
        let p = s.probed(false, 0, t);
        assert_eq!(
            (p.was, p.health, p.failed_in_a_row),
            (Health::Unknown, Health::Unknown, 1)
        );
        assert!(p.log_failure, "the first failure of a run is logged");
        let p = s.probed(false, 0, t);
        assert_eq!((p.was, p.health), (Health::Unknown, Health::Down));
        assert!(!p.log_failure);
        // One answer makes it up, and resets the run.
        let p = s.probed(true, 7, t);
        assert_eq!(
            (p.was, p.health, p.failed_in_a_row),
            (Health::Down, Health::Up, 0)
        );
        assert_eq!(s.rtt_micros(), 7);
        assert!(s.probed(false, 0, t).log_failure);
        assert!(s.is_up());
        assert_eq!(s.probed(false, 0, t).health, Health::Down);
        assert!(!s.is_up());
        // A cluster that stays down logs one failure in 30.
        let logged = (0..90)
            .filter(|_| s.probed(false, 0, t).log_failure)
            .count();
        assert_eq!(logged, 3);
    }

    #[test]
    fn at_start_reads_stay_until_the_local_cluster_is_down() {
        let c = clusters("");
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        let current = 0;
        // The local cluster (us) is still electing its controller; ap answers at once.
        c.get(1).probed(true, 100, t0);
        for n in 1..3 {
            fail(c.get(0), 1, t0);
            assert_eq!(c.choose(current, t0, hold), 0, "after {n} failed probe(s)");
        }
        fail(c.get(0), 1, t0);
        assert_eq!(c.get(c.choose(current, t0, hold)).name, "ap");
        // Unknown clusters are never moved to.
        let c = clusters("");
        fail(c.get(0), 3, t0);
        assert_eq!(
            c.choose(current, t0, hold),
            0,
            "no other cluster has answered yet"
        );
    }

    #[test]
    fn only_listed_clusters_serve_reads() {
        let c = clusters("reads: { prefer: [us] }");
        let t0 = Instant::now();
        let current = 0;
        fail(c.get(0), 3, t0);
        c.get(1).probed(true, 100, t0);
        c.get(2).probed(true, 100, t0);
        assert_eq!(
            c.choose(current, t0, Duration::ZERO),
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
        let current = 0;
        // Moving to a nearer cluster is a move up: it waits for the hold-down too.
        assert_eq!(c.choose(current, t0, Duration::ZERO), 1);
    }
}
