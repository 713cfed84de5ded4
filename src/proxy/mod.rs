//! Listeners, upstream connections, the per-connection pipeline that keeps responses in request
//! order, and the rewriting of broker addresses.
//!
//! Clients bootstrap at `listen.bootstrap`; every broker of the serving cluster gets a virtual
//! broker port (`broker_port_base + node id`, see [`brokers`]). Listeners for new brokers are
//! opened as soon as keyward learns of them, at start and from any response that lists brokers.

pub mod brokers;
pub mod conn;
pub mod meters;
pub mod produce;
pub mod rewrite;
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::reload::Ownership;
use brokers::{BrokerMap, UnmappableNode};
use conn::Target;

/// State shared by every connection of one keyward process.
pub struct Shared {
    pub config: Config,
    /// The ownership table in force. A request loads one snapshot and decides against it.
    pub ownership: Arc<Ownership>,
    pub brokers: BrokerMap,
    advertised_host: StrBytes,
    bound: Mutex<HashSet<i32>>,
    next_connection: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pub rejection_log: RateLimit,
    pub meters: meters::RequestMetrics,
    bootstrap_bound: AtomicBool,
    serving_cluster_up: AtomicBool,
}

impl Shared {
    pub fn new(config: Config, ownership: Arc<Ownership>) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            brokers: BrokerMap::new(config.listen.broker_port_base),
            advertised_host: StrBytes::from_string(config.listen.advertised_host.clone()),
            config,
            ownership,
            meters: meters::RequestMetrics::new(),
            bootstrap_bound: AtomicBool::new(false),
            serving_cluster_up: AtomicBool::new(false),
            bound: Mutex::new(HashSet::new()),
            next_connection: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            rejection_log: RateLimit::new(Duration::from_secs(1), 20),
        }))
    }

    /// What rewritten responses advertise in place of real brokers.
    pub fn advertiser(self: &Arc<Self>) -> Advertiser<'_> {
        Advertiser(self)
    }

    /// Learns a broker and makes sure its virtual port is listening.
    fn learn_broker(
        self: &Arc<Self>,
        node_id: i32,
        host: &str,
        port: i32,
    ) -> Result<u16, UnmappableNode> {
        let virtual_port = self.brokers.virtual_port(node_id)?;
        self.brokers.learn(node_id, host, port);
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if bound.insert(node_id) {
            let addr = SocketAddr::new(self.config.broker_bind(), virtual_port);
            match bind(addr) {
                Ok(listener) => {
                    info!(node_id, %addr, real = %format!("{host}:{port}"), "virtual broker listening");
                    self.spawn_accept(listener, Target::Node(node_id));
                }
                Err(e) => {
                    bound.remove(&node_id);
                    error!(node_id, %addr, error = %e, "cannot listen for virtual broker");
                }
            }
        }
        Ok(virtual_port)
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
                        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
                        counter!("keyward_client_connections_opened_total").increment(1);
                        let open = gauge!("keyward_client_connections_open");
                        open.increment(1.0);
                        let span =
                            info_span!("conn", id, client = %peer, listener = ?listener_addr);
                        let s = shared.clone();
                        let stop = shared.shutdown.clone();
                        shared.tasks.spawn(
                            async move {
                                let cause = tokio::select! {
                                    cause = conn::serve(s, stream, target) => cause,
                                    () = stop.cancelled() => "shutdown",
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
}

/// Advertises keyward's virtual brokers in place of real ones.
pub struct Advertiser<'a>(&'a Arc<Shared>);

impl rewrite::Advertise for Advertiser<'_> {
    fn advertise(
        &self,
        node_id: i32,
        real_host: &str,
        real_port: i32,
    ) -> Result<(StrBytes, i32), UnmappableNode> {
        let port = self.0.learn_broker(node_id, real_host, real_port)?;
        Ok((self.0.advertised_host.clone(), i32::from(port)))
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
    state: Mutex<(Instant, u32)>,
}

impl RateLimit {
    pub fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    pub fn allow(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= self.interval {
            *s = (now, 0);
        }
        s.1 += 1;
        s.1 <= self.burst
    }
}

/// Runs the proxy until `shutdown` is cancelled.
pub async fn run(shared: Arc<Shared>) -> anyhow::Result<()> {
    let bootstrap = bind(shared.config.listen.bootstrap)
        .with_context(|| format!("listening on {}", shared.config.listen.bootstrap))?;
    info!(addr = %shared.config.listen.bootstrap, region = %shared.config.region, "bootstrap listening");

    // Learn the serving cluster's brokers up front, so their ports listen before any client
    // asks; if the cluster is not reachable yet, they are learned from the first metadata.
    let cluster = &shared.config.local_cluster().bootstrap;
    let timeout = Duration::from_millis(shared.config.limits.connect_timeout_ms);
    match upstream::fetch_brokers(cluster, timeout).await {
        Ok(found) => {
            shared.serving_cluster_up.store(true, Ordering::Relaxed);
            for (node_id, host, port) in found {
                if let Err(e) = shared.learn_broker(node_id, &host, port) {
                    error!(error = %e, "serving cluster broker cannot be mapped");
                }
            }
        }
        Err(e) => warn!(error = %e, "serving cluster not reachable yet"),
    }
    shared.spawn_accept(bootstrap, Target::Bootstrap);
    shared.bootstrap_bound.store(true, Ordering::Relaxed);
    shared.tasks.spawn(probe_clusters(shared.clone()));

    shared.shutdown.cancelled().await;
    shared.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait())
        .await
        .is_err()
    {
        warn!("connections still open after the grace period; exiting");
    }
    Ok(())
}

impl Shared {
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
        if !self.serving_cluster_up.load(Ordering::Relaxed) {
            return Some(format!(
                "the serving cluster ({}) does not answer metadata requests",
                self.config.region
            ));
        }
        None
    }
}

/// How often every cluster is asked for metadata. A probe is a Metadata request listing no
/// topics: it shows the cluster answers, and on the serving cluster it also teaches keyward
/// brokers that joined since start.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

async fn probe_clusters(shared: Arc<Shared>) {
    let timeout =
        Duration::from_millis(shared.config.limits.connect_timeout_ms).min(PROBE_INTERVAL);
    loop {
        for (region, cluster) in &shared.config.clusters {
            let up = match upstream::fetch_brokers(&cluster.bootstrap, timeout).await {
                Ok(brokers) => {
                    if *region == shared.config.region {
                        for (node_id, host, port) in brokers {
                            if let Err(e) = shared.learn_broker(node_id, &host, port) {
                                error!(error = %e, "serving cluster broker cannot be mapped");
                            }
                        }
                    }
                    true
                }
                Err(e) => {
                    warn!(cluster = %region, error = %e, "cluster probe failed");
                    false
                }
            };
            if *region == shared.config.region {
                shared.serving_cluster_up.store(up, Ordering::Relaxed);
            }
            gauge!("keyward_cluster_up", "cluster" => region.clone()).set(if up {
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
        tokio::select! {
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
            () = shared.shutdown.cancelled() => return,
        }
    }
}
