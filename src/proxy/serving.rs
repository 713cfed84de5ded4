//! Which cluster serves, and the probes that decide it.
//!
//! Every `reads.probe_interval_ms` keyward sends each cluster a Metadata request that lists no
//! topics: it shows the cluster answers, measures its round trip and teaches keyward brokers
//! that joined since start (their virtual ports open through [`super::ports`]). Then
//! [`Clusters::choose`] names the cluster whose turn it is to serve, and a change is published
//! on one `watch` channel, [`Serving`]. Every client connection holds a receiver of it and
//! closes when it changes, so a client never holds connections to brokers of two clusters.

use std::time::Duration;

use metrics::{counter, gauge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::brokers::{Clusters, Health};
use super::failback::Failback;
use super::ports::Ports;
use super::upstream::{self, Dialer};
use crate::config::Reads;
use crate::policy::region_view::RegionView;
use crate::redirect::client::ClusterClient;

/// The serving cluster's index (see [`Clusters`]): the one source of truth for bootstrap
/// connections, readiness and the `keyward_serving_cluster` gauge.
#[derive(Debug)]
pub struct Serving {
    tx: watch::Sender<usize>,
}

impl Default for Serving {
    /// The local cluster serves at start.
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(0),
        }
    }
}

impl Serving {
    /// The cluster serving now.
    pub fn index(&self) -> usize {
        *self.tx.borrow()
    }

    /// A receiver whose current value is the cluster serving now, marked seen: its
    /// `changed()` completes at the next switch.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.tx.subscribe()
    }

    fn switch_to(&self, index: usize) {
        self.tx.send_replace(index);
    }
}

/// What a probe round needs: the clusters and how to reach them, where learned brokers go,
/// and where its verdict goes. Nothing else of the proxy.
pub(super) struct Probe<'a> {
    pub clusters: &'a Clusters,
    pub dialers: &'a [Dialer],
    pub ports: &'a Ports,
    pub serving: &'a Serving,
    pub reads: &'a Reads,
    /// Each cluster's region view, for the log line of a switch.
    pub views: &'a [Option<RegionView>],
    /// Begun when reads move back to the local cluster from a cluster with a view.
    pub failback: &'a Failback,
}

impl Probe<'_> {
    /// Probes every cluster once. Unless `may_switch` is false, then serves from the cluster
    /// whose turn it is. Brokers the probes name are handed to the port manager; the round
    /// returns once their ports are open (or failed to open), so a client told of a broker can
    /// connect to it.
    pub async fn round(&self, may_switch: bool) {
        let timeout = Duration::from_millis(self.reads.probe_timeout_ms);
        let mut learned = Vec::new();
        for (index, cluster) in self.clusters.all().iter().enumerate() {
            // tokio's clock, so a test with paused time drives the hold-down too.
            let started = tokio::time::Instant::now();
            let probe = upstream::fetch_brokers(&self.dialers[index], &cluster.bootstrap);
            let answer = tokio::time::timeout(timeout, probe)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {timeout:?}")));
            let failure = match answer {
                Ok(brokers) => {
                    for (node_id, host, port) in brokers {
                        match self.ports.learn(self.clusters, index, node_id, &host, port) {
                            Ok(learn) => learned.extend(learn.pending),
                            Err(e) => error!(error = %e, "broker cannot be mapped"),
                        }
                    }
                    None
                }
                Err(e) => Some(e),
            };
            let now = tokio::time::Instant::now();
            let rtt = (now - started).as_micros() as u64;
            let probed = cluster.probed(failure.is_none(), rtt, now.into_std());
            let down_after = self.reads.down_after_failed_probes;
            if let Some(e) = failure {
                counter!("keyward_cluster_probe_failures_total", "cluster" => cluster.name.clone())
                    .increment(1);
                if probed.log_failure {
                    warn!(cluster = %cluster.name, error = format!("{e:#}"), failed_in_a_row = probed.failed_in_a_row, down_after, "cluster probe failed");
                }
            }
            match (probed.was, probed.health) {
                (was, Health::Down) if was != Health::Down => {
                    warn!(cluster = %cluster.name, failed_in_a_row = probed.failed_in_a_row, "cluster is down: {down_after} probes in a row failed (reads.down_after_failed_probes)");
                }
                (was, Health::Up) if was != Health::Up => {
                    info!(cluster = %cluster.name, "cluster answers probes: up");
                }
                _ => {}
            }
            let up = probed.health == Health::Up;
            gauge!("keyward_cluster_up", "cluster" => cluster.name.clone()).set(f64::from(up));
        }
        self.ports.opened(&learned).await;
        if !may_switch {
            // The round at start only learns: a cluster that does not answer its first probe
            // (a local cluster still electing its controller) is not down yet.
            self.publish();
            return;
        }
        let hold_down = Duration::from_millis(self.reads.hold_down_ms);
        let current = self.serving.index();
        let now = tokio::time::Instant::now().into_std();
        let next = self.clusters.choose(current, now, hold_down);
        if next != current {
            let (from, to) = (
                &self.clusters.get(current).name,
                &self.clusters.get(next).name,
            );
            let view = self.views.get(next).and_then(Option::as_ref);
            warn!(
                from = %from,
                to = %to,
                topics = view.map_or_else(|| format!("{to}'s own, under their own names"), |v| v.describe()),
                "serving cluster changes; closing client connections so they reconnect to it"
            );
            counter!("keyward_serving_cluster_switches_total", "to" => to.clone()).increment(1);
            if view.is_some() {
                self.learn_topic_ids(next, timeout).await;
            }
            self.failback_from(current, next);
            self.serving.switch_to(next);
        }
        self.publish();
    }

    /// Learns every topic id of cluster `index` before clients are sent to it through a region
    /// view, so the view can show them the ids they knew (`super::view::Ids`) from their first
    /// request there: a KIP-848 heartbeat answered with an assignment names the serving
    /// cluster's ids before the client has asked that cluster for any Metadata. A failure only
    /// costs a log line: the ids are learned from the Metadata clients ask for too.
    async fn learn_topic_ids(&self, index: usize, timeout: Duration) {
        let cluster = self.clusters.get(index);
        let fetch = upstream::fetch_topics(&self.dialers[index], &cluster.bootstrap);
        match tokio::time::timeout(timeout, fetch).await {
            Ok(Ok(topics)) => {
                cluster
                    .topic_ids
                    .learn(topics.iter().map(|(name, _, id)| (name.as_str(), *id)));
                info!(cluster = %cluster.name, topics = cluster.topic_ids.len(), "learned the serving cluster's topic ids");
            }
            Ok(Err(e)) => {
                warn!(cluster = %cluster.name, error = format!("{e:#}"), "cannot learn the serving cluster's topic ids; learning them from clients' Metadata")
            }
            Err(_) => {
                warn!(cluster = %cluster.name, ?timeout, "no topic ids from the serving cluster in time; learning them from clients' Metadata")
            }
        }
    }

    /// Ends the failback window in force, and begins one when reads move from a cluster with a
    /// region view back to the local cluster (the one without).
    fn failback_from(&self, current: usize, next: usize) {
        self.failback.end();
        let length = Duration::from_millis(self.reads.failback_translation_ms);
        let view = self.views.get(current).and_then(Option::as_ref);
        let home = self.views.get(next).is_some_and(Option::is_none);
        if let (Some(view), true, false) = (view, home, length.is_zero()) {
            let client = |index: usize| {
                ClusterClient::new(
                    self.clusters.get(index).bootstrap.clone(),
                    self.dialers[index].clone(),
                )
            };
            self.failback
                .begin(current, view.clone(), client(current), client(next), length);
        } else {
            self.failback.forget_members();
        }
    }

    fn publish(&self) {
        let serving = self.serving.index();
        for (index, cluster) in self.clusters.all().iter().enumerate() {
            gauge!("keyward_serving_cluster", "cluster" => cluster.name.clone())
                .set(f64::from(u8::from(serving == index)));
        }
    }

    /// Probes every `reads.probe_interval_ms` until `shutdown`, after the round at start.
    pub async fn run(&self, shutdown: CancellationToken, after_each: impl Fn()) {
        let interval = Duration::from_millis(self.reads.probe_interval_ms);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            self.round(true).await;
            after_each();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::config::Config;
    use crate::security::Security;

    const CONFIG: &str = "region: us\nlisten: { bootstrap: 127.0.0.1:9192, advertised_host: 127.0.0.1, broker_port_base: 9193 }\nclusters:\n  us: { bootstrap: [\"127.0.0.1:1\"] }\n  eu: { bootstrap: [\"127.0.0.1:2\"] }\n  ap: { bootstrap: [\"127.0.0.1:3\"] }\nownership_file: o.yaml\n";

    /// Runs `switches` (from, to) on a probe of [`CONFIG`] plus `extra`, a KIP-848 member
    /// heartbeating through the view after the first; then what `check` makes of the failback
    /// window in force.
    fn after_switches<T>(
        extra: &str,
        switches: &[(&str, &str)],
        check: impl FnOnce(&Failback) -> T,
    ) -> T {
        let config =
            Config::parse(&format!("{CONFIG}{extra}"), std::path::Path::new("k.yaml")).unwrap();
        let clusters = Clusters::new(&config);
        let security = Arc::new(Security::load(&config).unwrap());
        let dialers: Vec<Dialer> = clusters
            .all()
            .iter()
            .map(|c| Dialer::new(c.name.clone(), security.clone(), Duration::from_secs(1)))
            .collect();
        let views = super::super::region_views(&config, &clusters);
        let shutdown = CancellationToken::new();
        let failback = Failback::new(TaskTracker::new(), shutdown.clone());
        let (ports, serving) = (Ports::default(), Serving::default());
        let probe = Probe {
            clusters: &clusters,
            dialers: &dialers,
            ports: &ports,
            serving: &serving,
            reads: &config.reads,
            views: &views,
            failback: &failback,
        };
        let index = |name: &str| clusters.index_of(name).unwrap();
        for (i, (from, to)) in switches.iter().enumerate() {
            probe.failback_from(index(from), index(to));
            if i == 0 {
                failback.in_view.fence("member-1", 0);
            }
        }
        let out = check(&failback);
        shutdown.cancel();
        out
    }

    /// In a failback window, a KIP-848 member is fenced once, at its first heartbeat with an
    /// epoch above 0, whichever instance it heartbeat through before; one that joins here
    /// (epoch 0) is not. Offset validations are held at the window's start.
    #[tokio::test]
    async fn kip848_members_are_fenced_once_in_a_failback_window_unless_they_joined_in_it() {
        let switches = [("us", "eu"), ("eu", "us")];
        let fenced = after_switches("", &switches, |f| {
            let w = f.current().expect("a window");
            assert!(w.holds_validations());
            [
                w.fence("member-1", 3),
                w.fence("member-1", 3),
                w.fence("member-1", 0),
                // Through another instance's view.
                w.fence("member-2", 5),
                // Joins here, then heartbeats at the epoch this coordinator gave.
                w.fence("member-3", 0),
                w.fence("member-3", 1),
                // Leaving.
                w.fence("member-4", -1),
            ]
        });
        assert_eq!(fenced, [true, false, false, true, false, false, false]);
        assert!(after_switches("", &[("us", "eu"), ("eu", "ap")], |f| f
            .current()
            .is_none()));
    }

    /// Through a region view, likewise: a KIP-848 member is fenced once after each switch, at
    /// its first heartbeat above epoch 0; one that joined through the view is not.
    #[tokio::test]
    async fn kip848_members_are_fenced_once_through_a_view_after_each_switch() {
        let fenced = |switches: &[(&str, &str)]| {
            after_switches("", switches, |f| {
                [
                    f.in_view.fence("member-7", 3),
                    f.in_view.fence("member-7", 3),
                    f.in_view.fence("member-8", 0),
                    f.in_view.fence("member-8", 1),
                ]
            })
        };
        assert_eq!(fenced(&[("us", "eu")]), [true, false, false, false]);
        // Each switch begins anew: members fenced through eu's view come to ap's.
        let again = after_switches("", &[("us", "eu")], |f| {
            assert!(f.in_view.fence("member-7", 3));
            f.forget_members();
            f.in_view.fence("member-7", 4)
        });
        assert!(again);
    }

    /// Until it is fenced, a member seen through the view commits nothing here: its positions
    /// are on the other cluster's log.
    #[tokio::test]
    async fn a_member_not_yet_fenced_commits_nothing_here() {
        use kafka_protocol::messages::offset_commit_request::{
            OffsetCommitRequestPartition, OffsetCommitRequestTopic,
        };
        use kafka_protocol::messages::{
            ApiKey, OffsetCommitRequest, OffsetCommitResponse, TopicName,
        };
        use kafka_protocol::protocol::StrBytes;

        use crate::codec::errors::UNKNOWN_MEMBER_ID;
        use crate::proxy::failback::refused_commit_answer;
        use crate::proxy::rewrite::testing::decode_body;
        use crate::proxy::upstream::encode_request;

        let commit = |member: &'static str, version: i16| {
            let request = OffsetCommitRequest::default()
                .with_member_id(StrBytes::from_static_str(member))
                .with_generation_id_or_member_epoch(3)
                .with_topics(vec![
                    OffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("eu.orders")))
                        .with_partitions(vec![
                            OffsetCommitRequestPartition::default().with_committed_offset(18),
                        ]),
                ]);
            encode_request("c", 4, ApiKey::OffsetCommit, version, &request).unwrap()
        };
        after_switches("", &[("us", "eu"), ("eu", "us")], |f| {
            let w = f.current().expect("a window");
            for v in [2, 8, 9] {
                let (answer, refused) = refused_commit_answer(&w, &commit("member-1", v), v, 4)
                    .expect("refused")
                    .unwrap();
                assert_eq!(refused, 1);
                let got: OffsetCommitResponse = decode_body(&answer, ApiKey::OffsetCommit, v);
                assert_eq!(
                    got.topics[0].partitions[0].error_code, UNKNOWN_MEMBER_ID,
                    "v{v}"
                );
                assert!(refused_commit_answer(&w, &commit("member-2", v), v, 4).is_none());
            }
            // Fenced, it joins again and commits what it reads here.
            assert!(w.fence("member-1", 3));
            assert!(refused_commit_answer(&w, &commit("member-1", 9), 9, 4).is_none());
        });
        // Moving on to a third cluster forgets the members the first view saw.
        after_switches("", &[("us", "eu"), ("eu", "ap"), ("ap", "us")], |f| {
            let w = f.current().expect("a window");
            assert!(refused_commit_answer(&w, &commit("member-1", 9), 9, 4).is_none());
        });
    }

    /// Which switches open a failback window: only from a cluster with a view to the local one,
    /// and only while `reads.failback_translation_ms` is not 0.
    #[tokio::test]
    async fn a_failback_window_opens_only_when_reads_come_home_from_a_view() {
        let window_after = |extra: &str, from: &str, to: &str| {
            after_switches(extra, &[("us", "eu"), (from, to)], |f| {
                f.current().map(|w| w.describe()["from"].clone())
            })
        };
        assert_eq!(window_after("", "eu", "us"), Some("eu".into()));
        assert_eq!(window_after("", "ap", "us"), Some("ap".into()));
        // Leaving the local cluster, or moving between two others, ends any window.
        assert_eq!(window_after("", "us", "eu"), None);
        assert_eq!(window_after("", "eu", "ap"), None);
        assert_eq!(
            window_after("reads: { failback_translation_ms: 0 }\n", "eu", "us"),
            None
        );
        assert_eq!(
            window_after("reads: { topic_names: same }\n", "eu", "us"),
            None
        );
    }

    #[tokio::test]
    async fn a_switch_wakes_every_connection_of_the_old_cluster() {
        let serving = Serving::default();
        let mut connection = serving.subscribe();
        assert_eq!(*connection.borrow_and_update(), 0);
        serving.switch_to(1);
        connection.changed().await.unwrap();
        assert_eq!(*connection.borrow_and_update(), 1);
        assert_eq!(serving.index(), 1);
        // A connection accepted after the switch sees the new cluster and no change.
        let later = serving.subscribe();
        assert!(!later.has_changed().unwrap());
    }
}
