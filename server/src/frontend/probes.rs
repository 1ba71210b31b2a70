//! The read-only routes: `GET /v1/models` and `/v1/models/{id}`, `/version`, `/health` (JSON,
//! 503 without a healthy worker), `/live`, `/ready` and `/metrics` (Prometheus text, classic or
//! OpenMetrics by the `Accept` header).

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kvrouter_wire::SubscriberStats;
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;
use crate::metrics::{Format, Metrics, RankSnapshot, Snapshot};
use crate::workers::fleet::Fleet;

/// The served model as an OpenAI model object, with vLLM's `root`, `parent` and
/// `max_model_len`.
fn model_card(s: &AppState) -> Value {
    json!({"id": s.model_name, "object": "model", "created": 0, "owned_by": "kvrouter",
           "root": s.model_name, "parent": null, "max_model_len": s.limits.context_length})
}

/// A LoRA adapter the workers serve, as vLLM lists one: its `parent` is the served model
/// (`root`, the adapter's path in vLLM, is not known to the router: its name stands in).
fn adapter_card(s: &AppState, name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "kvrouter",
           "root": name, "parent": s.model_name, "max_model_len": s.limits.context_length})
}

/// The 404 for a model this server does not serve (the completion endpoints' wording).
pub(super) fn unknown_model(served: &str, model: &str) -> ApiError {
    ApiError::not_found(format!(
        "The model `{model}` does not exist. Served: `{served}`."
    ))
    .param("model")
}

/// `GET /v1/models`: the served model, then each LoRA adapter its workers serve.
pub async fn models(State(s): State<Arc<AppState>>) -> Response {
    let mut data = vec![model_card(&s)];
    for name in s.fleet.registry.lora_adapters() {
        data.push(adapter_card(&s, &name));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}` (OpenAI's retrieve): the served model's or a LoRA adapter's object,
/// as in the list, or 404 `NotFoundError` for another id. The id may contain `/`
/// (`Qwen/Qwen3-0.6B`), sent as is or percent-encoded.
pub async fn model(
    State(s): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    match id {
        Ok(Path(id)) if id == s.model_name => axum::Json(model_card(&s)).into_response(),
        Ok(Path(id)) if s.fleet.registry.lora_workers(&id).is_some() => {
            axum::Json(adapter_card(&s, &id)).into_response()
        }
        Ok(Path(id)) => unknown_model(&s.model_name, &id).into_response(),
        Err(e) => ApiError::not_found(format!("not a model id: {e}"))
            .param("model")
            .into_response(),
    }
}

/// `GET /version`: `{"version": ...}`, this build's version (vLLM's shape).
pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `(healthy, registered)` workers of a fleet.
pub fn fleet_health(fleet: &Fleet) -> (usize, usize) {
    let all = fleet.registry.all();
    (all.iter().filter(|w| w.is_healthy()).count(), all.len())
}

/// `(healthy, registered)`: this frontend's workers, or, with `--pool`, its pools (a pool is
/// healthy when its router's `/health` is, within a second).
async fn healthy_workers(s: &AppState) -> (usize, usize) {
    match &s.pools {
        Some(p) => p.health().await,
        None => fleet_health(&s.fleet),
    }
}

/// `GET /health`: the served model and its healthy and registered workers (with `--pool`: its
/// healthy and configured pools, `healthy_pools` and `pools`); 503 without a healthy one.
pub async fn health(State(s): State<Arc<AppState>>) -> Response {
    let (up, total) = healthy_workers(&s).await;
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let (healthy_key, total_key) = if s.pools.is_some() {
        ("healthy_pools", "pools")
    } else {
        ("healthy_workers", "workers")
    };
    let body = json!({
        "status": if up > 0 { "healthy" } else { "unhealthy" },
        "model": s.model_name,
        healthy_key: up,
        total_key: total,
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /live`: 200 while the process serves HTTP.
pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// `GET /ready`: 200 with at least one healthy worker (or pool), else 503.
pub async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if healthy_workers(&s).await.0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Every counter of a rank's KV event subscriber as `(outcome, count)`, in one order for
/// `/metrics` and the admin API.
pub fn event_counters(st: &SubscriberStats) -> [(&'static str, u64); 23] {
    [
        ("received", st.received),
        ("applied", st.events_out),
        ("batches", st.applied),
        ("dropped", st.dropped),
        ("filtered", st.filtered),
        ("gaps", st.gaps),
        ("recovered", st.recovered),
        ("replayed", st.replayed),
        ("replay_failures", st.replay_failures),
        ("duplicates", st.duplicates),
        ("cleared", st.cleared),
        ("restarts", st.restarts),
        ("bad_frames", st.bad_frames),
        ("oversize", st.oversize),
        ("decode_errors", st.decode_errors),
        ("skipped_events", st.skipped_events),
        ("unknown_fields", st.unknown_fields),
        ("backpressure", st.backpressure),
        ("events_out", st.events_out),
        ("lora_unmapped", st.lora_unmapped),
        ("polls", st.polls),
        ("poll_errors", st.poll_errors),
        ("window_ignored", st.window_ignored),
    ]
}

/// Batches of a rank's KV events by wire format as `(format, count)`, for `/metrics` and the
/// admin API.
pub fn format_counters(st: &SubscriberStats) -> [(&'static str, u64); 5] {
    kvrouter_wire::WireFormat::ALL.map(|f| (f.as_str(), st.formats.get(f)))
}

/// Per-rank state for the scrape: health, booked load, subscriber counters and state.
pub fn snapshot(fleet: &Fleet) -> Snapshot {
    let mut snap = Snapshot {
        index_entries: fleet.router.index().current_size() as u64,
        prefill_coefficients: fleet.router.prefill_coefficients(),
        ..Default::default()
    };
    for w in fleet.registry.all() {
        let health = w.health().health;
        let stats = w.event_stats();
        let loads = fleet.router.loads(w.spec.ranks());
        snap.accuracy.push((w.id(), w.accuracy_verdict()));
        for (i, rank) in w.spec.ranks().enumerate() {
            let load = loads[i];
            let sub = stats.iter().find(|(r, _)| *r == rank).map(|(_, st)| st);
            snap.ranks.push(RankSnapshot {
                worker_id: rank.worker_id,
                dp_rank: rank.dp_rank,
                health: health.as_str(),
                active_decode_blocks: load.active_decode_blocks,
                active_prefill_tokens: load.active_prefill_tokens,
                active_requests: load.active_requests as u64,
                events: sub
                    .map(|st| event_counters(st).to_vec())
                    .unwrap_or_default(),
                formats: sub
                    .map(|st| format_counters(st).to_vec())
                    .unwrap_or_default(),
                subscriber_state: sub.map(|st| st.state.as_str()),
            });
        }
    }
    snap
}

/// `GET /metrics`: classic Prometheus text 0.0.4, or OpenMetrics 1.0.0 when the `Accept`
/// header asks for `application/openmetrics-text` ([`Format::negotiate`]).
pub async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let mut snap = snapshot(&s.fleet);
    snap.prompt_cache = s.preprocessing.cache.as_ref().map(|c| c.stats());
    scrape(&s.metrics, snap, &headers)
}

/// A scrape of `metrics` with `snap` as the scrape-time state, in the format the request's
/// `Accept` header asks for.
pub fn scrape(metrics: &Metrics, snap: Snapshot, headers: &HeaderMap) -> Response {
    let format = requested_format(headers);
    metrics_response(metrics.render_as(snap, format), format)
}

/// The text format a scrape's `Accept` headers ask for ([`Format::negotiate`]).
pub fn requested_format(headers: &HeaderMap) -> Format {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    Format::negotiate(Some(accept.as_str()).filter(|a| !a.is_empty()))
}

/// A scrape's response: `text` in `format`, with its content type.
pub fn metrics_response(text: String, format: Format) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            ),
            (header::VARY, HeaderValue::from_static("accept")),
        ],
        text,
    )
        .into_response()
}
