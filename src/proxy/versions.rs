//! The API versions keyward offers: the broker's, intersected with what keyward can decode and
//! rewrite.
//!
//! A proxy that advertises a version it cannot parse breaks the moment a newer client uses it,
//! so every API keyward decodes has an explicit ceiling here, and APIs whose responses carry
//! broker addresses keyward does not rewrite are not offered at all.

use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::api_versions_response::ApiVersion;

use crate::codec::produce;

/// APIs whose responses keyward decodes, with the highest version it handles.
///
/// Produce stops at v12: v13 names topics by id, and ownership is decided by topic name.
pub const DECODED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, produce::MIN_VERSION, produce::MAX_VERSION),
    (ApiKey::Fetch, 4, 18),
    (ApiKey::Metadata, 0, 13),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::DescribeCluster, 0, 2),
    (ApiKey::ApiVersions, 0, 4),
];

/// APIs never offered: their responses carry broker or controller addresses that keyward does
/// not rewrite, so a client using them would learn a real address and bypass the proxy.
pub const WITHHELD: &[ApiKey] = &[
    ApiKey::DescribeQuorum,
    ApiKey::ShareGroupHeartbeat,
    ApiKey::ShareGroupDescribe,
    ApiKey::ShareFetch,
    ApiKey::ShareAcknowledge,
];

/// The version range keyward offers for one API the broker offers, or `None` to drop it.
pub fn offer(api_key: i16, min: i16, max: i16) -> Option<(i16, i16)> {
    // An API this build of keyward cannot even name is not offered: it cannot be reviewed.
    let key = ApiKey::try_from(api_key).ok()?;
    if WITHHELD.contains(&key) {
        return None;
    }
    let (min, max) = match DECODED.iter().find(|(k, _, _)| *k == key) {
        Some(&(_, our_min, our_max)) => (min.max(our_min), max.min(our_max)),
        None => (min, max),
    };
    (min <= max).then_some((min, max))
}

/// Applies [`offer`] to a broker's ApiVersions list.
pub fn intersect(api_keys: &mut Vec<ApiVersion>) {
    api_keys.retain_mut(|v| match offer(v.api_key, v.min_version, v.max_version) {
        Some((min, max)) => {
            v.min_version = min;
            v.max_version = max;
            true
        }
        None => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_never_exceed_what_the_protocol_crate_can_decode() {
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::{Message, VersionRange};
        // The API's overall range and the message types' own ranges can differ (the crate
        // lists OffsetCommit v10 but encodes v9 at most): check against the types keyward
        // actually decodes and encodes. Fails when the crate changes a range under us.
        fn types<Req: Message, Resp: Message>() -> [VersionRange; 2] {
            [Req::VERSIONS, Resp::VERSIONS]
        }
        for &(key, min, max) in DECODED {
            let ranges = match key {
                ApiKey::Produce => types::<ProduceRequest, ProduceResponse>(),
                ApiKey::Fetch => types::<FetchRequest, FetchResponse>(),
                ApiKey::Metadata => types::<MetadataRequest, MetadataResponse>(),
                ApiKey::FindCoordinator => {
                    types::<FindCoordinatorRequest, FindCoordinatorResponse>()
                }
                ApiKey::DescribeCluster => {
                    types::<DescribeClusterRequest, DescribeClusterResponse>()
                }
                ApiKey::ApiVersions => types::<ApiVersionsRequest, ApiVersionsResponse>(),
                other => panic!("{other:?} is decoded but not checked here"),
            };
            for valid in std::iter::once(key.valid_versions()).chain(ranges) {
                assert!(
                    min >= valid.min && max <= valid.max,
                    "{key:?}: keyward offers {min}-{max}, the crate handles {valid:?}"
                );
            }
        }
    }

    #[test]
    fn produce_is_clamped_to_name_based_versions() {
        assert_eq!(offer(ApiKey::Produce as i16, 0, 13), Some((3, 12)));
        assert_eq!(offer(ApiKey::Produce as i16, 0, 2), None);
        assert_eq!(offer(ApiKey::Metadata as i16, 0, 20), Some((0, 13)));
        assert_eq!(offer(ApiKey::JoinGroup as i16, 0, 9), Some((0, 9)));
        assert_eq!(offer(ApiKey::DescribeQuorum as i16, 0, 2), None);
        assert_eq!(offer(9999, 0, 1), None);
    }
}
