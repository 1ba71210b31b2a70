//! The exact KV index: a prefix tree of blocks keyed by local block hash, fed by KV events.
//!
//! Semantics follow Dynamo's `RadixTree` (spec §4.1); the layout is ours, chosen for the hot path:
//!
//! * One node per block in an arena (`Vec<Node>`, `u32` ids, free list). A node knows its parent,
//!   its children (inline when there is one, a hash map when the node branches) and the sorted
//!   list of worker slots that hold it.
//! * **Coverage is prefix-closed**: a worker on a node is on every ancestor. Stores only extend a
//!   worker's own chains, and a removal takes the worker off the block *and everything below it*
//!   ("coverage removed from that block onward"). So along a query path worker sets only
//!   shrink, and `find_matches` reads one child count per block, touching worker lists only where
//!   the count drops. A node nobody holds has no children and is freed at once.
//! * Per worker rank, a map from the engine's (opaque) block hash to `(node, generation)`. Entries
//!   for blocks dropped by an ancestor's removal go stale; the generation check makes them
//!   harmless and the engine's own later `Removed` for them deletes them.
//!
//! Lookups allocate only the output vector; no lock is needed here (the caller decides how
//! readers and the single writer share the index).

use smallvec::SmallVec;

use crate::event::{
    KvCacheEvent, KvCacheEventData, RemovedData, RouterEvent, StoredBlock, StoredData, WorkerId,
    WorkerWithDpRank,
};
use crate::hash::{ExternalHash, LocalBlockHash, SequenceHash};
use crate::index::{FastMap, IndexError, OverlapScores};

const ROOT: u32 = 0;

/// Worker slots holding a node, sorted ascending.
type WorkerSet = SmallVec<[u32; 4]>;

#[derive(Debug, Default)]
enum Children {
    #[default]
    None,
    One(LocalBlockHash, u32),
    Many(Box<FastMap<LocalBlockHash, u32>>),
}

impl Children {
    #[inline]
    fn get(&self, h: LocalBlockHash) -> Option<u32> {
        match self {
            Children::None => None,
            Children::One(k, v) => (*k == h).then_some(*v),
            Children::Many(m) => m.get(&h).copied(),
        }
    }

    fn insert(&mut self, h: LocalBlockHash, id: u32) {
        match self {
            Children::None => *self = Children::One(h, id),
            Children::One(k, v) => {
                let mut m: FastMap<LocalBlockHash, u32> = FastMap::default();
                m.insert(*k, *v);
                m.insert(h, id);
                *self = Children::Many(Box::new(m));
            }
            Children::Many(m) => {
                m.insert(h, id);
            }
        }
    }

    fn remove(&mut self, h: LocalBlockHash) {
        match self {
            Children::None => {}
            Children::One(k, _) => {
                if *k == h {
                    *self = Children::None;
                }
            }
            Children::Many(m) => {
                m.remove(&h);
                // Branching nodes gain and lose children all the time (suffixes come and go
                // under a shared prefix): keep the map until it is empty or far too big.
                if m.is_empty() {
                    *self = Children::None;
                } else if m.capacity() > 16 * m.len() + 64 {
                    m.shrink_to_fit();
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Children::None)
    }

    fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            Children::None => {}
            Children::One(_, v) => f(*v),
            Children::Many(m) => m.values().for_each(|v| f(*v)),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Children::Many(m) => m.capacity() * (std::mem::size_of::<(LocalBlockHash, u32)>() + 1),
            _ => 0,
        }
    }
}

/// One block. Aligned to a cache line: a lookup step reads `children` and `workers` of one
/// node, so a node never straddles two lines.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Node {
    hash: LocalBlockHash,
    parent: u32,
    /// Bumped when the slot is freed, so stale per-worker references can be recognised.
    generation: u32,
    /// Bit `slot % 64` is set if some child may be held by that worker slot (may be stale-set,
    /// never stale-clear): lets a removal skip scanning the children of a branching node.
    child_slots: u64,
    children: Children,
    workers: WorkerSet,
}

/// A `(node, generation)` reference held in a worker's external-hash map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeRef {
    id: u32,
    generation: u32,
}

#[derive(Debug)]
struct WorkerEntry {
    key: WorkerWithDpRank,
    lookup: FastMap<ExternalHash, NodeRef>,
}

/// Exact prefix index over every worker rank's cached blocks.
///
/// Shapes: queries are slices of [`LocalBlockHash`] from the sequence start; answers are, per
/// `(worker, dp_rank)`, the number of *contiguous* leading blocks it holds.
#[derive(Debug)]
pub struct KvIndex {
    nodes: Vec<Node>,
    free: Vec<u32>,
    live_nodes: usize,
    /// `(block, worker)` coverage pairs: [`KvIndex::current_size`].
    coverage: usize,
    /// Entries across all per-worker external-hash maps (live or stale).
    lookup_entries: usize,
    slots: Vec<Option<WorkerEntry>>,
    free_slots: Vec<u32>,
    slot_of: FastMap<WorkerWithDpRank, u32>,
    /// Reused by subtree removal so removals do not allocate.
    scratch: Vec<u32>,
}

impl Default for KvIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            live_nodes: 1,
            coverage: 0,
            lookup_entries: 0,
            slots: Vec::new(),
            free_slots: Vec::new(),
            slot_of: FastMap::default(),
            scratch: Vec::new(),
        }
    }

    /// Number of `(block, worker rank)` pairs held: a block cached by three ranks counts three.
    pub fn current_size(&self) -> usize {
        self.coverage
    }

    /// Number of distinct block nodes (prefixes) in the tree, root excluded.
    pub fn num_blocks(&self) -> usize {
        self.live_nodes - 1
    }

    /// Worker ranks the index knows (those that ever stored a block and were not removed).
    pub fn workers(&self) -> Vec<WorkerWithDpRank> {
        let mut v: Vec<_> = self.slot_of.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Estimate of heap bytes used by the index's own structures (arena, child maps, worker
    /// lists that spilled to the heap, per-worker maps). Excludes allocator overhead.
    pub fn memory_bytes(&self) -> usize {
        let node = std::mem::size_of::<Node>();
        let mut bytes = self.nodes.capacity() * node + self.free.capacity() * 4;
        for n in &self.nodes {
            bytes += n.children.heap_bytes();
            if n.workers.spilled() {
                bytes += n.workers.capacity() * 4;
            }
        }
        let entry = std::mem::size_of::<(ExternalHash, NodeRef)>() + 1;
        for w in self.slots.iter().flatten() {
            bytes += w.lookup.capacity() * entry;
        }
        bytes += self.slots.capacity() * std::mem::size_of::<Option<WorkerEntry>>();
        bytes += self.slot_of.capacity() * (std::mem::size_of::<(WorkerWithDpRank, u32)>() + 1);
        bytes
    }

    /// Apply one KV event of one worker rank.
    ///
    /// Errors leave the index unchanged except as noted: `ParentBlockNotFound` and
    /// `InvalidBlockSequence` skip the whole store; `BlockNotFound` reports removals of unknown
    /// hashes after the known ones in the same event were applied.
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), IndexError> {
        let worker = event.worker();
        match &event.event.data {
            KvCacheEventData::Stored(s) => self.apply_stored(worker, s),
            KvCacheEventData::Removed(r) => self.apply_removed(worker, &r.block_hashes),
            KvCacheEventData::Cleared => {
                self.clear_worker_rank(worker);
                Ok(())
            }
        }
    }

    /// Longest contiguous prefix of `query` held by each worker rank (ranks with 0 omitted).
    ///
    /// With `early_exit`, the walk stops as soon as a single rank remains; that rank's score is
    /// then the depth at which it became the only one (Dynamo's semantics).
    pub fn find_matches(&self, query: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        let mut scores = Vec::new();
        let mut node = ROOT;
        let mut depth = 0u32;
        for &h in query {
            let Some(child) = self.nodes[node as usize].children.get(h) else {
                break;
            };
            let (parent_set, child_set) = (
                &self.nodes[node as usize].workers,
                &self.nodes[child as usize].workers,
            );
            if depth == 0 {
                // Every rank that scores holds the first block: one allocation.
                scores.reserve_exact(child_set.len());
            }
            if depth > 0 && child_set.len() < parent_set.len() {
                // Prefix-closed: child ⊆ parent; the difference are the ranks that stop here.
                for_each_dropped(parent_set, child_set, |w| {
                    scores.push((self.slot_key(w), depth))
                });
            }
            node = child;
            depth += 1;
            if early_exit && child_set.len() == 1 {
                break;
            }
        }
        if depth > 0 {
            for &w in self.nodes[node as usize].workers.iter() {
                scores.push((self.slot_key(w), depth));
            }
        }
        OverlapScores { scores }
    }

    /// Drop every block of every rank of `worker_id` and forget the ranks.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        for key in self.ranks_of(worker_id) {
            self.clear_worker_rank(key);
            if let Some(slot) = self.slot_of.remove(&key) {
                self.slots[slot as usize] = None;
                self.free_slots.push(slot);
            }
        }
        self.compact_if_empty();
    }

    /// Drop every block of every rank of `worker_id`, keeping the ranks known.
    pub fn clear_all_blocks(&mut self, worker_id: WorkerId) {
        for key in self.ranks_of(worker_id) {
            self.clear_worker_rank(key);
        }
    }

    /// Drop every block of one worker rank (an `AllBlocksCleared` / `Cleared` event).
    pub fn clear_worker_rank(&mut self, worker: WorkerWithDpRank) {
        let Some(&slot) = self.slot_of.get(&worker) else {
            return;
        };
        let lookup = match self.slots[slot as usize].as_mut() {
            Some(w) => std::mem::take(&mut w.lookup),
            None => return,
        };
        self.lookup_entries -= lookup.len();
        for (_, r) in lookup {
            if self.is_live(r) && self.holds(r.id, slot) {
                self.remove_subtree(r.id, slot);
            }
        }
        self.compact_if_empty();
    }

    /// Router sequence hashes of every block `worker` holds, sorted. For consistency checks
    /// against an engine's own view of its cache; costs a walk of the worker's blocks.
    pub fn worker_sequence_hashes(&self, worker: WorkerWithDpRank) -> Vec<SequenceHash> {
        let Some(&slot) = self.slot_of.get(&worker) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack: Vec<(u32, Option<SequenceHash>)> = vec![(ROOT, None)];
        while let Some((id, seq)) = stack.pop() {
            self.nodes[id as usize].children.for_each(|c| {
                let n = &self.nodes[c as usize];
                if n.workers.binary_search(&slot).is_ok() {
                    let s = match seq {
                        None => SequenceHash(n.hash.0),
                        Some(p) => crate::hash::chain_hash(p, n.hash),
                    };
                    out.push(s);
                    stack.push((c, Some(s)));
                }
            });
        }
        out.sort_unstable();
        out
    }

    /// The whole index as `Stored` events that rebuild an identical index when applied to an
    /// empty one: per worker rank, one event per linear run of its blocks, parents first,
    /// carrying that rank's own engine hashes (Dynamo's dump reuses the first writer's hash for
    /// every rank; we don't). Event ids count from 0 per rank.
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        let mut out = Vec::new();
        let mut keys: Vec<(WorkerWithDpRank, u32)> =
            self.slot_of.iter().map(|(k, v)| (*k, *v)).collect();
        keys.sort_unstable();
        for (key, slot) in keys {
            let Some(entry) = self.slots[slot as usize].as_ref() else {
                continue;
            };
            let mut ext_of: FastMap<u32, ExternalHash> = FastMap::default();
            for (ext, r) in &entry.lookup {
                if self.is_live(*r) && self.holds(r.id, slot) {
                    ext_of.insert(r.id, *ext);
                }
            }
            let mut event_id = 0u64;
            // Each stack item starts a run under `parent` (None = sequence start).
            let mut stack: Vec<(u32, Option<ExternalHash>)> = Vec::new();
            self.push_worker_children(ROOT, slot, None, &mut stack);
            while let Some((start, parent)) = stack.pop() {
                let mut blocks = Vec::new();
                let mut id = start;
                loop {
                    let n = &self.nodes[id as usize];
                    // A block held without an engine hash (the engine reused its hash for another
                    // block) gets a synthetic one, unique per node, so a rebuild keeps it.
                    let ext = ext_of
                        .get(&id)
                        .copied()
                        .unwrap_or(ExternalHash(u64::from(id) | (1 << 63)));
                    blocks.push(StoredBlock {
                        block_hash: ext,
                        tokens_hash: n.hash,
                        mm_extra_info: None,
                    });
                    let mut next = None;
                    let mut count = 0;
                    n.children.for_each(|c| {
                        if self.holds(c, slot) {
                            count += 1;
                            next = Some(c);
                        }
                    });
                    match (count, next) {
                        (1, Some(c)) => id = c,
                        _ => {
                            self.push_worker_children(id, slot, Some(ext), &mut stack);
                            break;
                        }
                    }
                }
                out.push(RouterEvent::new(
                    key,
                    event_id,
                    KvCacheEventData::Stored(StoredData {
                        parent_hash: parent,
                        start_position: None,
                        blocks,
                    }),
                ));
                event_id += 1;
            }
        }
        out
    }

    // ---- internals ----

    fn push_worker_children(
        &self,
        id: u32,
        slot: u32,
        parent: Option<ExternalHash>,
        stack: &mut Vec<(u32, Option<ExternalHash>)>,
    ) {
        let mut kids = Vec::new();
        self.nodes[id as usize].children.for_each(|c| {
            if self.holds(c, slot) {
                kids.push(c);
            }
        });
        // Deterministic dump order regardless of hash-map iteration order.
        kids.sort_unstable_by_key(|&c| std::cmp::Reverse(self.nodes[c as usize].hash));
        stack.extend(kids.into_iter().map(|c| (c, parent)));
    }

    fn ranks_of(&self, worker_id: WorkerId) -> Vec<WorkerWithDpRank> {
        self.slot_of
            .keys()
            .filter(|k| k.worker_id == worker_id)
            .copied()
            .collect()
    }

    #[inline]
    fn slot_key(&self, slot: u32) -> WorkerWithDpRank {
        self.slots[slot as usize]
            .as_ref()
            .map(|w| w.key)
            .unwrap_or_default()
    }

    #[inline]
    fn is_live(&self, r: NodeRef) -> bool {
        r.id != ROOT
            && self
                .nodes
                .get(r.id as usize)
                .is_some_and(|n| n.generation == r.generation && !n.workers.is_empty())
    }

    #[inline]
    fn holds(&self, id: u32, slot: u32) -> bool {
        self.nodes[id as usize].workers.binary_search(&slot).is_ok()
    }

    fn slot_for(&mut self, worker: WorkerWithDpRank) -> u32 {
        if let Some(&s) = self.slot_of.get(&worker) {
            return s;
        }
        let entry = WorkerEntry {
            key: worker,
            lookup: FastMap::default(),
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(entry);
                s
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.slot_of.insert(worker, slot);
        slot
    }

    fn apply_stored(&mut self, worker: WorkerWithDpRank, s: &StoredData) -> Result<(), IndexError> {
        if s.blocks.is_empty() {
            return Ok(());
        }
        if is_self_referencing(s) {
            return Err(IndexError::InvalidBlockSequence { worker });
        }
        let slot = self.slot_for(worker);
        let mut node = match s.parent_hash {
            None => ROOT,
            Some(p) => {
                let found = self.slots[slot as usize]
                    .as_ref()
                    .and_then(|w| w.lookup.get(&p))
                    .copied();
                match found {
                    Some(r) if self.is_live(r) && self.holds(r.id, slot) => r.id,
                    _ => return Err(IndexError::ParentBlockNotFound { worker, parent: p }),
                }
            }
        };
        for b in &s.blocks {
            let child = match self.nodes[node as usize].children.get(b.tokens_hash) {
                Some(c) => c,
                None => {
                    let c = self.alloc(b.tokens_hash, node);
                    self.nodes[node as usize].children.insert(b.tokens_hash, c);
                    c
                }
            };
            self.nodes[node as usize].child_slots |= slot_bit(slot);
            let n = &mut self.nodes[child as usize];
            if let Err(pos) = n.workers.binary_search(&slot) {
                n.workers.insert(pos, slot);
                self.coverage += 1;
            }
            let r = NodeRef {
                id: child,
                generation: n.generation,
            };
            if let Some(w) = self.slots[slot as usize].as_mut() {
                if w.lookup.insert(b.block_hash, r).is_none() {
                    self.lookup_entries += 1;
                }
            }
            node = child;
        }
        Ok(())
    }

    fn apply_removed(
        &mut self,
        worker: WorkerWithDpRank,
        hashes: &[ExternalHash],
    ) -> Result<(), IndexError> {
        let Some(&slot) = self.slot_of.get(&worker) else {
            return match hashes.len() {
                0 => Ok(()),
                n => Err(IndexError::BlockNotFound { worker, missing: n }),
            };
        };
        let mut missing = 0;
        for h in hashes {
            let r = self.slots[slot as usize]
                .as_mut()
                .and_then(|w| w.lookup.remove(h));
            match r {
                Some(r) => {
                    self.lookup_entries -= 1;
                    if self.is_live(r) && self.holds(r.id, slot) {
                        self.remove_subtree(r.id, slot);
                    }
                    // else: already dropped with an ancestor; the stale entry is now gone.
                }
                None => missing += 1,
            }
        }
        if let Some(w) = self.slots[slot as usize].as_mut() {
            if w.lookup.capacity() > 4 * w.lookup.len() + 64 {
                w.lookup.shrink_to_fit();
            }
        }
        self.compact_if_empty();
        match missing {
            0 => Ok(()),
            n => Err(IndexError::BlockNotFound { worker, missing: n }),
        }
    }

    /// Take `slot` off `id` and every descendant it holds; free nodes nobody holds.
    fn remove_subtree(&mut self, id: u32, slot: u32) {
        // Engines evict leaves first: the common case has no descendant of this worker to visit.
        let root = &self.nodes[id as usize];
        if root.children.is_empty() || root.child_slots & slot_bit(slot) == 0 {
            self.remove_from_node(id, slot);
            return;
        }
        let mut order = std::mem::take(&mut self.scratch);
        order.clear();
        order.push(id);
        let mut i = 0;
        while i < order.len() {
            let n = order[i];
            i += 1;
            let nodes = &self.nodes;
            if nodes[n as usize].child_slots & slot_bit(slot) == 0 {
                continue;
            }
            // Visiting every child anyway: rebuild the summary without this worker.
            let mut mask = 0u64;
            nodes[n as usize].children.for_each(|c| {
                let ws = &nodes[c as usize].workers;
                if ws.binary_search(&slot).is_ok() {
                    order.push(c);
                }
                mask |= ws
                    .iter()
                    .filter(|&&w| w != slot)
                    .fold(0, |m, &w| m | slot_bit(w));
            });
            self.nodes[n as usize].child_slots = mask;
        }
        // Breadth-first order reversed: children before parents, so a node is childless by the
        // time it is checked.
        for &n in order.iter().rev() {
            self.remove_from_node(n, slot);
        }
        self.scratch = order;
    }

    #[inline]
    fn remove_from_node(&mut self, n: u32, slot: u32) {
        let node = &mut self.nodes[n as usize];
        if let Ok(pos) = node.workers.binary_search(&slot) {
            node.workers.remove(pos);
            self.coverage -= 1;
        }
        if node.workers.is_empty() {
            debug_assert!(node.children.is_empty(), "prefix-closed coverage violated");
            self.free_node(n);
        }
    }

    fn alloc(&mut self, hash: LocalBlockHash, parent: u32) -> u32 {
        self.live_nodes += 1;
        match self.free.pop() {
            Some(id) => {
                let n = &mut self.nodes[id as usize];
                n.hash = hash;
                n.parent = parent;
                id
            }
            None => {
                self.nodes.push(Node {
                    hash,
                    parent,
                    ..Default::default()
                });
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn free_node(&mut self, id: u32) {
        let (parent, hash) = {
            let n = &mut self.nodes[id as usize];
            n.generation = n.generation.wrapping_add(1);
            n.child_slots = 0;
            n.children = Children::None;
            n.workers = WorkerSet::new();
            (n.parent, n.hash)
        };
        self.nodes[parent as usize].children.remove(hash);
        self.free.push(id);
        self.live_nodes -= 1;
    }

    /// Give memory back when nothing is indexed any more: with no node and no per-worker
    /// reference left, generations can restart and the arena shrink to the root.
    fn compact_if_empty(&mut self) {
        if self.live_nodes == 1 && self.lookup_entries == 0 && self.nodes.len() > 1 {
            self.nodes.truncate(1);
            self.nodes.shrink_to_fit();
            self.nodes[0].children = Children::None;
            self.free = Vec::new();
            for w in self.slots.iter_mut().flatten() {
                w.lookup = FastMap::default();
            }
        }
    }
}

/// Calls `f` for each element of sorted `parent` missing from sorted `child ⊆ parent`, in
/// `O(d log p)` for `d` missing elements: a worker set shrinks by a few ranks at a time, so a
/// linear merge of two long lists would dominate lookups over shared prefixes.
fn for_each_dropped(parent: &[u32], child: &[u32], mut f: impl FnMut(u32)) {
    let mut lo = 0;
    for found in 0..parent.len().saturating_sub(child.len()) {
        // First k ≥ lo with parent[k] != child[k - found]. Monotone: before the next missing
        // element both lists agree position by position; from it on, parent is one ahead.
        let (mut a, mut b) = (lo, parent.len());
        while a < b {
            let m = (a + b) / 2;
            if child.get(m - found) == Some(&parent[m]) {
                a = m + 1;
            } else {
                b = m;
            }
        }
        match parent.get(a) {
            Some(&w) => f(w),
            None => return,
        }
        lo = a + 1;
    }
}

#[inline]
fn slot_bit(slot: u32) -> u64 {
    1u64 << (slot & 63)
}

/// A store whose parent is one of its own blocks, or that repeats a block hash (spec §3.2:
/// engines occasionally emit these; they would create cycles in the per-worker map).
fn is_self_referencing(s: &StoredData) -> bool {
    // A 1024-bit filter on the stack: only when two hashes share a bit (rare for the few dozen
    // blocks of one event) do we pay for the exact quadratic check.
    let mut bits = [0u64; 16];
    let mut clash = false;
    for h in s
        .parent_hash
        .iter()
        .chain(s.blocks.iter().map(|b| &b.block_hash))
    {
        let x = h.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54;
        let (w, b) = ((x >> 6) as usize, 1u64 << (x & 63));
        clash |= bits[w] & b != 0;
        bits[w] |= b;
    }
    if !clash {
        return false;
    }
    let hashes = || s.blocks.iter().map(|b| b.block_hash);
    if let Some(p) = s.parent_hash {
        if hashes().any(|h| h == p) {
            return true;
        }
    }
    let mut v: Vec<u64> = hashes().map(|h| h.0).collect();
    v.sort_unstable();
    v.windows(2).any(|w| w[0] == w[1])
}

/// Convenience for tests and tools: a `Removed` event.
pub fn removed_event(
    worker: WorkerWithDpRank,
    event_id: u64,
    hashes: Vec<ExternalHash>,
) -> RouterEvent {
    RouterEvent::new(
        worker,
        event_id,
        KvCacheEventData::Removed(RemovedData {
            block_hashes: hashes,
        }),
    )
}

/// Convenience for tests and tools: a `Stored` event from `(engine hash, local hash)` pairs.
pub fn stored_event(
    worker: WorkerWithDpRank,
    event_id: u64,
    parent: Option<ExternalHash>,
    blocks: impl IntoIterator<Item = (ExternalHash, LocalBlockHash)>,
) -> RouterEvent {
    RouterEvent {
        worker_id: worker.worker_id,
        storage_tier: Default::default(),
        event: KvCacheEvent {
            event_id,
            dp_rank: worker.dp_rank,
            data: KvCacheEventData::Stored(StoredData {
                parent_hash: parent,
                start_position: None,
                blocks: blocks
                    .into_iter()
                    .map(|(e, l)| StoredBlock {
                        block_hash: e,
                        tokens_hash: l,
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::for_each_dropped;

    #[test]
    fn dropped_elements_of_a_sorted_subset() {
        let parent: Vec<u32> = (0..200).map(|x| x * 3).collect();
        for keep_every in [1usize, 2, 3, 7, 50, 1000] {
            for offset in 0..3 {
                let child: Vec<u32> = parent
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i + offset) % keep_every != 0)
                    .map(|(_, &x)| x)
                    .collect();
                let mut got = Vec::new();
                for_each_dropped(&parent, &child, |w| got.push(w));
                let want: Vec<u32> = parent
                    .iter()
                    .copied()
                    .filter(|x| !child.contains(x))
                    .collect();
                assert_eq!(got, want, "keep_every {keep_every} offset {offset}");
            }
        }
        let mut got = Vec::new();
        for_each_dropped(&[1, 2, 3], &[], |w| got.push(w));
        assert_eq!(got, [1, 2, 3]);
    }
}
