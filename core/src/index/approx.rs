//! The approximate index: what the router *predicts* workers hold, from its own decisions.
//!
//! Used instead of the exact index when engines publish no KV events (`--no-kv-events`), and with
//! a short TTL as the *predicted* side index next to the exact one, so sibling requests that
//! arrive before the engine's `Stored` events still find each other (spec §4.3,
//! `--router-predicted-ttl-secs`).
//!
//! Every routed request's full blocks are recorded for the chosen rank; a block expires
//! `ttl` after its last routing touch, and when the index holds more than `max_tree_size`
//! `(block, worker)` pairs the oldest are dropped down to `prune_target_ratio` of it.
//! It is a [`KvIndex`] underneath, with the router's sequence hashes as the engine hashes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use crate::event::{WorkerId, WorkerWithDpRank};
use crate::hash::{ExternalHash, LocalBlockHash, SequenceHash};
use crate::index::{removed_event, stored_event, FastMap, KvIndex, OverlapScores};

/// Expiry and size limits. Defaults are Dynamo's: TTL 120 s, 2^20 pairs, prune to 80 %.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ApproxConfig {
    /// How long after its last routing touch a block is assumed evicted.
    pub ttl: Duration,
    /// Pruning starts above this many `(block, worker)` pairs.
    pub max_tree_size: usize,
    /// Pruning stops at this fraction of `max_tree_size`.
    pub prune_target_ratio: f64,
}

impl Default for ApproxConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(120),
            max_tree_size: 1 << 20,
            prune_target_ratio: 0.8,
        }
    }
}

type Key = (WorkerWithDpRank, SequenceHash);

/// Approximate prefix index with TTL expiry and size pruning. Time is passed in as a
/// [`Duration`] since any fixed epoch the caller chooses.
#[derive(Debug, Default)]
pub struct ApproxIndex {
    index: KvIndex,
    config: ApproxConfig,
    expiry: FastMap<Key, Duration>,
    /// Min-heap of (expiry, key); entries superseded by a later touch are skipped when popped.
    heap: BinaryHeap<Reverse<(Duration, Key)>>,
}

impl ApproxIndex {
    pub fn new(config: ApproxConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &ApproxConfig {
        &self.config
    }

    /// Record that the request with these block hashes was routed to `worker` at `now`.
    /// `local` and `seq` are the request's local and sequence hashes (same length).
    pub fn record(
        &mut self,
        worker: WorkerWithDpRank,
        local: &[LocalBlockHash],
        seq: &[SequenceHash],
        now: Duration,
    ) {
        debug_assert_eq!(local.len(), seq.len());
        self.expire(now);
        let n = local.len().min(seq.len());
        let held = seq[..n]
            .iter()
            .take_while(|s| self.expiry.contains_key(&(worker, **s)))
            .count();
        let until = now + self.config.ttl;
        for &s in &seq[..n] {
            self.expiry.insert((worker, s), until);
            self.heap.push(Reverse((until, (worker, s))));
        }
        if held < n {
            let parent = held.checked_sub(1).map(|i| ExternalHash(seq[i].0));
            let blocks = (held..n).map(|i| (ExternalHash(seq[i].0), local[i]));
            // Cannot fail: the parent is held (checked above) and sequence hashes are distinct.
            let _ = self.index.apply(&stored_event(worker, 0, parent, blocks));
        }
        if self.heap.len() > 2 * self.expiry.len() + 1024 {
            self.rebuild_heap();
        }
        self.prune();
    }

    /// Drop every block whose TTL has passed at `now`.
    pub fn expire(&mut self, now: Duration) {
        while let Some(Reverse((t, _))) = self.heap.peek() {
            if *t > now {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Longest contiguous prefix per rank, after expiring what is due at `now`.
    pub fn find_matches(&mut self, query: &[LocalBlockHash], now: Duration) -> OverlapScores {
        self.expire(now);
        self.index.find_matches(query, false)
    }

    /// Longest contiguous prefix per rank as of the last update (no expiry pass; `&self`).
    pub fn find_matches_now(&self, query: &[LocalBlockHash]) -> OverlapScores {
        self.index.find_matches(query, false)
    }

    /// What [`find_matches`](Self::find_matches) would answer at `now`, changing nothing: a
    /// block whose TTL has passed ends its rank's prefix instead of being removed. `seq` are
    /// the sequence hashes of `local` (same length). Same answer because a block never
    /// outlives its parent here: each routing touch renews a whole prefix at once.
    pub fn find_matches_at(
        &self,
        local: &[LocalBlockHash],
        seq: &[SequenceHash],
        now: Duration,
    ) -> OverlapScores {
        let mut found = self.index.find_matches(local, false);
        for (worker, n) in &mut found.scores {
            let held = &seq[..(*n as usize).min(seq.len())];
            let live = held
                .iter()
                .take_while(|s| self.expiry.get(&(*worker, **s)).is_some_and(|t| *t > now))
                .count();
            *n = live as u32;
        }
        found.scores.retain(|(_, n)| *n > 0);
        found
    }

    /// `(block, worker)` pairs held.
    pub fn current_size(&self) -> usize {
        self.index.current_size()
    }

    /// Forget every block of every rank of a worker.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.index.remove_worker(worker_id);
        self.expiry.retain(|(w, _), _| w.worker_id != worker_id);
        self.rebuild_heap();
    }

    /// The underlying exact-structure index (read-only).
    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    fn prune(&mut self) {
        if self.index.current_size() <= self.config.max_tree_size {
            return;
        }
        let target = (self.config.max_tree_size as f64 * self.config.prune_target_ratio) as usize;
        while self.index.current_size() > target && !self.heap.is_empty() {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some(Reverse((t, key))) = self.heap.pop() else {
            return;
        };
        if self.expiry.get(&key) != Some(&t) {
            return; // superseded by a later touch
        }
        self.expiry.remove(&key);
        // Removing a block drops the rank's blocks below it too; their own (earlier or equal)
        // expiry entries then find nothing to remove, which is fine.
        let _ = self
            .index
            .apply(&removed_event(key.0, 0, vec![ExternalHash(key.1 .0)]));
    }

    fn rebuild_heap(&mut self) {
        self.heap = self.expiry.iter().map(|(k, t)| Reverse((*t, *k))).collect();
    }
}
