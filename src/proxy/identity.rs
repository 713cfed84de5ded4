//! Who a client connection speaks for, as the cluster behind it sees it, and what that client
//! may write there.
//!
//! keyward does not terminate client SASL: the exchange goes to the broker on the client's own
//! connection. keyward watches it, and acts on a client's behalf (answers a Produce itself,
//! redirects a batch to another region) only once the broker has accepted the client:
//!
//! * **Authentication.** When the cluster requires it (`clusters.<region>.client_auth: sasl`), a
//!   connection is authenticated once the broker has answered keyward's own Metadata request,
//!   sent on the client's connection after a SaslAuthenticate the broker accepted, with the
//!   cluster's brokers in it. Before the exchange completes a broker serves no such request: it
//!   answers with an error response that lists no broker, and closes the connection. So that
//!   answer is proof, whatever the mechanism and however many rounds it takes. (A client's own
//!   requests prove nothing: keyward does not decode their answers, and an error response looks
//!   like any other.) A Produce before any accepted SaslAuthenticate closes the connection, as a
//!   broker does.
//! * **Authorization.** A redirected write happens only if the client's principal may WRITE the
//!   topic on the cluster its connection is served by: the local cluster's ACLs speak for every
//!   region. keyward asks that broker, on the client's own connection, with a Metadata request
//!   that includes the topic's authorized operations, and remembers the answer per connection
//!   and topic for `limits.authorization_ttl_ms`.
//! * **Attribution.** The client's `client.id` (from its request headers) and, with SASL, the
//!   user name it logged in as (from its own SaslAuthenticate, for PLAIN, SCRAM and
//!   OAUTHBEARER) go on keyward's refusal and redirect log lines.
//!
//! This module holds the per-connection state and the pure parts (parsing, the Metadata request
//! and its answer); `conn.rs` carries the requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, MetadataRequest, MetadataResponse, RequestHeader, SaslAuthenticateRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::codec::errors::UNKNOWN_TOPIC_OR_PARTITION;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::Reader;

/// Kafka's `TOPIC_AUTHORIZATION_FAILED`: what a broker answers a client that may not write.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;

/// Bit of `AclOperation.WRITE` (code 4) in `topic_authorized_operations`.
const WRITE: i32 = 1 << 4;

/// The Metadata version of keyward's authorization question: v8+ carries authorized
/// operations; v12 is served by every broker since Kafka 3.1.
pub const METADATA_VERSION: i16 = 12;

/// Longest client id or user name kept for log lines; longer ones are cut.
const MAX_NAME: usize = 256;

/// What the cluster behind a connection requires of clients before it serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// The client must complete SASL with the broker before keyward acts for it.
    Sasl,
    /// The cluster serves clients without authentication; the broker sees them as `ANONYMOUS`
    /// unless keyward presents its own certificate, in which case it sees keyward.
    None { broker_sees_keyward: bool },
}

/// The state one connection's two halves share: the request half reads it before acting on a
/// Produce; the response half updates it from the broker's answers.
pub struct Identity {
    pub requirement: Requirement,
    /// The client's address, as keyward's listener saw it.
    pub peer: Option<std::net::IpAddr>,
    /// The broker accepted a SaslAuthenticate on this connection (one round of the exchange).
    sasl_accepted: AtomicBool,
    /// The broker answered keyward's question after that: the client is authenticated.
    authenticated: AtomicBool,
    names: Mutex<Names>,
}

#[derive(Default, Clone)]
struct Names {
    client_id: Option<String>,
    mechanism: Option<String>,
    user: Option<String>,
}

/// The names a log line carries; `-` where unknown.
pub struct Who {
    pub client_id: String,
    pub user: String,
}

impl Identity {
    pub fn new(requirement: Requirement, peer: Option<std::net::IpAddr>) -> Self {
        Self {
            requirement,
            peer,
            sasl_accepted: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            names: Mutex::new(Names::default()),
        }
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_client_id(&self, client_id: &[u8]) {
        self.names().client_id = Some(printable(client_id));
    }

    pub fn set_mechanism(&self, mechanism: &str) {
        self.names().mechanism = Some(printable(mechanism.as_bytes()));
    }

    /// Remembers the user name a SaslAuthenticate request claims. It is only ever shown once
    /// the broker has accepted the exchange.
    pub fn claim_user(&self, auth_bytes: &[u8]) {
        let mut names = self.names();
        if let Some(user) = names
            .mechanism
            .as_deref()
            .and_then(|m| sasl_user(m, auth_bytes))
        {
            names.user = Some(user);
        }
    }

    /// The broker answered a SaslAuthenticate with this error code.
    pub fn sasl_answered(&self, error_code: i16) {
        if error_code == 0 {
            self.sasl_accepted.store(true, Ordering::Release);
        }
    }

    /// The broker answered keyward's own question on this connection with a real answer
    /// ([`Answer::served`]) after an accepted SaslAuthenticate.
    pub fn confirm(&self) {
        if self.sasl_accepted.load(Ordering::Acquire) {
            self.authenticated.store(true, Ordering::Release);
        }
    }

    pub fn standing(&self) -> Standing {
        match self.requirement {
            Requirement::None { .. } => Standing::Authenticated,
            Requirement::Sasl if self.authenticated.load(Ordering::Acquire) => {
                Standing::Authenticated
            }
            Requirement::Sasl if self.sasl_accepted.load(Ordering::Acquire) => Standing::Unproven,
            Requirement::Sasl => Standing::Anonymous,
        }
    }

    /// Whether the broker judges this client, not keyward: false when the cluster does not
    /// authenticate clients and keyward presents its own certificate on their connections.
    pub fn broker_sees_client(&self) -> bool {
        match self.requirement {
            Requirement::Sasl => true,
            Requirement::None {
                broker_sees_keyward,
            } => !broker_sees_keyward,
        }
    }

    pub fn who(&self) -> Who {
        let names = self.names().clone();
        let authenticated = self.authenticated.load(Ordering::Acquire);
        Who {
            client_id: names.client_id.unwrap_or_else(|| "-".into()),
            user: names
                .user
                .filter(|_| authenticated)
                .unwrap_or_else(|| "-".into()),
        }
    }
}

/// Where a connection stands with the broker, for a client that must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Authenticated, or the cluster asks nothing of clients.
    Authenticated,
    /// The broker accepted a SaslAuthenticate, but has not yet answered keyward's question:
    /// the exchange may still be under way.
    Unproven,
    /// No SaslAuthenticate accepted.
    Anonymous,
}

/// A name from the network, fit for a log line: at most [`MAX_NAME`] bytes, invalid UTF-8
/// replaced. (Log formatters escape control characters.)
fn printable(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_NAME)];
    String::from_utf8_lossy(cut).into_owned()
}

/// The client id of a request frame (header v1+), if it carries one.
pub fn client_id(frame: &[u8], header_version: i16) -> Option<&[u8]> {
    if header_version < 1 {
        return None;
    }
    let mut r = Reader::new(frame.get(LENGTH_PREFIX..)?);
    r.skip(8).ok()?;
    r.nullable_string().ok().flatten()
}

/// The mechanism a SaslHandshake request names.
pub fn handshake_mechanism(frame: &[u8], version: i16) -> Option<String> {
    let header_len =
        frame::request_header_len(frame, ApiKey::SaslHandshake.request_header_version(version))
            .ok()?;
    let mut r = Reader::new(frame.get(LENGTH_PREFIX + header_len..)?);
    r.string(false).ok().map(str::to_owned)
}

/// The auth bytes of a SaslAuthenticate request.
pub fn authenticate_bytes(frame: &[u8], version: i16) -> Option<Bytes> {
    let header_len = frame::request_header_len(
        frame,
        ApiKey::SaslAuthenticate.request_header_version(version),
    )
    .ok()?;
    let mut body = Bytes::copy_from_slice(frame.get(LENGTH_PREFIX + header_len..)?);
    SaslAuthenticateRequest::decode(&mut body, version)
        .ok()
        .map(|r| r.auth_bytes)
}

/// The error code of a SaslHandshake or SaslAuthenticate response (the first field of both).
pub fn response_error(frame: &[u8], api: ApiKey, version: i16) -> Option<i16> {
    let header_len =
        frame::response_header_len(frame, api.response_header_version(version)).ok()?;
    Reader::new(frame.get(LENGTH_PREFIX + header_len..)?)
        .i16()
        .ok()
}

/// The user name a client's first SaslAuthenticate claims, for the mechanisms that carry one
/// in the clear: PLAIN (`authzid NUL authcid NUL password`), SCRAM (`n,,n=user,r=...`) and
/// OAUTHBEARER (the token's `sub` claim, or the authzid). The password is never looked at.
pub fn sasl_user(mechanism: &str, auth: &[u8]) -> Option<String> {
    let user = match mechanism {
        "PLAIN" => {
            let mut parts = auth.splitn(3, |b| *b == 0);
            let (_authzid, authcid) = (parts.next()?, parts.next()?);
            parts.next()?;
            printable(authcid)
        }
        "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
            let text = std::str::from_utf8(auth).ok()?;
            // gs2-header (n,[a=authzid],) then attributes; the first message alone has n=.
            let bare = text.splitn(3, ',').nth(2)?;
            let name = bare.split(',').find_map(|a| a.strip_prefix("n="))?;
            printable(name.replace("=2C", ",").replace("=3D", "=").as_bytes())
        }
        "OAUTHBEARER" => {
            let text = std::str::from_utf8(auth).ok()?;
            let mut fields = text.split('\u{1}');
            let gs2 = fields.next()?;
            let authzid = gs2.split(',').find_map(|a| a.strip_prefix("a="));
            let token = fields.find_map(|f| f.strip_prefix("auth=Bearer "));
            match (authzid, token.and_then(jwt_subject)) {
                (_, Some(sub)) => printable(sub.as_bytes()),
                (Some(a), None) if !a.is_empty() => printable(a.as_bytes()),
                _ => return None,
            }
        }
        _ => return None,
    };
    (!user.is_empty()).then_some(user)
}

/// The `sub` claim of a JWT, unverified: the broker verifies the token, and keyward shows the
/// name only once the broker has accepted it.
fn jwt_subject(token: &str) -> Option<String> {
    let payload = token.trim().split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

/// What the broker said about the client writing one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused with this Kafka error code and message, as the broker would refuse it.
    Denied(i16, String),
}

/// One connection's answers, per topic, for a while.
pub struct Authorizations {
    ttl: Duration,
    entries: HashMap<String, (Verdict, Instant)>,
}

/// Topics remembered per connection before the oldest answers are dropped: a producer
/// writing more topics than this through one connection asks again, nothing worse.
const MAX_TOPICS: usize = 1024;

impl Authorizations {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: HashMap::new(),
        }
    }

    pub fn get(&self, topic: &str) -> Option<&Verdict> {
        self.entries
            .get(topic)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v)
    }

    pub fn insert(&mut self, topic: String, verdict: Verdict) {
        if self.entries.len() >= MAX_TOPICS && !self.entries.contains_key(&topic) {
            let ttl = self.ttl;
            self.entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if self.entries.len() >= MAX_TOPICS {
                self.entries.clear();
            }
        }
        self.entries.insert(topic, (verdict, Instant::now()));
    }
}

/// keyward's Metadata request for `topics`, with their authorized operations, as a frame.
/// It never creates a topic.
pub fn authorization_request(correlation_id: i32, topics: &[&str]) -> anyhow::Result<Bytes> {
    let api = ApiKey::Metadata;
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(METADATA_VERSION)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("keyward")));
    let request = MetadataRequest::default()
        .with_topics(Some(
            topics
                .iter()
                .map(|t| {
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string((*t).to_owned()))))
                })
                .collect(),
        ))
        .with_allow_auto_topic_creation(false)
        .with_include_topic_authorized_operations(true);
    let mut out = BytesMut::with_capacity(64 + topics.iter().map(|t| t.len() + 4).sum::<usize>());
    out.extend_from_slice(&[0; 4]);
    header.encode(&mut out, api.request_header_version(METADATA_VERSION))?;
    request.encode(&mut out, METADATA_VERSION)?;
    let len = i32::try_from(out.len() - LENGTH_PREFIX)?;
    out[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// The broker's answer to [`authorization_request`].
pub struct Answer {
    /// The broker served the request: a real Metadata answer lists the cluster's brokers, while
    /// the error response a broker sends for a request during a SASL exchange lists none.
    pub served: bool,
    /// One per topic asked. A topic the answer leaves out is refused: keyward writes nothing it
    /// could not check.
    pub verdicts: Vec<Verdict>,
}

pub fn answer(frame: &Bytes, topics: &[&str]) -> anyhow::Result<Answer> {
    let api = ApiKey::Metadata;
    let header_len =
        frame::response_header_len(frame, api.response_header_version(METADATA_VERSION))?;
    let mut body = frame.slice(LENGTH_PREFIX + header_len..);
    let response = MetadataResponse::decode(&mut body, METADATA_VERSION)?;
    let verdicts = topics
        .iter()
        .map(|name| {
            let found = response
                .topics
                .iter()
                .find(|t| t.name.as_ref().is_some_and(|n| n.as_str() == *name));
            verdict(
                name,
                found.map(|t| (t.error_code, t.topic_authorized_operations)),
            )
        })
        .collect();
    Ok(Answer {
        served: !response.brokers.is_empty(),
        verdicts,
    })
}

fn verdict(topic: &str, answer: Option<(i16, i32)>) -> Verdict {
    let denied = |code, why: &str| Verdict::Denied(code, format!("topic {topic:?}: {why}"));
    match answer {
        Some((0, ops)) if ops != i32::MIN && ops & WRITE != 0 => Verdict::Allowed,
        Some((0, _)) => denied(
            TOPIC_AUTHORIZATION_FAILED,
            "this client may not WRITE it on the cluster it connects to, whose ACLs decide for every region; keyward redirects nothing for it",
        ),
        Some((TOPIC_AUTHORIZATION_FAILED, _)) => denied(
            TOPIC_AUTHORIZATION_FAILED,
            "this client is not authorized for it on the cluster it connects to, whose ACLs decide for every region; keyward redirects nothing for it",
        ),
        Some((UNKNOWN_TOPIC_OR_PARTITION, _)) => denied(
            UNKNOWN_TOPIC_OR_PARTITION,
            "it does not exist on the cluster this client connects to, whose ACLs decide who may write it in every region; create it there",
        ),
        Some((code, _)) => denied(
            code,
            "the cluster this client connects to could not say whether it may write it",
        ),
        None => denied(
            TOPIC_AUTHORIZATION_FAILED,
            "the cluster this client connects to did not say whether it may write it",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::ResponseHeader;
    use kafka_protocol::messages::metadata_response::{
        MetadataResponseBroker, MetadataResponseTopic,
    };

    #[test]
    fn user_names_come_from_the_first_message_of_each_mechanism() {
        assert_eq!(
            sasl_user("PLAIN", b"\0alice\0alice-secret").as_deref(),
            Some("alice")
        );
        assert_eq!(
            sasl_user("PLAIN", b"admin\0alice\0pw").as_deref(),
            Some("alice")
        );
        assert_eq!(sasl_user("PLAIN", b"alice-no-separator"), None);
        assert_eq!(
            sasl_user("SCRAM-SHA-512", b"n,,n=alice,r=fyko+d2lbbFgONRv9qkxdawL").as_deref(),
            Some("alice")
        );
        assert_eq!(
            sasl_user("SCRAM-SHA-256", b"n,a=x,n=a=2Cb=3Dc,r=abc").as_deref(),
            Some("a,b=c")
        );
        // The client-final message carries no name.
        assert_eq!(sasl_user("SCRAM-SHA-256", b"c=biws,r=abc,p=xyz"), None);
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"svc-orders"}"#);
        let token = format!("n,,\u{1}auth=Bearer eyJhbGciOiJub25lIn0.{claims}.\u{1}\u{1}");
        assert_eq!(
            sasl_user("OAUTHBEARER", token.as_bytes()).as_deref(),
            Some("svc-orders")
        );
        assert_eq!(sasl_user("GSSAPI", b"\x60\x82"), None);
        let long = [b'x'; 1000];
        let mut plain = b"\0".to_vec();
        plain.extend_from_slice(&long);
        plain.extend_from_slice(b"\0pw");
        assert_eq!(sasl_user("PLAIN", &plain).map(|u| u.len()), Some(MAX_NAME));
    }

    #[test]
    fn authentication_is_proven_only_by_keywards_question_after_an_accepted_exchange() {
        let id = Identity::new(Requirement::Sasl, None);
        assert_eq!(id.standing(), Standing::Anonymous);
        id.sasl_answered(58); // SASL_AUTHENTICATION_FAILED
        assert_eq!(id.standing(), Standing::Anonymous);
        id.set_mechanism("SCRAM-SHA-512");
        id.claim_user(b"n,,n=alice,r=abc");
        // SCRAM's first round is accepted with error 0, but the exchange is not over.
        id.sasl_answered(0);
        assert_eq!(id.standing(), Standing::Unproven);
        assert_eq!(id.who().user, "-");
        id.confirm();
        assert_eq!(id.standing(), Standing::Authenticated);
        assert_eq!(id.who().user, "alice");

        let open = Identity::new(
            Requirement::None {
                broker_sees_keyward: false,
            },
            None,
        );
        assert_eq!(open.standing(), Standing::Authenticated);
        assert!(open.broker_sees_client());
        assert!(
            !Identity::new(
                Requirement::None {
                    broker_sees_keyward: true
                },
                None
            )
            .broker_sees_client()
        );
    }

    #[test]
    fn keywards_own_question_confirms_only_an_accepted_exchange() {
        let id = Identity::new(Requirement::Sasl, None);
        id.confirm();
        assert_eq!(id.standing(), Standing::Anonymous);
        id.sasl_answered(0);
        id.confirm();
        assert_eq!(id.standing(), Standing::Authenticated);
    }

    #[test]
    fn header_fields_are_read_without_trusting_lengths() {
        // api 0 v9, correlation 7, client id "ab"
        let frame = [0, 0, 0, 12, 0, 0, 0, 9, 0, 0, 0, 7, 0, 2, b'a', b'b'];
        assert_eq!(client_id(&frame, 1), Some(&b"ab"[..]));
        assert_eq!(client_id(&frame, 0), None);
        assert_eq!(client_id(&frame[..13], 1), None);
        assert_eq!(client_id(&[0, 0, 0, 1, 9], 2), None);
        assert_eq!(
            response_error(&[0, 0, 0, 2], ApiKey::SaslAuthenticate, 1),
            None
        );
        assert_eq!(
            response_error(&[0, 0, 0, 6, 0, 0, 0, 1, 0, 34], ApiKey::SaslHandshake, 1),
            Some(34)
        );
        assert_eq!(handshake_mechanism(&frame[..9], 1), None);
        assert!(authenticate_bytes(&[0, 0, 0, 9, 0, 36, 0, 2, 0, 0, 0, 1, 0], 2).is_none());
    }

    fn response(topics: Vec<MetadataResponseTopic>, brokers: usize) -> Bytes {
        let mut out = BytesMut::new();
        out.extend_from_slice(&[0; 4]);
        ResponseHeader::default()
            .with_correlation_id(-5)
            .encode(
                &mut out,
                ApiKey::Metadata.response_header_version(METADATA_VERSION),
            )
            .unwrap();
        MetadataResponse::default()
            .with_topics(topics)
            .with_brokers(
                (0..brokers)
                    .map(|i| {
                        MetadataResponseBroker::default()
                            .with_node_id(BrokerId(i as i32))
                            .with_host(StrBytes::from_static_str("b"))
                            .with_port(9092)
                    })
                    .collect(),
            )
            .encode(&mut out, METADATA_VERSION)
            .unwrap();
        let len = (out.len() - 4) as i32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out.freeze()
    }

    fn topic(name: &str, error_code: i16, ops: i32) -> MetadataResponseTopic {
        MetadataResponseTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(name.into()))))
            .with_error_code(error_code)
            .with_topic_authorized_operations(ops)
    }

    #[test]
    fn write_permission_is_read_from_the_brokers_answer() {
        let request = authorization_request(-5, &["a", "b"]).unwrap();
        let mut body = request.slice(LENGTH_PREFIX..);
        let header = RequestHeader::decode(
            &mut body,
            ApiKey::Metadata.request_header_version(METADATA_VERSION),
        )
        .unwrap();
        assert_eq!(header.correlation_id, -5);
        let decoded = MetadataRequest::decode(&mut body, METADATA_VERSION).unwrap();
        assert!(decoded.include_topic_authorized_operations);
        assert!(!decoded.allow_auto_topic_creation);
        assert_eq!(decoded.topics.unwrap().len(), 2);

        let read_describe = (1 << 3) | (1 << 8);
        let frame = response(
            vec![
                topic("a", 0, read_describe | WRITE),
                topic("b", 0, read_describe),
                topic("c", TOPIC_AUTHORIZATION_FAILED, i32::MIN),
                topic("d", UNKNOWN_TOPIC_OR_PARTITION, i32::MIN),
                topic("e", 0, i32::MIN),
            ],
            1,
        );
        let got = answer(&frame, &["a", "b", "c", "d", "e", "missing"]).unwrap();
        assert!(got.served);
        let got = got.verdicts;
        assert_eq!(got[0], Verdict::Allowed);
        let codes: Vec<i16> = got[1..]
            .iter()
            .map(|v| match v {
                Verdict::Denied(code, _) => *code,
                Verdict::Allowed => 0,
            })
            .collect();
        assert_eq!(codes, [29, 29, 3, 29, 29]);
        assert!(answer(&Bytes::from_static(&[0, 0, 0, 4, 0, 0, 0, 1]), &["a"]).is_err());
    }

    #[test]
    fn the_error_response_of_a_broker_mid_exchange_proves_nothing() {
        // What a broker answers a Metadata request sent during a SASL exchange (and then
        // closes): every topic with ILLEGAL_SASL_STATE, and no broker.
        let got = answer(&response(vec![topic("a", 34, i32::MIN)], 0), &["a"]).unwrap();
        assert!(!got.served);
        assert!(matches!(got.verdicts[0], Verdict::Denied(34, _)));
        assert!(!answer(&response(Vec::new(), 0), &[]).unwrap().served);
        assert!(answer(&response(Vec::new(), 3), &[]).unwrap().served);
    }

    #[test]
    fn answers_expire_and_the_cache_stays_bounded() {
        let mut cache = Authorizations::new(Duration::from_millis(30));
        cache.insert("t".into(), Verdict::Allowed);
        assert_eq!(cache.get("t"), Some(&Verdict::Allowed));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get("t"), None);
        let mut cache = Authorizations::new(Duration::from_secs(60));
        for i in 0..3 * MAX_TOPICS {
            cache.insert(format!("t{i}"), Verdict::Allowed);
        }
        assert!(cache.entries.len() <= MAX_TOPICS);
    }
}
