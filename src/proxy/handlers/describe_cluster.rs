//! DescribeCluster: the brokers it lists are advertised at keyward, and the controller is named
//! by its virtual node id.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, DescribeClusterResponse};

use crate::proxy::rewrite::{Advertise, RewriteError, recode};

pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::{To, decode_body, response_frame};
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn describe_cluster_is_rewritten() {
        use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
        for version in 0..=2 {
            let r = DescribeClusterResponse::default().with_brokers(vec![
                DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(3))
                    .with_host(StrBytes::from_static_str("10.0.0.3"))
                    .with_port(9092),
            ]);
            let f = response_frame(ApiKey::DescribeCluster, version, &r);
            let back: DescribeClusterResponse = decode_body(
                &response(&f, version, &To).unwrap(),
                ApiKey::DescribeCluster,
                version,
            );
            assert_eq!(
                (back.brokers[0].host.as_str(), back.brokers[0].port),
                ("proxy", 9003)
            );
        }
    }
}
