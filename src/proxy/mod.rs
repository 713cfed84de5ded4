//! Listeners, upstream connections, the per-connection pipeline that keeps responses in request
//! order, the rewriting of broker addresses, and the choice of serving cluster.
//!
//! Clients bootstrap at `listen.bootstrap`; every broker of every cluster gets a virtual broker
//! port (see [`brokers`]), opened as soon as keyward learns of the broker, from its probes and
//! from any response that lists brokers. Only the serving cluster's ports accept connections.

pub mod alignment;
pub mod brokers;
pub mod conn;
pub mod handlers;
pub mod identity;
pub mod meters;
pub mod produce;
pub mod rewrite;
pub mod sasl;
pub mod stream;
pub mod upstream;
pub mod versions;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kafka_protocol::protocol::StrBytes;
use metrics::{counter, gauge};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::redirect::Redirector;
use crate::reload::Ownership;
use crate::security::Security;
use brokers::{Clusters, Health, UnmappableNode};
use conn::Target;
use stream::Stream;
use upstream::Dialer;

/// State shared by every connection of one keyward process.
pub struct Shared {
    pub config: Config,
    /// The ownership table in force. A request loads one snapshot and decides against it.
    pub ownership: Arc<Ownership>,
    /// TLS material and credentials in force (reloaded with the table).
    pub security: Arc<Security>,
    pub clusters: Clusters,
    /// How to reach each cluster, by cluster index.
    pub dialers: Vec<Dialer>,
    advertised_host: StrBytes,
    /// Virtual broker listeners opened so far: (cluster index, real node id).
    bound: Mutex<HashSet<(usize, i32)>>,
    next_connection: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pub rejection_log: RateLimit,
    refusal_log: RateLimit,
    /// "cannot reach the broker" lines: one per client connection otherwise, so a broker that
    /// is down (or a cluster switch in progress) with thousands of clients reconnecting would
    /// flood the log.
    pub unreachable_log: RateLimit,
    /// The decompression memory all connections share (`limits.max_decompressed_bytes_total`).
    pub decompression_budget: Arc<crate::codec::records::DecompressionBudget>,
    /// One per open client connection, up to `limits.max_connections`.
    connection_permits: Arc<Semaphore>,
    pub meters: meters::RequestMetrics,
    /// keyward's own producer on the other regions' clusters (`on_foreign: redirect`).
    pub redirector: Redirector,
    bootstrap_bound: AtomicBool,
}

impl Shared {
    pub fn new(
        config: Config,
        ownership: Arc<Ownership>,
        security: Arc<Security>,
    ) -> anyhow::Result<Arc<Self>> {
        let clusters = Clusters::new(&config);
        let max_connections = config.limits.max_connections;
        register_metrics(&clusters, security.listener().is_some());
        let timeout = Duration::from_millis(config.limits.connect_timeout_ms);
        let dialers: Vec<Dialer> = clusters
            .all()
            .iter()
            .map(|c| Dialer::new(c.name.clone(), security.clone(), timeout))
            .collect();
        let redirector = Redirector::new(
            clusters
                .all()
                .iter()
                .zip(&dialers)
                .map(|(c, d)| (c.bootstrap.clone(), d.clone())),
        );
        let decompression_budget = crate::codec::records::DecompressionBudget::new(
            config.limits.max_decompressed_bytes_total,
        );
        Ok(Arc::new(Self {
            clusters,
            dialers,
            security,
            redirector,
            advertised_host: StrBytes::from_string(config.listen.advertised_host.clone()),
            config,
            ownership,
            bound: Mutex::new(HashSet::new()),
            next_connection: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            rejection_log: RateLimit::new(Duration::from_secs(1), 20),
            refusal_log: RateLimit::new(Duration::from_secs(10), 1),
            unreachable_log: RateLimit::new(Duration::from_secs(10), 5),
            decompression_budget,
            connection_permits: Arc::new(Semaphore::new(max_connections)),
            meters: meters::RequestMetrics::new(),
            bootstrap_bound: AtomicBool::new(false),
        }))
    }

    /// What responses from cluster `cluster` advertise in place of its real brokers.
    pub fn advertiser(self: &Arc<Self>, cluster: usize) -> Advertiser<'_> {
        Advertiser {
            shared: self,
            cluster,
        }
    }

    /// Learns a broker of `cluster`, makes sure its virtual port is listening, and returns its
    /// virtual node id and port.
    fn learn_broker(
        self: &Arc<Self>,
        cluster: usize,
        node_id: i32,
        host: &str,
        port: i32,
    ) -> Result<(i32, u16), UnmappableNode> {
        let virtual_id = self.clusters.virtual_id(cluster, node_id)?;
        let virtual_port = self.clusters.port(virtual_id);
        self.clusters.get(cluster).learn(node_id, host, port);
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if bound.insert((cluster, node_id)) {
            let addr = SocketAddr::new(self.config.broker_bind(), virtual_port);
            let name = &self.clusters.get(cluster).name;
            match bind(addr) {
                Ok(listener) => {
                    info!(cluster = %name, node_id, virtual_id, %addr, real = %format!("{host}:{port}"), "virtual broker listening");
                    self.spawn_accept(listener, Target::Node(cluster, node_id));
                }
                Err(e) => {
                    bound.remove(&(cluster, node_id));
                    error!(cluster = %name, node_id, %addr, error = %e, "cannot listen for virtual broker");
                }
            }
        }
        Ok((virtual_id, virtual_port))
    }

    fn spawn_accept(self: &Arc<Self>, listener: TcpListener, target: Target) {
        let shared = self.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let listener_addr = listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string());
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = shutdown.cancelled() => return,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        // The permit lives as long as the connection's task: the limit is real.
                        let Ok(permit) = shared.connection_permits.clone().try_acquire_owned() else {
                            counter!("keyward_client_connections_refused_total").increment(1);
                            if shared.refusal_log.allow() {
                                warn!(client = %peer, limit = shared.config.limits.max_connections, "connection refused: limits.max_connections reached");
                            }
                            drop(stream);
                            continue;
                        };
                        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
                        counter!("keyward_client_connections_opened_total").increment(1);
                        let open = gauge!("keyward_client_connections_open");
                        open.increment(1.0);
                        let span = info_span!("conn", id, client = %peer, listener = %listener_addr);
                        let s = shared.clone();
                        let switched = shared.clusters.epoch();
                        shared.tasks.spawn(
                            async move {
                                let _permit = permit;
                                // Shutdown is handled inside: stop reading, answer what is in
                                // flight. A switch of serving cluster closes at once.
                                let serve = async {
                                    match s.handshake(stream).await {
                                        Ok(client) => conn::serve(s.clone(), client, target).await,
                                        Err(cause) => cause,
                                    }
                                };
                                let cause = tokio::select! {
                                    cause = serve => cause,
                                    () = switched.cancelled() => "serving_cluster_changed",
                                };
                                open.decrement(1.0);
                                counter!("keyward_client_connections_closed_total", "cause" => cause)
                                    .increment(1);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }

    /// The client's side of the connection: TLS when the listeners speak it, with the
    /// handshake bounded by `limits.tls_handshake_timeout_ms`. Errs with the close cause.
    async fn handshake(&self, tcp: tokio::net::TcpStream) -> Result<Stream, &'static str> {
        let _ = tcp.set_nodelay(true);
        let Some(config) = self.security.listener() else {
            return Ok(Stream::Plain(tcp));
        };
        let timeout = Duration::from_millis(self.config.limits.tls_handshake_timeout_ms);
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let (result, cause) = match tokio::time::timeout(timeout, accept).await {
            Ok(Ok(tls)) => {
                counter!("keyward_tls_handshakes_total", "result" => "ok").increment(1);
                return Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))));
            }
            Ok(Err(e)) => ("error", e.to_string()),
            Err(_) => ("timeout", format!("no handshake within {timeout:?}")),
        };
        counter!("keyward_tls_handshakes_total", "result" => result).increment(1);
        if self.refusal_log.allow() {
            warn!(error = %cause, "client TLS handshake failed; closing the connection");
        }
        Err("tls_handshake_failed")
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
        let serving = self.clusters.serving();
        if !serving.is_up() {
            return Some(format!(
                "the serving cluster ({}) does not answer metadata requests",
                serving.name
            ));
        }
        None
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
    ] {
        counter!(name).absolute(0);
    }
    gauge!("keyward_client_connections_open").set(0.0);
}

/// Advertises keyward's virtual brokers in place of one cluster's real ones.
pub struct Advertiser<'a> {
    shared: &'a Arc<Shared>,
    cluster: usize,
}

impl rewrite::Advertise for Advertiser<'_> {
    fn advertise(
        &self,
        node_id: i32,
        real_host: &str,
        real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
        let (virtual_id, port) =
            self.shared
                .learn_broker(self.cluster, node_id, real_host, real_port)?;
        Ok((
            virtual_id,
            self.shared.advertised_host.clone(),
            i32::from(port),
        ))
    }

    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
        self.shared.clusters.virtual_id(self.cluster, node_id)
    }

    fn renumbers(&self) -> bool {
        self.shared.clusters.get(self.cluster).node_offset != 0
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Allows a bounded number of events per interval; used so that a flood of refused writes logs
/// a sample instead of one line per batch (the metrics count every one).
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

/// Binds `listen.bootstrap`, as `keyward run` does before [`run`]; a proxy whose bootstrap
/// port is taken does not start. Must be called inside the runtime.
pub fn bind_bootstrap(config: &Config) -> anyhow::Result<TcpListener> {
    bind(config.listen.bootstrap)
        .with_context(|| format!("listening on {}", config.listen.bootstrap))
}

/// Serves clients that connect to `bootstrap` until [`Shared::shutdown_token`] is cancelled,
/// then answers what is in flight for at most `limits.shutdown_grace_secs`.
///
/// The listener comes bound (`keyward run` binds `listen.bootstrap` with [`bind_bootstrap`]; an
/// in-process test binds `127.0.0.1:0`), as mini-redis's `server::run` takes one. Virtual broker
/// ports are still `listen.broker_port_base + node id`, bound here as brokers are learned.
pub async fn run(shared: Arc<Shared>, bootstrap: TcpListener) -> anyhow::Result<()> {
    let addr = bootstrap
        .local_addr()
        .context("the bootstrap listener's address")?;
    info!(%addr, region = %shared.config.region, "bootstrap listening");

    // One probe round before accepting clients: brokers are learned (their ports listen before
    // any client asks). It never moves reads: a cluster is down only after
    // `reads.down_after_failed_probes` failed probes in a row, at start as at any other time.
    probe_round(&shared, false).await;
    shared.spawn_accept(bootstrap, Target::Bootstrap);
    shared.bootstrap_bound.store(true, Ordering::Relaxed);
    gauge!("keyward_ready").set(if shared.not_ready().is_none() {
        1.0
    } else {
        0.0
    });
    shared.tasks.spawn(probe_clusters(shared.clone()));
    shared
        .tasks
        .spawn(alignment::check_at_start(shared.clone()));

    shared.shutdown.cancelled().await;
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

/// Probes every cluster with a Metadata request listing no topics: it shows the cluster
/// answers, measures its round trip, and teaches keyward brokers that joined since start.
/// Then, unless `may_switch` is false, it serves from the cluster whose turn it is.
async fn probe_round(shared: &Arc<Shared>, may_switch: bool) {
    let timeout = Duration::from_millis(shared.config.reads.probe_timeout_ms);
    for (index, cluster) in shared.clusters.all().iter().enumerate() {
        let started = Instant::now();
        let probe = upstream::fetch_brokers(&shared.dialers[index], &cluster.bootstrap);
        let answer = tokio::time::timeout(timeout, probe)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {timeout:?}")));
        let failure = match answer {
            Ok(brokers) => {
                for (node_id, host, port) in brokers {
                    if let Err(e) = shared.learn_broker(index, node_id, &host, port) {
                        error!(error = %e, "broker cannot be mapped");
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let up = failure.is_none();
        let now = Instant::now();
        let probed = cluster.probed(up, (now - started).as_micros() as u64, now);
        let down_after = shared.config.reads.down_after_failed_probes;
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
        gauge!("keyward_cluster_up", "cluster" => cluster.name.clone()).set(
            if probed.health == Health::Up {
                1.0
            } else {
                0.0
            },
        );
    }
    if !may_switch {
        // The round at start only learns: a cluster that does not answer its first probe (a
        // local cluster still electing its controller) is not down yet.
        publish_serving(shared);
        return;
    }

    let hold_down = Duration::from_millis(shared.config.reads.hold_down_ms);
    let current = shared.clusters.serving_index();
    let next = shared.clusters.choose(Instant::now(), hold_down);
    if next != current {
        let (from, to) = (
            &shared.clusters.get(current).name,
            &shared.clusters.get(next).name,
        );
        warn!(from = %from, to = %to, "serving cluster changes; closing client connections so they reconnect to it");
        counter!("keyward_serving_cluster_switches_total", "to" => to.clone()).increment(1);
        shared.clusters.switch_to(next);
    }
    publish_serving(shared);
}

fn publish_serving(shared: &Shared) {
    // Sampled here, once per probe round, rather than on every change on the produce path.
    gauge!("keyward_decompression_bytes").set(shared.decompression_budget.used() as f64);
    for (index, cluster) in shared.clusters.all().iter().enumerate() {
        let serving = shared.clusters.serving_index() == index;
        gauge!("keyward_serving_cluster", "cluster" => cluster.name.clone()).set(if serving {
            1.0
        } else {
            0.0
        });
    }
    gauge!("keyward_ready").set(if shared.not_ready().is_none() {
        1.0
    } else {
        0.0
    });
}

async fn probe_clusters(shared: Arc<Shared>) {
    let interval = Duration::from_millis(shared.config.reads.probe_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shared.shutdown.cancelled() => return,
        }
        probe_round(&shared, true).await;
    }
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
}
