//! The exact KV index: a prefix tree of blocks keyed by local block hash, fed by KV events.
//!
//! Semantics follow Dynamo's `RadixTree` (spec §4.1); the layout is ours, chosen for the hot path:
//!
//! * The tree is made of **runs**: a run is a chain of blocks stored contiguously (a `Stored`
//!   event's blocks become one run, and a worker's next store that continues the chain extends
//!   it in place). A lookup compares the query against a run's hashes as two arrays, so a
//!   64-block prompt costs a handful of run visits instead of 64 dependent node visits.
//! * **Coverage is prefix-closed**: a worker that holds a block holds every block before it. In a
//!   run that is one number per worker, its *depth* (it holds the run's first `depth` blocks),
//!   so a run never has to split when workers hold different lengths of it. A removal takes the
//!   worker off the block *and everything after it* ("coverage removed from that block onward").
//! * A run's **branches** hang at an offset: branch `(p, h)` continues the prefix that ends with
//!   the run's block `p - 1` (for the root, `p = 0`) with a block whose hash is `h` but which is
//!   not the run's own block `p`. Only workers with `depth ≥ p` can hold it.
//! * Runs are created, extended in place (only while nobody stopped short of the end and nothing
//!   hangs off the end), truncated and freed; blocks never move between runs. Per worker rank a
//!   map from the engine's (opaque) block hash to `(run, generation, offset)` finds a block for
//!   removals and parents. References to blocks dropped by an ancestor's removal go stale; the
//!   generation and depth checks make them harmless and the engine's own later `Removed` deletes
//!   them.
//!
//! Lookups allocate only the output vector; no lock is needed here (the caller decides how
//! readers and the single writer share the index).

use smallvec::SmallVec;

use crate::event::{
    KvCacheEvent, KvCacheEventData, RemovedData, RouterEvent, StoredBlock, StoredData, WorkerId,
    WorkerWithDpRank,
};
use crate::hash::{ExternalHash, LocalBlockHash, SequenceHash};
use crate::index::blockmap::{BlockMap, BlockRef};
use crate::index::{prefetch, FastMap, IndexError, OverlapScores};

const ROOT: u32 = 0;

/// One worker slot's coverage of a run: it holds the run's first `depth` blocks (`depth ≥ 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cover {
    slot: u32,
    depth: u32,
}

/// Coverage of a run, sorted by slot. Most runs (unique suffixes) have one holder.
type Covers = SmallVec<[Cover; 2]>;

/// Branches of a run, keyed by `(offset, first block hash)`.
#[derive(Debug, Default)]
enum Branches {
    #[default]
    None,
    One(u32, LocalBlockHash, u32),
    Many(Box<Fan>),
}

/// The branches of a run that has several (the end of a shared system prompt may have
/// thousands), with how many of them each worker slot holds: a removal asks "does this worker
/// hold any branch here?" without scanning them.
#[derive(Debug, Default)]
struct Fan {
    map: FastMap<(u32, LocalBlockHash), u32>,
    holders: FastMap<u32, u32>,
}

impl Branches {
    #[inline]
    fn get(&self, off: u32, h: LocalBlockHash) -> Option<u32> {
        match self {
            Branches::None => None,
            Branches::One(o, k, v) => (*o == off && *k == h).then_some(*v),
            Branches::Many(f) => f.map.get(&(off, h)).copied(),
        }
    }

    fn remove(&mut self, off: u32, h: LocalBlockHash) {
        match self {
            Branches::None => {}
            Branches::One(o, k, _) => {
                if *o == off && *k == h {
                    *self = Branches::None;
                }
            }
            Branches::Many(f) => {
                f.map.remove(&(off, h));
                // Branching runs gain and lose branches all the time (suffixes come and go
                // under a shared prefix): keep the map until it is empty or far too big.
                if f.map.is_empty() {
                    debug_assert!(f.holders.is_empty());
                    *self = Branches::None;
                } else if f.map.capacity() > 16 * f.map.len() + 64 {
                    f.map.shrink_to_fit();
                    f.holders.shrink_to_fit();
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Branches::None)
    }

    /// Whether some branch hangs at an offset `≥ off`.
    fn any_from(&self, off: u32) -> bool {
        match self {
            Branches::None => false,
            Branches::One(o, _, _) => *o >= off,
            Branches::Many(f) => f.map.keys().any(|(o, _)| *o >= off),
        }
    }

    /// Count `slot` joining (`+1`) or leaving (`-1`) one of the branches.
    #[inline]
    fn count_holder(&mut self, slot: u32, joins: bool) {
        if let Branches::Many(f) = self {
            if joins {
                *f.holders.entry(slot).or_default() += 1;
            } else if let Some(n) = f.holders.get_mut(&slot) {
                *n -= 1;
                if *n == 0 {
                    f.holders.remove(&slot);
                }
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32, LocalBlockHash, u32)) {
        match self {
            Branches::None => {}
            Branches::One(o, h, v) => f(*o, *h, *v),
            Branches::Many(fan) => fan.map.iter().for_each(|((o, h), v)| f(*o, *h, *v)),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Branches::Many(f) => {
                std::mem::size_of::<Fan>()
                    + f.map.capacity() * (std::mem::size_of::<((u32, LocalBlockHash), u32)>() + 1)
                    + f.holders.capacity() * (std::mem::size_of::<(u32, u32)>() + 1)
            }
            _ => 0,
        }
    }
}

/// A chain of blocks. `repr(C)` keeps the declared order, so that what a removal reads
/// (generation, coverage, branches) sits in the first cache line, the one `apply_batch`
/// prefetches.
#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Run {
    /// Bumped when the run is freed, so stale per-worker references can be recognised.
    generation: u32,
    /// Cleared by the first truncation: only a run whose length never went down may grow in
    /// place (a stale reference past the end must never come back to life).
    extendable: bool,
    parent: u32,
    /// Offset in the parent where this run hangs (see the module docs).
    parent_off: u32,
    covers: Covers,
    branches: Branches,
    hashes: SmallVec<[LocalBlockHash; 1]>,
}

impl Run {
    #[inline]
    fn len(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// How many leading blocks `slot` holds (0 if none).
    #[inline]
    fn depth_of(&self, slot: u32) -> u32 {
        match self.covers.binary_search_by_key(&slot, |c| c.slot) {
            Ok(i) => self.covers[i].depth,
            Err(_) => 0,
        }
    }

    #[inline]
    fn holds(&self, slot: u32) -> bool {
        self.covers.binary_search_by_key(&slot, |c| c.slot).is_ok()
    }

    /// Raise `slot`'s depth to at least `depth`; returns how many blocks it newly holds.
    #[inline]
    fn cover(&mut self, slot: u32, depth: u32) -> u32 {
        match self.covers.binary_search_by_key(&slot, |c| c.slot) {
            Ok(i) => {
                let c = &mut self.covers[i];
                let added = depth.saturating_sub(c.depth);
                c.depth = c.depth.max(depth);
                added
            }
            Err(i) => {
                self.covers.insert(i, Cover { slot, depth });
                depth
            }
        }
    }

    fn max_depth(&self) -> u32 {
        self.covers.iter().map(|c| c.depth).max().unwrap_or(0)
    }
}

#[derive(Debug)]
struct WorkerEntry {
    lookup: BlockMap,
}

/// Exact prefix index over every worker rank's cached blocks.
///
/// Shapes: queries are slices of [`LocalBlockHash`] from the sequence start; answers are, per
/// `(worker, dp_rank)`, the number of *contiguous* leading blocks it holds.
#[derive(Debug)]
pub struct KvIndex {
    runs: Vec<Run>,
    free: Vec<u32>,
    /// Blocks across all runs (distinct prefixes): [`KvIndex::num_blocks`].
    blocks: usize,
    /// `(block, worker)` coverage pairs: [`KvIndex::current_size`].
    coverage: usize,
    slots: Vec<Option<WorkerEntry>>,
    /// The rank of each slot, dense so that building an answer reads 16 bytes per rank.
    keys: Vec<WorkerWithDpRank>,
    free_slots: Vec<u32>,
    slot_of: FastMap<WorkerWithDpRank, u32>,
    /// The last rank looked up and its slot: an engine publishes its events in runs (a step's
    /// removals, then its stores), so most events skip the map.
    last_slot: Option<(WorkerWithDpRank, u32)>,
    /// Reused by subtree removal so removals do not allocate.
    scratch: Vec<(u32, u32)>,
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
            runs: vec![Run::default()],
            free: Vec::new(),
            blocks: 0,
            coverage: 0,
            slots: Vec::new(),
            keys: Vec::new(),
            free_slots: Vec::new(),
            slot_of: FastMap::default(),
            last_slot: None,
            scratch: Vec::new(),
        }
    }

    /// Number of `(block, worker rank)` pairs held: a block cached by three ranks counts three.
    pub fn current_size(&self) -> usize {
        self.coverage
    }

    /// Number of distinct blocks (prefixes) in the tree.
    pub fn num_blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks `worker` holds (its share of [`KvIndex::current_size`]); constant time, for
    /// per-worker views such as the dashboard.
    pub fn worker_blocks(&self, worker: WorkerWithDpRank) -> usize {
        self.slot_of
            .get(&worker)
            .and_then(|&s| self.slots.get(s as usize)?.as_ref())
            .map_or(0, |w| w.lookup.len())
    }

    /// Worker ranks the index knows (those that ever stored a block and were not removed).
    pub fn workers(&self) -> Vec<WorkerWithDpRank> {
        let mut v: Vec<_> = self.slot_of.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Estimate of heap bytes used by the index's own structures (runs, their hashes, branch
    /// maps, coverage lists that spilled to the heap, per-worker maps). Excludes allocator
    /// overhead.
    pub fn memory_bytes(&self) -> usize {
        let mut bytes =
            self.runs.capacity() * std::mem::size_of::<Run>() + self.free.capacity() * 4;
        for r in &self.runs {
            bytes += r.branches.heap_bytes();
            if r.covers.spilled() {
                bytes += r.covers.capacity() * std::mem::size_of::<Cover>();
            }
            if r.hashes.spilled() {
                bytes += r.hashes.capacity() * std::mem::size_of::<LocalBlockHash>();
            }
        }
        for w in self.slots.iter().flatten() {
            bytes += w.lookup.heap_bytes();
        }
        bytes += self.slots.capacity() * std::mem::size_of::<Option<WorkerEntry>>();
        bytes += self.keys.capacity() * std::mem::size_of::<WorkerWithDpRank>();
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

    /// Apply a batch of events in order, as [`KvIndex::apply`] would one by one, calling
    /// `on_error` for each rejected event. Faster than the loop: while one event is applied,
    /// the memory the next ones will need is already being fetched, in the order it will be
    /// needed: the event's own block list eight events ahead, then the place in the per-worker
    /// map of its first lookup four ahead, then the run that lookup points to two ahead.
    pub fn apply_batch<'e>(
        &mut self,
        events: &'e [RouterEvent],
        mut on_error: impl FnMut(&'e RouterEvent, IndexError),
    ) {
        const EVENT_AHEAD: usize = 8;
        const MAP_AHEAD: usize = 4;
        const RUN_AHEAD: usize = 2;
        for (i, ev) in events.iter().enumerate() {
            if let Some(e) = events.get(i + EVENT_AHEAD) {
                match &e.event.data {
                    KvCacheEventData::Removed(r) => r.block_hashes.first().map(prefetch),
                    KvCacheEventData::Stored(s) => s.blocks.first().map(prefetch),
                    KvCacheEventData::Cleared => None,
                };
            }
            if let Some(e) = events.get(i + MAP_AHEAD) {
                // (A store's own blocks are prefetched by `apply_stored` as it starts.)
                if let Some((w, h)) = self.first_lookup(e) {
                    w.lookup.prefetch(h);
                }
            }
            if let Some(e) = events.get(i + RUN_AHEAD) {
                if let Some((w, h)) = self.first_lookup(e) {
                    if let Some(r) = w.lookup.get(h) {
                        if let Some(run) = self.runs.get(r.id as usize) {
                            prefetch(run);
                        }
                    }
                }
            }
            if let Err(err) = self.apply(ev) {
                on_error(ev, err);
            }
        }
    }

    /// The per-worker map and the engine hash an event will look up first (a removal's first
    /// block, a store's parent).
    #[inline]
    fn first_lookup(&self, e: &RouterEvent) -> Option<(&WorkerEntry, ExternalHash)> {
        let h = match &e.event.data {
            KvCacheEventData::Removed(r) => *r.block_hashes.first()?,
            KvCacheEventData::Stored(s) => s.parent_hash?,
            KvCacheEventData::Cleared => return None,
        };
        let slot = self.peek_slot(e.worker())?;
        Some((self.slots[slot as usize].as_ref()?, h))
    }

    /// Longest contiguous prefix of `query` held by each worker rank (ranks with 0 omitted).
    ///
    /// With `early_exit`, the walk stops as soon as a single rank remains; that rank's score is
    /// then the depth at which it became the only one (Dynamo's semantics).
    pub fn find_matches(&self, query: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        let mut scores = Vec::new();
        let Some(&first) = query.first() else {
            return OverlapScores { scores };
        };
        let Some(mut cur) = self.runs[ROOT as usize].branches.get(0, first) else {
            return OverlapScores { scores };
        };
        // Every rank that scores holds the first block, so it is in the first run: one allocation.
        scores.reserve_exact(self.runs[cur as usize].covers.len());
        let keys = &self.keys[..];
        let mut start = 0u32;
        loop {
            let run = &self.runs[cur as usize];
            let covers: &[Cover] = &run.covers;
            let hashes: &[LocalBlockHash] = &run.hashes;
            let rest = &query[start as usize..];
            // rest[0] == hashes[0] by construction of the branch key.
            let n = hashes.len().min(rest.len());
            let m = 1 + hashes[1..n]
                .iter()
                .zip(&rest[1..n])
                .take_while(|(a, b)| a == b)
                .count() as u32;
            if early_exit {
                if let Some(o) = sole_holder_from(covers) {
                    if o < m {
                        scores.extend(covers.iter().map(|c| {
                            let s = if c.depth > o { o + 1 } else { c.depth };
                            (keys[c.slot as usize], start + s)
                        }));
                        break;
                    }
                }
            }
            let next = rest.get(m as usize).and_then(|&h| run.branches.get(m, h));
            // Ranks that stop in this run score here; slices of `covers`, so that each is one
            // tight copy.
            let mut emit = |part: &[Cover]| {
                scores.extend(
                    part.iter()
                        .map(|c| (keys[c.slot as usize], start + c.depth.min(m))),
                )
            };
            let Some(child) = next else {
                emit(covers);
                break;
            };
            // Ranks going on into the branch (a subset, sorted like ours) score there.
            let mut from = 0;
            for x in self.runs[child as usize].covers.iter() {
                let at = from + covers[from..].partition_point(|c| c.slot < x.slot);
                emit(&covers[from..at]);
                from = (at + 1).min(covers.len());
            }
            emit(&covers[from..]);
            start += m;
            cur = child;
        }
        OverlapScores { scores }
    }

    /// Drop every block of every rank of `worker_id` and forget the ranks.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        for key in self.ranks_of(worker_id) {
            self.clear_worker_rank(key);
            if let Some(slot) = self.slot_of.remove(&key) {
                self.last_slot = None;
                self.slots[slot as usize] = None;
                self.keys[slot as usize] = WorkerWithDpRank::default();
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
        let Some(slot) = self.lookup_slot(worker) else {
            return;
        };
        if let Some(w) = self.slots[slot as usize].as_mut() {
            w.lookup = BlockMap::default();
        }
        let mut tops = Vec::new();
        self.runs[ROOT as usize]
            .branches
            .for_each(|_, _, c| tops.push(c));
        for c in tops {
            if self.runs[c as usize].holds(slot) {
                self.cut(c, slot, 0);
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
        // (run, sequence hash of the block before it)
        let mut stack: Vec<(u32, Option<SequenceHash>)> = Vec::new();
        self.push_held_branches(ROOT, slot, u32::MAX, &mut |c, _| stack.push((c, None)));
        while let Some((id, before)) = stack.pop() {
            let run = &self.runs[id as usize];
            let depth = run.depth_of(slot);
            let mut seqs = Vec::with_capacity(depth as usize);
            let mut seq = before;
            for &h in &run.hashes[..depth as usize] {
                let s = match seq {
                    None => SequenceHash(h.0),
                    Some(p) => crate::hash::chain_hash(p, h),
                };
                seqs.push(s);
                seq = Some(s);
            }
            self.push_held_branches(id, slot, depth, &mut |c, off| {
                let before = match off {
                    0 => before,
                    o => Some(seqs[o as usize - 1]),
                };
                stack.push((c, before));
            });
            out.extend(seqs);
        }
        out.sort_unstable();
        out
    }

    /// The whole index as `Stored` events that rebuild an identical index when applied to an
    /// empty one: per worker rank, one event per run it holds (its held part), parents first,
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
            let mut ext_of: FastMap<(u32, u32), ExternalHash> = FastMap::default();
            for (ext, r) in entry.lookup.iter() {
                if self.is_live(r, slot) {
                    ext_of.insert((r.id, r.off), ext);
                }
            }
            // A block held without an engine hash (the engine reused its hash for another
            // block) gets a synthetic one, unique per block, so a rebuild keeps it.
            let ext = |id: u32, off: u32| {
                ext_of.get(&(id, off)).copied().unwrap_or(ExternalHash(
                    (1 << 63) | (u64::from(id) << 32) | u64::from(off),
                ))
            };
            let mut event_id = 0u64;
            let mut stack: Vec<u32> = Vec::new();
            let mut kids = Vec::new();
            self.push_held_branches(ROOT, slot, u32::MAX, &mut |c, _| kids.push(c));
            self.push_sorted(&mut kids, &mut stack);
            while let Some(id) = stack.pop() {
                let run = &self.runs[id as usize];
                let depth = run.depth_of(slot);
                let parent = (run.parent != ROOT).then(|| ext(run.parent, run.parent_off - 1));
                let blocks = (0..depth)
                    .map(|off| StoredBlock {
                        block_hash: ext(id, off),
                        tokens_hash: run.hashes[off as usize],
                        mm_extra_info: None,
                    })
                    .collect();
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
                self.push_held_branches(id, slot, depth, &mut |c, _| kids.push(c));
                self.push_sorted(&mut kids, &mut stack);
            }
        }
        out
    }

    // ---- internals ----

    /// Calls `f(child, offset)` for each branch of `id` at an offset `≤ depth` held by `slot`.
    fn push_held_branches(&self, id: u32, slot: u32, depth: u32, f: &mut impl FnMut(u32, u32)) {
        self.runs[id as usize].branches.for_each(|off, _, c| {
            if off <= depth && self.runs[c as usize].holds(slot) {
                f(c, off);
            }
        });
    }

    /// Moves `kids` onto `stack` so that they pop in a deterministic order (by first hash),
    /// whatever the branch maps' iteration order.
    fn push_sorted(&self, kids: &mut Vec<u32>, stack: &mut Vec<u32>) {
        kids.sort_unstable_by_key(|&c| {
            let r = &self.runs[c as usize];
            std::cmp::Reverse((r.parent_off, r.hashes[0]))
        });
        stack.append(kids);
    }

    fn ranks_of(&self, worker_id: WorkerId) -> Vec<WorkerWithDpRank> {
        self.slot_of
            .keys()
            .filter(|k| k.worker_id == worker_id)
            .copied()
            .collect()
    }

    /// Whether `r` still names a block that `slot` holds.
    #[inline]
    fn is_live(&self, r: BlockRef, slot: u32) -> bool {
        r.id != ROOT
            // A depth never exceeds the run's length, so this also means `off < len`.
            && self.runs.get(r.id as usize).is_some_and(|run| {
                run.generation == r.generation && run.depth_of(slot) > r.off
            })
    }

    /// The slot of `worker`, if it has one; remembered for the next event.
    #[inline]
    fn lookup_slot(&mut self, worker: WorkerWithDpRank) -> Option<u32> {
        if let Some((w, s)) = self.last_slot {
            if w == worker {
                return Some(s);
            }
        }
        let s = *self.slot_of.get(&worker)?;
        self.last_slot = Some((worker, s));
        Some(s)
    }

    /// [`KvIndex::lookup_slot`] without remembering (for `&self` paths).
    #[inline]
    fn peek_slot(&self, worker: WorkerWithDpRank) -> Option<u32> {
        match self.last_slot {
            Some((w, s)) if w == worker => Some(s),
            _ => self.slot_of.get(&worker).copied(),
        }
    }

    fn slot_for(&mut self, worker: WorkerWithDpRank) -> u32 {
        if let Some(s) = self.lookup_slot(worker) {
            return s;
        }
        let entry = WorkerEntry {
            lookup: BlockMap::default(),
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(entry);
                self.keys[s as usize] = worker;
                s
            }
            None => {
                self.slots.push(Some(entry));
                self.keys.push(worker);
                (self.slots.len() - 1) as u32
            }
        };
        self.slot_of.insert(worker, slot);
        self.last_slot = Some((worker, slot));
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
        // Position of the next block: offset `off` of run `run`.
        let (mut run, mut off) = match s.parent_hash {
            None => (ROOT, 0),
            Some(p) => {
                let found = self.slots[slot as usize]
                    .as_ref()
                    .and_then(|w| w.lookup.get(p));
                match found {
                    Some(r) if self.is_live(r, slot) => (r.id, r.off + 1),
                    _ => return Err(IndexError::ParentBlockNotFound { worker, parent: p }),
                }
            }
        };
        let blocks = &s.blocks[..];
        // Each block's map entry is a likely cache miss: start them all now.
        if let Some(w) = self.slots[slot as usize].as_ref() {
            for b in blocks {
                w.lookup.prefetch(b.block_hash);
            }
        }
        let mut i = 0;
        while i < blocks.len() {
            let h = blocks[i].tokens_hash;
            let r = &self.runs[run as usize];
            // Where block `i` goes, and how many of the store's blocks land in that run.
            let end = if off < r.len() && r.hashes[off as usize] == h {
                // Already in the run: follow its chain as far as the store does.
                let mut j = i + 1;
                while j < blocks.len()
                    && ((off as usize + j - i) < r.hashes.len())
                    && r.hashes[off as usize + j - i] == blocks[j].tokens_hash
                {
                    j += 1;
                }
                j
            } else if let Some(c) = r.branches.get(off, h) {
                (run, off) = (c, 0);
                continue;
            } else if run != ROOT
                && off == r.len()
                && r.extendable
                && r.covers.len() == 1
                && r.covers[0].slot == slot
                && !r.branches.any_from(off)
            {
                // Only this worker holds the run, to its end: the rest of the store grows it.
                self.runs[run as usize]
                    .hashes
                    .extend(blocks[i..].iter().map(|b| b.tokens_hash));
                self.blocks += blocks.len() - i;
                blocks.len()
            } else {
                // A new run takes the rest of the store (nobody else can share it yet).
                let c = self.alloc(run, off, blocks[i..].iter().map(|b| b.tokens_hash));
                self.add_branch(run, off, h, c);
                (run, off) = (c, 0);
                blocks.len()
            };
            // Blocks `i..end` are `off..` of `run`; this worker holds everything before them.
            let depth = off + (end - i) as u32;
            let r = &mut self.runs[run as usize];
            let added = r.cover(slot, depth);
            let generation = r.generation;
            self.coverage += added as usize;
            if off == 0 && added == depth {
                let parent = self.runs[run as usize].parent;
                self.runs[parent as usize].branches.count_holder(slot, true);
            }
            if let Some(w) = self.slots[slot as usize].as_mut() {
                for (k, b) in blocks[i..end].iter().enumerate() {
                    let r = BlockRef {
                        id: run,
                        generation,
                        off: off + k as u32,
                    };
                    w.lookup.insert(b.block_hash, r);
                }
            }
            off = depth;
            i = end;
        }
        Ok(())
    }

    fn apply_removed(
        &mut self,
        worker: WorkerWithDpRank,
        hashes: &[ExternalHash],
    ) -> Result<(), IndexError> {
        let Some(slot) = self.lookup_slot(worker) else {
            return match hashes.len() {
                0 => Ok(()),
                n => Err(IndexError::BlockNotFound { worker, missing: n }),
            };
        };
        let mut missing = 0;
        for h in hashes {
            let r = self.slots[slot as usize]
                .as_mut()
                .and_then(|w| w.lookup.remove(*h));
            match r {
                Some(r) => self.cut_from(r, slot),
                None => missing += 1,
            }
        }
        self.compact_if_empty();
        match missing {
            0 => Ok(()),
            n => Err(IndexError::BlockNotFound { worker, missing: n }),
        }
    }

    /// Take `slot` off block `r` and everything after it, if `r` still names a block it holds
    /// (else the block was already dropped with an ancestor and this does nothing). The
    /// removal path: one search of the run's coverage serves both the check and the cut.
    #[inline]
    fn cut_from(&mut self, r: BlockRef, slot: u32) {
        let Some(run) = self.runs.get(r.id as usize) else {
            return;
        };
        if r.id == ROOT || run.generation != r.generation {
            return;
        }
        let Ok(i) = run.covers.binary_search_by_key(&slot, |c| c.slot) else {
            return;
        };
        if run.covers[i].depth <= r.off {
            return;
        }
        // Engines evict leaves first: the common case has no branch of this worker to visit.
        if self.holds_branch_past(r.id, slot, r.off) {
            self.cut_subtree(r.id, slot, r.off);
        } else {
            self.cut_at(r.id, i, slot, r.off);
        }
    }

    /// Cut `slot`'s coverage of run `id` down to `depth` blocks and take it off every branch
    /// that hangs after that point; truncate or free runs nobody holds any more.
    fn cut(&mut self, id: u32, slot: u32, depth: u32) {
        if self.holds_branch_past(id, slot, depth) {
            self.cut_subtree(id, slot, depth);
        } else {
            self.cut_one(id, slot, depth);
        }
    }

    /// `cut` when `slot` holds a branch of `id` past `depth`.
    fn cut_subtree(&mut self, id: u32, slot: u32, depth: u32) {
        let mut order = std::mem::take(&mut self.scratch);
        order.clear();
        order.push((id, depth));
        let mut i = 0;
        while i < order.len() {
            let (n, d) = order[i];
            i += 1;
            if !self.holds_branch_past(n, slot, d) {
                continue;
            }
            let runs = &self.runs;
            runs[n as usize].branches.for_each(|off, _, c| {
                if off > d && runs[c as usize].holds(slot) {
                    order.push((c, 0));
                }
            });
        }
        // Breadth-first order reversed: branches before the runs they hang from, so a run has
        // no branch past its new end by the time it is truncated.
        for &(n, d) in order.iter().rev() {
            self.cut_one(n, slot, d);
        }
        self.scratch = order;
    }

    /// Whether `slot` may hold a branch of `id` hanging past offset `depth` (exact for a single
    /// branch; for a fan, whether it holds any branch at all).
    #[inline]
    fn holds_branch_past(&self, id: u32, slot: u32, depth: u32) -> bool {
        match &self.runs[id as usize].branches {
            Branches::None => false,
            Branches::One(off, _, c) => *off > depth && self.runs[*c as usize].holds(slot),
            Branches::Many(f) => f.holders.contains_key(&slot),
        }
    }

    /// Hang run `c` (first block `h`) at offset `off` of `run`.
    fn add_branch(&mut self, run: u32, off: u32, h: LocalBlockHash, c: u32) {
        let branches = match std::mem::take(&mut self.runs[run as usize].branches) {
            Branches::None => Branches::One(off, h, c),
            Branches::One(o, k, v) => {
                // Second branch: count the first one's holders from now on (the new run has
                // none yet).
                let mut fan = Fan::default();
                fan.map.insert((o, k), v);
                fan.map.insert((off, h), c);
                for cv in &self.runs[v as usize].covers {
                    fan.holders.insert(cv.slot, 1);
                }
                Branches::Many(Box::new(fan))
            }
            Branches::Many(mut fan) => {
                fan.map.insert((off, h), c);
                Branches::Many(fan)
            }
        };
        self.runs[run as usize].branches = branches;
    }

    /// `cut` for one run whose branches past `depth` no longer hold `slot`.
    #[inline]
    fn cut_one(&mut self, id: u32, slot: u32, depth: u32) {
        if let Ok(i) = self.runs[id as usize]
            .covers
            .binary_search_by_key(&slot, |c| c.slot)
        {
            self.cut_at(id, i, slot, depth);
        }
    }

    /// `cut_one` with `slot`'s place `i` in the run's coverage known.
    #[inline]
    fn cut_at(&mut self, id: u32, i: usize, slot: u32, depth: u32) {
        let run = &mut self.runs[id as usize];
        let had = run.covers[i].depth;
        if had <= depth {
            return;
        }
        self.coverage -= (had - depth) as usize;
        if depth == 0 {
            run.covers.remove(i);
            let parent = run.parent;
            self.runs[parent as usize]
                .branches
                .count_holder(slot, false);
        } else {
            run.covers[i].depth = depth;
        }
        // A run ends where its deepest holder does: only cutting that holder can shorten it.
        let run = &mut self.runs[id as usize];
        let len = run.len();
        if had < len {
            return;
        }
        let keep = run.max_depth();
        if keep == len {
            return;
        }
        if keep == 0 {
            self.free_run(id);
        } else {
            debug_assert!(
                !run.branches.any_from(keep + 1),
                "prefix-closed coverage violated"
            );
            self.blocks -= (len - keep) as usize;
            run.hashes.truncate(keep as usize);
            run.extendable = false;
        }
    }

    /// A new run of `hashes` hanging at offset `parent_off` of `parent` (not linked yet); counts
    /// its blocks.
    fn alloc(
        &mut self,
        parent: u32,
        parent_off: u32,
        hashes: impl ExactSizeIterator<Item = LocalBlockHash>,
    ) -> u32 {
        self.blocks += hashes.len();
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.runs.push(Run::default());
                (self.runs.len() - 1) as u32
            }
        };
        let r = &mut self.runs[id as usize];
        r.hashes.reserve_exact(hashes.len());
        r.hashes.extend(hashes);
        r.parent = parent;
        r.parent_off = parent_off;
        r.extendable = true;
        id
    }

    fn free_run(&mut self, id: u32) {
        let (parent, off, first) = {
            let r = &mut self.runs[id as usize];
            debug_assert!(r.branches.is_empty(), "prefix-closed coverage violated");
            self.blocks -= r.hashes.len();
            let first = r.hashes[0];
            r.generation = r.generation.wrapping_add(1);
            r.branches = Branches::None;
            r.covers = Covers::new();
            r.hashes = SmallVec::new();
            (r.parent, r.parent_off, first)
        };
        self.runs[parent as usize].branches.remove(off, first);
        self.free.push(id);
    }

    /// Give memory back when nothing is indexed any more: with no run (every live run hangs
    /// from the root) and no per-worker reference left, generations can restart and the arena
    /// shrink to the root. (An emptied per-worker map frees its buckets itself.)
    #[inline(always)]
    fn compact_if_empty(&mut self) {
        // Inline the cheap test: it runs after every removal and is almost always false.
        if self.runs[ROOT as usize].branches.is_empty() && self.runs.len() > 1 {
            self.compact();
        }
    }

    #[cold]
    fn compact(&mut self) {
        if self.slots.iter().flatten().all(|w| w.lookup.len() == 0) {
            self.runs.truncate(1);
            self.runs.shrink_to_fit();
            self.free = Vec::new();
        }
    }
}

/// With early exit: the first offset at which exactly one rank still holds the run's block,
/// if there is one (ranks hold prefixes, so that is the second-deepest depth, and the deepest
/// must be unique).
fn sole_holder_from(covers: &[Cover]) -> Option<u32> {
    let (mut first, mut second) = (0u32, 0u32);
    for c in covers {
        if c.depth > first {
            second = first;
            first = c.depth;
        } else if c.depth > second {
            second = c.depth;
        }
    }
    (first > second && covers.iter().filter(|c| c.depth == first).count() == 1).then_some(second)
}

/// Fibonacci hashing's multiplier (2^64 / φ), for the short-store set below.
const SET_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// A store whose parent is one of its own blocks, or that repeats a block hash (spec §3.2:
/// engines occasionally emit these; they would create cycles in the per-worker map).
fn is_self_referencing(s: &StoredData) -> bool {
    let hashes = || {
        s.parent_hash
            .iter()
            .copied()
            .chain(s.blocks.iter().map(|b| b.block_hash))
    };
    // Up to 96 hashes (a store of 1,536 tokens at block size 16): an exact set on the stack,
    // open addressing in 128 slots, one pass and no allocation.
    // Slot value 0 means empty, so the hash 0 is tracked apart.
    const SLOTS: usize = 128;
    if s.blocks.len() < SLOTS * 3 / 4 {
        let mut table = [0u64; SLOTS];
        let mut zero = false;
        for h in hashes() {
            if h.0 == 0 {
                if zero {
                    return true;
                }
                zero = true;
                continue;
            }
            let mut i = (h.0.wrapping_mul(SET_MUL) >> 57) as usize;
            while table[i] != 0 {
                if table[i] == h.0 {
                    return true;
                }
                i = (i + 1) % SLOTS;
            }
            table[i] = h.0;
        }
        return false;
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
    use super::*;

    fn store(parent: Option<ExternalHash>, hashes: &[ExternalHash]) -> StoredData {
        StoredData {
            parent_hash: parent,
            start_position: None,
            blocks: hashes
                .iter()
                .map(|&h| StoredBlock {
                    block_hash: h,
                    tokens_hash: LocalBlockHash(h.0),
                    mm_extra_info: None,
                })
                .collect(),
        }
    }

    fn naive(s: &StoredData) -> bool {
        let mut all: Vec<u64> = s.blocks.iter().map(|b| b.block_hash.0).collect();
        all.extend(s.parent_hash.map(|p| p.0));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        all.len() < n
    }

    #[test]
    fn worker_blocks_count_each_ranks_share() {
        let w = |id, r| WorkerWithDpRank::new(id, r);
        let mut idx = KvIndex::new();
        let blocks =
            |from: u64, n: u64| (from..from + n).map(|h| (ExternalHash(h), LocalBlockHash(h)));
        idx.apply(&stored_event(w(1, 0), 0, None, blocks(100, 5)))
            .unwrap();
        idx.apply(&stored_event(w(1, 1), 0, None, blocks(100, 3)))
            .unwrap();
        idx.apply(&stored_event(w(2, 0), 0, None, blocks(100, 2)))
            .unwrap();
        assert_eq!(idx.worker_blocks(w(1, 0)), 5);
        assert_eq!(idx.worker_blocks(w(1, 1)), 3);
        assert_eq!(idx.worker_blocks(w(2, 0)), 2);
        assert_eq!(idx.worker_blocks(w(3, 0)), 0);
        assert_eq!(idx.current_size(), 10);
        idx.apply(&removed_event(w(1, 0), 1, vec![ExternalHash(104)]))
            .unwrap();
        assert_eq!(idx.worker_blocks(w(1, 0)), 4);
        idx.clear_worker_rank(w(1, 1));
        assert_eq!(idx.worker_blocks(w(1, 1)), 0);
    }

    /// The short-store set probes: hashes that all want its first slot (`i · SET_MUL⁻¹`), hashes
    /// spread over it, and 0 (its empty marker) must give the naive answer for every length and
    /// repeat position, on both sides of the 96-hash limit.
    #[test]
    fn repeats_are_found_however_hashes_crowd_the_set() {
        // SET_MUL is odd, so it has an inverse mod 2^64 (Newton's iteration doubles the bits).
        let mut inv = SET_MUL;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(SET_MUL.wrapping_mul(inv)));
        }
        assert_eq!(inv.wrapping_mul(SET_MUL), 1);
        let kinds: [&dyn Fn(u64) -> ExternalHash; 3] = [
            &|i| ExternalHash(inv.wrapping_mul(i + 1)),
            &|i| ExternalHash(i.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            &|i| ExternalHash(i),
        ];
        for kind in kinds {
            for len in 1..=130u64 {
                let clean: Vec<ExternalHash> = (0..len).map(kind).collect();
                assert!(!is_self_referencing(&store(None, &clean)));
                assert!(!is_self_referencing(&store(Some(kind(len)), &clean)));
                let n = len as usize;
                for (i, j) in [(0, n - 1), (n / 2, n - 1), (n / 3, n / 2), (0, 1)] {
                    if i >= j || j >= n {
                        continue;
                    }
                    let mut dup = clean.clone();
                    dup[j] = dup[i];
                    let s = store(None, &dup);
                    assert!(naive(&s) && is_self_referencing(&s), "{i}, {j} of {len}");
                }
                let s = store(Some(clean[n / 2]), &clean);
                assert!(naive(&s) && is_self_referencing(&s), "parent among {len}");
            }
        }
    }
}
