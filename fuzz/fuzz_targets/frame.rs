//! The frame codec and the request/response header readers, on arbitrary bytes arriving in
//! arbitrary chunks, as a client or a broker could send them.
//!
//! Input layout: byte 0 seeds the chunk sizes, bytes 1-2 are `max_frame_bytes` (big-endian,
//! so small limits are reachable), the rest is the byte stream. Checks that feeding the stream
//! in chunks yields exactly the frames (and the error) of feeding it at once, that frames are
//! the stream's own bytes in order with a truthful length prefix, and that no header reader
//! claims more bytes than the frame holds.
#![no_main]

use bytes::{Bytes, BytesMut};
use keyward::codec::frame::{
    FrameError, FrameReader, LENGTH_PREFIX, RequestHead, request_header_len,
    response_correlation_id, response_header_len,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[seed, m0, m1], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = usize::from(u16::from_be_bytes([m0, m1]));
    let reader = FrameReader::new(max);

    let (whole, whole_err) = read_all(&reader, stream, || stream.len().max(1));
    let mut state = u32::from(seed) | 0x100;
    let (chunked, chunked_err) = read_all(&reader, stream, || {
        // xorshift: a reproducible sequence of chunk sizes from 1 to 64 bytes.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 64) as usize + 1
    });
    assert_eq!(whole, chunked, "chunking changed the frames");
    assert_eq!(whole_err, chunked_err, "chunking changed the error");

    let mut offset = 0;
    for frame in &whole {
        assert_eq!(&stream[offset..offset + frame.len()], &frame[..]);
        offset += frame.len();
        let declared = i32::from_be_bytes(frame[..LENGTH_PREFIX].try_into().unwrap());
        assert_eq!(declared as usize + LENGTH_PREFIX, frame.len());
        assert!(frame.len() <= max + LENGTH_PREFIX, "a frame over the limit");
        check_headers(frame);
    }
    // The readers must also cope with what is not a whole frame.
    check_headers(stream);
});

/// Feeds `stream` to `reader` in chunks of `next_chunk()` bytes, taking every frame as soon as it
/// is complete, until the stream ends or the reader refuses it.
fn read_all(
    reader: &FrameReader,
    stream: &[u8],
    mut next_chunk: impl FnMut() -> usize,
) -> (Vec<Bytes>, Option<FrameError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    loop {
        match reader.next_frame(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) if fed == stream.len() => return (frames, None),
            Ok(None) => {
                let n = next_chunk().min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(e) => return (frames, Some(e)),
        }
    }
}

fn check_headers(frame: &[u8]) {
    let body_len = frame.len().saturating_sub(LENGTH_PREFIX);
    if let Ok(head) = RequestHead::parse(frame) {
        assert!(body_len >= 8);
        assert_eq!(
            response_correlation_id(&frame[4..]).ok(),
            Some(head.correlation_id)
        );
    }
    for version in 0..=2 {
        if let Ok(len) = request_header_len(frame, version) {
            assert!(
                len <= body_len,
                "request header v{version}: {len} > {body_len}"
            );
            assert!(len >= 8);
        }
    }
    for version in 0..=1 {
        if let Ok(len) = response_header_len(frame, version) {
            assert!(
                len <= body_len,
                "response header v{version}: {len} > {body_len}"
            );
            assert!(len >= 4);
        }
    }
    let _ = response_correlation_id(frame);
}
