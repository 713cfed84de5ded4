//! The static config file (`keyward.yaml`): which region this instance writes for, where it
//! listens, and the Kafka cluster of every region. It is read once at start; the ownership table
//! it points to is a separate, hot-reloaded file (see [`crate::ownership`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A config error that names the file, the field path and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{message}", file.display(), if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub file: PathBuf,
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The region this instance writes for; must name one of `clusters`.
    pub region: String,
    pub listen: Listen,
    #[serde(default)]
    pub admin: Admin,
    /// One Kafka cluster per region. The keys are the region names the ownership table uses.
    pub clusters: BTreeMap<String, Cluster>,
    /// The ownership table, relative to this file.
    pub ownership_file: PathBuf,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reads: Reads,
    /// How far MirrorMaker 2 is behind, measured (`GET /replication`, the
    /// `keyward_replication_*` metrics); not measured when absent.
    #[serde(default)]
    pub replication: Option<Replication>,
    /// How `on_foreign: redirect` keeps its bookkeeping.
    #[serde(default)]
    pub redirect: RedirectSettings,
    /// Where this config was read from (not a YAML field).
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Clients bootstrap here.
    pub bootstrap: SocketAddr,
    /// The host returned to clients in metadata for every virtual broker.
    pub advertised_host: String,
    /// Broker node N of the serving cluster is reachable at `broker_port_base + N`.
    pub broker_port_base: u16,
    /// The interface virtual broker ports bind to; defaults to the bootstrap's address.
    #[serde(default)]
    pub broker_bind: Option<std::net::IpAddr>,
    /// Virtual node ids (and ports) reserved per cluster: the local cluster's node N is virtual
    /// node N, the next cluster's is `ports_per_cluster + N`, and so on, so a client never
    /// confuses brokers of two clusters. Real node ids must be below it.
    #[serde(default = "Listen::default_ports_per_cluster")]
    pub ports_per_cluster: u16,
    /// When present, every client listener (bootstrap and virtual brokers) speaks TLS.
    #[serde(default)]
    pub tls: Option<ListenTls>,
}

/// Client-facing TLS. Files are PEM, relative to the config file, and re-read on every reload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// keyward's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Lowest TLS version offered to clients.
    #[serde(default)]
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl Listen {
    fn default_ports_per_cluster() -> u16 {
        100
    }
}

/// Where non-produce traffic goes: the first healthy cluster in preference order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reads {
    /// `[eu, us]` (nearest first), or `nearest` (lowest measured round-trip time). Default: the
    /// local region first, then the others by name.
    #[serde(default)]
    pub prefer: Prefer,
    /// How often every cluster is probed with a Metadata request.
    #[serde(default = "Reads::default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// How long a probe may take before the cluster counts as down.
    #[serde(default = "Reads::default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// How long a more preferred cluster must stay healthy before keyward switches back to it,
    /// so a flapping cluster does not cause a reconnect storm.
    #[serde(default = "Reads::default_hold_down_ms")]
    pub hold_down_ms: u64,
    /// Consecutive failed probes before a cluster counts as down (and reads move away from
    /// it), so one lost probe does not close every client connection.
    #[serde(default = "Reads::default_down_after_failed_probes")]
    pub down_after_failed_probes: u32,
    /// Which topics a client reads while another region's cluster serves its reads.
    #[serde(default)]
    pub topic_names: TopicNames,
    /// For how long after reads move back to the local cluster keyward carries consumer
    /// groups' positions home from the copies they read during the failover (through
    /// MirrorMaker 2's offset syncs; `proxy/failback.rs`). 0: never, groups resume from their
    /// last commit here. Only with `topic_names: mirrored`.
    #[serde(default = "Reads::default_failback_translation_ms")]
    pub failback_translation_ms: u64,
    /// How often, while the local cluster is up, keyward reads consumer groups' positions here
    /// on topics another region's cluster holds under another name (this region's own, and its
    /// copies of other regions' topics) and MirrorMaker 2's offset syncs both ways, so that at
    /// a switch to that cluster a group resumes from its position here, translated, wherever
    /// the cluster has none or one behind it (`proxy/positions.rs`). 0: never, such a group
    /// resumes from what MM2 synced, or by its `auto.offset.reset`. Only with
    /// `topic_names: mirrored`.
    #[serde(default = "Reads::default_positions_interval_ms")]
    pub positions_interval_ms: u64,
}

/// `reads.topic_names`: the names of this region's topics in another region's cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicNames {
    /// MirrorMaker 2's default replication policy: this region's topic `T` is read from the
    /// serving cluster's mirror `<region><separator>T` (`replication.separator`, "." by
    /// default), and topics are mapped in every request and response that names them.
    #[default]
    Mirrored,
    /// The serving cluster's topics under their own names: for MM2's identity replication
    /// policy (a copy keeps its source's name) or clusters that hold the same data otherwise.
    Same,
}

impl Reads {
    fn default_probe_interval_ms() -> u64 {
        2_000
    }
    fn default_probe_timeout_ms() -> u64 {
        1_000
    }
    fn default_hold_down_ms() -> u64 {
        30_000
    }
    fn default_down_after_failed_probes() -> u32 {
        3
    }
    fn default_failback_translation_ms() -> u64 {
        600_000
    }
    fn default_positions_interval_ms() -> u64 {
        10_000
    }
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            prefer: Prefer::default(),
            probe_interval_ms: Self::default_probe_interval_ms(),
            probe_timeout_ms: Self::default_probe_timeout_ms(),
            hold_down_ms: Self::default_hold_down_ms(),
            down_after_failed_probes: Self::default_down_after_failed_probes(),
            topic_names: TopicNames::default(),
            failback_translation_ms: Self::default_failback_translation_ms(),
            positions_interval_ms: Self::default_positions_interval_ms(),
        }
    }
}

/// Measuring MirrorMaker 2's lag: every `interval_ms`, for every ordered pair of regions, the
/// end offsets of the topics the table's rules cover against those of their copies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    #[serde(default = "Replication::default_interval_ms")]
    pub interval_ms: u64,
    /// MM2's `replication.policy.class`: only `default` (`DefaultReplicationPolicy`) is
    /// measured; `identity` is recognised in order to be refused with the reason.
    #[serde(default)]
    pub policy: ReplicationPolicy,
    /// MM2's `replication.policy.separator`: topic T of eu is `eu<separator>T` elsewhere.
    #[serde(default = "Replication::default_separator")]
    pub separator: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationPolicy {
    #[default]
    Default,
    Identity,
}

/// `redirect`: where redirect's per-stream bookkeeping lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSettings {
    /// Keep each idempotent producer's redirect bookkeeping in the stream journal, a compacted
    /// topic of the region's own cluster, so that another instance of the region (or this one
    /// after a restart) carries its streams on. Off: it lives in this process only, and a
    /// producer whose connection moves to another instance may be refused or see a redirected
    /// batch written twice.
    #[serde(default = "RedirectSettings::default_journal")]
    pub journal: bool,
    /// The stream journal's topic on the region's own cluster; keyward creates it (compacted,
    /// one partition) when it is missing.
    #[serde(default = "RedirectSettings::default_journal_topic")]
    pub journal_topic: String,
}

impl RedirectSettings {
    fn default_journal() -> bool {
        true
    }

    fn default_journal_topic() -> String {
        "_keyward_redirect_streams".to_owned()
    }
}

impl Default for RedirectSettings {
    fn default() -> Self {
        Self {
            journal: Self::default_journal(),
            journal_topic: Self::default_journal_topic(),
        }
    }
}

impl Replication {
    fn default_interval_ms() -> u64 {
        5_000
    }
    fn default_separator() -> String {
        ".".to_owned()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Prefer {
    /// The local region first, then the others by name.
    #[default]
    LocalFirst,
    /// These clusters only, nearest first (`[eu]` alone turns read failover off).
    Order(Vec<String>),
    /// Lowest measured round-trip time first.
    Nearest,
}

impl<'de> Deserialize<'de> for Prefer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "nearest" => Ok(Prefer::Nearest),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected a list of regions or `nearest`, got {w:?}"
            ))),
            Raw::List(l) => Ok(Prefer::Order(l)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Admin HTTP listener (metrics); loopback by default.
    #[serde(default = "Admin::default_listen")]
    pub listen: SocketAddr,
    /// When set, `POST /reload` requires `Authorization: Bearer <token>` with the token this
    /// file holds (re-read on every reload). Reads (metrics, ownership) stay open.
    #[serde(default)]
    pub reload_token_file: Option<PathBuf>,
    /// Lets `admin.listen` be a non-loopback address without `reload_token_file`, so anyone
    /// who reaches it may `POST /reload`. Off by default: such a config is refused.
    #[serde(default)]
    pub allow_unauthenticated_reload: bool,
}

impl Admin {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9190))
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            reload_token_file: None,
            allow_unauthenticated_reload: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// `host:port` of one or more brokers, tried in order.
    pub bootstrap: Vec<String>,
    /// TLS to this cluster's brokers, for client connections keyward relays and its own.
    #[serde(default)]
    pub tls: Option<ClusterTls>,
    /// Credentials for keyward's own connections (probes, redirected writes). Client
    /// connections carry the client's own SASL exchange through untouched.
    #[serde(default)]
    pub sasl: Option<Sasl>,
    /// What this cluster's listener requires of clients. Absent: `sasl` when keyward itself
    /// logs in with `sasl` (the same listener asks the same of everyone), `none` otherwise.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// Whether a cluster's listener authenticates clients, and so whether keyward waits for a
/// client's own SASL exchange to succeed before it answers or redirects anything for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Sasl,
    None,
}

impl Cluster {
    /// `client_auth` as configured, or as implied by keyward's own `sasl`.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(if self.sasl.is_some() {
            ClientAuth::Sasl
        } else {
            ClientAuth::None
        })
    }

    /// Whether keyward presents its own certificate to this cluster's brokers, on client
    /// connections too: then a broker that does not authenticate clients sees keyward.
    pub fn presents_certificate(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.cert.is_some())
    }
}

/// Cluster-facing TLS. Broker certificates are always verified, host names included.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// CA bundle (PEM) that signs the brokers' certificates; the system roots when absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// keyward's client certificate chain and key, for brokers that require one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// SASL credentials keyward uses for its own connections to one cluster. The password is read
/// from a file or an environment variable, never from this file, and never logged or shown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    /// The user name: inline, from a file, or from an environment variable (exactly one).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub username_file: Option<PathBuf>,
    #[serde(default)]
    pub username_env: Option<String>,
    /// The password: from a file or from an environment variable (exactly one).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request or response frame accepted; Kafka's `socket.request.max.bytes` default.
    #[serde(default = "Limits::default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Cap on the decompressed size of one record batch keyward inspects.
    #[serde(default = "Limits::default_max_decompressed_bytes")]
    pub max_decompressed_bytes: usize,
    /// Cap on the decompression buffers of all connections together.
    #[serde(default = "Limits::default_max_decompressed_bytes_total")]
    pub max_decompressed_bytes_total: usize,
    /// Timeout for connecting to a broker (TCP, TLS and SASL together).
    #[serde(default = "Limits::default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A client that has not completed its TLS handshake this long after connecting is closed.
    #[serde(default = "Limits::default_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// Requests one client connection may have in flight before keyward stops reading from it.
    #[serde(default = "Limits::default_max_in_flight")]
    pub max_in_flight: usize,
    /// Client connections open at once; one more is accepted and closed at once, and counted.
    #[serde(default = "Limits::default_max_connections")]
    pub max_connections: usize,
    /// A client connection that sends nothing for this long is closed (Kafka brokers'
    /// `connections.max.idle.ms` is 10 minutes too).
    #[serde(default = "Limits::default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// On SIGTERM: how long to wait for in-flight requests to be answered before exiting.
    #[serde(default = "Limits::default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// How long one connection trusts the broker's answer to "may this client WRITE this
    /// topic?" before asking again: how soon a revoked ACL stops redirected writes.
    #[serde(default = "Limits::default_authorization_ttl_ms")]
    pub authorization_ttl_ms: u64,
}

impl Limits {
    fn default_max_frame_bytes() -> usize {
        100 * 1024 * 1024
    }
    fn default_max_decompressed_bytes() -> usize {
        64 * 1024 * 1024
    }
    fn default_max_decompressed_bytes_total() -> usize {
        // Four batches at the per-batch cap at once: a burst of large compressed batches
        // waits (retriable) instead of growing keyward's memory by 64 MiB per connection.
        256 * 1024 * 1024
    }
    fn default_connect_timeout_ms() -> u64 {
        10_000
    }
    fn default_tls_handshake_timeout_ms() -> u64 {
        10_000
    }
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_idle_timeout_secs() -> u64 {
        600
    }
    fn default_shutdown_grace_secs() -> u64 {
        10
    }
    fn default_authorization_ttl_ms() -> u64 {
        30_000
    }
    fn default_max_in_flight() -> usize {
        // Kafka clients pipeline few requests per connection (Java: 5 by default); librdkafka
        // allows many more. A thousand keeps memory bounded while never throttling a real client.
        1024
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: Self::default_max_frame_bytes(),
            max_decompressed_bytes: Self::default_max_decompressed_bytes(),
            max_decompressed_bytes_total: Self::default_max_decompressed_bytes_total(),
            connect_timeout_ms: Self::default_connect_timeout_ms(),
            tls_handshake_timeout_ms: Self::default_tls_handshake_timeout_ms(),
            max_in_flight: Self::default_max_in_flight(),
            max_connections: Self::default_max_connections(),
            idle_timeout_secs: Self::default_idle_timeout_secs(),
            shutdown_grace_secs: Self::default_shutdown_grace_secs(),
            authorization_ttl_ms: Self::default_authorization_ttl_ms(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let error = |path: &str, message: String| ConfigError {
            file: source.to_owned(),
            path: path.to_owned(),
            message,
        };
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            error(&path, e.into_inner().to_string())
        })?;
        config.source = source.to_owned();

        if config.clusters.is_empty() {
            return Err(error("clusters", "at least one cluster is required".into()));
        }
        if !config.clusters.contains_key(&config.region) {
            let known: Vec<_> = config.clusters.keys().map(String::as_str).collect();
            return Err(error(
                "region",
                format!(
                    "region {:?} has no entry in clusters (known: {})",
                    config.region,
                    known.join(", ")
                ),
            ));
        }
        // Each cluster's producer ids are shown to other regions' clients in a range chosen by
        // its name (`policy::producer_ids`): two clusters must not share one.
        let mut ranges = std::collections::HashMap::new();
        for name in config.clusters.keys() {
            let range = crate::policy::producer_ids::base(name);
            if let Some(other) = ranges.insert(range, name) {
                return Err(error(
                    "clusters",
                    format!(
                        "clusters {other:?} and {name:?} would show producer ids in the same range during a read failover (their names hash alike); rename one"
                    ),
                ));
            }
        }
        for (name, cluster) in &config.clusters {
            if cluster.bootstrap.is_empty() {
                return Err(error(
                    &format!("clusters.{name}.bootstrap"),
                    "at least one host:port is required".into(),
                ));
            }
            if let Some(sasl) = &cluster.sasl {
                let field = |f: &str| format!("clusters.{name}.sasl.{f}");
                let usernames = [
                    sasl.username.is_some(),
                    sasl.username_file.is_some(),
                    sasl.username_env.is_some(),
                ];
                if usernames.iter().filter(|s| **s).count() != 1 {
                    return Err(error(
                        &field("username"),
                        "give exactly one of username, username_file, username_env".into(),
                    ));
                }
                if sasl.password_file.is_some() == sasl.password_env.is_some() {
                    return Err(error(
                        &field("password_file"),
                        "give exactly one of password_file, password_env (a password never goes in this file)".into(),
                    ));
                }
            }
            if cluster.client_auth == Some(ClientAuth::None) && cluster.sasl.is_some() {
                return Err(error(
                    &format!("clusters.{name}.client_auth"),
                    "`none` contradicts clusters.{name}.sasl: keyward logs in to this cluster's listener, so clients must too; remove client_auth or set it to sasl".replace("{name}", name),
                ));
            }
            if let Some(tls) = &cluster.tls
                && tls.cert.is_some() != tls.key.is_some()
            {
                return Err(error(
                    &format!("clusters.{name}.tls"),
                    "cert and key go together: give both or neither".into(),
                ));
            }
            for (i, addr) in cluster.bootstrap.iter().enumerate() {
                if let Err(problem) = check_host_port(addr) {
                    return Err(error(&format!("clusters.{name}.bootstrap[{i}]"), problem));
                }
            }
        }
        if config.listen.advertised_host.is_empty() {
            return Err(error("listen.advertised_host", "must not be empty".into()));
        }
        if config.limits.max_frame_bytes < 1024 {
            return Err(error(
                "limits.max_frame_bytes",
                "must be at least 1024".into(),
            ));
        }
        if let Prefer::Order(order) = &config.reads.prefer {
            for (i, region) in order.iter().enumerate() {
                if !config.clusters.contains_key(region) {
                    return Err(error(
                        &format!("reads.prefer[{i}]"),
                        format!("{region:?} has no entry in clusters"),
                    ));
                }
                if order[..i].contains(region) {
                    return Err(error(
                        &format!("reads.prefer[{i}]"),
                        format!("{region:?} is listed twice"),
                    ));
                }
            }
        }
        if config.reads.probe_interval_ms == 0 || config.reads.probe_timeout_ms == 0 {
            return Err(error(
                "reads",
                "probe_interval_ms and probe_timeout_ms must be above 0".into(),
            ));
        }
        if config.listen.ports_per_cluster == 0 {
            return Err(error(
                "listen.ports_per_cluster",
                "must be at least 1".into(),
            ));
        }
        let last_port = u32::from(config.listen.broker_port_base)
            + u32::from(config.listen.ports_per_cluster) * config.clusters.len() as u32;
        if last_port > 65_536 {
            return Err(error(
                "listen.broker_port_base",
                format!(
                    "{} clusters x ports_per_cluster {} from {} runs past port 65535",
                    config.clusters.len(),
                    config.listen.ports_per_cluster,
                    config.listen.broker_port_base
                ),
            ));
        }
        if config.limits.max_in_flight == 0 {
            return Err(error("limits.max_in_flight", "must be at least 1".into()));
        }
        if config.limits.max_connections == 0 {
            return Err(error("limits.max_connections", "must be at least 1".into()));
        }
        if config.limits.tls_handshake_timeout_ms == 0 {
            return Err(error(
                "limits.tls_handshake_timeout_ms",
                "must be above 0".into(),
            ));
        }
        if config.limits.idle_timeout_secs == 0 {
            return Err(error(
                "limits.idle_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        if config.reads.down_after_failed_probes == 0 {
            return Err(error(
                "reads.down_after_failed_probes",
                "must be at least 1".into(),
            ));
        }
        if config.limits.max_decompressed_bytes_total < config.limits.max_decompressed_bytes {
            return Err(error(
                "limits.max_decompressed_bytes_total",
                format!(
                    "{} is below limits.max_decompressed_bytes ({}): the largest batch allowed could never be read",
                    config.limits.max_decompressed_bytes_total,
                    config.limits.max_decompressed_bytes
                ),
            ));
        }
        if let Some(r) = &config.replication {
            if r.interval_ms < 100 {
                return Err(error(
                    "replication.interval_ms",
                    "must be at least 100".into(),
                ));
            }
            if r.separator.is_empty() {
                return Err(error(
                    "replication.separator",
                    "must not be empty (MM2's DefaultReplicationPolicy needs one)".into(),
                ));
            }
            if r.policy == ReplicationPolicy::Identity {
                return Err(error(
                    "replication.policy",
                    "identity is not supported: its copies keep the source's name, so keyward cannot tell a copy from the target region's own topic of that name, nor measure both directions; use MM2's default policy or leave replication out".into(),
                ));
            }
        }
        let admin = &config.admin;
        if !admin.listen.ip().is_loopback()
            && admin.reload_token_file.is_none()
            && !admin.allow_unauthenticated_reload
        {
            return Err(error(
                "admin.listen",
                format!(
                    "{} is not a loopback address and admin.reload_token_file is not set, so anyone who reaches it could POST /reload; set admin.reload_token_file, listen on 127.0.0.1, or set admin.allow_unauthenticated_reload: true",
                    admin.listen
                ),
            ));
        }
        Ok(config)
    }

    /// The ownership table's path, resolved against the directory of this config file.
    pub fn ownership_path(&self) -> PathBuf {
        self.resolve(&self.ownership_file)
    }

    /// A path from this file (table, certificates, secrets), resolved against its directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.source.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    /// Region names, sorted: the same order in every instance, whatever order the file uses.
    pub fn regions(&self) -> Vec<String> {
        self.clusters.keys().cloned().collect()
    }

    pub fn local_cluster(&self) -> &Cluster {
        &self.clusters[&self.region]
    }

    /// Clusters in node-id order: the local region first (its node ids stay as they are), then
    /// the others by name. A cluster's position times `ports_per_cluster` is its node-id offset.
    pub fn clusters_in_id_order(&self) -> Vec<String> {
        let mut order = vec![self.region.clone()];
        order.extend(self.clusters.keys().filter(|r| **r != self.region).cloned());
        order
    }

    pub fn broker_bind(&self) -> std::net::IpAddr {
        self.listen
            .broker_bind
            .unwrap_or_else(|| self.listen.bootstrap.ip())
    }
}

/// Why `addr` is not one broker's `host:port` (or `[v6]:port`), as an operator would fix it.
fn check_host_port(addr: &str) -> Result<(), String> {
    let parts: Vec<&str> = addr
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() > 1 {
        return Err(format!(
            "{addr:?} holds a list; write each address as its own entry: [{}]",
            parts.join(", ")
        ));
    }
    if addr.trim() != addr || addr.chars().any(|c| c == ',' || c == ';') {
        return Err(format!(
            "{addr:?} has stray separators or spaces; write host:port"
        ));
    }
    if let Some((scheme, _)) = addr.split_once("://") {
        return Err(format!(
            "{addr:?} has a scheme ({scheme}://); write host:port only"
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!(
            "{addr:?} has no port; write host:port, e.g. \"{addr}:9092\""
        ));
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => match v6.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            _ => {
                return Err(format!(
                    "{addr:?}: {host:?} is not an IPv6 address in brackets"
                ));
            }
        },
        None if host.contains(':') => {
            return Err(format!(
                "{addr:?}: an IPv6 address goes in brackets, e.g. \"[::1]:9092\""
            ));
        }
        None => host,
    };
    if host.is_empty() {
        return Err(format!("{addr:?} has no host; write host:port"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!(
            "{addr:?}: {host:?} is not a host name or IP address"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "{addr:?}: port {port:?} is not a number from 1 to 65535"
        )),
    }
}

/// Splits `host:port` (or `[v6]:port`) into its parts.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
region: eu
listen:
  bootstrap: 127.0.0.1:9192
  advertised_host: 127.0.0.1
  broker_port_base: 9193
clusters:
  eu: { bootstrap: ["127.0.0.1:19092"] }
  us: { bootstrap: ["127.0.0.1:29092"] }
ownership_file: ownership.yaml
"#;

    #[test]
    fn a_bootstrap_entry_holding_a_list_names_the_fix() {
        let bad = GOOD.replace(r#"["127.0.0.1:19092"]"#, r#"["h1:9092,h2:9092"]"#);
        let e = Config::parse(&bad, Path::new("keyward.yaml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "keyward.yaml: clusters.eu.bootstrap[0]: \"h1:9092,h2:9092\" holds a list; write each address as its own entry: [h1:9092, h2:9092]"
        );
    }

    #[test]
    fn bootstrap_addresses_must_be_host_and_numeric_port() {
        for (addr, problem) in [
            ("h1:9092 h2:9092", "holds a list"),
            ("h1:9092;h2:9092", "holds a list"),
            ("h1:9092,", "stray separators"),
            (" h1:9092", "stray separators"),
            ("PLAINTEXT://h1:9092", "has a scheme (PLAINTEXT://)"),
            ("h1", "has no port"),
            (":9092", "has no host"),
            ("h1:", "port \"\" is not a number"),
            ("h1:http", "port \"http\" is not a number"),
            ("h1:0", "port \"0\" is not a number"),
            ("h1:70000", "port \"70000\" is not a number"),
            ("::1:9092", "an IPv6 address goes in brackets"),
            ("[nope]:9092", "is not an IPv6 address in brackets"),
            ("h/1:9092", "is not a host name or IP address"),
        ] {
            let bad = GOOD.replace("127.0.0.1:29092", addr);
            let e = Config::parse(&bad, Path::new("k.yaml")).unwrap_err();
            assert_eq!(e.path, "clusters.us.bootstrap[0]", "{addr}");
            assert!(e.message.contains(problem), "{addr}: {e}");
        }
        for addr in [
            "kafka-1.eu.internal:9092",
            "10.0.0.1:9093",
            "[::1]:9092",
            "k_1:1",
        ] {
            let ok = GOOD.replace("127.0.0.1:29092", addr);
            Config::parse(&ok, Path::new("k.yaml")).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_a_reload_token_or_an_explicit_opt_out() {
        let open = format!("{GOOD}admin: {{ listen: 0.0.0.0:9190 }}\n");
        let e = Config::parse(&open, Path::new("keyward.yaml")).unwrap_err();
        assert_eq!(e.path, "admin.listen");
        assert_eq!(
            e.to_string(),
            "keyward.yaml: admin.listen: 0.0.0.0:9190 is not a loopback address and admin.reload_token_file is not set, so anyone who reaches it could POST /reload; set admin.reload_token_file, listen on 127.0.0.1, or set admin.allow_unauthenticated_reload: true"
        );
        for ok in [
            "admin: { listen: 0.0.0.0:9190, reload_token_file: token }",
            "admin: { listen: 0.0.0.0:9190, allow_unauthenticated_reload: true }",
            "admin: { listen: \"[::1]:9190\" }",
            "admin: { listen: 127.0.0.2:9190 }",
        ] {
            let c = Config::parse(&format!("{GOOD}{ok}\n"), Path::new("k.yaml"));
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
    }

    #[test]
    fn probe_and_decompression_limits_are_checked() {
        let c = Config::parse(GOOD, Path::new("k.yaml")).unwrap();
        assert_eq!(c.reads.down_after_failed_probes, 3);
        assert_eq!(c.limits.max_decompressed_bytes_total, 256 * 1024 * 1024);
        let e = Config::parse(
            &format!("{GOOD}reads: {{ down_after_failed_probes: 0 }}\n"),
            Path::new("k.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.path, "reads.down_after_failed_probes");
        let e = Config::parse(
            &format!(
                "{GOOD}limits: {{ max_decompressed_bytes: 2000, max_decompressed_bytes_total: 1000 }}\n"
            ),
            Path::new("k.yaml"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "k.yaml: limits.max_decompressed_bytes_total: 1000 is below limits.max_decompressed_bytes (2000): the largest batch allowed could never be read"
        );
    }

    #[test]
    fn read_topic_names_are_mirrored_unless_said_otherwise() {
        let c = Config::parse(GOOD, Path::new("k.yaml")).unwrap();
        assert_eq!(c.reads.topic_names, TopicNames::Mirrored);
        let c = Config::parse(
            &format!("{GOOD}reads: {{ topic_names: same }}\n"),
            Path::new("k.yaml"),
        )
        .unwrap();
        assert_eq!(c.reads.topic_names, TopicNames::Same);
        let e = Config::parse(
            &format!("{GOOD}reads: {{ topic_names: renamed }}\n"),
            Path::new("k.yaml"),
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("k.yaml") && e.contains("reads.topic_names"),
            "{e}"
        );
    }

    #[test]
    fn clusters_whose_producer_id_ranges_meet_are_refused() {
        // Two names that hash into the same range, found the way a user would meet them.
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0..)
            .map(|i| format!("r{i}"))
            .find_map(|n| {
                let base = crate::policy::producer_ids::base(&n);
                seen.insert(base, n.clone()).map(|other| (other, n))
            })
            .unwrap();
        let config = format!(
            "region: {a}\nlisten: {{ bootstrap: 127.0.0.1:9092, advertised_host: 127.0.0.1, broker_port_base: 9093 }}\nclusters:\n  {a}: {{ bootstrap: [\"127.0.0.1:1\"] }}\n  {b}: {{ bootstrap: [\"127.0.0.1:2\"] }}\nownership_file: o.yaml\n"
        );
        let e = format!(
            "{:#}",
            Config::parse(&config, Path::new("k.yaml")).unwrap_err()
        );
        assert!(
            e.contains("k.yaml") && e.contains("clusters") && e.contains(&b),
            "{e}"
        );
    }

    #[test]
    fn failback_carries_positions_home_for_ten_minutes_unless_said_otherwise() {
        let c = Config::parse(GOOD, Path::new("k.yaml")).unwrap();
        assert_eq!(c.reads.failback_translation_ms, 600_000);
        let c = Config::parse(
            &format!("{GOOD}reads: {{ failback_translation_ms: 0 }}\n"),
            Path::new("k.yaml"),
        )
        .unwrap();
        assert_eq!(c.reads.failback_translation_ms, 0);
        let e = Config::parse(
            &format!("{GOOD}reads: {{ failback_translation_ms: soon }}\n"),
            Path::new("k.yaml"),
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("k.yaml") && e.contains("reads.failback_translation_ms"),
            "{e}"
        );
    }

    #[test]
    fn replication_is_measured_only_when_configured_and_identity_is_refused() {
        let c = Config::parse(GOOD, Path::new("k.yaml")).unwrap();
        assert!(c.replication.is_none());
        let c = Config::parse(&format!("{GOOD}replication: {{}}\n"), Path::new("k.yaml")).unwrap();
        let r = c.replication.unwrap();
        assert_eq!(
            (r.interval_ms, r.separator.as_str(), r.policy),
            (5_000, ".", ReplicationPolicy::Default)
        );
        for (bad, path, problem) in [
            (
                "replication: { policy: identity }",
                "replication.policy",
                "identity is not supported",
            ),
            (
                "replication: { policy: custom }",
                "replication.policy",
                "unknown variant `custom`",
            ),
            (
                "replication: { separator: \"\" }",
                "replication.separator",
                "must not be empty",
            ),
            (
                "replication: { interval_ms: 10 }",
                "replication.interval_ms",
                "at least 100",
            ),
        ] {
            let e = Config::parse(&format!("{GOOD}{bad}\n"), Path::new("k.yaml")).unwrap_err();
            assert_eq!(e.path, path, "{bad}");
            assert!(e.message.contains(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_and_resolves_the_table_next_to_the_config() {
        let c = Config::parse(GOOD, Path::new("/etc/keyward/keyward.yaml")).unwrap();
        assert_eq!(c.region, "eu");
        assert_eq!(c.regions(), vec!["eu", "us"]);
        assert_eq!(
            c.ownership_path(),
            PathBuf::from("/etc/keyward/ownership.yaml")
        );
        assert_eq!(c.limits.max_frame_bytes, 100 * 1024 * 1024);
        assert_eq!(c.admin.listen.port(), 9190);
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let bad = GOOD.replace("region: eu", "region: ap");
        let e = Config::parse(&bad, Path::new("k.yaml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "k.yaml: region: region \"ap\" has no entry in clusters (known: eu, us)"
        );

        let bad = GOOD.replace(
            "broker_port_base: 9193",
            "broker_port_base: 9193\n  colour: red",
        );
        let e = Config::parse(&bad, Path::new("k.yaml")).unwrap_err();
        assert_eq!(e.path, "listen.colour");
        assert!(e.message.contains("unknown field `colour`"), "{e}");

        let bad = GOOD.replace("127.0.0.1:29092", "nohost");
        let e = Config::parse(&bad, Path::new("k.yaml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "k.yaml: clusters.us.bootstrap[0]: \"nohost\" has no port; write host:port, e.g. \"nohost:9092\""
        );

        let bad = GOOD.replace("9192", "notaport");
        let e = Config::parse(&bad, Path::new("k.yaml")).unwrap_err();
        assert_eq!(e.path, "listen.bootstrap");
    }

    #[test]
    fn client_auth_follows_keywards_own_login_and_cannot_contradict_it() {
        let c = Config::parse(GOOD, Path::new("k.yaml")).unwrap();
        assert_eq!(c.clusters["eu"].client_auth(), ClientAuth::None);
        let sasl = "sasl: { mechanism: PLAIN, username: kw, password_env: KW_PASSWORD }";
        let with_sasl = GOOD.replace(
            r#"eu: { bootstrap: ["127.0.0.1:19092"] }"#,
            &format!(r#"eu: {{ bootstrap: ["127.0.0.1:19092"], {sasl} }}"#),
        );
        let c = Config::parse(&with_sasl, Path::new("k.yaml")).unwrap();
        assert_eq!(c.clusters["eu"].client_auth(), ClientAuth::Sasl);
        let explicit = GOOD.replace(
            r#"us: { bootstrap: ["127.0.0.1:29092"] }"#,
            r#"us: { bootstrap: ["127.0.0.1:29092"], client_auth: sasl }"#,
        );
        let c = Config::parse(&explicit, Path::new("k.yaml")).unwrap();
        assert_eq!(c.clusters["us"].client_auth(), ClientAuth::Sasl);

        let contradiction = with_sasl.replace(sasl, &format!("{sasl}, client_auth: none"));
        let e = Config::parse(&contradiction, Path::new("k.yaml")).unwrap_err();
        assert_eq!(e.path, "clusters.eu.client_auth");
        assert!(e.message.contains("contradicts clusters.eu.sasl"), "{e}");
    }
}
