//! `POST /v1/router/generate`: a token-id request (Dynamo's `PreprocessedRequest` shape)
//! routed, booked, sent to the chosen worker's `/v1/completions` as token ids, and streamed
//! back as server-sent events. The router marks prefill complete at the first token and frees
//! the booking when the stream ends, fails, or the client goes away.
//!
//! Request: `{"token_ids": [u32], "model"?: str, "stop_conditions"?: {...},
//! "sampling_options"?: {...}, "output_options"?: {...}, "router_config_override"?: {...},
//! "worker_id"?: u64, "dp_rank"?: u32, "routing"?: {"backend_instance_id"?: u64,
//! "dp_rank"?: u32}}`. Every field is either sent to the worker (vLLM's name in brackets when
//! it differs) or refused with a 400 naming it — none is accepted and dropped:
//!
//! * `stop_conditions`: `max_tokens`, `stop`, `stop_token_ids` and `stop_token_ids_hidden`
//!   (together `stop_token_ids`), `min_tokens`, `ignore_eos`; `max_thinking_tokens` refused.
//!   Without `max_tokens` the worker's default applies (vLLM's completions API: 16).
//! * `sampling_options`: `temperature`, `top_p`, `top_k`, `min_p`, `presence_penalty`,
//!   `frequency_penalty`, `repetition_penalty`, `length_penalty`, `seed`,
//!   `include_stop_str_in_output`, `allowed_token_ids`, `guided_decoding` (`json`, `regex`,
//!   `choice`, `grammar`, `whitespace_pattern` → `structured_outputs`); `n` and `best_of`
//!   other than 1, `use_beam_search: true`, `detokenize: false`, `bad_words_token_ids` and
//!   `guided_decoding.backend` / `.structural_tag` refused.
//! * `output_options`: `skip_special_tokens`; `logprobs`, `prompt_logprobs` and
//!   `formatted_prompt: true` refused.
//! * `model`: sent when the worker registered no model name of its own.
//! * `worker_id` (or `routing.backend_instance_id`) pins the worker, `dp_rank` (or
//!   `routing.dp_rank`) the rank; `router_config_override` as for `best_worker_id`.
//!
//! Response: `text/event-stream`, one `data: {json}` event per worker chunk with output:
//! `{"token_ids": [u32], "text": str, "finish_reason": null | "stop" | "length" | …,
//! "usage": null | {"prompt_tokens", "completion_tokens", "total_tokens",
//! "prompt_tokens_details": {"cached_tokens"}}}`. The last chunk carries the finish reason and
//! the worker's usage; the stream then ends (no `[DONE]`). A worker failing mid-stream ends it
//! with `data: {"error": {"message", "type", "code"}}`. Headers name the serving rank
//! (`x-kvrouter-worker-id`, `x-kvrouter-dp-rank`) and the request (`x-request-id`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use kvrouter_core::{RouteError, RouterConfigOverride, WorkerWithDpRank};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::router::{route_kind, ErrorKind, Router, RouterError};
use super::Service;
use crate::error::{worker_error, ApiError};
use crate::frontend::{DP_RANK_HEADER, REQUEST_ID_HEADER, WORKER_HEADER};
use crate::routing::{Booking, RouteInput};
use crate::workers::client::{WorkerError, WorkerEvent, WorkerStream};
use crate::workers::dispatch::dispatch;

/// Output gathered before a write is handed to the connection.
const MAX_WRITE: usize = 64 * 1024;

/// The request (see the module documentation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stop_conditions: Option<StopConditions>,
    #[serde(default)]
    pub sampling_options: Option<SamplingOptions>,
    #[serde(default)]
    pub output_options: Option<OutputOptions>,
    #[serde(default)]
    pub router_config_override: Option<RouterConfigOverride>,
    /// Pin this worker.
    #[serde(default)]
    pub worker_id: Option<u64>,
    /// Only this data-parallel rank.
    #[serde(default)]
    pub dp_rank: Option<u32>,
    /// Dynamo's routing hints (the same two, under their names there).
    #[serde(default)]
    pub routing: Option<Routing>,
}

/// Dynamo's `routing` object: the worker and rank to use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub backend_instance_id: Option<u64>,
    #[serde(default)]
    pub dp_rank: Option<u32>,
}

/// Dynamo's `StopConditions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConditions {
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub stop_token_ids_hidden: Option<Vec<u32>>,
    #[serde(default)]
    pub min_tokens: Option<u32>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub max_thinking_tokens: Option<u32>,
}

/// Dynamo's `SamplingOptions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingOptions {
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub use_beam_search: Option<bool>,
    #[serde(default)]
    pub length_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    #[serde(default)]
    pub guided_decoding: Option<GuidedDecoding>,
    #[serde(default)]
    pub detokenize: Option<bool>,
    #[serde(default)]
    pub allowed_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub bad_words_token_ids: Option<Value>,
}

/// Dynamo's `GuidedDecodingOptions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidedDecoding {
    #[serde(default)]
    pub json: Option<Value>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub choice: Option<Vec<String>>,
    #[serde(default)]
    pub grammar: Option<String>,
    #[serde(default)]
    pub whitespace_pattern: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub structural_tag: Option<Value>,
}

/// Dynamo's `OutputOptions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputOptions {
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub prompt_logprobs: Option<u32>,
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    #[serde(default)]
    pub formatted_prompt: Option<bool>,
}

/// 400 naming `field` and why it cannot be honoured.
fn refused(field: &'static str, why: &str) -> ApiError {
    ApiError::bad_request(format!("`{field}` is not supported: {why}")).param(field)
}

/// Put `v` under `key` when given.
fn put<T: Serialize>(m: &mut Map<String, Value>, key: &str, v: &Option<T>) {
    if let Some(v) = v {
        m.insert(
            key.to_string(),
            serde_json::to_value(v).unwrap_or(Value::Null),
        );
    }
}

impl super::token_ids::WithTokenIds for GenerateRequest {
    fn token_ids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.token_ids
    }
}

impl GenerateRequest {
    /// What routing needs of it: the prompt, pinning and overrides.
    pub fn route_input(&self) -> RouteInput<'_> {
        let routing = self.routing.as_ref();
        RouteInput {
            tokens: &self.token_ids,
            pinned_worker: self
                .worker_id
                .or(routing.and_then(|r| r.backend_instance_id)),
            dp_rank: self.dp_rank.or(routing.and_then(|r| r.dp_rank)),
            overrides: self.router_config_override.clone(),
            ..Default::default()
        }
    }

    /// The fields of the worker request besides model and prompt, in vLLM's names. Errors: a
    /// 400 naming a field that cannot be honoured.
    pub fn worker_fields(&self) -> Result<Map<String, Value>, ApiError> {
        let mut m = Map::new();
        let stop = self.stop_conditions.as_ref();
        if let Some(s) = stop {
            if s.max_thinking_tokens.is_some() {
                return Err(refused(
                    "stop_conditions.max_thinking_tokens",
                    "no thinking budget is sent to workers",
                ));
            }
            put(&mut m, "max_tokens", &s.max_tokens);
            put(&mut m, "stop", &s.stop);
            let ids: Vec<u32> = [&s.stop_token_ids, &s.stop_token_ids_hidden]
                .into_iter()
                .flatten()
                .flatten()
                .copied()
                .collect();
            if !ids.is_empty() {
                m.insert("stop_token_ids".into(), ids.into());
            }
            put(&mut m, "min_tokens", &s.min_tokens);
            put(&mut m, "ignore_eos", &s.ignore_eos);
        }
        if let Some(s) = &self.sampling_options {
            if s.n.is_some_and(|n| n != 1) {
                return Err(refused("sampling_options.n", "one sequence per request"));
            }
            if s.best_of.is_some_and(|n| n != 1) {
                return Err(refused(
                    "sampling_options.best_of",
                    "one sequence per request",
                ));
            }
            if s.use_beam_search == Some(true) {
                return Err(refused(
                    "sampling_options.use_beam_search",
                    "no beam search",
                ));
            }
            if s.detokenize == Some(false) {
                return Err(refused(
                    "sampling_options.detokenize",
                    "workers always detokenize",
                ));
            }
            if s.bad_words_token_ids.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(refused(
                    "sampling_options.bad_words_token_ids",
                    "workers take bad words as text",
                ));
            }
            for (k, v) in [
                ("presence_penalty", &s.presence_penalty),
                ("frequency_penalty", &s.frequency_penalty),
                ("repetition_penalty", &s.repetition_penalty),
                ("temperature", &s.temperature),
                ("top_p", &s.top_p),
                ("min_p", &s.min_p),
                ("length_penalty", &s.length_penalty),
            ] {
                put(&mut m, k, v);
            }
            put(&mut m, "top_k", &s.top_k);
            put(&mut m, "seed", &s.seed);
            put(
                &mut m,
                "include_stop_str_in_output",
                &s.include_stop_str_in_output,
            );
            put(&mut m, "allowed_token_ids", &s.allowed_token_ids);
            if let Some(g) = &s.guided_decoding {
                if g.backend.is_some() {
                    return Err(refused(
                        "sampling_options.guided_decoding.backend",
                        "the worker chooses its backend",
                    ));
                }
                if g.structural_tag.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(refused(
                        "sampling_options.guided_decoding.structural_tag",
                        "structural tags are not sent to workers",
                    ));
                }
                let mut so = Map::new();
                put(&mut so, "json", &g.json);
                put(&mut so, "regex", &g.regex);
                put(&mut so, "choice", &g.choice);
                put(&mut so, "grammar", &g.grammar);
                put(&mut so, "whitespace_pattern", &g.whitespace_pattern);
                if !so.is_empty() {
                    m.insert("structured_outputs".into(), so.into());
                }
            }
        }
        if let Some(o) = &self.output_options {
            if o.logprobs.is_some() {
                return Err(refused("output_options.logprobs", "no logprobs in chunks"));
            }
            if o.prompt_logprobs.is_some() {
                return Err(refused(
                    "output_options.prompt_logprobs",
                    "no prompt logprobs",
                ));
            }
            if o.formatted_prompt == Some(true) {
                return Err(refused(
                    "output_options.formatted_prompt",
                    "the prompt is token ids",
                ));
            }
            put(&mut m, "skip_special_tokens", &o.skip_special_tokens);
        }
        Ok(m)
    }
}

/// The worker's `/v1/completions` request.
#[derive(Serialize)]
struct WorkerBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    prompt: &'a [u32],
    stream: bool,
    stream_options: StreamOptions,
    return_token_ids: bool,
    #[serde(flatten)]
    fields: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// Route `req`, book it and start it on the chosen worker ([`super::Router::generate`]).
pub(super) async fn start(
    router: &Arc<Router>,
    req: GenerateRequest,
) -> Result<Generation, RouterError> {
    super::api::non_empty(&req.token_ids).map_err(RouterError::invalid)?;
    let fields = req.worker_fields().map_err(RouterError::invalid)?;
    let request_id = router.next_request_id();
    let worker_body = |worker_model: Option<&str>| {
        let b = WorkerBody {
            model: worker_model.or(req.model.as_deref()),
            prompt: &req.token_ids,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            return_token_ids: true,
            fields: &fields,
        };
        serde_json::to_vec(&b).unwrap_or_default()
    };
    let input = req.route_input();
    // The kind of a routing failure, which `dispatch` turns into its HTTP answer.
    let route_failure = OnceLock::new();
    let route_err = |e: RouteError| {
        let _ = route_failure.set(route_kind(&e));
        RouterError::routing(e).api
    };
    let fleet = router.fleet();
    let (booking, worker) = dispatch(
        fleet,
        router.client(),
        &input,
        worker_body,
        route_err,
        &request_id,
    )
    .await
    .map_err(|api| match route_failure.get() {
        Some(&kind) => RouterError::new(kind, api),
        None => RouterError::worker(api),
    })?;
    Ok(Generation {
        router: router.clone(),
        booking,
        worker,
        request_id,
        held: None,
        first_token: false,
        done: false,
        ready: VecDeque::new(),
    })
}

/// The HTTP handler: parse, generate, stream back as server-sent events.
pub(super) async fn generate(s: Arc<Service>, body: Body) -> Result<Response, RouterError> {
    let bytes = s.read_body(body).await?;
    let req: GenerateRequest = super::token_ids::parse(&bytes)?;
    let generation = s.router.generate(req).await?;
    let rank = generation.worker();
    let request_id = generation.request_id().to_string();
    let stream = SseBody {
        generation,
        done: false,
        out: BytesMut::new(),
    };
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    let h = resp.headers_mut();
    h.insert(WORKER_HEADER, HeaderValue::from(rank.worker_id));
    h.insert(DP_RANK_HEADER, HeaderValue::from(rank.dp_rank));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    Ok(resp)
}

/// One chunk of a generation's output (one SSE event of the router API):
/// `{"token_ids": [u32], "text": str, "finish_reason": null | str, "usage": null | {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateChunk {
    /// The new token ids, as the worker's JSON array of `u32` (`[]` when the chunk has none:
    /// the usage-only chunk, or a worker that returns no ids). [`token_ids`](Self::token_ids)
    /// parses it.
    #[serde(serialize_with = "ids_or_empty")]
    pub token_ids: Option<Box<RawValue>>,
    /// The new text (empty when the worker gives none).
    pub text: String,
    /// `stop`, `length`, … on the last chunk.
    pub finish_reason: Option<String>,
    /// The worker's usage object on the last chunk (`prompt_tokens`, `completion_tokens`,
    /// `total_tokens`, `prompt_tokens_details.cached_tokens`), as the worker sent it.
    pub usage: Option<Box<RawValue>>,
}

fn ids_or_empty<S: serde::Serializer>(v: &Option<Box<RawValue>>, s: S) -> Result<S::Ok, S::Error> {
    v.as_deref().unwrap_or(no_ids()).serialize(s)
}

impl GenerateChunk {
    /// The token ids as numbers. Errors: the worker sent something other than an array of
    /// `u32`.
    pub fn token_ids(&self) -> Result<Vec<u32>, serde_json::Error> {
        match &self.token_ids {
            Some(raw) => serde_json::from_str(raw.get()),
            None => Ok(Vec::new()),
        }
    }
}

/// The chunk with the finish reason, held until the worker's usage event that follows it.
struct Held {
    token_ids: Option<Box<RawValue>>,
    text: String,
    finish_reason: String,
}

fn no_ids() -> &'static RawValue {
    static EMPTY: OnceLock<Box<RawValue>> = OnceLock::new();
    EMPTY.get_or_init(|| RawValue::from_string("[]".into()).expect("valid JSON"))
}

/// A generation in flight: a stream of [`GenerateChunk`]s, then, if the worker fails
/// mid-way, one [`RouterError`] ([`ErrorKind::WorkerFailed`](super::ErrorKind) or the
/// worker's own), then the end. Marks prefill complete at the first output; frees the
/// booking at the end, on failure, or when dropped (a client that goes away).
pub struct Generation {
    router: Arc<Router>,
    booking: Booking,
    worker: WorkerStream,
    request_id: String,
    held: Option<Held>,
    first_token: bool,
    done: bool,
    /// Chunks (and the final error) made from worker events, not yet yielded.
    ready: VecDeque<Result<GenerateChunk, RouterError>>,
}

impl Generation {
    /// The rank serving it.
    pub fn worker(&self) -> WorkerWithDpRank {
        self.booking.worker()
    }

    /// Its id (logs and error messages, `x-request-id`).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Queue the held chunk, with `usage` when given.
    fn flush_held(&mut self, usage: Option<&RawValue>) {
        if let Some(h) = self.held.take() {
            self.ready.push_back(Ok(GenerateChunk {
                token_ids: h.token_ids,
                text: h.text,
                finish_reason: Some(h.finish_reason),
                usage: usage.map(ToOwned::to_owned),
            }));
        }
    }

    /// One worker event. Errors: the worker's error event, or a malformed one.
    fn on_event(&mut self, payload: &[u8]) -> Result<(), WorkerError> {
        let url = || self.worker.url().to_string();
        let ev = match WorkerEvent::parse(payload) {
            Ok(Ok(ev)) => ev,
            Ok(Err(message)) => {
                return Err(WorkerError::Status {
                    url: url(),
                    status: 500,
                    message,
                })
            }
            Err(e) => {
                return Err(WorkerError::Protocol {
                    url: url(),
                    message: format!("bad JSON in event: {e}"),
                })
            }
        };
        if ev.has_output() && !std::mem::replace(&mut self.first_token, true) {
            self.booking.first_token();
        }
        if ev.has_output() || ev.finish_reason.is_some() {
            // Anything after a finish reason is unexpected with one sequence: keep the order.
            self.flush_held(None);
        }
        if let Some(f) = &ev.finish_reason {
            self.held = Some(Held {
                token_ids: ev.token_ids.map(ToOwned::to_owned),
                text: ev.text.to_string(),
                finish_reason: f.to_string(),
            });
        } else if ev.has_output() {
            self.ready.push_back(Ok(GenerateChunk {
                token_ids: ev.token_ids.map(ToOwned::to_owned),
                text: ev.text.into_owned(),
                finish_reason: None,
                usage: None,
            }));
        }
        if let Some(u) = ev.usage {
            if self.held.is_some() {
                self.flush_held(Some(u));
            } else {
                self.ready.push_back(Ok(GenerateChunk {
                    token_ids: None,
                    text: String::new(),
                    finish_reason: None,
                    usage: Some(u.to_owned()),
                }));
            }
        }
        Ok(())
    }

    /// The worker's stream ended well.
    fn finish(&mut self) {
        self.flush_held(None);
        self.booking.free();
        self.done = true;
    }

    /// The worker failed: an error ends the stream; a worker gone is suspect.
    fn fail(&mut self, e: &WorkerError) {
        self.flush_held(None);
        self.booking.free();
        let worker = self.booking.worker().worker_id;
        if e.worker_gone() {
            self.router.fleet().suspect(worker, &e.to_string());
        }
        let api = worker_error(e, &self.request_id, worker);
        self.ready
            .push_back(Err(RouterError::new(ErrorKind::WorkerFailed, api)));
        self.done = true;
    }
}

impl Stream for Generation {
    type Item = Result<GenerateChunk, RouterError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let g = &mut *self;
        loop {
            if let Some(item) = g.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            if g.done {
                return Poll::Ready(None);
            }
            match g.worker.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(payload))) => {
                    if let Err(e) = g.on_event(&payload) {
                        g.fail(&e);
                    }
                }
                // A body cut after the finish reason still delivered the whole answer.
                Poll::Ready(Some(Err(WorkerError::Truncated { .. }))) if g.held.is_some() => {
                    g.finish()
                }
                Poll::Ready(Some(Err(e))) => g.fail(&e),
                Poll::Ready(None) => g.finish(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A generation as the router API's response body: `data: {chunk}` events, an error as
/// `data: {"error": {...}}`, gathered up to [`MAX_WRITE`] bytes per write.
struct SseBody {
    generation: Generation,
    done: bool,
    out: BytesMut,
}

impl SseBody {
    fn event(&mut self, value: &impl Serialize) {
        self.out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(bytes::BufMut::writer(&mut self.out), value);
        self.out.extend_from_slice(b"\n\n");
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let b = &mut *self;
        while !b.done && b.out.len() < MAX_WRITE {
            match b.generation.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => b.event(&chunk),
                Poll::Ready(Some(Err(e))) => b.event(&e.api.body()),
                Poll::Ready(None) => b.done = true,
                Poll::Pending => break,
            }
        }
        if !b.out.is_empty() {
            return Poll::Ready(Some(Ok(b.out.split().freeze())));
        }
        if b.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> GenerateRequest {
        super::super::token_ids::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn dynamo_fields_map_to_the_workers_names() {
        let r = req(r#"{"token_ids": [1, 2], "model": "m",
            "stop_conditions": {"max_tokens": 8, "stop": ["x"], "stop_token_ids": [5],
                                "stop_token_ids_hidden": [6], "min_tokens": 1, "ignore_eos": true},
            "sampling_options": {"temperature": 0.7, "top_k": 5, "seed": 3, "n": 1,
                                 "guided_decoding": {"regex": "a+"}},
            "output_options": {"skip_special_tokens": false},
            "routing": {"backend_instance_id": 4, "dp_rank": 1}}"#);
        let m = Value::Object(r.worker_fields().unwrap());
        assert_eq!(
            m,
            serde_json::json!({"max_tokens": 8, "stop": ["x"], "stop_token_ids": [5, 6],
                "min_tokens": 1, "ignore_eos": true, "temperature": 0.7, "top_k": 5, "seed": 3,
                "structured_outputs": {"regex": "a+"}, "skip_special_tokens": false})
        );
        let input = r.route_input();
        assert_eq!((input.pinned_worker, input.dp_rank), (Some(4), Some(1)));
        let top =
            req(r#"{"token_ids": [1], "worker_id": 9, "dp_rank": 2, "routing": {"dp_rank": 0}}"#);
        let input = top.route_input();
        assert_eq!((input.pinned_worker, input.dp_rank), (Some(9), Some(2)));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (body, field) in [
            (r#"{"sampling_options": {"n": 2}}"#, "sampling_options.n"),
            (
                r#"{"sampling_options": {"use_beam_search": true}}"#,
                "use_beam_search",
            ),
            (
                r#"{"output_options": {"logprobs": 1}}"#,
                "output_options.logprobs",
            ),
            (
                r#"{"stop_conditions": {"max_thinking_tokens": 5}}"#,
                "max_thinking_tokens",
            ),
            (
                r#"{"sampling_options": {"guided_decoding": {"backend": "xgrammar"}}}"#,
                "guided_decoding.backend",
            ),
        ] {
            let mut v: Value = serde_json::from_str(body).unwrap();
            v["token_ids"] = serde_json::json!([1]);
            let r = req(&v.to_string());
            let e = r.worker_fields().unwrap_err();
            assert!(e.message.contains(field), "{field}: {}", e.message);
        }
        let parse = |b: &str| super::super::token_ids::parse::<GenerateRequest>(b.as_bytes());
        let e = parse(r#"{"token_ids": [1], "prompt": "x"}"#).unwrap_err();
        assert!(
            e.message.contains("unknown field `prompt`"),
            "{}",
            e.message
        );
        let e = parse(r#"{"token_ids": [1], "sampling_options": {"temprature": 1}}"#).unwrap_err();
        assert!(e.message.contains("temprature"), "{}", e.message);
    }
}
