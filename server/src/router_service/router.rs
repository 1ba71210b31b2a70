//! [`Router`]: the standalone router's operations as library calls, without HTTP. The router
//! API's handlers ([`super::handlers`]) parse a body, call one of these methods and answer
//! its result as JSON; the Python package's `KvRouter` calls the same methods in-process.
//! One implementation of each operation, whoever the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvrouter_core::sequences::SequenceError;
use kvrouter_core::{RouteError, RouterConfig, RouterEvent, SelectError, WorkerWithDpRank};
use tokio::task::JoinHandle;

use super::api::{
    BestWorker, BestWorkerRequest, LoadOut, LoadsRequest, OverlapRequest, OverlapScoresOut,
};
use super::generate::{GenerateRequest, Generation};
use super::RouterServiceConfig;
use crate::error::{route_error, ApiError};
use crate::metrics::Metrics;
use crate::routing::RouterState;
use crate::workers::client::WorkerClient;
use crate::workers::fleet::{EventSettings, Fleet};
use crate::workers::spec::WorkerSpec;

/// What kind of failure a [`RouterError`] is, for callers that are not HTTP clients (the
/// Python binding raises one exception class per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument: an empty prompt or request id, a field that cannot be honoured, an
    /// invalid `router_config_override`, a worker's own refusal of the request (4xx).
    InvalidArgument,
    /// A request id that is not booked (never, already freed, expired, or its worker left).
    UnknownRequest,
    /// A request id booked already.
    DuplicateRequest,
    /// No worker can take the request: none healthy, none with the asked rank, the pinned
    /// worker is not in the routing set, or every one tried was unreachable.
    WorkerUnavailable,
    /// Every eligible worker (or the pinned one) is past a busy threshold.
    AllWorkersBusy,
    /// Every worker is busy and the router queue is full.
    QueueFull,
    /// The worker failed the request (timeout, 5xx, overloaded, broken stream).
    WorkerFailed,
    /// A bug or an unexpected state.
    Internal,
}

/// A failed router call: its [`ErrorKind`] and the HTTP answer the router API gives for it
/// (status, OpenAI-shaped message, the parameter at fault).
#[derive(Debug, Clone)]
pub struct RouterError {
    pub kind: ErrorKind,
    pub api: ApiError,
}

impl RouterError {
    /// `api` with its kind.
    pub fn new(kind: ErrorKind, api: ApiError) -> Self {
        Self { kind, api }
    }

    /// A 400 bad argument.
    pub fn invalid(api: ApiError) -> Self {
        Self::new(ErrorKind::InvalidArgument, api)
    }

    /// A routing failure; a pinned worker is named by the router API's field (`worker_id`).
    pub fn routing(e: RouteError) -> Self {
        let kind = route_kind(&e);
        let api = match e {
            RouteError::Booking(e) => return Self::booking(e),
            RouteError::Select(SelectError::PinnedWorkerNotFound(w)) => {
                ApiError::not_found(format!("worker {w} (worker_id) is not in the routing set"))
                    .param("worker_id")
            }
            e => route_error(e),
        };
        Self::new(kind, api)
    }

    /// 404 for an id that is not booked, 409 for one booked already.
    pub fn booking(e: SequenceError) -> Self {
        match e {
            SequenceError::UnknownRequest(id) => Self::new(
                ErrorKind::UnknownRequest,
                ApiError::not_found(format!(
                    "unknown request id `{id}`: never booked, already freed, expired, or its worker was removed"
                ))
                .param("request_id"),
            ),
            SequenceError::DuplicateRequest(id) => Self::new(
                ErrorKind::DuplicateRequest,
                ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    format!("request id `{id}` is already booked; free it first or use another id"),
                )
                .param("request_id"),
            ),
        }
    }

    /// An error from sending the request to a worker (after routing): a worker's refusal
    /// (4xx) is a bad argument, 503 means no worker could take it, the rest are failures.
    pub(super) fn worker(api: ApiError) -> Self {
        let kind = match api.status.as_u16() {
            400..=499 if api.status != StatusCode::TOO_MANY_REQUESTS => ErrorKind::InvalidArgument,
            503 => ErrorKind::WorkerUnavailable,
            _ => ErrorKind::WorkerFailed,
        };
        Self::new(kind, api)
    }
}

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.api.message)
    }
}

impl std::error::Error for RouterError {}

impl From<ApiError> for RouterError {
    /// An error of the HTTP layer (body, JSON): a bad argument when 4xx.
    fn from(api: ApiError) -> Self {
        let kind = if api.status.is_client_error() {
            ErrorKind::InvalidArgument
        } else {
            ErrorKind::Internal
        };
        Self::new(kind, api)
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        self.api.into_response()
    }
}

/// The kind of a routing failure.
pub(super) fn route_kind(e: &RouteError) -> ErrorKind {
    match e {
        RouteError::Select(s) => match s {
            SelectError::AllWorkersBusy(_) | SelectError::PinnedWorkerBusy(_) => {
                ErrorKind::AllWorkersBusy
            }
            SelectError::NoWorkers
            | SelectError::NoWorkerWithRank(_)
            | SelectError::PinnedWorkerNotFound(_) => ErrorKind::WorkerUnavailable,
            SelectError::MissingPinnedWorker | SelectError::InvalidOverride(_) => {
                ErrorKind::InvalidArgument
            }
        },
        RouteError::Booking(SequenceError::UnknownRequest(_)) => ErrorKind::UnknownRequest,
        RouteError::Booking(SequenceError::DuplicateRequest(_)) => ErrorKind::DuplicateRequest,
        RouteError::QueueFull(_) => ErrorKind::QueueFull,
    }
}

/// 400 unless `id` is a usable request id (non-empty).
fn request_id(id: &str) -> Result<&str, RouterError> {
    if id.is_empty() {
        return Err(RouterError::invalid(
            ApiError::bad_request("`request_id` must not be empty").param("request_id"),
        ));
    }
    Ok(id)
}

/// The router of one endpoint's workers: their registrations, KV event subscribers and
/// health checks, the routing state, and the client that sends them requests. Every method
/// is safe to call from many tasks and threads at once. Methods that are not `async` take
/// microseconds (hashing the prompt and reading the index under short locks) and never wait
/// on the network.
///
/// Started by [`Router::start`] (inside a Tokio runtime, which then runs its background
/// tasks); stopped by [`Router::stop`].
pub struct Router {
    fleet: Arc<Fleet>,
    client: WorkerClient,
    metrics: Arc<Metrics>,
    endpoint: Option<String>,
    /// Ids of `generate` requests (logs, `x-request-id`), from a random start per process.
    next_id: AtomicU64,
    /// The health loop.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Its NATS event plane (`--event-plane nats`).
    event_plane: Mutex<Option<crate::replicas::NatsEventPlane>>,
}

impl Router {
    /// Register the workers of `cfg` (`--worker`, `--workers-file`) plus `workers` that serve
    /// `cfg.endpoint` (others are skipped, with a log line), subscribe to their KV events and
    /// start the health checks, with the router configuration of `cfg`'s flags. No port is
    /// bound (the router API is [`super::RouterService`]'s).
    ///
    /// Errors: bad flags, a worker of the endpoint that cannot be registered (its message
    /// names it).
    pub async fn start(
        cfg: &RouterServiceConfig,
        workers: Vec<WorkerSpec>,
    ) -> anyhow::Result<Arc<Self>> {
        let config = cfg.router_config()?;
        Self::start_with(cfg, config, Some(&cfg.endpoint), workers).await
    }

    /// [`start`](Self::start) with an explicit router configuration (its `kv.use_kv_events`
    /// decides whether the workers' KV events are subscribed to) and an optional endpoint:
    /// `None` routes to every worker given, whatever endpoint it serves. `cfg` gives the block
    /// size, the worker sources, timeouts and health policy.
    ///
    /// Errors: an invalid configuration, a worker that cannot be registered.
    pub async fn start_with(
        cfg: &RouterServiceConfig,
        config: RouterConfig,
        endpoint: Option<&str>,
        workers: Vec<WorkerSpec>,
    ) -> anyhow::Result<Arc<Self>> {
        config.kv.validate()?;
        cfg.fleet.replicas.check_build()?;
        let metrics = Arc::new(Metrics::new());
        let use_kv_events = config.kv.use_kv_events;
        let router =
            RouterState::with_fixed_block_size(config, cfg.router_block_size, metrics.clone());
        let client = WorkerClient::new(cfg.fleet.worker_timeout());
        let fleet = Fleet::new(
            router,
            client.clone(),
            EventSettings::of(&cfg.fleet, use_kv_events),
            cfg.fleet.health_policy(),
        );
        let fleet = Arc::new(match endpoint {
            Some(e) => fleet.serving_endpoint(e.to_string()),
            None => fleet,
        });
        let discovery = cfg.fleet.dynamic_discovery()?;
        // Before any worker or request: every booking is announced.
        let sync_endpoint = endpoint.unwrap_or(crate::workers::spec::DEFAULT_ENDPOINT);
        let replicas = &cfg.fleet.replicas.resolved();
        let sync = crate::replicas::start_sync(replicas, sync_endpoint, &fleet.router, &metrics);
        let sync = sync.await?;
        let mut all = cfg.fleet.static_workers()?;
        all.extend(workers);
        let (ours, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| fleet.serves(w));
        for w in &others {
            tracing::info!(url = %w.url, endpoint = w.endpoint(), routed = ?endpoint,
                "worker of another endpoint skipped");
        }
        if let Err(e) = fleet.register_all(ours).await {
            if let Some(t) = sync {
                t.abort();
            }
            fleet.shutdown().await;
            return Err(e);
        }
        let event_plane = match crate::replicas::start_event_plane(replicas, &fleet, &metrics).await
        {
            Ok(p) => p,
            Err(e) => {
                fleet.shutdown().await;
                return Err(e);
            }
        };
        let mut tasks = vec![fleet.spawn_health_loop()];
        tasks.extend(sync);
        if let Some(d) = discovery {
            tasks.push(d.spawn_watch(fleet.clone(), metrics.clone()));
        }
        Ok(Arc::new(Self {
            fleet,
            client,
            metrics,
            endpoint: endpoint.map(str::to_string),
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            tasks: Mutex::new(tasks),
            event_plane: Mutex::new(event_plane),
        }))
    }

    /// Stop the health checks and the KV event subscribers. Routing calls still answer
    /// afterwards, from a state that no longer changes.
    pub async fn stop(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let plane = self
            .event_plane
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = plane {
            p.stop().await;
        }
        self.fleet.shutdown().await;
    }

    /// Its workers and routing state.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Its metrics (routing overhead, decisions, KV events, …).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The endpoint routed, if one was given.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    pub(super) fn client(&self) -> &WorkerClient {
        &self.client
    }

    /// A fresh id for a `generate` request.
    pub(super) fn next_request_id(&self) -> String {
        format!("gen-{:x}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The best rank for `req.token_ids` (spec §11 `best_worker`). Without `req.request_id`
    /// a pure query: loads, indexes and the round-robin cursor are left as they were. With
    /// one, the request is booked on the rank under that id until [`free`](Self::free) (or
    /// the booking expiry).
    ///
    /// Errors: an empty prompt or request id, an invalid override ([`ErrorKind::InvalidArgument`]);
    /// no worker ([`ErrorKind::WorkerUnavailable`]), all busy; an id already booked.
    pub fn best_worker(&self, req: &BestWorkerRequest) -> Result<BestWorker, RouterError> {
        super::api::non_empty(&req.token_ids).map_err(RouterError::invalid)?;
        let input = req.route_input();
        let router = &self.fleet.router;
        let sel = match &req.request_id {
            None => router.query(&input),
            Some(id) => router.book_external(&input, request_id(id)?),
        }
        .map_err(RouterError::routing)?;
        let mut out = BestWorker::from(&sel);
        out.registration = self
            .fleet
            .registry
            .get(out.worker_id)
            .map(|w| w.spec.clone());
        Ok(out)
    }

    /// The request booked under `id` produced its first token: its prompt leaves the
    /// prefill load. Errors: an empty id; [`ErrorKind::UnknownRequest`].
    pub fn mark_prefill_complete(&self, id: &str) -> Result<(), RouterError> {
        self.fleet
            .router
            .external_prefill_complete(request_id(id)?)
            .map_err(RouterError::booking)
    }

    /// The request booked under `id` ended: release its load. Returns the rank it was
    /// booked on. Errors: an empty id; [`ErrorKind::UnknownRequest`].
    pub fn free(&self, id: &str) -> Result<WorkerWithDpRank, RouterError> {
        self.fleet
            .router
            .free_external(request_id(id)?)
            .map_err(RouterError::booking)
    }

    /// Per rank in the routing set, its load if the request were added (spec §11
    /// `get_potential_loads`). Changes nothing.
    pub fn potential_loads(&self, req: &LoadsRequest) -> Vec<LoadOut> {
        let loads = self.fleet.router.potential_loads(&req.route_input());
        loads.iter().map(LoadOut::from).collect()
    }

    /// Per rank in the routing set, the blocks of the prompt's prefix cached there, by tier
    /// (spec §11 `get_overlap_scores`). Changes nothing. Errors: an invalid
    /// `router_config_override` (validated, then ignored, as in the reference).
    pub fn overlap_scores(&self, req: &OverlapRequest) -> Result<OverlapScoresOut, RouterError> {
        if let Some(o) = &req.router_config_override {
            o.validate().map_err(|e| {
                RouterError::invalid(
                    ApiError::bad_request(format!("invalid router_config_override: {e}"))
                        .param("router_config_override"),
                )
            })?;
        }
        let report = self.fleet.router.overlap_scores(&req.route_input());
        Ok(OverlapScoresOut::from(report))
    }

    /// The exact index as router events (spec §3.1 `RouterEvent`, `Stored` events rebuilding
    /// it, every storage tier).
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        self.fleet.router.dump_events()
    }

    /// Route `req`, book it, start it on the chosen worker and return its output as a stream
    /// of chunks ([`Generation`]). Prefill is marked complete at the first token and the
    /// booking freed when the stream ends, fails, or is dropped.
    ///
    /// Errors: a field that cannot be honoured or an empty prompt
    /// ([`ErrorKind::InvalidArgument`]), routing failures, the worker's refusal or failure
    /// before streaming.
    pub async fn generate(
        self: &Arc<Self>,
        req: GenerateRequest,
    ) -> Result<Generation, RouterError> {
        super::generate::start(self, req).await
    }
}
