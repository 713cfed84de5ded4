//! `keyward move`: moving part of a rule's ownership between regions across a whole fleet of
//! keyward instances, with no moment at which two regions may write it.
//!
//! The fleet file names every instance's admin URL, by region. A move goes through three
//! tables (`ownership::moves`): the table in force, the same with the moving part frozen, and
//! the table with the part owned by its new region. `run` puts them in force in steps, each
//! confirmed in every instance by its table hash before the next:
//!
//! 1. **freeze**: the frozen table, `PUT /ownership` to every instance (conditional on the
//!    hash it replaces); writes to the moving part are held, with a retriable error, in every
//!    region;
//! 2. **replicated**: the old owners' end offsets of the rule's topics at that moment (from
//!    `GET /replication`) must have reached the new owner's mirrors;
//! 3. **flip**: the moved table, everywhere.
//!
//! Every step is written to a journal file before and after it is carried out, so `run` goes on
//! after its own crash from where it stopped, and `abort` puts the table it started from back
//! in force at any step before the flip. The tables are written as files by each instance
//! (`PUT /ownership` persists), so a restarted instance comes back with the table in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ownership::Table;
use crate::ownership::moves::{Move, Parts, Plan};

/// The fleet file: every instance's admin URL, by region.
///
/// ```yaml
/// regions:
///   eu: ["http://10.0.1.5:9190", "http://10.0.1.6:9190"]
///   us: ["http://10.1.1.5:9190"]
/// token_file: admin-token   # the bearer token of admin.reload_token_file; relative to this file
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    pub regions: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(skip)]
    token: Option<String>,
}

impl Fleet {
    pub fn load(path: &Path) -> anyhow::Result<Fleet> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the fleet file {}", path.display()))?;
        let mut fleet: Fleet = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a fleet file", path.display()))?;
        if fleet.regions.values().all(Vec::is_empty) {
            bail!("{}: `regions` lists no instance", path.display());
        }
        if let Some(file) = &fleet.token_file {
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let token = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            fleet.token = Some(token.trim().to_owned());
        }
        Ok(fleet)
    }

    fn instances(&self) -> impl Iterator<Item = (&str, &str)> {
        self.regions
            .iter()
            .flat_map(|(region, urls)| urls.iter().map(move |u| (region.as_str(), u.as_str())))
    }
}

/// What one instance says about its table.
struct Seen {
    region: String,
    url: String,
    answer: anyhow::Result<(String, Value)>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `GET /ownership` of one instance: its table hash and canonical table.
fn ownership_of(agent: &ureq::Agent, url: &str) -> anyhow::Result<(String, Value)> {
    let mut response = agent
        .get(format!("{}/ownership", url.trim_end_matches('/')))
        .call()
        .with_context(|| format!("{url}: no answer"))?;
    if response.status() != 200 {
        bail!("{url}: GET /ownership answered {}", response.status());
    }
    let body: Value = response.body_mut().read_json()?;
    let hash = body["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("{url}: no hash in /ownership"))?
        .to_owned();
    Ok((hash, body["table"].clone()))
}

fn survey(agent: &ureq::Agent, fleet: &Fleet) -> Vec<Seen> {
    fleet
        .instances()
        .map(|(region, url)| Seen {
            region: region.to_owned(),
            url: url.to_owned(),
            answer: ownership_of(agent, url),
        })
        .collect()
}

/// The table every reachable instance serves, and its hash; an error naming the instances
/// that are unreachable or serve another table.
fn one_table(seen: &[Seen]) -> anyhow::Result<(String, Table)> {
    let mut hashes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut down = Vec::new();
    for s in seen {
        match &s.answer {
            Ok((hash, _)) => hashes.entry(hash).or_default().push(&s.url),
            Err(e) => down.push(format!("{e:#}")),
        }
    }
    if !down.is_empty() {
        bail!(
            "not every instance answers, so none can be confirmed: {} (an owner region that is \
             down is a failover, not a move)",
            down.join("; ")
        );
    }
    if hashes.len() != 1 {
        let sides: Vec<String> = hashes
            .iter()
            .map(|(h, urls)| format!("{} at {}", &h[..h.len().min(12)], urls.join(", ")))
            .collect();
        bail!("the instances serve different tables: {}", sides.join("; "));
    }
    let first = seen
        .iter()
        .find_map(|s| s.answer.as_ref().ok())
        .ok_or_else(|| anyhow!("the fleet file lists no instance"))?;
    Ok((first.0.clone(), table_of(&first.1)?))
}

/// The table a canonical form (as `/ownership` shows it) describes.
fn table_of(canonical: &Value) -> anyhow::Result<Table> {
    let regions: Vec<String> = canonical["regions"]
        .as_array()
        .ok_or_else(|| anyhow!("the canonical table has no regions"))?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    Ok(Table::from_canonical(canonical, &regions)?)
}

/// `PUT /ownership` of `text` to one instance, in place of the table `expected`.
fn put(
    agent: &ureq::Agent,
    fleet: &Fleet,
    url: &str,
    text: &str,
    expected: &str,
) -> anyhow::Result<()> {
    let mut request = agent
        .put(format!("{}/ownership", url.trim_end_matches('/')))
        .header("If-Match", expected);
    if let Some(token) = &fleet.token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .send(text)
        .with_context(|| format!("{url}: no answer to PUT /ownership"))?;
    let status = response.status();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        bail!("{url}: PUT /ownership answered {status}: {}", body.trim());
    }
    Ok(())
}

/// Puts `text` (whose table hashes to `hash`) in force in every instance that serves
/// `expected` or already serves `hash`, then waits until all serve `hash`.
fn apply(
    agent: &ureq::Agent,
    fleet: &Fleet,
    text: &str,
    expected: &str,
    hash: &str,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    for (region, url) in fleet.instances() {
        let (serving, _) = ownership_of(agent, url)?;
        if serving == hash {
            say(format!("  {region} {url}: already serves {}", short(hash)));
            continue;
        }
        if serving != expected {
            bail!(
                "{url} serves {}, neither the table this step starts from ({}) nor the one it \
                 puts in force ({}): someone else changed it; stopping",
                short(&serving),
                short(expected),
                short(hash)
            );
        }
        put(agent, fleet, url, text, expected)?;
        say(format!("  {region} {url}: now serves {}", short(hash)));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind: Vec<String> = fleet
            .instances()
            .filter(|(_, url)| !matches!(ownership_of(agent, url), Ok((h, _)) if h == hash))
            .map(|(_, url)| url.to_owned())
            .collect();
        if behind.is_empty() {
            say(format!("  every instance serves {}", short(hash)));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not every instance serves {} after 30 s: {}",
                short(hash),
                behind.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The journal of one `run`: what it moves, the tables it goes through, and how far it got.
#[derive(Debug, Serialize, Deserialize)]
pub struct Journal {
    /// The regions of the tables, as the fleet's instances number them.
    pub regions: Vec<String>,
    pub rule: String,
    pub parts: String,
    pub to: String,
    pub from: Vec<String>,
    pub original: Stage,
    pub frozen: Stage,
    pub moved: Stage,
    /// `planned`, `frozen`, `replicated`, `moved`, `aborted`; `failover` while instances of a
    /// failover have not all taken the moved table.
    pub step: String,
    /// The old owners' end offsets to wait for: `(source region, topic, partition) -> offset`,
    /// read once the freeze was in force everywhere.
    #[serde(default)]
    pub gate: Vec<(String, String, i64, i64)>,
    pub log: Vec<String>,
}

/// One table of a move: its file text and hash.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stage {
    pub hash: String,
    pub text: String,
}

impl Journal {
    /// A new journal of `request` on `table` (whose hash is `hash`), through the tables of
    /// `plan`, at `step`. A failover has no frozen table.
    fn new(request: &Request, table: &Table, hash: String, plan: &Plan, step: &str) -> Journal {
        let stage = |t: &Table| Stage {
            hash: t.content_hash(),
            text: t.file_text(),
        };
        let frozen = if step == "failover" {
            Stage {
                hash: String::new(),
                text: String::new(),
            }
        } else {
            stage(&plan.frozen)
        };
        Journal {
            regions: table.regions().to_vec(),
            rule: request.rule.clone(),
            parts: request.describe_parts(),
            to: request.to.clone(),
            from: plan.from.clone(),
            original: Stage {
                hash,
                text: table.file_text(),
            },
            frozen,
            moved: stage(&plan.moved),
            step: step.into(),
            gate: Vec::new(),
            log: Vec::new(),
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write the journal {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot write the journal {}", path.display()))
    }

    fn note(&mut self, line: String) {
        println!("{line}");
        self.log.push(line);
    }
}

/// What to move, as the command line says it.
pub struct Request {
    pub rule: String,
    pub parts: Parts,
    pub to: String,
}

impl Request {
    fn as_move(&self) -> Move {
        Move {
            rule: self.rule.clone(),
            parts: self.parts.clone(),
            to: self.to.clone(),
        }
    }

    fn describe_parts(&self) -> String {
        match &self.parts {
            Parts::All => "the whole rule".to_owned(),
            Parts::Slots(r) => format!("slots {}", ranges(r)),
            Parts::Partitions(r) => format!("partitions {}", ranges(r)),
            Parts::Values(v) => format!("values {}", v.join(", ")),
        }
    }
}

fn ranges<T: std::fmt::Display + PartialEq>(r: &[(T, T)]) -> String {
    r.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `keyward move plan`: what a move would change, where, and how far replication is behind.
pub fn plan(fleet: &Fleet, request: &Request) -> anyhow::Result<String> {
    let agent = agent();
    let seen = survey(&agent, fleet);
    let mut out = String::new();
    out.push_str("instances:\n");
    for s in &seen {
        let state = match &s.answer {
            Ok((hash, _)) => format!("serves {}", short(hash)),
            Err(e) => format!("unreachable: {e:#}"),
        };
        out.push_str(&format!("  {} {}: {state}\n", s.region, s.url));
    }
    let (hash, table) = one_table(&seen)?;
    let plan = table.plan_move(&request.as_move())?;
    out.push_str(&format!(
        "move: rule {}, {}, from {} to {}\n",
        request.rule,
        request.describe_parts(),
        plan.from.join(", "),
        request.to
    ));
    out.push_str(&format!(
        "1. freeze: {} -> {} ({})\n",
        short(&hash),
        short(&plan.frozen.content_hash()),
        plan.frozen.diff_summary(&table)
    ));
    out.push_str(&format!(
        "2. wait until {}'s writes to the rule's topics are replicated to {}\n",
        plan.from.join(" and "),
        request.to
    ));
    out.push_str(&format!(
        "3. flip: {} -> {} ({})\n",
        short(&plan.frozen.content_hash()),
        short(&plan.moved.content_hash()),
        plan.moved.diff_summary(&plan.frozen)
    ));
    out.push_str(&lag_report(&agent, fleet, &table, request, &plan.from));
    Ok(out)
}

/// The replication lag of the rule's topics from `from` to `request.to`, as one instance of
/// the fleet measures it, one line per partition.
fn lag_report(
    agent: &ureq::Agent,
    fleet: &Fleet,
    table: &Table,
    request: &Request,
    from: &[String],
) -> String {
    match measured_with(agent, fleet, table, request, from, true) {
        Ok((_, rows)) => lag_lines(&rows, &request.to),
        Err(e) => format!("replication lag: not known ({e:#})\n"),
    }
}

/// One line per partition (or unmeasured topic), then the total of the records measured.
fn lag_lines(rows: &[Lag], to: &str) -> String {
    if rows.is_empty() {
        return "replication lag: no partition of the rule's topics measured\n".to_owned();
    }
    let mut out = String::from("replication lag (records):\n");
    let mut total = 0;
    let mut unmeasured = 0;
    for r in rows {
        match (&r.error, &r.last_measured) {
            (Some(e), _) => {
                unmeasured += 1;
                out.push_str(&format!(
                    "  {} -> {to} {}: not measured ({e})\n",
                    r.source, r.topic
                ));
            }
            (None, last) => {
                total += r.lag.max(0);
                out.push_str(&format!(
                    "  {} -> {to} {}[{}]: source end {}, mirrored end {}, lag {}{}\n",
                    r.source,
                    r.topic,
                    r.partition,
                    r.source_end,
                    r.mirror_end,
                    r.lag,
                    match last {
                        Some((at, now)) => format!(" (last measured at {at}; now: {now})"),
                        None => String::new(),
                    }
                ));
            }
        }
    }
    out.push_str(&format!("  total: {total} records"));
    if unmeasured > 0 {
        out.push_str(&format!(", and {unmeasured} not measured"));
    }
    out.push('\n');
    out
}

/// One partition's replication, as `GET /replication` reports it, or a topic (or a whole
/// region pair, topic `*`) it could not measure: `error` set, partition -1. An unmeasured topic
/// is never taken as caught up.
#[derive(Debug, Clone)]
struct Lag {
    source: String,
    topic: String,
    partition: i64,
    source_end: i64,
    mirror_end: i64,
    lag: i64,
    error: Option<String>,
    /// Set when the pair does not answer now and this is its last measurement: when it was
    /// taken, and why the pair is not measured now. Only `plan` and `failover` show these; the
    /// replication gate never takes them as current.
    last_measured: Option<(String, String)>,
}

impl Lag {
    fn unmeasured(source: &str, topic: &str, error: &str) -> Lag {
        Lag {
            source: source.to_owned(),
            topic: topic.to_owned(),
            partition: -1,
            source_end: -1,
            mirror_end: -1,
            lag: -1,
            error: Some(error.to_owned()),
            last_measured: None,
        }
    }
}

/// `GET /replication` of the first instance that answers, narrowed to the rule's topics from
/// `from` to `request.to`.
fn lag(
    agent: &ureq::Agent,
    fleet: &Fleet,
    table: &Table,
    request: &Request,
    from: &[String],
) -> anyhow::Result<Vec<Lag>> {
    measured(agent, fleet, table, request, from).map(|(_, rows)| rows)
}

fn measured(
    agent: &ureq::Agent,
    fleet: &Fleet,
    table: &Table,
    request: &Request,
    from: &[String],
) -> anyhow::Result<(Option<String>, Vec<Lag>)> {
    measured_with(agent, fleet, table, request, from, false)
}

/// [`lag`], and when the instance's last measurement round began (`measured_at`, by its own
/// clock), to tell one round from the next. With `last_known`, a pair that does not answer
/// now is reported by its last measurement (what a failover may lose), marked as such.
fn measured_with(
    agent: &ureq::Agent,
    fleet: &Fleet,
    table: &Table,
    request: &Request,
    from: &[String],
    last_known: bool,
) -> anyhow::Result<(Option<String>, Vec<Lag>)> {
    let mut last = anyhow!("no instance answered GET /replication");
    for (_, url) in fleet.instances() {
        let response = agent
            .get(format!("{}/replication", url.trim_end_matches('/')))
            .call();
        let mut response = match response {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                last = anyhow!("{url}: GET /replication answered {}", r.status());
                continue;
            }
            Err(e) => {
                last = anyhow!("{url}: {e}");
                continue;
            }
        };
        let body: Value = response.body_mut().read_json()?;
        let at = body["measured_at"].as_str().map(str::to_owned);
        return Ok((at, lags_in(&body, table, request, from, last_known)));
    }
    Err(last)
}

fn lags_in(
    body: &Value,
    table: &Table,
    request: &Request,
    from: &[String],
    last_known: bool,
) -> Vec<Lag> {
    let mut out = Vec::new();
    for pair in body["pairs"].as_array().into_iter().flatten() {
        let (Some(source), Some(target)) = (pair["source"].as_str(), pair["target"].as_str())
        else {
            continue;
        };
        if target != request.to || !from.iter().any(|f| f == source) {
            continue;
        }
        let mut topics = &pair["topics"];
        let mut last = None;
        if let Some(error) = pair["error"].as_str() {
            match pair["last_measured"]["measured_at"].as_str() {
                Some(at) if last_known => {
                    topics = &pair["last_measured"]["topics"];
                    last = Some((at.to_owned(), error.to_owned()));
                }
                _ => out.push(Lag::unmeasured(source, "*", error)),
            }
        }
        for topic in topics.as_array().into_iter().flatten() {
            let Some(name) = topic["topic"].as_str() else {
                continue;
            };
            if table.rule_for_topic(name).map(|r| r.name.as_str()) != Some(request.rule.as_str()) {
                continue;
            }
            let partitions = topic["partitions"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            if let Some(error) = topic["error"].as_str() {
                out.push(Lag::unmeasured(source, name, error));
            } else if partitions.is_empty() {
                out.push(Lag::unmeasured(source, name, "no partition measured"));
            }
            for p in partitions {
                let get = |k: &str| p[k].as_i64().unwrap_or(-1);
                out.push(Lag {
                    source: source.to_owned(),
                    topic: name.to_owned(),
                    partition: get("partition"),
                    source_end: get("source_end"),
                    mirror_end: get("mirror_end"),
                    lag: get("lag_records"),
                    error: p["error"].as_str().map(str::to_owned),
                    last_measured: last.clone(),
                });
            }
        }
    }
    out
}

/// How `run` treats replication.
pub struct Gate {
    /// How long to wait for replication before aborting back to the old owner.
    pub timeout: Duration,
    /// Flip without waiting for replication (when no instance measures it).
    pub skip: bool,
}

/// `keyward move run`: the move, step by step, resuming from `journal` when it holds this move.
pub fn run(
    fleet: &Fleet,
    request: &Request,
    journal_path: &Path,
    gate: &Gate,
) -> anyhow::Result<()> {
    let agent = agent();
    let mut journal = match std::fs::read(journal_path) {
        Ok(bytes) => {
            let journal: Journal = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a move journal", journal_path.display()))?;
            if journal.rule != request.rule
                || journal.to != request.to
                || journal.parts != request.describe_parts()
            {
                bail!(
                    "{} is the journal of another move (rule {}, {}, to {}); name another journal",
                    journal_path.display(),
                    journal.rule,
                    journal.parts,
                    journal.to
                );
            }
            if matches!(journal.step.as_str(), "moved" | "aborted") {
                bail!(
                    "{} records a move that ended ({}); name a new journal",
                    journal_path.display(),
                    journal.step
                );
            }
            println!("resuming from step {}", journal.step);
            journal
        }
        Err(_) => {
            let seen = survey(&agent, fleet);
            let (hash, table) = one_table(&seen)?;
            let plan = table.plan_move(&request.as_move())?;
            let journal = Journal::new(request, &table, hash, &plan, "planned");
            journal.save(journal_path)?;
            journal
        }
    };
    let mut say = |line: String| println!("{line}");

    if journal.step == "planned" {
        journal.note(format!(
            "1. freezing rule {} {} in every instance",
            journal.rule, journal.parts
        ));
        if let Err(e) = apply(
            &agent,
            fleet,
            &journal.frozen.text,
            &journal.original.hash,
            &journal.frozen.hash,
            &mut say,
        ) {
            journal.note(format!(
                "freeze failed: {e:#}; putting the table it started from back"
            ));
            journal.save(journal_path)?;
            abort_with(&agent, fleet, &mut journal, journal_path)?;
            return Err(e);
        }
        journal.step = "frozen".into();
        journal.save(journal_path)?;
    }

    if journal.step == "frozen" {
        let table = Table::parse(
            &journal.original.text,
            Path::new("the move's journal"),
            &journal.regions,
        )?;
        if gate.skip {
            journal.note("2. replication: not waited for (--no-replication-gate)".into());
        } else {
            if journal.gate.is_empty() {
                // The end offsets to wait for are read in a measurement round that began after
                // the freeze was in force everywhere: two rounds after the one in progress now.
                let mut rounds: Vec<Option<String>> = Vec::new();
                let deadline = Instant::now() + gate.timeout;
                let now = loop {
                    match measured(&agent, fleet, &table, request, &journal.from) {
                        Ok((at, rows)) => {
                            if rounds.last() != Some(&at) {
                                rounds.push(at);
                            }
                            let unmeasured: Vec<String> = rows
                                .iter()
                                .filter_map(|r| {
                                    let e = r.error.as_ref()?;
                                    Some(format!("{} {} not measured ({e})", r.source, r.topic))
                                })
                                .collect();
                            if rounds.len() >= 3 && unmeasured.is_empty() {
                                break Ok(rows);
                            }
                            if rounds.len() >= 3 {
                                println!("  waiting: {}", unmeasured.join(", "));
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                        Err(e) => break Err(e),
                    }
                    if Instant::now() > deadline {
                        break Err(anyhow!(
                            "replication of the rule's topics not measured (every topic, in a round begun after the freeze) within {:?}",
                            gate.timeout
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                };
                let now = match now {
                    Ok(rows) if !rows.is_empty() => rows,
                    Ok(_) => {
                        let e = anyhow!(
                            "no instance measures replication of rule {}'s topics to {}",
                            journal.rule,
                            journal.to
                        );
                        journal.note(format!(
                            "{e}; aborting (--no-replication-gate flips without it)"
                        ));
                        abort_with(&agent, fleet, &mut journal, journal_path)?;
                        return Err(e);
                    }
                    Err(e) => {
                        journal.note(format!("replication lag not known ({e:#}); aborting (--no-replication-gate flips without it)"));
                        abort_with(&agent, fleet, &mut journal, journal_path)?;
                        return Err(e);
                    }
                };
                journal.gate = now
                    .iter()
                    .map(|l| (l.source.clone(), l.topic.clone(), l.partition, l.source_end))
                    .collect();
                journal.save(journal_path)?;
            }
            journal.note(format!(
                "2. waiting until {} partitions are replicated to {} up to their end at the freeze",
                journal.gate.len(),
                journal.to
            ));
            let deadline = Instant::now() + gate.timeout;
            loop {
                let rows = lag(&agent, fleet, &table, request, &journal.from).unwrap_or_default();
                let behind: Vec<String> = journal
                    .gate
                    .iter()
                    .filter_map(|(source, topic, partition, end)| {
                        let row = rows.iter().find(|r| {
                            &r.source == source && &r.topic == topic && r.partition == *partition
                        });
                        match row {
                            Some(r) if r.mirror_end >= *end => None,
                            Some(r) => Some(format!(
                                "{source} {topic}[{partition}] {} behind",
                                end - r.mirror_end
                            )),
                            None => Some(format!("{source} {topic}[{partition}] not measured")),
                        }
                    })
                    .collect();
                if behind.is_empty() {
                    journal.note("  replicated".into());
                    break;
                }
                if Instant::now() > deadline {
                    let e = anyhow!(
                        "replication still behind after {:?}: {}",
                        gate.timeout,
                        behind.join(", ")
                    );
                    journal.note(format!("{e}; aborting back to the old owner"));
                    abort_with(&agent, fleet, &mut journal, journal_path)?;
                    return Err(e);
                }
                println!("  waiting: {}", behind.join(", "));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        journal.step = "replicated".into();
        journal.save(journal_path)?;
    }

    if journal.step == "replicated" {
        journal.note(format!(
            "3. flipping rule {} {} to {} in every instance",
            journal.rule, journal.parts, journal.to
        ));
        apply(
            &agent,
            fleet,
            &journal.moved.text,
            &journal.frozen.hash,
            &journal.moved.hash,
            &mut say,
        )?;
        journal.step = "moved".into();
        journal.save(journal_path)?;
        journal.note(format!(
            "moved: every instance serves {}",
            short(&journal.moved.hash)
        ));
    }
    Ok(())
}

/// `keyward move failover`: the owner region is down, so nothing can be confirmed there. The
/// moved table (the part owned by `request.to`, no freeze, no wait for replication) goes to
/// every instance that answers; the command prints what may be lost (the replication lag last
/// measured from the old owner), and the instances that did not answer, which serve the old
/// table until the command is run again with the same journal once they answer.
pub fn failover(fleet: &Fleet, request: &Request, journal_path: &Path) -> anyhow::Result<()> {
    let agent = agent();
    let seen = survey(&agent, fleet);
    let reachable: Vec<Seen> = seen.into_iter().filter(|s| s.answer.is_ok()).collect();
    if reachable.is_empty() {
        bail!("no instance of the fleet answers");
    }
    let mut journal = match std::fs::read(journal_path) {
        Ok(bytes) => {
            let journal: Journal = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a move journal", journal_path.display()))?;
            if journal.step != "failover"
                || journal.rule != request.rule
                || journal.to != request.to
            {
                bail!(
                    "{} is the journal of another move ({} {}, step {})",
                    journal_path.display(),
                    journal.rule,
                    journal.parts,
                    journal.step
                );
            }
            println!("resuming the failover");
            journal
        }
        Err(_) => {
            let (hash, table) = one_table(&reachable)?;
            let plan = table.plan_move(&request.as_move())?;
            println!(
                "failover: rule {}, {}, from {} to {}, without a freeze and without waiting for replication",
                request.rule,
                request.describe_parts(),
                plan.from.join(", "),
                request.to
            );
            print!(
                "may be lost (not replicated when last measured): {}",
                lag_report(&agent, fleet, &table, request, &plan.from)
            );
            let journal = Journal::new(request, &table, hash, &plan, "failover");
            journal.save(journal_path)?;
            journal
        }
    };
    let mut behind = Vec::new();
    for (region, url) in fleet.instances() {
        let serving = match ownership_of(&agent, url) {
            Ok((hash, _)) => hash,
            Err(e) => {
                behind.push(format!("{region} {url} ({e:#})"));
                continue;
            }
        };
        if serving == journal.moved.hash {
            continue;
        }
        if serving != journal.original.hash {
            bail!(
                "{url} serves {}, neither the table the failover started from nor its own; stopping",
                short(&serving)
            );
        }
        put(
            &agent,
            fleet,
            url,
            &journal.moved.text,
            &journal.original.hash,
        )?;
        journal.note(format!(
            "  {region} {url}: now serves {}",
            short(&journal.moved.hash)
        ));
    }
    if behind.is_empty() {
        journal.step = "moved".into();
        journal.note(format!(
            "failed over: every instance serves {}",
            short(&journal.moved.hash)
        ));
    } else {
        journal.note(format!(
            "failed over where instances answer; still serving the old table: {}. Run this \
             command again with the same journal once they answer (keep them from taking \
             writes until then)",
            behind.join(", ")
        ));
    }
    journal.save(journal_path)
}

/// `keyward move abort`: the table the move started from, back in force everywhere, at any
/// step before the flip.
pub fn abort(fleet: &Fleet, journal_path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(journal_path)
        .with_context(|| format!("cannot read the journal {}", journal_path.display()))?;
    let mut journal: Journal = serde_json::from_slice(&bytes)?;
    abort_with(&agent(), fleet, &mut journal, journal_path)
}

fn abort_with(
    agent: &ureq::Agent,
    fleet: &Fleet,
    journal: &mut Journal,
    path: &Path,
) -> anyhow::Result<()> {
    match journal.step.as_str() {
        "moved" => bail!(
            "the move is done (every instance serves the moved table); move it back with another move"
        ),
        "aborted" => return Ok(()),
        _ => {}
    }
    journal.note("aborting: the table the move started from goes back in force".into());
    let mut say = |line: String| println!("{line}");
    // Instances may serve the original or the frozen table; both go back to the original.
    for (region, url) in fleet.instances() {
        let (serving, _) = ownership_of(agent, url)?;
        if serving == journal.frozen.hash {
            put(
                agent,
                fleet,
                url,
                &journal.original.text,
                &journal.frozen.hash,
            )?;
            say(format!(
                "  {region} {url}: back to {}",
                short(&journal.original.hash)
            ));
        }
    }
    apply(
        agent,
        fleet,
        &journal.original.text,
        &journal.original.hash,
        &journal.original.hash,
        &mut say,
    )?;
    journal.step = "aborted".into();
    journal.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::parse(
            r#"
rules:
  - name: orders
    topics: ["orders"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
default: allow
"#,
            Path::new("ownership.yaml"),
            &["eu".to_owned(), "us".to_owned()],
        )
        .unwrap()
    }

    /// us's cluster stopped answering after a round that measured 3 records not yet in eu.
    fn body() -> Value {
        serde_json::json!({
            "measured_at": "2026-11-29T12:00:05Z",
            "pairs": [{
                "source": "us", "target": "eu", "caught_up": false, "topics": [],
                "error": "cannot read us's topics: connection refused",
                "last_measured": {"measured_at": "2026-11-29T12:00:01Z", "topics": [{
                    "topic": "orders", "mirror": "us.orders", "error": null, "partitions": [
                        {"partition": 8, "source_end": 10, "mirror_end": 7, "lag_records": 3, "error": null},
                        {"partition": 9, "source_end": 4, "mirror_end": 4, "lag_records": 0, "error": null}
                    ]}]}
            }]
        })
    }

    #[test]
    fn a_failover_reports_the_last_lag_measured_and_the_gate_never_takes_it() {
        let request = Request {
            rule: "orders".into(),
            parts: Parts::Slots(vec![(8, 11)]),
            to: "eu".into(),
        };
        let from = ["us".to_owned()];
        let gate = lags_in(&body(), &table(), &request, &from, false);
        assert_eq!(gate.len(), 1);
        assert_eq!(
            gate[0].error.as_deref(),
            Some("cannot read us's topics: connection refused")
        );
        let last = lags_in(&body(), &table(), &request, &from, true);
        assert_eq!(
            last.iter()
                .map(|l| (l.partition, l.lag))
                .collect::<Vec<_>>(),
            vec![(8, 3), (9, 0)]
        );
        let text = lag_lines(&last, "eu");
        assert!(
            text.contains(
                "us -> eu orders[8]: source end 10, mirrored end 7, lag 3 (last measured at 2026-11-29T12:00:01Z; now: cannot read us's topics: connection refused)"
            ),
            "{text}"
        );
        assert!(text.ends_with("  total: 3 records\n"), "{text}");
        assert!(lag_lines(&gate, "eu").ends_with("  total: 0 records, and 1 not measured\n"));
    }
}
