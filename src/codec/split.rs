//! Splitting one record batch by owner: each record is given a part (a region, say) by the
//! caller, and each part that got records becomes a new, complete v2 batch holding only those
//! records, in their original order.
//!
//! Owns the re-encoding: fresh offset deltas, timestamp deltas against the part's first record,
//! the header (counts, timestamps, base sequence) and CRC of each new batch, and compression with
//! the client's codec ([`super::compression::compress`]). It must not decide owners (the
//! caller's `owner_of` does, from `policy`) nor number sequences for a destination (the caller
//! renumbers each part, e.g. with [`super::records::renumbered`]).
//!
//! A batch whose records all go to one part is reported as such without building anything: the
//! caller forwards the client's bytes. That path does not allocate (after the inflater's buffers
//! are warm, as for inspection).

use std::ops::{ControlFlow, Range};

use bytes::Bytes;

use super::compression::{self, CompressError, Reservation};
use super::records::{
    ATTRIBUTES_OFFSET, BATCH_HEADER_LEN, Batch, BatchHeader, CRC_OFFSET, Compression, Inflater,
    LOG_OVERHEAD, MAGIC_V2, RecordView, RecordsError, walk_records,
};

/// Attributes bit 3: the broker sets every record's timestamp to the append time, and the
/// batch's `maxTimestamp` is that time, whatever the records carry.
const LOG_APPEND_TIME_FLAG: i16 = 1 << 3;

/// The smallest encoded record: length, attributes, both deltas, null key, null value and
/// header count, one byte each.
const MIN_RECORD_LEN: usize = 7;

/// What [`split`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// Every record belongs to `part`: forward the client's batch unchanged. Nothing was built.
    Whole { part: usize },
    /// Records belong to several parts: one new batch per part that got any, in ascending
    /// `part` order (at least two).
    Parts(Vec<Part>),
}

/// One part of a split batch: a complete v2 record batch and where its records came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The index `owner_of` gave this part's records.
    pub part: usize,
    /// The new batch: the client's base offset, partition leader epoch, attributes (codec,
    /// timestamp type), producer id and epoch; offset deltas `0..records`; `baseTimestamp` the
    /// first record's timestamp and `maxTimestamp` the largest (the client's own for a
    /// LogAppendTime batch); a valid CRC-32C; compressed with the client's codec.
    ///
    /// Its `baseSequence` is the sequence the client gave this part's first record (the client's
    /// `baseSequence` plus [`Part::first_index`], wrapping as Kafka does; -1 stays -1). The
    /// part's later records do not carry their client sequences (a batch's are consecutive), so
    /// a caller sending it under a producer id renumbers it for that destination
    /// ([`super::records::renumbered`]).
    pub batch: Bytes,
    /// How many records the part holds.
    pub records: usize,
    /// The records' indices in the client's batch, as ascending, non-adjacent runs. Together,
    /// the parts' runs cover `0..records_count` exactly once. A retry of the same client batch
    /// (same producer, epoch and base sequence) with the same owners splits into the same runs.
    pub runs: Vec<Range<usize>>,
}

impl Part {
    /// Index in the client's batch of this part's first record.
    pub fn first_index(&self) -> usize {
        self.runs.first().map_or(0, |run| run.start)
    }

    /// The `baseSequence` written into [`Part::batch`].
    pub fn base_sequence(&self) -> i32 {
        self.batch
            .first_chunk::<BATCH_HEADER_LEN>()
            .and_then(|header| BatchHeader::parse(header).ok())
            .map_or(-1, |header| header.base_sequence)
    }
}

/// Why a batch was not split. Only [`RecordsError::MemoryBudgetExhausted`] and
/// [`SplitError::Compress`] are "not now" ([`SplitError::is_retriable`]); the rest mean the
/// batch cannot be split, ever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// Its records commit or abort together, in one transaction on one cluster.
    #[error("a transactional batch cannot be split: its records commit together on one cluster")]
    Transactional,
    #[error("a control batch cannot be split")]
    Control,
    /// No record, so no owner; the broker refuses such a batch too.
    #[error("a batch with no records cannot be split")]
    Empty,
    /// A bug in the caller's `owner_of`.
    #[error("owner_of gave part {part}, but there are {parts} parts")]
    PartOutOfRange { part: usize, parts: usize },
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error(transparent)]
    Compress(#[from] CompressError),
}

impl SplitError {
    /// Whether the same batch may split later (memory in use elsewhere, a compressor failing).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Self::Records(RecordsError::MemoryBudgetExhausted { .. }) | Self::Compress(_)
        )
    }
}

/// Splits the one v2 batch in `batch` (no bytes after it) by `owner_of(index, record)`, which
/// must return a part below `parts` for every record, and is called once per record, in order.
///
/// Every record is validated as [`Batch::for_each_record`] does, and a compressed batch is
/// inflated with `inflater` (its cap and budget apply). Transactional and control batches are
/// refused ([`SplitError::Transactional`], [`SplitError::Control`]) before any record is read.
///
/// Memory: while the parts are built, the owner of each record (4 bytes), one part's records
/// before compression and each part's output are taken from `inflater`'s budget; the returned
/// parts are the caller's, and together hold about the client's batch once, re-compressed.
pub fn split<F>(
    batch: &[u8],
    inflater: &mut Inflater,
    parts: usize,
    owner_of: F,
) -> Result<Split, SplitError>
where
    F: FnMut(usize, &RecordView<'_>) -> usize,
{
    let (batch, rest) = Batch::parse(batch)?;
    if !rest.is_empty() {
        return Err(RecordsError::TrailingBytes {
            what: "batch",
            count: rest.len(),
        }
        .into());
    }
    let header = batch.header;
    if header.is_control() {
        return Err(SplitError::Control);
    }
    if header.is_transactional() {
        return Err(SplitError::Transactional);
    }
    if header.records_count == 0 {
        return Err(SplitError::Empty);
    }
    let mut reservation = inflater.reservation();
    let result = match inflater.decompress(batch.compression(), batch.records_data()) {
        Ok(records) => split_records(&header, records, parts, owner_of, &mut reservation),
        Err(e) => Err(e.into()),
    };
    drop(reservation);
    // As after inspection: a large batch's buffers are not kept as the connection's high-water
    // mark.
    inflater.trim();
    result
}

/// One part while it is planned: what its header and output need.
struct Plan {
    part: u32,
    records: usize,
    runs: Vec<Range<usize>>,
    first_timestamp: i64,
    max_timestamp: i64,
    /// Length of its records section before compression.
    encoded_len: usize,
}

fn split_records<F>(
    header: &BatchHeader,
    data: &[u8],
    parts: usize,
    mut owner_of: F,
    reservation: &mut Reservation,
) -> Result<Split, SplitError>
where
    F: FnMut(usize, &RecordView<'_>) -> usize,
{
    let declared = header.records_count;
    // The first record's part; then, only once a record goes elsewhere, every record's part.
    let mut first = None;
    let mut owners: Vec<u32> = Vec::new();
    let mut failed = None;
    walk_records(data, declared, None, |index, record| {
        let part = owner_of(index, &record);
        let Some(id) = u32::try_from(part).ok().filter(|_| part < parts) else {
            failed = Some(SplitError::PartOutOfRange { part, parts });
            return ControlFlow::Break(());
        };
        match first {
            None => first = Some(id),
            Some(f) if owners.is_empty() && id == f => {}
            Some(f) => {
                if owners.is_empty() {
                    // The first record of another part: from here on, remember every owner.
                    // The declared count is not trusted for the allocation: the data bounds it.
                    let count = (declared as usize).min(data.len() / MIN_RECORD_LEN);
                    if let Err(e) = reservation.take(count.saturating_mul(size_of::<u32>())) {
                        failed = Some(e.into());
                        return ControlFlow::Break(());
                    }
                    owners.reserve_exact(count);
                    owners.resize(index, f);
                }
                owners.push(id);
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let Some(first) = first else {
        return Err(SplitError::Empty);
    };
    if owners.is_empty() {
        return Ok(Split::Whole {
            part: first as usize,
        });
    }
    if owners.len() != declared as usize {
        // The walk saw every record (it did not stop early), so this cannot happen.
        return Err(RecordsError::RecordCountMismatch {
            declared,
            found: owners.len(),
        }
        .into());
    }

    let plans = plan(header, data, &owners)?;
    let codec = header.compression();
    let mut scratch = Vec::new();
    let mut out = Vec::with_capacity(plans.len());
    for plan in plans {
        let records_len = if codec == Compression::None {
            plan.encoded_len
        } else {
            compression::compress_bound(codec, plan.encoded_len)
        };
        let capacity = BATCH_HEADER_LEN.saturating_add(records_len);
        reservation.take(capacity)?;
        let mut batch = Vec::with_capacity(capacity);
        batch.resize(BATCH_HEADER_LEN, 0);
        if codec == Compression::None {
            encode_part(header, data, &owners, &plan, &mut batch)?;
        } else {
            scratch.clear();
            if scratch.capacity() < plan.encoded_len {
                reservation.take(plan.encoded_len - scratch.capacity())?;
                scratch.reserve_exact(plan.encoded_len);
            }
            encode_part(header, data, &owners, &plan, &mut scratch)?;
            compression::compress(codec, &scratch, &mut batch)?;
        }
        write_header(header, &plan, &mut batch)?;
        out.push(Part {
            part: plan.part as usize,
            batch: Bytes::from(batch),
            records: plan.records,
            runs: plan.runs,
        });
    }
    Ok(Split::Parts(out))
}

/// Each part's records, runs, timestamps and encoded length, in ascending part order.
fn plan(header: &BatchHeader, data: &[u8], owners: &[u32]) -> Result<Vec<Plan>, SplitError> {
    let mut plans: Vec<Plan> = Vec::new();
    let mut too_long = None;
    walk_records(data, header.records_count, None, |index, record| {
        let Some(&part) = owners.get(index) else {
            return ControlFlow::Break(());
        };
        let timestamp = header.base_timestamp.wrapping_add(record.timestamp_delta());
        let plan = match plans.iter().position(|p| p.part == part) {
            Some(at) => &mut plans[at],
            None => {
                plans.push(Plan {
                    part,
                    records: 0,
                    runs: Vec::new(),
                    first_timestamp: timestamp,
                    max_timestamp: timestamp,
                    encoded_len: 0,
                });
                let last = plans.len() - 1;
                &mut plans[last]
            }
        };
        let timestamp_delta = timestamp.wrapping_sub(plan.first_timestamp);
        let body = body_len(&record, timestamp_delta, plan.records);
        if i32::try_from(body).is_err() {
            // Only a record of nearly 2 GiB: its new length would not fit its varint.
            too_long = Some(body);
            return ControlFlow::Break(());
        }
        plan.encoded_len += varint_len(body as i32) + body;
        plan.records += 1;
        plan.max_timestamp = plan.max_timestamp.max(timestamp);
        match plan.runs.last_mut() {
            Some(run) if run.end == index => run.end += 1,
            _ => plan.runs.push(index..index + 1),
        }
        ControlFlow::Continue(())
    })?;
    if let Some(len) = too_long {
        return Err(RecordsError::BadLength {
            what: "split record",
            len: i64::try_from(len).unwrap_or(i64::MAX),
        }
        .into());
    }
    plans.sort_unstable_by_key(|p| p.part);
    Ok(plans)
}

/// Appends `plan`'s records, re-encoded, to `out`.
fn encode_part(
    header: &BatchHeader,
    data: &[u8],
    owners: &[u32],
    plan: &Plan,
    out: &mut Vec<u8>,
) -> Result<(), SplitError> {
    let mut written = 0usize;
    walk_records(data, header.records_count, None, |index, record| {
        if owners.get(index) == Some(&plan.part) {
            let timestamp = header.base_timestamp.wrapping_add(record.timestamp_delta());
            encode_record(
                &record,
                timestamp.wrapping_sub(plan.first_timestamp),
                written,
                out,
            );
            written += 1;
        }
        ControlFlow::Continue(())
    })?;
    Ok(())
}

/// Length of a record's body: attributes, the two deltas, then key, value and headers as they
/// were.
fn body_len(record: &RecordView<'_>, timestamp_delta: i64, offset_delta: usize) -> usize {
    1 + varlong_len(timestamp_delta) + varint_len(offset_delta as i32) + record.tail().len()
}

fn encode_record(
    record: &RecordView<'_>,
    timestamp_delta: i64,
    offset_delta: usize,
    out: &mut Vec<u8>,
) {
    // The body's length fits an i32 (checked by `plan`), and an offset delta is below the
    // record count, an i32: both casts are exact.
    put_varint(body_len(record, timestamp_delta, offset_delta) as i32, out);
    out.push(record.attributes() as u8);
    put_varlong(timestamp_delta, out);
    put_varint(offset_delta as i32, out);
    out.extend_from_slice(record.tail());
}

/// Fills the 61-byte header at the front of `batch` (its records already follow) and its CRC.
fn write_header(client: &BatchHeader, plan: &Plan, batch: &mut [u8]) -> Result<(), RecordsError> {
    let bad = |what, len: usize| RecordsError::BadLength {
        what,
        len: i64::try_from(len).unwrap_or(i64::MAX),
    };
    let batch_length =
        i32::try_from(batch.len() - LOG_OVERHEAD).map_err(|_| bad("split batch", batch.len()))?;
    let records = i32::try_from(plan.records).map_err(|_| bad("record count", plan.records))?;
    let max_timestamp = if client.attributes & LOG_APPEND_TIME_FLAG != 0 {
        client.max_timestamp
    } else {
        plan.max_timestamp
    };
    let first_index = plan.runs.first().map_or(0, |run| run.start);
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        batch[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&client.base_offset.to_be_bytes());
    put(&batch_length.to_be_bytes());
    put(&client.partition_leader_epoch.to_be_bytes());
    put(&MAGIC_V2.to_be_bytes());
    put(&[0; 4]); // CRC, below
    put(&client.attributes.to_be_bytes());
    put(&(records - 1).to_be_bytes());
    put(&plan.first_timestamp.to_be_bytes());
    put(&max_timestamp.to_be_bytes());
    put(&client.producer_id.to_be_bytes());
    put(&client.producer_epoch.to_be_bytes());
    put(&sequence_at(client.base_sequence, first_index).to_be_bytes());
    put(&records.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The sequence of the record `index` places after one with sequence `base`: sequences wrap from
/// `i32::MAX` to 0 (Kafka's `DefaultRecordBatch.incrementSequence`). A batch without sequences
/// (-1, or any negative) keeps its base.
fn sequence_at(base: i32, index: usize) -> i32 {
    if base < 0 {
        return base;
    }
    let modulus = i64::from(i32::MAX) + 1;
    let index = (index as u64 % modulus as u64) as i64;
    ((i64::from(base) + index) % modulus) as i32
}

fn varint_len(value: i32) -> usize {
    unsigned_len(u64::from(((value << 1) ^ (value >> 31)) as u32))
}

fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

fn put_varint(value: i32, out: &mut Vec<u8>) {
    put_unsigned(u64::from(((value << 1) ^ (value >> 31)) as u32), out);
}

fn put_varlong(value: i64, out: &mut Vec<u8>) {
    put_unsigned(((value << 1) ^ (value >> 63)) as u64, out);
}

fn put_unsigned(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::BytesMut;
    use kafka_protocol::records as kp;

    use crate::codec::records::DecompressionBudget;
    use crate::testkit;

    const MB: usize = 1024 * 1024;
    const PRODUCER_ID: i64 = 4242;
    const EPOCH: i16 = 7;
    const BASE_SEQUENCE: i32 = 100;
    const T0: i64 = 1_700_000_000_000;

    const ALL_CODECS: [(Compression, kp::Compression); 5] = [
        (Compression::None, kp::Compression::None),
        (Compression::Gzip, kp::Compression::Gzip),
        (Compression::Snappy, kp::Compression::Snappy),
        (Compression::Lz4, kp::Compression::Lz4),
        (Compression::Zstd, kp::Compression::Zstd),
    ];

    /// Record `i` of an idempotent producer: key `us-i` or `eu-i` as `us(i)` says, a value
    /// (now and then a large one, so compressed parts span several codec blocks), up to two
    /// headers, and timestamps that go back and forth.
    fn record(i: usize, us: bool) -> kp::Record {
        let key = format!("{}-{i}", if us { "us" } else { "eu" });
        let value: Vec<u8> = if i % 11 == 5 {
            (0..100_000).map(|j| (j * 7 + i) as u8).collect()
        } else {
            format!("value {i} ").repeat(i % 5).into_bytes()
        };
        let headers: Vec<(String, Vec<u8>)> = (0..i % 3)
            .map(|h| (format!("h{h}"), format!("v{i}.{h}").into_bytes()))
            .collect();
        let headers: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), (i % 4 != 1).then_some(v.as_slice())))
            .collect();
        kp::Record {
            producer_id: PRODUCER_ID,
            producer_epoch: EPOCH,
            sequence: BASE_SEQUENCE,
            partition_leader_epoch: 3,
            timestamp: T0 + (i as i64 * 37) % 101 - 50,
            ..testkit::record(
                Some(key.as_bytes()),
                (i % 7 != 3).then_some(value.as_slice()),
                &headers,
            )
        }
    }

    fn records(n: usize, us: impl Fn(usize) -> bool) -> Vec<kp::Record> {
        (0..n).map(|i| record(i, us(i))).collect()
    }

    /// Part 1 for keys starting `us`, part 0 for the rest.
    fn by_key(_: usize, record: &RecordView<'_>) -> usize {
        usize::from(record.key().is_some_and(|k| k.starts_with(b"us")))
    }

    fn decode(batch: &[u8]) -> kp::RecordSet {
        let mut bytes = Bytes::copy_from_slice(batch);
        let set = kp::RecordBatchDecoder::decode(&mut bytes).expect("kafka-protocol decodes");
        assert!(bytes.is_empty(), "one batch, nothing after it");
        set
    }

    fn parts_of(split: Split) -> Vec<Part> {
        match split {
            Split::Parts(parts) => parts,
            Split::Whole { part } => panic!("expected parts, got all records in {part}"),
        }
    }

    /// Checks one part against the client's records: same records in order (key, value,
    /// headers, timestamp), fresh offsets, sequences from the part's first record's, the
    /// client's producer, a valid CRC and the client's attributes.
    fn check_part(part: &Part, client: &[kp::Record], client_batch: &[u8], codec: kp::Compression) {
        let client_header = BatchHeader::parse(client_batch).unwrap();
        let (batch, rest) = Batch::parse(&part.batch).expect("one batch");
        assert!(rest.is_empty());
        assert!(batch.verify_crc());
        let header = batch.header;
        assert_eq!(header.attributes, client_header.attributes);
        assert_eq!(header.producer_id, PRODUCER_ID);
        assert_eq!(header.producer_epoch, EPOCH);
        assert_eq!(header.partition_leader_epoch, 3);
        assert_eq!(header.records_count as usize, part.records);
        assert_eq!(header.last_offset_delta as usize, part.records - 1);
        assert_eq!(
            header.base_sequence,
            BASE_SEQUENCE + part.first_index() as i32
        );
        assert_eq!(part.base_sequence(), header.base_sequence);

        let indices: Vec<usize> = part.runs.iter().cloned().flatten().collect();
        assert_eq!(indices.len(), part.records);
        let expected: Vec<&kp::Record> = indices.iter().map(|&i| &client[i]).collect();
        assert_eq!(header.base_timestamp, expected[0].timestamp);
        let max = expected.iter().map(|r| r.timestamp).max().unwrap();
        assert_eq!(header.max_timestamp, max);

        let set = decode(&part.batch);
        assert_eq!(set.compression, codec);
        assert_eq!(set.records.len(), part.records);
        for (n, (got, want)) in set.records.iter().zip(&expected).enumerate() {
            assert_eq!(got.key, want.key, "record {n}");
            assert_eq!(got.value, want.value, "record {n}");
            assert_eq!(got.headers, want.headers, "record {n}");
            assert_eq!(got.timestamp, want.timestamp, "record {n}");
            assert_eq!(got.offset, n as i64, "record {n}");
            assert_eq!(got.sequence, header.base_sequence + n as i32, "record {n}");
            assert_eq!(got.producer_id, PRODUCER_ID);
            assert_eq!(got.timestamp_type, kp::TimestampType::Creation);
            assert!(!got.transactional && !got.control);
        }
    }

    #[test]
    fn a_mixed_batch_splits_into_one_valid_batch_per_owner_for_every_codec() {
        for (codec, kp_codec) in ALL_CODECS {
            let client = records(40, |i| i % 3 == 1 || (10..20).contains(&i));
            let batch = testkit::batch(&client, kp_codec);
            let mut inflater = Inflater::new(16 * MB);
            let split = split(&batch, &mut inflater, 2, by_key).expect("splits");
            let parts = parts_of(split);
            assert_eq!(parts.len(), 2, "{codec:?}");
            assert_eq!(
                parts.iter().map(|p| p.part).collect::<Vec<_>>(),
                [0, 1],
                "{codec:?}"
            );
            for part in &parts {
                check_part(part, &client, &batch, kp_codec);
            }
            let us = &parts[1];
            assert_eq!(us.first_index(), 1);
            assert_eq!(us.runs[..3], [1..2, 4..5, 7..8]);
            assert!(us.runs.contains(&(10..20)));
        }
    }

    #[test]
    fn compressed_parts_are_in_the_form_the_java_client_writes() {
        let client = records(30, |i| i % 2 == 0);
        let first_bytes = |codec: kp::Compression| {
            let batch = testkit::batch(&client, codec);
            let parts = parts_of(split(&batch, &mut Inflater::new(16 * MB), 2, by_key).unwrap());
            parts[0].batch[BATCH_HEADER_LEN..].to_vec()
        };
        // xerial framing, as snappy-java's SnappyOutputStream writes it.
        assert!(
            first_bytes(kp::Compression::Snappy).starts_with(b"\x82SNAPPY\0\0\0\0\x01\0\0\0\x01")
        );
        // LZ4 frame: magic, FLG version 01 with independent blocks and no checksums but the
        // header's, 64 KiB blocks.
        let lz4 = first_bytes(kp::Compression::Lz4);
        assert_eq!(lz4[..4], 0x184D_2204u32.to_le_bytes());
        assert_eq!(lz4[4], 0b0110_0000);
        assert_eq!(lz4[5], 0b0100_0000);
        // gzip and zstd magics.
        assert!(first_bytes(kp::Compression::Gzip).starts_with(&[0x1f, 0x8b]));
        assert!(first_bytes(kp::Compression::Zstd).starts_with(&0xFD2F_B528u32.to_le_bytes()));
    }

    #[test]
    fn a_batch_with_one_owner_is_whole_for_every_codec() {
        for (codec, kp_codec) in ALL_CODECS {
            let batch = testkit::batch(&records(25, |_| true), kp_codec);
            let mut inflater = Inflater::new(16 * MB);
            let mut calls = 0;
            let split = split(&batch, &mut inflater, 3, |i, r| {
                assert_eq!(i, calls);
                calls += 1;
                by_key(i, r) + 1
            });
            assert_eq!(split, Ok(Split::Whole { part: 2 }), "{codec:?}");
            assert_eq!(calls, 25, "owner_of is asked once per record");
        }
    }

    #[test]
    fn each_record_in_its_own_part_keeps_order_within_parts() {
        let client = records(6, |_| false);
        let batch = testkit::batch(&client, kp::Compression::Lz4);
        let parts = parts_of(split(&batch, &mut Inflater::new(16 * MB), 6, |i, _| 5 - i).unwrap());
        assert_eq!(parts.len(), 6);
        for (n, part) in parts.iter().enumerate() {
            assert_eq!(part.part, n);
            assert_eq!(part.runs.len(), 1);
            assert_eq!(part.runs[0], 5 - n..6 - n);
            check_part(part, &client, &batch, kp::Compression::Lz4);
        }
    }

    #[test]
    fn log_append_time_keeps_the_clients_max_timestamp() {
        let client = records(10, |i| i < 4);
        // kafka-protocol's encoder leaves the timestamp type to the broker: set it by hand.
        let batch = with_attributes(&testkit::batch(&client, kp::Compression::None), |a| {
            a | LOG_APPEND_TIME_FLAG
        });
        let client_header = BatchHeader::parse(&batch).unwrap();
        assert_ne!(client_header.attributes & LOG_APPEND_TIME_FLAG, 0);
        let parts = parts_of(split(&batch, &mut Inflater::new(MB), 2, by_key).unwrap());
        for part in &parts {
            let header = BatchHeader::parse(&part.batch).unwrap();
            assert_eq!(header.attributes, client_header.attributes);
            assert_eq!(header.max_timestamp, client_header.max_timestamp);
            assert!(Batch::parse(&part.batch).unwrap().0.verify_crc());
        }
    }

    #[test]
    fn base_sequences_wrap_as_kafkas_do_and_no_sequence_stays_none() {
        let client = records(6, |i| i >= 3);
        let batch = testkit::batch(&client, kp::Compression::None);
        // testkit numbers sequences without wrapping: set the client's base by hand.
        let batch = records_renumbered(&batch, i32::MAX - 1);
        let parts = parts_of(split(&batch, &mut Inflater::new(MB), 2, by_key).unwrap());
        assert_eq!(parts[0].base_sequence(), i32::MAX - 1);
        assert_eq!(parts[1].base_sequence(), 1, "MAX-1, MAX, 0, 1");

        let plain = testkit::batch(
            &[
                testkit::record(Some(b"eu"), None, &[]),
                testkit::record(Some(b"us"), None, &[]),
            ],
            kp::Compression::None,
        );
        let plain = records_renumbered(&plain, -1);
        let parts = parts_of(split(&plain, &mut Inflater::new(MB), 2, by_key).unwrap());
        assert!(parts.iter().all(|p| p.base_sequence() == -1));

        assert_eq!(sequence_at(5, 3), 8);
        assert_eq!(sequence_at(i32::MAX, 1), 0);
        assert_eq!(
            sequence_at(0, usize::MAX),
            ((usize::MAX as u64) % (1 << 31)) as i32
        );
    }

    /// `batch` with its attributes changed by `f`, and the CRC to match.
    fn with_attributes(batch: &[u8], f: impl Fn(i16) -> i16) -> Bytes {
        let mut out = BytesMut::from(batch);
        let attributes = BatchHeader::parse(batch).unwrap().attributes;
        out[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&f(attributes).to_be_bytes());
        let crc = crc32c::crc32c(&out[ATTRIBUTES_OFFSET..]);
        out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        out.freeze()
    }

    fn records_renumbered(batch: &[u8], base_sequence: i32) -> Bytes {
        crate::codec::records::renumbered(batch, None, base_sequence).unwrap()
    }

    #[test]
    fn transactional_control_and_empty_batches_are_not_split() {
        let txn: Vec<kp::Record> = records(4, |i| i % 2 == 0)
            .into_iter()
            .map(|r| kp::Record {
                transactional: true,
                ..r
            })
            .collect();
        let batch = testkit::batch(&txn, kp::Compression::None);
        let mut inflater = Inflater::new(MB);
        assert_eq!(
            split(&batch, &mut inflater, 2, by_key),
            Err(SplitError::Transactional)
        );
        let control: Vec<kp::Record> = records(1, |_| true)
            .into_iter()
            .map(|r| kp::Record { control: true, ..r })
            .collect();
        let batch = testkit::batch(&control, kp::Compression::None);
        assert_eq!(
            split(&batch, &mut inflater, 2, by_key),
            Err(SplitError::Control)
        );
        let mut empty =
            BytesMut::from(&testkit::batch(&records(1, |_| true), kp::Compression::None)[..]);
        empty[57..61].copy_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            split(&empty, &mut inflater, 2, by_key),
            Err(SplitError::Empty)
        );
        assert!(!SplitError::Empty.is_retriable());
    }

    #[test]
    fn a_lying_record_count_is_an_error_and_is_not_allocated_for() {
        let batch = testkit::batch(&records(3, |i| i == 1), kp::Compression::None);
        let mut lying = BytesMut::from(&batch[..]);
        lying[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let budget = DecompressionBudget::new(MB);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        assert_eq!(
            split(&lying, &mut inflater, 2, by_key),
            Err(SplitError::Records(RecordsError::RecordCountMismatch {
                declared: i32::MAX,
                found: 3
            }))
        );
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn an_owner_out_of_range_is_an_error_not_a_panic() {
        let batch = testkit::batch(&records(5, |_| true), kp::Compression::Gzip);
        let mut inflater = Inflater::new(MB);
        assert_eq!(
            split(&batch, &mut inflater, 2, |i, _| i),
            Err(SplitError::PartOutOfRange { part: 2, parts: 2 })
        );
        assert_eq!(
            split(&batch, &mut inflater, 2, |_, _| usize::MAX),
            Err(SplitError::PartOutOfRange {
                part: usize::MAX,
                parts: 2
            })
        );
    }

    #[test]
    fn malformed_batches_are_records_errors() {
        let batch = testkit::batch(&records(5, |i| i == 2), kp::Compression::Snappy);
        let mut inflater = Inflater::new(MB);
        for len in [0, 10, 60, batch.len() - 1] {
            let got = split(&batch[..len], &mut inflater, 2, by_key);
            assert!(matches!(got, Err(SplitError::Records(_))), "{len}: {got:?}");
        }
        let twice = [&batch[..], &batch[..]].concat();
        assert!(matches!(
            split(&twice, &mut inflater, 2, by_key),
            Err(SplitError::Records(RecordsError::TrailingBytes {
                what: "batch",
                ..
            }))
        ));
        // Garbage inside the compressed records.
        let mut bad = batch.to_vec();
        let at = bad.len() - 20;
        bad[at..].fill(0xAB);
        assert!(matches!(
            split(&bad, &mut inflater, 2, by_key),
            Err(SplitError::Records(_))
        ));
        // Every prefix and every single-byte flip: an error or a split, never a panic.
        for len in 0..batch.len() {
            let _ = split(&batch[..len], &mut inflater, 2, by_key);
        }
        for at in 0..batch.len() {
            let mut flipped = batch.to_vec();
            flipped[at] ^= 0x5A;
            let _ = split(&flipped, &mut inflater, 2, by_key);
        }
    }

    #[test]
    fn the_inflaters_cap_and_budget_apply_and_are_given_back() {
        let client = records(30, |i| i % 2 == 0);
        let batch = testkit::batch(&client, kp::Compression::Zstd);
        assert!(matches!(
            split(&batch, &mut Inflater::new(1024), 2, by_key),
            Err(SplitError::Records(
                RecordsError::DecompressedTooLarge { .. }
            ))
        ));

        // Enough to inflate the batch, not enough to build its parts as well.
        let inflating = {
            let budget = DecompressionBudget::new(16 * MB);
            let mut inflater = Inflater::with_budget(MB, budget.clone());
            let (parsed, _) = Batch::parse(&batch).unwrap();
            inflater
                .decompress(Compression::Zstd, parsed.records_data())
                .unwrap();
            budget.used()
        };
        let budget = DecompressionBudget::new(inflating + 4096);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        let (parsed, _) = Batch::parse(&batch).unwrap();
        assert_eq!(parsed.validate(&mut inflater), Ok(()), "inflating fits");
        let got = split(&batch, &mut inflater, 2, by_key);
        assert!(
            matches!(
                got,
                Err(SplitError::Records(
                    RecordsError::MemoryBudgetExhausted { .. }
                ))
            ),
            "{got:?}"
        );
        // A batch with one owner builds nothing, so it fits.
        let one_owner = split(&batch, &mut inflater, 2, |_, _| 1);
        assert_eq!(one_owner, Ok(Split::Whole { part: 1 }));
        assert!(got.unwrap_err().is_retriable());
        drop(inflater);
        assert_eq!(budget.used(), 0, "everything given back");

        // With room, it splits, and nothing stays charged but what the inflater keeps.
        let budget = DecompressionBudget::new(16 * MB);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        let parts = parts_of(split(&batch, &mut inflater, 2, by_key).unwrap());
        assert_eq!(budget.used(), inflater.charged_bytes());
        for part in &parts {
            check_part(part, &client, &batch, kp::Compression::Zstd);
        }
    }

    /// A small deterministic generator, so the property test needs no new dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn the_parts_records_in_original_order_are_the_clients_records() {
        let mut rng = XorShift(0x5EED_CAFE_F00D_1234);
        for round in 0..200 {
            let (codec, kp_codec) = ALL_CODECS[round % ALL_CODECS.len()];
            let n = 1 + rng.below(50);
            let parts_n = 1 + rng.below(4);
            // Sometimes one owner for all, sometimes long runs, sometimes noise.
            let style = rng.below(3);
            let base = rng.below(parts_n);
            let owners: Vec<usize> = (0..n)
                .map(|i| match style {
                    0 => base,
                    1 => (base + i / (1 + rng.below(8))) % parts_n,
                    _ => rng.below(parts_n),
                })
                .collect();
            let client = records(n, |i| i % 2 == 0);
            let batch = testkit::batch(&client, kp_codec);
            let mut inflater = Inflater::new(16 * MB);
            let split = split(&batch, &mut inflater, parts_n, |i, _| owners[i])
                .unwrap_or_else(|e| panic!("round {round} ({codec:?}): {e}"));
            let distinct = {
                let mut o = owners.clone();
                o.sort_unstable();
                o.dedup();
                o
            };
            let parts = match split {
                Split::Whole { part } => {
                    assert_eq!(distinct, [part], "round {round}");
                    continue;
                }
                Split::Parts(parts) => parts,
            };
            assert_eq!(
                parts.iter().map(|p| p.part).collect::<Vec<_>>(),
                distinct,
                "round {round}"
            );
            // Every index once, in the part its owner names; the runs are ascending and
            // maximal.
            let mut by_index: Vec<Option<kp::Record>> = vec![None; n];
            for part in &parts {
                check_part(part, &client, &batch, kp_codec);
                for pair in part.runs.windows(2) {
                    assert!(
                        pair[0].end < pair[1].start,
                        "round {round}: {:?}",
                        part.runs
                    );
                }
                let decoded = decode(&part.batch).records;
                for (index, record) in part.runs.iter().cloned().flatten().zip(decoded) {
                    assert_eq!(owners[index], part.part, "round {round}");
                    assert!(by_index[index].is_none(), "round {round}: {index} twice");
                    by_index[index] = Some(record);
                }
            }
            for (index, (got, want)) in by_index.iter().zip(&client).enumerate() {
                let got = got
                    .as_ref()
                    .unwrap_or_else(|| panic!("round {round}: {index} lost"));
                assert_eq!(
                    (&got.key, &got.value, &got.headers, got.timestamp),
                    (&want.key, &want.value, &want.headers, want.timestamp),
                    "round {round}: record {index}"
                );
            }
        }
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for value in [
            0i64,
            1,
            -1,
            63,
            64,
            -64,
            -65,
            1 << 20,
            i32::MAX as i64,
            i32::MIN as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            put_varlong(value, &mut out);
            assert_eq!(out.len(), varlong_len(value), "{value}");
            if let Ok(v) = i32::try_from(value) {
                out.clear();
                put_varint(v, &mut out);
                assert_eq!(out.len(), varint_len(v), "{value}");
            }
        }
    }
}
