//! Fetch: responses carry the records consumers read, so they leave as the broker's bytes unless
//! they name a node keyward must rewrite (KIP-951 node endpoints, v16+; or any node id while
//! reads are failed over to another cluster).

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, FetchResponse};

use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::{Reader, WireError};
use crate::proxy::rewrite::{Advertise, RewriteError, recode};

/// First Fetch version whose response may carry node endpoints (KIP-951).
pub const NODE_ENDPOINTS: i16 = 16;

/// Fetch responses carry the records consumers read, so they are only re-encoded in the rare
/// case the broker attached node endpoints (a leader moved); otherwise the original bytes leave
/// untouched. Finding out walks the response structure without copying any record. While reads
/// are failed over to another cluster (node ids renumbered), every Fetch response is re-encoded,
/// since it names leaders and preferred read replicas by node id.
pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    if !to.renumbers() {
        if version < NODE_ENDPOINTS {
            return Ok(frame.clone());
        }
        let header_len =
            frame::response_header_len(frame, ApiKey::Fetch.response_header_version(version))?;
        if !walk(&frame[LENGTH_PREFIX + header_len..], &mut |_| {})? {
            return Ok(frame.clone());
        }
    }
    recode(frame, ApiKey::Fetch, version, |r: &mut FetchResponse| {
        for e in &mut r.node_endpoints {
            (e.node_id.0, e.host, e.port) = to.advertise(e.node_id.0, &e.host, e.port)?;
        }
        for p in r.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
            p.current_leader.leader_id.0 = to.node_id(p.current_leader.leader_id.0)?;
            p.preferred_read_replica.0 = to.node_id(p.preferred_read_replica.0)?;
        }
        Ok(())
    })
}

/// The offset in a Fetch response body (v13+, where topics are named by id) of each topic's
/// id: a region view maps them in place (`crate::proxy::view`). Walked, records untouched.
pub fn topic_id_offsets(body: &[u8]) -> Result<Vec<usize>, WireError> {
    let mut at = Vec::new();
    walk(body, &mut |offset| at.push(offset))?;
    Ok(at)
}

/// Walks a Fetch response body (v12+, flexible): tells `topic_id` where each topic's id is
/// (v13+), and returns whether the body has the top-level node-endpoints tagged field (v16+).
fn walk(body: &[u8], topic_id: &mut dyn FnMut(usize)) -> Result<bool, WireError> {
    let mut r = Reader::new(body);
    r.skip(4 + 2 + 4)?; // throttle_time_ms, error_code, session_id
    let topics = r.array_len(true, 17)?;
    for _ in 0..topics {
        topic_id(r.position());
        r.skip(16)?; // topic_id
        let partitions = r.array_len(true, 4)?;
        for _ in 0..partitions {
            r.skip(4 + 2 + 8 + 8 + 8)?; // index, error, high watermark, last stable, log start
            // aborted_transactions: compact nullable array of (producer_id, first_offset, tags)
            let aborted = i64::from(r.uvarint()?) - 1;
            for _ in 0..aborted.max(0) {
                r.skip(16)?;
                r.skip_tagged_fields()?;
            }
            r.skip(4)?; // preferred_read_replica
            r.compact_nullable_bytes()?; // records
            r.skip_tagged_fields()?;
        }
        r.skip_tagged_fields()?;
    }
    let tags = r.uvarint()?;
    for _ in 0..tags {
        let tag = r.uvarint()?;
        if tag == 0 {
            return Ok(true);
        }
        let len = r.uvarint()?;
        r.skip(len as usize)?;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::{Renumbered, To, response_frame};
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::fetch_response::{
        FetchableTopicResponse, NodeEndpoint, PartitionData,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};

    #[test]
    fn a_failed_over_cluster_is_renumbered_everywhere_it_names_a_node() {
        let f = response_frame(ApiKey::Fetch, 12, &fetch_response(false));
        let out = response(&f, 12, &Renumbered).unwrap();
        assert_ne!(
            out.as_ptr(),
            f.as_ptr(),
            "renumbered fetches are re-encoded"
        );
    }

    fn fetch_response(with_endpoints: bool) -> FetchResponse {
        let r = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default().with_partitions(vec![
                PartitionData::default()
                    .with_records(Some(Bytes::from_static(b"records")))
                    .with_aborted_transactions(Some(vec![Default::default()])),
            ]),
        ]);
        if with_endpoints {
            r.with_node_endpoints(vec![
                NodeEndpoint::default()
                    .with_node_id(BrokerId(3))
                    .with_host(StrBytes::from_static_str("10.9.9.9"))
                    .with_port(9092),
            ])
        } else {
            r
        }
    }

    #[test]
    fn fetch_is_untouched_unless_it_carries_node_endpoints() {
        let plain = response_frame(ApiKey::Fetch, 17, &fetch_response(false));
        let out = response(&plain, 17, &To).unwrap();
        assert_eq!(
            out.as_ptr(),
            plain.as_ptr(),
            "untouched fetch must not be copied"
        );

        let moved = response_frame(ApiKey::Fetch, 17, &fetch_response(true));
        let out = response(&moved, 17, &To).unwrap();
        let mut body = out.slice(4 + 5..);
        let back = FetchResponse::decode(&mut body, 17).unwrap();
        assert_eq!(back.node_endpoints[0].host.as_str(), "proxy");
        assert_eq!(back.node_endpoints[0].port, 9003);
        assert_eq!(
            back.responses[0].partitions[0].records.as_deref(),
            Some(&b"records"[..])
        );
    }
}
