//! Per (worker, dp_rank) event-id bookkeeping of a router consuming the NATS event stream
//! (`dynamo-router-spec.md` §3.4): what to do with each event given the rank's last id.
//!
//! A relay numbers each rank's events 0, 1, 2, … for as long as it runs. For an event of a
//! rank whose last applied id is `last`:
//! * `id == last + 1` (or the rank's first event with id 0): apply;
//! * `id <= last`, `id > 0`: a duplicate (a relay's or a publisher's), skipped;
//! * `id == 0` after higher ids: the relay restarted — clear the rank, then apply;
//! * `id > last + 1` (or a rank's first event above 0): a gap — events are missing. A
//!   `Cleared` event there closes the gap by itself (a relay's recovery: clear, then a dump
//!   of what the worker holds); anything else clears the rank, applies the event and asks
//!   the relay for such a recovery. The next `Cleared` of a rank waiting for a recovery is
//!   that recovery whatever its id (so a bogus jump far ahead cannot make the relay's real
//!   ids look like duplicates): the rank's ids continue from it.
//!
//! Pure bookkeeping: no I/O, bounded by the number of ranks seen.

use std::collections::{HashMap, HashSet};

use kvrouter_core::event::{KvCacheEventData, RouterEvent, WorkerWithDpRank};

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// Skip it: its id is not above the rank's last.
    Duplicate,
    /// The relay restarted: clear the rank, then apply it.
    Restart,
    /// A gap closed by this `Cleared` event (a relay's recovery): apply it. `new_gap`: the
    /// gap was not seen before (this clear itself skipped ids).
    Recovered { new_gap: bool },
    /// A gap: clear the rank, apply it, ask the relay for a re-dump.
    Gap,
}

/// The last event id applied per rank, and the ranks waiting for a recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankTracker {
    last: HashMap<WorkerWithDpRank, u64>,
    awaiting: HashSet<WorkerWithDpRank>,
}

impl RankTracker {
    /// A tracker resuming from `last` ids (a snapshot's).
    pub fn from_last_ids(last: impl IntoIterator<Item = (WorkerWithDpRank, u64)>) -> Self {
        Self {
            last: last.into_iter().collect(),
            awaiting: HashSet::new(),
        }
    }

    /// The verdict on `ev`, recording its id as the rank's last unless it is a duplicate.
    pub fn check(&mut self, ev: &RouterEvent) -> Verdict {
        let rank = ev.worker();
        let id = ev.event.event_id;
        let cleared = matches!(ev.event.data, KvCacheEventData::Cleared);
        if cleared && self.awaiting.remove(&rank) {
            // The recovery asked for after a gap: whatever its id (the gap may have been a
            // bogus jump), the rank starts again from it.
            self.last.insert(rank, id);
            return Verdict::Recovered { new_gap: false };
        }
        let in_order = match self.last.get(&rank).copied() {
            Some(last) if id <= last && id > 0 => return Verdict::Duplicate,
            Some(_) if id == 0 => {
                self.last.insert(rank, 0);
                self.awaiting.remove(&rank);
                return Verdict::Restart;
            }
            Some(last) => id == last + 1,
            None => id == 0,
        };
        self.last.insert(rank, id);
        match (in_order, cleared) {
            (true, _) => Verdict::Apply,
            (false, true) => Verdict::Recovered { new_gap: true },
            (false, false) => {
                self.awaiting.insert(rank);
                Verdict::Gap
            }
        }
    }

    /// Forget the ranks of `worker_id` (it left: its next events start a new history).
    pub fn forget_worker(&mut self, worker_id: u64) {
        self.last.retain(|r, _| r.worker_id != worker_id);
        self.awaiting.retain(|r| r.worker_id != worker_id);
    }

    /// The last id of every rank, sorted (what a snapshot records).
    pub fn last_ids(&self) -> Vec<(WorkerWithDpRank, u64)> {
        let mut v: Vec<_> = self.last.iter().map(|(r, id)| (*r, *id)).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::event::RemovedData;

    fn ev(id: u64, cleared: bool) -> RouterEvent {
        let data = if cleared {
            KvCacheEventData::Cleared
        } else {
            KvCacheEventData::Removed(RemovedData::default())
        };
        RouterEvent::new(WorkerWithDpRank::new(7, 1), id, data)
    }

    #[test]
    fn in_order_duplicates_restarts_and_gaps() {
        let mut t = RankTracker::default();
        assert_eq!(t.check(&ev(0, false)), Verdict::Apply);
        assert_eq!(t.check(&ev(1, false)), Verdict::Apply);
        assert_eq!(t.check(&ev(1, false)), Verdict::Duplicate);
        assert_eq!(t.check(&ev(2, false)), Verdict::Apply);
        // A gap: ids 3 and 4 are missing.
        assert_eq!(t.check(&ev(5, false)), Verdict::Gap);
        assert_eq!(t.check(&ev(6, false)), Verdict::Apply);
        // The relay's recovery (a clear in order) closes it.
        assert_eq!(t.check(&ev(7, true)), Verdict::Recovered { new_gap: false });
        assert_eq!(t.check(&ev(8, true)), Verdict::Apply, "a plain clear");
        // A clear after a gap is a recovery by itself.
        assert_eq!(t.check(&ev(20, true)), Verdict::Recovered { new_gap: true });
        // The relay restarted.
        assert_eq!(t.check(&ev(0, false)), Verdict::Restart);
        assert_eq!(t.check(&ev(1, false)), Verdict::Apply);
        assert_eq!(t.last_ids(), vec![(WorkerWithDpRank::new(7, 1), 1)]);
    }

    #[test]
    fn a_first_event_above_zero_is_a_gap_unless_it_clears() {
        let mut t = RankTracker::default();
        assert_eq!(t.check(&ev(9, false)), Verdict::Gap);
        let mut t = RankTracker::default();
        assert_eq!(t.check(&ev(9, true)), Verdict::Recovered { new_gap: true });
        // Resuming from a snapshot's ids.
        let mut t = RankTracker::from_last_ids([(WorkerWithDpRank::new(7, 1), 9)]);
        assert_eq!(t.check(&ev(9, false)), Verdict::Duplicate);
        assert_eq!(t.check(&ev(10, false)), Verdict::Apply);
        t.forget_worker(7);
        assert!(t.last_ids().is_empty());
    }

    #[test]
    fn ranks_are_independent() {
        let mut t = RankTracker::default();
        let other =
            |id| RouterEvent::new(WorkerWithDpRank::new(7, 0), id, KvCacheEventData::Cleared);
        assert_eq!(t.check(&ev(0, false)), Verdict::Apply);
        assert_eq!(t.check(&other(0)), Verdict::Apply);
        assert_eq!(t.check(&other(1)), Verdict::Apply);
        assert_eq!(t.check(&ev(1, false)), Verdict::Apply);
        assert_eq!(t.check(&ev(u64::MAX, false)), Verdict::Gap);
        assert_eq!(
            t.check(&ev(u64::MAX, false)),
            Verdict::Duplicate,
            "no overflow"
        );
        // A bogus jump is undone by the recovery it asks for, whatever the recovery's id.
        assert_eq!(t.check(&ev(2, true)), Verdict::Recovered { new_gap: false });
        assert_eq!(t.check(&ev(3, false)), Verdict::Apply);
    }
}
