//! keyward's own connections to brokers: connecting with a timeout, and the one request keyward
//! sends on its own behalf today, a Metadata request that lists the cluster's brokers.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, RequestHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::frame::{self, FrameReader};

/// Connects to the first reachable address of `addrs`, each with `timeout`.
pub async fn connect_any(addrs: &[String], timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match connect(addr, timeout).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no broker address to connect to")))
}

pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out after {timeout:?}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

const METADATA_VERSION: i16 = 12;

/// Asks one of `addrs` for the cluster's brokers: `(node id, host, port)`.
pub async fn fetch_brokers(
    addrs: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<(i32, String, i32)>> {
    let mut stream = connect_any(addrs, timeout).await?;
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(METADATA_VERSION)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("keyward")));
    let request = MetadataRequest::default().with_topics(Some(Vec::new()));
    let mut body = Vec::new();
    header.encode(
        &mut body,
        ApiKey::Metadata.request_header_version(METADATA_VERSION),
    )?;
    request.encode(&mut body, METADATA_VERSION)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(&body);

    let exchange = async {
        stream.write_all(&out).await?;
        let reader = FrameReader::new(64 * 1024 * 1024);
        let mut buf = BytesMut::new();
        loop {
            if let Some(frame) = reader.next_frame(&mut buf)? {
                return anyhow::Ok(frame);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    };
    let frame: Bytes = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("metadata request timed out after {timeout:?}"))??;
    let header_len = frame::response_header_len(
        &frame,
        ApiKey::Metadata.response_header_version(METADATA_VERSION),
    )?;
    let mut body = frame.slice(frame::LENGTH_PREFIX + header_len..);
    let response = MetadataResponse::decode(&mut body, METADATA_VERSION)?;
    Ok(response
        .brokers
        .iter()
        .map(|b| (b.node_id.0, b.host.to_string(), b.port))
        .collect())
}
