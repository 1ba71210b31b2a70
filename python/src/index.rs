//! `RadixTree` (the core's exact `KvIndex`), `ApproxKvIndexer` (the core's `ApproxIndex`) and
//! `OverlapScores`.
//!
//! Each index sits behind a lock: `RadixTree` a reader-writer lock (lookups share it, events
//! take it alone), `ApproxKvIndexer` a mutex (its lookups expire entries). The GIL is released
//! while the lock is waited for and the work is done.

use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

use kvrouter_core::event::{RouterEvent, WorkerId, WorkerWithDpRank};
use kvrouter_core::hash::{compute_sequence_hashes, LocalBlockHash};
use kvrouter_core::index::{ApproxConfig, ApproxIndex, KvIndex, OverlapScores as CoreScores};

use crate::errors::index_error;
use crate::hashing::hash_tokens;
use crate::ints::{extract_u64s, type_name, Range};

/// Prefix match of a query against an index: per `(worker_id, dp_rank)`, the number of
/// contiguous leading blocks of the query that rank holds (ranks holding none are absent).
#[pyclass(module = "kvrouter._core", frozen)]
pub struct OverlapScores {
    scores: Vec<(WorkerWithDpRank, u32)>,
}

impl OverlapScores {
    fn from_core(s: CoreScores) -> Self {
        Self { scores: s.scores }
    }
}

#[pymethods]
impl OverlapScores {
    /// `{(worker_id, dp_rank): matched_blocks}`.
    #[getter]
    fn scores<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for &(w, s) in &self.scores {
            d.set_item(PyTuple::new(py, [w.worker_id, u64::from(w.dp_rank)])?, s)?;
        }
        Ok(d)
    }

    /// Per-depth access counts. Always empty: kvrouter's index does not track access
    /// frequencies (Dynamo's is empty too unless frequency tracking is configured).
    #[getter]
    fn frequencies(&self) -> Vec<u64> {
        Vec::new()
    }

    fn __len__(&self) -> usize {
        self.scores.len()
    }

    fn __repr__(&self) -> String {
        let mut v = self.scores.clone();
        v.sort_unstable();
        let items: Vec<String> = v
            .iter()
            .map(|(w, s)| format!("({}, {}): {s}", w.worker_id, w.dp_rank))
            .collect();
        format!("OverlapScores({{{}}})", items.join(", "))
    }
}

/// Local block hashes from Python.
fn extract_query(sequence: &Bound<'_, PyAny>) -> PyResult<Vec<LocalBlockHash>> {
    // LocalBlockHash is a transparent u64: reuse the vector.
    let v = extract_u64s(sequence, "sequence", Range::U64)?;
    Ok(v.into_iter().map(LocalBlockHash).collect())
}

/// The JSON text of an event argument: `bytes` or `str`.
enum EventText<'a> {
    Bytes(&'a [u8]),
    Str(std::borrow::Cow<'a, str>),
}

impl EventText<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            EventText::Bytes(b) => b,
            EventText::Str(s) => s.as_bytes(),
        }
    }
}

fn event_text<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<EventText<'a>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(EventText::Bytes(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(EventText::Str(s.to_cow()?));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "kv_cache_event_bytes must be bytes or str (JSON), not {}",
        type_name(obj)
    )))
}

/// Parses a `KvCacheEvent` (`{"event_id", "data", "dp_rank"}`) or a whole `RouterEvent`
/// (`{"worker_id", "event": {...}, ...}`, as `dump_tree_as_events` gives) for `worker_id`.
fn parse_event(worker_id: WorkerId, json: &[u8]) -> Result<RouterEvent, String> {
    let event_err = match kvrouter_wire::json::parse_kv_cache_event(json) {
        Ok(event) => {
            return Ok(RouterEvent {
                worker_id,
                storage_tier: Default::default(),
                event,
            })
        }
        Err(e) => e,
    };
    // Not a KvCacheEvent: a RouterEvent has an `"event"` key (a KvCacheEvent has no such key,
    // nor any string value that could contain it).
    if !json.windows(7).any(|w| w == b"\"event\"") {
        return Err(format!("Failed to deserialize KvCacheEvent: {event_err}"));
    }
    let ev: RouterEvent = serde_json::from_slice(json)
        .map_err(|e| format!("Failed to deserialize RouterEvent: {e}"))?;
    if ev.worker_id != worker_id {
        return Err(format!(
            "the event is for worker {}, not worker {worker_id}",
            ev.worker_id
        ));
    }
    Ok(ev)
}

/// Exact prefix index of the blocks each worker rank holds, fed by KV events (Dynamo's
/// `RadixTree`). Thread-safe: lookups run concurrently, events one at a time; the GIL is
/// released during both.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct RadixTree {
    index: RwLock<KvIndex>,
}

impl RadixTree {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, KvIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KvIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl RadixTree {
    #[new]
    fn new() -> Self {
        Self {
            index: RwLock::new(KvIndex::new()),
        }
    }

    /// Longest contiguous prefix of `sequence` (local block hashes) held by each worker rank.
    #[pyo3(signature = (sequence, early_exit=false))]
    fn find_matches(
        &self,
        py: Python<'_>,
        sequence: &Bound<'_, PyAny>,
        early_exit: bool,
    ) -> PyResult<OverlapScores> {
        let query = extract_query(sequence)?;
        let scores = py.detach(|| self.read().find_matches(&query, early_exit));
        Ok(OverlapScores::from_core(scores))
    }

    /// Applies one KV event of `worker_id`, given as JSON (`bytes` or `str`): a `KvCacheEvent`
    /// `{"event_id", "data": {"stored": ...} | {"removed": ...} | "cleared", "dp_rank"}`, or a
    /// whole `RouterEvent` of that worker.
    ///
    /// Raises `ValueError` for malformed JSON, `ParentBlockNotFound`, `BlockNotFound` or
    /// `InvalidBlockSequence` (all `KvEventError`, a `RuntimeError`) when the index rejects it.
    fn apply_event(
        &self,
        py: Python<'_>,
        worker_id: WorkerId,
        kv_cache_event_bytes: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let text = event_text(kv_cache_event_bytes)?;
        let json = text.as_bytes();
        let result = py.detach(|| {
            let ev = parse_event(worker_id, json).map_err(Err)?;
            self.write().apply(&ev).map_err(Ok)
        });
        match result {
            Ok(()) => Ok(()),
            Err(Err(msg)) => Err(PyValueError::new_err(msg)),
            Err(Ok(e)) => Err(index_error(py, &e)),
        }
    }

    /// Drops every block of every dp rank of `worker_id` and forgets the worker.
    fn remove_worker(&self, py: Python<'_>, worker_id: WorkerId) {
        py.detach(|| self.write().remove_worker(worker_id));
    }

    /// Drops every block of every dp rank of `worker_id`, keeping the worker known.
    fn clear_all_blocks(&self, py: Python<'_>, worker_id: WorkerId) {
        py.detach(|| self.write().clear_all_blocks(worker_id));
    }

    /// The whole index as JSON `RouterEvent`s (stored events, parents first, per worker rank)
    /// that rebuild the same index when applied to an empty one.
    fn dump_tree_as_events(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| {
            self.read()
                .dump_events()
                .iter()
                .map(|e| serde_json::to_string(e).expect("RouterEvent serializes"))
                .collect()
        })
    }

    /// Number of `(block, worker rank)` pairs held.
    fn current_size(&self) -> usize {
        self.read().current_size()
    }
}

/// What `ApproxKvIndexer.process_routing_decision_for_request` returns: the work is already
/// done; awaiting it (as Dynamo's `async` method is awaited) returns `None` at once.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct Completed;

#[pymethods]
impl Completed {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> Option<()> {
        None
    }

    fn __repr__(&self) -> &'static str {
        "Completed()"
    }
}

/// Approximate index for engines without KV events: it records which worker each request was
/// routed to and assumes the request's blocks stay cached there for `router_ttl_secs` after the
/// last routing touch (Dynamo's `ApproxKvIndexer`). Above `max_tree_size` `(block, worker)`
/// pairs the oldest are dropped down to `prune_target_ratio` of it.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct ApproxKvIndexer {
    index: Mutex<ApproxIndex>,
    block_size: usize,
    epoch: Instant,
}

impl ApproxKvIndexer {
    fn lock(&self) -> std::sync::MutexGuard<'_, ApproxIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

#[pymethods]
impl ApproxKvIndexer {
    #[new]
    #[pyo3(signature = (kv_block_size, router_ttl_secs=120.0, *, max_tree_size=1048576, prune_target_ratio=0.8))]
    fn new(
        kv_block_size: usize,
        router_ttl_secs: f64,
        max_tree_size: usize,
        prune_target_ratio: f64,
    ) -> PyResult<Self> {
        if kv_block_size == 0 {
            return Err(PyValueError::new_err("kv_block_size must be > 0"));
        }
        if !router_ttl_secs.is_finite() || router_ttl_secs < 0.0 {
            return Err(PyValueError::new_err(format!(
                "router_ttl_secs must be a finite number >= 0 (got {router_ttl_secs})"
            )));
        }
        if !(0.0..=1.0).contains(&prune_target_ratio) {
            return Err(PyValueError::new_err(format!(
                "prune_target_ratio must be in [0, 1] (got {prune_target_ratio})"
            )));
        }
        Ok(Self {
            index: Mutex::new(ApproxIndex::new(ApproxConfig {
                ttl: Duration::from_secs_f64(router_ttl_secs),
                max_tree_size,
                prune_target_ratio,
            })),
            block_size: kv_block_size,
            epoch: Instant::now(),
        })
    }

    /// Overlap of the request's full blocks with what each worker rank is assumed to hold.
    #[pyo3(signature = (token_ids, lora_name=None, is_eagle=None))]
    fn find_matches_for_request(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        lora_name: Option<&str>,
        is_eagle: Option<bool>,
    ) -> PyResult<OverlapScores> {
        let local = hash_tokens(
            py,
            token_ids,
            self.block_size,
            None,
            lora_name,
            is_eagle,
            None,
        )?;
        let scores = py.detach(|| {
            let now = self.now();
            self.lock().find_matches(&local, now)
        });
        Ok(OverlapScores::from_core(scores))
    }

    /// Records that the request with these tokens was routed to `(worker_id, dp_rank)`: its full
    /// blocks are assumed cached there from now on. Done when the call returns; the result may
    /// be awaited (Dynamo's method is `async`).
    #[pyo3(signature = (tokens, worker_id, dp_rank=0, *, lora_name=None, is_eagle=None))]
    fn process_routing_decision_for_request(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        worker_id: WorkerId,
        dp_rank: u32,
        lora_name: Option<&str>,
        is_eagle: Option<bool>,
    ) -> PyResult<Completed> {
        let local = hash_tokens(py, tokens, self.block_size, None, lora_name, is_eagle, None)?;
        py.detach(|| {
            let seq = compute_sequence_hashes(&local);
            let now = self.now();
            self.lock()
                .record(WorkerWithDpRank::new(worker_id, dp_rank), &local, &seq, now);
        });
        Ok(Completed)
    }

    /// Forgets every block assumed cached on any dp rank of `worker_id`.
    fn remove_worker(&self, py: Python<'_>, worker_id: WorkerId) {
        py.detach(|| self.lock().remove_worker(worker_id));
    }

    /// The block size in tokens.
    fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of `(block, worker rank)` pairs held (expired ones dropped first).
    fn current_size(&self, py: Python<'_>) -> usize {
        py.detach(|| {
            let now = self.now();
            let mut idx = self.lock();
            idx.expire(now);
            idx.current_size()
        })
    }
}
