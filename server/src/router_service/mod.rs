//! `kvrouter router`: the standalone router service, the counterpart of
//! `python -m dynamo.router --endpoint ns.component.endpoint --router-block-size N …`
//! (spec §12, the `KvRouter` methods of §11). It routes for the workers registered under one
//! endpoint (same worker sources, KV event subscriptions and health handling as the frontend,
//! [`crate::workers`]) and answers JSON over HTTP ([`RouterServiceConfig`] for the flags):
//!
//! | call | body → answer |
//! | --- | --- |
//! | `POST /v1/router/generate` | token-id request → SSE chunks ([`generate`]) |
//! | `POST /v1/router/best_worker_id` | [`api::BestWorkerRequest`] → [`api::BestWorker`] |
//! | `POST /v1/router/mark_prefill_complete` | [`api::RequestIdBody`] → `{"request_id"}` |
//! | `POST /v1/router/free` | [`api::RequestIdBody`] → [`api::Released`] |
//! | `POST /v1/router/get_potential_loads` | [`api::LoadsRequest`] → `[`[`api::LoadOut`]`]` |
//! | `POST /v1/router/get_overlap_scores` | [`api::OverlapRequest`] → [`api::OverlapScoresOut`] |
//! | `GET /v1/router/dump_events` | → `[RouterEvent]` (spec §3.1) |
//! | `GET /health`, `/live`, `/ready`, `/metrics` | as the frontend's |
//!
//! `best_worker_id` without a `request_id` is a pure query: loads, indexes and the round-robin
//! cursor are left exactly as they were ([`crate::routing::RouterState::query`]). With one,
//! the request is booked under that id until `free`; bookings never freed are force-freed
//! after `--router-active-request-expiry-secs` and counted in
//! `kvrouter_router_expired_requests_total`. With the ZMQ event plane the router starts with
//! empty state and its index fills from the workers' KV events; with `--event-plane nats` it
//! loads the endpoint's index snapshot first unless `--router-reset-states`
//! ([`crate::replicas::event_plane`]).
//!
//! Every call above is a method of [`Router`], which runs without HTTP (no port bound): the
//! handlers parse the body, call it and answer its result; the Python package's `KvRouter`
//! calls the same methods in-process. [`RouterService`] is a [`Router`] plus the router API
//! and the admin API.

pub mod api;
mod config;
pub mod generate;
mod handlers;
mod router;
pub mod token_ids;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{legacy_flags_used, warn_legacy_flags, RouterServiceConfig, LEGACY_FLAGS};
pub use generate::{GenerateChunk, GenerateRequest, Generation};
pub use router::{ErrorKind, Router, RouterError};

use crate::error::ApiError;
use crate::workers::discovery::routers::{self, RouterRegistration};
use crate::workers::discovery::Discovery;
use crate::workers::fleet::Fleet;
use crate::workers::spec::WorkerSpec;
use crate::{admin, listener};

/// What every handler shares: the router and the limits of request bodies.
pub(crate) struct Service {
    router: Arc<Router>,
    /// The endpoint routed (`/health` names it).
    endpoint: String,
    max_body_bytes: usize,
    body_timeout: Duration,
}

impl Service {
    async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        crate::body::read_body(body, self.max_body_bytes, self.body_timeout).await
    }
}

/// The routes of the router API.
fn routes(s: Arc<Service>) -> axum::Router {
    use handlers::*;
    axum::Router::new()
        .route("/v1/router/generate", post(generate))
        .route("/v1/router/best_worker_id", post(best_worker_id))
        .route(
            "/v1/router/mark_prefill_complete",
            post(mark_prefill_complete),
        )
        .route("/v1/router/free", post(free))
        .route("/v1/router/get_potential_loads", post(get_potential_loads))
        .route("/v1/router/get_overlap_scores", post(get_overlap_scores))
        .route("/v1/router/dump_events", get(dump_events).post(dump_events))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed: the router's calls are POST (dump_events also GET)",
            )
        })
        .with_state(s)
}

/// A running router service.
pub struct RouterService {
    /// Where the router API listens.
    pub addr: SocketAddr,
    /// Where the admin API listens, if served.
    pub admin_addr: Option<SocketAddr>,
    /// Its workers and router.
    pub fleet: Arc<Fleet>,
    /// The endpoint it routes.
    pub endpoint: String,
    router: Arc<Router>,
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RouterService {
    /// Register the workers of `cfg` plus `workers` that serve `cfg.endpoint` (others are
    /// skipped, with a log line), and serve the router API and the admin API.
    ///
    /// Errors: bad flags, a port in use, a worker of the endpoint that cannot be registered.
    pub async fn start(
        mut cfg: RouterServiceConfig,
        workers: Vec<WorkerSpec>,
    ) -> anyhow::Result<Self> {
        cfg.fleet.replicas = cfg.fleet.replicas.resolved();
        let admin_addr = cfg.fleet.admin_addr()?;
        let http_addr = cfg.http_addr()?;
        let nofile = listener::raise_nofile_limit();
        let router = Router::start(&cfg, workers).await?;
        let fleet = router.fleet().clone();
        let metrics = router.metrics().clone();
        let service = Arc::new(Service {
            router: router.clone(),
            endpoint: cfg.endpoint.clone(),
            max_body_bytes: cfg.listener.max_body_bytes,
            body_timeout: cfg.listener.body_timeout(),
        });
        let mut shutdown = Vec::new();
        let mut tasks = Vec::new();
        let served = listener::serve(
            http_addr,
            routes(service),
            cfg.listener.limits(nofile),
            "router",
            metrics.clone(),
        )
        .await;
        let api = match served {
            Ok(api) => api,
            Err(e) => {
                router.stop().await;
                return Err(e);
            }
        };
        let addr = api.addr;
        tasks.push(api.task);
        shutdown.push(api.shutdown);
        let admin_addr = match admin_addr {
            Some(a) => {
                let limits = cfg.fleet.admin_listener(&cfg.listener);
                let token = cfg.fleet.admin_token.clone();
                let served = match admin::serve(a, fleet.clone(), token, limits, metrics).await {
                    Ok(s) => s,
                    Err(e) => {
                        listener::stop_all(shutdown, tasks).await;
                        router.stop().await;
                        return Err(e);
                    }
                };
                tasks.push(served.task);
                shutdown.push(served.shutdown);
                Some(served.addr)
            }
            None => None,
        };
        if let Some(d) = cfg.fleet.dynamic_discovery()? {
            let reg = RouterRegistration {
                url: cfg.advertised_url(addr),
                endpoint: cfg.endpoint.clone(),
                router_id: cfg.fleet.replicas.router_id(),
            };
            match announce_self(d, reg).await {
                Ok((stop, task)) => {
                    shutdown.push(stop);
                    tasks.push(task);
                }
                Err(e) => {
                    listener::stop_all(shutdown, tasks).await;
                    router.stop().await;
                    return Err(e);
                }
            }
        }
        tracing::info!(%addr, ?admin_addr, endpoint = %cfg.endpoint,
            block_size = cfg.router_block_size, "router listening");
        Ok(Self {
            addr,
            admin_addr,
            fleet,
            endpoint: cfg.endpoint,
            router,
            shutdown,
            tasks,
        })
    }

    /// Base URL of the router API (`http://host:port`; calls under `/v1/router`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Base URL of the admin API.
    pub fn admin_url(&self) -> Option<String> {
        self.admin_addr.map(|a| format!("http://{a}"))
    }

    /// Its router, to call in-process.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Stop serving (open streams are cut), the health checks and the event subscribers.
    pub async fn stop(self) {
        listener::stop_all(self.shutdown, self.tasks).await;
        self.router.stop().await;
    }
}

/// Announce this router in discovery until the returned sender fires (its registration is
/// then removed). Errors: the backend cannot be written.
async fn announce_self(
    d: Discovery,
    reg: RouterRegistration,
) -> anyhow::Result<(oneshot::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready, is_ready) = oneshot::channel();
    let task = tokio::spawn(async move {
        let r = routers::announce(&d, &reg, ready, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(e) = r {
            tracing::warn!("cannot announce the router in discovery: {e}");
        }
    });
    if is_ready.await.is_err() {
        let _ = task.await;
        anyhow::bail!("cannot announce the router in discovery (see the log)");
    }
    Ok((stop, task))
}
