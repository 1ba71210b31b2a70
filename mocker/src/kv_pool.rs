//! The paged KV pool: fixed-size blocks, prefix caching over full blocks, leaf-first LRU
//! eviction.
//!
//! * `num_blocks` blocks of `block_size` tokens. A block is **active** while sequences
//!   reference it (refcount > 0), **evictable** when cached and unreferenced, **free** when
//!   neither.
//! * A full block is identified by an engine chained hash `h_i = XXH3-64(LE u32 tokens,
//!   seed = pool_seed ^ h_{i-1})` (`h_{-1} = 0`) with a **per-process random seed**: like vLLM
//!   without `PYTHONHASHSEED`, so nothing downstream can rely on reproducing engine hashes.
//! * One physical block per hash: registering a block whose hash is already cached makes the
//!   caller switch to the cached block ([`Registered::Existing`]). The cached set is therefore
//!   prefix-closed (a cached block's parent is cached), which the router's index needs.
//! * Eviction takes a cached block with no cached children (a leaf), least recently released
//!   first, so shared prefixes outlive their tails. Every eviction emits
//!   [`KvEvent::Removed`]; [`KvPool::reset`] emits [`KvEvent::AllCleared`].
//!
//! Bookkeeping is per block (one hash-map probe and one ordered-set update), never per token.
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::events::KvEvent;

/// Index of a physical block in the pool.
pub type BlockId = u32;

const NONE: BlockId = BlockId::MAX;

/// This process's engine hash seed: random, drawn once.
pub fn process_hash_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        use rand::TryRngCore;
        rand::rngs::OsRng.try_next_u64().unwrap_or_else(|_| {
            // No OS entropy: fall back to time and pid, still not the router's hash.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (u64::from(std::process::id()) << 32)
        })
    })
}

/// Engine hash of one full block whose predecessor has hash `parent` (None at the start).
///
/// `scratch` is reused to avoid an allocation per block.
pub fn engine_block_hash(
    seed: u64,
    parent: Option<u64>,
    tokens: &[u32],
    scratch: &mut Vec<u8>,
) -> u64 {
    scratch.clear();
    scratch.reserve(tokens.len() * 4);
    for t in tokens {
        scratch.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(scratch, seed ^ parent.unwrap_or(0))
}

/// Engine chained hashes of every full block of `tokens` (for tests and tools).
pub fn engine_block_hashes(seed: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut scratch = Vec::new();
    let mut parent = None;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|b| {
            let h = engine_block_hash(seed, parent, b, &mut scratch);
            parent = Some(h);
            h
        })
        .collect()
}

/// Engine hashes are already uniformly mixed: hash-map keys need no second hash.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashIndex = HashMap<u64, BlockId, BuildHasherDefault<IdentityHasher>>;

#[derive(Clone, Debug)]
struct BlockMeta {
    hash: u64,
    cached: bool,
    refcount: u32,
    parent: BlockId,
    children: u32,
    last_used: u64,
}

/// Outcome of [`KvPool::register`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// The block is now cached under the hash: it is new to the cache.
    New,
    /// Another block already holds this hash and now carries the caller's reference; the
    /// caller's block was released. Use the returned block instead.
    Existing(BlockId),
    /// Prefix caching is off: nothing changed.
    Disabled,
}

/// The pool; see the module docs.
#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    seed: u64,
    prefix_caching: bool,
    blocks: Vec<BlockMeta>,
    free: Vec<BlockId>,
    cached: HashIndex,
    /// Evictable leaves ordered by release time.
    leaves: BTreeSet<(u64, BlockId)>,
    num_evictable: usize,
    num_active: usize,
    tick: u64,
    events: Vec<KvEvent>,
    scratch: Vec<u8>,
}

impl KvPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens; `seed` keys the engine hash.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool, seed: u64) -> Self {
        let num_blocks = num_blocks.min(NONE as usize - 1);
        Self {
            block_size: block_size.max(1),
            seed,
            prefix_caching,
            blocks: vec![
                BlockMeta {
                    hash: 0,
                    cached: false,
                    refcount: 0,
                    parent: NONE,
                    children: 0,
                    last_used: 0,
                };
                num_blocks
            ],
            // Reverse so block 0 is allocated first (only matters for readable tests).
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: HashIndex::default(),
            leaves: BTreeSet::new(),
            num_evictable: 0,
            num_active: 0,
            tick: 0,
            events: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The engine hash seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether full blocks are cached and reused.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_active(&self) -> usize {
        self.num_active
    }

    /// Cached blocks (active or evictable).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks an allocation can get right now: free plus evictable.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.num_evictable
    }

    /// KV utilisation in [0, 1]: active blocks / total blocks (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            0.0
        } else {
            self.num_active as f64 / self.blocks.len() as f64
        }
    }

    /// Engine hash of a full block after `parent`.
    pub fn hash_block(&mut self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        engine_block_hash(self.seed, parent, tokens, &mut self.scratch)
    }

    /// The cached block holding `hash`, if any.
    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        if !self.prefix_caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// How many leading `hashes` are cached.
    pub fn match_prefix(&self, hashes: &[u64]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Whether `block` is unreferenced (so touching it takes it out of the evictable pool).
    pub fn is_evictable(&self, block: BlockId) -> bool {
        let b = &self.blocks[block as usize];
        b.cached && b.refcount == 0
    }

    /// Takes a reference on a block (a prefix hit, or a second user).
    pub fn touch(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        if b.refcount == 0 {
            self.num_active += 1;
            if b.cached {
                self.num_evictable -= 1;
                if b.children == 0 {
                    self.leaves.remove(&(b.last_used, block));
                }
            }
        }
        b.refcount += 1;
    }

    /// A fresh block with one reference, evicting the least recently used leaf if no block is
    /// free. None when nothing is free or evictable.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => self.evict_one()?,
        };
        let b = &mut self.blocks[id as usize];
        b.refcount = 1;
        b.parent = NONE;
        self.num_active += 1;
        Some(id)
    }

    /// Drops a reference. An unreferenced cached block becomes evictable; an uncached one free.
    pub fn release(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        debug_assert!(b.refcount > 0, "release of an unreferenced block");
        if b.refcount == 0 {
            return;
        }
        b.refcount -= 1;
        if b.refcount > 0 {
            return;
        }
        self.num_active -= 1;
        if b.cached {
            self.tick += 1;
            b.last_used = self.tick;
            self.num_evictable += 1;
            if b.children == 0 {
                self.leaves.insert((b.last_used, block));
            }
        } else {
            self.free.push(block);
        }
    }

    /// Caches the full, referenced `block` under `hash`, as the child of cached block `parent`
    /// (None at the sequence start). See [`Registered`].
    pub fn register(&mut self, block: BlockId, hash: u64, parent: Option<BlockId>) -> Registered {
        if !self.prefix_caching {
            return Registered::Disabled;
        }
        if let Some(&other) = self.cached.get(&hash) {
            if other != block {
                self.touch(other);
                self.release(block);
            }
            return Registered::Existing(other);
        }
        self.cached.insert(hash, block);
        let b = &mut self.blocks[block as usize];
        b.hash = hash;
        b.cached = true;
        b.children = 0;
        b.parent = parent.unwrap_or(NONE);
        if let Some(p) = parent {
            // The caller references `p`, so it is not in the leaf set.
            self.blocks[p as usize].children += 1;
        }
        Registered::New
    }

    fn evict_one(&mut self) -> Option<BlockId> {
        let (_, id) = self.leaves.pop_first()?;
        let b = &mut self.blocks[id as usize];
        let (hash, parent) = (b.hash, b.parent);
        b.cached = false;
        b.parent = NONE;
        self.cached.remove(&hash);
        self.num_evictable -= 1;
        self.events.push(KvEvent::Removed { block_hash: hash });
        if parent != NONE {
            let p = &mut self.blocks[parent as usize];
            p.children -= 1;
            if p.children == 0 && p.refcount == 0 && p.cached {
                self.leaves.insert((p.last_used, parent));
            }
        }
        Some(id)
    }

    /// Empties the cache when no block is active; emits [`KvEvent::AllCleared`]. Returns false
    /// (and changes nothing) while blocks are in use, as vLLM's `reset_prefix_cache` does.
    pub fn reset(&mut self) -> bool {
        if self.num_active > 0 {
            return false;
        }
        for id in self.cached.drain().map(|(_, id)| id) {
            let b = &mut self.blocks[id as usize];
            b.cached = false;
            b.children = 0;
            b.parent = NONE;
            self.free.push(id);
        }
        self.leaves.clear();
        self.num_evictable = 0;
        self.events.push(KvEvent::AllCleared);
        true
    }

    /// Appends an event in order with the pool's own (used by the engine for stores).
    pub fn push_event(&mut self, ev: KvEvent) {
        self.events.push(ev);
    }

    /// Moves the pending events into `out`.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        out.append(&mut self.events);
    }

    /// Engine hashes of every cached block, sorted (the engine's view for consistency checks).
    pub fn cached_hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.cached.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Checks internal invariants; for tests. Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut active = 0;
        let mut evictable = 0;
        let mut leaves = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.refcount > 0 {
                active += 1;
            }
            if b.cached {
                if self.cached.get(&b.hash) != Some(&(i as BlockId)) {
                    return Err(format!("block {i} cached but not indexed"));
                }
                if b.parent != NONE && !self.blocks[b.parent as usize].cached {
                    return Err(format!("block {i} has an uncached parent"));
                }
                let kids = self
                    .blocks
                    .iter()
                    .filter(|c| c.cached && c.parent == i as BlockId)
                    .count();
                if kids != b.children as usize {
                    return Err(format!(
                        "block {i}: {kids} children, counted {}",
                        b.children
                    ));
                }
                if b.refcount == 0 {
                    evictable += 1;
                    if b.children == 0 {
                        leaves += 1;
                        if !self.leaves.contains(&(b.last_used, i as BlockId)) {
                            return Err(format!("leaf {i} missing from the leaf set"));
                        }
                    }
                }
            } else if b.refcount == 0 && !self.free.contains(&(i as BlockId)) {
                return Err(format!("block {i} lost: neither used, cached nor free"));
            }
        }
        if active != self.num_active
            || evictable != self.num_evictable
            || leaves != self.leaves.len()
        {
            return Err(format!(
                "counters: active {active}/{}, evictable {evictable}/{}, leaves {leaves}/{}",
                self.num_active,
                self.num_evictable,
                self.leaves.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_chain(pool: &mut KvPool, tokens: &[u32]) -> Vec<BlockId> {
        // Allocate and register a chain like a finished prefill would.
        let bs = pool.block_size();
        let mut ids = Vec::new();
        let mut parent_hash = None;
        for chunk in tokens.chunks_exact(bs) {
            let h = pool.hash_block(parent_hash, chunk);
            let parent = ids.last().copied();
            let id = pool.allocate().unwrap();
            let id = match pool.register(id, h, parent) {
                Registered::Existing(o) => o,
                _ => id,
            };
            ids.push(id);
            parent_hash = Some(h);
        }
        ids
    }

    #[test]
    fn hashes_are_chained_and_seeded() {
        let a = engine_block_hashes(1, &[1, 2, 3, 4], 2);
        let b = engine_block_hashes(2, &[1, 2, 3, 4], 2);
        assert_eq!(a.len(), 2);
        assert_ne!(a, b);
        // Same second block content, different parent → different hash.
        let c = engine_block_hashes(1, &[9, 9, 3, 4], 2);
        assert_ne!(a[1], c[1]);
        // Not the router's hash of the same tokens.
        let router =
            kvrouter_core::hash::compute_block_hashes(&[1, 2, 3, 4], 2, &Default::default(), None);
        assert_ne!(a[0], router[0].0);
    }

    #[test]
    fn prefix_hits_dedup_and_leaf_first_lru_eviction() {
        let mut pool = KvPool::new(4, 2, true, 7);
        let a = stored_chain(&mut pool, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(pool.num_active(), 3);
        // A second sequence sharing two blocks gets the same physical blocks.
        let b = stored_chain(&mut pool, &[1, 2, 3, 4, 7, 8]);
        assert_eq!(&b[..2], &a[..2]);
        assert_eq!(pool.num_active(), 4);
        pool.check_invariants().unwrap();
        for id in a.iter().rev() {
            pool.release(*id);
        }
        for id in b.iter().rev() {
            pool.release(*id);
        }
        pool.check_invariants().unwrap();
        assert_eq!(pool.num_active(), 0);
        assert_eq!(pool.num_available(), 4);
        let mut ev = Vec::new();
        pool.drain_events(&mut ev);
        assert!(ev.is_empty());
        // Allocation must evict the two leaves (a's tail first: released first) before the prefix.
        let x = pool.allocate().unwrap();
        assert_eq!(x, a[2]);
        let y = pool.allocate().unwrap();
        assert_eq!(y, b[2]);
        let z = pool.allocate().unwrap();
        assert_eq!(z, a[1]);
        pool.drain_events(&mut ev);
        let h = engine_block_hashes(7, &[1, 2, 3, 4, 5, 6], 2);
        let h2 = engine_block_hashes(7, &[1, 2, 3, 4, 7, 8], 2);
        assert_eq!(
            ev,
            vec![
                KvEvent::Removed { block_hash: h[2] },
                KvEvent::Removed { block_hash: h2[2] },
                KvEvent::Removed { block_hash: h[1] },
            ]
        );
        assert_eq!(pool.match_prefix(&h), 1);
        pool.check_invariants().unwrap();
        assert!(!pool.reset());
        for id in [x, y, z] {
            pool.release(id);
        }
        assert!(pool.reset());
        assert_eq!(pool.num_cached(), 0);
        pool.drain_events(&mut ev);
        assert_eq!(ev.last(), Some(&KvEvent::AllCleared));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn touching_an_evictable_hit_protects_it() {
        let mut pool = KvPool::new(2, 1, true, 0);
        let a = stored_chain(&mut pool, &[5]);
        pool.release(a[0]);
        assert!(pool.is_evictable(a[0]));
        pool.touch(a[0]);
        let other = pool.allocate().unwrap();
        assert_ne!(other, a[0]);
        assert_eq!(pool.allocate(), None);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn no_prefix_caching_never_caches() {
        let mut pool = KvPool::new(2, 1, false, 0);
        let id = pool.allocate().unwrap();
        assert_eq!(pool.register(id, 42, None), Registered::Disabled);
        pool.release(id);
        assert_eq!(pool.match_prefix(&[42]), 0);
        assert_eq!(pool.num_available(), 2);
    }
}
