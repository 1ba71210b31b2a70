//! A tolerant MessagePack reader for the shapes KV events use.
//!
//! Borrowing cursor over one frame: strings and binaries are returned as slices of the input,
//! nothing is allocated. Markers are classified with [`rmp::Marker`]. Every read is bounds
//! checked and returns a [`MsgpackError`]; nothing panics on any input. Declared container
//! lengths are checked against the bytes left (each element needs at least one byte), so a
//! hostile `array32` header cannot make a caller reserve gigabytes, and [`Reader::skip`] is
//! iterative, so deep nesting cannot overflow the stack.

use rmp::Marker;

/// Why a MessagePack read failed. `at` is the byte offset of the offending marker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("unexpected end of input at byte {at}")]
    /// The input ended inside a value.
    Eof { at: usize },
    #[error("expected {expected} at byte {at}, found marker 0x{marker:02x}")]
    Type {
        expected: &'static str,
        marker: u8,
        at: usize,
    },
    #[error("container of {len} elements at byte {at} cannot fit in the {left} bytes left")]
    /// A declared container length larger than the input could hold.
    TooLong { len: u64, left: usize, at: usize },
    #[error("integer {value} at byte {at} out of range for {target}")]
    Range {
        value: i128,
        target: &'static str,
        at: usize,
    },
    #[error("invalid UTF-8 string at byte {at}")]
    /// A string that is not UTF-8.
    Utf8 { at: usize },
    #[error("reserved marker 0xc1 at byte {at}")]
    /// The never-used marker 0xc1.
    Reserved { at: usize },
}

/// The broad type of the next value (for decoders that branch on shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // the MessagePack type families, named as in the spec
pub enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
}

/// A cursor over one MessagePack buffer.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Byte offset of the next value.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Moves the cursor to an absolute offset (clamped to the end), e.g. back to a value's start.
    pub fn seek(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The input bytes between two positions of this reader (e.g. one whole value).
    pub fn slice(&self, from: usize, to: usize) -> &'a [u8] {
        &self.buf[from.min(self.buf.len())..to.min(self.buf.len())]
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, MsgpackError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(MsgpackError::Eof { at: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(MsgpackError::Eof { at: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    #[inline]
    fn be<const N: usize>(&mut self) -> Result<[u8; N], MsgpackError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// The next marker, without consuming it.
    #[inline]
    pub fn peek_marker(&self) -> Result<Marker, MsgpackError> {
        self.buf
            .get(self.pos)
            .map(|&b| Marker::from_u8(b))
            .ok_or(MsgpackError::Eof { at: self.pos })
    }

    /// The broad type of the next value, without consuming it.
    pub fn peek_kind(&self) -> Result<Kind, MsgpackError> {
        Ok(match self.peek_marker()? {
            Marker::Null => Kind::Nil,
            Marker::True | Marker::False => Kind::Bool,
            Marker::FixPos(_)
            | Marker::FixNeg(_)
            | Marker::U8
            | Marker::U16
            | Marker::U32
            | Marker::U64
            | Marker::I8
            | Marker::I16
            | Marker::I32
            | Marker::I64 => Kind::Int,
            Marker::F32 | Marker::F64 => Kind::Float,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => Kind::Str,
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => Kind::Bin,
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => Kind::Array,
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => Kind::Map,
            Marker::Reserved => return Err(MsgpackError::Reserved { at: self.pos }),
            _ => Kind::Ext,
        })
    }

    fn type_err(&self, expected: &'static str) -> MsgpackError {
        MsgpackError::Type {
            expected,
            marker: self.buf.get(self.pos).copied().unwrap_or(0),
            at: self.pos,
        }
    }

    /// Consumes a nil and returns true if the next value is nil; otherwise consumes nothing.
    #[inline]
    pub fn try_nil(&mut self) -> Result<bool, MsgpackError> {
        if self.peek_marker()? == Marker::Null {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Any integer as `i128` (covers both `u64` and `i64` exactly).
    #[inline]
    pub fn read_int(&mut self) -> Result<i128, MsgpackError> {
        let at = self.pos;
        let m = Marker::from_u8(self.byte()?);
        Ok(match m {
            Marker::FixPos(v) => v as i128,
            Marker::FixNeg(v) => v as i128,
            Marker::U8 => self.byte()? as i128,
            Marker::U16 => u16::from_be_bytes(self.be()?) as i128,
            Marker::U32 => u32::from_be_bytes(self.be()?) as i128,
            Marker::U64 => u64::from_be_bytes(self.be()?) as i128,
            Marker::I8 => self.byte()? as i8 as i128,
            Marker::I16 => i16::from_be_bytes(self.be()?) as i128,
            Marker::I32 => i32::from_be_bytes(self.be()?) as i128,
            Marker::I64 => i64::from_be_bytes(self.be()?) as i128,
            _ => {
                self.pos = at;
                return Err(self.type_err("integer"));
            }
        })
    }

    /// An unsigned 32-bit integer (token ids, block sizes, ranks).
    #[inline]
    pub fn read_u32(&mut self) -> Result<u32, MsgpackError> {
        // Fast path: token ids are mostly fixint/u16.
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 => {
                self.pos += 1;
                return Ok(b as u32);
            }
            Some(&0xcd) => {
                self.pos += 1;
                return Ok(u16::from_be_bytes(self.be()?) as u32);
            }
            _ => {}
        }
        let at = self.pos;
        let v = self.read_int()?;
        u32::try_from(v).map_err(|_| MsgpackError::Range {
            value: v,
            target: "u32",
            at,
        })
    }

    /// `n` unsigned 32-bit integers appended to `out` (the token-id hot loop: one bounds check
    /// per element, no cursor write-back per element).
    pub fn read_u32s_into(&mut self, n: usize, out: &mut Vec<u32>) -> Result<(), MsgpackError> {
        out.reserve(n);
        let buf = self.buf;
        let mut pos = self.pos;
        let eof = |at| MsgpackError::Eof { at };
        for _ in 0..n {
            let b = *buf.get(pos).ok_or(eof(pos))?;
            let v = match b {
                0x00..=0x7f => {
                    pos += 1;
                    b as u32
                }
                0xcc => {
                    let x = *buf.get(pos + 1).ok_or(eof(pos))?;
                    pos += 2;
                    x as u32
                }
                0xcd => {
                    let s = buf.get(pos + 1..pos + 3).ok_or(eof(pos))?;
                    pos += 3;
                    u16::from_be_bytes([s[0], s[1]]) as u32
                }
                0xce => {
                    let s = buf.get(pos + 1..pos + 5).ok_or(eof(pos))?;
                    pos += 5;
                    u32::from_be_bytes([s[0], s[1], s[2], s[3]])
                }
                _ => {
                    self.pos = pos;
                    let v = self.read_u32()?;
                    pos = self.pos;
                    v
                }
            };
            out.push(v);
        }
        self.pos = pos;
        Ok(())
    }

    /// A signed 64-bit integer.
    pub fn read_i64(&mut self) -> Result<i64, MsgpackError> {
        let at = self.pos;
        let v = self.read_int()?;
        i64::try_from(v).map_err(|_| MsgpackError::Range {
            value: v,
            target: "i64",
            at,
        })
    }

    /// An engine block hash normalised to 64 bits (`kv-event-wire.md` §2.2 "Hash value types"):
    /// `u64` as is, `i64` bit-cast (SGLang), `bin` → its last 8 bytes big-endian, which is what
    /// vLLM's int mode publishes for the same 32-byte digest (checked against the recorded
    /// `vllm-0.33.0/basic.jsonl` vs `basic-bytes-hashes.jsonl`). Shorter bins are zero-extended.
    #[inline]
    pub fn read_hash(&mut self) -> Result<u64, MsgpackError> {
        let at = self.pos;
        match self.peek_marker()? {
            Marker::U64 => {
                self.pos += 1;
                Ok(u64::from_be_bytes(self.be()?))
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let b = self.read_bin()?;
                if b.is_empty() {
                    return Err(MsgpackError::Type {
                        expected: "non-empty hash digest",
                        marker: 0xc4,
                        at,
                    });
                }
                let tail = &b[b.len().saturating_sub(8)..];
                Ok(tail.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
            }
            _ => {
                let v = self.read_int()?;
                if v < 0 {
                    Ok(v as i64 as u64)
                } else {
                    Ok(v as u64)
                }
            }
        }
    }

    /// A float (also accepts integers, as some encoders write whole timestamps that way).
    pub fn read_f64(&mut self) -> Result<f64, MsgpackError> {
        match self.peek_marker()? {
            Marker::F64 => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            Marker::F32 => {
                self.pos += 1;
                Ok(f32::from_be_bytes(self.be()?) as f64)
            }
            _ => self
                .read_int()
                .map(|v| v as f64)
                .map_err(|_| self.type_err("float")),
        }
    }

    /// A boolean.
    pub fn read_bool(&mut self) -> Result<bool, MsgpackError> {
        match self.peek_marker()? {
            Marker::True => {
                self.pos += 1;
                Ok(true)
            }
            Marker::False => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.type_err("bool")),
        }
    }

    /// A UTF-8 string, borrowed from the input.
    pub fn read_str(&mut self) -> Result<&'a str, MsgpackError> {
        let at = self.pos;
        let bytes = self.read_str_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| MsgpackError::Utf8 { at })
    }

    /// A string's raw bytes, not UTF-8 checked (for comparing map keys against known names).
    pub fn read_str_bytes(&mut self) -> Result<&'a [u8], MsgpackError> {
        let at = self.pos;
        let len = match self.peek_marker()? {
            Marker::FixStr(n) => {
                self.pos += 1;
                n as usize
            }
            Marker::Str8 => {
                self.pos += 1;
                self.byte()? as usize
            }
            Marker::Str16 => {
                self.pos += 1;
                u16::from_be_bytes(self.be()?) as usize
            }
            Marker::Str32 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.type_err("string")),
        };
        self.take(len).inspect_err(|_| self.pos = at)
    }

    /// A binary, borrowed from the input.
    pub fn read_bin(&mut self) -> Result<&'a [u8], MsgpackError> {
        let len = match self.peek_marker()? {
            Marker::Bin8 => {
                self.pos += 1;
                self.byte()? as usize
            }
            Marker::Bin16 => {
                self.pos += 1;
                u16::from_be_bytes(self.be()?) as usize
            }
            Marker::Bin32 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.type_err("binary")),
        };
        self.take(len)
    }

    /// An array header; the length is checked against the bytes left.
    #[inline]
    pub fn read_array_len(&mut self) -> Result<usize, MsgpackError> {
        let at = self.pos;
        let len = match self.peek_marker()? {
            Marker::FixArray(n) => {
                self.pos += 1;
                n as usize
            }
            Marker::Array16 => {
                self.pos += 1;
                u16::from_be_bytes(self.be()?) as usize
            }
            Marker::Array32 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.type_err("array")),
        };
        self.check_len(len as u64, 1, at)?;
        Ok(len)
    }

    /// A map header (number of key/value pairs); checked against the bytes left.
    pub fn read_map_len(&mut self) -> Result<usize, MsgpackError> {
        let at = self.pos;
        let len = match self.peek_marker()? {
            Marker::FixMap(n) => {
                self.pos += 1;
                n as usize
            }
            Marker::Map16 => {
                self.pos += 1;
                u16::from_be_bytes(self.be()?) as usize
            }
            Marker::Map32 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.type_err("map")),
        };
        self.check_len(len as u64, 2, at)?;
        Ok(len)
    }

    fn check_len(&mut self, len: u64, min_bytes_each: u64, at: usize) -> Result<(), MsgpackError> {
        let left = self.remaining();
        if len.saturating_mul(min_bytes_each) > left as u64 {
            self.pos = at;
            return Err(MsgpackError::TooLong { len, left, at });
        }
        Ok(())
    }

    /// Skips one complete value of any type (iteratively: no recursion, any nesting depth).
    pub fn skip(&mut self) -> Result<(), MsgpackError> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let at = self.pos;
            let m = Marker::from_u8(self.byte()?);
            let data: usize = match m {
                Marker::FixPos(_)
                | Marker::FixNeg(_)
                | Marker::Null
                | Marker::True
                | Marker::False => 0,
                Marker::U8 | Marker::I8 => 1,
                Marker::U16 | Marker::I16 => 2,
                Marker::U32 | Marker::I32 | Marker::F32 => 4,
                Marker::U64 | Marker::I64 | Marker::F64 => 8,
                Marker::FixStr(n) => n as usize,
                Marker::Str8 | Marker::Bin8 => self.byte()? as usize,
                Marker::Str16 | Marker::Bin16 => u16::from_be_bytes(self.be()?) as usize,
                Marker::Str32 | Marker::Bin32 => u32::from_be_bytes(self.be()?) as usize,
                Marker::FixExt1 => 2,
                Marker::FixExt2 => 3,
                Marker::FixExt4 => 5,
                Marker::FixExt8 => 9,
                Marker::FixExt16 => 17,
                Marker::Ext8 => self.byte()? as usize + 1,
                Marker::Ext16 => u16::from_be_bytes(self.be()?) as usize + 1,
                Marker::Ext32 => u32::from_be_bytes(self.be()?) as usize + 1,
                Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                    self.pos = at;
                    pending += self.read_array_len()? as u64;
                    0
                }
                Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                    self.pos = at;
                    pending += 2 * self.read_map_len()? as u64;
                    0
                }
                Marker::Reserved => return Err(MsgpackError::Reserved { at }),
            };
            self.take(data)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_normalise_to_u64() {
        // u64 ≥ 2^63, negative i64 (SGLang), positive fixint, 32-byte bin (vLLM bytes mode).
        let mut buf = vec![0xcf];
        buf.extend_from_slice(&u64::MAX.to_be_bytes());
        buf.push(0xd3);
        buf.extend_from_slice(&(-2i64).to_be_bytes());
        buf.push(0x05);
        buf.extend_from_slice(&[0xc4, 32]);
        buf.extend((0u8..32).collect::<Vec<_>>());
        let mut r = Reader::new(&buf);
        assert_eq!(r.read_hash().unwrap(), u64::MAX);
        assert_eq!(r.read_hash().unwrap(), (-2i64) as u64);
        assert_eq!(r.read_hash().unwrap(), 5);
        assert_eq!(
            r.read_hash().unwrap(),
            u64::from_be_bytes([24, 25, 26, 27, 28, 29, 30, 31])
        );
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn huge_declared_lengths_are_rejected_not_allocated() {
        let buf = [0xdd, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut r = Reader::new(&buf);
        assert!(matches!(
            r.read_array_len(),
            Err(MsgpackError::TooLong {
                len: 4294967295,
                ..
            })
        ));
        assert!(matches!(
            Reader::new(&buf).skip(),
            Err(MsgpackError::TooLong { .. })
        ));
        let map = [0xdf, 0x00, 0x00, 0x00, 0x02, 0x01, 0x01, 0x01];
        assert!(matches!(
            Reader::new(&map).read_map_len(),
            Err(MsgpackError::TooLong { .. })
        ));
        let s = [0xdb, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&s).read_str(),
            Err(MsgpackError::Eof { .. })
        ));
    }

    #[test]
    fn skip_handles_deep_nesting_without_recursion() {
        let mut buf = vec![0x91; 100_000];
        buf.push(0xc0);
        let mut r = Reader::new(&buf);
        r.skip().unwrap();
        assert_eq!(r.remaining(), 0);
        // Truncated: every prefix fails cleanly.
        for n in 0..50 {
            assert!(Reader::new(&buf[..n]).skip().is_err());
        }
    }

    #[test]
    fn ranges_and_types_are_checked() {
        assert!(matches!(
            Reader::new(&[0xff]).read_u32(),
            Err(MsgpackError::Range { value: -1, .. })
        ));
        assert!(matches!(
            Reader::new(&[0xa1, b'x']).read_u32(),
            Err(MsgpackError::Type { .. })
        ));
        assert!(matches!(
            Reader::new(&[0xa1, 0xff]).read_str(),
            Err(MsgpackError::Utf8 { .. })
        ));
        assert!(matches!(
            Reader::new(&[0xc1]).skip(),
            Err(MsgpackError::Reserved { .. })
        ));
        assert_eq!(Reader::new(&[0xcd, 0x01, 0x00]).read_u32().unwrap(), 256);
    }
}

/// A minimal MessagePack writer (smallest encoding for every integer, like msgspec).
#[derive(Debug, Default, Clone)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// A writer with `n` bytes reserved.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// The encoded bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// nil.
    pub fn nil(&mut self) {
        self.buf.push(0xc0);
    }

    /// A boolean.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(if v { 0xc3 } else { 0xc2 });
    }

    /// An unsigned integer in its smallest encoding.
    pub fn uint(&mut self, v: u64) {
        let b = &mut self.buf;
        if v < 0x80 {
            b.push(v as u8);
        } else if v <= u8::MAX as u64 {
            b.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            b.push(0xcd);
            b.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX as u64 {
            b.push(0xce);
            b.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            b.push(0xcf);
            b.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// A signed integer in its smallest encoding.
    pub fn int(&mut self, v: i64) {
        if v >= 0 {
            return self.uint(v as u64);
        }
        let b = &mut self.buf;
        if v >= -32 {
            b.push(v as i8 as u8);
        } else if v >= i8::MIN as i64 {
            b.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN as i64 {
            b.push(0xd1);
            b.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN as i64 {
            b.push(0xd2);
            b.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            b.push(0xd3);
            b.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// A float64.
    pub fn f64(&mut self, v: f64) {
        self.buf.push(0xcb);
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// A string.
    pub fn str(&mut self, s: &str) {
        let n = s.len();
        if n < 32 {
            self.buf.push(0xa0 | n as u8);
        } else if n <= u8::MAX as usize {
            self.buf.extend_from_slice(&[0xd9, n as u8]);
        } else if n <= u16::MAX as usize {
            self.buf.push(0xda);
            self.buf.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.buf.push(0xdb);
            self.buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// A binary.
    pub fn bin(&mut self, v: &[u8]) {
        let n = v.len();
        if n <= u8::MAX as usize {
            self.buf.extend_from_slice(&[0xc4, n as u8]);
        } else if n <= u16::MAX as usize {
            self.buf.push(0xc5);
            self.buf.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.buf.push(0xc6);
            self.buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.buf.extend_from_slice(v);
    }

    /// An array header; `n` values must follow.
    pub fn array_len(&mut self, n: usize) {
        self.container_len(n, 0x90, 0xdc, 0xdd);
    }

    /// A map header; `n` key/value pairs must follow.
    pub fn map_len(&mut self, n: usize) {
        self.container_len(n, 0x80, 0xde, 0xdf);
    }

    fn container_len(&mut self, n: usize, fix: u8, m16: u8, m32: u8) {
        if n < 16 {
            self.buf.push(fix | n as u8);
        } else if n <= u16::MAX as usize {
            self.buf.push(m16);
            self.buf.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.buf.push(m32);
            self.buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    #[test]
    fn writer_round_trips_through_reader() {
        let mut w = Writer::default();
        let ints = [
            0i64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32769,
            i64::MIN,
            i64::MAX,
        ];
        w.array_len(ints.len());
        for v in ints {
            w.int(v);
        }
        w.uint(u64::MAX);
        w.str(&"x".repeat(40));
        w.bin(&[1, 2, 3]);
        w.f64(1.5);
        w.map_len(20);
        let buf = w.into_inner();
        let mut r = Reader::new(&buf);
        assert_eq!(r.read_array_len().unwrap(), ints.len());
        for v in ints {
            assert_eq!(r.read_int().unwrap(), v as i128);
        }
        assert_eq!(r.read_hash().unwrap(), u64::MAX);
        assert_eq!(r.read_str().unwrap().len(), 40);
        assert_eq!(r.read_bin().unwrap(), &[1, 2, 3]);
        assert_eq!(r.read_f64().unwrap(), 1.5);
        assert_eq!(r.peek_marker().unwrap(), Marker::Map16);
    }
}
