//! Other replicas' messages applied to this router's load view: decoded, checked against the
//! peer bounds ([`Peers`]), mirrored in the scheduler under `peer:<router id>:<request id>`
//! ([`RouterState::apply_remote`]), every refusal counted in
//! `kvrouter_replica_sync_ops_ignored_total{reason}`. Own echoes are skipped.

use std::sync::{Arc, Weak};
use std::time::Instant;

use kvrouter_core::sequences::SequenceError;

use super::peers::{Peers, Refused};
use super::wire::{self, Malformed, Op, OpKind};
use crate::metrics::{Metrics, ReasonLabels};
use crate::routing::{RemoteError, RemoteOp, RouterState};

/// Applies received messages and expires silent peers.
pub struct Receiver {
    own_id: String,
    peers: Peers,
    /// Weak: the router owns the outbox whose closing ends the sync task.
    state: Weak<RouterState>,
    metrics: Arc<Metrics>,
}

/// What a received operation asks of the scheduler.
enum Planned<'a> {
    Book(&'a str, usize, &'a kvrouter_core::BookingRecord),
    PrefillComplete,
    Free,
}

impl Receiver {
    /// A receiver for router `own_id` applying to `state`, dropping peers silent for
    /// `peers`' timeout.
    pub fn new(
        own_id: String,
        peers: Peers,
        state: &Arc<RouterState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            own_id,
            peers,
            state: Arc::downgrade(state),
            metrics,
        }
    }

    fn ignored(&self, reason: &'static str, n: usize) {
        self.metrics
            .replica_sync
            .ops_ignored
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n as u64);
    }

    /// Apply one message received at `now`. Never fails: what cannot be applied is counted.
    pub fn on_message(&mut self, payload: &[u8], now: Instant) {
        let Some(state) = self.state.upgrade() else {
            return;
        };
        let batch = match wire::decode(payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "replica sync message dropped");
                let reason = match e {
                    Malformed::TooLarge(_) => "too_large",
                    _ => "malformed",
                };
                return self.ignored(reason, 1);
            }
        };
        if batch.router_id == self.own_id {
            return;
        }
        let peer = batch.router_id.as_str();
        let heard = self.peers.heard(peer, batch.epoch, batch.seq, now);
        if heard.refused {
            return self.ignored("too_many_peers", batch.ops.len().max(1));
        }
        let sync = &self.metrics.replica_sync;
        sync.ops_received.inc_by(batch.ops.len() as u64);
        if !heard.reset.is_empty() {
            tracing::info!(
                peer,
                bookings = heard.reset.len(),
                "router replica restarted or lost messages: its bookings are freed"
            );
            self.free(&state, &heard.reset);
        }
        let mut plan: Vec<(String, &Op, Planned<'_>)> = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            let op = match op {
                Ok(op) => op,
                Err(e) => {
                    tracing::debug!(peer, error = %e, "replica sync operation dropped");
                    self.ignored("invalid", 1);
                    continue;
                }
            };
            let rid = op.request_id.as_str();
            let planned = match &op.kind {
                OpKind::Add {
                    block_size,
                    booking,
                } => match self.peers.admit(peer, rid, booking.hashes.sequence.len()) {
                    Ok(id) => Some((id, Planned::Book(rid, *block_size, booking))),
                    Err(Refused::Duplicate) => {
                        self.ignored("duplicate", 1);
                        None
                    }
                    Err(Refused::Limit | Refused::UnknownPeer) => {
                        self.ignored("peer_limit", 1);
                        None
                    }
                },
                OpKind::PrefillComplete if self.peers.has(peer, rid) => Some((
                    super::peers::scheduler_id(peer, rid),
                    Planned::PrefillComplete,
                )),
                OpKind::Free => self.peers.forget(peer, rid).map(|id| (id, Planned::Free)),
                OpKind::PrefillComplete => None,
            };
            match planned {
                Some((id, p)) => plan.push((id, op, p)),
                None if !matches!(op.kind, OpKind::Add { .. }) => {
                    self.ignored("unknown_request", 1)
                }
                None => {}
            }
        }
        let results = state.apply_remote(plan.iter().map(|(id, _, p)| match p {
            Planned::Book(_, block_size, booking) => RemoteOp::Book {
                id,
                block_size: *block_size,
                booking,
            },
            Planned::PrefillComplete => RemoteOp::PrefillComplete { id },
            Planned::Free => RemoteOp::Free { id },
        }));
        for ((_, op, p), r) in plan.iter().zip(results) {
            let Err(e) = r else { continue };
            if let Planned::Book(rid, ..) = p {
                self.peers.forget(peer, rid);
            }
            let reason = match e {
                RemoteError::UnknownWorker(_) => "unknown_worker",
                RemoteError::BlockSize { .. } => "block_size",
                RemoteError::Booking(SequenceError::DuplicateRequest(_)) => "duplicate",
                RemoteError::Booking(SequenceError::UnknownRequest(_)) => "unknown_request",
            };
            tracing::debug!(peer, request = %op.request_id, error = %e, "replica sync operation not applied");
            self.ignored(reason, 1);
        }
        self.gauges();
    }

    /// Free the bookings of peers silent past the timeout at `now`.
    pub fn expire(&mut self, now: Instant) {
        let ids = self.peers.expire(now);
        self.free_all_of(ids);
    }

    /// Free every peer's bookings: this router no longer hears them (its subscription
    /// ended).
    pub fn drop_all(&mut self) {
        let ids = self.peers.drop_all();
        self.free_all_of(ids);
    }

    fn free_all_of(&mut self, ids: Vec<String>) {
        if let (false, Some(state)) = (ids.is_empty(), self.state.upgrade()) {
            self.free(&state, &ids);
        }
        self.gauges();
    }

    /// Free mirrored bookings (a peer gone, restarted or out of step), counted as expired.
    fn free(&self, state: &Arc<RouterState>, ids: &[String]) {
        self.metrics
            .replica_sync
            .peer_bookings_expired
            .inc_by(ids.len() as u64);
        // Unknown ids are bookings the scheduler dropped already (worker removed, expiry).
        let _ = state.apply_remote(ids.iter().map(|id| RemoteOp::Free { id }));
    }

    fn gauges(&self) {
        let sync = &self.metrics.replica_sync;
        sync.remote_bookings.set(self.peers.bookings() as i64);
        sync.peers.set(self.peers.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvrouter_core::{RouterConfig, RouterMode, WorkerInfo, WorkerWithDpRank};

    use super::super::wire::{encode_op, Packer};
    use super::*;

    const W: WorkerWithDpRank = WorkerWithDpRank::new(3, 1);

    fn receiver() -> (Receiver, Arc<RouterState>, Arc<Metrics>) {
        let cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new());
        let state = RouterState::new(cfg, Some(4), metrics.clone());
        state.add_ranks([WorkerInfo {
            worker: W,
            ..Default::default()
        }]);
        let peers = Peers::new(Duration::from_secs(3));
        let r = Receiver::new("me".into(), peers, &state, metrics.clone());
        (r, state, metrics)
    }

    fn msg(from: &str, epoch: u64, seq: u64, ops: &[Op]) -> Vec<u8> {
        let evs: Vec<_> = ops.iter().map(encode_op).collect();
        let mut seq = seq;
        let p = Packer::new(from, 1 << 20).pack(epoch, &mut seq, &evs);
        p.messages.into_iter().next().unwrap().0
    }

    fn op(id: &str, kind: OpKind) -> Op {
        Op {
            request_id: id.into(),
            worker: W,
            kind,
        }
    }

    fn add(id: &str) -> Op {
        super::super::wire::tests::add(id, 2)
    }

    fn ignored(m: &Metrics, reason: &'static str) -> u64 {
        m.replica_sync
            .ops_ignored
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    #[test]
    fn peers_bookings_are_mirrored_and_released() {
        let (mut r, s, m) = receiver();
        let t = Instant::now();
        r.on_message(&msg("a", 1, 0, &[add("r1"), add("r2")]), t);
        assert_eq!(s.loads([W])[0].active_requests, 2);
        r.on_message(&msg("a", 1, 1, &[op("r1", OpKind::PrefillComplete)]), t);
        assert_eq!(s.loads([W])[0].active_prefill_tokens, 10 - 4);
        r.on_message(&msg("a", 1, 2, &[op("r1", OpKind::Free)]), t);
        assert_eq!(s.loads([W])[0].active_requests, 1);
        assert_eq!(m.replica_sync.remote_bookings.get(), 1);
        // Own echoes change nothing.
        r.on_message(&msg("me", 1, 0, &[op("r2", OpKind::Free), add("r9")]), t);
        assert_eq!(s.loads([W])[0].active_requests, 1);
        assert_eq!(m.replica_sync.ops_received.get(), 4);
        // Silent past the timeout: expired.
        r.expire(t + Duration::from_secs(2));
        assert_eq!(s.loads([W])[0].active_requests, 1);
        r.expire(t + Duration::from_secs(3));
        assert_eq!(s.loads([W])[0], Default::default());
        assert_eq!(m.replica_sync.peer_bookings_expired.get(), 1);
        assert_eq!(m.replica_sync.peers.get(), 0);
    }

    #[test]
    fn a_restarted_peer_and_a_lost_message_leave_nothing_booked() {
        let (mut r, s, m) = receiver();
        let t = Instant::now();
        r.on_message(&msg("a", 1, 0, &[add("r1")]), t);
        // seq 1 (r1's free) lost; seq 2 arrives.
        r.on_message(&msg("a", 1, 2, &[add("r2")]), t);
        assert_eq!(s.loads([W])[0].active_requests, 1, "r1 freed, r2 booked");
        // a restarts (new epoch) and reuses the id r2.
        r.on_message(&msg("a", 9, 0, &[add("r2")]), t);
        assert_eq!(s.loads([W])[0].active_requests, 1);
        r.on_message(&msg("a", 9, 1, &[op("r2", OpKind::Free)]), t);
        assert_eq!(s.loads([W])[0], Default::default());
        assert_eq!(m.replica_sync.peer_bookings_expired.get(), 2);
    }

    #[test]
    fn hostile_or_foreign_operations_are_counted_and_change_nothing() {
        let (mut r, s, m) = receiver();
        let t = Instant::now();
        r.on_message(b"{not json", t);
        r.on_message(&vec![b'x'; wire::MAX_MESSAGE_BYTES + 1], t);
        let mut other = add("r1");
        other.worker = WorkerWithDpRank::new(99, 0);
        if let OpKind::Add { booking, .. } = &mut other.kind {
            booking.worker = other.worker;
        }
        let mut other_bs = super::super::wire::tests::add("r2", 1);
        if let OpKind::Add { block_size, .. } = &mut other_bs.kind {
            *block_size = 16;
        }
        r.on_message(
            &msg(
                "a",
                1,
                0,
                &[
                    other,
                    other_bs,
                    op("r3", OpKind::Free),
                    op("r4", OpKind::PrefillComplete),
                ],
            ),
            t,
        );
        r.on_message(&msg("a", 1, 1, &[add("r5"), add("r5")]), t);
        assert_eq!(ignored(&m, "malformed"), 1);
        assert_eq!(ignored(&m, "too_large"), 1);
        assert_eq!(ignored(&m, "unknown_worker"), 1);
        assert_eq!(ignored(&m, "block_size"), 1);
        assert_eq!(ignored(&m, "unknown_request"), 2);
        assert_eq!(ignored(&m, "duplicate"), 1);
        assert_eq!(s.loads([W])[0].active_requests, 1, "only r5");
        assert_eq!(m.replica_sync.remote_bookings.get(), 1);
        // A free of a peer request under a local id's name cannot touch local bookings.
        let local = s
            .try_route(&crate::routing::RouteInput {
                tokens: &[1; 10],
                ..Default::default()
            })
            .unwrap();
        r.on_message(&msg("a", 1, 2, &[op("r1", OpKind::Free)]), t);
        assert_eq!(s.loads([W])[0].active_requests, 2);
        drop(local);
    }
}
