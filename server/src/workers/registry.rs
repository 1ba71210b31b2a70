//! The registered workers ([`Registry`]) and each one's health and KV event subscribers
//! ([`Worker`]).
//!
//! Health has three states, so that a stall does not make the router forget what a worker
//! caches:
//!
//! * **healthy** — in the routing set;
//! * **suspect** — a health check or a connection to it failed: no new requests, but its index
//!   entries and the bookings of its in-flight requests are kept; one passing check makes it
//!   healthy again with everything intact;
//! * **removed** — still failing after the configured number of checks or time: its index
//!   entries are cleared and its bookings dropped (the engine may have lost its cache); it is
//!   re-admitted when healthy, and its KV events rebuild the index.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use kvrouter_core::event::{WorkerId, WorkerWithDpRank};
use kvrouter_wire::subscriber::{KvEventSubscriber, SubscriberStats};

use super::accuracy::{Accuracy, Cause, EventFlow, Report, Sample, Verdict};
use super::spec::WorkerSpec;
use super::trtllm_poller::TrtPoller;

/// Where a worker stands (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Suspect,
    Removed,
}

impl Health {
    /// `healthy` | `suspect` | `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Suspect => "suspect",
            Health::Removed => "removed",
        }
    }
}

/// A worker's health with the failures that led there.
#[derive(Clone, Copy, Debug)]
pub struct HealthState {
    pub health: Health,
    /// Consecutive failed checks (0 when healthy).
    pub failures: u32,
    /// When the current state began.
    pub since: Instant,
}

/// A registered worker.
pub struct Worker {
    /// Its description, with `id` and `block_size` set.
    pub spec: WorkerSpec,
    /// Where it came from: `static` (`--worker`, `--workers-file`, the embedded stack),
    /// `admin`, or the discovery registration (`file:<path>`, `etcd:<key>`).
    pub source: String,
    health: Mutex<HealthState>,
    subscribers: Mutex<Vec<KvEventSubscriber>>,
    /// The poller of a TensorRT-LLM worker's HTTP events (instead of subscribers).
    poller: Mutex<Option<TrtPoller>>,
    /// Predicted against reported cached tokens ([`super::accuracy`]).
    accuracy: Mutex<Accuracy>,
}

impl Worker {
    pub fn id(&self) -> WorkerId {
        self.spec.id.unwrap_or(0)
    }

    /// Its health now.
    pub fn health(&self) -> HealthState {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it takes new requests.
    pub fn is_healthy(&self) -> bool {
        self.health().health == Health::Healthy
    }

    /// Apply `f` to its health under the lock; returns `(before, after)`.
    pub fn update_health(&self, f: impl FnOnce(&mut HealthState)) -> (HealthState, HealthState) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let before = *h;
        f(&mut h);
        if h.health != before.health {
            h.since = Instant::now();
        }
        (before, *h)
    }

    /// Attach the running event subscribers of its ranks.
    pub fn set_subscribers(&self, subs: Vec<KvEventSubscriber>) {
        *self.subscribers.lock().unwrap_or_else(|e| e.into_inner()) = subs;
    }

    /// Attach the running poller of its TensorRT-LLM events.
    pub fn set_poller(&self, poller: TrtPoller) {
        *self.poller.lock().unwrap_or_else(|e| e.into_inner()) = Some(poller);
    }

    /// Per rank: the subscriber's (or poller's) counters and state (empty without KV events).
    pub fn event_stats(&self) -> Vec<(WorkerWithDpRank, SubscriberStats)> {
        if let Some(p) = &*self.poller.lock().unwrap_or_else(|e| e.into_inner()) {
            return self.spec.ranks().zip(p.stats()).collect();
        }
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.spec
            .ranks()
            .zip(subs.iter().map(|s| s.stats()))
            .collect()
    }

    /// Its KV event flow, summed over its ranks.
    pub fn event_flow(&self) -> EventFlow {
        let stats = self.event_stats();
        EventFlow::from_stats(stats.iter().map(|(_, st)| st))
    }

    /// Compare one request's predicted cached tokens with those the engine reported. When
    /// its verdict has just turned bad, logs one warning naming the likely cause and returns
    /// it.
    pub fn record_accuracy(&self, sample: Sample) -> Option<(Verdict, Cause)> {
        let bs = self.spec.block_size.unwrap_or(0);
        let turned = self
            .accuracy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(sample, bs)?;
        let flow = self.event_flow();
        let cause = Cause::of(turned, &flow)?;
        let r = self.accuracy();
        tracing::warn!(
            worker_id = self.id(),
            url = %self.spec.url,
            verdict = turned.as_str(),
            cause = cause.as_str(),
            window_requests = r.window_requests,
            predicted_tokens = r.window_predicted_tokens,
            reported_tokens = r.window_reported_tokens,
            block_size = bs,
            events_received = flow.received,
            events_applied = flow.applied,
            events_filtered = flow.filtered,
            "KV routing accuracy: router predictions and engine-reported cache hits diverge: {}",
            cause.advice()
        );
        Some((turned, cause))
    }

    /// Its accuracy verdict now.
    pub fn accuracy_verdict(&self) -> Verdict {
        self.accuracy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .verdict(self.spec.block_size.unwrap_or(0))
    }

    /// Its accuracy: totals, window and verdict with the likely cause.
    pub fn accuracy(&self) -> Report {
        let flow = self.event_flow();
        self.accuracy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report(self.spec.block_size.unwrap_or(0), flow)
    }

    /// Stop its subscribers or poller (joins their threads; call off the async runtime).
    pub fn stop_subscribers(&self) {
        if let Some(p) = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
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
    /// LoRA adapter name → the workers serving it (rebuilt with every change of `workers`,
    /// under its write lock).
    adapters: RwLock<BTreeMap<String, Arc<[WorkerId]>>>,
}

impl Registry {
    /// Add a worker (healthy). Errors: its id or URL is taken.
    pub fn insert(&self, mut spec: WorkerSpec, source: String) -> Result<Arc<Worker>, String> {
        let mut map = self.workers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.values().find(|w| w.spec.url == spec.url) {
            return Err(format!("worker {} already serves {}", w.id(), spec.url));
        }
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
        spec.id = Some(id);
        let w = Arc::new(Worker {
            spec,
            source,
            health: Mutex::new(HealthState {
                health: Health::Healthy,
                failures: 0,
                since: Instant::now(),
            }),
            subscribers: Mutex::new(Vec::new()),
            poller: Mutex::new(None),
            accuracy: Mutex::default(),
        });
        map.insert(id, w.clone());
        self.index_adapters(&map);
        Ok(w)
    }

    /// Remove a worker; returns it.
    pub fn remove(&self, id: WorkerId) -> Option<Arc<Worker>> {
        let mut map = self.workers.write().unwrap_or_else(|e| e.into_inner());
        let w = map.remove(&id);
        if w.as_ref().is_some_and(|w| !w.spec.lora_adapters.is_empty()) {
            self.index_adapters(&map);
        }
        w
    }

    /// Rebuild the adapter index from `map` (called with the workers' write lock held).
    fn index_adapters(&self, map: &BTreeMap<WorkerId, Arc<Worker>>) {
        let mut by_name: BTreeMap<String, Vec<WorkerId>> = BTreeMap::new();
        // By id order (a BTreeMap): each list comes out sorted.
        for (id, w) in map {
            for name in &w.spec.lora_adapters {
                by_name.entry(name.clone()).or_default().push(*id);
            }
        }
        *self.adapters.write().unwrap_or_else(|e| e.into_inner()) = by_name
            .into_iter()
            .map(|(name, ids)| (name, ids.into()))
            .collect();
    }

    /// The registered workers serving LoRA adapter `name`, sorted by id (as the scheduler's
    /// filter wants them; None: no worker serves it).
    pub fn lora_workers(&self, name: &str) -> Option<Arc<[WorkerId]>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The LoRA adapters the registered workers serve, sorted by name.
    pub fn lora_adapters(&self) -> Vec<String> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn get(&self, id: WorkerId) -> Option<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
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
