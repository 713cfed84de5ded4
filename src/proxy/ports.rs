//! The port manager: one listener per virtual broker, opened when keyward learns of the broker.
//!
//! Brokers are learned from probes and from every response that lists brokers (a Metadata
//! rewrite, FindCoordinator, ...). Learning is synchronous and cheap: it records where the
//! broker really is and, the first time, sends a "broker learned" event to the manager task,
//! which binds `broker_bind:(broker_port_base + virtual id)` and starts its accept loop. No
//! socket is bound and no task spawned inside a rewrite, and no lock is held while binding.
//!
//! A client must not be told of a port before it listens, so whoever learned a broker waits
//! for its port with [`Ports::opened`] before passing the response on (it returns at once for
//! ports already open, which is every response but the first to name a broker).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use super::Shared;
use super::brokers::{Clusters, UnmappableNode};
use super::conn::Target;
use super::listener;

/// A virtual broker: (cluster index, real node id).
pub type Broker = (usize, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Asked of the manager, not bound yet.
    Opening,
    Open,
    /// Binding failed (logged); the next time the broker is learned it is tried again.
    Failed,
}

/// One "broker learned" event for the manager.
struct Learned {
    broker: Broker,
    virtual_id: i32,
    port: u16,
    real: String,
}

/// How long a response naming a new broker waits for its port at most. Binding a port takes
/// microseconds; this bounds a manager that is not running (shut down) or a stuck runtime.
const OPEN_WAIT: Duration = Duration::from_secs(5);

pub struct Ports {
    ports: watch::Sender<HashMap<Broker, Port>>,
    events: mpsc::UnboundedSender<Learned>,
    /// Taken by the manager task when the proxy runs.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Learned>>>,
}

/// What learning a broker gives the response that named it.
pub struct Advertised {
    pub virtual_id: i32,
    pub port: u16,
    /// The broker whose port is still opening: wait for it before telling a client.
    pub pending: Option<Broker>,
}

impl Default for Ports {
    fn default() -> Self {
        let (events, inbox) = mpsc::unbounded_channel();
        Self {
            ports: watch::Sender::new(HashMap::new()),
            events,
            inbox: Mutex::new(Some(inbox)),
        }
    }
}

impl Ports {
    /// Records that node `node_id` of `cluster` is at `host:port`, and asks for its virtual
    /// port the first time (or again after binding it failed).
    pub fn learn(
        &self,
        clusters: &Clusters,
        cluster: usize,
        node_id: i32,
        host: &str,
        port: i32,
    ) -> Result<Advertised, UnmappableNode> {
        let virtual_id = clusters.virtual_id(cluster, node_id)?;
        let virtual_port = clusters.port(virtual_id);
        clusters.get(cluster).learn(node_id, host, port);
        let broker = (cluster, node_id);
        let known = self.ports.borrow().get(&broker).copied();
        let pending = match known {
            Some(Port::Open) => None,
            Some(Port::Opening) => Some(broker),
            None | Some(Port::Failed) => {
                let asked = self
                    .ports
                    .send_if_modified(|ports| match ports.get(&broker) {
                        Some(Port::Open | Port::Opening) => false,
                        _ => {
                            ports.insert(broker, Port::Opening);
                            true
                        }
                    });
                if asked {
                    let real = format!("{host}:{port}");
                    let _ = self.events.send(Learned {
                        broker,
                        virtual_id,
                        port: virtual_port,
                        real,
                    });
                }
                Some(broker)
            }
        };
        Ok(Advertised {
            virtual_id,
            port: virtual_port,
            pending,
        })
    }

    /// Returns once every one of `brokers` has its port open or has failed to open it, or
    /// after [`OPEN_WAIT`].
    pub async fn opened(&self, brokers: &[Broker]) {
        if brokers.is_empty() {
            return;
        }
        let mut ports = self.ports.subscribe();
        let settled = ports.wait_for(|p| brokers.iter().all(|b| p.get(b) != Some(&Port::Opening)));
        let _ = tokio::time::timeout(OPEN_WAIT, settled).await;
    }

    /// The manager: binds each learned broker's port and starts its accept loop, until
    /// shutdown. Runs once per proxy.
    pub(super) async fn manage(shared: Arc<Shared>) {
        let taken = shared
            .ports
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut inbox) = taken else {
            return;
        };
        let bind_ip = shared.config.broker_bind();
        loop {
            let learned = tokio::select! {
                l = inbox.recv() => l,
                () = shared.shutdown.cancelled() => return,
            };
            let Some(Learned {
                broker: (cluster, node_id),
                virtual_id,
                port,
                real,
            }) = learned
            else {
                return;
            };
            let addr = SocketAddr::new(bind_ip, port);
            let name = &shared.clusters.get(cluster).name;
            let state = match listener::bind(addr) {
                Ok(l) => {
                    info!(cluster = %name, node_id, virtual_id, %addr, %real, "virtual broker listening");
                    listener::spawn_accept(&shared, l, Target::Node(cluster, node_id));
                    Port::Open
                }
                Err(e) => {
                    error!(cluster = %name, node_id, %addr, error = %e, "cannot listen for virtual broker");
                    Port::Failed
                }
            };
            shared.ports.ports.send_modify(|p| {
                p.insert((cluster, node_id), state);
            });
        }
    }
}
