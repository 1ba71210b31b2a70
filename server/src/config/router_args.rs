//! The router's flags, shared by `kvrouter frontend` and `kvrouter router` (spec §9.1, and the
//! busy thresholds of §9.2), with the reference's names, legacy spellings and `DYN_*`
//! variables, turned into the core's [`KvRouterConfig`] and [`LoadThresholds`].
//!
//! Boolean switches take both spellings of the reference: `--kv-events` / `--no-kv-events` and
//! the `--router-kv-events` / `--no-router-kv-events` aliases (likewise
//! `--[no-]track-active-blocks`, `--[no-]assume-kv-reuse`); the environment variable accepts
//! `true`/`false`/`1`/`0`.

use clap::builder::BoolishValueParser;
use clap::Args;
use kvrouter_core::config::{KvRouterConfig, LoadThresholds};

/// Routing flags: cost weights, load tracking, approximate and predicted indexes, router
/// queue, expiry of lost bookings, busy thresholds.
#[derive(Args, Clone, Debug)]
pub struct RouterArgs {
    /// Softmax temperature over normalised costs; 0 = argmin (kv mode).
    #[arg(long, env = "DYN_ROUTER_TEMPERATURE", default_value_t = 0.0)]
    pub router_temperature: f64,
    /// Consume the workers' KV events (exact index); off = approximate mode.
    #[arg(long = "kv-events", visible_alias = "router-kv-events", env = "DYN_KV_EVENTS",
          num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub kv_events: Option<bool>,
    /// Approximate mode: route on the router's own decisions, no KV events.
    #[arg(
        long = "no-kv-events",
        visible_alias = "no-router-kv-events",
        conflicts_with = "kv_events"
    )]
    pub no_kv_events: bool,
    /// Legacy overlap weight (§6.3): maps to the prefill load scale.
    #[arg(
        long = "kv-overlap-score-weight",
        visible_alias = "router-kv-overlap-score-weight",
        env = "DYN_KV_OVERLAP_SCORE_WEIGHT"
    )]
    pub kv_overlap_score_weight: Option<f64>,
    /// Device-tier overlap credit.
    #[arg(
        long,
        env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT",
        default_value_t = 1.0
    )]
    pub router_kv_overlap_score_credit: f64,
    /// Credit decay with a worker's excess active prefill (spec §6.2; 0 = off).
    #[arg(
        long,
        env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY",
        default_value_t = 0.0
    )]
    pub router_kv_overlap_score_credit_decay: f64,
    /// What `kv` mode minimises: `default` (the reference cost), `lmetric` (prefill × decode),
    /// or `affinity` (a prefix stays with the worker caching it unless that worker is
    /// overloaded; see the core's `policy` module).
    #[arg(long, env = "DYN_ROUTER_SELECTION_POLICY", default_value = "default")]
    pub router_selection_policy: kvrouter_core::SelectionPolicy,
    /// `affinity`: a worker is overloaded past this multiple of the fleet's mean load.
    #[arg(
        long,
        env = "KVROUTER_ROUTER_AFFINITY_LOAD_FACTOR",
        default_value_t = 2.0
    )]
    pub router_affinity_load_factor: f64,
    /// How a worker's active prefill tokens count: `none` (in full until the first token) or
    /// `aic` (`ais` accepted: the oldest prefill decays over its predicted prefill time).
    #[arg(long, env = "DYN_ROUTER_PREFILL_LOAD_MODEL", default_value = "none")]
    pub router_prefill_load_model: kvrouter_core::prefill_time::PrefillLoadModel,
    /// `aic`: per-step prefill time `A + B·T + C·T²` ms (T tokens in the step), as `A,B,C`; the
    /// mock engine's is `16.50142,0.01518344,4.209989e-7`. Unset: fitted online from TTFTs.
    #[arg(long, env = "DYN_ROUTER_PREFILL_TIME_COEFFICIENTS")]
    pub router_prefill_time_coefficients: Option<kvrouter_core::prefill_time::PrefillCoefficients>,
    /// Queue requests in the router while every worker's active prefill tokens exceed this
    /// multiple of its `max_num_batched_tokens` (unset: no queue).
    #[arg(long, env = "DYN_ROUTER_QUEUE_THRESHOLD")]
    pub router_queue_threshold: Option<f64>,
    /// Router queue order: `fcfs` (tail TTFT) or `wspt` (shortest uncached prefill first; mean
    /// TTFT).
    #[arg(long, env = "DYN_ROUTER_QUEUE_POLICY", default_value = "fcfs")]
    pub router_queue_policy: kvrouter_core::queue::QueuePolicy,
    /// Requests the router queue holds; more are refused with 503.
    #[arg(long, env = "KVROUTER_ROUTER_QUEUE_LIMIT", default_value_t = 4096)]
    pub router_queue_limit: usize,
    /// Seconds in the queue after which a request's overlaps are looked up again (0: never).
    #[arg(
        long,
        env = "DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS",
        default_value_t = 10.0
    )]
    pub router_overlap_refresh_after_secs: f64,
    /// Scale of prefill blocks in the cost.
    #[arg(long, env = "DYN_ROUTER_PREFILL_LOAD_SCALE", default_value_t = 1.0)]
    pub router_prefill_load_scale: f64,
    /// Cost weight of each active request on a rank (experimental).
    #[arg(
        long,
        env = "DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT",
        default_value_t = 0.0
    )]
    pub router_decode_active_request_weight: f64,
    /// Credit of host-memory cache hits.
    #[arg(long, env = "DYN_ROUTER_HOST_CACHE_HIT_WEIGHT", default_value_t = 0.75)]
    pub router_host_cache_hit_weight: f64,
    /// Credit of disk cache hits.
    #[arg(long, env = "DYN_ROUTER_DISK_CACHE_HIT_WEIGHT", default_value_t = 0.25)]
    pub router_disk_cache_hit_weight: f64,
    /// Count active blocks as decode load.
    #[arg(long = "router-track-active-blocks", visible_alias = "track-active-blocks",
          env = "DYN_ROUTER_TRACK_ACTIVE_BLOCKS", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub router_track_active_blocks: Option<bool>,
    #[arg(
        long = "no-router-track-active-blocks",
        alias = "no-track-active-blocks",
        conflicts_with = "router_track_active_blocks"
    )]
    pub no_router_track_active_blocks: bool,
    /// Blocks already active on a rank are shared, not added again.
    #[arg(long = "router-assume-kv-reuse", visible_alias = "assume-kv-reuse",
          env = "DYN_ROUTER_ASSUME_KV_REUSE", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub router_assume_kv_reuse: Option<bool>,
    #[arg(
        long = "no-router-assume-kv-reuse",
        alias = "no-assume-kv-reuse",
        conflicts_with = "router_assume_kv_reuse"
    )]
    pub no_router_assume_kv_reuse: bool,
    /// Count uncached prompt tokens as prefill load until the first token.
    #[arg(long = "router-track-prefill-tokens", env = "DYN_ROUTER_TRACK_PREFILL_TOKENS",
          num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub router_track_prefill_tokens: Option<bool>,
    #[arg(
        long = "no-router-track-prefill-tokens",
        conflicts_with = "router_track_prefill_tokens"
    )]
    pub no_router_track_prefill_tokens: bool,
    /// Approximate mode: seconds a routed block is assumed cached.
    #[arg(long, env = "DYN_ROUTER_TTL_SECS", default_value_t = 120.0)]
    pub router_ttl_secs: f64,
    /// Approximate mode: blocks kept before pruning.
    #[arg(long, env = "DYN_ROUTER_MAX_TREE_SIZE", default_value_t = 1 << 20)]
    pub router_max_tree_size: usize,
    /// Approximate mode: fraction kept when pruning.
    #[arg(long, env = "DYN_ROUTER_PRUNE_TARGET_RATIO", default_value_t = 0.8)]
    pub router_prune_target_ratio: f64,
    /// With events: also predict that a routed prompt is cached for this many seconds, so
    /// siblings arriving before the engine's events follow it.
    #[arg(long, env = "DYN_ROUTER_PREDICTED_TTL_SECS")]
    pub router_predicted_ttl_secs: Option<f64>,
    /// Seconds after which a booked request that was never freed is dropped.
    #[arg(
        long,
        env = "DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS",
        default_value_t = 300.0
    )]
    pub router_active_request_expiry_secs: f64,
    /// Busy when a rank's active decode blocks exceed this fraction of its KV blocks.
    #[arg(long, env = "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD")]
    pub active_decode_blocks_threshold: Option<f64>,
    /// Busy when a rank's active prefill tokens exceed this.
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD")]
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Busy when active prefill tokens exceed this fraction of `max_num_batched_tokens`.
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC")]
    pub active_prefill_tokens_threshold_frac: Option<f64>,
}

/// `--x` / `--no-x` with the environment's value in `on`, and a default.
pub(crate) fn flag(on: Option<bool>, off: bool, default: bool) -> bool {
    if off {
        false
    } else {
        on.unwrap_or(default)
    }
}

impl RouterArgs {
    /// Whether KV events feed an exact index (else approximate mode).
    pub fn use_kv_events(&self) -> bool {
        flag(self.kv_events, self.no_kv_events, true)
    }

    /// The core's KV routing parameters (not validated: see [`KvRouterConfig::validate`]).
    pub fn kv_config(&self) -> KvRouterConfig {
        KvRouterConfig {
            overlap_score_weight: self.kv_overlap_score_weight,
            overlap_score_credit: self.router_kv_overlap_score_credit,
            overlap_score_credit_decay: self.router_kv_overlap_score_credit_decay,
            router_selection_policy: self.router_selection_policy,
            router_affinity_load_factor: self.router_affinity_load_factor,
            prefill_load_scale: self.router_prefill_load_scale,
            decode_active_request_weight: self.router_decode_active_request_weight,
            host_cache_hit_weight: self.router_host_cache_hit_weight,
            disk_cache_hit_weight: self.router_disk_cache_hit_weight,
            router_temperature: self.router_temperature,
            use_kv_events: self.use_kv_events(),
            router_track_active_blocks: flag(
                self.router_track_active_blocks,
                self.no_router_track_active_blocks,
                true,
            ),
            router_assume_kv_reuse: flag(
                self.router_assume_kv_reuse,
                self.no_router_assume_kv_reuse,
                true,
            ),
            router_track_prefill_tokens: flag(
                self.router_track_prefill_tokens,
                self.no_router_track_prefill_tokens,
                true,
            ),
            router_ttl_secs: self.router_ttl_secs,
            router_max_tree_size: self.router_max_tree_size,
            router_prune_target_ratio: self.router_prune_target_ratio,
            router_predicted_ttl_secs: self.router_predicted_ttl_secs,
            router_active_request_expiry_secs: self.router_active_request_expiry_secs,
            router_prefill_load_model: self.router_prefill_load_model,
            router_prefill_time_coefficients: self.router_prefill_time_coefficients,
            router_queue_threshold: self.router_queue_threshold,
            router_queue_policy: self.router_queue_policy,
            router_queue_limit: self.router_queue_limit,
            router_overlap_refresh_after_secs: self.router_overlap_refresh_after_secs,
        }
    }

    /// The busy thresholds (spec §7.1).
    pub fn thresholds(&self) -> LoadThresholds {
        LoadThresholds {
            active_decode_blocks_threshold: self.active_decode_blocks_threshold,
            active_prefill_tokens_threshold: self.active_prefill_tokens_threshold,
            active_prefill_tokens_threshold_frac: self.active_prefill_tokens_threshold_frac,
        }
    }
}
