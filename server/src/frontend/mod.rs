//! The OpenAI-compatible HTTP API, following one request forward: read the body, parse and
//! tokenize ([`openai`](crate::openai)), route and book ([`routing`](crate::routing)), call the
//! worker ([`worker_client`](crate::worker_client)), and stream its tokens back as OpenAI
//! chunks — marking prefill complete at the first token and freeing the booking at the end,
//! on error, or when the client goes away (the response stream owns the [`Booking`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use kvrouter_core::{RouteError, SelectError};
use kvrouter_preprocess::Preprocessor;
use serde_json::{json, Value};

use crate::fleet::Fleet;
use crate::metrics::{Metrics, RankSnapshot, RequestLabels, Snapshot};
use crate::openai::{parse_request, usage, ApiError, Endpoint, Limits, ParsedRequest, Shape};
use crate::routing::{Booking, RouteInput};
use crate::worker_client::{WorkerChunk, WorkerClient, WorkerError};

/// Attempts per request when the chosen worker turns out unreachable before streaming.
const MAX_ATTEMPTS: usize = 3;

/// What every handler shares.
pub struct AppState {
    pub model_name: String,
    pub pre: Arc<Preprocessor>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    pub fleet: Arc<Fleet>,
    pub client: WorkerClient,
    pub metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        model_name: String,
        pre: Arc<Preprocessor>,
        limits: Limits,
        max_body_bytes: usize,
        fleet: Arc<Fleet>,
        client: WorkerClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model_name,
            pre,
            limits,
            max_body_bytes,
            fleet,
            client,
            metrics,
            next_id: AtomicU64::new(1),
        }
    }
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", "no such route")
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.model_name, "object": "model", "created": 0, "owned_by": "kvrouter",
                  "max_model_len": s.limits.context_length}],
    }))
    .into_response()
}

fn healthy_workers(s: &AppState) -> (usize, usize) {
    let all = s.fleet.registry.all();
    (all.iter().filter(|w| w.is_healthy()).count(), all.len())
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let (up, total) = healthy_workers(&s);
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if up > 0 { "healthy" } else { "unhealthy" },
        "model": s.model_name,
        "healthy_workers": up,
        "workers": total,
    });
    (status, axum::Json(body)).into_response()
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if healthy_workers(&s).0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let loads = s.fleet.router.ranks();
    let mut snap = Snapshot {
        index_entries: s.fleet.router.index().current_size() as u64,
        ..Default::default()
    };
    for w in s.fleet.registry.all() {
        let stats = w.event_stats();
        for rank in w.spec.ranks() {
            let load = loads
                .iter()
                .find(|(i, _)| i.worker == rank)
                .map(|(_, l)| *l)
                .unwrap_or_default();
            let events = stats
                .iter()
                .find(|(r, _)| *r == rank)
                .map(|(_, st)| {
                    vec![
                        ("received", st.received),
                        ("applied", st.events_out),
                        ("dropped", st.dropped + st.filtered),
                        ("gaps", st.gaps),
                        ("recovered", st.recovered),
                        ("cleared", st.cleared),
                        ("bad_frames", st.bad_frames),
                        ("decode_errors", st.decode_errors),
                    ]
                })
                .unwrap_or_default();
            snap.ranks.push(RankSnapshot {
                worker_id: rank.worker_id,
                dp_rank: rank.dp_rank,
                healthy: w.is_healthy(),
                active_decode_blocks: load.active_decode_blocks,
                active_prefill_tokens: load.active_prefill_tokens,
                active_requests: load.active_requests as u64,
                events,
            });
        }
    }
    let text = s.metrics.render(snap);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    serve(s, Endpoint::Completions, body).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    serve(s, Endpoint::ChatCompletions, body).await
}

/// Counts a request in the metrics once, whichever way it ends; a request dropped before it
/// ended is a cancelled one (the client went away).
struct Tracker {
    metrics: Arc<Metrics>,
    model: String,
    endpoint: Endpoint,
    start: Instant,
    done: bool,
}

impl Tracker {
    fn new(metrics: Arc<Metrics>, model: &str, endpoint: Endpoint) -> Self {
        metrics.inflight.inc();
        Self {
            metrics,
            model: model.to_string(),
            endpoint,
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, status: &'static str, error_type: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics.inflight.dec();
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                model: self.model.clone(),
                endpoint: self.endpoint.label(),
                status,
                error_type,
            })
            .inc();
    }

    fn fail(&mut self, e: &ApiError) {
        self.finish("error", e.metric_type());
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.disconnected.inc();
            self.finish("cancelled", "cancelled");
        }
    }
}

fn route_error(e: RouteError) -> ApiError {
    let unavailable =
        |m: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", m);
    match e {
        RouteError::Select(SelectError::AllWorkersBusy(n)) => unavailable(format!(
            "all {n} eligible workers are busy (load above the configured busy thresholds); retry later"
        )),
        RouteError::Select(SelectError::PinnedWorkerBusy(w)) => {
            unavailable(format!("worker {w} is busy (load above the configured busy thresholds); retry later"))
        }
        RouteError::Select(SelectError::NoWorkers) => unavailable("no healthy worker is available".into()),
        RouteError::Select(SelectError::PinnedWorkerNotFound(w)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("worker {w} (nvext.backend_instance_id) is not in the routing set"),
        ),
        RouteError::Select(e @ (SelectError::MissingPinnedWorker | SelectError::InvalidOverride(_))) => {
            ApiError::bad_request(e.to_string())
        }
        RouteError::Select(e @ SelectError::NoWorkerWithRank(_)) => unavailable(e.to_string()),
        RouteError::Booking(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string()),
    }
}

fn worker_error(e: &WorkerError) -> ApiError {
    match e {
        WorkerError::Status {
            status, message, ..
        } if (400..500).contains(status) && *status != 429 => ApiError::new(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            message.clone(),
        ),
        WorkerError::Status {
            status: 429 | 503, ..
        } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            e.to_string(),
        ),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "worker_error", e.to_string()),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WorkerChunk, WorkerError>> + Send>>;

async fn serve(s: Arc<AppState>, endpoint: Endpoint, body: Body) -> Response {
    let mut tracker = Tracker::new(s.metrics.clone(), &s.model_name, endpoint);
    let bytes = match axum::body::to_bytes(body, s.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|src| src.is::<http_body_util::LengthLimitError>());
            let err = if too_big {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("request body exceeds {} bytes", s.max_body_bytes),
                )
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            };
            tracker.fail(&err);
            return err.into_response();
        }
    };
    let t = Instant::now();
    let req = match parse_request(endpoint, &bytes, &s.model_name, &s.pre, s.limits) {
        Ok(r) => r,
        Err(e) => {
            tracker.fail(&e);
            return e.into_response();
        }
    };
    s.metrics.tokenize.observe(t.elapsed().as_secs_f64());
    let (booking, chunks) = match dispatch(&s, &req).await {
        Ok(x) => x,
        Err(e) => {
            tracker.fail(&e);
            return e.into_response();
        }
    };
    let rank = booking.worker();
    let shape = Shape::new(
        endpoint,
        &s.model_name,
        s.next_id.fetch_add(1, Ordering::Relaxed),
    );
    let flow = Flow {
        state: s.clone(),
        shape,
        include_usage: req.include_usage,
        prompt_tokens: req.tokens.len(),
        booking,
        tracker,
        chunks,
        completion_tokens: 0,
        usage: None,
        finish: None,
        last_token: None,
        role_sent: false,
        done: false,
    };
    let mut resp = if req.stream {
        let body = Body::from_stream(flow.into_sse());
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    } else {
        flow.collect().await
    };
    // Which rank served it: for operators and tests (not part of the OpenAI API).
    let h = resp.headers_mut();
    h.insert(WORKER_HEADER, HeaderValue::from(rank.worker_id));
    h.insert(DP_RANK_HEADER, HeaderValue::from(rank.dp_rank));
    resp
}

/// Response header naming the worker that served the request.
pub const WORKER_HEADER: &str = "x-kvrouter-worker-id";
/// Response header naming the data-parallel rank that served the request.
pub const DP_RANK_HEADER: &str = "x-kvrouter-dp-rank";

/// Route the request and start it on the chosen worker; a worker found unreachable leaves
/// the routing set and the request is routed again.
async fn dispatch(
    s: &Arc<AppState>,
    req: &ParsedRequest,
) -> Result<(Booking, ChunkStream), ApiError> {
    let mut last = None;
    for _ in 0..MAX_ATTEMPTS {
        let booking = s
            .fleet
            .router
            .route(&RouteInput {
                tokens: &req.tokens,
                pinned_worker: req.backend_instance_id,
                dp_rank: req.dp_rank,
                overrides: req.overrides.clone(),
                lora_name: None,
                cache_salt: req.cache_salt.as_deref(),
            })
            .map_err(route_error)?;
        let rank = booking.worker();
        let Some(worker) = s.fleet.registry.get(rank.worker_id) else {
            // Deregistered between routing and here.
            continue;
        };
        let model = worker.spec.model.as_deref().unwrap_or(&s.model_name);
        match s
            .client
            .generate(&worker.spec.url, rank.dp_rank, req.worker_body(model))
            .await
        {
            Ok(stream) => return Ok((booking, Box::pin(stream))),
            Err(e) if e.worker_gone() => {
                s.fleet.mark_failed(rank.worker_id, &e.to_string());
                last = Some(e);
            }
            Err(e) => return Err(worker_error(&e)),
        }
    }
    Err(match last {
        Some(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("no worker could take the request: {e}"),
        ),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no healthy worker is available",
        ),
    })
}

/// One request in flight, from the worker's first chunk to the client's last byte.
struct Flow {
    state: Arc<AppState>,
    shape: Shape,
    include_usage: bool,
    prompt_tokens: usize,
    booking: Booking,
    tracker: Tracker,
    chunks: ChunkStream,
    completion_tokens: usize,
    usage: Option<Value>,
    finish: Option<String>,
    last_token: Option<Instant>,
    role_sent: bool,
    done: bool,
}

fn sse(v: &Value) -> Bytes {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut b, v);
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

impl Flow {
    /// Account for a content chunk: first token, TTFT / ITL, token count.
    fn on_output(&mut self, c: &WorkerChunk) {
        let now = Instant::now();
        match self.last_token {
            None => {
                self.booking.first_token();
                self.state
                    .metrics
                    .ttft
                    .observe((now - self.tracker.start).as_secs_f64());
            }
            Some(prev) => self.state.metrics.itl.observe((now - prev).as_secs_f64()),
        }
        self.last_token = Some(now);
        self.completion_tokens += c.token_ids.len().max(1);
    }

    /// The request ended well: book-keeping and the final usage.
    fn succeed(&mut self) -> Value {
        self.booking.free();
        let u = usage(
            self.usage.as_ref(),
            self.prompt_tokens,
            self.completion_tokens,
        );
        let m = &self.state.metrics;
        m.input_tokens
            .inc_by(u["prompt_tokens"].as_u64().unwrap_or(0));
        m.output_tokens
            .inc_by(u["completion_tokens"].as_u64().unwrap_or(0));
        m.cached_tokens.inc_by(
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
        );
        self.tracker.finish("success", "");
        u
    }

    fn fail(&mut self, e: &WorkerError) -> ApiError {
        self.booking.free();
        if e.worker_gone() {
            self.state
                .fleet
                .mark_failed(self.booking.worker().worker_id, &e.to_string());
        }
        let err = worker_error(e);
        self.tracker.fail(&err);
        err
    }

    /// The response as server-sent events.
    fn into_sse(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures::stream::unfold(self, |mut f| async move {
            loop {
                if f.done {
                    return None;
                }
                match f.chunks.next().await {
                    Some(Ok(c)) => {
                        if c.usage.is_some() {
                            f.usage = c.usage.clone();
                        }
                        if c.has_output() || c.finish_reason.is_some() {
                            if c.has_output() {
                                f.on_output(&c);
                            }
                            if c.finish_reason.is_some() {
                                f.finish = c.finish_reason.clone();
                            }
                            let role = !std::mem::replace(&mut f.role_sent, true);
                            let v = f.shape.chunk(&c.text, c.finish_reason.as_deref(), role);
                            return Some((Ok(sse(&v)), f));
                        }
                    }
                    Some(Err(e)) => {
                        let err = f.fail(&e);
                        f.done = true;
                        let mut b = sse(&err.body()).to_vec();
                        b.extend_from_slice(b"data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(b)), f));
                    }
                    None => {
                        let u = f.succeed();
                        f.done = true;
                        let mut b = Vec::new();
                        if f.include_usage {
                            b.extend_from_slice(&sse(&f.shape.usage_chunk(u)));
                        }
                        b.extend_from_slice(b"data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(b)), f));
                    }
                }
            }
        })
    }

    /// The whole response as one JSON body.
    async fn collect(mut self) -> Response {
        let mut text = String::new();
        while let Some(c) = self.chunks.next().await {
            match c {
                Ok(c) => {
                    if c.usage.is_some() {
                        self.usage = c.usage.clone();
                    }
                    if c.has_output() {
                        self.on_output(&c);
                        text.push_str(&c.text);
                    }
                    if c.finish_reason.is_some() {
                        self.finish = c.finish_reason.clone();
                    }
                }
                Err(e) => return self.fail(&e).into_response(),
            }
        }
        let u = self.succeed();
        axum::Json(self.shape.response(&text, self.finish.as_deref(), u)).into_response()
    }
}
