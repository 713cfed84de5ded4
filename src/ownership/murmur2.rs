//! Kafka's key hash: `Utils.murmur2(byte[])` from the Java client, bit for bit.
//!
//! The Java producer picks a partition as `toPositive(murmur2(key)) % partitions`; keyward picks
//! a slot the same way, so a slot table with as many slots as the topic has partitions lines up
//! with the partitions the producers choose. Any divergence here silently moves keys to another
//! region, so the tests pin Kafka's own vectors. Pure and allocation-free: this runs per record.

/// Kafka's fixed seed for `Utils.murmur2`.
const SEED: u32 = 0x9747_b28c;
const M: u32 = 0x5bd1_e995;
const R: u32 = 24;

/// MurmurHash2 (32-bit) exactly as Kafka's `Utils.murmur2`, returned as Java's signed `int`.
pub fn murmur2(data: &[u8]) -> i32 {
    // Java's `int` arithmetic wraps and `>>>` is a logical shift: u32 with wrapping ops is the
    // same bit pattern. Kafka truncates the length to an int; keys longer than 4 GiB do not
    // reach us (a record is bounded by the frame size), but truncate the same way regardless.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    // The Java `switch` falls through from 3 to 2 to 1.
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `Utils.toPositive`: clears the sign bit. Not `abs`: `abs(i32::MIN)` overflows, and
/// masking is what the Java partitioner does, so slots agree with partitions.
pub fn to_positive(hash: i32) -> u32 {
    (hash & 0x7fff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn matches_kafka_utils_test_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            // Kafka writes this one as `new byte[] {'a', 'b', 'c'}`.
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                expected,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_tail_length_is_hashed() {
        // Lengths 0..=7 cover every remainder, with and without a full 4-byte block; all distinct.
        let data = b"abcdefg";
        let hashes: Vec<i32> = (0..=data.len()).map(|n| murmur2(&data[..n])).collect();
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn to_positive_masks_the_sign_bit() {
        assert_eq!(
            to_positive(-973_932_308),
            (-973_932_308_i32 & 0x7fff_ffff) as u32
        );
        assert_eq!(to_positive(i32::MIN), 0);
        assert_eq!(to_positive(-1), i32::MAX as u32);
        assert_eq!(to_positive(0), 0);
        assert_eq!(to_positive(42), 42);
    }
}
