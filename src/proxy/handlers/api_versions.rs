//! ApiVersions: the broker's answer is intersected with what keyward decodes and rewrites (see
//! [`crate::proxy::versions`]), so clients negotiate only versions keyward can handle. And every
//! request at a version keyward does not offer is answered here, as a broker answers it: an
//! ApiVersions request above keyward's ceiling gets `UNSUPPORTED_VERSION` naming the range
//! keyward decodes (KIP-511), so the client asks again lower; any other closes the connection.
//! Each is counted, and logged once per client and version.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};
use metrics::counter;
use tracing::{debug, info, warn};

use super::{Pending, Step, VERSIONS_LOG};
use crate::codec::errors::UNSUPPORTED_VERSION;
use crate::codec::frame::RequestHead;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::Reader;
use crate::proxy::rewrite::{RewriteError, recode_as};
use crate::proxy::versions::{self, Admission, DECODED, WITHHELD};
use crate::proxy::{failback, view};

///
/// On a connection in a region view (`in_view`), APIs whose topic names keyward does not map
/// are withheld as well, and mapped ones capped at the versions it maps
/// (`crate::proxy::view::offer`).
/// What a connection is offered besides what [`versions::intersect`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    All,
    /// Served by another region's cluster: only what the region view maps ([`view::offer`]).
    View,
    /// Served by the local cluster while positions are carried home after a failover:
    /// OffsetFetch up to the last version that names topics (`super::super::failback`).
    Failback,
}

pub fn response(frame: &Bytes, version: i16, offered: Offered) -> Result<Bytes, RewriteError> {
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
            if offered == Offered::Failback
                && let Some(v) = r
                    .api_keys
                    .iter_mut()
                    .find(|v| v.api_key == ApiKey::OffsetFetch as i16)
            {
                v.max_version = v.max_version.min(failback::OFFSET_FETCH_MAX_VERSION);
            }
            if offered == Offered::View {
                r.api_keys.retain_mut(|v| {
                    let Ok(key) = ApiKey::try_from(v.api_key) else {
                        return false;
                    };
                    match view::offer(key, v.min_version, v.max_version) {
                        Some((min, max)) => {
                            (v.min_version, v.max_version) = (min, max);
                            true
                        }
                        None => false,
                    }
                });
            }
            Ok(())
        },
    )
}

/// A request at a version keyward does not offer, answered here the way a broker answers it:
/// nothing goes to the broker.
pub(crate) fn unsupported(
    admission: Admission,
    peer: Option<IpAddr>,
    frame: &[u8],
    head: RequestHead,
) -> Step {
    record_unsupported(admission, peer, frame, head.api_key, head.api_version);
    let slot = match admission {
        Admission::Downgrade => Pending::Answer(unsupported_version_answer(head.correlation_id)),
        Admission::Refuse | Admission::Forward => Pending::Close("unsupported_version"),
    };
    Step {
        upstream: None,
        slot: Some(slot),
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
pub fn unsupported_version_answer(correlation_id: i32) -> Bytes {
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
fn record_unsupported(
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
            target: VERSIONS_LOG,
            client_id = %client_id,
            "client asked for {api} v{version}, outside the versions keyward decodes ({offered}); answered UNSUPPORTED_VERSION with that range, so the client asks again at one of them (KIP-511; logged once per client and version)"
        ),
        (Admission::Refuse, true) => warn!(
            target: VERSIONS_LOG,
            client_id = %client_id,
            "client sent {api} v{version}, which keyward does not offer ({offered}); closing the connection, as a broker does for a version it does not support (logged once per client and version)"
        ),
        _ => debug!(
            target: VERSIONS_LOG,
            client_id = %client_id,
            ?admission,
            "{api} v{version} not offered"
        ),
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
    fn versions_keyward_does_not_offer_never_reach_the_broker() {
        // ApiVersions v5, correlation id 7, client id "app": keyward's own answer.
        let frame = [0, 0, 0, 13, 0, 18, 0, 5, 0, 0, 0, 7, 0, 3, b'a', b'p', b'p'];
        let head = RequestHead::parse(&frame).unwrap();
        let step = unsupported(versions::admit(18, 5), None, &frame, head);
        assert!(step.upstream.is_none());
        match step.slot {
            Some(Pending::Answer(bytes)) => {
                assert_eq!(bytes, unsupported_version_answer(7))
            }
            _ => panic!("ApiVersions v5 must be answered by keyward"),
        }
        // Produce v13: closed, as a broker closes on a version it does not support.
        let frame = [0, 0, 0, 13, 0, 0, 0, 13, 0, 0, 0, 8, 0, 3, b'a', b'p', b'p'];
        let head = RequestHead::parse(&frame).unwrap();
        let step = unsupported(versions::admit(0, 13), None, &frame, head);
        assert!(step.upstream.is_none());
        assert!(matches!(
            step.slot,
            Some(Pending::Close("unsupported_version"))
        ));
    }

    #[test]
    fn the_unsupported_version_answer_is_a_v0_body_naming_keywards_range() {
        use kafka_protocol::messages::{ApiVersionsResponse, ResponseHeader};
        use kafka_protocol::protocol::Decodable;
        let mut frame = unsupported_version_answer(77);
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
    fn a_failback_window_offers_offset_fetch_only_up_to_the_last_version_naming_topics() {
        use kafka_protocol::messages::api_versions_response::ApiVersion;

        use crate::proxy::rewrite::testing::{decode_body, response_frame};

        let broker = ApiVersionsResponse::default().with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::OffsetFetch as i16)
                .with_min_version(1)
                .with_max_version(10),
            ApiVersion::default()
                .with_api_key(ApiKey::OffsetCommit as i16)
                .with_min_version(2)
                .with_max_version(10),
        ]);
        let frame = response_frame(ApiKey::ApiVersions, 3, &broker);
        let offered = |o: Offered| {
            let out = response(&frame, 3, o).unwrap();
            let got: ApiVersionsResponse = decode_body(&out, ApiKey::ApiVersions, 3);
            got.api_keys
                .iter()
                .map(|v| (v.api_key, v.max_version))
                .collect::<Vec<_>>()
        };
        let (fetch, commit) = (ApiKey::OffsetFetch as i16, ApiKey::OffsetCommit as i16);
        assert_eq!(offered(Offered::Failback), [(fetch, 9), (commit, 10)]);
        assert_eq!(offered(Offered::All), [(fetch, 10), (commit, 10)]);
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
