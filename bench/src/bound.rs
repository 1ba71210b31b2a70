//! What no router can beat by much: the prefix-cache hit rate of one pooled LRU block cache as
//! big as the whole fleet (workers × blocks per worker), and of an infinite cache, over the
//! same request sequence.
//!
//! Prompts are hashed as the router and engines hash them (kvrouter-core's
//! `compute_block_hashes` + `compute_sequence_hashes`, full blocks only). As in vLLM and the
//! mock engine, a hit covers at most `⌊(len − 1) / block_size⌋` blocks (the last prompt token
//! is always computed). Output tokens are not cached in the bound (a pooled cache that only
//! keeps prompts is, if anything, more generous), and there is no concurrency: each request's
//! blocks are used and inserted before the next request looks.

use std::collections::HashSet;

use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes, HashOptions};
use serde::{Deserialize, Serialize};

use crate::cache::LruBlockCache;

/// The bound's figures. Hit rates are Σ hit tokens / Σ prompt tokens, in 0–1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// One LRU cache of `capacity_blocks` blocks (the fleet's total).
    pub pooled_lru_hit_rate: f64,
    /// A cache that never evicts.
    pub infinite_hit_rate: f64,
    /// Capacity of the pooled cache, blocks.
    pub capacity_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Σ prompt tokens over the sequence.
    pub prompt_tokens: u64,
}

/// Replay `prompts` (anything that views as token ids: slices, or vectors made one at a time)
/// in order through a pooled LRU cache of `capacity_blocks` blocks of
/// `block_size` tokens and through an infinite cache. Panics if `block_size` is 0.
pub fn bound<P: AsRef<[u32]>>(
    prompts: impl IntoIterator<Item = P>,
    block_size: usize,
    capacity_blocks: usize,
) -> Bound {
    assert!(block_size > 0, "block size must be > 0");
    let mut lru = LruBlockCache::new(capacity_blocks);
    let mut seen = HashSet::new();
    let (mut total, mut lru_hit, mut inf_hit) = (0u64, 0u64, 0u64);
    for prompt in prompts {
        let prompt = prompt.as_ref();
        let local = compute_block_hashes(prompt, block_size, &HashOptions::default(), None);
        let seq = compute_sequence_hashes(&local);
        let max_hit = prompt.len().saturating_sub(1) / block_size;
        total += prompt.len() as u64;
        lru_hit += (lru.touch(&seq).hit_blocks.min(max_hit) * block_size) as u64;
        let inf = seq.iter().take_while(|s| seen.contains(*s)).count();
        inf_hit += (inf.min(max_hit) * block_size) as u64;
        seen.extend(seq.iter().copied());
    }
    let rate = |hit: u64| {
        if total == 0 {
            0.0
        } else {
            hit as f64 / total as f64
        }
    };
    Bound {
        pooled_lru_hit_rate: rate(lru_hit),
        infinite_hit_rate: rate(inf_hit),
        capacity_blocks,
        block_size,
        prompt_tokens: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `blocks` blocks of 4 tokens, block `i` made of token `ids[i]` repeated.
    fn p(ids: &[u32], tail: usize) -> Vec<u32> {
        let mut v: Vec<u32> = ids.iter().flat_map(|&i| [i; 4]).collect();
        v.extend(std::iter::repeat_n(999, tail));
        v
    }

    #[test]
    fn hand_checked_toy_trace() {
        // Block size 4, pooled capacity 3 blocks. Blocks named by their token; a prefix chain
        // is what is cached (A, AB, ABC are different blocks from B, BC …).
        let trace = [
            p(&[1, 2], 1),    // 9 tokens: [A B] + 1; miss. LRU {A, AB}
            p(&[1, 2, 3], 0), // 12 tokens: hit A, AB (8); LRU {A, AB, ABC}
            p(&[1, 2, 3], 0), // 12: hit capped at ⌊11/4⌋ = 2 blocks (8). LRU unchanged
            p(&[4], 2),       // 6: miss; inserts D, evicts the LRU leaf ABC. LRU {A, AB, D}
            p(&[1, 2, 3], 1), // 13: LRU hits A, AB (8), ABC was evicted; infinite hits 3 (12).
            // LRU inserts ABC, evicts D.
            p(&[4], 0), // 4: max hit ⌊3/4⌋ = 0 blocks, both 0. Reinserts D.
        ];
        let b = bound(trace.iter().map(Vec::as_slice), 4, 3);
        assert_eq!(b.prompt_tokens, 9 + 12 + 12 + 6 + 13 + 4);
        let lru = 8 + 8 + 8;
        let inf = 8 + 8 + 12;
        assert_eq!(b.pooled_lru_hit_rate, lru as f64 / 56.0);
        assert_eq!(b.infinite_hit_rate, inf as f64 / 56.0);

        // A big enough pool equals the infinite cache; a one-block pool still reuses A.
        let big = bound(trace.iter().map(Vec::as_slice), 4, 100);
        assert_eq!(big.pooled_lru_hit_rate, big.infinite_hit_rate);
        let tiny = bound(trace.iter().map(Vec::as_slice), 4, 1);
        assert!(tiny.pooled_lru_hit_rate < b.pooled_lru_hit_rate);
        assert_eq!(
            bound(std::iter::empty::<&[u32]>(), 4, 3).pooled_lru_hit_rate,
            0.0
        );
    }
}
