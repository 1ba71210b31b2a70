//! The OpenAI-compatible API. A request moves forward through this folder's files:
//!
//! 1. [`completion`] — read the body, parse it ([`request`]), route and book it
//!    ([`crate::routing`]), start it on the chosen worker ([`crate::workers::client`]) — split
//!    over a prefill and a decode worker in a disaggregated fleet ([`disagg`]), or through the
//!    pool a `--pool` policy chooses ([`pools`]); what the request then holds is a [`lease`];
//! 2. [`stream`] — the worker's chunks back to the client as OpenAI chunks or one body, shaped
//!    by [`response`]; prefill is marked complete at the first token and the booking freed at
//!    the end, on error, or when the client goes away (the response owns the booking);
//! 3. [`probes`] — the read-only routes: models, version, health, readiness, metrics;
//! 4. [`tokenize`] — `/tokenize` and `/detokenize`, through the same prompt functions as 1.

pub mod choice;
pub mod completion;
pub mod contract;
pub mod disagg;
pub mod lease;
pub mod logprobs;
pub mod pools;
pub mod probes;
pub mod reasoning;
pub mod request;
pub mod response;
pub mod stream;
pub mod tokenize;
pub mod tools;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use kvrouter_preprocess::{Preprocessor, PromptCache};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::workers::client::WorkerClient;
use crate::workers::fleet::Fleet;
use crate::workers::remote_router::RemoteRouter;
use request::Limits;

/// Response header naming the worker that served the request.
pub const WORKER_HEADER: &str = "x-kvrouter-worker-id";
/// Response header naming the data-parallel rank that served the request.
pub const DP_RANK_HEADER: &str = "x-kvrouter-dp-rank";
/// Response header: the prompt tokens the router predicted the serving worker had cached (its
/// routing decision), to compare with the usage's `prompt_tokens_details.cached_tokens`
/// (`kvrouter doctor`). Absent when another router chose the worker.
pub const PREDICTED_CACHED_HEADER: &str = "x-kvrouter-predicted-cached-tokens";
/// Response header: the prefill worker of a disaggregated request.
pub const PREFILL_WORKER_HEADER: &str = "x-kvrouter-prefill-worker-id";
/// Response header: the router pool (`--pool NAME=URL`) that chose the worker.
pub const POOL_HEADER: &str = "x-kvrouter-pool";
/// Response header with the request's id (also in every log line about it).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How request bodies are turned into token ids.
pub struct Preprocessing {
    pub pre: Arc<Preprocessor>,
    /// Tokenized prompt prefixes (`None`: off).
    pub cache: Option<Arc<PromptCache>>,
    /// Bodies larger than this are parsed on the blocking pool, not on the async threads.
    pub inline_bytes: usize,
    /// Parses running on the blocking pool at once, at most.
    pub slots: Arc<Semaphore>,
}

/// What every handler shares.
pub struct AppState {
    pub model_name: String,
    pub pre: Arc<Preprocessor>,
    pub preprocessing: Preprocessing,
    pub limits: Limits,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body once its head has arrived.
    pub body_timeout: Duration,
    pub fleet: Arc<Fleet>,
    pub client: WorkerClient,
    pub metrics: Arc<Metrics>,
    pub(crate) next_id: AtomicU64,
    /// `--conditional-disagg` and its threshold.
    pub disagg: disagg::DisaggConfig,
    /// `--prefill-router`: the `kvrouter router` that chooses prefill workers.
    pub prefill_router: Option<Arc<RemoteRouter>>,
    /// `--pool`: routers that choose the worker, one per pool.
    pub pools: Option<pools::Pools>,
}

impl AppState {
    /// Shared state; request ids start at 1.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model_name: String,
        preprocessing: Preprocessing,
        limits: Limits,
        max_body_bytes: usize,
        body_timeout: Duration,
        fleet: Arc<Fleet>,
        client: WorkerClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model_name,
            pre: preprocessing.pre.clone(),
            preprocessing,
            limits,
            max_body_bytes,
            body_timeout,
            fleet,
            client,
            metrics,
            // A random start: response, request and tool-call ids differ between processes
            // (frontend replicas, restarts), so logs and clients never see one id twice.
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            disagg: disagg::DisaggConfig::default(),
            prefill_router: None,
            pools: None,
        }
    }
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completion::completions))
        .route("/v1/chat/completions", post(completion::chat_completions))
        .route("/v1/models", get(probes::models))
        .route("/v1/models/{*id}", get(probes::model))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/version", get(probes::version))
        .route("/health", get(probes::health))
        .route("/live", get(probes::live))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(probes::metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}
