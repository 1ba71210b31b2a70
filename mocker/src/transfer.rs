//! The KV transfers a prefill worker holds for decode workers (disaggregated serving).
//!
//! A request that asked for a remote decode (vLLM's `do_remote_decode`, or an SGLang
//! `bootstrap_room`) ends with its blocks still referenced by the engine
//! ([`crate::engine::KvTransfer::Send`]). This table is the bookkeeping around those blocks: who
//! may pull them (by vLLM request id and block ids, or by SGLang bootstrap room), until when, and
//! what became of the ones that are gone. The worker loop releases the engine's blocks for every
//! transfer this table hands back — pulled, expired or dropped.
//!
//! Bounds: at most `cap` transfers are held (beyond it the oldest is dropped, as if expired),
//! at most `cap` pulls wait for a room, and at most `cap` outcomes of gone transfers are
//! remembered (for error messages). Every hold expires `timeout` after it began (vLLM's
//! `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`), every waiting pull `timeout` after it arrived.
//!
//! No clock and no I/O: callers pass `now`.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::kv_pool::BlockId;
use crate::scheduler::SeqId;

/// Transfers held at most by default; also the bound on waiting pulls and remembered outcomes.
pub const DEFAULT_MAX_HELD: usize = 4096;

/// What names a transfer when its request ends on the prefill worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldSpec {
    /// The prefill response's id, sent back as `remote_request_id`.
    pub request_id: String,
    /// The SGLang bootstrap room, when the transfer is addressed by one.
    pub room: Option<u64>,
}

/// How a decode worker names the transfer it pulls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullKey {
    /// vLLM: the `remote_block_ids` of the prefill response, and its `remote_request_id` when
    /// the decode worker was given one.
    Blocks {
        /// `remote_request_id`.
        request_id: Option<String>,
        /// `remote_block_ids`, in order.
        block_ids: Vec<BlockId>,
    },
    /// SGLang: the `bootstrap_room` shared by the prefill and the decode request. The pull
    /// waits for the prefill of that room to finish.
    Room(u64),
}

/// What a successful pull hands the decode worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullGrant {
    /// The prefill worker's block table of the request.
    pub block_ids: Vec<BlockId>,
    /// Tokens whose KV those blocks hold (the prompt, for a one-token prefill).
    pub num_tokens: usize,
}

/// Why a pull failed; the message is what the decode worker reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PullError(pub String);

/// What a pull is answered.
pub type PullResult = Result<PullGrant, PullError>;

/// The answer channel of a pull.
pub type PullReply = oneshot::Sender<PullResult>;

/// A pull answered at once: the transfer taken (release its blocks) and what it held, or why
/// not.
pub type Taken = Result<(Released, PullGrant), PullError>;

/// What became of a transfer no longer held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    Pulled,
    Expired,
    Dropped,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum GoneKey {
    Request(String),
    Room(u64),
}

#[derive(Debug)]
struct Held {
    spec: HoldSpec,
    grant: PullGrant,
}

#[derive(Debug)]
struct Waiter {
    room: u64,
    deadline: Instant,
    reply: PullReply,
}

/// A transfer leaving the table: release the engine's blocks of `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// The prefill request whose blocks to release.
    pub seq: SeqId,
    /// Blocks it held.
    pub num_blocks: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct HeldTransfers {
    cap: usize,
    timeout: Duration,
    held: HashMap<SeqId, Held>,
    /// Holds in start order, which is deadline order (one timeout for all). Entries of
    /// transfers already gone are skipped when they reach the front.
    order: VecDeque<(Instant, SeqId)>,
    by_request: HashMap<String, SeqId>,
    by_room: HashMap<u64, SeqId>,
    waiting: VecDeque<Waiter>,
    gone: HashMap<GoneKey, Gone>,
    gone_order: VecDeque<GoneKey>,
    num_blocks: usize,
}

/// Counts of what left the table, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Transfers a decode worker pulled.
    pub pulled: u64,
    /// Transfers released unpulled: timed out, or dropped over the cap.
    pub expired: u64,
}

impl HeldTransfers {
    /// An empty table holding at most `cap` (≥ 1) transfers for `timeout` each.
    pub fn new(cap: usize, timeout: Duration) -> Self {
        Self {
            cap: cap.max(1),
            timeout,
            held: HashMap::new(),
            order: VecDeque::new(),
            by_request: HashMap::new(),
            by_room: HashMap::new(),
            waiting: VecDeque::new(),
            gone: HashMap::new(),
            gone_order: VecDeque::new(),
            num_blocks: 0,
        }
    }

    /// Transfers held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Blocks held, summed over transfers (a block shared by two counts twice).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Pulls waiting for a room.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Records that `seq` finished holding `grant.block_ids` at `now`. Returns the transfers to
    /// release right away: the oldest ones beyond the cap, or this one when a waiting pull took
    /// it at once (then answered here) or its room is already taken by another transfer.
    pub fn hold(
        &mut self,
        seq: SeqId,
        spec: HoldSpec,
        grant: PullGrant,
        now: Instant,
        out: &mut Outcomes,
    ) -> Vec<Released> {
        let num_blocks = grant.block_ids.len();
        if let Some(room) = spec.room {
            if self.by_room.contains_key(&room) {
                // A room names one request; a second prefill for it is the router's bug.
                tracing::warn!("bootstrap room {room} is already held; releasing the new one");
                out.expired += 1;
                return vec![Released { seq, num_blocks }];
            }
            // A pull that arrived first takes the transfer now (dead waiters are skipped).
            while let Some(i) = self.waiting.iter().position(|w| w.room == room) {
                let w = self.waiting.remove(i).expect("index in range");
                if w.reply.send(Ok(grant.clone())).is_ok() {
                    self.remember(GoneKey::Request(spec.request_id.clone()), Gone::Pulled);
                    self.remember(GoneKey::Room(room), Gone::Pulled);
                    out.pulled += 1;
                    return vec![Released { seq, num_blocks }];
                }
            }
            self.by_room.insert(room, seq);
        }
        self.by_request.insert(spec.request_id.clone(), seq);
        self.order.push_back((now + self.timeout, seq));
        self.num_blocks += num_blocks;
        self.held.insert(seq, Held { spec, grant });
        let mut released = Vec::new();
        while self.held.len() > self.cap {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.remove(oldest, Gone::Dropped) {
                out.expired += 1;
                released.push(r);
            }
        }
        released
    }

    /// Serves a pull at `now`. `Some` answers it now (the caller releases the grant's blocks
    /// on `Ok`); `None` means it waits for its room's prefill (answered by a later
    /// [`HeldTransfers::hold`] or [`HeldTransfers::expire`]). A waiting pull beyond the cap
    /// pushes out the oldest waiting one, answered here with an error.
    pub fn pull(
        &mut self,
        key: PullKey,
        reply: PullReply,
        now: Instant,
        out: &mut Outcomes,
    ) -> Option<(PullReply, Taken)> {
        let found = match &key {
            PullKey::Room(room) => self.by_room.get(room).copied(),
            PullKey::Blocks {
                request_id: Some(r),
                ..
            } => self.by_request.get(r).copied(),
            PullKey::Blocks {
                request_id: None,
                block_ids,
            } => self
                .held
                .iter()
                .find(|(_, h)| &h.grant.block_ids == block_ids)
                .map(|(s, _)| *s),
        };
        if let (Some(h), PullKey::Blocks { block_ids, .. }) =
            (found.and_then(|s| self.held.get(&s)), &key)
        {
            if &h.grant.block_ids != block_ids {
                let e = PullError(format!(
                    "remote_block_ids {block_ids:?} are not the blocks of request {} \
                     (it holds {:?})",
                    h.spec.request_id, h.grant.block_ids
                ));
                return Some((reply, Err(e)));
            }
        }
        if let Some(seq) = found {
            let grant = self.held.get(&seq).map(|h| h.grant.clone());
            if let (Some(grant), Some(r)) = (grant, self.remove(seq, Gone::Pulled)) {
                out.pulled += 1;
                return Some((reply, Ok((r, grant))));
            }
        }
        let room = match key {
            PullKey::Room(room) => room,
            PullKey::Blocks {
                request_id,
                block_ids,
            } => {
                let what = match &request_id {
                    Some(r) => format!("request {r}"),
                    None => format!("blocks {block_ids:?}"),
                };
                let gone = request_id.and_then(|r| self.gone.get(&GoneKey::Request(r)));
                return Some((reply, Err(self.gone_error(&what, gone.copied()))));
            }
        };
        if let Some(g) = self.gone.get(&GoneKey::Room(room)).copied() {
            return Some((
                reply,
                Err(self.gone_error(&format!("bootstrap room {room}"), Some(g))),
            ));
        }
        self.waiting.push_back(Waiter {
            room,
            deadline: now + self.timeout,
            reply,
        });
        if self.waiting.len() > self.cap {
            let w = self.waiting.pop_front().expect("non-empty");
            let e = PullError(format!(
                "too many pulls waiting for their prefill; gave up on bootstrap room {}",
                w.room
            ));
            return Some((w.reply, Err(e)));
        }
        None
    }

    /// Expires, at `now`, the holds and waiting pulls whose time is up. Returns the transfers
    /// to release; waiting pulls are answered here with an error.
    pub fn expire(&mut self, now: Instant, out: &mut Outcomes) -> Vec<Released> {
        let mut released = Vec::new();
        while let Some(&(deadline, seq)) = self.order.front() {
            if !self.held.contains_key(&seq) {
                self.order.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if let Some(r) = self.remove(seq, Gone::Expired) {
                out.expired += 1;
                released.push(r);
            }
        }
        while self.waiting.front().is_some_and(|w| w.deadline <= now) {
            let w = self.waiting.pop_front().expect("non-empty");
            let e = PullError(format!(
                "no prefill for bootstrap room {} finished within {:.3} s",
                w.room,
                self.timeout.as_secs_f64()
            ));
            let _ = w.reply.send(Err(e));
        }
        released
    }

    /// When [`HeldTransfers::expire`] next has something to do.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(_, seq)) = self.order.front() {
            if self.held.contains_key(&seq) {
                break;
            }
            self.order.pop_front();
        }
        let hold = self.order.front().map(|(d, _)| *d);
        let wait = self.waiting.front().map(|w| w.deadline);
        match (hold, wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn remove(&mut self, seq: SeqId, why: Gone) -> Option<Released> {
        let h = self.held.remove(&seq)?;
        self.num_blocks -= h.grant.block_ids.len();
        self.by_request.remove(&h.spec.request_id);
        self.remember(GoneKey::Request(h.spec.request_id), why);
        if let Some(room) = h.spec.room {
            self.by_room.remove(&room);
            self.remember(GoneKey::Room(room), why);
        }
        Some(Released {
            seq,
            num_blocks: h.grant.block_ids.len(),
        })
    }

    fn remember(&mut self, key: GoneKey, why: Gone) {
        if self.gone.insert(key.clone(), why).is_none() {
            self.gone_order.push_back(key);
        }
        while self.gone_order.len() > self.cap {
            if let Some(k) = self.gone_order.pop_front() {
                self.gone.remove(&k);
            }
        }
    }

    fn gone_error(&self, what: &str, gone: Option<Gone>) -> PullError {
        let t = self.timeout.as_secs_f64();
        PullError(match gone {
            Some(Gone::Pulled) => format!("the KV blocks of {what} were already pulled"),
            Some(Gone::Expired) => {
                format!("the KV blocks of {what} expired: not pulled within {t:.3} s")
            }
            Some(Gone::Dropped) => format!(
                "the KV blocks of {what} were released: more than {} transfers were held",
                self.cap
            ),
            None => format!("this prefill worker holds no KV blocks for {what}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, room: Option<u64>) -> HoldSpec {
        HoldSpec {
            request_id: id.into(),
            room,
        }
    }

    fn grant(blocks: &[BlockId]) -> PullGrant {
        PullGrant {
            block_ids: blocks.to_vec(),
            num_tokens: blocks.len() * 4,
        }
    }

    fn by_blocks(id: Option<&str>, blocks: &[BlockId]) -> PullKey {
        PullKey::Blocks {
            request_id: id.map(Into::into),
            block_ids: blocks.to_vec(),
        }
    }

    fn pull_counted(
        t: &mut HeldTransfers,
        key: PullKey,
        now: Instant,
        o: &mut Outcomes,
    ) -> (Option<Taken>, oneshot::Receiver<PullResult>) {
        let (tx, rx) = oneshot::channel();
        let r = t.pull(key, tx, now, o).map(|(_, r)| r);
        (r, rx)
    }

    fn pull(
        t: &mut HeldTransfers,
        key: PullKey,
        now: Instant,
    ) -> (Option<Taken>, oneshot::Receiver<PullResult>) {
        pull_counted(t, key, now, &mut Outcomes::default())
    }

    #[test]
    fn a_pull_takes_a_hold_once_and_then_says_why_it_is_gone() {
        let now = Instant::now();
        let mut t = HeldTransfers::new(8, Duration::from_secs(10));
        let mut o = Outcomes::default();
        assert!(t
            .hold(1, spec("a", None), grant(&[3, 4]), now, &mut o)
            .is_empty());
        assert_eq!((t.len(), t.num_blocks()), (1, 2));
        // Wrong blocks for the id: refused, still held.
        let (r, _) = pull(&mut t, by_blocks(Some("a"), &[3]), now);
        assert!(r.unwrap().is_err());
        // By block ids alone (older vLLM params without remote_request_id).
        let (r, _) = pull(&mut t, by_blocks(None, &[3, 4]), now);
        let (rel, g) = r.unwrap().unwrap();
        assert_eq!(
            rel,
            Released {
                seq: 1,
                num_blocks: 2
            }
        );
        assert_eq!(g.block_ids, vec![3, 4]);
        assert!(t.is_empty());
        let (r, _) = pull(&mut t, by_blocks(Some("a"), &[3, 4]), now);
        assert!(r.unwrap().unwrap_err().0.contains("already pulled"));
        let (r, _) = pull(&mut t, by_blocks(Some("zz"), &[3, 4]), now);
        assert!(r.unwrap().unwrap_err().0.contains("holds no KV blocks"));
    }

    #[test]
    fn holds_expire_and_the_cap_drops_the_oldest() {
        let now = Instant::now();
        let mut t = HeldTransfers::new(2, Duration::from_secs(1));
        let mut o = Outcomes::default();
        t.hold(1, spec("a", None), grant(&[1]), now, &mut o);
        t.hold(
            2,
            spec("b", None),
            grant(&[2]),
            now + Duration::from_millis(10),
            &mut o,
        );
        let r = t.hold(
            3,
            spec("c", None),
            grant(&[3]),
            now + Duration::from_millis(20),
            &mut o,
        );
        assert_eq!(
            r,
            vec![Released {
                seq: 1,
                num_blocks: 1
            }]
        );
        assert_eq!(o.expired, 1);
        let (r, _) = pull(&mut t, by_blocks(Some("a"), &[1]), now);
        assert!(r.unwrap().unwrap_err().0.contains("more than 2 transfers"));
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(1010)));
        assert!(t
            .expire(now + Duration::from_millis(500), &mut o)
            .is_empty());
        let r = t.expire(now + Duration::from_millis(1015), &mut o);
        assert_eq!(
            r,
            vec![Released {
                seq: 2,
                num_blocks: 1
            }]
        );
        let r = t.expire(now + Duration::from_secs(5), &mut o);
        assert_eq!(
            r,
            vec![Released {
                seq: 3,
                num_blocks: 1
            }]
        );
        assert_eq!((t.len(), t.num_blocks(), o.expired), (0, 0, 3));
        assert_eq!(t.next_deadline(), None);
        let (r, _) = pull(&mut t, by_blocks(Some("b"), &[2]), now);
        assert!(r.unwrap().unwrap_err().0.contains("expired"));
    }

    #[test]
    fn a_room_pull_waits_for_its_prefill_or_times_out() {
        let now = Instant::now();
        let mut t = HeldTransfers::new(4, Duration::from_secs(2));
        let mut o = Outcomes::default();
        let (r, mut rx) = pull(&mut t, PullKey::Room(7), now);
        assert!(r.is_none());
        assert_eq!(t.num_waiting(), 1);
        // The prefill of room 7 finishes: the waiting pull takes it at once.
        let rel = t.hold(5, spec("p", Some(7)), grant(&[9]), now, &mut o);
        assert_eq!(
            rel,
            vec![Released {
                seq: 5,
                num_blocks: 1
            }]
        );
        assert_eq!(rx.try_recv().unwrap().unwrap().block_ids, vec![9]);
        assert!(t.is_empty());
        // Held first, pulled later.
        t.hold(6, spec("q", Some(8)), grant(&[1, 2]), now, &mut o);
        let (r, _) = pull_counted(&mut t, PullKey::Room(8), now, &mut o);
        assert_eq!(r.unwrap().unwrap().0.seq, 6);
        // A room whose prefill never comes: the wait ends with an error.
        let (r, mut rx) = pull(&mut t, PullKey::Room(99), now);
        assert!(r.is_none());
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(2)));
        t.expire(now + Duration::from_secs(3), &mut o);
        assert!(rx.try_recv().unwrap().unwrap_err().0.contains("room 99"));
        assert_eq!(t.num_waiting(), 0);
        assert_eq!(o.pulled, 2);
    }

    #[test]
    fn waiting_pulls_are_bounded() {
        let now = Instant::now();
        let mut t = HeldTransfers::new(2, Duration::from_secs(2));
        assert!(pull(&mut t, PullKey::Room(1), now).0.is_none());
        assert!(pull(&mut t, PullKey::Room(2), now).0.is_none());
        let (tx, _rx) = oneshot::channel();
        let (first, r) = t
            .pull(PullKey::Room(3), tx, now, &mut Outcomes::default())
            .unwrap();
        assert!(r.is_err());
        drop(first);
        assert_eq!(t.num_waiting(), 2);
    }
}
