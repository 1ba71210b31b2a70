//! Errors as clients see them: OpenAI-shaped bodies ([`ApiError`]), the mapping from routing
//! and worker failures to status codes, and [`error_chain`], the one way this project turns an
//! error and its sources into a message.
//!
//! Worker failures reach the client without the worker's address: the client gets the request
//! id, the router's log gets the whole chain under that id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvrouter_core::{RouteError, SelectError};
use serde_json::{json, Value};

use crate::workers::client::WorkerError;

/// An error as OpenAI shapes it: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 503 `service_unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    /// 502 `worker_error`.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "worker_error", message)
    }

    /// The same error with `prefix` before its message.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            message: format!("{prefix}{}", self.message),
            ..self.clone()
        }
    }

    /// 404 `NotFoundError`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", message)
    }

    /// The request field the error is about.
    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    /// The metric label of this error.
    pub fn metric_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 422 => "validation",
            401 | 403 => "forbidden",
            404 => "not_found",
            408 => "timeout",
            503 => "unavailable",
            _ => "internal",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `e` and each of its sources, joined by `": "` — the message of an error chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// A routing failure: 503 when no worker can take the request now (with the reason), 404 for
/// an unknown pinned worker, 400 for bad routing hints, 500 for an internal booking error.
pub fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::Select(SelectError::AllWorkersBusy(n)) => ApiError::unavailable(format!(
            "all {n} eligible workers are busy (load above the configured busy thresholds); retry later"
        )),
        RouteError::Select(SelectError::PinnedWorkerBusy(w)) => ApiError::unavailable(format!(
            "worker {w} is busy (load above the configured busy thresholds); retry later"
        )),
        RouteError::Select(SelectError::NoWorkers) => {
            ApiError::unavailable("no healthy worker is available")
        }
        RouteError::Select(SelectError::PinnedWorkerNotFound(w)) => ApiError::not_found(format!(
            "worker {w} (nvext.backend_instance_id) is not in the routing set"
        )),
        RouteError::Select(
            e @ (SelectError::MissingPinnedWorker | SelectError::InvalidOverride(_)),
        ) => ApiError::bad_request(e.to_string()),
        RouteError::Select(e @ SelectError::NoWorkerWithRank(_)) => {
            ApiError::unavailable(e.to_string())
        }
        RouteError::QueueFull(e) => {
            ApiError::unavailable(format!("{e}: every worker is past the queue threshold; retry later"))
        }
        RouteError::Booking(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
    }
}

/// A worker failure as the client sees it, logged in full under `request_id`. A worker's own
/// 4xx validation message is passed on (it names a field, not an address); everything else
/// says what kind of failure it was and gives the request id.
pub fn worker_error(e: &WorkerError, request_id: &str, worker_id: u64) -> ApiError {
    tracing::warn!(request_id, worker_id, "worker request failed: {e}");
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
        } => ApiError::unavailable(format!(
            "worker {worker_id} is overloaded; retry later (request {request_id})"
        )),
        WorkerError::Timeout { .. } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "worker_error",
            format!("worker {worker_id} did not answer in time (request {request_id})"),
        ),
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "worker_error",
            format!(
                "worker {worker_id} failed: {} (request {request_id}; details in the router's log)",
                e.kind()
            ),
        ),
    }
}
