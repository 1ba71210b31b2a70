//! Apply a pre-generated engine-like event stream in a loop, for `perf record` / `perf stat`.
//! `cargo run --release -p kvrouter-bench --example apply_profile -- [workers] [rounds] [dump.jsonl]`
//!
//! Also prints the resident-memory growth of building the index from the warm-up events (with
//! allocator overhead, unlike `KvIndex::memory_bytes`; glibc's free memory trimmed before and
//! after, and the untrimmed figure beside it). With a third argument the warm-up events
//! are written as `{"worker_id", "event"}` JSON lines, to replay into another index (e.g.
//! Dynamo's `RadixTree`) and compare.
use std::time::Instant;

use kvrouter_bench::stream::{generate, EventStream, Workload};
use kvrouter_core::index::KvIndex;

fn main() {
    let dump = std::env::args().nth(3);
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .take(2)
        .filter_map(|a| a.parse().ok())
        .collect();
    let workers = args.first().copied().unwrap_or(64);
    let rounds = args.get(1).copied().unwrap_or(5);
    let w = Workload {
        workers,
        capacity: 4096,
        prefixes: 64,
        prefix_blocks: 32,
        suffix_blocks: (1, 32),
    };
    let EventStream {
        warmup: warm,
        steady,
        ..
    } = generate(&w, 400_000, 1);
    if let Some(path) = dump {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&path).expect("create dump file"));
        for e in &warm {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({"worker_id": e.worker_id, "event": e.event}),
            )
            .unwrap();
            std::io::Write::write_all(&mut out, b"\n").unwrap();
        }
    }
    trim_free_memory();
    let before = rss_bytes();
    let mut ix = KvIndex::new();
    for e in &warm {
        ix.apply(e).unwrap();
    }
    let untrimmed = rss_bytes().saturating_sub(before);
    trim_free_memory();
    let grown = rss_bytes().saturating_sub(before);
    let per = |b: u64| b as f64 / ix.current_size() as f64;
    println!(
        "{workers} workers: {} entries, RSS +{:.1} MB = {:.1} B/entry ({:.1} before malloc_trim; estimate {:.1})",
        ix.current_size(),
        grown as f64 / 1e6,
        per(grown),
        per(untrimmed),
        ix.memory_bytes() as f64 / ix.current_size() as f64
    );
    drop(ix);
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let mut ix = KvIndex::new();
        for e in &warm {
            ix.apply(e).unwrap();
        }
        let t = Instant::now();
        apply_steady(&mut ix, &steady);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{workers} workers: best of {rounds}: {:.2} M events/s",
        steady.len() as f64 / best / 1e6
    );
}

/// The timed part, out of line so that `valgrind --tool=callgrind --toggle-collect='*apply_steady*'`
/// counts it alone.
#[inline(never)]
fn apply_steady(ix: &mut KvIndex, events: &[kvrouter_core::event::RouterEvent]) {
    for e in events {
        ix.apply(e).unwrap();
    }
}

/// Give glibc's free memory back to the OS, so that RSS growth is what the index holds: the
/// generator's freed memory would otherwise be reused, and the per-worker maps' growth steps
/// leave about as much free memory behind as they hold.
fn trim_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes a size and only releases free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Resident set size from `/proc/self/statm` (Linux), in bytes; 0 elsewhere.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}
