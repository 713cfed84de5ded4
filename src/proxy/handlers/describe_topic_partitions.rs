//! DescribeTopicPartitions (the admin client's describe, KIP-966): it names brokers by node id
//! only, as leaders and replicas. While reads are served by a cluster other than the local one,
//! every id is renumbered to the virtual ids the Metadata rewrite advertises; otherwise the
//! response passes as the broker sent it.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, BrokerId, DescribeTopicPartitionsResponse};

use crate::proxy::brokers::UnmappableNode;
use crate::proxy::rewrite::{Advertise, RewriteError, recode};

pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    if !to.renumbers() {
        return Ok(frame.clone());
    }
    let renumber = |ids: &mut [BrokerId]| -> Result<(), UnmappableNode> {
        ids.iter_mut().try_for_each(|id| {
            id.0 = to.node_id(id.0)?;
            Ok(())
        })
    };
    recode(
        frame,
        ApiKey::DescribeTopicPartitions,
        version,
        |r: &mut DescribeTopicPartitionsResponse| {
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.leader_id.0 = to.node_id(p.leader_id.0)?;
                renumber(&mut p.replica_nodes)?;
                renumber(&mut p.isr_nodes)?;
                renumber(&mut p.offline_replicas)?;
                for elr in [&mut p.eligible_leader_replicas, &mut p.last_known_elr] {
                    elr.as_deref_mut().map(renumber).transpose()?;
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::{Renumbered, To, decode_body, response_frame};
    use kafka_protocol::messages::describe_topic_partitions_response::{
        DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
    };

    #[test]
    fn node_ids_are_renumbered_only_while_another_cluster_serves() {
        let key = ApiKey::DescribeTopicPartitions;
        for version in 0..=0 {
            let partition = DescribeTopicPartitionsResponsePartition::default()
                .with_leader_id(BrokerId(1))
                .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
                .with_isr_nodes(vec![BrokerId(2)])
                .with_offline_replicas(vec![BrokerId(3)])
                .with_eligible_leader_replicas(Some(vec![BrokerId(2)]))
                .with_last_known_elr(None);
            let unled =
                DescribeTopicPartitionsResponsePartition::default().with_leader_id(BrokerId(-1));
            let r = DescribeTopicPartitionsResponse::default().with_topics(vec![
                DescribeTopicPartitionsResponseTopic::default()
                    .with_partitions(vec![partition, unled]),
            ]);
            let f = response_frame(key, version, &r);
            assert_eq!(response(&f, version, &To).unwrap(), f, "passed as it came");
            let back: DescribeTopicPartitionsResponse =
                decode_body(&response(&f, version, &Renumbered).unwrap(), key, version);
            let [p, unled] = &back.topics[0].partitions[..] else {
                panic!("two partitions")
            };
            assert_eq!(p.leader_id, BrokerId(101));
            assert_eq!(p.replica_nodes, [BrokerId(101), BrokerId(102)]);
            assert_eq!(p.isr_nodes, [BrokerId(102)]);
            assert_eq!(p.offline_replicas, [BrokerId(103)]);
            assert_eq!(p.eligible_leader_replicas, Some(vec![BrokerId(102)]));
            assert_eq!(p.last_known_elr, None);
            assert_eq!(unled.leader_id, BrokerId(-1));
        }
    }
}
