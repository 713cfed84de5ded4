//! The ownership table in force, and how it is replaced while keyward runs.
//!
//! A reload reads and validates the whole file first; only a valid table replaces the old one,
//! in one atomic swap. A produce request loads one [`Snapshot`] and decides against it to the
//! end, so no request ever sees two tables. An invalid file never replaces a valid table: the old
//! one keeps serving and the error stays visible (log, metrics, `/ownership`) until a valid
//! reload succeeds.
//!
//! Triggers: a change to the file (its directory is watched, so editors that write a new file
//! and rename it, and Kubernetes ConfigMap volumes that swap a `..data` symlink, are both seen;
//! bursts of events are debounced), SIGHUP, and `POST /reload` on the admin API.
//!
//! Every trigger also re-reads the TLS material and secrets ([`crate::security`]), and changes
//! to those files trigger a reload too, so a rotated certificate needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::{counter, gauge};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ownership::{RegionId, Table, TableError};
use crate::security::{self, Security};

/// One reload of everything reloadable: the table, then the TLS material and secrets. Each is
/// swapped or kept on its own; a failure of one does not hold back the other.
pub fn reload_all(
    ownership: &Ownership,
    security: &Security,
    trigger: Trigger,
) -> (Outcome, security::Outcome) {
    (ownership.reload(trigger), security.reload(trigger))
}

/// One loaded table with what identifies it.
pub struct Snapshot {
    pub table: Table,
    /// Counts successful loads in this process, from 1.
    pub version: u64,
    /// SHA-256 of the canonical table: equal across instances that run the same table.
    pub hash: String,
    /// The canonical table ([`Table::canonical_json`]) as compact JSON text: what the next
    /// reload's summary of changes compares with, kept as text because it is a fraction of
    /// the size of its parsed form, and far cheaper to parse again than to build again (a
    /// large table's values are sorted to build it).
    canonical: Box<str>,
    pub loaded_at: SystemTime,
    /// The region this instance writes for, as the table numbers it.
    pub local: RegionId,
}

impl Snapshot {
    /// The hash prefix shown in rejection messages and logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    File,
    Sighup,
    Api,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::File => "file",
            Trigger::Sighup => "sighup",
            Trigger::Api => "api",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Loaded {
        version: u64,
        hash: String,
        changes: String,
        /// From reading the file to the new table serving (what comes after, the summary of
        /// changes and freeing the old table, is not in it).
        load: Duration,
    },
    /// The file decodes to the table already in force; nothing was swapped.
    Unchanged {
        version: u64,
        hash: String,
    },
    Failed(TableError),
}

/// The last failed reload, kept until a reload succeeds.
#[derive(Debug, Clone)]
pub struct ReloadError {
    pub message: String,
    pub at: SystemTime,
    pub trigger: Trigger,
}

/// What reloads remember.
struct Reloads {
    /// The last failed reload, until one succeeds.
    last_error: Option<ReloadError>,
    /// The digest of the file text the table in force was read from: a reload that reads the
    /// same text again is answered without parsing it (a change is often seen twice, by the
    /// file watch and by a `POST /reload`, and parsing a 100,000-tenant table takes a core
    /// for a tenth of a second).
    read: [u8; 32],
    /// How many times a reload parsed the file.
    parsed: u64,
}

pub struct Ownership {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    regions: Vec<String>,
    local_region: String,
    /// Serializes reloads (file, signal and API may fire together).
    state: Mutex<Reloads>,
    /// Serializes replacements of the file ([`Ownership::replace`]).
    writing: Mutex<()>,
}

/// Why [`Ownership::replace`] did not put a table in force.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// The table in force is not the one the caller based its change on.
    #[error("the table in force is {current}, not {expected}")]
    Changed { expected: String, current: String },
    #[error("{0}")]
    Invalid(TableError),
    #[error("cannot write {}: {error}", .path.display())]
    Unwritable {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Written, but the reload that followed found another table (the file changed again).
    #[error("wrote the table, but the reload found {0:?}")]
    Raced(Outcome),
}

impl Ownership {
    /// Loads the table at start; an invalid table here stops keyward from starting.
    pub fn load(path: &Path, regions: &[String], local_region: &str) -> Result<Self, TableError> {
        let text = Table::read(path)?;
        let table = Table::parse(&text, path, regions)?;
        let canonical = table.canonical_json();
        let snapshot = Self::snapshot_with(table, &canonical, 1, local_region, path)?;
        let ownership = Self {
            current: ArcSwap::from_pointee(snapshot),
            path: path.to_owned(),
            regions: regions.to_vec(),
            local_region: local_region.to_owned(),
            state: Mutex::new(Reloads {
                last_error: None,
                read: Sha256::digest(&text).into(),
                parsed: 0,
            }),
            writing: Mutex::new(()),
        };
        ownership.publish(Trigger::Startup, "loaded", None);
        Ok(ownership)
    }

    /// `canonical` is the table's [`Table::canonical_json`].
    fn snapshot_with(
        table: Table,
        canonical: &serde_json::Value,
        version: u64,
        local_region: &str,
        path: &Path,
    ) -> Result<Snapshot, TableError> {
        let local = table.region_id(local_region).ok_or_else(|| TableError {
            file: path.to_owned(),
            path: String::new(),
            message: format!("region {local_region:?} is not one of the table's regions"),
        })?;
        // `Display` on a `Value` is the compact serialization; it cannot fail.
        let canonical = canonical.to_string();
        Ok(Snapshot {
            hash: Table::hash_of_text(&canonical),
            canonical: canonical.into(),
            table,
            version,
            loaded_at: SystemTime::now(),
            local,
        })
    }

    /// The table in force. Load once per decision and keep the `Arc` for its duration.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn last_error(&self) -> Option<ReloadError> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last_error.clone()
    }

    /// Replaces the table file with `text` and reloads it, if the table in force has the
    /// content hash `expected` (so a change made by someone else in the meantime is not
    /// overwritten) and `text` is a valid table. The file is written whole, to a temporary file
    /// beside it renamed over it, so a reader never sees half of it; the file stays the one
    /// source of the table, so it is what a restart loads.
    pub fn replace(&self, text: &str, expected: &str) -> Result<Outcome, ReplaceError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current.load();
        if current.hash != expected {
            return Err(ReplaceError::Changed {
                expected: expected.to_owned(),
                current: current.hash.clone(),
            });
        }
        let table = Table::parse(text, &self.path, &self.regions).map_err(ReplaceError::Invalid)?;
        let hash = table.content_hash();
        write_whole(&self.path, text).map_err(|error| ReplaceError::Unwritable {
            path: self.path.clone(),
            error,
        })?;
        let outcome = self.reload(Trigger::Api);
        match &outcome {
            Outcome::Loaded { hash: h, .. } | Outcome::Unchanged { hash: h, .. } if *h == hash => {
                Ok(outcome)
            }
            _ => Err(ReplaceError::Raced(outcome)),
        }
    }

    /// Reads, validates and, if valid and different, swaps in the file's table.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let old = self.current.load_full();
        let text = Table::read(&self.path);
        let digest: Option<[u8; 32]> = text.as_ref().ok().map(|t| Sha256::digest(t).into());
        if digest == Some(state.read) {
            state.last_error = None;
            drop(state);
            self.publish(trigger, "unchanged", None);
            return Outcome::Unchanged {
                version: old.version,
                hash: old.hash.clone(),
            };
        }
        state.parsed += 1;
        let loaded = text.and_then(|text| {
            let table = Table::parse(&text, &self.path, &self.regions)?;
            // Built once: for the hash now, for the summary of changes once the table serves.
            let canonical = table.canonical_json();
            Self::snapshot_with(
                table,
                &canonical,
                old.version + 1,
                &self.local_region,
                &self.path,
            )
            .map(|snapshot| (snapshot, canonical))
        });
        if let (Ok(_), Some(digest)) = (&loaded, digest) {
            state.read = digest;
        }
        let outcome = match loaded {
            Err(e) => {
                error!(
                    trigger = trigger.as_str(),
                    version = old.version,
                    hash = old.short_hash(),
                    "ownership table reload failed; the old table keeps serving: {e}"
                );
                state.last_error = Some(ReloadError {
                    message: e.to_string(),
                    at: SystemTime::now(),
                    trigger,
                });
                Outcome::Failed(e)
            }
            Ok((new, _)) if new.hash == old.hash => {
                state.last_error = None;
                Outcome::Unchanged {
                    version: old.version,
                    hash: old.hash.clone(),
                }
            }
            Ok((new, canonical)) => {
                let (version, hash) = (new.version, new.hash.clone());
                self.current.store(Arc::new(new));
                let load = started.elapsed();
                gauge!("keyward_table_load_seconds").set(load.as_secs_f64());
                let changes = match serde_json::from_str(&old.canonical) {
                    Ok(before) => Table::diff_of(&before, &canonical),
                    // Text keyward wrote itself: cannot happen, but a log line is no reason
                    // to fail a reload.
                    Err(_) => Table::diff_of(&old.table.canonical_json(), &canonical),
                };
                info!(
                    trigger = trigger.as_str(),
                    version,
                    hash = &hash[..hash.len().min(12)],
                    previous_hash = old.short_hash(),
                    load_ms = load.as_millis() as u64,
                    "ownership table loaded: {changes}"
                );
                state.last_error = None;
                Outcome::Loaded {
                    version,
                    hash,
                    changes,
                    load,
                }
            }
        };
        let result = match &outcome {
            Outcome::Loaded { .. } => "loaded",
            Outcome::Unchanged { .. } => "unchanged",
            Outcome::Failed(_) => "error",
        };
        let previous = matches!(outcome, Outcome::Loaded { .. }).then_some(&*old);
        drop(state);
        self.publish(trigger, result, previous);
        outcome
    }

    /// Brings the table metrics up to date with the table in force.
    fn publish(&self, trigger: Trigger, result: &'static str, previous: Option<&Snapshot>) {
        counter!("keyward_table_reloads_total", "trigger" => trigger.as_str(), "result" => result)
            .increment(1);
        let current = self.current.load();
        if let Some(previous) = previous {
            gauge!("keyward_table_info", "hash" => previous.hash.clone()).set(0.0);
            // A rule that is gone holds nothing any more.
            for rule in previous.table.rules() {
                if !current.table.rules().iter().any(|r| r.name == rule.name) {
                    for state in ["frozen", "taken_over"] {
                        gauge!("keyward_rule_parts", "rule" => rule.name.clone(), "state" => state)
                            .set(0.0);
                    }
                }
            }
        }
        for rule in current.table.rules() {
            let (frozen, taken_over) = rule.parts_in_state();
            gauge!("keyward_rule_parts", "rule" => rule.name.clone(), "state" => "frozen")
                .set(frozen as f64);
            gauge!("keyward_rule_parts", "rule" => rule.name.clone(), "state" => "taken_over")
                .set(taken_over as f64);
        }
        gauge!("keyward_table_info", "hash" => current.hash.clone()).set(1.0);
        gauge!("keyward_table_version").set(current.version as f64);
        if result != "error" {
            let at = current
                .loaded_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            gauge!("keyward_table_last_reload_success_timestamp_seconds").set(at.as_secs_f64());
        }
        let failing = self.last_error().is_some();
        gauge!("keyward_table_reload_failing").set(if failing { 1.0 } else { 0.0 });
    }
}

/// Writes `text` to `path` through a temporary file in the same directory, renamed over it.
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .map_or_else(|| "ownership".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.keyward-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Quiet time after the last file event before reloading: editors write in bursts.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads whenever the table file, or a certificate, key or secret file, changes, until
/// `shutdown`. The directories holding them are watched.
pub async fn watch_file(
    ownership: Arc<Ownership>,
    security: Arc<Security>,
    shutdown: CancellationToken,
) {
    let path = ownership.path().to_owned();
    let files: Vec<PathBuf> = std::iter::once(path.clone())
        .chain(security.files())
        .collect();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    // One pending wake-up is all a burst needs; further events while one waits are dropped.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_owned()))
        .collect();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && concerns(&event, &names)
        {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the ownership file; reload with SIGHUP or POST /reload");
            return;
        }
    };
    use notify::Watcher;
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), error = %e, "cannot watch a directory of reloadable files; reload with SIGHUP or POST /reload");
            return;
        }
    }
    info!(file = %path.display(), "watching the ownership table for changes");
    loop {
        tokio::select! {
            event = rx.recv() => if event.is_none() { return },
            () = shutdown.cancelled() => return,
        }
        // Wait for the burst to end.
        loop {
            tokio::select! {
                more = tokio::time::timeout(DEBOUNCE, rx.recv()) => match more {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => return,
            }
        }
        let (o, s) = (ownership.clone(), security.clone());
        let _ = tokio::task::spawn_blocking(move || reload_all(&o, &s, Trigger::File)).await;
    }
}

/// Whether a directory event can have changed a reloadable file: a change (not a read:
/// keyward's own reloads read the files) to one of their names, or to the `..data` symlink
/// through which a Kubernetes ConfigMap or Secret volume swaps all its files at once. Other
/// files in the directory (a log file, the static config) do not count.
fn concerns(event: &notify::Event, names: &[std::ffi::OsString]) -> bool {
    use notify::EventKind::{Any, Create, Modify, Remove};
    if !matches!(event.kind, Any | Create(_) | Modify(_) | Remove(_)) {
        return false;
    }
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name().is_some_and(|f| {
                names.iter().any(|n| n == f) || f.to_string_lossy().starts_with("..data")
            })
        })
}

/// Reloads on every SIGHUP, until `shutdown`.
pub async fn watch_sighup(
    ownership: Arc<Ownership>,
    security: Arc<Security>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    loop {
        tokio::select! {
            s = hup.recv() => if s.is_none() { return },
            () = shutdown.cancelled() => return,
        }
        info!("SIGHUP: reloading the ownership table, TLS material and credentials");
        let (o, s) = (ownership.clone(), security.clone());
        let _ = tokio::task::spawn_blocking(move || reload_all(&o, &s, Trigger::Sighup)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "rules:\n  - name: orders\n    topics: [orders]\n    by: key\n    slots: 2\n    owners: { eu: [\"0\"], us: [\"1\"] }\n";

    fn regions() -> Vec<String> {
        vec!["eu".into(), "us".into()]
    }

    #[test]
    fn an_invalid_table_never_replaces_a_valid_one() {
        let dir = std::env::temp_dir().join(format!("keyward-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ownership.yaml");
        std::fs::write(&file, TABLE).unwrap();
        let o = Ownership::load(&file, &regions(), "eu").unwrap();
        let first = o.snapshot();
        assert_eq!(first.version, 1);

        std::fs::write(&file, TABLE.replace("[\"1\"]", "[\"0\"]")).unwrap();
        match o.reload(Trigger::Api) {
            Outcome::Failed(e) => assert!(e.to_string().contains("slot 0 is also owned"), "{e}"),
            other => panic!("expected failure, got {other:?}"),
        }
        assert_eq!(o.snapshot().hash, first.hash, "the old table keeps serving");
        assert!(o.last_error().is_some());

        std::fs::write(&file, format!("# a comment\n{TABLE}")).unwrap();
        assert!(matches!(
            o.reload(Trigger::Sighup),
            Outcome::Unchanged { version: 1, .. }
        ));
        assert!(o.last_error().is_none(), "a valid reload clears the error");

        std::fs::write(
            &file,
            TABLE.replace("slots: 2", "slots: 2\n    null_key: local"),
        )
        .unwrap();
        match o.reload(Trigger::File) {
            Outcome::Loaded { version, .. } => assert_eq!(version, 2),
            other => panic!("expected a load, got {other:?}"),
        }
        assert_ne!(o.snapshot().hash, first.hash);
        // A snapshot taken before the swap is unaffected by it.
        assert_eq!(first.version, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn parsed(o: &Ownership) -> u64 {
        o.state.lock().unwrap().parsed
    }

    #[test]
    fn the_same_file_text_is_not_parsed_again() {
        let dir = std::env::temp_dir().join(format!("keyward-reread-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ownership.yaml");
        std::fs::write(&file, TABLE).unwrap();
        let o = Ownership::load(&file, &regions(), "eu").unwrap();

        // The text the table in force came from: answered without parsing.
        assert!(matches!(
            o.reload(Trigger::File),
            Outcome::Unchanged { version: 1, .. }
        ));
        assert_eq!(parsed(&o), 0);

        // A failed reload leaves the table in force, and the text it came from is still known.
        std::fs::write(&file, "rules: [").unwrap();
        assert!(matches!(o.reload(Trigger::File), Outcome::Failed(_)));
        std::fs::write(&file, TABLE).unwrap();
        assert!(matches!(
            o.reload(Trigger::Api),
            Outcome::Unchanged { version: 1, .. }
        ));
        assert!(o.last_error().is_none(), "the error is cleared");
        assert_eq!(parsed(&o), 1);

        // New text is parsed once, whether it changes the table or not.
        let changed = TABLE.replace("slots: 2", "slots: 2\n    null_key: local");
        std::fs::write(&file, &changed).unwrap();
        match o.reload(Trigger::File) {
            // The summary, made from the canonical text kept with the old table, is the one
            // the two tables give.
            Outcome::Loaded {
                version: 2,
                changes,
                ..
            } => {
                let table = |text: &str| Table::parse(text, &file, &regions()).unwrap();
                assert_eq!(changes, table(&changed).diff_summary(&table(TABLE)));
                assert!(changes.contains("orders"), "{changes}");
            }
            other => panic!("expected a load, got {other:?}"),
        }
        assert!(matches!(
            o.reload(Trigger::Api),
            Outcome::Unchanged { version: 2, .. }
        ));
        assert_eq!(parsed(&o), 2);
        std::fs::write(&file, format!("# a comment\n{changed}")).unwrap();
        assert!(matches!(
            o.reload(Trigger::File),
            Outcome::Unchanged { version: 2, .. }
        ));
        assert!(matches!(
            o.reload(Trigger::File),
            Outcome::Unchanged { version: 2, .. }
        ));
        assert_eq!(parsed(&o), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
