//! keyward's connections to brokers. A [`Dialer`] knows how to reach one cluster: TCP with a
//! timeout, then TLS when the cluster is configured for it, verifying the broker's certificate
//! and host name. Connections that carry a client's traffic stop there (the client runs its own
//! SASL exchange through keyward); keyward's own connections (probes, redirected writes) also
//! authenticate with keyward's credentials and become a [`Session`], on which keyward sends
//! requests of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, RequestHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::sync::CancellationToken;

use super::sasl;
use super::stream::Stream;
use crate::codec::frame::{self, FrameReader};
use crate::config::split_host_port;
use crate::security::Security;

/// How keyward connects to one cluster.
#[derive(Clone)]
pub struct Dialer {
    pub cluster: String,
    security: Arc<Security>,
    timeout: Duration,
}

impl Dialer {
    pub fn new(cluster: String, security: Arc<Security>, timeout: Duration) -> Self {
        Self {
            cluster,
            security,
            timeout,
        }
    }

    /// A connection for a client's traffic: TCP, and TLS if the cluster uses it.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Stream> {
        tokio::time::timeout(self.timeout, self.open(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out after {:?}", self.timeout))?
    }

    /// [`Dialer::connect`] to the first of `addrs` that answers.
    pub async fn connect_any(&self, addrs: &[String]) -> anyhow::Result<Stream> {
        first_of(addrs, |a| self.connect(a)).await
    }

    /// keyward's own connection to `addr`: connected, and authenticated with keyward's
    /// credentials if the cluster has them.
    pub async fn session(&self, addr: &str, client_id: &'static str) -> anyhow::Result<Session> {
        let open = async {
            let stream = self.open(addr).await?;
            let mut session = Session::new(stream, client_id, self.timeout);
            if let Some(credentials) = &self.security.cluster(&self.cluster).sasl {
                let lifetime = sasl::authenticate(&mut session, credentials)
                    .await
                    .with_context(|| format!("SASL with {addr}"))?;
                session.expires = lifetime.map(|l| Instant::now() + l);
            }
            anyhow::Ok(session)
        };
        tokio::time::timeout(self.timeout, open)
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out after {:?}", self.timeout))?
    }

    /// [`Dialer::session`] with the first of `addrs` that answers.
    pub async fn session_any(
        &self,
        addrs: &[String],
        client_id: &'static str,
    ) -> anyhow::Result<Session> {
        first_of(addrs, |a| self.session(a, client_id)).await
    }

    async fn open(&self, addr: &str) -> anyhow::Result<Stream> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let Some(tls) = self.security.cluster(&self.cluster).tls.clone() else {
            return Ok(Stream::Plain(tcp));
        };
        let host = split_host_port(addr).map_or(addr, |(h, _)| h);
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host:?} cannot be checked against a certificate"))?;
        let tls = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {addr}"))?;
        Ok(Stream::Tls(Box::new(TlsStream::Client(tls))))
    }
}

async fn first_of<'a, T, F, Fut>(addrs: &'a [String], mut connect: F) -> anyhow::Result<T>
where
    F: FnMut(&'a str) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut last = None;
    for addr in addrs {
        match connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no broker address to connect to")))
}

/// A connection on which keyward sends its own requests, one at a time.
pub struct Session {
    stream: Stream,
    client_id: &'static str,
    correlation_id: i32,
    timeout: Duration,
    /// When the broker ends the authenticated session (KIP-368), if it does.
    expires: Option<Instant>,
}

impl Session {
    fn new(stream: Stream, client_id: &'static str, timeout: Duration) -> Self {
        Self {
            stream,
            client_id,
            correlation_id: 0,
            timeout,
            expires: None,
        }
    }

    /// Whether the broker will still accept requests for a while: a session whose
    /// authentication is about to expire is replaced rather than used.
    pub fn is_fresh(&self) -> bool {
        self.expires
            .is_none_or(|at| at > Instant::now() + Duration::from_secs(5))
    }

    /// One request and its response, within the dialer's timeout.
    pub async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<Resp> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let out = encode_request(self.client_id, self.correlation_id, api, version, request)?;
        let stream = &mut self.stream;
        let exchange = async {
            stream.write_all(&out).await?;
            stream.flush().await?;
            let reader = FrameReader::new(MAX_RESPONSE_BYTES);
            let mut buf = BytesMut::new();
            loop {
                if let Some(frame) = reader.next_frame(&mut buf)? {
                    return anyhow::Ok(frame);
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    bail!("the broker closed the connection");
                }
            }
        };
        let frame = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))??;
        decode_response(&frame, self.correlation_id, api, version)
    }

    /// This session as a [`Pipelined`] connection: from now on several requests can be
    /// outstanding on it at once.
    pub fn pipelined(self) -> Pipelined {
        let (requests, queued) = mpsc::unbounded_channel();
        let broken = CancellationToken::new();
        tokio::spawn(drive(self.stream, queued, broken.clone()));
        Pipelined {
            requests,
            broken,
            client_id: self.client_id,
            correlation_id: Arc::new(AtomicI32::new(self.correlation_id)),
            timeout: self.timeout,
            expires: self.expires,
        }
    }
}

/// A request frame: length prefix, header (v1 or v2, with `client_id`) and body.
pub(crate) fn encode_request<Req: Encodable>(
    client_id: &'static str,
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    request: &Req,
) -> anyhow::Result<Bytes> {
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(client_id)));
    let mut out = BytesMut::with_capacity(256);
    out.extend_from_slice(&[0; 4]);
    header.encode(&mut out, api.request_header_version(version))?;
    request.encode(&mut out, version)?;
    let len = i32::try_from(out.len() - 4).context("request too large")?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// The body of a response `frame` to the request `correlation_id`, decoded.
fn decode_response<Resp: Decodable>(
    frame: &Bytes,
    correlation_id: i32,
    api: ApiKey,
    version: i16,
) -> anyhow::Result<Resp> {
    if frame::response_correlation_id(frame)? != correlation_id {
        bail!("the broker answered another request");
    }
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let mut body = frame.slice(frame::LENGTH_PREFIX + header_len..);
    Resp::decode(&mut body, version)
}

/// One request for a [`Pipelined`] connection's task: its frame, and where its response goes.
struct Outgoing {
    frame: Bytes,
    correlation_id: i32,
    response: oneshot::Sender<Bytes>,
}

/// keyward's own connection with several requests outstanding at once, as a Kafka producer
/// keeps them: a broker answers a connection's requests in the order it received them, so
/// requests are written in the order they are [`Pipelined::send`], and responses are matched
/// to them in that order (and their correlation ids checked).
///
/// A task owns the socket. It ends, and every request still outstanding fails, when the
/// connection breaks, when an answer is late ([`Pipelined::is_usable`] is false from then on),
/// or once every handle is dropped and every outstanding request answered.
#[derive(Clone)]
pub struct Pipelined {
    requests: mpsc::UnboundedSender<Outgoing>,
    broken: CancellationToken,
    client_id: &'static str,
    correlation_id: Arc<AtomicI32>,
    timeout: Duration,
    expires: Option<Instant>,
}

/// The response to a request sent on a [`Pipelined`] connection, once it arrives.
pub type Reply<Resp> = Pin<Box<dyn Future<Output = anyhow::Result<Resp>> + Send>>;

impl Pipelined {
    /// Whether new requests may go on this connection: it is open, has answered in time, and
    /// its authentication does not expire soon.
    pub fn is_usable(&self) -> bool {
        !self.broken.is_cancelled()
            && !self.requests.is_closed()
            && self
                .expires
                .is_none_or(|at| at > Instant::now() + Duration::from_secs(5))
    }

    /// Queues one request; it is written after every request sent before it. The reply fails
    /// if no answer comes within the dialer's timeout, which also ends the connection: a
    /// broker that late is not trusted with the requests behind it.
    pub fn send<Req: Encodable, Resp: Decodable + 'static>(
        &self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> Reply<Resp> {
        let correlation_id = self.correlation_id.fetch_add(1, Ordering::Relaxed) + 1;
        let frame = encode_request(self.client_id, correlation_id, api, version, request);
        let (response, answered) = oneshot::channel();
        let queued = frame.map(|frame| {
            self.requests.send(Outgoing {
                frame,
                correlation_id,
                response,
            })
        });
        let (timeout, broken) = (self.timeout, self.broken.clone());
        Box::pin(async move {
            if queued?.is_err() {
                bail!("the connection is closed");
            }
            let frame = match tokio::time::timeout(timeout, answered).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(_)) => bail!("the connection broke before the broker answered"),
                Err(_) => {
                    broken.cancel();
                    bail!("no answer within {timeout:?}");
                }
            };
            decode_response(&frame, correlation_id, api, version)
        })
    }

    /// [`Self::send`], awaited.
    pub async fn call<Req: Encodable, Resp: Decodable + 'static>(
        &self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<Resp> {
        self.send(api, version, request).await
    }
}

/// A [`Pipelined`] connection's task: writes requests as they are queued, and hands each
/// response to the oldest request not yet answered.
async fn drive(
    stream: Stream,
    mut queued: mpsc::UnboundedReceiver<Outgoing>,
    broken: CancellationToken,
) {
    let (mut read, mut write) = stream.into_split();
    // The writer passes each request's response channel on before writing it, so the reader
    // always knows whose answer comes next.
    let (owed, mut owed_rx) = mpsc::unbounded_channel::<(i32, oneshot::Sender<Bytes>)>();
    let writer = async move {
        while let Some(out) = queued.recv().await {
            if owed.send((out.correlation_id, out.response)).is_err() {
                return;
            }
            if write.write_all(&out.frame).await.is_err() || write.flush().await.is_err() {
                return;
            }
        }
        // No handle is left: the reader finishes what is owed.
        drop(owed);
        std::future::pending::<()>().await;
    };
    let reader = async move {
        let frames = FrameReader::new(MAX_RESPONSE_BYTES);
        let mut buf = BytesMut::new();
        loop {
            // While nothing is owed, a read only notices the broker closing the connection.
            let (correlation_id, response) = tokio::select! {
                biased;
                owed = owed_rx.recv() => match owed {
                    Some(owed) => owed,
                    None => return,
                },
                read = read.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
            };
            let frame = loop {
                match frames.next_frame(&mut buf) {
                    Ok(Some(frame)) => break frame,
                    Ok(None) => {}
                    Err(_) => return,
                }
                match read.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            };
            if frame::response_correlation_id(&frame).ok() != Some(correlation_id) {
                return;
            }
            let _ = response.send(frame);
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
        () = broken.cancelled() => {}
    }
    broken.cancel();
}

/// Responses to keyward's own requests are metadata and produce acknowledgements: small.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

const METADATA_VERSION: i16 = 12;

/// keyward's own Metadata request for `topics` (`None`: every topic), to one of `addrs`.
async fn metadata(
    dialer: &Dialer,
    addrs: &[String],
    topics: Option<Vec<kafka_protocol::messages::metadata_request::MetadataRequestTopic>>,
) -> anyhow::Result<MetadataResponse> {
    let mut session = dialer.session_any(addrs, "keyward").await?;
    // Naming a topic must not create it (see `ClusterClient::refresh`).
    let request = MetadataRequest::default()
        .with_allow_auto_topic_creation(false)
        .with_topics(topics);
    session
        .call(ApiKey::Metadata, METADATA_VERSION, &request)
        .await
}

/// Asks one of `addrs` for the cluster's brokers: `(node id, host, port)`.
pub async fn fetch_brokers(
    dialer: &Dialer,
    addrs: &[String],
) -> anyhow::Result<Vec<(i32, String, i32)>> {
    let response = metadata(dialer, addrs, Some(Vec::new())).await?;
    Ok(response
        .brokers
        .iter()
        .map(|b| (b.node_id.0, b.host.to_string(), b.port))
        .collect())
}

/// Asks one of `addrs` for the partition count and id of every topic the cluster lets keyward
/// see: `(topic, partitions, id)`, topics the broker answers with an error left out.
pub async fn fetch_topics(
    dialer: &Dialer,
    addrs: &[String],
) -> anyhow::Result<Vec<(String, i32, uuid::Uuid)>> {
    // No topic list: every topic.
    let response = metadata(dialer, addrs, None).await?;
    Ok(response
        .topics
        .iter()
        .filter(|t| t.error_code == 0)
        .filter_map(|t| {
            let name = t.name.as_ref()?;
            Some((
                name.to_string(),
                i32::try_from(t.partitions.len()).ok()?,
                t.topic_id,
            ))
        })
        .collect())
}
