//! keyward started in-process (`proxy::run` on a listener bound to `127.0.0.1:0`, the admin API
//! on another), a Kafka client speaking raw frames, record batches and the metrics text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use keyward::config::Config;
use keyward::ownership::murmur2::{murmur2, to_positive};
use keyward::proxy::{self, Shared};
use keyward::reload::Ownership;
use keyward::security::Security;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, MutexGuard};

use crate::broker::read_frame;

/// The metrics recorder is one per process and `keyward_requests_total` has no label a test
/// can own: every test holds this for its whole run, so counts read in one are its own.
pub async fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::const_new(());
    SERIAL.lock().await
}

/// Installed before any keyward metric handle is made (handles made before are no-ops).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| keyward::admin::install_recorder().unwrap())
        .clone()
}

/// A `by: key` rule with two slots, eu owning slot 0 and us slot 1, refusing foreign writes,
/// for topics `<prefix>.*`.
pub fn key_rule(name: &str, prefix: &str) -> String {
    key_rule_on_foreign(name, prefix, "reject")
}

/// [`key_rule`] doing `on_foreign` with us's writes (`reject`, `redirect`, ...).
pub fn key_rule_on_foreign(name: &str, prefix: &str, on_foreign: &str) -> String {
    format!(
        r#"rules:
  - name: {name}
    topics: ["{prefix}.*"]
    by: key
    slots: 2
    owners: {{ eu: ["0"], us: ["1"] }}
    null_key: reject
    on_foreign: {on_foreign}
default: allow
"#
    )
}

/// A key `by: key` with two slots gives to `slot` (0: eu, this keyward's region; 1: us).
pub fn key_in_slot(slot: u32, nth: usize) -> Vec<u8> {
    (0..)
        .map(|n| format!("key-{n}").into_bytes())
        .filter(|k| to_positive(murmur2(k)) % 2 == slot)
        .nth(nth)
        .unwrap()
}

pub fn owned_key(nth: usize) -> Vec<u8> {
    key_in_slot(0, nth)
}

pub fn foreign_key(nth: usize) -> Vec<u8> {
    key_in_slot(1, nth)
}

/// One v2 batch of a plain producer, a record per key.
pub fn batch(keys: &[Vec<u8>]) -> Bytes {
    producer_batch(keys, -1, -1)
}

/// A batch of an idempotent producer: `producer_id`, epoch 0, records numbered from
/// `base_sequence`.
pub fn producer_batch(keys: &[Vec<u8>], producer_id: i64, base_sequence: i32) -> Bytes {
    let records: Vec<Record> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch: if producer_id < 0 { -1 } else { 0 },
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: if base_sequence < 0 {
                i as i32
            } else {
                base_sequence + i as i32
            },
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::copy_from_slice(k)),
            value: Some(Bytes::from_static(b"v")),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

/// A Produce request: `(topic, [(partition, batch)])` in the order given.
pub fn produce(acks: i16, topics: &[(&str, Vec<(i32, Bytes)>)]) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5_000)
        .with_topic_data(
            topics
                .iter()
                .map(|(name, partitions)| {
                    TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string((*name).to_owned())))
                        .with_partition_data(
                            partitions
                                .iter()
                                .map(|(p, records)| {
                                    PartitionProduceData::default()
                                        .with_index(*p)
                                        .with_records(Some(records.clone()))
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
}

/// Produce v9: flexible, with error messages and record errors, before KIP-951 endpoints.
pub const PRODUCE_VERSION: i16 = 9;
pub const METADATA_VERSION: i16 = 12;
pub const FETCH_VERSION: i16 = 12;

/// Virtual node ids per cluster: eu's node N is virtual node N, us's is `PORTS_PER_CLUSTER + N`.
pub const PORTS_PER_CLUSTER: u16 = 4;

pub struct Options {
    pub table: String,
    pub idle_timeout_secs: u64,
    /// us's cluster: its own broker, or (`None`) eu's broker again.
    pub us: Option<SocketAddr>,
    /// Read failover between eu and us (`reads.prefer: [eu, us]`, down after 3 failed probes),
    /// or (`None`) eu alone, probed only at start.
    pub failover: Option<Failover>,
}

/// Probe and hold-down timing, on tokio's clock.
#[derive(Clone, Copy)]
pub struct Failover {
    pub probe_interval: Duration,
    pub hold_down: Duration,
}

impl Options {
    pub fn table(table: String) -> Self {
        Self {
            table,
            idle_timeout_secs: 600,
            us: None,
            failover: None,
        }
    }
}

/// A `broker_port_base` below the kernel's ephemeral range (so no socket the tests open lands
/// on a virtual port) whose ports for both clusters are free right now.
fn port_base() -> u16 {
    static N: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    (0..100)
        .map(|_| {
            20_000 + ((seed.wrapping_add(N.fetch_add(1, Ordering::Relaxed) * 97)) % 10_000) as u16
        })
        .find(|&base| {
            (base..base + 2 * PORTS_PER_CLUSTER)
                .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        })
        .expect("no free range of virtual broker ports")
}

pub struct Keyward {
    pub bootstrap: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    dir: PathBuf,
}

impl Keyward {
    /// keyward for region eu, whose cluster is `broker`; us's cluster is `options.us`, or
    /// `broker` too (probes succeed; a table that refuses us's writes never writes to it).
    pub async fn start(broker: SocketAddr, options: Options) -> Self {
        let metrics = recorder();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keyward-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ownership.yaml"), &options.table).unwrap();
        // Virtual broker ports are broker_port_base + virtual node id, fixed numbers.
        let base = port_base();
        let us = options.us.unwrap_or(broker);
        let reads = match options.failover {
            // No probe after the one at start: nothing moves reads while a test runs.
            None => "  prefer: [eu]\n  probe_interval_ms: 86400000\n".to_owned(),
            Some(f) => format!(
                "  prefer: [eu, us]\n  probe_interval_ms: {}\n  hold_down_ms: {}\n  down_after_failed_probes: 3\n",
                f.probe_interval.as_millis(),
                f.hold_down.as_millis()
            ),
        };
        let config = format!(
            r#"region: eu
listen:
  bootstrap: 127.0.0.1:0
  advertised_host: 127.0.0.1
  broker_port_base: {base}
  ports_per_cluster: {PORTS_PER_CLUSTER}
admin:
  listen: 127.0.0.1:0
clusters:
  eu: {{ bootstrap: ["{broker}"] }}
  us: {{ bootstrap: ["{us}"] }}
ownership_file: ownership.yaml
reads:
{reads}limits:
  idle_timeout_secs: {idle}
  shutdown_grace_secs: 1
# The fake brokers serve no topic of keyward's own; the journal is tested against real ones
# (tests/e2e/test_faults.py).
redirect:
  journal: false
"#,
            idle = options.idle_timeout_secs
        );
        let config = Config::parse(&config, &dir.join("keyward.yaml")).unwrap();
        let ownership = Arc::new(
            Ownership::load(&config.ownership_path(), &config.regions(), &config.region).unwrap(),
        );
        let security = Arc::new(Security::load(&config).unwrap());
        let shared = Shared::new(config, ownership, security).unwrap();
        let bootstrap = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (bootstrap_addr, admin_addr) =
            (bootstrap.local_addr().unwrap(), admin.local_addr().unwrap());
        let stop = shared.shutdown_token();
        tokio::spawn(keyward::admin::serve(
            admin,
            metrics,
            shared.clone(),
            stop.clone(),
        ));
        // Dropping the harness cancels the token, which is the shutdown future here.
        tokio::spawn(proxy::run(
            shared.clone(),
            bootstrap,
            stop.cancelled_owned(),
        ));
        // Ready once the probe round at start has learned every broker and opened its port.
        let started = std::time::Instant::now();
        while let Some(why) = shared.not_ready() {
            assert!(started.elapsed() < Duration::from_secs(10), "{why}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Self {
            bootstrap: bootstrap_addr,
            admin: admin_addr,
            shared,
            dir,
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.bootstrap).await.unwrap()
    }

    /// The cluster serving now (`reads`), by name.
    pub fn serving(&self) -> &str {
        &self.shared.clusters.get(self.shared.serving.index()).name
    }

    /// `GET /metrics` from the admin API.
    pub async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }
}

impl Drop for Keyward {
    fn drop(&mut self) {
        self.shared.shutdown_token().cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of the sample `name{labels}` (exactly those labels, in any order), or `None`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, got) = match series.split_once('{') {
            Some((n, rest)) => {
                let mut got: Vec<String> = rest
                    .strip_suffix('}')?
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                got.sort();
                (n, got)
            }
            None => (series, Vec::new()),
        };
        (n == name && got == want).then(|| value.parse().unwrap())
    })
}

pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

/// A request frame, length prefix included.
pub fn request<M: Encodable>(api: ApiKey, version: i16, correlation_id: i32, body: &M) -> BytesMut {
    let mut out = BytesMut::from(&[0u8; 4][..]);
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("proxy-test")))
        .encode(&mut out, api.request_header_version(version))
        .unwrap();
    body.encode(&mut out, version).unwrap();
    let len = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// A response body (length prefix removed): its correlation id and message.
pub fn response<M: Decodable>(mut frame: Bytes, api: ApiKey, version: i16) -> (i32, M) {
    let header = ResponseHeader::decode(&mut frame, api.response_header_version(version)).unwrap();
    (
        header.correlation_id,
        M::decode(&mut frame, version).unwrap(),
    )
}

impl Client {
    /// A client of keyward's bootstrap or of one of its virtual brokers.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        })
    }

    pub async fn send<M: Encodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        correlation_id: i32,
        body: &M,
    ) {
        let out = request(api, version, correlation_id, body);
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next response's correlation id and body, or `None` once keyward closed the
    /// connection. Panics after 10 s of (tokio) time without either.
    pub async fn recv<M: Decodable>(&mut self, api: ApiKey, version: i16) -> Option<(i32, M)> {
        let frame = self.recv_frame(Duration::from_secs(10)).await.unwrap()?;
        Some(response(frame, api, version))
    }

    /// The next frame, `Ok(None)` at end of stream, `Err(())` if `wait` passes first.
    pub async fn recv_frame(&mut self, wait: Duration) -> Result<Option<Bytes>, ()> {
        tokio::time::timeout(wait, read_frame(&mut self.stream, &mut self.buf))
            .await
            .map_err(|_| ())
    }
}
