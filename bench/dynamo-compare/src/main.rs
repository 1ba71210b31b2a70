//! kvrouter's exact index against NVIDIA Dynamo 1.6.1's `RadixTree` (crate `dynamo-kv-router`,
//! the single-threaded index behind its `KvIndexer`), on the same engine-like event stream as
//! `cargo bench -p kvrouter-bench --bench core`, in one process.
//!
//! ```text
//! cd bench/dynamo-compare
//! taskset -c 1 cargo run --release -- speed [64w|256w|all] [rounds]   # apply + find_matches
//! cargo run --release -- memory [ours|dynamo] [64w|256w]               # heap + resident, one index
//! cargo run --release -- shared [rate] [full_events] [rate_seconds]    # the shared indexes (issue 14)
//! ```
//!
//! `shared` (see `shared.rs`) compares the frontend's shared index (one copy behind a
//! `RwLock`), the left-right pair it replaced, and Dynamo's `ConcurrentRadixTreeCompressed`:
//! memory per entry, and lookup latency while a writer thread applies events.
//!
//! This host's speed moves by 10–30 % from minute to minute, so `speed` alternates the two
//! indexes round by round and reports each round's ratio; the median ratio is the figure to
//! quote. Before timing, every lookup's answer from both indexes is compared: the run aborts if
//! they differ.
//!
//! Our simulated engines salt their block hashes per worker; Dynamo's tree cannot take a store
//! whose parent another worker wrote first under a different hash ("Failed to find parent
//! block"), so the salt is removed and both indexes get the identical, unsalted stream.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dynamo_kv_router::protocols as dyn_proto;
use dynamo_kv_router::RadixTree;
use kvrouter_bench::cache::engine_salt;
use kvrouter_bench::stream::{generate, index_scenarios, Workload};
use kvrouter_core::event::{KvCacheEventData, RouterEvent};
use kvrouter_core::hash::LocalBlockHash;
use kvrouter_core::index::KvIndex;

mod leftright;
mod shared;

/// mimalloc, counting live heap bytes: the memory comparison reads the bytes each index asked
/// for, which (unlike RSS) does not depend on when the allocator returns freed pages.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Off while `shared` times lookups on several threads: one counter written by every
/// allocation of every thread would add cache-line traffic to each lookup.
static COUNTING: AtomicBool = AtomicBool::new(true);

// SAFETY: forwards every call to mimalloc unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Relaxed) {
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            LIVE.fetch_add(new, Relaxed);
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    match arg(0, "speed").as_str() {
        "speed" => {
            let rounds: usize = match arg(2, "5").parse() {
                Ok(n) if n > 0 => n,
                _ => {
                    eprintln!("rounds: a number ≥ 1");
                    std::process::exit(2);
                }
            };
            for (name, w) in scenarios(&arg(1, "all")) {
                speed(name, &w, rounds);
            }
        }
        "memory" => {
            let which = arg(1, "ours");
            for (name, w) in scenarios(&arg(2, "64w")) {
                memory(name, &w, &which);
            }
        }
        "shared" => shared::run(&args[1..]),
        "shared-memory" => shared::memory_child(&arg(1, "ours")),
        other => {
            eprintln!("unknown mode {other:?}: speed [64w|256w|all] [rounds] | memory [ours|dynamo] [64w|256w] | shared [rate] [full_events] [rate_seconds]");
            std::process::exit(2);
        }
    }
}

fn scenarios(which: &str) -> Vec<(&'static str, Workload)> {
    let all = index_scenarios();
    let picked: Vec<_> = all
        .into_iter()
        .filter(|(n, _)| which == "all" || *n == which)
        .collect();
    if picked.is_empty() {
        eprintln!("unknown scenario {which:?}: 64w, 256w or all");
        std::process::exit(2);
    }
    picked
}

/// Our event with the simulated engine's per-worker salt removed.
fn unsalted(e: &RouterEvent) -> RouterEvent {
    let salt = engine_salt(e.worker());
    let mut e = e.clone();
    match &mut e.event.data {
        KvCacheEventData::Stored(s) => {
            if let Some(p) = &mut s.parent_hash {
                p.0 ^= salt;
            }
            for b in &mut s.blocks {
                b.block_hash.0 ^= salt;
            }
        }
        KvCacheEventData::Removed(r) => r.block_hashes.iter_mut().for_each(|h| h.0 ^= salt),
        KvCacheEventData::Cleared => {}
    }
    e
}

/// The same event as Dynamo's type: our serde shapes are Dynamo's JSON.
fn to_dynamo(e: &RouterEvent) -> dyn_proto::RouterEvent {
    let ev: dyn_proto::KvCacheEvent =
        serde_json::from_value(serde_json::to_value(&e.event).expect("serialise"))
            .expect("our KvCacheEvent JSON is Dynamo's");
    dyn_proto::RouterEvent::new(e.worker_id, ev)
}

struct Streams {
    warm: Vec<RouterEvent>,
    steady: Vec<RouterEvent>,
    dyn_warm: Vec<dyn_proto::RouterEvent>,
    dyn_steady: Vec<dyn_proto::RouterEvent>,
    chains: Vec<Vec<LocalBlockHash>>,
}

fn streams(w: &Workload, steady_events: usize, seed: u64) -> Streams {
    let s = generate(w, steady_events, seed);
    let warm: Vec<_> = s.warmup.iter().map(unsalted).collect();
    let steady: Vec<_> = s.steady.iter().map(unsalted).collect();
    Streams {
        dyn_warm: warm.iter().map(to_dynamo).collect(),
        dyn_steady: steady.iter().map(to_dynamo).collect(),
        warm,
        steady,
        chains: s.chains,
    }
}

fn build_ours(evs: &[RouterEvent]) -> KvIndex {
    let mut ix = KvIndex::new();
    for e in evs {
        ix.apply(e).expect("stream applies cleanly to kvrouter");
    }
    ix
}

fn build_dynamo(evs: &[dyn_proto::RouterEvent]) -> RadixTree {
    let mut t = RadixTree::new();
    for e in evs {
        t.apply_event(e.clone())
            .expect("stream applies cleanly to Dynamo");
    }
    t
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn speed(name: &str, w: &Workload, rounds: usize) {
    // Apply: three freshly warmed indexes (kvrouter event by event, kvrouter in batches,
    // Dynamo) take the steady stream in chunks, in turn, so that host noise falls on all three.
    let s = streams(w, 400_000, 1);
    const CHUNK: usize = 4096;
    let (mut ours, mut batched, mut dynamo, mut ratio, mut ratio_b) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut ix = build_ours(&s.warm);
        let mut ixb = build_ours(&s.warm);
        let mut tree = build_dynamo(&s.dyn_warm);
        let mut t = [Duration::ZERO; 3];
        for (k, (c, dc)) in s
            .steady
            .chunks(CHUNK)
            .zip(s.dyn_steady.chunks(CHUNK))
            .enumerate()
        {
            // Dynamo's `apply_event` takes its event by value (and drops it): that is its API,
            // so the copy is made before the clock starts.
            let mut owned = Some(dc.to_vec());
            for j in 0..3 {
                let started = Instant::now();
                match (k + j) % 3 {
                    0 => {
                        for e in c {
                            ix.apply(e).expect("steady stream applies cleanly");
                        }
                    }
                    1 => {
                        for b in c.chunks(256) {
                            ixb.apply_batch(b, |_, e| panic!("steady stream applies cleanly: {e}"));
                        }
                    }
                    _ => {
                        for e in owned.take().into_iter().flatten() {
                            tree.apply_event(e).expect("steady stream applies cleanly");
                        }
                    }
                }
                t[(k + j) % 3] += started.elapsed();
            }
        }
        let rate = |d: Duration| s.steady.len() as f64 / d.as_secs_f64() / 1e6;
        let (o, ob, d) = (rate(t[0]), rate(t[1]), rate(t[2]));
        println!(
            "apply {name} round {round}: kvrouter {o:.2} M events/s ({ob:.2} in batches of 256), Dynamo {d:.2} M events/s, ratio {:.2} ({:.2})",
            o / d,
            ob / d
        );
        ours.push(o);
        batched.push(ob);
        dynamo.push(d);
        ratio.push(o / d);
        ratio_b.push(ob / d);
    }
    println!(
        "SUMMARY apply {name}: medians over {rounds} rounds of {} events: kvrouter {:.2} M events/s, batched {:.2}, Dynamo {:.2}; ratio {:.2} (range {:.2}–{:.2}), batched {:.2}",
        s.steady.len(),
        median(&mut ours),
        median(&mut batched),
        median(&mut dynamo),
        median(&mut ratio),
        ratio.iter().copied().fold(f64::INFINITY, f64::min),
        ratio.iter().copied().fold(0.0, f64::max),
        median(&mut ratio_b),
    );

    // find_matches: both indexes warmed with the same stream, queried with recent requests'
    // chains padded to 64 blocks with unseen blocks (as the core bench does).
    let s = streams(w, 200_000, 2);
    let mut ix = build_ours(&s.warm);
    s.steady.iter().for_each(|e| {
        let _ = ix.apply(e);
    });
    let mut tree = build_dynamo(&s.dyn_warm);
    s.dyn_steady.iter().for_each(|e| {
        let _ = tree.apply_event(e.clone());
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let queries: Vec<Vec<LocalBlockHash>> = (0..20_000)
        .map(|_| {
            let recent = s.chains.len().min(5000) as u64;
            let ch = &s.chains[s.chains.len() - 1 - (next() % recent) as usize];
            let mut q: Vec<LocalBlockHash> = ch.iter().take(64).copied().collect();
            while q.len() < 64 {
                q.push(LocalBlockHash(next()));
            }
            q
        })
        .collect();
    let dyn_queries: Vec<Vec<dyn_proto::LocalBlockHash>> = queries
        .iter()
        .map(|q| q.iter().map(|h| dyn_proto::LocalBlockHash(h.0)).collect())
        .collect();
    for (q, dq) in queries.iter().zip(&dyn_queries) {
        let mut a: Vec<(u64, u32, u32)> = ix
            .find_matches(q, false)
            .scores
            .iter()
            .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
            .collect();
        let mut b: Vec<(u64, u32, u32)> = tree
            .find_matches(dq.clone(), false)
            .scores
            .iter()
            .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
            .collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "kvrouter and Dynamo disagree on a lookup");
    }
    let (mut t_ours, mut t_dyn) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        for (chunk, dchunk) in queries.chunks(1000).zip(dyn_queries.chunks(1000)) {
            for q in chunk {
                let t = Instant::now();
                std::hint::black_box(ix.find_matches(std::hint::black_box(q), false));
                t_ours.push(t.elapsed());
            }
            let owned: Vec<_> = dchunk.to_vec();
            for q in owned {
                let t = Instant::now();
                std::hint::black_box(tree.find_matches(std::hint::black_box(q), false));
                t_dyn.push(t.elapsed());
            }
        }
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
    };
    let (o50, o99) = (pct(&mut t_ours, 0.5), pct(&mut t_ours, 0.99));
    let (d50, d99) = (pct(&mut t_dyn, 0.5), pct(&mut t_dyn, 0.99));
    println!(
        "SUMMARY find_matches {name}/64: kvrouter p50 {o50:.2} µs, p99 {o99:.2} µs; Dynamo p50 {d50:.2} µs, p99 {d99:.2} µs; p99 ratio {:.2} ({} queries, answers identical)",
        o99 / d99,
        t_ours.len(),
    );
}

// mimalloc's own entry point (linked through the `mimalloc` crate): with `force`, frees what
// it can and gives free pages back to the OS, so RSS is live memory plus allocator overhead.
extern "C" {
    fn mi_collect(force: bool);
}

fn collect_free_pages() {
    // SAFETY: no arguments beyond a flag; safe to call at any time from any thread.
    unsafe { mi_collect(true) }
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Heap bytes held by one index built from the warm-up stream (live allocations after the build
/// minus before, allocator overhead excluded), and its resident memory: RSS growth with
/// mimalloc's free pages given back to the OS before and after the build, so that neither
/// index is helped by pages the stream generator freed nor charged for pages freed while
/// it grew (what is left is live memory plus allocator overhead).
fn memory(name: &str, w: &Workload, which: &str) {
    let s = streams(w, 1, 1);
    collect_free_pages();
    let (before, rss_before) = (LIVE.load(Relaxed), rss_bytes());
    let (entries, live, rss) = match which {
        "ours" => {
            let ix = build_ours(&s.warm);
            collect_free_pages();
            let r = (ix.current_size(), LIVE.load(Relaxed), rss_bytes());
            drop(ix);
            r
        }
        "dynamo" => {
            let t = build_dynamo(&s.dyn_warm);
            collect_free_pages();
            let r = (t.current_size(), LIVE.load(Relaxed), rss_bytes());
            drop(t);
            r
        }
        other => {
            eprintln!("unknown index {other:?}: ours or dynamo");
            std::process::exit(2);
        }
    };
    let per = |b: usize| b as f64 / entries as f64;
    println!(
        "SUMMARY memory {name} {which}: {entries} entries, heap {:.1} MB = {:.1} B/entry, resident {:.1} B/entry",
        (live - before) as f64 / 1e6,
        per(live - before),
        per(rss.saturating_sub(rss_before)),
    );
}
