//! A scripted fake broker: a small tokio TCP server that answers, per connection and in request
//! order as a broker does, just enough for keyward's probes, keyward's redirect client and the
//! tests' clients. Metadata lists node 0 (this server), and any extra node ids the test
//! [`FakeBroker::advertise`]s at the same address, and four partitions per topic asked for, led
//! by node 0; InitProducerId hands out [`PRODUCER_ID`] and the ids after it; Produce is recorded (with each batch's
//! producer id and base sequence) and answered with [`broker_offset`] for every partition it
//! holds (in reverse order, so only keyward can put the client's order back), or with an error
//! the test queued; Fetch is answered empty, or held until the test releases it. A broker taken
//! [`FakeBroker::down`] closes every connection it has and every one it accepts, until it is
//! brought back up.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchResponse, InitProducerIdResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, ProducerId, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use keyward::codec::errors::OUT_OF_ORDER_SEQUENCE_NUMBER;
use keyward::codec::records::BatchHeader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};

/// `topic_authorized_operations` granting every topic operation (READ, WRITE, CREATE, DELETE,
/// ALTER, DESCRIBE, DESCRIBE_CONFIGS, ALTER_CONFIGS: bits 3-8, 10, 11).
const TOPIC_OPERATIONS: i32 = 0b1101_1111_1000;

/// The producer id the first InitProducerId is answered with (epoch 0); each later one gets
/// the next id.
pub const PRODUCER_ID: i64 = 1_000;

/// The base offset the fake broker gives a partition it appends to.
pub fn broker_offset(topic: &str, partition: i32) -> i64 {
    1_000 + 10 * i64::from(partition) + topic.len() as i64
}

/// What the broker was asked to write: one entry per Produce request, its acks and its
/// `(topic, [partitions])` in the order received.
pub type Produced = (i16, Vec<(String, Vec<i32>)>);

/// One partition's batch as the broker received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub topic: String,
    pub partition: i32,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records: i32,
}

#[derive(Clone, Default)]
pub struct Script {
    /// Waited before every answer, so an answer keyward makes itself is ready long before the
    /// broker's answers to earlier requests.
    pub delay: Duration,
    /// Fetch requests are answered only once [`FakeBroker::release_fetch`] is called.
    pub hold_fetch: bool,
    /// Every answer leaves this long after its request arrived, while the requests behind it
    /// are read and answered in turn: a broker at the far end of a slow link.
    pub latency: Duration,
    /// Produce is checked as a broker checks an idempotent producer's batches: per producer,
    /// epoch and partition, a batch numbered where the last one ended (from 0) is appended, one of the last 5 appended is answered as a
    /// duplicate (success, not appended again), and any other is refused with
    /// OUT_OF_ORDER_SEQUENCE_NUMBER.
    pub check_sequences: bool,
}

/// An idempotent producer's numbering on one partition, as the broker tracks it.
#[derive(Default)]
struct Numbering {
    next: i32,
    /// Base sequences of the last 5 batches appended.
    recent: VecDeque<i32>,
}

type StreamId = (i64, i16, String, i32);

/// What the broker's connections share with the test.
#[derive(Default)]
struct State {
    produced: Mutex<Vec<Produced>>,
    batches: Mutex<Vec<Batch>>,
    /// Error codes the next Produce requests answer every partition with, one per request.
    produce_errors: Mutex<VecDeque<i16>>,
    /// Node ids listed besides node 0.
    extra_nodes: Mutex<Vec<i32>>,
    release: Notify,
    /// Metadata answers written (to keyward's probes and to clients through keyward).
    metadata_answers: AtomicUsize,
    /// Metadata requests naming topics that let the broker create them (a broker with
    /// `auto.create.topics.enable` would).
    auto_create_asked: AtomicUsize,
    /// InitProducerId answers given.
    producer_ids: AtomicUsize,
    /// Connections that carried a Produce request.
    produce_connections: AtomicUsize,
    /// Produce requests read and not yet answered, and the most there ever were.
    produce_outstanding: AtomicUsize,
    produce_outstanding_max: AtomicUsize,
    /// With [`Script::check_sequences`]: each stream's numbering, and the batches appended.
    numbering: Mutex<HashMap<StreamId, Numbering>>,
    appended: Mutex<Vec<Batch>>,
}

pub struct FakeBroker {
    pub addr: SocketAddr,
    state: Arc<State>,
    down: watch::Sender<bool>,
}

impl FakeBroker {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let down = watch::Sender::new(false);
        let (s, d) = (state.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if *d.borrow() {
                    // Down: the connection is closed before anything is read.
                    drop(stream);
                    continue;
                }
                let down = d.subscribe();
                tokio::spawn(serve(stream, addr, script.clone(), s.clone(), down));
            }
        });
        Self { addr, state, down }
    }

    /// Every Produce request received so far.
    pub fn produced(&self) -> Vec<Produced> {
        self.state.produced.lock().unwrap().clone()
    }

    /// Every batch received so far, in the order received.
    pub fn batches(&self) -> Vec<Batch> {
        self.state.batches.lock().unwrap().clone()
    }

    /// The next Produce request is answered `code` for every partition (and not appended).
    pub fn fail_next_produce(&self, code: i16) {
        self.state.produce_errors.lock().unwrap().push_back(code);
    }

    /// From now on Metadata also lists node `node_id`, at this broker's address.
    pub fn advertise(&self, node_id: i32) {
        self.state.extra_nodes.lock().unwrap().push(node_id);
    }

    /// The batches appended so far (with [`Script::check_sequences`]), in order.
    pub fn appended(&self) -> Vec<Batch> {
        self.state.appended.lock().unwrap().clone()
    }

    /// How many connections carried Produce requests.
    pub fn produce_connections(&self) -> usize {
        self.state.produce_connections.load(Ordering::Relaxed)
    }

    /// The most Produce requests that were ever read and not yet answered at once.
    pub fn most_produce_in_flight(&self) -> usize {
        self.state.produce_outstanding_max.load(Ordering::Relaxed)
    }

    /// How many Metadata answers the broker has written so far.
    pub fn metadata_answers(&self) -> usize {
        self.state.metadata_answers.load(Ordering::Relaxed)
    }

    /// Answers the Fetch request held (or the next one, if none is held yet).
    /// Metadata requests that named topics and let the broker create them.
    pub fn auto_create_asked(&self) -> usize {
        self.state.auto_create_asked.load(Ordering::Relaxed)
    }

    pub fn release_fetch(&self) {
        self.state.release.notify_one();
    }

    /// Down: every open connection is closed, and every new one closed as soon as accepted
    /// (a broker whose process is gone but whose port is still refused quickly).
    pub fn down(&self) {
        self.down.send_replace(true);
    }

    /// Up again: connections are served.
    pub fn up(&self) {
        self.down.send_replace(false);
    }
}

async fn serve(
    stream: TcpStream,
    me: SocketAddr,
    script: Script,
    state: Arc<State>,
    mut down: watch::Receiver<bool>,
) {
    let (mut read, write) = stream.into_split();
    // Answers leave in request order, each when it is due.
    let (answers, queued) = mpsc::unbounded_channel();
    tokio::spawn(answer(write, queued, state.clone(), down.clone()));
    let mut buf = BytesMut::new();
    let mut produced = false;
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut read, &mut buf) => frame,
            _ = down.wait_for(|d| *d) => return,
        };
        let Some(frame) = frame else { return };
        let arrived = tokio::time::Instant::now();
        let mut body = frame;
        let api = ApiKey::try_from(i16::from_be_bytes([body[0], body[1]])).unwrap();
        let version = i16::from_be_bytes([body[2], body[3]]);
        let header = RequestHeader::decode(&mut body, api.request_header_version(version)).unwrap();
        let id = header.correlation_id;
        let answer = match api {
            ApiKey::Metadata => {
                let request = MetadataRequest::decode(&mut body, version).unwrap();
                if request.allow_auto_topic_creation
                    && request.topics.as_ref().is_some_and(|t| !t.is_empty())
                {
                    state.auto_create_asked.fetch_add(1, Ordering::Relaxed);
                }
                let extra = state.extra_nodes.lock().unwrap().clone();
                Some(encode(api, version, id, &metadata(me, &extra, &request)))
            }
            ApiKey::InitProducerId => {
                // A new producer id each time, as a broker gives a producer without a
                // transactional id.
                let nth = state.producer_ids.fetch_add(1, Ordering::Relaxed) as i64;
                let response = InitProducerIdResponse::default()
                    .with_producer_id(ProducerId(PRODUCER_ID + nth))
                    .with_producer_epoch(0);
                Some(encode(api, version, id, &response))
            }
            ApiKey::Produce => {
                if !std::mem::replace(&mut produced, true) {
                    state.produce_connections.fetch_add(1, Ordering::Relaxed);
                }
                let request = ProduceRequest::decode(&mut body, version).unwrap();
                let received = batches(&request);
                state
                    .batches
                    .lock()
                    .unwrap()
                    .extend(received.iter().cloned());
                let error = state.produce_errors.lock().unwrap().pop_front();
                let codes = match (error, script.check_sequences) {
                    (Some(code), _) => vec![code; received.len()],
                    (None, true) => check_sequences(&state, &received),
                    (None, false) => vec![0; received.len()],
                };
                let (record, response) = produce(&request, &codes);
                state.produced.lock().unwrap().push((request.acks, record));
                (request.acks != 0).then(|| {
                    let now = state.produce_outstanding.fetch_add(1, Ordering::Relaxed) + 1;
                    state
                        .produce_outstanding_max
                        .fetch_max(now, Ordering::Relaxed);
                    encode(api, version, id, &response)
                })
            }
            ApiKey::Fetch => {
                if script.hold_fetch {
                    state.release.notified().await;
                }
                Some(encode(api, version, id, &FetchResponse::default()))
            }
            other => panic!("the fake broker does not answer {other:?}"),
        };
        if let Some(answer) = answer {
            tokio::time::sleep(script.delay).await;
            let due = arrived + script.latency;
            if answers.send((due, api, answer)).is_err() {
                return;
            }
        }
    }
}

/// Writes a connection's answers in order, each once it is due.
async fn answer(
    mut write: OwnedWriteHalf,
    mut queued: mpsc::UnboundedReceiver<(tokio::time::Instant, ApiKey, Bytes)>,
    state: Arc<State>,
    mut down: watch::Receiver<bool>,
) {
    while let Some((due, api, answer)) = queued.recv().await {
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            _ = down.wait_for(|d| *d) => return,
        }
        if write.write_all(&answer).await.is_err() {
            return;
        }
        match api {
            ApiKey::Metadata => {
                state.metadata_answers.fetch_add(1, Ordering::Relaxed);
            }
            ApiKey::Produce => {
                state.produce_outstanding.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// The error code of each batch received, as a broker numbering idempotent producers' batches
/// answers it (see [`Script::check_sequences`]); appended batches are recorded.
fn check_sequences(state: &State, received: &[Batch]) -> Vec<i16> {
    let mut numbering = state.numbering.lock().unwrap();
    received
        .iter()
        .map(|b| {
            let stream = (
                b.producer_id,
                b.producer_epoch,
                b.topic.clone(),
                b.partition,
            );
            let n = numbering.entry(stream).or_default();
            if b.base_sequence == n.next {
                n.next += b.records;
                n.recent.push_back(b.base_sequence);
                if n.recent.len() > 5 {
                    n.recent.pop_front();
                }
                state.appended.lock().unwrap().push(b.clone());
                0
            } else if n.recent.contains(&b.base_sequence) {
                0
            } else {
                OUT_OF_ORDER_SEQUENCE_NUMBER
            }
        })
        .collect()
}

fn metadata(me: SocketAddr, extra_nodes: &[i32], request: &MetadataRequest) -> MetadataResponse {
    // As a broker without an authorizer: every client may do everything it asks about.
    let authorized = if request.include_topic_authorized_operations {
        TOPIC_OPERATIONS
    } else {
        i32::MIN
    };
    let topics = request
        .topics
        .iter()
        .flatten()
        .filter_map(|t| t.name.clone());
    MetadataResponse::default()
        .with_cluster_id(Some(StrBytes::from_static_str("fake")))
        .with_controller_id(BrokerId(0))
        .with_brokers(
            std::iter::once(0)
                .chain(extra_nodes.iter().copied())
                .map(|node| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(node))
                        .with_host(StrBytes::from_string(me.ip().to_string()))
                        .with_port(i32::from(me.port()))
                })
                .collect(),
        )
        .with_topics(
            topics
                .map(|name| {
                    MetadataResponseTopic::default()
                        .with_name(Some(name))
                        .with_topic_authorized_operations(authorized)
                        .with_partitions(
                            (0..4)
                                .map(|p| {
                                    MetadataResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_leader_id(BrokerId(0))
                                        .with_replica_nodes(vec![BrokerId(0)])
                                        .with_isr_nodes(vec![BrokerId(0)])
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
}

/// The header of every partition's (first) batch.
fn batches(request: &ProduceRequest) -> Vec<Batch> {
    request
        .topic_data
        .iter()
        .flat_map(|t| {
            t.partition_data.iter().map(|p| {
                let records = p.records.as_deref().unwrap_or_default();
                let h = BatchHeader::parse(records).unwrap();
                Batch {
                    topic: t.name.0.to_string(),
                    partition: p.index,
                    producer_id: h.producer_id,
                    producer_epoch: h.producer_epoch,
                    base_sequence: h.base_sequence,
                    records: h.records_count,
                }
            })
        })
        .collect()
}

/// What was asked, and the answer: each partition's code from `codes` (in request order), with
/// a [`broker_offset`] where it is 0.
fn produce(request: &ProduceRequest, codes: &[i16]) -> (Vec<(String, Vec<i32>)>, ProduceResponse) {
    let record = request
        .topic_data
        .iter()
        .map(|t| {
            let partitions = t.partition_data.iter().map(|p| p.index).collect();
            (t.name.0.to_string(), partitions)
        })
        .collect();
    let mut codes = codes.iter().copied();
    let answered: Vec<TopicProduceResponse> = request
        .topic_data
        .iter()
        .map(|t| {
            let partitions = t
                .partition_data
                .iter()
                .map(|p| match codes.next().unwrap_or(0) {
                    0 => PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_base_offset(broker_offset(&t.name.0, p.index)),
                    code => PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_error_code(code)
                        .with_base_offset(-1),
                })
                .rev()
                .collect::<Vec<_>>();
            TopicProduceResponse::default()
                .with_name(t.name.clone())
                .with_partition_responses(partitions)
        })
        .collect();
    // Reverse order: a broker owes no particular order within a response.
    let responses = answered.into_iter().rev().collect();
    (record, ProduceResponse::default().with_responses(responses))
}

/// A response frame, length prefix included.
pub fn encode<M: Encodable>(api: ApiKey, version: i16, correlation_id: i32, body: &M) -> Bytes {
    let mut out = BytesMut::from(&[0u8; 4][..]);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, api.response_header_version(version))
        .unwrap();
    body.encode(&mut out, version).unwrap();
    let len = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// The next frame's body (length prefix removed), or `None` when the peer closed.
pub async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R, buf: &mut BytesMut) -> Option<Bytes> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() >= 4 + len {
                let mut frame = buf.split_to(4 + len);
                return Some(frame.split_off(4).freeze());
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}
