//! Length-prefixed Kafka frames and the few header fields keyward reads from every request.
//!
//! A frame is kept as the original bytes (length prefix included) so that a request or response
//! keyward does not need to change is forwarded without being copied or re-encoded. Nothing here
//! touches a socket: [`FrameReader`] is fed by the connection code.

use bytes::{Bytes, BytesMut};

use super::wire::{Reader, WireError};

/// Bytes of the length prefix in front of every Kafka request and response.
pub const LENGTH_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("negative frame length {0}")]
    NegativeLength(i32),
    #[error("request header: {0}")]
    Header(#[from] WireError),
}

/// The most a read buffer grows by ahead of the bytes that arrived.
const RESERVE_STEP: usize = 1024 * 1024;

/// Splits complete frames off a read buffer.
///
/// The buffer grows only to hold the frame being read, at most [`RESERVE_STEP`] ahead of the
/// bytes that arrived, and a frame larger than `max_frame_bytes` is refused before any of its
/// body is buffered.
#[derive(Debug)]
pub struct FrameReader {
    max_frame_bytes: usize,
}

impl FrameReader {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// Takes the next complete frame (prefix included) off `buf`, or says how many more bytes the
    /// buffer must hold before one is complete.
    pub fn next_frame(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(total) = self.frame_len(buf)? else {
            buf.reserve(LENGTH_PREFIX);
            return Ok(None);
        };
        if buf.len() < total {
            // Room for what is missing, up to a step: a peer that announces a large frame and
            // sends it slowly (or never) gets memory as its bytes arrive, not at its word.
            buf.reserve((total - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        Ok(Some(buf.split_to(total).freeze()))
    }

    /// The length (prefix included) of the frame `buf` starts with, once its prefix is there;
    /// an error for a length no frame may have.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(prefix.try_into().expect("four bytes"));
        if len < 0 {
            return Err(FrameError::NegativeLength(len));
        }
        let len = len as usize;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                size: len,
                limit: self.max_frame_bytes,
            });
        }
        Ok(Some(LENGTH_PREFIX + len))
    }
}

/// The request header fields every request is routed by, read without decoding the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

impl RequestHead {
    /// Reads api key, version and correlation id from a frame (prefix included). These three sit
    /// at the same offsets in every request header version.
    pub fn parse(frame: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(frame.get(LENGTH_PREFIX..).unwrap_or_default());
        Ok(Self {
            api_key: r.i16()?,
            api_version: r.i16()?,
            correlation_id: r.i32()?,
        })
    }
}

/// Length in bytes of a request header (after the length prefix) of the given header version:
/// v1 carries a nullable client id, v2 adds tagged fields.
pub fn request_header_len(frame: &[u8], header_version: i16) -> Result<usize, WireError> {
    let body = frame.get(LENGTH_PREFIX..).unwrap_or_default();
    let mut r = Reader::new(body);
    r.skip(8)?;
    if header_version >= 1 {
        r.nullable_string()?;
    }
    if header_version >= 2 {
        r.skip_tagged_fields()?;
    }
    Ok(r.position())
}

/// Length of a response header (after the length prefix): v0 is the correlation id, v1 adds
/// tagged fields.
pub fn response_header_len(frame: &[u8], header_version: i16) -> Result<usize, WireError> {
    let mut r = Reader::new(frame.get(LENGTH_PREFIX..).unwrap_or_default());
    r.skip(4)?;
    if header_version >= 1 {
        r.skip_tagged_fields()?;
    }
    Ok(r.position())
}

/// The correlation id of a response frame.
pub fn response_correlation_id(frame: &[u8]) -> Result<i32, WireError> {
    Reader::new(frame.get(LENGTH_PREFIX..).unwrap_or_default()).i32()
}

/// Builds a frame from a header (as original bytes) and a freshly encoded body.
pub fn assemble(header: &[u8], body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(LENGTH_PREFIX + header.len() + body.len());
    out.extend_from_slice(&((header.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as i32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let reader = FrameReader::new(1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b"abc"));
        buf.extend_from_slice(&frame(b"defg")[..5]);
        assert_eq!(
            reader.next_frame(&mut buf).unwrap().as_deref(),
            Some(&frame(b"abc")[..])
        );
        assert_eq!(reader.next_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"efg");
        assert_eq!(
            reader.next_frame(&mut buf).unwrap().as_deref(),
            Some(&frame(b"defg")[..])
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_and_negative_lengths_before_buffering() {
        let reader = FrameReader::new(10);
        let mut buf = BytesMut::from(&11i32.to_be_bytes()[..]);
        assert_eq!(
            reader.next_frame(&mut buf),
            Err(FrameError::TooLarge {
                size: 11,
                limit: 10
            })
        );
        let mut buf = BytesMut::from(&(-1i32).to_be_bytes()[..]);
        assert_eq!(
            reader.next_frame(&mut buf),
            Err(FrameError::NegativeLength(-1))
        );
    }

    #[test]
    fn memory_follows_the_bytes_that_arrived_not_the_announced_length() {
        let reader = FrameReader::new(100 * 1024 * 1024);
        let mut buf = BytesMut::from(&(90 * 1024 * 1024i32).to_be_bytes()[..]);
        assert_eq!(reader.next_frame(&mut buf), Ok(None));
        assert!(buf.capacity() <= 2 * RESERVE_STEP, "{}", buf.capacity());
    }

    #[test]
    fn reads_request_head_and_header_lengths() {
        // api key 0, version 9, correlation 7, client id "ab", no tagged fields
        let body = [0, 0, 0, 9, 0, 0, 0, 7, 0, 2, b'a', b'b', 0, 0xff];
        let f = frame(&body);
        let head = RequestHead::parse(&f).unwrap();
        assert_eq!(
            head,
            RequestHead {
                api_key: 0,
                api_version: 9,
                correlation_id: 7
            }
        );
        assert_eq!(request_header_len(&f, 1).unwrap(), 12);
        assert_eq!(request_header_len(&f, 2).unwrap(), 13);
        assert!(RequestHead::parse(&frame(&[0, 0, 0])).is_err());
    }
}
