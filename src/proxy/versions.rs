//! The API versions keyward offers: the broker's, intersected with what keyward can decode and
//! rewrite.
//!
//! A proxy that advertises a version it cannot parse breaks the moment a newer client uses it,
//! so every API keyward decodes has an explicit ceiling here, and APIs whose responses carry
//! broker addresses keyward does not rewrite are not offered at all.
//!
//! A request keyward does not offer is stopped in the request half, before anything reaches the
//! broker ([`admit`]), and answered the way a broker answers it
//! (`super::handlers::api_versions`): an ApiVersions request above keyward's ceiling gets
//! `UNSUPPORTED_VERSION` with the range keyward handles, so the client asks again at a version
//! keyward decodes (KIP-511); any other request keyward does not offer closes the connection. So
//! a client newer than the protocol crate negotiates down instead of reaching a response keyward
//! cannot decode.

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

/// What keyward does with a request, by its API key and version, before it goes anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A version keyward offers, or an API keyward relays without reading its response (the
    /// broker judges those versions itself, as it would without keyward): forwarded.
    Forward,
    /// An ApiVersions request at a version keyward cannot decode the answer to: keyward answers
    /// it itself (`super::handlers::api_versions::unsupported_version_answer`), and the broker
    /// never sees it.
    Downgrade,
    /// Any other request keyward does not offer (a version outside a decoded API's range, a
    /// withheld API, an API key this build cannot name): the connection is closed, as a broker
    /// closes it on a request version it does not support.
    Refuse,
}

/// Decides [`Admission`] for one request from its header alone.
pub fn admit(api_key: i16, version: i16) -> Admission {
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Admission::Refuse;
    };
    if WITHHELD.contains(&key) {
        return Admission::Refuse;
    }
    match DECODED.iter().find(|(k, _, _)| *k == key) {
        Some(&(_, min, max)) if version < min || version > max => {
            if key == ApiKey::ApiVersions {
                Admission::Downgrade
            } else {
                Admission::Refuse
            }
        }
        _ => Admission::Forward,
    }
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

    #[test]
    fn versions_keyward_does_not_offer_are_answered_before_the_broker() {
        let api_versions = ApiKey::ApiVersions as i16;
        assert_eq!(admit(api_versions, 3), Admission::Forward);
        assert_eq!(admit(api_versions, 4), Admission::Forward);
        assert_eq!(admit(api_versions, 5), Admission::Downgrade);
        assert_eq!(admit(api_versions, i16::MAX), Admission::Downgrade);
        assert_eq!(admit(api_versions, -1), Admission::Downgrade);
        let produce = ApiKey::Produce as i16;
        assert_eq!(admit(produce, 12), Admission::Forward);
        assert_eq!(admit(produce, 13), Admission::Refuse);
        assert_eq!(admit(produce, 2), Admission::Refuse);
        assert_eq!(admit(ApiKey::Metadata as i16, 14), Admission::Refuse);
        assert_eq!(admit(ApiKey::Fetch as i16, 19), Admission::Refuse);
        assert_eq!(admit(ApiKey::DescribeQuorum as i16, 0), Admission::Refuse);
        assert_eq!(admit(9999, 0), Admission::Refuse);
        assert_eq!(admit(-1, 0), Admission::Refuse);
        // Relayed untouched: the broker judges the version, as it would without keyward.
        assert_eq!(admit(ApiKey::JoinGroup as i16, 42), Admission::Forward);
    }

    #[test]
    fn every_version_keyward_decodes_is_forwarded_and_no_other() {
        for &(key, min, max) in DECODED {
            for version in -1..=max + 2 {
                let expected = if (min..=max).contains(&version) {
                    Admission::Forward
                } else if key == ApiKey::ApiVersions {
                    Admission::Downgrade
                } else {
                    Admission::Refuse
                };
                assert_eq!(admit(key as i16, version), expected, "{key:?} v{version}");
            }
        }
    }
}
