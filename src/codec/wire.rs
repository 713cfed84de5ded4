//! A bounds-checked reader of Kafka's protocol primitives over a borrowed slice.
//!
//! Every read checks the remaining length first and returns an error instead of panicking, so
//! bytes from the network can be walked without trusting any length they claim.

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum WireError {
    #[error("truncated: needed {needed} more bytes at offset {at}")]
    Truncated { at: usize, needed: usize },
    #[error("malformed varint at offset {0}")]
    BadVarint(usize),
    #[error("invalid length {len} at offset {at}")]
    BadLength { at: usize, len: i64 },
    #[error("string is not UTF-8 at offset {0}")]
    BadUtf8(usize),
}

#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::Truncated {
                at: self.pos,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn skip(&mut self, n: usize) -> Result<(), WireError> {
        self.bytes(n).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn i8(&mut self) -> Result<i8, WireError> {
        Ok(i8::from_be_bytes(self.array()?))
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// Unsigned LEB128 varint of at most 5 bytes (a u32).
    pub fn uvarint(&mut self) -> Result<u32, WireError> {
        let start = self.pos;
        let mut value: u32 = 0;
        for i in 0..5 {
            let b = self.array::<1>()?[0];
            if i == 4 && b > 0x0f {
                return Err(WireError::BadVarint(start));
            }
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireError::BadVarint(start))
    }

    /// A length-prefixed slice whose prefix (`len`) has already been read; `len` < 0 means null.
    fn sized(&mut self, len: i64) -> Result<Option<&'a [u8]>, WireError> {
        match len {
            -1 => Ok(None),
            n if n >= 0 && n as u64 <= self.remaining() as u64 => Ok(Some(self.bytes(n as usize)?)),
            n if n >= 0 => Err(WireError::Truncated {
                at: self.pos,
                needed: n as usize - self.remaining(),
            }),
            n => Err(WireError::BadLength {
                at: self.pos,
                len: n,
            }),
        }
    }

    /// Classic nullable string: i16 length, -1 for null.
    pub fn nullable_string(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let len = self.i16()?;
        self.sized(i64::from(len))
    }

    /// Compact nullable string or bytes: unsigned varint of length + 1, 0 for null.
    pub fn compact_nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let len = i64::from(self.uvarint()?) - 1;
        self.sized(len)
    }

    /// Classic nullable bytes: i32 length, -1 for null.
    pub fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let len = self.i32()?;
        self.sized(i64::from(len))
    }

    /// A non-null string, classic (i16) or compact (varint) form, checked to be UTF-8.
    pub fn string(&mut self, compact: bool) -> Result<&'a str, WireError> {
        let at = self.pos;
        let raw = if compact {
            self.compact_nullable_bytes()?
        } else {
            self.nullable_string()?
        };
        let raw = raw.ok_or(WireError::BadLength { at, len: -1 })?;
        std::str::from_utf8(raw).map_err(|_| WireError::BadUtf8(at))
    }

    /// An array length, classic (i32) or compact (varint of n + 1). Null arrays are refused:
    /// no array keyward reads may be null. The length is checked against the bytes left, given
    /// the smallest size an element can have, so a lying count cannot drive an allocation.
    pub fn array_len(
        &mut self,
        compact: bool,
        min_element_size: usize,
    ) -> Result<usize, WireError> {
        let at = self.pos;
        let n = if compact {
            i64::from(self.uvarint()?) - 1
        } else {
            i64::from(self.i32()?)
        };
        if n < 0 || (n as u64).saturating_mul(min_element_size as u64) > self.remaining() as u64 {
            return Err(WireError::BadLength { at, len: n });
        }
        Ok(n as usize)
    }

    /// Skips a tagged-fields section (flexible versions).
    pub fn skip_tagged_fields(&mut self) -> Result<(), WireError> {
        let count = self.uvarint()?;
        for _ in 0..count {
            self.uvarint()?;
            let len = self.uvarint()?;
            self.skip(len as usize)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_primitives_and_refuses_truncation() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 0x96, 0x01]);
        assert_eq!(r.i16(), Ok(1));
        assert_eq!(r.i32(), Ok(2));
        assert_eq!(r.uvarint(), Ok(150));
        assert_eq!(r.i8(), Err(WireError::Truncated { at: 8, needed: 1 }));
    }

    #[test]
    fn refuses_overlong_varints_and_lying_lengths() {
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).uvarint(),
            Err(WireError::BadVarint(0))
        );
        assert!(
            Reader::new(&[0x7f, 0xff, 0xff, 0xff])
                .nullable_bytes()
                .is_err()
        );
        assert!(
            Reader::new(&[0x7f, 0xff, 0xff, 0xff])
                .array_len(false, 1)
                .is_err()
        );
        assert_eq!(Reader::new(&[0xff, 0xff]).nullable_string(), Ok(None));
        assert!(Reader::new(&[0xff, 0xfe]).nullable_string().is_err());
    }
}
