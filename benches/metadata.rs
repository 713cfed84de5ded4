//! Large metadata (issue 18): a Metadata response of a 3-broker cluster with 5,000 partitions
//! (50 topics of 100 partitions, 3 replicas each), rewritten as keyward rewrites every Metadata
//! response a client gets (`proxy::handlers::metadata::response`): every broker advertised at
//! keyward, and, when reads are failed over, every node id renumbered.
//!
//! - `metadata/rewrite/<5000 partitions, local|renumbered>`: the time of one rewrite;
//! - before the benchmarks, the transient memory of one rewrite, measured with a counting
//!   allocator (the most bytes allocated at once during the rewrite, beyond what was allocated
//!   before it), printed beside the response's size.
//!
//! Run with `cargo bench --bench metadata` (add `-- --quick` for a short run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{ApiKey, BrokerId, MetadataResponse, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};

use keyward::codec::frame;
use keyward::proxy::brokers::UnmappableNode;
use keyward::proxy::handlers::metadata;
use keyward::proxy::rewrite::Advertise;

/// Counts the bytes allocated now, and the most at once since the last reset.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)] // a counting allocator, for this benchmark only
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Metadata v12, what current Java clients and librdkafka ask for.
const VERSION: i16 = 12;
const BROKERS: i32 = 3;
const TOPICS: usize = 50;
const PARTITIONS: i32 = 100;

fn response_frame() -> Bytes {
    let brokers = (0..BROKERS)
        .map(|id| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(id))
                .with_host(StrBytes::from_string(format!(
                    "kafka-{id}.eu.example.internal"
                )))
                .with_port(9092)
                .with_rack(Some(StrBytes::from_string(format!(
                    "eu-west-1{}",
                    b"abc"[id as usize] as char
                ))))
        })
        .collect();
    let topics = (0..TOPICS)
        .map(|t| {
            let partitions = (0..PARTITIONS)
                .map(|p| {
                    let replicas: Vec<BrokerId> =
                        (0..3).map(|r| BrokerId((p + r) % BROKERS)).collect();
                    MetadataResponsePartition::default()
                        .with_partition_index(p)
                        .with_leader_id(replicas[0])
                        .with_leader_epoch(7)
                        .with_replica_nodes(replicas.clone())
                        .with_isr_nodes(replicas)
                })
                .collect();
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(format!(
                    "orders.eu.region-{t:02}"
                )))))
                .with_topic_id(Default::default()) // 16 bytes, as a real id
                .with_partitions(partitions)
        })
        .collect();
    let body = MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(Some(StrBytes::from_static_str("eu-cluster-id")))
        .with_controller_id(BrokerId(1))
        .with_topics(topics);
    let mut header = 42i32.to_be_bytes().to_vec();
    if ApiKey::Metadata.response_header_version(VERSION) >= 1 {
        header.push(0);
    }
    let mut encoded = Vec::new();
    body.encode(&mut encoded, VERSION).expect("encodable");
    frame::assemble(&header, &encoded)
}

/// Advertises every broker at keyward's address; `renumbers` as keyward does while reads are
/// failed over to a cluster other than the local one (its node ids moved up by 100).
struct Keyward {
    renumbers: bool,
}

impl Advertise for Keyward {
    fn advertise(
        &self,
        node_id: i32,
        _real_host: &str,
        _real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
        let id = self.node_id(node_id)?;
        Ok((
            id,
            StrBytes::from_static_str("keyward.eu.example.internal"),
            9193 + id,
        ))
    }

    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
        Ok(if self.renumbers && node_id >= 0 {
            node_id + 100
        } else {
            node_id
        })
    }

    fn renumbers(&self) -> bool {
        self.renumbers
    }
}

fn rewrite(frame: &Bytes, to: &Keyward) -> Bytes {
    metadata::response(frame, VERSION, to, &|_| {}).expect("rewrites")
}

fn large_metadata(c: &mut Criterion) {
    let frame = response_frame();
    let mut g = c.benchmark_group("metadata");
    for (name, renumbers) in [("local", false), ("renumbered", true)] {
        let to = Keyward { renumbers };
        // The transient memory of one rewrite, once, before timing it.
        let before = NOW.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let out = rewrite(&frame, &to);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        println!(
            "metadata/rewrite/{name}: response {} B in, {} B out; transient memory {peak} B ({:.2} x the response)",
            frame.len(),
            out.len(),
            peak as f64 / frame.len() as f64
        );
        drop(out);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(BenchmarkId::new("rewrite_5000_partitions", name), |b| {
            b.iter(|| rewrite(black_box(&frame), &to).len())
        });
    }
    g.finish();
}

criterion_group!(benches, large_metadata);
criterion_main!(benches);
