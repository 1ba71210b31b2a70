//! A `kvrouter router` seen from the frontend (`--prefill-router URL`, `--pool NAME=URL`): its
//! `best_worker_id` chooses the worker — query-only to compare pools, or booked under a
//! request id — the frontend sends that worker the request itself (so every OpenAI field
//! reaches it), and `mark_prefill_complete` / `free` end the booking ([`RemoteBooking`],
//! freed when dropped, so a failed or cancelled request leaves no load booked; a frontend that
//! dies leaves it to the router's booking expiry).
//!
//! Calls go over the project's one HTTP/1 client ([`WorkerClient::post_json`]), on kept-alive
//! connections, within the worker timeout.
//!
//! A router is given by URL, or by the endpoint name it routes (`dynamo.prefill.generate`):
//! then its replicas are those registered in discovery ([`crate::workers::discovery::routers`]),
//! taken in turn per request; a booking's later calls go to the replica that made it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use kvrouter_core::{RouterConfigOverride, WorkerWithDpRank};
use serde::Serialize;

use super::client::{WorkerClient, WorkerError};
use crate::error::ApiError;
use crate::router_service::api::BestWorker;
use crate::workers::spec::WorkerSpec;

/// One `kvrouter router`, by the name it was given (`--pool NAME=URL`; `prefill` for
/// `--prefill-router`).
#[derive(Debug)]
pub struct RemoteRouter {
    pub name: Arc<str>,
    target: Target,
    client: WorkerClient,
}

/// Where a router is.
#[derive(Debug)]
enum Target {
    /// Base URL (`http://host:port`; calls under `/v1/router`).
    Url(String),
    /// The replicas registered for an endpoint, and whose turn it is.
    Endpoint {
        endpoint: String,
        replicas: RwLock<Arc<[String]>>,
        next: AtomicUsize,
    },
}

/// The fields of a `best_worker_id` call but `request_id` (spec §11).
#[derive(Serialize)]
struct Query<'a> {
    token_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    router_config_override: Option<&'a RouterConfigOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_salt: Option<&'a str>,
}

/// What a request asks of remote routers: its `best_worker_id` body, written once (a
/// 4,096-token prompt is ~25 KB of JSON) for every probe and the booking.
#[derive(Clone, Debug)]
pub struct RemoteInput {
    /// The JSON object without its closing brace.
    head: Vec<u8>,
}

impl RemoteInput {
    /// The query for a prompt of `tokens`, with the request's overrides and cache salt.
    pub fn new(
        tokens: &[u32],
        overrides: Option<&RouterConfigOverride>,
        cache_salt: Option<&str>,
    ) -> Self {
        let mut head = serde_json::to_vec(&Query {
            token_ids: tokens,
            router_config_override: overrides,
            cache_salt,
        })
        .unwrap_or_else(|_| b"{\"token_ids\":[]}".to_vec());
        head.pop(); // the closing brace
        Self { head }
    }

    /// The call's body: query-only, or booking under `request_id`.
    fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.head.len() + 64);
        b.extend_from_slice(&self.head);
        if let Some(id) = request_id {
            b.extend_from_slice(b",\"request_id\":");
            let _ = serde_json::to_writer(&mut b, id);
        }
        b.push(b'}');
        b
    }
}

impl RemoteRouter {
    /// A router at `target`, reached through `client`: a base URL (`http://…`, trailing `/`
    /// ignored), or an endpoint name `ns.component.endpoint` whose replicas are set by
    /// [`set_replicas`](Self::set_replicas) (none until then).
    pub fn new(name: &str, target: &str, client: WorkerClient) -> Arc<Self> {
        let target = if target.contains("://") {
            Target::Url(target.trim_end_matches('/').to_string())
        } else {
            Target::Endpoint {
                endpoint: target.to_string(),
                replicas: RwLock::new(Arc::from(Vec::new())),
                next: AtomicUsize::new(0),
            }
        };
        Arc::new(Self {
            name: name.into(),
            target,
            client,
        })
    }

    /// The endpoint name it was given instead of a URL.
    pub fn endpoint(&self) -> Option<&str> {
        match &self.target {
            Target::Url(_) => None,
            Target::Endpoint { endpoint, .. } => Some(endpoint),
        }
    }

    /// Replace the replicas of an endpoint-named router; returns whether they changed.
    /// Ignored for a router given by URL.
    pub fn set_replicas(&self, urls: Vec<String>) -> bool {
        let Target::Endpoint { replicas, .. } = &self.target else {
            return false;
        };
        let mut r = replicas.write().unwrap_or_else(|e| e.into_inner());
        if **r == *urls {
            return false;
        }
        *r = Arc::from(urls);
        true
    }

    /// Every URL it is reached at now.
    pub fn urls(&self) -> Vec<String> {
        match &self.target {
            Target::Url(u) => vec![u.clone()],
            Target::Endpoint { replicas, .. } => {
                replicas.read().unwrap_or_else(|e| e.into_inner()).to_vec()
            }
        }
    }

    /// Whether one of its replicas answers `/health` 2xx within a second (it has a healthy
    /// worker).
    pub async fn healthy(&self) -> bool {
        let timeout = std::time::Duration::from_secs(1);
        for url in self.urls() {
            if self.client.health(&url, timeout).await {
                return true;
            }
        }
        false
    }

    /// The URL of the next call: the router's, or the next replica in turn. Errors: 503
    /// when no replica is registered.
    fn pick(&self) -> Result<String, ApiError> {
        match &self.target {
            Target::Url(u) => Ok(u.clone()),
            Target::Endpoint {
                endpoint,
                replicas,
                next,
            } => {
                let r = replicas.read().unwrap_or_else(|e| e.into_inner()).clone();
                if r.is_empty() {
                    return Err(ApiError::unavailable(format!(
                        "router `{}`: no replica of {endpoint} is registered",
                        self.name
                    )));
                }
                Ok(r[next.fetch_add(1, Ordering::Relaxed) % r.len()].clone())
            }
        }
    }

    async fn call(
        &self,
        url: &str,
        method: &str,
        body: &[u8],
    ) -> Result<serde_json::Value, WorkerError> {
        let path = format!("/v1/router/{method}");
        self.client.post_json(url, &path, "", body).await
    }

    /// `best_worker_id` on the next replica; returns its answer and the replica's URL.
    async fn best_worker(
        &self,
        input: &RemoteInput,
        request_id: Option<&str>,
    ) -> Result<(BestWorker, String), ApiError> {
        let url = self.pick()?;
        let body = input.body(request_id);
        let v = self
            .call(&url, "best_worker_id", &body)
            .await
            .map_err(|e| self.error(&e))?;
        let best = serde_json::from_value(v).map_err(|e| {
            ApiError::bad_gateway(format!(
                "router `{}` answered best_worker_id with an unexpected body: {e}",
                self.name
            ))
        })?;
        Ok((best, url))
    }

    /// Which worker it would choose; changes nothing there.
    pub async fn query(&self, input: &RemoteInput) -> Result<BestWorker, ApiError> {
        Ok(self.best_worker(input, None).await?.0)
    }

    /// Choose a worker and book the request there under `request_id` until the returned
    /// booking is freed. An answer without the worker's registration (its URL) is a 502 (the
    /// booking is freed).
    pub async fn book(
        self: &Arc<Self>,
        input: &RemoteInput,
        request_id: &str,
    ) -> Result<Booked, ApiError> {
        let (mut best, url) = self.best_worker(input, Some(request_id)).await?;
        let lease = RemoteBooking {
            router: self.clone(),
            url,
            id: request_id.to_string(),
            worker: WorkerWithDpRank {
                worker_id: best.worker_id,
                dp_rank: best.dp_rank,
            },
            prefill_done: false,
            freed: false,
        };
        let Some(spec) = best.registration.take() else {
            return Err(ApiError::bad_gateway(format!(
                "router `{}` chose worker {} but gave no registration to reach it",
                self.name, best.worker_id
            )));
        };
        Ok(Booked { best, spec, lease })
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
    fn notify(self: &Arc<Self>, url: &str, method: &'static str, id: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (shutdown): the router's booking expiry frees it
        };
        let body = serde_json::to_vec(&serde_json::json!({ "request_id": id })).unwrap_or_default();
        let (me, url) = (self.clone(), url.to_string());
        rt.spawn(async move {
            if let Err(e) = me.call(&url, method, &body).await {
                tracing::debug!(router = %me.name, method, "remote router call failed: {e}");
            }
        });
    }
}

/// What [`RemoteRouter::book`] gives: the router's answer, the chosen worker's registration
/// (taken out of the answer) and the booking.
#[derive(Debug)]
pub struct Booked {
    pub best: BestWorker,
    pub spec: WorkerSpec,
    pub lease: RemoteBooking,
}

/// A request booked on a remote router: [`first_token`](Self::first_token) marks its prefill
/// complete there, [`free`](Self::free) (or drop) frees it.
#[derive(Debug)]
pub struct RemoteBooking {
    router: Arc<RemoteRouter>,
    /// The replica that booked it.
    url: String,
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
            self.router
                .notify(&self.url, "mark_prefill_complete", &self.id);
        }
    }

    pub fn free(&mut self) {
        if !std::mem::replace(&mut self.freed, true) {
            self.router.notify(&self.url, "free", &self.id);
        }
    }
}

impl Drop for RemoteBooking {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_bodies_are_the_reference_shape_with_or_without_a_booking() {
        let o = RouterConfigOverride {
            overlap_score_weight: Some(0.0),
            ..Default::default()
        };
        let q = RemoteInput::new(&[1, 2, 3], Some(&o), Some("salt\""));
        let v: serde_json::Value = serde_json::from_slice(&q.body(None)).unwrap();
        assert_eq!(v["token_ids"], serde_json::json!([1, 2, 3]));
        assert_eq!(v["cache_salt"], "salt\"");
        assert_eq!(v["router_config_override"]["overlap_score_weight"], 0.0);
        assert!(v.get("request_id").is_none());
        let v: serde_json::Value = serde_json::from_slice(&q.body(Some("id\"1"))).unwrap();
        assert_eq!(v["request_id"], "id\"1");
        let v: serde_json::Value =
            serde_json::from_slice(&RemoteInput::new(&[7], None, None).body(Some("x"))).unwrap();
        assert_eq!(v, serde_json::json!({"token_ids": [7], "request_id": "x"}));
    }
}
