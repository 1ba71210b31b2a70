//! The read-only routes: `GET /v1/models`, `/health` (JSON, 503 without a healthy worker),
//! `/live`, `/ready` and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kvrouter_wire::SubscriberStats;
use serde_json::json;

use super::AppState;
use crate::metrics::{RankSnapshot, Snapshot};
use crate::workers::fleet::Fleet;

pub async fn models(State(s): State<Arc<AppState>>) -> Response {
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

pub async fn health(State(s): State<Arc<AppState>>) -> Response {
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

pub async fn live() -> StatusCode {
    StatusCode::OK
}

pub async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if healthy_workers(&s).0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Every counter of a rank's KV event subscriber as `(outcome, count)`, in one order for
/// `/metrics` and the admin API.
pub fn event_counters(st: &SubscriberStats) -> [(&'static str, u64); 19] {
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
    ]
}

/// Per-rank state for the scrape: health, booked load, subscriber counters and state.
pub fn snapshot(fleet: &Fleet) -> Snapshot {
    let mut snap = Snapshot {
        index_entries: fleet.router.index().current_size() as u64,
        ..Default::default()
    };
    for w in fleet.registry.all() {
        let health = w.health().health;
        let stats = w.event_stats();
        let loads = fleet.router.loads(w.spec.ranks());
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
                subscriber_state: sub.map(|st| st.state.as_str()),
            });
        }
    }
    snap
}

pub async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut snap = snapshot(&s.fleet);
    snap.prompt_cache = s.preprocessing.cache.as_ref().map(|c| c.stats());
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
