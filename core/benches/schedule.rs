//! Routing one request with N worker ranks: what `Scheduler::schedule` (overlaps, candidates,
//! cost, selection, booking) and `free` cost together, in KV mode at temperature 0 (the
//! default), without events (the exact index's overlaps are given).
//!
//! `cargo bench -p kvrouter-core --bench schedule`. Half the ranks carry a booking, a few
//! hold part of the prompt, so costs differ and most ranks still tie (idle ones).
//!
//! `schedule_and_free_cold` first overwrites 4 MiB (twice this machine's per-core L2), as the
//! server's other work (HTTP, event apply) does between two requests: the ranks' state is read
//! from L3 or memory, not L1.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use kvrouter_core::hash::HashOptions;
use kvrouter_core::index::TierOverlap;
use kvrouter_core::{
    RequestHashes, RouterConfig, RouterMode, ScheduleRequest, Scheduler, WorkerInfo,
    WorkerWithDpRank,
};
use rand::{rngs::SmallRng, SeedableRng};

const BLOCK: usize = 64;

fn scheduler(n: u64) -> Scheduler {
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        ..Default::default()
    };
    let mut s = Scheduler::new(cfg, BLOCK);
    for w in 0..n {
        s.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(w, 0),
            ..Default::default()
        });
    }
    // Load on every other rank: a booked 1,024-token request each.
    for w in (0..n).step_by(2) {
        let t: Vec<u32> = (0..1024).map(|i| (w as u32) << 16 | i).collect();
        let h = RequestHashes::compute(&t, BLOCK, &HashOptions::default());
        let id = format!("bg{w}");
        let req = ScheduleRequest {
            request_id: Some(&id),
            isl: t.len(),
            pinned_worker: Some(w),
            dp_rank: None,
            overrides: None,
            pool: Default::default(),
            workers: None,
        };
        s.schedule(
            &req,
            &h,
            Vec::new(),
            Duration::ZERO,
            &mut SmallRng::seed_from_u64(w),
        )
        .unwrap();
    }
    s
}

fn bench(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..2048).collect();
    let hashes = RequestHashes::compute(&tokens, BLOCK, &HashOptions::default());
    let mut g = c.benchmark_group("schedule_and_free");
    for n in [16u64, 128, 1000] {
        let mut s = scheduler(n);
        // A few ranks hold part of the prompt.
        let exact: Vec<(WorkerWithDpRank, TierOverlap)> = (0..n.min(8))
            .map(|w| {
                let t = TierOverlap {
                    device: (w as u32 + 1) * 3,
                    ..Default::default()
                };
                (WorkerWithDpRank::new(w * 7 % n, 0), t)
            })
            .collect();
        let mut rng = SmallRng::seed_from_u64(1);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let req = ScheduleRequest {
                    request_id: Some("r"),
                    isl: tokens.len(),
                    pinned_worker: None,
                    dp_rank: None,
                    overrides: None,
                    pool: Default::default(),
                    workers: None,
                };
                let sel = s
                    .schedule(&req, &hashes, exact.clone(), Duration::ZERO, &mut rng)
                    .unwrap();
                s.free("r", Duration::ZERO).unwrap();
                sel.worker
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("schedule_and_free_cold");
    let mut scratch = vec![0u8; 4 << 20];
    for n in [128u64, 1000] {
        let mut s = scheduler(n);
        let exact: Vec<(WorkerWithDpRank, TierOverlap)> = (0..n.min(8))
            .map(|w| {
                let t = TierOverlap {
                    device: (w as u32 + 1) * 3,
                    ..Default::default()
                };
                (WorkerWithDpRank::new(w * 7 % n, 0), t)
            })
            .collect();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut round = 0u8;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched(
                || {
                    round = round.wrapping_add(1);
                    for x in scratch.iter_mut().step_by(64) {
                        *x = round;
                    }
                    exact.clone()
                },
                |exact| {
                    let req = ScheduleRequest {
                        request_id: Some("r"),
                        isl: tokens.len(),
                        pinned_worker: None,
                        dp_rank: None,
                        overrides: None,
                        pool: Default::default(),
                        workers: None,
                    };
                    let sel = s
                        .schedule(&req, &hashes, exact, Duration::ZERO, &mut rng)
                        .unwrap();
                    s.free("r", Duration::ZERO).unwrap();
                    sel.worker
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
