//! Prefill/decode disaggregation in the frontend (spec §13), with stock engines' protocols.
//!
//! When the routing set holds prefill and decode workers, a request is:
//!
//! 1. routed among prefill workers — KV-aware, its prefill tokens booked, its blocks not (they
//!    leave the worker when the decode worker pulls them): `track_active_blocks: false`;
//! 2. prefilled there, by the prefill worker's protocol ([`DisaggProtocol`]):
//!    * `vllm` — a non-streamed copy of the request with `max_tokens: 1` and
//!      `kv_transfer_params: {do_remote_decode: true, …}`, exactly as vLLM's NIXL-connector proxy
//!      sends it; the response's `kv_transfer_params` go with the original request to decode;
//!    * `sglang` — the same request to both workers at once with `bootstrap_host`,
//!      `bootstrap_port` and `bootstrap_room`;
//! 3. routed among decode workers with the reference's decode overrides (overlap credit 0, no
//!    KV reuse assumed, no prefill tokens booked), and its stream given to the client.
//!
//! A failed prefill is the client's error, never a silent fallback to aggregated serving.
//! With `--conditional-disagg`, a request whose prompt less the best prefill worker's cached
//! prefix is under `--disagg-isl-threshold` tokens runs whole on a decode worker instead.
//!
//! With `--prefill-router URL` (the reference's two-router layout) step 1 is a `kvrouter
//! router`'s: it chooses among its prefill workers and books the request under its id
//! ([`RemoteRouter::book`]); the first token marks it prefill-complete there and the prefill's
//! end frees it. This frontend's own workers (any role but `prefill`) take the decode.

use std::sync::Arc;

use kvrouter_core::hash::HashOptions;
use kvrouter_core::{RolePool, RouterConfigOverride, WorkerRole};
use serde_json::{json, Map, Value};

use super::lease::{Lease, Started};
use super::request::{ParsedRequest, PhaseBody};
use super::AppState;
use crate::error::{route_error, worker_error, ApiError};
use crate::routing::{Booking, RouteInput};
use crate::workers::client::{WorkerError, WorkerStream};
use crate::workers::registry::Worker;
use crate::workers::remote_router::{RemoteInput, RemoteRouter};
use crate::workers::spec::{DisaggProtocol, WorkerSpec};

/// `--conditional-disagg` and its threshold.
#[derive(Clone, Copy, Debug, Default)]
pub struct DisaggConfig {
    pub conditional: bool,
    /// Uncached prompt tokens below which a request skips the prefill pool.
    pub isl_threshold: usize,
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// One worker does all of it, chosen in this pool.
    Whole(RolePool),
    /// A prefill worker, then a decode worker.
    Split,
}

/// The plan for `req`: split when the routing set has both prefill and decode workers (and the
/// prompt is not short and uncached enough to skip prefill under `--conditional-disagg`);
/// otherwise whole on a worker that is not prefill-only — a prefill worker never serves a
/// whole request, so a fleet whose decode workers are all down answers 503 rather than
/// silently serving aggregated. A request naming its worker goes there.
pub fn plan(s: &AppState, req: &ParsedRequest) -> Plan {
    if req.backend_instance_id.is_some() {
        return Plan::Whole(RolePool::Any);
    }
    if s.prefill_router.is_some() {
        // Conditional disaggregation is decided by the prefill router's answer.
        return Plan::Split;
    }
    let router = &s.fleet.router;
    let (prefill, decode) = router.has_roles();
    if !(prefill && decode) {
        return Plan::Whole(RolePool::Aggregated);
    }
    if s.disagg.conditional {
        let opts = HashOptions {
            lora_name: req.lora_name.as_deref(),
            cache_salt: req.cache_salt.as_deref(),
            ..Default::default()
        };
        let cached =
            router.best_cached_tokens(&req.tokens, RolePool::Only(WorkerRole::Prefill), &opts);
        if req.tokens.len().saturating_sub(cached) < s.disagg.isl_threshold {
            return Plan::Whole(RolePool::Aggregated);
        }
    }
    Plan::Split
}

/// The prefill worker's booking leaves no blocks behind; the decode worker's, per the
/// reference: no overlap credit, no KV reuse assumed, no prefill tokens (spec §13).
fn overrides(client: &Option<RouterConfigOverride>, role: WorkerRole) -> RouterConfigOverride {
    let mut o = client.clone().unwrap_or_default();
    match role {
        WorkerRole::Prefill => o.track_active_blocks = Some(false),
        _ => {
            o.overlap_score_credit = Some(0.0);
            o.overlap_score_weight = None;
            o.assume_kv_reuse = Some(false);
            o.track_prefill_tokens = Some(false);
        }
    }
    o
}

fn route_input(req: &ParsedRequest, role: WorkerRole, pool: RolePool) -> RouteInput<'_> {
    RouteInput {
        tokens: &req.tokens,
        pinned_worker: None,
        dp_rank: req.dp_rank,
        overrides: Some(overrides(&req.overrides, role)),
        lora_name: req.lora_name.as_deref(),
        cache_salt: req.cache_salt.as_deref(),
        priority: req.priority,
        strict_priority: req.strict_priority,
        pool,
        workers: req.lora_workers.clone(),
    }
}

/// Attempts per phase when the chosen worker turns out unreachable (it becomes suspect and the
/// phase is routed again; nothing was processed).
const MAX_ATTEMPTS: usize = 3;

/// Prefill on a prefill worker, then start decode on a decode worker. `None`: the prefill
/// router's answer showed the prompt cached enough for `--conditional-disagg` to run it whole
/// on a decode worker instead.
pub async fn dispatch(
    s: &Arc<AppState>,
    req: &ParsedRequest,
    request_id: &str,
) -> Result<Option<Started>, ApiError> {
    let mut last = None;
    for attempt in 0..MAX_ATTEMPTS {
        let (prefill, worker) = match choose_prefill(s, req, request_id, attempt).await? {
            Prefill::Chosen(lease, worker) => (lease, worker),
            Prefill::Skip => return Ok(None),
            Prefill::Gone => continue,
        };
        let spec = worker.spec();
        let rank = prefill.worker();
        let local = prefill.is_local();
        let result = match spec.disaggregation_protocol {
            DisaggProtocol::Vllm => vllm(s, req, request_id, prefill, spec).await,
            DisaggProtocol::Sglang => sglang(s, req, request_id, prefill, spec).await,
        };
        match result {
            Err(Failure::PrefillGone(e)) => {
                tracing::warn!(
                    request_id,
                    worker_id = rank.worker_id,
                    "prefill worker unreachable, routing again: {e}"
                );
                if local {
                    s.fleet.suspect(rank.worker_id, &e.to_string());
                }
                last = Some(worker_error(&e, request_id, rank.worker_id));
            }
            Err(Failure::Api(e)) => return Err(e),
            Ok(started) => return Ok(Some(started)),
        }
    }
    Err(prefill_failed(&last.unwrap_or_else(|| {
        ApiError::unavailable("no prefill worker could take the request")
    })))
}

/// The prefill phase's worker.
enum Prefill {
    /// Booked there.
    Chosen(Lease, PrefillWorker),
    /// Conditional disaggregation: run the request whole on a decode worker.
    Skip,
    /// The worker left between routing and here: route again.
    Gone,
}

/// A prefill worker's registration: one of this frontend's workers, or the prefill router's
/// answer.
enum PrefillWorker {
    Local(Arc<Worker>),
    Remote(Box<WorkerSpec>),
}

impl PrefillWorker {
    fn spec(&self) -> &WorkerSpec {
        match self {
            PrefillWorker::Local(w) => &w.spec,
            PrefillWorker::Remote(spec) => spec,
        }
    }
}

/// Route the prefill phase: in this frontend's router, or by `--prefill-router`.
async fn choose_prefill(
    s: &AppState,
    req: &ParsedRequest,
    request_id: &str,
    attempt: usize,
) -> Result<Prefill, ApiError> {
    let Some(router) = &s.prefill_router else {
        let input = route_input(
            req,
            WorkerRole::Prefill,
            RolePool::Only(WorkerRole::Prefill),
        );
        let booking = s
            .fleet
            .router
            .route(&input)
            .await
            .map_err(|e| prefill_failed(&route_error(e)))?;
        return Ok(match s.fleet.registry.get(booking.worker().worker_id) {
            Some(w) => Prefill::Chosen(booking.into(), PrefillWorker::Local(w)),
            None => Prefill::Gone,
        });
    };
    remote_prefill(s, router, req, request_id, attempt).await
}

/// Book the prefill on the prefill router, under the request's id (one per attempt: an earlier
/// attempt's free may still be on its way).
async fn remote_prefill(
    s: &AppState,
    router: &Arc<RemoteRouter>,
    req: &ParsedRequest,
    request_id: &str,
    attempt: usize,
) -> Result<Prefill, ApiError> {
    let o = overrides(&req.overrides, WorkerRole::Prefill);
    let input = RemoteInput::new(&req.tokens, Some(&o), req.cache_salt.as_deref());
    let booked = router
        .book(&input, &format!("{request_id}.p{attempt}"))
        .await
        .map_err(|e| prefill_failed(&e))?;
    let uncached = req.tokens.len().saturating_sub(booked.best.cached_tokens);
    if s.disagg.conditional && uncached < s.disagg.isl_threshold {
        return Ok(Prefill::Skip); // the lease's drop frees the booking
    }
    let worker = PrefillWorker::Remote(Box::new(booked.spec));
    Ok(Prefill::Chosen(booked.lease.into(), worker))
}

/// Why a split dispatch stopped.
enum Failure {
    /// The prefill worker could not be reached: try another.
    PrefillGone(WorkerError),
    /// Anything else: the client's answer.
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// vLLM: prefill with `max_tokens: 1` and `do_remote_decode`, then decode with the returned
/// `kv_transfer_params`.
async fn vllm(
    s: &Arc<AppState>,
    req: &ParsedRequest,
    request_id: &str,
    mut prefill: Lease,
    spec: &WorkerSpec,
) -> Result<Started, Failure> {
    let p_rank = prefill.worker();
    let model = req.worker_model(spec.model.as_deref(), &s.model_name);
    let mut ask = Map::new();
    ask.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false,
               "remote_engine_id": null, "remote_block_ids": null,
               "remote_host": null, "remote_port": null}),
    );
    let prefill_body = req.phase_body(
        model,
        PhaseBody {
            unary: true,
            max_tokens: Some(1),
            extra: Some(&ask),
        },
    );
    let mut resp = match s
        .client
        .complete(&spec.url, spec.rank_pin(p_rank.dp_rank), prefill_body)
        .await
    {
        Ok(r) => r,
        Err(e) if e.worker_gone() => return Err(Failure::PrefillGone(e)),
        Err(e) => {
            return Err(prefill_failed(&worker_error(&e, request_id, p_rank.worker_id)).into())
        }
    };
    prefill.first_token();
    drop(prefill);
    let params = match resp.get_mut("kv_transfer_params").map(Value::take) {
        Some(p @ Value::Object(_)) => p,
        _ => {
            tracing::warn!(
                request_id,
                worker_id = p_rank.worker_id,
                "prefill response without kv_transfer_params"
            );
            return Err(ApiError::bad_gateway(format!(
                "prefill failed: the prefill worker returned no kv_transfer_params (request {request_id})"
            ))
            .into());
        }
    };
    let mut given = Map::new();
    given.insert("kv_transfer_params".into(), params);
    let (booking, stream) = decode(s, req, request_id, &given).await?;
    Ok(Started {
        lease: booking.into(),
        stream,
        prefill_worker: Some(p_rank.worker_id),
        pool: None,
    })
}

/// SGLang: the same request to both workers at once with one bootstrap room.
async fn sglang(
    s: &Arc<AppState>,
    req: &ParsedRequest,
    request_id: &str,
    mut prefill: Lease,
    spec: &WorkerSpec,
) -> Result<Started, Failure> {
    let p_rank = prefill.worker();
    let model = req.worker_model(spec.model.as_deref(), &s.model_name);
    let host = crate::workers::client::authority(&spec.url);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let mut fields = Map::new();
    fields.insert(
        "bootstrap_host".into(),
        host.trim_start_matches('[').trim_end_matches(']').into(),
    );
    fields.insert(
        "bootstrap_port".into(),
        spec.bootstrap_port.unwrap_or(8998).into(),
    );
    fields.insert("bootstrap_room".into(), (rand::random::<u64>() >> 1).into());
    let prefill_body = req.phase_body(
        model,
        PhaseBody {
            unary: true,
            max_tokens: None,
            extra: Some(&fields),
        },
    );
    let (client, url, rid) = (s.client.clone(), spec.url.clone(), request_id.to_string());
    let pin = spec.rank_pin(p_rank.dp_rank);
    // Both at once (the decode worker waits for the room); the prefill's answer is discarded,
    // its booking ends with it.
    let prefill_call = tokio::spawn(async move {
        let r = client.complete(&url, pin, prefill_body).await;
        prefill.first_token();
        drop(prefill);
        r.map(|_| ())
            .map_err(|e| worker_error(&e, &rid, p_rank.worker_id))
    });
    let (booking, stream) = decode(s, req, request_id, &fields).await?;
    // A prefill that failed already fails the request; one that fails later leaves the decode
    // worker's room empty, and the decode stream ends with its error.
    if prefill_call.is_finished() {
        if let Ok(Err(e)) = prefill_call.await {
            return Err(prefill_failed(&e).into());
        }
    }
    Ok(Started {
        lease: booking.into(),
        stream,
        prefill_worker: Some(p_rank.worker_id),
        pool: None,
    })
}

/// Route the decode phase and start its stream; an unreachable decode worker becomes suspect
/// and another is tried (its transfer has not been pulled).
async fn decode(
    s: &Arc<AppState>,
    req: &ParsedRequest,
    request_id: &str,
    extra: &Map<String, Value>,
) -> Result<(Booking, WorkerStream), ApiError> {
    let mut last = None;
    for _ in 0..MAX_ATTEMPTS {
        // Behind a prefill router, this frontend's workers are all decode's (any role but
        // prefill, as the reference's two-router layout registers them).
        let pool = if s.prefill_router.is_some() {
            RolePool::Aggregated
        } else {
            RolePool::Only(WorkerRole::Decode)
        };
        let booking = s
            .fleet
            .router
            .try_route(&route_input(req, WorkerRole::Decode, pool))
            .map_err(route_error)?;
        let rank = booking.worker();
        let Some(w) = s.fleet.registry.get(rank.worker_id) else {
            continue;
        };
        let model = req.worker_model(w.spec.model.as_deref(), &s.model_name);
        match s
            .client
            .generate(
                &w.spec.url,
                w.spec.rank_pin(rank.dp_rank),
                req.phase_body(
                    model,
                    PhaseBody {
                        extra: Some(extra),
                        ..PhaseBody::default()
                    },
                ),
            )
            .await
        {
            Ok(stream) => return Ok((booking, stream)),
            Err(e) if e.worker_gone() => {
                tracing::warn!(
                    request_id,
                    worker_id = rank.worker_id,
                    "decode worker unreachable, routing again: {e}"
                );
                s.fleet.suspect(rank.worker_id, &e.to_string());
                last = Some(worker_error(&e, request_id, rank.worker_id));
            }
            Err(e) => return Err(worker_error(&e, request_id, rank.worker_id)),
        }
    }
    Err(last.unwrap_or_else(|| ApiError::unavailable("no decode worker could take the request")))
}

/// A prefill failure as the client sees it: the worker error, said to be the prefill's.
fn prefill_failed(e: &ApiError) -> ApiError {
    e.with_prefix("prefill failed: ")
}
