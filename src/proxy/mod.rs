//! The proxy: listeners, the per-connection pipeline that keeps responses in request order,
//! the rewriting of broker addresses, and the choice of serving cluster.
//!
//! Clients bootstrap at `listen.bootstrap`; every broker of every cluster gets a virtual broker
//! port (see [`brokers`]), opened by the port manager ([`ports`]) as soon as keyward learns of
//! the broker, from its probes and from any response that lists brokers. Only the serving
//! cluster's ports accept connections ([`serving`]).
//!
//! [`run`] owns every task of the proxy in one tracker: the accept loops ([`listener`]), the
//! connections, the port manager, the probes, the redirect pipelines and the replication lag
//! measurement ([`replication`]). Each carries a span
//! and ends on shutdown.

pub mod alignment;
pub mod brokers;
pub mod conn;
pub mod failback;
pub mod handlers;
pub mod identity;
mod listener;
pub mod meters;
pub mod ports;
pub mod positions;
pub mod produce;
pub mod replication;
pub mod rewrite;
pub mod sasl;
pub mod serving;
pub mod stream;
pub mod topic_ids;
pub mod upstream;
pub mod versions;
pub mod view;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kafka_protocol::protocol::StrBytes;
use metrics::{counter, gauge};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{Config, TopicNames};
use crate::policy::region_view::RegionView;
use crate::policy::replication::Naming;
use crate::redirect::Redirector;
use crate::reload::Ownership;
use crate::security::Security;
use brokers::{Clusters, UnmappableNode};
use conn::Target;
pub use listener::bind_bootstrap;
use ports::{Broker, Ports};
use serving::{Probe, Serving};
use upstream::Dialer;

/// State shared by every connection of one keyward process. Each part of the proxy reaches for
/// its own field: the accept loops for `accepting`, the probes for `clusters`, `dialers`,
/// `ports` and `serving` (through [`Probe`]), handlers for the table, the logs and the meters.
pub struct Shared {
    pub config: Config,
    /// The ownership table in force. A request loads one snapshot and decides against it.
    pub ownership: Arc<Ownership>,
    /// TLS material and credentials in force (reloaded with the table).
    pub security: Arc<Security>,
    pub clusters: Clusters,
    /// How to reach each cluster, by cluster index.
    pub dialers: Vec<Dialer>,
    /// Which cluster serves bootstrap connections and reads.
    pub serving: Serving,
    /// Virtual broker ports.
    pub ports: Ports,
    advertised_host: StrBytes,
    accepting: listener::Accepting,
    shutdown: CancellationToken,
    /// Every task of the proxy: [`run`] waits for them at shutdown.
    tasks: TaskTracker,
    pub rejection_log: RateLimit,
    /// Audited writes (`on_foreign: audit`): steady traffic while a rule is audited, so it has
    /// a budget of its own, apart from refusals, and its lines say how many were left out.
    pub audit_log: RateLimit,
    /// "cannot reach the broker" lines: one per client connection otherwise, so a broker that
    /// is down (or a cluster switch in progress) with thousands of clients reconnecting would
    /// flood the log.
    pub unreachable_log: RateLimit,
    /// The decompression memory all connections share (`limits.max_decompressed_bytes_total`).
    pub decompression_budget: Arc<crate::codec::records::DecompressionBudget>,
    pub meters: meters::RequestMetrics,
    /// keyward's own producer on the other regions' clusters (`on_foreign: redirect`).
    pub redirector: Redirector,
    /// MirrorMaker 2's lag as last measured (`replication` in the config).
    pub replication: replication::Lag,
    /// Per cluster: the region view a connection served by it sees (`None` for the local
    /// cluster, and with `reads.topic_names: same`).
    views: Vec<Option<RegionView>>,
    /// "no counterpart in the serving cluster" lines: a consumer retries its metadata often.
    pub view_log: RateLimit,
    /// After reads move back here from another region's cluster: consumer groups' positions
    /// carried home from the copies they read there.
    pub failback: failback::Failback,
    /// Consumer groups' positions kept for a switch (`positions`).
    pub positions: positions::KeptPositions,
    bootstrap_bound: AtomicBool,
}

impl Shared {
    pub fn new(
        config: Config,
        ownership: Arc<Ownership>,
        security: Arc<Security>,
    ) -> anyhow::Result<Arc<Self>> {
        let clusters = Clusters::new(&config);
        register_metrics(&clusters, security.listener().is_some());
        let timeout = Duration::from_millis(config.limits.connect_timeout_ms);
        let dialers: Vec<Dialer> = clusters
            .all()
            .iter()
            .map(|c| Dialer::new(c.name.clone(), security.clone(), timeout))
            .collect();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let redirector = Redirector::new(
            clusters.all().iter().zip(&dialers).map(|(c, d)| {
                // Never a redirect target: no series for the local cluster.
                let landed = (c.name != config.region)
                    .then(|| meters::Redirected::new(&config.region, &c.name));
                (c.bootstrap.clone(), d.clone(), landed)
            }),
            config
                .redirect
                .journal
                .then(|| clusters.index_of(&config.region))
                .flatten()
                .map(|home| (home, config.redirect.journal_topic.clone())),
            tasks.clone(),
            shutdown.clone(),
        );
        let meters = meters::RequestMetrics::new(clusters.all().iter().map(|c| c.name.as_str()));
        let decompression_budget = crate::codec::records::DecompressionBudget::new(
            config.limits.max_decompressed_bytes_total,
        );
        let views = region_views(&config, &clusters);
        Ok(Arc::new(Self {
            views,
            failback: failback::Failback::new(tasks.clone(), shutdown.clone()),
            positions: positions::KeptPositions::default(),
            view_log: RateLimit::new(Duration::from_secs(10), 5),
            clusters,
            dialers,
            security,
            redirector,
            replication: replication::Lag::default(),
            serving: Serving::default(),
            ports: Ports::default(),
            advertised_host: StrBytes::from_string(config.listen.advertised_host.clone()),
            accepting: listener::Accepting::new(&config),
            config,
            ownership,
            shutdown,
            tasks,
            rejection_log: RateLimit::new(Duration::from_secs(1), 20),
            audit_log: RateLimit::new(AUDIT_LOG_INTERVAL, AUDIT_LOG_BURST),
            unreachable_log: RateLimit::new(Duration::from_secs(10), 5),
            decompression_budget,
            meters,
            bootstrap_bound: AtomicBool::new(false),
        }))
    }

    /// What responses from cluster `cluster` advertise in place of its real brokers.
    pub fn advertiser(&self, cluster: usize) -> Advertiser<'_> {
        Advertiser {
            shared: self,
            cluster,
            pending: RefCell::new(Vec::new()),
        }
    }

    /// The region view of connections served by cluster `cluster`, if names are mapped there.
    pub fn view(&self, cluster: usize) -> Option<&RegionView> {
        self.views.get(cluster)?.as_ref()
    }

    /// The region view of connections served by cluster `cluster`, with the topic ids of both
    /// sides (the local cluster is the first).
    pub fn view_ids(&self, cluster: usize) -> Option<view::Ids<'_>> {
        Some(view::Ids {
            view: self.view(cluster)?,
            local: &self.clusters.get(0).topic_ids,
            serving: &self.clusters.get(cluster).topic_ids,
        })
    }

    fn probe(&self) -> Probe<'_> {
        Probe {
            clusters: &self.clusters,
            dialers: &self.dialers,
            ports: &self.ports,
            serving: &self.serving,
            reads: &self.config.reads,
            views: &self.views,
            failback: &self.failback,
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Why this instance should not receive traffic, or `None` when it is ready: the bootstrap
    /// listener is bound, a valid table is loaded (always true once started: an invalid table
    /// stops keyward at start and never replaces a valid one), and the serving cluster answers.
    pub fn not_ready(&self) -> Option<String> {
        if !self.bootstrap_bound.load(Ordering::Relaxed) {
            return Some("the bootstrap listener is not bound yet".to_owned());
        }
        let serving = self.clusters.get(self.serving.index());
        if !serving.is_up() {
            return Some(format!(
                "the serving cluster ({}) does not answer metadata requests",
                serving.name
            ));
        }
        None
    }

    /// The gauges sampled once per probe round rather than on every change.
    fn publish(&self) {
        gauge!("keyward_decompression_bytes").set(self.decompression_budget.used() as f64);
        gauge!("keyward_ready").set(f64::from(u8::from(self.not_ready().is_none())));
    }
}

/// Exports every counter whose labels are known at start, at 0, so dashboards and alerts see
/// the series before the first event (a rate over a missing series is no data, not zero).
fn register_metrics(clusters: &Clusters, tls: bool) {
    if tls {
        for result in ["ok", "error", "timeout"] {
            counter!("keyward_tls_handshakes_total", "result" => result).absolute(0);
        }
    }
    for c in clusters.all() {
        for name in [
            "keyward_upstream_connections_opened_total",
            "keyward_upstream_connect_errors_total",
        ] {
            counter!(name, "cluster" => c.name.clone()).absolute(0);
        }
        counter!("keyward_cluster_probe_failures_total", "cluster" => c.name.clone()).absolute(0);
        counter!("keyward_serving_cluster_switches_total", "to" => c.name.clone()).absolute(0);
        gauge!("keyward_cluster_up", "cluster" => c.name.clone()).set(0.0);
    }
    for name in [
        "keyward_client_connections_opened_total",
        "keyward_client_connections_refused_total",
        "keyward_acks0_rejections_total",
        "keyward_panics_total",
        "keyward_admin_unauthorized_total",
        "keyward_failback_rereads_at_most_total",
        "keyward_failback_validations_held_total",
        "keyward_failback_members_fenced_total",
        "keyward_failback_commits_refused_total",
    ] {
        counter!(name).absolute(0);
    }
    for outcome in ["carried", "kept", "no_commit", "no_sync", "failed"] {
        counter!("keyward_failback_offsets_total", "outcome" => outcome).absolute(0);
    }
    if let Some(local) = clusters.all().first() {
        counter!("keyward_positions_read_errors_total", "cluster" => local.name.clone())
            .absolute(0);
        for c in clusters.all().iter().filter(|c| c.name != local.name) {
            for reads in view::ReadFrom::ALL {
                for outcome in view::Outcome::ALL {
                    counter!(
                        "keyward_view_offsets_total",
                        "serving" => c.name.clone(),
                        "reads" => reads.label(),
                        "outcome" => outcome.label(),
                    )
                    .absolute(0);
                }
            }
            counter!("keyward_view_rereads_at_most_total", "serving" => c.name.clone()).absolute(0);
            counter!("keyward_view_members_fenced_total", "serving" => c.name.clone()).absolute(0);
            counter!("keyward_positions_read_errors_total", "cluster" => c.name.clone())
                .absolute(0);
        }
    }
    gauge!("keyward_client_connections_open").set(0.0);
}

/// Advertises keyward's virtual brokers in place of one cluster's real ones. A response it
/// rewrote goes to the client only after [`Advertiser::ready`]: the ports of brokers it named
/// for the first time are then listening.
pub struct Advertiser<'a> {
    shared: &'a Shared,
    cluster: usize,
    /// Brokers named for the first time, whose ports are still opening.
    pending: RefCell<Vec<Broker>>,
}

impl Advertiser<'_> {
    /// Waits until every broker this advertiser named has its port open.
    pub async fn ready(self) {
        let pending = self.pending.into_inner();
        self.shared.ports.opened(&pending).await;
    }
}

impl rewrite::Advertise for Advertiser<'_> {
    fn advertise(
        &self,
        node_id: i32,
        real_host: &str,
        real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
        let learned = self.shared.ports.learn(
            &self.shared.clusters,
            self.cluster,
            node_id,
            real_host,
            real_port,
        )?;
        if let Some(broker) = learned.pending {
            self.pending.borrow_mut().push(broker);
        }
        Ok((
            learned.virtual_id,
            self.shared.advertised_host.clone(),
            i32::from(learned.port),
        ))
    }

    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
        self.shared.clusters.virtual_id(self.cluster, node_id)
    }

    fn renumbers(&self) -> bool {
        self.shared.clusters.get(self.cluster).node_offset != 0
    }
}

/// Audited-write log lines: at most this many per [`AUDIT_LOG_INTERVAL`] (the metrics count
/// every audited record).
pub const AUDIT_LOG_BURST: u32 = 10;
pub const AUDIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Allows a bounded number of events per interval; used so that a flood of refused writes logs
/// a sample instead of one line per batch (the metrics count every one).
/// Every cluster's region view: how this region's topic names map onto it while it serves
/// (`reads.topic_names`).
fn region_views(config: &Config, clusters: &Clusters) -> Vec<Option<RegionView>> {
    let regions: Vec<String> = clusters.all().iter().map(|c| c.name.clone()).collect();
    let naming = Naming {
        separator: config
            .replication
            .as_ref()
            .map_or_else(|| ".".to_owned(), |r| r.separator.clone()),
    };
    clusters
        .all()
        .iter()
        .map(|c| {
            (c.name != config.region && config.reads.topic_names == TopicNames::Mirrored)
                .then(|| RegionView::new(&config.region, &c.name, &regions, naming.clone()))
        })
        .collect()
}

pub struct RateLimit {
    interval: Duration,
    burst: u32,
    state: Mutex<RateState>,
}

struct RateState {
    window_start: Instant,
    in_window: u32,
    /// Events refused since the last one allowed.
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst,
            state: Mutex::new(RateState {
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now()).is_some()
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed since the
    /// last one that was (for the log line to say so); `None` when it is suppressed.
    pub fn allow_counting(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(s.window_start) >= self.interval {
            s.window_start = now;
            s.in_window = 0;
        }
        s.in_window = s.in_window.saturating_add(1);
        if s.in_window <= self.burst {
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

/// Serves clients that connect to `bootstrap` until `shutdown` completes (or
/// [`Shared::shutdown_token`] is cancelled, which `shutdown` completing also does, so the admin
/// API and the reload watchers stop with the proxy), then answers what is in flight for at most
/// `limits.shutdown_grace_secs`.
///
/// The listener comes bound (`keyward run` binds `listen.bootstrap` with [`bind_bootstrap`]; an
/// in-process test binds `127.0.0.1:0`) and the shutdown is a future (`keyward run`: SIGINT or
/// SIGTERM), as mini-redis's `server::run` takes them. Virtual broker
/// ports are still `listen.broker_port_base + node id`, bound by the port manager as brokers
/// are learned.
pub async fn run(
    shared: Arc<Shared>,
    bootstrap: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = bootstrap
        .local_addr()
        .context("the bootstrap listener's address")?;
    info!(%addr, region = %shared.config.region, "bootstrap listening");

    shared
        .tasks
        .spawn(Ports::manage(shared.clone()).instrument(info_span!("ports")));
    // One probe round before accepting clients: brokers are learned and their ports listen
    // before any client asks. It never moves reads: a cluster is down only after
    // `reads.down_after_failed_probes` failed probes in a row, at start as at any other time.
    shared.probe().round(false).await;
    listener::spawn_accept(&shared, bootstrap, Target::Bootstrap);
    shared.bootstrap_bound.store(true, Ordering::Relaxed);
    shared.publish();
    let probes = shared.clone();
    shared.tasks.spawn(
        async move {
            let publish = || probes.publish();
            probes.probe().run(probes.shutdown.clone(), publish).await;
        }
        .instrument(info_span!("probes")),
    );
    shared
        .tasks
        .spawn(alignment::check_at_start(shared.clone()).instrument(info_span!("alignment")));
    shared.tasks.spawn(
        replication::run(shared.clone(), shared.shutdown.clone())
            .instrument(info_span!("replication")),
    );
    shared.tasks.spawn(
        positions::run(shared.clone(), shared.shutdown.clone()).instrument(info_span!("positions")),
    );

    tokio::select! {
        () = shutdown => shared.shutdown.cancel(),
        () = shared.shutdown.cancelled() => {}
    }
    info!("shutting down: no new connections; answering what is in flight");
    shared.tasks.close();
    let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        warn!("connections still open after the grace period; exiting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_allows_its_burst_per_interval_and_counts_what_it_suppressed() {
        let limit = RateLimit::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(limit.allow_at(t0), Some(0));
        assert_eq!(limit.allow_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow_at(t0 + Duration::from_secs(9)), None);
        }
        // The next window: the first line says how many were left out.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limit.allow_at(t1), Some(5));
        assert_eq!(limit.allow_at(t1), Some(0));
        assert_eq!(limit.allow_at(t1), None);
        assert_eq!(limit.allow_at(t1 + Duration::from_secs(10)), Some(1));
    }

    #[test]
    fn only_other_regions_clusters_have_a_view_and_only_with_mirrored_names() {
        const CONFIG: &str = "region: eu\nlisten: { bootstrap: 127.0.0.1:9192, advertised_host: 127.0.0.1, broker_port_base: 9193 }\nclusters:\n  eu: { bootstrap: [\"127.0.0.1:19092\"] }\n  us: { bootstrap: [\"127.0.0.1:29092\"] }\nownership_file: o.yaml\n";
        let views = |extra: &str| {
            let config =
                Config::parse(&format!("{CONFIG}{extra}"), std::path::Path::new("k.yaml")).unwrap();
            let clusters = Clusters::new(&config);
            region_views(&config, &clusters)
        };
        let mirrored = views("");
        assert!(mirrored[0].is_none(), "the local cluster needs no view");
        let us = mirrored[1].as_ref().unwrap();
        assert_eq!(us.to_serving("orders").as_deref(), Some("eu.orders"));
        // MM2's separator as `replication` gives it.
        let custom = views("replication: { separator: _ }\n");
        assert_eq!(
            custom[1].as_ref().unwrap().to_serving("orders").as_deref(),
            Some("eu_orders")
        );
        assert!(
            views("reads: { topic_names: same }\n")
                .iter()
                .all(Option::is_none)
        );
    }
}
