//! # kvrouter-server
//!
//! The frontend: an OpenAI-compatible HTTP API with the router embedded. Modules in the order
//! a request crosses them (`docs/DESIGN.md`):
//!
//! 1. [`http`] — the API; [`openai`] — request parsing, tokenization, response shapes;
//! 2. [`routing`] — hashing, lock-free index lookup, scheduling and booking (the core);
//! 3. [`worker_client`] — the streamed call to the chosen worker;
//! 4. [`fleet`] / [`registry`] — workers, their KV event subscribers and health;
//!    [`admin`] — runtime registration; [`metrics`] — Prometheus;
//! 5. [`up`] — the embedded default: frontend + in-process mock workers.

pub mod admin;
pub mod config;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod registry;
pub mod routing;
pub mod up;
pub mod worker_client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use kvrouter_preprocess::Preprocessor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::FrontendConfig;
pub use registry::WorkerSpec;

use fleet::Fleet;
use metrics::Metrics;
use openai::Limits;
use routing::RouterState;
use worker_client::WorkerClient;

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
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Frontend {
    /// Load the tokenizer, register the workers of `cfg` plus `workers`, and serve.
    ///
    /// Errors: bad flags, an unreadable model directory, a port in use, a worker that cannot
    /// be registered.
    pub async fn start(cfg: FrontendConfig, workers: Vec<WorkerSpec>) -> anyhow::Result<Self> {
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
        let context_length = cfg
            .context_length
            .or(pre.context_length())
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);

        let metrics = Arc::new(Metrics::new());
        let router = RouterState::new(router_config, cfg.kv_cache_block_size, metrics.clone());
        let client = WorkerClient::new(Duration::from_secs_f64(cfg.worker_timeout_secs));
        let fleet = Arc::new(Fleet::new(router, client.clone(), cfg.use_kv_events()));
        let mut all = cfg.static_workers()?;
        all.extend(workers);
        for spec in all {
            let url = spec.url.clone();
            let f = fleet.clone();
            tokio::task::spawn_blocking(move || f.register(spec))
                .await?
                .with_context(|| format!("registering worker {url}"))?;
        }

        let state = Arc::new(http::AppState::new(
            model_name.clone(),
            Arc::new(pre),
            Limits { context_length },
            cfg.max_body_bytes,
            fleet.clone(),
            client,
            metrics,
        ));
        let mut shutdown = Vec::new();
        let mut tasks = Vec::new();
        let (addr, t, s) = serve(cfg.http_addr()?, http::router(state)).await?;
        tasks.push(t);
        shutdown.push(s);
        let admin_addr = match cfg.admin_addr()? {
            Some(a) => {
                let (addr, t, s) =
                    serve(a, admin::router(fleet.clone(), cfg.admin_token.clone())).await?;
                tasks.push(t);
                shutdown.push(s);
                Some(addr)
            }
            None => None,
        };
        tasks.push(fleet.spawn_health_loop(Duration::from_millis(cfg.health_interval_ms.max(10))));
        tracing::info!(%addr, ?admin_addr, model = %model_name, mode = %cfg.router_mode, "frontend listening");
        Ok(Self {
            addr,
            admin_addr,
            fleet,
            model_name,
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
        for s in self.shutdown {
            let _ = s.send(());
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        self.fleet.shutdown().await;
    }
}

async fn serve(
    addr: SocketAddr,
    app: axum::Router,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>, oneshot::Sender<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    // Streamed tokens must leave at once: no Nagle delay on any accepted socket.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("server on {local} failed: {e}");
        }
    });
    Ok((local, task, tx))
}
