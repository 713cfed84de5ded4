//! Writes the generated seeds of the fuzz corpus: real Produce requests, record batches (for the
//! inspector and the split) and request frames as kafka-protocol encodes them. The table seeds are plain files (the example
//! configs and tables), copied by hand.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example make_corpus
//!
//! Deterministic (fixed timestamps and ids), so running it again rewrites the same files.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, MetadataRequest, ProduceRequest, RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    produce_seeds(&corpus.join("produce_request"));
    records_seeds(&corpus.join("records"));
    split_seeds(&corpus.join("split"));
    frame_seeds(&corpus.join("frame"));
}

/// One batch of `keys.len()` records; each record carries a `tenant` header when given one.
fn batch(keys: &[Option<&str>], tenant: Option<&str>, compression: Compression) -> Bytes {
    let records: Vec<Record> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: 4000,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i as i64,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::from(format!("value {i} ").repeat(4))),
            headers: tenant
                .map(|t| {
                    (
                        StrBytes::from_static_str("tenant"),
                        Some(Bytes::copy_from_slice(t.as_bytes())),
                    )
                })
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
    .expect("encode batch");
    buf.freeze()
}

fn partition(index: i32, records: Bytes) -> PartitionProduceData {
    PartitionProduceData::default()
        .with_index(index)
        .with_records(Some(records))
}

fn topic(name: &'static str, partitions: Vec<PartitionProduceData>) -> TopicProduceData {
    TopicProduceData::default()
        .with_name(TopicName(StrBytes::from_static_str(name)))
        .with_partition_data(partitions)
}

fn produce(compression: Compression) -> ProduceRequest {
    let keyed = batch(&[Some("cust-1"), Some("cust-42"), None], None, compression);
    let two = [
        batch(&[Some("a"), Some("b")], None, compression),
        batch(&[Some("c")], None, compression),
    ]
    .concat();
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            topic("orders.x", vec![partition(0, keyed.clone())]),
            topic(
                "tenant.x",
                vec![
                    partition(1, batch(&[Some("k")], Some("acme"), compression)),
                    partition(2, batch(&[None], Some("initech"), compression)),
                ],
            ),
            topic("r", vec![partition(3, two.into())]),
            topic("inventory", vec![partition(2, keyed.clone())]),
            topic("audit.x", vec![partition(0, keyed)]),
        ])
}

/// Selector byte (see fuzz_targets/produce_request.rs) and request body.
fn produce_seeds(dir: &Path) {
    for (version, compression) in [
        (3, Compression::None),
        (7, Compression::Gzip),
        (8, Compression::Snappy),
        (9, Compression::Lz4),
        (12, Compression::Zstd),
    ] {
        let mut body = vec![(version - 3) as u8];
        produce(compression)
            .encode(&mut body, version)
            .expect("encode produce");
        write(
            dir,
            &format!("v{version}-{compression:?}").to_lowercase(),
            &body,
        );
    }
}

/// One partition's records field per codec, and each codec's raw stream behind its selector
/// byte for the direct decompression half of the target.
fn records_seeds(dir: &Path) {
    for (id, compression) in [
        (0u8, Compression::None),
        (1, Compression::Gzip),
        (2, Compression::Snappy),
        (3, Compression::Lz4),
        (4, Compression::Zstd),
    ] {
        let name = format!("{compression:?}").to_lowercase();
        let b = batch(&[Some("cust-1"), None], Some("acme"), compression);
        write(
            dir,
            &format!("batch-{name}"),
            &[b.clone(), b.clone()].concat(),
        );
        if compression != Compression::None {
            let mut stream = vec![id];
            stream.extend_from_slice(&b[61..]);
            write(dir, &format!("stream-{name}"), &stream);
        }
    }
}

/// One batch per codec behind the target's selector byte: two parts by key (0x01: "cust-1"
/// and the null key differ), and one part (0x00).
fn split_seeds(dir: &Path) {
    for compression in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let name = format!("{compression:?}").to_lowercase();
        let b = batch(&[Some("cust-1"), None], Some("acme"), compression);
        for (selector, what) in [(0x01u8, "by-key"), (0x00, "whole")] {
            write(
                dir,
                &format!("{what}-{name}"),
                &[&[selector][..], &b].concat(),
            );
        }
    }
}

/// Chunk seed, max frame size (big-endian u16), then a few request frames back to back.
fn frame_seeds(dir: &Path) {
    let header = |key: ApiKey, version: i16, correlation: i32| {
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("fuzz")))
    };
    let frame = |header: RequestHeader, header_version: i16, body: &dyn Fn(&mut Vec<u8>)| {
        let mut out = vec![0; 4];
        header.encode(&mut out, header_version).expect("header");
        body(&mut out);
        let len = (out.len() - 4) as i32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    };
    let produce = |v: i16| {
        frame(
            header(ApiKey::Produce, v, 7),
            ProduceRequest::header_version(v),
            &|b| produce(Compression::Lz4).encode(b, v).expect("produce"),
        )
    };
    let api_versions = frame(
        header(ApiKey::ApiVersions, 3, 1),
        ApiVersionsRequest::header_version(3),
        &|b| {
            ApiVersionsRequest::default()
                .encode(b, 3)
                .expect("api versions")
        },
    );
    let metadata = frame(
        header(ApiKey::Metadata, 12, 2),
        MetadataRequest::header_version(12),
        &|b| MetadataRequest::default().encode(b, 12).expect("metadata"),
    );
    let mut seeds = vec![
        (
            "small-frames",
            0x11u8,
            4096u16,
            [api_versions.clone(), metadata.clone()].concat(),
        ),
        (
            "produce-v9",
            0x22,
            u16::MAX,
            [api_versions.clone(), produce(9)].concat(),
        ),
        (
            "produce-v3-too-large",
            0x33,
            200,
            [produce(3), metadata].concat(),
        ),
    ];
    seeds.push(("api-versions", 0x44, 64, api_versions));
    for (name, seed, max, stream) in seeds {
        let mut input = vec![seed];
        input.extend_from_slice(&max.to_be_bytes());
        input.extend_from_slice(&stream);
        write(dir, name, &input);
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).expect("corpus dir");
    fs::write(dir.join(name), data).expect("write seed");
}
