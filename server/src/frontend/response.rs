//! Response shaping: ids, the OpenAI JSON of a whole response, of a streamed chunk and of the
//! final usage chunk, for both endpoints.
//!
//! A streamed chunk is written straight into the output buffer: the part that is the same for
//! every chunk of a request (id, object, created, model) is serialised once, and each chunk
//! adds only its escaped text and finish reason — no JSON tree per token.

use bytes::{BufMut, BytesMut};
use serde_json::{json, Map, Value};

use super::choice::{Choice, Delta};
use super::request::Endpoint;
use super::tools::ToolCall;

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

/// The `object` of a streamed chunk.
fn chunk_object(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::ChatCompletions => "chat.completion.chunk",
    }
}

/// Response ids and shapes for one request.
pub struct Shape {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[{"index":` for this request.
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
        let object = chunk_object(endpoint);
        let mut head = BytesMut::with_capacity(128 + model.len());
        head.put_slice(b"data: {\"id\":\"");
        head.put_slice(id.as_bytes());
        head.put_slice(b"\",\"object\":\"");
        head.put_slice(object.as_bytes());
        head.put_slice(b"\",\"created\":");
        head.put_slice(created.to_string().as_bytes());
        head.put_slice(b",\"model\":");
        json_str(&mut head, model);
        head.put_slice(b",\"choices\":[{\"index\":");
        Self {
            endpoint,
            id,
            created,
            model: model.to_string(),
            chunk_head: head.to_vec(),
        }
    }

    /// Append one streamed content chunk of choice `index` as a server-sent event (`role` on
    /// the first chat chunk). The fast path: text only, no JSON tree.
    pub fn write_chunk(
        &self,
        out: &mut BytesMut,
        index: u32,
        text: &str,
        finish: Option<&str>,
        role: bool,
    ) {
        let need = self.chunk_head.len() + text.len() + 96;
        if out.capacity() - out.len() < need {
            // Room for many chunks: the buffer is split off per write, its tail reused.
            out.reserve(need.max(8192));
        }
        out.put_slice(&self.chunk_head);
        if index == 0 {
            out.put_u8(b'0');
        } else {
            out.put_slice(index.to_string().as_bytes());
        }
        out.put_u8(b',');
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

    /// Append a streamed chunk of choice `index` with everything a [`Delta`] can carry —
    /// reasoning, tool calls, logprobs — and `usage` when it is sent with every chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn write_delta(
        &self,
        out: &mut BytesMut,
        index: u32,
        d: &Delta,
        finish: Option<&str>,
        role: bool,
        usage: Option<Value>,
    ) {
        let object = chunk_object(self.endpoint);
        let mut choice = Map::new();
        choice.insert("index".into(), index.into());
        match self.endpoint {
            Endpoint::Completions => {
                choice.insert("text".into(), d.content.as_str().into());
                choice.insert("logprobs".into(), d.logprobs.clone().unwrap_or(Value::Null));
            }
            Endpoint::ChatCompletions => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if !d.content.is_empty() || (d.reasoning.is_empty() && d.calls.is_empty()) {
                    delta.insert("content".into(), d.content.as_str().into());
                }
                if !d.reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), d.reasoning.as_str().into());
                }
                if !d.calls.is_empty() {
                    let calls = d
                        .calls
                        .iter()
                        .map(|(i, c)| {
                            let mut v = self.tool_call(index, *i, c);
                            v["index"] = (*i).into();
                            v
                        })
                        .collect();
                    delta.insert("tool_calls".into(), Value::Array(calls));
                }
                choice.insert("delta".into(), Value::Object(delta));
                choice.insert(
                    "logprobs".into(),
                    d.logprobs
                        .clone()
                        .map(|c| json!({"content": c}))
                        .unwrap_or(Value::Null),
                );
            }
        }
        choice.insert(
            "finish_reason".into(),
            finish.map(Value::from).unwrap_or(Value::Null),
        );
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        out.put_slice(b"data: ");
        let _ = serde_json::to_writer(out.writer(), &v);
        out.put_slice(b"\n\n");
    }

    /// An OpenAI tool call object; its id is unique per request, choice and call.
    fn tool_call(&self, choice: u32, i: usize, c: &ToolCall) -> Value {
        json!({
            "id": format!("call_{}_{choice}_{i}", self.id.rsplit('-').next().unwrap_or("0")),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        })
    }

    /// The final usage chunk of a stream (`choices: []`).
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let object = chunk_object(self.endpoint);
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }

    /// A whole (non-streamed) response of `choices`, in index order.
    pub fn response(&self, choices: &mut [Choice], usage: Value) -> Value {
        let choices: Vec<Value> = choices
            .iter_mut()
            .map(|c| {
                let finish = c.finish_reason();
                let logprobs = c.logprobs_value();
                match self.endpoint {
                    Endpoint::Completions => json!({
                        "index": c.index, "text": c.content, "logprobs": logprobs, "finish_reason": finish,
                    }),
                    Endpoint::ChatCompletions => {
                        let mut m = json!({"role": "assistant", "content": c.content});
                        if !c.reasoning_text.is_empty() {
                            m["reasoning_content"] = c.reasoning_text.as_str().into();
                        }
                        if !c.calls.is_empty() {
                            m["tool_calls"] = c
                                .calls
                                .iter()
                                .enumerate()
                                .map(|(i, call)| self.tool_call(c.index, i, call))
                                .collect();
                            if c.content.trim().is_empty() {
                                m["content"] = Value::Null;
                            }
                        }
                        json!({"index": c.index, "message": m, "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::ChatCompletions => "chat.completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices, "usage": usage})
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
                s.write_chunk(&mut out, 0, text, finish, role);
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
