//! Metadata: every broker a response lists is advertised at keyward (its virtual node id, host
//! and port), and while reads are failed over to another cluster every node id it names is
//! renumbered.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, BrokerId, MetadataResponse};

use crate::proxy::brokers::UnmappableNode;
use crate::proxy::rewrite::{Advertise, RewriteError, recode};

fn map_ids(ids: &mut [BrokerId], to: &dyn Advertise) -> Result<(), UnmappableNode> {
    for id in ids {
        id.0 = to.node_id(id.0)?;
    }
    Ok(())
}

/// Who hears of the topics a Metadata response lists: (name, partition count).
pub type TopicsSeen<'a> = dyn Fn(&[(&str, i32)]) + 'a;

/// `seen` hears of every topic the response lists without an error, with its partition count
/// (keyward checks them against the table's `by: key` rules, `crate::proxy::alignment`).
pub fn response(
    frame: &Bytes,
    version: i16,
    to: &dyn Advertise,
    seen: &TopicsSeen<'_>,
) -> Result<Bytes, RewriteError> {
    recode(
        frame,
        ApiKey::Metadata,
        version,
        |r: &mut MetadataResponse| {
            let topics: Vec<(&str, i32)> = r
                .topics
                .iter()
                .filter(|t| t.error_code == 0)
                .filter_map(|t| {
                    let name: &str = t.name.as_ref()?;
                    Some((name, i32::try_from(t.partitions.len()).ok()?))
                })
                .collect();
            if !topics.is_empty() {
                seen(&topics);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame;
    use crate::proxy::rewrite::testing::{Renumbered, To, decode_body, response_frame};
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::protocol::{Decodable, StrBytes};

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
        let out = response(
            &response_frame(ApiKey::Metadata, 12, &m),
            12,
            &Renumbered,
            &|_| {},
        )
        .unwrap();
        let back: MetadataResponse = decode_body(&out, ApiKey::Metadata, 12);
        assert_eq!(back.brokers[0].node_id.0, 101);
        assert_eq!(back.controller_id.0, 102);
        let p = &back.topics[0].partitions;
        assert_eq!(p[0].leader_id.0, 101);
        assert_eq!(p[0].replica_nodes, vec![BrokerId(101), BrokerId(102)]);
        assert_eq!(p[0].isr_nodes, vec![BrokerId(102)]);
        assert_eq!(p[1].leader_id.0, -1);
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
            let out = response(
                &response_frame(ApiKey::Metadata, version, &m),
                version,
                &To,
                &|_| {},
            )
            .unwrap();
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
}
