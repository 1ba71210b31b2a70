//! Data-parallel ranks behind one HTTP server (`--data-parallel-size N`): each rank is its own
//! engine (KV pool, scheduler, event publisher, metrics), and every request runs on one.
//!
//! Which rank, as the engines decide it:
//!
//! * **vLLM**: the `X-data-parallel-rank` header (vLLM's API server reads it, case-insensitive,
//!   into `data_parallel_rank`); without one the load balancer picks the least loaded engine
//!   (vLLM's `DPLBAsyncMPClient`; here: fewest requests in flight, the lowest rank on a tie).
//! * **SGLang**: the `X-Data-Parallel-Rank` header (recent releases), which takes precedence
//!   over the body's `routed_dp_rank` (the current name) or `data_parallel_rank` (the name
//!   every release with DP routing accepts; deprecated in favour of `routed_dp_rank`); without
//!   one the data-parallel controller's default `round_robin`.
//!
//! A rank outside `[0, N)` or a value that is not a non-negative integer is a 400, as both
//! engines refuse it.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::cli::Engine;
use crate::http::ApiError;
use crate::worker::WorkerHandle;

/// The header both engines read a request's rank from.
pub const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// SGLang's body fields naming the rank (ignored by vLLM, as it ignores unknown fields).
#[derive(Deserialize, Default, Debug)]
pub(crate) struct RankFields {
    #[serde(default)]
    routed_dp_rank: Option<Value>,
    #[serde(default)]
    data_parallel_rank: Option<Value>,
}

/// The rank a request asks for, if any. Errors: a header or field that is not a
/// non-negative integer (400).
pub(crate) fn requested_rank(
    engine: Engine,
    headers: &HeaderMap,
    fields: &RankFields,
) -> Result<Option<u32>, ApiError> {
    if let Some(v) = headers.get(DP_RANK_HEADER) {
        let rank = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "The X-data-parallel-rank header must be a non-negative integer.",
                )
            })?;
        return Ok(Some(rank));
    }
    if engine != Engine::Sglang {
        return Ok(None);
    }
    for (name, v) in [
        ("routed_dp_rank", &fields.routed_dp_rank),
        ("data_parallel_rank", &fields.data_parallel_rank),
    ] {
        match v {
            None | Some(Value::Null) => continue,
            Some(v) => {
                let rank = v
                    .as_u64()
                    .and_then(|r| u32::try_from(r).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("`{name}` must be a non-negative integer."))
                            .with_param(name)
                    })?;
                return Ok(Some(rank));
            }
        }
    }
    Ok(None)
}

/// The ranks of one worker and how requests are spread over them.
pub struct Ranks {
    handles: Vec<WorkerHandle>,
    in_flight: Arc<[AtomicUsize]>,
    next: AtomicUsize,
    engine: Engine,
}

impl Ranks {
    /// `handles[r]` is rank r's engine; `engine` decides the choice without a rank.
    ///
    /// # Panics
    /// With no handle (a worker has at least one rank).
    pub fn new(handles: Vec<WorkerHandle>, engine: Engine) -> Self {
        assert!(!handles.is_empty(), "a worker has at least one rank");
        Self {
            in_flight: (0..handles.len()).map(|_| AtomicUsize::new(0)).collect(),
            handles,
            next: AtomicUsize::new(0),
            engine,
        }
    }

    /// Every rank's engine, by rank.
    pub fn all(&self) -> &[WorkerHandle] {
        &self.handles
    }

    /// Rank 0's engine (the only one of a worker in disaggregated serving).
    pub fn first(&self) -> &WorkerHandle {
        &self.handles[0]
    }

    /// Requests running on each rank now (started and not yet answered or dropped).
    pub fn in_flight(&self) -> Vec<usize> {
        self.in_flight
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The rank a request runs on: `asked` when in range, else the engine's own choice.
    /// The returned lease counts the request on its rank until dropped. Errors: `asked` out
    /// of range (400, vLLM's message).
    pub(crate) fn choose(&self, asked: Option<u32>) -> Result<RankLease, ApiError> {
        let n = self.handles.len();
        let rank = match asked {
            Some(r) if (r as usize) < n => r as usize,
            Some(r) => {
                return Err(ApiError::bad_request(format!(
                    "Requested DP rank {r} is out of range [0, {n})."
                )))
            }
            None if n == 1 => 0,
            None => match self.engine {
                Engine::Vllm | Engine::Trtllm => (0..n)
                    .min_by_key(|&r| self.in_flight[r].load(Ordering::Relaxed))
                    .unwrap_or(0),
                Engine::Sglang => self.next.fetch_add(1, Ordering::Relaxed) % n,
            },
        };
        self.in_flight[rank].fetch_add(1, Ordering::Relaxed);
        Ok(RankLease {
            counters: self.in_flight.clone(),
            rank,
            handle: self.handles[rank].clone(),
        })
    }
}

/// A request's place on one rank; dropping it ends the request's count there.
pub(crate) struct RankLease {
    counters: Arc<[AtomicUsize]>,
    rank: usize,
    handle: WorkerHandle,
}

impl RankLease {
    /// The rank's engine.
    pub(crate) fn handle(&self) -> &WorkerHandle {
        &self.handle
    }
}

impl Drop for RankLease {
    fn drop(&mut self) {
        self.counters[self.rank].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn fields(v: Value) -> RankFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_header_then_sglangs_fields_name_the_rank() {
        let mut h = HeaderMap::new();
        let none = fields(serde_json::json!({}));
        let body = fields(serde_json::json!({"data_parallel_rank": 2}));
        assert_eq!(requested_rank(Engine::Vllm, &h, &none).unwrap(), None);
        // vLLM ignores SGLang's field; SGLang reads either name, the new one first.
        assert_eq!(requested_rank(Engine::Vllm, &h, &body).unwrap(), None);
        assert_eq!(requested_rank(Engine::Sglang, &h, &body).unwrap(), Some(2));
        let both = fields(serde_json::json!({"routed_dp_rank": 1, "data_parallel_rank": 2}));
        assert_eq!(requested_rank(Engine::Sglang, &h, &both).unwrap(), Some(1));
        h.insert("X-Data-Parallel-Rank", HeaderValue::from_static("3"));
        for e in [Engine::Vllm, Engine::Sglang] {
            assert_eq!(requested_rank(e, &h, &body).unwrap(), Some(3));
        }
        h.insert("x-data-parallel-rank", HeaderValue::from_static("-1"));
        assert!(requested_rank(Engine::Vllm, &h, &none).is_err());
        let bad = fields(serde_json::json!({"routed_dp_rank": "one"}));
        assert!(requested_rank(Engine::Sglang, &HeaderMap::new(), &bad).is_err());
    }
}
