//! Splitting a record batch by owner on arbitrary bytes: framing, decompression, the record walk,
//! the re-encoding of each part and its re-compression with the batch's codec.
//!
//! Byte 0 picks the number of parts (1-4) and how owners are drawn; the rest is one record
//! batch. When the split succeeds, checks what the proxy will rely on: every part is one valid
//! batch (CRC, record count, offset deltas 0..n-1, the original attributes and producer) whose
//! records are the original records of that part's owner, in order, with the same absolute
//! timestamps, and the parts' runs cover every record once. A whole batch must have one owner.
#![no_main]

use std::ops::ControlFlow;

use keyward::codec::records::{BATCH_HEADER_LEN, Batch, BatchHeader, Inflater};
use keyward::codec::split::{Split, split};
use libfuzzer_sys::fuzz_target;

const MAX_DECOMPRESSED: usize = 1 << 20;

/// A record as compared: key, value, headers and absolute timestamp.
type Rec = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(Vec<u8>, Option<Vec<u8>>)>,
    i64,
);

/// Every record of the one batch in `data`, or `None` if it does not read.
fn records(data: &[u8], inflater: &mut Inflater) -> Option<(BatchHeader, Vec<Rec>)> {
    let (batch, rest) = Batch::parse(data).ok()?;
    assert!(rest.is_empty());
    let base = batch.header.base_timestamp;
    let mut out = Vec::new();
    batch
        .for_each_record(inflater, |index, record| {
            assert_eq!(index, out.len());
            out.push((
                record.key().map(<[u8]>::to_vec),
                record.value().map(<[u8]>::to_vec),
                record
                    .headers()
                    .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                    .collect(),
                base.wrapping_add(record.timestamp_delta()),
            ));
            ControlFlow::Continue(())
        })
        .ok()?;
    Some((batch.header, out))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, batch)) = data.split_first() else {
        return;
    };
    let parts = 1 + usize::from(selector & 0x03);
    let mut inflater = Inflater::new(MAX_DECOMPRESSED);
    // Owners from the record (key length and first byte) or from its index.
    let owner = |index: usize, key: Option<&[u8]>| match (selector >> 2) & 0x03 {
        0 => key.map_or(0, |k| k.len() + usize::from(k.first().copied().unwrap_or(0))),
        1 => index / 3,
        2 => index.wrapping_mul(0x9E37_79B9) >> 7,
        _ => 0,
    } % parts;

    let mut owners = Vec::new();
    let result = split(batch, &mut inflater, parts, |index, record| {
        owners.push(owner(index, record.key()));
        owner(index, record.key())
    });
    assert!(inflater.buffer_bytes() <= MAX_DECOMPRESSED + 1);
    let Ok(result) = result else { return };

    let (client, originals) =
        records(batch, &mut inflater).expect("a batch that split reads as a batch");
    assert!(!client.is_transactional() && !client.is_control());
    assert_eq!(owners.len(), originals.len(), "owner_of once per record");
    let parts = match result {
        Split::Whole { part } => {
            assert!(owners.iter().all(|&o| o == part));
            return;
        }
        Split::Parts(parts) => parts,
    };
    assert!(parts.len() >= 2);
    assert!(parts.windows(2).all(|p| p[0].part < p[1].part));
    let mut seen = vec![false; originals.len()];
    for part in &parts {
        let (header, got) = records(&part.batch, &mut inflater).expect("a part reads");
        let (parsed, _) = Batch::parse(&part.batch).expect("a part parses");
        assert!(parsed.verify_crc());
        assert!(part.batch.len() >= BATCH_HEADER_LEN);
        assert_eq!(header.attributes, client.attributes);
        assert_eq!(header.producer_id, client.producer_id);
        assert_eq!(header.producer_epoch, client.producer_epoch);
        assert_eq!(header.records_count as usize, part.records);
        assert_eq!(header.last_offset_delta as usize + 1, part.records);
        assert_eq!(got.len(), part.records);
        parsed
            .for_each_record(&mut inflater, |index, record| {
                assert_eq!(record.offset_delta() as usize, index);
                ControlFlow::Continue(())
            })
            .expect("a part's records read");
        let indices: Vec<usize> = part.runs.iter().cloned().flatten().collect();
        assert_eq!(indices.len(), part.records);
        assert_eq!(part.first_index(), indices[0]);
        for (record, index) in got.iter().zip(&indices) {
            assert_eq!(owners[*index], part.part);
            assert!(!std::mem::replace(&mut seen[*index], true), "record twice");
            assert_eq!(record, &originals[*index]);
        }
    }
    assert!(seen.iter().all(|&s| s), "every record in a part");
});
