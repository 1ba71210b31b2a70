//! The server's fuzz targets' bodies, shared by `fuzz_targets/*.rs` (see `README.md`).
//!
//! * [`fuzz_request`] — one request body through the OpenAI request parser
//!   (`kvrouter_server::frontend::request::parse_request`) with the vendored Qwen3 tokenizer and
//!   chat template, under limits and an endpoint chosen by the first byte; checks the parsed
//!   request's invariants.
//! * [`fuzz_http`] — raw bytes as one HTTP/1.1 connection into the real API router (no
//!   workers), served by hyper over an in-memory pipe, once with half-close support and once
//!   as the listener serves it; must answer and close, never panic or hang.
//!
//! Both must never panic: a panic is a finding.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use kvrouter_preprocess::Preprocessor;
use kvrouter_server::frontend::request::{parse_request, Endpoint, Limits};
use kvrouter_server::frontend::AppState;
use kvrouter_server::metrics::Metrics;
use kvrouter_server::routing::RouterState;
use kvrouter_server::workers::client::WorkerClient;
use kvrouter_server::workers::fleet::{EventSettings, Fleet, HealthPolicy};
use kvrouter_server::{FrontendConfig, VENDORED_MODEL_NAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The vendored tokenizer and chat template (`models/qwen3`), loaded once per process.
pub fn preprocessor() -> &'static Arc<Preprocessor> {
    static PRE: OnceLock<Arc<Preprocessor>> = OnceLock::new();
    PRE.get_or_init(|| {
        let dir = kvrouter_server::vendored_model_dir();
        Arc::new(
            Preprocessor::from_model_dir(&dir)
                .unwrap_or_else(|e| panic!("loading the tokenizer from {}: {e}", dir.display())),
        )
    })
}

/// Loads what the `request` target shares (the tokenizer), so its first input is not slow.
pub fn init_request() {
    let _ = preprocessor();
}

/// Builds what the `http` target shares (runtime, state, router), likewise.
pub fn init_http() {
    let _ = http_env();
}

/// The model's context length, as the frontend derives it by default.
fn model_context() -> usize {
    preprocessor().context_length().unwrap_or(32_768)
}

// ---------------------------------------------------------------------------------------------
// `request`

/// Limits the `request` target picks from (bits 2–4 of the first byte): tiny, small and large
/// contexts, a generation cap below, equal to and above the context, and the extremes.
fn limits_preset(i: u8) -> (usize, u64) {
    let ctx = model_context();
    match i & 7 {
        0 => (1, 1),
        1 => (16, 4),
        2 => (16, 1_000),
        3 => (256, 64),
        4 => (4_096, 4_096),
        5 => (ctx, ctx as u64),
        6 => (ctx, 1),
        _ => (usize::MAX, u64::MAX),
    }
}

/// First byte: bit 0 the endpoint (completions / chat completions), bit 1 whether clients may
/// steer routing, bits 2–4 the limits ([`limits_preset`]), bit 5 whether the prompt cache is
/// used (its ids are checked against a fresh encode); the rest is the body.
pub fn fuzz_request(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let endpoint = if sel & 1 == 0 {
        Endpoint::Completions
    } else {
        Endpoint::ChatCompletions
    };
    let (context_length, max_tokens) = limits_preset(sel >> 2);
    let limits = Limits {
        context_length,
        max_tokens,
        client_routing: sel & 2 != 0,
    };
    let pre = preprocessor();
    static CACHE: OnceLock<kvrouter_preprocess::PromptCache> = OnceLock::new();
    let cache = (sel & 32 != 0)
        .then(|| CACHE.get_or_init(|| kvrouter_preprocess::PromptCache::new(1 << 16)));
    let parsed = parse_request(endpoint, body, VENDORED_MODEL_NAME, pre, cache, limits);
    if cache.is_some() {
        // The cache must never change the ids: parse again without it.
        let fresh = parse_request(endpoint, body, VENDORED_MODEL_NAME, pre, None, limits);
        match (&parsed, &fresh) {
            (Ok(a), Ok(b)) => assert_eq!(a.tokens, b.tokens, "prompt cache changed the ids"),
            (Err(_), Err(_)) => {}
            _ => panic!("prompt cache changed the outcome"),
        }
    }
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            // What the client would see: must be shapeable too.
            let _ = serde_json::to_vec(&e.body());
            return;
        }
    };
    let vocab = pre.vocab_size();
    assert_eq!(req.endpoint, endpoint);
    assert_eq!(req.model, VENDORED_MODEL_NAME);
    assert!(!req.tokens.is_empty(), "accepted an empty prompt");
    if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        panic!("token id {t} outside the vocabulary (size {vocab})");
    }
    assert!(
        req.tokens.len() as u128 + req.max_tokens as u128 <= limits.context_length as u128,
        "prompt {} + max_tokens {} exceeds the context {}",
        req.tokens.len(),
        req.max_tokens,
        limits.context_length
    );
    assert!(
        (1..=limits.max_tokens).contains(&req.max_tokens),
        "max_tokens {} outside 1..={}",
        req.max_tokens,
        limits.max_tokens
    );
    if !limits.client_routing {
        assert!(
            req.backend_instance_id.is_none() && req.dp_rank.is_none() && req.overrides.is_none(),
            "client routing is off but the request steers it: worker {:?}, dp_rank {:?}, overrides {:?}",
            req.backend_instance_id,
            req.dp_rank,
            req.overrides
        );
    }
    // The body sent to the worker must serialize.
    let wb = req.worker_body(VENDORED_MODEL_NAME);
    assert!(serde_json::to_vec(&wb).is_ok());
}

// ---------------------------------------------------------------------------------------------
// `http`

/// Largest accepted body in the `http` target: small, so the fuzzer reaches the 413 path
/// within its input length.
pub const HTTP_MAX_BODY_BYTES: usize = 1_024;
/// Time the exchange gets before the client side gives up and closes (then the server gets
/// [`HANG_GRACE`] more to finish the connection, else it is a hang).
pub const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Extra time, on a loaded machine, before a connection still open counts as a hang.
pub const HANG_GRACE: Duration = Duration::from_secs(10);

struct Http {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    /// The listener's configuration (`listener::accept_loop`): a client's EOF cancels the
    /// request in progress, so the last request of an input is cut off (as in production
    /// when a client disconnects).
    listener: hyper::server::conn::http1::Builder,
    /// The same plus half-close: every request of the input is answered in full.
    answered: hyper::server::conn::http1::Builder,
}

fn http_env() -> &'static Http {
    static ENV: OnceLock<Http> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        // As `Frontend::start` assembles it, with the flags' defaults and no workers.
        let cfg = FrontendConfig::default();
        let router_config = cfg.router_config().unwrap_or_default();
        let app = rt.block_on(async {
            let metrics = Arc::new(Metrics::new());
            let router = RouterState::new(router_config, cfg.kv_cache_block_size, metrics.clone());
            let client = WorkerClient::new(Duration::from_secs(5));
            let fleet = Arc::new(Fleet::new(
                router,
                client.clone(),
                EventSettings::default(),
                HealthPolicy::default(),
            ));
            let context_length = model_context();
            let limits = Limits {
                context_length,
                max_tokens: context_length as u64,
                client_routing: true,
            };
            let state = Arc::new(AppState::new(
                VENDORED_MODEL_NAME.to_string(),
                preprocessor().clone(),
                limits,
                HTTP_MAX_BODY_BYTES,
                Duration::from_secs(60),
                fleet,
                client,
                metrics,
            ));
            kvrouter_server::frontend::router(state)
        });
        let mut listener = hyper::server::conn::http1::Builder::new();
        listener
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(75))
            .keep_alive(true);
        let mut answered = listener.clone();
        answered.half_close(true);
        Http {
            rt,
            app,
            listener,
            answered,
        }
    })
}

/// `data` as everything a client sends on one connection, then a half-close, served twice:
/// with half-close support (every request answered) and as the listener serves it (the last
/// request cancelled by the EOF). Returns both answers (the bytes the server sent until it
/// closed the connection). Panics if a connection is still open [`HTTP_READ_TIMEOUT`] +
/// [`HANG_GRACE`] after the client stopped sending.
pub fn fuzz_http(data: &[u8]) -> [Vec<u8>; 2] {
    let env = http_env();
    [
        one_connection(env, &env.answered, data),
        one_connection(env, &env.listener, data),
    ]
}

fn one_connection(env: &Http, http: &hyper::server::conn::http1::Builder, data: &[u8]) -> Vec<u8> {
    env.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = http
            .serve_connection(
                TokioIo::new(server),
                TowerToHyperService::new(env.app.clone()),
            )
            .with_upgrades();
        let mut served = tokio::spawn(async move {
            // Errors are the client's (malformed head, early close): not findings.
            let _ = conn.await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut out = Vec::new();
        let exchange = async {
            let write = async {
                // The server may close before reading everything (e.g. after a 400).
                let _ = wr.write_all(data).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let _ = rd.read_to_end(&mut out).await;
            };
            tokio::join!(write, read);
        };
        let done = tokio::time::timeout(HTTP_READ_TIMEOUT, exchange).await.is_ok();
        if !done {
            // The client gives up and closes: the server must then finish on its own.
            drop(rd);
            drop(wr);
        }
        match tokio::time::timeout(HANG_GRACE, &mut served).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(_)) => {}
            Err(_) => {
                served.abort();
                panic!(
                    "connection still open {:?} after the client stopped sending (answer so far: {:?})",
                    HTTP_READ_TIMEOUT + HANG_GRACE,
                    String::from_utf8_lossy(&out)
                );
            }
        }
        out
    })
}
