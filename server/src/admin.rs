//! The admin API: runtime worker registration, on its own listener (127.0.0.1 by default;
//! on any other address only with a bearer token).
//!
//! * `GET /v1/workers` — every worker with its spec, health state (`healthy` | `suspect` |
//!   `removed`, consecutive failures, seconds in it) and per rank its booked load and its KV
//!   event subscriber (state and every counter), and its closed-loop `accuracy` (predicted
//!   against engine-reported cached tokens, verdict, likely cause: [`crate::workers::accuracy`]);
//! * `POST /v1/workers` — register one (a [`WorkerSpec`] JSON object, at most 64 KiB) → 201
//!   with the spec (id and block size filled in); 400 for an invalid or conflicting spec, 413
//!   for a body over the limit;
//! * `DELETE /v1/workers/{id}` — deregister → 200 with the spec, 404 if unknown;
//! * `GET /v1/dashboard` — the live dashboard's data; `GET /dashboard` — its page, the one
//!   route served without the token (it holds no data; see [`crate::dashboard`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::json;

use crate::error::ApiError;
use crate::frontend::probes::{event_counters, format_counters};
use crate::workers::fleet::Fleet;
use crate::workers::spec::WorkerSpec;

struct Admin {
    fleet: Arc<Fleet>,
    token: Option<String>,
    dashboard: crate::dashboard::Dashboard,
}

/// Serve the admin API for `fleet` on `addr` (listener label `admin`). Errors: the address
/// cannot be bound.
pub async fn serve(
    addr: std::net::SocketAddr,
    fleet: Arc<Fleet>,
    token: Option<String>,
    limits: crate::listener::ListenerLimits,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<crate::listener::Served> {
    let app = router(fleet, token, metrics.clone());
    crate::listener::serve(addr, app, limits, "admin", metrics).await
}

/// The admin routes for `fleet`; `token`: required `Authorization: Bearer` value (on every
/// route but the dashboard's page); `metrics`: what the dashboard samples.
pub fn router(
    fleet: Arc<Fleet>,
    token: Option<String>,
    metrics: Arc<crate::metrics::Metrics>,
) -> axum::Router {
    let dashboard = crate::dashboard::Dashboard::start(fleet.clone(), metrics);
    let state = Arc::new(Admin {
        fleet,
        token,
        dashboard,
    });
    axum::Router::new()
        .route("/v1/workers", get(list).post(register))
        .route("/v1/workers/{id}", delete(deregister))
        .route("/v1/dashboard", get(dashboard_data))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        // After the auth layer: the page is static and holds no data.
        .route("/dashboard", get(dashboard_page))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

async fn auth(State(a): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if let Some(t) = &a.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), t.as_bytes()));
        if !ok {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list(State(a): State<Arc<Admin>>) -> Response {
    let workers: Vec<_> = a
        .fleet
        .registry
        .all()
        .iter()
        .map(|w| {
            let loads = a.fleet.router.loads(w.spec.ranks());
            let stats = w.event_stats();
            let ranks: Vec<_> = w
                .spec
                .ranks()
                .zip(loads)
                .map(|(r, l)| {
                    let events = stats.iter().find(|(x, _)| *x == r).map(|(_, st)| {
                        let mut o: serde_json::Map<String, serde_json::Value> = event_counters(st)
                            .iter()
                            .map(|(k, v)| ((*k).to_string(), json!(v)))
                            .collect();
                        o.insert("state".into(), json!(st.state.as_str()));
                        let formats: serde_json::Map<String, serde_json::Value> =
                            format_counters(st)
                                .iter()
                                .map(|(k, v)| ((*k).to_string(), json!(v)))
                                .collect();
                        o.insert("formats".into(), json!(formats));
                        o.insert("next_seq".into(), json!(st.next_seq));
                        o
                    });
                    json!({
                        "dp_rank": r.dp_rank,
                        "active_requests": l.active_requests,
                        "active_decode_blocks": l.active_decode_blocks,
                        "active_prefill_tokens": l.active_prefill_tokens,
                        "kv_events": events,
                    })
                })
                .collect();
            let h = w.health();
            json!({
                "spec": w.spec,
                "source": w.source,
                "healthy": h.health == crate::workers::registry::Health::Healthy,
                "health": h.health.as_str(),
                "consecutive_failures": h.failures,
                "health_since_secs": h.since.elapsed().as_secs_f64(),
                "ranks": ranks,
                "accuracy": w.accuracy(),
            })
        })
        .collect();
    axum::Json(json!({ "workers": workers })).into_response()
}

async fn dashboard_data(State(a): State<Arc<Admin>>) -> Response {
    axum::Json(a.dashboard.json(&a.fleet)).into_response()
}

async fn dashboard_page() -> Response {
    crate::dashboard::page()
}

/// Largest registration body accepted, bytes (a worker spec is a few hundred).
const MAX_SPEC_BYTES: usize = 64 * 1024;

async fn register(State(a): State<Arc<Admin>>, body: Body) -> Response {
    let body = match axum::body::to_bytes(body, MAX_SPEC_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("a worker spec is at most {MAX_SPEC_BYTES} bytes"),
            )
            .into_response()
        }
    };
    let spec: WorkerSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return ApiError::bad_request(format!("invalid worker spec: {e}")).into_response()
        }
    };
    let fleet = a.fleet.clone();
    // Starting subscribers opens sockets and threads: keep it off the async workers.
    match tokio::task::spawn_blocking(move || fleet.register_from(spec, "admin".into())).await {
        Ok(Ok(spec)) => (StatusCode::CREATED, axum::Json(spec)).into_response(),
        Ok(Err(e)) => ApiError::bad_request(e.to_string()).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
        .into_response(),
    }
}

async fn deregister(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return ApiError::bad_request(format!("worker id must be an unsigned integer, got {id:?}"))
            .into_response();
    };
    match a.fleet.deregister(id).await {
        Some(spec) => axum::Json(spec).into_response(),
        None => ApiError::not_found(format!("no worker {id}")).into_response(),
    }
}
