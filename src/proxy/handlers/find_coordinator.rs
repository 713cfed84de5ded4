//! FindCoordinator: the coordinator it names (one in the top-level fields up to v3, a list from
//! v4) is advertised at keyward; a failed lookup carries no address and is left alone.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, FindCoordinatorResponse};

use crate::proxy::rewrite::{Advertise, RewriteError, recode};

pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::{To, decode_body, response_frame};
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::protocol::StrBytes;

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
                &response(&f, version, &To).unwrap(),
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
                &response(&f, version, &To).unwrap(),
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
}
