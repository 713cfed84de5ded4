//! The admin HTTP server: Prometheus metrics and liveness, on `admin.listen` (loopback by
//! default). It never sees client traffic and never changes what the proxy decides.

use std::net::SocketAddr;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Installs the process-wide Prometheus recorder. Call once, before any metric is touched.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Binds the admin listener; a proxy whose admin port is taken does not start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin listener on {addr}"))?;
    info!(%addr, "admin listening");
    Ok(listener)
}

/// Serves the admin API until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(metrics));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("admin server")
}

async fn render_metrics(State(metrics): State<Arc<PrometheusHandle>>) -> String {
    metrics.render()
}
