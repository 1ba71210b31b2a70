//! The JSON shapes of the router API's query and booking calls (`generate`'s are in
//! [`super::generate`]). Requests refuse unknown fields (400 naming the field), so a typo is
//! an error, not a silently different request. Units: token ids are `u32`, blocks are KV
//! blocks of the router's block size, tokens are tokens.

use kvrouter_core::index::TierOverlap;
use kvrouter_core::sequences::PotentialLoad;
use kvrouter_core::{RouterConfigOverride, Selection, WorkerWithDpRank};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::token_ids::WithTokenIds;

use crate::error::ApiError;
use crate::routing::{OverlapReport, RouteInput};
use crate::workers::spec::WorkerSpec;

/// `POST /v1/router/best_worker_id`:
/// `{"token_ids": [u32], "router_config_override"?: {...}, "lora_name"?: str,
/// "cache_salt"?: str, "request_id"?: str}`. Without `request_id` a query that changes
/// nothing; with it the request is booked under that id until `free` (or the booking expiry).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestWorkerRequest {
    /// The prompt (at least one token).
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    /// Per-request cost parameters (spec §6.5).
    #[serde(default)]
    pub router_config_override: Option<RouterConfigOverride>,
    /// LoRA adapter (changes block hashes).
    #[serde(default)]
    pub lora_name: Option<String>,
    /// Cache salt (changes block hashes).
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// Book the request under this id (non-empty).
    #[serde(default)]
    pub request_id: Option<String>,
}

impl WithTokenIds for BestWorkerRequest {
    fn token_ids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.token_ids
    }
}

impl BestWorkerRequest {
    /// What routing needs of it.
    pub fn route_input(&self) -> RouteInput<'_> {
        RouteInput {
            tokens: &self.token_ids,
            overrides: self.router_config_override.clone(),
            lora_name: self.lora_name.as_deref(),
            cache_salt: self.cache_salt.as_deref(),
            ..Default::default()
        }
    }
}

/// Answer of `best_worker_id`: `{"worker_id": u64, "dp_rank": u32, "overlap_blocks": u32}`
/// (device-tier blocks of the prompt's prefix cached on the chosen rank), as spec §11, plus
/// kvrouter's additions, which let a caller send the request itself (`kvrouter frontend
/// --prefill-router` and `--pool` do): `cached_tokens`, `cost` and `registration`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct BestWorker {
    pub worker_id: u64,
    pub dp_rank: u32,
    pub overlap_blocks: u32,
    /// Prompt tokens cached on the chosen rank: `min(overlap_blocks × block size, prompt)`.
    #[serde(default)]
    pub cached_tokens: usize,
    /// The chosen rank's KV cost (spec §6.2: weighted uncached prefill blocks plus decode
    /// blocks, so lower is less loaded at equal overlap); absent in load-only router modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The chosen worker's registration (workers-file schema: `url`, `model`, `role`,
    /// `disaggregation_protocol`, …); absent if it was removed meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<WorkerSpec>,
}

impl From<&Selection> for BestWorker {
    fn from(s: &Selection) -> Self {
        Self {
            worker_id: s.worker.worker_id,
            dp_rank: s.worker.dp_rank,
            overlap_blocks: s.overlap_blocks,
            cached_tokens: s.cached_tokens,
            cost: s.cost.filter(|c| c.is_finite()),
            registration: None,
        }
    }
}

/// `POST /v1/router/mark_prefill_complete` and `/v1/router/free`: `{"request_id": str}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIdBody {
    pub request_id: String,
}

/// Answer of `mark_prefill_complete` and `free`: `{"request_id": str, "worker_id": u64,
/// "dp_rank": u32}`, the rank the request was booked on (`free` only; `mark_prefill_complete`
/// answers `{"request_id": str}`).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Released {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_rank: Option<u32>,
}

/// `POST /v1/router/get_potential_loads`: `{"token_ids": [u32], "lora_name"?: str,
/// "cache_salt"?: str}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadsRequest {
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub lora_name: Option<String>,
    #[serde(default)]
    pub cache_salt: Option<String>,
}

impl WithTokenIds for LoadsRequest {
    fn token_ids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.token_ids
    }
}

impl LoadsRequest {
    pub fn route_input(&self) -> RouteInput<'_> {
        RouteInput {
            tokens: &self.token_ids,
            lora_name: self.lora_name.as_deref(),
            cache_salt: self.cache_salt.as_deref(),
            ..Default::default()
        }
    }
}

/// One element of `get_potential_loads`' answer (a JSON array, one per rank in the routing
/// set, spec §11): the rank's load if the request were added to it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct LoadOut {
    pub worker_id: u64,
    pub dp_rank: u32,
    /// Active prefill tokens plus the prompt's (before cache credit).
    pub potential_prefill_tokens: u64,
    /// Active decode blocks plus the prompt's blocks not already active there.
    pub potential_decode_blocks: u64,
    /// Requests booked on the rank now.
    pub active_requests: u32,
}

impl From<&PotentialLoad> for LoadOut {
    fn from(l: &PotentialLoad) -> Self {
        Self {
            worker_id: l.worker.worker_id,
            dp_rank: l.worker.dp_rank,
            potential_prefill_tokens: l.potential_prefill_tokens,
            potential_decode_blocks: l.potential_decode_blocks,
            active_requests: l.active_requests,
        }
    }
}

/// `POST /v1/router/get_overlap_scores`: `{"token_ids": [u32], "router_config_override"?:
/// {...} (validated, then ignored, as in the reference), "lora_name"?: str, "cache_salt"?:
/// str, "include_shared"?: bool (default true; there is no shared cache tier, so `shared` is
/// always 0)}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlapRequest {
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub router_config_override: Option<RouterConfigOverride>,
    #[serde(default)]
    pub lora_name: Option<String>,
    #[serde(default)]
    pub cache_salt: Option<String>,
    #[serde(default)]
    pub include_shared: Option<bool>,
}

impl WithTokenIds for OverlapRequest {
    fn token_ids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.token_ids
    }
}

impl OverlapRequest {
    pub fn route_input(&self) -> RouteInput<'_> {
        RouteInput {
            tokens: &self.token_ids,
            lora_name: self.lora_name.as_deref(),
            cache_salt: self.cache_salt.as_deref(),
            ..Default::default()
        }
    }
}

/// Answer of `get_overlap_scores`: `{"block_size": 64, "num_blocks": 16, "shared_cache":
/// null, "workers": [{"worker_id", "dp_rank", "device", "host_pinned", "disk", "shared"}]}`,
/// one entry per rank in the routing set. `device`: leading blocks of the prompt cached in
/// accelerator memory; `host_pinned`, `disk`: further blocks of the prefix found in host
/// memory, then on disk (beyond the faster tiers' prefix, as the cost credits them);
/// `shared`: 0 (no shared cache tier, `shared_cache` is `null`).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct OverlapScoresOut {
    pub block_size: usize,
    pub num_blocks: usize,
    pub shared_cache: Option<serde_json::Value>,
    pub workers: Vec<WorkerOverlap>,
}

/// One rank of [`OverlapScoresOut`].
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct WorkerOverlap {
    pub worker_id: u64,
    pub dp_rank: u32,
    pub device: u32,
    pub host_pinned: u32,
    pub disk: u32,
    pub shared: u32,
}

impl From<OverlapReport> for OverlapScoresOut {
    fn from(r: OverlapReport) -> Self {
        let rank = |(w, o): (WorkerWithDpRank, TierOverlap)| WorkerOverlap {
            worker_id: w.worker_id,
            dp_rank: w.dp_rank,
            device: o.device,
            host_pinned: o.host,
            disk: o.disk,
            shared: 0,
        };
        Self {
            block_size: r.block_size,
            num_blocks: r.num_blocks,
            shared_cache: None,
            workers: r.ranks.into_iter().map(rank).collect(),
        }
    }
}

/// A request body without token ids as `T` (those with token ids:
/// [`super::token_ids::parse`]). Errors: 400 with serde's message (bad JSON, a missing,
/// unknown or mistyped field, with its position).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// 400 unless the prompt has a token.
pub fn non_empty(tokens: &[u32]) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::bad_request("`token_ids` must not be empty").param("token_ids"));
    }
    Ok(())
}
