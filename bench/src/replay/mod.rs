//! Offline replay in virtual time (`kvrouter replay`), like Dynamo's `python -m dynamo.replay`:
//! a workload's requests go through the real router core and N of the mocker's engines, with a
//! simulated clock instead of sleeps and sockets.
//!
//! * **Engines** ([`engine`]): the mocker's own [`kvrouter_mocker::engine::Engine`] — vLLM
//!   v1 scheduler, paged KV pool with prefix caching, Dynamo's polynomial timing model — each
//!   stepped when idle with work, its step's results due when the modelled duration has passed.
//! * **Router**: the core's [`Scheduler`] and exact [`TieredIndex`], called as the frontend
//!   calls them (`server/src/routing.rs`): hashes, the index's overlaps, then
//!   [`Scheduler::schedule`] (load, selection, booking) at arrival, `mark_prefill_complete` at
//!   the first token, `free` at the last, and lost bookings expired every
//!   [`EXPIRY_INTERVAL_S`] as the frontend's health loop does.
//! * **Router queue** (`--router-queue-threshold`): a request that finds every worker past the
//!   threshold, or others waiting, waits in the core's [`RouterQueue`]; waiting requests are
//!   dispatched after every engine step while a worker has room, their overlaps looked up again
//!   then. TTFT counts the wait.
//! * **KV events**: each engine's events, converted as the live subscriber converts them, are
//!   applied to the router's index when the step that produced them ends, or
//!   `kv_event_delay_s` later.
//! * **Arrivals** ([`workload`]): the trace's timestamps (open loop) or a closed loop.
//! * **Clock** ([`timeline`]): events in time order, ties in scheduling order; with the seed
//!   fixed, a replay is deterministic.
//!
//! Each request ends as a [`RequestRecord`], the record the HTTP benchmark keeps, so the
//! figures are `kvrouter bench`'s ([`crate::runner::summarise`]): hit rate = Σ engine-reported
//! cached tokens / Σ prompt tokens, TTFT / ITL / e2e from arrival, throughput over the virtual
//! duration; plus the router's predicted hit rate and requests per worker.

pub mod engine;
pub mod timeline;
pub mod workload;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::HashOptions;
use kvrouter_core::index::TieredIndex;
use kvrouter_core::queue::{QueueMeta, RouterQueue};
use kvrouter_core::router::{RequestHashes, ScheduleRequest, Scheduler};
use kvrouter_core::selection::RolePool;
use kvrouter_core::selection::WorkerInfo;
use kvrouter_core::RouterConfig;
use kvrouter_mocker::MockerConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::bound::Bound;
use crate::client::{RequestRecord, Usage};
use crate::runner::{summarise, RunReport};
use crate::workload::Schedule;
use engine::VirtualEngine;
use timeline::Timeline;
pub use workload::ReplayWorkload;

/// The fleet, the router and the replay's own knobs.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    /// Engines in the fleet (worker ids 0..workers, dp rank 0).
    pub workers: usize,
    /// Every engine's flags (blocks, block size, batching, speed-up); the network ones are
    /// unused. `hash_seed` None: derived from `seed`.
    pub mocker: MockerConfig,
    /// The router.
    pub router: RouterConfig,
    /// KV events reach the router's index this long after their step ends, seconds.
    pub kv_event_delay_s: f64,
    /// Prompts longer than this are refused, as the frontend refuses them (`--context-length`;
    /// None: no limit but the engines' capacity).
    pub max_prompt_tokens: Option<usize>,
    /// Seed of the router's random choices (ties, random modes) and the engines' hashes.
    pub seed: u64,
}

impl ReplayConfig {
    /// `workers` engines of `num_gpu_blocks` blocks of `block_size` tokens, the mocker's other
    /// defaults (speed-up 1), the given router, no event delay, seed 42.
    pub fn fleet(
        workers: usize,
        num_gpu_blocks: usize,
        block_size: usize,
        router: RouterConfig,
    ) -> Self {
        Self {
            workers,
            mocker: MockerConfig {
                num_gpu_blocks,
                block_size,
                ..MockerConfig::default()
            },
            router,
            kv_event_delay_s: 0.0,
            max_prompt_tokens: None,
            seed: 42,
        }
    }

    /// Checks the values. Errors: what is wrong, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        self.mocker.validate().map_err(|e| e.to_string())?;
        self.router.kv.validate().map_err(|e| e.to_string())?;
        if !(self.kv_event_delay_s >= 0.0 && self.kv_event_delay_s.is_finite()) {
            return Err("--kv-event-delay-ms must be a finite number >= 0".into());
        }
        Ok(())
    }

    fn engine_config(&self) -> kvrouter_mocker::engine::EngineConfig {
        let mut m = self.mocker.clone();
        m.hash_seed = Some(
            m.hash_seed
                .unwrap_or_else(|| crate::trace::splitmix64(self.seed ^ 0xe6_91_4e)),
        );
        m.engine_config(None)
    }
}

/// What one replay measured.
#[derive(Clone, Debug, Default)]
pub struct ReplayOutcome {
    /// The figures, as `kvrouter bench` reports a run (durations and rates in virtual time).
    pub report: RunReport,
    /// One record per request, in workload order.
    pub records: Vec<RequestRecord>,
    /// Wall time the replay took, seconds.
    pub wall_s: f64,
    /// Engine steps run, over all engines.
    pub engine_steps: u64,
    /// KV events applied to the router's index.
    pub router_events: u64,
    /// KV events the index refused (0 when engines and router agree).
    pub index_errors: u64,
}

/// The pooled-LRU and infinite-cache bounds of a workload for this fleet (prompts the engines
/// would refuse left out).
pub fn bound(workload: &ReplayWorkload, cfg: &ReplayConfig) -> Bound {
    let ecfg = cfg.engine_config();
    crate::bound::bound(
        workload.prompts(|i| refusal(&ecfg, cfg.max_prompt_tokens, workload, i).is_none()),
        cfg.mocker.block_size,
        cfg.workers * cfg.mocker.num_gpu_blocks,
    )
}

/// Replays `workload` through the fleet and router of `cfg`; the report is labelled with the
/// router mode. Errors: invalid configuration, or a schedule that does not fit the workload.
/// Requests that cannot be routed or that the engine refuses are error records, not errors.
pub fn replay(workload: &ReplayWorkload, cfg: &ReplayConfig) -> Result<ReplayOutcome, String> {
    cfg.validate()?;
    match &workload.schedule {
        Schedule::Open { offsets_ms } if offsets_ms.len() != workload.len() => {
            return Err(format!(
                "{} send times for {} requests",
                offsets_ms.len(),
                workload.len()
            ))
        }
        Schedule::Closed { concurrency: 0 } => return Err("concurrency must be at least 1".into()),
        _ => {}
    }
    let wall = Instant::now();
    let mut r = Replay::new(workload, cfg);
    r.run();
    Ok(r.finish(wall.elapsed().as_secs_f64()))
}

/// Why request `i` is refused before routing, if it is: longer than the context length, or
/// never servable by the engines.
fn refusal(
    ecfg: &kvrouter_mocker::engine::EngineConfig,
    max_prompt_tokens: Option<usize>,
    w: &ReplayWorkload,
    i: usize,
) -> Option<String> {
    let len = w.prompt_len(i);
    if let Some(max) = max_prompt_tokens.filter(|&m| len > m) {
        return Some(format!(
            "the prompt has {len} tokens, more than the context length {max}"
        ));
    }
    ecfg.validate(len, None, w.max_tokens(i))
        .err()
        .map(|e| e.to_string())
}

/// Seconds between two expiries of lost bookings (the frontend's default health interval).
pub const EXPIRY_INTERVAL_S: f64 = 1.0;

/// Something due at a virtual time.
enum Due {
    /// Request `i` is sent.
    Arrive(usize),
    /// Engine `w`'s step ends.
    StepEnd(usize),
    /// Delayed KV events reach the router's index.
    Apply(Vec<RouterEvent>),
}

#[derive(Default)]
struct Req {
    arrival: f64,
    first: Option<f64>,
    last: f64,
    end: Option<f64>,
    itl_ms: Vec<f64>,
    prompt: usize,
    cached: usize,
    completion: usize,
    error: Option<String>,
}

struct Replay<'a> {
    w: &'a ReplayWorkload,
    router: Scheduler,
    /// Requests waiting in the router (indexes into `reqs`).
    queue: RouterQueue<usize>,
    index: TieredIndex,
    last_expiry: f64,
    engines: Vec<VirtualEngine>,
    rng: StdRng,
    clock: Timeline<Due>,
    reqs: Vec<Req>,
    next_closed: usize,
    delay: f64,
    max_prompt_tokens: Option<usize>,
    events: Vec<RouterEvent>,
    routed_tokens: u64,
    predicted_tokens: u64,
    per_worker: Vec<u64>,
    route_time: Duration,
    routes: u64,
    router_events: u64,
    index_errors: u64,
}

fn request_id(i: usize) -> String {
    format!("r{i}")
}

impl<'a> Replay<'a> {
    fn new(w: &'a ReplayWorkload, cfg: &ReplayConfig) -> Self {
        let ecfg = cfg.engine_config();
        let mut router = Scheduler::new(cfg.router.clone(), cfg.mocker.block_size);
        let engines = (0..cfg.workers)
            .map(|i| {
                let worker = WorkerWithDpRank::new(i as u64, 0);
                router.add_worker(WorkerInfo {
                    worker,
                    total_kv_blocks: Some(cfg.mocker.num_gpu_blocks as u64),
                    max_num_batched_tokens: Some(cfg.mocker.max_num_batched_tokens as u64),
                    ..Default::default()
                });
                VirtualEngine::new(worker, ecfg.clone())
            })
            .collect();
        let mut clock = Timeline::new();
        let mut next_closed = w.len();
        match &w.schedule {
            Schedule::Open { offsets_ms } => {
                for (i, off) in offsets_ms.iter().enumerate() {
                    clock.at(off / 1e3, Due::Arrive(i));
                }
            }
            Schedule::Closed { concurrency } => {
                next_closed = (*concurrency).min(w.len());
                for i in 0..next_closed {
                    clock.at(0.0, Due::Arrive(i));
                }
            }
        }
        let kv = &cfg.router.kv;
        Self {
            w,
            queue: RouterQueue::new(kv.router_queue_policy, kv.router_queue_limit),
            router,
            index: TieredIndex::new(),
            last_expiry: 0.0,
            engines,
            rng: StdRng::seed_from_u64(cfg.seed),
            clock,
            reqs: (0..w.len()).map(|_| Req::default()).collect(),
            next_closed,
            delay: cfg.kv_event_delay_s,
            max_prompt_tokens: cfg.max_prompt_tokens,
            events: Vec::new(),
            routed_tokens: 0,
            predicted_tokens: 0,
            per_worker: vec![0; cfg.workers],
            route_time: Duration::ZERO,
            routes: 0,
            router_events: 0,
            index_errors: 0,
        }
    }

    fn run(&mut self) {
        while let Some((t, due)) = self.clock.pop() {
            match due {
                Due::Arrive(i) => self.arrive(i, t),
                Due::StepEnd(e) => self.step_end(e, t),
                Due::Apply(events) => self.apply(&events),
            }
        }
    }

    /// A request ended (any way): the closed loop sends the next one.
    fn ended(&mut self, i: usize, t: f64) {
        self.reqs[i].end = Some(t);
        if matches!(self.w.schedule, Schedule::Closed { .. }) && self.next_closed < self.w.len() {
            self.clock.at(t, Due::Arrive(self.next_closed));
            self.next_closed += 1;
        }
    }

    fn fail(&mut self, i: usize, t: f64, error: String) {
        self.reqs[i].error = Some(error);
        self.ended(i, t);
    }

    fn arrive(&mut self, i: usize, t: f64) {
        let len = self.w.prompt_len(i);
        let req = &mut self.reqs[i];
        req.arrival = t;
        req.last = t;
        req.prompt = len;
        // Refused before the prompt is built: an absurd trace line costs nothing.
        if let Some(e) = refusal(self.engines[0].config(), self.max_prompt_tokens, self.w, i) {
            return self.fail(i, t, format!("refused: {e}"));
        }
        let now = Duration::from_secs_f64(t);
        if t - self.last_expiry >= EXPIRY_INTERVAL_S {
            self.router.expire(now);
            self.last_expiry = t;
        }
        if self.router.config().kv.router_queue_threshold.is_some()
            && (!self.queue.is_empty() || !self.router.admits(RolePool::Any, None, now))
        {
            let prompt = self.w.prompt(i);
            let (_, exact) = self.lookup(&prompt);
            let meta = QueueMeta {
                arrival: now,
                uncached_tokens: self.router.uncached_tokens(len, &exact),
                ..Default::default()
            };
            if let Err(e) = self.queue.push(meta, i) {
                self.fail(i, t, format!("routing: {e}"));
            }
            return;
        }
        self.dispatch(i, t);
    }

    /// The prompt's hashes and the index's overlaps, as `RouterState::route` computes them.
    fn lookup(
        &self,
        prompt: &[u32],
    ) -> (
        RequestHashes,
        Vec<(WorkerWithDpRank, kvrouter_core::index::TierOverlap)>,
    ) {
        let hashes = if self.router.needs_hashes() {
            RequestHashes::compute(prompt, self.router.block_size(), &HashOptions::default())
        } else {
            RequestHashes::default()
        };
        let exact = if self.router.uses_exact_index() && !hashes.local.is_empty() {
            self.index.find_tier_matches(&hashes.local)
        } else {
            Vec::new()
        };
        (hashes, exact)
    }

    /// Route request `i` at `t` and hand it to its engine.
    fn dispatch(&mut self, i: usize, t: f64) {
        let (len, max_tokens) = (self.w.prompt_len(i), self.w.max_tokens(i));
        let prompt = self.w.prompt(i).into_owned();
        let id = request_id(i);
        let now = Duration::from_secs_f64(t);
        // As `RouterState::route` does: hashes and overlaps first, then the scheduler.
        let t0 = Instant::now();
        let (hashes, exact) = self.lookup(&prompt);
        let req = ScheduleRequest {
            request_id: Some(&id),
            isl: prompt.len(),
            ..Default::default()
        };
        let sel = self
            .router
            .schedule(&req, &hashes, exact, now, &mut self.rng);
        self.route_time += t0.elapsed();
        self.routes += 1;
        let sel = match sel {
            Ok(s) => s,
            Err(e) => return self.fail(i, t, format!("routing: {e}")),
        };
        self.routed_tokens += len as u64;
        self.predicted_tokens += sel.cached_tokens as u64;
        let e = sel.worker.worker_id as usize;
        self.per_worker[e] += 1;
        if let Err(err) = self.engines[e].add(i as u64, prompt, max_tokens, t) {
            let _ = self.router.free(&id, now);
            return self.fail(i, t, format!("refused: {err}"));
        }
        self.start(e, t);
    }

    /// Route waiting requests, in queue order, while a worker has room.
    fn dispatch_queued(&mut self, t: f64) {
        let now = Duration::from_secs_f64(t);
        while !self.queue.is_empty() && self.router.admits(RolePool::Any, None, now) {
            if let Some((_, i)) = self.queue.pop() {
                self.dispatch(i, t);
            }
        }
    }

    fn start(&mut self, e: usize, t: f64) {
        if let Some(end) = self.engines[e].start_step(t) {
            self.clock.at(end, Due::StepEnd(e));
        }
    }

    fn apply(&mut self, events: &[RouterEvent]) {
        for ev in events {
            self.router_events += 1;
            if self.index.apply(ev).is_err() {
                self.index_errors += 1;
            }
        }
    }

    fn step_end(&mut self, e: usize, t: f64) {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let mut finished = Vec::new();
        {
            let out = self.engines[e].end_step(&mut events);
            for tok in &out.tokens {
                let i = tok.id as usize;
                let req = &mut self.reqs[i];
                if tok.index == 0 {
                    req.first = Some(t);
                    req.cached = tok.cached_tokens;
                    let _ = self
                        .router
                        .mark_prefill_complete(&request_id(i), Duration::from_secs_f64(t));
                } else {
                    req.itl_ms.push((t - req.last) * 1e3);
                }
                req.last = t;
                req.completion += 1;
                if tok.finished {
                    let _ = self.router.free(&request_id(i), Duration::from_secs_f64(t));
                    finished.push(i);
                }
            }
        }
        if !events.is_empty() {
            if self.delay > 0.0 {
                self.clock.at(t + self.delay, Due::Apply(events.clone()));
            } else {
                self.apply(&events);
            }
        }
        self.events = events;
        for i in finished {
            self.ended(i, t);
        }
        self.start(e, t);
        self.dispatch_queued(t);
    }

    fn finish(mut self, wall_s: f64) -> ReplayOutcome {
        let end = self.clock.now();
        for (i, r) in self.reqs.iter_mut().enumerate() {
            if r.end.is_none() {
                // Cannot happen with a working engine; counted rather than hidden.
                r.error = Some(format!("request {i} never finished"));
                r.end = Some(end);
            }
        }
        let records: Vec<RequestRecord> = self
            .reqs
            .iter_mut()
            .enumerate()
            .map(|(index, r)| RequestRecord {
                index,
                start_ms: r.arrival * 1e3,
                ok: r.error.is_none(),
                error: r.error.take(),
                ttft_ms: r.first.map(|f| (f - r.arrival) * 1e3),
                e2e_ms: (r.end.unwrap_or(end) - r.arrival) * 1e3,
                itl_ms: std::mem::take(&mut r.itl_ms),
                chunks: r.completion as u64,
                usage: r.first.map(|_| Usage {
                    prompt_tokens: r.prompt as u64,
                    completion_tokens: r.completion as u64,
                    cached_tokens: r.cached as u64,
                }),
            })
            .collect();
        let first = self
            .reqs
            .iter()
            .map(|r| r.arrival)
            .fold(f64::INFINITY, f64::min);
        let duration = if first.is_finite() { end - first } else { 0.0 };
        let mut report = summarise(self.router.config().mode.as_str(), &records, duration);
        if self.routed_tokens > 0 {
            report.predicted_hit_rate =
                Some(self.predicted_tokens as f64 / self.routed_tokens as f64);
        }
        report.requests_per_worker = Some(
            self.per_worker
                .iter()
                .enumerate()
                .map(|(w, &n)| (w.to_string(), n))
                .collect::<BTreeMap<_, _>>(),
        );
        if self.routes > 0 {
            let mean_us = self.route_time.as_secs_f64() * 1e6 / self.routes as f64;
            report.router_overhead_us = Some(BTreeMap::from([("total".to_string(), mean_us)]));
        }
        report.url = "virtual".into();
        report.schedule = self.w.schedule.describe();
        ReplayOutcome {
            report,
            records,
            wall_s,
            engine_steps: self.engines.iter().map(VirtualEngine::steps).sum(),
            router_events: self.router_events,
            index_errors: self.index_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRequest;
    use kvrouter_core::config::RouterMode;

    /// 7 conversations of 6 turns each, every turn extending the previous prompt.
    fn conversations() -> Vec<TraceRequest> {
        let mut out = Vec::new();
        let mut next_id = 100;
        for turn in 0..6u64 {
            for conv in 0..7u64 {
                let mut ids: Vec<u64> = (0..=turn).map(|t| conv * 10 + t).collect();
                ids.push(next_id);
                next_id += 1;
                out.push(TraceRequest {
                    timestamp: turn * 10_000 + conv * 300,
                    input_length: ids.len() * 512 - 100,
                    output_length: 20,
                    hash_ids: ids,
                });
            }
        }
        out
    }

    fn run(trace: Vec<TraceRequest>, mode: RouterMode, seed: u64) -> ReplayOutcome {
        let mut cfg = ReplayConfig::fleet(
            4,
            4096,
            64,
            RouterConfig {
                mode,
                ..Default::default()
            },
        );
        cfg.seed = seed;
        replay(&ReplayWorkload::from_trace(trace, 1.0), &cfg).unwrap()
    }

    #[test]
    fn kv_finds_the_conversation_history_and_round_robin_does_not() {
        let kv = run(conversations(), RouterMode::Kv, 1);
        let rr = run(conversations(), RouterMode::RoundRobin, 1);
        for o in [&kv, &rr] {
            let r = &o.report;
            assert_eq!((r.requests, r.succeeded, r.errors), (42, 42, 0), "{r:?}");
            assert_eq!(o.index_errors, 0);
            assert!(o.router_events > 0);
            let per_worker = r.requests_per_worker.as_ref().unwrap();
            assert_eq!(per_worker.values().sum::<u64>(), 42);
            assert_eq!(r.completion_tokens, 42 * 20);
            assert_eq!(r.ttft_ms.unwrap().count, 42);
            assert_eq!(r.itl_ms.unwrap().count, 42 * 19);
        }
        // Turn k can reuse k of its k + 1 blocks of 512: about 0.55 at best.
        let (hk, hr) = (kv.report.hit_rate.unwrap(), rr.report.hit_rate.unwrap());
        assert!(hk > 0.5, "kv {hk}");
        assert!(hk >= hr + 0.2, "kv {hk} vs round-robin {hr}");
        // With events applied at once and turns far apart, the router predicts the engines.
        assert!((kv.report.predicted_hit_rate.unwrap() - hk).abs() < 1e-9);
        assert!(kv.report.ttft_ms.unwrap().p50 < rr.report.ttft_ms.unwrap().p50);
    }

    #[test]
    fn the_same_seed_replays_the_same_run() {
        // Random mode and kv ties both draw from the seeded RNG.
        for mode in [RouterMode::Kv, RouterMode::Random] {
            let a = run(conversations(), mode, 7);
            let b = run(conversations(), mode, 7);
            let key = |o: &ReplayOutcome| {
                o.records
                    .iter()
                    .map(|r| (r.ttft_ms.map(f64::to_bits), r.e2e_ms.to_bits(), r.usage))
                    .collect::<Vec<_>>()
            };
            assert_eq!(key(&a), key(&b), "{mode}");
            assert_eq!(a.report.requests_per_worker, b.report.requests_per_worker);
            assert_eq!(a.engine_steps, b.engine_steps);
        }
        let a = run(conversations(), RouterMode::Random, 1);
        let b = run(conversations(), RouterMode::Random, 2);
        assert_ne!(a.report.requests_per_worker, b.report.requests_per_worker);
    }

    #[test]
    fn requests_the_engines_cannot_serve_are_errors_not_panics() {
        let mut trace = conversations();
        trace.truncate(3);
        trace[1].input_length = usize::MAX / 2; // no prompt is ever built for it
        trace[2].input_length = 0;
        let o = run(trace, RouterMode::Kv, 1);
        let r = &o.report;
        assert_eq!((r.requests, r.succeeded, r.errors), (3, 1, 2));
        assert!(o.records[1]
            .error
            .as_deref()
            .unwrap()
            .contains("maximum context length"));
        assert!(o.records[2].error.as_deref().unwrap().contains("empty"));
        let b = bound(&ReplayWorkload::from_trace(conversations(), 1.0), &{
            ReplayConfig::fleet(4, 4096, 64, RouterConfig::default())
        });
        assert!(b.pooled_lru_hit_rate > 0.5);
    }

    #[test]
    fn delayed_events_and_closed_loops() {
        let mut cfg = ReplayConfig::fleet(
            2,
            4096,
            64,
            RouterConfig {
                mode: RouterMode::Kv,
                ..Default::default()
            },
        );
        cfg.kv_event_delay_s = 60.0;
        // Every turn arrives before the previous turn's events: the router cannot see them.
        let w = ReplayWorkload::from_trace(conversations(), 1.0);
        let late = replay(&w, &cfg).unwrap();
        assert_eq!(late.report.predicted_hit_rate, Some(0.0));
        assert_eq!(late.index_errors, 0);
        cfg.kv_event_delay_s = 0.0;
        let closed = w.with_schedule(Schedule::Closed { concurrency: 3 });
        let o = replay(&closed, &cfg).unwrap();
        assert_eq!(o.report.succeeded, 42);
        // Never more than three in flight: each arrival is some earlier request's end.
        let mut ends: Vec<f64> = o.records.iter().map(|r| r.start_ms + r.e2e_ms).collect();
        ends.sort_by(f64::total_cmp);
        let mut starts: Vec<f64> = o.records.iter().map(|r| r.start_ms).collect();
        starts.sort_by(f64::total_cmp);
        for (k, s) in starts.iter().enumerate().skip(3) {
            assert!(*s >= ends[k - 3] - 1e-9, "request {k} started at {s}");
        }
        // Bookings expired under running requests (as the frontend's health loop does): their
        // late frees are unknown requests, harmless.
        let mut short = cfg.clone();
        short.router.kv.router_active_request_expiry_secs = 0.001;
        let o = replay(&ReplayWorkload::from_trace(conversations(), 1.0), &short).unwrap();
        assert_eq!((o.report.succeeded, o.report.errors), (42, 0));
        assert!(replay(
            &ReplayWorkload::from_trace(conversations(), 1.0)
                .with_schedule(Schedule::Closed { concurrency: 0 }),
            &cfg
        )
        .is_err());
    }

    #[test]
    fn the_router_queue_holds_a_burst_and_every_request_is_served() {
        // 42 prompts at once on 2 engines; threshold 0: at most one prefill booked per engine.
        // Longest first, so arrival order and shortest-first differ.
        let mut trace = conversations();
        trace.reverse();
        for r in &mut trace {
            r.timestamp = 0;
        }
        let w = ReplayWorkload::from_trace(trace, 1.0);
        let mut cfg = ReplayConfig::fleet(
            2,
            4096,
            64,
            RouterConfig {
                mode: RouterMode::Kv,
                ..Default::default()
            },
        );
        let free = replay(&w, &cfg).unwrap();
        cfg.router.kv.router_queue_threshold = Some(0.0);
        let queued = replay(&w, &cfg).unwrap();
        cfg.router.kv.router_queue_policy = kvrouter_core::queue::QueuePolicy::Wspt;
        let wspt = replay(&w, &cfg).unwrap();
        for o in [&free, &queued, &wspt] {
            assert_eq!((o.report.succeeded, o.report.errors), (42, 0));
        }
        let ttft_mean = |o: &ReplayOutcome| {
            o.records.iter().filter_map(|r| r.ttft_ms).sum::<f64>() / o.records.len() as f64
        };
        // Shortest uncached prefill first lowers the mean TTFT of a burst (Smith's rule).
        assert!(
            ttft_mean(&wspt) < ttft_mean(&queued),
            "wspt {} vs fcfs {}",
            ttft_mean(&wspt),
            ttft_mean(&queued)
        );
        // The queue changed what happened: requests were routed later, at different times.
        assert_ne!(ttft_mean(&free), ttft_mean(&queued));
    }
}
