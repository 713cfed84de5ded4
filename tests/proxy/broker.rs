//! A scripted fake broker: a small tokio TCP server that answers, per connection and in request
//! order as a broker does, just enough for keyward's probes and the tests' clients. Metadata
//! lists one broker (node 0, this server) and four partitions per topic asked for; Produce is
//! recorded and answered with [`broker_offset`] for every partition it holds (in reverse order,
//! so only keyward can put the client's order back); Fetch is answered empty, or held until the
//! test releases it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The base offset the fake broker gives a partition it appends to.
pub fn broker_offset(topic: &str, partition: i32) -> i64 {
    1_000 + 10 * i64::from(partition) + topic.len() as i64
}

/// What the broker was asked to write: one entry per Produce request, its acks and its
/// `(topic, [partitions])` in the order received.
pub type Produced = (i16, Vec<(String, Vec<i32>)>);

#[derive(Clone, Default)]
pub struct Script {
    /// Waited before every answer, so an answer keyward makes itself is ready long before the
    /// broker's answers to earlier requests.
    pub delay: Duration,
    /// Fetch requests are answered only once [`FakeBroker::release_fetch`] is called.
    pub hold_fetch: bool,
}

pub struct FakeBroker {
    pub addr: SocketAddr,
    produced: Arc<Mutex<Vec<Produced>>>,
    release: Arc<Notify>,
}

impl FakeBroker {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let produced = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let (p, r) = (produced.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, addr, script.clone(), p.clone(), r.clone()));
            }
        });
        Self {
            addr,
            produced,
            release,
        }
    }

    /// Every Produce request received so far.
    pub fn produced(&self) -> Vec<Produced> {
        self.produced.lock().unwrap().clone()
    }

    /// Answers the Fetch request held (or the next one, if none is held yet).
    pub fn release_fetch(&self) {
        self.release.notify_one();
    }
}

async fn serve(
    mut stream: TcpStream,
    me: SocketAddr,
    script: Script,
    produced: Arc<Mutex<Vec<Produced>>>,
    release: Arc<Notify>,
) {
    let mut buf = BytesMut::new();
    while let Some(frame) = read_frame(&mut stream, &mut buf).await {
        let mut body = frame;
        let api = ApiKey::try_from(i16::from_be_bytes([body[0], body[1]])).unwrap();
        let version = i16::from_be_bytes([body[2], body[3]]);
        let header = RequestHeader::decode(&mut body, api.request_header_version(version)).unwrap();
        let id = header.correlation_id;
        let answer = match api {
            ApiKey::Metadata => {
                let request = MetadataRequest::decode(&mut body, version).unwrap();
                Some(encode(api, version, id, &metadata(me, &request)))
            }
            ApiKey::Produce => {
                let request = ProduceRequest::decode(&mut body, version).unwrap();
                let (record, response) = produce(&request);
                produced.lock().unwrap().push((request.acks, record));
                (request.acks != 0).then(|| encode(api, version, id, &response))
            }
            ApiKey::Fetch => {
                if script.hold_fetch {
                    release.notified().await;
                }
                Some(encode(api, version, id, &FetchResponse::default()))
            }
            other => panic!("the fake broker does not answer {other:?}"),
        };
        if let Some(answer) = answer {
            tokio::time::sleep(script.delay).await;
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
    }
}

fn metadata(me: SocketAddr, request: &MetadataRequest) -> MetadataResponse {
    let topics = request
        .topics
        .iter()
        .flatten()
        .filter_map(|t| t.name.clone());
    MetadataResponse::default()
        .with_cluster_id(Some(StrBytes::from_static_str("fake")))
        .with_controller_id(BrokerId(0))
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(0))
                .with_host(StrBytes::from_string(me.ip().to_string()))
                .with_port(i32::from(me.port())),
        ])
        .with_topics(
            topics
                .map(|name| {
                    MetadataResponseTopic::default()
                        .with_name(Some(name))
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

fn produce(request: &ProduceRequest) -> (Vec<(String, Vec<i32>)>, ProduceResponse) {
    let record = request
        .topic_data
        .iter()
        .map(|t| {
            let partitions = t.partition_data.iter().map(|p| p.index).collect();
            (t.name.0.to_string(), partitions)
        })
        .collect();
    // Reverse order: a broker owes no particular order within a response.
    let responses = request
        .topic_data
        .iter()
        .rev()
        .map(|t| {
            TopicProduceResponse::default()
                .with_name(t.name.clone())
                .with_partition_responses(
                    t.partition_data
                        .iter()
                        .rev()
                        .map(|p| {
                            PartitionProduceResponse::default()
                                .with_index(p.index)
                                .with_base_offset(broker_offset(&t.name.0, p.index))
                        })
                        .collect(),
                )
        })
        .collect();
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
pub async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Bytes> {
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
