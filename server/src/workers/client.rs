//! Talking to workers: a request goes to the chosen worker's `POST /v1/completions` as token
//! ids with `stream: true` (what vLLM and SGLang serve), and comes back as a [`WorkerStream`] of
//! raw event payloads decoded by the project's one SSE decoder ([`crate::sse`]); a payload is
//! read in place by [`WorkerEvent::parse`], without building a JSON tree.
//!
//! The frontend always streams from the worker, even for non-streaming clients, so it sees
//! the first token (prefill complete) and can measure TTFT and ITL.

use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::http1::{BodyDecoder, Conn, Framing, Pool, ResponseHead};
use super::spec::RankPin;
use crate::error::error_chain;
use crate::sse::SseDecoder;

/// Names the rank on a worker request as `pin` says: vLLM's header line appended to
/// `headers`, or SGLang's `"data_parallel_rank"` put first in `body`, a JSON object (the
/// frontend's own serialisation, which never carries that field itself: the request contract
/// refuses unknown fields). A body that is not an object is left as it is.
fn pin_rank(pin: RankPin, headers: &mut String, body: Vec<u8>) -> Vec<u8> {
    match pin {
        RankPin::None => body,
        RankPin::Header(r) => {
            headers.push_str(&format!("X-data-parallel-rank: {r}\r\n"));
            body
        }
        RankPin::BodyField(r) => {
            let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()) else {
                return body;
            };
            if body[open] != b'{' {
                return body;
            }
            let empty = body[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let field = format!("\"data_parallel_rank\":{r}{}", if empty { "" } else { "," });
            let mut out = Vec::with_capacity(body.len() + field.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(&body[open + 1..]);
            out
        }
    }
}

/// Largest event a worker may send, bytes.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// One event of a worker's completion stream, borrowed from its payload.
#[derive(Debug, Default)]
pub struct WorkerEvent<'a> {
    /// New text (may be empty, e.g. when the worker runs without a tokenizer).
    pub text: Cow<'a, str>,
    /// How many token ids the event carries, when the worker returns them.
    pub tokens: usize,
    /// The token ids themselves, as the worker's JSON array (when it returns them).
    pub token_ids: Option<&'a RawValue>,
    /// `stop`, `length`, … on the last content event.
    pub finish_reason: Option<Cow<'a, str>>,
    /// The usage object, on the usage event.
    pub usage: Option<&'a RawValue>,
    /// Which choice (`n` > 1) the event belongs to.
    pub index: u32,
    /// The completions API's logprobs object of the event's tokens, when asked for.
    pub logprobs: Option<&'a RawValue>,
}

impl WorkerEvent<'_> {
    /// Whether it carries generated output.
    pub fn has_output(&self) -> bool {
        !self.text.is_empty() || self.tokens > 0
    }
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default, borrow, deserialize_with = "first_choice")]
    choices: Option<RawChoice<'a>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<RawError<'a>>,
}

#[derive(Deserialize)]
struct RawChoice<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    token_ids: Option<&'a RawValue>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    logprobs: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawError<'a> {
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

/// The first element of an array (the rest skipped), or nothing for `null`.
fn first_choice<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawChoice<'de>>, D::Error> {
    struct First;
    impl<'de> Visitor<'de> for First {
        type Value = Option<RawChoice<'de>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of choices")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first = seq.next_element()?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    d.deserialize_any(First)
}

/// Elements of a JSON array of token ids (integers: its commas, plus one unless empty).
/// Errors: not an array.
fn token_count(raw: &RawValue) -> Result<usize, serde_json::Error> {
    let s = raw.get().as_bytes();
    match s {
        [b'[', inner @ .., b']'] if inner.iter().all(u8::is_ascii_whitespace) => Ok(0),
        [b'[', inner @ .., b']'] => Ok(memchr::memchr_iter(b',', inner).count() + 1),
        _ => Err(serde::de::Error::custom("token_ids must be an array")),
    }
}

impl<'a> WorkerEvent<'a> {
    /// Read one event payload (the `data` of an SSE event, not `[DONE]`). Errors: `Ok(Err)`
    /// with the worker's message for an error event; `Err` for malformed JSON.
    pub fn parse(payload: &'a [u8]) -> Result<Result<Self, String>, serde_json::Error> {
        let raw: RawEvent<'a> = serde_json::from_slice(payload)?;
        if let Some(e) = raw.error {
            return Ok(Err(e
                .message
                .map(Cow::into_owned)
                .unwrap_or_else(|| "error event without a message".into())));
        }
        let mut ev = WorkerEvent {
            usage: raw.usage.filter(|u| u.get() != "null"),
            ..Default::default()
        };
        if let Some(c) = raw.choices {
            ev.text = c.text.unwrap_or_default();
            ev.tokens = c.token_ids.map(token_count).transpose()?.unwrap_or(0);
            ev.token_ids = c.token_ids;
            ev.finish_reason = c.finish_reason;
            ev.index = c.index;
            ev.logprobs = c.logprobs.filter(|l| l.get() != "null");
        }
        Ok(Ok(ev))
    }
}

/// How a call to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No connection, or the connection broke: the worker is probably gone.
    #[error("worker {url} unreachable: {message}")]
    Unreachable { url: String, message: String },
    /// No response headers within the timeout.
    #[error("worker {url} did not answer within {secs} s")]
    Timeout { url: String, secs: f64 },
    /// A non-2xx answer; `message` is the worker's error text.
    #[error("worker {url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    /// The connection broke or ended early after the stream started.
    #[error("worker {url} failed mid-stream: {message}")]
    Stream { url: String, message: String },
    /// The body ended without `data: [DONE]` (a finished response may still be complete).
    #[error("worker {url} ended the stream before [DONE]")]
    Truncated { url: String },
    /// An event of the stream was malformed (not UTF-8, bad JSON, too large): this request
    /// fails, the worker stays in the routing set.
    #[error("worker {url} sent a malformed event: {message}")]
    Protocol { url: String, message: String },
}

impl WorkerError {
    /// What went wrong, without the worker's address (for clients).
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerError::Unreachable { .. } => "unreachable",
            WorkerError::Timeout { .. } => "no answer in time",
            WorkerError::Status { .. } => "error status",
            WorkerError::Stream { .. } => "connection broke mid-stream",
            WorkerError::Truncated { .. } => "stream ended early",
            WorkerError::Protocol { .. } => "malformed event",
        }
    }

    /// Whether the worker should take no new requests until its health check passes.
    pub fn worker_gone(&self) -> bool {
        matches!(
            self,
            WorkerError::Unreachable { .. }
                | WorkerError::Stream { .. }
                | WorkerError::Truncated { .. }
        )
    }
}

/// How long a response may take to finish its body after `data: [DONE]` before its
/// connection is given up rather than kept alive.
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest error or health-check body read, bytes.
const MAX_SMALL_BODY: usize = 64 * 1024;
/// Largest non-streamed completion read, bytes (a prefill's `kv_transfer_params` list one
/// block id per block: ~10 bytes each).
pub const MAX_COMPLETION_BODY: usize = 4 << 20;

/// Every request to a worker goes through this: keep-alive connections per worker
/// ([`Pool`]), `TCP_NODELAY`, a connect timeout and a response-head timeout.
#[derive(Clone, Debug)]
pub struct WorkerClient {
    pool: Arc<Pool>,
    timeout: Duration,
    connect_timeout: Duration,
}

/// Idle keep-alive connections kept per worker: enough to reuse after a burst, few enough
/// that a thousand workers hold about one descriptor each between bursts (issue 18 item 5).
pub const MAX_IDLE_PER_WORKER: usize = 8;
/// An idle connection unused this long is closed (health checks keep one warm per worker).
pub const MAX_IDLE_TIME: Duration = Duration::from_secs(60);

/// `host:port` of an `http://host[:port]` URL (port 80 when absent).
pub fn authority(url: &str) -> &str {
    url.strip_prefix("http://")
        .unwrap_or(url)
        .trim_end_matches('/')
}

fn with_port(authority: &str) -> String {
    let has_port = match authority.rfind(']') {
        Some(i) => authority[i..].contains(':'),
        None => authority.contains(':'),
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

impl WorkerClient {
    /// `timeout`: how long to wait for a worker's response head.
    pub fn new(timeout: Duration) -> Self {
        Self {
            pool: Arc::new(Pool::new(MAX_IDLE_PER_WORKER, MAX_IDLE_TIME)),
            timeout,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Close the idle connections to the worker at `url` (it was deregistered).
    pub fn forget(&self, url: &str) {
        self.pool.forget(&with_port(authority(url)));
    }

    /// Idle connections held to the worker at `url`.
    pub fn idle_connections(&self, url: &str) -> usize {
        self.pool.idle(&with_port(authority(url)))
    }

    /// Send `method path` with `headers` and `body` to `url`, and read the response head.
    /// A kept-alive connection the worker closed meanwhile is replaced once.
    async fn exchange(
        &self,
        url: &str,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<(Conn, ResponseHead), WorkerError> {
        let auth = with_port(authority(url));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{headers}\r\n",
            authority(url),
            body.len()
        );
        let unreachable = |e: &dyn std::error::Error| WorkerError::Unreachable {
            url: url.into(),
            message: error_chain(e),
        };
        for attempt in 0..2 {
            let pooled = if attempt == 0 {
                self.pool.take(&auth)
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                None => Conn::connect(&auth, self.connect_timeout)
                    .await
                    .map_err(|e| unreachable(&e))?,
            };
            let sent = async {
                conn.send(head.as_bytes(), body).await?;
                conn.read_head().await
            };
            match tokio::time::timeout(self.timeout, sent).await {
                Err(_) => {
                    return Err(WorkerError::Timeout {
                        url: url.into(),
                        secs: self.timeout.as_secs_f64(),
                    })
                }
                Ok(Ok(h)) => return Ok((conn, h)),
                // The worker closed an idle kept-alive connection as we used it: nothing was
                // processed, try a fresh one.
                Ok(Err(e))
                    if reused
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::ConnectionReset
                        ) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(WorkerError::Protocol {
                        url: url.into(),
                        message: e.to_string(),
                    })
                }
                Ok(Err(e)) => return Err(unreachable(&e)),
            }
        }
        Err(WorkerError::Unreachable {
            url: url.into(),
            message: "the connection closed twice before a response".into(),
        })
    }

    /// Start a streamed completion on `url`, on the rank `pin` names
    /// ([`WorkerSpec::rank_pin`](super::spec::WorkerSpec::rank_pin)). `body` is the serialised
    /// worker request (model, prompt token ids, sampling fields, `stream: true` with usage).
    pub async fn generate(
        &self,
        url: &str,
        pin: RankPin,
        body: Vec<u8>,
    ) -> Result<WorkerStream, WorkerError> {
        let mut headers =
            String::from("Content-Type: application/json\r\nAccept: text/event-stream\r\n");
        let body = pin_rank(pin, &mut headers, body);
        let (mut conn, head) = self
            .exchange(url, "POST", "/v1/completions", &headers, &body)
            .await?;
        if !(200..300).contains(&head.status) {
            return Err(self.status_error(url, &mut conn, &head).await);
        }
        Ok(WorkerStream {
            url: url.to_string(),
            authority: with_port(authority(url)),
            body: BodyDecoder::new(&head),
            keep_alive: head.keep_alive,
            conn: Some(conn),
            sse: SseDecoder::new(MAX_EVENT_BYTES),
            pool: self.pool.clone(),
            done: false,
            body_done: false,
        })
    }

    /// A non-streamed completion on `url`, on the rank `pin` names (a disaggregated
    /// prefill): the worker's JSON response, at most [`MAX_COMPLETION_BODY`] bytes, read within
    /// the response timeout. Errors: as [`generate`](Self::generate), or a body too large or
    /// not JSON.
    pub async fn complete(
        &self,
        url: &str,
        pin: RankPin,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, WorkerError> {
        let mut headers = String::new();
        let body = pin_rank(pin, &mut headers, body);
        self.post_json(url, "/v1/completions", &headers, &body)
            .await
    }

    /// `POST {url}{path}` with a JSON `body` (and extra `headers`, each line ending in
    /// `\r\n`): the JSON answer, at most [`MAX_COMPLETION_BODY`] bytes, read within the
    /// response timeout, on the same kept-alive connections as every worker call. Used for
    /// prefill completions and for a `kvrouter router`'s calls. Errors: as
    /// [`generate`](Self::generate), or a body too large or not JSON.
    pub async fn post_json(
        &self,
        url: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<serde_json::Value, WorkerError> {
        let headers = format!("Content-Type: application/json\r\n{headers}");
        let bytes = self
            .post_bytes(url, path, &headers, body, MAX_COMPLETION_BODY, self.timeout)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| WorkerError::Protocol {
            url: url.into(),
            message: format!("response is not JSON: {e}"),
        })
    }

    /// `POST {url}{path}` with `body` (and `headers`, each line ending in `\r\n`): the
    /// response body, at most `max_bytes`, the whole exchange within `timeout` (and the head
    /// within the response timeout). Used by [`post_json`](Self::post_json) and TensorRT-LLM's
    /// event poller. Errors: as [`generate`](Self::generate), or a body too large.
    pub async fn post_bytes(
        &self,
        url: &str,
        path: &str,
        headers: &str,
        body: &[u8],
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, WorkerError> {
        let timed_out = || WorkerError::Timeout {
            url: url.into(),
            secs: timeout.as_secs_f64(),
        };
        let exchange = async {
            let (mut conn, head) = self.exchange(url, "POST", path, headers, body).await?;
            if !(200..300).contains(&head.status) {
                return Err(self.status_error(url, &mut conn, &head).await);
            }
            let bytes =
                conn.read_body(&head, max_bytes)
                    .await
                    .map_err(|e| WorkerError::Protocol {
                        url: url.into(),
                        message: e.to_string(),
                    })?;
            if head.keep_alive && conn.buffer().is_empty() {
                self.pool.put(&with_port(authority(url)), conn);
            }
            Ok(bytes)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out())?
    }

    /// The error of a non-2xx response: the worker's OpenAI-style `error.message` when it
    /// gives one, else its body's text.
    async fn status_error(&self, url: &str, conn: &mut Conn, head: &ResponseHead) -> WorkerError {
        let text = tokio::time::timeout(self.timeout, conn.read_body(head, MAX_SMALL_BODY))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(|m| m.as_str().map(String::from))
            })
            .unwrap_or(text);
        WorkerError::Status {
            url: url.into(),
            status: head.status,
            message,
        }
    }

    /// `GET {url}/health` answered 2xx within `timeout`.
    pub async fn health(&self, url: &str, timeout: Duration) -> bool {
        let check = async {
            let (mut conn, head) = self.exchange(url, "GET", "/health", "", &[]).await.ok()?;
            let _ = conn.read_body(&head, MAX_SMALL_BODY).await.ok()?;
            if head.keep_alive && conn.buffer().is_empty() {
                self.pool.put(&with_port(authority(url)), conn);
            }
            Some((200..300).contains(&head.status))
        };
        matches!(tokio::time::timeout(timeout, check).await, Ok(Some(true)))
    }
}

/// A worker's completion stream: each item is one event's payload (JSON, for
/// [`WorkerEvent::parse`]). The stream reads the worker's socket itself. Ends after
/// `data: [DONE]` (the connection then goes back to the pool); a body that ends without it is
/// [`WorkerError::Truncated`], an event over 16 MiB or broken framing
/// [`WorkerError::Protocol`].
pub struct WorkerStream {
    url: String,
    authority: String,
    conn: Option<Conn>,
    body: BodyDecoder,
    keep_alive: bool,
    sse: SseDecoder,
    pool: Arc<Pool>,
    done: bool,
    body_done: bool,
}

impl WorkerStream {
    /// The worker's base URL (for logs).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn fail(&mut self, e: WorkerError) -> Poll<Option<Result<Bytes, WorkerError>>> {
        self.done = true;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    /// `[DONE]` arrived: give the connection back once its body has ended — now if it has,
    /// else from a short task that reads the rest.
    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.keep_alive {
            return;
        }
        let _ = self.body.decode(conn.buffer(), |_| {});
        if self.body.is_done() {
            if conn.buffer().is_empty() {
                self.pool.put(&self.authority, conn);
            }
            return;
        }
        let mut body = std::mem::replace(&mut self.body, BodyDecoder::new(&DONE_HEAD));
        let (pool, authority) = (self.pool.clone(), self.authority.clone());
        tokio::spawn(async move {
            let finish = async {
                loop {
                    body.decode(conn.buffer(), |_| {})?;
                    if body.is_done() {
                        return Ok::<_, std::io::Error>(conn);
                    }
                    if std::future::poll_fn(|cx| conn.poll_fill(cx)).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            };
            if let Ok(Ok(conn)) = tokio::time::timeout(FINISH_TIMEOUT, finish).await {
                if conn_is_clean(&conn) {
                    pool.put(&authority, conn);
                }
            }
        });
    }
}

/// A finished body, for the decoder left behind once a stream hands its connection on.
const DONE_HEAD: ResponseHead = ResponseHead {
    status: 200,
    framing: Framing::Length(0),
    keep_alive: false,
};

fn conn_is_clean(conn: &Conn) -> bool {
    conn.buffered() == 0
}

impl Stream for WorkerStream {
    type Item = Result<Bytes, WorkerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.sse.next_event() {
                Ok(Some(ev)) if &ev[..] == b"[DONE]" => {
                    this.done = true;
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Some(ev)) => return Poll::Ready(Some(Ok(ev))),
                Ok(None) => {}
                Err(e) => {
                    let e = WorkerError::Protocol {
                        url: this.url.clone(),
                        message: e.to_string(),
                    };
                    return this.fail(e);
                }
            }
            if this.body_done {
                let e = WorkerError::Truncated {
                    url: this.url.clone(),
                };
                return this.fail(e);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let before = conn.buffered();
            if before > 0 {
                let sse = &mut this.sse;
                if let Err(e) = this.body.decode(conn.buffer(), |d| sse.push(d)) {
                    let e = WorkerError::Protocol {
                        url: this.url.clone(),
                        message: e.to_string(),
                    };
                    return this.fail(e);
                }
                this.body_done = this.body.is_done();
                // Only a partial chunk-size line or CRLF left: read more, do not spin.
                if this.body_done || conn.buffered() != before {
                    continue;
                }
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    if let Err(e) = this.body.eof() {
                        let e = WorkerError::Stream {
                            url: this.url.clone(),
                            message: e.to_string(),
                        };
                        return this.fail(e);
                    }
                    this.body_done = true;
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    let e = WorkerError::Stream {
                        url: this.url.clone(),
                        message: error_chain(&e),
                    };
                    return this.fail(e);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    /// A one-shot worker on loopback answering any request with `response` (written in
    /// `parts`), then closing.
    async fn worker(parts: Vec<Vec<u8>>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            for p in parts {
                let _ = s.write_all(&p).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        format!("http://{addr}")
    }

    fn chunked(events: &[&str]) -> Vec<Vec<u8>> {
        let mut out = vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
        for e in events {
            out.push(format!("{:x}\r\n{e}\r\n", e.len()).into_bytes());
        }
        out.push(b"0\r\n\r\n".to_vec());
        out
    }

    async fn events(parts: Vec<Vec<u8>>) -> Vec<Result<Bytes, WorkerError>> {
        let url = worker(parts).await;
        let c = WorkerClient::new(Duration::from_secs(5));
        match c.generate(&url, RankPin::None, b"{}".to_vec()).await {
            Ok(s) => s.collect().await,
            Err(e) => vec![Err(e)],
        }
    }

    #[test]
    fn the_rank_goes_in_a_header_or_first_in_the_body() {
        let body = br#"{"model":"m","prompt":[1]}"#.to_vec();
        let mut h = String::new();
        assert_eq!(pin_rank(RankPin::None, &mut h, body.clone()), body);
        assert_eq!(pin_rank(RankPin::Header(0), &mut h, body.clone()), body);
        assert_eq!(h, "X-data-parallel-rank: 0\r\n");
        let mut h = String::new();
        let pinned = pin_rank(RankPin::BodyField(3), &mut h, body);
        assert!(h.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&pinned).unwrap();
        assert_eq!(v["data_parallel_rank"], 3);
        assert_eq!(
            (&v["model"], &v["prompt"][0]),
            (&serde_json::json!("m"), &serde_json::json!(1))
        );
        for (body, want) in [
            (" { } ", r#" {"data_parallel_rank":1 } "#),
            ("{}", r#"{"data_parallel_rank":1}"#),
            ("[1]", "[1]"),
            ("", ""),
        ] {
            let got = pin_rank(RankPin::BodyField(1), &mut h, body.as_bytes().to_vec());
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }

    #[tokio::test]
    async fn split_events_parse_and_the_stream_stops_at_done() {
        let out = events(chunked(&[
            "data: {\"choices\":[{\"text\":\"He\",\"finish_reason\":null}]}\n",
            "\ndata: {\"choices\":[{\"text\":\"llo\",\"token_ids\":[5,6],\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\ndata: {\"x\":1}\n\n",
        ]))
        .await;
        let out: Vec<Bytes> = out.into_iter().map(|r| r.expect("event")).collect();
        assert_eq!(out.len(), 3);
        let e0 = WorkerEvent::parse(&out[0]).unwrap().unwrap();
        assert_eq!(e0.text, "He");
        assert!(e0.finish_reason.is_none());
        let e1 = WorkerEvent::parse(&out[1]).unwrap().unwrap();
        assert_eq!(
            (e1.tokens, e1.finish_reason.as_deref()),
            (2, Some("length"))
        );
        assert_eq!(e1.token_ids.map(|t| t.get()), Some("[5,6]"));
        for (ids, n) in [("[]", 0), ("[ ]", 0), ("[7]", 1), ("[1, 2,3]", 3)] {
            let ev = format!(r#"{{"choices":[{{"text":"","token_ids":{ids}}}]}}"#);
            assert_eq!(
                WorkerEvent::parse(ev.as_bytes()).unwrap().unwrap().tokens,
                n
            );
        }
        assert!(WorkerEvent::parse(br#"{"choices":[{"token_ids":5}]}"#).is_err());
        let e2 = WorkerEvent::parse(&out[2]).unwrap().unwrap();
        assert_eq!(e2.usage.map(|u| u.get()), Some("{\"prompt_tokens\":3}"));
        assert!(!e2.has_output());
        let esc = WorkerEvent::parse(br#"{"choices":[{"text":"a\"\n\u00e9","token_ids":null},{"text":"ignored"}],"usage":null}"#)
            .unwrap()
            .unwrap();
        assert_eq!(esc.text, "a\"\n\u{e9}");
        assert!(esc.usage.is_none());
    }

    #[test]
    fn framing_split_across_reads_waits_for_more_bytes() {
        // A chunk-size line and a chunk's CRLF each cut between two writes: the stream must
        // wait for the rest (it spun on the partial line before). Run on its own thread, so a
        // spinning poll fails the test instead of hanging it.
        let ev =
            "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let size = format!("{:x}", ev.len());
        let parts = vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            size.as_bytes()[..1].to_vec(),
            format!("{}\r\n{ev}\r", &size[1..]).into_bytes(),
            b"\n0\r\n\r\n".to_vec(),
        ];
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let out = rt.block_on(events(parts));
            let _ = tx.send(out.len() == 1 && out[0].is_ok());
        });
        let ok = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the stream spun or hung on a partial chunk line");
        assert!(ok);
    }

    #[tokio::test]
    async fn truncated_streams_garbage_error_events_and_statuses() {
        let out = events(chunked(&["data: {\"choices\":[{\"text\":\"a\"}]}\n\n"])).await;
        assert!(matches!(
            out.last(),
            Some(Err(WorkerError::Truncated { .. }))
        ));
        let mut cut = chunked(&["data: {\"choices\":[]}\n\n"]);
        cut.pop();
        let out = events(cut).await;
        assert!(
            matches!(out.last(), Some(Err(WorkerError::Stream { .. }))),
            "closed mid-body"
        );
        assert!(WorkerEvent::parse(b"{nope").is_err(), "malformed JSON");
        let e = WorkerEvent::parse(br#"{"error":{"message":"boom"}}"#).unwrap();
        assert_eq!(e.unwrap_err(), "boom");
        let big = format!("data: {}", "x".repeat(MAX_EVENT_BYTES + 1));
        let out = events(chunked(&[&big])).await;
        assert!(matches!(
            out.as_slice(),
            [Err(WorkerError::Protocol { .. })]
        ));
        assert!(
            !out[0].as_ref().unwrap_err().worker_gone(),
            "one bad event does not fail the worker"
        );
        let err = r#"{"error":{"message":"no way"}}"#;
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{err}",
            err.len()
        );
        let out = events(vec![resp.into_bytes()]).await;
        assert!(
            matches!(&out[..], [Err(WorkerError::Status { status: 400, message, .. })] if message == "no way")
        );
        let out = events(vec![b"nonsense\r\n\r\n".to_vec()]).await;
        assert!(matches!(
            out.as_slice(),
            [Err(WorkerError::Protocol { .. })]
        ));
    }

    #[tokio::test]
    async fn connections_are_kept_alive_and_dead_ones_replaced() {
        // A worker answering two requests on one connection, then closing it.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acc = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    for _ in 0..2 {
                        let mut buf = [0u8; 4096];
                        if tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                            .await
                            .unwrap_or(0)
                            == 0
                        {
                            return;
                        }
                        let body = "data: {\"choices\":[{\"text\":\"x\",\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
                        let r = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
                        s.write_all(r.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        let c = WorkerClient::new(Duration::from_secs(5));
        for _ in 0..5 {
            let s = c
                .generate(&url, RankPin::None, b"{}".to_vec())
                .await
                .unwrap();
            let out: Vec<_> = s.collect().await;
            assert_eq!(out.len(), 1);
            assert!(out[0].is_ok());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "two requests per connection: reused, and a closed one replaced without an error"
        );
    }
}
