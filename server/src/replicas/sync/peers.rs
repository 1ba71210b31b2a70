//! The other replicas this router hears from, and which of their bookings it mirrors: so that
//! a replica that goes silent (dead, partitioned) past the timeout, restarts, or loses
//! operations leaves no load behind, and a hostile one cannot grow this router's memory past
//! fixed bounds.
//!
//! A peer's operations are trusted only as one unbroken stream: every message carries the
//! sender's `epoch` (changed when it restarts or loses operations of its own) and `seq`
//! (consecutive). A new epoch or a gap in `seq` frees everything mirrored of that peer, which
//! then starts clean: its later frees of older bookings are unknown and ignored, so nothing
//! can be left booked by a lost free.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Peers tracked at most; messages from more are ignored.
pub const MAX_PEERS: usize = 64;
/// Bookings mirrored per peer at most.
pub const MAX_PEER_BOOKINGS: usize = 65_536;
/// Blocks (sequence hashes) of one peer's mirrored bookings at most (32 MiB of hashes).
pub const MAX_PEER_BLOCKS: u64 = 4 << 20;

/// This router's id for a peer's request: `peer:<router id>:<request id>`. Router ids have no
/// `:`, local ids are `r<n>` and `x:<caller id>`: no collision.
pub fn scheduler_id(router_id: &str, request_id: &str) -> String {
    format!("peer:{router_id}:{request_id}")
}

#[derive(Debug)]
struct Peer {
    last_seen: Instant,
    epoch: u64,
    next_seq: u64,
    /// Mirrored bookings: the peer's request id → its blocks.
    bookings: HashMap<String, u64>,
    blocks: u64,
}

/// Why a peer's booking was not mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Mirrored already.
    Duplicate,
    /// Past [`MAX_PEER_BOOKINGS`] or [`MAX_PEER_BLOCKS`].
    Limit,
    /// Not a peer (never heard, or past [`MAX_PEERS`]).
    UnknownPeer,
}

/// The peers heard from, each with its mirrored bookings.
#[derive(Debug)]
pub struct Peers {
    peers: HashMap<String, Peer>,
    timeout: Duration,
    bookings: usize,
}

/// What hearing a message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Heard {
    /// Scheduler ids to free: the peer restarted or lost messages.
    pub reset: Vec<String>,
    /// The peer is past [`MAX_PEERS`]: ignore the message.
    pub refused: bool,
}

impl Peers {
    /// `timeout`: a peer not heard from for this long is dropped with its bookings.
    pub fn new(timeout: Duration) -> Self {
        Self {
            peers: HashMap::new(),
            timeout,
            bookings: 0,
        }
    }

    /// A message `seq` of `epoch` from `router_id` arrived at `now`.
    pub fn heard(&mut self, router_id: &str, epoch: u64, seq: u64, now: Instant) -> Heard {
        let Some(p) = self.peers.get_mut(router_id) else {
            if self.peers.len() >= MAX_PEERS {
                return Heard {
                    refused: true,
                    ..Default::default()
                };
            }
            let p = Peer {
                last_seen: now,
                epoch,
                next_seq: seq.wrapping_add(1),
                bookings: HashMap::new(),
                blocks: 0,
            };
            self.peers.insert(router_id.to_string(), p);
            return Heard::default();
        };
        p.last_seen = now;
        let broken = p.epoch != epoch || p.next_seq != seq;
        p.epoch = epoch;
        p.next_seq = seq.wrapping_add(1);
        if !broken {
            return Heard::default();
        }
        let reset = drain(router_id, p);
        self.bookings -= reset.len();
        Heard {
            reset,
            refused: false,
        }
    }

    /// Mirror `router_id`'s booking `request_id` of `blocks` blocks: its scheduler id.
    pub fn admit(
        &mut self,
        router_id: &str,
        request_id: &str,
        blocks: usize,
    ) -> Result<String, Refused> {
        let p = self.peers.get_mut(router_id).ok_or(Refused::UnknownPeer)?;
        if p.bookings.contains_key(request_id) {
            return Err(Refused::Duplicate);
        }
        let blocks = blocks as u64;
        if p.bookings.len() >= MAX_PEER_BOOKINGS || p.blocks + blocks > MAX_PEER_BLOCKS {
            return Err(Refused::Limit);
        }
        p.bookings.insert(request_id.to_string(), blocks);
        p.blocks += blocks;
        self.bookings += 1;
        Ok(scheduler_id(router_id, request_id))
    }

    /// Stop mirroring `router_id`'s booking `request_id` (freed, or refused by the
    /// scheduler): its scheduler id, if it was mirrored.
    pub fn forget(&mut self, router_id: &str, request_id: &str) -> Option<String> {
        let p = self.peers.get_mut(router_id)?;
        let blocks = p.bookings.remove(request_id)?;
        p.blocks -= blocks;
        self.bookings -= 1;
        Some(scheduler_id(router_id, request_id))
    }

    /// Whether `router_id`'s booking `request_id` is mirrored.
    pub fn has(&self, router_id: &str, request_id: &str) -> bool {
        self.peers
            .get(router_id)
            .is_some_and(|p| p.bookings.contains_key(request_id))
    }

    /// Drop the peers not heard from within the timeout before `now`: the scheduler ids of
    /// their bookings, to free.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.timeout;
        self.drop_where(|p| now.saturating_duration_since(p.last_seen) >= timeout)
    }

    /// Drop every peer (this router can no longer hear them): the scheduler ids of their
    /// bookings, to free.
    pub fn drop_all(&mut self) -> Vec<String> {
        self.drop_where(|_| true)
    }

    fn drop_where(&mut self, gone: impl Fn(&Peer) -> bool) -> Vec<String> {
        let mut freed = Vec::new();
        self.peers.retain(|id, p| {
            if !gone(p) {
                return true;
            }
            tracing::warn!(peer = %id, bookings = p.bookings.len(),
                "router replica no longer heard: its bookings are freed");
            freed.extend(drain(id, p));
            false
        });
        self.bookings -= freed.len();
        freed
    }

    /// Peers tracked.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Bookings mirrored, all peers.
    pub fn bookings(&self) -> usize {
        self.bookings
    }
}

/// Every mirrored booking of `p`, removed, as scheduler ids.
fn drain(router_id: &str, p: &mut Peer) -> Vec<String> {
    p.blocks = 0;
    p.bookings
        .drain()
        .map(|(r, _)| scheduler_id(router_id, &r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_peers_expire_with_their_bookings_and_come_back_clean() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Peers::new(s(3));
        assert_eq!(p.heard("a", 1, 0, t0), Heard::default());
        assert_eq!(p.heard("b", 5, 10, t0), Heard::default());
        assert_eq!(p.admit("a", "r1", 4).unwrap(), "peer:a:r1");
        p.admit("a", "r2", 4).unwrap();
        p.admit("b", "r1", 4).unwrap();
        assert_eq!(p.admit("a", "r1", 4), Err(Refused::Duplicate));
        assert_eq!(p.admit("c", "r1", 4), Err(Refused::UnknownPeer));
        assert_eq!(p.bookings(), 3);
        // b keeps talking (heartbeats), a does not.
        p.heard("b", 5, 11, t0 + s(2));
        assert!(p.expire(t0 + s(2)).is_empty());
        let mut gone = p.expire(t0 + s(3));
        gone.sort();
        assert_eq!(gone, ["peer:a:r1", "peer:a:r2"]);
        assert_eq!((p.len(), p.bookings()), (1, 1));
        // a comes back: clean, its old free is unknown.
        p.heard("a", 1, 7, t0 + s(4));
        assert_eq!(p.forget("a", "r1"), None);
        assert_eq!(p.forget("b", "r1").as_deref(), Some("peer:b:r1"));
        assert_eq!(p.bookings(), 0);
    }

    #[test]
    fn a_restart_or_a_gap_frees_everything_of_that_peer() {
        let t0 = Instant::now();
        let mut p = Peers::new(Duration::from_secs(3));
        p.heard("a", 1, 0, t0);
        p.admit("a", "r1", 1).unwrap();
        assert!(p.heard("a", 1, 1, t0).reset.is_empty());
        assert_eq!(p.heard("a", 1, 3, t0).reset, ["peer:a:r1"], "seq 2 lost");
        p.admit("a", "r2", 1).unwrap();
        assert!(p.heard("a", 1, 4, t0).reset.is_empty());
        assert_eq!(p.heard("a", 2, 5, t0).reset, ["peer:a:r2"], "new epoch");
        assert_eq!(p.bookings(), 0);
        assert!(!p.has("a", "r2"));
    }

    #[test]
    fn peers_and_their_bookings_are_bounded() {
        let t0 = Instant::now();
        let mut p = Peers::new(Duration::from_secs(3));
        for i in 0..MAX_PEERS {
            assert!(!p.heard(&format!("p{i}"), 0, 0, t0).refused);
        }
        assert!(p.heard("one-too-many", 0, 0, t0).refused);
        assert_eq!(p.admit("one-too-many", "r", 1), Err(Refused::UnknownPeer));
        for i in 0..MAX_PEER_BOOKINGS {
            p.admit("p0", &format!("r{i}"), 0).unwrap();
        }
        assert_eq!(p.admit("p0", "more", 0), Err(Refused::Limit));
        assert_eq!(
            p.admit("p1", "big", MAX_PEER_BLOCKS as usize + 1),
            Err(Refused::Limit)
        );
        p.admit("p1", "fits", MAX_PEER_BLOCKS as usize).unwrap();
        assert_eq!(p.admit("p1", "one-more", 1), Err(Refused::Limit));
        p.forget("p1", "fits").unwrap();
        p.admit("p1", "one-more", 1).unwrap();
    }
}
