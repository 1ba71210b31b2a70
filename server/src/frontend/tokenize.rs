//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes.
//!
//! `/tokenize` takes `{"model"?, "prompt", "add_special_tokens"? (default true)}` or a chat,
//! `{"model"?, "messages", "add_generation_prompt"? (default true), "continue_final_message"?,
//! "tools"?, "chat_template_kwargs"?, "add_special_tokens"? (default false)}`, plus
//! `"return_token_strs"?`, and answers `{"count", "max_model_len", "tokens", "token_strs"}`
//! (`token_strs` is `null` unless asked for). The ids come from the completion endpoints' own
//! prompt functions, so they are exactly the ids a request with the same prompt and options is
//! routed on; only `continue_final_message`, which the chat endpoint refuses, is rendered here
//! (for clients that tokenize a chat to send its ids to `/v1/completions`). The prompt cache is
//! not used: a probe neither fills nor evicts it.
//!
//! `/detokenize` takes `{"model"?, "tokens": [ids]}` and answers `{"prompt": text}` (special
//! tokens kept, as vLLM's decode does).
//!
//! Bodies are read like completion bodies (same size limit and timeout); large ones are
//! processed on the blocking pool, sharing the completion endpoints' slots. A `model` other
//! than the served one is a 404; everything malformed is a 400 naming the field.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvrouter_preprocess::{ChatTemplateArgs, Preprocessor};
use serde_json::{json, Map, Value};

use super::completion::read_body;
use super::probes::unknown_model;
use super::request::{chat_prompt, completion_prompt};
use super::AppState;
use crate::error::ApiError;

/// `POST /tokenize`.
pub async fn tokenize(State(s): State<Arc<AppState>>, body: Body) -> Response {
    run(s, body, |s, b| {
        tokenize_json(&s.pre, &s.model_name, s.limits.context_length, b)
    })
    .await
}

/// `POST /detokenize`.
pub async fn detokenize(State(s): State<Arc<AppState>>, body: Body) -> Response {
    run(s, body, |s, b| detokenize_json(&s.pre, &s.model_name, b)).await
}

type Job = fn(&AppState, &[u8]) -> Result<Value, ApiError>;

/// Read the body (bounded in size and time) and answer `job`'s JSON, small bodies right here
/// and large ones on the blocking pool, as the completion endpoints parse theirs.
async fn run(s: Arc<AppState>, body: Body, job: Job) -> Response {
    let bytes: Bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(e) => {
            s.metrics.body_errors.inc();
            return e.into_response();
        }
    };
    let r = if bytes.len() <= s.preprocessing.inline_bytes {
        job(&s, &bytes)
    } else {
        let _slot = s.preprocessing.slots.acquire().await;
        let s2 = s.clone();
        tokio::task::spawn_blocking(move || job(&s2, &bytes))
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    format!("tokenization failed: {e}"),
                ))
            })
    };
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The `/tokenize` answer for `body`, against the model served as `served` with a context of
/// `max_model_len` tokens. Errors: 400 (bad JSON or fields, template or encoding failure), 404
/// (another model).
pub fn tokenize_json(
    pre: &Preprocessor,
    served: &str,
    max_model_len: usize,
    body: &[u8],
) -> Result<Value, ApiError> {
    let obj = object(body)?;
    check_model(&obj, served)?;
    let return_token_strs = get_bool(&obj, "return_token_strs")?.unwrap_or(false);
    let present = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    let tokens = match (present("messages"), present("prompt")) {
        (true, true) => {
            return Err(ApiError::bad_request(
                "give either `prompt` or `messages`, not both",
            ))
        }
        (false, false) => {
            return Err(
                ApiError::bad_request("missing field `prompt` (or `messages` for a chat)")
                    .param("prompt"),
            )
        }
        (false, true) => completion_prompt(&obj, pre, None)?,
        (true, false) => chat_tokens(&obj, pre)?,
    };
    let token_strs = return_token_strs.then(|| {
        tokens
            .iter()
            .map(|&id| pre.tokenizer().id_to_token(id).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
}

/// The `/detokenize` answer for `body`. Errors: 400 (bad JSON, ids that are not integers in
/// the vocabulary), 404 (another model).
pub fn detokenize_json(pre: &Preprocessor, served: &str, body: &[u8]) -> Result<Value, ApiError> {
    let obj = object(body)?;
    check_model(&obj, served)?;
    let vocab = pre.vocab_size();
    let ids = match obj.get("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&t| t < vocab as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "token ids must be integers in 0..{vocab}, got {}",
                            describe(x)
                        ))
                        .param("tokens")
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("missing field `tokens`").param("tokens"))
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("`tokens` must be a list of token ids").param("tokens"),
            )
        }
    };
    let text = pre
        .decode_with(&ids, false)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("tokens"))?;
    Ok(json!({ "prompt": text }))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

/// `model` is optional here (as in vLLM); when given it must be the served one.
fn check_model(obj: &Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => Err(unknown_model(served, m)),
        Some(_) => Err(ApiError::bad_request("`model` must be a string").param("model")),
    }
}

fn get_bool(obj: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad_request(format!("`{k}` must be a boolean"))),
    }
}

/// A short description of a JSON value for an error message (never the whole of a large one).
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A chat's ids: the chat endpoint's own function, except with `continue_final_message`
/// (which the chat endpoint refuses): rendered here, the final message left open.
fn chat_tokens(obj: &Map<String, Value>, pre: &Preprocessor) -> Result<Vec<u32>, ApiError> {
    let add_generation_prompt = get_bool(obj, "add_generation_prompt")?.unwrap_or(true);
    let continue_final_message = get_bool(obj, "continue_final_message")?.unwrap_or(false);
    let add_special_tokens = get_bool(obj, "add_special_tokens")?.unwrap_or(false);
    if continue_final_message && add_generation_prompt {
        return Err(ApiError::bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
        )
        .param("continue_final_message"));
    }
    if !continue_final_message {
        return chat_prompt(obj, pre, None);
    }
    let messages = match obj.get("messages") {
        Some(m @ Value::Array(a)) if !a.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request("`messages` is empty").param("messages"))
        }
        _ => return Err(ApiError::bad_request("`messages` must be an array").param("messages")),
    };
    let extra = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`chat_template_kwargs` must be an object",
            ))
        }
    };
    let mut text = pre
        .render_chat(&ChatTemplateArgs {
            messages,
            tools: obj.get("tools"),
            add_generation_prompt,
            extra,
        })
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    if continue_final_message {
        let end = final_message_end(&text, messages)?;
        text.truncate(end);
    }
    pre.encode_with(&text, add_special_tokens)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))
}

/// Where the final message's text ends in the rendered chat, to continue it rather than close
/// it (Hugging Face's `continue_final_message`: the last occurrence of the stripped text; its
/// trailing whitespace kept when the template kept it).
fn final_message_end(rendered: &str, messages: &Value) -> Result<usize, ApiError> {
    let err = |m: &str| ApiError::bad_request(m.to_string()).param("continue_final_message");
    let content = match messages
        .as_array()
        .and_then(|a| a.last())
        .and_then(|m| m.get("content"))
    {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .ok_or_else(|| err("`continue_final_message` needs text in the final message"))?,
        _ => {
            return Err(err(
                "`continue_final_message` needs text in the final message",
            ))
        }
    };
    let stripped = content.trim();
    let at = rendered.rfind(stripped).ok_or_else(|| {
        err("`continue_final_message` is set but the final message does not appear in the rendered chat template")
    })?;
    let left = content.trim_start();
    Ok(
        if left.len() == content.len() && rendered[at..].starts_with(content) {
            at + content.len()
        } else {
            at + stripped.len()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "m";

    fn pre() -> Preprocessor {
        Preprocessor::from_model_dir(crate::vendored_model_dir()).expect("vendored tokenizer")
    }

    fn tok(pre: &Preprocessor, body: Value) -> Result<Value, ApiError> {
        tokenize_json(pre, M, 4096, &serde_json::to_vec(&body).unwrap())
    }

    fn ids(v: &Value) -> Vec<u64> {
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    }

    #[test]
    fn chat_ids_are_the_chat_endpoints_ids() {
        let p = pre();
        let v = tok(
            &p,
            json!({"model": M, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .unwrap();
        assert_eq!(
            ids(&v),
            vec![151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
        );
        assert_eq!(v["count"], 9);
        assert_eq!(v["max_model_len"], 4096);
        assert_eq!(v["token_strs"], Value::Null);
        // Without the generation prompt: the assistant header's 3 tokens go.
        let v = tok(
            &p,
            json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": false}),
        )
        .unwrap();
        assert_eq!(v["count"], 6);
    }

    #[test]
    fn continue_final_message_leaves_the_last_turn_open() {
        let p = pre();
        let msgs = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]);
        let closed = ids(&tok(
            &p,
            json!({"messages": msgs, "add_generation_prompt": false}),
        )
        .unwrap());
        let open = ids(
            &tok(
                &p,
                json!({"messages": msgs, "add_generation_prompt": false, "continue_final_message": true}),
            )
            .unwrap(),
        );
        let tail = p.encode("Hello, I am").unwrap();
        assert!(
            open.ends_with(&tail.iter().map(|&t| u64::from(t)).collect::<Vec<_>>()),
            "{open:?}"
        );
        assert!(open.len() < closed.len());
        let e = tok(
            &p,
            json!({"messages": msgs, "continue_final_message": true}),
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn prompt_ids_strings_and_round_trip() {
        let p = pre();
        let v = tok(
            &p,
            json!({"prompt": "Hello world", "return_token_strs": true}),
        )
        .unwrap();
        assert_eq!(v["token_strs"], json!(["Hello", "Ġworld"]));
        let d = detokenize_json(
            &p,
            M,
            &serde_json::to_vec(&json!({"tokens": v["tokens"]})).unwrap(),
        )
        .unwrap();
        assert_eq!(d["prompt"], "Hello world");
        let v = tok(
            &p,
            json!({"prompt": "Hello world", "add_special_tokens": false}),
        )
        .unwrap();
        assert_eq!(v["count"], 2);
        assert_eq!(tok(&p, json!({"prompt": ""})).unwrap()["count"], 0);
        // Special tokens are kept by /detokenize.
        let d = detokenize_json(&p, M, br#"{"tokens":[151644]}"#).unwrap();
        assert_eq!(d["prompt"], "<|im_start|>");
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        let p = pre();
        let status =
            |r: Result<Value, ApiError>| r.map(|_| 200).unwrap_or_else(|e| e.status.as_u16());
        for body in [
            &b""[..],
            b"[]",
            b"null",
            b"{",
            b"{\"prompt\": 5}",
            b"{\"prompt\": [[1, 2], [3]]}",
            b"{\"prompt\": [-1]}",
            b"{\"prompt\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
            b"{\"messages\": []}",
            b"{\"messages\": {}}",
            b"{\"messages\": [1], \"continue_final_message\": true, \"add_generation_prompt\": false}",
            b"{\"messages\": [{\"role\": \"user\"}], \"continue_final_message\": true, \"add_generation_prompt\": false}",
            b"{\"prompt\": \"x\", \"model\": 3}",
            b"{\"prompt\": \"x\", \"return_token_strs\": \"yes\"}",
            b"{}",
        ] {
            assert_eq!(
                status(tokenize_json(&p, M, 10, body)),
                400,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            status(tok(&p, json!({"prompt": "x", "model": "other"}))),
            404
        );
        for body in [
            &b"{}"[..],
            b"{\"tokens\": 1}",
            b"{\"tokens\": [1.5]}",
            b"{\"tokens\": [-1]}",
            b"{\"tokens\": [\"a\"]}",
            b"{\"tokens\": [18446744073709551615]}",
            b"{\"tokens\": [99999999999999999999999]}",
            b"{\"tokens\": [151936]}",
        ] {
            assert_eq!(
                status(detokenize_json(&p, M, body)),
                400,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            status(detokenize_json(&p, M, br#"{"tokens":[],"model":"x"}"#)),
            404
        );
        assert_eq!(status(detokenize_json(&p, M, br#"{"tokens":[]}"#)), 200);
    }
}
