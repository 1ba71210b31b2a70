//! Prometheus metrics under vLLM's names (`vllm:` prefix), rendered as exposition text by hand
//! (the `:` in vLLM's names is legal Prometheus but not every client library accepts it).
//!
//! Updated once per engine step under one lock; read by `GET /metrics`.
//!
//! Beside vLLM's names, a few `kvrouter_mocker_*` series describe what vLLM has no standard
//! metric for: the worker's role (`kvrouter_mocker_info{role="both|prefill|decode"}`), KV
//! transfers of disaggregated serving, and the prefill tokens actually computed.
use std::fmt::Write;

use crate::engine::StepOutput;

/// vLLM's TTFT buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token-latency buckets (seconds).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Empty, with `bounds` as bucket upper limits (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if i < self.counts.len() {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Its samples (`_bucket`, `_sum`, `_count`) under `labels`, without HELP and TYPE.
    fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Everything `/metrics` reports for one engine.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `vllm:num_requests_running`.
    pub num_running: usize,
    /// `vllm:num_requests_waiting`.
    pub num_waiting: usize,
    /// `vllm:kv_cache_usage_perc`, a fraction in [0, 1] as vLLM reports it.
    pub kv_usage: f64,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_queries: u64,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_hits: u64,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:request_success_total{finished_reason="length"}`.
    pub requests_finished: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub itl: Histogram,
    /// `kvrouter_mocker_computed_prefill_tokens_total`: prompt tokens computed (not found in
    /// the prefix cache, not received from a prefill worker).
    pub computed_prefill_tokens: u64,
    /// `kvrouter_mocker_info{role=…}`: `both` (aggregated), `prefill` or `decode`.
    pub role: &'static str,
    /// `kvrouter_mocker_kv_transfer_held_requests`: transfers a prefill worker holds.
    pub kv_transfer_held: usize,
    /// `kvrouter_mocker_kv_transfer_held_blocks`: blocks those transfers hold, summed.
    pub kv_transfer_held_blocks: usize,
    /// `kvrouter_mocker_kv_transfers_total{side="prefill",outcome="pulled"}`.
    pub kv_transfers_pulled: u64,
    /// `kvrouter_mocker_kv_transfers_total{side="prefill",outcome="expired"}`: released
    /// unpulled (timeout, or over the cap).
    pub kv_transfers_expired: u64,
    /// `kvrouter_mocker_kv_transfers_total{side="decode",outcome="received"}`.
    pub kv_transfers_received: u64,
    /// `kvrouter_mocker_kv_transfers_total{side="decode",outcome="failed"}`.
    pub kv_transfers_failed: u64,
    /// `kvrouter_mocker_kv_transfer_blocks_total`: blocks a decode worker pulled (beyond its
    /// own prefix hit).
    pub kv_transfer_blocks_received: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            num_running: 0,
            num_waiting: 0,
            kv_usage: 0.0,
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            requests_finished: 0,
            preemptions: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            computed_prefill_tokens: 0,
            role: "both",
            kv_transfer_held: 0,
            kv_transfer_held_blocks: 0,
            kv_transfers_pulled: 0,
            kv_transfers_expired: 0,
            kv_transfers_received: 0,
            kv_transfers_failed: 0,
            kv_transfer_blocks_received: 0,
        }
    }
}

impl Metrics {
    /// Folds one step in; `running`, `waiting`, `usage` are the engine's state after it.
    pub fn record_step(&mut self, out: &StepOutput, running: usize, waiting: usize, usage: f64) {
        self.num_running = running;
        self.num_waiting = waiting;
        self.kv_usage = usage;
        self.prefix_queries += out.prefix_queries as u64;
        self.prefix_hits += out.prefix_hits as u64;
        self.preemptions += out.num_preempted as u64;
        self.generation_tokens += out.tokens.len() as u64;
        self.computed_prefill_tokens += out.prefill_tokens as u64;
        for t in &out.tokens {
            if t.index == 0 {
                self.prompt_tokens += t.prompt_tokens as u64;
            }
        }
        self.requests_finished += out.finished.len() as u64;
        for v in &out.ttft {
            self.ttft.observe(*v);
        }
        for v in &out.itl {
            self.itl.observe(*v);
        }
    }

    /// Prometheus text exposition (format 0.0.4) of one engine (`engine="0"`).
    pub fn render(&self, model: &str, info: &[(&str, String)]) -> String {
        Self::render_ranks(std::slice::from_ref(self), model, info)
    }

    /// Prometheus text exposition (format 0.0.4) of a worker's data-parallel ranks:
    /// `ranks[r]`'s samples carry `engine="r"`, as vLLM labels the engines of a
    /// data-parallel server. `model` goes in the `model_name` label; `info` are the
    /// `vllm:cache_config_info` labels.
    pub fn render_ranks(ranks: &[Metrics], model: &str, info: &[(&str, String)]) -> String {
        let model = model.replace('\\', "\\\\").replace('"', "\\\"");
        let labels: Vec<String> = (0..ranks.len())
            .map(|r| format!("engine=\"{r}\",model_name=\"{model}\""))
            .collect();
        let mut o = String::with_capacity(4096 * ranks.len().max(1));
        let family =
            |o: &mut String, kind: &str, name: &str, help: &str, v: &dyn Fn(&Metrics) -> String| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (m, l) in ranks.iter().zip(&labels) {
                    let _ = writeln!(o, "{name}{{{l}}} {}", v(m));
                }
            };
        let gauge = |o: &mut String, name: &str, help: &str, v: &dyn Fn(&Metrics) -> f64| {
            family(o, "gauge", name, help, &|m| format!("{:?}", v(m)))
        };
        let counter = |o: &mut String, name: &str, help: &str, v: &dyn Fn(&Metrics) -> u64| {
            family(o, "counter", name, help, &|m| v(m).to_string())
        };
        gauge(
            &mut o,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            &|m| m.num_running as f64,
        );
        gauge(
            &mut o,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            &|m| m.num_waiting as f64,
        );
        gauge(
            &mut o,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            &|m| m.kv_usage,
        );
        counter(
            &mut o,
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            &|m| m.prefix_queries,
        );
        counter(
            &mut o,
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            &|m| m.prefix_hits,
        );
        counter(
            &mut o,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            &|m| m.prompt_tokens,
        );
        counter(
            &mut o,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            &|m| m.generation_tokens,
        );
        counter(
            &mut o,
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
            &|m| m.preemptions,
        );
        let _ = writeln!(
            o,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter"
        );
        for (m, l) in ranks.iter().zip(&labels) {
            let _ = writeln!(
                o,
                "vllm:request_success_total{{{l},finished_reason=\"length\"}} {}",
                m.requests_finished
            );
        }
        for (name, help, h) in [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                (|m: &Metrics| &m.ttft) as fn(&Metrics) -> &Histogram,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                |m: &Metrics| &m.itl,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (m, l) in ranks.iter().zip(&labels) {
                h(m).render_samples(&mut o, name, l);
            }
        }
        counter(
            &mut o,
            "kvrouter_mocker_computed_prefill_tokens_total",
            "Prompt tokens computed: neither prefix-cache hits nor received by KV transfer.",
            &|m| m.computed_prefill_tokens,
        );
        let _ = writeln!(
            o,
            "# HELP kvrouter_mocker_info The worker's role in disaggregated serving.\n\
             # TYPE kvrouter_mocker_info gauge"
        );
        for (m, l) in ranks.iter().zip(&labels) {
            let _ = writeln!(o, "kvrouter_mocker_info{{{l},role=\"{}\"}} 1.0", m.role);
        }
        gauge(
            &mut o,
            "kvrouter_mocker_kv_transfer_held_requests",
            "KV transfers a prefill worker holds for decode workers.",
            &|m| m.kv_transfer_held as f64,
        );
        gauge(
            &mut o,
            "kvrouter_mocker_kv_transfer_held_blocks",
            "KV blocks held for decode workers, summed over transfers.",
            &|m| m.kv_transfer_held_blocks as f64,
        );
        let _ = writeln!(
            o,
            "# HELP kvrouter_mocker_kv_transfers_total KV transfers by side and outcome.\n\
             # TYPE kvrouter_mocker_kv_transfers_total counter"
        );
        for (m, l) in ranks.iter().zip(&labels) {
            for (side, outcome, v) in [
                ("prefill", "pulled", m.kv_transfers_pulled),
                ("prefill", "expired", m.kv_transfers_expired),
                ("decode", "received", m.kv_transfers_received),
                ("decode", "failed", m.kv_transfers_failed),
            ] {
                let _ = writeln!(
                    o,
                    "kvrouter_mocker_kv_transfers_total{{{l},side=\"{side}\",outcome=\"{outcome}\"}} {v}"
                );
            }
        }
        counter(
            &mut o,
            "kvrouter_mocker_kv_transfer_blocks_total",
            "KV blocks a decode worker pulled from prefill workers.",
            &|m| m.kv_transfer_blocks_received,
        );
        let info: Vec<String> = info.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let _ = writeln!(
            o,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{{}}} 1.0",
            info.join(",")
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_is_an_engine_label_under_one_family_header() {
        let a = Metrics {
            num_running: 2,
            prefix_hits: 64,
            ..Default::default()
        };
        let b = Metrics::default();
        let text = Metrics::render_ranks(&[a, b], "m", &[("block_size", "64".into())]);
        assert_eq!(
            text.matches("# TYPE vllm:num_requests_running gauge")
                .count(),
            1
        );
        assert!(text.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0\n"));
        assert!(text.contains("vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 0.0\n"));
        assert!(text.contains("vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 64\n"));
        assert!(text
            .contains("vllm:time_to_first_token_seconds_count{engine=\"1\",model_name=\"m\"} 0\n"));
        assert_eq!(text.matches("vllm:cache_config_info{").count(), 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(7.0);
        let mut s = String::new();
        h.render_samples(&mut s, "x", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"1.0\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count{a=\"b\"} 4\n"), "{s}");
    }
}
