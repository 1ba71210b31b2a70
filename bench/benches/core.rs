//! Router-core benchmarks: hashing, index apply on an engine-like event stream, find_matches
//! latency (p50/p99), selection over 256 workers.
//!
//! `cargo bench -p kvrouter-bench --bench core` runs everything; pass a filter (`apply`, `find`,
//! `hash`, `select`) to run part. Besides Criterion's own report, the apply and find groups
//! print one summary line each (events/s, blocks/s, p50/p99, bytes per indexed block) for
//! `docs/benchmarks.md`. Apply is timed event by event (`apply/event/*`) and in batches of 256
//! through `KvIndex::apply_batch` (`apply/batch256/*`), which the server's index writer uses.
//!
//! The event stream: `W` workers, each an LRU block cache of `C` blocks that evicts leaves first
//! (vLLM frees a request's blocks tail first) and publishes one `Removed` per evicted block;
//! requests share one of `P` system prompts and add a unique suffix, go to a random worker, and
//! the worker publishes one `Stored` for the blocks it did not hold.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvrouter_bench::stats::percentile;
use kvrouter_bench::stream::{generate, index_scenarios, long_prompt_scenario, EventStream};
use kvrouter_core::config::{RouterConfig, RouterMode};
use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{compute_block_hashes, HashOptions, LocalBlockHash};
use kvrouter_core::index::{KvIndex, TierOverlap};
use kvrouter_core::selection::{Candidate, SelectionRequest, Selector, WorkerInfo};
use kvrouter_core::sequences::PotentialLoad;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// The allocator the `kvrouter` binary ships with: index stores and lookup answers allocate,
// so measure them as deployed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per `apply_batch` call in the batched runs.
const BATCH: usize = 256;

fn build(stream: &EventStream) -> KvIndex {
    let mut ix = KvIndex::new();
    for ev in &stream.warmup {
        ix.apply(ev).expect("generated stream is consistent");
    }
    ix
}

fn blocks_in(evs: &[RouterEvent]) -> usize {
    evs.iter().map(RouterEvent::num_blocks).sum()
}

fn bench_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for (name, w) in index_scenarios() {
        let stream = generate(&w, 400_000, 1);
        let ix = build(&stream);
        let steady_blocks = blocks_in(&stream.steady);
        // One summary run each: the whole steady stream on a warmed index, event by event and
        // in batches of 256 (as the server's index writer takes what queued up).
        let mut ix2 = build(&stream);
        let mut errors = 0usize;
        let t = Instant::now();
        for ev in &stream.steady {
            errors += usize::from(black_box(ix2.apply(ev)).is_err());
        }
        let dt = t.elapsed().as_secs_f64();
        let mut ix3 = build(&stream);
        let t = Instant::now();
        for batch in stream.steady.chunks(BATCH) {
            ix3.apply_batch(batch, |_, _| errors += 1);
        }
        let dt_batch = t.elapsed().as_secs_f64();
        drop((ix2, ix3));
        assert_eq!(errors, 0, "generated stream must apply cleanly");
        println!(
            "SUMMARY apply {name}: {} workers, {} entries, {} nodes, {:.1} bytes/entry; {:.2} M events/s, {:.2} M blocks/s, batched {:.2} M events/s ({} events, {:.2} blocks/event)",
            w.workers,
            ix.current_size(),
            ix.num_blocks(),
            ix.memory_bytes() as f64 / ix.current_size() as f64,
            stream.steady.len() as f64 / dt / 1e6,
            steady_blocks as f64 / dt / 1e6,
            stream.steady.len() as f64 / dt_batch / 1e6,
            stream.steady.len(),
            steady_blocks as f64 / stream.steady.len() as f64,
        );
        drop(ix);
        g.throughput(Throughput::Elements(1));
        // Criterion asks for `iters` events: replay the steady stream on fresh warmed indexes.
        let mut timed = |id: &str, apply: &dyn Fn(&mut KvIndex, &[RouterEvent])| {
            g.bench_function(BenchmarkId::new(id, name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters as usize;
                    while left > 0 {
                        let mut ix = build(&stream);
                        let n = left.min(stream.steady.len());
                        let t = Instant::now();
                        apply(&mut ix, &stream.steady[..n]);
                        total += t.elapsed();
                        left -= n;
                    }
                    total
                })
            });
        };
        timed("event", &|ix, evs| {
            for ev in evs {
                let _ = black_box(ix.apply(ev));
            }
        });
        timed("batch256", &|ix, evs| {
            for batch in evs.chunks(BATCH) {
                ix.apply_batch(batch, |_, e| {
                    black_box(e);
                });
            }
        });
    }
    g.finish();
}

fn bench_find(c: &mut Criterion) {
    let mut g = c.benchmark_group("find_matches");
    let mut rng = SmallRng::seed_from_u64(9);
    let mut cases = Vec::new();
    for (name, w) in index_scenarios() {
        let stream = generate(&w, 200_000, 2);
        let mut ix = build(&stream);
        for ev in &stream.steady {
            let _ = ix.apply(ev);
        }
        cases.push((format!("{name}/64"), ix, stream.chains, 64usize));
    }
    // Long prompts for 512-block queries.
    let stream = generate(&long_prompt_scenario(), 100_000, 3);
    let mut ix = build(&stream);
    for ev in &stream.steady {
        let _ = ix.apply(ev);
    }
    cases.push(("64w/512".to_string(), ix, stream.chains, 512));

    for (name, ix, chains, len) in &cases {
        // Queries: recent requests' chains, padded with fresh blocks to `len`.
        let queries: Vec<Vec<LocalBlockHash>> = (0..20_000)
            .map(|_| {
                let ch = &chains[chains.len() - 1 - rng.random_range(0..chains.len().min(5000))];
                let mut q: Vec<LocalBlockHash> = ch.iter().take(*len).copied().collect();
                while q.len() < *len {
                    q.push(LocalBlockHash(rng.random()));
                }
                q
            })
            .collect();
        let mut times: Vec<f64> = Vec::with_capacity(queries.len());
        let mut matched = 0u64;
        for _ in 0..3 {
            for q in &queries {
                let t = Instant::now();
                let s = black_box(ix.find_matches(black_box(q), false));
                times.push(t.elapsed().as_secs_f64() * 1e6);
                matched += u64::from(s.max());
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "SUMMARY find_matches {name}: p50 {:.2} µs, p99 {:.2} µs, mean best overlap {:.1} blocks",
            percentile(&times, 50.0).unwrap_or(f64::NAN),
            percentile(&times, 99.0).unwrap_or(f64::NAN),
            matched as f64 / times.len() as f64,
        );
        let mut i = 0;
        g.bench_function(BenchmarkId::new("query", name), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                black_box(ix.find_matches(&queries[i], false))
            })
        });
    }
    g.finish();
}

fn bench_hash(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..32_768u32)
        .map(|i| i.wrapping_mul(2654435761) % 151_000)
        .collect();
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    for bs in [16usize, 64] {
        g.bench_function(BenchmarkId::new("local+sequence/32k_tokens", bs), |b| {
            b.iter(|| {
                let l = compute_block_hashes(black_box(&tokens), bs, &HashOptions::default(), None);
                black_box(kvrouter_core::hash::compute_sequence_hashes(&l))
            })
        });
    }
    g.finish();
}

fn bench_select(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(5);
    let candidates: Vec<Candidate> = (0..256u64)
        .map(|id| {
            let worker = WorkerWithDpRank::new(id, 0);
            Candidate {
                info: WorkerInfo {
                    worker,
                    ..Default::default()
                },
                overlap: TierOverlap {
                    device: rng.random_range(0..64),
                    ..Default::default()
                },
                load: PotentialLoad {
                    worker,
                    potential_decode_blocks: rng.random_range(0..4000),
                    active_prefill_tokens: rng.random_range(0..8192),
                    active_requests: rng.random_range(0..64),
                    ..Default::default()
                },
            }
        })
        .collect();
    let mut g = c.benchmark_group("select");
    for mode in [
        RouterMode::Kv,
        RouterMode::LeastLoaded,
        RouterMode::RoundRobin,
    ] {
        for temp in [0.0, 0.5] {
            if mode != RouterMode::Kv && temp > 0.0 {
                continue;
            }
            let mut cfg = RouterConfig {
                mode,
                ..Default::default()
            };
            cfg.kv.router_temperature = temp;
            let mut s = Selector::new(cfg);
            let req = SelectionRequest {
                isl: 4096,
                block_size: 64,
                ..Default::default()
            };
            g.bench_function(BenchmarkId::new(format!("256w/{mode}"), temp), |b| {
                b.iter(|| black_box(s.select(black_box(&candidates), &req, &mut rng)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_hash, bench_apply, bench_find, bench_select);
criterion_main!(benches);
