//! The exact index shared between one writer and many concurrent readers, in one copy:
//! [`SharedIndexWriter`] applies KV events, any number of [`IndexReader`] clones answer
//! `find_matches` on any thread.
//!
//! One [`TieredIndex`] behind a reader-writer lock. The writer applies queued events in chunks
//! of at most [`WRITE_CHUNK`] under one write lock, so a lookup waits at most for one chunk
//! (a few microseconds) and never sees half an event: each event is applied whole. Between
//! chunks the writer lets any lookup that is waiting go first: a writer draining a full queue
//! otherwise re-takes the lock before the parked readers wake, and lookups starved for
//! hundreds of microseconds (`bench/dynamo-compare -- shared`, docs/benchmarks.md). (It was a
//! `left-right` pair before: wait-free reads, but every entry held twice and every event
//! applied twice — gigabytes at a fleet of 100 workers × 100k blocks.)
//!
//! A server feeds every worker's event subscriber into one channel, and one thread drains it
//! in batches: `append` each event, then `publish`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::event::{RouterEvent, WorkerId, WorkerWithDpRank};
use crate::hash::LocalBlockHash;
use crate::index::{IndexError, OverlapScores, TierOverlap, TieredIndex};

/// Events applied under one write lock at most: long enough to keep the batch prefetching of
/// [`KvIndex::apply_batch`](crate::index::KvIndex::apply_batch), short enough that a waiting
/// lookup is delayed by microseconds.
pub const WRITE_CHUNK: usize = 16;

/// The longest the writer lets waiting lookups go first before it takes the lock again: a
/// bound, so that a stream of lookups cannot stall event application.
const READER_TURN: Duration = Duration::from_micros(20);

/// How long a lookup spins on a write-locked index before it parks: about one chunk's time.
const READER_SPIN: Duration = Duration::from_micros(30);

/// A change to the shared index.
#[derive(Clone, Debug)]
pub enum IndexOp {
    /// A KV event from an engine (stored / removed / cleared one rank).
    Event(RouterEvent),
    /// Events applied in order: the same as one `Event` each, but faster (see
    /// [`KvIndex::apply_batch`](crate::index::KvIndex::apply_batch)).
    Events(Vec<RouterEvent>),
    /// The worker left: drop every rank's blocks.
    RemoveWorker(WorkerId),
}

/// Called once per event that the index rejected (unknown parent, unknown block, …), with the
/// rank it was for. Counted by the caller. What a rejected event still changed is as
/// [`KvIndex::apply`](crate::index::KvIndex::apply) documents (a removal's known blocks go).
pub type ErrorSink = Arc<dyn Fn(WorkerWithDpRank, &IndexError) + Send + Sync>;

struct Shared {
    index: RwLock<TieredIndex>,
    /// Lookups blocked on the write lock right now.
    waiting_readers: AtomicUsize,
}

/// The single writer of the shared index. Not `Sync`: own it from one thread (or task).
pub struct SharedIndexWriter {
    shared: Arc<Shared>,
    on_error: Option<ErrorSink>,
    pending: Vec<IndexOp>,
}

/// A reader of the shared index: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct IndexReader {
    shared: Arc<Shared>,
}

/// A new, empty shared index. `on_error` receives every rejected op once.
pub fn shared_index(on_error: Option<ErrorSink>) -> (SharedIndexWriter, IndexReader) {
    let shared = Arc::new(Shared {
        index: RwLock::new(TieredIndex::new()),
        waiting_readers: AtomicUsize::new(0),
    });
    let reader = IndexReader {
        shared: shared.clone(),
    };
    let writer = SharedIndexWriter {
        shared,
        on_error,
        pending: Vec::new(),
    };
    (writer, reader)
}

impl SharedIndexWriter {
    /// Queue an op; readers see it after the next [`publish`](Self::publish).
    pub fn append(&mut self, op: IndexOp) {
        self.pending.push(op);
    }

    /// Apply every queued op, in order, a chunk of events per write lock. Returns how many ops
    /// were applied.
    pub fn publish(&mut self) -> usize {
        let ops = std::mem::take(&mut self.pending);
        let n = ops.len();
        let sink = self.on_error.clone();
        let on_error = |ev: &RouterEvent, e: IndexError| {
            if let Some(sink) = &sink {
                sink(ev.worker(), &e);
            }
        };
        for op in ops {
            match op {
                IndexOp::Event(ev) => {
                    if let Err(e) = self.write().apply(&ev) {
                        on_error(&ev, e);
                    }
                }
                IndexOp::Events(evs) => {
                    for chunk in evs.chunks(WRITE_CHUNK) {
                        self.write().apply_batch(chunk, on_error);
                    }
                }
                IndexOp::RemoveWorker(w) => self.write().remove_worker(w),
            }
        }
        n
    }

    /// The write lock for one chunk, after any lookup already waiting has had its turn.
    fn write(&self) -> RwLockWriteGuard<'_, TieredIndex> {
        if self.shared.waiting_readers.load(Ordering::Acquire) > 0 {
            let since = Instant::now();
            while self.shared.waiting_readers.load(Ordering::Acquire) > 0
                && since.elapsed() < READER_TURN
            {
                std::hint::spin_loop();
            }
        }
        // A panic while applying cannot leave a half-applied event behind a poisoned lock that
        // matters more than serving on: the index stays usable.
        self.shared.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader of this index.
    pub fn reader(&self) -> IndexReader {
        IndexReader {
            shared: self.shared.clone(),
        }
    }
}

impl IndexReader {
    /// Run `f` on the index under a read lock (waiting at most for one chunk of events).
    /// Always `Some` (kept for callers written against the former left-right reader).
    pub fn with<T>(&self, f: impl FnOnce(&TieredIndex) -> T) -> Option<T> {
        use std::sync::TryLockError;
        let mut spun = None;
        let guard = loop {
            match self.shared.index.try_read() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
            // A chunk is being applied: tell the writer (so that it lets this lookup in before
            // its next chunk) and spin for about one chunk's time rather than park, since a
            // futex wake-up costs more than the wait.
            let since = *spun.get_or_insert_with(|| {
                self.shared.waiting_readers.fetch_add(1, Ordering::AcqRel);
                Instant::now()
            });
            if since.elapsed() > READER_SPIN {
                break self.shared.index.read().unwrap_or_else(|e| e.into_inner());
            }
            std::hint::spin_loop();
        };
        if spun.is_some() {
            self.shared.waiting_readers.fetch_sub(1, Ordering::AcqRel);
        }
        Some(f(&guard))
    }

    /// Per rank, matched blocks in each tier (see [`TieredIndex::find_tier_matches`]).
    pub fn find_tier_matches(
        &self,
        query: &[LocalBlockHash],
    ) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        self.with(|i| i.find_tier_matches(query))
            .unwrap_or_default()
    }

    /// Device-tier overlap scores.
    pub fn find_matches(&self, query: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        self.with(|i| i.find_matches(query, early_exit))
            .unwrap_or_default()
    }

    /// `(block, worker)` pairs across tiers.
    pub fn current_size(&self) -> usize {
        self.with(|i| i.current_size()).unwrap_or(0)
    }

    /// Every block of every rank on every tier, as Stored events
    /// ([`TieredIndex::dump_events`]).
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        self.with(TieredIndex::dump_events).unwrap_or_default()
    }
}
