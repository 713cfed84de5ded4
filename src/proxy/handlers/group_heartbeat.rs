//! KIP-848's ConsumerGroupHeartbeat across a switch of clusters.
//!
//! A member that joined the coordinator of the cluster that served before a switch comes to
//! the new one with that coordinator's member epoch. Where MirrorMaker 2 synced the group's
//! offsets into the new cluster (`sync.group.offsets.enabled`), it holds the group as an empty
//! classic group, and answers such a member `GROUP_ID_NOT_FOUND` ("not a consumer group"),
//! which the Java client takes as fatal: the consumer dies. Told its membership is unknown
//! instead, the member joins again from epoch 0, and the broker converts the empty group. A
//! member joining (epoch 0) gets the broker's answer as it is.
//!
//! Applied on connections a region view serves (`crate::proxy::view`), and on the local
//! cluster's connections during a failback window (`crate::proxy::failback`); nowhere else is a
//! member's epoch from another cluster.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ConsumerGroupHeartbeatResponse};
use kafka_protocol::protocol::StrBytes;

use crate::codec::errors::{FENCED_MEMBER_EPOCH, GROUP_ID_NOT_FOUND, UNKNOWN_MEMBER_ID};
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::Reader;
use crate::proxy::rewrite::{RewriteError, recode};

/// The member epoch of a ConsumerGroupHeartbeat request, read in place. `None` when malformed.
pub fn member_epoch(frame: &[u8], version: i16) -> Option<i32> {
    member(frame, version).map(|(_, epoch)| epoch)
}

/// The member id and member epoch of a ConsumerGroupHeartbeat request, read in place: the body
/// starts with the group id and the member id (compact strings), then the epoch. `None` when
/// malformed.
pub fn member(frame: &[u8], version: i16) -> Option<(&str, i32)> {
    let api = ApiKey::ConsumerGroupHeartbeat;
    let header_len = frame::request_header_len(frame, api.request_header_version(version)).ok()?;
    let mut r = Reader::new(frame.get(LENGTH_PREFIX + header_len..)?);
    r.string(true).ok()?;
    let member_id = r.string(true).ok()?;
    Some((member_id, r.i32().ok()?))
}

/// keyward's answer to the first heartbeat after a switch, above epoch 0, of a member whose
/// epoch is the coordinator's of the cluster that served before (`crate::proxy::failback::Fences`):
/// through a region view, and on a local connection in a failback window. Its member epoch is
/// fenced: the client gives up its partitions as lost (it commits nothing for them) and joins
/// again from epoch 0, so it takes each partition from its committed position, translated or
/// carried home, and not from the position it reached on the other cluster's log, whose
/// offsets are not this cluster's.
pub fn fenced_answer(version: i16, correlation_id: i32) -> anyhow::Result<Bytes> {
    let answer = ConsumerGroupHeartbeatResponse::default()
        .with_error_code(FENCED_MEMBER_EPOCH)
        .with_error_message(Some(StrBytes::from_static_str(
            "the member's epoch is another cluster's coordinator's: reads moved to this cluster; join again",
        )))
        .with_member_epoch(-1);
    crate::proxy::rewrite::answer(
        ApiKey::ConsumerGroupHeartbeat,
        version,
        correlation_id,
        &answer,
    )
}

/// Tells a member from another cluster's coordinator to join again rather than that its group
/// is not a consumer group (see the module).
pub fn join_again(r: &mut ConsumerGroupHeartbeatResponse, member_epoch: Option<i32>) {
    if r.error_code == GROUP_ID_NOT_FOUND && member_epoch.is_some_and(|e| e > 0) {
        r.error_code = UNKNOWN_MEMBER_ID;
        r.error_message = Some(StrBytes::from_static_str(
            "the member joined the coordinator of the cluster that served before a switch; join again",
        ));
    }
}

/// The broker's answer to a heartbeat at `member_epoch` on a local connection in a failback
/// window: as it came unless it is `GROUP_ID_NOT_FOUND` (read in place: the body starts with
/// the throttle time and the error code), rewritten by [`join_again`] then.
pub fn response(
    frame: &Bytes,
    version: i16,
    member_epoch: Option<i32>,
) -> Result<Bytes, RewriteError> {
    let api = ApiKey::ConsumerGroupHeartbeat;
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let at = LENGTH_PREFIX + header_len + 4;
    let code = frame
        .get(at..at + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]));
    if code != Some(GROUP_ID_NOT_FOUND) || member_epoch.is_none_or(|e| e <= 0) {
        return Ok(frame.clone());
    }
    recode(
        frame,
        api,
        version,
        |r: &mut ConsumerGroupHeartbeatResponse| {
            join_again(r, member_epoch);
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::ConsumerGroupHeartbeatRequest;

    use super::*;
    use crate::proxy::rewrite::testing::{decode_body, response_frame};
    use crate::proxy::upstream::encode_request;

    #[test]
    fn the_member_epoch_is_read_in_every_version() {
        for v in 0..=1 {
            for epoch in [0, 7, -1] {
                let request = ConsumerGroupHeartbeatRequest::default()
                    .with_group_id(StrBytes::from_static_str("orders-readers").into())
                    .with_member_id(StrBytes::from_static_str("q7MW2Qu3R_SK7_BMorrMwA"))
                    .with_member_epoch(epoch);
                let frame =
                    encode_request("c", 9, ApiKey::ConsumerGroupHeartbeat, v, &request).unwrap();
                assert_eq!(member_epoch(&frame, v), Some(epoch), "v{v}");
                assert_eq!(
                    member(&frame, v),
                    Some(("q7MW2Qu3R_SK7_BMorrMwA", epoch)),
                    "v{v}"
                );
                assert_eq!(
                    member_epoch(&frame[..frame.len() - 40], v),
                    None,
                    "cut short"
                );
            }
        }
    }

    #[test]
    fn a_fenced_answer_in_every_version() {
        for v in 0..=1 {
            let out = fenced_answer(v, 9).unwrap();
            assert_eq!(i32::from_be_bytes(out[4..8].try_into().unwrap()), 9);
            let got: ConsumerGroupHeartbeatResponse =
                decode_body(&out, ApiKey::ConsumerGroupHeartbeat, v);
            assert_eq!(got.error_code, FENCED_MEMBER_EPOCH, "v{v}");
            assert!(got.assignment.is_none());
        }
    }

    /// "Not a consumer group" for a member from elsewhere becomes "join again"; for a member
    /// joining, and any other answer, the broker's bytes go back as they came.
    #[test]
    fn a_member_from_another_clusters_coordinator_is_told_to_join_again() {
        for v in 0..=1 {
            let not_found = ConsumerGroupHeartbeatResponse::default()
                .with_error_code(GROUP_ID_NOT_FOUND)
                .with_error_message(Some(StrBytes::from_static_str("not a consumer group")));
            let f = response_frame(ApiKey::ConsumerGroupHeartbeat, v, &not_found);
            let out = response(&f, v, Some(2)).unwrap();
            let got: ConsumerGroupHeartbeatResponse =
                decode_body(&out, ApiKey::ConsumerGroupHeartbeat, v);
            assert_eq!(got.error_code, UNKNOWN_MEMBER_ID, "v{v}");
            for epoch in [Some(0), None] {
                assert_eq!(response(&f, v, epoch).unwrap().as_ptr(), f.as_ptr(), "v{v}");
            }
            let fine = response_frame(
                ApiKey::ConsumerGroupHeartbeat,
                v,
                &ConsumerGroupHeartbeatResponse::default().with_member_epoch(3),
            );
            assert_eq!(response(&fine, v, Some(2)).unwrap().as_ptr(), fine.as_ptr());
        }
    }
}
