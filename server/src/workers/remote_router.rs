//! A `kvrouter router` seen from the frontend (`--prefill-router URL`, `--pool NAME=URL`): its
//! `best_worker_id` chooses the worker — query-only to compare pools, or booked under a
//! request id — the frontend sends that worker the request itself (so every OpenAI field
//! reaches it), and `mark_prefill_complete` / `free` end the booking ([`RemoteBooking`],
//! freed when dropped, so a failed or cancelled request leaves no load booked; a frontend that
//! dies leaves it to the router's booking expiry).
//!
//! Calls go over the project's one HTTP/1 client ([`WorkerClient::post_json`]), on kept-alive
//! connections, within the worker timeout.

use std::sync::Arc;

use kvrouter_core::{RouterConfigOverride, WorkerWithDpRank};
use serde::Serialize;

use super::client::{WorkerClient, WorkerError};
use crate::error::ApiError;
use crate::router_service::api::BestWorker;

/// One `kvrouter router`, by the name it was given (`--pool NAME=URL`; `prefill` for
/// `--prefill-router`).
#[derive(Debug)]
pub struct RemoteRouter {
    pub name: String,
    /// Base URL (`http://host:port`; calls under `/v1/router`).
    pub url: String,
    client: WorkerClient,
}

/// The body of a `best_worker_id` call (spec §11 plus kvrouter's `request_id` booking).
#[derive(Serialize)]
struct Query<'a> {
    token_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    router_config_override: Option<&'a RouterConfigOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_salt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

/// What a request asks of a remote router.
#[derive(Clone, Copy, Debug)]
pub struct RemoteInput<'a> {
    pub tokens: &'a [u32],
    pub overrides: Option<&'a RouterConfigOverride>,
    pub cache_salt: Option<&'a str>,
}

impl RemoteRouter {
    /// A router at `url` (trailing `/` ignored), reached through `client`.
    pub fn new(name: &str, url: &str, client: WorkerClient) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            client,
        })
    }

    async fn call(&self, method: &str, body: &[u8]) -> Result<serde_json::Value, WorkerError> {
        let path = format!("/v1/router/{method}");
        self.client.post_json(&self.url, &path, "", body).await
    }

    async fn best_worker(
        &self,
        input: RemoteInput<'_>,
        request_id: Option<&str>,
    ) -> Result<BestWorker, ApiError> {
        let body = serde_json::to_vec(&Query {
            token_ids: input.tokens,
            router_config_override: input.overrides,
            cache_salt: input.cache_salt,
            request_id,
        })
        .unwrap_or_default();
        let v = self
            .call("best_worker_id", &body)
            .await
            .map_err(|e| self.error(&e))?;
        serde_json::from_value(v).map_err(|e| {
            ApiError::bad_gateway(format!(
                "router `{}` answered best_worker_id with an unexpected body: {e}",
                self.name
            ))
        })
    }

    /// Which worker it would choose; changes nothing there.
    pub async fn query(&self, input: RemoteInput<'_>) -> Result<BestWorker, ApiError> {
        self.best_worker(input, None).await
    }

    /// Choose a worker and book the request there under `request_id` until the returned
    /// booking is freed. The answer carries the worker's registration (its URL); one without
    /// is a 502 (the booking is freed).
    pub async fn book(
        self: &Arc<Self>,
        input: RemoteInput<'_>,
        request_id: &str,
    ) -> Result<(BestWorker, RemoteBooking), ApiError> {
        let best = self.best_worker(input, Some(request_id)).await?;
        let booking = RemoteBooking {
            router: self.clone(),
            id: request_id.to_string(),
            worker: WorkerWithDpRank {
                worker_id: best.worker_id,
                dp_rank: best.dp_rank,
            },
            prefill_done: false,
            freed: false,
        };
        if best.registration.is_none() {
            return Err(ApiError::bad_gateway(format!(
                "router `{}` chose worker {} but gave no registration to reach it",
                self.name, best.worker_id
            )));
        }
        Ok((best, booking))
    }

    /// A call that failed, as the client sees it: the router's own 400 and 503 pass through
    /// (a bad override; no worker or all busy), anything else is a 502 naming the router.
    fn error(&self, e: &WorkerError) -> ApiError {
        let name = &self.name;
        match e {
            WorkerError::Status {
                status: 400,
                message,
                ..
            } => ApiError::bad_request(format!("router `{name}`: {message}")),
            WorkerError::Status {
                status: 503,
                message,
                ..
            } => ApiError::unavailable(format!("router `{name}`: {message}")),
            e => ApiError::bad_gateway(format!("router `{name}` failed ({}): {e}", e.kind())),
        }
    }

    /// Fire-and-forget `method` for `id` (the answer matters to nobody: an unknown id means
    /// it expired or its worker left, which freed it already).
    fn notify(self: &Arc<Self>, method: &'static str, id: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (shutdown): the router's booking expiry frees it
        };
        let body = serde_json::to_vec(&serde_json::json!({ "request_id": id })).unwrap_or_default();
        let me = self.clone();
        rt.spawn(async move {
            if let Err(e) = me.call(method, &body).await {
                tracing::debug!(router = %me.name, method, "remote router call failed: {e}");
            }
        });
    }
}

/// A request booked on a remote router: [`first_token`](Self::first_token) marks its prefill
/// complete there, [`free`](Self::free) (or drop) frees it.
#[derive(Debug)]
pub struct RemoteBooking {
    router: Arc<RemoteRouter>,
    id: String,
    worker: WorkerWithDpRank,
    prefill_done: bool,
    freed: bool,
}

impl RemoteBooking {
    /// The rank the router chose.
    pub fn worker(&self) -> WorkerWithDpRank {
        self.worker
    }

    /// The router that booked it.
    pub fn router(&self) -> &RemoteRouter {
        &self.router
    }

    pub fn first_token(&mut self) {
        if !std::mem::replace(&mut self.prefill_done, true) && !self.freed {
            self.router.notify("mark_prefill_complete", &self.id);
        }
    }

    pub fn free(&mut self) {
        if !std::mem::replace(&mut self.freed, true) {
            self.router.notify("free", &self.id);
        }
    }
}

impl Drop for RemoteBooking {
    fn drop(&mut self) {
        self.free();
    }
}
