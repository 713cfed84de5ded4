//! keyward: a Kafka wire-protocol proxy that enforces regional write ownership.
//!
//! # Layout
//!
//! - [`config`]: the static config file (`keyward.yaml`): region, listeners, clusters.
//! - [`ownership`]: the ownership table (`ownership.yaml`): parsing, validation, murmur2 and the
//!   pure lookup "who owns this key / header / key part / partition / topic".
//! - [`redirect`]: `on_foreign: redirect`: keyward's own producer on other regions' clusters,
//!   and the sequence bookkeeping that keeps idempotent producers whole.
//! - [`reload`]: the table in force ([`reload::Snapshot`]) and its hot reload (file watch,
//!   SIGHUP, admin API).
//! - [`codec`]: Kafka framing, request/response headers and record-batch inspection. Pure parsing,
//!   no sockets.
//! - [`policy`]: pure decisions over a decoded Produce request and one ownership snapshot.
//! - [`admin`]: the admin HTTP server (Prometheus metrics, liveness, the ownership map page).
//! - [`cli`]: what the `keyward` subcommands do; [`moves`]: `keyward move`, across a fleet.
//! - [`proxy`]: listeners, upstream connections, the per-connection pipeline that keeps responses
//!   in request order ([`proxy::conn`]), and one handler per API keyward reads
//!   ([`proxy::handlers`]: Produce's ownership decisions, the rewriting of broker addresses).

/// keyward's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit keyward was built from (`build.rs`), or "unknown".
pub const COMMIT: &str = env!("KEYWARD_COMMIT");
/// What `keyward --version` prints after the name: version and commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEYWARD_COMMIT"),
    ")"
);

pub mod admin;
pub mod cli;
pub mod codec;
pub mod config;
pub mod moves;
pub mod ownership;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod security;
#[cfg(test)]
mod testkit;
