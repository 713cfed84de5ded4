//! Decompression of a record batch's `records` blob into a reusable, size-capped buffer.
//!
//! Owns the codec quirks Kafka clients produce in the wild (xerial-framed or raw snappy, the LZ4
//! frame format, multi-member gzip, multi-frame zstd) and the decompression-bomb guard. It must
//! not parse records (that is [`super::records`]) and must not allocate per record: the output
//! buffer and the zstd context live in [`Inflater`] and are reused across batches, snappy and
//! LZ4 decode straight into that buffer, and only gzip builds its (small) inflate state per batch.
//!
//! [`compress`] is the way back, for the parts of a split batch ([`super::split`]): each codec in
//! the form the Java client writes and brokers read.
//!
//! Checksums inside the compressed stream (LZ4 header/block/content xxhash, snappy framing) are
//! skipped, not verified: the batch CRC-32C already covers the compressed bytes, and accepting a
//! stream the broker would reject can only make the broker refuse the write.

use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use lz4_flex::block::DecompressError as Lz4Error;
use zstd::stream::raw::{DParameter, InBuffer, Operation as _, OutBuffer};

use super::records::RecordsError;

/// The codec of a record batch (attributes bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// Reads the codec from batch attributes; ids 5-7 are an error rather than a guess, since a
    /// record we cannot read is a record whose owner we cannot check.
    pub fn from_attributes(attributes: i16) -> Result<Self, RecordsError> {
        match attributes & 0x07 {
            0 => Ok(Self::None),
            1 => Ok(Self::Gzip),
            2 => Ok(Self::Snappy),
            3 => Ok(Self::Lz4),
            4 => Ok(Self::Zstd),
            id => Err(RecordsError::UnknownCompression(id)),
        }
    }

    /// Lower-case name, as Kafka's `compression.type` spells it: a bounded metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Smallest growth step of the output buffer, so small batches do not resize repeatedly.
const MIN_GROW: usize = 64 * 1024;
/// Read size for the streaming (gzip) decoder.
const STREAM_CHUNK: usize = 64 * 1024;
/// zstd window log accepted by default: 8 MiB covers every non-"ultra" level (1-19). A frame's
/// window is allocated up front by the decoder whatever the real content size, so this bounds the
/// memory one hostile frame can make a connection hold.
const ZSTD_MIN_WINDOW_LOG_MAX: u32 = 23;
/// Hard ceiling for the zstd window log (1 GiB), whatever the configured cap.
const ZSTD_MAX_WINDOW_LOG_MAX: u32 = 30;
/// LZ4 matches reach at most 64 KiB back; that is all a linked block needs from earlier output.
const LZ4_WINDOW: usize = 64 * 1024;
const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;
const LZ4_SKIPPABLE_MAGIC: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;
/// snappy-java's stream header: this magic, then big-endian version and compatible-version ints.
const XERIAL_MAGIC: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
const XERIAL_HEADER_LEN: usize = 16;

/// Memory after a batch above which a connection's [`Inflater`] frees its buffers instead of
/// keeping them for the next batch. Typical batches (the Java client's 16 KiB, librdkafka's up
/// to 1 MB) decompress within it, so steady traffic does not allocate per batch; a large batch
/// does not leave its high-water mark behind on a connection that may stay idle for hours.
pub const RETAINED_BYTES: usize = 1024 * 1024;

/// The same for a zstd context. The Java client compresses zstd as a stream (level 3, a 2 MiB
/// window, no content size), so its context takes a little over 2 MiB whatever the batch size;
/// keeping it spares a 2 MiB allocation per batch, and the budget still bounds the total.
pub const RETAINED_ZSTD_BYTES: usize = 4 * 1024 * 1024;

/// The decompression memory all connections may hold together (`limits.
/// max_decompressed_bytes_total`). Each [`Inflater`] takes from it before it grows its output
/// buffer or its zstd context and gives back what it frees, so the sum of every connection's
/// buffers never exceeds the limit, however many connections send large batches at once.
#[derive(Debug)]
pub struct DecompressionBudget {
    limit: usize,
    used: AtomicUsize,
}

impl DecompressionBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the inflaters hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Reusable per-connection scratch state for decompressing record batches.
///
/// Holds the output buffer (grown on demand, never beyond `max_decompressed_bytes + 1`) and a
/// lazily created zstd decoder context. Both are kept between batches while they are small
/// ([`RETAINED_BYTES`], [`RETAINED_ZSTD_BYTES`]), so steady-state decompression does not
/// allocate, and freed after a batch that needed more (see [`Inflater::trim`]). With a [`DecompressionBudget`], every byte
/// of either is taken from it first; a batch that does not fit is
/// [`RecordsError::MemoryBudgetExhausted`].
pub struct Inflater {
    max: usize,
    /// Zero-initialised scratch. Its `len()` is the high-water mark, not the payload length: it
    /// is not shrunk between batches (below [`RETAINED_BYTES`]) so the memory is not zeroed again.
    buf: Vec<u8>,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
    zstd_window_log_max: u32,
    budget: Option<Arc<DecompressionBudget>>,
    /// Taken from the budget for `buf` (its capacity).
    charged_buf: usize,
    /// Taken from the budget for the zstd context: its base size plus the buffers the largest
    /// frame it decoded made it allocate (estimated from the frame headers, before decoding).
    charged_zstd: usize,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("max_decompressed_bytes", &self.max)
            .field("buffer_bytes", &self.buf.len())
            .field("zstd_context", &self.zstd.is_some())
            .field("charged", &(self.charged_buf + self.charged_zstd))
            .finish()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        self.release_memory();
    }
}

impl Inflater {
    /// `max_decompressed_bytes` is the most one batch may inflate to; more is
    /// [`RecordsError::DecompressedTooLarge`]. A sensible value is the broker's
    /// `message.max.bytes` times the worst compression ratio you accept.
    ///
    /// zstd frames may declare a window of up to `max(8 MiB, max_decompressed_bytes)` (rounded up
    /// to a power of two, at most 1 GiB); frames asking for more are rejected, since only
    /// zstd "ultra" levels (20-22) produce them.
    pub fn new(max_decompressed_bytes: usize) -> Self {
        let needed_log = usize::BITS - max_decompressed_bytes.saturating_sub(1).leading_zeros();
        Self {
            max: max_decompressed_bytes,
            buf: Vec::new(),
            zstd: None,
            zstd_window_log_max: needed_log.clamp(ZSTD_MIN_WINDOW_LOG_MAX, ZSTD_MAX_WINDOW_LOG_MAX),
            budget: None,
            charged_buf: 0,
            charged_zstd: 0,
        }
    }

    /// An inflater whose memory counts against `budget`, shared with other connections.
    pub fn with_budget(max_decompressed_bytes: usize, budget: Arc<DecompressionBudget>) -> Self {
        let mut inflater = Self::new(max_decompressed_bytes);
        inflater.budget = Some(budget);
        inflater
    }

    /// The cap given to [`Inflater::new`].
    pub fn max_decompressed_bytes(&self) -> usize {
        self.max
    }

    /// Bytes held by the output buffer (the zstd context's own memory is not counted).
    pub fn buffer_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes this inflater has taken from its budget (0 without one).
    pub fn charged_bytes(&self) -> usize {
        self.charged_buf + self.charged_zstd
    }

    /// Frees the output buffer and the zstd context, e.g. for a connection that went idle. The
    /// next compressed batch allocates them again.
    pub fn release_memory(&mut self) {
        self.buf = Vec::new();
        self.zstd = None;
        let held = std::mem::take(&mut self.charged_buf) + std::mem::take(&mut self.charged_zstd);
        self.give_back(held);
    }

    /// Called after each batch: keeps the output buffer for the next one only up to
    /// [`RETAINED_BYTES`] and the zstd context only up to [`RETAINED_ZSTD_BYTES`], and neither
    /// while the budget is more than half used. So a connection that went quiet after a large
    /// batch never holds its high-water mark, and what idle connections keep can never take
    /// more than about half the budget from connections with work to do.
    pub fn trim(&mut self) {
        if self.buf.capacity() == 0 && self.charged_zstd == 0 {
            return; // uncompressed traffic: nothing held, nothing to check
        }
        let pressed = self
            .budget
            .as_ref()
            .is_some_and(|b| b.used() > b.limit() / 2);
        if pressed || self.buf.capacity() > RETAINED_BYTES {
            self.buf = Vec::new();
            let held = std::mem::take(&mut self.charged_buf);
            self.give_back(held);
        }
        if pressed || self.charged_zstd > RETAINED_ZSTD_BYTES {
            self.zstd = None;
            let held = std::mem::take(&mut self.charged_zstd);
            self.give_back(held);
        }
    }

    fn give_back(&self, bytes: usize) {
        if let Some(budget) = &self.budget
            && bytes > 0
        {
            budget.give_back(bytes);
        }
    }

    /// Takes `bytes` more from the budget, if there is one.
    fn charge(&self, bytes: usize) -> Result<(), RecordsError> {
        match &self.budget {
            Some(budget) if bytes > 0 && !budget.try_take(bytes) => {
                Err(RecordsError::MemoryBudgetExhausted {
                    limit: budget.limit(),
                })
            }
            _ => Ok(()),
        }
    }

    /// A reservation on this inflater's budget (none without one), for buffers built from a
    /// batch outside the inflater, such as the parts of a split.
    pub(crate) fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.budget.clone(),
            bytes: 0,
        }
    }

    /// Decompresses one batch's records blob. For [`Compression::None`] the input is returned
    /// as is; otherwise the result borrows this inflater's buffer until the next call.
    pub fn decompress<'s>(
        &'s mut self,
        codec: Compression,
        input: &'s [u8],
    ) -> Result<&'s [u8], RecordsError> {
        let len = match codec {
            Compression::None => return Ok(input),
            Compression::Gzip => self.gzip(input)?,
            Compression::Snappy => self.snappy(input)?,
            Compression::Lz4 => self.lz4(input)?,
            Compression::Zstd => self.zstd(input)?,
        };
        Ok(&self.buf[..len])
    }

    fn too_large(&self) -> RecordsError {
        RecordsError::DecompressedTooLarge { limit: self.max }
    }

    /// Makes `buf[filled..]` at least `want` bytes long where the cap allows, and returns it.
    /// The buffer never exceeds `max + 1` bytes: one byte over the cap is how we detect a bomb.
    /// Callers keep `filled <= max`, so the returned slice is never empty. Growing takes the
    /// new bytes from the budget first.
    fn room(&mut self, filled: usize, want: usize) -> Result<&mut [u8], RecordsError> {
        let cap = self.max.saturating_add(1);
        let want_end = filled.saturating_add(want).min(cap);
        if self.buf.len() < want_end {
            let mut target = want_end
                .max(self.buf.len().saturating_mul(2))
                .max(MIN_GROW)
                .min(cap);
            let before = self.buf.capacity();
            if target > before && self.charge(target - before).is_err() {
                // Doubling does not fit: grow only by what this call needs.
                target = want_end;
                self.charge(target.saturating_sub(before))?;
            }
            // Exactly `target`, so the charge is the allocation (no amortised doubling).
            self.buf.reserve_exact(target - self.buf.len());
            let grown = self.buf.capacity() - before;
            let extra = grown.saturating_sub(target.saturating_sub(before));
            if let Some(budget) = &self.budget
                && extra > 0
            {
                // Vec may hold more than asked; count what it really holds.
                budget.used.fetch_add(extra, Ordering::AcqRel);
            }
            self.charged_buf += grown;
            self.buf.resize(target, 0);
        }
        Ok(&mut self.buf[filled..])
    }

    fn gzip(&mut self, input: &[u8]) -> Result<usize, RecordsError> {
        // Java's GZIPInputStream reads concatenated members, so we do too.
        let mut decoder = flate2::bufread::MultiGzDecoder::new(input);
        let mut filled = 0;
        loop {
            let room = self.room(filled, STREAM_CHUNK)?;
            match decoder.read(room) {
                Ok(0) => return Ok(filled),
                Ok(n) => {
                    filled += n;
                    if filled > self.max {
                        return Err(self.too_large());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(decompress_error(Compression::Gzip, e)),
            }
        }
    }

    fn snappy(&mut self, input: &[u8]) -> Result<usize, RecordsError> {
        // Same rule as snappy-java's SnappyInputStream: a full 16-byte header starting with the
        // magic means xerial framing, anything else is one raw snappy block (librdkafka).
        if input.len() >= XERIAL_HEADER_LEN && input.starts_with(&XERIAL_MAGIC) {
            self.xerial_snappy(&input[XERIAL_HEADER_LEN..])
        } else {
            self.snappy_block(input, 0)
        }
    }

    fn xerial_snappy(&mut self, mut input: &[u8]) -> Result<usize, RecordsError> {
        let mut filled = 0;
        while !input.is_empty() {
            let len =
                take_u32_be(&mut input).ok_or_else(|| snappy_error("truncated block length"))?;
            if len.to_be_bytes() == XERIAL_MAGIC[..4] {
                // Another stream's header (concatenated streams): skip the rest of it.
                let rest = take(&mut input, XERIAL_HEADER_LEN - 4)
                    .ok_or_else(|| snappy_error("truncated stream header"))?;
                if rest[..4] != XERIAL_MAGIC[4..] {
                    return Err(snappy_error("bad stream header"));
                }
                continue;
            }
            let block = take(&mut input, len as usize)
                .ok_or_else(|| snappy_error("block longer than the data"))?;
            filled = self.snappy_block(block, filled)?;
        }
        Ok(filled)
    }

    /// Decompresses one raw snappy block at `buf[filled..]`; returns the new fill.
    fn snappy_block(&mut self, block: &[u8], filled: usize) -> Result<usize, RecordsError> {
        if block.is_empty() {
            return Err(snappy_error("empty block"));
        }
        let len = snap::raw::decompress_len(block)
            .map_err(|e| decompress_error(Compression::Snappy, e))?;
        // The declared length is checked before anything is allocated for it.
        if len > self.max - filled {
            return Err(self.too_large());
        }
        let out = &mut self.room(filled, len)?[..len];
        let written = snap::raw::Decoder::new()
            .decompress(block, out)
            .map_err(|e| decompress_error(Compression::Snappy, e))?;
        Ok(filled + written)
    }

    /// The LZ4 frame format, decoded block by block straight into the output buffer: no
    /// intermediate copy, no allocation. Linked blocks use the previous 64 KiB of the same frame's
    /// output as their dictionary. Concatenated and skippable frames are accepted.
    fn lz4(&mut self, mut input: &[u8]) -> Result<usize, RecordsError> {
        if input.is_empty() {
            return Err(lz4_error("empty input"));
        }
        let mut filled = 0;
        while !input.is_empty() {
            let magic = take_u32_le(&mut input).ok_or_else(|| lz4_error("truncated magic"))?;
            if LZ4_SKIPPABLE_MAGIC.contains(&magic) {
                let len = take_u32_le(&mut input)
                    .ok_or_else(|| lz4_error("truncated skippable frame"))?;
                take(&mut input, len as usize)
                    .ok_or_else(|| lz4_error("truncated skippable frame"))?;
                continue;
            }
            if magic != LZ4_FRAME_MAGIC {
                return Err(lz4_error("bad frame magic"));
            }
            filled = self.lz4_frame(&mut input, filled)?;
        }
        Ok(filled)
    }

    fn lz4_frame(&mut self, input: &mut &[u8], mut filled: usize) -> Result<usize, RecordsError> {
        let [flg, bd] = take_array(input).ok_or_else(|| lz4_error("truncated frame header"))?;
        if flg >> 6 != 0b01 {
            return Err(lz4_error("unsupported frame version"));
        }
        if flg & 0b0000_0010 != 0 || bd & 0b1000_1111 != 0 {
            return Err(lz4_error("reserved bits set in frame header"));
        }
        if flg & 0b0000_0001 != 0 {
            return Err(lz4_error("dictionary ids are not supported"));
        }
        let independent = flg & 0b0010_0000 != 0;
        let block_checksum = flg & 0b0001_0000 != 0;
        let has_content_size = flg & 0b0000_1000 != 0;
        let content_checksum = flg & 0b0000_0100 != 0;
        let block_max = match (bd >> 4) & 0x07 {
            4 => 64 * 1024,
            5 => 256 * 1024,
            6 => 1024 * 1024,
            7 => 4 * 1024 * 1024,
            _ => return Err(lz4_error("bad block max size")),
        };
        let content_size = if has_content_size {
            let size = u64::from_le_bytes(
                take_array(input).ok_or_else(|| lz4_error("truncated content size"))?,
            );
            if size > (self.max - filled) as u64 {
                return Err(self.too_large());
            }
            Some(size)
        } else {
            None
        };
        // Header checksum: skipped (see the module docs).
        take(input, 1).ok_or_else(|| lz4_error("truncated frame header"))?;

        let frame_start = filled;
        loop {
            let word = take_u32_le(input).ok_or_else(|| lz4_error("truncated block size"))?;
            if word == 0 {
                break; // EndMark
            }
            let stored = word & 0x8000_0000 != 0;
            let len = (word & 0x7FFF_FFFF) as usize;
            if len > block_max {
                return Err(lz4_error("block larger than the frame's block max size"));
            }
            let block = take(input, len).ok_or_else(|| lz4_error("truncated block"))?;
            if block_checksum {
                take(input, 4).ok_or_else(|| lz4_error("truncated block checksum"))?;
            }
            if stored {
                if len > self.max - filled {
                    return Err(self.too_large());
                }
                self.room(filled, len)?[..len].copy_from_slice(block);
                filled += len;
                continue;
            }
            // Offer a whole block of room, but never more than one byte past the cap.
            let want = block_max.min(self.max - filled + 1);
            self.room(filled, want)?;
            let (before, after) = self.buf.split_at_mut(filled);
            let out = &mut after[..want];
            let result = if independent {
                lz4_flex::block::decompress_into(block, out)
            } else {
                let dict_start = frame_start.max(filled.saturating_sub(LZ4_WINDOW));
                lz4_flex::block::decompress_into_with_dict(block, out, &before[dict_start..])
            };
            let written = match result {
                Ok(n) => n,
                Err(Lz4Error::OutputTooSmall { .. }) if want < block_max => {
                    return Err(self.too_large());
                }
                Err(e) => return Err(decompress_error(Compression::Lz4, e)),
            };
            filled += written;
            if filled > self.max {
                return Err(self.too_large());
            }
        }
        if content_checksum {
            take(input, 4).ok_or_else(|| lz4_error("truncated content checksum"))?;
        }
        if content_size.is_some_and(|size| size != (filled - frame_start) as u64) {
            return Err(lz4_error("frame content size does not match its blocks"));
        }
        Ok(filled)
    }

    fn zstd(&mut self, input: &[u8]) -> Result<usize, RecordsError> {
        let window_log_max = self.zstd_window_log_max;
        // The decoder allocates its window as a frame starts: take that memory from the budget
        // before it can.
        let needed = zstd_context_bytes(input, window_log_max);
        if needed > self.charged_zstd {
            self.charge(needed - self.charged_zstd)?;
            self.charged_zstd = needed;
        }
        let mut decoder = match self.zstd.take() {
            Some(mut decoder) => {
                // A previous batch may have failed mid-frame: start a clean session.
                decoder
                    .reinit()
                    .map_err(|e| decompress_error(Compression::Zstd, e))?;
                decoder
            }
            None => {
                let mut decoder = zstd::stream::raw::Decoder::new()
                    .map_err(|e| decompress_error(Compression::Zstd, e))?;
                decoder
                    .set_parameter(DParameter::WindowLogMax(window_log_max))
                    .map_err(|e| decompress_error(Compression::Zstd, e))?;
                decoder
            }
        };
        let result = self.zstd_run(&mut decoder, input);
        self.zstd = Some(decoder);
        result
    }

    fn zstd_run(
        &mut self,
        decoder: &mut zstd::stream::raw::Decoder<'static>,
        input: &[u8],
    ) -> Result<usize, RecordsError> {
        let mut src = InBuffer::around(input);
        let mut filled = 0;
        loop {
            let room = self.room(filled, STREAM_CHUNK)?;
            let room_len = room.len();
            let mut out = OutBuffer::around(room);
            let consumed_before = src.pos();
            let hint = decoder
                .run(&mut src, &mut out)
                .map_err(|e| decompress_error(Compression::Zstd, e))?;
            let written = out.pos();
            filled += written;
            if filled > self.max {
                return Err(self.too_large());
            }
            let input_done = src.pos() == input.len();
            if written < room_len {
                // The decoder stopped for lack of input, not of room.
                if hint == 0 && input_done {
                    // Last frame complete and flushed. A following frame would restart here.
                    return Ok(filled);
                }
                if input_done {
                    return Err(zstd_error("truncated frame"));
                }
                if src.pos() == consumed_before && written == 0 {
                    return Err(zstd_error("decoder made no progress"));
                }
            }
        }
    }
}

/// Memory of a zstd decoding context before any frame: what `ZSTD_sizeof_DCtx` reports for a
/// fresh one (about 160 KiB: entropy tables and the literals buffer).
fn zstd_context_base() -> usize {
    static BASE: OnceLock<usize> = OnceLock::new();
    *BASE.get_or_init(|| {
        zstd::zstd_safe::DCtx::try_create().map_or(ZSTD_BLOCK_MAX * 2, |c| c.sizeof())
    })
}

/// Largest block of a zstd frame; also the decoder's input buffer.
const ZSTD_BLOCK_MAX: usize = 128 * 1024;

/// The memory a zstd context needs to stream-decode `input`: its base size plus, for the most
/// demanding frame, the window buffer and the input block buffer, as `ZSTD_decodingBufferSize_min`
/// sizes them (the window, capped by the declared content size when there is one). Windows over
/// `window_log_max` count at that limit: the decoder refuses such a frame before allocating.
pub(crate) fn zstd_context_bytes(mut input: &[u8], window_log_max: u32) -> usize {
    const MAGIC: u32 = 0xFD2F_B528;
    let window_cap = 1usize << window_log_max;
    let mut most = 0usize;
    // Each frame's header, as far as the frames can be delimited; an undecodable rest is
    // counted at the window limit (the decoder will fail on it, but may allocate first).
    while input.len() >= 4 {
        let magic = u32::from_le_bytes([input[0], input[1], input[2], input[3]]);
        let skippable = magic & 0xFFFF_FFF0 == 0x184D_2A50;
        if magic != MAGIC && !skippable {
            // Not a frame: the decoder refuses it before allocating anything for it.
            break;
        }
        if magic == MAGIC {
            let need = zstd_frame_window(&input[4..]).map_or(window_cap, |(window, content)| {
                let window = window.min(window_cap);
                let block = window.min(ZSTD_BLOCK_MAX);
                let out = window.saturating_add(block).saturating_add(64);
                content.map_or(out, |c| out.min(c)) + block
            });
            most = most.max(need);
        }
        match zstd::zstd_safe::find_frame_compressed_size(input) {
            Ok(n) if n > 0 && n <= input.len() => input = &input[n..],
            // Truncated or malformed: the decoder fails within this frame.
            _ => break,
        }
    }
    zstd_context_base() + most
}

/// (window size, declared content size) from a zstd frame header (`header` starts after the
/// magic), or `None` when it is too short to say.
fn zstd_frame_window(header: &[u8]) -> Option<(usize, Option<usize>)> {
    let descriptor = *header.first()?;
    let single_segment = descriptor & 0x20 != 0;
    let dict_id_len = [0usize, 1, 2, 4][usize::from(descriptor & 0x03)];
    let fcs_len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut at = 1;
    let window = if single_segment {
        None
    } else {
        let wd = *header.get(at)?;
        at += 1;
        let log = 10 + u32::from(wd >> 3);
        let base = 1u64.checked_shl(log)?;
        Some(base + (base / 8) * u64::from(wd & 0x07))
    };
    at += dict_id_len;
    let content = if fcs_len == 0 {
        None
    } else {
        let bytes = header.get(at..at + fcs_len)?;
        let mut raw = [0u8; 8];
        raw[..fcs_len].copy_from_slice(bytes);
        let value = u64::from_le_bytes(raw);
        Some(if fcs_len == 2 { value + 256 } else { value })
    };
    let window = window.or(content)?;
    let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Some((clamp(window), content.map(clamp)))
}

/// Memory taken from a [`DecompressionBudget`] for buffers an [`Inflater`] does not own; given
/// back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Option<Arc<DecompressionBudget>>,
    bytes: usize,
}

impl Reservation {
    /// Takes `bytes` more, or fails with [`RecordsError::MemoryBudgetExhausted`] and takes nothing.
    pub(crate) fn take(&mut self, bytes: usize) -> Result<(), RecordsError> {
        if let Some(budget) = &self.budget
            && bytes > 0
        {
            if !budget.try_take(bytes) {
                return Err(RecordsError::MemoryBudgetExhausted {
                    limit: budget.limit(),
                });
            }
            self.bytes += bytes;
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget
            && self.bytes > 0
        {
            budget.give_back(self.bytes);
        }
    }
}

/// gzip level: the Java client's default (`GZIPOutputStream`, deflate level 6).
const GZIP_LEVEL: u32 = 6;
/// zstd level: the Java client's default.
const ZSTD_LEVEL: i32 = 3;
/// Uncompressed bytes per xerial snappy block: snappy-java's `SnappyOutputStream` default.
const XERIAL_BLOCK: usize = 32 * 1024;
/// xerial stream header: magic, then version 1 and compatible version 1 (big-endian).
const XERIAL_HEADER: [u8; XERIAL_HEADER_LEN] = [
    0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0, 0, 0, 0, 1, 0, 0, 0, 1,
];
/// Uncompressed bytes per LZ4 block (block max size 64 KiB, the Java client's).
const LZ4_BLOCK: usize = 64 * 1024;
/// LZ4 frame header (magic, FLG, BD, header checksum) and end mark.
const LZ4_FRAME_OVERHEAD: usize = 4 + 3 + 4;

/// The most [`compress`] appends for `len` bytes with `codec`, so its output can be sized (and
/// taken from a budget) before it is written.
pub(crate) fn compress_bound(codec: Compression, len: usize) -> usize {
    let blocks = |size: usize| len.div_ceil(size).max(1);
    match codec {
        Compression::None => len,
        // Stored deflate blocks: 5 bytes per 16 KiB at worst, plus gzip header and trailer.
        Compression::Gzip => len + 5 * blocks(16 * 1024) + 18 + 64,
        Compression::Snappy => {
            XERIAL_HEADER_LEN
                + blocks(XERIAL_BLOCK) * (4 + snap::raw::max_compress_len(XERIAL_BLOCK))
        }
        Compression::Lz4 => {
            LZ4_FRAME_OVERHEAD
                + blocks(LZ4_BLOCK) * (4 + lz4_flex::block::get_maximum_output_size(LZ4_BLOCK))
        }
        Compression::Zstd => zstd::zstd_safe::compress_bound(len),
    }
}

/// Appends `data` to `out` compressed with `codec`, as the Java client writes it and brokers
/// read it: gzip (one member), xerial-framed snappy (32 KiB blocks), the LZ4 frame format
/// (independent 64 KiB blocks, no checksums but the header's; Kafka's LZ4 reader decodes each
/// block on its own), one zstd frame with its content size. [`Compression::None`] copies.
pub(crate) fn compress(
    codec: Compression,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let error = |e: &dyn std::fmt::Display| CompressError {
        codec,
        reason: e.to_string(),
    };
    match codec {
        Compression::None => out.extend_from_slice(data),
        Compression::Gzip => {
            use std::io::Write as _;
            let mut encoder = flate2::write::GzEncoder::new(
                std::mem::take(out),
                flate2::Compression::new(GZIP_LEVEL),
            );
            encoder.write_all(data).map_err(|e| error(&e))?;
            *out = encoder.finish().map_err(|e| error(&e))?;
        }
        Compression::Snappy => {
            out.extend_from_slice(&XERIAL_HEADER);
            let mut encoder = snap::raw::Encoder::new();
            for block in data.chunks(XERIAL_BLOCK) {
                let at = out.len();
                out.resize(at + 4 + snap::raw::max_compress_len(block.len()), 0);
                let written = encoder
                    .compress(block, &mut out[at + 4..])
                    .map_err(|e| error(&e))?;
                let len = u32::try_from(written).map_err(|e| error(&e))?;
                out[at..at + 4].copy_from_slice(&len.to_be_bytes());
                out.truncate(at + 4 + written);
            }
        }
        Compression::Lz4 => {
            use std::io::Write as _;
            let info = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent)
                .block_checksums(false)
                .content_checksum(false);
            let mut encoder =
                lz4_flex::frame::FrameEncoder::with_frame_info(info, std::mem::take(out));
            encoder.write_all(data).map_err(|e| error(&e))?;
            *out = encoder.finish().map_err(|e| error(&e))?;
        }
        Compression::Zstd => {
            let at = out.len();
            out.resize(at + zstd::zstd_safe::compress_bound(data.len()), 0);
            let written = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .and_then(|mut c| c.compress_to_buffer(data, &mut out[at..]))
                .map_err(|e| error(&e))?;
            out.truncate(at + written);
        }
    }
    Ok(())
}

/// A compressor failed: not the client's batch's fault (its records were all read), so
/// retriable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec:?} compression failed: {reason}")]
pub struct CompressError {
    pub codec: Compression,
    pub reason: String,
}

fn decompress_error(codec: Compression, e: impl std::fmt::Display) -> RecordsError {
    RecordsError::Decompress {
        codec,
        reason: e.to_string(),
    }
}

fn snappy_error(reason: &str) -> RecordsError {
    decompress_error(Compression::Snappy, reason)
}

fn lz4_error(reason: &str) -> RecordsError {
    decompress_error(Compression::Lz4, reason)
}

fn zstd_error(reason: &str) -> RecordsError {
    decompress_error(Compression::Zstd, reason)
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn take_array<const N: usize>(input: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = input.split_first_chunk::<N>()?;
    *input = rest;
    Some(*head)
}

fn take_u32_le(input: &mut &[u8]) -> Option<u32> {
    take_array(input).map(u32::from_le_bytes)
}

fn take_u32_be(input: &mut &[u8]) -> Option<u32> {
    take_array(input).map(u32::from_be_bytes)
}
