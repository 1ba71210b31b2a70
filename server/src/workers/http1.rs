//! A small HTTP/1.1 client for the one conversation the router has with workers: a request
//! out, a response head back, then a body read in place by whoever holds the connection —
//! the response stream polls the socket itself, so a token costs one wake-up of one task.
//! Connections are kept alive in a per-worker [`Pool`].
//!
//! What it speaks: `Content-Length`, `Transfer-Encoding: chunked` (extensions and trailers
//! skipped) and read-to-close bodies; `Connection: close`. Bounded: a response head of at most
//! 64 KiB and 64 headers, chunk-size lines of at most 1 KiB.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head accepted, bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size line, bytes.
const MAX_CHUNK_LINE: usize = 1024;
/// Bytes read from the socket at a time, at least.
const READ_SIZE: usize = 16 * 1024;

/// An open connection to a worker: the socket and what was read from it but not yet used.
#[derive(Debug)]
pub struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Connect to `authority` (`host:port`) with `TCP_NODELAY`.
    pub async fn connect(authority: &str, timeout: Duration) -> io::Result<Self> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        Ok(Self {
            tcp,
            buf: BytesMut::with_capacity(READ_SIZE),
        })
    }

    /// Whether an idle pooled connection still looks usable: not closed by the peer and with
    /// nothing unexpected to read.
    fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Read more bytes into the buffer. `Ok(0)`: the peer closed the connection.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Send a request: `head` (request line and headers, ending in a blank line) then `body`,
    /// in one write when they are small.
    pub async fn send(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        if head.len() + body.len() <= 64 * 1024 {
            let mut all = Vec::with_capacity(head.len() + body.len());
            all.extend_from_slice(head);
            all.extend_from_slice(body);
            self.tcp.write_all(&all).await
        } else {
            self.tcp.write_all(head).await?;
            self.tcp.write_all(body).await
        }
    }

    /// Read the response head. Errors: the connection closed first (`UnexpectedEof`, with
    /// nothing read: the request may be retried on another connection), or a malformed or
    /// oversize head (`InvalidData`).
    pub async fn read_head(&mut self) -> io::Result<ResponseHead> {
        loop {
            if let Some(h) = parse_head(&mut self.buf)? {
                return Ok(h);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("response head larger than 64 KiB"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response head",
                ));
            }
        }
    }

    /// Read a whole body of at most `limit` bytes (error responses, health checks).
    pub async fn read_body(&mut self, head: &ResponseHead, limit: usize) -> io::Result<Vec<u8>> {
        let mut body = BodyDecoder::new(head);
        let mut out = Vec::new();
        loop {
            body.decode(&mut self.buf, |d| out.extend_from_slice(d))?;
            if out.len() > limit {
                return Err(invalid("response body over the limit"));
            }
            if body.is_done() {
                return Ok(out);
            }
            if self.fill().await? == 0 {
                body.eof()?;
                return Ok(out);
            }
        }
    }

    /// How many bytes were read but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The bytes read but not yet consumed.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// What a response head says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// How the body's end is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes the connection.
    Close,
}

/// Parse a response head from the front of `buf`, consuming it; `None` until complete.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("malformed response head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let l = v
                .parse::<u64>()
                .map_err(|_| invalid("bad Content-Length"))?;
            if length.is_some_and(|x| x != l) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            length = Some(l);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(invalid("unsupported Transfer-Encoding"));
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in v.split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    buf.advance(n);
    // No body for these, whatever the headers say (RFC 9112 §6.3).
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(ResponseHead {
        status,
        framing,
        keep_alive,
    }))
}

/// Decodes a response body incrementally (see [`Framing`]).
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Close,
    Done,
}

impl BodyDecoder {
    pub fn new(head: &ResponseHead) -> Self {
        let state = match head.framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The connection closed: fine for a read-to-close body, an error otherwise.
    pub fn eof(&mut self) -> io::Result<()> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of the body",
            )),
        }
    }

    /// Decode what `input` holds, consuming it, passing body bytes to `out`. Stops at the end
    /// of the body (the rest of `input` is left for the next response) or when more input is
    /// needed. Errors: malformed chunk framing.
    pub fn decode(&mut self, input: &mut BytesMut, mut out: impl FnMut(&[u8])) -> io::Result<()> {
        loop {
            match self.state {
                State::Done => return Ok(()),
                State::Close => {
                    if !input.is_empty() {
                        out(input);
                        input.clear();
                    }
                    return Ok(());
                }
                State::Length(left) | State::ChunkData(left) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = left.min(input.len() as u64) as usize;
                    out(&input[..n]);
                    input.advance(n);
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::ChunkDataEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::ChunkDataEnd => {
                    if input.len() < 2 {
                        return Ok(());
                    }
                    if &input[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    input.advance(2);
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let Some(line) = take_line(input)? else {
                        return Ok(());
                    };
                    let hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
                    let hex = std::str::from_utf8(hex)
                        .map_err(|_| invalid("chunk size is not ASCII"))?
                        .trim();
                    let size = u64::from_str_radix(hex, 16)
                        .ok()
                        .filter(|_| !hex.is_empty() && hex.len() <= 15)
                        .ok_or_else(|| invalid("malformed chunk size"))?;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers => {
                    let Some(line) = take_line(input)? else {
                        return Ok(());
                    };
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
            }
        }
    }
}

/// Take one CRLF-terminated line (without the CRLF) from the front of `input`; `None` until
/// complete. Errors: a line over [`MAX_CHUNK_LINE`].
fn take_line(input: &mut BytesMut) -> io::Result<Option<Vec<u8>>> {
    match memchr::memchr(b'\n', input) {
        Some(i) => {
            let end = if i > 0 && input[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            let line = input[..end].to_vec();
            input.advance(i + 1);
            Ok(Some(line))
        }
        None if input.len() > MAX_CHUNK_LINE => Err(invalid("chunk-size line too long")),
        None => Ok(None),
    }
}

/// Idle keep-alive connections per worker authority (`host:port`), bounded so that a fleet of
/// a thousand workers does not hold thousands of descriptors: at most `max_idle_per_worker`
/// each (more are closed when returned), none idle longer than `max_idle_time` (expired ones
/// are closed when the worker's list is next touched, at least by each health check).
#[derive(Debug)]
pub struct Pool {
    /// Per authority, oldest first, with when each went idle.
    idle: Mutex<HashMap<String, Vec<(Instant, Conn)>>>,
    max_idle_per_worker: usize,
    max_idle_time: Duration,
}

impl Pool {
    /// A pool keeping at most `max_idle_per_worker` idle connections per worker, each for at
    /// most `max_idle_time`.
    pub fn new(max_idle_per_worker: usize, max_idle_time: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_worker,
            max_idle_time,
        }
    }

    fn expire(&self, conns: &mut Vec<(Instant, Conn)>) {
        let max = self.max_idle_time;
        conns.retain(|(since, _)| since.elapsed() < max);
    }

    /// An idle connection to `authority` that still looks alive, if any (the most recent).
    pub fn take(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(authority)?;
        self.expire(conns);
        while let Some((_, c)) = conns.pop() {
            if c.is_reusable() {
                return Some(c);
            }
        }
        None
    }

    /// Keep `conn` for the next request to `authority` (closed past the per-worker cap).
    pub fn put(&self, authority: &str, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(authority.to_string()).or_default();
        self.expire(conns);
        if conns.len() < self.max_idle_per_worker {
            conns.push((Instant::now(), conn));
        }
    }

    /// Close every idle connection to `authority` (a worker deregistered or restarted).
    pub fn forget(&self, authority: &str) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(authority);
    }

    /// Idle connections held to `authority`.
    pub fn idle(&self, authority: &str) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(authority)
            .map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pool_keeps_few_idle_connections_per_worker_and_not_for_long() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut accepted = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..10 {
            conns.push(Conn::connect(&addr, Duration::from_secs(5)).await.unwrap());
            accepted.push(listener.accept().await.unwrap());
        }
        let pool = Pool::new(4, Duration::from_secs(3600));
        for c in conns.drain(..) {
            pool.put(&addr, c);
        }
        assert_eq!(pool.idle(&addr), 4, "connections past the cap are closed");
        assert!(pool.take(&addr).is_some());
        assert_eq!(pool.idle(&addr), 3);
        pool.forget(&addr);
        assert_eq!(pool.idle(&addr), 0);

        let pool = Pool::new(4, Duration::from_millis(20));
        pool.put(
            &addr,
            Conn::connect(&addr, Duration::from_secs(5)).await.unwrap(),
        );
        accepted.push(listener.accept().await.unwrap());
        assert_eq!(pool.idle(&addr), 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            pool.take(&addr).is_none(),
            "an expired connection is not reused"
        );
        assert_eq!(pool.idle(&addr), 0);
    }

    fn decode_all(head: ResponseHead, parts: &[&[u8]]) -> io::Result<(Vec<u8>, bool, Vec<u8>)> {
        let mut d = BodyDecoder::new(&head);
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        for p in parts {
            input.extend_from_slice(p);
            d.decode(&mut input, |x| out.extend_from_slice(x))?;
        }
        Ok((out, d.is_done(), input.to_vec()))
    }

    const CHUNKED: ResponseHead = ResponseHead {
        status: 200,
        framing: Framing::Chunked,
        keep_alive: true,
    };

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nrest"[..],
        );
        let h = parse_head(&mut b).unwrap().unwrap();
        assert_eq!(h, CHUNKED);
        assert_eq!(&b[..], b"rest");
        let mut b = BytesMut::from(
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"[..],
        );
        let h = parse_head(&mut b).unwrap().unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (404, Framing::Length(3), false)
        );
        let mut b = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\n"[..]);
        let h = parse_head(&mut b).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-len"[..]);
        assert_eq!(parse_head(&mut b).unwrap(), None);
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        );
        assert!(parse_head(&mut b).is_err());
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"[..]);
        assert!(parse_head(&mut b).is_err());
        let mut b = BytesMut::from(&b"garbage\r\n\r\n"[..]);
        assert!(parse_head(&mut b).is_err());
    }

    #[test]
    fn chunked_bodies_split_anywhere() {
        let wire: &[u8] =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (out, done, rest) = decode_all(CHUNKED, &[wire]).unwrap();
        assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz");
        assert!(done);
        assert_eq!(
            rest, b"NEXT",
            "what follows the body is left for the next response"
        );
        for cut in 0..wire.len() {
            let (o, d, r) = decode_all(CHUNKED, &[&wire[..cut], &wire[cut..]]).unwrap();
            assert_eq!(
                (o.as_slice(), d, r.as_slice()),
                (out.as_slice(), true, &b"NEXT"[..]),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(
                decode_all(CHUNKED, &[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            decode_all(CHUNKED, &[&[b'1'; 2000]]).is_err(),
            "endless size line"
        );
        let mut d = BodyDecoder::new(&CHUNKED);
        assert!(d.eof().is_err(), "closed mid-body");
    }

    #[test]
    fn length_and_close_bodies() {
        let h = ResponseHead {
            status: 200,
            framing: Framing::Length(4),
            keep_alive: true,
        };
        let (out, done, rest) = decode_all(h, &[b"ab", b"cdEF"]).unwrap();
        assert_eq!(
            (out.as_slice(), done, rest.as_slice()),
            (&b"abcd"[..], true, &b"EF"[..])
        );
        let h = ResponseHead {
            status: 200,
            framing: Framing::Close,
            keep_alive: false,
        };
        let mut d = BodyDecoder::new(&h);
        let mut input = BytesMut::from(&b"xyz"[..]);
        let mut out = Vec::new();
        d.decode(&mut input, |x| out.extend_from_slice(x)).unwrap();
        assert!(!d.is_done());
        d.eof().unwrap();
        assert!(d.is_done());
        assert_eq!(out, b"xyz");
    }
}
