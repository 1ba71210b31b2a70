//! Active requests and the load they put on each worker rank (Dynamo's slot tracker, spec §5).
//!
//! Load is *predicted* by the router, not measured: a request is booked when routed
//! ([`ActiveSequences::add_request`]), its prefill tokens are released at its first output token
//! ([`ActiveSequences::mark_prefill_complete`]) and everything at its end, error or cancellation
//! ([`ActiveSequences::free`]). Requests never freed are force-freed after an expiry.
//!
//! Active blocks are counted once per rank even when several requests share them (reference
//! counts keyed by sequence hash). Every request books its whole prompt chain from block 0, so
//! a rank's active blocks are prefix-closed: how many leading blocks of a new request are
//! already active is found by binary search, `O(log n)` lookups per rank.
//!
//! Prefill load model (`--router-prefill-load-model`, spec §5): each rank keeps its active
//! prefills in booking order. A booking may carry a predicted prefill duration
//! ([`crate::prefill_time`]); the oldest active prefill — the one the engine is computing — then
//! counts `tokens × (1 − elapsed / predicted)`, elapsed since it became the oldest, and the
//! others in full. Without a prediction every prefill counts in full until its first token.

use std::collections::VecDeque;
use std::time::Duration;

use crate::event::{WorkerId, WorkerWithDpRank};
use crate::hash::SequenceHash;
use crate::index::FastMap;

/// Caller-chosen request identifier (the frontend uses the response id).
pub type RequestId = String;

/// How a booking counts (from the router config and per-request overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BookingOptions {
    /// Count the request's blocks as active decode blocks (`--router-track-active-blocks`).
    pub track_active_blocks: bool,
    /// Blocks shared with other active requests on the rank count once (`--router-assume-kv-reuse`).
    pub assume_kv_reuse: bool,
    /// Count the request's uncached prompt tokens as active prefill until its first token
    /// (`--router-track-prefill-tokens`).
    pub track_prefill_tokens: bool,
}

impl Default for BookingOptions {
    fn default() -> Self {
        Self {
            track_active_blocks: true,
            assume_kv_reuse: true,
            track_prefill_tokens: true,
        }
    }
}

/// A rank's current load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Uncached prompt tokens of requests routed here that have not produced a token yet.
    pub active_prefill_tokens: u64,
    /// Unique blocks of active requests (shared blocks once, partial tail blocks each).
    pub active_decode_blocks: u64,
    /// Requests routed here and not yet finished.
    pub active_requests: u32,
}

/// A rank's load if a given request were added to it (`potential_loads`, spec §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PotentialLoad {
    pub worker: WorkerWithDpRank,
    /// `active_prefill_tokens + isl` (the raw prefill term of the cost, before cache credit).
    pub potential_prefill_tokens: u64,
    /// Active decode blocks now, plus the request's blocks not already active here.
    pub potential_decode_blocks: u64,
    pub active_requests: u32,
    /// Active prefill tokens now (for busy thresholds and credit decay).
    pub active_prefill_tokens: u64,
    pub active_decode_blocks: u64,
}

/// One active prefill on a rank.
#[derive(Debug)]
struct Prefill {
    /// The booking's sequence number.
    seq: u64,
    tokens: u64,
    predicted: Option<Duration>,
}

#[derive(Debug, Default)]
struct RankState {
    /// Reference counts of active shared blocks.
    blocks: FastMap<SequenceHash, u32>,
    /// Blocks never shared: partial tails, and every block when KV reuse is not assumed.
    private_blocks: u64,
    prefill_tokens: u64,
    requests: u32,
    /// Active prefills, oldest first (only those with tokens).
    prefills: VecDeque<Prefill>,
    /// When the front of `prefills` became the oldest.
    anchor_since: Duration,
}

impl RankState {
    fn load(&self, now: Duration) -> WorkerLoad {
        WorkerLoad {
            active_prefill_tokens: self.effective_prefill(now),
            active_decode_blocks: self.blocks.len() as u64 + self.private_blocks,
            active_requests: self.requests,
        }
    }

    /// Active prefill tokens at `now`, the oldest decayed over its predicted duration.
    fn effective_prefill(&self, now: Duration) -> u64 {
        let Some(Prefill {
            tokens,
            predicted: Some(d),
            ..
        }) = self.prefills.front()
        else {
            return self.prefill_tokens;
        };
        let done = if d.is_zero() {
            1.0
        } else {
            (now.saturating_sub(self.anchor_since).as_secs_f64() / d.as_secs_f64()).min(1.0)
        };
        self.prefill_tokens - (*tokens as f64 * done).round() as u64
    }

    /// Remove booking `seq`'s prefill; the next oldest becomes the anchor at `now`.
    fn end_prefill(&mut self, seq: u64, tokens: u64, now: Duration) {
        self.prefill_tokens -= tokens;
        if let Some(pos) = self.prefills.iter().position(|p| p.seq == seq) {
            self.prefills.remove(pos);
            if pos == 0 {
                self.anchor_since = now;
            }
        }
    }

    /// Leading blocks of `seq` already active here.
    fn active_prefix(&self, seq: &[SequenceHash]) -> usize {
        // Most ranks share not even the first block: one lookup instead of a binary search.
        match seq.first() {
            Some(s) if self.blocks.contains_key(s) => {
                seq.partition_point(|s| self.blocks.contains_key(s))
            }
            _ => 0,
        }
    }
}

#[derive(Debug)]
struct Booking {
    worker: WorkerWithDpRank,
    shared: Vec<SequenceHash>,
    private_blocks: u64,
    prefill_tokens: u64,
    booked_at: Duration,
    seq: u64,
    /// No other prefill was active on the rank when booked: its TTFT is its prefill time.
    alone: bool,
}

/// A finished prefill that had its rank to itself: a sample of prefill time
/// ([`crate::prefill_time::PrefillTimeModel::observe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillSample {
    pub worker: WorkerWithDpRank,
    /// Uncached prompt tokens.
    pub tokens: u64,
    /// From booking to first token.
    pub elapsed: Duration,
}

/// Why a booking call did nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("request {0} is already active")]
    DuplicateRequest(RequestId),
    #[error("request {0} is not active")]
    UnknownRequest(RequestId),
}

/// Active requests per worker rank.
#[derive(Debug)]
pub struct ActiveSequences {
    /// Ranks with at least one booking (a rank is dropped with its last one).
    ranks: FastMap<WorkerWithDpRank, RankState>,
    requests: FastMap<RequestId, Booking>,
    /// Booking order, for expiry; entries of freed requests are skipped lazily.
    order: VecDeque<(Duration, RequestId)>,
    expiry: Duration,
    next_seq: u64,
    /// Requests force-freed by expiry so far.
    expired: u64,
}

impl Default for ActiveSequences {
    fn default() -> Self {
        Self::new(Duration::from_secs(300))
    }
}

impl ActiveSequences {
    /// `expiry`: a request still booked this long after routing is force-freed (Dynamo's
    /// `DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS`, default 300 s).
    pub fn new(expiry: Duration) -> Self {
        Self {
            ranks: FastMap::default(),
            requests: FastMap::default(),
            order: VecDeque::new(),
            expiry,
            next_seq: 0,
            expired: 0,
        }
    }

    /// Book a routed request on `worker`.
    ///
    /// `seq`: the prompt's sequence hashes (full blocks); `isl`: prompt tokens; `cached_tokens`:
    /// tokens the chosen rank already holds (not prefilled again); `block_size` in tokens;
    /// `predicted_prefill`: how long its prefill should take once it is the rank's oldest (the
    /// `aic` load model; `None` counts it in full until its first token).
    #[allow(clippy::too_many_arguments)]
    pub fn add_request(
        &mut self,
        id: RequestId,
        worker: WorkerWithDpRank,
        seq: &[SequenceHash],
        isl: usize,
        cached_tokens: usize,
        block_size: usize,
        opts: BookingOptions,
        predicted_prefill: Option<Duration>,
        now: Duration,
    ) -> Result<(), SequenceError> {
        if self.requests.contains_key(&id) {
            return Err(SequenceError::DuplicateRequest(id));
        }
        self.expire(now);
        let rank = self.ranks.entry(worker).or_default();
        let total_blocks = crate::hash::request_blocks(isl, block_size) as u64;
        let (shared, private_blocks) = match (opts.track_active_blocks, opts.assume_kv_reuse) {
            (false, _) => (Vec::new(), 0),
            (true, false) => (Vec::new(), total_blocks),
            (true, true) => {
                let full = seq.len().min(total_blocks as usize);
                (seq[..full].to_vec(), total_blocks - full as u64)
            }
        };
        for s in &shared {
            *rank.blocks.entry(*s).or_insert(0) += 1;
        }
        let prefill_tokens = if opts.track_prefill_tokens {
            isl.saturating_sub(cached_tokens) as u64
        } else {
            0
        };
        rank.private_blocks += private_blocks;
        rank.prefill_tokens += prefill_tokens;
        rank.requests += 1;
        self.next_seq += 1;
        let alone = rank.prefills.is_empty();
        if prefill_tokens > 0 {
            if alone {
                rank.anchor_since = now;
            }
            rank.prefills.push_back(Prefill {
                seq: self.next_seq,
                tokens: prefill_tokens,
                predicted: predicted_prefill,
            });
        }
        self.order.push_back((now, id.clone()));
        self.requests.insert(
            id,
            Booking {
                worker,
                shared,
                private_blocks,
                prefill_tokens,
                booked_at: now,
                seq: self.next_seq,
                alone,
            },
        );
        Ok(())
    }

    /// The request produced its first token at `now`: its prompt is no longer being
    /// prefilled. Returns a prefill-time sample when the request had its rank's prefill to
    /// itself (the first call only).
    pub fn mark_prefill_complete(
        &mut self,
        id: &str,
        now: Duration,
    ) -> Result<Option<PrefillSample>, SequenceError> {
        let b = self
            .requests
            .get_mut(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.to_string()))?;
        if b.prefill_tokens == 0 {
            return Ok(None);
        }
        if let Some(rank) = self.ranks.get_mut(&b.worker) {
            rank.end_prefill(b.seq, b.prefill_tokens, now);
        }
        let sample = b.alone.then(|| PrefillSample {
            worker: b.worker,
            tokens: b.prefill_tokens,
            elapsed: now.saturating_sub(b.booked_at),
        });
        b.prefill_tokens = 0;
        Ok(sample)
    }

    /// The request ended at `now` (completed, failed or cancelled): release everything it
    /// booked.
    pub fn free(&mut self, id: &str, now: Duration) -> Result<WorkerWithDpRank, SequenceError> {
        let b = self
            .requests
            .remove(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.to_string()))?;
        if let Some(rank) = self.ranks.get_mut(&b.worker) {
            rank.end_prefill(b.seq, b.prefill_tokens, now);
            rank.private_blocks -= b.private_blocks;
            rank.requests -= 1;
            for s in &b.shared {
                if let Some(c) = rank.blocks.get_mut(s) {
                    *c -= 1;
                    if *c == 0 {
                        rank.blocks.remove(s);
                    }
                }
            }
            if rank.requests == 0 {
                // Nothing left: forget the rank, so that routing visits only loaded ones.
                debug_assert!(rank.blocks.is_empty() && rank.private_blocks == 0);
                debug_assert!(rank.prefill_tokens == 0 && rank.prefills.is_empty());
                self.ranks.remove(&b.worker);
            } else if rank.blocks.capacity() > 4 * rank.blocks.len() + 256 {
                rank.blocks.shrink_to_fit();
            }
        }
        Ok(b.worker)
    }

    /// Force-free requests booked more than the expiry before `now`. Returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let mut n = 0;
        while let Some((t, _)) = self.order.front() {
            if now.saturating_sub(*t) < self.expiry {
                break;
            }
            let (t, id) = self.order.pop_front().unwrap_or_default();
            if self.requests.get(&id).is_some_and(|b| b.booked_at == t)
                && self.free(&id, now).is_ok()
            {
                n += 1;
            }
        }
        if self.order.len() > 2 * self.requests.len() + 1024 {
            self.order
                .retain(|(t, id)| self.requests.get(id).is_some_and(|b| b.booked_at == *t));
        }
        self.expired += n as u64;
        n
    }

    /// Requests force-freed by expiry since creation, by any call (a booking expires the
    /// stale ones first): what a metric counts.
    pub fn expired_total(&self) -> u64 {
        self.expired
    }

    /// Forget a worker: all its ranks and every request booked on them.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.ranks.retain(|w, _| w.worker_id != worker_id);
        self.requests.retain(|_, b| b.worker.worker_id != worker_id);
    }

    /// Load of one rank at `now` (zero if unknown); `now` only matters for decaying prefills.
    pub fn load(&self, worker: WorkerWithDpRank, now: Duration) -> WorkerLoad {
        self.ranks
            .get(&worker)
            .map_or_else(WorkerLoad::default, |r| r.load(now))
    }

    /// `worker`'s load at `now` with a request of `isl` tokens and sequence hashes `seq` added.
    pub fn potential_load(
        &self,
        worker: WorkerWithDpRank,
        seq: &[SequenceHash],
        isl: usize,
        block_size: usize,
        opts: BookingOptions,
        now: Duration,
    ) -> PotentialLoad {
        let rank = self.ranks.get(&worker);
        potential(worker, rank, seq, isl, block_size, opts, now)
    }

    /// The potential load of a rank with nothing booked (`worker` left default): what every
    /// rank [`for_each_booked_load`](Self::for_each_booked_load) does not visit has.
    pub fn idle_potential_load(
        isl: usize,
        block_size: usize,
        opts: BookingOptions,
    ) -> PotentialLoad {
        potential(
            WorkerWithDpRank::default(),
            None,
            &[],
            isl,
            block_size,
            opts,
            Duration::ZERO,
        )
    }

    /// Calls `f` with the [`potential_load`](Self::potential_load) of every rank that has a
    /// booking, in no particular order. A rank whose last booking ended is forgotten, so this
    /// visits as many ranks as carry load, not as many as are registered: routing among a
    /// thousand mostly idle ranks looks up a few, not a thousand.
    pub fn for_each_booked_load(
        &self,
        seq: &[SequenceHash],
        isl: usize,
        block_size: usize,
        opts: BookingOptions,
        now: Duration,
        mut f: impl FnMut(PotentialLoad),
    ) {
        for (w, r) in &self.ranks {
            f(potential(*w, Some(r), seq, isl, block_size, opts, now));
        }
    }

    /// Ranks with at least one booking.
    pub fn booked_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Number of active requests across all ranks.
    pub fn num_active(&self) -> usize {
        self.requests.len()
    }

    /// Rank a request is booked on, if active.
    pub fn worker_of(&self, id: &str) -> Option<WorkerWithDpRank> {
        self.requests.get(id).map(|b| b.worker)
    }
}

/// A rank's load at `now` (`rank` None: nothing booked) with a request of `isl` tokens and
/// sequence hashes `seq` added.
fn potential(
    worker: WorkerWithDpRank,
    rank: Option<&RankState>,
    seq: &[SequenceHash],
    isl: usize,
    block_size: usize,
    opts: BookingOptions,
    now: Duration,
) -> PotentialLoad {
    let total = crate::hash::request_blocks(isl, block_size) as u64;
    let load = rank.map_or_else(WorkerLoad::default, |r| r.load(now));
    let new_blocks = match (opts.track_active_blocks, opts.assume_kv_reuse) {
        (false, _) => 0,
        (true, false) => total,
        (true, true) => {
            let already = rank.map_or(0, |r| r.active_prefix(seq)) as u64;
            total.saturating_sub(already)
        }
    };
    let prefill = if opts.track_prefill_tokens {
        load.active_prefill_tokens
    } else {
        0
    };
    PotentialLoad {
        worker,
        potential_prefill_tokens: prefill + isl as u64,
        potential_decode_blocks: load.active_decode_blocks + new_blocks,
        active_requests: load.active_requests,
        active_prefill_tokens: prefill,
        active_decode_blocks: load.active_decode_blocks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{compute_block_hashes, compute_sequence_hashes, HashOptions};

    fn seq(tokens: &[u32]) -> Vec<SequenceHash> {
        compute_sequence_hashes(&compute_block_hashes(
            tokens,
            4,
            &HashOptions::default(),
            None,
        ))
    }

    const W: WorkerWithDpRank = WorkerWithDpRank::new(1, 0);
    const T0: Duration = Duration::from_secs(0);

    #[test]
    fn shared_blocks_count_once_and_everything_returns_to_zero() {
        let mut a = ActiveSequences::default();
        let p1: Vec<u32> = (0..18).collect(); // 4 full blocks + partial tail
        let mut p2: Vec<u32> = (0..8).collect(); // shares 2 blocks with p1
        p2.extend(100..108);
        let o = BookingOptions::default();
        a.add_request("a".into(), W, &seq(&p1), 18, 0, 4, o, None, T0)
            .unwrap();
        assert_eq!(
            a.load(W, T0),
            WorkerLoad {
                active_prefill_tokens: 18,
                active_decode_blocks: 5,
                active_requests: 1
            }
        );
        // Potential: 4 blocks, 2 already active.
        let pl = a.potential_load(W, &seq(&p2), 16, 4, o, T0);
        assert_eq!(
            (pl.potential_decode_blocks, pl.potential_prefill_tokens),
            (5 + 2, 18 + 16)
        );
        a.add_request("b".into(), W, &seq(&p2), 16, 8, 4, o, None, T0)
            .unwrap();
        assert_eq!(
            a.load(W, T0),
            WorkerLoad {
                active_prefill_tokens: 18 + 8,
                active_decode_blocks: 7,
                active_requests: 2
            }
        );
        assert!(matches!(
            a.add_request("b".into(), W, &[], 1, 0, 4, o, None, T0),
            Err(SequenceError::DuplicateRequest(_))
        ));
        a.mark_prefill_complete("a", T0).unwrap();
        assert_eq!(a.load(W, T0).active_prefill_tokens, 8);
        a.free("a", T0).unwrap();
        assert_eq!(
            a.load(W, T0),
            WorkerLoad {
                active_prefill_tokens: 8,
                active_decode_blocks: 4,
                active_requests: 1
            }
        );
        a.free("b", T0).unwrap();
        assert_eq!(a.load(W, T0), WorkerLoad::default());
        assert!(a.free("b", T0).is_err());
        assert!(a.mark_prefill_complete("zz", T0).is_err());
        // An idle rank is forgotten: routing visits only ranks that carry load.
        assert_eq!(a.booked_ranks(), 0);
    }

    #[test]
    fn booked_loads_are_each_ranks_potential_load_and_idle_ranks_the_idle_one() {
        let mut a = ActiveSequences::default();
        let o = BookingOptions::default();
        let w2 = WorkerWithDpRank::new(2, 1);
        let p: Vec<u32> = (0..16).collect();
        a.add_request("a".into(), W, &seq(&p), 16, 4, 4, o, None, T0)
            .unwrap();
        a.add_request("b".into(), w2, &seq(&p[..8]), 8, 0, 4, o, None, T0)
            .unwrap();
        let mut seen = Vec::new();
        a.for_each_booked_load(&seq(&p), 16, 4, o, T0, |l| seen.push(l));
        seen.sort_by_key(|l| l.worker);
        let expect = [W, w2].map(|w| a.potential_load(w, &seq(&p), 16, 4, o, T0));
        assert_eq!(seen, expect);
        // Blocks already active on a rank are not counted twice.
        assert_eq!(seen[1].potential_decode_blocks, 2 + 2);
        let idle = WorkerWithDpRank::new(9, 0);
        assert_eq!(
            PotentialLoad {
                worker: idle,
                ..ActiveSequences::idle_potential_load(16, 4, o)
            },
            a.potential_load(idle, &seq(&p), 16, 4, o, T0)
        );
        a.free("a", T0).unwrap();
        assert_eq!(a.booked_ranks(), 1);
    }

    #[test]
    fn booking_options() {
        let p: Vec<u32> = (0..16).collect();
        let s = seq(&p);
        let mut a = ActiveSequences::default();
        let no_reuse = BookingOptions {
            assume_kv_reuse: false,
            ..Default::default()
        };
        a.add_request("a".into(), W, &s, 16, 0, 4, no_reuse, None, T0)
            .unwrap();
        a.add_request("b".into(), W, &s, 16, 0, 4, no_reuse, None, T0)
            .unwrap();
        assert_eq!(
            a.load(W, T0).active_decode_blocks,
            8,
            "nothing dedups without KV reuse"
        );
        let no_blocks = BookingOptions {
            track_active_blocks: false,
            track_prefill_tokens: false,
            ..Default::default()
        };
        a.add_request("c".into(), W, &s, 16, 0, 4, no_blocks, None, T0)
            .unwrap();
        assert_eq!(
            a.load(W, T0),
            WorkerLoad {
                active_prefill_tokens: 32,
                active_decode_blocks: 8,
                active_requests: 3
            }
        );
        let pl = a.potential_load(W, &s, 16, 4, no_blocks, T0);
        assert_eq!(
            (pl.potential_decode_blocks, pl.potential_prefill_tokens),
            (8, 16)
        );
    }

    #[test]
    fn stale_requests_expire_and_removed_workers_release_everything() {
        let mut a = ActiveSequences::new(Duration::from_secs(300));
        let s = seq(&(0..16).collect::<Vec<_>>());
        let o = BookingOptions::default();
        a.add_request("old".into(), W, &s, 16, 0, 4, o, None, T0)
            .unwrap();
        a.add_request(
            "new".into(),
            W,
            &s,
            16,
            0,
            4,
            o,
            None,
            Duration::from_secs(200),
        )
        .unwrap();
        assert_eq!(a.expire(Duration::from_secs(299)), 0);
        assert_eq!(a.expire(Duration::from_secs(300)), 1);
        assert_eq!(a.expired_total(), 1);
        assert_eq!(a.load(W, T0).active_requests, 1);
        assert_eq!(a.worker_of("new"), Some(W));
        a.remove_worker(1);
        assert_eq!(a.load(W, T0), WorkerLoad::default());
        assert_eq!(a.num_active(), 0);
        assert!(a.free("new", T0).is_err());
    }

    #[test]
    fn only_the_oldest_prefill_decays_over_its_predicted_time() {
        let mut a = ActiveSequences::default();
        let o = BookingOptions::default();
        let ms = Duration::from_millis;
        let s = |base: u32| seq(&(base..base + 16).collect::<Vec<_>>());
        // 1000 uncached tokens predicted to take 100 ms, then 400 tokens (200 ms).
        a.add_request("a".into(), W, &s(0), 1000, 0, 4, o, Some(ms(100)), ms(0))
            .unwrap();
        a.add_request("b".into(), W, &s(100), 400, 0, 4, o, Some(ms(200)), ms(10))
            .unwrap();
        assert_eq!(a.load(W, ms(0)).active_prefill_tokens, 1400);
        assert_eq!(a.load(W, ms(25)).active_prefill_tokens, 750 + 400);
        assert_eq!(
            a.load(W, ms(500)).active_prefill_tokens,
            400,
            "past its prediction the oldest counts 0, the next in full"
        );
        // a's first token at 120 ms: b becomes the anchor and decays from then.
        let sample = a.mark_prefill_complete("a", ms(120)).unwrap();
        assert_eq!(
            sample,
            Some(PrefillSample {
                worker: W,
                tokens: 1000,
                elapsed: ms(120)
            }),
            "a had the rank to itself: a clean sample"
        );
        assert_eq!(a.load(W, ms(220)).active_prefill_tokens, 200);
        assert_eq!(a.mark_prefill_complete("a", ms(130)).unwrap(), None);
        assert_eq!(
            a.mark_prefill_complete("b", ms(300)).unwrap(),
            None,
            "b was booked behind a: not a sample"
        );
        // A request freed before its first token (failed) hands the anchor on too.
        a.add_request("c".into(), W, &s(200), 800, 0, 4, o, Some(ms(100)), ms(300))
            .unwrap();
        a.add_request("d".into(), W, &s(300), 800, 0, 4, o, None, ms(300))
            .unwrap();
        a.free("c", ms(350)).unwrap();
        assert_eq!(
            a.load(W, ms(1000)).active_prefill_tokens,
            800,
            "without a prediction a prefill counts in full"
        );
        a.free("d", ms(400)).unwrap();
        a.free("a", ms(400)).unwrap();
        a.free("b", ms(400)).unwrap();
        assert_eq!(a.load(W, ms(400)), WorkerLoad::default());
    }
}
