//! An engine-like KV event stream for index benchmarks: `workers` engines, each an LRU block
//! cache ([`SimWorkerCache`]) evicting leaves first with one `Removed` per block; requests take
//! one of `prefixes` shared system prompts of `prefix_blocks` blocks plus a unique suffix, go
//! to a random worker, which publishes one `Stored` for the blocks it lacked.

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{compute_sequence_hashes, LocalBlockHash};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::cache::SimWorkerCache;

/// Shape of the fleet and its requests.
#[derive(Clone, Debug)]
pub struct Workload {
    pub workers: u64,
    /// Cache capacity per worker, in blocks.
    pub capacity: usize,
    pub prefixes: u64,
    pub prefix_blocks: usize,
    /// Unique suffix length range in blocks (inclusive).
    pub suffix_blocks: (usize, usize),
}

/// The fleets the router-core benchmarks use (issue #2): `("64w", …)` has 64 workers and about
/// 262 k `(block, worker)` entries once warm, `("256w", …)` 256 workers and about 1.05 M;
/// 4,096-block caches, 32-block system prompts plus 1–32 unique blocks.
pub fn index_scenarios() -> Vec<(&'static str, Workload)> {
    let w = |workers, prefixes| Workload {
        workers,
        capacity: 4096,
        prefixes,
        prefix_blocks: 32,
        suffix_blocks: (1, 32),
    };
    vec![("64w", w(64, 64)), ("256w", w(256, 128))]
}

/// Long prompts for 512-block lookups: 64 workers with 8,192-block caches, 256-block system
/// prompts plus 1–256 unique blocks.
pub fn long_prompt_scenario() -> Workload {
    Workload {
        workers: 64,
        capacity: 8192,
        prefixes: 32,
        prefix_blocks: 256,
        suffix_blocks: (1, 256),
    }
}

/// A generated stream.
pub struct EventStream {
    /// Events until every cache is (nearly) full: apply untimed.
    pub warmup: Vec<RouterEvent>,
    /// Steady-state events after warm-up: what to time.
    pub steady: Vec<RouterEvent>,
    /// Local hashes of each steady-state request (for lookups).
    pub chains: Vec<Vec<LocalBlockHash>>,
}

/// Generate warm-up events plus `steady_events` steady-state events, deterministically from `seed`.
pub fn generate(w: &Workload, steady_events: usize, seed: u64) -> EventStream {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut caches: Vec<SimWorkerCache> = (0..w.workers)
        .map(|id| SimWorkerCache::new(WorkerWithDpRank::new(id, 0), w.capacity))
        .collect();
    let mut unique = 1u64 << 40;
    let (mut warmup, mut steady, mut chains) = (Vec::new(), Vec::new(), Vec::new());
    let mut filled = false;
    while steady.len() < steady_events {
        let p = rng.random_range(0..w.prefixes);
        let n_suffix = rng.random_range(w.suffix_blocks.0..=w.suffix_blocks.1);
        let mut local: Vec<LocalBlockHash> = (0..w.prefix_blocks as u64)
            .map(|i| LocalBlockHash((p << 20) | i))
            .collect();
        local.extend((0..n_suffix).map(|_| {
            unique += 1;
            LocalBlockHash(unique)
        }));
        let seq = compute_sequence_hashes(&local);
        let wid = rng.random_range(0..w.workers) as usize;
        caches[wid].serve(&local, &seq, if filled { &mut steady } else { &mut warmup });
        if filled {
            chains.push(local);
        } else {
            filled = caches.iter().all(|c| c.cache.len() + 64 >= w.capacity);
        }
    }
    EventStream {
        warmup,
        steady,
        chains,
    }
}
