//! Disaggregated prefill/decode: the mock engine plays either role of stock engines'
//! protocols (`--disaggregation-mode prefill|decode`; `agg`, the default, serves whole
//! requests and ignores the fields below, as an engine without a KV connector does).
//!
//! **vLLM (NIXL connector, driven by vLLM's disaggregated proxy).** The proxy sends the
//! prefill worker the request with `max_tokens: 1`, `stream: false` and
//! `"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, …null}`. The
//! prefill worker computes the prompt, answers one token and, at the top level of its response,
//!
//! ```json
//! "kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
//!   "remote_engine_id": "<engine id>", "remote_block_ids": [0, 1, 2],
//!   "remote_host": "127.0.0.1", "remote_port": 8998, "remote_request_id": "cmpl-…",
//!   "tp_size": 1}
//! ```
//!
//! and holds those blocks (never evicted) until a decode worker pulls them or
//! `--kv-transfer-timeout` passes. The proxy sends the original request with these params to a
//! decode worker, which pulls the blocks ([`PullRequest`] to `POST /v1/kv_transfer/pull` on
//! `remote_host:remote_port`, the prefill worker's side channel), waits the modelled transfer
//! time ([`transfer_seconds`]) for the blocks it does not already cache, stores them in its own
//! cache (KV events `BlockStored`, as after a prefill) and decodes without computing the prompt.
//!
//! **SGLang (bootstrap rendezvous).** The router sends the same request to both workers with
//! `bootstrap_host`, `bootstrap_port` and `bootstrap_room`. The prefill worker computes the
//! prompt (one token) and holds the blocks under the room; the decode worker pulls by room from
//! `bootstrap_host:bootstrap_port` — the same side channel — and the pull waits (up to the
//! prefill worker's `--kv-transfer-timeout`) for that room's prefill to finish.
//!
//! The side channel of a prefill worker listens on `--disaggregation-bootstrap-port` (SGLang's
//! flag; base + i for worker i; 0 = a free port), and the pull route is also served on its HTTP
//! port. Errors are OpenAI-shaped: bad transfer fields are a 400, a transfer the prefill worker
//! does not hold (unknown engine, unknown, already pulled or expired blocks, a room whose
//! prefill never came) a 400 naming why, an unreachable prefill worker a 502.
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::http::{ApiError, HttpState};
use crate::transfer::{HoldSpec, PullKey};
use crate::worker::{Command, KvMode};

/// SGLang's default `--disaggregation-bootstrap-port`.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// Default `--kv-transfer-bandwidth`, GB/s: one 200 Gb/s RDMA NIC.
pub const DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS: f64 = 25.0;

/// Default `--kv-bytes-per-token`: Qwen3-0.6B's KV in bf16, K and V × 28 layers × 8 KV heads
/// × head dim 128 × 2 bytes = 114688 bytes per token.
pub const DEFAULT_KV_BYTES_PER_TOKEN: usize = 2 * 28 * 8 * 128 * 2;

/// The side-channel route a decode worker pulls a held transfer from.
pub const PULL_PATH: &str = "/v1/kv_transfer/pull";

/// `--disaggregation-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DisaggregationMode {
    /// Serves whole requests; transfer fields are ignored.
    #[default]
    #[value(alias = "aggregated", alias = "none")]
    Agg,
    /// Computes prompts and holds their KV for decode workers.
    Prefill,
    /// Pulls prompts' KV from prefill workers and decodes.
    Decode,
}

/// What a worker does, as it describes itself (worker line, `/server_info`, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Aggregated: prefill and decode.
    Both,
    /// Prefill only (disaggregated).
    Prefill,
    /// Decode only (disaggregated).
    Decode,
}

impl Role {
    /// `both`, `prefill` or `decode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl DisaggregationMode {
    /// The role it gives the worker.
    pub fn role(self) -> Role {
        match self {
            DisaggregationMode::Agg => Role::Both,
            DisaggregationMode::Prefill => Role::Prefill,
            DisaggregationMode::Decode => Role::Decode,
        }
    }

    /// The flag value (`agg`, `prefill`, `decode`).
    pub fn as_str(self) -> &'static str {
        match self {
            DisaggregationMode::Agg => "agg",
            DisaggregationMode::Prefill => "prefill",
            DisaggregationMode::Decode => "decode",
        }
    }
}

/// Seconds to move `blocks` blocks of `block_size` tokens at `bytes_per_token` over
/// `bandwidth_gbps` GB/s (10⁹ bytes/s), divided by `speedup_ratio` like every modelled time.
/// 0 when there is nothing to move, the bandwidth is 0 (no delay) or the speedup ratio is 0.
pub fn transfer_seconds(
    blocks: usize,
    block_size: usize,
    bytes_per_token: usize,
    bandwidth_gbps: f64,
    speedup_ratio: f64,
) -> f64 {
    if blocks == 0 || bandwidth_gbps <= 0.0 || speedup_ratio <= 0.0 {
        return 0.0;
    }
    let bytes = blocks as f64 * block_size as f64 * bytes_per_token as f64;
    bytes / (bandwidth_gbps * 1e9) / speedup_ratio
}

/// A worker's disaggregation settings at run time.
#[derive(Debug)]
pub struct DisaggState {
    /// Its mode.
    pub mode: DisaggregationMode,
    /// Its KV-transfer engine id (vLLM's `remote_engine_id`): random per worker.
    pub engine_id: String,
    /// Host decode workers reach its side channel at (prefill role).
    pub side_host: String,
    /// Port of its side channel (prefill role).
    pub side_port: Option<u16>,
    /// How long a pull by room waits at most (prefill role); also bounds the decode worker's
    /// wait for such a pull.
    pub timeout: Duration,
    /// GB/s of a KV transfer (decode role); 0 = instantaneous.
    pub bandwidth_gbps: f64,
    /// KV bytes per token (decode role).
    pub bytes_per_token: usize,
    /// The engine's `--speedup-ratio`.
    pub speedup_ratio: f64,
    /// Client for pulls (decode role).
    pub client: Option<reqwest::Client>,
}

impl DisaggState {
    /// Aggregated: no transfers.
    pub fn aggregated() -> Self {
        Self {
            mode: DisaggregationMode::Agg,
            engine_id: new_engine_id(),
            side_host: String::new(),
            side_port: None,
            timeout: crate::worker::DEFAULT_KV_TRANSFER_TIMEOUT,
            bandwidth_gbps: DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS,
            bytes_per_token: DEFAULT_KV_BYTES_PER_TOKEN,
            speedup_ratio: 1.0,
            client: None,
        }
    }
}

/// A fresh engine id, UUID-shaped like vLLM's.
pub fn new_engine_id() -> String {
    use rand::TryRngCore;
    let mut rng = rand::rngs::OsRng;
    let (a, b) = match (rng.try_next_u64(), rng.try_next_u64()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            // No OS entropy: time, pid and a counter still tell workers apart.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (t, u64::from(std::process::id()) << 32 | n)
        }
    };
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

// ---------- request fields ----------

/// The transfer fields of a completion or chat request, read by [`DisaggFields::parse`].
#[derive(Deserialize, Default)]
pub(crate) struct DisaggFields {
    #[serde(default)]
    kv_transfer_params: Option<Value>,
    #[serde(default)]
    bootstrap_host: Option<Value>,
    #[serde(default)]
    bootstrap_port: Option<Value>,
    #[serde(default)]
    bootstrap_room: Option<Value>,
}

/// Where a decode worker pulls from, per vLLM's `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteKv {
    engine_id: String,
    block_ids: Vec<u32>,
    host: String,
    port: u16,
    request_id: Option<String>,
}

/// A request's part in a KV transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TransferAsk {
    /// None: serve it whole.
    Local,
    /// Prefill worker, vLLM: hold the blocks, answer `kv_transfer_params`.
    SendVllm,
    /// Prefill worker, SGLang: hold the blocks under this room.
    SendRoom(u64),
    /// Decode worker, vLLM: pull from a prefill worker first.
    ReceiveVllm(RemoteKv),
    /// Decode worker, SGLang: pull the room's blocks from the bootstrap address first.
    ReceiveRoom { host: String, port: u16, room: u64 },
}

const P_KV: &str = "kv_transfer_params";
const P_ROOM: &str = "bootstrap_room";

fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(msg.into()).with_param(param)
}

fn flag(m: &serde_json::Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(
            format!("`kv_transfer_params.{k}` must be a boolean."),
            P_KV,
        )),
    }
}

fn text(v: Option<&Value>, what: &str, param: &'static str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(bad(format!("`{what}` must be a non-empty string."), param)),
    }
}

fn port(v: Option<&Value>, what: &str, param: &'static str) -> Result<u16, ApiError> {
    v.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            bad(
                format!("`{what}` must be a port number (1..=65535)."),
                param,
            )
        })
}

impl DisaggFields {
    /// Reads the transfer fields for a worker in `mode`. Errors (400): malformed fields, both
    /// protocols at once, batched rooms, or a transfer this role cannot serve.
    pub(crate) fn parse(&self, mode: DisaggregationMode) -> Result<TransferAsk, ApiError> {
        if mode == DisaggregationMode::Agg {
            return Ok(TransferAsk::Local);
        }
        let kv = match &self.kv_transfer_params {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => return Err(bad("`kv_transfer_params` must be an object.", P_KV)),
        };
        let vllm = match kv {
            None => TransferAsk::Local,
            Some(m) => match (flag(m, "do_remote_decode")?, flag(m, "do_remote_prefill")?) {
                (true, true) => {
                    return Err(bad(
                        "`kv_transfer_params` cannot ask for both `do_remote_decode` and `do_remote_prefill`.",
                        P_KV,
                    ))
                }
                (true, false) => TransferAsk::SendVllm,
                (false, true) => TransferAsk::ReceiveVllm(remote_kv(m)?),
                (false, false) => TransferAsk::Local,
            },
        };
        let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let sglang = present(&self.bootstrap_room)
            || present(&self.bootstrap_host)
            || present(&self.bootstrap_port);
        let ask = if sglang {
            if vllm != TransferAsk::Local {
                return Err(bad(
                    "Give either `kv_transfer_params` (vLLM) or `bootstrap_*` fields (SGLang), not both.",
                    P_KV,
                ));
            }
            let room = match &self.bootstrap_room {
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "Batched requests (a list of `bootstrap_room`) are not supported; send one prompt per request.",
                        P_ROOM,
                    ))
                }
                Some(v) => v.as_u64(),
                None => None,
            }
            .ok_or_else(|| bad("`bootstrap_room` must be a non-negative integer.", P_ROOM))?;
            match mode {
                DisaggregationMode::Prefill => TransferAsk::SendRoom(room),
                _ => TransferAsk::ReceiveRoom {
                    host: text(
                        self.bootstrap_host.as_ref(),
                        "bootstrap_host",
                        "bootstrap_host",
                    )?,
                    port: port(
                        self.bootstrap_port.as_ref(),
                        "bootstrap_port",
                        "bootstrap_port",
                    )?,
                    room,
                },
            }
        } else {
            vllm
        };
        match (&ask, mode) {
            (TransferAsk::SendVllm, DisaggregationMode::Decode) => Err(bad(
                "This is a decode worker (--disaggregation-mode decode): it cannot prefill for a remote decode (`kv_transfer_params.do_remote_decode`); send it to a prefill worker.",
                P_KV,
            )),
            (TransferAsk::ReceiveVllm(_), DisaggregationMode::Prefill) => Err(bad(
                "This is a prefill worker (--disaggregation-mode prefill): it cannot decode from a remote prefill (`kv_transfer_params.do_remote_prefill`); send it to a decode worker.",
                P_KV,
            )),
            _ => Ok(ask),
        }
    }
}

fn remote_kv(m: &serde_json::Map<String, Value>) -> Result<RemoteKv, ApiError> {
    let block_ids = m
        .get("remote_block_ids")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|b| u32::try_from(b).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| {
            bad(
                "`kv_transfer_params.remote_block_ids` must be a non-empty array of block ids.",
                P_KV,
            )
        })?;
    let request_id = match m.get("remote_request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                "`kv_transfer_params.remote_request_id` must be a string.",
                P_KV,
            ))
        }
    };
    Ok(RemoteKv {
        engine_id: text(
            m.get("remote_engine_id"),
            "kv_transfer_params.remote_engine_id",
            P_KV,
        )?,
        block_ids,
        host: text(m.get("remote_host"), "kv_transfer_params.remote_host", P_KV)?,
        port: port(m.get("remote_port"), "kv_transfer_params.remote_port", P_KV)?,
        request_id,
    })
}

impl TransferAsk {
    /// Checks the rest of the request against the transfer: one choice, and no stream for a
    /// vLLM prefill (its `kv_transfer_params` come in the final response).
    pub(crate) fn check(&self, n: usize, stream: bool) -> Result<(), ApiError> {
        if *self == TransferAsk::Local {
            return Ok(());
        }
        if n != 1 {
            return Err(bad(
                "`n` must be 1 for a request that takes part in a KV transfer.",
                "n",
            ));
        }
        if *self == TransferAsk::SendVllm && stream {
            return Err(bad(
                "A prefill for a remote decode (`kv_transfer_params.do_remote_decode`) cannot be streamed: its `kv_transfer_params` come with the final response. Set `stream: false`.",
                "stream",
            ));
        }
        Ok(())
    }

    /// The output tokens to run: an SGLang prefill computes one token whatever the request
    /// asks (its decode worker generates the answer).
    pub(crate) fn max_tokens(&self, asked: usize) -> usize {
        match self {
            TransferAsk::SendRoom(_) => asked.min(1),
            _ => asked,
        }
    }

    /// Whether the KV must be pulled before the request runs.
    pub(crate) fn is_receive(&self) -> bool {
        matches!(
            self,
            TransferAsk::ReceiveVllm(_) | TransferAsk::ReceiveRoom { .. }
        )
    }

    /// Whether the response carries `kv_transfer_params`.
    pub(crate) fn answers_params(&self) -> bool {
        *self == TransferAsk::SendVllm
    }

    /// The engine's part for the request whose response id is `request_id`.
    pub(crate) fn kv_mode(&self, request_id: &str) -> KvMode {
        let hold = |room| {
            KvMode::Send(HoldSpec {
                request_id: request_id.to_owned(),
                room,
            })
        };
        match self {
            TransferAsk::Local => KvMode::Local,
            TransferAsk::SendVllm => hold(None),
            TransferAsk::SendRoom(r) => hold(Some(*r)),
            TransferAsk::ReceiveVllm(_) | TransferAsk::ReceiveRoom { .. } => KvMode::Receive,
        }
    }
}

/// The `kv_transfer_params` of a prefill response (vLLM NIXL connector's shape).
#[derive(Serialize, Debug, Clone)]
pub(crate) struct KvTransferParams {
    do_remote_prefill: bool,
    do_remote_decode: bool,
    remote_engine_id: String,
    remote_block_ids: Vec<u32>,
    remote_host: String,
    remote_port: u16,
    remote_request_id: String,
    tp_size: u32,
}

impl KvTransferParams {
    /// What a decode worker needs to pull `block_ids` of request `request_id` from `d`.
    pub(crate) fn new(d: &DisaggState, block_ids: Vec<u32>, request_id: &str) -> Self {
        Self {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_engine_id: d.engine_id.clone(),
            remote_block_ids: block_ids,
            remote_host: d.side_host.clone(),
            remote_port: d.side_port.unwrap_or(0),
            remote_request_id: request_id.to_owned(),
            tp_size: 1,
        }
    }
}

// ---------- the side channel ----------

/// Body of `POST /v1/kv_transfer/pull`: vLLM-style (`engine_id` + `block_ids`, with
/// `request_id` when known) or SGLang-style (`bootstrap_room`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct PullRequest {
    /// `remote_engine_id`: must be the prefill worker's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_id: Option<String>,
    /// `remote_request_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `remote_block_ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ids: Option<Vec<u32>>,
    /// `bootstrap_room`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_room: Option<u64>,
}

/// Answer of a successful pull: the transfer's blocks, now released on the prefill worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PullResponse {
    /// The prefill worker's engine id.
    pub engine_id: String,
    /// Its tokens per block.
    pub block_size: usize,
    /// Tokens whose KV the blocks hold.
    pub num_tokens: usize,
    /// The blocks.
    pub block_ids: Vec<u32>,
}

/// The side channel a prefill worker listens on (`--disaggregation-bootstrap-port`): the pull
/// route and `/health`.
pub fn side_channel_router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route(PULL_PATH, post(pull))
        .route("/health", get(|| async { StatusCode::OK }))
        .with_state(state)
}

/// `POST /v1/kv_transfer/pull` (see [`PullRequest`], [`PullResponse`]). Errors: 404 when this
/// worker is not a prefill worker, the engine id is not its own, or it does not hold the
/// transfer (the message says whether it was pulled, expired or never held); 400 for a
/// malformed body.
pub(crate) async fn pull(State(s): State<Arc<HttpState>>, body: Bytes) -> Response {
    match serve_pull(&s, &body).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn serve_pull(s: &HttpState, body: &[u8]) -> Result<PullResponse, ApiError> {
    let d = &s.disagg;
    if d.mode != DisaggregationMode::Prefill {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "This worker is not a prefill worker (--disaggregation-mode prefill): it holds no KV transfers.",
        ));
    }
    let req: PullRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid pull request: {e}")))?;
    if let Some(e) = req.engine_id.as_ref().filter(|e| **e != d.engine_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown engine id {e}: this prefill worker is {}.",
                d.engine_id
            ),
        ));
    }
    let key = match (req.bootstrap_room, req.block_ids) {
        (Some(room), _) => PullKey::Room(room),
        (None, Some(block_ids)) if req.engine_id.is_some() => PullKey::Blocks {
            request_id: req.request_id,
            block_ids,
        },
        _ => {
            return Err(ApiError::bad_request(
                "A pull names `engine_id` and `block_ids`, or a `bootstrap_room`.",
            ))
        }
    };
    let (tx, rx) = oneshot::channel();
    if !s.worker().send(Command::Pull { key, reply: tx }) {
        return Err(crate::http::engine_gone());
    }
    match rx.await {
        Ok(Ok(g)) => Ok(PullResponse {
            engine_id: d.engine_id.clone(),
            block_size: s.engine.block_size,
            num_tokens: g.num_tokens,
            block_ids: g.block_ids,
        }),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::NOT_FOUND, e.0)),
        Err(_) => Err(crate::http::engine_gone()),
    }
}

/// `GET /server_info` (also `/get_server_info`, SGLang's names): how the worker describes
/// itself, e.g. `{"role": "prefill", "disaggregation_mode": "prefill",
/// "disaggregation_bootstrap_port": 8998, "kv_transfer_engine_id": "…", "block_size": 64,
/// "served_model_name": "…"}`.
pub(crate) async fn server_info(State(s): State<Arc<HttpState>>) -> Response {
    let d = &s.disagg;
    axum::Json(json!({
        "role": d.mode.role(),
        "disaggregation_mode": d.mode.as_str(),
        "disaggregation_bootstrap_port": d.side_port,
        "kv_transfer_engine_id": d.engine_id,
        "block_size": s.engine.block_size,
        "page_size": s.engine.block_size,
        "num_gpu_blocks": s.engine.num_blocks,
        "served_model_name": s.model_name,
    }))
    .into_response()
}

// ---------- the decode side ----------

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Decode worker: pulls the KV of `prompt` that `ask` names, then waits the modelled transfer
/// time. On success the request runs with [`KvMode::Receive`]. Errors: see the module docs.
pub(crate) async fn receive(
    s: &HttpState,
    prompt: &[u32],
    ask: &TransferAsk,
) -> Result<(), ApiError> {
    let pulled = pull_from_prefill(s, prompt, ask).await;
    if let Ok(mut m) = s.worker().metrics().lock() {
        match &pulled {
            Ok(blocks) => {
                m.kv_transfers_received += 1;
                m.kv_transfer_blocks_received += *blocks as u64;
            }
            Err(_) => m.kv_transfers_failed += 1,
        }
    }
    let d = &s.disagg;
    let secs = transfer_seconds(
        pulled?,
        s.engine.block_size,
        d.bytes_per_token,
        d.bandwidth_gbps,
        d.speedup_ratio,
    );
    if secs > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
    Ok(())
}

/// Pulls and checks the transfer; returns the blocks to move (those this worker does not
/// cache already).
async fn pull_from_prefill(
    s: &HttpState,
    prompt: &[u32],
    ask: &TransferAsk,
) -> Result<usize, ApiError> {
    let d = &s.disagg;
    let (host, port, body, param, wait) = match ask {
        TransferAsk::ReceiveVllm(r) => (
            &r.host,
            r.port,
            PullRequest {
                engine_id: Some(r.engine_id.clone()),
                request_id: r.request_id.clone(),
                block_ids: Some(r.block_ids.clone()),
                bootstrap_room: None,
            },
            P_KV,
            Duration::from_secs(30),
        ),
        TransferAsk::ReceiveRoom { host, port, room } => (
            host,
            *port,
            PullRequest {
                bootstrap_room: Some(*room),
                ..Default::default()
            },
            P_ROOM,
            // The prefill worker answers within its own timeout; allow ours plus slack.
            d.timeout + Duration::from_secs(10),
        ),
        _ => return Ok(0),
    };
    let Some(client) = &d.client else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "This worker has no KV-transfer client.",
        ));
    };
    let addr = host_port(host, port);
    let fail = |status, msg: String| {
        ApiError::new(
            status,
            format!("KV transfer from the prefill worker at {addr} failed: {msg}"),
        )
        .with_param(param)
    };
    let resp = client
        .post(format!("http://{addr}{PULL_PATH}"))
        .json(&body)
        .timeout(wait)
        .send()
        .await
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("cannot reach it: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("reading its answer: {e}")))?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {status}"));
        let ours = if status.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(fail(ours, msg));
    }
    let g: PullResponse = serde_json::from_slice(&bytes)
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("malformed answer: {e}")))?;
    let bs = s.engine.block_size;
    if g.block_size != bs {
        return Err(fail(
            StatusCode::BAD_GATEWAY,
            format!(
                "its block size is {} tokens, this worker's is {bs}",
                g.block_size
            ),
        ));
    }
    if g.num_tokens < prompt.len() || g.block_ids.len() < prompt.len().div_ceil(bs) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!(
                "it held KV for {} tokens in {} blocks, but this prompt has {} tokens: the transfer belongs to another request",
                g.num_tokens,
                g.block_ids.len(),
                prompt.len()
            ),
        ));
    }
    let hit = s
        .worker()
        .prefix_hit_blocks(prompt.to_vec())
        .await
        .unwrap_or(0);
    Ok(prompt.len().div_ceil(bs).saturating_sub(hit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> DisaggFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn transfer_time_follows_bytes_and_bandwidth() {
        assert_eq!(DEFAULT_KV_BYTES_PER_TOKEN, 114_688);
        // 64 blocks of 64 tokens of Qwen3-0.6B at 25 GB/s: 470 MB in 18.8 ms.
        let t = transfer_seconds(64, 64, DEFAULT_KV_BYTES_PER_TOKEN, 25.0, 1.0);
        assert!((t - 64.0 * 64.0 * 114_688.0 / 25e9).abs() < 1e-12, "{t}");
        assert!((t - 0.01879).abs() < 1e-4, "{t}");
        assert_eq!(transfer_seconds(64, 64, 114_688, 25.0, 2.0), t / 2.0);
        assert_eq!(transfer_seconds(0, 64, 114_688, 25.0, 1.0), 0.0);
        assert_eq!(transfer_seconds(8, 64, 114_688, 0.0, 1.0), 0.0);
        assert_eq!(transfer_seconds(8, 64, 114_688, 25.0, 0.0), 0.0);
    }

    #[test]
    fn fields_by_role() {
        use DisaggregationMode::*;
        let send = fields(json!({"kv_transfer_params": {"do_remote_decode": true,
            "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
            "remote_host": null, "remote_port": null}}));
        assert_eq!(send.parse(Prefill).unwrap(), TransferAsk::SendVllm);
        assert_eq!(send.parse(Agg).unwrap(), TransferAsk::Local);
        assert!(send.parse(Decode).is_err());
        let recv = fields(json!({"kv_transfer_params": {"do_remote_prefill": true,
            "do_remote_decode": false, "remote_engine_id": "e", "remote_block_ids": [1, 2],
            "remote_host": "h", "remote_port": 9, "tp_size": 1}}));
        assert_eq!(
            recv.parse(Decode).unwrap(),
            TransferAsk::ReceiveVllm(RemoteKv {
                engine_id: "e".into(),
                block_ids: vec![1, 2],
                host: "h".into(),
                port: 9,
                request_id: None,
            })
        );
        assert!(recv.parse(Prefill).is_err());
        for bad in [
            json!({"kv_transfer_params": 3}),
            json!({"kv_transfer_params": {"do_remote_prefill": "yes"}}),
            json!({"kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e",
                "remote_block_ids": [], "remote_host": "h", "remote_port": 9}}),
            json!({"kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e",
                "remote_block_ids": [1], "remote_host": "h", "remote_port": 70000}}),
            json!({"kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": true}}),
            json!({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": [1, 2]}),
            json!({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": -1}),
            json!({"bootstrap_host": "h", "bootstrap_room": 5}),
        ] {
            assert!(fields(bad.clone()).parse(Decode).is_err(), "{bad}");
        }
        let room =
            fields(json!({"bootstrap_host": "h", "bootstrap_port": 8998, "bootstrap_room": 5}));
        assert_eq!(room.parse(Prefill).unwrap(), TransferAsk::SendRoom(5));
        assert_eq!(
            room.parse(Decode).unwrap(),
            TransferAsk::ReceiveRoom {
                host: "h".into(),
                port: 8998,
                room: 5
            }
        );
        assert_eq!(TransferAsk::SendRoom(5).max_tokens(100), 1);
        assert!(TransferAsk::SendVllm.check(1, true).is_err());
        assert!(TransferAsk::SendRoom(5).check(1, true).is_ok());
        assert!(TransferAsk::SendRoom(5).check(2, false).is_err());
        assert!(TransferAsk::Local.check(2, true).is_ok());
    }

    #[test]
    fn engine_ids_are_uuid_shaped_and_distinct() {
        let (a, b) = (new_engine_id(), new_engine_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
