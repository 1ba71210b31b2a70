//! Request parsing: a `/v1/completions` or `/v1/chat/completions` body becomes token ids plus
//! routing hints and the fields forwarded to the worker ([`ParsedRequest`]), checked against
//! the server's [`Limits`]. Errors are 400s that name the field, or 404 for an unknown model.

use std::sync::Arc;

use axum::http::StatusCode;
use kvrouter_core::{RouterConfigOverride, WorkerId};
use kvrouter_preprocess::{ChatTemplateArgs, Preprocessor, PromptCache};
use serde_json::{Map, Value};

use super::choice::OutputOptions;
use super::contract;
use super::logprobs::{LogprobsOut, MAX_TOP};
use super::reasoning::ReasoningParser;
use super::tools::{required_schema, ToolCallParser, ToolMode};
use crate::error::ApiError;

/// Which API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::ChatCompletions => "chat_completions",
        }
    }
}

/// A request ready for routing.
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub tokens: Vec<u32>,
    pub stream: bool,
    /// Tokens to generate at most: the client's `max_tokens`, else what the context and
    /// `--max-tokens-limit` leave.
    pub max_tokens: u64,
    /// `nvext.backend_instance_id`.
    pub backend_instance_id: Option<u64>,
    /// `nvext.dp_rank`.
    pub dp_rank: Option<u32>,
    /// `nvext.router_config_override`.
    pub overrides: Option<RouterConfigOverride>,
    /// `nvext.agent_hints.priority` (0 when absent): head start in the router queue.
    pub priority: f64,
    /// `nvext.agent_hints.strict_priority` (0 when absent): router queue tier.
    pub strict_priority: i32,
    pub cache_salt: Option<String>,
    /// The LoRA adapter the request's `model` names (None: the served base model): its
    /// blocks are hashed with it and it runs on a worker serving it.
    pub lora_name: Option<String>,
    /// The workers serving [`lora_name`](Self::lora_name) when the request was parsed.
    pub lora_workers: Option<Arc<[WorkerId]>>,
    /// How the output is parsed and shaped: reasoning, tool calls, logprobs, usage per chunk.
    pub output: OutputOptions,
    /// Fields sent to the worker besides the prompt (the contract's forwarded ones, `n`,
    /// `logprobs`, and a tool-call schema).
    pub sampling: Map<String, Value>,
}

/// `nvext.agent_hints` → `(priority, strict_priority)` for the router queue (spec §7.2). Other
/// hints (e.g. `osl`) are accepted and unused.
fn agent_hints(v: Option<&Value>) -> Result<(f64, i32), ApiError> {
    let hints = match v {
        None | Some(Value::Null) => return Ok((0.0, 0)),
        Some(Value::Object(h)) => h,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`nvext.agent_hints` must be an object",
            ))
        }
    };
    let priority = match hints.get("priority") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v.as_f64().filter(|p| p.is_finite()).ok_or_else(|| {
            ApiError::bad_request("`nvext.agent_hints.priority` must be a number")
        })?,
    };
    let strict = match hints.get("strict_priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| {
                ApiError::bad_request("`nvext.agent_hints.strict_priority` must be an integer")
            })?,
    };
    Ok((priority, strict))
}

/// The JSON body of a worker request.
#[derive(serde::Serialize)]
struct WorkerBody<'a> {
    model: &'a str,
    prompt: &'a [u32],
    max_tokens: u64,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: Sampling<'a>,
    #[serde(flatten)]
    extra: Option<&'a Map<String, Value>>,
}

#[derive(serde::Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The forwarded sampling fields, less `min_tokens` when a phase generates one token.
struct Sampling<'a> {
    fields: &'a Map<String, Value>,
    drop_min_tokens: bool,
}

impl serde::Serialize for Sampling<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.fields {
            if !(self.drop_min_tokens && k == "min_tokens") {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// How a disaggregated phase's worker body differs from [`ParsedRequest::worker_body`]'s
/// (spec §13.1): a prefill is not streamed and generates one token; both phases carry the
/// protocol's fields (`kv_transfer_params`, SGLang's `bootstrap_*`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseBody<'a> {
    /// One JSON answer instead of a stream (no `stream_options`).
    pub unary: bool,
    /// This `max_tokens` instead of the request's, and no `min_tokens`.
    pub max_tokens: Option<u64>,
    /// Fields added to the body.
    pub extra: Option<&'a Map<String, Value>>,
}

impl ParsedRequest {
    /// The `model` to send a worker registered with `registered` (None: it named none; the
    /// frontend's `served` then): the request's LoRA adapter, else the worker's model name.
    pub fn worker_model<'a>(&'a self, registered: Option<&'a str>, served: &'a str) -> &'a str {
        self.lora_name.as_deref().or(registered).unwrap_or(served)
    }

    /// The body sent to the worker's `/v1/completions`: token ids, streamed with usage, and
    /// the forwarded sampling fields.
    pub fn worker_body(&self, worker_model: &str) -> Vec<u8> {
        self.phase_body(worker_model, PhaseBody::default())
    }

    /// [`worker_body`](Self::worker_body) changed for one phase of a disaggregated request,
    /// written in one pass (the prompt is not parsed back).
    pub fn phase_body(&self, worker_model: &str, phase: PhaseBody<'_>) -> Vec<u8> {
        let body = WorkerBody {
            model: worker_model,
            prompt: &self.tokens,
            max_tokens: phase.max_tokens.unwrap_or(self.max_tokens),
            stream: !phase.unary,
            stream_options: (!phase.unary).then_some(StreamOptions {
                include_usage: true,
            }),
            sampling: Sampling {
                fields: &self.sampling,
                drop_min_tokens: phase.max_tokens.is_some(),
            },
            extra: phase.extra,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Prompt plus generated tokens, at most (`--context-length`).
    pub context_length: usize,
    /// Generated tokens per request, at most (`--max-tokens-limit`).
    pub max_tokens: u64,
    /// Whether clients may steer routing (`nvext.backend_instance_id`, `nvext.dp_rank`,
    /// `nvext.router_config_override`); off with `--no-client-routing-overrides`.
    pub client_routing: bool,
    /// `--tool-call-parser`: how `tool_choice: "auto"` output is read (none: auto refused).
    pub tool_parser: Option<ToolCallParser>,
    /// `--reasoning-parser`: chat output split into `reasoning_content` and `content`.
    pub reasoning_parser: Option<ReasoningParser>,
}

/// The largest `n` (choices per request).
pub const MAX_N: u64 = 16;

/// The model names a request may carry: the served model, and the LoRA adapters its workers
/// serve.
#[derive(Clone, Copy)]
pub struct ServedModels<'a> {
    /// The served (base) model.
    pub base: &'a str,
    /// The workers serving LoRA adapter `name` (None: no worker does).
    pub lora_workers: &'a dyn Fn(&str) -> Option<Arc<[WorkerId]>>,
}

/// Parse and preprocess a request body for `served_model` alone (no LoRA adapters): see
/// [`parse_request_for`].
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    served_model: &str,
    pre: &Preprocessor,
    cache: Option<&PromptCache>,
    limits: Limits,
) -> Result<ParsedRequest, ApiError> {
    let models = ServedModels {
        base: served_model,
        lora_workers: &|_| None,
    };
    parse_request_for(endpoint, body, models, pre, cache, limits)
}

/// Parse and preprocess a request body whose `model` is the served model or a LoRA adapter
/// of `models`. Errors: 400 (bad JSON or fields, prompt too long), 404 (unknown model).
pub fn parse_request_for(
    endpoint: Endpoint,
    body: &[u8],
    models: ServedModels<'_>,
    pre: &Preprocessor,
    cache: Option<&PromptCache>,
    limits: Limits,
) -> Result<ParsedRequest, ApiError> {
    let served_model = models.base;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    contract::check(endpoint, &obj)?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("missing field `model`").param("model"))
        }
        Some(_) => return Err(ApiError::bad_request("`model` must be a string").param("model")),
    };
    let lora_workers = if model == served_model {
        None
    } else {
        match (models.lora_workers)(&model) {
            Some(w) => Some(w),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NotFoundError",
                    format!("The model `{model}` does not exist. Served: `{served_model}`."),
                )
                .param("model"))
            }
        }
    };
    let stream = get_bool(&obj, "stream")?.unwrap_or(false);
    let (include_usage, continuous_usage) = match obj.get("stream_options") {
        None | Some(Value::Null) => (false, false),
        Some(Value::Object(o)) => {
            if let Some(k) = o
                .keys()
                .find(|k| !["include_usage", "continuous_usage_stats"].contains(&k.as_str()))
            {
                return Err(ApiError::bad_request(format!(
                    "unsupported field `stream_options.{k}`"
                ))
                .param("stream_options"));
            }
            (
                get_bool(o, "include_usage")?.unwrap_or(false),
                get_bool(o, "continuous_usage_stats")?.unwrap_or(false),
            )
        }
        Some(_) => return Err(ApiError::bad_request("`stream_options` must be an object")),
    };
    if (include_usage || continuous_usage) && !stream {
        return Err(
            ApiError::bad_request("`stream_options` is only allowed with `stream: true`")
                .param("stream_options"),
        );
    }
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=MAX_N) => n as u32,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`n` must be an integer from 1 to {MAX_N}"
                ))
                .param("n"))
            }
        },
    };
    let max_key = match endpoint {
        Endpoint::ChatCompletions if obj.contains_key("max_completion_tokens") => {
            "max_completion_tokens"
        }
        _ => "max_tokens",
    };
    let requested = match obj.get(max_key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n > limits.max_tokens => {
                return Err(ApiError::bad_request(format!(
                    "`{max_key}` is {n}; this server generates at most {} tokens per request",
                    limits.max_tokens
                ))
                .param("max_tokens"))
            }
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`{max_key}` must be a positive integer"
                ))
                .param("max_tokens"))
            }
        },
    };
    let tokens = match endpoint {
        Endpoint::Completions => completion_prompt(&obj, pre, cache)?,
        Endpoint::ChatCompletions => chat_prompt(&obj, pre, cache)?,
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    let ctx = limits.context_length as u64;
    let prompt_len = tokens.len() as u64;
    // Checked: a sum past u64::MAX must fail this check, not wrap or saturate to the limit
    // (found by the `request` fuzz target with a context of u64::MAX).
    let asked = requested.unwrap_or(1);
    if prompt_len
        .checked_add(asked)
        .is_none_or(|total| total > ctx)
    {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {asked} for the completion).",
            u128::from(prompt_len) + u128::from(asked)
        ))
        .param("prompt"));
    }
    // Without a client bound, what the context leaves, capped: every request sent to a worker
    // has a finite length.
    let max_tokens = requested.unwrap_or((ctx - prompt_len).min(limits.max_tokens));
    let mut backend_instance_id = None;
    let mut dp_rank = None;
    let mut overrides = None;
    let (mut priority, mut strict_priority) = (0.0, 0);
    match obj.get("nvext") {
        None | Some(Value::Null) => {}
        Some(Value::Object(nv)) if !limits.client_routing => {
            if let Some(k) = [
                "backend_instance_id",
                "dp_rank",
                "router_config_override",
                "agent_hints",
            ]
            .into_iter()
            .find(|k| nv.get(*k).is_some_and(|v| !v.is_null()))
            {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    format!("`nvext.{k}` is not allowed: this server does not let clients steer routing"),
                )
                .param("nvext"));
            }
        }
        Some(Value::Object(nv)) => {
            backend_instance_id = match nv.get("backend_instance_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    ApiError::bad_request(
                        "`nvext.backend_instance_id` must be a worker id (unsigned integer)",
                    )
                })?),
            };
            dp_rank = match nv.get("dp_rank") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().and_then(|r| u32::try_from(r).ok()).ok_or_else(
                    || ApiError::bad_request("`nvext.dp_rank` must be an unsigned integer"),
                )?),
            };
            if let Some(o) = nv.get("router_config_override").filter(|o| !o.is_null()) {
                let o: RouterConfigOverride = serde_json::from_value(o.clone()).map_err(|e| {
                    ApiError::bad_request(format!("invalid `nvext.router_config_override`: {e}"))
                })?;
                o.validate().map_err(|e| {
                    ApiError::bad_request(format!("invalid `nvext.router_config_override`: {e}"))
                })?;
                overrides = Some(o);
            }
            (priority, strict_priority) = agent_hints(nv.get("agent_hints"))?;
        }
        Some(_) => return Err(ApiError::bad_request("`nvext` must be an object")),
    }
    let cache_salt = match obj.get("cache_salt") {
        None | Some(Value::Null) => None,
        // vLLM refuses an empty salt; one that changed nothing would only mislead.
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            return Err(
                ApiError::bad_request("`cache_salt` must be a non-empty string")
                    .param("cache_salt"),
            )
        }
    };
    let mut sampling = contract::forwarded(endpoint, &obj);
    // The engine salts its own prefix cache with it, as the router salts its hashes.
    if let Some(salt) = &cache_salt {
        sampling.insert("cache_salt".into(), salt.as_str().into());
    }
    if n > 1 {
        sampling.insert("n".into(), n.into());
    }
    let logprobs = logprobs(endpoint, &obj)?;
    if let Some(k) = logprobs.1 {
        sampling.insert("logprobs".into(), k.into());
    }
    let parallel_tool_calls = get_bool(&obj, "parallel_tool_calls")?.unwrap_or(true);
    let tools = tool_mode(endpoint, &obj, limits.tool_parser, parallel_tool_calls)?;
    if let Some((mode, schema)) = &tools {
        if let Some(s) = schema {
            if obj
                .keys()
                .any(|k| STRUCTURED.contains(&k.as_str()) && !obj[k].is_null())
            {
                return Err(ApiError::bad_request(
                    "`tool_choice` \"required\" or a named function cannot be combined with structured output",
                )
                .param("tool_choice"));
            }
            sampling.insert(
                "response_format".into(),
                serde_json::json!({"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": s}}),
            );
        }
        if mode == &ToolMode::Auto(ToolCallParser::Mistral) {
            // `[TOOL_CALLS]` is a special token: the worker must not skip it.
            sampling
                .entry("skip_special_tokens")
                .or_insert(Value::Bool(false));
        }
    }
    let output = OutputOptions {
        n,
        include_usage,
        reasoning: match endpoint {
            Endpoint::ChatCompletions => limits.reasoning_parser,
            Endpoint::Completions => None,
        },
        tools: tools.map(|(m, _)| m),
        parallel_tool_calls,
        logprobs: logprobs.0,
        continuous_usage: continuous_usage && include_usage,
    };
    Ok(ParsedRequest {
        endpoint,
        tokens,
        stream,
        max_tokens,
        backend_instance_id,
        dp_rank,
        overrides,
        priority,
        strict_priority,
        cache_salt,
        lora_name: lora_workers.is_some().then(|| model.clone()),
        lora_workers,
        model,
        output,
        sampling,
    })
}

/// The structured-output fields (a tool-call schema cannot be added to these).
const STRUCTURED: &[&str] = &[
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
];

/// What the client sees of logprobs, and the worker's completions `logprobs` to ask for.
fn logprobs(
    endpoint: Endpoint,
    obj: &Map<String, Value>,
) -> Result<(Option<LogprobsOut>, Option<u64>), ApiError> {
    let bad =
        |k: &'static str, what: &str| Err(ApiError::bad_request(format!("`{k}` {what}")).param(k));
    match endpoint {
        Endpoint::Completions => match obj.get("logprobs") {
            None | Some(Value::Null) => Ok((None, None)),
            Some(v) => match v.as_u64() {
                Some(k) if k <= MAX_TOP => Ok((Some(LogprobsOut::Completions), Some(k))),
                _ => bad(
                    "logprobs",
                    &format!("must be an integer from 0 to {MAX_TOP}"),
                ),
            },
        },
        Endpoint::ChatCompletions => {
            let on = match obj.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return bad("logprobs", "must be a boolean"),
            };
            let top = match obj.get("top_logprobs") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(k) if k <= MAX_TOP => Some(k),
                    _ => {
                        return bad(
                            "top_logprobs",
                            &format!("must be an integer from 0 to {MAX_TOP}"),
                        )
                    }
                },
            };
            match (on, top) {
                (false, Some(k)) if k > 0 => bad("top_logprobs", "needs `logprobs: true`"),
                (false, _) => Ok((None, None)),
                (true, k) => {
                    let k = k.unwrap_or(0);
                    Ok((Some(LogprobsOut::Chat { top: k as usize }), Some(k)))
                }
            }
        }
    }
}

/// The request's tool-call mode and, for `required` / a named function, the schema the worker
/// is held to. `None` without tools or with `tool_choice: "none"`. Errors: malformed `tools` or
/// `tool_choice`, an unknown function, `auto` without a configured parser (as vLLM).
fn tool_mode(
    endpoint: Endpoint,
    obj: &Map<String, Value>,
    parser: Option<ToolCallParser>,
    parallel: bool,
) -> Result<Option<(ToolMode, Option<Value>)>, ApiError> {
    if endpoint != Endpoint::ChatCompletions {
        return Ok(None);
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(ApiError::bad_request("`tools` must be an array").param("tools")),
    };
    for t in tools {
        let name = t.pointer("/function/name").and_then(Value::as_str);
        if t.get("type").and_then(Value::as_str) != Some("function")
            || name.is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}",
            )
            .param("tools"));
        }
    }
    let choice = obj.get("tool_choice").filter(|v| !v.is_null());
    if tools.is_empty() {
        return match choice {
            None => Ok(None),
            Some(Value::String(c)) if c == "none" => Ok(None),
            Some(_) => {
                Err(ApiError::bad_request("`tool_choice` needs `tools`").param("tool_choice"))
            }
        };
    }
    match choice {
        Some(Value::String(c)) if c == "none" => Ok(None),
        None => Ok(parser.map(|p| (ToolMode::Auto(p), None))),
        Some(Value::String(c)) if c == "auto" => match parser {
            Some(p) => Ok(Some((ToolMode::Auto(p), None))),
            None => Err(ApiError::bad_request(
                "\"auto\" tool choice requires a tool-call parser: start the frontend with --tool-call-parser",
            )
            .param("tool_choice")),
        },
        Some(Value::String(c)) if c == "required" => Ok(Some((
            ToolMode::Required,
            required_schema(tools, None, parallel),
        ))),
        Some(v @ Value::Object(_)) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                    .param("tool_choice")
                })?;
            let schema = required_schema(tools, Some(name), parallel).ok_or_else(|| {
                ApiError::bad_request(format!("`tool_choice` names `{name}`, which is not in `tools`"))
                    .param("tool_choice")
            })?;
            Ok(Some((ToolMode::Named(name.to_string()), Some(schema))))
        }
        Some(_) => Err(ApiError::bad_request(
            "`tool_choice` must be \"none\", \"auto\", \"required\" or a named function",
        )
        .param("tool_choice")),
    }
}

fn get_bool(obj: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad_request(format!("`{k}` must be a boolean"))),
    }
}

fn token_ids(v: &[Value], vocab: usize) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&t| (t as usize) < vocab)
                .map(|t| t as u32)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "prompt token ids must be integers in 0..{vocab}, got {x}"
                    ))
                    .param("prompt")
                })
        })
        .collect()
}

/// Token ids of `text`, through the prompt cache when there is one (the same ids).
fn encode_text(
    pre: &Preprocessor,
    cache: Option<&PromptCache>,
    text: &str,
    add_special_tokens: bool,
) -> kvrouter_preprocess::Result<Vec<u32>> {
    match cache {
        Some(c) if pre.has_fast_encode() => pre.encode_cached(text, c),
        _ => pre.encode_with(text, add_special_tokens),
    }
}

pub(super) fn completion_prompt(
    obj: &Map<String, Value>,
    pre: &Preprocessor,
    cache: Option<&PromptCache>,
) -> Result<Vec<u32>, ApiError> {
    let add_special_tokens = get_bool(obj, "add_special_tokens")?.unwrap_or(true);
    let encode = |s: &str| {
        encode_text(pre, cache, s, add_special_tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"))
    };
    let vocab = pre.vocab_size();
    match obj.get("prompt") {
        Some(Value::String(s)) => encode(s),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::bad_request("the prompt is empty").param("prompt"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::Number(_) => token_ids(a, vocab),
            Value::String(s) if a.len() == 1 => encode(s),
            Value::Array(ids) if a.len() == 1 => token_ids(ids, vocab),
            _ if a.len() > 1 => Err(ApiError::bad_request(
                "batched prompts are not supported; send one prompt per request",
            )
            .param("prompt")),
            _ => Err(ApiError::bad_request(
                "`prompt` must be a string, a list of token ids, or a list of one of those",
            )
            .param("prompt")),
        },
        None | Some(Value::Null) => {
            Err(ApiError::bad_request("missing field `prompt`").param("prompt"))
        }
        Some(_) => Err(
            ApiError::bad_request("`prompt` must be a string or a list of token ids")
                .param("prompt"),
        ),
    }
}

pub(super) fn chat_prompt(
    obj: &Map<String, Value>,
    pre: &Preprocessor,
    cache: Option<&PromptCache>,
) -> Result<Vec<u32>, ApiError> {
    let messages = match obj.get("messages") {
        Some(m @ Value::Array(a)) if !a.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request("`messages` is empty").param("messages"))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("missing field `messages`").param("messages"))
        }
        Some(_) => {
            return Err(ApiError::bad_request("`messages` must be an array").param("messages"))
        }
    };
    let add_generation_prompt = get_bool(obj, "add_generation_prompt")?.unwrap_or(true);
    let mut extra = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(std::borrow::Cow::Borrowed(o)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`chat_template_kwargs` must be an object",
            ))
        }
    };
    // vLLM hands `reasoning_effort` to the chat template as a variable.
    match obj.get("reasoning_effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(e)) if ["low", "medium", "high"].contains(&e.as_str()) => {
            extra
                .get_or_insert_with(Default::default)
                .to_mut()
                .insert("reasoning_effort".into(), e.as_str().into());
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "`reasoning_effort` must be \"low\", \"medium\" or \"high\"",
            )
            .param("reasoning_effort"))
        }
    }
    let add_special_tokens = get_bool(obj, "add_special_tokens")?.unwrap_or(false);
    let text = pre
        .render_chat(&ChatTemplateArgs {
            messages,
            tools: obj.get("tools"),
            add_generation_prompt,
            extra: extra.as_deref(),
        })
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    encode_text(pre, cache, &text, add_special_tokens)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre() -> Preprocessor {
        Preprocessor::from_model_dir(crate::vendored_model_dir()).expect("vendored tokenizer")
    }

    fn limits() -> Limits {
        Limits {
            context_length: 40_000,
            max_tokens: 1000,
            client_routing: true,
            tool_parser: None,
            reasoning_parser: None,
        }
    }

    fn chat(extra: Value) -> Result<ParsedRequest, ApiError> {
        let mut body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        parse_request(
            Endpoint::ChatCompletions,
            &bytes,
            "m",
            &pre(),
            None,
            limits(),
        )
    }

    #[test]
    fn phase_bodies_are_the_worker_body_changed_as_vllms_proxy_changes_it() {
        let r = chat(serde_json::json!({"min_tokens": 3, "temperature": 0.5, "max_tokens": 9}))
            .unwrap();
        let v = |b: Vec<u8>| serde_json::from_slice::<Value>(&b).unwrap();
        let whole = v(r.worker_body("w"));
        assert_eq!(
            (&whole["stream"], &whole["max_tokens"], &whole["min_tokens"]),
            (
                &Value::Bool(true),
                &serde_json::json!(9),
                &serde_json::json!(3)
            )
        );
        assert_eq!(whole["stream_options"]["include_usage"], true);
        let mut ask = Map::new();
        ask.insert(
            "kv_transfer_params".into(),
            serde_json::json!({"do_remote_decode": true}),
        );
        let prefill = v(r.phase_body(
            "w",
            PhaseBody {
                unary: true,
                max_tokens: Some(1),
                extra: Some(&ask),
            },
        ));
        assert_eq!(prefill["stream"], false);
        assert_eq!(prefill["max_tokens"], 1);
        assert!(prefill.get("stream_options").is_none() && prefill.get("min_tokens").is_none());
        assert_eq!(prefill["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(
            (&prefill["temperature"], &prefill["prompt"]),
            (&whole["temperature"], &whole["prompt"])
        );
        let decode = v(r.phase_body(
            "w",
            PhaseBody {
                extra: Some(&ask),
                ..PhaseBody::default()
            },
        ));
        let mut expected = whole.clone();
        expected["kv_transfer_params"] = ask["kv_transfer_params"].clone();
        assert_eq!(
            decode, expected,
            "decode: the whole request plus the protocol's fields"
        );
    }

    #[test]
    fn the_frontend_fields_of_the_contract_take_effect() {
        // max_completion_tokens is chat's max_tokens.
        assert_eq!(
            chat(serde_json::json!({"max_completion_tokens": 7}))
                .unwrap()
                .max_tokens,
            7
        );
        // add_generation_prompt: the assistant header is appended, or not.
        let with = chat(serde_json::json!({})).unwrap().tokens;
        let without = chat(serde_json::json!({"add_generation_prompt": false}))
            .unwrap()
            .tokens;
        assert!(with.len() > without.len() && with.starts_with(&without));
        // chat_template_kwargs reach the template (Qwen3 closes the think block itself).
        let no_think =
            chat(serde_json::json!({"chat_template_kwargs": {"enable_thinking": false}}))
                .unwrap()
                .tokens;
        assert!(no_think.len() > with.len());
        // reasoning_effort is a template variable with vLLM's values.
        assert!(chat(serde_json::json!({"reasoning_effort": "high"})).is_ok());
        let e = chat(serde_json::json!({"reasoning_effort": "extreme"})).unwrap_err();
        assert_eq!(e.param, Some("reasoning_effort"));
        // add_special_tokens must be a boolean; cache_salt is kept for hashing and forwarded.
        assert!(chat(serde_json::json!({"add_special_tokens": true})).is_ok());
        assert!(chat(serde_json::json!({"add_special_tokens": "yes"})).is_err());
        let r = chat(serde_json::json!({"cache_salt": "tenant-a"})).unwrap();
        assert_eq!(r.cache_salt.as_deref(), Some("tenant-a"));
        assert_eq!(r.sampling["cache_salt"], "tenant-a");
        let e = chat(serde_json::json!({"cache_salt": ""})).unwrap_err();
        assert_eq!(e.param, Some("cache_salt"));
        // stream_options needs stream; unknown keys in it are named.
        assert!(chat(serde_json::json!({"stream_options": {"include_usage": true}})).is_err());
        let e =
            chat(serde_json::json!({"stream": true, "stream_options": {"foo": 1}})).unwrap_err();
        assert!(e.message.contains("stream_options.foo"), "{}", e.message);
        // n and logprobs bounds.
        assert_eq!(chat(serde_json::json!({"n": 3})).unwrap().output.n, 3);
        assert_eq!(
            chat(serde_json::json!({"n": 17})).unwrap_err().param,
            Some("n")
        );
        let r = chat(serde_json::json!({"logprobs": true, "top_logprobs": 4})).unwrap();
        assert_eq!(r.sampling["logprobs"], 4);
        assert_eq!(
            chat(serde_json::json!({"top_logprobs": 2}))
                .unwrap_err()
                .param,
            Some("top_logprobs")
        );
    }

    #[test]
    fn prompt_plus_max_tokens_past_u64_is_refused_not_saturated() {
        // Found by the `request` fuzz target: with the largest context, a saturating sum equal
        // to the limit slipped through the check.
        let limits = Limits {
            context_length: usize::MAX,
            max_tokens: u64::MAX,
            client_routing: true,
            tool_parser: None,
            reasoning_parser: None,
        };
        let body = br#"{"model":"m","prompt":"x","max_tokens":18446744073709551615}"#;
        let e = parse_request(Endpoint::Completions, body, "m", &pre(), None, limits).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        assert!(
            e.message.contains("maximum context length"),
            "{}",
            e.message
        );
    }

    /// A `model` naming a LoRA adapter some workers serve is accepted: the request keeps the
    /// adapter (for hashing) and its workers, and sends the adapter's name to the worker.
    #[test]
    fn a_lora_adapter_is_a_served_model() {
        let serving: Arc<[WorkerId]> = vec![3, 5].into();
        let lookup = |name: &str| (name == "sql").then(|| serving.clone());
        let models = ServedModels {
            base: "m",
            lora_workers: &lookup,
        };
        let parse = |model: &str| {
            let body = serde_json::json!({"model": model, "prompt": "x"}).to_string();
            parse_request_for(
                Endpoint::Completions,
                body.as_bytes(),
                models,
                &pre(),
                None,
                limits(),
            )
        };
        let r = parse("sql").unwrap();
        assert_eq!(r.lora_name.as_deref(), Some("sql"));
        assert_eq!(r.lora_workers.as_deref(), Some(&[3, 5][..]));
        assert_eq!(r.worker_model(Some("base-on-worker"), "m"), "sql");
        let r = parse("m").unwrap();
        assert_eq!((&r.lora_name, &r.lora_workers), (&None, &None));
        assert_eq!(
            r.worker_model(Some("base-on-worker"), "m"),
            "base-on-worker"
        );
        assert_eq!(r.worker_model(None, "m"), "m");
        let e = parse("chat").unwrap_err();
        assert_eq!((e.status, e.param), (StatusCode::NOT_FOUND, Some("model")));
    }
}
