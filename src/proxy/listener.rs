//! Accepting clients: the bootstrap listener and every virtual broker port run the same accept
//! loop. It enforces `limits.max_connections`, completes the client's TLS handshake when the
//! listeners speak TLS, and runs each connection as a task of the proxy's tracker, in a span,
//! until the connection ends, keyward shuts down, or the serving cluster changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, gauge};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tracing::{Instrument, info_span, warn};

use super::conn::{self, Target};
use super::stream::Stream;
use super::{RateLimit, Shared};
use crate::config::Config;
use crate::security::Security;

/// What the accept loops share: the connection limit and how connections are named.
pub(super) struct Accepting {
    /// One per open client connection, up to `limits.max_connections`.
    permits: Arc<Semaphore>,
    max_connections: usize,
    next_connection: AtomicU64,
    /// Refused connections and failed handshakes: a sample, not a line per client.
    refusal_log: RateLimit,
    tls_handshake_timeout: Duration,
}

impl Accepting {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            max_connections: config.limits.max_connections,
            next_connection: AtomicU64::new(1),
            refusal_log: RateLimit::new(Duration::from_secs(10), 1),
            tls_handshake_timeout: Duration::from_millis(config.limits.tls_handshake_timeout_ms),
        }
    }

    /// The client's side of the connection: TLS when the listeners speak it, with the
    /// handshake bounded by `limits.tls_handshake_timeout_ms`. Errs with the close cause.
    async fn handshake(
        &self,
        security: &Security,
        tcp: tokio::net::TcpStream,
    ) -> Result<Stream, &'static str> {
        let _ = tcp.set_nodelay(true);
        let Some(config) = security.listener() else {
            return Ok(Stream::Plain(tcp));
        };
        let timeout = self.tls_handshake_timeout;
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
}

/// Accepts clients on `listener` until shutdown, each connection relayed to `target`.
pub(super) fn spawn_accept(shared: &Arc<Shared>, listener: TcpListener, target: Target) {
    let listener_addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let span = info_span!("listener", addr = %listener_addr);
    shared
        .tasks
        .spawn(accept_loop(shared.clone(), listener, listener_addr, target).instrument(span));
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    listener_addr: String,
    target: Target,
) {
    let accepting = &shared.accepting;
    loop {
        // Shutdown first: clients queued in the backlog (they reconnect in a loop) must not keep
        // the listener open once keyward stops accepting.
        let accepted = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The permit lives as long as the connection's task: the limit is real.
        let Ok(permit) = accepting.permits.clone().try_acquire_owned() else {
            counter!("keyward_client_connections_refused_total").increment(1);
            if accepting.refusal_log.allow() {
                warn!(client = %peer, limit = accepting.max_connections, "connection refused: limits.max_connections reached");
            }
            drop(stream);
            continue;
        };
        let id = accepting.next_connection.fetch_add(1, Ordering::Relaxed);
        counter!("keyward_client_connections_opened_total").increment(1);
        let open = gauge!("keyward_client_connections_open");
        open.increment(1.0);
        let span = info_span!("conn", id, client = %peer, listener = %listener_addr);
        // Subscribed before the connection reads which cluster serves: a switch after this
        // point closes it.
        let mut serving = shared.serving.subscribe();
        let serving_now = *serving.borrow_and_update();
        let s = shared.clone();
        shared.tasks.spawn(
            async move {
                let _permit = permit;
                // Shutdown is handled inside: stop reading, answer what is in flight. A switch
                // of serving cluster closes at once.
                let serve = async {
                    match s.accepting.handshake(&s.security, stream).await {
                        Ok(client) => conn::serve(s.clone(), client, target, serving_now).await,
                        Err(cause) => cause,
                    }
                };
                let switched = async {
                    if serving.changed().await.is_err() {
                        // The proxy itself is going away; shutdown ends the connection.
                        std::future::pending::<()>().await;
                    }
                };
                let cause = tokio::select! {
                    cause = serve => cause,
                    () = switched => "serving_cluster_changed",
                };
                open.decrement(1.0);
                counter!("keyward_client_connections_closed_total", "cause" => cause).increment(1);
            }
            .instrument(span),
        );
    }
}

pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds `listen.bootstrap`, as `keyward run` does before [`super::run`]; a proxy whose
/// bootstrap port is taken does not start. Must be called inside the runtime.
pub fn bind_bootstrap(config: &Config) -> anyhow::Result<TcpListener> {
    bind(config.listen.bootstrap)
        .with_context(|| format!("listening on {}", config.listen.bootstrap))
}
