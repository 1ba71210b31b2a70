//! A fleet simulated on a virtual clock, driving the router core exactly as a frontend would:
//! route → engine prefix cache (publishing KV events back to the router) → first token
//! (`mark_prefill_complete`) → end (`free`). Request timing uses the mock engine's model
//! (spec §15.2): prefill of the uncached tokens, then `output_length` decode steps at the
//! worker's KV utilisation. There is no engine queueing; load matters through the router's cost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use kvrouter_core::config::RouterConfig;
use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::hash::HashOptions;
use kvrouter_core::router::{RequestHashes, RouteRequest, Router};
use kvrouter_core::selection::WorkerInfo;
use kvrouter_mocker::timing::{decode_ms, prefill_ms};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::cache::SimWorkerCache;
use crate::trace::{synthesize_prompt, TraceRequest};

/// Fleet and router parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub workers: usize,
    /// Tokens per KV block (router and engines agree).
    pub block_size: usize,
    /// KV cache capacity of each worker, in blocks.
    pub capacity_blocks: usize,
    pub router: RouterConfig,
    /// Trace timestamps are divided by this (2 = twice as fast).
    pub time_scale: f64,
    pub seed: u64,
}

/// Per-worker figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerReport {
    pub worker_id: u64,
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Tokens the worker's cache actually held (engine truth).
    pub cached_tokens: u64,
    pub peak_active_requests: u32,
    pub peak_active_blocks: u64,
}

/// What a simulation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimReport {
    pub mode: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Σ cached tokens / Σ prompt tokens, from the workers' caches.
    pub hit_rate: f64,
    /// Σ router-predicted cached tokens / Σ prompt tokens.
    pub predicted_hit_rate: f64,
    /// Modelled time to first token (prefill of uncached tokens), ms.
    pub ttft_ms_mean: f64,
    /// Router CPU per request (hashing + index + selection + booking), µs.
    pub route_us_p50: f64,
    pub route_us_p99: f64,
    /// `(block, worker)` pairs in the router's index at the end.
    pub index_entries: usize,
    pub routing_errors: u64,
    pub workers: Vec<WorkerReport>,
}

enum Step {
    PrefillDone(String),
    Done(String),
}

/// Route `requests` across a simulated fleet and report hit rates, load and router overhead.
pub fn simulate(requests: &[TraceRequest], cfg: &SimConfig) -> SimReport {
    let mut router = Router::new(cfg.router.clone(), cfg.block_size);
    let mut caches: Vec<SimWorkerCache> = (0..cfg.workers as u64)
        .map(|id| {
            let worker = WorkerWithDpRank::new(id, 0);
            router.add_worker(WorkerInfo {
                worker,
                total_kv_blocks: Some(cfg.capacity_blocks as u64),
                ..Default::default()
            });
            SimWorkerCache::new(worker, cfg.capacity_blocks)
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut report = SimReport {
        mode: cfg.router.mode.to_string(),
        workers: (0..cfg.workers as u64)
            .map(|worker_id| WorkerReport {
                worker_id,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut heap: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
    let mut steps: std::collections::HashMap<u64, Step> = Default::default();
    let mut next_step = 0u64;
    let mut route_times = Vec::with_capacity(requests.len());
    let (mut predicted, mut ttft_total) = (0u64, 0f64);
    let mut events = Vec::new();

    for (i, req) in requests.iter().enumerate() {
        let now = Duration::from_secs_f64(req.timestamp as f64 / 1000.0 / cfg.time_scale.max(1e-9));
        while let Some(Reverse((t, k))) = heap.peek().copied() {
            if t > now {
                break;
            }
            heap.pop();
            match steps.remove(&k) {
                Some(Step::PrefillDone(id)) => {
                    let _ = router.mark_prefill_complete(&id);
                }
                Some(Step::Done(id)) => {
                    let _ = router.free(&id);
                }
                None => {}
            }
        }
        let tokens = synthesize_prompt(req);
        let id = format!("req-{i}");
        let t0 = Instant::now();
        let sel = router.route(
            &RouteRequest {
                request_id: Some(&id),
                tokens: &tokens,
                ..Default::default()
            },
            now,
            &mut rng,
        );
        route_times.push(t0.elapsed());
        let sel = match sel {
            Ok(s) => s,
            Err(_) => {
                report.routing_errors += 1;
                continue;
            }
        };
        let w = sel.worker.worker_id as usize;
        // The engine serves the prompt and publishes what changed in its cache.
        let h = RequestHashes::compute(&tokens, cfg.block_size, &HashOptions::default());
        let hit_blocks = caches[w].serve(&h.local, &h.sequence, &mut events);
        for ev in events.drain(..) {
            let _ = router.apply_event(&ev);
        }
        let cached = (hit_blocks * cfg.block_size).min(tokens.len()) as u64;
        predicted += sel.cached_tokens as u64;
        let load = router.active().load(sel.worker);
        let wr = &mut report.workers[w];
        wr.requests += 1;
        wr.prompt_tokens += tokens.len() as u64;
        wr.cached_tokens += cached;
        wr.peak_active_requests = wr.peak_active_requests.max(load.active_requests);
        wr.peak_active_blocks = wr.peak_active_blocks.max(load.active_decode_blocks);
        report.requests += 1;
        report.prompt_tokens += tokens.len() as u64;

        let prefill = prefill_ms(tokens.len() - cached as usize);
        let util = (load.active_decode_blocks as f64 / cfg.capacity_blocks.max(1) as f64).min(1.0);
        let decode = req.output_length as f64 * decode_ms(util);
        ttft_total += prefill;
        let first = now + Duration::from_secs_f64(prefill / 1000.0);
        let end = first + Duration::from_secs_f64(decode / 1000.0);
        for (t, s) in [
            (first, Step::PrefillDone(id.clone())),
            (end, Step::Done(id)),
        ] {
            steps.insert(next_step, s);
            heap.push(Reverse((t, next_step)));
            next_step += 1;
        }
    }
    while let Some(Reverse((_, k))) = heap.pop() {
        if let Some(Step::Done(id)) = steps.remove(&k) {
            let _ = router.free(&id);
        }
    }
    debug_assert_eq!(router.active().num_active(), 0);

    let cached: u64 = report.workers.iter().map(|w| w.cached_tokens).sum();
    let denom = report.prompt_tokens.max(1) as f64;
    report.hit_rate = cached as f64 / denom;
    report.predicted_hit_rate = predicted as f64 / denom;
    report.ttft_ms_mean = ttft_total / report.requests.max(1) as f64;
    route_times.sort_unstable();
    let pct = |p: f64| {
        route_times
            .get(((route_times.len().max(1) - 1) as f64 * p) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    report.route_us_p50 = pct(0.5);
    report.route_us_p99 = pct(0.99);
    report.index_entries = router.index().current_size();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::config::RouterMode;

    fn trace() -> Vec<TraceRequest> {
        // 7 conversations of 6 turns each (7: round-robin must not line up with 4 workers by luck): every turn extends the previous prompt.
        let mut out = Vec::new();
        let mut next_id = 100;
        for turn in 0..6u64 {
            for conv in 0..7u64 {
                let mut ids: Vec<u64> = (0..=turn).map(|t| conv * 10 + t).collect();
                ids.push(next_id);
                next_id += 1;
                out.push(TraceRequest {
                    timestamp: turn * 10_000 + conv * 100,
                    input_length: ids.len() * 512 - 100,
                    output_length: 20,
                    hash_ids: ids,
                });
            }
        }
        out
    }

    fn run(mode: RouterMode) -> SimReport {
        let cfg = SimConfig {
            workers: 4,
            block_size: 64,
            capacity_blocks: 4096,
            router: RouterConfig {
                mode,
                ..Default::default()
            },
            time_scale: 1.0,
            seed: 1,
        };
        simulate(&trace(), &cfg)
    }

    #[test]
    fn kv_mode_finds_the_conversation_history_and_round_robin_mostly_does_not() {
        let kv = run(RouterMode::Kv);
        let rr = run(RouterMode::RoundRobin);
        assert_eq!((kv.requests, rr.requests, kv.routing_errors), (42, 42, 0));
        // Turn k of a conversation can reuse k of its k+1... blocks: ideal ≈ 0.55 here.
        assert!(kv.hit_rate > 0.5, "kv {}", kv.hit_rate);
        assert!(
            rr.hit_rate < kv.hit_rate - 0.2,
            "rr {} vs kv {}",
            rr.hit_rate,
            kv.hit_rate
        );
        // With events, the router's prediction is the engines' truth.
        assert!((kv.predicted_hit_rate - kv.hit_rate).abs() < 1e-9);
        assert!(kv.ttft_ms_mean < rr.ttft_ms_mean);
        assert_eq!(kv.workers.iter().map(|w| w.requests).sum::<u64>(), 42);
    }
}
