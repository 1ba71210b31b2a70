//! [`Router`]: the core's parts composed for one request, in data-flow order — hash, find
//! overlaps, project loads, select, book. Single-threaded; servers that need concurrent readers
//! compose [`Scheduler`] with the shared index themselves.

use std::time::Duration;

use rand::Rng;

use crate::config::DEFAULT_MAX_NUM_BATCHED_TOKENS;
use crate::config::{RouterConfig, RouterConfigOverride};
use crate::event::{DpRank, RouterEvent, WorkerId, WorkerWithDpRank};
use crate::hash::{
    compute_block_hashes, compute_sequence_hashes, HashOptions, LocalBlockHash, SequenceHash,
};
use crate::index::{
    ApproxConfig, ApproxIndex, FastMap, IndexError, OverlapScores, TierOverlap, TieredIndex,
};
use crate::prefill_time::{PrefillCoefficients, PrefillLoadModel, PrefillTimeModel};
use crate::selection::{
    is_busy, Candidate, RolePool, SelectError, Selection, SelectionRequest, Selector, WorkerInfo,
};
use crate::sequences::{ActiveSequences, BookingOptions, PotentialLoad, SequenceError};

/// A prompt's block hashes, computed once per request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHashes {
    pub local: Vec<LocalBlockHash>,
    pub sequence: Vec<SequenceHash>,
}

impl RequestHashes {
    pub fn compute(tokens: &[u32], block_size: usize, opts: &HashOptions<'_>) -> Self {
        let local = compute_block_hashes(tokens, block_size, opts, None);
        let sequence = compute_sequence_hashes(&local);
        Self { local, sequence }
    }
}

/// One request to route.
#[derive(Clone, Debug, Default)]
pub struct RouteRequest<'a> {
    /// When given, the request is booked on the chosen rank until [`Router::free`].
    pub request_id: Option<&'a str>,
    pub tokens: &'a [u32],
    pub hash: HashOptions<'a>,
    pub pinned_worker: Option<WorkerId>,
    pub dp_rank: Option<DpRank>,
    pub overrides: Option<RouterConfigOverride>,
}

impl RouteRequest<'_> {
    /// What the scheduler needs of this request.
    pub fn schedule_request(&self) -> ScheduleRequest<'_> {
        ScheduleRequest {
            request_id: self.request_id,
            isl: self.tokens.len(),
            pinned_worker: self.pinned_worker,
            dp_rank: self.dp_rank,
            overrides: self.overrides.as_ref(),
            pool: RolePool::Any,
            workers: None,
        }
    }
}

/// One request as the [`Scheduler`] sees it: its hashes are computed, its tokens no longer
/// needed (a request waiting in the router queue holds this much, not its prompt).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScheduleRequest<'a> {
    /// When given, the request is booked on the chosen rank until [`Scheduler::free`].
    pub request_id: Option<&'a str>,
    /// Prompt tokens.
    pub isl: usize,
    pub pinned_worker: Option<WorkerId>,
    pub dp_rank: Option<DpRank>,
    pub overrides: Option<&'a RouterConfigOverride>,
    /// Which ranks may take it (disaggregation); every rank by default.
    pub pool: RolePool,
    /// Only ranks of these workers may take it (e.g. those serving the request's LoRA
    /// adapter), sorted by id; every worker when `None`.
    pub workers: Option<&'a [WorkerId]>,
}

/// Which registered ranks a request may take: those of its pool, of its workers when it
/// names some.
#[derive(Clone, Copy)]
struct Admit<'a> {
    pool: RolePool,
    workers: Option<&'a [WorkerId]>,
}

impl<'a> Admit<'a> {
    fn of(req: &ScheduleRequest<'a>) -> Self {
        Self {
            pool: req.pool,
            workers: req.workers,
        }
    }

    /// Whether every rank is admitted (no filtering needed).
    fn is_all(&self) -> bool {
        self.pool == RolePool::Any && self.workers.is_none()
    }

    fn admits(&self, info: &WorkerInfo) -> bool {
        self.pool.admits(info.role)
            && self
                .workers
                .is_none_or(|w| w.binary_search(&info.worker.worker_id).is_ok())
    }
}

/// Why a request could not be routed or booked.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Booking(#[from] SequenceError),
    #[error(transparent)]
    QueueFull(#[from] crate::queue::QueueFull),
}

/// How a request was booked, beyond its rank, prompt and cached tokens: the options in force
/// (config and per-request overrides) and the predicted prefill time (`aic` load model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BookingTerms {
    pub opts: BookingOptions,
    pub predicted_prefill: Option<Duration>,
}

/// A booking as made, owned: everything another router needs to book the same load
/// ([`Scheduler::book_remote`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BookingRecord {
    pub worker: WorkerWithDpRank,
    /// The prompt's hashes (sequence hashes for the active blocks; local ones for the
    /// approximate and predicted indexes).
    pub hashes: RequestHashes,
    /// Prompt tokens.
    pub isl: usize,
    /// Prompt tokens the rank was expected to hold.
    pub cached_tokens: usize,
    pub terms: BookingTerms,
}

/// A booking borrowed from the caller (the schedule path does not own the hashes).
struct BookingRef<'a> {
    worker: WorkerWithDpRank,
    hashes: &'a RequestHashes,
    isl: usize,
    cached_tokens: usize,
    terms: BookingTerms,
}

/// Everything of routing except the exact index: worker registry, approximate and predicted
/// indexes, active load and selector. Servers pair it with a concurrently readable exact index
/// ([`crate::index::shared_index`]) and pass that index's overlaps into [`Scheduler::schedule`];
/// [`Router`] pairs it with a plain [`TieredIndex`].
#[derive(Debug)]
pub struct Scheduler {
    selector: Selector,
    block_size: usize,
    /// Registered ranks, in registration order (round-robin follows it).
    workers: Vec<WorkerInfo>,
    /// Where each rank is in `workers`.
    positions: FastMap<WorkerWithDpRank, usize>,
    /// The candidates' buffer, reused by every [`schedule`](Self::schedule).
    scratch: Vec<Candidate>,
    approx: Option<ApproxIndex>,
    predicted: Option<ApproxIndex>,
    active: ActiveSequences,
    /// Some with `--router-prefill-load-model aic`.
    prefill_time: Option<PrefillTimeModel>,
}

impl Scheduler {
    /// A scheduler with no workers. `block_size`: tokens per KV block (must match the engines).
    pub fn new(config: RouterConfig, block_size: usize) -> Self {
        let kv = &config.kv;
        let approx = (!kv.use_kv_events).then(|| {
            ApproxIndex::new(ApproxConfig {
                ttl: Duration::from_secs_f64(kv.router_ttl_secs),
                max_tree_size: kv.router_max_tree_size,
                prune_target_ratio: kv.router_prune_target_ratio,
            })
        });
        let predicted = kv
            .router_predicted_ttl_secs
            .filter(|_| kv.use_kv_events)
            .map(|ttl| {
                ApproxIndex::new(ApproxConfig {
                    ttl: Duration::from_secs_f64(ttl),
                    max_tree_size: kv.router_max_tree_size,
                    prune_target_ratio: kv.router_prune_target_ratio,
                })
            });
        let active = ActiveSequences::new(Duration::from_secs_f64(
            kv.router_active_request_expiry_secs,
        ));
        let prefill_time = (kv.router_prefill_load_model == PrefillLoadModel::Aic)
            .then(|| PrefillTimeModel::new(kv.router_prefill_time_coefficients));
        Self {
            selector: Selector::new(config),
            block_size,
            workers: Vec::new(),
            positions: FastMap::default(),
            scratch: Vec::new(),
            approx,
            predicted,
            active,
            prefill_time,
        }
    }

    pub fn config(&self) -> &RouterConfig {
        self.selector.config()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether requests need block hashes (KV mode only).
    pub fn needs_hashes(&self) -> bool {
        self.config().needs_hashes()
    }

    /// Whether [`Scheduler::schedule`] wants the exact index's overlaps (KV mode with events).
    pub fn uses_exact_index(&self) -> bool {
        self.config().uses_exact_index()
    }

    /// Register (or update) a worker rank.
    pub fn add_worker(&mut self, info: WorkerInfo) {
        match self.positions.get(&info.worker) {
            Some(&i) => self.workers[i] = info,
            None => {
                self.positions.insert(info.worker, self.workers.len());
                self.workers.push(info);
            }
        }
    }

    /// Take a worker's ranks out of `workers` and `positions`.
    fn drop_ranks(&mut self, worker_id: WorkerId) {
        self.workers.retain(|w| w.worker.worker_id != worker_id);
        self.positions.clear();
        self.positions
            .extend(self.workers.iter().enumerate().map(|(i, w)| (w.worker, i)));
    }

    /// Forget every rank of a worker: registry, approximate blocks, booked requests (a later
    /// `free` of one of those requests is an unknown-request error, harmless).
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.drop_ranks(worker_id);
        if let Some(a) = &mut self.approx {
            a.remove_worker(worker_id);
        }
        if let Some(p) = &mut self.predicted {
            p.remove_worker(worker_id);
        }
        self.active.remove_worker(worker_id);
    }

    /// Take a worker's ranks out of the routing set but keep what it holds: its bookings (its
    /// in-flight requests still count as its load) and its approximate / predicted blocks.
    /// [`add_worker`](Self::add_worker) puts it back.
    pub fn withdraw_worker(&mut self, worker_id: WorkerId) {
        self.drop_ranks(worker_id);
    }

    pub fn workers(&self) -> &[WorkerInfo] {
        &self.workers
    }

    /// Active requests and load.
    pub fn active(&self) -> &ActiveSequences {
        &self.active
    }

    /// Choose a rank for a request whose hashes are `hashes` (empty unless
    /// [`needs_hashes`](Self::needs_hashes)) and whose exact-index overlaps are `exact` (empty
    /// unless [`uses_exact_index`](Self::uses_exact_index)); book it when it has an id; record
    /// it in the approximate and predicted indexes.
    pub fn schedule<R: Rng + ?Sized>(
        &mut self,
        req: &ScheduleRequest<'_>,
        hashes: &RequestHashes,
        exact: Vec<(WorkerWithDpRank, TierOverlap)>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Selection, RouteError> {
        self.schedule_booking(req, hashes, exact, now, rng)
            .map(|(sel, _)| sel)
    }

    /// [`schedule`](Self::schedule), also returning how the request was booked (`None`
    /// without a request id): with the selection and the hashes, what another router needs to
    /// book the same load ([`book_remote`](Self::book_remote); replica sync).
    pub fn schedule_booking<R: Rng + ?Sized>(
        &mut self,
        req: &ScheduleRequest<'_>,
        hashes: &RequestHashes,
        exact: Vec<(WorkerWithDpRank, TierOverlap)>,
        now: Duration,
        rng: &mut R,
    ) -> Result<(Selection, Option<BookingTerms>), RouteError> {
        let overlaps = if hashes.local.is_empty() {
            Vec::new()
        } else {
            self.overlaps(&hashes.local, exact, now)
        };
        // The candidates' buffer is kept between requests: 128 KB with 1,000 ranks.
        let mut candidates = std::mem::take(&mut self.scratch);
        self.candidates(
            &mut candidates,
            overlaps,
            &hashes.sequence,
            req.isl,
            Admit::of(req),
            now,
        );
        let sel = self
            .selector
            .select(&candidates, &self.selection_request(req), rng);
        self.scratch = candidates;
        let sel = sel?;
        let Some(id) = req.request_id else {
            self.record(sel.worker, hashes, now);
            return Ok((sel, None));
        };
        let opts = match req.overrides {
            Some(o) => self.config().kv.with_override(o).booking(),
            None => self.config().kv.booking(),
        };
        let terms = BookingTerms {
            opts,
            predicted_prefill: match &self.prefill_time {
                Some(m) if opts.track_prefill_tokens => m.predict(
                    req.isl.saturating_sub(sel.cached_tokens) as u64,
                    self.chunk_of(sel.worker),
                ),
                _ => None,
            },
        };
        let booking = BookingRef {
            worker: sel.worker,
            hashes,
            isl: req.isl,
            cached_tokens: sel.cached_tokens,
            terms,
        };
        self.book(id, &booking, now)?;
        Ok((sel, Some(terms)))
    }

    /// Make a booking another router made (replica sync): the same load on the same rank as
    /// [`schedule`](Self::schedule) booked there, and the same approximate / predicted index
    /// records, under `id`. Errors: `id` is already booked.
    pub fn book_remote(
        &mut self,
        id: &str,
        booking: &BookingRecord,
        now: Duration,
    ) -> Result<(), SequenceError> {
        let b = BookingRef {
            worker: booking.worker,
            hashes: &booking.hashes,
            isl: booking.isl,
            cached_tokens: booking.cached_tokens,
            terms: booking.terms,
        };
        self.book(id, &b, now)
    }

    /// Book `b` under `id` and record its blocks in the approximate and predicted indexes:
    /// the one booking path of local and remote requests.
    fn book(&mut self, id: &str, b: &BookingRef<'_>, now: Duration) -> Result<(), SequenceError> {
        self.active.add_request(
            id.to_string(),
            b.worker,
            &b.hashes.sequence,
            b.isl,
            b.cached_tokens,
            self.block_size,
            b.terms.opts,
            b.terms.predicted_prefill,
            now,
        )?;
        self.record(b.worker, b.hashes, now);
        Ok(())
    }

    /// Record a routed prompt's blocks on `worker` in the approximate and predicted indexes.
    fn record(&mut self, worker: WorkerWithDpRank, hashes: &RequestHashes, now: Duration) {
        if hashes.local.is_empty() {
            return;
        }
        for a in [&mut self.approx, &mut self.predicted]
            .into_iter()
            .flatten()
        {
            a.record(worker, &hashes.local, &hashes.sequence, now);
        }
    }

    /// What [`schedule`](Self::schedule) would choose at `now`, changing nothing: no booking
    /// (`req.request_id` is ignored), nothing recorded in the approximate or predicted
    /// indexes, none of their blocks expired, the round-robin cursor left where it is. The
    /// same choice as `schedule` given the same random draws.
    pub fn peek<R: Rng + ?Sized>(
        &self,
        req: &ScheduleRequest<'_>,
        hashes: &RequestHashes,
        exact: Vec<(WorkerWithDpRank, TierOverlap)>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        let overlaps = if hashes.local.is_empty() {
            Vec::new()
        } else {
            self.overlaps_at(hashes, exact, now)
        };
        let mut candidates = Vec::new();
        self.candidates(
            &mut candidates,
            overlaps,
            &hashes.sequence,
            req.isl,
            Admit::of(req),
            now,
        );
        self.selector
            .peek(&candidates, &self.selection_request(req), rng)
    }

    fn selection_request(&self, req: &ScheduleRequest<'_>) -> SelectionRequest {
        SelectionRequest {
            isl: req.isl,
            block_size: self.block_size,
            pinned_worker: req.pinned_worker,
            dp_rank: req.dp_rank,
            overrides: req.overrides.cloned(),
        }
    }

    /// The request produced its first token at `now` (a sample for a fitted prefill model).
    pub fn mark_prefill_complete(
        &mut self,
        request_id: &str,
        now: Duration,
    ) -> Result<(), SequenceError> {
        let sample = self.active.mark_prefill_complete(request_id, now)?;
        if let (Some(s), Some(_)) = (sample, &self.prefill_time) {
            let chunk = self.chunk_of(s.worker);
            if let Some(m) = &mut self.prefill_time {
                m.observe(s.tokens, chunk, s.elapsed);
            }
        }
        Ok(())
    }

    /// The request ended at `now` (completed, failed, cancelled).
    pub fn free(
        &mut self,
        request_id: &str,
        now: Duration,
    ) -> Result<WorkerWithDpRank, SequenceError> {
        self.active.free(request_id, now)
    }

    /// The `aic` model's prefill-time coefficients in use (None: model off, or still fitting).
    pub fn prefill_coefficients(&self) -> Option<PrefillCoefficients> {
        self.prefill_time
            .as_ref()
            .and_then(PrefillTimeModel::coefficients)
    }

    /// A rank's step budget (its advertised `max_num_batched_tokens`).
    fn chunk_of(&self, worker: WorkerWithDpRank) -> Option<u64> {
        self.workers
            .iter()
            .find(|w| w.worker == worker)
            .and_then(|w| w.max_num_batched_tokens)
    }

    /// Whether a new request may be scheduled at `now` rather than wait in the router queue:
    /// always without `--router-queue-threshold T`; with it, while some routable rank is not
    /// busy (spec §7.1) and has at most `T × max_num_batched_tokens` active prefill tokens
    /// ([`DEFAULT_MAX_NUM_BATCHED_TOKENS`] for a rank that did not advertise its budget).
    /// With no ranks at all the request is not queued (it fails: no workers). Only ranks in
    /// `pool`, and of `workers` (sorted) when given (those serving the request's LoRA adapter), count:
    /// a free rank the request may not take does not admit it.
    pub fn admits(&self, pool: RolePool, workers: Option<&[WorkerId]>, now: Duration) -> bool {
        let Some(t) = self.config().kv.router_queue_threshold else {
            return true;
        };
        let admit = Admit { pool, workers };
        let mut ranks = self.workers.iter().filter(|w| admit.admits(w)).peekable();
        if ranks.peek().is_none() {
            return true;
        }
        let opts = self.config().kv.booking();
        ranks.any(|info| {
            let c = Candidate {
                info: *info,
                overlap: TierOverlap::default(),
                load: self
                    .active
                    .potential_load(info.worker, &[], 0, self.block_size, opts, now),
            };
            let budget = info
                .max_num_batched_tokens
                .unwrap_or(DEFAULT_MAX_NUM_BATCHED_TOKENS) as f64;
            !is_busy(&c, self.config()) && c.load.active_prefill_tokens as f64 <= t * budget
        })
    }

    /// Prompt tokens of a request with these overlaps not cached on its best rank (the router
    /// queue's `wspt` key).
    pub fn uncached_tokens(
        &self,
        isl: usize,
        overlaps: &[(WorkerWithDpRank, TierOverlap)],
    ) -> usize {
        let best = overlaps.iter().map(|(_, o)| o.device).max().unwrap_or(0) as usize;
        isl.saturating_sub(best * self.block_size)
    }

    /// Drop requests booked longer ago than the expiry (spec §5: lost frees). Returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        self.active.expire(now)
    }

    /// Per rank: overlap blocks by tier, merging `exact` with the predicted index, or from the
    /// approximate index when there are no events. Expires their blocks due at `now`.
    pub fn overlaps(
        &mut self,
        local: &[LocalBlockHash],
        exact: Vec<(WorkerWithDpRank, TierOverlap)>,
        now: Duration,
    ) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        if let Some(a) = &mut self.approx {
            return device_only(a.find_matches(local, now));
        }
        match &mut self.predicted {
            Some(p) => merge_predicted(exact, p.find_matches(local, now)),
            None => exact,
        }
    }

    /// [`overlaps`](Self::overlaps) changing nothing (`&self`): the same answer at `now`.
    pub fn overlaps_at(
        &self,
        hashes: &RequestHashes,
        exact: Vec<(WorkerWithDpRank, TierOverlap)>,
        now: Duration,
    ) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        let (local, seq) = (&hashes.local, &hashes.sequence);
        if let Some(a) = &self.approx {
            return device_only(a.find_matches_at(local, seq, now));
        }
        match &self.predicted {
            Some(p) => merge_predicted(exact, p.find_matches_at(local, seq, now)),
            None => exact,
        }
    }

    /// Per registered rank: its load at `now` if a request with these sequence hashes and
    /// `isl` tokens were added (Dynamo `get_potential_loads`).
    pub fn potential_loads(
        &self,
        sequence: &[SequenceHash],
        isl: usize,
        now: Duration,
    ) -> Vec<PotentialLoad> {
        let mut loads: Vec<PotentialLoad> = self
            .workers
            .iter()
            .map(|w| self.idle_load(w.worker, isl))
            .collect();
        self.patch_booked(sequence, isl, now, |i, load| loads[i] = load);
        loads
    }

    /// The potential load of rank `worker` with nothing booked, for a request of `isl` tokens.
    fn idle_load(&self, worker: WorkerWithDpRank, isl: usize) -> PotentialLoad {
        let opts = self.config().kv.booking();
        PotentialLoad {
            worker,
            ..ActiveSequences::idle_potential_load(isl, self.block_size, opts)
        }
    }

    /// Calls `f(position in workers, potential load)` for every registered rank that has a
    /// booking; the others have [`idle_load`](Self::idle_load).
    fn patch_booked(
        &self,
        sequence: &[SequenceHash],
        isl: usize,
        now: Duration,
        mut f: impl FnMut(usize, PotentialLoad),
    ) {
        let opts = self.config().kv.booking();
        self.active
            .for_each_booked_load(sequence, isl, self.block_size, opts, now, |load| {
                if let Some(&i) = self.positions.get(&load.worker) {
                    f(i, load);
                }
            });
    }

    /// Every registered rank `admit` lets in with its overlap and its load with the request
    /// added, in registration order. Idle ranks are written in one pass; only the ranks that
    /// carry a booking or hold part of the prompt are looked up (a few, even among a thousand).
    fn candidates(
        &self,
        out: &mut Vec<Candidate>,
        overlaps: Vec<(WorkerWithDpRank, TierOverlap)>,
        sequence: &[SequenceHash],
        isl: usize,
        admit: Admit<'_>,
        now: Duration,
    ) {
        let idle = self.idle_load(WorkerWithDpRank::default(), isl);
        // Position in `workers` -> position in the candidates (NONE: not in the pool).
        const NONE: u32 = u32::MAX;
        let mut slot: Vec<u32> = Vec::new();
        out.clear();
        out.reserve(self.workers.len());
        for info in &self.workers {
            let admitted = admit.admits(info);
            if !admit.is_all() {
                slot.push(if admitted { out.len() as u32 } else { NONE });
            }
            if !admitted {
                continue;
            }
            out.push(Candidate {
                info: *info,
                overlap: TierOverlap::default(),
                load: PotentialLoad {
                    worker: info.worker,
                    ..idle
                },
            });
        }
        let at = |i: usize| match slot.get(i) {
            None => Some(i),
            Some(&NONE) => None,
            Some(&j) => Some(j as usize),
        };
        self.patch_booked(sequence, isl, now, |i, load| {
            if let Some(j) = at(i) {
                out[j].load = load;
            }
        });
        for (w, o) in overlaps {
            if let Some(j) = self.positions.get(&w).and_then(|&i| at(i)) {
                out[j].overlap = o;
            }
        }
    }
}

/// Approximate-index scores as device-tier overlaps.
fn device_only(scores: OverlapScores) -> Vec<(WorkerWithDpRank, TierOverlap)> {
    scores
        .scores
        .into_iter()
        .map(|(w, device)| {
            let t = TierOverlap {
                device,
                ..Default::default()
            };
            (w, t)
        })
        .collect()
}

/// `exact` with the predicted index's device overlaps merged in by per-rank maximum.
fn merge_predicted(
    mut exact: Vec<(WorkerWithDpRank, TierOverlap)>,
    predicted: OverlapScores,
) -> Vec<(WorkerWithDpRank, TierOverlap)> {
    for (w, d) in predicted.scores {
        match exact.iter_mut().find(|(x, _)| *x == w) {
            Some((_, t)) => t.device = t.device.max(d),
            None => exact.push((
                w,
                TierOverlap {
                    device: d,
                    ..Default::default()
                },
            )),
        }
    }
    exact
}

/// The single-threaded router: a [`Scheduler`] with its own exact [`TieredIndex`].
#[derive(Debug)]
pub struct Router {
    sched: Scheduler,
    index: TieredIndex,
}

impl Router {
    /// A router with no workers. `block_size`: tokens per KV block (must match the engines).
    pub fn new(config: RouterConfig, block_size: usize) -> Self {
        Self {
            sched: Scheduler::new(config, block_size),
            index: TieredIndex::new(),
        }
    }

    pub fn config(&self) -> &RouterConfig {
        self.sched.config()
    }

    pub fn block_size(&self) -> usize {
        self.sched.block_size()
    }

    /// Register (or update) a worker rank.
    pub fn add_worker(&mut self, info: WorkerInfo) {
        self.sched.add_worker(info);
    }

    /// Forget every rank of a worker: registry, cached blocks, booked requests.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.sched.remove_worker(worker_id);
        self.index.remove_worker(worker_id);
    }

    pub fn workers(&self) -> &[WorkerInfo] {
        self.sched.workers()
    }

    /// Apply a KV event from an engine to the exact index.
    pub fn apply_event(&mut self, event: &RouterEvent) -> Result<(), IndexError> {
        self.index.apply(event)
    }

    /// The exact index (per tier).
    pub fn index(&self) -> &TieredIndex {
        &self.index
    }

    /// Active requests and load.
    pub fn active(&self) -> &ActiveSequences {
        self.sched.active()
    }

    /// Choose a rank for a request; book it when it has an id; record it in the approximate
    /// and predicted indexes.
    pub fn route<R: Rng + ?Sized>(
        &mut self,
        req: &RouteRequest<'_>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Selection, RouteError> {
        let (hashes, exact) = self.lookup(req);
        self.sched
            .schedule(&req.schedule_request(), &hashes, exact, now, rng)
    }

    /// What [`route`](Self::route) would choose at `now`, changing nothing
    /// ([`Scheduler::peek`]).
    pub fn peek<R: Rng + ?Sized>(
        &self,
        req: &RouteRequest<'_>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        let (hashes, exact) = self.lookup(req);
        self.sched
            .peek(&req.schedule_request(), &hashes, exact, now, rng)
    }

    /// A request's hashes (KV mode) and its exact-index overlaps (with events).
    fn lookup(
        &self,
        req: &RouteRequest<'_>,
    ) -> (RequestHashes, Vec<(WorkerWithDpRank, TierOverlap)>) {
        let hashes = if self.sched.needs_hashes() {
            RequestHashes::compute(req.tokens, self.block_size(), &req.hash)
        } else {
            RequestHashes::default()
        };
        let exact = if self.sched.uses_exact_index() && !hashes.local.is_empty() {
            self.index.find_tier_matches(&hashes.local)
        } else {
            Vec::new()
        };
        (hashes, exact)
    }

    /// The request produced its first token at `now`.
    pub fn mark_prefill_complete(
        &mut self,
        request_id: &str,
        now: Duration,
    ) -> Result<(), SequenceError> {
        self.sched.mark_prefill_complete(request_id, now)
    }

    /// The request ended at `now` (completed, failed, cancelled).
    pub fn free(
        &mut self,
        request_id: &str,
        now: Duration,
    ) -> Result<WorkerWithDpRank, SequenceError> {
        self.sched.free(request_id, now)
    }

    /// Whether a new request may be routed now rather than queued ([`Scheduler::admits`]).
    pub fn admits(&self, now: Duration) -> bool {
        self.sched.admits(RolePool::Any, None, now)
    }

    /// Whether a request that only `workers` (sorted) may take (e.g. those serving its LoRA adapter)
    /// may be routed now rather than queued ([`Scheduler::admits`]).
    pub fn admits_among(&self, workers: &[WorkerId], now: Duration) -> bool {
        self.sched.admits(RolePool::Any, Some(workers), now)
    }

    /// The `aic` model's coefficients in use ([`Scheduler::prefill_coefficients`]).
    pub fn prefill_coefficients(&self) -> Option<PrefillCoefficients> {
        self.sched.prefill_coefficients()
    }

    /// Per rank: overlap blocks by tier for these hashes (exact ∪ predicted, or approximate).
    pub fn overlaps(
        &mut self,
        local: &[LocalBlockHash],
        now: Duration,
    ) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        let exact = if self.sched.config().kv.use_kv_events {
            self.index.find_tier_matches(local)
        } else {
            Vec::new()
        };
        self.sched.overlaps(local, exact, now)
    }

    /// Per registered rank: its load at `now` if this request were added (Dynamo
    /// `get_potential_loads`).
    pub fn potential_loads(
        &self,
        tokens: &[u32],
        hash: &HashOptions<'_>,
        now: Duration,
    ) -> Vec<PotentialLoad> {
        let h = RequestHashes::compute(tokens, self.block_size(), hash);
        self.sched.potential_loads(&h.sequence, tokens.len(), now)
    }
}
