//! The routing path's side of replica sync: each booking, first token and free becomes a
//! small owned operation pushed without waiting into a bounded queue
//! ([`OUTBOX_CAPACITY`]); when the queue is full the newest operation is dropped and counted
//! (the reference's policy, `dynamo-router-spec.md` §5.1), and the sender's epoch moves on so
//! that peers forget what they mirrored of this router rather than keep a booking whose free
//! was lost ([`super::peers`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvrouter_core::{BookingRecord, WorkerWithDpRank};
use tokio::sync::mpsc;

use super::wire::{Op, OpKind};
use crate::metrics::{Metrics, ReasonLabels};
use crate::routing::BookingSink;

/// Operations waiting to be published at most.
pub const OUTBOX_CAPACITY: usize = 8192;

/// An operation with the epoch it was made in.
pub type Queued = (u64, Op);

/// The sender's epoch: changes whenever operations may have been lost (a drop here, a NATS
/// disconnection, a failed publish). Starts random per process, so that a restarted replica
/// with the same `--router-id` is a new epoch too.
#[derive(Debug, Clone)]
pub struct Epoch(Arc<AtomicU64>);

impl Epoch {
    pub fn new() -> Self {
        Self(Arc::new(AtomicU64::new(rand::random::<u64>() >> 1)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Operations were lost: start a new epoch.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Where the routing path puts its operations ([`BookingSink`]).
pub struct Outbox {
    tx: mpsc::Sender<Queued>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// An outbox and the receiving end of its queue.
    pub fn new(epoch: Epoch, metrics: Arc<Metrics>) -> (Self, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        (Self { tx, epoch, metrics }, rx)
    }

    fn push(&self, request_id: &str, worker: WorkerWithDpRank, kind: OpKind) {
        let op = Op {
            request_id: request_id.to_string(),
            worker,
            kind,
        };
        // Closed: the sync task is gone (shutdown); nothing to tell.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send((self.epoch.get(), op)) {
            self.epoch.bump();
            self.metrics
                .replica_sync
                .ops_dropped
                .get_or_create(&ReasonLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

impl BookingSink for Outbox {
    fn booked(&self, id: &str, block_size: usize, booking: BookingRecord) {
        let worker = booking.worker;
        self.push(
            id,
            worker,
            OpKind::Add {
                block_size,
                booking,
            },
        );
    }

    fn prefill_complete(&self, id: &str, worker: WorkerWithDpRank) {
        self.push(id, worker, OpKind::PrefillComplete);
    }

    fn freed(&self, id: &str, worker: WorkerWithDpRank) {
        self.push(id, worker, OpKind::Free);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_newest_and_starts_a_new_epoch() {
        let m = Arc::new(Metrics::new());
        let epoch = Epoch::new();
        let e0 = epoch.get();
        let (out, mut rx) = Outbox::new(epoch.clone(), m.clone());
        let w = WorkerWithDpRank::new(1, 0);
        for i in 0..OUTBOX_CAPACITY + 2 {
            out.freed(&format!("r{i}"), w);
        }
        let dropped = m
            .replica_sync
            .ops_dropped
            .get_or_create(&ReasonLabels {
                reason: "queue_full",
            })
            .get();
        assert_eq!(dropped, 2);
        assert_eq!(epoch.get(), e0 + 2);
        let (e, first) = rx.try_recv().unwrap();
        assert_eq!((e, first.request_id.as_str()), (e0, "r0"));
        out.prefill_complete("next", w);
        let mut last = None;
        while let Ok(q) = rx.try_recv() {
            last = Some(q);
        }
        let (e, op) = last.unwrap();
        assert_eq!((e, op.request_id.as_str()), (e0 + 2, "next"));
    }
}
