//! keyward's connections to brokers. A [`Dialer`] knows how to reach one cluster: TCP with a
//! timeout, then TLS when the cluster is configured for it, verifying the broker's certificate
//! and host name. Connections that carry a client's traffic stop there (the client runs its own
//! SASL exchange through keyward); keyward's own connections (probes, redirected writes) also
//! authenticate with keyward's credentials and become a [`Session`], on which keyward sends
//! requests of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::BytesMut;
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, RequestHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, TlsStream};

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
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str(self.client_id)));
        let mut out = BytesMut::with_capacity(256);
        out.extend_from_slice(&[0; 4]);
        header.encode(&mut out, api.request_header_version(version))?;
        request.encode(&mut out, version)?;
        let len = i32::try_from(out.len() - 4).context("request too large")?;
        out[..4].copy_from_slice(&len.to_be_bytes());

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
        if frame::response_correlation_id(&frame)? != self.correlation_id {
            bail!("the broker answered another request");
        }
        let header_len = frame::response_header_len(&frame, api.response_header_version(version))?;
        let mut body = frame.slice(frame::LENGTH_PREFIX + header_len..);
        Resp::decode(&mut body, version)
    }
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
    let request = MetadataRequest::default().with_topics(topics);
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

/// Asks one of `addrs` for the partition count of every topic the cluster lets keyward see:
/// `(topic, partitions)`, topics the broker answers with an error left out.
pub async fn fetch_partition_counts(
    dialer: &Dialer,
    addrs: &[String],
) -> anyhow::Result<Vec<(String, i32)>> {
    // No topic list: every topic.
    let response = metadata(dialer, addrs, None).await?;
    Ok(response
        .topics
        .iter()
        .filter(|t| t.error_code == 0)
        .filter_map(|t| {
            let name = t.name.as_ref()?;
            Some((name.to_string(), i32::try_from(t.partitions.len()).ok()?))
        })
        .collect())
}
