//! What every response rewrite shares: decoding a response body, letting a handler edit it and
//! re-encoding it behind the broker's own header ([`recode`]), the [`Advertise`] side that says
//! which address and node id clients must see for a broker, and [`RewriteError`].
//!
//! Which responses are rewritten, and how, is each API's handler's business
//! (`super::handlers`): Metadata, FindCoordinator, DescribeCluster, and the KIP-951 node
//! endpoints of Produce and Fetch responses have their addresses rewritten, so that after
//! bootstrap no client is ever told a real broker address; ApiVersions is intersected with what
//! keyward handles (see [`super::versions`]). Responses keyward does not need to change leave as
//! the bytes the broker sent.

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::brokers::UnmappableNode;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot decode {api:?} v{version} response: {source}")]
    Decode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("cannot encode {api:?} v{version} response: {source}")]
    Encode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error(transparent)]
    Unmappable(#[from] UnmappableNode),
    /// In a region view (`super::view`), a response names a topic the view has no name for,
    /// where only topics the request named can be.
    #[error("{api:?} response names topic {topic:?}, which has no name in the region view")]
    UnmappedTopic { api: ApiKey, topic: String },
    #[error("malformed response header: {0}")]
    Header(#[from] WireError),
}

/// Where clients must be sent instead of a real broker, and the node ids they must see.
pub trait Advertise {
    /// Learns node `node_id`'s real address and returns the virtual node id, host and port
    /// clients use for it.
    fn advertise(
        &self,
        node_id: i32,
        real_host: &str,
        real_port: i32,
    ) -> Result<(i32, StrBytes, i32), UnmappableNode>;
    /// The virtual id of a node named without an address (a leader, a replica); -1 stays -1.
    fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode>;
    /// Whether virtual node ids differ from real ones for this cluster (reads failed over to a
    /// cluster other than the local one), so every node id in a response must be mapped.
    fn renumbers(&self) -> bool;
}

/// keyward's own answer to a request of `api` at `version`: `body` behind a response header
/// carrying the request's `correlation_id`, as the broker would frame it.
pub fn answer<T: Encodable>(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &T,
) -> anyhow::Result<Bytes> {
    let mut header = Vec::new();
    kafka_protocol::messages::ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut header, api.response_header_version(version))?;
    let mut encoded = Vec::new();
    body.encode(&mut encoded, version)?;
    Ok(frame::assemble(&header, &encoded))
}

/// Decodes a request body.
pub fn decode_request<T: Decodable>(frame: &Bytes, api: ApiKey, version: i16) -> anyhow::Result<T> {
    let header_len = frame::request_header_len(frame, api.request_header_version(version))?;
    T::decode(&mut frame.slice(LENGTH_PREFIX + header_len..), version)
}

/// Decodes a response body.
pub fn decode<T: Decodable>(frame: &Bytes, api: ApiKey, version: i16) -> Result<T, RewriteError> {
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    let mut body = frame.slice(LENGTH_PREFIX + header_len..);
    T::decode(&mut body, version).map_err(|source| RewriteError::Decode {
        api,
        version,
        source,
    })
}

/// Decodes a response body, lets `edit` change it, and re-encodes it behind the original header.
pub fn recode<T, F>(
    frame: &Bytes,
    api: ApiKey,
    version: i16,
    edit: F,
) -> Result<Bytes, RewriteError>
where
    T: Decodable + Encodable,
    F: FnOnce(&mut T) -> Result<(), RewriteError>,
{
    recode_as(frame, api, version, version, edit)
}

/// As [`recode`], with the body at `body_version` (ApiVersions answers an unsupported version
/// with a v0 body).
pub fn recode_as<T, F>(
    frame: &Bytes,
    api: ApiKey,
    version: i16,
    body_version: i16,
    edit: F,
) -> Result<Bytes, RewriteError>
where
    T: Decodable + Encodable,
    F: FnOnce(&mut T) -> Result<(), RewriteError>,
{
    let header_len = frame::response_header_len(frame, api.response_header_version(version))?;
    recode_behind(frame, header_len, body_version, edit).map_err(|e| match e {
        Recoded::Decode(source) => RewriteError::Decode {
            api,
            version: body_version,
            source,
        },
        Recoded::Edit(e) => e,
        Recoded::Encode(source) => RewriteError::Encode {
            api,
            version: body_version,
            source,
        },
    })
}

/// Which step of [`recode_behind`] failed.
pub(crate) enum Recoded<E> {
    Decode(anyhow::Error),
    Edit(E),
    Encode(anyhow::Error),
}

/// Decodes the message after the frame's `header_len` bytes of header (a request's or a
/// response's), lets `edit` change it, and re-encodes it behind the same header bytes: what
/// response rewrites and the region view's request rewrites (`super::view`) share.
pub(crate) fn recode_behind<T, E>(
    frame: &Bytes,
    header_len: usize,
    version: i16,
    edit: impl FnOnce(&mut T) -> Result<(), E>,
) -> Result<Bytes, Recoded<E>>
where
    T: Decodable + Encodable,
{
    let header = &frame[LENGTH_PREFIX..LENGTH_PREFIX + header_len];
    let mut body = frame.slice(LENGTH_PREFIX + header_len..);
    let mut message = T::decode(&mut body, version).map_err(Recoded::Decode)?;
    edit(&mut message).map_err(Recoded::Edit)?;
    let mut encoded = Vec::with_capacity(frame.len());
    message
        .encode(&mut encoded, version)
        .map_err(Recoded::Encode)?;
    Ok(frame::assemble(header, &encoded))
}

/// What the handlers' tests share: advertisers and response frames.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub struct To;
    impl Advertise for To {
        fn advertise(
            &self,
            node_id: i32,
            _: &str,
            _: i32,
        ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
            Ok((node_id, StrBytes::from_static_str("proxy"), 9000 + node_id))
        }
        fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
            Ok(node_id)
        }
        fn renumbers(&self) -> bool {
            false
        }
    }

    /// Reads failed over to a cluster whose node ids are offset by 100.
    pub struct Renumbered;
    impl Advertise for Renumbered {
        fn advertise(
            &self,
            node_id: i32,
            _: &str,
            _: i32,
        ) -> Result<(i32, StrBytes, i32), UnmappableNode> {
            Ok((
                100 + node_id,
                StrBytes::from_static_str("proxy"),
                9100 + node_id,
            ))
        }
        fn node_id(&self, node_id: i32) -> Result<i32, UnmappableNode> {
            Ok(if node_id < 0 { node_id } else { 100 + node_id })
        }
        fn renumbers(&self) -> bool {
            true
        }
    }

    pub fn response_frame<T: Encodable>(api: ApiKey, version: i16, body: &T) -> Bytes {
        let mut header = 7i32.to_be_bytes().to_vec();
        if api.response_header_version(version) >= 1 {
            header.push(0);
        }
        let mut encoded = Vec::new();
        body.encode(&mut encoded, version).unwrap();
        frame::assemble(&header, &encoded)
    }

    pub fn decode_body<T: Decodable>(out: &Bytes, api: ApiKey, version: i16) -> T {
        let hl = frame::response_header_len(out, api.response_header_version(version)).unwrap();
        let mut body = out.slice(4 + hl..);
        T::decode(&mut body, version).unwrap()
    }
}
