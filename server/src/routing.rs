//! The router inside the frontend: hashing and index lookup without locks, then one short
//! critical section on the [`Scheduler`] (load projection, selection, booking). A request's
//! booking is a [`Booking`] guard that frees the load when dropped, so a request that ends in
//! any way — completed, failed, client gone — releases what it booked.
//!
//! KV events from every worker's subscriber arrive on one channel; a dedicated thread applies
//! them to the shared index in batches and publishes each batch to readers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvrouter_core::event::{
    KvCacheEventData, RouterEvent, StorageTier, WorkerId, WorkerWithDpRank,
};
use kvrouter_core::hash::HashOptions;
use kvrouter_core::index::{shared_index, IndexOp, IndexReader, SharedIndexWriter};
use kvrouter_core::{
    RequestHashes, RouteError, RouteRequest, RouterConfig, RouterConfigOverride, Scheduler,
    SelectError, Selection, WorkerInfo,
};

use crate::metrics::{Metrics, RankLabels, StageLabels};

/// Events buffered between subscribers and the index thread.
const EVENT_QUEUE: usize = 65_536;
/// Events applied per publish at most, so readers see progress under a flood.
const MAX_BATCH: usize = 4096;

/// What the frontend asks of the router for one request.
#[derive(Debug, Default)]
pub struct RouteInput<'a> {
    pub tokens: &'a [u32],
    /// `nvext.backend_instance_id`: route to this worker (any mode).
    pub pinned_worker: Option<WorkerId>,
    /// `nvext.dp_rank`: only this rank.
    pub dp_rank: Option<u32>,
    /// `nvext.router_config_override`.
    pub overrides: Option<RouterConfigOverride>,
    /// LoRA adapter name (changes block hashes).
    pub lora_name: Option<&'a str>,
    /// `cache_salt` (changes block hashes).
    pub cache_salt: Option<&'a str>,
}

/// Why a worker registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("worker block size {worker} differs from the router's {router}; all workers must share one block size")]
    BlockSizeMismatch { worker: usize, router: usize },
}

/// The router state shared by every request handler.
pub struct RouterState {
    config: RouterConfig,
    /// `--kv-cache-block-size`: for workers registered without a block size.
    default_block_size: Option<usize>,
    sched: Mutex<Scheduler>,
    /// The scheduler's block size, readable without its lock.
    block_size: AtomicUsize,
    index: IndexReader,
    events: SyncSender<RouterEvent>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    next_request: AtomicU64,
}

impl RouterState {
    /// A router with no workers, and its index thread. `block_size`: `--kv-cache-block-size`.
    pub fn new(
        config: RouterConfig,
        block_size: Option<usize>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let m = metrics.clone();
        let (writer, index) = shared_index(Some(Arc::new(move |w: WorkerWithDpRank, e: &_| {
            m.index_error(
                w.worker_id,
                w.dp_rank,
                kvrouter_core::index::IndexError::label(e),
            );
        })));
        let (tx, rx) = sync_channel(EVENT_QUEUE);
        std::thread::Builder::new()
            .name("kv-index".into())
            .spawn(move || index_loop(writer, rx))
            .expect("spawning the index thread");
        Arc::new(Self {
            sched: Mutex::new(Scheduler::new(config.clone(), block_size.unwrap_or(0))),
            config,
            default_block_size: block_size,
            block_size: AtomicUsize::new(block_size.unwrap_or(0)),
            index,
            events: tx,
            metrics,
            epoch: Instant::now(),
            next_request: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Where subscribers send their events.
    pub fn event_sink(&self) -> SyncSender<RouterEvent> {
        self.events.clone()
    }

    /// The exact index's reader.
    pub fn index(&self) -> &IndexReader {
        &self.index
    }

    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Tokens per block in use (0 until known).
    pub fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Acquire)
    }

    /// The block size a worker with this registration will use: its own when it gives one,
    /// else the fleet's, else `--kv-cache-block-size`, else 16 (vLLM's default). The first
    /// worker of an empty fleet sets the fleet's. Errors: it differs from the fleet's.
    pub fn admit_block_size(&self, worker: Option<usize>) -> Result<usize, RegisterError> {
        let mut s = self.sched();
        let current = s.block_size();
        let want = match worker {
            Some(w) => w,
            None if current > 0 => current,
            None => self.default_block_size.unwrap_or(16),
        };
        if current == 0 || (want != current && s.workers().is_empty()) {
            *s = Scheduler::new(self.config.clone(), want);
            self.block_size.store(want, Ordering::Release);
            return Ok(want);
        }
        if want != current {
            return Err(RegisterError::BlockSizeMismatch {
                worker: want,
                router: current,
            });
        }
        Ok(current)
    }

    /// Put a worker's ranks into the routing set.
    pub fn add_ranks(&self, ranks: impl IntoIterator<Item = WorkerInfo>) {
        let mut s = self.sched();
        for r in ranks {
            s.add_worker(r);
        }
    }

    /// Take a worker out of the routing set: its booked load is dropped and its index entries
    /// cleared on every storage tier (the clear is queued behind events already received).
    pub fn remove_worker(&self, worker: WorkerId, dp_size: u32) {
        self.sched().remove_worker(worker);
        let tiers = [
            StorageTier::Device,
            StorageTier::HostPinned,
            StorageTier::Disk,
        ];
        for rank in 0..dp_size {
            for tier in tiers {
                let mut ev = RouterEvent::new(
                    WorkerWithDpRank::new(worker, rank),
                    0,
                    KvCacheEventData::Cleared,
                );
                ev.storage_tier = tier;
                self.send_event(ev);
            }
        }
    }

    /// Queue an event for the index writer without blocking the caller.
    fn send_event(&self, ev: RouterEvent) {
        match self.events.try_send(ev) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(ev)) => {
                let tx = self.events.clone();
                std::thread::spawn(move || tx.send(ev));
            }
        }
    }

    /// Ranks in the routing set, with their current load.
    pub fn ranks(&self) -> Vec<(WorkerInfo, kvrouter_core::sequences::WorkerLoad)> {
        let s = self.sched();
        s.workers()
            .iter()
            .map(|w| (*w, s.active().load(w.worker)))
            .collect()
    }

    /// Choose a rank and book the request on it.
    ///
    /// Errors: [`SelectError`] (no workers, all busy, unknown pinned worker, …) and booking
    /// errors, as [`RouteError`].
    pub fn route(self: &Arc<Self>, input: &RouteInput<'_>) -> Result<Booking, RouteError> {
        let t0 = Instant::now();
        let id = format!("r{}", self.next_request.fetch_add(1, Ordering::Relaxed));
        let opts = HashOptions {
            lora_name: input.lora_name,
            cache_salt: input.cache_salt,
            ..Default::default()
        };
        // Mode and event use are fixed at start; the block size is set by the first worker.
        let needs_hashes = self.config.needs_hashes();
        let exact_index = self.config.uses_exact_index();
        let block_size = self.block_size.load(Ordering::Acquire);
        let hashes = if needs_hashes && block_size > 0 {
            RequestHashes::compute(input.tokens, block_size, &opts)
        } else {
            RequestHashes::default()
        };
        let t1 = Instant::now();
        let exact = if exact_index && !hashes.local.is_empty() {
            self.index.find_tier_matches(&hashes.local)
        } else {
            Vec::new()
        };
        let t2 = Instant::now();
        let req = RouteRequest {
            request_id: Some(&id),
            tokens: input.tokens,
            hash: opts,
            pinned_worker: input.pinned_worker,
            dp_rank: input.dp_rank,
            overrides: input.overrides.clone(),
        };
        let now = self.now();
        let sel = {
            let mut s = self.sched();
            if s.block_size() != block_size {
                // The block size changed under us (first registration): nothing was cached.
                Err(RouteError::Select(SelectError::NoWorkers))
            } else {
                s.schedule(&req, &hashes, exact, now, &mut rand::rng())
            }
        }?;
        let t3 = Instant::now();
        let m = &self.metrics;
        for (stage, d) in [
            ("hashing", t1 - t0),
            ("find_matches", t2 - t1),
            ("selection", t3 - t2),
            ("total", t3 - t0),
        ] {
            m.overhead
                .get_or_create(&StageLabels { stage })
                .observe(d.as_secs_f64());
        }
        m.routed_input_tokens.inc_by(input.tokens.len() as u64);
        m.predicted_cached_tokens.inc_by(sel.cached_tokens as u64);
        m.decisions
            .get_or_create(&RankLabels {
                worker_id: sel.worker.worker_id.to_string(),
                dp_rank: sel.worker.dp_rank.to_string(),
            })
            .inc();
        Ok(Booking {
            state: self.clone(),
            id,
            selection: sel,
            prefill_done: false,
            freed: false,
        })
    }

    /// Drop bookings older than the expiry (lost frees); returns how many.
    pub fn expire(&self) -> usize {
        let now = self.now();
        self.sched().expire(now)
    }
}

/// A request's claim on a rank. Dropping it frees the load.
pub struct Booking {
    state: Arc<RouterState>,
    id: String,
    selection: Selection,
    prefill_done: bool,
    freed: bool,
}

impl Booking {
    /// The routing decision.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    pub fn worker(&self) -> WorkerWithDpRank {
        self.selection.worker
    }

    /// The first token arrived: the prompt's tokens leave the prefill load.
    pub fn first_token(&mut self) {
        if !std::mem::replace(&mut self.prefill_done, true) {
            let _ = self.state.sched().mark_prefill_complete(&self.id);
        }
    }

    /// Release the load now (also done on drop).
    pub fn free(&mut self) {
        if !std::mem::replace(&mut self.freed, true) {
            // Unknown when the worker was removed meanwhile: its load is already gone.
            let _ = self.state.sched().free(&self.id);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.free();
    }
}

fn index_loop(mut writer: SharedIndexWriter, rx: Receiver<RouterEvent>) {
    while let Ok(ev) = rx.recv() {
        // Whatever queued up meanwhile goes in as one batch: one publish, and the index
        // prefetches across the batch's events.
        let mut batch = vec![ev];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        writer.append(IndexOp::Events(batch));
        writer.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::RouterMode;

    fn state(flag: Option<usize>) -> Arc<RouterState> {
        let cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        RouterState::new(cfg, flag, Arc::new(Metrics::new()))
    }

    fn add(s: &RouterState, id: u64) {
        s.add_ranks([WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            ..Default::default()
        }]);
    }

    #[test]
    fn block_size_comes_from_the_worker_then_the_flag() {
        let s = state(Some(32));
        assert_eq!(
            s.admit_block_size(None).unwrap(),
            32,
            "flag for a worker without one"
        );
        assert_eq!(
            s.admit_block_size(Some(64)).unwrap(),
            64,
            "empty fleet adopts the worker's"
        );
        add(&s, 1);
        assert_eq!(s.admit_block_size(None).unwrap(), 64, "then the fleet's");
        assert!(matches!(
            s.admit_block_size(Some(16)),
            Err(RegisterError::BlockSizeMismatch {
                worker: 16,
                router: 64
            })
        ));
        let s = state(None);
        assert_eq!(s.admit_block_size(None).unwrap(), 16);
    }

    #[test]
    fn removing_a_worker_clears_every_tier() {
        let s = state(Some(4));
        add(&s, 1);
        let w = WorkerWithDpRank::new(1, 0);
        for (i, tier) in [
            StorageTier::Device,
            StorageTier::HostPinned,
            StorageTier::Disk,
        ]
        .into_iter()
        .enumerate()
        {
            let mut ev = kvrouter_core::index::stored_event(
                w,
                i as u64,
                None,
                [(
                    kvrouter_core::hash::ExternalHash(7),
                    kvrouter_core::hash::LocalBlockHash(1),
                )],
            );
            ev.storage_tier = tier;
            s.event_sink().send(ev).unwrap();
        }
        let sizes = |s: &RouterState| {
            s.index()
                .with(|ix| {
                    [
                        ix.device.current_size(),
                        ix.host.current_size(),
                        ix.disk.current_size(),
                    ]
                })
                .unwrap()
        };
        let wait_for = |want: [usize; 3]| {
            let t = Instant::now();
            while sizes(&s) != want {
                assert!(t.elapsed().as_secs() < 10, "index stuck at {:?}", sizes(&s));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        wait_for([1, 1, 1]);
        s.remove_worker(1, 1);
        wait_for([0, 0, 0]);
    }

    #[test]
    fn a_dropped_booking_frees_its_load() {
        let s = state(Some(4));
        add(&s, 1);
        let tokens: Vec<u32> = (0..40).collect();
        let b = s
            .route(&RouteInput {
                tokens: &tokens,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(s.ranks()[0].1.active_requests, 1);
        assert_eq!(s.ranks()[0].1.active_prefill_tokens, 40);
        drop(b);
        let l = s.ranks()[0].1;
        assert_eq!(
            (
                l.active_requests,
                l.active_prefill_tokens,
                l.active_decode_blocks
            ),
            (0, 0, 0)
        );
    }
}
