//! Request fields that shape the output, read and checked the way vLLM's
//! `CompletionRequest` / `ChatCompletionRequest` read them: `n`, `seed`, `stop`,
//! `stop_token_ids`, `include_stop_str_in_output`, `logprobs` / `top_logprobs`, and the
//! structured-output constraints (`response_format`, `structured_outputs`, `guided_json`,
//! `guided_choice`; `guided_regex`, `guided_grammar`, `structural_tag` and the other
//! constraint kinds are refused, never silently ignored).
use serde_json::Value;

use crate::sampling::{Rng, StopSpec, MAX_LOGPROBS};
use crate::structured::{self, SchemaError};

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;
/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 256;

/// A refused field: a 400 naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// What is wrong.
    pub message: String,
    /// The request field.
    pub param: &'static str,
}

fn bad<T>(param: &'static str, message: impl Into<String>) -> Result<T, ParamError> {
    Err(ParamError {
        message: message.into(),
        param,
    })
}

/// The raw fields, as sent (None when absent).
#[derive(Debug, Default, Clone, Copy)]
pub struct RawSampling<'a> {
    /// Chat API (`logprobs` is a bool and `top_logprobs` the count) rather than completions.
    pub chat: bool,
    /// `n`.
    pub n: Option<&'a Value>,
    /// `seed`.
    pub seed: Option<&'a Value>,
    /// `stop`.
    pub stop: Option<&'a Value>,
    /// `stop_token_ids`.
    pub stop_token_ids: Option<&'a Value>,
    /// `include_stop_str_in_output`.
    pub include_stop_str_in_output: Option<&'a Value>,
    /// `logprobs`.
    pub logprobs: Option<&'a Value>,
    /// `top_logprobs` (chat).
    pub top_logprobs: Option<&'a Value>,
    /// `response_format`.
    pub response_format: Option<&'a Value>,
    /// `structured_outputs`.
    pub structured_outputs: Option<&'a Value>,
    /// `guided_json`.
    pub guided_json: Option<&'a Value>,
    /// `guided_choice`.
    pub guided_choice: Option<&'a Value>,
    /// `guided_regex`.
    pub guided_regex: Option<&'a Value>,
    /// `guided_grammar`.
    pub guided_grammar: Option<&'a Value>,
    /// `structural_tag` (older vLLM's top-level field).
    pub structural_tag: Option<&'a Value>,
}

/// A structured-output constraint.
#[derive(Debug, Clone, PartialEq)]
pub enum Structured {
    /// Any JSON object.
    JsonObject,
    /// A document valid against this (checked) JSON Schema.
    Schema(Value),
    /// One of these strings.
    Choice(Vec<String>),
}

impl Structured {
    /// The answer text for one choice.
    pub fn render(&self, rng: &mut Rng) -> Result<String, SchemaError> {
        Ok(match self {
            Structured::JsonObject => structured::to_text(&structured::random_object(rng)),
            Structured::Schema(s) => structured::to_text(&structured::generate(s, rng)?),
            Structured::Choice(c) => rng.pick(c).clone(),
        })
    }
}

/// The checked fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Choices, 1..=[`MAX_N`].
    pub n: usize,
    /// `seed`.
    pub seed: Option<i64>,
    /// Stop conditions.
    pub stop: StopSpec,
    /// Alternatives per position when logprobs are asked for (0..=20).
    pub logprobs: Option<usize>,
    /// The structured-output constraint and the field it came from.
    pub structured: Option<(Structured, &'static str)>,
}

fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn int(v: &Value, param: &'static str) -> Result<i64, ParamError> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
        _ => bad(param, format!("`{param}` must be an integer.")),
    }
}

/// Reads and checks the fields; see the module docs.
pub fn parse_sampling(raw: RawSampling<'_>) -> Result<Sampling, ParamError> {
    let n = match present(raw.n) {
        None => 1,
        Some(v) => {
            let n = int(v, "n")?;
            if n < 1 {
                return bad("n", format!("n must be at least 1, got {n}."));
            }
            if n > MAX_N as i64 {
                return bad("n", format!("n must be at most {MAX_N}, got {n}."));
            }
            n as usize
        }
    };
    let seed = match present(raw.seed) {
        None => None,
        Some(v) => match v.as_i64() {
            Some(s) => Some(s),
            None => {
                return bad(
                    "seed",
                    "`seed` must be an integer between -2^63 and 2^63-1.",
                )
            }
        },
    };
    let mut stop = StopSpec::default();
    match present(raw.stop) {
        None => {}
        Some(Value::String(s)) => stop.strings.push(s.clone()),
        Some(Value::Array(a)) => {
            for s in a {
                match s.as_str() {
                    Some(s) => stop.strings.push(s.to_owned()),
                    None => return bad("stop", "`stop` must be a string or a list of strings."),
                }
            }
        }
        Some(_) => return bad("stop", "`stop` must be a string or a list of strings."),
    }
    stop.strings.retain(|s| !s.is_empty());
    if stop.strings.len() > MAX_STOP_STRINGS {
        return bad(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings are supported."),
        );
    }
    match present(raw.stop_token_ids) {
        None => {}
        Some(Value::Array(a)) => {
            for t in a {
                match t.as_u64().and_then(|t| u32::try_from(t).ok()) {
                    Some(t) => stop.token_ids.push(t),
                    None => {
                        return bad(
                            "stop_token_ids",
                            "`stop_token_ids` must be a list of non-negative token ids.",
                        )
                    }
                }
            }
        }
        Some(_) => {
            return bad(
                "stop_token_ids",
                "`stop_token_ids` must be a list of non-negative token ids.",
            )
        }
    }
    stop.include_in_output = match present(raw.include_stop_str_in_output) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return bad(
                "include_stop_str_in_output",
                "`include_stop_str_in_output` must be a boolean.",
            )
        }
    };
    let logprobs = if raw.chat {
        chat_logprobs(raw)?
    } else {
        match present(raw.logprobs) {
            None => None,
            Some(v) => Some(count(int(v, "logprobs")?, "logprobs")?),
        }
    };
    let structured = structured_constraint(raw)?;
    Ok(Sampling {
        n,
        seed,
        stop,
        logprobs,
        structured,
    })
}

/// A logprobs count: 0..=20 (-1, "all", is over the limit too).
fn count(k: i64, param: &'static str) -> Result<usize, ParamError> {
    if k < -1 {
        return bad(param, format!("`{param}` must be a positive value or -1."));
    }
    if k == -1 || k > MAX_LOGPROBS as i64 {
        let shown = if k == -1 {
            "the whole vocabulary".to_owned()
        } else {
            k.to_string()
        };
        return bad(
            param,
            format!("Requested sample logprobs of {shown}, which is greater than max allowed: {MAX_LOGPROBS}"),
        );
    }
    Ok(k as usize)
}

fn chat_logprobs(raw: RawSampling<'_>) -> Result<Option<usize>, ParamError> {
    let on = match present(raw.logprobs) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("logprobs", "`logprobs` must be a boolean."),
    };
    let top = match present(raw.top_logprobs) {
        None => None,
        Some(v) => Some(count(int(v, "top_logprobs")?, "top_logprobs")?),
    };
    if top.is_some_and(|k| k > 0) && !on {
        return bad(
            "top_logprobs",
            "when using `top_logprobs`, `logprobs` must be set to true.",
        );
    }
    Ok(on.then(|| top.unwrap_or(0)))
}

/// A schema given as an object or as a JSON string, checked.
fn schema(v: &Value, param: &'static str) -> Result<Structured, ParamError> {
    let s = match v {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(s) => s,
            Err(e) => return bad(param, format!("`{param}` is not valid JSON: {e}")),
        },
        other => other.clone(),
    };
    if let Err(e) = structured::check(&s) {
        return bad(param, format!("Unsupported JSON schema in `{param}`: {e}."));
    }
    Ok(Structured::Schema(s))
}

fn choice(v: &Value, param: &'static str) -> Result<Structured, ParamError> {
    match v.as_array() {
        Some(a) if !a.is_empty() && a.iter().all(Value::is_string) => Ok(Structured::Choice(
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
        )),
        _ => bad(
            param,
            format!("`{param}` must be a non-empty list of strings."),
        ),
    }
}

fn unsupported<T>(param: &'static str, what: &str) -> Result<T, ParamError> {
    bad(
        param,
        format!("{what} is not supported by the mock engine (it can honour JSON objects, JSON schemas and choices)."),
    )
}

fn structured_constraint(
    raw: RawSampling<'_>,
) -> Result<Option<(Structured, &'static str)>, ParamError> {
    let mut found: Vec<(Structured, &'static str)> = Vec::new();
    if let Some(rf) = present(raw.response_format) {
        const P: &str = "response_format";
        let Some(obj) = rf.as_object() else {
            return bad(P, "`response_format` must be an object.");
        };
        match obj.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((Structured::JsonObject, P)),
            Some("json_schema") => {
                let Some(js) = present(obj.get("json_schema")) else {
                    return bad(
                        P,
                        "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                    );
                };
                let Some(s) = present(js.get("schema")) else {
                    return bad(P, "`response_format.json_schema.schema` must be provided.");
                };
                found.push((schema(s, P)?, P));
            }
            Some("structural_tag") => {
                return unsupported(P, "`response_format` type 'structural_tag'")
            }
            _ => {
                return bad(
                    P,
                    "`response_format.type` must be one of 'text', 'json_object', 'json_schema'.",
                )
            }
        }
    }
    if let Some(so) = present(raw.structured_outputs) {
        const P: &str = "structured_outputs";
        let Some(obj) = so.as_object() else {
            return bad(P, "`structured_outputs` must be an object.");
        };
        let kinds = ["json", "regex", "choice"]
            .iter()
            .filter(|k| present(obj.get(**k)).is_some())
            .count();
        if kinds > 1 {
            return bad(
                P,
                "You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice').",
            );
        }
        for k in ["regex", "grammar", "structural_tag"] {
            if present(obj.get(k)).is_some() {
                return unsupported(P, &format!("`structured_outputs.{k}`"));
            }
        }
        if let Some(j) = present(obj.get("json")) {
            found.push((schema(j, P)?, P));
        }
        if let Some(c) = present(obj.get("choice")) {
            found.push((choice(c, P)?, P));
        }
        if obj.get("json_object").and_then(Value::as_bool) == Some(true) {
            found.push((Structured::JsonObject, P));
        }
    }
    if let Some(j) = present(raw.guided_json) {
        found.push((schema(j, "guided_json")?, "guided_json"));
    }
    if let Some(c) = present(raw.guided_choice) {
        found.push((choice(c, "guided_choice")?, "guided_choice"));
    }
    if present(raw.guided_regex).is_some() {
        return unsupported("guided_regex", "`guided_regex`");
    }
    if present(raw.guided_grammar).is_some() {
        return unsupported("guided_grammar", "`guided_grammar`");
    }
    if present(raw.structural_tag).is_some() {
        return unsupported("structural_tag", "`structural_tag`");
    }
    if found.len() > 1 {
        return bad(
            found[1].1,
            "You can only use one kind of structured outputs constraint.",
        );
    }
    Ok(found.pop())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw<'a>(chat: bool) -> RawSampling<'a> {
        RawSampling {
            chat,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_limits() {
        let s = parse_sampling(raw(false)).unwrap();
        assert_eq!((s.n, s.seed, s.logprobs), (1, None, None));
        assert!(s.stop.is_empty() && s.structured.is_none());
        let n = json!(17);
        let e = parse_sampling(RawSampling {
            n: Some(&n),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "n");
        let n = json!(0);
        assert!(parse_sampling(RawSampling {
            n: Some(&n),
            ..raw(false)
        })
        .is_err());
        let lp = json!(21);
        let e = parse_sampling(RawSampling {
            logprobs: Some(&lp),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "logprobs");
        let t = json!(true);
        let e = parse_sampling(RawSampling {
            logprobs: Some(&t),
            top_logprobs: Some(&lp),
            ..raw(true)
        })
        .unwrap_err();
        assert_eq!(e.param, "top_logprobs");
        let k = json!(3);
        let e = parse_sampling(RawSampling {
            top_logprobs: Some(&k),
            ..raw(true)
        })
        .unwrap_err();
        assert!(e.message.contains("must be set to true"));
        let s = parse_sampling(RawSampling {
            logprobs: Some(&t),
            ..raw(true)
        })
        .unwrap();
        assert_eq!(s.logprobs, Some(0));
    }

    #[test]
    fn structured_kinds() {
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a+$"}}});
        let e = parse_sampling(RawSampling {
            response_format: Some(&rf),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "response_format");
        assert!(e.message.contains("pattern"), "{}", e.message);
        let gj = json!("{\"type\": \"integer\"}");
        let s = parse_sampling(RawSampling {
            guided_json: Some(&gj),
            ..raw(false)
        })
        .unwrap();
        assert_eq!(
            s.structured,
            Some((
                Structured::Schema(json!({"type": "integer"})),
                "guided_json"
            ))
        );
        let so = json!({"choice": ["a", "b"]});
        let s = parse_sampling(RawSampling {
            structured_outputs: Some(&so),
            ..raw(false)
        })
        .unwrap();
        assert!(matches!(
            s.structured,
            Some((Structured::Choice(_), "structured_outputs"))
        ));
        let re = json!("a+");
        let e = parse_sampling(RawSampling {
            guided_regex: Some(&re),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "guided_regex");
        let e = parse_sampling(RawSampling {
            structural_tag: Some(&re),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "structural_tag");
        let jo = json!({"type": "json_object"});
        let e = parse_sampling(RawSampling {
            response_format: Some(&jo),
            guided_json: Some(&gj),
            ..raw(false)
        })
        .unwrap_err();
        assert_eq!(e.param, "guided_json");
        let text = json!({"type": "text"});
        let s = parse_sampling(RawSampling {
            response_format: Some(&text),
            ..raw(false)
        })
        .unwrap();
        assert!(s.structured.is_none());
    }
}
