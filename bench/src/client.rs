//! One streamed OpenAI-compatible request and what it measured.
//!
//! Requests go to `BASE/v1/completions` (prompt as token ids) or `BASE/v1/chat/completions`
//! (prompt as text in one user message) with `stream: true`,
//! `stream_options.include_usage: true`, `max_tokens` and `ignore_eos: true`. The answer is
//! read as server-sent events: every chunk with a choice is one token arrival (the role-only
//! first chunk of a chat stream is not), the usage chunk gives prompt, completion and cached
//! tokens, `data: [DONE]` ends it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use kvrouter_server::error::error_chain;
use kvrouter_server::sse::SseDecoder;

/// Largest server-sent event accepted from the target, bytes.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// Which OpenAI API the benchmark drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    /// `/v1/completions`, prompt as token ids.
    #[default]
    Completions,
    /// `/v1/chat/completions`, prompt decoded to text (one user message).
    Chat,
}

impl std::str::FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "completions" => Ok(Api::Completions),
            "chat" => Ok(Api::Chat),
            _ => Err(format!("unknown endpoint {s:?} (completions or chat)")),
        }
    }
}

/// What one prompt is sent as.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt<'a> {
    /// Token ids, to `/v1/completions`.
    Tokens(&'a [u32]),
    /// Text, as one user message to `/v1/chat/completions`.
    ChatText(String),
}

/// Token accounting from the response's `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens` (0 when absent).
    pub cached_tokens: u64,
}

/// What one request measured. Times in ms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Position in the workload.
    pub index: usize,
    /// When it was sent, ms after the run started.
    pub start_ms: f64,
    /// Completed without an error (HTTP status, error event, transport, timeout).
    pub ok: bool,
    /// The error, when not `ok`.
    pub error: Option<String>,
    /// Time to the first token chunk.
    pub ttft_ms: Option<f64>,
    /// Send to end of stream.
    pub e2e_ms: f64,
    /// Gaps between successive token chunks (inter-token latency), in arrival order.
    pub itl_ms: Vec<f64>,
    /// Token chunks received.
    pub chunks: u64,
    /// The final usage, when the server sent one.
    pub usage: Option<Usage>,
}

/// The JSON body of one request (`stream`, `include_usage`, `ignore_eos` set).
pub fn request_body(model: &str, prompt: &Prompt<'_>, max_tokens: usize) -> Value {
    let mut body = match prompt {
        Prompt::Tokens(ids) => json!({"model": model, "prompt": ids, "max_tokens": max_tokens}),
        Prompt::ChatText(text) => json!({
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "max_completion_tokens": max_tokens,
        }),
    };
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// `BASE/v1/completions` or `BASE/v1/chat/completions`.
pub fn endpoint_url(base: &str, prompt: &Prompt<'_>) -> String {
    match prompt {
        Prompt::Tokens(_) => format!("{base}/v1/completions"),
        Prompt::ChatText(_) => format!("{base}/v1/chat/completions"),
    }
}

/// Where requests go: one HTTP client (a keep-alive connection pool), a base URL such as
/// `http://127.0.0.1:8000` (without `/v1`), the served model name and the per-request
/// time limit (connect to end of stream).
#[derive(Clone, Debug)]
pub struct Target {
    /// The shared client.
    pub client: reqwest::Client,
    /// Base URL, no trailing slash.
    pub base: String,
    /// `model` of every request.
    pub model: String,
    /// Whole-exchange time limit.
    pub timeout: Duration,
}

/// A client for benchmarking: keep-alive pool without an idle cap, `TCP_NODELAY`, HTTP/1.1.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .expect("a plain HTTP client builds")
}

/// Send one streamed request (workload position `index`) and measure it. Never fails: errors
/// (connection, HTTP status with the body's first 300 characters, an `error` event in the
/// stream, a stream that ends without `[DONE]`, the target's timeout) are recorded in the
/// returned record with `ok = false`. `run_start` is the origin of `start_ms`.
pub async fn send(
    target: &Target,
    index: usize,
    prompt: Prompt<'_>,
    max_tokens: usize,
    run_start: Instant,
) -> RequestRecord {
    let body = serde_json::to_vec(&request_body(&target.model, &prompt, max_tokens))
        .expect("a JSON value serialises");
    let url = endpoint_url(&target.base, &prompt);
    let t0 = Instant::now();
    let mut rec = RequestRecord {
        index,
        start_ms: (t0 - run_start).as_secs_f64() * 1e3,
        ..Default::default()
    };
    let result = tokio::time::timeout(
        target.timeout,
        exchange(&target.client, &url, body, t0, &mut rec),
    )
    .await;
    rec.e2e_ms = t0.elapsed().as_secs_f64() * 1e3;
    let err = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!(
            "timeout after {:.0} s",
            target.timeout.as_secs_f64()
        )),
    };
    rec.ok = err.is_none();
    rec.error = err;
    rec
}

async fn exchange(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    t0: Instant,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("request: {}", error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let short: String = text.chars().take(300).collect();
        return Err(format!("HTTP {}: {}", status.as_u16(), short.trim()));
    }
    let mut stream = resp.bytes_stream();
    let mut sse = SseDecoder::new(MAX_EVENT_BYTES);
    let mut last_token: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading the stream: {}", error_chain(&e)))?;
        let now = Instant::now();
        sse.push(&chunk);
        while let Some(data) = sse.next_event().map_err(|e| e.to_string())? {
            match parse_event(&data)? {
                Event::Done => return Ok(()),
                Event::Other => {}
                Event::Data { token, usage } => {
                    if token {
                        match last_token {
                            None => rec.ttft_ms = Some((now - t0).as_secs_f64() * 1e3),
                            Some(prev) => rec.itl_ms.push((now - prev).as_secs_f64() * 1e3),
                        }
                        last_token = Some(now);
                        rec.chunks += 1;
                    }
                    if usage.is_some() {
                        rec.usage = usage;
                    }
                }
            }
        }
    }
    Err("stream ended without [DONE]".into())
}

#[derive(Debug, PartialEq)]
enum Event {
    Done,
    Other,
    Data { token: bool, usage: Option<Usage> },
}

/// One SSE event's data (its `data:` lines joined, as [`SseDecoder`] returns it).
fn parse_event(raw: &[u8]) -> Result<Event, String> {
    let text = String::from_utf8_lossy(raw);
    let data = text.trim();
    if data.is_empty() {
        return Ok(Event::Other);
    }
    if data == "[DONE]" {
        return Ok(Event::Done);
    }
    let v: Value = serde_json::from_str(data).map_err(|e| format!("bad event {data:.200}: {e}"))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_string);
        return Err(format!("error event: {msg}"));
    }
    let token = match v.get("choices").and_then(Value::as_array) {
        Some(choices) if !choices.is_empty() => !choices.iter().all(is_role_only),
        _ => false,
    };
    let usage = v.get("usage").filter(|u| !u.is_null()).map(|u| {
        let n = |x: Option<&Value>| x.and_then(Value::as_u64).unwrap_or(0);
        Usage {
            prompt_tokens: n(u.get("prompt_tokens")),
            completion_tokens: n(u.get("completion_tokens")),
            cached_tokens: n(u.pointer("/prompt_tokens_details/cached_tokens")),
        }
    });
    Ok(Event::Data { token, usage })
}

/// A chat choice that only announces the assistant role (no content, no token ids, no finish).
fn is_role_only(choice: &Value) -> bool {
    let Some(delta) = choice.get("delta") else {
        return false;
    };
    let empty_content = delta
        .get("content")
        .is_none_or(|c| c.is_null() || c.as_str() == Some(""));
    let no_ids = choice
        .get("token_ids")
        .is_none_or(|t| t.as_array().is_none_or(Vec::is_empty));
    let no_finish = choice.get("finish_reason").is_none_or(Value::is_null);
    delta.get("role").is_some() && empty_content && no_ids && no_finish
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_classified() {
        let tok = br#"{"choices":[{"index":0,"text":"","token_ids":[5]}]}"#;
        assert_eq!(
            parse_event(tok).unwrap(),
            Event::Data {
                token: true,
                usage: None
            }
        );
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(
            parse_event(role).unwrap(),
            Event::Data {
                token: false,
                usage: None
            }
        );
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            parse_event(usage).unwrap(),
            Event::Data {
                token: false,
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: 3,
                    cached_tokens: 8
                })
            }
        );
        let null_usage = br#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(
            parse_event(null_usage).unwrap(),
            Event::Data {
                token: true,
                usage: None
            }
        );
        assert_eq!(parse_event(b"[DONE]").unwrap(), Event::Done);
        assert_eq!(parse_event(b"").unwrap(), Event::Other);
        let err = parse_event(br#"{"error":{"message":"boom"}}"#).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn bodies_ask_for_streamed_usage() {
        let b = request_body("m", &Prompt::Tokens(&[1, 2]), 7);
        assert_eq!(b["prompt"], json!([1, 2]));
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        let c = request_body("m", &Prompt::ChatText("hi".into()), 3);
        assert_eq!(c["messages"][0]["content"], "hi");
        assert_eq!(
            endpoint_url("http://h", &Prompt::ChatText(String::new())),
            "http://h/v1/chat/completions"
        );
    }
}
