//! The router API's handlers: each reads its body, calls the [`Router`](super::Router) method
//! of the same name, answers its result as JSON, and is counted in
//! `kvrouter_router_service_requests_total{endpoint, status}`. Errors are JSON
//! (`{"error": {"message", "type", "param", "code"}}`): 400 bad body, 404 unknown request id
//! or pinned worker, 409 request id already booked, 503 no worker / all busy / queue full.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::api::{
    self, BestWorkerRequest, LoadOut, LoadsRequest, OverlapRequest, Released, RequestIdBody,
};
use super::{token_ids, RouterError, Service};
use crate::frontend::probes::{fleet_health, scrape, snapshot};
use crate::metrics::ServiceLabels;

type Answer = Result<Response, RouterError>;

/// Count a call and turn its result into a response.
fn answer(s: &Service, endpoint: &'static str, r: Answer) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    let status = match resp.status().as_u16() {
        200..=299 => "success",
        503 => "unavailable",
        400..=499 => "client_error",
        _ => "error",
    };
    s.router
        .metrics()
        .service_calls
        .get_or_create(&ServiceLabels { endpoint, status })
        .inc();
    resp
}

/// `POST /v1/router/generate` ([`super::generate`]).
pub async fn generate(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = super::generate::generate(s.clone(), body).await;
    answer(&s, "generate", r)
}

/// `POST /v1/router/best_worker_id` ([`BestWorkerRequest`] → [`api::BestWorker`]).
pub async fn best_worker_id(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = async {
        let bytes = s.read_body(body).await?;
        let req: BestWorkerRequest = token_ids::parse(&bytes)?;
        let out = s.router.best_worker(&req)?;
        Ok(Json(out).into_response())
    }
    .await;
    answer(&s, "best_worker_id", r)
}

/// `POST /v1/router/mark_prefill_complete` ([`RequestIdBody`] → `{"request_id"}`).
pub async fn mark_prefill_complete(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = async {
        let bytes = s.read_body(body).await?;
        let req: RequestIdBody = api::parse(&bytes)?;
        s.router.mark_prefill_complete(&req.request_id)?;
        let out = Released {
            request_id: req.request_id,
            worker_id: None,
            dp_rank: None,
        };
        Ok(Json(out).into_response())
    }
    .await;
    answer(&s, "mark_prefill_complete", r)
}

/// `POST /v1/router/free` ([`RequestIdBody`] → [`Released`]).
pub async fn free(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = async {
        let bytes = s.read_body(body).await?;
        let req: RequestIdBody = api::parse(&bytes)?;
        let rank = s.router.free(&req.request_id)?;
        let out = Released {
            request_id: req.request_id,
            worker_id: Some(rank.worker_id),
            dp_rank: Some(rank.dp_rank),
        };
        Ok(Json(out).into_response())
    }
    .await;
    answer(&s, "free", r)
}

/// `POST /v1/router/get_potential_loads` ([`LoadsRequest`] → `[LoadOut]`).
pub async fn get_potential_loads(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = async {
        let bytes = s.read_body(body).await?;
        let req: LoadsRequest = token_ids::parse(&bytes)?;
        let out: Vec<LoadOut> = s.router.potential_loads(&req);
        Ok(Json(out).into_response())
    }
    .await;
    answer(&s, "get_potential_loads", r)
}

/// `POST /v1/router/get_overlap_scores` ([`OverlapRequest`] → [`api::OverlapScoresOut`]).
pub async fn get_overlap_scores(State(s): State<Arc<Service>>, body: Body) -> Response {
    let r = async {
        let bytes = s.read_body(body).await?;
        let req: OverlapRequest = token_ids::parse(&bytes)?;
        let out = s.router.overlap_scores(&req)?;
        Ok(Json(out).into_response())
    }
    .await;
    answer(&s, "get_overlap_scores", r)
}

/// `GET` or `POST /v1/router/dump_events`: the exact index as a JSON array of router events
/// (spec §3.1 `RouterEvent`, `Stored` events rebuilding it, every storage tier).
pub async fn dump_events(State(s): State<Arc<Service>>) -> Response {
    let events = s.router.dump_events();
    answer(&s, "dump_events", Ok(Json(events).into_response()))
}

/// `GET /health`: the endpoint and its healthy and registered workers; 503 without a
/// healthy worker.
pub async fn health(State(s): State<Arc<Service>>) -> Response {
    let (up, total) = fleet_health(s.router.fleet());
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if up > 0 { "healthy" } else { "unhealthy" },
        "endpoint": s.endpoint,
        "healthy_workers": up,
        "workers": total,
    });
    (status, Json(body)).into_response()
}

/// `GET /live`: 200 while the process serves HTTP.
pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// `GET /ready`: 200 with at least one healthy worker, else 503.
pub async fn ready(State(s): State<Arc<Service>>) -> StatusCode {
    if fleet_health(s.router.fleet()).0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `GET /metrics`: Prometheus text (classic or OpenMetrics by the `Accept` header).
pub async fn metrics(State(s): State<Arc<Service>>, headers: HeaderMap) -> Response {
    scrape(s.router.metrics(), snapshot(s.router.fleet()), &headers)
}
