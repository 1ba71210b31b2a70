//! Prometheus metrics of the frontend and its router (`GET /metrics`, text format), named
//! after Dynamo's (`dynamo-router-spec.md` §14) under the `kvrouter_` prefix.
//!
//! Request-path metrics are updated as requests flow; per-worker state (active load, health,
//! KV event counters of each rank's subscriber) is read at scrape time by a collector, so no
//! request pays for it.

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `model`, `endpoint` (`chat_completions` | `completions`), `status` (`success` | `error` |
/// `cancelled`) and `error_type` (empty on success).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub status: &'static str,
    pub error_type: &'static str,
}

/// Router overhead stage: `hashing`, `find_matches`, `selection`, `total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

/// A worker rank.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabels {
    pub worker_id: String,
    pub dp_rank: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    worker_id: String,
    dp_rank: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKindLabels {
    worker_id: String,
    dp_rank: String,
    kind: &'static str,
}

fn seconds_buckets() -> Histogram {
    // 100 µs … ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

fn overhead_buckets() -> Histogram {
    // 1 µs … ~65 ms.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 17))
}

/// Per-rank state read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct RankSnapshot {
    pub worker_id: u64,
    pub dp_rank: u32,
    /// `healthy` | `suspect` | `removed`.
    pub health: &'static str,
    pub active_decode_blocks: u64,
    pub active_prefill_tokens: u64,
    pub active_requests: u64,
    /// `(outcome, count)` from the rank's event subscriber.
    pub events: Vec<(&'static str, u64)>,
    /// The subscriber's state (`joining` | `live` | `replaying` | `stopped`), if it has one.
    pub subscriber_state: Option<&'static str>,
}

const HEALTH_STATES: [&str; 3] = ["healthy", "suspect", "removed"];
const SUBSCRIBER_STATES: [&str; 4] = ["joining", "live", "replaying", "stopped"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    worker_id: String,
    dp_rank: String,
    state: &'static str,
}

/// Which listener a connection metric is about: `api` or `admin`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// Everything the scrape-time collector encodes.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub ranks: Vec<RankSnapshot>,
    /// `(block, rank)` entries in the exact index.
    pub index_entries: u64,
    /// The prompt-prefix cache's counters, when it is on.
    pub prompt_cache: Option<kvrouter_preprocess::PromptCacheStats>,
}

/// `(worker_id, dp_rank, kind)` of rejected KV events.
type ErrorKey = (u64, u32, &'static str);

#[derive(Debug, Default)]
struct ScrapeCollector {
    snap: Mutex<Snapshot>,
    index_errors: Mutex<Vec<(ErrorKey, u64)>>,
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.snap.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rank = |r: &RankSnapshot| RankLabels {
            worker_id: r.worker_id.to_string(),
            dp_rank: r.dp_rank.to_string(),
        };
        type Get = fn(&RankSnapshot) -> i64;
        let gauges: [(&str, &str, Get); 4] = [
            (
                "worker_active_decode_blocks",
                "KV blocks booked by active requests on the rank",
                |r| r.active_decode_blocks as i64,
            ),
            (
                "worker_active_prefill_tokens",
                "Uncached prompt tokens of requests still in prefill on the rank",
                |r| r.active_prefill_tokens as i64,
            ),
            (
                "worker_active_requests",
                "Requests booked on the rank",
                |r| r.active_requests as i64,
            ),
            (
                "worker_healthy",
                "1 while the rank is in the routing set",
                |r| (r.health == "healthy") as i64,
            ),
        ];
        for (name, help, get) in gauges {
            let mut f = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &snap.ranks {
                ConstGauge::new(get(r)).encode(f.encode_family(&rank(r))?)?;
            }
        }
        let mut f = enc.encode_descriptor(
            "worker_state",
            "1 for the rank's health state: healthy (routed), suspect (not routed, index and bookings kept), removed (index cleared)",
            None,
            MetricType::Gauge,
        )?;
        for r in &snap.ranks {
            for state in HEALTH_STATES {
                let l = StateLabels {
                    worker_id: r.worker_id.to_string(),
                    dp_rank: r.dp_rank.to_string(),
                    state,
                };
                ConstGauge::new((r.health == state) as i64).encode(f.encode_family(&l)?)?;
            }
        }
        let mut f = enc.encode_descriptor(
            "kv_subscriber_state",
            "1 for the state of the rank's KV event subscriber: joining (nothing applied yet), live, replaying, stopped",
            None,
            MetricType::Gauge,
        )?;
        for r in &snap.ranks {
            let Some(current) = r.subscriber_state else {
                continue;
            };
            for state in SUBSCRIBER_STATES {
                let l = StateLabels {
                    worker_id: r.worker_id.to_string(),
                    dp_rank: r.dp_rank.to_string(),
                    state,
                };
                ConstGauge::new((current == state) as i64).encode(f.encode_family(&l)?)?;
            }
        }
        let mut f = enc.encode_descriptor(
            "kv_events",
            "KV event subscriber counters per rank: received (live messages), applied (router events to the index), batches, dropped (queue full), filtered, gaps, recovered, replayed, replay_failures, duplicates, cleared, restarts, bad_frames, oversize, decode_errors, skipped_events, unknown_fields, backpressure (waits on a full index queue), events_out",
            None,
            MetricType::Counter,
        )?;
        for r in &snap.ranks {
            for (outcome, v) in &r.events {
                let l = EventLabels {
                    worker_id: r.worker_id.to_string(),
                    dp_rank: r.dp_rank.to_string(),
                    outcome,
                };
                ConstCounter::new(*v).encode(f.encode_family(&l)?)?;
            }
        }
        let errs = self
            .index_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut f = enc.encode_descriptor(
            "kv_index_errors",
            "KV events the index rejected (parent_not_found, block_not_found, invalid_sequence)",
            None,
            MetricType::Counter,
        )?;
        for ((w, d, kind), v) in errs {
            let l = ErrorKindLabels {
                worker_id: w.to_string(),
                dp_rank: d.to_string(),
                kind,
            };
            ConstCounter::new(v).encode(f.encode_family(&l)?)?;
        }
        let f = enc.encode_descriptor(
            "kv_index_entries",
            "(block, rank) entries in the exact KV index",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snap.index_entries as i64).encode(f)?;
        if let Some(pc) = snap.prompt_cache {
            for (name, help, v) in [
                (
                    "frontend_prompt_cache_hits",
                    "Prompts whose tokenized prefix came from the prompt cache",
                    pc.hits,
                ),
                (
                    "frontend_prompt_cache_misses",
                    "Prompts with added tokens and no cached prefix",
                    pc.misses,
                ),
            ] {
                let f = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(v).encode(f)?;
            }
            let f = enc.encode_descriptor(
                "frontend_prompt_cache_tokens",
                "Token ids held by the prompt cache",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(pc.tokens as i64).encode(f)?;
        }
        Ok(())
    }
}

/// The frontend's metrics. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub duration: Histogram,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
    pub cached_tokens: Counter,
    pub inflight: Gauge,
    pub disconnected: Counter,
    pub tokenize: Histogram,
    pub overhead: Family<StageLabels, Histogram, fn() -> Histogram>,
    pub predicted_cached_tokens: Counter,
    pub routed_input_tokens: Counter,
    pub decisions: Family<RankLabels, Counter>,
    pub body_errors: Counter,
    pub open_connections: Family<ListenerLabels, Gauge>,
    pub refused_connections: Family<ListenerLabels, Counter>,
    pub accept_errors: Family<ListenerLabels, Counter>,
    scrape: std::sync::Arc<ScrapeCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kvrouter");
        let m = Self {
            requests: Family::default(),
            ttft: seconds_buckets(),
            itl: seconds_buckets(),
            duration: seconds_buckets(),
            input_tokens: Counter::default(),
            output_tokens: Counter::default(),
            cached_tokens: Counter::default(),
            inflight: Gauge::default(),
            disconnected: Counter::default(),
            tokenize: overhead_buckets(),
            overhead: Family::new_with_constructor(overhead_buckets as fn() -> Histogram),
            predicted_cached_tokens: Counter::default(),
            routed_input_tokens: Counter::default(),
            decisions: Family::default(),
            body_errors: Counter::default(),
            open_connections: Family::default(),
            refused_connections: Family::default(),
            accept_errors: Family::default(),
            scrape: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "frontend_requests",
            "Requests by model, endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "frontend_time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        registry.register(
            "frontend_inter_token_latency_seconds",
            "Time between streamed token chunks",
            m.itl.clone(),
        );
        registry.register(
            "frontend_request_duration_seconds",
            "Request duration, arrival to last byte",
            m.duration.clone(),
        );
        registry.register(
            "frontend_input_tokens",
            "Prompt tokens of served requests",
            m.input_tokens.clone(),
        );
        registry.register(
            "frontend_output_tokens",
            "Generated tokens",
            m.output_tokens.clone(),
        );
        registry.register(
            "frontend_cached_tokens",
            "Prompt tokens the workers reported as prefix-cache hits",
            m.cached_tokens.clone(),
        );
        registry.register(
            "frontend_inflight_requests",
            "Requests being served",
            m.inflight.clone(),
        );
        registry.register(
            "frontend_disconnected_clients",
            "Requests whose client went away before the end",
            m.disconnected.clone(),
        );
        registry.register(
            "frontend_tokenize_seconds",
            "Chat template and tokenization time per request",
            m.tokenize.clone(),
        );
        registry.register(
            "router_overhead_seconds",
            "Routing time by stage: hashing, find_matches, selection, total",
            m.overhead.clone(),
        );
        registry.register(
            "router_predicted_cached_tokens",
            "Prompt tokens the router expected the chosen worker to hold",
            m.predicted_cached_tokens.clone(),
        );
        registry.register(
            "router_routed_input_tokens",
            "Prompt tokens of routed requests",
            m.routed_input_tokens.clone(),
        );
        registry.register(
            "router_decisions",
            "Requests routed to each rank",
            m.decisions.clone(),
        );
        registry.register(
            "frontend_request_body_errors",
            "Requests refused before parsing: body too large, broken, or not received within the body timeout",
            m.body_errors.clone(),
        );
        registry.register(
            "frontend_open_connections",
            "Open client connections per listener (api, admin)",
            m.open_connections.clone(),
        );
        registry.register(
            "frontend_refused_connections",
            "Connections refused with 503 because the listener's connection cap was reached",
            m.refused_connections.clone(),
        );
        registry.register(
            "frontend_accept_errors",
            "Failed accepts (e.g. out of file descriptors) per listener",
            m.accept_errors.clone(),
        );
        registry.register_collector(Box::new(m.scrape.clone()));
        Self { registry, ..m }
    }

    /// Count a rejected KV event for a rank.
    pub fn index_error(&self, worker_id: u64, dp_rank: u32, kind: &'static str) {
        let mut v = self
            .scrape
            .index_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(k, _)| *k == (worker_id, dp_rank, kind)) {
            Some((_, n)) => *n += 1,
            None => v.push(((worker_id, dp_rank, kind), 1)),
        }
    }

    /// Prometheus text of every metric, with `snap` as the scrape-time state.
    pub fn render(&self, snap: Snapshot) -> String {
        *self.scrape.snap.lock().unwrap_or_else(|e| e.into_inner()) = snap;
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}
