//! Closed-loop accuracy: per worker, the prefix overlap the router predicted for each request
//! it routed there (`Selection::cached_tokens`) against the `cached_tokens` the engine then
//! reported in the response usage (`usage.prompt_tokens_details.cached_tokens`).
//!
//! KV routing fails silently when router and engine disagree on block boundaries or hashes:
//! the router predicts no overlap, the engine reports hits, nobody notices. Each worker keeps
//! the last [`WINDOW`] comparisons (bounded memory) and running totals; [`judge`] derives a
//! [`Verdict`] from the window:
//!
//! * `unknown` — fewer than [`MIN_SAMPLES`] requests compared yet;
//! * `under_predicting` — in at least half of the window the engine reported more than one
//!   block above the prediction, and the predictions add up to less than half the reports
//!   (predicted 0 while the engine hits is the common case);
//! * `over_predicting` — in at least half of the window the prediction was more than one block
//!   above the report, and the reports add up to less than half the predictions;
//! * `ok` — otherwise.
//!
//! A bad verdict is logged once per episode (it turns bad, one warning; it turns `ok`, the
//! episode ends) with the likely [`Cause`], told apart by the worker's KV event flow: no events
//! arriving, stores dropped for their block size, events lost, or events arriving whose hashes
//! never match (hash seed, tokenizer, chat template).
//!
//! Reports are untrusted: a count that is not an unsigned integer is not compared, and one above
//! the prompt's length is clamped to it.

use std::collections::VecDeque;

use kvrouter_wire::subscriber::{SubscriberState, SubscriberStats};
use serde::{Deserialize, Serialize};

/// Comparisons kept per worker.
pub const WINDOW: usize = 32;
/// Comparisons needed before a verdict other than `unknown`.
pub const MIN_SAMPLES: usize = 8;

/// The verdict on a worker's predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Unknown,
    Ok,
    UnderPredicting,
    OverPredicting,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Unknown,
        Verdict::Ok,
        Verdict::UnderPredicting,
        Verdict::OverPredicting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Unknown => "unknown",
            Verdict::Ok => "ok",
            Verdict::UnderPredicting => "under_predicting",
            Verdict::OverPredicting => "over_predicting",
        }
    }

    /// Whether predictions and reports diverge.
    pub fn is_bad(self) -> bool {
        matches!(self, Verdict::UnderPredicting | Verdict::OverPredicting)
    }
}

/// What a worker's KV events looked like, summed over its ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFlow {
    /// Whether this router subscribes to the worker's events itself (false: approximate
    /// mode, or events from the NATS event plane).
    pub subscribed: bool,
    /// Ranks whose subscriber is live.
    pub live_ranks: u32,
    /// Live messages received.
    pub received: u64,
    /// Router events handed to the index.
    pub applied: u64,
    /// Events filtered out — stores whose block size is not the worker's among them.
    pub filtered: u64,
    /// Gaps, queue drops and decode errors: events the index never saw.
    pub lost: u64,
}

impl EventFlow {
    /// The flow of a worker's subscribers (`stats`, one per rank; empty: not subscribed).
    pub fn from_stats<'a>(stats: impl IntoIterator<Item = &'a SubscriberStats>) -> Self {
        let mut f = EventFlow::default();
        for st in stats {
            f.subscribed = true;
            f.live_ranks += (st.state == SubscriberState::Live) as u32;
            f.received = f.received.saturating_add(st.received);
            f.applied = f.applied.saturating_add(st.events_out);
            f.filtered = f.filtered.saturating_add(st.filtered);
            f.lost = f
                .lost
                .saturating_add(st.gaps)
                .saturating_add(st.dropped)
                .saturating_add(st.decode_errors);
        }
        f
    }
}

/// The likely cause of a bad verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Under-predicting, and this router does not read the worker's events itself.
    NoSubscriber,
    /// Under-predicting, and no KV event ever arrived.
    NoEvents,
    /// Under-predicting, events arrive but stores are dropped for their block size.
    BlockSize,
    /// Under-predicting, events were lost (gaps, drops, decode errors).
    MissedEvents,
    /// Under-predicting, events arrive and are applied but never match the router's hashes.
    HashMismatch,
    /// Over-predicting: the index holds blocks the engine no longer has.
    StaleIndex,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NoSubscriber => "no_subscriber",
            Cause::NoEvents => "no_events",
            Cause::BlockSize => "block_size",
            Cause::MissedEvents => "missed_events",
            Cause::HashMismatch => "hash_mismatch",
            Cause::StaleIndex => "stale_index",
        }
    }

    /// What an operator should check.
    pub fn advice(self) -> &'static str {
        match self {
            Cause::NoSubscriber => "the router predicts no overlap and does not read this worker's KV events itself (approximate mode or the NATS event plane): check that its events are relayed and reach the index",
            Cause::NoEvents => "no KV events arrive from this worker: check its --kv-events-config (publisher endpoint, port, topic) against the registered kv_events_endpoint, and that the router can reach it",
            Cause::BlockSize => "KV events arrive but their stores are dropped: the engine's block size differs from the one registered for it (--kv-cache-block-size / the worker's block_size)",
            Cause::MissedEvents => "KV events were lost on the way (gaps, queue drops, decode errors): the index misses blocks the engine holds",
            Cause::HashMismatch => "KV events arrive but their block hashes never match the router's: block size, hash seed (PYTHONHASHSEED / vLLM --prefix-caching-hash-algo), tokenizer or chat template differ between router and engine",
            Cause::StaleIndex => "the router predicts far more overlap than the engine finds: removals or evictions not published, missed events, or a stale index",
        }
    }

    /// The likely cause of `verdict` given the worker's event flow; `None` when it is not bad.
    pub fn of(verdict: Verdict, flow: &EventFlow) -> Option<Cause> {
        Some(match verdict {
            Verdict::Unknown | Verdict::Ok => return None,
            Verdict::OverPredicting => Cause::StaleIndex,
            Verdict::UnderPredicting if !flow.subscribed => Cause::NoSubscriber,
            Verdict::UnderPredicting if flow.received == 0 => Cause::NoEvents,
            Verdict::UnderPredicting if flow.filtered > 0 => Cause::BlockSize,
            Verdict::UnderPredicting if flow.lost > 0 => Cause::MissedEvents,
            Verdict::UnderPredicting => Cause::HashMismatch,
        })
    }
}

/// One comparison: tokens predicted and reported for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub predicted: u64,
    pub reported: u64,
}

impl Sample {
    /// A comparison with both counts clamped to the prompt's `prompt_tokens` (an engine's
    /// report is not trusted to be sane).
    pub fn new(predicted: u64, reported: u64, prompt_tokens: u64) -> Self {
        Self {
            predicted: predicted.min(prompt_tokens),
            reported: reported.min(prompt_tokens),
        }
    }

    /// `|predicted − reported|` in blocks of `block_size` tokens, rounded down.
    pub fn error_blocks(&self, block_size: usize) -> u64 {
        self.predicted.abs_diff(self.reported) / block_size.max(1) as u64
    }

    /// `under` (reported more than a block above predicted), `over` (the reverse), or `None`
    /// when they agree within a block.
    pub fn mismatch(&self, block_size: usize) -> Option<&'static str> {
        let block = block_size.max(1) as u64;
        if self.reported > self.predicted.saturating_add(block) {
            Some("under")
        } else if self.predicted > self.reported.saturating_add(block) {
            Some("over")
        } else {
            None
        }
    }
}

/// The verdict on `window` with blocks of `block_size` tokens (see the module doc).
pub fn judge<'a, I>(window: I, block_size: usize) -> Verdict
where
    I: IntoIterator<Item = &'a Sample>,
    I::IntoIter: Clone,
{
    let window = window.into_iter();
    let n = window.clone().count();
    if n < MIN_SAMPLES {
        return Verdict::Unknown;
    }
    let count = |m| {
        window
            .clone()
            .filter(|s| s.mismatch(block_size) == Some(m))
            .count()
    };
    let (under, over) = (count("under"), count("over"));
    let sum = |f: fn(&Sample) -> u64| window.clone().fold(0u64, |a, s| a.saturating_add(f(s)));
    let (p, r) = (sum(|s| s.predicted), sum(|s| s.reported));
    if 2 * under >= n && p.saturating_mul(2) < r {
        Verdict::UnderPredicting
    } else if 2 * over >= n && r.saturating_mul(2) < p {
        Verdict::OverPredicting
    } else {
        Verdict::Ok
    }
}

/// A worker's comparisons: totals since registration and the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Accuracy {
    window: VecDeque<Sample>,
    predicted_total: u64,
    reported_total: u64,
    requests: u64,
    /// Whether the current bad episode was logged.
    warned: bool,
}

/// What the admin API shows of a worker's accuracy.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub cause: Option<Cause>,
    /// The cause's advice.
    pub advice: Option<&'static str>,
    /// Requests compared since registration.
    pub requests: u64,
    pub predicted_cached_tokens: u64,
    pub reported_cached_tokens: u64,
    /// Over the window: requests, tokens predicted and reported.
    pub window_requests: usize,
    pub window_predicted_tokens: u64,
    pub window_reported_tokens: u64,
    pub events: EventFlow,
}

impl Accuracy {
    /// Record one request's comparison. Returns the verdict when it has just turned bad (log
    /// it once).
    pub fn record(&mut self, s: Sample, block_size: usize) -> Option<Verdict> {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(s);
        self.predicted_total = self.predicted_total.saturating_add(s.predicted);
        self.reported_total = self.reported_total.saturating_add(s.reported);
        self.requests = self.requests.saturating_add(1);
        let v = self.verdict(block_size);
        match v {
            Verdict::Ok => self.warned = false,
            Verdict::Unknown => {}
            _ if !self.warned => {
                self.warned = true;
                return Some(v);
            }
            _ => {}
        }
        None
    }

    /// The verdict on the window.
    pub fn verdict(&self, block_size: usize) -> Verdict {
        judge(&self.window, block_size)
    }

    /// The report, with `flow` telling the cause.
    pub fn report(&self, block_size: usize, flow: EventFlow) -> Report {
        let verdict = self.verdict(block_size);
        let cause = Cause::of(verdict, &flow);
        Report {
            verdict,
            cause,
            advice: cause.map(Cause::advice),
            requests: self.requests,
            predicted_cached_tokens: self.predicted_total,
            reported_cached_tokens: self.reported_total,
            window_requests: self.window.len(),
            window_predicted_tokens: self
                .window
                .iter()
                .fold(0, |a, s| a.saturating_add(s.predicted)),
            window_reported_tokens: self
                .window
                .iter()
                .fold(0, |a, s| a.saturating_add(s.reported)),
            events: flow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(pairs: &[(u64, u64)]) -> Vec<Sample> {
        pairs
            .iter()
            .map(|&(predicted, reported)| Sample {
                predicted,
                reported,
            })
            .collect()
    }

    #[test]
    fn verdicts_follow_the_documented_thresholds() {
        let bs = 64;
        // Too few comparisons, however bad.
        assert_eq!(judge(&window(&[(0, 1024); 7]), bs), Verdict::Unknown);
        assert_eq!(
            judge(&window(&[(0, 1024); 8]), bs),
            Verdict::UnderPredicting
        );
        // Cold prompts (nothing predicted, nothing hit) and exact hits agree.
        let mut w = window(&[(0, 0); 4]);
        w.extend(window(&[(960, 1000); 4]));
        assert_eq!(judge(&w, bs), Verdict::Ok);
        // Off by at most a block is agreement (a partial last block is never predicted).
        assert_eq!(judge(&window(&[(960, 1024); 8]), bs), Verdict::Ok);
        // Just over a block apart is a mismatch, but totals this close are no verdict.
        assert_eq!(Sample::new(959, 1024, 1024).mismatch(bs), Some("under"));
        assert_eq!(judge(&window(&[(959, 1024); 8]), bs), Verdict::Ok);
        assert_eq!(
            judge(&window(&[(400, 1024); 8]), bs),
            Verdict::UnderPredicting
        );
        // A minority of misses is no verdict.
        let mut w = window(&[(0, 1024); 3]);
        w.extend(window(&[(1024, 1024); 5]));
        assert_eq!(judge(&w, bs), Verdict::Ok);
        // Half the window off, but the totals close: not under-predicting.
        let mut w = window(&[(0, 128); 4]);
        w.extend(window(&[(1024, 1024); 4]));
        assert_eq!(judge(&w, bs), Verdict::Ok);
        assert_eq!(judge(&window(&[(1024, 0); 8]), bs), Verdict::OverPredicting);
        assert_eq!(judge(&window(&[(1024, 600); 8]), bs), Verdict::Ok);
        // A block size of 0 (unknown) does not divide by zero.
        assert_eq!(judge(&window(&[(0, 2); 8]), 0), Verdict::UnderPredicting);
    }

    #[test]
    fn the_cause_follows_the_event_flow() {
        let under = Verdict::UnderPredicting;
        let mut f = EventFlow::default();
        assert_eq!(Cause::of(under, &f), Some(Cause::NoSubscriber));
        f.subscribed = true;
        assert_eq!(Cause::of(under, &f), Some(Cause::NoEvents));
        f.received = 10;
        f.applied = 10;
        assert_eq!(Cause::of(under, &f), Some(Cause::HashMismatch));
        f.lost = 1;
        assert_eq!(Cause::of(under, &f), Some(Cause::MissedEvents));
        f.filtered = 5;
        assert_eq!(Cause::of(under, &f), Some(Cause::BlockSize));
        assert_eq!(
            Cause::of(Verdict::OverPredicting, &f),
            Some(Cause::StaleIndex)
        );
        assert_eq!(Cause::of(Verdict::Ok, &f), None);
        assert_eq!(Cause::of(Verdict::Unknown, &f), None);
    }

    #[test]
    fn one_warning_per_episode_and_bounded_memory() {
        let mut a = Accuracy::default();
        let mut warnings = Vec::new();
        for _ in 0..100 {
            warnings.extend(a.record(Sample::new(0, 1024, 1024), 64));
        }
        assert_eq!(warnings, [Verdict::UnderPredicting]);
        assert_eq!(a.window.len(), WINDOW);
        // Agreement for a window ends the episode; a new divergence warns again.
        for _ in 0..WINDOW {
            warnings.extend(a.record(Sample::new(1024, 1024, 1024), 64));
        }
        assert_eq!(a.verdict(64), Verdict::Ok);
        for _ in 0..WINDOW {
            warnings.extend(a.record(Sample::new(1024, 0, 1024), 64));
        }
        assert_eq!(
            warnings,
            [Verdict::UnderPredicting, Verdict::OverPredicting]
        );
        let r = a.report(64, EventFlow::default());
        assert_eq!(r.requests, 100 + 2 * WINDOW as u64);
        assert_eq!(r.window_requests, WINDOW);
        assert_eq!(r.cause, Some(Cause::StaleIndex));
    }

    #[test]
    fn hostile_reports_are_clamped_not_trusted() {
        let mut a = Accuracy::default();
        for _ in 0..WINDOW {
            a.record(Sample::new(u64::MAX, u64::MAX, 100), 16);
        }
        let r = a.report(16, EventFlow::default());
        assert_eq!(r.reported_cached_tokens, 100 * WINDOW as u64);
        assert_eq!(r.predicted_cached_tokens, 100 * WINDOW as u64);
        assert_eq!(r.verdict, Verdict::Ok);
        // Totals saturate instead of overflowing.
        let mut a = Accuracy::default();
        for _ in 0..3 {
            a.record(Sample::new(0, u64::MAX, u64::MAX), 16);
        }
        assert_eq!(
            a.report(16, EventFlow::default()).reported_cached_tokens,
            u64::MAX
        );
    }
}
