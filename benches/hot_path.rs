//! Micro-benchmarks of keyward's per-request hot path, on one core:
//!
//! - `ownership/*`: one lookup (ns each): `Rule::claim` of a key (murmur2 + slot table),
//!   a header (value → owner map), a key part (split at a delimiter, or a regex capture, then
//!   the value → owner map), and `Table::rule_for_topic` (first matching
//!   pattern), what a produce request pays per record or per topic.
//! - `inspect/*`: a whole Produce request (4 partitions × one batch) through
//!   `codec::produce::parse` and `policy::produce::decide`, as `proxy::handlers::produce` does
//!   it, for uncompressed, lz4 and zstd batches of 100-byte and 1 KiB records; throughput in
//!   records/s.
//!   `inspect/none-rule/*` is a topic no rule matches (batch headers only).
//! - `merge/*`: the partial path, where keyward refused some partitions: the request forwarded
//!   with only the owned partitions (`proxy::produce::forwarded_request`) and the broker's response
//!   merged with keyward's answers (`ProduceReply::merge`).
//!
//! Requests are built with kafka-protocol's encoders, as a client would send them. Run with
//! `cargo bench --bench hot_path` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use keyward::codec::frame;
use keyward::codec::produce;
use keyward::codec::records::Inflater;
use keyward::ownership::{Claim, Subject, Table};
use keyward::policy::produce::{Destination, Placement, decide};
use keyward::proxy::brokers::UnmappableNode;
use keyward::proxy::produce::{ProduceReply, Route, forwarded_request};
use keyward::proxy::rewrite::Advertise;
use keyward::reload::{Outcome, Ownership, Trigger};

/// The table of the end-to-end benchmark (dev/bench.py) plus a split key rule for the merge
/// benchmark: eu owns slots 0-7 of `split.*`, us 8-15; and key_part rules for the lookups.
const TABLE: &str = r#"
rules:
  - name: bench-key
    topics: ["key.*", "orders", "orders.eu.*"]
    by: key
    slots: 16
    owners: { eu: ["0-15"] }
    null_key: reject
  - name: bench-header
    topics: ["hdr.*", "tenants"]
    by: header
    header: tenant
    owners: { eu: [t00, t01, t02, t03, t04, t05, t06, t07, t08, t09, t10, t11, t12, t13, t14, t15] }
    unmatched: reject
  - name: split
    topics: ["split.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    null_key: reject
  - name: bench-key-part-delimiter
    topics: ["part.delimiter"]
    by: key_part
    delimiter: "|"
    index: 0
    owners: { eu: [t00, t01, t02, t03, t04, t05, t06, t07, t08, t09, t10, t11, t12, t13, t14, t15] }
  - name: bench-key-part-pattern
    topics: ["part.pattern"]
    by: key_part
    pattern: '^(t[0-9]+)\|'
    owners: { eu: [t00, t01, t02, t03, t04, t05, t06, t07, t08, t09, t10, t11, t12, t13, t14, t15] }
default: allow
"#;

/// Produce v9 is the first flexible version (what recent librdkafka sends); v12 is the newest
/// keyward accepts.
const VERSION: i16 = 9;
const PARTITIONS: i32 = 4;
const KEYS: usize = 1024;
/// Matches keyward's default `limits.max_decompressed_bytes`.
const MAX_DECOMPRESSED: usize = 64 << 20;

fn table() -> Table {
    Table::parse(
        TABLE,
        Path::new("ownership.yaml"),
        &["eu".to_owned(), "us".to_owned()],
    )
    .expect("the benchmark table is valid")
}

fn keys() -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| format!("k{:010}", (i as u64 * 2_654_435_761) % 100_000).into_bytes())
        .collect()
}

/// A text-like value (JSON-ish words and numbers), compressible the way real payloads are.
fn value(size: usize, seed: u64) -> Bytes {
    const WORDS: [&str; 10] = [
        "\"id\":",
        "\"customer\":",
        "\"amount\":",
        "\"currency\":\"EUR\"",
        "\"status\":\"paid\"",
        "{\"sku\":",
        "\"qty\":",
        "order",
        "invoice",
        "},",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(size + 32);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            v.extend_from_slice(format!("{},", (x >> 20) % 100_000).as_bytes());
        } else {
            v.extend_from_slice(WORDS[(x >> 8) as usize % WORDS.len()].as_bytes());
        }
    }
    v.truncate(size);
    Bytes::from(v)
}

/// One record batch of `count` records with keys from `keys` and a `tenant` header each.
fn batch(keys: &[Vec<u8>], count: usize, size: usize, compression: Compression) -> Bytes {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // kafka-protocol starts a new batch wherever offset - sequence changes.
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::copy_from_slice(&keys[i % keys.len()])),
            value: Some(value(size, i as u64)),
            headers: [(
                StrBytes::from_static_str("tenant"),
                Some(Bytes::from(format!("t{:02}", i % 16))),
            )]
            .into_iter()
            .collect(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .expect("encodable batch");
    let buf = buf.freeze();
    assert_eq!(
        keyward::codec::records::batches(&buf).count(),
        1,
        "one batch"
    );
    buf
}

/// A whole Produce request frame (length prefix, v2 header, body), one batch per partition.
fn request_frame(topic: &str, batches: Vec<Bytes>) -> Bytes {
    let partitions = batches
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            PartitionProduceData::default()
                .with_index(i as i32)
                .with_records(Some(b))
        })
        .collect();
    let request = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(partitions),
        ]);
    let mut header = Vec::new();
    header.extend_from_slice(&(ApiKey::Produce as i16).to_be_bytes());
    header.extend_from_slice(&VERSION.to_be_bytes());
    header.extend_from_slice(&42i32.to_be_bytes());
    header.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
    if ApiKey::Produce.request_header_version(VERSION) >= 2 {
        header.push(0); // no tagged fields
    }
    let mut body = Vec::new();
    request
        .encode(&mut body, VERSION)
        .expect("encodable request");
    frame::assemble(&header, &body)
}

/// Where the body of a request frame starts.
fn body_start(frame: &[u8]) -> usize {
    frame::LENGTH_PREFIX
        + frame::request_header_len(frame, ApiKey::Produce.request_header_version(VERSION))
            .expect("valid header")
}

fn ownership(c: &mut Criterion) {
    let table = table();
    let keys = keys();
    let tenants: Vec<Vec<u8>> = (0..16).map(|i| format!("t{i:02}").into_bytes()).collect();
    let key_rule = table.rule_for_topic("key.bench").expect("key rule");
    let header_rule = table.rule_for_topic("hdr.bench").expect("header rule");

    let mut g = c.benchmark_group("ownership");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("claim_key", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            key_rule.claim(&Subject::topic("key.bench").with_key(Some(black_box(&keys[i]))))
        })
    });
    g.bench_function("claim_header", |b| {
        b.iter(|| {
            i = (i + 1) % tenants.len();
            header_rule
                .claim(&Subject::topic("hdr.bench").with_header(b"tenant", black_box(&tenants[i])))
        })
    });
    let part_keys: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("t{i:02}|order-{i}").into_bytes())
        .collect();
    for topic in ["part.delimiter", "part.pattern"] {
        let rule = table.rule_for_topic(topic).expect("key_part rule");
        let name = format!("claim_key_part/{}", &topic["part.".len()..]);
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % part_keys.len();
                rule.claim(&Subject::topic(topic).with_key(Some(black_box(&part_keys[i]))))
            })
        });
    }
    g.bench_function("rule_for_topic", |b| {
        b.iter(|| table.rule_for_topic(black_box("hdr.bench")).is_some())
    });
    g.bench_function("rule_for_topic/no_match", |b| {
        b.iter(|| table.rule_for_topic(black_box("plain.bench")).is_none())
    });
    g.finish();
}

fn inspect(c: &mut Criterion) {
    let table = table();
    let local = table.region_id("eu").expect("eu");
    let keys = keys();
    let mut g = c.benchmark_group("inspect");
    for (size, per_batch) in [(100usize, 1000usize), (1024, 250)] {
        for (codec, compression) in [
            ("none", Compression::None),
            ("lz4", Compression::Lz4),
            ("zstd", Compression::Zstd),
        ] {
            let batches: Vec<Bytes> = (0..PARTITIONS)
                .map(|_| batch(&keys, per_batch, size, compression))
                .collect();
            let records = (PARTITIONS as usize * per_batch) as u64;
            g.throughput(Throughput::Elements(records));
            for (rule, topic) in [
                ("by-key", "key.bench"),
                ("by-header", "hdr.bench"),
                ("none-rule", "plain.bench"),
            ] {
                if rule == "by-header" && !matches!(compression, Compression::None) {
                    continue; // by-key already shows what the codec adds
                }
                let frame = request_frame(topic, batches.clone());
                let start = body_start(&frame);
                let mut inflater = Inflater::new(MAX_DECOMPRESSED);
                // Check once that the benchmark measures what it claims: every partition
                // forwarded, every record counted.
                let view = produce::parse(&frame[start..], VERSION).expect("parses");
                let plan = decide(&view, &table, local, &mut inflater);
                assert!(plan.all_forward(), "{rule}/{codec}/{size}: {plan:?}");
                let counted: u64 = plan.partitions.iter().map(|p| p.records as u64).sum();
                assert_eq!(counted, records);
                g.bench_function(BenchmarkId::new(format!("{rule}/{codec}"), size), |b| {
                    b.iter(|| {
                        let view = produce::parse(black_box(&frame[start..]), VERSION).unwrap();
                        decide(&view, &table, local, &mut inflater).partitions.len()
                    })
                });
            }
        }
    }
    g.finish();
}

/// Advertises every broker at a fixed proxy address under its own node id, as keyward does for
/// the local cluster.
struct Proxy;

impl Advertise for Proxy {
    fn advertise(
        &self,
        node_id: i32,
        _real_host: &str,
        _real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
        Ok((
            node_id,
            StrBytes::from_static_str("127.0.0.1"),
            9000 + node_id,
        ))
    }

    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
        Ok(node_id)
    }

    fn renumbers(&self) -> bool {
        false
    }
}

/// A key owned by `region` under the `split` rule.
fn key_owned_by(table: &Table, region: &str, skip: usize) -> Vec<u8> {
    let rule = table.rule_for_topic("split.bench").expect("split rule");
    let want = table.region_id(region).expect("region");
    (0..)
        .map(|i| format!("k{i:010}").into_bytes())
        .filter(
            |k| matches!(rule.claim(&Subject::topic("split.bench").with_key(Some(k))), Some(Claim::Region { region, .. }) if region == want),
        )
        .nth(skip)
        .expect("some key hashes there")
}

fn merge(c: &mut Criterion) {
    let table = table();
    let local = table.region_id("eu").expect("eu");
    let eu_keys: Vec<Vec<u8>> = (0..64).map(|i| key_owned_by(&table, "eu", i)).collect();
    let mut mixed = eu_keys.clone();
    mixed[10] = key_owned_by(&table, "us", 0);
    // Partitions 0 and 2 are owned; 1 and 3 each hold one record owned by us.
    let batches: Vec<Bytes> = (0..PARTITIONS)
        .map(|p| {
            let keys = if p % 2 == 0 { &eu_keys } else { &mixed };
            batch(keys, 250, 100, Compression::None)
        })
        .collect();
    let frame = request_frame("split.bench", batches);
    let start = body_start(&frame);
    let header_len = start - frame::LENGTH_PREFIX;
    let view = produce::parse(&frame[start..], VERSION).expect("parses");
    let mut plan = decide(&view, &table, local, &mut Inflater::new(MAX_DECOMPRESSED));
    let placement = Placement {
        clusters: &[Some(0), Some(1)],
        connection: 0,
        local_name: "eu",
        connection_name: "eu",
    };
    let destinations = plan.place(&view, &table, &placement);
    let forwarded: Vec<bool> = plan
        .partitions
        .iter()
        .map(|p| p.action.is_forward())
        .collect();
    assert_eq!(forwarded, [true, false, true, false]);
    let routes = || -> Vec<Route> {
        destinations
            .iter()
            .map(|d| match d.clone() {
                Destination::Connection => Route::Upstream(None),
                Destination::Answer(answer) => Route::Answer(answer),
                Destination::Cluster(_) | Destination::Split(_) => {
                    unreachable!("no redirect rule here")
                }
            })
            .collect()
    };
    let upstream = routes();
    let reply = ProduceReply::new(VERSION, &view, routes(), "41d6d7369d14");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    // The broker's answer for the two forwarded partitions.
    let broker = ProduceResponse::default().with_responses(vec![
        TopicProduceResponse::default()
            .with_name(TopicName(StrBytes::from_static_str("split.bench")))
            .with_partition_responses(
                [0, 2]
                    .into_iter()
                    .map(|i| {
                        PartitionProduceResponse::default()
                            .with_index(i)
                            .with_base_offset(1_000_000)
                            .with_log_append_time_ms(-1)
                            .with_log_start_offset(0)
                    })
                    .collect(),
            ),
    ]);
    let mut header = 42i32.to_be_bytes().to_vec();
    if ApiKey::Produce.response_header_version(VERSION) >= 1 {
        header.push(0);
    }
    let mut body = Vec::new();
    broker.encode(&mut body, VERSION).expect("encodable");
    let response = frame::assemble(&header, &body);

    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(1));
    g.bench_function("forwarded_request", |b| {
        b.iter(|| {
            forwarded_request(black_box(&frame), header_len, VERSION, &view, &upstream)
                .unwrap()
                .len()
        })
    });
    g.bench_function("reply_new", |b| {
        b.iter(|| ProduceReply::new(VERSION, black_box(&view), routes(), "41d6d7369d14"))
    });
    g.bench_function("merge_response", |b| {
        b.iter(|| {
            let (correlation_id, broker) =
                reply.broker_response(black_box(&response), &Proxy).unwrap();
            runtime
                .block_on(reply.respond(correlation_id, broker))
                .unwrap()
                .len()
        })
    });
    g.finish();
}

/// A table as `dev/bench --tables` writes it: a `by: key` rule of `slots` slots owned by eu and
/// us in alternating ranges of 64, and a `by: header` rule of `tenants` values `t000000`...,
/// every other one eu's, plus `t00`-`t15` (eu's), the tenants of [`batch`]'s records.
fn large_table_text(tenants: usize, slots: usize) -> String {
    let mut ranges = [Vec::new(), Vec::new()];
    for first in (0..slots).step_by(64) {
        let last = (first + 64).min(slots) - 1;
        ranges[(first / 64) % 2].push(format!("\"{first}-{last}\""));
    }
    let mut values = [
        (0..16).map(|i| format!("t{i:02}")).collect::<Vec<_>>(),
        Vec::new(),
    ];
    for i in 0..tenants {
        values[i % 2].push(format!("t{i:06}"));
    }
    format!(
        r#"rules:
  - name: orders
    topics: ["key.*"]
    by: key
    slots: {slots}
    owners: {{ eu: [{}], us: [{}] }}
  - name: tenants
    topics: ["hdr.*"]
    by: header
    header: tenant
    owners:
      eu: [{}]
      us: [{}]
    unmatched: reject
default: allow
"#,
        ranges[0].join(", "),
        ranges[1].join(", "),
        values[0].join(", "),
        values[1].join(", "),
    )
}

/// Issue 18, large tables: the lookups of a 100,000-tenant `by: header` rule and a 65,536-slot
/// `by: key` rule beside a small table's (16 of each), parsing such a table (what a reload
/// does before the swap), and a whole Produce request's inspection against each.
fn large_tables(c: &mut Criterion) {
    let regions = ["eu".to_owned(), "us".to_owned()];
    let parse = |text: &str| {
        Table::parse(text, Path::new("ownership.yaml"), &regions).expect("a valid table")
    };
    let small_text = large_table_text(16, 16);
    let large_text = large_table_text(100_000, 65_536);
    let tables = [("small", parse(&small_text)), ("large", parse(&large_text))];
    let keys = keys();
    let mut g = c.benchmark_group("large_tables");
    g.throughput(Throughput::Elements(1));
    for (name, table) in &tables {
        let key_rule = table.rule_for_topic("key.bench").expect("key rule");
        let header_rule = table.rule_for_topic("hdr.bench").expect("header rule");
        let tenant_count = if *name == "small" { 16 } else { 100_000 };
        // 1,024 tenants spread over the whole rule, so lookups do not stay in one cache line.
        let tenants: Vec<Vec<u8>> = (0..1024)
            .map(|i| format!("t{:06}", (i * 2_654_435_761usize) % tenant_count).into_bytes())
            .collect();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("claim_key", name), |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                key_rule.claim(&Subject::topic("key.bench").with_key(Some(black_box(&keys[i]))))
            })
        });
        g.bench_function(BenchmarkId::new("claim_header", name), |b| {
            b.iter(|| {
                i = (i + 1) % tenants.len();
                header_rule.claim(
                    &Subject::topic("hdr.bench").with_header(b"tenant", black_box(&tenants[i])),
                )
            })
        });
    }
    let local = tables[0].1.region_id("eu").expect("eu");
    let batches: Vec<Bytes> = (0..PARTITIONS)
        .map(|_| batch(&keys, 1000, 100, Compression::None))
        .collect();
    g.throughput(Throughput::Elements(PARTITIONS as u64 * 1000));
    let frame = request_frame("hdr.bench", batches);
    let start = body_start(&frame);
    for (name, table) in &tables {
        let mut inflater = Inflater::new(MAX_DECOMPRESSED);
        let view = produce::parse(&frame[start..], VERSION).expect("parses");
        assert!(decide(&view, table, local, &mut inflater).all_forward());
        g.bench_function(BenchmarkId::new("inspect_by_header_100B", name), |b| {
            b.iter(|| {
                let view = produce::parse(black_box(&frame[start..]), VERSION).unwrap();
                decide(&view, table, local, &mut inflater).partitions.len()
            })
        });
    }
    g.sample_size(10);
    g.throughput(Throughput::Bytes(large_text.len() as u64));
    g.bench_function("parse/large", |b| b.iter(|| parse(black_box(&large_text))));

    // A whole reload of the large table, as `POST /reload` does it: the file read, parsed,
    // validated, hashed and swapped in, and the summary of changes logged. Two tables that
    // differ in one tenant take turns, so every reload swaps.
    let dir = std::env::temp_dir().join(format!("keyward-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let file = dir.join("ownership.yaml");
    let texts = [large_text.clone(), large_table_text(100_001, 65_536)];
    std::fs::write(&file, &texts[0]).expect("the table file");
    let ownership = Ownership::load(&file, &regions, "eu").expect("a valid table");
    let mut turn = 0;
    g.bench_function("reload/large", |b| {
        b.iter(|| {
            turn += 1;
            std::fs::write(&file, &texts[turn % 2]).expect("the table file");
            assert!(matches!(
                ownership.reload(Trigger::Api),
                Outcome::Loaded { .. }
            ));
        })
    });
    std::fs::remove_dir_all(&dir).expect("the temporary directory");
    g.finish();
}

criterion_group!(benches, ownership, inspect, merge, large_tables);
criterion_main!(benches);
