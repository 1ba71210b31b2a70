//! `KvRouter`: the standalone router ([`kvrouter_server::router_service::Router`]) in-process.
//!
//! Conversion only: arguments become the router API's request types (the same serde types,
//! so the same checks and messages), the calls are the [`Router`]'s methods, results become
//! Python values. The object owns a Tokio runtime running the router's KV event
//! subscribers, health checks and worker client; `close()` stops them and the runtime.
//!
//! Awaiting: the routing calls (`best_worker`, `get_potential_loads`, …) take microseconds
//! and never wait on the network, so they run when called, with the GIL released, and return
//! an already-completed awaitable ([`Ready`]). `generate` and its stream's steps wait on a
//! worker: they run on the router's runtime and are bridged to asyncio by
//! `pyo3-async-runtimes` (cancelling the Python future cancels the work).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use kvrouter_core::{RouterConfig as CoreRouter, RouterMode as CoreMode};
use kvrouter_server::router_service::api::{BestWorkerRequest, LoadsRequest, OverlapRequest};
use kvrouter_server::router_service::{
    ErrorKind, GenerateChunk, GenerateRequest, Generation, Router, RouterError, RouterServiceConfig,
};
use kvrouter_server::workers::spec::{validate_endpoint_name, WorkerSpec, MAX_BLOCK_SIZE};
use pyo3::exceptions::{
    PyFileNotFoundError, PyRuntimeError, PyStopAsyncIteration, PyStopIteration, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::config::{KvRouterConfig, RouterConfig};
use crate::errors::{new_err, Kind};
use crate::ints::extract_u32s;
use crate::json::{to_json, to_py};

/// How long `close()` waits for the runtime's tasks to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The Python exception for a router error.
fn router_error(py: Python<'_>, e: RouterError) -> PyErr {
    let msg = e.api.message;
    match e.kind {
        ErrorKind::InvalidArgument | ErrorKind::DuplicateRequest => PyValueError::new_err(msg),
        ErrorKind::UnknownRequest => new_err(py, Kind::UnknownRequest, msg),
        ErrorKind::WorkerUnavailable => new_err(py, Kind::WorkerUnavailable, msg),
        ErrorKind::AllWorkersBusy => new_err(py, Kind::AllWorkersBusy, msg),
        ErrorKind::QueueFull => new_err(py, Kind::RouterQueueLimitExceeded, msg),
        ErrorKind::WorkerFailed => new_err(py, Kind::WorkerError, msg),
        ErrorKind::Internal => PyRuntimeError::new_err(msg),
    }
}

fn closed_error() -> PyErr {
    PyRuntimeError::new_err("the KvRouter is closed")
}

/// A task on the router's runtime, aborted if its awaiter goes away (a cancelled Python
/// future, a dropped stream step).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `KvRouter`'s routing calls return: the call is done, awaiting it returns its value
/// (or raises its error) at once, in any event loop.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct Ready {
    result: Mutex<Option<PyResult<Py<PyAny>>>>,
}

impl Ready {
    fn new(result: PyResult<Py<PyAny>>) -> Self {
        Self {
            result: Mutex::new(Some(result)),
        }
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> PyResult<()> {
        let taken = self.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(Ok(v)) => Err(PyStopIteration::new_err((v,))),
            Some(Err(e)) => Err(e),
            None => Err(PyRuntimeError::new_err(
                "cannot reuse an already awaited result",
            )),
        }
    }

    fn __repr__(&self) -> &'static str {
        "Ready()"
    }
}

/// A request type of the router API from keyword arguments (`None` values left out), with
/// serde's message (naming the field) as `ValueError`.
fn request<T: DeserializeOwned>(fields: Vec<(&str, Value)>) -> PyResult<T> {
    let m: Map<String, Value> = fields
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    serde_json::from_value(Value::Object(m)).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// An optional JSON-like argument.
fn opt_json(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Value> {
    obj.map_or(Ok(Value::Null), |o| to_json(o, what))
}

fn opt_str(s: Option<String>) -> Value {
    s.map_or(Value::Null, Value::String)
}

/// A serializable result as Python values.
fn to_py_value<T: serde::Serialize>(py: Python<'_>, v: &T) -> PyResult<Py<PyAny>> {
    let value = serde_json::to_value(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(to_py(py, &value)?.unbind())
}

/// What a live router is made of.
struct Live {
    router: Arc<Router>,
    runtime: Runtime,
}

/// A KV-aware router over a set of workers, run in this process (Dynamo's `KvRouter`).
///
/// `KvRouter(endpoint=None, block_size=None, kv_router_config=None, *, workers=None,
/// workers_file=None, router_config=None)`. Workers come from `workers` (a list of dicts in
/// the workers-file schema: `url` required, `kv_events_endpoint`, `replay_endpoint`,
/// `block_size`, `dp_size`, `model`, `id`, `endpoint`, …; the JSON lines `kvrouter mocker`
/// prints are valid) and/or `workers_file` (JSON lines or a JSON array). `endpoint`
/// (`namespace.component.endpoint`) keeps the workers serving it; there is no other
/// discovery: without workers it raises `ValueError`. `block_size` defaults to the one the
/// workers state. `kv_router_config` (or a `router_config` in `RouterMode.KV`, for the busy
/// thresholds) sets the cost function. The router subscribes to the workers' KV events and
/// checks their health on a Tokio runtime of its own until `close()` (or the end of a `with`
/// block, or garbage collection). Thread-safe; the GIL is released while routing.
///
/// Raises `ValueError` (bad arguments, a worker that cannot be registered, no worker of the
/// endpoint), `FileNotFoundError` (no `workers_file`).
#[pyclass(module = "kvrouter._core", frozen)]
pub struct KvRouter {
    live: Mutex<Option<Live>>,
    block_size: usize,
    endpoint: Option<String>,
}

impl KvRouter {
    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The router and its runtime's handle. Errors: closed.
    fn parts(&self) -> PyResult<(Arc<Router>, Handle)> {
        match &*self.lock() {
            Some(l) => Ok((l.router.clone(), l.runtime.handle().clone())),
            None => Err(closed_error()),
        }
    }

    /// Run a routing call now with the GIL released; its result as an awaitable.
    fn ready<T>(
        &self,
        py: Python<'_>,
        call: impl FnOnce(&Router) -> Result<T, RouterError> + Send,
        convert: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Ready>
    where
        T: Send,
    {
        let (router, _) = self.parts()?;
        let result = match py.detach(|| call(&router)) {
            Ok(v) => convert(py, v),
            Err(e) => Err(router_error(py, e)),
        };
        Ok(Ready::new(result))
    }

    /// Stop the router and its runtime (idempotent).
    fn shutdown(&self, py: Python<'_>) {
        let live = self.lock().take();
        if let Some(Live { router, runtime }) = live {
            py.detach(move || {
                runtime.block_on(router.stop());
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            });
        }
    }
}

/// The worker specs of `workers` (dicts in the workers-file schema) and `workers_file`.
fn worker_specs(
    workers: Option<&Bound<'_, PyAny>>,
    workers_file: Option<PathBuf>,
) -> PyResult<Vec<WorkerSpec>> {
    let mut specs = Vec::new();
    if let Some(w) = workers {
        let list = to_json(w, "workers")?;
        if !list.is_array() {
            return Err(PyValueError::new_err(
                "workers must be a list of dicts in the workers-file schema",
            ));
        }
        let text = list.to_string();
        specs.extend(
            WorkerSpec::parse_list(&text)
                .map_err(|e| PyValueError::new_err(format!("workers: {e}")))?,
        );
    }
    if let Some(p) = workers_file {
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PyFileNotFoundError::new_err(format!("workers_file {}: {e}", p.display()))
            } else {
                PyValueError::new_err(format!("workers_file {}: {e}", p.display()))
            }
        })?;
        specs
            .extend(WorkerSpec::parse_list(&text).map_err(|e| {
                PyValueError::new_err(format!("workers_file {}: {e}", p.display()))
            })?);
    }
    Ok(specs)
}

/// The block size: the one given, else the one every worker states.
fn block_size_of(given: Option<usize>, specs: &[WorkerSpec]) -> PyResult<usize> {
    let b = match given {
        Some(b) => b,
        None => {
            let mut sizes = specs.iter().filter_map(|s| s.block_size);
            match sizes.next() {
                Some(first) if sizes.all(|b| b == first) => first,
                Some(_) => {
                    return Err(PyValueError::new_err(
                        "block_size is required: the workers state different block sizes",
                    ))
                }
                None => {
                    return Err(PyValueError::new_err(
                        "block_size is required: no worker states its block_size",
                    ))
                }
            }
        }
    };
    if b == 0 || b > MAX_BLOCK_SIZE {
        return Err(PyValueError::new_err(format!(
            "block_size must be 1..={MAX_BLOCK_SIZE} tokens, got {b}"
        )));
    }
    Ok(b)
}

#[pymethods]
impl KvRouter {
    #[new]
    #[pyo3(signature = (
        endpoint=None,
        block_size=None,
        kv_router_config=None,
        *,
        workers=None,
        workers_file=None,
        router_config=None,
    ))]
    fn new(
        py: Python<'_>,
        endpoint: Option<String>,
        block_size: Option<usize>,
        kv_router_config: Option<PyRef<'_, KvRouterConfig>>,
        workers: Option<&Bound<'_, PyAny>>,
        workers_file: Option<PathBuf>,
        router_config: Option<PyRef<'_, RouterConfig>>,
    ) -> PyResult<Self> {
        if let Some(e) = &endpoint {
            validate_endpoint_name(e)
                .map_err(|m| PyValueError::new_err(format!("endpoint: {m}")))?;
        }
        if workers.is_none() && workers_file.is_none() {
            return Err(PyValueError::new_err(
                "KvRouter needs its workers: pass workers=[{\"url\": ...}, ...] or \
                 workers_file=PATH (kvrouter discovers workers from these only; an endpoint \
                 name selects among them)",
            ));
        }
        let config = match (kv_router_config, router_config) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "pass kv_router_config or router_config, not both",
                ))
            }
            (None, Some(rc)) => {
                if rc.inner.mode != CoreMode::Kv {
                    return Err(PyValueError::new_err(
                        "router_config.mode must be RouterMode.KV for a KvRouter",
                    ));
                }
                rc.inner.clone()
            }
            (kv, None) => CoreRouter {
                mode: CoreMode::Kv,
                kv: kv.map(|c| c.inner.clone()).unwrap_or_default(),
                ..Default::default()
            },
        };
        let specs = worker_specs(workers, workers_file)?;
        let block_size = block_size_of(block_size, &specs)?;
        if let Some(e) = &endpoint {
            if !specs.iter().any(|s| s.endpoint() == e) {
                return Err(PyValueError::new_err(format!(
                    "no worker given serves endpoint `{e}` (a worker's `endpoint` field, \
                     default `dynamo.backend.generate`)"
                )));
            }
        }
        let cfg = RouterServiceConfig::new(
            endpoint.as_deref().unwrap_or("dynamo.backend.generate"),
            block_size,
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvrouter")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("starting the runtime: {e}")))?;
        let started = py.detach(|| {
            runtime.block_on(Router::start_with(&cfg, config, endpoint.as_deref(), specs))
        });
        match started {
            Ok(router) => Ok(Self {
                live: Mutex::new(Some(Live { router, runtime })),
                block_size,
                endpoint,
            }),
            Err(e) => {
                py.detach(|| runtime.shutdown_timeout(SHUTDOWN_GRACE));
                Err(PyValueError::new_err(format!("{e:#}")))
            }
        }
    }

    /// Tokens per KV block the router hashes prompts with.
    #[getter]
    fn block_size(&self) -> usize {
        self.block_size
    }

    /// The endpoint whose workers it routes to (`None`: every worker given).
    #[getter]
    fn endpoint(&self) -> Option<String> {
        self.endpoint.clone()
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.lock().is_none()
    }

    /// The registered workers, as dicts of the workers-file schema with their `id`.
    fn workers(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (router, _) = self.parts()?;
        let mut specs: Vec<WorkerSpec> = router
            .fleet()
            .registry
            .all()
            .iter()
            .map(|w| w.spec.clone())
            .collect();
        specs.sort_by_key(|s| s.id);
        to_py_value(py, &specs)
    }

    /// Route the request, book it on the chosen worker, send it there, and return a
    /// `GenerateStream` of its output chunks: dicts `{"token_ids": [int], "text": str,
    /// "finish_reason": None | str, "usage": None | dict}` (the last has the finish reason
    /// and the worker's usage with `prompt_tokens_details.cached_tokens`). Prefill is marked
    /// complete at the first token and the load freed at the end, on `aclose()`, or when the
    /// stream is released early. `stop_conditions`, `sampling_options`, `output_options` are
    /// Dynamo's dicts (fields kvrouter cannot honour raise `ValueError` naming them);
    /// `worker_id` / `dp_rank` pin the worker / rank.
    ///
    /// Raises (when awaited): `ValueError`, `WorkerUnavailable`, `AllWorkersBusy`,
    /// `RouterQueueLimitExceeded`, `WorkerError`.
    #[pyo3(signature = (
        token_ids,
        model,
        stop_conditions=None,
        sampling_options=None,
        output_options=None,
        router_config_override=None,
        worker_id=None,
        dp_rank=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        token_ids: &Bound<'py, PyAny>,
        model: Option<String>,
        stop_conditions: Option<&Bound<'py, PyAny>>,
        sampling_options: Option<&Bound<'py, PyAny>>,
        output_options: Option<&Bound<'py, PyAny>>,
        router_config_override: Option<&Bound<'py, PyAny>>,
        worker_id: Option<u64>,
        dp_rank: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tokens = extract_u32s(token_ids, "token_ids")?;
        let mut req: GenerateRequest = request(vec![
            ("model", opt_str(model)),
            (
                "stop_conditions",
                opt_json(stop_conditions, "stop_conditions")?,
            ),
            (
                "sampling_options",
                opt_json(sampling_options, "sampling_options")?,
            ),
            (
                "output_options",
                opt_json(output_options, "output_options")?,
            ),
            (
                "router_config_override",
                opt_json(router_config_override, "router_config_override")?,
            ),
            ("worker_id", worker_id.map_or(Value::Null, Value::from)),
            ("dp_rank", dp_rank.map_or(Value::Null, Value::from)),
        ])?;
        req.token_ids = tokens;
        let (router, handle) = self.parts()?;
        let task = AbortOnDrop(handle.spawn(async move { router.generate(req).await }));
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let started = task.await;
            Python::attach(|py| match started {
                Ok(Ok(generation)) => Ok(GenerateStream::new(generation, handle)),
                Ok(Err(e)) => Err(router_error(py, e)),
                Err(_) => Err(closed_error()),
            })
        })
    }

    /// The best `(worker_id, dp_rank, overlap_blocks)` for the prompt (`overlap_blocks`:
    /// leading KV blocks of the prompt cached there). Without `request_id` it changes
    /// nothing; with one the request is booked there until `free(request_id)` (call
    /// `mark_prefill_complete` at its first token). Raises `ValueError` (empty prompt, bad
    /// override, id already booked), `WorkerUnavailable`, `AllWorkersBusy`.
    #[pyo3(signature = (token_ids, router_config_override=None, request_id=None, *, lora_name=None, cache_salt=None))]
    fn best_worker(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        router_config_override: Option<&Bound<'_, PyAny>>,
        request_id: Option<String>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
    ) -> PyResult<Ready> {
        let tokens = extract_u32s(token_ids, "token_ids")?;
        let mut req: BestWorkerRequest = request(vec![
            (
                "router_config_override",
                opt_json(router_config_override, "router_config_override")?,
            ),
            ("request_id", opt_str(request_id)),
            ("lora_name", opt_str(lora_name)),
            ("cache_salt", opt_str(cache_salt)),
        ])?;
        req.token_ids = tokens;
        self.ready(
            py,
            |r| r.best_worker(&req),
            |py, b| {
                let t = PyTuple::new(
                    py,
                    [
                        b.worker_id.into_pyobject(py)?.into_any(),
                        b.dp_rank.into_pyobject(py)?.into_any(),
                        b.overlap_blocks.into_pyobject(py)?.into_any(),
                    ],
                )?;
                Ok(t.into_any().unbind())
            },
        )
    }

    /// Per worker rank, its load if this prompt were added: a list of dicts `{"worker_id",
    /// "dp_rank", "potential_prefill_tokens" (tokens), "potential_decode_blocks" (blocks),
    /// "active_requests"}`. Changes nothing.
    #[pyo3(signature = (token_ids, *, lora_name=None, cache_salt=None))]
    fn get_potential_loads(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
    ) -> PyResult<Ready> {
        let tokens = extract_u32s(token_ids, "token_ids")?;
        let mut req: LoadsRequest = request(vec![
            ("lora_name", opt_str(lora_name)),
            ("cache_salt", opt_str(cache_salt)),
        ])?;
        req.token_ids = tokens;
        self.ready(
            py,
            |r| Ok(r.potential_loads(&req)),
            |py, v| to_py_value(py, &v),
        )
    }

    /// Per worker rank, the blocks of the prompt's prefix cached there by tier: `{"block_size",
    /// "num_blocks", "shared_cache": None, "workers": [{"worker_id", "dp_rank", "device",
    /// "host_pinned", "disk", "shared"}]}`. Changes nothing; `router_config_override` is
    /// validated and ignored, as in Dynamo.
    #[pyo3(signature = (token_ids, router_config_override=None, *, lora_name=None, include_shared=true, cache_salt=None))]
    fn get_overlap_scores(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        router_config_override: Option<&Bound<'_, PyAny>>,
        lora_name: Option<String>,
        include_shared: bool,
        cache_salt: Option<String>,
    ) -> PyResult<Ready> {
        let tokens = extract_u32s(token_ids, "token_ids")?;
        let mut req: OverlapRequest = request(vec![
            (
                "router_config_override",
                opt_json(router_config_override, "router_config_override")?,
            ),
            ("lora_name", opt_str(lora_name)),
            ("cache_salt", opt_str(cache_salt)),
            ("include_shared", Value::Bool(include_shared)),
        ])?;
        req.token_ids = tokens;
        self.ready(py, |r| r.overlap_scores(&req), |py, v| to_py_value(py, &v))
    }

    /// The request booked under `request_id` produced its first token: its prompt leaves the
    /// prefill load. Raises `UnknownRequest`, `ValueError` (empty id).
    fn mark_prefill_complete(&self, py: Python<'_>, request_id: String) -> PyResult<Ready> {
        self.ready(
            py,
            |r| r.mark_prefill_complete(&request_id),
            |py, ()| Ok(py.None()),
        )
    }

    /// The request booked under `request_id` ended: its load is released. Raises
    /// `UnknownRequest`, `ValueError` (empty id).
    fn free(&self, py: Python<'_>, request_id: String) -> PyResult<Ready> {
        self.ready(
            py,
            |r| r.free(&request_id).map(|_| ()),
            |py, ()| Ok(py.None()),
        )
    }

    /// The router's exact KV index as a JSON array (str) of router events that rebuild it.
    fn dump_events(&self, py: Python<'_>) -> PyResult<Ready> {
        self.ready(
            py,
            |r| Ok(r.dump_events()),
            |py, events| {
                let s = serde_json::to_string(&events)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                Ok(s.into_pyobject(py)?.into_any().unbind())
            },
        )
    }

    /// Stop the KV event subscribers, health checks and runtime. Idempotent; later calls raise
    /// `RuntimeError`, streams still open end.
    fn close(&self, py: Python<'_>) {
        self.shutdown(py);
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.shutdown(py);
        false
    }

    fn __repr__(&self) -> String {
        let n = self
            .lock()
            .as_ref()
            .map(|l| l.router.fleet().registry.all().len());
        match n {
            Some(n) => format!(
                "KvRouter(endpoint={:?}, block_size={}, workers={n})",
                self.endpoint, self.block_size
            ),
            None => "KvRouter(closed)".to_string(),
        }
    }
}

impl Drop for KvRouter {
    fn drop(&mut self) {
        let live = self
            .live
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Live { router, runtime }) = live {
            // Garbage collection without close(), maybe on a thread inside a runtime (where
            // nothing may block): stop on a thread of its own.
            let stop = move || {
                runtime.block_on(router.stop());
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            };
            let _ = std::thread::Builder::new()
                .name("kvrouter-close".into())
                .spawn(stop);
        }
    }
}

/// One step of a stream: the next item, or `None` at the end.
type Step = Option<Result<GenerateChunk, RouterError>>;

/// The output of `KvRouter.generate`: an async iterator of chunk dicts, with the serving
/// `worker_id` and `dp_rank`. Leaving it early (`break`, then the stream released, or
/// `await stream.aclose()`) frees the request's load and closes the worker's stream.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct GenerateStream {
    generation: Arc<tokio::sync::Mutex<Option<Generation>>>,
    handle: Handle,
    worker_id: u64,
    dp_rank: u32,
    request_id: String,
}

impl GenerateStream {
    fn new(generation: Generation, handle: Handle) -> Self {
        let rank = generation.worker();
        Self {
            request_id: generation.request_id().to_string(),
            generation: Arc::new(tokio::sync::Mutex::new(Some(generation))),
            handle,
            worker_id: rank.worker_id,
            dp_rank: rank.dp_rank,
        }
    }
}

/// A chunk as a dict: `token_ids`, `text`, `finish_reason`, `usage`.
fn chunk_dict(py: Python<'_>, c: GenerateChunk) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    let ids = c
        .token_ids()
        .map_err(|e| PyRuntimeError::new_err(format!("worker sent bad token ids: {e}")))?;
    d.set_item("token_ids", PyList::new(py, ids)?)?;
    d.set_item("text", c.text)?;
    d.set_item("finish_reason", c.finish_reason)?;
    match c.usage {
        Some(u) => {
            let v: Value = serde_json::from_str(u.get())
                .map_err(|e| PyRuntimeError::new_err(format!("worker sent bad usage: {e}")))?;
            d.set_item("usage", to_py(py, &v)?)?;
        }
        None => d.set_item("usage", py.None())?,
    }
    Ok(d.into_any().unbind())
}

#[pymethods]
impl GenerateStream {
    /// The worker serving the request.
    #[getter]
    fn worker_id(&self) -> u64 {
        self.worker_id
    }

    /// The data-parallel rank serving it.
    #[getter]
    fn dp_rank(&self) -> u32 {
        self.dp_rank
    }

    /// The router's id of the request (its logs name it).
    #[getter]
    fn request_id(&self) -> String {
        self.request_id.clone()
    }

    /// Itself.
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next chunk dict; `StopAsyncIteration` at the end. Raises `WorkerError` if the
    /// worker fails mid-way.
    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let generation = self.generation.clone();
        let task = AbortOnDrop(self.handle.spawn(async move {
            let mut g = generation.lock().await;
            let step: Step = match g.as_mut() {
                Some(gen) => gen.next().await,
                None => None,
            };
            if step.is_none() {
                // Ended (its booking is already freed): release the worker's stream now.
                *g = None;
            }
            step
        }));
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let step = task.await;
            Python::attach(|py| match step {
                Ok(Some(Ok(chunk))) => chunk_dict(py, chunk),
                Ok(Some(Err(e))) => Err(router_error(py, e)),
                Ok(None) => Err(PyStopAsyncIteration::new_err(())),
                Err(_) => Err(closed_error()),
            })
        })
    }

    /// Stop the generation: the request's load is freed and the worker's stream closed.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let generation = self.generation.clone();
        let task = AbortOnDrop(self.handle.spawn(async move {
            generation.lock().await.take();
        }));
        let generation = self.generation.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if task.await.is_err() {
                // The runtime is gone (router closed): drop it here.
                generation.lock().await.take();
            }
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "GenerateStream(request_id={:?}, worker_id={}, dp_rank={})",
            self.request_id, self.worker_id, self.dp_rank
        )
    }
}
