//! `KvEventPublisher`: KV events of a custom engine on a ZMQ PUB socket in vLLM's wire format
//! (with vLLM's replay ROUTER), so that a kvrouter frontend subscribes to it as to a vLLM
//! worker. With `zmq_endpoint` it relays an engine that already publishes. With `nats_server`
//! what it publishes also goes to the endpoint's NATS JetStream stream, through the server's
//! relay (`kvrouter relay`), for routers started with `--event-plane nats`. The sockets, the
//! encoding and the relay are the wire crate's; this module checks arguments and converts them.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use kvrouter_core::event::BlockMmInfo;
use kvrouter_server::replicas::relay::{Relay as NatsRelay, RelayOptions};
use kvrouter_wire::engine::{BlockRemoved, BlockStored, EngineBatch, EngineEvent};
use kvrouter_wire::publisher::{KvEventPublisher as WirePublisher, PublisherConfig};
use kvrouter_wire::relay::{KvEventRelay, RelayConfig};

use crate::hashing::extract_mm_infos;
use crate::ints::{extract_engine_hash, extract_u32s, extract_u64s, type_name, Range};

struct Running {
    publisher: Arc<WirePublisher>,
    relay: Option<KvEventRelay>,
    /// With `nats_server`: the server's relay of our own socket to the endpoint's JetStream
    /// stream, and the runtime it runs on.
    nats: Option<(tokio::runtime::Runtime, NatsRelay)>,
}

/// Starts relaying what `publisher` sends to `endpoint`'s JetStream stream on `server`, as
/// `kvrouter relay` does for a worker `worker_id` publishing there.
fn start_nats(
    publisher: &WirePublisher,
    worker_id: u64,
    kv_block_size: u32,
    server: String,
    endpoint: String,
) -> anyhow::Result<(tokio::runtime::Runtime, NatsRelay)> {
    kvrouter_server::workers::spec::validate_endpoint_name(&endpoint)
        .map_err(|e| anyhow::anyhow!("nats_endpoint: {e}"))?;
    let spec: kvrouter_server::WorkerSpec = serde_json::from_value(serde_json::json!({
        "id": worker_id,
        "url": "http://127.0.0.1:1",
        "kv_events_endpoint": publisher.endpoint(),
        "replay_endpoint": publisher.replay_endpoint(),
        "block_size": kv_block_size,
        "endpoint": endpoint,
    }))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kvrouter-nats-relay")
        .enable_all()
        .build()?;
    let opts = RelayOptions {
        nats_server: server,
        endpoint,
        ..Default::default()
    };
    let relay = rt.block_on(NatsRelay::start(opts, vec![spec]))?;
    Ok((rt, relay))
}

/// Publishes KV events in vLLM's ZMQ wire format: a PUB socket sending `[topic, seq, msgpack
/// KVEventBatch]` and a replay ROUTER answering from a ring of the last `buffer_steps` batches.
/// Each `publish_*` call is one batch with the next sequence number.
#[pyclass(module = "kvrouter._core", frozen)]
pub struct KvEventPublisher {
    worker_id: u64,
    kv_block_size: u32,
    dp_rank: u32,
    topic: String,
    endpoint: String,
    replay_endpoint: Option<String>,
    running: RwLock<Option<Running>>,
}

fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn runtime_err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// One validated stored event.
struct StoredArgs {
    block_hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: Vec<u32>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    mm: Option<Vec<Option<BlockMmInfo>>>,
    is_eagle: bool,
}

impl KvEventPublisher {
    /// Checks a stored event against the block size; errors say which argument is wrong.
    #[allow(clippy::too_many_arguments)]
    fn stored_args(
        &self,
        token_ids: &Bound<'_, PyAny>,
        num_block_tokens: &Bound<'_, PyAny>,
        block_hashes: &Bound<'_, PyAny>,
        parent_hash: Option<&Bound<'_, PyAny>>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        block_mm_infos: Option<&Bound<'_, PyAny>>,
        is_eagle: Option<bool>,
    ) -> PyResult<StoredArgs> {
        let bs = self.kv_block_size as usize;
        let tokens = extract_u32s(token_ids, "token_ids")?;
        let hashes = extract_u64s(block_hashes, "block_hashes", Range::AnyI64OrU64)?;
        let n = hashes.len();
        if n == 0 {
            return Err(PyValueError::new_err(
                "block_hashes is empty: a stored event needs at least one block",
            ));
        }
        // num_block_tokens: Dynamo's list (one count per block) or one int for every block.
        let counts: Vec<u64> = if num_block_tokens.is_instance_of::<pyo3::types::PyInt>() {
            vec![
                num_block_tokens
                    .extract::<u64>()
                    .map_err(|_| { PyValueError::new_err("num_block_tokens must be >= 0") })?;
                n
            ]
        } else {
            let c = extract_u64s(num_block_tokens, "num_block_tokens", Range::U64)?;
            if c.len() != n {
                return Err(PyValueError::new_err(format!(
                    "num_block_tokens has {} entries for {n} block_hashes",
                    c.len()
                )));
            }
            c
        };
        if let Some((i, &c)) = counts.iter().enumerate().find(|(_, &c)| c != bs as u64) {
            return Err(PyValueError::new_err(format!(
                "num_block_tokens[{i}] = {c}: only full blocks of kv_block_size = {bs} tokens are cached and published"
            )));
        }
        let eagle = is_eagle.unwrap_or(false);
        let want = n * bs + usize::from(eagle);
        if tokens.len() != want {
            return Err(PyValueError::new_err(format!(
                "token_ids has {} tokens; {n} block(s) of {bs} need {want}{}",
                tokens.len(),
                if eagle {
                    " (eagle: one look-ahead token more)"
                } else {
                    ""
                }
            )));
        }
        let parent = match parent_hash.filter(|p| !p.is_none()) {
            Some(p) => Some(extract_engine_hash(p, "parent_hash")?),
            None => None,
        };
        let mut sorted = hashes.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(PyValueError::new_err("block_hashes repeats a hash"));
        }
        if parent.is_some_and(|p| sorted.binary_search(&p).is_ok()) {
            return Err(PyValueError::new_err("parent_hash is one of block_hashes"));
        }
        let mm = extract_mm_infos(block_mm_infos)?;
        if let Some(m) = &mm {
            if m.len() != n {
                return Err(PyValueError::new_err(format!(
                    "block_mm_infos has {} entries for {n} blocks",
                    m.len()
                )));
            }
        }
        Ok(StoredArgs {
            block_hashes: hashes,
            parent,
            tokens,
            lora_name: lora_name.filter(|s| !s.is_empty()),
            cache_salt: cache_salt.filter(|s| !s.is_empty()),
            mm,
            is_eagle: eagle,
        })
    }

    fn stored_event(&self, a: StoredArgs) -> EngineEvent {
        EngineEvent::BlockStored(BlockStored {
            block_hashes: a.block_hashes,
            parent_block_hash: a.parent,
            token_ids: a.tokens,
            block_size: self.kv_block_size,
            medium: Some("GPU".into()),
            lora_name: a.lora_name,
            cache_salt: a.cache_salt,
            block_mm_infos: a.mm,
            is_eagle: a.is_eagle.then_some(true),
            ..Default::default()
        })
    }

    fn removed_event(&self, block_hashes: &Bound<'_, PyAny>) -> PyResult<EngineEvent> {
        let hashes = extract_u64s(block_hashes, "block_hashes", Range::AnyI64OrU64)?;
        if hashes.is_empty() {
            return Err(PyValueError::new_err(
                "block_hashes is empty: nothing to remove",
            ));
        }
        Ok(EngineEvent::BlockRemoved(BlockRemoved {
            block_hashes: hashes,
            medium: Some("GPU".into()),
            ..Default::default()
        }))
    }

    /// Publishes one batch; returns its sequence number.
    fn publish(&self, py: Python<'_>, events: Vec<EngineEvent>) -> PyResult<u64> {
        let batch = EngineBatch {
            ts: now_ts(),
            events,
            dp_rank: Some(self.dp_rank),
        };
        py.detach(|| {
            let guard = self.running.read().unwrap_or_else(|e| e.into_inner());
            let Some(r) = guard.as_ref() else {
                return Err(PyRuntimeError::new_err("the publisher is shut down"));
            };
            r.publisher.publish(&batch).map_err(runtime_err)
        })
    }
}

#[pymethods]
impl KvEventPublisher {
    #[new]
    #[pyo3(
        text_signature = "(worker_id, kv_block_size, dp_rank=0, zmq_endpoint=None, zmq_topic=None, *, endpoint='tcp://127.0.0.1:0', replay_endpoint='tcp://127.0.0.1:0', topic='', buffer_steps=10000, zmq_replay_endpoint=None, zmq_bind=False, nats_server=None, nats_endpoint='dynamo.backend.generate')"
    )]
    #[pyo3(signature = (
        worker_id,
        kv_block_size,
        dp_rank=0,
        zmq_endpoint=None,
        zmq_topic=None,
        *,
        endpoint="tcp://127.0.0.1:0".to_string(),
        replay_endpoint=Some("tcp://127.0.0.1:0".to_string()),
        topic=String::new(),
        buffer_steps=10_000,
        zmq_replay_endpoint=None,
        zmq_bind=false,
        nats_server=None,
        nats_endpoint=kvrouter_server::workers::spec::DEFAULT_ENDPOINT.to_string(),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        worker_id: u64,
        kv_block_size: u32,
        dp_rank: u32,
        zmq_endpoint: Option<String>,
        zmq_topic: Option<String>,
        endpoint: String,
        replay_endpoint: Option<String>,
        topic: String,
        buffer_steps: usize,
        zmq_replay_endpoint: Option<String>,
        zmq_bind: bool,
        nats_server: Option<String>,
        nats_endpoint: String,
    ) -> PyResult<Self> {
        if kv_block_size == 0 {
            return Err(PyValueError::new_err("kv_block_size must be > 0"));
        }
        if nats_server.is_some() && dp_rank != 0 {
            // The relay subscribes per worker rank on the worker's base port + rank.
            return Err(PyValueError::new_err(
                "nats_server relays rank 0 only: give each data-parallel rank its own worker_id",
            ));
        }
        if zmq_endpoint.is_none()
            && (zmq_topic.is_some() || zmq_replay_endpoint.is_some() || zmq_bind)
        {
            return Err(PyValueError::new_err(
                "zmq_topic, zmq_replay_endpoint and zmq_bind configure the relay: they need zmq_endpoint",
            ));
        }
        let config = PublisherConfig {
            endpoint,
            replay_endpoint,
            topic: topic.clone(),
            buffer_steps,
            ..Default::default()
        };
        py.detach(move || {
            let publisher = Arc::new(WirePublisher::bind(config).map_err(runtime_err)?);
            let relay = match zmq_endpoint {
                None => None,
                Some(ep) => Some(
                    KvEventRelay::start(
                        RelayConfig {
                            endpoint: ep,
                            replay_endpoint: zmq_replay_endpoint,
                            topic: zmq_topic.unwrap_or_default(),
                            bind: zmq_bind,
                            dp_rank,
                            block_size: kv_block_size,
                            replay: Default::default(),
                        },
                        publisher.clone(),
                    )
                    .map_err(runtime_err)?,
                ),
            };
            let nats = match nats_server {
                None => None,
                Some(server) => Some(
                    start_nats(&publisher, worker_id, kv_block_size, server, nats_endpoint)
                        .map_err(|e| PyValueError::new_err(format!("{e:#}")))?,
                ),
            };
            Ok(Self {
                worker_id,
                kv_block_size,
                dp_rank,
                topic,
                endpoint: publisher.endpoint().to_owned(),
                replay_endpoint: publisher.replay_endpoint().map(str::to_owned),
                running: RwLock::new(Some(Running {
                    publisher,
                    relay,
                    nats,
                })),
            })
        })
    }

    /// Publishes newly cached full blocks: `block_hashes[i]` is block i's engine hash (signed
    /// or unsigned 64-bit), `parent_hash` the block before the first (None at the sequence
    /// start), `token_ids` all their tokens. Returns the batch's sequence number.
    #[pyo3(signature = (token_ids, num_block_tokens, block_hashes, parent_hash=None, *, lora_name=None, cache_salt=None, block_mm_infos=None, is_eagle=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_stored(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        num_block_tokens: &Bound<'_, PyAny>,
        block_hashes: &Bound<'_, PyAny>,
        parent_hash: Option<&Bound<'_, PyAny>>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        block_mm_infos: Option<&Bound<'_, PyAny>>,
        is_eagle: Option<bool>,
    ) -> PyResult<u64> {
        let args = self.stored_args(
            token_ids,
            num_block_tokens,
            block_hashes,
            parent_hash,
            lora_name,
            cache_salt,
            block_mm_infos,
            is_eagle,
        )?;
        self.publish(py, vec![self.stored_event(args)])
    }

    /// Publishes evicted blocks by engine hash. Returns the batch's sequence number.
    fn publish_removed(&self, py: Python<'_>, block_hashes: &Bound<'_, PyAny>) -> PyResult<u64> {
        let ev = self.removed_event(block_hashes)?;
        self.publish(py, vec![ev])
    }

    /// Publishes that every cached block is gone (vLLM's `AllBlocksCleared`). Returns the
    /// batch's sequence number.
    fn publish_cleared(&self, py: Python<'_>) -> PyResult<u64> {
        self.publish(py, vec![EngineEvent::AllBlocksCleared])
    }

    /// Publishes several events as one batch, in order: each a dict with `"type"` `"stored"`
    /// (and `publish_stored`'s arguments as keys), `"removed"` (`block_hashes`) or
    /// `"cleared"`. Every event is checked before anything is published.
    fn publish_batch(&self, py: Python<'_>, events: &Bound<'_, PyAny>) -> PyResult<u64> {
        let items: Vec<Bound<'_, PyAny>> = if let Ok(l) = events.cast::<PyList>() {
            l.iter().collect()
        } else if let Ok(t) = events.cast::<PyTuple>() {
            t.iter().collect()
        } else {
            return Err(PyTypeError::new_err(format!(
                "events must be a list of dicts, not {}",
                type_name(events)
            )));
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ev = self
                .batch_event(item)
                .map_err(|e| prefix_err(py, e, &format!("events[{i}]: ")))?;
            out.push(ev);
        }
        if out.is_empty() {
            return Err(PyValueError::new_err("events is empty"));
        }
        self.publish(py, out)
    }

    /// Stops the relay (if any) and closes the sockets. Publishing afterwards raises.
    fn shutdown(&self, py: Python<'_>) {
        let running = self
            .running
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = running {
            py.detach(move || {
                if let Some(relay) = r.relay {
                    relay.stop();
                }
                // What was published reaches NATS before the socket closes.
                if let Some((rt, relay)) = r.nats {
                    rt.block_on(relay.stop());
                    rt.shutdown_timeout(std::time::Duration::from_secs(3));
                }
                drop(r.publisher);
            });
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.shutdown(py);
        false
    }

    /// The PUB socket's address (the actual port when bound to port 0): what a subscriber, or
    /// a kvrouter worker entry's `kv_events_endpoint`, connects to.
    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay ROUTER's address, or None when replay is off.
    #[getter]
    fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The topic frame of every message.
    #[getter]
    fn topic(&self) -> &str {
        &self.topic
    }

    #[getter]
    fn worker_id(&self) -> u64 {
        self.worker_id
    }

    #[getter]
    fn dp_rank(&self) -> u32 {
        self.dp_rank
    }

    #[getter]
    fn kv_block_size(&self) -> u32 {
        self.kv_block_size
    }

    /// The sequence number the next batch will get (None once shut down).
    #[getter]
    fn next_seq(&self) -> Option<u64> {
        let guard = self.running.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|r| r.publisher.next_seq())
    }

    /// Relay counters (None when not relaying or shut down): `received`, `published`,
    /// `filtered_events`, `dropped_batches`, `bad_messages`, `gaps`, `recovered`, `cleared`,
    /// `restarts`.
    fn relay_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let guard = self.running.read().unwrap_or_else(|e| e.into_inner());
        let Some(relay) = guard.as_ref().and_then(|r| r.relay.as_ref()) else {
            return Ok(None);
        };
        let s = relay.stats();
        let d = PyDict::new(py);
        for (k, v) in [
            ("received", s.received),
            ("published", s.published),
            ("filtered_events", s.filtered_events),
            ("dropped_batches", s.dropped_batches),
            ("bad_messages", s.bad_messages),
            ("gaps", s.gaps),
            ("recovered", s.recovered),
            ("cleared", s.cleared),
            ("restarts", s.restarts),
        ] {
            d.set_item(k, v)?;
        }
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        format!(
            "KvEventPublisher(worker_id={}, kv_block_size={}, dp_rank={}, endpoint={:?}, replay_endpoint={:?})",
            self.worker_id, self.kv_block_size, self.dp_rank, self.endpoint, self.replay_endpoint
        )
    }
}

impl KvEventPublisher {
    fn batch_event(&self, item: &Bound<'_, PyAny>) -> PyResult<EngineEvent> {
        let d = item.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!("must be a dict, not {}", type_name(item)))
        })?;
        let get = |k: &str| d.get_item(k);
        let ty: String = get("type")?
            .ok_or_else(|| PyValueError::new_err("missing 'type'"))?
            .extract()?;
        let allowed: &[&str] = match ty.as_str() {
            "stored" => &[
                "type",
                "token_ids",
                "num_block_tokens",
                "block_hashes",
                "parent_hash",
                "lora_name",
                "cache_salt",
                "block_mm_infos",
                "is_eagle",
            ],
            "removed" => &["type", "block_hashes"],
            "cleared" => &["type"],
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown type '{other}' (stored, removed or cleared)"
                )))
            }
        };
        for k in d.keys() {
            let k: String = k.extract()?;
            if !allowed.contains(&k.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "unknown key '{k}' for a {ty} event"
                )));
            }
        }
        let required =
            |k: &str| get(k)?.ok_or_else(|| PyValueError::new_err(format!("missing '{k}'")));
        match ty.as_str() {
            "stored" => {
                let opt_str = |k: &str| -> PyResult<Option<String>> {
                    match get(k)? {
                        Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
                        _ => Ok(None),
                    }
                };
                let is_eagle = match get("is_eagle")? {
                    Some(v) if !v.is_none() => Some(v.extract::<bool>()?),
                    _ => None,
                };
                let args = self.stored_args(
                    &required("token_ids")?,
                    &required("num_block_tokens")?,
                    &required("block_hashes")?,
                    get("parent_hash")?.as_ref(),
                    opt_str("lora_name")?,
                    opt_str("cache_salt")?,
                    get("block_mm_infos")?.as_ref(),
                    is_eagle,
                )?;
                Ok(self.stored_event(args))
            }
            "removed" => self.removed_event(&required("block_hashes")?),
            _ => Ok(EngineEvent::AllBlocksCleared),
        }
    }
}

/// The same exception with `prefix` in front of its message.
fn prefix_err(py: Python<'_>, e: PyErr, prefix: &str) -> PyErr {
    let msg = e
        .value(py)
        .str()
        .map_or_else(|_| String::new(), |s| s.to_string());
    let ty = e.get_type(py);
    PyErr::from_type(ty, format!("{prefix}{msg}"))
}
