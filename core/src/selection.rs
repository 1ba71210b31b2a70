//! Worker selection: one entry point ([`Selector::select`]) for every router mode, with the KV
//! cost function, temperature, busy thresholds, pinning and dp_rank forcing.
//!
//! Cost (spec §6.2, Dynamo 1.6.x default scorer; lower is better, in blocks):
//!
//! ```text
//! raw_prefill_blocks = (active_prefill_tokens + isl) / block_size   (active part 0 if !track_prefill_tokens)
//! decay              = 1 / (1 + credit_decay * (active_prefill_tokens - min_active_prefill) / block_size / request_blocks)
//! credit             = overlap_score_credit * decay * device_blocks + 0.75 * host_blocks + 0.25 * disk_blocks
//! cost               = prefill_load_scale * max(0, raw_prefill_blocks - credit)
//!                    + potential_decode_blocks + decode_active_request_weight * active_requests
//! ```
//!
//! `--router-selection-policy` may replace this cost ([`crate::policy`]).
//!
//! Temperature 0 picks the argmin with uniform random tie-breaking; temperature T > 0 samples
//! `p_i ∝ exp(-(c_i - min) / ((max - min) * T))` (spec §6.4).

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, KvRouterConfig, RouterConfig, RouterConfigOverride, RouterMode};
use crate::event::{DpRank, WorkerId, WorkerWithDpRank};
use crate::index::TierOverlap;
use crate::policy::{affinity, lmetric_score, SelectionPolicy};
use crate::sequences::PotentialLoad;

/// What a worker runs on, for device-aware-weighted routing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// An accelerator (GPU or similar).
    #[default]
    Gpu,
    Cpu,
}

/// What a worker does in prefill/decode disaggregation (spec §13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    /// Aggregated: prefill and decode of a request on the same worker.
    #[default]
    Both,
    /// Computes prompts and hands their KV blocks to a decode worker.
    Prefill,
    /// Receives KV blocks and generates.
    Decode,
}

impl WorkerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

impl std::str::FromStr for WorkerRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "both" | "agg" | "aggregated" => Ok(Self::Both),
            "prefill" => Ok(Self::Prefill),
            "decode" => Ok(Self::Decode),
            _ => Err(format!(
                "unknown worker role {s:?}: expected both, prefill or decode"
            )),
        }
    }
}

/// Which ranks a request may be routed to, by role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RolePool {
    /// Every rank (a fleet without disaggregation).
    #[default]
    Any,
    /// Only ranks of this role.
    Only(WorkerRole),
    /// Decode and aggregated ranks: a request that skips the prefill pool (conditional
    /// disaggregation) runs whole on one of them.
    Aggregated,
}

impl RolePool {
    /// Whether a rank of `role` is in the pool.
    pub fn admits(self, role: WorkerRole) -> bool {
        match self {
            Self::Any => true,
            Self::Only(r) => r == role,
            Self::Aggregated => role != WorkerRole::Prefill,
        }
    }
}

/// Static facts about a worker rank, from its registration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker: WorkerWithDpRank,
    #[serde(default)]
    pub device: DeviceType,
    /// KV cache capacity in blocks, if the worker advertised it.
    #[serde(default)]
    pub total_kv_blocks: Option<u64>,
    /// Per-step token budget, if advertised (for `--active-prefill-tokens-threshold-frac`).
    #[serde(default)]
    pub max_num_batched_tokens: Option<u64>,
    /// Prefill, decode or both (disaggregation).
    #[serde(default)]
    pub role: WorkerRole,
}

/// One rank as the selector sees it for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    pub info: WorkerInfo,
    /// Blocks of the request's prefix cached on this rank, by tier.
    pub overlap: TierOverlap,
    /// Load now and with the request added.
    pub load: PotentialLoad,
}

/// The request-specific inputs of a selection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelectionRequest {
    /// Prompt tokens (must be > 0 for a meaningful cost).
    pub isl: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Send to this worker (direct mode, or `backend_instance_id`).
    pub pinned_worker: Option<WorkerId>,
    /// Force this data-parallel rank.
    pub dp_rank: Option<DpRank>,
    pub overrides: Option<RouterConfigOverride>,
}

/// The chosen rank and what the router predicted about it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Selection {
    pub worker: WorkerWithDpRank,
    /// Device-tier prefix blocks cached on the chosen rank.
    pub overlap_blocks: u32,
    /// `min(overlap_blocks * block_size, isl)`.
    pub cached_tokens: usize,
    /// `ceil(isl / block_size)`.
    pub required_blocks: usize,
    /// Overlap credit the KV cost applied (weighted, in blocks); 0 in load-only modes.
    pub effective_overlap_blocks: f64,
    /// Largest device overlap among eligible ranks (to count non-max selections).
    pub max_overlap_blocks: u32,
    /// KV cost of the chosen rank (KV mode, including pinned requests in KV mode).
    pub cost: Option<f64>,
}

/// Why no worker was chosen.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SelectError {
    #[error("no workers available")]
    NoWorkers,
    #[error("no worker serves dp_rank {0}")]
    NoWorkerWithRank(DpRank),
    #[error("all {0} eligible workers are busy")]
    AllWorkersBusy(usize),
    #[error("worker {0} not found")]
    PinnedWorkerNotFound(WorkerId),
    #[error("worker {0} is busy")]
    PinnedWorkerBusy(WorkerId),
    #[error("router mode direct needs a worker id on the request (backend_instance_id)")]
    MissingPinnedWorker,
    #[error("invalid router_config_override: {0}")]
    InvalidOverride(#[from] ConfigError),
}

/// KV cost of serving a request on `c` (spec §6.2). `min_active_prefill`: smallest active
/// prefill among eligible ranks (for credit decay). Returns `(cost, credit)` in blocks.
pub fn kv_cost(
    c: &Candidate,
    isl: usize,
    block_size: usize,
    cfg: &KvRouterConfig,
    min_active_prefill: u64,
) -> (f64, f64) {
    CostTerms::new(isl, block_size, cfg, min_active_prefill).cost(c)
}

/// The request-wide part of [`kv_cost`], computed once per request rather than per rank.
#[derive(Clone, Copy, Debug)]
pub struct CostTerms {
    bs: f64,
    isl: f64,
    scale: f64,
    credit_w: f64,
    host_w: f64,
    disk_w: f64,
    decode_request_w: f64,
    track_prefill: bool,
    /// `credit_decay / block_size / request_blocks`; 0 without decay.
    decay_per_token: f64,
    min_active_prefill: u64,
}

impl CostTerms {
    pub fn new(
        isl: usize,
        block_size: usize,
        cfg: &KvRouterConfig,
        min_active_prefill: u64,
    ) -> Self {
        let bs = block_size.max(1) as f64;
        let (scale, credit_w) = cfg.effective_scale_and_credit();
        let track_prefill = cfg.router_track_prefill_tokens;
        let decay_per_token = if cfg.overlap_score_credit_decay == 0.0 || !track_prefill {
            0.0
        } else {
            let request_blocks = crate::hash::request_blocks(isl, block_size).max(1) as f64;
            cfg.overlap_score_credit_decay / bs / request_blocks
        };
        Self {
            bs,
            isl: isl as f64,
            scale,
            credit_w,
            host_w: cfg.host_cache_hit_weight,
            disk_w: cfg.disk_cache_hit_weight,
            decode_request_w: cfg.decode_active_request_weight,
            track_prefill,
            decay_per_token,
            min_active_prefill,
        }
    }

    /// `(cost, credit)` of `c`, as [`kv_cost`].
    pub fn cost(&self, c: &Candidate) -> (f64, f64) {
        let active_prefill = if self.track_prefill {
            c.load.active_prefill_tokens
        } else {
            0
        };
        let raw_prefill_blocks = (active_prefill as f64 + self.isl) / self.bs;
        let decay = if self.decay_per_token == 0.0 {
            1.0
        } else {
            let excess = active_prefill.saturating_sub(self.min_active_prefill) as f64;
            1.0 / (1.0 + self.decay_per_token * excess)
        };
        let credit = self.credit_w * decay * f64::from(c.overlap.device)
            + self.host_w * f64::from(c.overlap.host)
            + self.disk_w * f64::from(c.overlap.disk);
        let adjusted = (raw_prefill_blocks - credit).max(0.0);
        let cost = self.scale * adjusted
            + c.load.potential_decode_blocks as f64
            + self.decode_request_w * f64::from(c.load.active_requests);
        (cost, credit)
    }
}

/// Whether a rank is over any busy threshold (spec §7.1).
pub fn is_busy(c: &Candidate, cfg: &RouterConfig) -> bool {
    let t = &cfg.thresholds;
    let load = &c.load;
    if let (Some(f), Some(total)) = (t.active_decode_blocks_threshold, c.info.total_kv_blocks) {
        if total > 0 && load.active_decode_blocks as f64 / total as f64 > f {
            return true;
        }
    }
    if let Some(n) = t.active_prefill_tokens_threshold {
        if load.active_prefill_tokens > n {
            return true;
        }
    }
    if let (Some(f), Some(batch)) = (
        t.active_prefill_tokens_threshold_frac,
        c.info.max_num_batched_tokens,
    ) {
        if load.active_prefill_tokens as f64 > f * batch as f64 {
            return true;
        }
    }
    false
}

/// Chooses workers; holds the round-robin cursor.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    config: RouterConfig,
    rr_next: usize,
}

impl Selector {
    pub fn new(config: RouterConfig) -> Self {
        Self { config, rr_next: 0 }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Pick a rank for a request among `candidates` (in registry order: round-robin follows it).
    pub fn select<R: Rng + ?Sized>(
        &mut self,
        candidates: &[Candidate],
        req: &SelectionRequest,
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        let (sel, used_cursor) = self.choose(candidates, req, rng)?;
        if used_cursor {
            self.rr_next = self.rr_next.wrapping_add(1);
        }
        Ok(sel)
    }

    /// What [`select`](Self::select) would pick now, without moving the round-robin cursor: a
    /// query changes nothing (random tie-breaks still draw from `rng`).
    pub fn peek<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        req: &SelectionRequest,
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        self.choose(candidates, req, rng).map(|(sel, _)| sel)
    }

    /// The choice, and whether it took the round-robin cursor's turn (the caller advances it).
    fn choose<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        req: &SelectionRequest,
        rng: &mut R,
    ) -> Result<(Selection, bool), SelectError> {
        if candidates.is_empty() {
            return Err(SelectError::NoWorkers);
        }
        let kv_cfg = match &req.overrides {
            Some(o) => {
                o.validate()?;
                self.config.kv.with_override(o)
            }
            None => self.config.kv.clone(),
        };
        let mode = self.config.mode;

        if req.pinned_worker.is_some() || mode == RouterMode::Direct {
            let id = req.pinned_worker.ok_or(SelectError::MissingPinnedWorker)?;
            let ranks: Vec<&Candidate> = candidates
                .iter()
                .filter(|c| {
                    c.info.worker.worker_id == id
                        && req.dp_rank.is_none_or(|r| c.info.worker.dp_rank == r)
                })
                .collect();
            if ranks.is_empty() {
                return Err(SelectError::PinnedWorkerNotFound(id));
            }
            let free: Vec<&Candidate> = ranks
                .into_iter()
                .filter(|c| !is_busy(c, &self.config))
                .collect();
            if free.is_empty() {
                return Err(SelectError::PinnedWorkerBusy(id));
            }
            let (i, kv) = if mode == RouterMode::Kv {
                let (i, kv) = self.pick_kv(&free, req, &kv_cfg, rng);
                (i, Some(kv))
            } else {
                (least_loaded(&free, rng), None)
            };
            return Ok((self.selection(free[i], &free, req, kv), false));
        }

        let in_rank = |c: &&Candidate| req.dp_rank.is_none_or(|r| c.info.worker.dp_rank == r);
        let eligible: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| in_rank(c) && !is_busy(c, &self.config))
            .collect();
        if eligible.is_empty() {
            let ranked = candidates.iter().filter(in_rank).count();
            return Err(match req.dp_rank {
                Some(r) if ranked == 0 => SelectError::NoWorkerWithRank(r),
                _ => SelectError::AllWorkersBusy(ranked),
            });
        }

        let (i, kv) = match mode {
            RouterMode::RoundRobin => (self.rr_next % eligible.len(), None),
            RouterMode::Random => (rng.random_range(0..eligible.len()), None),
            RouterMode::PowerOfTwo => (power_of_two(&eligible, rng), None),
            RouterMode::LeastLoaded => (least_loaded(&eligible, rng), None),
            RouterMode::DeviceAwareWeighted => (self.device_aware(&eligible, rng), None),
            RouterMode::Kv | RouterMode::Direct => {
                let (i, kv) = self.pick_kv(&eligible, req, &kv_cfg, rng);
                (i, Some(kv))
            }
        };
        let used_cursor = mode == RouterMode::RoundRobin;
        Ok((self.selection(eligible[i], &eligible, req, kv), used_cursor))
    }

    /// `kv`: `(cost, credit)` of the chosen rank when it was picked by KV cost.
    fn selection(
        &self,
        c: &Candidate,
        eligible: &[&Candidate],
        req: &SelectionRequest,
        kv: Option<(f64, f64)>,
    ) -> Selection {
        let bs = req.block_size.max(1);
        Selection {
            worker: c.info.worker,
            overlap_blocks: c.overlap.device,
            cached_tokens: (c.overlap.device as usize * bs).min(req.isl),
            required_blocks: crate::hash::request_blocks(req.isl, bs),
            effective_overlap_blocks: kv.map_or(0.0, |(_, credit)| credit),
            max_overlap_blocks: eligible.iter().map(|c| c.overlap.device).max().unwrap_or(0),
            cost: kv.map(|(cost, _)| cost),
        }
    }

    fn pick_kv<R: Rng + ?Sized>(
        &self,
        eligible: &[&Candidate],
        req: &SelectionRequest,
        cfg: &KvRouterConfig,
        rng: &mut R,
    ) -> (usize, (f64, f64)) {
        let min_prefill = eligible
            .iter()
            .map(|c| c.load.active_prefill_tokens)
            .min()
            .unwrap_or(0);
        let terms = CostTerms::new(req.isl, req.block_size, cfg, min_prefill);
        let cost_of = |c: &Candidate| terms.cost(c);
        let i = match cfg.router_selection_policy {
            SelectionPolicy::Default => {
                let costs: Vec<f64> = eligible.iter().map(|c| cost_of(c).0).collect();
                pick_by_cost(&costs, cfg.router_temperature, rng)
            }
            SelectionPolicy::Lmetric => {
                let scores: Vec<f64> = eligible
                    .iter()
                    .map(|c| lmetric_score(c, req.isl, req.block_size, cfg, min_prefill))
                    .collect();
                argmin_random_ties(&scores, rng)
            }
            SelectionPolicy::Affinity => affinity(eligible, req.isl, req.block_size, cfg).index(),
        };
        (i, cost_of(eligible[i]))
    }

    /// Split into CPU and accelerator groups; the group with the lowest
    /// `active_requests / (members * weight)` wins (weight 1 for CPU, `device_ratio` otherwise),
    /// then least-loaded inside it (spec §8).
    fn device_aware<R: Rng + ?Sized>(&self, eligible: &[&Candidate], rng: &mut R) -> usize {
        let score = |dev: DeviceType| {
            let members: Vec<&&Candidate> =
                eligible.iter().filter(|c| c.info.device == dev).collect();
            if members.is_empty() {
                return f64::INFINITY;
            }
            let inflight: u64 = members
                .iter()
                .map(|c| u64::from(c.load.active_requests))
                .sum();
            let weight = if dev == DeviceType::Cpu {
                1.0
            } else {
                self.config.device_ratio.max(f64::MIN_POSITIVE)
            };
            inflight as f64 / (members.len() as f64 * weight)
        };
        let (gpu, cpu) = (score(DeviceType::Gpu), score(DeviceType::Cpu));
        let group = if gpu <= cpu {
            DeviceType::Gpu
        } else {
            DeviceType::Cpu
        };
        let idx: Vec<usize> = (0..eligible.len())
            .filter(|&i| eligible[i].info.device == group)
            .collect();
        let sub: Vec<&Candidate> = idx.iter().map(|&i| eligible[i]).collect();
        idx[least_loaded(&sub, rng)]
    }
}

/// Fewest active requests; ties broken uniformly at random.
fn least_loaded<R: Rng + ?Sized>(c: &[&Candidate], rng: &mut R) -> usize {
    let costs: Vec<f64> = c
        .iter()
        .map(|c| f64::from(c.load.active_requests))
        .collect();
    argmin_random_ties(&costs, rng)
}

/// Two distinct random ranks; the one with fewer active requests (the first on a tie).
fn power_of_two<R: Rng + ?Sized>(c: &[&Candidate], rng: &mut R) -> usize {
    if c.len() == 1 {
        return 0;
    }
    let a = rng.random_range(0..c.len());
    let mut b = rng.random_range(0..c.len() - 1);
    if b >= a {
        b += 1;
    }
    if c[b].load.active_requests < c[a].load.active_requests {
        b
    } else {
        a
    }
}

/// Index chosen from costs at a temperature (spec §6.4).
pub fn pick_by_cost<R: Rng + ?Sized>(costs: &[f64], temperature: f64, rng: &mut R) -> usize {
    if temperature <= 0.0 || costs.len() == 1 {
        return argmin_random_ties(costs, rng);
    }
    let lo = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = hi - lo;
    if !(range.is_finite() && range > 0.0) {
        return rng.random_range(0..costs.len());
    }
    let weights: Vec<f64> = costs
        .iter()
        .map(|c| (-(c - lo) / (range * temperature)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    costs.len() - 1
}

/// Argmin with ties (within 1e-9 of the first minimum found) broken uniformly at random:
/// one pass for the minimum and its ties, one random draw, one pass to the chosen tie.
pub fn argmin_random_ties<R: Rng + ?Sized>(costs: &[f64], rng: &mut R) -> usize {
    let mut best = 0;
    let mut ties = 1u32;
    for (i, &c) in costs.iter().enumerate().skip(1) {
        let b = costs[best];
        if c < b - 1e-9 {
            best = i;
            ties = 1;
        } else if (c - b).abs() <= 1e-9 {
            ties += 1;
        }
    }
    if ties == 1 {
        return best;
    }
    let b = costs[best];
    let k = rng.random_range(0..ties);
    costs
        .iter()
        .enumerate()
        .skip(best)
        .filter(|(_, &c)| (c - b).abs() <= 1e-9)
        .nth(k as usize)
        .map_or(best, |(i, _)| i)
}
