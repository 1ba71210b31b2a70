//! The router queue (`--router-queue-threshold`, `--router-queue-policy`; spec §7.2): when every
//! worker is past the threshold, requests wait in the router instead of piling onto engines.
//!
//! The queue is a heap keyed by `(strict priority tier, policy key, arrival order)`:
//!
//! * `fcfs` (default): key `priority − arrival` (seconds) — the oldest first, a request's
//!   `nvext.agent_hints.priority` moving it that many seconds ahead. Optimises tail TTFT.
//! * `wspt` (Smith's rule, weighted shortest processing time first): key
//!   `(1 + priority) / max(1, uncached_tokens)` — the shortest remaining prefill first. Optimises
//!   mean TTFT.
//!
//! A higher `strict_priority` tier always goes first. Whether a request must wait is
//! [`crate::Scheduler::admits`]; the caller holds waiting requests here and pops them when load
//! falls. The queue is bounded: [`RouterQueue::push`] refuses past its limit.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Order of the router queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// First come, first served (priority moves a request ahead by that many seconds).
    #[default]
    Fcfs,
    /// Weighted shortest processing time: fewest uncached prompt tokens first.
    Wspt,
}

impl FromStr for QueuePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fcfs" => Ok(Self::Fcfs),
            "wspt" => Ok(Self::Wspt),
            _ => Err(format!("unknown queue policy {s:?}: expected fcfs or wspt")),
        }
    }
}

impl fmt::Display for QueuePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fcfs => "fcfs",
            Self::Wspt => "wspt",
        })
    }
}

/// What orders one waiting request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueueMeta {
    /// `nvext.agent_hints.strict_priority`: a higher tier always goes first.
    pub tier: i32,
    /// `nvext.agent_hints.priority` (finite; seconds of head start under fcfs, a weight under
    /// wspt).
    pub priority: f64,
    /// When the request arrived (the caller's clock).
    pub arrival: Duration,
    /// Prompt tokens not cached on the best worker (wspt's processing time).
    pub uncached_tokens: usize,
}

/// The queue was at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the router queue is full ({0} requests waiting)")]
pub struct QueueFull(pub usize);

struct Entry<T> {
    tier: i32,
    key: f64,
    seq: u64,
    meta: QueueMeta,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Entry<T> {
    /// Max-heap order: higher tier, then higher key, then earlier push.
    fn cmp(&self, o: &Self) -> Ordering {
        self.tier
            .cmp(&o.tier)
            .then(self.key.total_cmp(&o.key))
            .then(o.seq.cmp(&self.seq))
    }
}

/// Waiting requests of any caller-defined type `T`, popped in policy order.
pub struct RouterQueue<T> {
    policy: QueuePolicy,
    limit: usize,
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

impl<T> fmt::Debug for RouterQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterQueue")
            .field("policy", &self.policy)
            .field("limit", &self.limit)
            .field("len", &self.heap.len())
            .finish()
    }
}

impl<T> RouterQueue<T> {
    /// An empty queue holding at most `limit` requests.
    pub fn new(policy: QueuePolicy, limit: usize) -> Self {
        Self {
            policy,
            limit,
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn policy(&self) -> QueuePolicy {
        self.policy
    }

    /// Add a waiting request. Errors: the queue already holds its limit.
    pub fn push(&mut self, meta: QueueMeta, item: T) -> Result<(), QueueFull> {
        if self.heap.len() >= self.limit {
            return Err(QueueFull(self.heap.len()));
        }
        let priority = if meta.priority.is_finite() {
            meta.priority
        } else {
            0.0
        };
        let key = match self.policy {
            QueuePolicy::Fcfs => priority - meta.arrival.as_secs_f64(),
            QueuePolicy::Wspt => (1.0 + priority) / meta.uncached_tokens.max(1) as f64,
        };
        self.seq += 1;
        self.heap.push(Entry {
            tier: meta.tier,
            key,
            seq: self.seq,
            meta,
            item,
        });
        Ok(())
    }

    /// The next request to dispatch, with what it was queued with.
    pub fn pop(&mut self) -> Option<(QueueMeta, T)> {
        self.heap.pop().map(|e| (e.meta, e.item))
    }

    /// The request [`pop`](Self::pop) would return next.
    pub fn peek(&self) -> Option<(&QueueMeta, &T)> {
        self.heap.peek().map(|e| (&e.meta, &e.item))
    }

    /// Drop every waiting request for which `keep` is false (e.g. its client is gone).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.heap.retain(|e| keep(&e.item));
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(tier: i32, priority: f64, arrival_s: u64, uncached: usize) -> QueueMeta {
        QueueMeta {
            tier,
            priority,
            arrival: Duration::from_secs(arrival_s),
            uncached_tokens: uncached,
        }
    }

    fn drain<T>(q: &mut RouterQueue<T>) -> Vec<T> {
        std::iter::from_fn(|| q.pop().map(|(_, t)| t)).collect()
    }

    #[test]
    fn fcfs_serves_in_arrival_order_and_priority_is_a_head_start() {
        let mut q = RouterQueue::new(QueuePolicy::Fcfs, 10);
        q.push(meta(0, 0.0, 10, 100), "a").unwrap();
        q.push(meta(0, 0.0, 11, 1), "b").unwrap();
        q.push(meta(0, 0.0, 11, 1), "c").unwrap(); // same key: push order
        q.push(meta(0, 5.0, 14, 1), "d").unwrap(); // arrived at 14 with 5 s head start: before a
        assert_eq!(drain(&mut q), ["d", "a", "b", "c"]);
    }

    #[test]
    fn wspt_serves_the_shortest_uncached_prefill_first() {
        let mut q = RouterQueue::new(QueuePolicy::Wspt, 10);
        q.push(meta(0, 0.0, 0, 8000), "long").unwrap();
        q.push(meta(0, 0.0, 1, 100), "short").unwrap();
        q.push(meta(0, 0.0, 2, 0), "cached").unwrap();
        q.push(meta(0, 1.0, 3, 1000), "weighted").unwrap(); // 2/1000 > 1/8000
        assert_eq!(drain(&mut q), ["cached", "short", "weighted", "long"]);
    }

    #[test]
    fn a_strict_tier_always_goes_first_and_the_limit_holds() {
        let mut q = RouterQueue::new(QueuePolicy::Wspt, 3);
        q.push(meta(0, 0.0, 0, 1), "cheap").unwrap();
        q.push(meta(1, 0.0, 5, 100_000), "vip").unwrap();
        q.push(meta(0, f64::NAN, 0, 10), "nan priority counts as 0")
            .unwrap();
        assert_eq!(q.push(meta(9, 0.0, 0, 1), "over"), Err(QueueFull(3)));
        q.retain(|t| !t.starts_with("nan"));
        assert_eq!(drain(&mut q), ["vip", "cheap"]);
        assert!(q.is_empty());
    }
}
