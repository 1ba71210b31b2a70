//! What a replay sends: the requests of a Mooncake trace (prompts synthesised one at a time,
//! when they arrive, so a 12,000-request trace never holds every prompt at once) or any list
//! of [`BenchRequest`]s (the prefix workload of `kvrouter bench`), with the schedule that
//! releases them.

use std::borrow::Cow;

use crate::trace::{synthesize_prompt, TraceRequest};
use crate::workload::{trace_schedule, BenchRequest, Schedule};

/// The requests themselves.
#[derive(Clone, Debug)]
enum Requests {
    Trace(Vec<TraceRequest>),
    Given(Vec<BenchRequest>),
}

/// Requests and when they are sent.
#[derive(Clone, Debug)]
pub struct ReplayWorkload {
    requests: Requests,
    /// When requests are released (open loop offsets, or closed loop).
    pub schedule: Schedule,
}

impl ReplayWorkload {
    /// A trace at its own timestamps divided by `time_scale` (> 0), `max_tokens =
    /// output_length` (at least 1) — what `kvrouter bench --workload mooncake` sends.
    pub fn from_trace(trace: Vec<TraceRequest>, time_scale: f64) -> Self {
        let schedule = trace_schedule(&trace, time_scale);
        Self {
            requests: Requests::Trace(trace),
            schedule,
        }
    }

    /// Given requests with a given schedule.
    pub fn from_requests(requests: Vec<BenchRequest>, schedule: Schedule) -> Self {
        Self {
            requests: Requests::Given(requests),
            schedule,
        }
    }

    /// The same requests released by `schedule` instead.
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        match &self.requests {
            Requests::Trace(t) => t.len(),
            Requests::Given(r) => r.len(),
        }
    }

    /// Whether there is no request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompt length of request `i`, tokens (without building the prompt).
    pub fn prompt_len(&self, i: usize) -> usize {
        match &self.requests {
            Requests::Trace(t) => t[i].input_length,
            Requests::Given(r) => r[i].prompt.len(),
        }
    }

    /// Output tokens asked by request `i` (at least 1).
    pub fn max_tokens(&self, i: usize) -> usize {
        match &self.requests {
            Requests::Trace(t) => t[i].output_length.max(1),
            Requests::Given(r) => r[i].max_tokens,
        }
    }

    /// Request `i`'s prompt token ids (synthesised for a trace).
    pub fn prompt(&self, i: usize) -> Cow<'_, [u32]> {
        match &self.requests {
            Requests::Trace(t) => Cow::Owned(synthesize_prompt(&t[i])),
            Requests::Given(r) => Cow::Borrowed(&r[i].prompt),
        }
    }

    /// Every prompt in order, built one at a time, skipping those `keep` refuses (by index).
    pub fn prompts<'a>(
        &'a self,
        keep: impl Fn(usize) -> bool + 'a,
    ) -> impl Iterator<Item = Cow<'a, [u32]>> + 'a {
        (0..self.len())
            .filter(move |&i| keep(i))
            .map(|i| self.prompt(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_prompts_are_what_bench_sends() {
        let t = |ts, len, out, ids: &[u64]| TraceRequest {
            timestamp: ts,
            input_length: len,
            output_length: out,
            hash_ids: ids.to_vec(),
        };
        let trace = vec![t(1000, 600, 3, &[0, 1]), t(3000, 512, 0, &[0])];
        let (reqs, sched) = crate::workload::from_trace(&trace, 2.0);
        let w = ReplayWorkload::from_trace(trace, 2.0);
        assert_eq!(w.schedule, sched);
        assert_eq!(w.len(), 2);
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(w.prompt(i).as_ref(), r.prompt.as_slice());
            assert_eq!(w.prompt_len(i), r.prompt.len());
            assert_eq!(w.max_tokens(i), r.max_tokens);
        }
        assert_eq!(w.prompts(|i| i == 1).count(), 1);
        let g = ReplayWorkload::from_requests(reqs.clone(), Schedule::Closed { concurrency: 2 });
        assert_eq!(g.prompt(0).as_ref(), reqs[0].prompt.as_slice());
    }
}
