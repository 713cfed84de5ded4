//! The record-batch inspector on arbitrary bytes: batch framing, CRC, decompression and every
//! record's lengths, varints and headers.
//!
//! The whole input is one partition's `records` field. Separately, byte 0 picks a codec and the
//! rest is inflated with it directly, so the decompressors see hostile streams without the
//! fuzzer first having to build a batch around them. Checks that record views stay inside the
//! data they borrow, that the walk sees exactly the declared record count, and that the inflater
//! never holds more than its cap.
#![no_main]

use std::ops::ControlFlow;

use keyward::codec::records::{BATCH_HEADER_LEN, Compression, Inflater, batches};
use libfuzzer_sys::fuzz_target;

const MAX_DECOMPRESSED: usize = 1 << 20;
const CODECS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

fuzz_target!(|data: &[u8]| {
    let mut inflater = Inflater::new(MAX_DECOMPRESSED);

    let mut iter = batches(data);
    let mut consumed = 0;
    for batch in iter.by_ref() {
        let Ok(batch) = batch else { break };
        assert!(batch.raw().len() >= BATCH_HEADER_LEN);
        assert_eq!(batch.raw(), &data[consumed..consumed + batch.raw().len()]);
        consumed += batch.raw().len();
        let _ = batch.verify_crc();
        let _ = batch.header.is_transactional();
        let _ = batch.header.is_control();

        let mut seen = 0usize;
        let walked = batch.for_each_record(&mut inflater, |index, record| {
            assert_eq!(index, seen);
            seen += 1;
            let mut bytes =
                record.key().map_or(0, <[u8]>::len) + record.value().map_or(0, <[u8]>::len);
            let mut headers = 0;
            for (name, value) in record.headers() {
                headers += 1;
                bytes += name.len() + value.map_or(0, <[u8]>::len);
            }
            assert_eq!(headers, record.header_count());
            assert!(bytes <= MAX_DECOMPRESSED.max(data.len()));
            if let Some(first) = record.headers().next() {
                assert!(record.header(first.0).is_some());
            }
            let _ = record.header(b"tenant");
            let _ = (
                record.attributes(),
                record.offset_delta(),
                record.timestamp_delta(),
            );
            ControlFlow::Continue(())
        });
        if walked.is_ok() {
            assert_eq!(seen, batch.header.records_count as usize, "declared count");
            assert!(
                batch.validate(&mut inflater).is_ok(),
                "validate disagrees with the walk"
            );
        }
        // Stopping early must be fine too, whatever comes after.
        let _ = batch.for_each_record(&mut inflater, |_, _| ControlFlow::Break(()));
        assert!(inflater.buffer_bytes() <= MAX_DECOMPRESSED + 1);
    }
    assert_eq!(iter.remaining(), &data[consumed..]);

    if let Some((&codec, stream)) = data.split_first() {
        let codec = CODECS[usize::from(codec) % CODECS.len()];
        if let Ok(out) = inflater.decompress(codec, stream) {
            assert!(out.len() <= MAX_DECOMPRESSED);
        }
        assert!(inflater.buffer_bytes() <= MAX_DECOMPRESSED + 1);
    }
});
