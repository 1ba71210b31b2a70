#![allow(dead_code)]
//! The previous shared index (kvrouter commit 4178cfd, `core/src/index/shared.rs`), vendored
//! unchanged but for its imports, so that `shared` can run it beside the one-copy index that
//! replaced it: a `left-right` pair of `TieredIndex` copies, wait-free reads, every entry held
//! (and every event applied) twice.
//!
//! Original module documentation follows.
//!
//! The exact index shared between one writer and many concurrent readers, with wait-free
//! reads: [`SharedIndexWriter`] applies KV events, any number of [`IndexReader`] clones answer
//! `find_matches` on any thread without taking a lock.
//!
//! Built on `left-right`: two copies of the [`TieredIndex`]; readers see one while the writer
//! updates the other, and [`SharedIndexWriter::publish`] swaps them once per batch (waiting
//! only for readers still inside the old copy — a lookup takes microseconds). The price is
//! memory: every entry is held twice, and each event is applied twice.
//!
//! A server feeds every worker's event subscriber into one channel, and one thread drains it
//! in batches: `append` each event, then `publish`.

use std::sync::Arc;

use left_right::{Absorb, ReadHandle, ReadHandleFactory, WriteHandle};
use thread_local::ThreadLocal;

use kvrouter_core::event::{RouterEvent, WorkerId, WorkerWithDpRank};
use kvrouter_core::hash::LocalBlockHash;
use kvrouter_core::index::{IndexError, OverlapScores, TierOverlap, TieredIndex};

/// A change to the shared index.
#[derive(Clone, Debug)]
pub enum IndexOp {
    /// A KV event from an engine (stored / removed / cleared one rank).
    Event(RouterEvent),
    /// Events applied in order: the same as one `Event` each, but faster (see
    /// [`KvIndex::apply_batch`](kvrouter_core::index::KvIndex::apply_batch)).
    Events(Vec<RouterEvent>),
    /// The worker left: drop every rank's blocks.
    RemoveWorker(WorkerId),
}

/// Called once per event that the index rejected (unknown parent, unknown block, …), with the
/// rank it was for. Counted by the caller. What a rejected event still changed is as
/// [`KvIndex::apply`](kvrouter_core::index::KvIndex::apply) documents (a removal's known blocks go).
pub type ErrorSink = Arc<dyn Fn(WorkerWithDpRank, &IndexError) + Send + Sync>;

/// One copy of the index. `on_error` runs for the first application of an op only, so each
/// rejection is reported once although both copies apply it.
struct IndexCopy {
    index: TieredIndex,
    on_error: Option<ErrorSink>,
}

impl Default for IndexCopy {
    fn default() -> Self {
        Self {
            index: TieredIndex::new(),
            on_error: None,
        }
    }
}

/// What the oplog carries: public ops, plus installing the error sink in both copies.
enum Op {
    Index(IndexOp),
    SetSink(Option<ErrorSink>),
}

impl IndexCopy {
    /// Apply `op`; with `report`, rejected events go to the error sink (the first copy
    /// reports, the second applies the same ops silently).
    fn apply(&mut self, op: &Op, report: bool) {
        let op = match op {
            Op::Index(op) => op,
            Op::SetSink(s) => {
                self.on_error = s.clone();
                return;
            }
        };
        let sink = self.on_error.as_ref().filter(|_| report);
        let on_error = |ev: &RouterEvent, e: IndexError| {
            if let Some(sink) = sink {
                sink(ev.worker(), &e);
            }
        };
        match op {
            IndexOp::Event(ev) => {
                if let Err(e) = self.index.apply(ev) {
                    on_error(ev, e);
                }
            }
            IndexOp::Events(evs) => self.index.apply_batch(evs, on_error),
            IndexOp::RemoveWorker(w) => self.index.remove_worker(*w),
        }
    }
}

impl Absorb<Op> for IndexCopy {
    fn absorb_first(&mut self, op: &mut Op, _other: &Self) {
        self.apply(op, true);
    }

    fn absorb_second(&mut self, op: Op, _other: &Self) {
        self.apply(&op, false);
    }

    fn drop_first(self: Box<Self>) {}

    fn sync_with(&mut self, first: &Self) {
        // left-right calls this at the second publish, with the copy the first publish made
        // current. `shared_index` publishes once with only the error sink queued, so that
        // copy's index is empty: only the sink needs copying.
        debug_assert_eq!(
            first.index.device.current_size()
                + first.index.host.current_size()
                + first.index.disk.current_size(),
            0
        );
        self.on_error = first.on_error.clone();
    }
}

/// The single writer of the shared index. Not `Sync`: own it from one thread (or task).
pub struct SharedIndexWriter {
    handle: WriteHandle<IndexCopy, Op>,
    pending: usize,
}

/// A reader of the shared index: cheap to clone, `Send + Sync`. Each thread gets its own
/// `left-right` read handle on first use, so reads never contend on a lock.
#[derive(Clone)]
pub struct IndexReader {
    factory: ReadHandleFactory<IndexCopy>,
    local: Arc<ThreadLocal<ReadHandle<IndexCopy>>>,
}

/// A new, empty shared index. `on_error` receives every rejected op once.
pub fn shared_index(on_error: Option<ErrorSink>) -> (SharedIndexWriter, IndexReader) {
    let (w, r) = left_right::new::<IndexCopy, Op>();
    let mut writer = SharedIndexWriter {
        handle: w,
        pending: 0,
    };
    writer.handle.append(Op::SetSink(on_error));
    writer.handle.publish();
    let reader = IndexReader {
        factory: r.factory(),
        local: Arc::new(ThreadLocal::new()),
    };
    (writer, reader)
}

impl SharedIndexWriter {
    /// Queue an op; readers see it after the next [`publish`](Self::publish).
    pub fn append(&mut self, op: IndexOp) {
        self.handle.append(Op::Index(op));
        self.pending += 1;
    }

    /// Make every queued op visible to readers. Returns how many were published.
    pub fn publish(&mut self) -> usize {
        if self.pending == 0 {
            return 0;
        }
        self.handle.publish();
        std::mem::take(&mut self.pending)
    }

    /// A reader of this index.
    pub fn reader(&self) -> IndexReader {
        IndexReader {
            factory: self.handle.factory(),
            local: Arc::new(ThreadLocal::new()),
        }
    }
}

impl IndexReader {
    /// Run `f` on the current published index. Wait-free; `None` only after the writer is
    /// dropped.
    pub fn with<T>(&self, f: impl FnOnce(&TieredIndex) -> T) -> Option<T> {
        let h = self.local.get_or(|| self.factory.handle());
        let guard = h.enter()?;
        Some(f(&guard.index))
    }

    /// Per rank, matched blocks in each tier (see [`TieredIndex::find_tier_matches`]); empty
    /// when the writer is gone.
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

    /// `(block, worker)` pairs across tiers in the published copy.
    pub fn current_size(&self) -> usize {
        self.with(|i| i.current_size()).unwrap_or(0)
    }

    /// Every block of every rank, as Stored events (device tier only).
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        self.with(|i| i.device.dump_events()).unwrap_or_default()
    }
}
