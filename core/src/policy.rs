//! Selection policies of `kv` mode (`--router-selection-policy`, `DYN_ROUTER_SELECTION_POLICY`,
//! per request `router_config_override.router_selection_policy`):
//!
//! * `default` — the reference cost of spec §6.2 ([`crate::selection::kv_cost`]): prefill
//!   blocks minus overlap credit plus decode blocks, argmin or softmax.
//! * `lmetric` — the reference's LMetric score (spec §6.2 note, arXiv 2603.15202):
//!   `adjusted_prefill_blocks × (potential_decode_blocks + 1)`, argmin.
//! * `affinity` — kvrouter's: a prefix stays where it is cached unless that worker is
//!   overloaded. The reference cost sends a hot prefix wherever the load term points, so the
//!   fleet's caches hold it several times and evict what only one of them held; pinning (the
//!   SGLang gateway's `cache_aware`) keeps one copy but loses the tail when a hot prefix lands on
//!   a busy worker. Here:
//!   1. a rank is *overloaded* when its load (active prefill + decode blocks) exceeds
//!      `affinity_load_factor ×` the fleet's mean plus the request's own blocks — the bound of
//!      consistent hashing with bounded loads (Mirrokni et al., SODA 2018); the least-loaded
//!      rank never is;
//!   2. among the others, the ranks holding the longest cached prefix compete on the LMetric
//!      score — a prefix is copied to a second worker only when its holders are overloaded;
//!   3. a prefix nobody (not overloaded) holds goes to the lowest LMetric score.
//!
//!   Measured with `kvrouter replay` on the Mooncake traces (docs/benchmarks.md): hit rate
//!   0.181 / 0.374 against the reference cost's 0.135 / 0.309 (pooled-LRU bound 0.189 / 0.391).
//!   Hashing new prefixes to a rank (rendezvous) was tried first: a system prompt shared by
//!   most conversations then left one worker idle.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::KvRouterConfig;
use crate::selection::{kv_cost, Candidate};

/// Which score `kv` mode minimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectionPolicy {
    /// The reference cost (spec §6.2).
    #[default]
    Default,
    /// `adjusted_prefill_blocks × (decode_blocks + 1)`.
    Lmetric,
    /// Cache affinity with bounded loads (this module's documentation).
    Affinity,
}

impl FromStr for SelectionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Self::Default),
            "lmetric" => Ok(Self::Lmetric),
            "affinity" => Ok(Self::Affinity),
            _ => Err(format!(
                "unknown selection policy {s:?}: expected default, lmetric or affinity"
            )),
        }
    }
}

impl std::fmt::Display for SelectionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Lmetric => "lmetric",
            Self::Affinity => "affinity",
        })
    }
}

/// The LMetric score of `c` (lower is better): the reference cost's prefill part times its
/// decode part plus one.
pub fn lmetric_score(
    c: &Candidate,
    isl: usize,
    block_size: usize,
    cfg: &KvRouterConfig,
    min_active_prefill: u64,
) -> f64 {
    let prefill_only = KvRouterConfig {
        decode_active_request_weight: 0.0,
        ..cfg.clone()
    };
    let (cost, _) = kv_cost(c, isl, block_size, &prefill_only, min_active_prefill);
    // kv_cost = scale · adjusted_prefill + decode blocks: take the decode blocks back out.
    let decode = c.load.potential_decode_blocks as f64;
    let adjusted_prefill = (cost - decode).max(0.0);
    adjusted_prefill * (decode + 1.0)
}

/// A rank's load in blocks, for the bounded-load test: queued prefill plus active decode.
fn load_blocks(c: &Candidate, block_size: usize) -> f64 {
    c.load.active_prefill_tokens as f64 / block_size.max(1) as f64
        + c.load.active_decode_blocks as f64
}

/// What the affinity policy chose and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinityChoice {
    /// A holder of the longest cached prefix (index into the candidates).
    Holder(usize),
    /// Nobody (not overloaded) holds a prefix: the lowest LMetric score.
    Score(usize),
}

impl AffinityChoice {
    pub fn index(self) -> usize {
        match self {
            Self::Holder(i) | Self::Score(i) => i,
        }
    }
}

/// The affinity policy over `eligible` (non-empty).
pub fn affinity(
    eligible: &[&Candidate],
    isl: usize,
    block_size: usize,
    cfg: &KvRouterConfig,
) -> AffinityChoice {
    let min_prefill = eligible
        .iter()
        .map(|c| c.load.active_prefill_tokens)
        .min()
        .unwrap_or(0);
    let loads: Vec<f64> = eligible
        .iter()
        .map(|c| load_blocks(c, block_size))
        .collect();
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let request_blocks = crate::hash::request_blocks(isl, block_size) as f64;
    let bound = cfg.router_affinity_load_factor.max(1.0) * mean + request_blocks;
    // The least-loaded rank is never over the bound (its load <= mean).
    let ok: Vec<usize> = (0..eligible.len()).filter(|&i| loads[i] <= bound).collect();
    let lm = |i: usize| lmetric_score(eligible[i], isl, block_size, cfg, min_prefill);
    let best_overlap = ok
        .iter()
        .map(|&i| eligible[i].overlap.device)
        .max()
        .unwrap_or(0);
    if best_overlap > 0 {
        let i = ok
            .iter()
            .copied()
            .filter(|&i| eligible[i].overlap.device == best_overlap)
            .min_by(|&a, &b| lm(a).total_cmp(&lm(b)))
            .expect("a holder");
        return AffinityChoice::Holder(i);
    }
    AffinityChoice::Score(
        ok.iter()
            .copied()
            .min_by(|&a, &b| lm(a).total_cmp(&lm(b)))
            .expect("non-empty"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::WorkerWithDpRank;
    use crate::index::TierOverlap;
    use crate::selection::WorkerInfo;
    use crate::sequences::PotentialLoad;

    fn cand(id: u64, overlap: u32, prefill_tokens: u64, decode_blocks: u64) -> Candidate {
        Candidate {
            info: WorkerInfo {
                worker: WorkerWithDpRank {
                    worker_id: id,
                    dp_rank: 0,
                },
                ..Default::default()
            },
            overlap: TierOverlap {
                device: overlap,
                ..Default::default()
            },
            load: PotentialLoad {
                active_prefill_tokens: prefill_tokens,
                active_decode_blocks: decode_blocks,
                potential_decode_blocks: decode_blocks + 4,
                active_requests: 1,
                ..Default::default()
            },
        }
    }

    fn pick(c: &[Candidate]) -> AffinityChoice {
        let refs: Vec<&Candidate> = c.iter().collect();
        affinity(&refs, 256, 64, &KvRouterConfig::default())
    }

    #[test]
    fn a_cached_prefix_stays_with_its_holder_while_it_is_not_overloaded() {
        // Worker 1 holds 3 of the 4 blocks but is busier than worker 0: the reference cost
        // (prefill 4 - 3 + decode 14 = 15 against 4 + 5 = 9) would copy the prefix to worker 0.
        let c = [cand(0, 0, 0, 1), cand(1, 3, 0, 10), cand(2, 0, 0, 4)];
        let refs: Vec<&Candidate> = c.iter().collect();
        let cfg = KvRouterConfig::default();
        let costs: Vec<f64> = refs
            .iter()
            .map(|x| kv_cost(x, 256, 64, &cfg, 0).0)
            .collect();
        assert!(costs[0] < costs[1], "{costs:?}");
        assert_eq!(pick(&c), AffinityChoice::Holder(1));
    }

    #[test]
    fn an_overloaded_holder_spills_to_the_best_score() {
        // Mean load (0 + 60 + 2) / 3 = 20.7; bound 2 * 20.7 + 4 = 45.3: worker 1 at 60 is over.
        let c = [cand(0, 0, 0, 0), cand(1, 3, 0, 60), cand(2, 0, 0, 2)];
        assert_eq!(pick(&c), AffinityChoice::Score(0));
        // A holder within the bound keeps it, six times as busy as the next: mean 14 / 3,
        // bound 2 * 14 / 3 + 4 = 13.3.
        let c = [cand(0, 0, 0, 0), cand(1, 3, 0, 12), cand(2, 0, 0, 2)];
        assert_eq!(pick(&c), AffinityChoice::Holder(1));
    }

    #[test]
    fn the_least_loaded_rank_is_never_overloaded_and_holders_tie_on_score() {
        // Three equally busy ranks and an idle one: the idle one is eligible and, with nothing
        // cached anywhere, wins (rendezvous hashing of a shared first block once starved it).
        let c = [
            cand(0, 0, 0, 30),
            cand(1, 0, 0, 0),
            cand(2, 0, 0, 30),
            cand(3, 0, 0, 30),
        ];
        assert_eq!(pick(&c), AffinityChoice::Score(1));
        // Two holders of the same prefix: the less loaded one.
        let c = [cand(0, 2, 0, 6), cand(1, 2, 0, 1), cand(2, 0, 0, 0)];
        assert_eq!(pick(&c), AffinityChoice::Holder(1));
        // A longer prefix wins over a shorter one on a less loaded rank.
        let c = [cand(0, 1, 0, 0), cand(1, 3, 0, 8)];
        assert_eq!(pick(&c), AffinityChoice::Holder(1));
    }

    #[test]
    fn lmetric_multiplies_prefill_by_decode() {
        let cfg = KvRouterConfig::default();
        // 256 tokens = 4 blocks, 1 cached: adjusted prefill 3; decode 10 + 4 = 14.
        let c = cand(0, 1, 0, 10);
        assert_eq!(lmetric_score(&c, 256, 64, &cfg, 0), 3.0 * 15.0);
        // A fully cached prompt costs nothing whatever the decode load.
        let c = cand(0, 4, 0, 100);
        assert_eq!(lmetric_score(&c, 256, 64, &cfg, 0), 0.0);
    }
}
