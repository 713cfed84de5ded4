//! Zero-copy inspection of the record batches in a Produce request (magic v2 only).
//!
//! Owns: splitting one partition's `records` field into batches, the 61-byte batch header, and
//! walking each record's key, value and headers, validating every length and varint on the way,
//! so a batch is either fully well-formed or an error. Decompression is [`super::compression`]'s.
//! It must not decide ownership (that is `policy`) and must not re-encode anything: the proxy
//! forwards the client's original bytes (a batch split by owner is re-encoded by
//! [`super::split`]).
//!
//! Validation is at least as strict as the broker's (`DefaultRecord.readFrom`): anything the
//! broker would read differently from us is rejected here, so what policy inspected is what the
//! broker writes. A few things are stricter than the broker (a key or value length below -1,
//! non-canonical 5-byte varints, bytes after the last record or after a compressed stream's end)
//! and make the whole batch an error.

use std::fmt;
use std::iter::FusedIterator;
use std::ops::ControlFlow;

pub use super::compression::{Compression, DecompressionBudget, Inflater};

/// Size of the fixed v2 batch header; the records start right after it.
pub const BATCH_HEADER_LEN: usize = 61;
/// The only batch format accepted (Produce v3+ always carries v2 batches).
pub const MAGIC_V2: i8 = 2;
/// `baseOffset` + `batchLength`: the part of the header that `batchLength` does not count.
pub(crate) const LOG_OVERHEAD: usize = 12;
const MAGIC_OFFSET: usize = 16;
pub(crate) const CRC_OFFSET: usize = 17;
/// The CRC-32C covers everything from the attributes to the end of the batch.
pub(crate) const ATTRIBUTES_OFFSET: usize = 21;
const LAST_OFFSET_DELTA_OFFSET: usize = 23;
const BASE_TIMESTAMP_OFFSET: usize = 27;
const MAX_TIMESTAMP_OFFSET: usize = 35;
const PRODUCER_ID_OFFSET: usize = 43;
const PRODUCER_EPOCH_OFFSET: usize = 51;
const BASE_SEQUENCE_OFFSET: usize = 53;
const RECORDS_COUNT_OFFSET: usize = 57;

const TRANSACTIONAL_FLAG: i16 = 1 << 4;
const CONTROL_FLAG: i16 = 1 << 5;

/// Why a batch could not be read. Every variant but [`RecordsError::MemoryBudgetExhausted`]
/// means "do not trust this batch"; that one means "not now".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("truncated {what}: needs {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("unsupported record batch magic {0}: only v2 batches are accepted")]
    UnsupportedMagic(i8),
    #[error("unknown compression codec id {0}")]
    UnknownCompression(i16),
    #[error("invalid {what} length {len}")]
    BadLength { what: &'static str, len: i64 },
    #[error("varint is longer than its type allows")]
    BadVarint,
    #[error("{codec:?} decompression failed: {reason}")]
    Decompress { codec: Compression, reason: String },
    #[error("records decompress to more than the {limit}-byte limit")]
    DecompressedTooLarge { limit: usize },
    /// Not the batch's fault: other connections hold the decompression memory right now.
    #[error(
        "keyward's decompression memory for all connections (limits.max_decompressed_bytes_total, {limit} bytes) is in use; retry"
    )]
    MemoryBudgetExhausted { limit: usize },
    #[error("batch declares {declared} records but holds {found}")]
    RecordCountMismatch { declared: i32, found: usize },
    #[error("{count} unexpected bytes after the {what}")]
    TrailingBytes { what: &'static str, count: usize },
}

/// Writes `producer_id` into the whole v2 batch `batch` and its CRC again, which covers it.
pub fn set_producer_id(batch: &mut [u8], producer_id: i64) {
    if batch.len() < BATCH_HEADER_LEN {
        return;
    }
    batch[PRODUCER_ID_OFFSET..PRODUCER_ID_OFFSET + 8].copy_from_slice(&producer_id.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
}

/// The fixed header of a v2 record batch, as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Reads the fixed header at the start of `data`. Checks only the magic: the length and
    /// codec checks belong to [`batches`], which is how headers are normally obtained.
    pub fn parse(data: &[u8]) -> Result<Self, RecordsError> {
        if let Some(&magic) = data.get(MAGIC_OFFSET)
            && magic as i8 != MAGIC_V2
        {
            return Err(RecordsError::UnsupportedMagic(magic as i8));
        }
        let Some(fixed) = data.first_chunk::<BATCH_HEADER_LEN>() else {
            return Err(RecordsError::Truncated {
                what: "batch header",
                needed: BATCH_HEADER_LEN,
                available: data.len(),
            });
        };
        Ok(Self {
            base_offset: i64::from_be_bytes(field(fixed, 0)),
            batch_length: i32::from_be_bytes(field(fixed, 8)),
            partition_leader_epoch: i32::from_be_bytes(field(fixed, 12)),
            magic: i8::from_be_bytes(field(fixed, MAGIC_OFFSET)),
            crc: u32::from_be_bytes(field(fixed, CRC_OFFSET)),
            attributes: i16::from_be_bytes(field(fixed, ATTRIBUTES_OFFSET)),
            last_offset_delta: i32::from_be_bytes(field(fixed, LAST_OFFSET_DELTA_OFFSET)),
            base_timestamp: i64::from_be_bytes(field(fixed, BASE_TIMESTAMP_OFFSET)),
            max_timestamp: i64::from_be_bytes(field(fixed, MAX_TIMESTAMP_OFFSET)),
            producer_id: i64::from_be_bytes(field(fixed, PRODUCER_ID_OFFSET)),
            producer_epoch: i16::from_be_bytes(field(fixed, PRODUCER_EPOCH_OFFSET)),
            base_sequence: i32::from_be_bytes(field(fixed, BASE_SEQUENCE_OFFSET)),
            records_count: i32::from_be_bytes(field(fixed, RECORDS_COUNT_OFFSET)),
        })
    }

    /// The batch's codec. Headers yielded by [`batches`] always carry a known one; for a header
    /// built or edited by hand with codec id 5-7 this returns [`Compression::None`], so use
    /// [`Compression::from_attributes`] when that matters.
    pub fn compression(&self) -> Compression {
        Compression::from_attributes(self.attributes).unwrap_or(Compression::None)
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_FLAG != 0
    }

    /// Control batches (transaction markers) are written by the broker itself; the broker
    /// refuses them from clients.
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }
}

/// A copy of `batch` with a new base sequence (and producer id and epoch, if given) and the CRC
/// that matches them: what a batch needs to be written under another producer's numbering. The
/// records themselves are copied, not re-encoded.
pub fn renumbered(
    batch: &[u8],
    producer: Option<(i64, i16)>,
    base_sequence: i32,
) -> Result<bytes::Bytes, RecordsError> {
    BatchHeader::parse(batch)?;
    let mut out = bytes::BytesMut::from(batch);
    let mut put = |offset: usize, value: &[u8]| {
        out[offset..offset + value.len()].copy_from_slice(value);
    };
    if let Some((id, epoch)) = producer {
        put(PRODUCER_ID_OFFSET, &id.to_be_bytes());
        put(PRODUCER_EPOCH_OFFSET, &epoch.to_be_bytes());
    }
    put(BASE_SEQUENCE_OFFSET, &base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&out[ATTRIBUTES_OFFSET..]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(out.freeze())
}

/// `N` bytes at `offset` of the fixed header; offsets are constants within the array's length.
fn field<const N: usize>(fixed: &[u8; BATCH_HEADER_LEN], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&fixed[offset..offset + N]);
    out
}

/// Iterates the batches of one partition's `records` field (a concatenation of batches),
/// borrowing from `data`. Stops after the first error: past a bad length nothing can be trusted.
pub fn batches(data: &[u8]) -> Batches<'_> {
    Batches {
        rest: data,
        failed: false,
    }
}

/// Iterator returned by [`batches`].
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Batches<'a> {
    /// The bytes not yet consumed (after an error: from the start of the bad batch).
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<Batch<'a>, RecordsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match Batch::parse(self.rest) {
            Ok((batch, rest)) => {
                self.rest = rest;
                Some(Ok(batch))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl FusedIterator for Batches<'_> {}

/// One record batch: its header and its bytes, records not yet read.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    /// Informational copy of the header. [`Batch::for_each_record`] does not read it back, so
    /// editing it cannot change what gets inspected.
    pub header: BatchHeader,
    raw: &'a [u8],
    compression: Compression,
    records_count: i32,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("header", &self.header)
            .field("len", &self.raw.len())
            .finish()
    }
}

impl<'a> Batch<'a> {
    /// Parses the batch at the start of `data` and returns it with the bytes after it.
    /// Checks the framing (magic, `batchLength`, codec, record count sign), not the records.
    pub fn parse(data: &'a [u8]) -> Result<(Self, &'a [u8]), RecordsError> {
        // Magic first: v0/v1 message sets put it at the same offset, and naming the real
        // problem beats a confusing length error.
        if let Some(&magic) = data.get(MAGIC_OFFSET)
            && magic as i8 != MAGIC_V2
        {
            return Err(RecordsError::UnsupportedMagic(magic as i8));
        }
        let Some(&[.., l0, l1, l2, l3]) = data.first_chunk::<LOG_OVERHEAD>() else {
            return Err(RecordsError::Truncated {
                what: "batch length",
                needed: LOG_OVERHEAD,
                available: data.len(),
            });
        };
        let batch_length = i32::from_be_bytes([l0, l1, l2, l3]);
        if batch_length < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(RecordsError::BadLength {
                what: "batch",
                len: batch_length.into(),
            });
        }
        let total = LOG_OVERHEAD + batch_length as usize;
        if data.len() < total {
            return Err(RecordsError::Truncated {
                what: "batch",
                needed: total,
                available: data.len(),
            });
        }
        let (raw, rest) = data.split_at(total);
        let header = BatchHeader::parse(raw)?;
        let compression = Compression::from_attributes(header.attributes)?;
        if header.records_count < 0 {
            return Err(RecordsError::BadLength {
                what: "record count",
                len: header.records_count.into(),
            });
        }
        let batch = Self {
            header,
            raw,
            compression,
            records_count: header.records_count,
        };
        Ok((batch, rest))
    }

    /// The whole batch, header included, exactly as received.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The records section after the header, still compressed if the batch is.
    pub fn records_data(&self) -> &'a [u8] {
        &self.raw[BATCH_HEADER_LEN..]
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Checks the CRC-32C stored in the batch against its bytes. The broker checks it too, so a
    /// proxy that only inspects may skip this; it is here for tests and for diagnostics.
    pub fn verify_crc(&self) -> bool {
        // `raw` always holds at least a full header (checked in `parse`).
        let Some(fixed) = self.raw.first_chunk::<BATCH_HEADER_LEN>() else {
            return false;
        };
        let stored = u32::from_be_bytes(field(fixed, CRC_OFFSET));
        crc32c::crc32c(&self.raw[ATTRIBUTES_OFFSET..]) == stored
    }

    /// Calls `f(index, record)` for each record in order, stopping early on
    /// [`ControlFlow::Break`] (the records after that point are then not validated).
    ///
    /// Each record is fully validated, headers included, before `f` sees it; after the last
    /// record the declared count and the absence of trailing bytes are checked. Compressed
    /// records are inflated into `inflater`'s reusable buffer; record views borrow either that
    /// buffer or the batch, so nothing is allocated or copied per record.
    pub fn for_each_record<F>(&self, inflater: &mut Inflater, f: F) -> Result<(), RecordsError>
    where
        F: FnMut(usize, RecordView<'_>) -> ControlFlow<()>,
    {
        self.for_each_record_wanting(inflater, None, f)
    }

    /// As [`Batch::for_each_record`], keeping the first header named `header` of each record as
    /// its headers are validated, so that [`RecordView::header`] for that name reads nothing
    /// again (the `by: header` rules' lookup).
    pub fn for_each_record_wanting<F>(
        &self,
        inflater: &mut Inflater,
        header: Option<&[u8]>,
        f: F,
    ) -> Result<(), RecordsError>
    where
        F: FnMut(usize, RecordView<'_>) -> ControlFlow<()>,
    {
        let walked = match inflater.decompress(self.compression, self.records_data()) {
            Ok(records) => walk_records(records, self.records_count, header, f),
            Err(e) => Err(e),
        };
        // A large batch's buffers are freed now, not kept as this connection's high-water mark.
        inflater.trim();
        walked
    }

    /// Validates every record without looking at them.
    pub fn validate(&self, inflater: &mut Inflater) -> Result<(), RecordsError> {
        self.for_each_record(inflater, |_, _| ControlFlow::Continue(()))
    }
}

/// Walks a batch's (decompressed) records section: see [`Batch::for_each_record`].
pub(crate) fn walk_records<'d, F>(
    mut data: &'d [u8],
    declared: i32,
    header: Option<&'d [u8]>,
    mut f: F,
) -> Result<(), RecordsError>
where
    F: FnMut(usize, RecordView<'_>) -> ControlFlow<()>,
{
    // `declared` is non-negative (checked in Batch::parse). A lying count cannot make us loop
    // long: every record takes at least one byte, so the data runs out first.
    for index in 0..declared as usize {
        if data.is_empty() {
            return Err(RecordsError::RecordCountMismatch {
                declared,
                found: index,
            });
        }
        let record = RecordView::parse(&mut data, header)?;
        if f(index, record).is_break() {
            return Ok(());
        }
    }
    if !data.is_empty() {
        return Err(RecordsError::TrailingBytes {
            what: "last record",
            count: data.len(),
        });
    }
    Ok(())
}

/// The header a walk asked every record for, and what [`RecordView::header`] answers for it:
/// so the rule's lookup reads nothing again, whether the record carries the header or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wanted<'r> {
    /// The asker's own slice, not the record's: a rule asking with the slice it walked with is
    /// answered after a pointer comparison.
    asked: &'r [u8],
    /// `None` if absent, `Some(None)` if present with a null value.
    found: Option<Option<&'r [u8]>>,
}

/// One record, borrowed from the batch or from the inflater's buffer.
#[derive(Clone, Copy)]
pub struct RecordView<'r> {
    attributes: i8,
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&'r [u8]>,
    value: Option<&'r [u8]>,
    /// The encoded headers, already validated, with their count: decoded again on demand.
    headers: &'r [u8],
    header_count: usize,
    /// The header the walk asked for, found while the headers were validated.
    wanted: Option<Wanted<'r>>,
    /// Key, value and headers as encoded: what a re-encoded record copies unchanged.
    tail: &'r [u8],
}

impl fmt::Debug for RecordView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordView")
            .field("offset_delta", &self.offset_delta)
            .field("timestamp_delta", &self.timestamp_delta)
            .field("key_len", &self.key.map(<[u8]>::len))
            .field("value_len", &self.value.map(<[u8]>::len))
            .field("header_count", &self.header_count)
            .finish()
    }
}

impl<'r> RecordView<'r> {
    /// Reads one length-prefixed record from the front of `data` and validates all of it,
    /// keeping the first header named `want`.
    fn parse(data: &mut &'r [u8], want: Option<&'r [u8]>) -> Result<Self, RecordsError> {
        let len = read_varint(data)?;
        if len < 0 {
            return Err(RecordsError::BadLength {
                what: "record",
                len: len.into(),
            });
        }
        let mut body = take(data, len as usize, "record")?;
        let attributes = take(&mut body, 1, "record attributes")?[0] as i8;
        let timestamp_delta = read_varlong(&mut body)?;
        let offset_delta = read_varint(&mut body)?;
        let tail = body;
        let key = read_nullable_bytes(&mut body, "record key")?;
        let value = read_nullable_bytes(&mut body, "record value")?;
        let header_count = read_varint(&mut body)?;
        if header_count < 0 {
            return Err(RecordsError::BadLength {
                what: "header count",
                len: header_count.into(),
            });
        }
        let headers = body;
        let mut found = None;
        for _ in 0..header_count {
            let (name, value) = read_header(&mut body)?;
            if found.is_none() && want == Some(name) {
                found = Some(value);
            }
        }
        let wanted = want.map(|asked| Wanted { asked, found });
        if !body.is_empty() {
            return Err(RecordsError::TrailingBytes {
                what: "record's headers",
                count: body.len(),
            });
        }
        Ok(Self {
            attributes,
            timestamp_delta,
            offset_delta,
            key,
            value,
            headers,
            header_count: header_count as usize,
            wanted,
            tail,
        })
    }

    /// The encoded key, value and headers, from the key's length to the end of the record.
    pub(crate) fn tail(&self) -> &'r [u8] {
        self.tail
    }

    /// `None` for a null key.
    pub fn key(&self) -> Option<&'r [u8]> {
        self.key
    }

    /// `None` for a null value (a tombstone).
    pub fn value(&self) -> Option<&'r [u8]> {
        self.value
    }

    /// Value of the first header named `name`: `None` if absent, `Some(None)` if present with a
    /// null value. Kafka allows repeated names; only the first counts here.
    #[inline]
    pub fn header(&self, name: &[u8]) -> Option<Option<&'r [u8]>> {
        if let Some(Wanted { asked, found }) = self.wanted
            && (std::ptr::eq(asked, name) || asked == name)
        {
            return found;
        }
        self.scan_header(name)
    }

    /// [`RecordView::header`] for a name the walk did not ask for: out of line, so that the
    /// rule's lookup above inlines into it.
    #[inline(never)]
    fn scan_header(&self, name: &[u8]) -> Option<Option<&'r [u8]>> {
        self.headers()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// All headers in order, repeated names included.
    pub fn headers(&self) -> Headers<'r> {
        Headers {
            data: self.headers,
            remaining: self.header_count,
        }
    }

    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// Record attributes (unused by Kafka so far, always 0 from current clients).
    pub fn attributes(&self) -> i8 {
        self.attributes
    }

    /// Offset of this record relative to the batch's base offset.
    pub fn offset_delta(&self) -> i32 {
        self.offset_delta
    }

    /// Timestamp relative to the batch's base timestamp.
    pub fn timestamp_delta(&self) -> i64 {
        self.timestamp_delta
    }
}

/// Iterator over a record's headers as `(name, value)`; see [`RecordView::headers`].
#[derive(Debug, Clone)]
pub struct Headers<'r> {
    data: &'r [u8],
    remaining: usize,
}

impl<'r> Iterator for Headers<'r> {
    type Item = (&'r [u8], Option<&'r [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // Validated when the record was parsed, so this cannot fail; stop quietly if it did.
        match read_header(&mut self.data) {
            Ok(header) => {
                self.remaining -= 1;
                Some(header)
            }
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Headers<'_> {}
impl FusedIterator for Headers<'_> {}

fn read_header<'r>(data: &mut &'r [u8]) -> Result<(&'r [u8], Option<&'r [u8]>), RecordsError> {
    let key_len = read_varint(data)?;
    if key_len < 0 {
        // The broker refuses null header names too.
        return Err(RecordsError::BadLength {
            what: "header key",
            len: key_len.into(),
        });
    }
    let key = take(data, key_len as usize, "header key")?;
    let value = read_nullable_bytes(data, "header value")?;
    Ok((key, value))
}

fn take<'r>(data: &mut &'r [u8], n: usize, what: &'static str) -> Result<&'r [u8], RecordsError> {
    if data.len() < n {
        return Err(RecordsError::Truncated {
            what,
            needed: n,
            available: data.len(),
        });
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

/// A varint length followed by that many bytes; -1 is null, below that is an error.
fn read_nullable_bytes<'r>(
    data: &mut &'r [u8],
    what: &'static str,
) -> Result<Option<&'r [u8]>, RecordsError> {
    match read_varint(data)? {
        -1 => Ok(None),
        len if len < 0 => Err(RecordsError::BadLength {
            what,
            len: len.into(),
        }),
        len => take(data, len as usize, what).map(Some),
    }
}

/// Zigzag varint, at most 5 bytes; the 5th may only carry the top 4 bits of a u32.
#[inline]
fn read_varint(data: &mut &[u8]) -> Result<i32, RecordsError> {
    let raw = read_unsigned::<5>(data)? as u32;
    Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
}

/// Zigzag varlong, at most 10 bytes; the 10th may only carry the top bit of a u64.
#[inline]
fn read_varlong(data: &mut &[u8]) -> Result<i64, RecordsError> {
    let raw = read_unsigned::<10>(data)?;
    Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

/// Unsigned LEB128 of at most `MAX` bytes (5 for 32 bits, 10 for 64), rejecting bits past the
/// type's width instead of dropping them.
#[inline]
fn read_unsigned<const MAX: usize>(data: &mut &[u8]) -> Result<u64, RecordsError> {
    let bytes = *data;
    // Fast path: lengths, counts and deltas of small records fit in one byte.
    if let Some(&b) = bytes.first()
        && b < 0x80
    {
        *data = &bytes[1..];
        return Ok(b.into());
    }
    let last_byte_limit: u8 = if MAX == 5 { 0x0f } else { 0x01 };
    let mut value = 0u64;
    for i in 0..MAX {
        let Some(&b) = bytes.get(i) else {
            return Err(RecordsError::Truncated {
                what: "varint",
                needed: i + 1,
                available: bytes.len(),
            });
        };
        if i == MAX - 1 && b > last_byte_limit {
            return Err(RecordsError::BadVarint);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *data = &bytes[i + 1..];
            return Ok(value);
        }
    }
    Err(RecordsError::BadVarint)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write as _;
    use std::time::{Duration, Instant};

    use bytes::{Bytes, BytesMut};
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records as kp;
    use proptest::prelude::*;

    const MB: usize = 1024 * 1024;

    /// What a test expects to read back from one record.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Rec {
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    }

    const ALL_CODECS: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    fn kp_codec(codec: Compression) -> kp::Compression {
        match codec {
            Compression::None => kp::Compression::None,
            Compression::Gzip => kp::Compression::Gzip,
            Compression::Snappy => kp::Compression::Snappy,
            Compression::Lz4 => kp::Compression::Lz4,
            Compression::Zstd => kp::Compression::Zstd,
        }
    }

    /// One batch written by kafka-protocol's encoder, an implementation independent of ours.
    fn kp_batch(records: &[Rec], codec: Compression) -> Vec<u8> {
        let records: Vec<kp::Record> = records
            .iter()
            .enumerate()
            .map(|(i, r)| kp::Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 7,
                producer_id: 1234,
                producer_epoch: 3,
                timestamp_type: kp::TimestampType::Creation,
                offset: i as i64,
                sequence: i as i32,
                timestamp: 1_700_000_000_000 + i as i64,
                key: r.key.clone().map(Bytes::from),
                value: r.value.clone().map(Bytes::from),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let name =
                            String::from_utf8(k.clone()).expect("test header names are utf-8");
                        (StrBytes::from_string(name), v.clone().map(Bytes::from))
                    })
                    .collect::<IndexMap<_, _>>(),
            })
            .collect();
        let mut buf = BytesMut::new();
        kp::RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &kp::RecordEncodeOptions {
                version: 2,
                compression: kp_codec(codec),
            },
        )
        .expect("kafka-protocol encodes");
        buf.to_vec()
    }

    fn sample_records(n: usize) -> Vec<Rec> {
        (0..n)
            .map(|i| Rec {
                key: (i % 3 != 0).then(|| format!("user-{i}").into_bytes()),
                value: (i % 7 != 3).then(|| {
                    // Mostly small values, now and then a big one to span codec blocks.
                    let len = if i % 97 == 0 { 40_000 } else { i % 300 };
                    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
                }),
                headers: (0..i % 4)
                    .map(|h| {
                        let value = (h != 1).then(|| format!("v{i}-{h}").into_bytes());
                        (format!("h{h}").into_bytes(), value)
                    })
                    .collect(),
            })
            .collect()
    }

    fn read_all(data: &[u8], inflater: &mut Inflater) -> Result<Vec<Rec>, RecordsError> {
        let mut out = Vec::new();
        for batch in batches(data) {
            let batch = batch?;
            batch.for_each_record(inflater, |i, r| {
                assert_eq!(
                    r.offset_delta(),
                    i as i32,
                    "both encoders number records from 0"
                );
                out.push(Rec {
                    key: r.key().map(<[u8]>::to_vec),
                    value: r.value().map(<[u8]>::to_vec),
                    headers: r
                        .headers()
                        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                        .collect(),
                });
                ControlFlow::Continue(())
            })?;
        }
        Ok(out)
    }

    // ---- hand-built batches, for what the encoder above cannot write ----

    fn put_varlong(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push(z as u8 | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
        match b {
            None => put_varlong(out, -1),
            Some(b) => {
                put_varlong(out, b.len() as i64);
                out.extend_from_slice(b);
            }
        }
    }

    fn encode_record(out: &mut Vec<u8>, offset_delta: i64, r: &Rec) {
        let mut body = vec![0u8];
        put_varlong(&mut body, offset_delta * 3);
        put_varlong(&mut body, offset_delta);
        put_bytes(&mut body, r.key.as_deref());
        put_bytes(&mut body, r.value.as_deref());
        put_varlong(&mut body, r.headers.len() as i64);
        for (k, v) in &r.headers {
            put_bytes(&mut body, Some(k));
            put_bytes(&mut body, v.as_deref());
        }
        put_varlong(out, body.len() as i64);
        out.extend_from_slice(&body);
    }

    fn encode_records(records: &[Rec]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, r) in records.iter().enumerate() {
            encode_record(&mut out, i as i64, r);
        }
        out
    }

    /// A v2 batch around an already encoded (and possibly compressed) records blob.
    fn build_batch(attributes: i16, count: i32, blob: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&((BATCH_HEADER_LEN - LOG_OVERHEAD + blob.len()) as i32).to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(MAGIC_V2 as u8);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&attributes.to_be_bytes());
        b.extend_from_slice(&(count - 1).to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        b.extend_from_slice(blob);
        let crc = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn raw_snappy(data: &[u8]) -> Vec<u8> {
        snap::raw::Encoder::new().compress_vec(data).unwrap()
    }

    /// snappy-java's stream format, as the Java client writes it.
    fn xerial_snappy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = Vec::from(*b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01");
        for chunk in data.chunks(block) {
            let c = raw_snappy(chunk);
            out.extend_from_slice(&(c.len() as u32).to_be_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    fn lz4_frame(data: &[u8], info: lz4_flex::frame::FrameInfo) -> Vec<u8> {
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
    }

    fn compress(codec: Compression, data: &[u8]) -> Vec<u8> {
        match codec {
            Compression::None => data.to_vec(),
            Compression::Gzip => gzip(data),
            Compression::Snappy => xerial_snappy(data, 32 * 1024),
            Compression::Lz4 => lz4_frame(data, lz4_flex::frame::FrameInfo::new()),
            Compression::Zstd => zstd(data),
        }
    }

    fn codec_id(codec: Compression) -> i16 {
        match codec {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    fn rec(key: &[u8], headers: &[(&[u8], Option<&[u8]>)]) -> Rec {
        Rec {
            key: Some(key.to_vec()),
            value: Some(b"value".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }

    fn first_error(data: &[u8], inflater: &mut Inflater) -> RecordsError {
        read_all(data, inflater).expect_err("should be rejected")
    }

    // ---- the memory budget shared by all connections ----

    /// A batch of `n` records of `value_len` bytes each, compressed with `codec`.
    fn big_batch(codec: Compression, n: usize, value_len: usize) -> (Vec<u8>, usize) {
        let records: Vec<Rec> = (0..n)
            .map(|i| Rec {
                key: Some(format!("k{i}").into_bytes()),
                value: Some(vec![(i % 251) as u8; value_len]),
                headers: Vec::new(),
            })
            .collect();
        let blob = encode_records(&records);
        (
            build_batch(codec_id(codec), n as i32, &compress(codec, &blob)),
            blob.len(),
        )
    }

    #[test]
    fn inflaters_share_one_budget_and_a_batch_that_does_not_fit_is_refused_as_retriable() {
        for codec in &ALL_CODECS[1..] {
            // zstd needs its window beside the output: about twice the batch.
            let limit = if *codec == Compression::Zstd {
                12 * MB
            } else {
                6 * MB
            };
            let budget = DecompressionBudget::new(limit);
            let (data, inflated) = big_batch(*codec, 40, 100 * 1024); // 4 MB inflated
            assert!(inflated > 3 * MB);
            let batch = batches(&data).next().unwrap().unwrap();
            let mut a = Inflater::with_budget(16 * MB, budget.clone());
            let mut b = Inflater::with_budget(16 * MB, budget.clone());
            // a holds its buffer (mid-batch): b's batch does not fit beside it.
            a.decompress(batch.compression(), batch.records_data())
                .unwrap();
            assert_eq!(budget.used(), a.charged_bytes(), "{codec:?}");
            assert!(a.charged_bytes() >= inflated, "{codec:?}");
            assert_eq!(
                first_error(&data, &mut b),
                RecordsError::MemoryBudgetExhausted { limit },
                "{codec:?}"
            );
            assert!(budget.used() <= limit);
            // Once a's batch is done its memory is back, and b's batch is read.
            a.trim();
            assert_eq!(budget.used(), 0, "{codec:?}");
            assert_eq!(read_all(&data, &mut b).unwrap().len(), 40, "{codec:?}");
            // The large buffer is not kept after the batch either.
            assert_eq!(budget.used(), 0, "{codec:?}");
            assert_eq!(b.buffer_bytes(), 0);
        }
    }

    #[test]
    fn small_batches_keep_their_buffer_and_dropping_an_inflater_gives_it_back() {
        let budget = DecompressionBudget::new(64 * MB);
        let records = sample_records(30);
        let data = kp_batch(&records, Compression::Lz4);
        let mut inflater = Inflater::with_budget(16 * MB, budget.clone());
        assert_eq!(read_all(&data, &mut inflater).unwrap(), records);
        let kept = budget.used();
        assert!(kept > 0 && kept <= super::super::compression::RETAINED_BYTES);
        assert_eq!(kept, inflater.charged_bytes());
        // The next batch reuses it: nothing more is taken.
        assert_eq!(read_all(&data, &mut inflater).unwrap(), records);
        assert_eq!(budget.used(), kept);
        drop(inflater);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn under_pressure_even_small_buffers_are_given_back_after_the_batch() {
        let budget = DecompressionBudget::new(3 * MB);
        let records = sample_records(30);
        let data = kp_batch(&records, Compression::Gzip);
        let mut hog = Inflater::with_budget(16 * MB, budget.clone());
        let (big, _) = big_batch(Compression::Gzip, 12, 100 * 1024);
        let batch = batches(&big).next().unwrap().unwrap();
        hog.decompress(batch.compression(), batch.records_data())
            .unwrap();
        assert!(
            budget.used() > 3 * MB / 2,
            "more than half the budget in use"
        );
        let mut small = Inflater::with_budget(16 * MB, budget.clone());
        let before = budget.used();
        assert_eq!(read_all(&data, &mut small).unwrap(), records);
        assert_eq!(
            budget.used(),
            before,
            "the small batch's buffer was given back"
        );
    }

    #[test]
    fn a_zstd_window_is_taken_from_the_budget_before_the_decoder_allocates_it() {
        use zstd::stream::raw::CParameter;
        let blob = encode_records(&sample_records(20));
        // A streamed frame (no content size) declaring an 8 MiB window for a few KB of records.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(CParameter::WindowLog(23)).unwrap();
        enc.set_pledged_src_size(None).unwrap();
        enc.write_all(&blob).unwrap();
        let frame = enc.finish().unwrap();
        let data = build_batch(4, 20, &frame);
        let window = super::super::compression::zstd_context_bytes(&frame, 23);
        assert!(window > 8 * MB, "{window}");
        let budget = DecompressionBudget::new(4 * MB);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        assert_eq!(
            first_error(&data, &mut inflater),
            RecordsError::MemoryBudgetExhausted { limit: 4 * MB }
        );
        assert_eq!(budget.used(), 0);
        let budget = DecompressionBudget::new(16 * MB);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        assert_eq!(read_all(&data, &mut inflater).unwrap().len(), 20);
        assert_eq!(
            budget.used(),
            0,
            "a context this large is freed after the batch"
        );
        // A frame that declares its size needs no more than that.
        let small = zstd(&blob);
        let need = super::super::compression::zstd_context_bytes(&small, 23);
        assert!(need < blob.len() + 512 * 1024, "{need}");
    }

    #[test]
    fn the_budget_counts_exactly_what_the_inflaters_hold() {
        let budget = DecompressionBudget::new(64 * MB);
        for codec in &ALL_CODECS[1..] {
            let mut inflater = Inflater::with_budget(16 * MB, budget.clone());
            for (n, value_len) in [
                (10, 1_000),
                (30, 10_000),
                (20, 100_000),
                (5, 100),
                (4, 300_000),
            ] {
                let (data, _) = big_batch(*codec, n, value_len);
                assert_eq!(
                    read_all(&data, &mut inflater).unwrap().len(),
                    n,
                    "{codec:?}"
                );
                assert_eq!(
                    budget.used(),
                    inflater.charged_bytes(),
                    "{codec:?} {n}x{value_len}"
                );
                assert!(inflater.charged_bytes() >= inflater.buffer_bytes());
            }
            drop(inflater);
            assert_eq!(budget.used(), 0, "{codec:?}");
        }
    }

    #[test]
    fn a_java_style_zstd_context_is_kept_between_batches() {
        // zstd-jni streams: level 3, no content size, a window of 2 MiB.
        let blob = encode_records(&sample_records(20));
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(21))
            .unwrap();
        enc.write_all(&blob).unwrap();
        let data = build_batch(4, 20, &enc.finish().unwrap());
        let budget = DecompressionBudget::new(64 * MB);
        let mut inflater = Inflater::with_budget(MB, budget.clone());
        assert_eq!(read_all(&data, &mut inflater).unwrap().len(), 20);
        let kept = budget.used();
        assert!(kept > 2 * MB && kept <= super::super::compression::RETAINED_ZSTD_BYTES + MB);
        assert_eq!(read_all(&data, &mut inflater).unwrap().len(), 20);
        assert_eq!(
            budget.used(),
            kept,
            "the same context serves the next batch"
        );
    }

    // ---- round trips ----

    #[test]
    fn round_trip_kafka_protocol_batches_every_codec() {
        let records = sample_records(1_000);
        let mut inflater = Inflater::new(16 * MB);
        for codec in ALL_CODECS {
            let data = kp_batch(&records, codec);
            let mut it = batches(&data);
            let batch = it.next().unwrap().unwrap();
            assert!(it.next().is_none(), "{codec:?}: one batch");
            assert_eq!(batch.compression(), codec);
            assert_eq!(batch.header.compression(), codec);
            assert_eq!(batch.header.records_count, 1_000);
            assert_eq!(batch.header.producer_id, 1234);
            assert_eq!(batch.header.partition_leader_epoch, 7);
            assert!(!batch.header.is_transactional() && !batch.header.is_control());
            assert!(batch.verify_crc(), "{codec:?}: crc");
            assert_eq!(batch.raw(), &data[..]);
            assert_eq!(
                read_all(&data, &mut inflater).unwrap(),
                records,
                "{codec:?}"
            );
        }
    }

    #[test]
    fn a_wanted_header_is_kept_as_the_record_is_validated_and_answers_as_a_scan_would() {
        let r = rec(
            b"k",
            &[
                (b"trace", None),
                (b"region", Some(b"eu")),
                (b"region", Some(b"us")),
            ],
        );
        let data = build_batch(0, 1, &encode_records(&[r]));
        let batch = batches(&data).next().unwrap().unwrap();
        for want in [&b"region"[..], b"trace", b"absent", b""] {
            batch
                .for_each_record_wanting(&mut Inflater::new(MB), Some(want), |_, r| {
                    // The first of its name, or none when absent.
                    let first = r.headers().find(|(name, _)| *name == want);
                    let found = first.map(|(_, v)| v);
                    assert_eq!(r.wanted, Some(Wanted { asked: want, found }), "{want:?}");
                    for name in [&b"region"[..], b"trace", b"absent"] {
                        assert_eq!(
                            r.header(name),
                            r.headers().find(|(n, _)| *n == name).map(|(_, v)| v),
                            "wanting {want:?}, asking {name:?}"
                        );
                    }
                    ControlFlow::Continue(())
                })
                .unwrap();
        }
    }

    #[test]
    fn header_lookup_first_match_null_and_absent() {
        let r = rec(
            b"k",
            &[
                (b"region", Some(b"eu")),
                (b"trace", None),
                (b"region", Some(b"us")),
            ],
        );
        let data = build_batch(0, 1, &encode_records(&[r]));
        let batch = batches(&data).next().unwrap().unwrap();
        let mut calls = 0;
        batch
            .for_each_record(&mut Inflater::new(MB), |_, r| {
                calls += 1;
                assert_eq!(r.header(b"region"), Some(Some(&b"eu"[..])));
                assert_eq!(r.header(b"trace"), Some(None));
                assert_eq!(r.header(b"absent"), None);
                assert_eq!(r.header(b"regio"), None);
                assert_eq!(r.headers().len(), 3);
                assert_eq!(r.header_count(), 3);
                assert_eq!(r.key(), Some(&b"k"[..]));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(calls, 1);
    }

    #[test]
    fn empty_key_is_not_null_key() {
        let records = [
            Rec {
                key: Some(vec![]),
                value: Some(vec![]),
                headers: vec![(vec![], Some(vec![]))],
            },
            Rec {
                key: None,
                value: None,
                headers: vec![],
            },
        ];
        for codec in ALL_CODECS {
            let data = kp_batch(&records, codec);
            assert_eq!(read_all(&data, &mut Inflater::new(MB)).unwrap(), records);
        }
    }

    #[test]
    fn snappy_xerial_and_raw_hand_built() {
        let records = sample_records(300);
        let blob = encode_records(&records);
        let mut inflater = Inflater::new(16 * MB);
        for compressed in [
            xerial_snappy(&blob, 32 * 1024),
            xerial_snappy(&blob, 1000),
            raw_snappy(&blob),
        ] {
            let data = build_batch(2, 300, &compressed);
            assert_eq!(read_all(&data, &mut inflater).unwrap(), records);
        }
        // Two xerial streams back to back (snappy-java reads through the second header).
        let mid = blob.len() / 2;
        let mut two = xerial_snappy(&blob[..mid], 4096);
        two.extend_from_slice(&xerial_snappy(&blob[mid..], 4096));
        let data = build_batch(2, 300, &two);
        assert_eq!(read_all(&data, &mut inflater).unwrap(), records);
    }

    #[test]
    fn lz4_frame_variants() {
        use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
        let records = sample_records(500);
        let blob = encode_records(&records);
        let mut inflater = Inflater::new(16 * MB);
        let variants = [
            FrameInfo::new(),
            FrameInfo::new().block_mode(BlockMode::Linked),
            FrameInfo::new()
                .block_mode(BlockMode::Linked)
                .block_size(BlockSize::Max256KB)
                .block_checksums(true)
                .content_checksum(true)
                .content_size(Some(blob.len() as u64)),
            FrameInfo::new().block_size(BlockSize::Max4MB),
        ];
        for info in variants {
            let data = build_batch(3, 500, &lz4_frame(&blob, info.clone()));
            assert_eq!(read_all(&data, &mut inflater).unwrap(), records, "{info:?}");
        }
        // Incompressible data is stored in uncompressed blocks.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let r = Rec {
            key: None,
            value: Some(noise),
            headers: vec![],
        };
        let data = build_batch(
            3,
            1,
            &lz4_frame(&encode_records(std::slice::from_ref(&r)), FrameInfo::new()),
        );
        assert_eq!(read_all(&data, &mut inflater).unwrap(), vec![r]);
        // A wrong declared content size is rejected.
        // (The encoder refuses to write one, so patch it in: magic, FLG, BD, then the size.)
        let mut frame = lz4_frame(
            &blob,
            FrameInfo::new().content_size(Some(blob.len() as u64)),
        );
        frame[6..14].copy_from_slice(&(blob.len() as u64 - 1).to_le_bytes());
        let data = build_batch(3, 500, &frame);
        assert!(matches!(
            first_error(&data, &mut inflater),
            RecordsError::Decompress {
                codec: Compression::Lz4,
                ..
            }
        ));
    }

    #[test]
    fn gzip_and_zstd_multi_member() {
        let records = sample_records(200);
        let blob = encode_records(&records);
        let mid = blob.len() / 3;
        let mut inflater = Inflater::new(16 * MB);
        for (codec, f) in [(1, gzip as fn(&[u8]) -> Vec<u8>), (4, zstd)] {
            let mut two = f(&blob[..mid]);
            two.extend_from_slice(&f(&blob[mid..]));
            let data = build_batch(codec, 200, &two);
            assert_eq!(read_all(&data, &mut inflater).unwrap(), records);
        }
    }

    #[test]
    fn concatenated_batches_share_one_inflater() {
        let mut data = Vec::new();
        let mut expected = Vec::new();
        for (i, codec) in ALL_CODECS.iter().chain(ALL_CODECS.iter().rev()).enumerate() {
            let records = sample_records(50 + i * 10);
            data.extend_from_slice(&kp_batch(&records, *codec));
            expected.extend(records);
        }
        let mut inflater = Inflater::new(4 * MB);
        assert_eq!(batches(&data).count(), 10);
        assert_eq!(read_all(&data, &mut inflater).unwrap(), expected);
        // And again with the buffer and zstd context already warm.
        assert_eq!(read_all(&data, &mut inflater).unwrap(), expected);
    }

    #[test]
    fn break_stops_early() {
        let data = kp_batch(&sample_records(100), Compression::Lz4);
        let batch = batches(&data).next().unwrap().unwrap();
        let mut seen = Vec::new();
        batch
            .for_each_record(&mut Inflater::new(MB), |i, _| {
                seen.push(i);
                if i == 4 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn transactional_and_control_flags() {
        let blob = encode_records(&[rec(b"k", &[])]);
        let data = build_batch(0x10 | 0x20, 1, &blob);
        let batch = batches(&data).next().unwrap().unwrap();
        assert!(batch.header.is_transactional());
        assert!(batch.header.is_control());
        assert_eq!(batch.compression(), Compression::None);
    }

    // ---- malformed input ----

    #[test]
    fn every_truncation_of_a_batch_is_an_error() {
        let mut inflater = Inflater::new(MB);
        for codec in ALL_CODECS {
            let data = kp_batch(&sample_records(20), codec);
            // (Zero bytes is zero batches, which is fine.)
            for cut in 1..data.len() {
                assert!(
                    read_all(&data[..cut], &mut inflater).is_err(),
                    "{codec:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn every_truncation_of_a_records_blob_is_an_error() {
        // The framing stays valid (length and CRC fixed up); only the records are cut short.
        let records = sample_records(20);
        let blob = encode_records(&records);
        let mut inflater = Inflater::new(MB);
        for codec in ALL_CODECS {
            let compressed = compress(codec, &blob);
            for cut in 0..compressed.len() {
                let data = build_batch(codec_id(codec), 20, &compressed[..cut]);
                assert!(
                    read_all(&data, &mut inflater).is_err(),
                    "{codec:?} cut at {cut} of {}",
                    compressed.len()
                );
            }
        }
        let raw = raw_snappy(&blob);
        for cut in 0..raw.len() {
            let data = build_batch(2, 20, &raw[..cut]);
            assert!(
                read_all(&data, &mut inflater).is_err(),
                "raw snappy cut at {cut}"
            );
        }
    }

    #[test]
    fn bytes_after_a_compressed_stream_are_an_error() {
        // Stricter than the broker, which stops reading at the end of the stream.
        let records = sample_records(20);
        let blob = encode_records(&records);
        let mut inflater = Inflater::new(MB);
        for codec in &ALL_CODECS[1..] {
            for tail in [&[0u8][..], &[0; 12], b"garbage"] {
                let mut compressed = compress(*codec, &blob);
                compressed.extend_from_slice(tail);
                let data = build_batch(codec_id(*codec), 20, &compressed);
                assert!(
                    read_all(&data, &mut inflater).is_err(),
                    "{codec:?} + {tail:?}"
                );
            }
        }
    }

    #[test]
    fn corrupted_crc_is_detected() {
        let data = kp_batch(&sample_records(10), Compression::None);
        assert!(batches(&data).next().unwrap().unwrap().verify_crc());
        for at in [CRC_OFFSET, ATTRIBUTES_OFFSET + 5, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            let batch = batches(&bad).next().unwrap().unwrap();
            assert!(!batch.verify_crc(), "flip at {at}");
        }
        // The leader epoch sits before the attributes: not covered, by Kafka's design.
        let mut epoch = data.clone();
        epoch[12] ^= 1;
        assert!(batches(&epoch).next().unwrap().unwrap().verify_crc());
    }

    #[test]
    fn decompression_bombs_hit_the_cap() {
        let zeros = vec![0u8; 10 * MB];
        let bombs = [
            (1, gzip(&zeros)),
            (2, xerial_snappy(&zeros, 32 * 1024)),
            (2, raw_snappy(&zeros)),
            (3, lz4_frame(&zeros, lz4_flex::frame::FrameInfo::new())),
            (
                3,
                lz4_frame(
                    &zeros,
                    lz4_flex::frame::FrameInfo::new().content_size(Some(zeros.len() as u64)),
                ),
            ),
            (4, zstd(&zeros)),
            (4, {
                // Streamed, so the frame does not declare its size.
                let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
                enc.write_all(&zeros).unwrap();
                enc.finish().unwrap()
            }),
        ];
        let mut inflater = Inflater::new(MB);
        for (codec, bomb) in bombs {
            assert!(bomb.len() < MB, "codec {codec}: the bomb itself is small");
            let data = build_batch(codec, 1, &bomb);
            assert_eq!(
                first_error(&data, &mut inflater),
                RecordsError::DecompressedTooLarge { limit: MB },
                "codec {codec}"
            );
            assert!(
                inflater.buffer_bytes() <= MB + 1,
                "codec {codec}: buffer stayed capped"
            );
        }
    }

    #[test]
    fn zstd_window_is_bounded_by_the_cap() {
        use zstd::stream::raw::CParameter;
        let blob = encode_records(&sample_records(20));
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(CParameter::WindowLog(25)).unwrap();
        enc.write_all(&blob).unwrap();
        let data = build_batch(4, 20, &enc.finish().unwrap());
        // A 32 MiB window against a 1 MiB cap: refused before the decoder allocates it.
        assert!(matches!(
            first_error(&data, &mut Inflater::new(MB)),
            RecordsError::Decompress {
                codec: Compression::Zstd,
                ..
            }
        ));
        // A 64 MiB cap allows windows up to 64 MiB.
        assert!(read_all(&data, &mut Inflater::new(64 * MB)).is_ok());
    }

    #[test]
    fn cap_is_exact() {
        let records = sample_records(40);
        let blob = encode_records(&records);
        for codec in &ALL_CODECS[1..] {
            let data = build_batch(codec_id(*codec), 40, &compress(*codec, &blob));
            let mut at_cap = Inflater::new(blob.len());
            assert_eq!(read_all(&data, &mut at_cap).unwrap(), records, "{codec:?}");
            let mut below = Inflater::new(blob.len() - 1);
            assert_eq!(
                first_error(&data, &mut below),
                RecordsError::DecompressedTooLarge {
                    limit: blob.len() - 1
                },
                "{codec:?}"
            );
        }
    }

    #[test]
    fn inflater_recovers_after_errors() {
        let good = kp_batch(&sample_records(30), Compression::Zstd);
        let records = sample_records(30);
        let mut inflater = Inflater::new(MB);
        let mut truncated_frame = zstd(&encode_records(&records));
        truncated_frame.truncate(truncated_frame.len() / 2);
        let bad = build_batch(4, 30, &truncated_frame);
        assert!(read_all(&bad, &mut inflater).is_err());
        assert_eq!(read_all(&good, &mut inflater).unwrap(), records);
        inflater.release_memory();
        assert_eq!(read_all(&good, &mut inflater).unwrap(), records);
    }

    #[test]
    fn framing_errors() {
        let blob = encode_records(&[rec(b"k", &[])]);
        let good = build_batch(0, 1, &blob);
        let mut inflater = Inflater::new(MB);

        for magic in [0u8, 1, 3] {
            let mut m = good.clone();
            m[MAGIC_OFFSET] = magic;
            assert_eq!(
                first_error(&m, &mut inflater),
                RecordsError::UnsupportedMagic(magic as i8)
            );
        }
        for codec in 5..=7 {
            assert_eq!(
                first_error(&build_batch(codec, 1, &blob), &mut inflater),
                RecordsError::UnknownCompression(codec)
            );
        }
        for len in [-1i32, 0, 48, i32::MIN] {
            let mut m = good.clone();
            m[8..12].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                first_error(&m, &mut inflater),
                RecordsError::BadLength {
                    what: "batch",
                    len: len.into()
                }
            );
        }
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            first_error(&huge, &mut inflater),
            RecordsError::Truncated { what: "batch", .. }
        ));
        assert!(matches!(
            first_error(&build_batch(0, -1, &blob), &mut inflater),
            RecordsError::BadLength {
                what: "record count",
                len: -1
            }
        ));
        assert_eq!(
            first_error(&build_batch(0, 2, &blob), &mut inflater),
            RecordsError::RecordCountMismatch {
                declared: 2,
                found: 1
            }
        );
        assert_eq!(
            first_error(&build_batch(0, i32::MAX, &blob), &mut inflater),
            RecordsError::RecordCountMismatch {
                declared: i32::MAX,
                found: 1
            }
        );
        assert!(matches!(
            first_error(&build_batch(0, 0, &blob), &mut inflater),
            RecordsError::TrailingBytes { .. }
        ));
        // A valid batch followed by a few stray bytes.
        let mut tail = good.clone();
        tail.extend_from_slice(&[0, 0, 0]);
        assert!(matches!(
            first_error(&tail, &mut inflater),
            RecordsError::Truncated { .. }
        ));
        // The iterator stops after an error.
        let mut two = tail.clone();
        two.extend_from_slice(&good);
        let results: Vec<_> = batches(&two).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok() && results[1].is_err());
        // Compressed data that is not what the codec says.
        for codec in 1..=4 {
            assert!(matches!(
                first_error(&build_batch(codec, 1, &blob), &mut inflater),
                RecordsError::Decompress { .. }
            ));
        }
    }

    /// A single-record batch with the record body given byte by byte.
    fn batch_with_record_body(body: &[u8]) -> Vec<u8> {
        let mut blob = Vec::new();
        put_varlong(&mut blob, body.len() as i64);
        blob.extend_from_slice(body);
        build_batch(0, 1, &blob)
    }

    /// attributes, timestampDelta, offsetDelta.
    const PREFIX: [u8; 3] = [0, 0, 0];

    #[test]
    fn record_errors() {
        let mut inflater = Inflater::new(MB);
        let mut check = |body: &[u8], expected: RecordsError| {
            let data = batch_with_record_body(body);
            assert_eq!(first_error(&data, &mut inflater), expected, "{body:?}");
        };
        let cat = |parts: &[&[u8]]| parts.concat();

        // key length -2 (zigzag 3)
        check(
            &cat(&[&PREFIX, &[3, 0, 0]]),
            RecordsError::BadLength {
                what: "record key",
                len: -2,
            },
        );
        // value length -100
        check(
            &cat(&[&PREFIX, &[0, 0xc7, 0x01, 0]]),
            RecordsError::BadLength {
                what: "record value",
                len: -100,
            },
        );
        // key longer than the record
        check(
            &cat(&[&PREFIX, &[20, b'a']]),
            RecordsError::Truncated {
                what: "record key",
                needed: 10,
                available: 1,
            },
        );
        // garbage after the headers
        check(
            &cat(&[&PREFIX, &[0, 0, 0, 0xAA, 0xBB]]),
            RecordsError::TrailingBytes {
                what: "record's headers",
                count: 2,
            },
        );
        // negative header count
        check(
            &cat(&[&PREFIX, &[0, 0, 1]]),
            RecordsError::BadLength {
                what: "header count",
                len: -1,
            },
        );
        // more headers declared than present
        check(
            &cat(&[&PREFIX, &[0, 0, 4, 2, b'h', 0]]),
            RecordsError::Truncated {
                what: "varint",
                needed: 1,
                available: 0,
            },
        );
        // null header key
        check(
            &cat(&[&PREFIX, &[0, 0, 2, 1, 0]]),
            RecordsError::BadLength {
                what: "header key",
                len: -1,
            },
        );
        // header value length -3
        check(
            &cat(&[&PREFIX, &[0, 0, 2, 2, b'h', 5]]),
            RecordsError::BadLength {
                what: "header value",
                len: -3,
            },
        );
        // varint cut short by the record's end
        check(
            &cat(&[&PREFIX, &[0x80]]),
            RecordsError::Truncated {
                what: "varint",
                needed: 2,
                available: 1,
            },
        );
        // 6-byte varint / 5-byte varint with bits past 32
        check(
            &cat(&[&PREFIX, &[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]]),
            RecordsError::BadVarint,
        );
        check(
            &cat(&[&PREFIX, &[0x80, 0x80, 0x80, 0x80, 0x10]]),
            RecordsError::BadVarint,
        );
        // 11-byte varlong timestamp delta
        check(
            &[
                0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ],
            RecordsError::BadVarint,
        );
        // empty record
        check(
            &[],
            RecordsError::Truncated {
                what: "record attributes",
                needed: 1,
                available: 0,
            },
        );

        // Negative record length.
        let mut blob = Vec::new();
        put_varlong(&mut blob, -5);
        blob.extend_from_slice(&[0; 8]);
        assert_eq!(
            first_error(&build_batch(0, 1, &blob), &mut inflater),
            RecordsError::BadLength {
                what: "record",
                len: -5
            }
        );
    }

    #[test]
    fn malformed_headers_fail_even_if_the_callback_ignores_them() {
        let good = encode_records(&[rec(b"a", &[(b"x", Some(b"1"))])]);
        let mut bad = Vec::new();
        let body = [&PREFIX[..], &[2, b'b', 0, 2, 2, b'h', 5]].concat();
        put_varlong(&mut bad, body.len() as i64);
        bad.extend_from_slice(&body);
        let blob = [good, bad].concat();
        for codec in ALL_CODECS {
            let data = build_batch(codec_id(codec), 2, &compress(codec, &blob));
            let batch = batches(&data).next().unwrap().unwrap();
            let mut calls = 0;
            let result = batch.for_each_record(&mut Inflater::new(MB), |_, r| {
                calls += 1;
                assert_eq!(r.key(), Some(&b"a"[..]));
                ControlFlow::Continue(())
            });
            assert!(result.is_err(), "{codec:?}");
            assert_eq!(calls, 1, "the bad record never reaches the callback");
        }
    }

    #[test]
    fn varint_edges() {
        for v in [0i64, 1, -1, 63, -64, 64, i32::MAX.into(), i32::MIN.into()] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            let mut cur = &b[..];
            assert_eq!(i64::from(read_varint(&mut cur).unwrap()), v);
            assert!(cur.is_empty());
        }
        for v in [i64::MAX, i64::MIN, 1 << 40, -(1 << 40)] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            let mut cur = &b[..];
            assert_eq!(read_varlong(&mut cur).unwrap(), v);
            assert!(cur.is_empty());
        }
        // Non-minimal but in range: accepted, as the broker does.
        let mut cur = &[0x81, 0x80, 0x00][..];
        assert_eq!(read_varint(&mut cur).unwrap(), -1);
    }

    #[test]
    fn inflater_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Inflater>();
        assert_send::<Batch<'static>>();
    }

    // ---- properties ----

    fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max)
    }

    fn arb_record() -> impl Strategy<Value = Rec> {
        (
            prop::option::of(arb_bytes(40)),
            prop::option::of(arb_bytes(200)),
            prop::collection::vec((arb_bytes(10), prop::option::of(arb_bytes(20))), 0..4),
        )
            .prop_map(|(key, value, headers)| Rec {
                key,
                value,
                headers,
            })
    }

    /// Parses everything, touching every field; the result does not matter, only not panicking.
    fn exercise(data: &[u8], inflater: &mut Inflater) {
        for batch in batches(data) {
            let Ok(batch) = batch else { break };
            let _ = batch.verify_crc();
            let _ = batch.for_each_record(inflater, |_, r| {
                let _ = (r.key(), r.value(), r.header(b"region"));
                for (k, v) in r.headers() {
                    let _ = (k.len(), v.map(<[u8]>::len));
                }
                ControlFlow::Continue(())
            });
        }
    }

    /// Small valid batches of every codec, built once, to mutate.
    fn seeds() -> &'static [Vec<u8>] {
        static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        SEEDS.get_or_init(|| {
            let records = sample_records(12);
            let mut seeds: Vec<Vec<u8>> =
                ALL_CODECS.iter().map(|c| kp_batch(&records, *c)).collect();
            let blob = encode_records(&records);
            seeds.push(build_batch(2, 12, &raw_snappy(&blob)));
            seeds.push(build_batch(
                3,
                12,
                &lz4_frame(
                    &blob,
                    lz4_flex::frame::FrameInfo::new()
                        .block_mode(lz4_flex::frame::BlockMode::Linked)
                        .content_size(Some(blob.len() as u64)),
                ),
            ));
            seeds
        })
    }

    proptest! {
        #[test]
        fn prop_arbitrary_records_round_trip(
            records in prop::collection::vec(arb_record(), 0..20),
            codec in prop::sample::select(&ALL_CODECS[..]),
        ) {
            let blob = encode_records(&records);
            let data = build_batch(codec_id(codec), records.len() as i32, &compress(codec, &blob));
            prop_assert!(batches(&data).next().unwrap().unwrap().verify_crc());
            prop_assert_eq!(read_all(&data, &mut Inflater::new(MB)).unwrap(), records);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(data in arb_bytes(2048)) {
            exercise(&data, &mut Inflater::new(64 * 1024));
        }

        #[test]
        fn prop_arbitrary_bytes_after_a_valid_header_never_panic(
            codec in 0i16..8,
            count in -2i32..50,
            blob in arb_bytes(1024),
        ) {
            exercise(&build_batch(codec, count, &blob), &mut Inflater::new(64 * 1024));
        }

        #[test]
        fn prop_mutated_batches_never_panic(
            seed in 0usize..7,
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let mut data = seeds()[seed].clone();
            for (at, byte) in mutations {
                let i = at.index(data.len());
                data[i] = byte;
            }
            if let Some(cut) = cut {
                data.truncate(cut.index(data.len() + 1));
            }
            exercise(&data, &mut Inflater::new(256 * 1024));
        }

        #[test]
        fn prop_mutated_records_with_valid_framing_never_panic(
            codec in prop::sample::select(&ALL_CODECS[..]),
            mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            // Mutate the records blob (compressed or not), then rebuild length and CRC so the
            // mutation reaches the decompressor and the record walker.
            let records = sample_records(12);
            let mut blob = compress(codec, &encode_records(&records));
            for (at, byte) in mutations {
                let i = at.index(blob.len());
                blob[i] = byte;
            }
            exercise(&build_batch(codec_id(codec), 12, &blob), &mut Inflater::new(256 * 1024));
        }
    }

    // ---- microbench ----

    /// Order-of-magnitude check of the hot path, not a benchmark suite: 10k records with a
    /// 13-byte key, a 100-byte value (text-like, compresses about 2-3x) and one header; the
    /// callback reads the key and looks the header up, as policy would. Best of 5 rounds, since
    /// the machine is shared. Run with
    /// `cargo test --release --lib codec::records::tests::microbench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn microbench() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next_char = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b"abcdefghij {}:,0123"[(state % 19) as usize]
        };
        let records: Vec<Rec> = (0..10_000)
            .map(|i| Rec {
                key: Some(format!("user-{i:08}").into_bytes()),
                value: Some((0..100).map(|_| next_char()).collect()),
                headers: vec![(b"region".to_vec(), Some(b"eu-west-1".to_vec()))],
            })
            .collect();
        let mut inflater = Inflater::new(64 * MB);
        for codec in ALL_CODECS {
            let data = kp_batch(&records, codec);
            let batch = batches(&data).next().unwrap().unwrap();
            let mut found = 0usize;
            let mut walk = |inflater: &mut Inflater| {
                batch
                    .for_each_record(inflater, |_, r| {
                        found += usize::from(r.key().is_some());
                        found += usize::from(r.header(b"region").is_some());
                        ControlFlow::Continue(())
                    })
                    .unwrap();
            };
            walk(&mut inflater); // warm up: buffer grown, zstd context created
            let mut best = 0f64;
            for _ in 0..5 {
                let start = Instant::now();
                let mut walked = 0usize;
                while start.elapsed() < Duration::from_millis(150) {
                    walk(&mut inflater);
                    walked += records.len();
                }
                best = best.max(walked as f64 / start.elapsed().as_secs_f64());
            }
            let crc_start = Instant::now();
            let crc_ok = (0..100).filter(|_| batch.verify_crc()).count();
            let crc_us = crc_start.elapsed().as_secs_f64() / 100.0 * 1e6;
            println!(
                "{:>6}: {:>6.2} M records/s ({:>5.0} ns/record), batch {:>7} bytes, crc {:>5.0} us/batch ({crc_ok}/100 ok)",
                format!("{codec:?}"),
                best / 1e6,
                1e9 / best,
                data.len(),
                crc_us,
            );
            assert!(found > 0);
        }
    }
}
