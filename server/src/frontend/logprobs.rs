//! Log probabilities: the worker answers in the completions API's shape (`{"tokens",
//! "token_logprobs", "top_logprobs", "text_offset"}`, parallel arrays, one entry per token),
//! which `/v1/completions` returns as is; `/v1/chat/completions` returns chat's shape,
//! `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
//! "bytes"}]}]}` (OpenAI's, as vLLM builds it), converted here.

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsOut {
    /// `/v1/completions` `logprobs: k`: the worker's object, unchanged.
    Completions,
    /// Chat `logprobs: true` with `top_logprobs: k` alternatives per token.
    Chat { top: usize },
}

/// The largest `top_logprobs` / completions `logprobs` (vLLM's default `--max-logprobs`).
pub const MAX_TOP: u64 = 20;

#[derive(Deserialize, Default)]
struct CompletionLogprobs {
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_logprobs: Vec<Option<f64>>,
    #[serde(default)]
    top_logprobs: Option<Vec<Option<Map<String, Value>>>>,
}

fn entry(token: &str, logprob: f64) -> Value {
    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
}

/// Chat `logprobs.content` entries of one worker event's completions-shaped logprobs, with at
/// most `top` alternatives each (most likely first). Malformed input gives what could be read.
pub fn chat_entries(raw: &str, top: usize) -> Vec<Value> {
    let lp: CompletionLogprobs = serde_json::from_str(raw).unwrap_or_default();
    lp.tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| {
            let logprob = lp
                .token_logprobs
                .get(i)
                .copied()
                .flatten()
                .unwrap_or(f64::NEG_INFINITY);
            let mut alts: Vec<(String, f64)> = lp
                .top_logprobs
                .as_ref()
                .and_then(|t| t.get(i))
                .and_then(Option::as_ref)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                        .collect()
                })
                .unwrap_or_default();
            alts.sort_by(|a, b| b.1.total_cmp(&a.1));
            alts.truncate(top);
            let mut e = entry(tok, finite(logprob));
            e["top_logprobs"] = alts.iter().map(|(t, l)| entry(t, finite(*l))).collect();
            e
        })
        .collect()
}

/// JSON has no infinities: vLLM clamps an impossible token's logprob to -9999.0.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        -9999.0
    }
}

/// Completions logprobs of several events joined into one (a whole response's).
#[derive(Debug, Default)]
pub struct JoinedCompletions {
    fields: Map<String, Value>,
}

impl JoinedCompletions {
    /// Append one event's object: each array field extended.
    pub fn push(&mut self, raw: &str) {
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(raw) else {
            return;
        };
        for (k, v) in o {
            match (self.fields.get_mut(&k), v) {
                (Some(Value::Array(acc)), Value::Array(more)) => acc.extend(more),
                (None, v) => {
                    self.fields.insert(k, v);
                }
                _ => {}
            }
        }
    }

    /// The joined object; `null` when no event carried logprobs.
    pub fn into_value(self) -> Value {
        if self.fields.is_empty() {
            Value::Null
        } else {
            Value::Object(self.fields)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EV: &str = r#"{"tokens":["Hello"," world"],"token_logprobs":[-0.5,-1.25],"top_logprobs":[{"Hello":-0.5,"Hi":-1.5,"Hey":-2.0},{" world":-1.25," there":-0.75}],"text_offset":[0,5]}"#;

    #[test]
    fn completions_shape_becomes_chat_shape() {
        let e = chat_entries(EV, 2);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["token"], "Hello");
        assert_eq!(e[0]["logprob"], -0.5);
        assert_eq!(e[0]["bytes"], json!([72, 101, 108, 108, 111]));
        let tops: Vec<&str> = e[1]["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(tops, [" there", " world"], "most likely first");
        assert_eq!(chat_entries(EV, 0)[0]["top_logprobs"], json!([]));
        assert!(chat_entries("not json", 3).is_empty());
    }

    #[test]
    fn events_join_into_one_object() {
        let mut j = JoinedCompletions::default();
        j.push(EV);
        j.push(r#"{"tokens":["!"],"token_logprobs":[-0.1],"top_logprobs":[{"!":-0.1}],"text_offset":[11]}"#);
        let v = j.into_value();
        assert_eq!(v["tokens"], json!(["Hello", " world", "!"]));
        assert_eq!(v["text_offset"], json!([0, 5, 11]));
    }
}
