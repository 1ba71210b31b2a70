//! `POST /v1/completions` and `/v1/chat/completions`: read the body (bounded in size and
//! time), parse and tokenize it, route and book it, start it on the chosen worker, and hand
//! the worker's stream to a [`Flow`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kvrouter_core::{RolePool, WorkerId};

use super::disagg::{self, Plan};
use super::lease::Started;
use super::request::{parse_request_for, Endpoint, ParsedRequest, ServedModels};
use super::response::Shape;
use super::stream::{Flow, Tracker};
use super::{
    AppState, DP_RANK_HEADER, POOL_HEADER, PREDICTED_CACHED_HEADER, PREFILL_WORKER_HEADER,
    REQUEST_ID_HEADER, WORKER_HEADER,
};
use crate::error::{route_error, ApiError};
use crate::routing::RouteInput;

pub async fn completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    serve(s, Endpoint::Completions, body).await
}

pub async fn chat_completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    serve(s, Endpoint::ChatCompletions, body).await
}

/// The body within the server's limits ([`crate::body::read_body`]).
pub(super) async fn read_body(s: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    crate::body::read_body(body, s.max_body_bytes, s.body_timeout).await
}

async fn serve(s: Arc<AppState>, endpoint: Endpoint, body: Body) -> Response {
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(e) => {
            s.metrics.body_errors.inc();
            return e.into_response();
        }
    };
    let mut tracker = Tracker::new(s.metrics.clone(), &s.model_name, endpoint);
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let shape = Shape::new(endpoint, &s.model_name, n);
    let request_id = HeaderValue::from_str(&shape.id).ok();
    let parsed = parse(&s, endpoint, bytes).await;
    let mut resp = match parsed {
        Err(e) => {
            tracker.fail(&e);
            e.into_response()
        }
        Ok(req) => match dispatch(&s, &req, &shape.id).await {
            Err(e) => {
                tracker.fail(&e);
                e.into_response()
            }
            Ok(started) => {
                // Answered as the adapter it ran with, as vLLM answers.
                let shape = match &req.lora_name {
                    Some(name) => Shape::new(endpoint, name, n),
                    None => shape,
                };
                let rank = started.lease.worker();
                let predicted = started.lease.predicted_cached_tokens();
                let flow = Flow::new(
                    s.clone(),
                    shape,
                    req.tokens.len(),
                    started.lease,
                    tracker,
                    started.stream,
                    req.output.clone(),
                );
                let flow = if started.prefill_worker.is_some() {
                    flow.without_accuracy()
                } else {
                    flow
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
                if let Some(p) = predicted {
                    h.insert(PREDICTED_CACHED_HEADER, HeaderValue::from(p));
                }
                if let Some(p) = started.prefill_worker {
                    h.insert(PREFILL_WORKER_HEADER, HeaderValue::from(p));
                }
                if let Some(v) = started.pool.and_then(|p| HeaderValue::from_str(&p).ok()) {
                    h.insert(POOL_HEADER, v);
                }
                resp
            }
        },
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    resp
}

/// Parse and tokenize the body: small ones right here, large ones on the blocking pool (at
/// most `slots` at once) so that templating and tokenizing a long prompt never holds up the
/// async threads that carry every other stream.
async fn parse(
    s: &Arc<AppState>,
    endpoint: Endpoint,
    bytes: axum::body::Bytes,
) -> Result<ParsedRequest, ApiError> {
    let p = &s.preprocessing;
    if bytes.len() <= p.inline_bytes {
        let t = std::time::Instant::now();
        let r = parse_request_for(
            endpoint,
            &bytes,
            served_models(s, &|name| s.fleet.registry.lora_workers(name)),
            &p.pre,
            p.cache.as_deref(),
            s.limits,
        );
        s.metrics.tokenize.observe(t.elapsed().as_secs_f64());
        return r;
    }
    let _slot = p.slots.acquire().await;
    let s2 = s.clone();
    let job = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let p = &s2.preprocessing;
        let r = parse_request_for(
            endpoint,
            &bytes,
            served_models(&s2, &|name| s2.fleet.registry.lora_workers(name)),
            &p.pre,
            p.cache.as_deref(),
            s2.limits,
        );
        s2.metrics.tokenize.observe(t.elapsed().as_secs_f64());
        r
    });
    job.await.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("preprocessing failed: {e}"),
        ))
    })
}

/// The model names this frontend serves: its model and its workers' LoRA adapters, looked up
/// by `lora_workers` (only for a `model` that is not the served one).
fn served_models<'a>(
    s: &'a AppState,
    lora_workers: &'a dyn Fn(&str) -> Option<Arc<[WorkerId]>>,
) -> ServedModels<'a> {
    ServedModels {
        base: &s.model_name,
        lora_workers,
    }
}

/// Route the request and start it on the chosen worker ([`crate::workers::dispatch`]) — or,
/// in a disaggregated fleet, on a prefill worker and then a decode worker ([`disagg`]), or,
/// with router pools, on the worker the chosen pool's router picks ([`super::pools`]).
async fn dispatch(
    s: &Arc<AppState>,
    req: &ParsedRequest,
    request_id: &str,
) -> Result<Started, ApiError> {
    if let Some(pools) = &s.pools {
        return super::pools::dispatch(s, pools, req, request_id).await;
    }
    let pool = match disagg::plan(s, req) {
        Plan::Split => match disagg::dispatch(s, req, request_id).await? {
            Some(started) => return Ok(started),
            None => RolePool::Aggregated,
        },
        Plan::Whole(pool) => pool,
    };
    let input = RouteInput {
        tokens: &req.tokens,
        pinned_worker: req.backend_instance_id,
        dp_rank: req.dp_rank,
        overrides: req.overrides.clone(),
        lora_name: req.lora_name.as_deref(),
        cache_salt: req.cache_salt.as_deref(),
        priority: req.priority,
        strict_priority: req.strict_priority,
        pool,
        workers: req.lora_workers.clone(),
    };
    let body = |model: Option<&str>| req.worker_body(req.worker_model(model, &s.model_name));
    let fleet = &s.fleet;
    let (booking, stream) =
        crate::workers::dispatch::dispatch(fleet, &s.client, &input, body, route_error, request_id)
            .await?;
    Ok(Started {
        lease: booking.into(),
        stream,
        prefill_worker: None,
        pool: None,
    })
}
