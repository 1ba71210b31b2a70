//! Per worker rank: the engine's (opaque) block hash → where that block sits in the index.
//!
//! This map is the index's largest structure and the one every event touches (a removal looks
//! its block up, a store inserts one entry per block), so it is built for one cache line per
//! operation: a bucket is one 64-byte line holding three entries and a little metadata. A
//! general-purpose SwissTable reads a control-byte group and then a bucket elsewhere: two lines.
//!
//! * Buckets are addressed by `fastrange` (the high half of `hash × buckets`), so the bucket
//!   count need not be a power of two and the table grows by 1.5×.
//! * An entry whose home bucket is full goes to the next bucket with room (linear probing by
//!   bucket). Each bucket counts the entries that passed it on their way out ("overflow
//!   count", as in Folly's F14 tables): a search stops at the first bucket whose count is zero,
//!   and a removal decrements the counts along its path, so deletions leave no tombstones. A
//!   count that reaches 255 stays there (searches just go on probing).

use std::hash::BuildHasher;

use crate::hash::ExternalHash;

/// Where a worker's engine hash points: block `off` of run `id`, valid while the run's
/// generation is `generation` (see `radix.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BlockRef {
    pub id: u32,
    pub generation: u32,
    pub off: u32,
}

const SLOTS: usize = 3;
const OCCUPIED: u32 = (1 << SLOTS) - 1;
const OVERFLOW_SHIFT: u32 = 8;
const OVERFLOW_MAX: u32 = 255;

/// One cache line: three entries, which of them are occupied, and the overflow count.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    keys: [u64; SLOTS],
    refs: [BlockRef; SLOTS],
    /// Bits 0..3: occupied slots; bits 8..16: overflow count.
    meta: u32,
}

impl Bucket {
    #[inline]
    fn occupied(&self) -> u32 {
        self.meta & OCCUPIED
    }

    #[inline]
    fn overflow(&self) -> u32 {
        self.meta >> OVERFLOW_SHIFT
    }

    /// The occupied slot holding `key`, if any. Branch-free over the three slots: a bucket is
    /// searched on every event, and a loop with early exits costs more than the three compares.
    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        let hits = u32::from(self.keys[0] == key)
            | u32::from(self.keys[1] == key) << 1
            | u32::from(self.keys[2] == key) << 2;
        let hits = hits & self.occupied();
        (hits != 0).then(|| hits.trailing_zeros() as usize)
    }

    #[inline]
    fn free_slot(&self) -> Option<usize> {
        let free = !self.meta & OCCUPIED;
        (free != 0).then(|| free.trailing_zeros() as usize)
    }

    #[inline]
    fn add_overflow(&mut self, up: bool) {
        let n = self.overflow();
        if n == OVERFLOW_MAX {
            return;
        }
        // Only decremented along paths that incremented it; saturate rather than panic.
        debug_assert!(up || n > 0, "overflow count below zero");
        let n = if up { n + 1 } else { n.saturating_sub(1) };
        self.meta = (self.meta & OCCUPIED) | (n << OVERFLOW_SHIFT);
    }
}

/// Map from engine block hash to [`BlockRef`]; see the module docs for the layout.
#[derive(Default)]
pub(crate) struct BlockMap {
    buckets: Box<[Bucket]>,
    len: usize,
    /// `max_len(buckets.len())`, kept so that an insert does not recompute it.
    grow_at: usize,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("len", &self.len)
            .field("buckets", &self.buckets.len())
            .finish()
    }
}

/// Grow when more than 4/5 of the slots are taken; at most 1.5× then.
#[inline]
fn max_len(buckets: usize) -> usize {
    buckets * SLOTS * 4 / 5
}

impl BlockMap {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held (the bucket array).
    pub fn heap_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<Bucket>()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        let h = self.hasher.hash_one(key);
        ((u128::from(h) * self.buckets.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, b: usize) -> usize {
        if b + 1 == self.buckets.len() {
            0
        } else {
            b + 1
        }
    }

    /// `(bucket, slot)` of `key`, if present; the search starts at its home bucket `b`.
    #[inline]
    fn locate(&self, key: u64, mut b: usize) -> Option<(usize, usize)> {
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[b];
            if let Some(i) = bucket.find(key) {
                return Some((b, i));
            }
            if bucket.overflow() == 0 {
                return None;
            }
            b = self.next(b);
        }
        None
    }

    /// Hint the CPU to start loading `key`'s home bucket (for the next event in a batch).
    #[inline]
    pub fn prefetch(&self, key: ExternalHash) {
        if !self.buckets.is_empty() {
            crate::index::prefetch(&self.buckets[self.home(key.0)]);
        }
    }

    #[inline]
    pub fn get(&self, key: ExternalHash) -> Option<BlockRef> {
        if self.buckets.is_empty() {
            return None;
        }
        self.locate(key.0, self.home(key.0))
            .map(|(b, i)| self.buckets[b].refs[i])
    }

    /// Insert or replace; returns the previous value.
    pub fn insert(&mut self, key: ExternalHash, r: BlockRef) -> Option<BlockRef> {
        let key = key.0;
        if self.len < self.grow_at {
            // One hash for both the search and the placement.
            let home = self.home(key);
            if let Some((b, i)) = self.locate(key, home) {
                return Some(std::mem::replace(&mut self.buckets[b].refs[i], r));
            }
            self.place(key, r, home);
            self.len += 1;
            return None;
        }
        if !self.buckets.is_empty() {
            if let Some((b, i)) = self.locate(key, self.home(key)) {
                return Some(std::mem::replace(&mut self.buckets[b].refs[i], r));
            }
        }
        self.resize(self.len + 1);
        self.place(key, r, self.home(key));
        self.len += 1;
        None
    }

    /// Put a key known to be absent into the first bucket with room from its home `b` on.
    #[inline]
    fn place(&mut self, key: u64, r: BlockRef, mut b: usize) {
        loop {
            let bucket = &mut self.buckets[b];
            if let Some(i) = bucket.free_slot() {
                bucket.keys[i] = key;
                bucket.refs[i] = r;
                bucket.meta |= 1 << i;
                break;
            }
            bucket.add_overflow(true);
            b = self.next(b);
        }
    }

    pub fn remove(&mut self, key: ExternalHash) -> Option<BlockRef> {
        if self.buckets.is_empty() {
            return None;
        }
        let home = self.home(key.0);
        let (at, i) = self.locate(key.0, home)?;
        let bucket = &mut self.buckets[at];
        bucket.meta &= !(1 << i);
        let r = bucket.refs[i];
        let mut b = home;
        while b != at {
            self.buckets[b].add_overflow(false);
            b = self.next(b);
        }
        self.len -= 1;
        if self.len == 0 {
            self.buckets = Box::default();
            self.grow_at = 0;
        } else if self.len * 4 < self.grow_at && self.buckets.len() > 16 {
            self.resize(self.len);
        }
        Some(r)
    }

    /// Rebuild for `len` entries at 8/15 of the slots (two thirds of the growth threshold,
    /// so that growing is 1.5×).
    #[cold]
    #[inline(never)]
    fn resize(&mut self, len: usize) {
        let want = (len * 5).div_ceil(8).max(4);
        let old = std::mem::replace(
            &mut self.buckets,
            vec![Bucket::default(); want].into_boxed_slice(),
        );
        self.grow_at = max_len(want);
        for bucket in old.iter() {
            let occ = bucket.occupied();
            for i in 0..SLOTS {
                if occ & (1 << i) != 0 {
                    let key = bucket.keys[i];
                    self.place(key, bucket.refs[i], self.home(key));
                }
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (ExternalHash, BlockRef)> + '_ {
        self.buckets.iter().flat_map(|b| {
            let occ = b.occupied();
            (0..SLOTS)
                .filter(move |&i| occ & (1 << i) != 0)
                .map(move |i| (ExternalHash(b.keys[i]), b.refs[i]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn r(x: u32) -> BlockRef {
        BlockRef {
            id: x,
            generation: x ^ 7,
            off: x / 3,
        }
    }

    #[test]
    fn sequential_keys_grow_shrink_and_free() {
        let mut m = BlockMap::default();
        for k in 0..10_000u32 {
            assert_eq!(m.insert(ExternalHash(u64::from(k)), r(k)), None);
        }
        assert_eq!(m.len(), 10_000);
        // Load stays between 8/15 and 4/5 of the slots: at most 40 bytes per entry.
        assert!(
            m.heap_bytes() <= 10_000 * 40,
            "load too low: {}",
            m.heap_bytes()
        );
        for k in 0..10_000u32 {
            assert_eq!(m.get(ExternalHash(u64::from(k))), Some(r(k)));
        }
        for k in 0..10_000u32 {
            assert_eq!(m.remove(ExternalHash(u64::from(k))), Some(r(k)));
            assert_eq!(m.get(ExternalHash(u64::from(k))), None);
        }
        assert_eq!((m.len(), m.heap_bytes()), (0, 0));
    }

    proptest! {
        /// Agrees with `HashMap` on random insert / replace / remove / get streams over a small
        /// key space (so that probing chains, overflow counts and shrinking are exercised).
        #[test]
        fn agrees_with_hashmap(ops in prop::collection::vec((0u8..4, 0u64..600, any::<u32>()), 1..3000)) {
            let mut m = BlockMap::default();
            let mut model: HashMap<u64, BlockRef> = HashMap::new();
            for (op, k, v) in ops {
                let key = ExternalHash(k.wrapping_mul(0x1000_0000_0001));
                match op {
                    0 | 1 => prop_assert_eq!(m.insert(key, r(v)), model.insert(key.0, r(v))),
                    2 => prop_assert_eq!(m.remove(key), model.remove(&key.0)),
                    _ => prop_assert_eq!(m.get(key), model.get(&key.0).copied()),
                }
                prop_assert_eq!(m.len(), model.len());
            }
            let mut all: Vec<_> = m.iter().map(|(k, v)| (k.0, v.id)).collect();
            all.sort_unstable();
            let mut want: Vec<_> = model.iter().map(|(k, v)| (*k, v.id)).collect();
            want.sort_unstable();
            prop_assert_eq!(all, want);
        }
    }
}
