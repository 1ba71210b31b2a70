//! vLLM-compatible HTTP API of one mock worker (axum).
//!
//! * `POST /v1/completions` — `prompt` as token ids (`[1,2,3]` or `[[1,2,3]]`) or text (`"..."`
//!   or `["..."]`, tokenized with special tokens when a tokenizer is loaded);
//! * `POST /v1/chat/completions` — when the tokenizer has a chat template;
//! * `GET /v1/models`, `GET /health`, `GET /metrics`, `POST /reset_prefix_cache`.
//!
//! Request fields honoured: `model` (the served model or a `--lora-modules` adapter, when
//! given), `cache_salt` (with the adapter, keys the request's cached blocks: [`crate::lora`]),
//! `max_tokens`
//! (`max_completion_tokens` for chat; default `default_max_tokens`), `ignore_eos` (accepted),
//! `stream`, `stream_options.include_usage`, `return_token_ids`, and, on both endpoints,
//! streamed or not, the output-shaping fields of [`crate::params`]: `n` (1..=16 choices),
//! `seed`, `stop`, `stop_token_ids`, `include_stop_str_in_output`, `logprobs` (completions:
//! 0..=20; chat: `logprobs` + `top_logprobs`), `response_format`, `structured_outputs`,
//! `guided_json`, `guided_choice`, plus `tools` / `tool_choice` (chat) and tools rendered
//! into a prompt (see [`crate::tools`]). Usage reports `prompt_tokens`, `completion_tokens`
//! (all choices), `total_tokens` and `prompt_tokens_details.cached_tokens` (the engine's
//! prefix hit). Choices carry `token_ids` when asked for or when no tokenizer is loaded (text
//! is then empty, as vLLM with `skip_tokenizer_init`), and `finish_reason` / `stop_reason` as
//! vLLM sets them. Errors are OpenAI-shaped: `{"error":{"message","type","param","code"}}`.
//!
//! Disaggregated serving ([`crate::disagg`]): `kv_transfer_params` (vLLM) and
//! `bootstrap_host` / `bootstrap_port` / `bootstrap_room` (SGLang) on both endpoints, a prefill
//! response's top-level `kv_transfer_params`, `POST /v1/kv_transfer/pull` (a prefill worker's
//! side channel, also on its own port) and `GET /server_info` (the worker's `role`).
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kvrouter_preprocess::{ChatTemplateArgs, Preprocessor};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::choice::{self, ChoiceSpec, ChoiceState, Delta, Finish, Logprobs};
use crate::cli::Engine;
use crate::disagg::{self, DisaggFields, DisaggState, KvTransferParams, TransferAsk};
use crate::dp::{self, RankFields, RankLease, Ranks};
use crate::engine::{EngineConfig, OutputSource, StopReason, TokenOutput};
use crate::lora::{self, CacheKeys, LoraModule};
use crate::metrics::Metrics;
use crate::params::{self, RawSampling, Sampling, Structured};
use crate::sampling::{self, AfterForced, OutputPlan, Rng};
use crate::scheduler::SeqId;
use crate::sglang::SglangUsage;
use crate::tools::{self, Tool};
use crate::worker::{Command, FinalOutput, Reply, WorkerHandle};
use crate::ToolCalls;

/// What the HTTP layer of one worker needs.
pub struct HttpState {
    /// The engine task of each data-parallel rank ([`crate::dp`]).
    pub ranks: Ranks,
    /// The engine whose API, rank fields and usage shapes it mimics (`--engine`).
    pub engine_type: Engine,
    /// TensorRT-LLM's KV event buffers, drained by `POST /kv_cache_events` (None: events go
    /// to ZMQ, or are off).
    pub trtllm_events: Option<crate::trtllm::TrtEventBuffers>,
    /// SGLang's `--enable-cache-report`: its usage reports cached tokens.
    pub enable_cache_report: bool,
    /// The engine's configuration (validation limits).
    pub engine: EngineConfig,
    /// Served model name.
    pub model_name: String,
    /// LoRA adapters served (`--lora-modules`): a request's `model` may name one.
    pub lora_modules: Vec<LoraModule>,
    /// Tokenizer and chat template, when `--model-path` was given.
    pub preprocessor: Option<Arc<Preprocessor>>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// `vllm:cache_config_info` labels.
    pub cache_info: Vec<(&'static str, String)>,
    /// Whether prompts offering tools get a tool call.
    pub tool_calls: ToolCalls,
    /// Whether answers open with a reasoning block.
    pub reasoning: bool,
    /// Id of the `<tool_call>` token, when the tokenizer has one: only token prompts that
    /// contain it are decoded to look for tools.
    pub tool_call_token: Option<u32>,
    /// Its role in disaggregated serving and the KV-transfer settings.
    pub disagg: DisaggState,
}

impl HttpState {
    /// Rank 0's engine: the worker's only one in disaggregated serving (which runs one rank).
    pub fn worker(&self) -> &WorkerHandle {
        self.ranks.first()
    }
}

/// The worker's router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/kv_cache_events", post(kv_cache_events))
        .route(disagg::PULL_PATH, post(disagg::pull))
        .route("/server_info", get(disagg::server_info))
        .route("/get_server_info", get(disagg::server_info))
        .fallback(not_found)
        .with_state(state)
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl fmt::Display) -> Self {
        Self {
            status,
            message: message.to_string(),
            param: None,
        }
    }
    pub(crate) fn bad_request(message: impl fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn with_param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ty = match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::CONFLICT => "ConflictError",
            StatusCode::BAD_GATEWAY => "BadGatewayError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": ty,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "Not Found".into(),
        param: None,
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    // One snapshot per rank, each labelled `engine="<rank>"` as vLLM labels its DP engines.
    let ranks: Vec<Metrics> = s
        .ranks
        .all()
        .iter()
        .map(|w| w.metrics().lock().map(|m| m.clone()).unwrap_or_default())
        .collect();
    let text = Metrics::render_ranks(&ranks, &s.model_name, &s.cache_info);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn models(State(s): State<Arc<HttpState>>) -> Response {
    let max_len = s
        .preprocessor
        .as_ref()
        .and_then(|p| p.context_length())
        .unwrap_or(usize::MAX)
        .min(s.engine.capacity_tokens());
    let owned_by = match s.engine_type {
        Engine::Vllm => "kvrouter-mocker",
        Engine::Sglang => "sglang",
        Engine::Trtllm => "tensorrt_llm",
    };
    let mut body = json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": unix_secs(),
            "owned_by": owned_by,
            "root": s.model_name,
            "parent": null,
            "max_model_len": max_len,
        }]
    });
    // vLLM lists each adapter after the base model, its path as `root`.
    if let Some(data) = body["data"].as_array_mut() {
        for m in &s.lora_modules {
            data.push(json!({
                "id": m.name,
                "object": "model",
                "created": unix_secs(),
                "owned_by": owned_by,
                "root": m.path,
                "parent": s.model_name,
                "max_model_len": max_len,
            }));
        }
    }
    axum::Json(body).into_response()
}

/// `POST /kv_cache_events` (TensorRT-LLM): every rank's buffered events as one JSON array,
/// the buffers drained ([`crate::trtllm`]); `[]` from a TensorRT-LLM worker whose events are
/// off or on ZMQ; 404 from the other engines, which have no such route.
async fn kv_cache_events(State(s): State<Arc<HttpState>>) -> Response {
    let body = match (&s.trtllm_events, s.engine_type) {
        (Some(b), _) => b.drain(),
        (None, Engine::Trtllm) => b"[]".to_vec(),
        (None, _) => return not_found().await.into_response(),
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn reset_prefix_cache(State(s): State<Arc<HttpState>>) -> Response {
    // Every rank, as vLLM resets every engine of a data-parallel server.
    let mut all = Some(true);
    for w in s.ranks.all() {
        match w.reset_prefix_cache().await {
            Some(ok) => all = all.map(|a| a && ok),
            None => all = None,
        }
    }
    match all {
        Some(true) => StatusCode::OK.into_response(),
        Some(false) => ApiError {
            status: StatusCode::CONFLICT,
            message: "Cannot reset the prefix cache while requests are running.".into(),
            param: None,
        }
        .into_response(),
        None => engine_gone().into_response(),
    }
}

pub(crate) fn engine_gone() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "The engine has stopped.".into(),
        param: None,
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------- request bodies ----------

/// A completion prompt: token ids or text. Batches of more than one prompt are refused.
#[derive(Debug)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// One element of a prompt array.
enum PromptItem {
    Id(u32),
    Text(String),
    Tokens(Vec<u32>),
}

fn id_error<E: de::Error>(v: impl fmt::Display) -> E {
    E::custom(format_args!("Token id {v} is out of vocabulary."))
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token id, a string or an array of token ids")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Id)
                    .map_err(|_| id_error(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Id)
                    .map_err(|_| id_error(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(t) = seq.next_element::<TokenId>()? {
                    ids.push(t.0);
                }
                Ok(PromptItem::Tokens(ids))
            }
        }
        d.deserialize_any(V)
    }
}

struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match PromptItem::deserialize(d)? {
            PromptItem::Id(v) => Ok(TokenId(v)),
            _ => Err(de::Error::custom(
                "a token-id prompt must contain only integers",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array of token ids, or a one-element array of either")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                let mut nested: Option<Prompt> = None;
                let mut n = 0usize;
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    n += 1;
                    match item {
                        PromptItem::Id(v) if nested.is_none() => ids.push(v),
                        PromptItem::Text(t) if n == 1 => nested = Some(Prompt::Text(t)),
                        PromptItem::Tokens(t) if n == 1 => nested = Some(Prompt::Tokens(t)),
                        _ => {
                            return Err(de::Error::custom(
                                "batched prompts are not supported; send one prompt per request",
                            ))
                        }
                    }
                }
                Ok(nested.unwrap_or(Prompt::Tokens(ids)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    #[allow(dead_code)]
    // accepted for compatibility: the mock samples EOS only to end an answer
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    return_token_ids: Option<bool>,
    #[serde(default)]
    cache_salt: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    disagg: DisaggFields,
    #[serde(flatten)]
    rank: RankFields,
}

/// The output-shaping fields both APIs share (see [`crate::params`]); values are read there.
#[derive(Deserialize, Default)]
struct SamplingFields {
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    seed: Option<Value>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stop_token_ids: Option<Value>,
    #[serde(default)]
    include_stop_str_in_output: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    structured_outputs: Option<Value>,
    #[serde(default)]
    guided_json: Option<Value>,
    #[serde(default)]
    guided_choice: Option<Value>,
    #[serde(default)]
    guided_regex: Option<Value>,
    #[serde(default)]
    guided_grammar: Option<Value>,
    #[serde(default)]
    structural_tag: Option<Value>,
}

impl SamplingFields {
    fn parse(&self, chat: bool) -> Result<Sampling, ApiError> {
        params::parse_sampling(RawSampling {
            chat,
            n: self.n.as_ref(),
            seed: self.seed.as_ref(),
            stop: self.stop.as_ref(),
            stop_token_ids: self.stop_token_ids.as_ref(),
            include_stop_str_in_output: self.include_stop_str_in_output.as_ref(),
            logprobs: self.logprobs.as_ref(),
            top_logprobs: if chat {
                self.top_logprobs.as_ref()
            } else {
                None
            },
            response_format: self.response_format.as_ref(),
            structured_outputs: self.structured_outputs.as_ref(),
            guided_json: self.guided_json.as_ref(),
            guided_choice: self.guided_choice.as_ref(),
            guided_regex: self.guided_regex.as_ref(),
            guided_grammar: self.guided_grammar.as_ref(),
            structural_tag: self.structural_tag.as_ref(),
        })
        .map_err(|e| ApiError::bad_request(e.message).with_param(e.param))
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Value,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    #[allow(dead_code)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    return_token_ids: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    cache_salt: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    disagg: DisaggFields,
    #[serde(flatten)]
    rank: RankFields,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("Invalid JSON body: {e}")
        } else {
            format!("Invalid request: {e}")
        };
        ApiError::bad_request(msg)
    })
}

/// The request's cache keys: the adapter its `model` names (the served model or none: no
/// adapter) and its `cache_salt`. Errors: 404 for another model, 400 for a bad salt.
fn cache_keys(
    s: &HttpState,
    model: Option<&str>,
    cache_salt: Option<&Value>,
) -> Result<Option<Arc<CacheKeys>>, ApiError> {
    let lora = match model {
        Some(m) if !m.is_empty() && m != s.model_name => Some(
            lora::find_adapter(&s.lora_modules, m).ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("The model `{m}` does not exist."),
                param: Some("model"),
            })?,
        ),
        _ => None,
    };
    let cache_salt = lora::parse_cache_salt(cache_salt)
        .map_err(|e| ApiError::bad_request(e).with_param("cache_salt"))?;
    let keys = CacheKeys { lora, cache_salt };
    Ok((!keys.is_empty()).then(|| Arc::new(keys)))
}

fn max_tokens(s: &HttpState, v: Option<i64>) -> Result<usize, ApiError> {
    match v {
        None => Ok(s.default_max_tokens),
        Some(v) if v < 0 => Err(ApiError::bad_request(format!(
            "max_tokens must be at least 1, got {v}."
        ))
        .with_param("max_tokens")),
        Some(v) => Ok(usize::try_from(v).unwrap_or(usize::MAX)),
    }
}

// ---------- handlers ----------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// One choice to run: its seed and, unless it is the default output, its token source.
struct ChoicePlan {
    seed: u64,
    output: Option<Box<dyn OutputSource>>,
}

struct Job {
    kind: Kind,
    /// The data-parallel rank the request asked for.
    dp_rank: Option<u32>,
    prompt: Vec<u32>,
    max_tokens: usize,
    stream: bool,
    include_usage: bool,
    return_token_ids: bool,
    spec: Arc<ChoiceSpec>,
    choices: Vec<ChoicePlan>,
    transfer: TransferAsk,
    /// Its adapter and cache salt.
    keys: Option<Arc<CacheKeys>>,
}

/// What the answer must be, beyond random tokens.
enum Answer {
    Structured(Structured, &'static str),
    Tool(Tool),
}

/// Everything that decides a request's output, gathered from its fields and prompt.
struct OutputAsk {
    sampling: Sampling,
    answer: Option<Answer>,
    reasoning: bool,
}

async fn completions(State(s): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    match prepare_completion(&s, &headers, &body) {
        Ok(job) => run_job(s, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_completion(s: &HttpState, headers: &HeaderMap, body: &[u8]) -> Result<Job, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let keys = cache_keys(s, req.model.as_deref(), req.cache_salt.as_ref())?;
    let dp_rank = dp::requested_rank(s.engine_type, headers, &req.rank)?;
    let sampling = req.sampling.parse(false)?;
    let mut text_prompt = None;
    let prompt = match req.prompt {
        None => return Err(ApiError::bad_request("`prompt` is required.").with_param("prompt")),
        Some(Prompt::Tokens(t)) => t,
        Some(Prompt::Text(text)) => {
            let Some(p) = &s.preprocessor else {
                return Err(ApiError::bad_request(
                    "Text prompts need a tokenizer (start the mocker with --model-path); send token ids instead.",
                )
                .with_param("prompt"));
            };
            let ids = if text.is_empty() {
                Vec::new()
            } else {
                p.encode_with(&text, true)
                    .map_err(|e| ApiError::bad_request(e).with_param("prompt"))?
            };
            text_prompt = Some(text);
            ids
        }
    };
    let stream = req.stream.unwrap_or(false);
    let transfer = req.disagg.parse(s.disagg.mode)?;
    transfer.check(sampling.n, stream)?;
    let max_tokens = transfer.max_tokens(max_tokens(s, req.max_tokens)?);
    validate(s, &prompt, max_tokens)?;
    let ask = completion_ask(s, sampling, &prompt, text_prompt.as_deref())?;
    Ok(Job {
        keys,
        transfer,
        dp_rank,
        kind: Kind::Completion,
        spec: choice_spec(s, &ask, false, stream),
        choices: plan_choices(s, &ask, &prompt)?,
        prompt,
        max_tokens,
        stream,
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    })
}

/// Structured output, else a tool call when the prompt offers tools (Hermes `<tools>`
/// section) and does not end with a tool response; reasoning when on and not disabled by the
/// prompt's empty think block.
fn completion_ask(
    s: &HttpState,
    sampling: Sampling,
    prompt: &[u32],
    text: Option<&str>,
) -> Result<OutputAsk, ApiError> {
    let mut answer = structured_answer(s, &sampling)?;
    let Some(p) = &s.preprocessor else {
        return Ok(OutputAsk {
            sampling,
            answer,
            reasoning: false,
        });
    };
    if answer.is_none() && s.tool_calls == ToolCalls::Auto {
        // A token prompt is decoded only when it contains the `<tool_call>` token (Hermes
        // templates name it in their tools preamble); tokenizers without one get no tool
        // calls on token prompts.
        let decoded;
        let t = match text {
            Some(t) => Some(t),
            None if s.tool_call_token.is_some_and(|id| prompt.contains(&id)) => {
                decoded = p.decode_with(prompt, false).unwrap_or_default();
                Some(decoded.as_str())
            }
            None => None,
        };
        if let Some(t) = t {
            let offered = tools::tools_in_text(t);
            if !offered.is_empty() && !tools::last_turn_is_tool_response(t) {
                answer = offered.into_iter().next().map(Answer::Tool);
            }
        }
    }
    let reasoning = s.reasoning
        && match text {
            Some(t) => !tools::ends_with_empty_think(t),
            None => {
                let tail = &prompt[prompt.len().saturating_sub(8)..];
                !tools::ends_with_empty_think(&p.decode_with(tail, false).unwrap_or_default())
            }
        };
    Ok(OutputAsk {
        sampling,
        answer,
        reasoning,
    })
}

fn structured_answer(s: &HttpState, sampling: &Sampling) -> Result<Option<Answer>, ApiError> {
    let Some((st, param)) = &sampling.structured else {
        return Ok(None);
    };
    if s.preprocessor.is_none() {
        return Err(ApiError::bad_request(
            "Structured output needs a tokenizer to turn the answer into tokens: start the mocker with --model-path.",
        )
        .with_param(param));
    }
    Ok(Some(Answer::Structured(st.clone(), param)))
}

async fn chat_completions(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match prepare_chat(&s, &headers, &body) {
        Ok(job) => run_job(s, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_chat(s: &HttpState, headers: &HeaderMap, body: &[u8]) -> Result<Job, ApiError> {
    let Some(p) = s.preprocessor.as_ref().filter(|p| p.has_chat_template()) else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: "Chat completions need a tokenizer with a chat template (start the mocker with --model-path).".into(),
            param: None,
        });
    };
    let req: ChatRequest = parse(body)?;
    let keys = cache_keys(s, req.model.as_deref(), req.cache_salt.as_ref())?;
    let dp_rank = dp::requested_rank(s.engine_type, headers, &req.rank)?;
    let sampling = req.sampling.parse(true)?;
    let Some(messages) = req.messages.as_array().filter(|m| !m.is_empty()) else {
        return Err(
            ApiError::bad_request("`messages` must be a non-empty array.").with_param("messages"),
        );
    };
    let text = p
        .render_chat(&ChatTemplateArgs {
            messages: &req.messages,
            tools: req.tools.as_ref(),
            add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
            extra: req.chat_template_kwargs.as_ref(),
        })
        .map_err(|e| ApiError::bad_request(e).with_param("messages"))?;
    let prompt = p.encode(&text).map_err(ApiError::bad_request)?;
    let stream = req.stream.unwrap_or(false);
    let transfer = req.disagg.parse(s.disagg.mode)?;
    transfer.check(sampling.n, stream)?;
    let max_tokens =
        transfer.max_tokens(max_tokens(s, req.max_completion_tokens.or(req.max_tokens))?);
    validate(s, &prompt, max_tokens)?;
    let mut answer = structured_answer(s, &sampling)?;
    let last_is_tool = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("tool");
    if answer.is_none() && s.tool_calls == ToolCalls::Auto && !last_is_tool {
        let offered = req
            .tools
            .as_ref()
            .map(tools::tools_from_request)
            .unwrap_or_default();
        answer = chat_tool(&offered, req.tool_choice.as_ref())?.map(Answer::Tool);
    }
    let ask = OutputAsk {
        sampling,
        answer,
        reasoning: s.reasoning && !tools::ends_with_empty_think(&text),
    };
    Ok(Job {
        keys,
        transfer,
        dp_rank,
        kind: Kind::Chat,
        spec: choice_spec(s, &ask, true, stream),
        choices: plan_choices(s, &ask, &prompt)?,
        prompt,
        max_tokens,
        stream,
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    })
}

/// The tool a chat request's answer calls: none with `tool_choice: "none"` or no tools, the
/// named one for `{"type": "function", "function": {"name": …}}`, else the first.
fn chat_tool(offered: &[Tool], choice: Option<&Value>) -> Result<Option<Tool>, ApiError> {
    match choice {
        Some(Value::String(c)) if c == "none" => Ok(None),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            let Some(name) = name else {
                return Err(ApiError::bad_request(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                )
                .with_param("tool_choice"));
            };
            match offered.iter().find(|t| t.name == name) {
                Some(t) => Ok(Some(t.clone())),
                None => Err(ApiError::bad_request(format!(
                    "Tool '{name}' has not been passed in `tools`."
                ))
                .with_param("tool_choice")),
            }
        }
        _ => Ok(offered.first().cloned()),
    }
}

fn choice_spec(s: &HttpState, ask: &OutputAsk, chat: bool, streaming: bool) -> Arc<ChoiceSpec> {
    Arc::new(ChoiceSpec {
        chat,
        stop: Arc::new(ask.sampling.stop.clone()),
        hold_chars: ask.sampling.stop.buffer_chars(),
        logprobs: ask.sampling.logprobs,
        eos: s.engine.eos_token_ids.clone(),
        output_vocab: s.engine.output_vocab,
        streaming,
    })
}

/// Seeds and token sources of the `n` choices. A choice keeps the engine's default output
/// (no source) unless it has a user seed, is not choice 0, must stop early or must say
/// something in particular.
fn plan_choices(
    s: &HttpState,
    ask: &OutputAsk,
    prompt: &[u32],
) -> Result<Vec<ChoicePlan>, ApiError> {
    let sp = &ask.sampling;
    if !sp.stop.strings.is_empty() && s.preprocessor.is_none() {
        return Err(ApiError::bad_request(
            "Stop strings need a tokenizer to detokenize the output: start the mocker with --model-path, or use stop_token_ids.",
        )
        .with_param("stop"));
    }
    let base = sampling::prompt_seed(prompt);
    let stop = Arc::new(sp.stop.clone());
    let mut out = Vec::with_capacity(sp.n);
    for i in 0..sp.n {
        let seed = sampling::choice_seed(base, sp.seed, i);
        let mut forced = Vec::new();
        let mut after = AfterForced::Continue;
        if let Some(p) = &s.preprocessor {
            let mut rng = Rng::new(seed ^ 0x3c6e_f372_fe94_f82b);
            let mut text = String::new();
            if ask.reasoning {
                text.push_str(&tools::reasoning_block(&mut rng));
            }
            match &ask.answer {
                Some(Answer::Structured(st, param)) => {
                    let answer = st.render(&mut rng).map_err(|e| {
                        ApiError::bad_request(format!("Cannot honour `{param}`: {e}."))
                            .with_param(param)
                    })?;
                    text.push_str(&answer);
                    after = AfterForced::Eos;
                }
                Some(Answer::Tool(t)) => {
                    text.push_str(&tools::hermes_call(t, &mut rng));
                    after = AfterForced::Eos;
                }
                None => {}
            }
            if !text.is_empty() {
                forced = p.encode(&text).map_err(ApiError::bad_request)?;
            }
        }
        let default = sp.seed.is_none() && i == 0 && sp.stop.is_empty() && forced.is_empty();
        let output = (!default).then(|| {
            Box::new(OutputPlan::new(
                seed,
                s.engine.output_vocab,
                s.engine.eos_token_ids.clone(),
                forced,
                after,
                stop.clone(),
                s.preprocessor.clone(),
            )) as Box<dyn OutputSource>
        });
        out.push(ChoicePlan { seed, output });
    }
    Ok(out)
}

fn validate(s: &HttpState, prompt: &[u32], max_tokens: usize) -> Result<(), ApiError> {
    use crate::engine::RequestError as E;
    s.engine
        .validate(prompt.len(), prompt.iter().copied().max(), max_tokens)
        .map_err(|e| {
            let param = match e {
                E::ZeroMaxTokens => "max_tokens",
                _ => "prompt",
            };
            ApiError::bad_request(e).with_param(param)
        })
}

/// Aborts the request's engine sequences if the response is dropped before it finished;
/// holds the request's place on its rank until then.
struct AbortGuard {
    worker: WorkerHandle,
    ids: Vec<SeqId>,
    done: bool,
    _rank: RankLease,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.done {
            for &id in &self.ids {
                self.worker.send(Command::Abort(id));
            }
        }
    }
}

struct Ctx {
    state: Arc<HttpState>,
    kind: Kind,
    id: String,
    created: u64,
    return_token_ids: bool,
    spec: Arc<ChoiceSpec>,
    /// The final response carries `kv_transfer_params` (vLLM prefill).
    answers_params: bool,
    /// The LoRA adapter it ran with: the `model` of its answer, as in vLLM (else the served
    /// model's name).
    model: Option<String>,
}

impl Ctx {
    fn with_ids(&self) -> bool {
        self.return_token_ids || self.state.preprocessor.is_none()
    }

    fn text(&self, ids: &[u32]) -> String {
        match &self.state.preprocessor {
            Some(p) => p.decode(ids).unwrap_or_default(),
            None => String::new(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A response or chunk; `usage` is `(prompt, completion, cached)` tokens, written in
    /// the engine's usage shape.
    fn envelope<C: Serialize>(
        &self,
        chunk: bool,
        choices: Vec<C>,
        usage: Option<(usize, usize, usize)>,
    ) -> Envelope<'_, C> {
        let usage = match (self.state.engine_type, usage) {
            (Engine::Vllm | Engine::Trtllm, None) => UsageOut::Absent,
            (Engine::Vllm | Engine::Trtllm, Some((p, c, cached))) => {
                UsageOut::Vllm(vllm_usage(p, c, cached))
            }
            // SGLang writes `"usage": null` in every chunk but the usage chunk.
            (Engine::Sglang, None) if chunk => UsageOut::Null,
            (Engine::Sglang, None) => UsageOut::Absent,
            (Engine::Sglang, Some((p, c, cached))) => UsageOut::Sglang(SglangUsage::new(
                p,
                c,
                cached,
                self.state.enable_cache_report,
                chunk,
            )),
        };
        Envelope {
            id: &self.id,
            object: self.object(chunk),
            created: self.created,
            model: self.model.as_deref().unwrap_or(&self.state.model_name),
            choices,
            usage,
            kv_transfer_params: None,
        }
    }
}

// ---------- response shapes (field order as vLLM writes them) ----------

#[derive(Serialize)]
struct Envelope<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "UsageOut::is_absent")]
    usage: UsageOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<KvTransferParams>,
}

/// The `usage` member of a response or chunk, in the engine's shape.
enum UsageOut {
    /// Not written.
    Absent,
    /// `null` (SGLang's content chunks).
    Null,
    Vllm(Usage),
    Sglang(SglangUsage),
}

impl UsageOut {
    fn is_absent(&self) -> bool {
        matches!(self, UsageOut::Absent)
    }
}

impl Serialize for UsageOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageOut::Absent | UsageOut::Null => s.serialize_none(),
            UsageOut::Vllm(u) => u.serialize(s),
            UsageOut::Sglang(u) => u.serialize(s),
        }
    }
}

/// How a choice says which stop condition ended it: vLLM's `stop_reason`, SGLang's
/// `matched_stop` (the stop string or token id, null at a length limit).
#[derive(Serialize)]
enum StopField {
    #[serde(rename = "stop_reason")]
    StopReason(Value),
    #[serde(rename = "matched_stop")]
    MatchedStop(Value),
}

impl StopField {
    fn new(engine: Engine, v: Value) -> Self {
        match engine {
            Engine::Vllm | Engine::Trtllm => StopField::StopReason(v),
            Engine::Sglang => StopField::MatchedStop(v),
        }
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: CachedTokens,
}

#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct CachedTokens {
    pub(crate) cached_tokens: usize,
}

fn vllm_usage(prompt: usize, completion: usize, cached: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: CachedTokens {
            cached_tokens: cached,
        },
    }
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    #[serde(flatten)]
    stop: StopField,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
    tool_calls: [Value; 0],
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: usize,
    message: ChatMessage<'a>,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    #[serde(flatten)]
    stop: StopField,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
}

#[derive(Serialize)]
struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: usize,
    delta: ChatDelta<'a>,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    #[serde(flatten)]
    stop: StopField,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

async fn run_job(s: Arc<HttpState>, job: Job) -> Response {
    let lease = match s.ranks.choose(job.dp_rank) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    if job.transfer.is_receive() {
        // Decode worker: the prompt's KV comes from the prefill worker first.
        if let Err(e) = disagg::receive(&s, &job.prompt, &job.transfer).await {
            return e.into_response();
        }
    }
    let worker = lease.handle().clone();
    let ids: Vec<SeqId> = job.choices.iter().map(|_| worker.next_id()).collect();
    let first = ids[0];
    let ctx = Ctx {
        kind: job.kind,
        id: match job.kind {
            Kind::Completion => format!("cmpl-{first:x}{:x}", unix_secs()),
            Kind::Chat => format!("chatcmpl-{first:x}{:x}", unix_secs()),
        },
        created: unix_secs(),
        return_token_ids: job.return_token_ids,
        spec: job.spec,
        answers_params: job.transfer.answers_params(),
        model: job
            .keys
            .as_ref()
            .and_then(|k| Some(k.lora.as_ref()?.name.clone())),
        state: s,
    };
    let kv = job.transfer.kv_mode(&ctx.id);
    let mut guard = AbortGuard {
        worker: worker.clone(),
        ids: ids.clone(),
        done: false,
        _rank: lease,
    };
    let n = job.choices.len();
    let seeds: Vec<u64> = job.choices.iter().map(|c| c.seed).collect();
    let mut prompt = Some(job.prompt);
    let mut take_prompt = |i: usize| {
        if i + 1 == n {
            prompt.take().unwrap_or_default()
        } else {
            prompt.clone().unwrap_or_default()
        }
    };
    if job.stream {
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, c) in job.choices.into_iter().enumerate() {
            if !worker.send(Command::Add {
                id: ids[i],
                prompt: take_prompt(i),
                max_tokens: job.max_tokens,
                output: c.output,
                reply: Reply::Stream(tx.clone()),
                kv: kv.clone(),
                keys: job.keys.clone(),
            }) {
                return engine_gone().into_response();
            }
        }
        drop(tx);
        stream_response(ctx, rx, guard, job.include_usage, seeds)
    } else {
        let mut rxs = Vec::with_capacity(n);
        for (i, c) in job.choices.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            if !worker.send(Command::Add {
                id: ids[i],
                prompt: take_prompt(i),
                max_tokens: job.max_tokens,
                output: c.output,
                reply: Reply::Final(tx),
                kv: kv.clone(),
                keys: job.keys.clone(),
            }) {
                return engine_gone().into_response();
            }
            rxs.push(rx);
        }
        let mut outs = Vec::with_capacity(n);
        for rx in rxs {
            let Ok(out) = rx.await else {
                return engine_gone().into_response();
            };
            outs.push(out);
        }
        guard.done = true;
        final_response(&ctx, outs, &seeds)
    }
}

/// Text, logprobs and finish of a finished choice.
fn final_choice(ctx: &Ctx, seed: u64, out: &FinalOutput) -> (String, Option<Logprobs>, Finish) {
    let spec = &ctx.spec;
    if spec.stop.strings.is_empty() && spec.logprobs.is_none() {
        // Fast path: one decode of the whole output.
        let stop_token = match out.stop {
            Some(StopReason::TokenId(_)) => true,
            Some(StopReason::Eos) => out.tokens.last().is_some_and(|t| spec.eos.contains(t)),
            _ => false,
        };
        let n = if stop_token && !spec.stop.include_in_output {
            out.tokens.len().saturating_sub(1)
        } else {
            out.tokens.len()
        };
        return (
            ctx.text(&out.tokens[..n]),
            None,
            choice::finish_of(out.stop, &spec.stop),
        );
    }
    let mut st = ChoiceState::new(spec.clone(), ctx.state.preprocessor.clone(), seed);
    let last = out.tokens.len().saturating_sub(1);
    for (index, &token) in out.tokens.iter().enumerate() {
        st.push(&TokenOutput {
            id: 0,
            token,
            index,
            finished: index == last,
            stop: if index == last { out.stop } else { None },
            prompt_tokens: out.prompt_tokens,
            cached_tokens: out.cached_tokens,
        });
    }
    let finish = st
        .finish
        .clone()
        .unwrap_or_else(|| choice::finish_of(out.stop, &spec.stop));
    (st.text().to_owned(), st.take_logprobs(), finish)
}

fn final_response(ctx: &Ctx, outs: Vec<FinalOutput>, seeds: &[u64]) -> Response {
    let results: Vec<(String, Option<Logprobs>, Finish)> = outs
        .iter()
        .zip(seeds)
        .map(|(o, &seed)| final_choice(ctx, seed, o))
        .collect();
    let completion: usize = outs.iter().map(|o| o.tokens.len()).sum();
    let u = (outs[0].prompt_tokens, completion, outs[0].cached_tokens);
    let engine = ctx.state.engine_type;
    let with_ids = ctx.with_ids();
    let params = outs[0]
        .kv_blocks
        .clone()
        .filter(|_| ctx.answers_params)
        .map(|b| KvTransferParams::new(&ctx.state.disagg, b, &ctx.id));
    let body = match ctx.kind {
        Kind::Completion => {
            let choices = results
                .iter()
                .zip(&outs)
                .enumerate()
                .map(|(index, ((text, logprobs, f), o))| CompletionChoice {
                    index,
                    text,
                    logprobs: logprobs.clone(),
                    finish_reason: Some(f.reason),
                    stop: StopField::new(engine, f.stop_reason.clone()),
                    token_ids: with_ids.then_some(o.tokens.as_slice()),
                })
                .collect();
            let mut e = ctx.envelope(false, choices, Some(u));
            e.kv_transfer_params = params;
            to_json(&e)
        }
        Kind::Chat => {
            let choices = results
                .iter()
                .zip(&outs)
                .enumerate()
                .map(|(index, ((text, logprobs, f), o))| ChatChoice {
                    index,
                    message: ChatMessage {
                        role: "assistant",
                        content: text,
                        tool_calls: [],
                    },
                    logprobs: logprobs.clone(),
                    finish_reason: Some(f.reason),
                    stop: StopField::new(engine, f.stop_reason.clone()),
                    token_ids: with_ids.then_some(o.tokens.as_slice()),
                })
                .collect();
            let mut e = ctx.envelope(false, choices, Some(u));
            e.kv_transfer_params = params;
            to_json(&e)
        }
    };
    json_response(body)
}

fn json_response(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// State of one SSE stream.
struct StreamState {
    ctx: Ctx,
    rx: mpsc::UnboundedReceiver<TokenOutput>,
    guard: AbortGuard,
    include_usage: bool,
    choices: Vec<ChoiceState>,
    unfinished: usize,
    sent_role: bool,
    queue: std::collections::VecDeque<Bytes>,
    ended: bool,
}

fn sse_str(s: String) -> Bytes {
    Bytes::from(format!("data: {s}\n\n"))
}

fn sse(v: &Value) -> Bytes {
    sse_str(v.to_string())
}

impl StreamState {
    fn chunk(&self, index: usize, delta: &Delta, ids: &[u32], role: bool) -> Bytes {
        let finish_reason = delta.finish.as_ref().map(|f| f.reason);
        let stop_reason = delta
            .finish
            .as_ref()
            .map_or(Value::Null, |f| f.stop_reason.clone());
        let token_ids = self.ctx.with_ids().then_some(ids);
        let body = match self.ctx.kind {
            Kind::Completion => to_json(&self.ctx.envelope(
                true,
                vec![CompletionChoice {
                    index,
                    text: &delta.text,
                    logprobs: delta.logprobs.clone(),
                    finish_reason,
                    stop: StopField::new(self.ctx.state.engine_type, stop_reason),
                    token_ids,
                }],
                None,
            )),
            Kind::Chat => to_json(&self.ctx.envelope(
                true,
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: role.then_some("assistant"),
                        content: &delta.text,
                    },
                    logprobs: delta.logprobs.clone(),
                    finish_reason,
                    stop: StopField::new(self.ctx.state.engine_type, stop_reason),
                    token_ids,
                }],
                None,
            )),
        };
        sse_str(body)
    }

    fn on_token(&mut self, t: TokenOutput) {
        let Some(i) = self.guard.ids.iter().position(|&id| id == t.id) else {
            return;
        };
        if self.choices[i].finish.is_some() {
            return; // stopped here before the engine saw it: its late tokens are dropped
        }
        if self.ctx.kind == Kind::Chat && !self.sent_role {
            // vLLM's first chat chunk of each choice carries only the role.
            for c in 0..self.choices.len() {
                let first = self.chunk(c, &Delta::default(), &[], true);
                self.queue.push_back(first);
            }
            self.sent_role = true;
        }
        let delta = self.choices[i].push(&t);
        let c = self.chunk(i, &delta, &[t.token], false);
        self.queue.push_back(c);
        if delta.finish.is_none() {
            return;
        }
        if !t.finished {
            // A stop string the engine had not reached: stop it now.
            self.guard.worker.send(Command::Abort(t.id));
        }
        self.unfinished -= 1;
        if self.unfinished > 0 {
            return;
        }
        self.guard.done = true;
        if self.include_usage {
            let completion = self.choices.iter().map(|c| c.generated).sum();
            let (prompt, cached) = self.choices[0].usage;
            let body = to_json(&self.ctx.envelope::<CompletionChoice>(
                true,
                Vec::new(),
                Some((prompt, completion, cached)),
            ));
            self.queue.push_back(sse_str(body));
        }
        self.queue
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}

fn stream_response(
    ctx: Ctx,
    rx: mpsc::UnboundedReceiver<TokenOutput>,
    guard: AbortGuard,
    include_usage: bool,
    seeds: Vec<u64>,
) -> Response {
    let choices: Vec<ChoiceState> = seeds
        .iter()
        .map(|&seed| ChoiceState::new(ctx.spec.clone(), ctx.state.preprocessor.clone(), seed))
        .collect();
    let st = StreamState {
        unfinished: choices.len(),
        choices,
        ctx,
        rx,
        guard,
        include_usage,
        sent_role: false,
        queue: Default::default(),
        ended: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.ended || st.unfinished == 0 {
                return None;
            }
            match st.rx.recv().await {
                Some(t) => st.on_token(t),
                None => {
                    // Engine gone mid-stream: an error event, then the end.
                    st.ended = true;
                    let e = json!({"error": {"message": "The engine stopped before the request finished.",
                        "type": "InternalServerError", "param": null, "code": 500}});
                    st.queue.push_back(sse(&e));
                    st.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
