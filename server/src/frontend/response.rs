//! Response shaping: ids, the OpenAI JSON of a whole response, of a streamed chunk and of the
//! final usage chunk, for both endpoints.

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
        Self {
            endpoint,
            id: format!("{prefix}-{n:016x}"),
            created,
            model: model.to_string(),
        }
    }

    /// A streamed content chunk (`role` on the first chat chunk).
    pub fn chunk(&self, text: &str, finish: Option<&str>, role: bool) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            }),
            Endpoint::ChatCompletions => {
                let delta = if role {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
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
