//! Protocol conformance through keyward: every API it advertises, at every version it advertises.
//!
//!     cargo run --example conformance -- BOOTSTRAP [TOPIC] [--broker ADDRESS]
//!
//! Sends ApiVersions to BOOTSTRAP (a keyward bootstrap address, or a broker's, to compare), then
//! for each advertised API key and each version in the advertised range one request, and checks
//! that a response arrives with the request's correlation id and decodes with kafka-protocol at
//! that version with no bytes left over. Requests are the message types' defaults, with the few
//! fields a broker needs to answer at all (see `request_body`: with their defaults, DescribeAcls
//! makes a broker close the connection, and AddPartitionsToTxn v4+ and, on Kafka 3.9,
//! OffsetFetch v8+ are never answered). Produce
//! writes one record with acks=1 to partition 0 of TOPIC (default `conformance`, which must
//! exist), sent to that partition's leader as the Metadata response advertises it, and must
//! succeed. ApiVersions must answer without an error.
//!
//! Then every version that is NOT advertised gets the answer a broker gives: the version just
//! above each advertised range and just below it (when not negative), and, with `--broker`
//! (a broker of the cluster behind BOOTSTRAP), every API key and version that broker offers and
//! BOOTSTRAP does not (withheld APIs, versions above keyward's ceilings, API keys kafka-protocol
//! cannot name). ApiVersions must be answered `UNSUPPORTED_VERSION` (35) in the v0 layout,
//! naming the ApiVersions range BOOTSTRAP advertised (KIP-511); any other API must close the
//! connection without a response, as a broker does for a version it does not support. Those
//! requests carry a header and no body: nothing may parse beyond the version.
//!
//! Prints one line per (API, version): `ok`, `skipped (reason)` or `FAILED (reason)`, then
//! `N passed, M failed`. The only skips are versions (or API keys) kafka-protocol cannot encode
//! or decode. Exits 0 only when nothing failed. After a failure the connection is opened again,
//! so one bad answer does not hide the rest.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    self, AddPartitionsToTxnRequest, ApiKey, ApiVersionsRequest, ApiVersionsResponse,
    DescribeAclsRequest, ListOffsetsRequest, MetadataRequest, MetadataResponse, OffsetFetchRequest,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
    add_partitions_to_txn_request::AddPartitionsToTxnTransaction,
    metadata_request::MetadataRequestTopic, offset_fetch_request::OffsetFetchRequestGroup,
};
use kafka_protocol::protocol::{Decodable, Encodable, Message, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

const CLIENT_ID: &str = "keyward-conformance";
/// Long enough for a broker forwarding to its controller; nothing here waits on purpose.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// The broker's own default `socket.request.max.bytes`; a larger length prefix is garbage.
const MAX_FRAME: usize = 100 * 1024 * 1024;
/// The ApiVersions version used for discovery: supported by every Kafka since 2.4.
const DISCOVERY_VERSION: i16 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (args, broker) = match args.iter().position(|a| a == "--broker") {
        Some(i) if i + 1 < args.len() => {
            let broker = first_address(&args[i + 1]);
            let rest = [&args[..i], &args[i + 2..]].concat();
            (rest, Some(broker))
        }
        Some(_) => (Vec::new(), None),
        None => (args, None),
    };
    let (bootstrap, topic) = match args.as_slice() {
        [b] => (first_address(b), "conformance".to_owned()),
        [b, t] => (first_address(b), t.clone()),
        _ => {
            eprintln!("usage: conformance BOOTSTRAP [TOPIC] [--broker ADDRESS]");
            return ExitCode::from(2);
        }
    };
    match run(&bootstrap, &topic, broker.as_deref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("setup FAILED ({e})");
            println!("0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

/// `host:port` of the first entry of a `bootstrap.servers`-style list.
fn first_address(list: &str) -> String {
    list.split(',').next().unwrap_or(list).trim().to_owned()
}

/// Runs every check; `Ok(false)` when some failed, `Err` when discovery itself failed.
fn run(bootstrap: &str, topic: &str, broker: Option<&str>) -> Result<bool, String> {
    let mut conns = Conns::new(bootstrap.to_owned());
    let advertised = discover(&mut conns, None, bootstrap)?;
    let broker_offers = match broker {
        Some(b) => Some(discover(&mut conns, Some(b), b)?),
        None => None,
    };
    let leader = produce_leader(&mut conns, topic)?;
    println!(
        "{bootstrap}: {} APIs advertised; Produce goes to {topic}-0 at its leader {leader}",
        advertised.len()
    );

    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for &(key, min, max) in &advertised {
        let Ok(api) = ApiKey::try_from(key) else {
            for version in min..=max {
                println!(
                    "api key {key} v{version}: skipped (kafka-protocol does not know this api key)"
                );
                skipped += 1;
            }
            continue;
        };
        // Not `ApiKey::valid_versions`: for a few APIs it names a version the request type
        // cannot encode (OffsetCommit and OffsetFetch v10 in kafka-protocol 0.18).
        let (lowest, highest) = encodable_versions(api);
        for version in min..=max {
            let label = format!("{api:?} v{version}");
            if version < lowest || version > highest {
                println!(
                    "{label}: skipped (kafka-protocol encodes and decodes v{lowest}-v{highest} only)"
                );
                skipped += 1;
                continue;
            }
            let to = (api == ApiKey::Produce).then_some(leader.as_str());
            let outcome = request_body(api, version, topic)
                .and_then(|request| conns.exchange(to, api, version, &request))
                .and_then(|answer| check(&answer));
            match outcome {
                Ok(note) => {
                    passed += 1;
                    println!("{label}: ok{note}");
                }
                Err(reason) => {
                    failed += 1;
                    println!("{label}: FAILED ({reason})");
                }
            }
        }
    }

    // Versions not advertised: the answer a broker gives.
    let api_versions_max = advertised
        .iter()
        .find(|(k, _, _)| *k == ApiKey::ApiVersions as i16)
        .map(|&(_, _, max)| max)
        .ok_or("ApiVersions itself is not advertised")?;
    for (key, version) in not_offered(&advertised, broker_offers.as_deref()) {
        let label = match ApiKey::try_from(key) {
            Ok(api) => format!("{api:?} v{version} (not offered)"),
            Err(()) => format!("api key {key} v{version} (not offered)"),
        };
        match conns.refused(key, version, api_versions_max) {
            Ok(note) => {
                passed += 1;
                println!("{label}: ok ({note})");
            }
            Err(reason) => {
                failed += 1;
                println!("{label}: FAILED ({reason})");
            }
        }
    }
    println!("{skipped} skipped");
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// The sorted (api key, min, max) list `to` (default: the bootstrap) advertises.
fn discover(
    conns: &mut Conns,
    to: Option<&str>,
    name: &str,
) -> Result<Vec<(i16, i16, i16)>, String> {
    let request = body(&api_versions_request(DISCOVERY_VERSION), DISCOVERY_VERSION)?;
    match conns.exchange(to, ApiKey::ApiVersions, DISCOVERY_VERSION, &request) {
        Ok(Answer::ApiVersions(r)) if r.error_code == 0 => {
            let mut keys: Vec<(i16, i16, i16)> = r
                .api_keys
                .iter()
                .map(|v| (v.api_key, v.min_version, v.max_version))
                .collect();
            keys.sort_unstable();
            Ok(keys)
        }
        Ok(Answer::ApiVersions(r)) => Err(format!(
            "ApiVersions to {name} answered error code {}",
            r.error_code
        )),
        Ok(_) => unreachable!("an ApiVersions response decodes as one"),
        Err(e) => Err(format!("ApiVersions v{DISCOVERY_VERSION} to {name}: {e}")),
    }
}

/// (api key, version) pairs BOOTSTRAP does not advertise that are checked for a broker's
/// answer: just outside every advertised range, and everything `broker` offers beyond it.
fn not_offered(
    advertised: &[(i16, i16, i16)],
    broker: Option<&[(i16, i16, i16)]>,
) -> Vec<(i16, i16)> {
    let offered = |key: i16, version: i16| {
        advertised
            .iter()
            .any(|&(k, min, max)| k == key && (min..=max).contains(&version))
    };
    let mut out = Vec::new();
    for &(key, min, max) in advertised {
        if min > 0 {
            out.push((key, min - 1));
        }
        out.push((key, max + 1));
    }
    for &(key, min, max) in broker.unwrap_or_default() {
        out.extend((min..=max).filter(|&v| !offered(key, v)).map(|v| (key, v)));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A decoded response: the few whose content is checked, and the rest.
enum Answer {
    ApiVersions(ApiVersionsResponse),
    Metadata(MetadataResponse),
    Produce(ProduceResponse),
    Other,
}

/// The encoded body of the request sent for `api` at `version`: the message type's default,
/// except where a broker needs more to answer at all (a broker closes the connection on a
/// request it cannot parse, and leaves some well-formed ones unanswered).
fn request_body(api: ApiKey, version: i16, topic: &str) -> Result<Vec<u8>, String> {
    match api {
        ApiKey::ApiVersions => body(&api_versions_request(version), version),
        ApiKey::Produce => body(&produce_request(topic), version),
        // The default replica id 0 would be a follower's request; -1 is a consumer's.
        ApiKey::ListOffsets => body(
            &ListOffsetsRequest::default().with_replica_id((-1).into()),
            version,
        ),
        // The defaults' filters hold 0 (UNKNOWN), which the broker refuses to parse and closes
        // the connection; 1 is ANY.
        ApiKey::DescribeAcls => {
            let request = DescribeAclsRequest::default()
                .with_resource_type_filter(1)
                .with_operation(1)
                .with_permission_type(1);
            let request = if version >= 1 {
                request.with_pattern_type_filter(1)
            } else {
                request
            };
            body(&request, version)
        }
        // v4+ (the broker-to-broker batch form) with no transaction is never answered: the
        // broker answers once every listed transaction has been looked at. One unknown
        // transactional id, verify only, gets an error answer instead.
        ApiKey::AddPartitionsToTxn if version >= 4 => body(
            &AddPartitionsToTxnRequest::default().with_transactions(vec![
                AddPartitionsToTxnTransaction::default()
                    .with_transactional_id(StrBytes::from_static_str(CLIENT_ID).into())
                    .with_producer_id((-1).into())
                    .with_producer_epoch(-1)
                    .with_verify_only(true),
            ]),
            version,
        ),
        // v8+ (the batch form) with no group is never answered by a Kafka 3.9 broker; one
        // group, all its topics, gets an answer from every version.
        ApiKey::OffsetFetch if version >= 8 => body(
            &OffsetFetchRequest::default().with_groups(vec![
                OffsetFetchRequestGroup::default()
                    .with_group_id(StrBytes::from_static_str(CLIENT_ID).into()),
            ]),
            version,
        ),
        _ => {
            let mut buf = BytesMut::new();
            encode_default(api, version, &mut buf)
                .map_err(|e| format!("cannot encode the request: {e}"))?;
            Ok(buf.to_vec())
        }
    }
}

fn body(request: &impl Encodable, version: i16) -> Result<Vec<u8>, String> {
    let mut buf = BytesMut::new();
    request
        .encode(&mut buf, version)
        .map_err(|e| format!("cannot encode the request: {e}"))?;
    Ok(buf.to_vec())
}

fn api_versions_request(version: i16) -> ApiVersionsRequest {
    let request = ApiVersionsRequest::default();
    if version >= 3 {
        // v3+ brokers validate these against [a-zA-Z0-9](?:[a-zA-Z0-9\-.]*[a-zA-Z0-9])?
        request
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")))
    } else {
        request
    }
}

/// One record to partition 0 of `topic`, acks=1.
fn produce_request(topic: &str) -> ProduceRequest {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: now,
        key: Some(Bytes::from_static(b"conformance")),
        value: Some(Bytes::from_static(b"one record per produce version")),
        headers: Default::default(),
    };
    let mut records = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut records,
        [&record],
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encoding one record batch");
    ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records.freeze())),
                ]),
        ])
}

/// What a decoded response must also satisfy; `Ok` carries a note to print.
fn check(answer: &Answer) -> Result<String, String> {
    match answer {
        Answer::ApiVersions(r) if r.error_code != 0 => {
            Err(format!("ApiVersions answered error code {}", r.error_code))
        }
        Answer::Produce(r) => {
            let partition = r
                .responses
                .first()
                .and_then(|t| t.partition_responses.first())
                .ok_or("the produce response names no partition")?;
            if partition.error_code != 0 {
                return Err(format!(
                    "the write failed: error code {}{}",
                    partition.error_code,
                    partition
                        .error_message
                        .as_ref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ));
            }
            Ok(format!(" (offset {})", partition.base_offset))
        }
        _ => Ok(String::new()),
    }
}

/// The address (`host:port`, as advertised through the bootstrap) of partition 0's leader.
fn produce_leader(conns: &mut Conns, topic: &str) -> Result<String, String> {
    const VERSION: i16 = 12;
    let request = body(
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_owned())),
            ))])),
        VERSION,
    )?;
    let response = match conns.exchange(None, ApiKey::Metadata, VERSION, &request) {
        Ok(Answer::Metadata(r)) => r,
        Ok(_) => unreachable!("a Metadata response decodes as one"),
        Err(e) => return Err(format!("Metadata v{VERSION} for {topic}: {e}")),
    };
    let t = response
        .topics
        .first()
        .ok_or_else(|| format!("Metadata for {topic} returned no topic"))?;
    if t.error_code != 0 {
        return Err(format!(
            "topic {topic} is not usable (error code {}); create it first",
            t.error_code
        ));
    }
    let leader = t
        .partitions
        .iter()
        .find(|p| p.partition_index == 0)
        .map(|p| p.leader_id)
        .ok_or_else(|| format!("topic {topic} has no partition 0"))?;
    let broker = response
        .brokers
        .iter()
        .find(|b| b.node_id == leader)
        .ok_or_else(|| format!("leader {leader:?} of {topic}-0 is not among the brokers"))?;
    Ok(format!("{}:{}", broker.host, broker.port))
}

/// One connection to the bootstrap and one to the produce leader, opened on demand and dropped
/// after any failure.
struct Conns {
    bootstrap: String,
    open: Vec<(String, TcpStream)>,
    correlation_id: i32,
}

impl Conns {
    fn new(bootstrap: String) -> Self {
        Self {
            bootstrap,
            open: Vec::new(),
            correlation_id: 0,
        }
    }

    /// Sends one request to `to` (default: the bootstrap) and decodes its response.
    fn exchange(
        &mut self,
        to: Option<&str>,
        api: ApiKey,
        version: i16,
        body: &[u8],
    ) -> Result<Answer, String> {
        let addr = to.unwrap_or(&self.bootstrap).to_owned();
        self.correlation_id += 1;
        let correlation_id = self.correlation_id;
        let frame = encode(api, version, correlation_id, body)?;
        let result = self
            .stream(&addr)
            .and_then(|s| {
                s.write_all(&frame)?;
                read_frame(s)
            })
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => format!("connection closed without a response: {e}"),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("no response within {RESPONSE_TIMEOUT:?}")
                }
                _ => format!("i/o error: {e}"),
            })
            .and_then(|frame| decode(api, version, correlation_id, frame));
        if result.is_err() {
            self.open.retain(|(a, _)| *a != addr);
        }
        result
    }

    /// Sends `api_key` at `version`, which BOOTSTRAP does not advertise, with a header and no
    /// body, and checks the answer a broker gives: for ApiVersions, UNSUPPORTED_VERSION in the
    /// v0 layout naming ApiVersions up to `api_versions_max`; for anything else, the connection
    /// closed without a response. Always on a connection of its own, dropped afterwards.
    fn refused(
        &mut self,
        api_key: i16,
        version: i16,
        api_versions_max: i16,
    ) -> Result<String, String> {
        self.open.retain(|(a, _)| *a != self.bootstrap);
        self.correlation_id += 1;
        let correlation_id = self.correlation_id;
        let header = RequestHeader::default()
            .with_request_api_key(api_key)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        // Flexible (v2) headers from the first flexible version on; any version above a known
        // range is newer still. For an API key kafka-protocol cannot name, v1.
        let header_version = ApiKey::try_from(api_key)
            .map(|api| api.request_header_version(version.max(0)))
            .unwrap_or(1);
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&[0; 4]);
        header
            .encode(&mut frame, header_version)
            .map_err(|e| format!("cannot encode the request header: {e}"))?;
        let len = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let bootstrap = self.bootstrap.clone();
        let answer = self.stream(&bootstrap).and_then(|s| {
            s.write_all(&frame)?;
            read_frame(s)
        });
        self.open.retain(|(a, _)| *a != bootstrap);
        if api_key != ApiKey::ApiVersions as i16 {
            return match answer {
                Ok(_) => Err("answered; a broker closes the connection".to_owned()),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    Err(format!(
                        "neither answered nor closed within {RESPONSE_TIMEOUT:?}"
                    ))
                }
                Err(e) => Ok(format!("connection closed: {}", e.kind())),
            };
        }
        let mut frame = answer.map_err(|e| format!("no answer: {e}"))?;
        // ApiVersions responses have a v0 header whatever the version.
        let header = ResponseHeader::decode(&mut frame, 0)
            .map_err(|e| format!("response header does not decode: {e:#}"))?;
        if header.correlation_id != correlation_id {
            return Err(format!(
                "correlation id {}, {correlation_id} expected",
                header.correlation_id
            ));
        }
        let r = ApiVersionsResponse::decode(&mut frame, 0)
            .map_err(|e| format!("the answer is not an ApiVersions v0 body: {e:#}"))?;
        if frame.has_remaining() {
            return Err(format!(
                "{} bytes left after the v0 body",
                frame.remaining()
            ));
        }
        if r.error_code != 35 {
            return Err(format!(
                "error code {}, UNSUPPORTED_VERSION (35) expected",
                r.error_code
            ));
        }
        match r
            .api_keys
            .iter()
            .find(|v| v.api_key == ApiKey::ApiVersions as i16)
        {
            Some(v) if v.max_version == api_versions_max => Ok(format!(
                "UNSUPPORTED_VERSION, retry at ApiVersions v{}-v{}",
                v.min_version, v.max_version
            )),
            Some(v) => Err(format!(
                "names ApiVersions up to v{}, v{api_versions_max} is advertised",
                v.max_version
            )),
            None => Err("names no ApiVersions range to retry with".to_owned()),
        }
    }

    fn stream(&mut self, addr: &str) -> io::Result<&mut TcpStream> {
        if let Some(i) = self.open.iter().position(|(a, _)| a == addr) {
            return Ok(&mut self.open[i].1);
        }
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        self.open.push((addr.to_owned(), stream));
        Ok(&mut self.open.last_mut().expect("just pushed").1)
    }
}

/// A request frame: length prefix, header, and the already encoded body.
fn encode(api: ApiKey, version: i16, correlation_id: i32, body: &[u8]) -> Result<BytesMut, String> {
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let mut frame = BytesMut::new();
    frame.extend_from_slice(&[0; 4]);
    header
        .encode(&mut frame, api.request_header_version(version))
        .map_err(|e| format!("cannot encode the request header: {e}"))?;
    frame.extend_from_slice(body);
    let len = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

fn read_frame(stream: &mut TcpStream) -> io::Result<Bytes> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix)?;
    let len = i32::from_be_bytes(prefix);
    if len < 0 || len as usize > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("response length prefix {len}"),
        ));
    }
    let mut body = vec![0; len as usize];
    stream.read_exact(&mut body)?;
    Ok(body.into())
}

/// Checks the response header and decodes the body at `version`, with nothing left over.
fn decode(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    mut frame: Bytes,
) -> Result<Answer, String> {
    let header = ResponseHeader::decode(&mut frame, api.response_header_version(version))
        .map_err(|e| format!("response header does not decode: {e:#}"))?;
    if header.correlation_id != correlation_id {
        return Err(format!(
            "correlation id {} in the response, {correlation_id} expected",
            header.correlation_id
        ));
    }
    let answer = match api {
        ApiKey::ApiVersions => {
            ApiVersionsResponse::decode(&mut frame, version).map(Answer::ApiVersions)
        }
        ApiKey::Metadata => MetadataResponse::decode(&mut frame, version).map(Answer::Metadata),
        ApiKey::Produce => ProduceResponse::decode(&mut frame, version).map(Answer::Produce),
        _ => decode_any(api, version, &mut frame).map(|()| Answer::Other),
    }
    .map_err(|e| format!("response does not decode at v{version}: {e:#}"))?;
    if frame.has_remaining() {
        return Err(format!(
            "{} bytes left after decoding the response at v{version}",
            frame.remaining()
        ));
    }
    Ok(answer)
}

/// Calls `$m!` with `ApiKey variant, request type, response type;` for every API kafka-protocol
/// knows, so the default request and the response decoder of any key are one match away.
macro_rules! every_api {
    ($m:ident) => {
        $m! {
        Produce ProduceRequest ProduceResponse;
        Fetch FetchRequest FetchResponse;
        ListOffsets ListOffsetsRequest ListOffsetsResponse;
        Metadata MetadataRequest MetadataResponse;
        OffsetCommit OffsetCommitRequest OffsetCommitResponse;
        OffsetFetch OffsetFetchRequest OffsetFetchResponse;
        FindCoordinator FindCoordinatorRequest FindCoordinatorResponse;
        JoinGroup JoinGroupRequest JoinGroupResponse;
        Heartbeat HeartbeatRequest HeartbeatResponse;
        LeaveGroup LeaveGroupRequest LeaveGroupResponse;
        SyncGroup SyncGroupRequest SyncGroupResponse;
        DescribeGroups DescribeGroupsRequest DescribeGroupsResponse;
        ListGroups ListGroupsRequest ListGroupsResponse;
        SaslHandshake SaslHandshakeRequest SaslHandshakeResponse;
        ApiVersions ApiVersionsRequest ApiVersionsResponse;
        CreateTopics CreateTopicsRequest CreateTopicsResponse;
        DeleteTopics DeleteTopicsRequest DeleteTopicsResponse;
        DeleteRecords DeleteRecordsRequest DeleteRecordsResponse;
        InitProducerId InitProducerIdRequest InitProducerIdResponse;
        OffsetForLeaderEpoch OffsetForLeaderEpochRequest OffsetForLeaderEpochResponse;
        AddPartitionsToTxn AddPartitionsToTxnRequest AddPartitionsToTxnResponse;
        AddOffsetsToTxn AddOffsetsToTxnRequest AddOffsetsToTxnResponse;
        EndTxn EndTxnRequest EndTxnResponse;
        WriteTxnMarkers WriteTxnMarkersRequest WriteTxnMarkersResponse;
        TxnOffsetCommit TxnOffsetCommitRequest TxnOffsetCommitResponse;
        DescribeAcls DescribeAclsRequest DescribeAclsResponse;
        CreateAcls CreateAclsRequest CreateAclsResponse;
        DeleteAcls DeleteAclsRequest DeleteAclsResponse;
        DescribeConfigs DescribeConfigsRequest DescribeConfigsResponse;
        AlterConfigs AlterConfigsRequest AlterConfigsResponse;
        AlterReplicaLogDirs AlterReplicaLogDirsRequest AlterReplicaLogDirsResponse;
        DescribeLogDirs DescribeLogDirsRequest DescribeLogDirsResponse;
        SaslAuthenticate SaslAuthenticateRequest SaslAuthenticateResponse;
        CreatePartitions CreatePartitionsRequest CreatePartitionsResponse;
        CreateDelegationToken CreateDelegationTokenRequest CreateDelegationTokenResponse;
        RenewDelegationToken RenewDelegationTokenRequest RenewDelegationTokenResponse;
        ExpireDelegationToken ExpireDelegationTokenRequest ExpireDelegationTokenResponse;
        DescribeDelegationToken DescribeDelegationTokenRequest DescribeDelegationTokenResponse;
        DeleteGroups DeleteGroupsRequest DeleteGroupsResponse;
        ElectLeaders ElectLeadersRequest ElectLeadersResponse;
        IncrementalAlterConfigs IncrementalAlterConfigsRequest IncrementalAlterConfigsResponse;
        AlterPartitionReassignments AlterPartitionReassignmentsRequest AlterPartitionReassignmentsResponse;
        ListPartitionReassignments ListPartitionReassignmentsRequest ListPartitionReassignmentsResponse;
        OffsetDelete OffsetDeleteRequest OffsetDeleteResponse;
        DescribeClientQuotas DescribeClientQuotasRequest DescribeClientQuotasResponse;
        AlterClientQuotas AlterClientQuotasRequest AlterClientQuotasResponse;
        DescribeUserScramCredentials DescribeUserScramCredentialsRequest DescribeUserScramCredentialsResponse;
        AlterUserScramCredentials AlterUserScramCredentialsRequest AlterUserScramCredentialsResponse;
        Vote VoteRequest VoteResponse;
        BeginQuorumEpoch BeginQuorumEpochRequest BeginQuorumEpochResponse;
        EndQuorumEpoch EndQuorumEpochRequest EndQuorumEpochResponse;
        DescribeQuorum DescribeQuorumRequest DescribeQuorumResponse;
        AlterPartition AlterPartitionRequest AlterPartitionResponse;
        UpdateFeatures UpdateFeaturesRequest UpdateFeaturesResponse;
        Envelope EnvelopeRequest EnvelopeResponse;
        FetchSnapshot FetchSnapshotRequest FetchSnapshotResponse;
        DescribeCluster DescribeClusterRequest DescribeClusterResponse;
        DescribeProducers DescribeProducersRequest DescribeProducersResponse;
        BrokerRegistration BrokerRegistrationRequest BrokerRegistrationResponse;
        BrokerHeartbeat BrokerHeartbeatRequest BrokerHeartbeatResponse;
        UnregisterBroker UnregisterBrokerRequest UnregisterBrokerResponse;
        DescribeTransactions DescribeTransactionsRequest DescribeTransactionsResponse;
        ListTransactions ListTransactionsRequest ListTransactionsResponse;
        AllocateProducerIds AllocateProducerIdsRequest AllocateProducerIdsResponse;
        ConsumerGroupHeartbeat ConsumerGroupHeartbeatRequest ConsumerGroupHeartbeatResponse;
        ConsumerGroupDescribe ConsumerGroupDescribeRequest ConsumerGroupDescribeResponse;
        ControllerRegistration ControllerRegistrationRequest ControllerRegistrationResponse;
        GetTelemetrySubscriptions GetTelemetrySubscriptionsRequest GetTelemetrySubscriptionsResponse;
        PushTelemetry PushTelemetryRequest PushTelemetryResponse;
        AssignReplicasToDirs AssignReplicasToDirsRequest AssignReplicasToDirsResponse;
        ListConfigResources ListConfigResourcesRequest ListConfigResourcesResponse;
        DescribeTopicPartitions DescribeTopicPartitionsRequest DescribeTopicPartitionsResponse;
        ShareGroupHeartbeat ShareGroupHeartbeatRequest ShareGroupHeartbeatResponse;
        ShareGroupDescribe ShareGroupDescribeRequest ShareGroupDescribeResponse;
        ShareFetch ShareFetchRequest ShareFetchResponse;
        ShareAcknowledge ShareAcknowledgeRequest ShareAcknowledgeResponse;
        AddRaftVoter AddRaftVoterRequest AddRaftVoterResponse;
        RemoveRaftVoter RemoveRaftVoterRequest RemoveRaftVoterResponse;
        UpdateRaftVoter UpdateRaftVoterRequest UpdateRaftVoterResponse;
        InitializeShareGroupState InitializeShareGroupStateRequest InitializeShareGroupStateResponse;
        ReadShareGroupState ReadShareGroupStateRequest ReadShareGroupStateResponse;
        WriteShareGroupState WriteShareGroupStateRequest WriteShareGroupStateResponse;
        DeleteShareGroupState DeleteShareGroupStateRequest DeleteShareGroupStateResponse;
        ReadShareGroupStateSummary ReadShareGroupStateSummaryRequest ReadShareGroupStateSummaryResponse;
        DescribeShareGroupOffsets DescribeShareGroupOffsetsRequest DescribeShareGroupOffsetsResponse;
        AlterShareGroupOffsets AlterShareGroupOffsetsRequest AlterShareGroupOffsetsResponse;
        DeleteShareGroupOffsets DeleteShareGroupOffsetsRequest DeleteShareGroupOffsetsResponse;
        }
    };
}

/// Encodes `api`'s default request at `version`.
fn encode_default(api: ApiKey, version: i16, buf: &mut BytesMut) -> anyhow::Result<()> {
    macro_rules! encode_default {
        ($($key:ident $request:ident $response:ident;)*) => {
            match api {
                $(ApiKey::$key => messages::$request::default().encode(buf, version),)*
            }
        };
    }
    every_api!(encode_default)
}

/// Decodes a response body of `api` at `version`, for its checks only.
fn decode_any(api: ApiKey, version: i16, body: &mut Bytes) -> anyhow::Result<()> {
    macro_rules! decode_any {
        ($($key:ident $request:ident $response:ident;)*) => {
            match api {
                $(ApiKey::$key => messages::$response::decode(body, version).map(drop),)*
            }
        };
    }
    every_api!(decode_any)
}

/// The versions kafka-protocol both encodes the request and decodes the response of.
fn encodable_versions(api: ApiKey) -> (i16, i16) {
    macro_rules! encodable_versions {
        ($($key:ident $request:ident $response:ident;)*) => {
            match api {
                $(ApiKey::$key => {
                    let request = <messages::$request as Message>::VERSIONS;
                    let response = <messages::$response as Message>::VERSIONS;
                    (request.min.max(response.min), request.max.min(response.max))
                })*
            }
        };
    }
    every_api!(encodable_versions)
}
