//! What the HTTP benchmark sends: a list of requests (prompt token ids, output length) and the
//! schedule that releases them.
//!
//! * [`from_trace`]: Mooncake requests, prompts synthesised from their hash ids
//!   ([`crate::trace::synthesize_prompt`]), `max_tokens = output_length`, arriving at the
//!   trace's timestamps divided by a time scale (open loop).
//! * [`prefix_workload`]: `P` shared system prompts plus unique user suffixes, at a fixed
//!   concurrency (closed loop) or at a Poisson rate (open loop), all drawn from one seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::trace::{splitmix64, synthesize_prompt, TraceRequest, VOCAB_SPAN, VOCAB_START};

/// One request of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchRequest {
    /// Prompt token ids (regular vocabulary ids, see [`crate::trace::VOCAB_SPAN`]).
    pub prompt: Vec<u32>,
    /// Tokens to generate (`max_tokens`, sent with `ignore_eos`).
    pub max_tokens: usize,
}

/// When requests are released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Closed loop: `concurrency` clients, each sending its next request when the previous one
    /// ends, in workload order.
    Closed {
        /// Requests in flight at once (≥ 1).
        concurrency: usize,
    },
    /// Open loop: request `i` is sent `offsets_ms[i]` ms after the start, whatever is in flight.
    /// Offsets are non-decreasing and as long as the request list.
    Open {
        /// Send times, ms from the start of the run.
        offsets_ms: Vec<f64>,
    },
}

impl Schedule {
    /// Short human description ("concurrency 16", "open loop, 3.9 req/s offered").
    pub fn describe(&self) -> String {
        match self {
            Schedule::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Schedule::Open { offsets_ms } => {
                let span = offsets_ms.last().copied().unwrap_or(0.0) / 1000.0;
                if span > 0.0 {
                    format!(
                        "open loop, {:.2} req/s offered over {:.1} s",
                        offsets_ms.len() as f64 / span,
                        span
                    )
                } else {
                    "open loop, all at once".into()
                }
            }
        }
    }
}

/// A Mooncake trace as a workload: prompts synthesised from hash ids (exactly `input_length`
/// tokens), `max_tokens = output_length` (at least 1), and send offsets `(timestamp − first
/// timestamp) / time_scale` ms. `time_scale` must be > 0 (2 = twice as fast).
pub fn from_trace(trace: &[TraceRequest], time_scale: f64) -> (Vec<BenchRequest>, Schedule) {
    assert!(time_scale > 0.0, "time scale must be > 0");
    let requests = trace
        .iter()
        .map(|r| BenchRequest {
            prompt: synthesize_prompt(r),
            max_tokens: r.output_length.max(1),
        })
        .collect();
    (requests, trace_schedule(trace, time_scale))
}

/// The open-loop schedule of a trace: send offsets `(timestamp − first timestamp) /
/// time_scale` ms, made non-decreasing. `time_scale` must be > 0.
pub fn trace_schedule(trace: &[TraceRequest], time_scale: f64) -> Schedule {
    assert!(time_scale > 0.0, "time scale must be > 0");
    let t0 = trace.iter().map(|r| r.timestamp).min().unwrap_or(0);
    let mut offsets_ms: Vec<f64> = trace
        .iter()
        .map(|r| (r.timestamp - t0) as f64 / time_scale)
        .collect();
    // Traces are sorted; keep the schedule monotone even if one is not.
    for i in 1..offsets_ms.len() {
        offsets_ms[i] = offsets_ms[i].max(offsets_ms[i - 1]);
    }
    Schedule::Open { offsets_ms }
}

/// Shape of the shared-prefix workload. Ranges are inclusive, in tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixSpec {
    /// Requests to generate.
    pub requests: usize,
    /// Distinct shared system prompts (≥ 1).
    pub prefixes: usize,
    /// System prompt length range.
    pub prefix_len: (usize, usize),
    /// Unique user suffix length range.
    pub suffix_len: (usize, usize),
    /// Output length range (`max_tokens`, at least 1).
    pub osl: (usize, usize),
    /// Seed of every random choice (prompt contents, which prefix, lengths, arrivals).
    pub seed: u64,
}

/// Generate the shared-prefix workload: system prompt `p` (length drawn once per prompt) is a
/// fixed run of random vocabulary ids; each request takes a uniformly random system prompt,
/// then a fresh random suffix and an output length, each uniform in its range. Deterministic
/// in `spec.seed`. Panics on an empty or inverted range.
pub fn prefix_workload(spec: &PrefixSpec) -> Vec<BenchRequest> {
    assert!(spec.prefixes >= 1, "at least one prefix");
    for (lo, hi) in [spec.prefix_len, spec.suffix_len, spec.osl] {
        assert!(lo <= hi, "range {lo}:{hi} is inverted");
    }
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let prefixes: Vec<Vec<u32>> = (0..spec.prefixes)
        .map(|_| {
            let len = rng.random_range(spec.prefix_len.0..=spec.prefix_len.1);
            random_tokens(&mut rng, len)
        })
        .collect();
    (0..spec.requests)
        .map(|_| {
            let p = rng.random_range(0..spec.prefixes);
            let suffix = rng.random_range(spec.suffix_len.0..=spec.suffix_len.1);
            let mut prompt = Vec::with_capacity(prefixes[p].len() + suffix);
            prompt.extend_from_slice(&prefixes[p]);
            prompt.extend(random_tokens(&mut rng, suffix));
            BenchRequest {
                prompt,
                max_tokens: rng.random_range(spec.osl.0..=spec.osl.1).max(1),
            }
        })
        .collect()
}

/// Poisson arrivals: `n` send offsets (ms) with exponential gaps of mean `1000 / rate` ms, the
/// first at 0. `rate` in requests/s, > 0. Deterministic in `seed`.
pub fn poisson_offsets(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    assert!(rate > 0.0, "rate must be > 0");
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ 0xa771_a15e));
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                let u: f64 = rng.random();
                t += -(1.0 - u).ln() / rate * 1000.0;
            }
            t
        })
        .collect()
}

fn random_tokens(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| VOCAB_START + rng.random_range(0..VOCAB_SPAN as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PrefixSpec {
        PrefixSpec {
            requests: 200,
            prefixes: 4,
            prefix_len: (100, 150),
            suffix_len: (5, 20),
            osl: (3, 9),
            seed: 7,
        }
    }

    #[test]
    fn prefix_workload_shares_exactly_the_system_prompts() {
        let reqs = prefix_workload(&spec());
        assert_eq!(reqs.len(), 200);
        assert_eq!(reqs, prefix_workload(&spec()), "deterministic");
        let mut groups: std::collections::HashMap<&[u32], Vec<&[u32]>> = Default::default();
        for r in &reqs {
            assert!((105..=170).contains(&r.prompt.len()));
            assert!((3..=9).contains(&r.max_tokens));
            assert!(r
                .prompt
                .iter()
                .all(|&t| (VOCAB_START..VOCAB_START + VOCAB_SPAN as u32).contains(&t)));
            groups.entry(&r.prompt[..100]).or_default().push(&r.prompt);
        }
        // Four system prompts; within a group every two prompts share exactly the system
        // prompt (one length per group, 100–150), suffixes are never shared.
        assert_eq!(groups.len(), 4, "four distinct system prompts");
        for members in groups.values() {
            assert!(members.len() > 10);
            let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
            let len = common(members[0], members[1]);
            assert!((100..=150).contains(&len), "{len}");
            for m in &members[1..] {
                assert_eq!(common(members[0], m), len);
            }
        }
        let other = prefix_workload(&PrefixSpec { seed: 8, ..spec() });
        assert_ne!(reqs[0].prompt, other[0].prompt);
    }

    #[test]
    fn traces_become_open_loop_schedules() {
        let t = |ts, len, ids: &[u64]| TraceRequest {
            timestamp: ts,
            input_length: len,
            output_length: 0,
            hash_ids: ids.to_vec(),
        };
        let trace = [t(1000, 600, &[0, 1]), t(3000, 512, &[0]), t(3000, 10, &[2])];
        let (reqs, sched) = from_trace(&trace, 4.0);
        assert_eq!(
            sched,
            Schedule::Open {
                offsets_ms: vec![0.0, 500.0, 500.0]
            }
        );
        assert_eq!(reqs[0].prompt.len(), 600);
        assert_eq!(reqs[0].prompt[..512], reqs[1].prompt[..]);
        assert_eq!(reqs[2].prompt.len(), 10);
        assert!(reqs.iter().all(|r| r.max_tokens == 1));
    }

    #[test]
    fn poisson_offsets_have_the_asked_rate() {
        let o = poisson_offsets(20_000, 50.0, 1);
        assert_eq!(o[0], 0.0);
        assert!(o.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = o.last().unwrap() / (o.len() - 1) as f64;
        assert!((mean_gap - 20.0).abs() < 0.5, "{mean_gap}");
        assert_eq!(o, poisson_offsets(20_000, 50.0, 1));
    }
}
