//! The admin HTTP API, on `admin.listen` (loopback by default): metrics, health and readiness,
//! the ownership table in force, "who owns this?", and reload. It never sees client traffic.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the ownership map: one HTML page, no external assets, polling the two routes below |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200, or 503 with the reason (listener not bound, serving cluster down) |
//! | `GET /ownership` | JSON: version, hash, loaded-at, source file, the canonical table, last reload error |
//! | `GET /ownership/map` | as `/ownership`, with each rule's `parts`: who writes each slot range, value list, partition range or topic after takeover and frozen |
//! | `GET /decisions` | JSON: records decided per rule of the table in force, by decision, from the `/metrics` counters |
//! | `GET /replication` | JSON: MirrorMaker 2's lag per region pair, topic and partition as last measured; 404 when `replication` is not configured |
//! | `GET /ownership/owner?topic=T&key=K` (or `header=NAME=VALUE`, `partition=N`, `null_key=true`; the `keyward owner` flags) | the `keyward owner` line |
//! | `PUT /ownership` (body: the table file; `If-Match: <hash of the table in force>`) | writes the file and puts it in force: 200 with the outcome, 412 with the current hash if it changed, 422 for an invalid table, 409 if the file cannot be written; needs the bearer token as `POST /reload` does |
//! | `POST /reload` | 200 with the outcome, or 422 with the validation error; 401 without the bearer token when `admin.reload_token_file` is set |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ownership;
use crate::proxy::Shared;
use crate::reload::{Outcome, ReplaceError, Trigger};
use crate::security;

mod decisions;

/// The ownership map page: HTML, CSS and script in one file, built into the binary.
const MAP_PAGE: &str = include_str!("admin/map.html");

/// The page may load nothing from anywhere: its own inline script and style, and requests to
/// the admin API it came from.
const MAP_PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Installs the process-wide Prometheus recorder. Call once, before any metric is touched.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("keyward_request_duration_seconds".to_owned()),
            LATENCY_BUCKETS,
        )
        .context("latency buckets")?
        .set_buckets_for_metric(
            Matcher::Prefix("keyward_journal_".to_owned()),
            LATENCY_BUCKETS,
        )
        .context("journal latency buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Which build runs where: one series, always 1, joined onto others by instance.
    metrics::gauge!("keyward_build_info", "version" => crate::VERSION, "commit" => crate::COMMIT)
        .set(1.0);
    Ok(handle)
}

/// Request latency buckets (seconds): from 50 µs (keyward's own share of a request) to 10 s (a
/// broker holding a fetch or a produce waiting for replicas).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Binds the admin listener; a proxy whose admin port is taken does not start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin listener on {addr}"))?;
    info!(%addr, "admin listening");
    Ok(listener)
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    shared: Arc<Shared>,
}

/// Serves the admin API until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(map_page))
        .route("/ownership", get(ownership_json).put(replace_table))
        .route("/ownership/map", get(ownership_map))
        .route("/decisions", get(decisions))
        .route("/replication", get(replication))
        .route("/ownership/owner", get(owner))
        .route("/reload", post(reload))
        .with_state(AdminState { metrics, shared });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("admin server")
}

async fn render_metrics(State(s): State<AdminState>) -> String {
    s.metrics.render()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.shared.not_ready() {
        None => "ready\n".into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

async fn ownership_json(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(ownership_document(&s, |table| table.canonical_json()))
}

/// `/ownership` with the table as the map draws it ([`ownership::Table::map_json`]).
async fn ownership_map(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(ownership_document(&s, ownership::Table::map_json))
}

/// What `/ownership` and `/ownership/map` answer, with `table` as `table_json` writes it.
fn ownership_document(
    s: &AdminState,
    table_json: impl FnOnce(&ownership::Table) -> serde_json::Value,
) -> serde_json::Value {
    let ownership = &s.shared.ownership;
    let snapshot = ownership.snapshot();
    let last_error = ownership.last_error().map(|e| {
        json!({
            "message": e.message,
            "at": rfc3339(e.at),
            "trigger": e.trigger.as_str(),
        })
    });
    let serving = s.shared.serving.index();
    json!({
        "region": s.shared.config.region,
        "reads": {
            "serving": s.shared.clusters.get(serving).name,
            "view": s.shared.view(serving).map(|v| v.describe()),
            "failback": s.shared.failback.current().map(|w| w.describe()),
            "positions_kept": s.shared.positions.load().describe(&s.shared),
        },
        "version": snapshot.version,
        "hash": snapshot.hash,
        "loaded_at": rfc3339(snapshot.loaded_at),
        "source": ownership.path().display().to_string(),
        "last_reload_error": last_error,
        "table": table_json(&snapshot.table),
    })
}

/// Read-only, like `/ownership`: no token, whatever `admin.reload_token_file` says.
async fn map_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, MAP_PAGE_POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        MAP_PAGE,
    )
        .into_response()
}

async fn decisions(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let snapshot = s.shared.ownership.snapshot();
    let rules: Vec<&str> = snapshot
        .table
        .rules()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    Json(json!({
        "version": snapshot.version,
        "records": decisions::per_rule(&s.metrics.render(), &rules),
    }))
}

/// The last measurement of MirrorMaker 2's lag (`crate::policy::replication::Report`).
/// Read-only, like `/ownership`: no token.
async fn replication(State(s): State<AdminState>) -> Response {
    match s
        .shared
        .replication
        .report(s.shared.config.replication.as_ref())
    {
        Some(report) => Json(report.as_ref().clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "replication lag is not measured: add a replication section to keyward.yaml"})),
        )
            .into_response(),
    }
}

/// The same parameters as `keyward owner`'s flags, read by the same parser
/// ([`ownership::Query::parse`]); a query it refuses is a 400 with its message.
async fn owner(
    State(s): State<AdminState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let params = params.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    let query = match ownership::Query::parse(params) {
        Ok(query) => query,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let snapshot = s.shared.ownership.snapshot();
    format!(
        "{}\n",
        snapshot.table.explain(&query.subject(), snapshot.local)
    )
    .into_response()
}

/// `None` when the request may change the table: it carries the bearer token of
/// `admin.reload_token_file`, or none is configured (then the admin listener is loopback, or
/// `allow_unauthenticated_reload` says anyone who reaches it may). Otherwise the 401 to answer.
fn refused(s: &AdminState, headers: &HeaderMap, what: &str) -> Option<Response> {
    let token = s.shared.security.reload_token()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
        return None;
    }
    metrics::counter!("keyward_admin_unauthorized_total").increment(1);
    warn!("{what} without the right bearer token; refused");
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{what} needs Authorization: Bearer <the token in admin.reload_token_file>\n"),
        )
            .into_response(),
    )
}

/// `PUT /ownership`: the body becomes the table file and is put in force, if the table in
/// force has the hash the `If-Match` header names (428 without one, 412 with the current hash
/// when it differs), and the body is a valid table (422 with the error, nothing written).
/// `keyward move` changes the table of every instance this way.
async fn replace_table(State(s): State<AdminState>, headers: HeaderMap, body: String) -> Response {
    if let Some(refusal) = refused(&s, &headers, "PUT /ownership") {
        return refusal;
    }
    let Some(expected) = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_matches('"').to_owned())
    else {
        return (
            StatusCode::PRECONDITION_REQUIRED,
            "PUT /ownership needs If-Match: <the hash of the table it replaces>\n",
        )
            .into_response();
    };
    let ownership = s.shared.ownership.clone();
    let replaced = tokio::task::spawn_blocking(move || ownership.replace(&body, &expected)).await;
    let (status, body) = match replaced {
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"result": "error", "error": format!("replace task failed: {e}")}),
        ),
        Ok(Ok(Outcome::Loaded {
            version,
            hash,
            changes,
            load,
        })) => (
            StatusCode::OK,
            json!({"result": "loaded", "version": version, "hash": hash, "changes": changes, "load_ms": load.as_secs_f64() * 1e3}),
        ),
        Ok(Ok(Outcome::Unchanged { version, hash })) => (
            StatusCode::OK,
            json!({"result": "unchanged", "version": version, "hash": hash}),
        ),
        Ok(Ok(Outcome::Failed(e))) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"result": "error", "error": e.to_string()}),
        ),
        Ok(Err(ReplaceError::Changed { current, .. })) => (
            StatusCode::PRECONDITION_FAILED,
            json!({"result": "changed", "hash": current}),
        ),
        Ok(Err(e @ ReplaceError::Invalid(_))) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"result": "error", "error": e.to_string()}),
        ),
        Ok(Err(e @ (ReplaceError::Unwritable { .. } | ReplaceError::Raced(_)))) => (
            StatusCode::CONFLICT,
            json!({"result": "error", "error": e.to_string()}),
        ),
    };
    (status, Json(body)).into_response()
}

async fn reload(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&s, &headers, "POST /reload") {
        return refusal;
    }
    let (ownership, security) = (s.shared.ownership.clone(), s.shared.security.clone());
    let reloaded = tokio::task::spawn_blocking(move || {
        crate::reload::reload_all(&ownership, &security, Trigger::Api)
    })
    .await;
    let (table, tls) = match reloaded {
        Ok(o) => o,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload task failed: {e}\n"),
            )
                .into_response();
        }
    };
    let tls_json = match &tls {
        security::Outcome::Failed(e) => json!({"result": "error", "error": e}),
        other => json!({"result": other.as_str()}),
    };
    let mut body = match table {
        Outcome::Loaded {
            version,
            hash,
            changes,
            load,
        } => {
            json!({"result": "loaded", "version": version, "hash": hash, "changes": changes, "load_ms": load.as_secs_f64() * 1e3})
        }
        Outcome::Unchanged { version, hash } => {
            json!({"result": "unchanged", "version": version, "hash": hash})
        }
        Outcome::Failed(e) => json!({"result": "error", "error": e.to_string()}),
    };
    let failed = body["result"] == "error" || matches!(tls, security::Outcome::Failed(_));
    body["tls"] = tls_json;
    let status = if failed {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Compares without an early exit, so response timing does not reveal how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
