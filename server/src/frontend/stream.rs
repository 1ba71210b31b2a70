//! One request in flight, from the worker's first event to the client's last byte
//! ([`Flow`]): OpenAI chunks as server-sent events, or one JSON body; prefill marked complete
//! at the first token; the booking freed and the request counted once, however it ends.
//!
//! Per token the path is: SSE decode (a slice of the worker's bytes), an in-place parse
//! ([`WorkerEvent`]), one chunk written into the output buffer. Every event the worker has
//! already delivered when the client's body is polled goes into the same write.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::choice::{Choice, OutputOptions};
use super::lease::Lease;
use super::request::Endpoint;
use super::response::{usage, Shape};
use super::AppState;
use crate::error::{worker_error, ApiError};
use crate::metrics::{Metrics, RequestLabels};
use crate::workers::accuracy::Sample;
use crate::workers::client::{WorkerError, WorkerEvent, WorkerStream};

/// Output bytes gathered before a write is handed to the connection.
const MAX_WRITE: usize = 64 * 1024;

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
    state: Arc<AppState>,
    shape: Shape,
    prompt_tokens: usize,
    booking: Lease,
    tracker: Tracker,
    worker: WorkerStream,
    completion_tokens: usize,
    usage: Option<Value>,
    /// The request's choices (`n`), by index.
    choices: Vec<Choice>,
    opts: OutputOptions,
    last_token: Option<Instant>,
    done: bool,
    out: BytesMut,
    /// Whether the prediction is compared with the engine's report at the end (not for a
    /// disaggregated request: its decode worker's hits are the transferred KV).
    compare: bool,
}

/// What one worker event did to the request.
enum Step {
    Continue,
    Failed(WorkerError),
}

impl Flow {
    pub fn new(
        state: Arc<AppState>,
        shape: Shape,
        prompt_tokens: usize,
        booking: Lease,
        tracker: Tracker,
        worker: WorkerStream,
        opts: OutputOptions,
    ) -> Self {
        Self {
            state,
            shape,
            prompt_tokens,
            booking,
            tracker,
            worker,
            completion_tokens: 0,
            usage: None,
            choices: (0..opts.n.max(1)).map(|i| Choice::new(i, &opts)).collect(),
            opts,
            last_token: None,
            done: false,
            out: BytesMut::new(),
            compare: true,
        }
    }

    /// Do not compare the prediction with the engine's report.
    pub fn without_accuracy(mut self) -> Self {
        self.compare = false;
        self
    }

    /// Compare the cached tokens the router predicted with those the engine reported, when
    /// this router chose the worker and the engine reported a count
    /// ([`crate::workers::accuracy`]).
    fn compare_accuracy(&self) {
        if !self.compare {
            return;
        }
        let Some(predicted) = self.booking.predicted_cached_tokens() else {
            return;
        };
        let Some(reported) = self
            .usage
            .as_ref()
            .and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens"))
            .and_then(Value::as_u64)
        else {
            return;
        };
        let id = self.booking.worker().worker_id;
        let Some(w) = self.state.fleet.registry.get(id) else {
            return;
        };
        let sample = Sample::new(predicted as u64, reported, self.prompt_tokens as u64);
        let bs = w.spec.block_size.unwrap_or(0);
        self.state.metrics.accuracy.record(id, &sample, bs);
        w.record_accuracy(sample);
    }

    /// Account for an event with output: first token, TTFT / ITL, token count.
    fn on_output(&mut self, tokens: usize) {
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
        self.completion_tokens += tokens.max(1);
    }

    /// Read one worker event: streamed, written as a chunk; `whole`, kept for the response.
    fn on_event(&mut self, payload: &[u8], whole: bool) -> Step {
        let ev = match WorkerEvent::parse(payload) {
            Ok(Ok(ev)) => ev,
            Ok(Err(message)) => {
                return Step::Failed(WorkerError::Status {
                    url: self.worker.url().to_string(),
                    status: 500,
                    message,
                })
            }
            Err(e) => {
                return Step::Failed(WorkerError::Protocol {
                    url: self.worker.url().to_string(),
                    message: format!("bad JSON in event: {e}"),
                })
            }
        };
        if let Some(u) = ev.usage {
            self.usage = serde_json::from_str(u.get()).ok();
        }
        if ev.has_output() {
            self.on_output(ev.tokens);
        }
        if !(ev.has_output() || ev.finish_reason.is_some() || ev.logprobs.is_some()) {
            return Step::Continue;
        }
        let Some(ch) = self.choices.get_mut(ev.index as usize) else {
            return Step::Failed(WorkerError::Protocol {
                url: self.worker.url().to_string(),
                message: format!("event for choice {} of {}", ev.index, self.choices.len()),
            });
        };
        if let Some(f) = &ev.finish_reason {
            ch.finish = Some(f.to_string());
        }
        if self.opts.plain() {
            // The fast path: text straight through.
            if whole {
                ch.content.push_str(&ev.text);
            } else {
                let role = !std::mem::replace(&mut ch.role_sent, true);
                self.shape.write_chunk(
                    &mut self.out,
                    ch.index,
                    &ev.text,
                    ev.finish_reason.as_deref(),
                    role,
                );
            }
            return Step::Continue;
        }
        let last = ev.finish_reason.is_some();
        let d = ch.push(&ev.text, ev.logprobs.map(|l| l.get()), last);
        if !whole {
            let finish = if last { ch.finish_reason() } else { None };
            if !d.is_empty() || finish.is_some() {
                let role = !std::mem::replace(&mut ch.role_sent, true);
                let index = ch.index;
                let u = self
                    .opts
                    .continuous_usage
                    .then(|| usage(None, self.prompt_tokens, self.completion_tokens));
                self.shape
                    .write_delta(&mut self.out, index, &d, finish.as_deref(), role, u);
            }
        }
        Step::Continue
    }

    /// Choices the worker ended without a finish reason: their parsers' held text, flushed.
    fn flush_unfinished(&mut self, whole: bool) {
        if self.opts.plain() {
            return;
        }
        for ch in self.choices.iter_mut().filter(|c| c.finish.is_none()) {
            let d = ch.push("", None, true);
            if !whole && !d.is_empty() {
                let role = !std::mem::replace(&mut ch.role_sent, true);
                self.shape
                    .write_delta(&mut self.out, ch.index, &d, None, role, None);
            }
        }
    }

    /// The request ended well: book-keeping and the final usage.
    fn succeed(&mut self) -> Value {
        self.booking.free();
        self.compare_accuracy();
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
        if e.worker_gone() && self.booking.is_local() {
            self.state.fleet.suspect(worker, &e.to_string());
        }
        let err = worker_error(e, &self.shape.id, worker);
        self.tracker.fail(&err);
        err
    }

    /// Append a server-sent event of `v`.
    fn write_event(&mut self, v: &Value) {
        self.out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(bytes::BufMut::writer(&mut self.out), v);
        self.out.extend_from_slice(b"\n\n");
    }

    /// The worker's stream ended well: the usage chunk if asked for, and `[DONE]`.
    fn finish_stream(&mut self) {
        self.flush_unfinished(false);
        let u = self.succeed();
        self.done = true;
        if self.opts.include_usage {
            let chunk = self.shape.usage_chunk(u);
            self.write_event(&chunk);
        }
        self.out.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// The response as server-sent events.
    pub fn into_sse(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        SseBody(self)
    }

    /// A worker error, unless it is the end of a response that had finished.
    fn worker_failed(&self, e: WorkerError) -> Option<WorkerError> {
        match e {
            WorkerError::Truncated { .. } if self.choices.iter().all(|c| c.finish.is_some()) => {
                None
            }
            e => Some(e),
        }
    }

    /// The whole response as one JSON body.
    pub async fn collect(mut self) -> Response {
        while let Some(ev) = self.worker.next().await {
            let step = match ev {
                Ok(payload) => self.on_event(&payload, true),
                Err(e) => match self.worker_failed(e) {
                    Some(e) => Step::Failed(e),
                    None => break,
                },
            };
            if let Step::Failed(e) = step {
                return self.fail(&e).into_response();
            }
        }
        self.flush_unfinished(true);
        let u = self.succeed();
        axum::Json(self.shape.response(&mut self.choices, u)).into_response()
    }
}

/// A [`Flow`] as a response body: each poll writes every event the worker has ready.
struct SseBody(Flow);

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let f = &mut self.0;
        while !f.done && f.out.len() < MAX_WRITE {
            match f.worker.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(payload))) => {
                    if let Step::Failed(e) = f.on_event(&payload, false) {
                        let err = f.fail(&e);
                        f.done = true;
                        f.write_event(&err.body());
                        f.out.extend_from_slice(b"data: [DONE]\n\n");
                    }
                }
                Poll::Ready(Some(Err(e))) => match f.worker_failed(e) {
                    Some(e) => {
                        let err = f.fail(&e);
                        f.done = true;
                        f.write_event(&err.body());
                        f.out.extend_from_slice(b"data: [DONE]\n\n");
                    }
                    None => f.finish_stream(),
                },
                Poll::Ready(None) => f.finish_stream(),
                Poll::Pending => break,
            }
        }
        if !f.out.is_empty() {
            return Poll::Ready(Some(Ok(f.out.split().freeze())));
        }
        if f.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
