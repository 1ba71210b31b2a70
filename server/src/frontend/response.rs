//! Response shaping: ids, the OpenAI JSON of a whole response, of a streamed chunk and of the
//! final usage chunk, for both endpoints.
//!
//! A streamed chunk is written straight into the output buffer: the part that is the same for
//! every chunk of a request (id, object, created, model) is serialised once, and each chunk
//! adds only its escaped text and finish reason — no JSON tree per token.

use bytes::{BufMut, BytesMut};
use serde_json::{json, Value};

use super::request::Endpoint;

/// The usage object returned to clients: the worker's, completed with what the frontend
/// knows when the worker sent none.
pub fn usage(worker: Option<&Value>, prompt_tokens: usize, completion_tokens: usize) -> Value {
    let get = |k: &str| worker.and_then(|u| u.get(k)).and_then(Value::as_u64);
    let p = get("prompt_tokens").unwrap_or(prompt_tokens as u64);
    let c = get("completion_tokens").unwrap_or(completion_tokens as u64);
    let cached = worker
        .and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Response ids and shapes for one request.
pub struct Shape {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[{"index":0,` for this request.
    chunk_head: Vec<u8>,
}

/// Append `s` as a JSON string (quoted, escaped).
fn json_str(out: &mut BytesMut, s: &str) {
    // Writing into a BytesMut cannot fail.
    let _ = serde_json::to_writer(out.writer(), s);
}

impl Shape {
    pub fn new(endpoint: Endpoint, model: &str, n: u64) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::ChatCompletions => "chatcmpl",
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let id = format!("{prefix}-{n:016x}");
        let object = match endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::ChatCompletions => "chat.completion.chunk",
        };
        let mut head = BytesMut::with_capacity(128 + model.len());
        head.put_slice(b"data: {\"id\":\"");
        head.put_slice(id.as_bytes());
        head.put_slice(b"\",\"object\":\"");
        head.put_slice(object.as_bytes());
        head.put_slice(b"\",\"created\":");
        head.put_slice(created.to_string().as_bytes());
        head.put_slice(b",\"model\":");
        json_str(&mut head, model);
        head.put_slice(b",\"choices\":[{\"index\":0,");
        Self {
            endpoint,
            id,
            created,
            model: model.to_string(),
            chunk_head: head.to_vec(),
        }
    }

    /// Append one streamed content chunk as a server-sent event (`role` on the first chat
    /// chunk).
    pub fn write_chunk(&self, out: &mut BytesMut, text: &str, finish: Option<&str>, role: bool) {
        let need = self.chunk_head.len() + text.len() + 96;
        if out.capacity() - out.len() < need {
            // Room for many chunks: the buffer is split off per write, its tail reused.
            out.reserve(need.max(8192));
        }
        out.put_slice(&self.chunk_head);
        match self.endpoint {
            Endpoint::Completions => {
                out.put_slice(b"\"text\":");
                json_str(out, text);
            }
            Endpoint::ChatCompletions => {
                out.put_slice(if role {
                    b"\"delta\":{\"role\":\"assistant\",\"content\":"
                } else {
                    b"\"delta\":{\"content\":"
                });
                json_str(out, text);
                out.put_u8(b'}');
            }
        }
        out.put_slice(b",\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => json_str(out, f),
            None => out.put_slice(b"null"),
        }
        out.put_slice(b"}]}\n\n");
    }

    /// The final usage chunk of a stream (`choices: []`).
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::ChatCompletions => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }

    /// A whole (non-streamed) response.
    pub fn response(&self, text: &str, finish: Option<&str>, usage: Value) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Endpoint::ChatCompletions => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_chunks_are_the_openai_json() {
        for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
            let s = Shape::new(endpoint, "m\"odel", 7);
            for (text, finish, role) in [("a\"\n\u{e9}", None, true), ("", Some("stop"), false)] {
                let mut out = BytesMut::new();
                s.write_chunk(&mut out, text, finish, role);
                let line = std::str::from_utf8(&out).unwrap();
                let json = line
                    .strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap();
                let v: Value = serde_json::from_str(json).unwrap();
                let choice = &v["choices"][0];
                let want = match endpoint {
                    Endpoint::Completions => json!({
                        "id": s.id, "object": "text_completion", "created": s.created, "model": "m\"odel",
                        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                    }),
                    Endpoint::ChatCompletions => {
                        let delta = if role {
                            json!({"role": "assistant", "content": text})
                        } else {
                            json!({"content": text})
                        };
                        json!({
                            "id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": "m\"odel",
                            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                        })
                    }
                };
                assert_eq!(v, want, "{choice}");
            }
        }
    }
}
