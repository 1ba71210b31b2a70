//! Prometheus metrics of the frontend, the standalone router and the router inside both
//! (`GET /metrics`), named after Dynamo's (`dynamo-router-spec.md` §14) under the `kvrouter_`
//! prefix.
//!
//! Two text formats, chosen by the scraper's `Accept` header ([`Format::negotiate`]): the
//! classic Prometheus text format 0.0.4 by default, and OpenMetrics 1.0.0 for scrapers that ask
//! for `application/openmetrics-text`. The registry encodes OpenMetrics; [`to_classic`] turns
//! that into the classic format in one place.
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

/// A standalone router call: `endpoint` (`generate`, `best_worker_id`, …) and `status`
/// (`success`, `client_error`, `unavailable`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub endpoint: &'static str,
    pub status: &'static str,
}

/// A discovery change: `added` or `removed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
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
struct FormatLabels {
    worker_id: String,
    dp_rank: String,
    format: &'static str,
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

/// Routing overhead: 1 µs … 100 ms at 1, 1.5, 2, 3, 5 and 7 per decade, fine enough to read a
/// p50 against a 50 µs target (powers of two put the bounds at 32 and 64 µs).
fn overhead_buckets() -> Histogram {
    let decades = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2];
    let bounds = decades
        .iter()
        .flat_map(|d| [1.0, 1.5, 2.0, 3.0, 5.0, 7.0].map(|m| m * d))
        .chain([0.1]);
    Histogram::new(bounds)
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
    /// `(wire format, batches)` from the rank's event subscriber: whose encoding its events
    /// came in (`vllm_array`, `vllm_map`, `sglang`, `trtllm`, `unknown`).
    pub formats: Vec<(&'static str, u64)>,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TermLabels {
    term: &'static str,
}

/// Which listener a connection metric is about: `api` or `admin`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// Why a replica sync operation (or message) was dropped or ignored.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Replica sync (`--router-replica-sync`): this router's bookings shared with the other
/// replicas of its endpoint over NATS, and theirs mirrored here.
#[derive(Debug, Default)]
pub struct ReplicaSyncMetrics {
    /// Operations (add, prefill complete, free) published.
    pub ops_sent: Counter,
    /// Operations received from other replicas (own echoes not counted).
    pub ops_received: Counter,
    /// Own operations not published, by reason: `queue_full` (outbound queue full: dropped
    /// newest), `too_large` (one operation larger than a NATS message), `publish_error`.
    pub ops_dropped: Family<ReasonLabels, Counter>,
    /// Received operations or messages not applied, by reason: `malformed` (a message that is
    /// not a valid batch, counted once), `too_large` (message over the size limit),
    /// `invalid` (a field out of bounds), `unknown_worker`, `block_size`, `duplicate`,
    /// `unknown_request`, `peer_limit` (the peer's booking bound), `too_many_peers`.
    pub ops_ignored: Family<ReasonLabels, Counter>,
    /// Other replicas' bookings mirrored here now.
    pub remote_bookings: Gauge,
    /// Other replicas heard from within the peer timeout.
    pub peers: Gauge,
    /// Other replicas' bookings freed here because the peer went silent past the timeout,
    /// restarted, or lost messages.
    pub peer_bookings_expired: Counter,
}

impl ReplicaSyncMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "replica_sync_ops_sent",
            "Replica sync operations (add, prefill complete, free) published to the other replicas",
            self.ops_sent.clone(),
        );
        r.register(
            "replica_sync_ops_received",
            "Replica sync operations received from other replicas",
            self.ops_received.clone(),
        );
        r.register(
            "replica_sync_ops_dropped",
            "Own replica sync operations not published, by reason (queue_full, too_large, publish_error)",
            self.ops_dropped.clone(),
        );
        r.register(
            "replica_sync_ops_ignored",
            "Received replica sync operations or messages not applied, by reason",
            self.ops_ignored.clone(),
        );
        r.register(
            "replica_sync_remote_bookings",
            "Other replicas' bookings mirrored in this router's load view",
            self.remote_bookings.clone(),
        );
        r.register(
            "replica_sync_peers",
            "Other router replicas heard from within the peer timeout",
            self.peers.clone(),
        );
        r.register(
            "replica_sync_peer_bookings_expired",
            "Other replicas' bookings freed because the replica went silent, restarted or lost messages",
            self.peer_bookings_expired.clone(),
        );
    }
}

/// A worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MismatchLabels {
    worker_id: String,
    /// `under` (reported more than a block above predicted) or `over`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    worker_id: String,
    verdict: &'static str,
}

fn error_block_buckets() -> Histogram {
    // 0 (agreement), then 1 … 1,024 blocks.
    Histogram::new([0.0].into_iter().chain(exponential_buckets(1.0, 2.0, 11)))
}

/// Closed-loop accuracy per worker ([`crate::workers::accuracy`]): the cached tokens the
/// router predicted against those the engine reported, per request compared.
#[derive(Debug)]
pub struct AccuracyMetrics {
    predicted: Family<WorkerLabels, Counter>,
    reported: Family<WorkerLabels, Counter>,
    requests: Family<WorkerLabels, Counter>,
    mismatches: Family<MismatchLabels, Counter>,
    error_blocks: Family<WorkerLabels, Histogram, fn() -> Histogram>,
}

impl Default for AccuracyMetrics {
    fn default() -> Self {
        Self {
            predicted: Family::default(),
            reported: Family::default(),
            requests: Family::default(),
            mismatches: Family::default(),
            error_blocks: Family::new_with_constructor(error_block_buckets as fn() -> Histogram),
        }
    }
}

impl AccuracyMetrics {
    /// Count one comparison on `worker_id` with blocks of `block_size` tokens.
    pub fn record(&self, worker_id: u64, s: &crate::workers::accuracy::Sample, block_size: usize) {
        let w = WorkerLabels {
            worker_id: worker_id.to_string(),
        };
        self.predicted.get_or_create(&w).inc_by(s.predicted);
        self.reported.get_or_create(&w).inc_by(s.reported);
        self.requests.get_or_create(&w).inc();
        self.error_blocks
            .get_or_create(&w)
            .observe(s.error_blocks(block_size) as f64);
        if let Some(direction) = s.mismatch(block_size) {
            self.mismatches
                .get_or_create(&MismatchLabels {
                    worker_id: w.worker_id,
                    direction,
                })
                .inc();
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "worker_predicted_cached_tokens",
            "Prompt tokens the router predicted the worker held, over the requests compared with the engine's report",
            self.predicted.clone(),
        );
        r.register(
            "worker_reported_cached_tokens",
            "Prompt tokens the worker's engine reported as prefix-cache hits (usage.prompt_tokens_details.cached_tokens), over the requests compared",
            self.reported.clone(),
        );
        r.register(
            "worker_accuracy_requests",
            "Requests whose predicted cached tokens were compared with the engine's report",
            self.requests.clone(),
        );
        r.register(
            "worker_accuracy_mismatches",
            "Requests whose prediction and report disagree by more than a block: direction under (engine hit more than predicted) or over",
            self.mismatches.clone(),
        );
        r.register(
            "worker_cached_tokens_error_blocks",
            "Per request, |predicted - reported| cached tokens in KV blocks",
            self.error_blocks.clone(),
        );
    }
}

/// Everything the scrape-time collector encodes.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub ranks: Vec<RankSnapshot>,
    /// `(block, rank)` entries in the exact index.
    pub index_entries: u64,
    /// The prompt-prefix cache's counters, when it is on.
    pub prompt_cache: Option<kvrouter_preprocess::PromptCacheStats>,
    /// The `aic` prefill load model's coefficients in use (given or fitted), when known.
    pub prefill_coefficients: Option<kvrouter_core::prefill_time::PrefillCoefficients>,
    /// Each worker's accuracy verdict (`unknown` | `ok` | `under_predicting` |
    /// `over_predicting`).
    pub accuracy: Vec<(u64, crate::workers::accuracy::Verdict)>,
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
            "KV event subscriber counters per rank: received (live messages), applied (router events to the index), batches, dropped (queue full), filtered, gaps, recovered, replayed, replay_failures, duplicates, cleared, restarts, bad_frames, oversize, decode_errors, skipped_events, unknown_fields, backpressure (waits on a full index queue), events_out, lora_unmapped (LoRA stores with a lora_id the worker's lora_adapters do not name: indexed without the adapter), polls and poll_errors (TensorRT-LLM's POST /kv_cache_events, per worker), window_ignored (sliding-window pool events)",
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
        let mut f = enc.encode_descriptor(
            "kv_event_batches_by_format",
            "KV event batches per rank by the wire format their events showed: vllm_array (vLLM <= 0.23), vllm_map (vLLM >= 0.24), sglang, trtllm (polled TensorRT-LLM answers with events), unknown (no BlockStored to tell)",
            None,
            MetricType::Counter,
        )?;
        for r in &snap.ranks {
            for (format, v) in &r.formats {
                let l = FormatLabels {
                    worker_id: r.worker_id.to_string(),
                    dp_rank: r.dp_rank.to_string(),
                    format,
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
        let mut f = enc.encode_descriptor(
            "worker_accuracy_verdict",
            "1 for the worker's closed-loop accuracy verdict over its last requests: unknown (too few compared), ok, under_predicting (engine hits the router did not predict), over_predicting",
            None,
            MetricType::Gauge,
        )?;
        for (w, current) in &snap.accuracy {
            for v in crate::workers::accuracy::Verdict::ALL {
                let l = VerdictLabels {
                    worker_id: w.to_string(),
                    verdict: v.as_str(),
                };
                ConstGauge::new((*current == v) as i64).encode(f.encode_family(&l)?)?;
            }
        }
        let f = enc.encode_descriptor(
            "kv_index_entries",
            "(block, rank) entries in the exact KV index",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snap.index_entries as i64).encode(f)?;
        if let Some(c) = snap.prefill_coefficients {
            let mut f = enc.encode_descriptor(
                "router_prefill_time_coefficient",
                "The aic prefill load model's per-step time A + B*T + C*T^2 ms (term: base_ms, per_token_ms, per_token2_ms), given or fitted from observed TTFTs",
                None,
                MetricType::Gauge,
            )?;
            for (term, v) in [
                ("base_ms", c.base_ms),
                ("per_token_ms", c.per_token_ms),
                ("per_token2_ms", c.per_token2_ms),
            ] {
                ConstGauge::new(v).encode(f.encode_family(&TermLabels { term })?)?;
            }
        }
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
    /// Requests waiting in the router queue (`--router-queue-threshold`).
    pub queue_pending: Gauge,
    /// Time requests spent in the router queue before dispatch.
    pub queue_wait: Histogram,
    /// Requests refused because the router queue was full.
    pub queue_rejected: Counter,
    /// Bookings force-freed after `--router-active-request-expiry-secs` without a free.
    pub expired_requests: Counter,
    /// Standalone router calls by endpoint and outcome.
    pub service_calls: Family<ServiceLabels, Counter>,
    /// Workers added and removed by dynamic discovery.
    pub discovery_changes: Family<ChangeLabels, Counter>,
    /// Discovery watches restarted (after an error or a compacted history).
    pub discovery_watch_restarts: Counter,
    /// Registrations and worker pods skipped: unreadable (malformed JSON or annotations) or
    /// refused; each counted once per content.
    pub discovery_rejected: Counter,
    /// The NATS event plane and snapshots (`--event-plane nats`).
    pub event_plane: EventPlaneMetrics,
    /// Replica sync (zero unless `--router-replica-sync`).
    pub replica_sync: ReplicaSyncMetrics,
    /// Predicted against engine-reported cached tokens, per worker.
    pub accuracy: AccuracyMetrics,
    scrape: std::sync::Arc<ScrapeCollector>,
}

/// The NATS event plane's consumer and snapshots of one router replica.
#[derive(Debug, Default)]
pub struct EventPlaneMetrics {
    /// Stream messages not applied yet: the stream's last sequence − the last one applied.
    pub lag: Gauge,
    /// Stream messages consumed (applied or skipped).
    pub messages: Counter,
    /// Events handed to the index.
    pub events: Counter,
    /// Messages delivered again (sequence already applied), skipped.
    pub redeliveries: Counter,
    /// Events whose id was not above the rank's last, skipped.
    pub duplicates: Counter,
    /// Forward event-id gaps (the rank cleared, a re-dump asked for).
    pub gaps: Counter,
    /// Gaps closed by a relay's clear and re-dump.
    pub gaps_recovered: Counter,
    /// Relay restarts seen (a rank's ids starting again from 0): the rank cleared first.
    pub relay_restarts: Counter,
    /// Events of workers not in the routing set, ignored.
    pub unknown_workers: Counter,
    /// Messages that are not a JSON array of events of their subject's worker, or too large.
    pub bad_messages: Counter,
    /// Snapshots this replica took and uploaded.
    pub snapshots_taken: Counter,
    /// Snapshots this replica loaded at start.
    pub snapshots_loaded: Counter,
    /// Seconds since the newest snapshot this replica took or loaded was taken.
    pub snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Size of that snapshot in bytes.
    pub snapshot_size: Gauge,
    /// Seconds the last snapshot took (flush, dump, upload, purge).
    pub snapshot_duration: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl EventPlaneMetrics {
    fn register(&self, r: &mut Registry) {
        let counters: [(&str, &str, &Counter); 11] = [
            ("event_stream_messages", "NATS event stream messages consumed", &self.messages),
            ("event_stream_events", "KV events from the NATS event stream handed to the index", &self.events),
            ("event_stream_redeliveries", "NATS event stream messages delivered again and skipped (sequence already applied)", &self.redeliveries),
            ("event_stream_duplicates", "KV events skipped because their id was not above their rank's last", &self.duplicates),
            ("event_stream_gaps", "KV event id gaps detected on the NATS event stream (rank cleared, re-dump asked)", &self.gaps),
            ("event_stream_gaps_recovered", "KV event id gaps closed by a relay's clear and re-dump", &self.gaps_recovered),
            ("event_stream_relay_restarts", "Relay restarts seen on the NATS event stream (rank ids from 0 again)", &self.relay_restarts),
            ("event_stream_unknown_workers", "KV events of workers not in the routing set, ignored", &self.unknown_workers),
            ("event_stream_bad_messages", "NATS event stream messages that are not a JSON array of their worker's events, or too large", &self.bad_messages),
            ("snapshots_taken", "Index snapshots taken and uploaded to the NATS object store", &self.snapshots_taken),
            ("snapshots_loaded", "Index snapshots loaded from the NATS object store", &self.snapshots_loaded),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "event_stream_lag",
            "NATS event stream messages not applied yet (last stream sequence − last applied)",
            self.lag.clone(),
        );
        r.register(
            "snapshot_age_seconds",
            "Seconds since the newest index snapshot this replica took or loaded was taken",
            self.snapshot_age.clone(),
        );
        r.register(
            "snapshot_size_bytes",
            "Size of the newest index snapshot this replica took or loaded",
            self.snapshot_size.clone(),
        );
        r.register(
            "snapshot_duration_seconds",
            "Time the last index snapshot took: flush, dump, upload and purge",
            self.snapshot_duration.clone(),
        );
    }
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
            queue_pending: Gauge::default(),
            queue_wait: seconds_buckets(),
            queue_rejected: Counter::default(),
            expired_requests: Counter::default(),
            service_calls: Family::default(),
            discovery_changes: Family::default(),
            discovery_watch_restarts: Counter::default(),
            discovery_rejected: Counter::default(),
            event_plane: EventPlaneMetrics::default(),
            replica_sync: ReplicaSyncMetrics::default(),
            accuracy: AccuracyMetrics::default(),
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
        registry.register(
            "router_queue_pending_requests",
            "Requests waiting in the router queue until a worker falls below the queue threshold",
            m.queue_pending.clone(),
        );
        registry.register(
            "router_queue_wait_seconds",
            "Time a request waited in the router queue before it was routed",
            m.queue_wait.clone(),
        );
        registry.register(
            "router_queue_rejected",
            "Requests refused because the router queue was full",
            m.queue_rejected.clone(),
        );
        registry.register(
            "router_expired_requests",
            "Booked requests force-freed after the expiry (router_active_request_expiry_secs) because nothing freed them",
            m.expired_requests.clone(),
        );
        registry.register(
            "router_service_requests",
            "Standalone router calls by endpoint (generate, best_worker_id, …) and status (success, client_error, unavailable, error)",
            m.service_calls.clone(),
        );
        registry.register(
            "discovery_changes",
            "Workers registered (added) and deregistered (removed) by dynamic discovery",
            m.discovery_changes.clone(),
        );
        registry.register(
            "discovery_watch_restarts",
            "Discovery watches restarted after an error (etcd or the Kubernetes API restarted or unreachable, history compacted or expired)",
            m.discovery_watch_restarts.clone(),
        );
        registry.register(
            "discovery_rejected",
            "Registrations and worker pods discovery skipped, once per content: unreadable (malformed JSON, kvrouter.dev/* annotations) or refused (e.g. a block size that disagrees)",
            m.discovery_rejected.clone(),
        );
        m.event_plane.register(&mut registry);
        m.replica_sync.register(&mut registry);
        m.accuracy.register(&mut registry);
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

    /// Every metric in the classic Prometheus text format, with `snap` as the scrape-time
    /// state.
    pub fn render(&self, snap: Snapshot) -> String {
        self.render_as(snap, Format::Classic)
    }

    /// Every metric in `format`, with `snap` as the scrape-time state.
    pub fn render_as(&self, snap: Snapshot, format: Format) -> String {
        *self.scrape.snap.lock().unwrap_or_else(|e| e.into_inner()) = snap;
        encode(&self.registry, format)
    }
}

/// Every metric of `registry` in `format` (also the relay's status server's).
pub fn encode(registry: &Registry, format: Format) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!("encoding metrics: {e}");
    }
    match format {
        Format::OpenMetrics => out,
        Format::Classic => to_classic(&out),
    }
}

/// A text format of the scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format 0.0.4, the default: a counter is declared under its
    /// sample name (`# TYPE x_total counter`, then `x_total 3`), no `# EOF`.
    Classic,
    /// OpenMetrics 1.0.0: a counter is declared under its family name (`# TYPE x counter`,
    /// then `x_total 3`), and the text ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of any text format it also
    /// accepts (`text/plain`, `text/*`, `*/*`), else classic (also without the header, or with
    /// one that cannot be read).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Classic;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse().unwrap_or(0.0);
                    }
                }
            }
            let q = if q.is_finite() {
                q.clamp(0.0, 1.0)
            } else {
                0.0
            };
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    /// The `Content-Type` of a scrape in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// OpenMetrics text as the classic Prometheus text format 0.0.4: a counter's `# HELP` and
/// `# TYPE` name its samples (`x_total`), as classic parsers (Prometheus' own,
/// `prometheus_client.parser` in Python) require to type it a counter; `# UNIT` and `# EOF`
/// lines go. Everything else (gauges, histograms, samples, label escaping) is the same in both.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split(' ');
            let name = w.next()?;
            (w.next() == Some("counter")).then_some(name)
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let head = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match head {
            Some(p) => {
                let rest = &line[p.len()..];
                let (name, tail) = match rest.split_once(' ') {
                    Some((n, t)) => (n, Some(t)),
                    None => (rest, None),
                };
                out.push_str(p);
                out.push_str(name);
                // The registry's encoder names every counter sample `<family>_total`.
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if let Some(t) = tail {
                    out.push(' ');
                    out.push_str(t);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_picks_the_format() {
        for (accept, want) in [
            (None, Format::Classic),
            (Some(""), Format::Classic),
            (Some("*/*"), Format::Classic),
            (Some("text/plain"), Format::Classic),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            // Prometheus 2.x.
            (
                Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"),
                Format::Classic,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Classic),
            (Some("application/openmetrics-text;q=nan"), Format::Classic),
            (Some("APPLICATION/OpenMetrics-Text ; q=1"), Format::OpenMetrics),
            (Some(";;,,=q;"), Format::Classic),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn classic_text_declares_counters_by_their_sample_names() {
        let m = Metrics::new();
        m.input_tokens.inc_by(3);
        m.ttft.observe(0.01);
        let om = m.render_as(Snapshot::default(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE kvrouter_frontend_input_tokens counter\n"));
        let classic = m.render(Snapshot::default());
        assert!(!classic.contains("# EOF"), "{classic}");
        assert!(
            classic.contains(
                "# HELP kvrouter_frontend_input_tokens_total Prompt tokens of served requests.\n\
                 # TYPE kvrouter_frontend_input_tokens_total counter\n\
                 kvrouter_frontend_input_tokens_total 3\n"
            ),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE kvrouter_frontend_time_to_first_token_seconds histogram\n")
        );
        assert!(classic.contains("# TYPE kvrouter_frontend_inflight_requests gauge\n"));
        // Only the counters' declarations change.
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&om), strip(&classic));
    }
}
