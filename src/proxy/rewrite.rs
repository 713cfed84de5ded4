//! Rewrites every broker address a client can learn, so that after bootstrap no client is ever
//! told a real broker address: Metadata, FindCoordinator (single and batched forms),
//! DescribeCluster, and the KIP-951 node endpoints of Produce and Fetch responses. ApiVersions is
//! intersected with what keyward handles (see [`super::versions`]).
//!
//! Responses keyward does not need to change leave as the bytes the broker sent.

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, DescribeClusterResponse, FetchResponse,
    FindCoordinatorResponse, MetadataResponse, ProduceResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::brokers::UnmappableNode;
use super::versions;
use crate::codec::errors::UNSUPPORTED_VERSION;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::{Reader, WireError};

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot decode {api:?} v{version} response: {source}")]
    Decode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("cannot encode {api:?} v{version} response: {source}")]
    Encode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error(transparent)]
    Unmappable(#[from] UnmappableNode),
    #[error("malformed response header: {0}")]
    Header(#[from] WireError),
}

/// Where clients must be sent instead of a real broker, and the node ids they must see.
pub trait Advertise {
    /// Learns node `node_id`'s real address and returns the virtual node id, host and port
    /// clients use for it.
    fn advertise(
        &self,
        node_id: i32,
        real_host: &str,
        real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode>;
    /// The virtual id of a node named without an address (a leader, a replica); -1 stays -1.
    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode>;
    /// Whether virtual node ids differ from real ones for this cluster (reads failed over to a
    /// cluster other than the local one), so every node id in a response must be mapped.
    fn renumbers(&self) -> bool;
}

fn map_ids(ids: &mut [BrokerId], to: &dyn Advertise) -> Result<(), UnmappableNode> {
    for id in ids {
        id.0 = to.node_id(id.0)?;
    }
    Ok(())
}

/// Decodes a response body.
pub fn decode<T: Decodable>(frame: &Bytes, api: ApiKey, version: i16) -> Result<T, RewriteError> {
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let mut body = frame.slice(LENGTH_PREFIX + header_len..);
    T::decode(&mut body, version).map_err(|source| RewriteError::Decode {
        api,
        version,
        source,
    })
}

/// Decodes a response body, lets `edit` change it, and re-encodes it behind the original header.
pub fn recode<T, F>(
    frame: &Bytes,
    api: ApiKey,
    version: i16,
    edit: F,
) -> Result<Bytes, RewriteError>
where
    T: Decodable + Encodable,
    F: FnOnce(&mut T) -> Result<(), RewriteError>,
{
    recode_as(frame, api, version, version, edit)
}

/// As [`recode`], with the body at `body_version` (ApiVersions answers an unsupported version
/// with a v0 body).
fn recode_as<T, F>(
    frame: &Bytes,
    api: ApiKey,
    version: i16,
    body_version: i16,
    edit: F,
) -> Result<Bytes, RewriteError>
where
    T: Decodable + Encodable,
    F: FnOnce(&mut T) -> Result<(), RewriteError>,
{
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let header = &frame[LENGTH_PREFIX..LENGTH_PREFIX + header_len];
    let mut body = frame.slice(LENGTH_PREFIX + header_len..);
    let mut message =
        T::decode(&mut body, body_version).map_err(|source| RewriteError::Decode {
            api,
            version: body_version,
            source,
        })?;
    edit(&mut message)?;
    let mut encoded = Vec::with_capacity(frame.len());
    message
        .encode(&mut encoded, body_version)
        .map_err(|source| RewriteError::Encode {
            api,
            version: body_version,
            source,
        })?;
    Ok(frame::assemble(header, &encoded))
}

pub fn api_versions(frame: &Bytes, version: i16) -> Result<Bytes, RewriteError> {
    let api = ApiKey::ApiVersions;
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let error_code = Reader::new(&frame[LENGTH_PREFIX + header_len..]).i16()?;
    let body_version = if error_code == UNSUPPORTED_VERSION {
        0
    } else {
        version
    };
    recode_as(
        frame,
        api,
        version,
        body_version,
        |r: &mut ApiVersionsResponse| {
            versions::intersect(&mut r.api_keys);
            Ok(())
        },
    )
}

pub fn metadata(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    recode(
        frame,
        ApiKey::Metadata,
        version,
        |r: &mut MetadataResponse| {
            for b in &mut r.brokers {
                (b.node_id.0, b.host, b.port) = to.advertise(b.node_id.0, &b.host, b.port)?;
            }
            if to.renumbers() {
                r.controller_id.0 = to.node_id(r.controller_id.0)?;
                for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                    p.leader_id.0 = to.node_id(p.leader_id.0)?;
                    map_ids(&mut p.replica_nodes, to)?;
                    map_ids(&mut p.isr_nodes, to)?;
                    map_ids(&mut p.offline_replicas, to)?;
                }
            }
            Ok(())
        },
    )
}

pub fn describe_cluster(
    frame: &Bytes,
    version: i16,
    to: &dyn Advertise,
) -> Result<Bytes, RewriteError> {
    recode(
        frame,
        ApiKey::DescribeCluster,
        version,
        |r: &mut DescribeClusterResponse| {
            for b in &mut r.brokers {
                (b.broker_id.0, b.host, b.port) = to.advertise(b.broker_id.0, &b.host, b.port)?;
            }
            r.controller_id.0 = to.node_id(r.controller_id.0)?;
            Ok(())
        },
    )
}

pub fn find_coordinator(
    frame: &Bytes,
    version: i16,
    to: &dyn Advertise,
) -> Result<Bytes, RewriteError> {
    recode(
        frame,
        ApiKey::FindCoordinator,
        version,
        |r: &mut FindCoordinatorResponse| {
            // v0-3 answer one coordinator in the top-level fields, v4+ a list.
            if version < 4 {
                if r.error_code == 0 && r.node_id.0 >= 0 {
                    (r.node_id.0, r.host, r.port) = to.advertise(r.node_id.0, &r.host, r.port)?;
                }
            } else {
                for c in &mut r.coordinators {
                    if c.error_code == 0 && c.node_id.0 >= 0 {
                        (c.node_id.0, c.host, c.port) =
                            to.advertise(c.node_id.0, &c.host, c.port)?;
                    }
                }
            }
            Ok(())
        },
    )
}

/// Rewrites the KIP-951 node endpoints a Produce response (v10+) may carry.
pub fn produce_endpoints(r: &mut ProduceResponse, to: &dyn Advertise) -> Result<(), RewriteError> {
    for e in &mut r.node_endpoints {
        (e.node_id.0, e.host, e.port) = to.advertise(e.node_id.0, &e.host, e.port)?;
    }
    if to.renumbers() {
        for p in r
            .responses
            .iter_mut()
            .flat_map(|t| t.partition_responses.iter_mut())
        {
            p.current_leader.leader_id.0 = to.node_id(p.current_leader.leader_id.0)?;
        }
    }
    Ok(())
}

/// First Fetch version whose response may carry node endpoints (KIP-951).
pub const FETCH_NODE_ENDPOINTS: i16 = 16;

/// Fetch responses carry the records consumers read, so they are only re-encoded in the rare
/// case the broker attached node endpoints (a leader moved); otherwise the original bytes leave
/// untouched. Finding out walks the response structure without copying any record. While reads
/// are failed over to another cluster (node ids renumbered), every Fetch response is re-encoded,
/// since it names leaders and preferred read replicas by node id.
pub fn fetch(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    if !to.renumbers() {
        if version < FETCH_NODE_ENDPOINTS {
            return Ok(frame.clone());
        }
        let header_len =
            frame::response_header_len(frame, ApiKey::Fetch.response_header_version(version))?;
        if !fetch_has_node_endpoints(&frame[LENGTH_PREFIX + header_len..])? {
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

/// Whether a Fetch response body (v16+, flexible) has the top-level node-endpoints tagged field.
fn fetch_has_node_endpoints(body: &[u8]) -> Result<bool, WireError> {
    let mut r = Reader::new(body);
    r.skip(4 + 2 + 4)?; // throttle_time_ms, error_code, session_id
    let topics = r.array_len(true, 17)?;
    for _ in 0..topics {
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
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::fetch_response::{
        FetchableTopicResponse, NodeEndpoint, PartitionData,
    };
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;

    struct To;
    impl Advertise for To {
        fn advertise(
            &self,
            node_id: i32,
            _: &str,
            _: i32,
        ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
            Ok((node_id, StrBytes::from_static_str("proxy"), 9000 + node_id))
        }
        fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
            Ok(node_id)
        }
        fn renumbers(&self) -> bool {
            false
        }
    }

    /// Reads failed over to a cluster whose node ids are offset by 100.
    struct Renumbered;
    impl Advertise for Renumbered {
        fn advertise(
            &self,
            node_id: i32,
            _: &str,
            _: i32,
        ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
            Ok((
                100 + node_id,
                StrBytes::from_static_str("proxy"),
                9100 + node_id,
            ))
        }
        fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
            Ok(if node_id < 0 { node_id } else { 100 + node_id })
        }
        fn renumbers(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_failed_over_cluster_is_renumbered_everywhere_it_names_a_node() {
        use kafka_protocol::messages::metadata_response::{
            MetadataResponsePartition, MetadataResponseTopic,
        };
        let m = MetadataResponse::default()
            .with_controller_id(BrokerId(2))
            .with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("10.1.2.3"))
                    .with_port(9092),
            ])
            .with_topics(vec![MetadataResponseTopic::default().with_partitions(
                vec![
                MetadataResponsePartition::default()
                    .with_leader_id(BrokerId(1))
                    .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
                    .with_isr_nodes(vec![BrokerId(2)]),
                MetadataResponsePartition::default().with_leader_id(BrokerId(-1)),
            ],
            )]);
        let out = metadata(&response_frame(ApiKey::Metadata, 12, &m), 12, &Renumbered).unwrap();
        let back: MetadataResponse = decode_body(&out, ApiKey::Metadata, 12);
        assert_eq!(back.brokers[0].node_id.0, 101);
        assert_eq!(back.controller_id.0, 102);
        let p = &back.topics[0].partitions;
        assert_eq!(p[0].leader_id.0, 101);
        assert_eq!(p[0].replica_nodes, vec![BrokerId(101), BrokerId(102)]);
        assert_eq!(p[0].isr_nodes, vec![BrokerId(102)]);
        assert_eq!(p[1].leader_id.0, -1);

        let f = response_frame(ApiKey::Fetch, 12, &fetch_response(false));
        let out = fetch(&f, 12, &Renumbered).unwrap();
        assert_ne!(
            out.as_ptr(),
            f.as_ptr(),
            "renumbered fetches are re-encoded"
        );
    }

    fn response_frame<T: Encodable>(api: ApiKey, version: i16, body: &T) -> Bytes {
        let mut header = 7i32.to_be_bytes().to_vec();
        if api.response_header_version(version) >= 1 {
            header.push(0);
        }
        let mut encoded = Vec::new();
        body.encode(&mut encoded, version).unwrap();
        frame::assemble(&header, &encoded)
    }

    #[test]
    fn metadata_brokers_are_advertised_at_the_proxy_in_every_version() {
        for version in 4..=13 {
            let m = MetadataResponse::default().with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(2))
                    .with_host(StrBytes::from_static_str("10.1.2.3"))
                    .with_port(9092),
            ]);
            let out =
                metadata(&response_frame(ApiKey::Metadata, version, &m), version, &To).unwrap();
            assert_eq!(frame::response_correlation_id(&out).unwrap(), 7);
            let hl =
                frame::response_header_len(&out, ApiKey::Metadata.response_header_version(version))
                    .unwrap();
            let mut body = out.slice(4 + hl..);
            let back = MetadataResponse::decode(&mut body, version).unwrap();
            assert_eq!(back.brokers[0].host.as_str(), "proxy");
            assert_eq!(back.brokers[0].port, 9002);
        }
    }

    fn decode_body<T: Decodable>(out: &Bytes, api: ApiKey, version: i16) -> T {
        let hl = frame::response_header_len(out, api.response_header_version(version)).unwrap();
        let mut body = out.slice(4 + hl..);
        T::decode(&mut body, version).unwrap()
    }

    #[test]
    fn find_coordinator_is_rewritten_in_both_forms() {
        use kafka_protocol::messages::find_coordinator_response::Coordinator;
        for version in 0..=3 {
            let r = FindCoordinatorResponse::default()
                .with_node_id(BrokerId(1))
                .with_host(StrBytes::from_static_str("10.0.0.1"))
                .with_port(9092);
            let f = response_frame(ApiKey::FindCoordinator, version, &r);
            let back: FindCoordinatorResponse = decode_body(
                &find_coordinator(&f, version, &To).unwrap(),
                ApiKey::FindCoordinator,
                version,
            );
            assert_eq!(
                (back.host.as_str(), back.port),
                ("proxy", 9001),
                "v{version}"
            );
        }
        for version in 4..=6 {
            let r = FindCoordinatorResponse::default().with_coordinators(vec![
                Coordinator::default()
                    .with_key(StrBytes::from_static_str("group-a"))
                    .with_node_id(BrokerId(2))
                    .with_host(StrBytes::from_static_str("10.0.0.2"))
                    .with_port(9092),
                // A failed lookup carries no address to rewrite.
                Coordinator::default()
                    .with_key(StrBytes::from_static_str("group-b"))
                    .with_node_id(BrokerId(-1))
                    .with_error_code(15),
            ]);
            let f = response_frame(ApiKey::FindCoordinator, version, &r);
            let back: FindCoordinatorResponse = decode_body(
                &find_coordinator(&f, version, &To).unwrap(),
                ApiKey::FindCoordinator,
                version,
            );
            let c = &back.coordinators;
            assert_eq!(
                (c[0].host.as_str(), c[0].port),
                ("proxy", 9002),
                "v{version}"
            );
            assert_eq!((c[1].host.as_str(), c[1].error_code), ("", 15));
        }
    }

    #[test]
    fn describe_cluster_and_produce_endpoints_are_rewritten() {
        use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
        use kafka_protocol::messages::produce_response::NodeEndpoint as ProduceEndpoint;
        for version in 0..=2 {
            let r = DescribeClusterResponse::default().with_brokers(vec![
                DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(3))
                    .with_host(StrBytes::from_static_str("10.0.0.3"))
                    .with_port(9092),
            ]);
            let f = response_frame(ApiKey::DescribeCluster, version, &r);
            let back: DescribeClusterResponse = decode_body(
                &describe_cluster(&f, version, &To).unwrap(),
                ApiKey::DescribeCluster,
                version,
            );
            assert_eq!(
                (back.brokers[0].host.as_str(), back.brokers[0].port),
                ("proxy", 9003)
            );
        }
        let mut r = ProduceResponse::default().with_node_endpoints(vec![
            ProduceEndpoint::default()
                .with_node_id(BrokerId(2))
                .with_host(StrBytes::from_static_str("10.0.0.2"))
                .with_port(9092),
        ]);
        produce_endpoints(&mut r, &To).unwrap();
        assert_eq!(
            (r.node_endpoints[0].host.as_str(), r.node_endpoints[0].port),
            ("proxy", 9002)
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
        let out = fetch(&plain, 17, &To).unwrap();
        assert_eq!(
            out.as_ptr(),
            plain.as_ptr(),
            "untouched fetch must not be copied"
        );

        let moved = response_frame(ApiKey::Fetch, 17, &fetch_response(true));
        let out = fetch(&moved, 17, &To).unwrap();
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
