//! Record batches for unit tests, written by kafka-protocol's encoder: an implementation
//! independent of keyward's own inspector.

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

/// A record of a plain (non-transactional, non-idempotent) producer; set the fields a test
/// cares about with struct update syntax.
pub fn record(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        // The encoder starts a new batch wherever offset - sequence changes: number both.
        sequence: 0,
        timestamp: 1_700_000_000_000,
        key: key.map(Bytes::copy_from_slice),
        value: value.map(Bytes::copy_from_slice),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    StrBytes::from_string((*n).to_owned()),
                    v.map(Bytes::copy_from_slice),
                )
            })
            .collect(),
    }
}

/// One v2 batch of `records`. Offsets and sequences are numbered from the first record's, so
/// the encoder keeps them in one batch.
pub fn batch(records: &[Record], compression: Compression) -> Bytes {
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            offset: r.offset + i as i64,
            sequence: if r.sequence < 0 {
                r.sequence
            } else {
                r.sequence + i as i32
            },
            ..r.clone()
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .expect("kafka-protocol encodes");
    buf.freeze()
}
