//! One request in flight, from the worker's first chunk to the client's last byte
//! ([`Flow`]): OpenAI chunks as server-sent events, or one JSON body; prefill marked complete
//! at the first token; the booking freed and the request counted once, however it ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::request::Endpoint;
use super::response::{usage, Shape};
use super::AppState;
use crate::error::{worker_error, ApiError};
use crate::metrics::{Metrics, RequestLabels};
use crate::routing::Booking;
use crate::workers::client::{WorkerChunk, WorkerError};

/// The worker's parsed chunks.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<WorkerChunk, WorkerError>> + Send>>;

/// Counts a request in the metrics once, whichever way it ends; a request dropped before it
/// ended is a cancelled one (the client went away). Created once the body has arrived, so a
/// request whose body never comes is not in flight.
pub struct Tracker {
    metrics: Arc<Metrics>,
    model: String,
    endpoint: Endpoint,
    /// When the request's body had arrived (TTFT and duration count from here).
    pub start: Instant,
    done: bool,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, model: &str, endpoint: Endpoint) -> Self {
        metrics.inflight.inc();
        Self {
            metrics,
            model: model.to_string(),
            endpoint,
            start: Instant::now(),
            done: false,
        }
    }

    pub fn finish(&mut self, status: &'static str, error_type: &'static str) {
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

    pub fn fail(&mut self, e: &ApiError) {
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

/// One request in flight.
pub struct Flow {
    pub state: Arc<AppState>,
    pub shape: Shape,
    pub include_usage: bool,
    pub prompt_tokens: usize,
    pub booking: Booking,
    pub tracker: Tracker,
    pub chunks: ChunkStream,
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
    pub fn new(
        state: Arc<AppState>,
        shape: Shape,
        include_usage: bool,
        prompt_tokens: usize,
        booking: Booking,
        tracker: Tracker,
        chunks: ChunkStream,
    ) -> Self {
        Self {
            state,
            shape,
            include_usage,
            prompt_tokens,
            booking,
            tracker,
            chunks,
            completion_tokens: 0,
            usage: None,
            finish: None,
            last_token: None,
            role_sent: false,
            done: false,
        }
    }

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

    /// The worker failed mid-request: free, maybe suspect the worker, count, shape the error.
    fn fail(&mut self, e: &WorkerError) -> ApiError {
        self.booking.free();
        let worker = self.booking.worker().worker_id;
        if e.worker_gone() {
            self.state.fleet.suspect(worker, &e.to_string());
        }
        let err = worker_error(e, &self.shape.id, worker);
        self.tracker.fail(&err);
        err
    }

    /// The response as server-sent events.
    pub fn into_sse(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
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
    pub async fn collect(mut self) -> Response {
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
