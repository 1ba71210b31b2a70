//! Workers: how they are described ([`WorkerSpec`]: flags, workers file, admin API), and the
//! live set ([`Registry`]) with each worker's health and KV event subscribers.
//!
//! A worker joins the routing set when registered, leaves it when its health check or a
//! request to it fails (its index entries are cleared and its booked load dropped), and comes
//! back when `GET {url}/health` answers 200 again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kvrouter_core::event::{WorkerId, WorkerWithDpRank};
use kvrouter_core::DeviceType;
use kvrouter_wire::subscriber::{dp_endpoint, KvEventSubscriber, SubscriberStats};
use serde::{Deserialize, Serialize};

/// One worker as registered. Every field but `url` is optional; unknown fields are ignored,
/// so the JSON lines `kvrouter mocker` prints are valid specs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Stable id (routing unit is `(id, dp_rank)`); assigned when absent.
    #[serde(default)]
    pub id: Option<WorkerId>,
    /// Base URL of its OpenAI-compatible server, e.g. `http://127.0.0.1:8100`.
    pub url: String,
    /// Model name the worker serves (sent in the `model` field); default: ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// ZMQ PUB endpoint of its KV events (rank 0; rank r per vLLM's `port + r` rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_endpoint: Option<String>,
    /// ZMQ ROUTER endpoint for replaying missed event batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    /// ZMQ topic of its events (vLLM default: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_topic: Option<String>,
    /// Tokens per KV block; must agree across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Data-parallel ranks behind this URL (requests carry `X-data-parallel-rank`).
    #[serde(default = "one")]
    pub dp_size: u32,
    /// `cpu` or `gpu` (device-aware-weighted mode).
    #[serde(default)]
    pub device: DeviceType,
    /// KV cache capacity per rank, blocks (busy threshold on decode blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_kv_blocks: Option<u64>,
    /// Tokens per engine step (busy threshold as a fraction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_batched_tokens: Option<u64>,
}

fn one() -> u32 {
    1
}

impl WorkerSpec {
    /// A worker known by URL only.
    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            dp_size: 1,
            ..Default::default()
        }
    }

    /// Parse a JSON array of specs or JSON lines (blank lines and `#` comments skipped).
    /// Errors: the first malformed entry, with its line number.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let t = text.trim_start();
        if t.starts_with('[') {
            return serde_json::from_str(t).map_err(|e| e.to_string());
        }
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        Ok(out)
    }

    /// Check fields a router cannot work with. Errors: a message for the client.
    pub fn validate(&self) -> Result<(), String> {
        let u = &self.url;
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 8 {
            return Err(format!("worker url must be http(s)://host:port, got {u:?}"));
        }
        if self.dp_size == 0 || self.dp_size > 1024 {
            return Err(format!("dp_size must be 1..=1024, got {}", self.dp_size));
        }
        if self.block_size == Some(0) {
            return Err("block_size must be > 0".into());
        }
        if let Some(e) = &self.kv_events_endpoint {
            if !e.contains("://") {
                return Err(format!(
                    "kv_events_endpoint must be a ZMQ endpoint like tcp://host:port, got {e:?}"
                ));
            }
        }
        Ok(())
    }

    /// Its ranks.
    pub fn ranks(&self) -> impl Iterator<Item = WorkerWithDpRank> + '_ {
        let id = self.id.unwrap_or(0);
        (0..self.dp_size).map(move |r| WorkerWithDpRank::new(id, r))
    }

    /// The KV event endpoint of one rank.
    pub fn rank_endpoint(&self, rank: u32) -> Option<String> {
        self.kv_events_endpoint
            .as_deref()
            .map(|e| dp_endpoint(e, rank))
    }
}

/// A registered worker.
pub struct Worker {
    /// Its description, with `id` set.
    pub spec: WorkerSpec,
    healthy: AtomicBool,
    subscribers: Mutex<Vec<KvEventSubscriber>>,
}

impl Worker {
    pub fn id(&self) -> WorkerId {
        self.spec.id.unwrap_or(0)
    }

    /// Whether it is in the routing set.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Set health; returns the previous value.
    pub fn set_healthy(&self, h: bool) -> bool {
        self.healthy.swap(h, Ordering::AcqRel)
    }

    /// Attach the running event subscribers of its ranks.
    pub fn set_subscribers(&self, subs: Vec<KvEventSubscriber>) {
        *self.subscribers.lock().unwrap_or_else(|e| e.into_inner()) = subs;
    }

    /// Per rank: the subscriber's counters (empty without KV events).
    pub fn event_stats(&self) -> Vec<(WorkerWithDpRank, SubscriberStats)> {
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.spec
            .ranks()
            .zip(subs.iter().map(|s| s.stats()))
            .collect()
    }

    /// Stop its subscribers (joins their threads; call off the async runtime).
    pub fn stop_subscribers(&self) {
        let subs = std::mem::take(&mut *self.subscribers.lock().unwrap_or_else(|e| e.into_inner()));
        for s in subs {
            s.stop();
        }
    }
}

/// The registered workers by id. Written on registration changes only; read per request.
#[derive(Default)]
pub struct Registry {
    workers: RwLock<BTreeMap<WorkerId, Arc<Worker>>>,
    next_id: Mutex<WorkerId>,
}

impl Registry {
    /// Add a worker (healthy). Errors: its id is taken.
    pub fn insert(&self, mut spec: WorkerSpec) -> Result<Arc<Worker>, String> {
        let mut map = self.workers.write().unwrap_or_else(|e| e.into_inner());
        let id = match spec.id {
            Some(id) => {
                if map.contains_key(&id) {
                    return Err(format!("worker id {id} is already registered"));
                }
                id
            }
            None => {
                // Never hand out an id twice: a new worker must not inherit a gone one's
                // metrics series or late events.
                let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
                while map.contains_key(&*n) {
                    *n += 1;
                }
                *n += 1;
                *n - 1
            }
        };
        if let Some(w) = map.values().find(|w| w.spec.url == spec.url) {
            return Err(format!("worker {} already serves {}", w.id(), spec.url));
        }
        spec.id = Some(id);
        let w = Arc::new(Worker {
            spec,
            healthy: AtomicBool::new(true),
            subscribers: Mutex::new(Vec::new()),
        });
        map.insert(id, w.clone());
        Ok(w)
    }

    /// Remove a worker; returns it.
    pub fn remove(&self, id: WorkerId) -> Option<Arc<Worker>> {
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    }

    pub fn get(&self, id: WorkerId) -> Option<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// All workers, by id.
    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
