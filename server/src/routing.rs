//! The router inside the frontend: hashing and index lookup without locks, then one short
//! critical section on the [`Scheduler`] (load projection, selection, booking). A request's
//! booking is a [`Booking`] guard that frees the load when dropped, so a request that ends in
//! any way — completed, failed, client gone — releases what it booked.
//!
//! With `--router-queue-threshold`, a request arriving while every worker is past the threshold
//! (or behind others already waiting) waits in the router queue ([`kvrouter_core::queue`]); each
//! first token, end of request, new worker and a 20 ms tick dispatch waiting requests while a
//! worker has room. A waiting request whose client leaves is dropped unrouted.
//!
//! KV events from every worker's subscriber, and the clears of removed workers, arrive on one
//! bounded channel in order; a dedicated thread applies them to the shared index in batches
//! and publishes each batch to readers. A full channel makes senders wait (subscribers count
//! each wait as backpressure); nothing is reordered or spawned around it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use kvrouter_core::event::{
    KvCacheEventData, RouterEvent, StorageTier, WorkerId, WorkerWithDpRank,
};
use kvrouter_core::hash::HashOptions;
use kvrouter_core::index::{shared_index, IndexOp, IndexReader, SharedIndexWriter, TierOverlap};
use kvrouter_core::queue::{QueueMeta, RouterQueue};
use kvrouter_core::sequences::SequenceError;
use kvrouter_core::{
    BookingRecord, BookingTerms, RequestHashes, RolePool, RouteError, RouterConfig,
    RouterConfigOverride, ScheduleRequest, Scheduler, SelectError, Selection, WorkerInfo,
    WorkerRole,
};
use tokio::sync::oneshot;

use crate::metrics::{Metrics, RankLabels, StageLabels};

/// Events buffered between subscribers and the index thread.
const EVENT_QUEUE: usize = 65_536;
/// Events applied per publish at most, so readers see progress under a flood.
const MAX_BATCH: usize = 4096;
/// How often the router queue is looked at without a load change (prefill loads decay with
/// time under the `aic` model; workers come back from suspect).
const QUEUE_TICK: Duration = Duration::from_millis(20);

const PREFILL_BIT: u8 = 1;
const DECODE_BIT: u8 = 2;

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
    /// `nvext.agent_hints.priority`: a head start in the router queue (seconds under fcfs, a
    /// weight under wspt).
    pub priority: f64,
    /// `nvext.agent_hints.strict_priority`: a higher tier always leaves the queue first.
    pub strict_priority: i32,
    /// Which ranks may take it: every rank, or one pool of a disaggregated fleet.
    pub pool: RolePool,
    /// Only ranks of these workers may take it (those serving its LoRA adapter); `None`:
    /// any worker.
    pub workers: Option<Arc<[WorkerId]>>,
}

/// A request waiting in the router queue: what scheduling it needs, not its prompt.
struct Waiter {
    id: String,
    isl: usize,
    hashes: RequestHashes,
    exact: Vec<(WorkerWithDpRank, TierOverlap)>,
    dp_rank: Option<u32>,
    overrides: Option<RouterConfigOverride>,
    pool: RolePool,
    workers: Option<Arc<[WorkerId]>>,
    since: Instant,
    tx: oneshot::Sender<Result<Booking, RouteError>>,
}

/// Told of every booking this router makes, its first token and its end (replica sync,
/// [`crate::replicas`]). Called on the routing path, outside the scheduler's lock: an
/// implementation must return at once (no I/O, no waiting).
pub trait BookingSink: Send + Sync {
    /// Request `id` (a routed `r<n>` or an external `x:<caller id>`) was booked as
    /// `booking`, with hashes of `block_size`-token blocks.
    fn booked(&self, id: &str, block_size: usize, booking: BookingRecord);
    /// Request `id`, booked on `worker`, produced its first token.
    fn prefill_complete(&self, id: &str, worker: WorkerWithDpRank);
    /// Request `id`, booked on `worker`, ended and released its load.
    fn freed(&self, id: &str, worker: WorkerWithDpRank);
}

/// An operation of another router replica on one of its bookings, to mirror here under a
/// namespaced `id` that never collides with this router's own (`peer:…`).
#[derive(Clone, Copy, Debug)]
pub enum RemoteOp<'a> {
    /// Book what the peer booked; its hashes are of `block_size`-token blocks.
    Book {
        id: &'a str,
        block_size: usize,
        booking: &'a BookingRecord,
    },
    PrefillComplete {
        id: &'a str,
    },
    Free {
        id: &'a str,
    },
}

/// Why a peer's operation was not mirrored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("rank {0:?} is not in this router's routing set")]
    UnknownWorker(WorkerWithDpRank),
    #[error("peer hashed with {peer}-token blocks, this router with {ours}")]
    BlockSize { peer: usize, ours: usize },
    #[error(transparent)]
    Booking(#[from] SequenceError),
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
    /// Locked after `sched` when both are held.
    queue: Mutex<RouterQueue<Waiter>>,
    /// `PREFILL_BIT | DECODE_BIT` of the routing set ([`has_roles`](Self::has_roles)).
    roles: std::sync::atomic::AtomicU8,
    /// The block size is the router's own (`kvrouter router --router-block-size`): a worker
    /// registering another one is refused, whatever the fleet.
    fixed_block_size: bool,
    /// Expiries already counted in the metrics (the scheduler's running total).
    expired_counted: AtomicU64,
    /// The last flush marker sent ([`flush_events`](Self::flush_events)); held while sending
    /// so that markers enter the queue in ticket order.
    flush_ticket: Mutex<u64>,
    /// The last flush marker the index thread has passed.
    flushed: Arc<AtomicU64>,
    /// Where bookings are announced (replica sync), once set.
    sink: OnceLock<Arc<dyn BookingSink>>,
}

/// Bookings made under a caller's id (the standalone router's `best_worker_id` with a
/// `request_id`) live in the scheduler under this prefix, so that a caller's id never collides
/// with the ids generated for routed requests (`r1`, `r2`, …).
const EXTERNAL_PREFIX: &str = "x:";

/// A request's block hashes (empty outside KV mode or before a block size is known) and the
/// block size they were computed with.
struct Hashed {
    hashes: RequestHashes,
    block_size: usize,
}

/// Per rank, the device, host and disk blocks of a prompt's prefix the router believes cached
/// there (the standalone router's `get_overlap_scores`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OverlapReport {
    /// Tokens per block.
    pub block_size: usize,
    /// Full blocks of the prompt.
    pub num_blocks: usize,
    /// Every rank in the routing set, in registry order, with its overlap (zero when none).
    pub ranks: Vec<(WorkerWithDpRank, TierOverlap)>,
}

impl RouterState {
    /// A router with no workers, and its index thread. `block_size`: `--kv-cache-block-size`.
    pub fn new(
        config: RouterConfig,
        block_size: Option<usize>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_event_queue(config, block_size, metrics, EVENT_QUEUE)
    }

    /// A router whose block size is `block_size` whatever the workers say (the standalone
    /// router's `--router-block-size`): a worker registering another one is refused.
    pub fn with_fixed_block_size(
        config: RouterConfig,
        block_size: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::build(config, Some(block_size), true, metrics, EVENT_QUEUE)
    }

    /// [`new`](Self::new) with `capacity` events buffered for the index thread.
    pub fn with_event_queue(
        config: RouterConfig,
        block_size: Option<usize>,
        metrics: Arc<Metrics>,
        capacity: usize,
    ) -> Arc<Self> {
        Self::build(config, block_size, false, metrics, capacity)
    }

    fn build(
        config: RouterConfig,
        block_size: Option<usize>,
        fixed_block_size: bool,
        metrics: Arc<Metrics>,
        capacity: usize,
    ) -> Arc<Self> {
        let m = metrics.clone();
        let (writer, index) = shared_index(Some(Arc::new(move |w: WorkerWithDpRank, e: &_| {
            m.index_error(
                w.worker_id,
                w.dp_rank,
                kvrouter_core::index::IndexError::label(e),
            );
        })));
        let (tx, rx) = sync_channel(capacity.max(1));
        let flushed = Arc::new(AtomicU64::new(0));
        let f = flushed.clone();
        std::thread::Builder::new()
            .name("kv-index".into())
            .spawn(move || index_loop(writer, rx, f))
            .expect("spawning the index thread");
        let queue = RouterQueue::new(config.kv.router_queue_policy, config.kv.router_queue_limit);
        let state = Arc::new(Self {
            sched: Mutex::new(Scheduler::new(config.clone(), block_size.unwrap_or(0))),
            config,
            default_block_size: block_size,
            block_size: AtomicUsize::new(block_size.unwrap_or(0)),
            index,
            events: tx,
            metrics,
            epoch: Instant::now(),
            next_request: AtomicU64::new(1),
            queue: Mutex::new(queue),
            roles: std::sync::atomic::AtomicU8::new(0),
            fixed_block_size,
            expired_counted: AtomicU64::new(0),
            flush_ticket: Mutex::new(0),
            flushed,
            sink: OnceLock::new(),
        });
        if state.queue_enabled() {
            let weak = Arc::downgrade(&state);
            std::thread::Builder::new()
                .name("router-queue".into())
                .spawn(move || queue_tick(weak))
                .expect("spawning the router queue thread");
        }
        state
    }

    fn queue_enabled(&self) -> bool {
        self.config.kv.router_queue_threshold.is_some()
    }

    fn queue(&self) -> MutexGuard<'_, RouterQueue<Waiter>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `aic` prefill load model's coefficients in use (None: model off or still fitting).
    pub fn prefill_coefficients(&self) -> Option<kvrouter_core::prefill_time::PrefillCoefficients> {
        self.sched().prefill_coefficients()
    }

    /// Requests waiting in the router queue.
    pub fn queued(&self) -> usize {
        self.queue().len()
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
    /// else the fleet's, else `--kv-cache-block-size`, else 16 (vLLM's default). The fleet's
    /// block size is set by the first worker and stays while any worker is registered
    /// (`fleet_empty` false), healthy or not. Errors: it differs from the fleet's.
    pub fn admit_block_size(
        &self,
        worker: Option<usize>,
        fleet_empty: bool,
    ) -> Result<usize, RegisterError> {
        let mut s = self.sched();
        let current = s.block_size();
        if self.fixed_block_size {
            return match worker {
                Some(w) if w != current => Err(RegisterError::BlockSizeMismatch {
                    worker: w,
                    router: current,
                }),
                _ => Ok(current),
            };
        }
        let want = match worker {
            Some(w) => w,
            None if current > 0 => current,
            None => self.default_block_size.unwrap_or(16),
        };
        if current == 0 || (want != current && fleet_empty) {
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

    /// Put a worker's ranks into the routing set (and dispatch waiting requests to them).
    pub fn add_ranks(self: &Arc<Self>, ranks: impl IntoIterator<Item = WorkerInfo>) {
        {
            let mut s = self.sched();
            for r in ranks {
                s.add_worker(r);
            }
            self.note_roles(&s);
        }
        self.dispatch_queued();
    }

    /// Take a worker out of the routing set, keeping its index entries and bookings (it is
    /// suspect, not gone).
    pub fn withdraw(&self, worker: WorkerId) {
        let mut s = self.sched();
        s.withdraw_worker(worker);
        self.note_roles(&s);
    }

    /// Take a worker out of the routing set for good: its booked load is dropped and its index
    /// entries cleared on every storage tier. The clears are queued behind the events already
    /// received, on the one ordered path to the index; this waits while that queue is full, so
    /// call it off the async threads.
    pub fn remove_worker(&self, worker: WorkerId, dp_size: u32) {
        {
            let mut s = self.sched();
            s.remove_worker(worker);
            self.note_roles(&s);
        }
        for rank in 0..dp_size {
            for ev in clear_events(WorkerWithDpRank::new(worker, rank)) {
                // Only fails when the index thread is gone (shutdown): nothing to clear then.
                let _ = self.events.send(ev);
            }
        }
    }

    /// Waits until every event sent to [`event_sink`](Self::event_sink) before this call is
    /// in the index (a marker goes down the same queue). Blocking: call off the async
    /// threads. Returns false if that took longer than `timeout` or the index thread is gone.
    pub fn flush_events(&self, timeout: Duration) -> bool {
        let ticket = {
            let mut next = self.flush_ticket.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            let marker = RouterEvent::new(FLUSH_MARKER, *next, KvCacheEventData::Cleared);
            if self.events.send(marker).is_err() {
                return false;
            }
            *next
        };
        let end = Instant::now() + timeout;
        while self.flushed.load(Ordering::Acquire) < ticket {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Ranks in the routing set, with their current load.
    pub fn ranks(&self) -> Vec<(WorkerInfo, kvrouter_core::sequences::WorkerLoad)> {
        let now = self.now();
        let s = self.sched();
        s.workers()
            .iter()
            .map(|w| (*w, s.active().load(w.worker, now)))
            .collect()
    }

    /// Whether the routing set has prefill ranks and decode ranks: `(prefill, decode)`.
    /// Read on every request without the scheduler's lock: kept by `note_roles` whenever the
    /// routing set changes.
    pub fn has_roles(&self) -> (bool, bool) {
        let bits = self.roles.load(Ordering::Acquire);
        (bits & PREFILL_BIT != 0, bits & DECODE_BIT != 0)
    }

    /// Record which roles the routing set holds (call with the scheduler locked, after a
    /// change).
    fn note_roles(&self, s: &Scheduler) {
        let has = |r| s.workers().iter().any(|w| w.role == r);
        let bits = if has(WorkerRole::Prefill) {
            PREFILL_BIT
        } else {
            0
        } | if has(WorkerRole::Decode) {
            DECODE_BIT
        } else {
            0
        };
        self.roles.store(bits, Ordering::Release);
    }

    /// Prompt tokens of `tokens`, hashed with `opts` (LoRA adapter, cache salt), the best rank
    /// of `pool` holds (0 outside KV mode with events).
    pub fn best_cached_tokens(
        &self,
        tokens: &[u32],
        pool: RolePool,
        opts: &HashOptions<'_>,
    ) -> usize {
        let block_size = self.block_size();
        if !self.config.uses_exact_index() || block_size == 0 {
            return 0;
        }
        let hashes = RequestHashes::compute(tokens, block_size, opts);
        let overlaps = self.index.find_tier_matches(&hashes.local);
        let s = self.sched();
        let best = overlaps
            .iter()
            .filter(|(w, _)| {
                s.workers()
                    .iter()
                    .any(|i| i.worker == *w && pool.admits(i.role))
            })
            .map(|(_, o)| o.device as usize)
            .max()
            .unwrap_or(0);
        (best * block_size).min(tokens.len())
    }

    /// The booked load of each of `ranks` (zero for a rank with nothing booked), under one
    /// short lock.
    pub fn loads(
        &self,
        ranks: impl IntoIterator<Item = WorkerWithDpRank>,
    ) -> Vec<kvrouter_core::sequences::WorkerLoad> {
        let now = self.now();
        let s = self.sched();
        ranks.into_iter().map(|r| s.active().load(r, now)).collect()
    }

    /// Choose a rank and book the request on it, waiting in the router queue first when every
    /// worker is past `--router-queue-threshold` (a request naming its worker never waits).
    ///
    /// Errors: [`SelectError`] (no workers, all busy, unknown pinned worker, …), a full queue
    /// and booking errors, as [`RouteError`].
    pub async fn route(self: &Arc<Self>, input: &RouteInput<'_>) -> Result<Booking, RouteError> {
        match self.route_or_wait(input, true)? {
            Routed::Booked(b) => Ok(b),
            // Dropped unanswered only when the router itself is going away.
            Routed::Waiting(rx) => rx.await.unwrap_or(Err(SelectError::NoWorkers.into())),
        }
    }

    /// [`route`](Self::route) without the queue: route now or fail.
    pub fn try_route(self: &Arc<Self>, input: &RouteInput<'_>) -> Result<Booking, RouteError> {
        match self.route_or_wait(input, false)? {
            Routed::Booked(b) => Ok(b),
            Routed::Waiting(_) => unreachable!("queueing was not allowed"),
        }
    }

    fn route_or_wait(
        self: &Arc<Self>,
        input: &RouteInput<'_>,
        may_wait: bool,
    ) -> Result<Routed, RouteError> {
        let t0 = Instant::now();
        let id = format!("r{}", self.next_request.fetch_add(1, Ordering::Relaxed));
        let Hashed { hashes, block_size } = self.hash(input);
        let t1 = Instant::now();
        let exact = self.exact_overlaps(&hashes);
        let t2 = Instant::now();
        let req = schedule_request(input, Some(&id));
        let now = self.now();
        let sel = {
            let mut s = self.sched();
            if s.block_size() != block_size {
                // The block size changed under us (first registration): nothing was cached.
                Err(RouteError::Select(SelectError::NoWorkers))
            } else if may_wait && self.queue_enabled() && input.pinned_worker.is_none() {
                let mut q = self.queue();
                // Behind a backlog even when a worker has room: no overtaking.
                if !q.is_empty() || !s.admits(input.pool, input.workers.as_deref(), now) {
                    let meta = QueueMeta {
                        tier: input.strict_priority,
                        priority: input.priority,
                        arrival: now,
                        uncached_tokens: s.uncached_tokens(req.isl, &exact),
                    };
                    let (tx, rx) = oneshot::channel();
                    let waiter = Waiter {
                        id: id.clone(),
                        isl: req.isl,
                        hashes,
                        exact,
                        dp_rank: input.dp_rank,
                        overrides: input.overrides.clone(),
                        pool: input.pool,
                        workers: input.workers.clone(),
                        since: Instant::now(),
                        tx,
                    };
                    if q.len() >= self.config.kv.router_queue_limit {
                        q.retain(|w| !w.tx.is_closed()); // make room of the abandoned first
                    }
                    if let Err(e) = q.push(meta, waiter) {
                        self.metrics.queue_rejected.inc();
                        return Err(e.into());
                    }
                    self.metrics.queue_pending.set(q.len() as i64);
                    return Ok(Routed::Waiting(rx));
                }
                s.schedule_booking(&req, &hashes, exact, now, &mut rand::rng())
            } else {
                s.schedule_booking(&req, &hashes, exact, now, &mut rand::rng())
            }
        };
        let (sel, terms) = sel?;
        self.announce(&id, &sel, terms, hashes, block_size, input.tokens.len());
        self.observe_overhead([t0, t1, t2, Instant::now()]);
        Ok(Routed::Booked(self.booked(id, sel, input.tokens.len())))
    }

    /// The routing cost of one request from the instants it started, had hashed, had looked
    /// up the exact index and had selected (`kvrouter_router_overhead_seconds`).
    fn observe_overhead(&self, [t0, t1, t2, t3]: [Instant; 4]) {
        for (stage, d) in [
            ("hashing", t1 - t0),
            ("find_matches", t2 - t1),
            ("selection", t3 - t2),
            ("total", t3 - t0),
        ] {
            self.metrics
                .overhead
                .get_or_create(&StageLabels { stage })
                .observe(d.as_secs_f64());
        }
    }

    /// A request's block hashes. Mode and event use are fixed at start; the block size is set
    /// by the first worker (or fixed).
    fn hash(&self, input: &RouteInput<'_>) -> Hashed {
        let block_size = self.block_size.load(Ordering::Acquire);
        let hashes = if self.config.needs_hashes() && block_size > 0 {
            let opts = HashOptions {
                lora_name: input.lora_name,
                cache_salt: input.cache_salt,
                ..Default::default()
            };
            RequestHashes::compute(input.tokens, block_size, &opts)
        } else {
            RequestHashes::default()
        };
        Hashed { hashes, block_size }
    }

    /// The exact index's overlaps of these hashes, when routing uses it.
    fn exact_overlaps(&self, hashes: &RequestHashes) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        if self.config.uses_exact_index() && !hashes.local.is_empty() {
            self.index.find_tier_matches(&hashes.local)
        } else {
            Vec::new()
        }
    }

    /// What routing `input` would choose now, changing nothing: no booking, nothing recorded
    /// in the approximate or predicted index, no cursor moved (the standalone router's
    /// query-only `best_worker_id`). Costs what routing a request costs, and is counted in
    /// the same overhead metric. Errors: as [`route`](Self::route) (no workers, all busy, …).
    pub fn query(&self, input: &RouteInput<'_>) -> Result<Selection, RouteError> {
        let t0 = Instant::now();
        let Hashed { hashes, block_size } = self.hash(input);
        let t1 = Instant::now();
        let exact = self.exact_overlaps(&hashes);
        let t2 = Instant::now();
        let now = self.now();
        let sel = {
            let s = self.sched();
            if s.block_size() != block_size {
                Err(SelectError::NoWorkers)
            } else {
                let req = schedule_request(input, None);
                s.peek(&req, &hashes, exact, now, &mut rand::rng())
            }
        };
        self.observe_overhead([t0, t1, t2, Instant::now()]);
        Ok(sel?)
    }

    /// Route `input` now and book it under the caller's `request_id` until
    /// [`free_external`](Self::free_external) or the booking expiry
    /// (`--router-active-request-expiry-secs`). It never waits in the router queue.
    /// Errors: as [`try_route`](Self::try_route); an id already booked is
    /// [`SequenceError::DuplicateRequest`].
    pub fn book_external(
        &self,
        input: &RouteInput<'_>,
        request_id: &str,
    ) -> Result<Selection, RouteError> {
        let t0 = Instant::now();
        let id = format!("{EXTERNAL_PREFIX}{request_id}");
        let Hashed { hashes, block_size } = self.hash(input);
        let t1 = Instant::now();
        let exact = self.exact_overlaps(&hashes);
        let t2 = Instant::now();
        let now = self.now();
        let sel = {
            let mut s = self.sched();
            if s.block_size() != block_size {
                Err(RouteError::Select(SelectError::NoWorkers))
            } else {
                let req = schedule_request(input, Some(&id));
                s.schedule_booking(&req, &hashes, exact, now, &mut rand::rng())
            }
        };
        let (sel, terms) = sel.map_err(|e| match e {
            RouteError::Booking(e) => RouteError::Booking(external(e, request_id)),
            e => e,
        })?;
        self.announce(&id, &sel, terms, hashes, block_size, input.tokens.len());
        self.observe_overhead([t0, t1, t2, Instant::now()]);
        self.count_decision(&sel, input.tokens.len());
        Ok(sel)
    }

    /// A request booked by [`book_external`](Self::book_external) produced its first token:
    /// its prompt leaves the prefill load. Errors: the id is not booked (never, freed, or
    /// expired).
    pub fn external_prefill_complete(
        self: &Arc<Self>,
        request_id: &str,
    ) -> Result<(), SequenceError> {
        let id = format!("{EXTERNAL_PREFIX}{request_id}");
        self.complete_prefill(&id)
            .map_err(|e| external(e, request_id))
    }

    /// Booking `id` produced its first token: out of the prefill load, announced to the sink,
    /// waiting requests dispatched.
    fn complete_prefill(self: &Arc<Self>, id: &str) -> Result<(), SequenceError> {
        let now = self.now();
        let r = {
            let mut s = self.sched();
            let worker = s.active().worker_of(id);
            s.mark_prefill_complete(id, now).map(|()| worker)
        };
        if let (Ok(Some(w)), Some(sink)) = (&r, self.sink.get()) {
            sink.prefill_complete(id, *w);
        }
        self.dispatch_queued();
        r.map(|_| ())
    }

    /// Booking `id` ended: its load released, announced to the sink, waiting requests
    /// dispatched. Returns the rank it was booked on.
    fn release(self: &Arc<Self>, id: &str) -> Result<WorkerWithDpRank, SequenceError> {
        let now = self.now();
        let r = self.sched().free(id, now);
        if let (Ok(w), Some(sink)) = (&r, self.sink.get()) {
            sink.freed(id, *w);
        }
        self.dispatch_queued();
        r
    }

    /// A request booked by [`book_external`](Self::book_external) ended: release its load.
    /// Returns the rank it was booked on. Errors: the id is not booked (never, already
    /// freed, expired, or its worker was removed).
    pub fn free_external(
        self: &Arc<Self>,
        request_id: &str,
    ) -> Result<WorkerWithDpRank, SequenceError> {
        let id = format!("{EXTERNAL_PREFIX}{request_id}");
        self.release(&id).map_err(|e| external(e, request_id))
    }

    /// Per rank in the routing set: its load now if `input` were added (Dynamo
    /// `get_potential_loads`). Changes nothing.
    pub fn potential_loads(
        &self,
        input: &RouteInput<'_>,
    ) -> Vec<kvrouter_core::sequences::PotentialLoad> {
        let Hashed { hashes, .. } = self.hash(input);
        let now = self.now();
        self.sched()
            .potential_loads(&hashes.sequence, input.tokens.len(), now)
    }

    /// Per rank in the routing set: the blocks of `input`'s prefix cached there, by tier, as
    /// routing sees them (exact index merged with the predicted one, or the approximate
    /// index). Changes nothing.
    pub fn overlap_scores(&self, input: &RouteInput<'_>) -> OverlapReport {
        let Hashed { hashes, block_size } = self.hash(input);
        let exact = self.exact_overlaps(&hashes);
        let now = self.now();
        let s = self.sched();
        let found = if hashes.local.is_empty() {
            Vec::new()
        } else {
            s.overlaps_at(&hashes, exact, now)
        };
        let ranks = s
            .workers()
            .iter()
            .map(|w| {
                let o = found
                    .iter()
                    .find(|(r, _)| *r == w.worker)
                    .map_or_else(TierOverlap::default, |(_, o)| *o);
                (w.worker, o)
            })
            .collect();
        OverlapReport {
            block_size,
            num_blocks: hashes.local.len(),
            ranks,
        }
    }

    /// The exact index as router events (every tier), e.g. to rebuild it elsewhere.
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        self.index.dump_events()
    }

    /// Announce bookings to `sink` from now on (replica sync). Errors: one is set already.
    pub fn set_booking_sink(&self, sink: Arc<dyn BookingSink>) -> anyhow::Result<()> {
        self.sink
            .set(sink)
            .map_err(|_| anyhow::anyhow!("a booking sink is already set"))
    }

    /// Tell the sink, if any, of a booking just made (`terms` is `None` when nothing was
    /// booked).
    fn announce(
        &self,
        id: &str,
        sel: &Selection,
        terms: Option<BookingTerms>,
        hashes: RequestHashes,
        block_size: usize,
        isl: usize,
    ) {
        let (Some(sink), Some(terms)) = (self.sink.get(), terms) else {
            return;
        };
        let booking = BookingRecord {
            worker: sel.worker,
            hashes,
            isl,
            cached_tokens: sel.cached_tokens,
            terms,
        };
        sink.booked(id, block_size, booking);
    }

    /// Mirror other replicas' operations on their bookings, in order, under one lock: a
    /// booking only on a rank of this router's routing set and with its block size. Returns
    /// each operation's outcome, in order. Nothing is announced to the sink.
    pub fn apply_remote<'a>(
        self: &Arc<Self>,
        ops: impl IntoIterator<Item = RemoteOp<'a>>,
    ) -> Vec<Result<(), RemoteError>> {
        let now = self.now();
        let out = {
            let mut s = self.sched();
            ops.into_iter()
                .map(|op| match op {
                    RemoteOp::Book {
                        id,
                        block_size,
                        booking,
                    } => {
                        if block_size != s.block_size() {
                            return Err(RemoteError::BlockSize {
                                peer: block_size,
                                ours: s.block_size(),
                            });
                        }
                        if !s.workers().iter().any(|w| w.worker == booking.worker) {
                            return Err(RemoteError::UnknownWorker(booking.worker));
                        }
                        Ok(s.book_remote(id, booking, now)?)
                    }
                    RemoteOp::PrefillComplete { id } => Ok(s.mark_prefill_complete(id, now)?),
                    RemoteOp::Free { id } => Ok(s.free(id, now).map(|_| ())?),
                })
                .collect()
        };
        self.dispatch_queued();
        out
    }

    /// Count a routing decision in the metrics.
    fn count_decision(&self, sel: &Selection, isl: usize) {
        let m = &self.metrics;
        m.routed_input_tokens.inc_by(isl as u64);
        m.predicted_cached_tokens.inc_by(sel.cached_tokens as u64);
        m.decisions
            .get_or_create(&RankLabels {
                worker_id: sel.worker.worker_id.to_string(),
                dp_rank: sel.worker.dp_rank.to_string(),
            })
            .inc();
    }

    /// Count a decision and make its booking.
    fn booked(self: &Arc<Self>, id: String, sel: Selection, isl: usize) -> Booking {
        self.count_decision(&sel, isl);
        Booking {
            state: self.clone(),
            id,
            selection: sel,
            prefill_done: false,
            freed: false,
        }
    }

    /// Route waiting requests, in queue order, while a worker has room. Called on every load
    /// change and on a tick; takes the locks itself, so call it holding neither.
    pub fn dispatch_queued(self: &Arc<Self>) {
        if !self.queue_enabled() {
            return;
        }
        let refresh = Duration::from_secs_f64(self.config.kv.router_overlap_refresh_after_secs);
        loop {
            let (waiter, result, block_size) = {
                let mut s = self.sched();
                let mut q = self.queue();
                let now = self.now();
                // The head waits for room in its own pool; nothing overtakes it.
                if !q
                    .peek()
                    .is_some_and(|(_, w)| s.admits(w.pool, w.workers.as_deref(), now))
                {
                    self.metrics.queue_pending.set(q.len() as i64);
                    return;
                }
                let Some((_, mut w)) = q.pop() else { return };
                self.metrics.queue_pending.set(q.len() as i64);
                if w.tx.is_closed() {
                    continue; // the client left while waiting
                }
                // Waited long: the caches moved meanwhile (DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS).
                if !refresh.is_zero()
                    && w.since.elapsed() > refresh
                    && !w.hashes.local.is_empty()
                    && self.config.uses_exact_index()
                {
                    w.exact = self.index.find_tier_matches(&w.hashes.local);
                }
                let req = ScheduleRequest {
                    request_id: Some(&w.id),
                    isl: w.isl,
                    pinned_worker: None,
                    dp_rank: w.dp_rank,
                    overrides: w.overrides.as_ref(),
                    pool: w.pool,
                    workers: w.workers.as_deref(),
                };
                let exact = std::mem::take(&mut w.exact);
                let result = s.schedule_booking(&req, &w.hashes, exact, now, &mut rand::rng());
                (w, result, s.block_size())
            };
            // Locks released: a booking dropped below (client gone) frees itself.
            self.metrics
                .queue_wait
                .observe(waiter.since.elapsed().as_secs_f64());
            let Waiter {
                id,
                isl,
                tx,
                hashes,
                ..
            } = waiter;
            let result = result.map(|(sel, terms)| {
                self.announce(&id, &sel, terms, hashes, block_size, isl);
                self.booked(id, sel, isl)
            });
            let _ = tx.send(result);
        }
    }

    /// Drop bookings older than the expiry (lost frees); returns how many. Every expiry,
    /// also those a new booking made on the way, is counted in
    /// `kvrouter_router_expired_requests_total`.
    pub fn expire(&self) -> usize {
        let now = self.now();
        let (n, total) = {
            let mut s = self.sched();
            let n = s.expire(now);
            (n, s.active().expired_total())
        };
        // Totals only grow: whoever saw the larger one counts the difference.
        let counted = self.expired_counted.fetch_max(total, Ordering::AcqRel);
        if total > counted {
            self.metrics.expired_requests.inc_by(total - counted);
        }
        n
    }
}

/// The scheduler's view of `input`, booked under `id` when given.
fn schedule_request<'a>(input: &'a RouteInput<'_>, id: Option<&'a str>) -> ScheduleRequest<'a> {
    ScheduleRequest {
        request_id: id,
        isl: input.tokens.len(),
        pinned_worker: input.pinned_worker,
        dp_rank: input.dp_rank,
        overrides: input.overrides.as_ref(),
        pool: input.pool,
        workers: input.workers.as_deref(),
    }
}

/// A booking error about a caller's id, naming the id as the caller gave it.
fn external(e: SequenceError, request_id: &str) -> SequenceError {
    match e {
        SequenceError::DuplicateRequest(_) => SequenceError::DuplicateRequest(request_id.into()),
        SequenceError::UnknownRequest(_) => SequenceError::UnknownRequest(request_id.into()),
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
            let _ = self.state.complete_prefill(&self.id);
        }
    }

    /// Release the load now (also done on drop).
    pub fn free(&mut self) {
        if !std::mem::replace(&mut self.freed, true) {
            // Unknown when the worker was removed meanwhile: its load is already gone.
            let _ = self.state.release(&self.id);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.free();
    }
}

/// What routing did with a request.
enum Routed {
    Booked(Booking),
    /// In the router queue; the booking comes when a worker has room.
    Waiting(oneshot::Receiver<Result<Booking, RouteError>>),
}

/// Dispatch the router queue every [`QUEUE_TICK`] until the router is dropped.
fn queue_tick(state: Weak<RouterState>) {
    loop {
        std::thread::sleep(QUEUE_TICK);
        let Some(s) = state.upgrade() else { return };
        if s.queued() > 0 {
            s.queue().retain(|w| !w.tx.is_closed());
            s.dispatch_queued();
        }
    }
}

/// The rank of [`RouterState::flush_events`]'s markers (its event id is the ticket); never
/// applied.
const FLUSH_MARKER: WorkerWithDpRank = WorkerWithDpRank::new(u64::MAX, u32::MAX);

/// `Cleared` for one rank on every storage tier: what forgets everything the rank held.
pub fn clear_events(rank: WorkerWithDpRank) -> impl Iterator<Item = RouterEvent> {
    [
        StorageTier::Device,
        StorageTier::HostPinned,
        StorageTier::Disk,
    ]
    .into_iter()
    .map(move |tier| {
        let mut ev = RouterEvent::new(rank, 0, KvCacheEventData::Cleared);
        ev.storage_tier = tier;
        ev
    })
}

fn index_loop(mut writer: SharedIndexWriter, rx: Receiver<RouterEvent>, flushed: Arc<AtomicU64>) {
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
        let mut ticket = None;
        batch.retain(|ev| {
            let marker = ev.worker() == FLUSH_MARKER;
            if marker {
                ticket = Some(ev.event.event_id);
            }
            !marker
        });
        if !batch.is_empty() {
            writer.append(IndexOp::Events(batch));
            writer.publish();
        }
        if let Some(t) = ticket {
            flushed.fetch_max(t, Ordering::AcqRel);
        }
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

    fn add(s: &Arc<RouterState>, id: u64) {
        s.add_ranks([WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            ..Default::default()
        }]);
    }

    #[test]
    fn block_size_comes_from_the_worker_then_the_flag() {
        let s = state(Some(32));
        assert_eq!(
            s.admit_block_size(None, true).unwrap(),
            32,
            "flag for a worker without one"
        );
        assert_eq!(
            s.admit_block_size(Some(64), true).unwrap(),
            64,
            "empty fleet adopts the worker's"
        );
        add(&s, 1);
        assert_eq!(
            s.admit_block_size(None, false).unwrap(),
            64,
            "then the fleet's"
        );
        assert!(matches!(
            s.admit_block_size(Some(16), false),
            Err(RegisterError::BlockSizeMismatch {
                worker: 16,
                router: 64
            })
        ));
        let s = state(None);
        assert_eq!(s.admit_block_size(None, true).unwrap(), 16);
    }

    #[test]
    fn a_registered_fleet_keeps_its_block_size_while_no_rank_is_routable() {
        // Every worker suspect or removed (none in the routing set) but still registered:
        // another block size must be refused, not adopted (it reset the fleet before).
        let s = state(None);
        assert_eq!(s.admit_block_size(Some(64), true).unwrap(), 64);
        add(&s, 1);
        s.withdraw(1);
        assert!(s.ranks().is_empty(), "no rank routable");
        assert!(matches!(
            s.admit_block_size(Some(16), false),
            Err(RegisterError::BlockSizeMismatch { .. })
        ));
        s.remove_worker(1, 1);
        assert!(s.admit_block_size(Some(16), false).is_err());
        assert_eq!(s.block_size(), 64);
    }

    #[test]
    fn a_withdrawn_worker_keeps_its_bookings() {
        let s = state(Some(4));
        add(&s, 1);
        let tokens: Vec<u32> = (0..40).collect();
        let b = s
            .try_route(&RouteInput {
                tokens: &tokens,
                ..Default::default()
            })
            .unwrap();
        s.withdraw(1);
        let w = WorkerWithDpRank::new(1, 0);
        assert_eq!(s.loads([w])[0].active_requests, 1, "suspect: still booked");
        assert!(s
            .try_route(&RouteInput {
                tokens: &tokens,
                ..Default::default()
            })
            .is_err());
        add(&s, 1);
        assert_eq!(s.loads([w])[0].active_requests, 1, "back: booking intact");
        drop(b);
        assert_eq!(s.loads([w])[0].active_requests, 0);
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
    fn a_removal_waits_its_turn_on_a_full_event_queue() {
        // The index thread is stalled (a reader parked inside the index holds off its write
        // lock) and the queue is full. Removing the worker must queue its clears
        // behind the events already sent, and a store sent after the removal must survive it.
        // (A clear handed to a spawned thread raced the later store and could wipe it.)
        let cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        let s = RouterState::with_event_queue(cfg, Some(4), Arc::new(Metrics::new()), 2);
        add(&s, 1);
        let w = WorkerWithDpRank::new(1, 0);
        let store = |id: u64, hash: u64| {
            kvrouter_core::index::stored_event(
                w,
                id,
                None,
                [(
                    kvrouter_core::hash::ExternalHash(hash),
                    kvrouter_core::hash::LocalBlockHash(hash),
                )],
            )
        };
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let reader = s.index().clone();
        let parked = std::thread::spawn(move || {
            reader.with(|_| {
                entered_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        });
        entered_rx.recv().unwrap();
        let sink = s.event_sink();
        let visible = |h: u64| {
            s.index()
                .find_matches(&[kvrouter_core::hash::LocalBlockHash(h)], false)
                .max()
                == 1
        };
        // The index thread takes an event and waits for the write lock; the queue fills.
        let mut i = 0;
        loop {
            match sink.try_send(store(i, 100 + i)) {
                Ok(()) => i += 1,
                Err(std::sync::mpsc::TrySendError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(i < 1000, "the index thread is not stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let s2 = s.clone();
        let remover = std::thread::spawn(move || s2.remove_worker(1, 1));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !remover.is_finished(),
            "the removal must wait for room, in order"
        );
        release_tx.send(()).unwrap();
        parked.join().unwrap();
        remover.join().unwrap();
        sink.send(store(i, 999)).unwrap();
        let has_999 = || visible(999);
        let t = Instant::now();
        while !has_999() {
            assert!(t.elapsed().as_secs() < 10, "the last store never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Anything still in flight (a late clear) has had time to land.
        std::thread::sleep(Duration::from_millis(200));
        assert!(has_999(), "a clear sent before this store wiped it");
        assert_eq!(
            s.index().current_size(),
            1,
            "only the store after the removal"
        );
    }

    #[test]
    fn caller_ids_live_beside_generated_ones_and_a_fixed_block_size_holds() {
        let cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        let s = RouterState::with_fixed_block_size(cfg, 4, Arc::new(Metrics::new()));
        assert!(matches!(
            s.admit_block_size(Some(16), true),
            Err(RegisterError::BlockSizeMismatch {
                worker: 16,
                router: 4
            })
        ));
        assert_eq!(s.admit_block_size(None, true).unwrap(), 4);
        add(&s, 1);
        let tokens: Vec<u32> = (0..40).collect();
        let input = RouteInput {
            tokens: &tokens,
            ..Default::default()
        };
        // The first routed request is booked as `r1`: a caller's `r1` is another request.
        let routed = s.try_route(&input).unwrap();
        s.book_external(&input, "r1").unwrap();
        assert_eq!(s.ranks()[0].1.active_requests, 2);
        assert!(matches!(
            s.book_external(&input, "r1"),
            Err(RouteError::Booking(SequenceError::DuplicateRequest(id))) if id == "r1"
        ));
        let q = s.query(&input).unwrap();
        assert_eq!(q.worker, WorkerWithDpRank::new(1, 0));
        assert_eq!(s.ranks()[0].1.active_requests, 2, "a query books nothing");
        s.external_prefill_complete("r1").unwrap();
        assert_eq!(s.free_external("r1").unwrap(), WorkerWithDpRank::new(1, 0));
        assert!(matches!(
            s.free_external("r1"),
            Err(SequenceError::UnknownRequest(id)) if id == "r1"
        ));
        drop(routed);
        assert_eq!(s.ranks()[0].1, Default::default());
    }

    #[test]
    fn a_dropped_booking_frees_its_load() {
        let s = state(Some(4));
        add(&s, 1);
        let tokens: Vec<u32> = (0..40).collect();
        let b = s
            .try_route(&RouteInput {
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

    /// Route `tokens` on a task (as a handler would) with a queue tier; the handle yields the
    /// booked rank, holding the booking until `release` fires.
    fn spawn_route(
        s: &Arc<RouterState>,
        tokens: Vec<u32>,
        strict_priority: i32,
    ) -> tokio::task::JoinHandle<Result<Booking, RouteError>> {
        let s = s.clone();
        tokio::spawn(async move {
            s.route(&RouteInput {
                tokens: &tokens,
                strict_priority,
                ..Default::default()
            })
            .await
        })
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..2000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached in 2 s");
    }

    #[tokio::test]
    async fn the_router_queue_holds_requests_until_a_worker_has_room() {
        let mut cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        // T = 0: queue as soon as every worker has any prefill in flight.
        cfg.kv.router_queue_threshold = Some(0.0);
        let s = RouterState::new(cfg, Some(4), Arc::new(Metrics::new()));
        add(&s, 1);
        let prompt = |b: u32| (b..b + 40).collect::<Vec<u32>>();
        let mut a = spawn_route(&s, prompt(0), 0).await.unwrap().unwrap();
        let b = spawn_route(&s, prompt(100), 0);
        until(|| s.queued() == 1).await;
        let gone = spawn_route(&s, prompt(200), 0);
        until(|| s.queued() == 2).await;
        gone.abort(); // its client leaves while waiting
        let vip = spawn_route(&s, prompt(300), 1);
        until(|| s.queued() == 3).await;
        // A request naming its worker never waits.
        let pinned = s
            .route(&RouteInput {
                tokens: &prompt(400),
                pinned_worker: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
        drop(pinned);
        let w = WorkerWithDpRank::new(1, 0);
        assert_eq!(s.loads([w])[0].active_requests, 1, "only a is booked");
        // a's first token: room for one; the higher tier goes first.
        a.first_token();
        let mut vip = vip.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!b.is_finished(), "b still waits behind vip's prefill");
        assert_eq!(s.loads([w])[0].active_prefill_tokens, 40);
        vip.first_token();
        let b = b.await.unwrap().unwrap();
        assert_eq!(
            s.queued(),
            0,
            "the abandoned request was dropped, not routed"
        );
        assert_eq!(s.loads([w])[0].active_requests, 3);
        drop((a, b, vip));
        assert_eq!(s.loads([w])[0], Default::default(), "nothing left booked");
    }

    #[tokio::test]
    async fn a_full_router_queue_refuses() {
        let mut cfg = RouterConfig::default();
        cfg.kv.router_queue_threshold = Some(0.0);
        cfg.kv.router_queue_limit = 1;
        let s = RouterState::new(cfg, Some(4), Arc::new(Metrics::new()));
        add(&s, 1);
        let _a = spawn_route(&s, vec![1; 40], 0).await.unwrap().unwrap();
        let _b = spawn_route(&s, vec![2; 40], 0);
        until(|| s.queued() == 1).await;
        let c = spawn_route(&s, vec![3; 40], 0).await.unwrap();
        assert!(matches!(c, Err(RouteError::QueueFull(_))));
    }
}
