//! A worker's prefix cache as an engine keeps it: full blocks keyed by their prefix (sequence
//! hash), least recently used evicted first, leaves before their parents (vLLM frees a request's
//! blocks tail first, so a parent is always used at least as recently as its children).
//!
//! [`SimWorkerCache`] adds what the engine publishes: one `Stored` per request for the blocks it
//! did not hold, and one `Removed` per evicted block, with engine hashes that are *not* the
//! router's (a per-worker salt), so whoever consumes the events must treat them as opaque.
//!
//! This is not an engine model: no batching, no timing, no concurrency. It generates event
//! streams for the index benchmarks ([`crate::stream`], `bench/dynamo-compare`) and is the
//! pooled cache of the bound ([`crate::bound`]). Routing figures come from the mocker's own
//! engine, in [`crate::replay`] or live.

use std::collections::BTreeMap;

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{ExternalHash, LocalBlockHash, SequenceHash};
use kvrouter_core::index::{removed_event, stored_event};

/// Outcome of touching a request's blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touch {
    /// Leading blocks that were already cached (the prefix-cache hit).
    pub hit_blocks: usize,
    /// Blocks evicted to make room, oldest first.
    pub evicted: Vec<SequenceHash>,
}

/// LRU block cache with leaves-first eviction. Capacity in blocks.
#[derive(Clone, Debug)]
pub struct LruBlockCache {
    capacity: usize,
    last_use: std::collections::HashMap<SequenceHash, u64>,
    by_use: BTreeMap<u64, SequenceHash>,
    clock: u64,
}

impl LruBlockCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            last_use: Default::default(),
            by_use: BTreeMap::new(),
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Leading blocks of `seq` cached now, without touching them.
    pub fn hit_blocks(&self, seq: &[SequenceHash]) -> usize {
        seq.iter()
            .take_while(|s| self.last_use.contains_key(s))
            .count()
    }

    /// Use a request's blocks: hits are refreshed, misses inserted, and the least recently used
    /// leaves evicted while over capacity. A request longer than the cache keeps its first
    /// `capacity` blocks.
    pub fn touch(&mut self, seq: &[SequenceHash]) -> Touch {
        let hit_blocks = self.hit_blocks(seq);
        let seq = &seq[..seq.len().min(self.capacity)];
        // Later touches newer; within one touch the parent newer than its child.
        for (i, s) in seq.iter().enumerate() {
            let stamp = self.clock + (seq.len() - i) as u64;
            if let Some(old) = self.last_use.insert(*s, stamp) {
                self.by_use.remove(&old);
            }
            self.by_use.insert(stamp, *s);
        }
        self.clock += seq.len() as u64 + 1;
        let mut evicted = Vec::new();
        while self.last_use.len() > self.capacity {
            let Some((&t, &victim)) = self.by_use.iter().next() else {
                break;
            };
            self.by_use.remove(&t);
            self.last_use.remove(&victim);
            evicted.push(victim);
        }
        Touch {
            hit_blocks,
            evicted,
        }
    }

    /// Drop everything.
    pub fn clear(&mut self) {
        self.last_use.clear();
        self.by_use.clear();
    }
}

/// The salt a simulated engine XORs into its sequence hashes to make its engine hashes: undo it
/// to feed an index that needs every worker to hash alike (Dynamo's `RadixTree`).
pub fn engine_salt(worker: WorkerWithDpRank) -> u64 {
    crate::trace::splitmix64(worker.worker_id ^ (u64::from(worker.dp_rank) << 48) ^ 0x5eed)
}

/// A simulated engine's cache that publishes KV events for one worker rank.
#[derive(Clone, Debug)]
pub struct SimWorkerCache {
    pub worker: WorkerWithDpRank,
    pub cache: LruBlockCache,
    salt: u64,
    next_event_id: u64,
}

impl SimWorkerCache {
    pub fn new(worker: WorkerWithDpRank, capacity_blocks: usize) -> Self {
        Self {
            worker,
            cache: LruBlockCache::new(capacity_blocks),
            salt: engine_salt(worker),
            next_event_id: 0,
        }
    }

    /// The engine's own (opaque) hash for a block.
    pub fn engine_hash(&self, s: SequenceHash) -> ExternalHash {
        ExternalHash(s.0 ^ self.salt)
    }

    /// Serve a request's prompt blocks: returns the prefix hit in blocks, and appends to
    /// `events` what the engine publishes (removals first, then one store), as vLLM orders
    /// them within a step.
    pub fn serve(
        &mut self,
        local: &[LocalBlockHash],
        seq: &[SequenceHash],
        events: &mut Vec<RouterEvent>,
    ) -> usize {
        let touch = self.cache.touch(seq);
        for victim in &touch.evicted {
            events.push(removed_event(
                self.worker,
                self.next_event_id,
                vec![self.engine_hash(*victim)],
            ));
            self.next_event_id += 1;
        }
        let stored = seq.len().min(self.cache.capacity());
        if touch.hit_blocks < stored {
            let parent = touch
                .hit_blocks
                .checked_sub(1)
                .map(|i| self.engine_hash(seq[i]));
            let blocks = (touch.hit_blocks..stored).map(|i| (self.engine_hash(seq[i]), local[i]));
            events.push(stored_event(
                self.worker,
                self.next_event_id,
                parent,
                blocks,
            ));
            self.next_event_id += 1;
        }
        touch.hit_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes, HashOptions};
    use kvrouter_core::index::KvIndex;

    fn chain(seed: u32, blocks: usize) -> (Vec<LocalBlockHash>, Vec<SequenceHash>) {
        let tokens: Vec<u32> = (0..blocks as u32 * 4).map(|i| seed * 1000 + i).collect();
        let l = compute_block_hashes(&tokens, 4, &HashOptions::default(), None);
        let s = compute_sequence_hashes(&l);
        (l, s)
    }

    #[test]
    fn evicts_least_recent_leaves_first() {
        let mut c = LruBlockCache::new(5);
        let (_, a) = chain(1, 3);
        let (_, b) = chain(2, 3);
        assert_eq!(c.touch(&a).hit_blocks, 0);
        // b needs 3 blocks: one of a's goes, and it is a's leaf.
        let t = c.touch(&b);
        assert_eq!(t.evicted, vec![a[2]]);
        assert_eq!(c.touch(&a[..2]).hit_blocks, 2);
        // Now b is older than a's prefix: b's tail goes first.
        let (_, d) = chain(3, 2);
        assert_eq!(c.touch(&d).evicted, vec![b[2], b[1]]);
        assert_eq!(c.len(), 5);
    }

    #[test]
    fn published_events_keep_an_index_equal_to_the_cache() {
        let mut w = SimWorkerCache::new(WorkerWithDpRank::new(3, 0), 40);
        let mut ix = KvIndex::new();
        let mut events = Vec::new();
        for i in 0..200u32 {
            // Shared prefixes (seed % 5) extended by unique suffixes.
            let (mut l, _) = chain(i % 5, 6);
            let (suffix, _) = chain(10_000 + i, 1 + (i as usize % 7));
            l.extend(suffix);
            let s = compute_sequence_hashes(&l);
            w.serve(&l, &s, &mut events);
            for e in events.drain(..) {
                ix.apply(&e).unwrap();
            }
            let mut want: Vec<SequenceHash> = w.cache.last_use.keys().copied().collect();
            want.sort_unstable();
            assert_eq!(
                ix.worker_sequence_hashes(w.worker),
                want,
                "after request {i}"
            );
        }
    }
}
