//! Talking to workers: a request goes to the chosen worker's `POST /v1/completions` as token
//! ids with `stream: true` (what vLLM and SGLang serve), and comes back as a stream of
//! [`WorkerChunk`]s parsed from its server-sent events.
//!
//! The frontend always streams from the worker, even for non-streaming clients, so it sees
//! the first token (prefill complete) and can measure TTFT and ITL.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};

use crate::error::error_chain;

/// One parsed event of a worker's completion stream.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkerChunk {
    /// New text (may be empty, e.g. when the worker runs without a tokenizer).
    pub text: String,
    /// New token ids, when the worker returns them.
    pub token_ids: Vec<u32>,
    /// `stop`, `length`, … on the last content chunk.
    pub finish_reason: Option<String>,
    /// The usage object, on the usage chunk.
    pub usage: Option<Value>,
}

impl WorkerChunk {
    /// Whether it carries generated output.
    pub fn has_output(&self) -> bool {
        !self.text.is_empty() || !self.token_ids.is_empty()
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
            WorkerError::Protocol { .. } => "malformed event",
        }
    }

    /// Whether the worker should take no new requests until its health check passes.
    pub fn worker_gone(&self) -> bool {
        matches!(
            self,
            WorkerError::Unreachable { .. } | WorkerError::Stream { .. }
        )
    }
}

/// The HTTP client every request to a worker goes through (one keep-alive pool, TCP_NODELAY).
#[derive(Clone, Debug)]
pub struct WorkerClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl WorkerClient {
    /// `timeout`: how long to wait for a worker's response headers.
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build()
            .expect("building the HTTP client");
        Self { http, timeout }
    }

    /// The underlying client (health checks share the pool).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Start a streamed completion on `url` for rank `dp_rank`. `body` is the worker request
    /// (model, prompt token ids, sampling fields); `stream` and usage reporting are forced on.
    pub async fn generate(
        &self,
        url: &str,
        dp_rank: u32,
        mut body: Map<String, Value>,
    ) -> Result<impl Stream<Item = Result<WorkerChunk, WorkerError>> + Send + 'static, WorkerError>
    {
        body.insert("stream".into(), Value::Bool(true));
        body.insert(
            "stream_options".into(),
            serde_json::json!({ "include_usage": true }),
        );
        let endpoint = format!("{url}/v1/completions");
        let mut req = self.http.post(&endpoint).json(&body);
        if dp_rank > 0 {
            req = req.header("X-data-parallel-rank", dp_rank.to_string());
        }
        let resp = match tokio::time::timeout(self.timeout, req.send()).await {
            Err(_) => {
                return Err(WorkerError::Timeout {
                    url: url.into(),
                    secs: self.timeout.as_secs_f64(),
                })
            }
            Ok(Err(e)) => {
                return Err(WorkerError::Unreachable {
                    url: url.into(),
                    message: error_chain(&e),
                })
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(|m| m.as_str().map(String::from))
                })
                .unwrap_or(text);
            return Err(WorkerError::Status {
                url: url.into(),
                status: status.as_u16(),
                message,
            });
        }
        let url = url.to_string();
        let bytes = resp.bytes_stream();
        Ok(sse_chunks(url, bytes))
    }
}

/// Split an SSE byte stream into events and parse each `data:` payload. Ends after
/// `data: [DONE]`; a stream that ends without it after no finish is an error.
fn sse_chunks<S>(
    url: String,
    bytes: S,
) -> impl Stream<Item = Result<WorkerChunk, WorkerError>> + Send + 'static
where
    S: Stream<Item = reqwest::Result<bytes::Bytes>> + Send + Unpin + 'static,
{
    struct St<S> {
        url: String,
        bytes: S,
        buf: BytesMut,
        done: bool,
        finished: bool,
    }
    let st = St {
        url,
        bytes,
        buf: BytesMut::new(),
        done: false,
        finished: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(event) = take_event(&mut st.buf) {
                match parse_event(&event) {
                    Event::Skip => continue,
                    Event::Done => return None,
                    Event::Chunk(c) => {
                        st.finished |= c.finish_reason.is_some();
                        return Some((Ok(c), st));
                    }
                    Event::Error(message) => {
                        st.done = true;
                        let e = WorkerError::Status {
                            url: st.url.clone(),
                            status: 500,
                            message,
                        };
                        return Some((Err(e), st));
                    }
                    Event::Garbage(message) => {
                        st.done = true;
                        let e = WorkerError::Protocol {
                            url: st.url.clone(),
                            message,
                        };
                        return Some((Err(e), st));
                    }
                }
            }
            match st.bytes.next().await {
                Some(Ok(b)) => {
                    if st.buf.len() + b.len() > 16 << 20 {
                        st.done = true;
                        let e = WorkerError::Protocol {
                            url: st.url.clone(),
                            message: "event larger than 16 MiB".into(),
                        };
                        return Some((Err(e), st));
                    }
                    st.buf.extend_from_slice(&b)
                }
                Some(Err(e)) => {
                    st.done = true;
                    let e = WorkerError::Stream {
                        url: st.url.clone(),
                        message: error_chain(&e),
                    };
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    if st.finished {
                        return None;
                    }
                    let e = WorkerError::Stream {
                        url: st.url.clone(),
                        message: "stream ended before the response finished".into(),
                    };
                    return Some((Err(e), st));
                }
            }
        }
    })
}

/// Remove and return the first complete event (up to a blank line) from `buf`.
fn take_event(buf: &mut BytesMut) -> Option<Vec<u8>> {
    let pos = buf.windows(2).position(|w| w == b"\n\n")?;
    let ev = buf[..pos].to_vec();
    buf.advance(pos + 2);
    Some(ev)
}

enum Event {
    Skip,
    Done,
    Chunk(WorkerChunk),
    Error(String),
    Garbage(String),
}

fn parse_event(raw: &[u8]) -> Event {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Event::Garbage("event is not UTF-8".into());
    };
    let mut data = String::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    if data.is_empty() {
        return Event::Skip;
    }
    if data == "[DONE]" {
        return Event::Done;
    }
    let v: Value = match serde_json::from_str(&data) {
        Ok(v) => v,
        Err(e) => return Event::Garbage(format!("bad JSON in event: {e}")),
    };
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| err.to_string());
        return Event::Error(msg);
    }
    let mut c = WorkerChunk {
        usage: v.get("usage").filter(|u| !u.is_null()).cloned(),
        ..Default::default()
    };
    if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
        if let Some(t) = choice.get("text").and_then(Value::as_str) {
            c.text = t.to_string();
        }
        if let Some(ids) = choice.get("token_ids").and_then(Value::as_array) {
            c.token_ids = ids
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect();
        }
        c.finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(String::from);
    }
    Event::Chunk(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_split_events_and_stops_at_done() {
        let parts: Vec<reqwest::Result<bytes::Bytes>> = vec![
            Ok("data: {\"choices\":[{\"text\":\"He\",\"finish_reason\":null}]}\n".into()),
            Ok("\ndata: {\"choices\":[{\"text\":\"llo\",\"token_ids\":[5,6],\"finish_reason\":\"length\"}]}\n\n".into()),
            Ok("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\ndata: {\"x\":1}\n\n".into()),
        ];
        let s = sse_chunks("u".into(), futures::stream::iter(parts));
        let out: Vec<_> = s.collect().await;
        assert_eq!(out.len(), 3);
        let c: Vec<WorkerChunk> = out.into_iter().map(|r| r.expect("chunk")).collect();
        assert_eq!(c[0].text, "He");
        assert_eq!(c[1].token_ids, vec![5, 6]);
        assert_eq!(c[1].finish_reason.as_deref(), Some("length"));
        assert_eq!(
            c[2].usage
                .as_ref()
                .and_then(|u| u["prompt_tokens"].as_u64()),
            Some(3)
        );
    }

    #[tokio::test]
    async fn truncated_stream_and_garbage_are_errors() {
        let parts: Vec<reqwest::Result<bytes::Bytes>> =
            vec![Ok("data: {\"choices\":[{\"text\":\"a\"}]}\n\n".into())];
        let out: Vec<_> = sse_chunks("u".into(), futures::stream::iter(parts))
            .collect()
            .await;
        assert!(matches!(out.last(), Some(Err(WorkerError::Stream { .. }))));
        let parts: Vec<reqwest::Result<bytes::Bytes>> = vec![Ok("data: {nope\n\n".into())];
        let out: Vec<_> = sse_chunks("u".into(), futures::stream::iter(parts))
            .collect()
            .await;
        assert!(matches!(
            out.as_slice(),
            [Err(WorkerError::Protocol { .. })]
        ));
        assert!(
            !out[0].as_ref().unwrap_err().worker_gone(),
            "one bad event does not fail the worker"
        );
        let parts: Vec<reqwest::Result<bytes::Bytes>> =
            vec![Ok("data: {\"error\":{\"message\":\"boom\"}}\n\n".into())];
        let out: Vec<_> = sse_chunks("u".into(), futures::stream::iter(parts))
            .collect()
            .await;
        assert!(
            matches!(out.as_slice(), [Err(WorkerError::Status { message, .. })] if message == "boom")
        );
    }
}
