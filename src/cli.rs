//! What the `keyward` subcommands do, kept out of `main.rs` so they can be tested.

use std::fmt::Write as _;
use std::path::Path;

use std::sync::Arc;

use anyhow::Context;
use tracing::Instrument;

use crate::config::Config;
use crate::ownership::{Query, Table};
use crate::policy::alignment;
use crate::proxy::upstream::{Dialer, fetch_topics};
use crate::proxy::{self, Shared};
use crate::reload::{self, Ownership};
use crate::security::Security;

/// Loads the static config and the table it points to, validating both.
pub fn load(config: &Path) -> anyhow::Result<(Config, Table)> {
    let config = Config::load(config)?;
    let table = Table::load(&config.ownership_path(), &config.regions())?;
    Ok((config, table))
}

/// Raises the soft limit on open files to the hard limit: every client connection takes two
/// descriptors (the client's and the broker's), so the soft default of 1024 on many systems
/// would refuse connections long before `limits.max_connections`. Logs the limit in force, and
/// warns when it cannot hold `limits.max_connections` connections.
fn raise_file_limit(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = match (limit.current, limit.maximum) {
        (Some(soft), hard) if hard.is_none_or(|h| h > soft) => {
            let wanted = rustix::process::Rlimit {
                current: hard,
                maximum: hard,
            };
            match setrlimit(Resource::Nofile, wanted) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, ?hard, error = %e, "could not raise the open-file limit");
                    Some(soft)
                }
            }
        }
        (soft, _) => soft,
    };
    // Two per connection, plus listeners, keyward's own connections and files.
    let needed = (config.limits.max_connections as u64).saturating_mul(2) + 256;
    match raised {
        Some(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what limits.max_connections needs (2 per connection \
             and 256 more); raise it (systemd: LimitNOFILE) or lower limits.max_connections"
        ),
        _ => tracing::info!(limit = ?raised, "open-file limit"),
    }
}

/// `keyward check`: the summary printed when the config, the table and every certificate,
/// key and secret it names are valid.
pub fn check(config: &Path) -> anyhow::Result<String> {
    let (config, table) = load(config)?;
    Security::load(&config)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config {} is valid: region {}, bootstrap {}, clusters {}",
        config.source.display(),
        config.region,
        config.listen.bootstrap,
        config.regions().join(", ")
    );
    if config.listen.tls.is_some() {
        let _ = writeln!(out, "client listeners speak TLS; certificates are valid");
    }
    let _ = writeln!(out, "ownership table {} is valid", table.source().display());
    out.push_str(&table.summary());
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// `keyward check --clusters`: asks every configured cluster for its topics' partition counts
/// and names the topics whose count does not line up with their `by: key` rule's slots (even the
/// murmur2 partitioner then mixes owners in a batch, which keyward refuses whole). Findings are
/// warnings, and so is a cluster that cannot be reached from where the check runs: the config
/// is valid either way, so they do not fail the check.
pub fn check_clusters(config: &Path) -> anyhow::Result<String> {
    let (config, table) = load(config)?;
    let security = Arc::new(Security::load(&config)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let clusters = crate::proxy::brokers::Clusters::new(&config);
    let timeout = std::time::Duration::from_millis(config.limits.connect_timeout_ms);
    let mut out = String::new();
    for cluster in clusters.all() {
        let dialer = Dialer::new(cluster.name.clone(), security.clone(), timeout);
        let fetched = runtime.block_on(fetch_topics(&dialer, &cluster.bootstrap));
        let topics = match fetched {
            Ok(topics) => topics,
            Err(e) => {
                let _ = writeln!(
                    out,
                    "warning: cluster {} cannot be reached ({e:#}); its topics were not checked",
                    cluster.name
                );
                continue;
            }
        };
        let found = alignment::misaligned(
            &table,
            topics
                .iter()
                .map(|(name, count, _)| (name.as_str(), *count)),
        );
        let _ = writeln!(
            out,
            "cluster {}: {} topics, {} with a partition count that is not a multiple of its by: key rule's slots",
            cluster.name,
            topics.len(),
            found.len()
        );
        for m in found {
            let _ = writeln!(out, "warning: cluster {}: {m}", cluster.name);
        }
    }
    Ok(out)
}

/// `keyward owner`: one line naming the owner, as the proxy would decide it in this region.
/// The query is read with [`Query::parse`], as the admin API reads its parameters.
pub fn owner(config: &Path, query: &Query) -> anyhow::Result<String> {
    let (config, table) = load(config)?;
    let local = table
        .region_id(&config.region)
        .context("the config's region is not in the table")?;
    Ok(table.explain(&query.subject(), local))
}

/// `keyward run`: serve until SIGINT or SIGTERM.
pub fn run(config: &Path) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    raise_file_limit(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let metrics = crate::admin::install_recorder()?;
    install_panic_hook();
    let ownership = Arc::new(Ownership::load(
        &config.ownership_path(),
        &config.regions(),
        &config.region,
    )?);
    let security = Arc::new(Security::load(&config)?);
    runtime.block_on(async move {
        let bootstrap = proxy::bind_bootstrap(&config)?;
        let admin_listener = crate::admin::bind(config.admin.listen).await?;
        let shared = Shared::new(config, ownership.clone(), security.clone())?;
        let stop = shared.shutdown_token();
        // The process's own tasks beside the proxy's: each in a span, each ending on `stop`,
        // all waited for before exit.
        let tasks = tokio_util::task::TaskTracker::new();
        let admin = tasks.spawn(
            crate::admin::serve(admin_listener, metrics, shared.clone(), stop.clone())
                .instrument(tracing::info_span!("admin")),
        );
        tasks.spawn(
            reload::watch_file(ownership.clone(), security.clone(), stop.clone())
                .instrument(tracing::info_span!("reload", trigger = "file")),
        );
        tasks.spawn(
            reload::watch_sighup(ownership, security, stop.clone())
                .instrument(tracing::info_span!("reload", trigger = "sighup")),
        );
        tasks.close();
        let signalled = async {
            wait_for_signal().await;
            tracing::info!("shutting down");
        };
        let result = proxy::run(shared, bootstrap, signalled).await;
        match admin.await {
            Ok(Err(e)) => tracing::error!("{e:#}"),
            Err(e) => tracing::error!("admin task: {e}"),
            Ok(Ok(())) => {}
        }
        tasks.wait().await;
        result
    })
}

/// keyward must not panic on any input; if it ever does, the task of that one connection ends
/// (tokio contains the panic) and this makes it visible: logged through tracing and counted.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        metrics::counter!("keyward_panics_total").increment(1);
        tracing::error!(panic = %info, "a task panicked; its connection is closed");
        default(info);
    }));
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
