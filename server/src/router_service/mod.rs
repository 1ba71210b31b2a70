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
//! `kvrouter_router_expired_requests_total`. The router always starts with empty state
//! (`--router-reset-states` is accepted and changes nothing): the index fills from the
//! workers' KV events.

pub mod api;
mod config;
pub mod generate;
mod handlers;
pub mod token_ids;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{legacy_flags_used, warn_legacy_flags, RouterServiceConfig, LEGACY_FLAGS};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routing::RouterState;
use crate::workers::client::WorkerClient;
use crate::workers::fleet::{EventSettings, Fleet};
use crate::workers::spec::WorkerSpec;
use crate::{admin, listener};

/// What every handler shares.
pub(crate) struct Service {
    fleet: Arc<Fleet>,
    client: WorkerClient,
    metrics: Arc<Metrics>,
    /// The endpoint routed (`/health` names it).
    endpoint: String,
    max_body_bytes: usize,
    body_timeout: Duration,
    /// Ids of `generate` requests (logs, `x-request-id`), from a random start per process.
    next_id: AtomicU64,
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
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RouterService {
    /// Register the workers of `cfg` plus `workers` that serve `cfg.endpoint` (others are
    /// skipped, with a log line), and serve the router API and the admin API.
    ///
    /// Errors: bad flags, a port in use, a worker of the endpoint that cannot be registered.
    pub async fn start(cfg: RouterServiceConfig, workers: Vec<WorkerSpec>) -> anyhow::Result<Self> {
        let router_config = cfg.router_config()?;
        let admin_addr = cfg.fleet.admin_addr()?;
        let nofile = listener::raise_nofile_limit();
        let metrics = Arc::new(Metrics::new());
        let router = RouterState::with_fixed_block_size(
            router_config,
            cfg.router_block_size,
            metrics.clone(),
        );
        let client = WorkerClient::new(cfg.fleet.worker_timeout());
        let fleet = Fleet::new(
            router,
            client.clone(),
            EventSettings::of(&cfg.fleet, cfg.router.use_kv_events()),
            cfg.fleet.health_policy(),
        );
        let fleet = Arc::new(fleet.serving_endpoint(cfg.endpoint.clone()));
        let mut all = cfg.fleet.static_workers()?;
        all.extend(workers);
        let (ours, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| fleet.serves(w));
        for w in &others {
            tracing::info!(url = %w.url, endpoint = w.endpoint(), routed = %cfg.endpoint,
                "worker of another endpoint skipped");
        }
        fleet.register_all(ours).await?;
        if cfg.router_reset_states {
            tracing::info!("--router-reset-states: the router always starts with empty state");
        }

        let service = Arc::new(Service {
            fleet: fleet.clone(),
            client,
            metrics: metrics.clone(),
            endpoint: cfg.endpoint.clone(),
            max_body_bytes: cfg.listener.max_body_bytes,
            body_timeout: cfg.listener.body_timeout(),
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
        });
        let mut shutdown = Vec::new();
        let mut tasks = Vec::new();
        let api = listener::serve(
            cfg.http_addr()?,
            routes(service),
            cfg.listener.limits(nofile),
            "router",
            metrics.clone(),
        )
        .await?;
        let addr = api.addr;
        tasks.push(api.task);
        shutdown.push(api.shutdown);
        let admin_addr = match admin_addr {
            Some(a) => {
                let limits = cfg.fleet.admin_listener(&cfg.listener);
                let token = cfg.fleet.admin_token.clone();
                let served = admin::serve(a, fleet.clone(), token, limits, metrics).await?;
                tasks.push(served.task);
                shutdown.push(served.shutdown);
                Some(served.addr)
            }
            None => None,
        };
        tasks.push(fleet.spawn_health_loop());
        tracing::info!(%addr, ?admin_addr, endpoint = %cfg.endpoint,
            block_size = cfg.router_block_size, "router listening");
        Ok(Self {
            addr,
            admin_addr,
            fleet,
            endpoint: cfg.endpoint,
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

    /// Stop serving (open streams are cut) and stop the event subscribers.
    pub async fn stop(self) {
        listener::stop_all(self.shutdown, self.tasks).await;
        self.fleet.shutdown().await;
    }
}
