//! Which worker ranks hold which prompt prefixes.
//!
//! * [`KvIndex`] — exact, fed by the engines' KV events (spec §4.1).
//! * [`ApproxIndex`] — fed by the router's own decisions, with TTL expiry and size pruning; also
//!   serves as the short-TTL *predicted* side index merged with the exact one (spec §4.3).
//! * [`TieredIndex`] — one exact index per storage tier, for host/disk cache credit (spec §6.2).
//! * [`shared_index`] — the exact index with one writer and wait-free concurrent readers.

mod approx;
mod blockmap;
mod radix;
mod shared;
mod tiered;

pub use approx::{ApproxConfig, ApproxIndex};
pub use radix::{removed_event, stored_event, KvIndex};
pub use shared::{shared_index, ErrorSink, IndexOp, IndexReader, SharedIndexWriter};
pub use tiered::{TierOverlap, TieredIndex};

use crate::event::WorkerWithDpRank;
use crate::hash::ExternalHash;

/// Hash map with a fast, per-process seeded hasher (foldhash). Keys here are mostly hashes
/// already, but they come from engines and prompts, so the map must not trust their bits.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Hint the CPU to start loading `x`'s first cache line (a no-op off x86-64).
#[inline]
pub(crate) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; the address is a valid reference and is not dereferenced.
    unsafe {
        std::arch::x86_64::_mm_prefetch(
            (x as *const T).cast::<i8>(),
            std::arch::x86_64::_MM_HINT_T0,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Per worker rank: number of contiguous leading query blocks it holds. Ranks holding none are
/// absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: Vec<(WorkerWithDpRank, u32)>,
}

impl OverlapScores {
    /// Score of one rank (0 if absent).
    pub fn get(&self, worker: WorkerWithDpRank) -> u32 {
        self.scores
            .iter()
            .find(|(w, _)| *w == worker)
            .map_or(0, |(_, s)| *s)
    }

    /// Highest score of any rank.
    pub fn max(&self) -> u32 {
        self.scores.iter().map(|(_, s)| *s).max().unwrap_or(0)
    }

    /// Merge another answer by per-rank maximum (exact ∪ predicted, spec §4.3).
    pub fn merge_max(&mut self, other: &OverlapScores) {
        for &(w, s) in &other.scores {
            match self.scores.iter_mut().find(|(x, _)| *x == w) {
                Some((_, cur)) => *cur = (*cur).max(s),
                None => self.scores.push((w, s)),
            }
        }
    }

    /// Sorted by rank, for stable output and comparisons.
    pub fn sorted(mut self) -> Self {
        self.scores.sort_unstable();
        self
    }
}

/// Why an event could not be (fully) applied. Callers count these; none of them corrupts the
/// index or other workers' state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A store named a parent this rank does not hold (never stored, removed, or cleared): the
    /// whole store is skipped, as in Dynamo.
    #[error("worker {worker}: parent block {parent:?} not found; store skipped")]
    ParentBlockNotFound {
        worker: WorkerWithDpRank,
        parent: ExternalHash,
    },
    /// Removals named hashes this rank does not hold; the others were applied.
    #[error("worker {worker}: {missing} removed block(s) not found")]
    BlockNotFound {
        worker: WorkerWithDpRank,
        missing: usize,
    },
    /// A store whose parent is one of its own blocks, or that repeats a block hash.
    #[error("worker {worker}: self-referencing store skipped")]
    InvalidBlockSequence { worker: WorkerWithDpRank },
}

impl IndexError {
    /// Short label for metrics (`parent_not_found`, `block_not_found`, `invalid_sequence`).
    pub fn label(&self) -> &'static str {
        match self {
            IndexError::ParentBlockNotFound { .. } => "parent_not_found",
            IndexError::BlockNotFound { .. } => "block_not_found",
            IndexError::InvalidBlockSequence { .. } => "invalid_sequence",
        }
    }
}
