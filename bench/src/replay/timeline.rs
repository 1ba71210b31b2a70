//! The virtual clock: a queue of things that happen at a time, taken in time order, and among
//! equal times in the order they were scheduled — so a replay is a pure function of its inputs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<E> {
    at: f64,
    seq: u64,
    what: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    /// Reversed: the max-heap pops the earliest time, then the earliest scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Events of type `E` at virtual times (seconds).
pub struct Timeline<E> {
    heap: BinaryHeap<Entry<E>>,
    next_seq: u64,
    now: f64,
}

impl<E> Default for Timeline<E> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_seq: 0,
            now: 0.0,
        }
    }
}

impl<E> Timeline<E> {
    /// An empty timeline at time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The time of the last event taken (0 before any).
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Schedules `what` at `at` seconds; a time in the past (or NaN) means now.
    pub fn at(&mut self, at: f64, what: E) {
        let at = if at >= self.now { at } else { self.now };
        self.heap.push(Entry {
            at,
            seq: self.next_seq,
            what,
        });
        self.next_seq += 1;
    }

    /// The next event and its time, advancing the clock to it.
    pub fn pop(&mut self) -> Option<(f64, E)> {
        let e = self.heap.pop()?;
        self.now = e.at;
        Some((e.at, e.what))
    }

    /// Events still scheduled.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_then_in_scheduling_order() {
        let mut t = Timeline::new();
        t.at(2.0, "c");
        t.at(1.0, "a");
        t.at(1.0, "b");
        t.at(f64::NAN, "now");
        assert_eq!(t.pop(), Some((0.0, "now")));
        assert_eq!(t.pop(), Some((1.0, "a")));
        t.at(0.5, "late: runs now");
        assert_eq!(t.pop(), Some((1.0, "b")));
        assert_eq!(t.pop(), Some((1.0, "late: runs now")));
        assert_eq!((t.len(), t.now()), (1, 1.0));
        assert_eq!(t.pop(), Some((2.0, "c")));
        assert!(t.is_empty() && t.pop().is_none());
    }
}
