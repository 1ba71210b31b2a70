//! Router configuration: modes, KV cost parameters, busy thresholds, per-request overrides.
//!
//! Names and defaults are Dynamo 1.6.1's (`KvRouterConfig`, spec §9.1 and §11), so flags,
//! `DYN_*` variables and Python keyword arguments map one to one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::prefill_time::{PrefillCoefficients, PrefillLoadModel};
use crate::queue::QueuePolicy;
use crate::sequences::BookingOptions;

/// How a worker is chosen (`--router-mode`, `DYN_ROUTER_MODE`; spec §8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Cycle through eligible workers in order.
    #[default]
    RoundRobin,
    /// Uniformly random eligible worker.
    Random,
    /// Two random workers; the one with fewer active requests.
    PowerOfTwo,
    /// Fewest active requests (ties broken at random).
    LeastLoaded,
    /// KV-cache-aware cost (spec §6).
    Kv,
    /// The request names its worker (`backend_instance_id`).
    Direct,
    /// CPU vs accelerator groups weighted by capacity ratio, least-loaded inside the group.
    DeviceAwareWeighted,
}

impl RouterMode {
    pub const ALL: [RouterMode; 7] = [
        RouterMode::RoundRobin,
        RouterMode::Random,
        RouterMode::PowerOfTwo,
        RouterMode::LeastLoaded,
        RouterMode::Kv,
        RouterMode::Direct,
        RouterMode::DeviceAwareWeighted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::PowerOfTwo => "power-of-two",
            RouterMode::LeastLoaded => "least-loaded",
            RouterMode::Kv => "kv",
            RouterMode::Direct => "direct",
            RouterMode::DeviceAwareWeighted => "device-aware-weighted",
        }
    }
}

impl fmt::Display for RouterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RouterMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let alias = match norm.as_str() {
            "roundrobin" => "round-robin",
            "power-of-two-choices" | "p2c" => "power-of-two",
            other => other,
        };
        RouterMode::ALL
            .into_iter()
            .find(|m| m.as_str() == alias)
            .ok_or_else(|| {
                format!(
                    "unknown router mode {s:?} (one of: {})",
                    RouterMode::ALL.map(|m| m.as_str()).join(", ")
                )
            })
    }
}

/// KV routing parameters (Dynamo `KvRouterConfig`). Units: blocks unless stated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvRouterConfig {
    /// Legacy `--kv-overlap-score-weight`; when set it wins: non-zero → `prefill_load_scale`,
    /// zero → `prefill_load_scale = 0` and `overlap_score_credit = 0` (spec §6.3).
    pub overlap_score_weight: Option<f64>,
    /// Blocks of device-cache overlap subtracted from the prefill term, per overlapping block.
    pub overlap_score_credit: f64,
    /// Credit decay with a worker's excess active prefill (0 = off; spec §6.2).
    pub overlap_score_credit_decay: f64,
    /// Weight of the prefill term against the decode term.
    pub prefill_load_scale: f64,
    /// Cost per active request (experimental; 0 = off).
    pub decode_active_request_weight: f64,
    /// Credit per host-memory block beyond the device prefix.
    pub host_cache_hit_weight: f64,
    /// Credit per disk block beyond the host prefix.
    pub disk_cache_hit_weight: f64,
    /// 0 = argmin; > 0 = softmax over min–max normalised costs.
    pub router_temperature: f64,
    /// Exact index from KV events (true) or approximate index from routing decisions (false).
    pub use_kv_events: bool,
    pub router_track_active_blocks: bool,
    pub router_assume_kv_reuse: bool,
    pub router_track_prefill_tokens: bool,
    /// Approximate mode: seconds a routed block is assumed cached.
    pub router_ttl_secs: f64,
    /// Approximate mode: `(block, worker)` pairs before pruning.
    pub router_max_tree_size: usize,
    /// Approximate mode: prune down to this fraction of the maximum.
    pub router_prune_target_ratio: f64,
    /// Predicted side index TTL in seconds (None = off). Requires KV events.
    pub router_predicted_ttl_secs: Option<f64>,
    /// Seconds after which a booked request is force-freed.
    pub router_active_request_expiry_secs: f64,
    /// Which score `kv` mode minimises (see [`crate::policy`]).
    pub router_selection_policy: crate::policy::SelectionPolicy,
    /// `affinity` policy: a rank is overloaded past this multiple of the fleet's mean load
    /// (plus the request's blocks), and then loses its prefix affinity.
    pub router_affinity_load_factor: f64,
    /// How active prefill tokens count: in full until the first token, or decaying over a
    /// predicted prefill time (`aic`; see [`crate::prefill_time`]).
    pub router_prefill_load_model: PrefillLoadModel,
    /// `aic`: the per-step prefill time polynomial (None: fitted online from observed TTFTs).
    pub router_prefill_time_coefficients: Option<PrefillCoefficients>,
    /// Queue in the router while every worker's active prefill tokens exceed this multiple of
    /// its `max_num_batched_tokens` (None: no queue; spec §7.2).
    pub router_queue_threshold: Option<f64>,
    /// Order of the router queue.
    pub router_queue_policy: QueuePolicy,
    /// Requests the router queue holds at most; more are refused (overloaded).
    pub router_queue_limit: usize,
    /// A request that waited longer than this (seconds) has its overlaps looked up again before
    /// dispatch (`DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS`; 0: never).
    pub router_overlap_refresh_after_secs: f64,
}

/// `max_num_batched_tokens` assumed for a worker that did not advertise one (vLLM's and the
/// mock engine's default step budget).
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: u64 = 8192;

impl Default for KvRouterConfig {
    fn default() -> Self {
        Self {
            overlap_score_weight: None,
            overlap_score_credit: 1.0,
            overlap_score_credit_decay: 0.0,
            prefill_load_scale: 1.0,
            decode_active_request_weight: 0.0,
            host_cache_hit_weight: 0.75,
            disk_cache_hit_weight: 0.25,
            router_temperature: 0.0,
            use_kv_events: true,
            router_track_active_blocks: true,
            router_assume_kv_reuse: true,
            router_track_prefill_tokens: true,
            router_ttl_secs: 120.0,
            router_max_tree_size: 1 << 20,
            router_prune_target_ratio: 0.8,
            router_predicted_ttl_secs: None,
            router_active_request_expiry_secs: 300.0,
            router_selection_policy: crate::policy::SelectionPolicy::Default,
            router_affinity_load_factor: 2.0,
            router_prefill_load_model: PrefillLoadModel::None,
            router_prefill_time_coefficients: None,
            router_queue_threshold: None,
            router_queue_policy: QueuePolicy::Fcfs,
            router_queue_limit: 4096,
            router_overlap_refresh_after_secs: 10.0,
        }
    }
}

impl KvRouterConfig {
    /// `(prefill_load_scale, overlap_score_credit)` after the legacy weight mapping (§6.3).
    pub fn effective_scale_and_credit(&self) -> (f64, f64) {
        match self.overlap_score_weight {
            Some(0.0) => (0.0, 0.0),
            Some(w) => (w, self.overlap_score_credit),
            None => (self.prefill_load_scale, self.overlap_score_credit),
        }
    }

    /// This config with a request's overrides applied.
    pub fn with_override(&self, o: &RouterConfigOverride) -> KvRouterConfig {
        let mut c = self.clone();
        if let Some(v) = o.overlap_score_weight {
            c.overlap_score_weight = Some(v);
        }
        if let Some(v) = o.overlap_score_credit {
            c.overlap_score_credit = v;
        }
        if let Some(v) = o.prefill_load_scale {
            c.prefill_load_scale = v;
        }
        if let Some(v) = o.router_temperature {
            c.router_temperature = v;
        }
        if let Some(v) = o.assume_kv_reuse {
            c.router_assume_kv_reuse = v;
        }
        if let Some(v) = o.track_prefill_tokens {
            c.router_track_prefill_tokens = v;
        }
        if let Some(v) = o.track_active_blocks {
            c.router_track_active_blocks = v;
        }
        if let Some(v) = o.router_selection_policy {
            c.router_selection_policy = v;
        }
        c
    }

    /// How requests are booked under this config.
    pub fn booking(&self) -> BookingOptions {
        BookingOptions {
            track_active_blocks: self.router_track_active_blocks,
            assume_kv_reuse: self.router_assume_kv_reuse,
            track_prefill_tokens: self.router_track_prefill_tokens,
        }
    }

    /// Reject values the cost function cannot use (negative, NaN, infinite).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            ("overlap_score_credit", Some(self.overlap_score_credit)),
            (
                "overlap_score_credit_decay",
                Some(self.overlap_score_credit_decay),
            ),
            ("prefill_load_scale", Some(self.prefill_load_scale)),
            (
                "decode_active_request_weight",
                Some(self.decode_active_request_weight),
            ),
            ("host_cache_hit_weight", Some(self.host_cache_hit_weight)),
            ("disk_cache_hit_weight", Some(self.disk_cache_hit_weight)),
            ("router_temperature", Some(self.router_temperature)),
            ("overlap_score_weight", self.overlap_score_weight),
            ("router_ttl_secs", Some(self.router_ttl_secs)),
            ("router_predicted_ttl_secs", self.router_predicted_ttl_secs),
            (
                "router_active_request_expiry_secs",
                Some(self.router_active_request_expiry_secs),
            ),
            (
                "router_affinity_load_factor",
                Some(self.router_affinity_load_factor),
            ),
            ("router_queue_threshold", self.router_queue_threshold),
            (
                "router_overlap_refresh_after_secs",
                Some(self.router_overlap_refresh_after_secs),
            ),
        ];
        for (name, v) in checks {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    return Err(ConfigError::Invalid {
                        field: name,
                        value: v,
                    });
                }
            }
        }
        if !(0.0..=1.0).contains(&self.router_prune_target_ratio) {
            return Err(ConfigError::Invalid {
                field: "router_prune_target_ratio",
                value: self.router_prune_target_ratio,
            });
        }
        Ok(())
    }
}

/// Per-request overrides (`nvext.router_config_override`; spec §6.5). Unknown fields rejected so
/// a typo is an error, not a silent no-op.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfigOverride {
    pub overlap_score_weight: Option<f64>,
    pub overlap_score_credit: Option<f64>,
    pub prefill_load_scale: Option<f64>,
    pub router_temperature: Option<f64>,
    pub assume_kv_reuse: Option<bool>,
    pub track_prefill_tokens: Option<bool>,
    /// Book the request's blocks as active decode blocks (off for a prefill-only request:
    /// its blocks leave the worker when the decode worker pulls them).
    pub track_active_blocks: Option<bool>,
    pub router_selection_policy: Option<crate::policy::SelectionPolicy>,
}

impl RouterConfigOverride {
    /// Every numeric field must be finite and ≥ 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("overlap_score_weight", self.overlap_score_weight),
            ("overlap_score_credit", self.overlap_score_credit),
            ("prefill_load_scale", self.prefill_load_scale),
            ("router_temperature", self.router_temperature),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    return Err(ConfigError::Invalid {
                        field: name,
                        value: v,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Busy thresholds: a worker over any of them is not eligible (OR semantics; all off by default;
/// spec §7.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadThresholds {
    /// Busy if active decode blocks / total KV blocks exceeds this fraction (0–1). Needs the
    /// worker's `total_kv_blocks`.
    pub active_decode_blocks_threshold: Option<f64>,
    /// Busy if active prefill tokens exceed this many tokens.
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Busy if active prefill tokens exceed this fraction of the worker's
    /// `max_num_batched_tokens`.
    pub active_prefill_tokens_threshold_frac: Option<f64>,
}

/// Everything the selector needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub mode: RouterMode,
    pub kv: KvRouterConfig,
    pub thresholds: LoadThresholds,
    /// Device-aware-weighted: capacity of an accelerator worker relative to a CPU worker
    /// (`DYN_ENCODER_CUDA_TO_CPU_RATIO`, default 8).
    pub device_ratio: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            mode: RouterMode::default(),
            kv: KvRouterConfig::default(),
            thresholds: LoadThresholds::default(),
            device_ratio: 8.0,
        }
    }
}

impl RouterConfig {
    /// Whether routing needs the prompt's block hashes (KV mode).
    pub fn needs_hashes(&self) -> bool {
        self.mode == RouterMode::Kv
    }

    /// Whether routing reads the exact, event-fed index (KV mode with `use_kv_events`); the
    /// approximate index is used otherwise.
    pub fn uses_exact_index(&self) -> bool {
        self.needs_hashes() && self.kv.use_kv_events
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} must be a finite number ≥ 0 (got {value})")]
    Invalid { field: &'static str, value: f64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_round_trip() {
        for m in RouterMode::ALL {
            assert_eq!(m.as_str().parse::<RouterMode>(), Ok(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.as_str())
            );
        }
        assert_eq!("KV".parse::<RouterMode>(), Ok(RouterMode::Kv));
        assert_eq!(
            "round_robin".parse::<RouterMode>(),
            Ok(RouterMode::RoundRobin)
        );
        assert!("fastest"
            .parse::<RouterMode>()
            .unwrap_err()
            .contains("least-loaded"));
    }

    #[test]
    fn legacy_weight_mapping() {
        let mut c = KvRouterConfig::default();
        assert_eq!(c.effective_scale_and_credit(), (1.0, 1.0));
        c.overlap_score_weight = Some(2.0);
        assert_eq!(c.effective_scale_and_credit(), (2.0, 1.0));
        c.overlap_score_weight = Some(0.0);
        assert_eq!(c.effective_scale_and_credit(), (0.0, 0.0));
    }

    #[test]
    fn overrides_apply_and_validate() {
        let o: RouterConfigOverride = serde_json::from_str(
            r#"{"router_temperature": 0.5, "overlap_score_credit": 0, "assume_kv_reuse": false}"#,
        )
        .unwrap();
        let c = KvRouterConfig::default().with_override(&o);
        assert_eq!(
            (
                c.router_temperature,
                c.overlap_score_credit,
                c.router_assume_kv_reuse
            ),
            (0.5, 0.0, false)
        );
        assert!(serde_json::from_str::<RouterConfigOverride>(r#"{"temperature": 1}"#).is_err());
        let bad = RouterConfigOverride {
            router_temperature: Some(-1.0),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let c = KvRouterConfig {
            prefill_load_scale: f64::NAN,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(KvRouterConfig::default().validate().is_ok());
    }
}
