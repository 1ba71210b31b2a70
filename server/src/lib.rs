//! # kvrouter-server
//!
//! The frontend: an OpenAI-compatible HTTP API with the router embedded. Modules in the order
//! a request crosses them (`docs/DESIGN.md`):
//!
//! 1. [`listener`] — connections within limits; [`frontend`] — the API: request parsing,
//!    tokenization, streaming back, response shapes; [`error`] — what clients see on failure;
//! 2. [`routing`] — hashing, lock-free index lookup, scheduling and booking (the core);
//! 3. [`workers`] — the call to the chosen worker, the registry with health states
//!    (healthy → suspect → removed) and KV event subscribers;
//! 4. [`admin`] — runtime registration; [`metrics`] — Prometheus; [`config`] — the flags;
//! 5. [`replicas`] — several routers over NATS: event stream, snapshots, replica sync;
//! 6. `up` (feature `embedded`) — the embedded default: frontend + in-process mock workers.
//!
//! [`router_service`] is the other server: `kvrouter router`, the standalone router (the
//! same routing, workers and admin API, with a JSON API of the reference's router calls
//! instead of the OpenAI one).

pub mod admin;
pub mod body;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod frontend;
pub mod listener;
pub mod metrics;
pub mod replicas;
pub mod router_service;
pub mod routing;
pub mod sse;
#[cfg(feature = "embedded")]
pub mod up;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use kvrouter_preprocess::Preprocessor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::FrontendConfig;
pub use workers::spec::WorkerSpec;

use frontend::request::Limits;
use frontend::AppState;
use metrics::Metrics;
use routing::RouterState;
use workers::client::WorkerClient;
use workers::fleet::{EventSettings, Fleet};

/// The Qwen3 tokenizer and chat template vendored in the repository (`models/qwen3`).
pub fn vendored_model_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/qwen3"))
}

/// Served name of the vendored model.
pub const VENDORED_MODEL_NAME: &str = "Qwen/Qwen3-0.6B";

/// Context length when neither the flag nor the tokenizer config gives one.
const DEFAULT_CONTEXT_LENGTH: usize = 32_768;

/// A running frontend.
pub struct Frontend {
    /// Where the OpenAI API listens.
    pub addr: SocketAddr,
    /// Where the admin API listens, if served.
    pub admin_addr: Option<SocketAddr>,
    /// Its workers.
    pub fleet: Arc<Fleet>,
    /// Served model name.
    pub model_name: String,
    /// Its NATS event plane (`--event-plane nats`).
    pub event_plane: Option<replicas::NatsEventPlane>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Frontend {
    /// Load the tokenizer, register the workers of `cfg` plus `workers`, and serve.
    ///
    /// Errors: bad flags, an unreadable model directory, a port in use, a worker that cannot
    /// be registered.
    pub async fn start(mut cfg: FrontendConfig, workers: Vec<WorkerSpec>) -> anyhow::Result<Self> {
        cfg.fleet.replicas = cfg.fleet.replicas.resolved();
        cfg.fleet.replicas.check_build()?;
        let router_config = cfg.router_config()?;
        let (model_dir, default_name) = match &cfg.model_path {
            Some(p) => {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into());
                (p.clone(), name)
            }
            None => (vendored_model_dir(), VENDORED_MODEL_NAME.to_string()),
        };
        let model_name = cfg.model_name.clone().unwrap_or(default_name);
        let dir = model_dir.clone();
        let pre = tokio::task::spawn_blocking(move || Preprocessor::from_model_dir(&dir))
            .await?
            .with_context(|| format!("loading the tokenizer from {}", model_dir.display()))?;
        tracing::info!(model = %model_dir.display(), "tokenizer: {}", pre.encode_path());
        let context_length = cfg
            .context_length
            .or(pre.context_length())
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);

        let admin_addr = cfg.fleet.admin_addr()?;
        let discovery = cfg.fleet.dynamic_discovery()?;
        let nofile = listener::raise_nofile_limit();
        let metrics = Arc::new(Metrics::new());
        let router = RouterState::new(router_config, cfg.kv_cache_block_size, metrics.clone());
        let client = WorkerClient::new(cfg.fleet.worker_timeout());
        let fleet = Arc::new(Fleet::new(
            router,
            client.clone(),
            EventSettings::of(&cfg.fleet, cfg.use_kv_events()),
            cfg.fleet.health_policy(),
        ));
        // Before any worker or request: every booking is announced.
        let endpoint = workers::spec::DEFAULT_ENDPOINT;
        let sync = replicas::start_sync(&cfg.fleet.replicas, endpoint, &fleet.router, &metrics);
        let sync = sync.await?;
        let mut all = cfg.static_workers()?;
        all.extend(workers);
        if let Err(e) = fleet.register_all(all).await {
            sync.iter().for_each(JoinHandle::abort);
            return Err(e);
        }
        let event_plane =
            replicas::start_event_plane(&cfg.fleet.replicas, &fleet, &metrics).await?;

        let limits = Limits {
            context_length,
            max_tokens: cfg.max_tokens_limit.unwrap_or(context_length as u64).max(1),
            client_routing: !cfg.no_client_routing_overrides,
            tool_parser: cfg.tool_call_parser,
            reasoning_parser: cfg.reasoning_parser,
        };
        let preprocessing = frontend::Preprocessing {
            pre: Arc::new(pre),
            cache: (cfg.prompt_cache_tokens > 0).then(|| {
                Arc::new(kvrouter_preprocess::PromptCache::new(
                    cfg.prompt_cache_tokens,
                ))
            }),
            inline_bytes: cfg.inline_parse_bytes,
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.preprocess_threads())),
        };
        let mut app = AppState::new(
            model_name.clone(),
            preprocessing,
            limits,
            cfg.listener.max_body_bytes,
            cfg.listener.body_timeout(),
            fleet.clone(),
            client,
            metrics.clone(),
        );
        app.disagg = frontend::disagg::DisaggConfig {
            conditional: cfg.conditional_disagg,
            isl_threshold: cfg.disagg_isl_threshold,
        };
        if let Some(t) = cfg.prefill_router.as_deref().filter(|t| !t.contains("://")) {
            workers::spec::validate_endpoint_name(t)
                .map_err(|e| anyhow::anyhow!("--prefill-router: {e}"))?;
        }
        app.prefill_router = cfg
            .prefill_router
            .as_deref()
            .map(|u| workers::remote_router::RemoteRouter::new("prefill", u, app.client.clone()));
        if !cfg.pools.is_empty() {
            let pools = frontend::pools::Pools::new(
                &cfg.pools,
                cfg.pool_policy,
                &cfg.pool_isl,
                &app.client,
            )
            .map_err(anyhow::Error::msg)?;
            app.pools = Some(pools);
        }
        // Routers named by endpoint: their replicas come from discovery.
        let mut followed = Vec::new();
        let named = app
            .prefill_router
            .iter()
            .chain(app.pools.iter().flat_map(|p| p.routers()));
        for r in named.filter(|r| r.endpoint().is_some()) {
            let Some(d) = discovery.as_ref().filter(|d| d.follows_routers()) else {
                anyhow::bail!(
                    "router `{}` is given by endpoint name: its replicas come from discovery; \
                     give --discovery-backend file or etcd (in Kubernetes, give the router's \
                     Service URL)",
                    r.name
                );
            };
            followed.push(workers::discovery::routers::follow(d.clone(), r.clone()));
        }
        let state = Arc::new(app);
        let mut shutdown = Vec::new();
        let mut tasks = followed;
        tasks.extend(sync);
        let api = listener::serve(
            cfg.http_addr()?,
            frontend::router(state),
            cfg.listener.limits(nofile),
            "api",
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
                let served = admin::serve(a, fleet.clone(), token, limits, metrics.clone()).await?;
                tasks.push(served.task);
                shutdown.push(served.shutdown);
                Some(served.addr)
            }
            None => None,
        };
        tasks.push(fleet.spawn_health_loop());
        if let Some(d) = discovery {
            tasks.push(d.spawn_watch(fleet.clone(), metrics.clone()));
        }
        tracing::info!(%addr, ?admin_addr, model = %model_name, mode = %cfg.router_mode, "frontend listening");
        Ok(Self {
            addr,
            admin_addr,
            fleet,
            model_name,
            event_plane,
            metrics,
            shutdown,
            tasks,
        })
    }

    /// Base URL of the OpenAI API (`http://host:port`; routes under `/v1`).
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
        if let Some(p) = self.event_plane {
            p.stop().await;
        }
        self.fleet.shutdown().await;
    }
}
