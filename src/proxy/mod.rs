//! Listeners, upstream connections, the per-connection pipeline that keeps responses in request
//! order, and the rewriting of broker addresses.
//!
//! Clients bootstrap at `listen.bootstrap`; every broker of the serving cluster gets a virtual
//! broker port (`broker_port_base + node id`, see [`brokers`]). Listeners for new brokers are
//! opened as soon as keyward learns of them, at start and from any response that lists brokers.

pub mod brokers;
pub mod conn;
pub mod produce;
pub mod rewrite;
pub mod upstream;
pub mod versions;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use kafka_protocol::protocol::StrBytes;
use metrics::counter;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::ownership::{RegionId, Table};
use brokers::{BrokerMap, UnmappableNode};
use conn::Target;

/// State shared by every connection of one keyward process.
pub struct Shared {
    pub config: Config,
    /// The ownership table in force. A request loads it once and decides against that snapshot.
    pub table: ArcSwap<Table>,
    /// The region this instance writes for.
    pub local: RegionId,
    pub brokers: BrokerMap,
    advertised_host: StrBytes,
    bound: Mutex<HashSet<i32>>,
    next_connection: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pub rejection_log: RateLimit,
}

impl Shared {
    pub fn new(config: Config, table: Table) -> anyhow::Result<Arc<Self>> {
        let local = table
            .region_id(&config.region)
            .with_context(|| format!("region {:?} is not in the ownership table", config.region))?;
        Ok(Arc::new(Self {
            brokers: BrokerMap::new(config.listen.broker_port_base),
            advertised_host: StrBytes::from_string(config.listen.advertised_host.clone()),
            config,
            table: ArcSwap::from_pointee(table),
            local,
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
                        let span =
                            info_span!("conn", id, client = %peer, listener = ?listener_addr);
                        let s = shared.clone();
                        let stop = shared.shutdown.clone();
                        shared.tasks.spawn(
                            async move {
                                tokio::select! {
                                    () = conn::serve(s, stream, target) => {}
                                    () = stop.cancelled() => {}
                                }
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
            for (node_id, host, port) in found {
                if let Err(e) = shared.learn_broker(node_id, &host, port) {
                    error!(error = %e, "serving cluster broker cannot be mapped");
                }
            }
        }
        Err(e) => warn!(error = %e, "serving cluster not reachable yet"),
    }
    shared.spawn_accept(bootstrap, Target::Bootstrap);

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
}
