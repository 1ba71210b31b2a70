//! Server-sent events in: the project's one SSE decoder, used by the worker client and by the
//! benchmark client (`kvrouter-bench`).
//!
//! [`SseDecoder`] takes bytes as they arrive and returns each complete event's `data`, as the
//! WHATWG event-stream rules read it: lines end in `\n`, `\r\n` or `\r`; a blank line ends an
//! event; lines starting with `:` are comments; a `data` field's value loses one leading space,
//! and several `data` lines join with `\n`; other fields (`event`, `id`, `retry`) and unknown
//! ones are skipped; an event without data is not dispatched. The common event — one `data:`
//! line — comes back as a slice of the input, without a copy.
//!
//! Bounded: a line or an event's data longer than the limit is an error, not a growing
//! buffer.

use bytes::{Buf, Bytes, BytesMut};

/// Why an event stream cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line, or one event's data, exceeds the decoder's limit.
    #[error("server-sent event larger than {0} bytes")]
    TooLarge(usize),
}

/// Incremental SSE decoder; see the module doc.
#[derive(Debug)]
pub struct SseDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
    /// The current event's data: one line kept as is, or several joined.
    data: Data,
    limit: usize,
}

#[derive(Debug, Default)]
enum Data {
    #[default]
    None,
    One(Bytes),
    Many(Vec<u8>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::One(b) => b.len(),
            Data::Many(v) => v.len(),
        }
    }
}

impl SseDecoder {
    /// A decoder refusing lines and events longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            data: Data::None,
            limit,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a returned event.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.data.len()
    }

    /// The next complete event's data, `None` until one is complete. Errors: a line or an
    /// event over the limit (the stream cannot be trusted after that).
    pub fn next_event(&mut self) -> Result<Option<Bytes>, SseError> {
        loop {
            let Some((line_len, term_len)) = self.next_line()? else {
                return Ok(None);
            };
            let line = self.buf.split_to(line_len).freeze();
            self.buf.advance(term_len);
            self.scanned = 0;
            if line.is_empty() {
                match std::mem::take(&mut self.data) {
                    Data::None => continue,
                    Data::One(b) => return Ok(Some(b)),
                    Data::Many(v) => return Ok(Some(Bytes::from(v))),
                }
            }
            self.field(line)?;
        }
    }

    /// Length of the next complete line and of its terminator.
    fn next_line(&mut self) -> Result<Option<(usize, usize)>, SseError> {
        let from = self.scanned;
        match memchr::memchr2(b'\n', b'\r', &self.buf[from..]) {
            Some(i) => {
                let at = from + i;
                if self.buf[at] == b'\n' {
                    return Ok(Some((at, 1)));
                }
                // `\r`: alone, or the first half of `\r\n` (wait for the next byte).
                match self.buf.get(at + 1) {
                    Some(b'\n') => Ok(Some((at, 2))),
                    Some(_) => Ok(Some((at, 1))),
                    None => {
                        self.scanned = at;
                        Ok(None)
                    }
                }
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.limit {
                    return Err(SseError::TooLarge(self.limit));
                }
                Ok(None)
            }
        }
    }

    /// One non-blank line.
    fn field(&mut self, line: Bytes) -> Result<(), SseError> {
        if line[0] == b':' {
            return Ok(()); // comment
        }
        let (name, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let v = if line.get(i + 1) == Some(&b' ') {
                    i + 2
                } else {
                    i + 1
                };
                (&line[..i], line.slice(v..))
            }
            None => (&line[..], Bytes::new()),
        };
        if name != b"data" {
            return Ok(());
        }
        if self.data.len() + value.len() + 1 > self.limit {
            return Err(SseError::TooLarge(self.limit));
        }
        self.data = match std::mem::take(&mut self.data) {
            Data::None => Data::One(value),
            Data::One(first) => {
                let mut v = Vec::with_capacity(first.len() + 1 + value.len());
                v.extend_from_slice(&first);
                v.push(b'\n');
                v.extend_from_slice(&value);
                Data::Many(v)
            }
            Data::Many(mut v) => {
                v.push(b'\n');
                v.extend_from_slice(&value);
                Data::Many(v)
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = SseDecoder::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            d.push(c);
            while let Some(e) = d.next_event().unwrap() {
                out.push(String::from_utf8(e.to_vec()).unwrap());
            }
        }
        out
    }

    #[test]
    fn every_line_ending_comments_and_multi_line_data() {
        assert_eq!(
            events(&[b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n"]),
            ["a", "b", "c", "d"]
        );
        // A final `\r` may be half of `\r\n`: the event waits for the next byte.
        assert_eq!(events(&[b"data: e\r\r"]), Vec::<String>::new());
        assert_eq!(events(&[b"data: e\r\r", b"x"]), ["e"]);
        assert_eq!(
            events(&[b": keep-alive\n\nevent: x\nid: 7\ndata: one\ndata:two\ndata\n\n"]),
            ["one\ntwo\n"]
        );
        assert_eq!(
            events(&[b"retry: 10\n\n"]),
            Vec::<String>::new(),
            "no data, no event"
        );
        assert_eq!(events(&[b"data:  two spaces\n\n"]), [" two spaces"]);
        assert_eq!(events(&[b"data: unfinished\n"]), Vec::<String>::new());
    }

    #[test]
    fn split_anywhere_gives_the_same_events() {
        let whole: &[u8] =
            b"data: {\"a\":1}\r\n\r\n: c\rdata: x\rdata: y\r\rdata: [DONE]\n\ndata: z\r\n\r\n";
        let want = events(&[whole]);
        assert_eq!(want, ["{\"a\":1}", "x\ny", "[DONE]", "z"]);
        for cut in 0..whole.len() {
            assert_eq!(
                events(&[&whole[..cut], &whole[cut..]]),
                want,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(events(&bytes), want, "one byte at a time");
    }

    #[test]
    fn oversize_lines_and_events_are_errors() {
        let mut d = SseDecoder::new(16);
        d.push(&[b'x'; 17]);
        assert_eq!(d.next_event(), Err(SseError::TooLarge(16)));
        let mut d = SseDecoder::new(16);
        d.push(b"data: 0123456789\ndata: 0123456789\n");
        assert_eq!(d.next_event(), Err(SseError::TooLarge(16)));
    }

    #[test]
    fn a_returned_event_leaves_nothing_buffered() {
        let mut d = SseDecoder::new(1024);
        d.push(b"data: {\"x\":1}\n\n");
        let e = d.next_event().unwrap().unwrap();
        assert_eq!(&e[..], b"{\"x\":1}");
        assert_eq!(d.buffered(), 0);
    }
}
