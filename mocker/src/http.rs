//! vLLM-compatible HTTP API of one mock worker (axum).
//!
//! * `POST /v1/completions` — `prompt` as token ids (`[1,2,3]` or `[[1,2,3]]`) or text (`"..."`
//!   or `["..."]`, tokenized with special tokens when a tokenizer is loaded);
//! * `POST /v1/chat/completions` — when the tokenizer has a chat template;
//! * `GET /v1/models`, `GET /health`, `GET /metrics`, `POST /reset_prefix_cache`.
//!
//! Request fields honoured: `model` (must match when given), `max_tokens`
//! (`max_completion_tokens` for chat; default `default_max_tokens`), `ignore_eos` (accepted; the
//! mock never samples EOS), `stream`, `stream_options.include_usage`, `return_token_ids`.
//! Usage reports `prompt_tokens`, `completion_tokens`, `total_tokens` and
//! `prompt_tokens_details.cached_tokens` (the engine's prefix hit). Choices carry `token_ids`
//! when asked for or when no tokenizer is loaded (text is then empty, as vLLM with
//! `skip_tokenizer_init`). Errors are OpenAI-shaped:
//! `{"error":{"message","type","param","code"}}`.
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kvrouter_preprocess::{ChatTemplateArgs, IncrementalDecoder, Preprocessor};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{EngineConfig, TokenOutput};
use crate::worker::{Command, FinalOutput, Reply, WorkerHandle};

/// What the HTTP layer of one worker needs.
pub struct HttpState {
    /// The engine task.
    pub worker: WorkerHandle,
    /// The engine's configuration (validation limits).
    pub engine: EngineConfig,
    /// Served model name.
    pub model_name: String,
    /// Tokenizer and chat template, when `--model-path` was given.
    pub preprocessor: Option<Arc<Preprocessor>>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// `vllm:cache_config_info` labels.
    pub cache_info: Vec<(&'static str, String)>,
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
    fn bad_request(message: impl fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.to_string(),
            param: None,
        }
    }
    fn with_param(mut self, p: &'static str) -> Self {
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
    let text = match s.worker.metrics().lock() {
        Ok(m) => m.render(&s.model_name, &s.cache_info),
        Err(_) => String::new(),
    };
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
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": unix_secs(),
            "owned_by": "kvrouter-mocker",
            "root": s.model_name,
            "parent": null,
            "max_model_len": max_len,
        }]
    }))
    .into_response()
}

async fn reset_prefix_cache(State(s): State<Arc<HttpState>>) -> Response {
    match s.worker.reset_prefix_cache().await {
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

fn engine_gone() -> ApiError {
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
    #[allow(dead_code)] // accepted for compatibility: the mock never samples EOS
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    return_token_ids: Option<bool>,
    #[serde(default)]
    n: Option<i64>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Value,
    #[serde(default)]
    tools: Option<Value>,
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
    n: Option<i64>,
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

fn check_model(s: &HttpState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != s.model_name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{m}` does not exist."),
            param: Some("model"),
        }),
        _ => Ok(()),
    }
}

fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(v) => {
            Err(ApiError::bad_request(format!("Only n=1 is supported, got n={v}.")).with_param("n"))
        }
    }
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

struct Job {
    kind: Kind,
    prompt: Vec<u32>,
    max_tokens: usize,
    stream: bool,
    include_usage: bool,
    return_token_ids: bool,
}

async fn completions(State(s): State<Arc<HttpState>>, body: Bytes) -> Response {
    match prepare_completion(&s, &body) {
        Ok(job) => run_job(s, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_completion(s: &HttpState, body: &[u8]) -> Result<Job, ApiError> {
    let req: CompletionRequest = parse(body)?;
    check_model(s, req.model.as_deref())?;
    check_n(req.n)?;
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
            if text.is_empty() {
                Vec::new()
            } else {
                p.encode_with(&text, true)
                    .map_err(|e| ApiError::bad_request(e).with_param("prompt"))?
            }
        }
    };
    let max_tokens = max_tokens(s, req.max_tokens)?;
    validate(s, &prompt, max_tokens)?;
    Ok(Job {
        kind: Kind::Completion,
        prompt,
        max_tokens,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    })
}

async fn chat_completions(State(s): State<Arc<HttpState>>, body: Bytes) -> Response {
    match prepare_chat(&s, &body) {
        Ok(job) => run_job(s, job).await,
        Err(e) => e.into_response(),
    }
}

fn prepare_chat(s: &HttpState, body: &[u8]) -> Result<Job, ApiError> {
    let Some(p) = s.preprocessor.as_ref().filter(|p| p.has_chat_template()) else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: "Chat completions need a tokenizer with a chat template (start the mocker with --model-path).".into(),
            param: None,
        });
    };
    let req: ChatRequest = parse(body)?;
    check_model(s, req.model.as_deref())?;
    check_n(req.n)?;
    if req.messages.as_array().is_none_or(|m| m.is_empty()) {
        return Err(
            ApiError::bad_request("`messages` must be a non-empty array.").with_param("messages"),
        );
    }
    let text = p
        .render_chat(&ChatTemplateArgs {
            messages: &req.messages,
            tools: req.tools.as_ref(),
            add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
            extra: req.chat_template_kwargs.as_ref(),
        })
        .map_err(|e| ApiError::bad_request(e).with_param("messages"))?;
    let prompt = p.encode(&text).map_err(ApiError::bad_request)?;
    let max_tokens = max_tokens(s, req.max_completion_tokens.or(req.max_tokens))?;
    validate(s, &prompt, max_tokens)?;
    Ok(Job {
        kind: Kind::Chat,
        prompt,
        max_tokens,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    })
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

/// Aborts the request in the engine if the response is dropped before it finished.
struct AbortGuard {
    worker: WorkerHandle,
    id: u64,
    done: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.done {
            self.worker.send(Command::Abort(self.id));
        }
    }
}

struct Ctx {
    state: Arc<HttpState>,
    kind: Kind,
    id: String,
    created: u64,
    return_token_ids: bool,
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

    fn usage(&self, prompt: usize, completion: usize, cached: usize) -> Value {
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }
}

async fn run_job(s: Arc<HttpState>, job: Job) -> Response {
    let worker = s.worker.clone();
    let id = worker.next_id();
    let ctx = Ctx {
        kind: job.kind,
        id: match job.kind {
            Kind::Completion => format!("cmpl-{id:x}{:x}", unix_secs()),
            Kind::Chat => format!("chatcmpl-{id:x}{:x}", unix_secs()),
        },
        created: unix_secs(),
        return_token_ids: job.return_token_ids,
        state: s,
    };
    let guard = AbortGuard {
        worker: worker.clone(),
        id,
        done: false,
    };
    if job.stream {
        let (tx, rx) = mpsc::unbounded_channel();
        if !worker.send(Command::Add {
            id,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            reply: Reply::Stream(tx),
        }) {
            return engine_gone().into_response();
        }
        stream_response(ctx, rx, guard, job.include_usage)
    } else {
        let (tx, rx) = oneshot::channel();
        if !worker.send(Command::Add {
            id,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            reply: Reply::Final(tx),
        }) {
            return engine_gone().into_response();
        }
        let mut guard = guard;
        let Ok(out) = rx.await else {
            return engine_gone().into_response();
        };
        guard.done = true;
        final_response(&ctx, out)
    }
}

fn final_response(ctx: &Ctx, out: FinalOutput) -> Response {
    let text = ctx.text(&out.tokens);
    let mut choice = match ctx.kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null,
            "finish_reason": "length", "stop_reason": null,
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null, "finish_reason": "length", "stop_reason": null,
        }),
    };
    if ctx.with_ids() {
        choice["token_ids"] = json!(out.tokens);
    }
    let body = json!({
        "id": ctx.id,
        "object": if ctx.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": ctx.created,
        "model": ctx.state.model_name,
        "choices": [choice],
        "usage": ctx.usage(out.prompt_tokens, out.tokens.len(), out.cached_tokens),
    });
    json_response(body.to_string())
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
    /// Output so far, decoded a few tokens at a time.
    detok: IncrementalDecoder,
    /// Tokens generated so far.
    generated: usize,
    sent_role: bool,
    finished: Option<(usize, usize)>,
    queue: std::collections::VecDeque<Bytes>,
    ended: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl StreamState {
    fn chunk(&self, delta_text: &str, ids: &[u32], finish: Option<&str>, role: bool) -> Value {
        let object = match self.ctx.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut choice = match self.ctx.kind {
            Kind::Completion => json!({
                "index": 0, "text": delta_text, "logprobs": null,
                "finish_reason": finish, "stop_reason": null,
            }),
            Kind::Chat => {
                let delta = if role {
                    json!({"role": "assistant", "content": delta_text})
                } else {
                    json!({"content": delta_text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish, "stop_reason": null})
            }
        };
        if self.ctx.with_ids() {
            choice["token_ids"] = json!(ids);
        }
        json!({
            "id": self.ctx.id, "object": object, "created": self.ctx.created,
            "model": self.ctx.state.model_name, "choices": [choice],
        })
    }

    /// Text newly decodable after `token` (held back while it ends mid-character; all of it
    /// on the last token). O(new tokens): only a window since the last boundary is decoded.
    fn new_text(&mut self, token: u32, last: bool) -> String {
        let Some(p) = &self.ctx.state.preprocessor else {
            return String::new();
        };
        let mut text = self.detok.push(p, &[token]).unwrap_or_default();
        if last {
            text.push_str(&self.detok.finish(p).unwrap_or_default());
        }
        text
    }

    fn on_token(&mut self, t: TokenOutput) {
        self.generated += 1;
        let text = self.new_text(t.token, t.finished);
        let finish = t.finished.then_some("length");
        let role = self.ctx.kind == Kind::Chat && !self.sent_role;
        if role {
            // vLLM's first chat chunk carries only the role.
            let first = self.chunk("", &[], None, true);
            self.queue.push_back(sse(&first));
            self.sent_role = true;
        }
        let c = self.chunk(&text, &[t.token], finish, false);
        self.queue.push_back(sse(&c));
        if t.finished {
            self.finished = Some((t.prompt_tokens, t.cached_tokens));
            self.guard.done = true;
            if self.include_usage {
                let object = match self.ctx.kind {
                    Kind::Completion => "text_completion",
                    Kind::Chat => "chat.completion.chunk",
                };
                let u = json!({
                    "id": self.ctx.id, "object": object, "created": self.ctx.created,
                    "model": self.ctx.state.model_name, "choices": [],
                    "usage": self.ctx.usage(t.prompt_tokens, self.generated, t.cached_tokens),
                });
                self.queue.push_back(sse(&u));
            }
            self.queue
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        }
    }
}

fn stream_response(
    ctx: Ctx,
    rx: mpsc::UnboundedReceiver<TokenOutput>,
    guard: AbortGuard,
    include_usage: bool,
) -> Response {
    let st = StreamState {
        ctx,
        rx,
        guard,
        include_usage,
        detok: IncrementalDecoder::new(true),
        generated: 0,
        sent_role: false,
        finished: None,
        queue: Default::default(),
        ended: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.ended || st.finished.is_some() {
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
