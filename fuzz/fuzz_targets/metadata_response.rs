//! keyward's rewrite of a broker's Metadata response (`proxy::handlers::metadata::response`),
//! on arbitrary bytes as a broker could send them.
//!
//! Input layout: byte 0 picks the version (0-13) and whether node ids are renumbered (as while
//! reads are failed over); the rest is the response body. The rewrite must never panic, nor
//! reserve memory by a count it has not checked against the bytes. When it accepts a response,
//! what it sends must decode, and equal the response decoded by kafka-protocol and edited as
//! keyward means to: brokers advertised at keyward, node ids renumbered or not. kafka-protocol
//! decodes only what the rewrite accepted (it reserves memory by the counts it reads).
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, BrokerId, MetadataResponse};
use kafka_protocol::protocol::{Decodable, StrBytes};
use keyward::codec::frame;
use keyward::proxy::brokers::UnmappableNode;
use keyward::proxy::handlers::metadata;
use keyward::proxy::rewrite::Advertise;
use libfuzzer_sys::fuzz_target;

/// Advertises every broker at keyward; `renumber` moves every node id up by 100.
struct To {
    renumber: bool,
}

impl Advertise for To {
    fn advertise(&self, node_id: i32, _: &str, _: i32) -> Result<(i32, StrBytes, i32), UnmappableNode> {
        Ok((self.node_id(node_id)?, StrBytes::from_static_str("keyward"), 9000))
    }

    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
        Ok(if self.renumber && node_id >= 0 { node_id.wrapping_add(100) } else { node_id })
    }

    fn renumbers(&self) -> bool {
        self.renumber
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let version = i16::from(pick % 14);
    let to = To { renumber: pick >= 128 };
    let mut header = 7i32.to_be_bytes().to_vec();
    if ApiKey::Metadata.response_header_version(version) >= 1 {
        header.push(0);
    }
    let response = frame::assemble(&header, body);
    let Ok(out) = metadata::response(&response, version, &to, &|_| {}) else {
        return;
    };
    let sent = decoded(&out, version).expect("what keyward sends decodes");
    // The reference: kafka-protocol's decode of the same response, edited. It cannot always
    // decode what it reads back (an unknown tagged field numbered 2^31 or above is written
    // wrongly), so it is compared only when it can.
    let Some(mut expected) = decoded(&response, version) else {
        return;
    };
    for b in &mut expected.brokers {
        (b.node_id.0, b.host, b.port) = to.advertise(b.node_id.0, &b.host, b.port).unwrap();
    }
    let map = |ids: &mut Vec<BrokerId>| ids.iter_mut().for_each(|id| id.0 = to.node_id(id.0).unwrap());
    if to.renumber {
        expected.controller_id.0 = to.node_id(expected.controller_id.0).unwrap();
        for p in expected.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
            p.leader_id.0 = to.node_id(p.leader_id.0).unwrap();
            map(&mut p.replica_nodes);
            map(&mut p.isr_nodes);
            map(&mut p.offline_replicas);
        }
    }
    assert_eq!(sent, expected, "v{version}, renumbered: {}", to.renumber);
});

fn decoded(out: &Bytes, version: i16) -> Option<MetadataResponse> {
    let header_len =
        frame::response_header_len(out, ApiKey::Metadata.response_header_version(version)).ok()?;
    let mut rest: Bytes = out.slice(frame::LENGTH_PREFIX + header_len..);
    MetadataResponse::decode(&mut rest, version).ok()
}
