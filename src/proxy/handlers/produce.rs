//! Produce: the KIP-951 node endpoints of a Produce response (v10+) are advertised at keyward.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ProduceResponse};

use crate::proxy::rewrite::{Advertise, RewriteError, recode};

/// First Produce version whose responses may carry node endpoints (KIP-951).
const FIRST_PRODUCE_NODE_ENDPOINTS: i16 = 10;

/// The broker's response to a produce keyward forwarded whole.
pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    if version < FIRST_PRODUCE_NODE_ENDPOINTS {
        return Ok(frame.clone());
    }
    recode(
        frame,
        ApiKey::Produce,
        version,
        |r: &mut ProduceResponse| endpoints(r, to),
    )
}

/// Rewrites the KIP-951 node endpoints a Produce response (v10+) may carry.
pub fn endpoints(r: &mut ProduceResponse, to: &dyn Advertise) -> Result<(), RewriteError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::To;
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn produce_endpoints_are_rewritten() {
        use kafka_protocol::messages::produce_response::NodeEndpoint as ProduceEndpoint;
        let mut r = ProduceResponse::default().with_node_endpoints(vec![
            ProduceEndpoint::default()
                .with_node_id(BrokerId(2))
                .with_host(StrBytes::from_static_str("10.0.0.2"))
                .with_port(9092),
        ]);
        endpoints(&mut r, &To).unwrap();
        assert_eq!(
            (r.node_endpoints[0].host.as_str(), r.node_endpoints[0].port),
            ("proxy", 9002)
        );
    }
}
