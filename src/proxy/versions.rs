//! The API versions keyward offers: the broker's, intersected with what keyward can decode and
//! rewrite.
//!
//! A proxy that advertises a version it cannot parse breaks the moment a newer client uses it,
//! so every API keyward decodes has an explicit ceiling here, and APIs whose responses carry
//! broker addresses keyward does not rewrite are not offered at all.
//!
//! A request keyward does not offer is answered here, in the request half, before anything
//! reaches the broker ([`admit`]), the way a broker answers it: an ApiVersions request above
//! keyward's ceiling gets `UNSUPPORTED_VERSION` with the range keyward handles, so the client
//! asks again at a version keyward decodes (KIP-511); any other request keyward does not offer
//! closes the connection. So a client newer than the protocol crate negotiates down instead of
//! reaching a response keyward cannot decode.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use metrics::counter;
use tracing::{debug, info, warn};

use crate::codec::errors::UNSUPPORTED_VERSION;
use crate::codec::frame::LENGTH_PREFIX;
use crate::codec::produce;
use crate::codec::wire::Reader;

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
    /// it itself with [`unsupported_api_versions`], and the broker never sees it.
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

/// The ApiVersions versions keyward decodes.
fn api_versions_range() -> (i16, i16) {
    DECODED
        .iter()
        .find(|(k, _, _)| *k == ApiKey::ApiVersions)
        .map_or((0, 0), |&(_, min, max)| (min, max))
}

/// keyward's own answer to an ApiVersions request it cannot decode the answer to, as a broker
/// gives it (KIP-511): response header v0 (ApiVersions responses never have tagged header
/// fields), then the v0 body whatever version was asked, `UNSUPPORTED_VERSION` and one entry,
/// ApiVersions with the range keyward handles. Clients read a v0 body when the one they asked
/// for does not parse, and ask again at the highest version the entry names.
pub fn unsupported_api_versions(correlation_id: i32) -> Bytes {
    let (min, max) = api_versions_range();
    // correlation id, error code, array length, one (api key, min, max)
    const BODY: usize = 4 + 2 + 4 + 6;
    let mut out = BytesMut::with_capacity(LENGTH_PREFIX + BODY);
    out.put_i32(BODY as i32);
    out.put_i32(correlation_id);
    out.put_i16(UNSUPPORTED_VERSION);
    out.put_i32(1);
    out.put_i16(ApiKey::ApiVersions as i16);
    out.put_i16(min);
    out.put_i16(max);
    out.freeze()
}

/// Counts a request keyward did not offer, and logs it the first time this client asks for
/// this API at this version (then at debug), so a client retrying in a loop fills neither the
/// log nor memory. A client is its address and the client id of its request header.
pub fn record_unsupported(
    admission: Admission,
    peer: Option<IpAddr>,
    frame: &[u8],
    api_key: i16,
    version: i16,
) {
    let api =
        ApiKey::try_from(api_key).map_or_else(|()| "unknown".to_owned(), |k| format!("{k:?}"));
    counter!(
        "keyward_unsupported_versions_total",
        "api" => api.clone(),
        "version" => version_label(version)
    )
    .increment(1);
    let client_id = client_id(frame);
    let first = NOTICED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .first(&(peer, client_id, api_key, version));
    let client_id = String::from_utf8_lossy(client_id.unwrap_or_default());
    let offered = offered_range(api_key);
    match (admission, first) {
        (Admission::Downgrade, true) => info!(
            client_id = %client_id,
            "client asked for {api} v{version}, outside the versions keyward decodes ({offered}); answered UNSUPPORTED_VERSION with that range, so the client asks again at one of them (KIP-511; logged once per client and version)"
        ),
        (Admission::Refuse, true) => warn!(
            client_id = %client_id,
            "client sent {api} v{version}, which keyward does not offer ({offered}); closing the connection, as a broker does for a version it does not support (logged once per client and version)"
        ),
        _ => debug!(client_id = %client_id, ?admission, "{api} v{version} not offered"),
    }
}

/// What keyward offers of an API, in words, for the log.
fn offered_range(api_key: i16) -> String {
    let Ok(key) = ApiKey::try_from(api_key) else {
        return "this API key is unknown to keyward's protocol library".to_owned();
    };
    if WITHHELD.contains(&key) {
        return "the API is withheld: its responses carry addresses keyward does not rewrite"
            .to_owned();
    }
    match DECODED.iter().find(|(k, _, _)| *k == key) {
        Some(&(_, min, max)) => format!("v{min}-v{max}"),
        None => "the versions the broker offers".to_owned(),
    }
}

/// The `version` label: the number for every version a Kafka API has had or will soon have,
/// one value for the rest, so a client cannot grow the metric without bound.
fn version_label(version: i16) -> String {
    if (0..=MAX_VERSION_LABEL).contains(&version) {
        version.to_string()
    } else {
        "other".to_owned()
    }
}

/// The highest version with a label of its own (the highest version of any Kafka API is in the
/// teens).
const MAX_VERSION_LABEL: i16 = 63;

/// The client id of a request header (v1+: a nullable string after api key, version and
/// correlation id), if it has one. Only names the client in logs, so a header that does not
/// hold one is no error.
fn client_id(frame: &[u8]) -> Option<&[u8]> {
    let mut r = Reader::new(frame.get(LENGTH_PREFIX..)?);
    r.skip(8).ok()?;
    r.nullable_string().ok()?
}

/// Clients already told about an unsupported version, across connections.
static NOTICED: Mutex<Noticed> = Mutex::new(Noticed::new(NOTICED_CAPACITY));

/// How many (client, API, version) keyward remembers having logged: a few thousand clients
/// stuck on an old or new version at once is already an incident, and each entry is 8 bytes
/// twice.
const NOTICED_CAPACITY: usize = 4096;

/// A bounded set of hashes: [`Noticed::first`] is true the first time a key is seen, and the
/// oldest entry is forgotten when the set is full (that key is then logged once more).
struct Noticed {
    seen: Option<HashSet<u64>>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Noticed {
    const fn new(capacity: usize) -> Self {
        Self {
            seen: None,
            order: VecDeque::new(),
            capacity,
        }
    }

    fn first(&mut self, key: &impl Hash) -> bool {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let hash = h.finish();
        let seen = self.seen.get_or_insert_with(HashSet::new);
        if !seen.insert(hash) {
            return false;
        }
        self.order.push_back(hash);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            seen.remove(&oldest);
        }
        true
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

    #[test]
    fn the_unsupported_version_answer_is_a_v0_body_naming_keywards_range() {
        use kafka_protocol::messages::{ApiVersionsResponse, ResponseHeader};
        use kafka_protocol::protocol::Decodable;
        let mut frame = unsupported_api_versions(77);
        let len = i32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(len as usize, frame.len() - LENGTH_PREFIX);
        let mut rest = frame.split_off(LENGTH_PREFIX);
        let header = ResponseHeader::decode(&mut rest, 0).unwrap();
        assert_eq!(header.correlation_id, 77);
        let body = ApiVersionsResponse::decode(&mut rest, 0).unwrap();
        assert!(rest.is_empty());
        assert_eq!(body.error_code, 35);
        assert_eq!(body.api_keys.len(), 1);
        let v = &body.api_keys[0];
        assert_eq!((v.api_key, v.min_version, v.max_version), (18, 0, 4));
    }

    #[test]
    fn notices_are_remembered_once_and_bounded() {
        let mut noticed = Noticed::new(3);
        assert!(noticed.first(&("a", 5)));
        assert!(!noticed.first(&("a", 5)));
        assert!(noticed.first(&("a", 6)));
        assert!(noticed.first(&("b", 5)));
        assert!(noticed.first(&("c", 5)));
        // The oldest was forgotten to make room; the newer ones are still known.
        assert_eq!(noticed.order.len(), 3);
        assert!(noticed.first(&("a", 5)));
        assert!(!noticed.first(&("c", 5)));
    }

    #[test]
    fn labels_and_client_ids_are_bounded_and_never_fail() {
        assert_eq!(version_label(5), "5");
        assert_eq!(version_label(-3), "other");
        assert_eq!(version_label(1000), "other");
        // api key 18, v5, correlation 1, client id "app"
        let frame = [0, 0, 0, 13, 0, 18, 0, 5, 0, 0, 0, 1, 0, 3, b'a', b'p', b'p'];
        assert_eq!(client_id(&frame), Some(&b"app"[..]));
        assert_eq!(client_id(&frame[..12]), None);
        assert_eq!(client_id(&frame[..15]), None);
        assert_eq!(client_id(&[]), None);
    }
}
