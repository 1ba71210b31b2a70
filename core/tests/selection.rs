//! Every router mode on hand-built fleets, the cost function's worked example, temperature,
//! busy thresholds, pinning and dp_rank forcing.
use kvrouter_core::config::{
    KvRouterConfig, LoadThresholds, RouterConfig, RouterConfigOverride, RouterMode,
};
use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::index::TierOverlap;
use kvrouter_core::selection::{
    kv_cost, pick_by_cost, Candidate, DeviceType, SelectError, SelectionRequest, Selector,
    WorkerInfo,
};
use kvrouter_core::sequences::PotentialLoad;
use rand::rngs::StdRng;
use rand::SeedableRng;

const BS: usize = 16;

fn cand(id: u64, overlap: u32, decode_blocks: u64, active_requests: u32) -> Candidate {
    let worker = WorkerWithDpRank::new(id, 0);
    Candidate {
        info: WorkerInfo {
            worker,
            ..Default::default()
        },
        overlap: TierOverlap {
            device: overlap,
            ..Default::default()
        },
        load: PotentialLoad {
            worker,
            potential_decode_blocks: decode_blocks,
            active_requests,
            ..Default::default()
        },
    }
}

fn selector(mode: RouterMode) -> Selector {
    Selector::new(RouterConfig {
        mode,
        ..Default::default()
    })
}

fn req(isl: usize) -> SelectionRequest {
    SelectionRequest {
        isl,
        block_size: BS,
        ..Default::default()
    }
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn worked_example_costs_18_10_11() {
    // Spec §6.2: raw prefill 10 blocks each; (overlap, decode) = (2,10), (5,5), (8,9).
    let fleet = [cand(0, 2, 10, 0), cand(1, 5, 5, 0), cand(2, 8, 9, 0)];
    let cfg = KvRouterConfig::default();
    let costs: Vec<f64> = fleet
        .iter()
        .map(|c| kv_cost(c, 10 * BS, BS, &cfg, 0).0)
        .collect();
    assert_eq!(costs, vec![18.0, 10.0, 11.0]);
    let sel = selector(RouterMode::Kv)
        .select(&fleet, &req(10 * BS), &mut rng())
        .unwrap();
    assert_eq!(sel.worker.worker_id, 1);
    assert_eq!(sel.cost, Some(10.0));
    assert_eq!(
        (
            sel.overlap_blocks,
            sel.cached_tokens,
            sel.required_blocks,
            sel.max_overlap_blocks
        ),
        (5, 5 * BS, 10, 8)
    );
}

#[test]
fn cost_terms_prefill_scale_decode_weight_tiers_and_legacy_weight() {
    let mut c = cand(0, 4, 3, 2);
    c.load.active_prefill_tokens = 2 * BS as u64;
    c.overlap.host = 4;
    c.overlap.disk = 4;
    let mut cfg = KvRouterConfig {
        prefill_load_scale: 2.0,
        decode_active_request_weight: 0.5,
        ..Default::default()
    };
    // raw = (32 + 160)/16 = 12 blocks; credit = 4 + 0.75*4 + 0.25*4 = 8; 2*(12-8) + 3 + 0.5*2 = 12.
    assert_eq!(kv_cost(&c, 10 * BS, BS, &cfg, 0).0, 12.0);
    // Prefill tokens not tracked: active prefill ignored → raw 10 → 2*(10-8) + 4 = 8.
    cfg.router_track_prefill_tokens = false;
    assert_eq!(kv_cost(&c, 10 * BS, BS, &cfg, 0).0, 8.0);
    // Credit decay: excess prefill 2 blocks over request 10 blocks, decay 5 → factor 1/2.
    let cfg = KvRouterConfig {
        overlap_score_credit_decay: 5.0,
        host_cache_hit_weight: 0.0,
        disk_cache_hit_weight: 0.0,
        ..Default::default()
    };
    assert_eq!(kv_cost(&c, 10 * BS, BS, &cfg, 0).0, (12.0 - 2.0) + 3.0);
    // Legacy weight 0 → pure decode-load balancing.
    let cfg = KvRouterConfig {
        overlap_score_weight: Some(0.0),
        ..Default::default()
    };
    assert_eq!(kv_cost(&c, 10 * BS, BS, &cfg, 0).0, 3.0);
    // Credit can't make the prefill term negative.
    let cfg = KvRouterConfig::default();
    let big = cand(0, 100, 1, 0);
    assert_eq!(kv_cost(&big, 10 * BS, BS, &cfg, 0).0, 1.0);
}

#[test]
fn kv_mode_prefers_longest_prefix_at_equal_load_and_balances_hot_prefixes() {
    let fleet = [cand(0, 0, 0, 0), cand(1, 6, 0, 0), cand(2, 3, 0, 0)];
    assert_eq!(
        selector(RouterMode::Kv)
            .select(&fleet, &req(8 * BS), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        1
    );
    // The cached worker is loaded with 20 decode blocks: one block of overlap is worth one
    // block of decode load, so 6 blocks of overlap don't pay for 20 blocks of load.
    let fleet = [cand(0, 0, 2, 0), cand(1, 6, 20, 0)];
    assert_eq!(
        selector(RouterMode::Kv)
            .select(&fleet, &req(8 * BS), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        0
    );
}

#[test]
fn ties_are_broken_uniformly_at_random() {
    let fleet = [
        cand(0, 1, 1, 0),
        cand(1, 1, 1, 0),
        cand(2, 1, 1, 0),
        cand(3, 0, 9, 0),
    ];
    let mut s = selector(RouterMode::Kv);
    let mut r = rng();
    let mut counts = [0u32; 4];
    for _ in 0..3000 {
        counts[s
            .select(&fleet, &req(4 * BS), &mut r)
            .unwrap()
            .worker
            .worker_id as usize] += 1;
    }
    assert_eq!(counts[3], 0);
    for c in &counts[..3] {
        assert!((800..1200).contains(c), "{counts:?}");
    }
}

#[test]
fn temperature_softmax_over_normalised_costs() {
    let costs = [0.0, 5.0, 10.0];
    let mut r = rng();
    let mut counts = [0u32; 3];
    for _ in 0..20000 {
        counts[pick_by_cost(&costs, 1.0, &mut r)] += 1;
    }
    // p ∝ exp(-0), exp(-0.5), exp(-1) → 0.506, 0.307, 0.186.
    let p: Vec<f64> = counts.iter().map(|&c| c as f64 / 20000.0).collect();
    for (got, want) in p.iter().zip([0.506, 0.307, 0.186]) {
        assert!((got - want).abs() < 0.02, "{p:?}");
    }
    // Temperature 0 is argmin; equal costs at any temperature are uniform.
    assert_eq!(pick_by_cost(&costs, 0.0, &mut r), 0);
    let mut seen = [false; 3];
    for _ in 0..200 {
        seen[pick_by_cost(&[3.0, 3.0, 3.0], 0.7, &mut r)] = true;
    }
    assert_eq!(seen, [true; 3]);
    // Per-request override turns temperature on.
    let fleet = [cand(0, 0, 0, 0), cand(1, 0, 1, 0)];
    let o = RouterConfigOverride {
        router_temperature: Some(100.0),
        ..Default::default()
    };
    let mut s = selector(RouterMode::Kv);
    let picks: std::collections::HashSet<u64> = (0..200)
        .map(|_| {
            s.select(
                &fleet,
                &SelectionRequest {
                    overrides: Some(o.clone()),
                    ..req(4 * BS)
                },
                &mut r,
            )
            .unwrap()
            .worker
            .worker_id
        })
        .collect();
    assert_eq!(picks.len(), 2);
    let bad = RouterConfigOverride {
        overlap_score_credit: Some(f64::NAN),
        ..Default::default()
    };
    assert!(matches!(
        s.select(
            &fleet,
            &SelectionRequest {
                overrides: Some(bad),
                ..req(4)
            },
            &mut r
        ),
        Err(SelectError::InvalidOverride(_))
    ));
}

#[test]
fn round_robin_cycles_in_order() {
    let fleet = [cand(0, 0, 0, 5), cand(1, 9, 0, 0), cand(2, 0, 0, 0)];
    let mut s = selector(RouterMode::RoundRobin);
    let picks: Vec<u64> = (0..6)
        .map(|_| {
            s.select(&fleet, &req(16), &mut rng())
                .unwrap()
                .worker
                .worker_id
        })
        .collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn random_covers_the_fleet() {
    let fleet = [cand(0, 0, 0, 0), cand(1, 0, 0, 0), cand(2, 0, 0, 0)];
    let mut s = selector(RouterMode::Random);
    let mut r = rng();
    let mut counts = [0u32; 3];
    for _ in 0..3000 {
        counts[s.select(&fleet, &req(16), &mut r).unwrap().worker.worker_id as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (800..1200).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn least_loaded_and_power_of_two() {
    let fleet = [cand(0, 0, 0, 4), cand(1, 0, 0, 1), cand(2, 0, 0, 3)];
    assert_eq!(
        selector(RouterMode::LeastLoaded)
            .select(&fleet, &req(16), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        1
    );
    // Power of two never picks the most loaded of three (it always loses its pair).
    let mut s = selector(RouterMode::PowerOfTwo);
    let mut r = rng();
    let mut counts = [0u32; 3];
    for _ in 0..3000 {
        counts[s.select(&fleet, &req(16), &mut r).unwrap().worker.worker_id as usize] += 1;
    }
    assert_eq!(counts[0], 0, "{counts:?}");
    // Worker 1 wins both pairs it is in (2/3); worker 2 wins only against worker 0 (1/3).
    assert!(
        (1850..2150).contains(&counts[1]) && (850..1150).contains(&counts[2]),
        "{counts:?}"
    );
}

#[test]
fn device_aware_weighted_prefers_the_accelerator_group_by_ratio() {
    let mut gpu = cand(0, 0, 0, 7);
    gpu.info.device = DeviceType::Gpu;
    let mut cpu_a = cand(1, 0, 0, 1);
    cpu_a.info.device = DeviceType::Cpu;
    let mut cpu_b = cand(2, 0, 0, 0);
    cpu_b.info.device = DeviceType::Cpu;
    let mut s = selector(RouterMode::DeviceAwareWeighted);
    // GPU group: 7 / (1 * 8) = 0.875; CPU group: 1 / (2 * 1) = 0.5 → CPU, least-loaded inside.
    assert_eq!(
        s.select(&[gpu, cpu_a, cpu_b], &req(16), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        2
    );
    gpu.load.active_requests = 3; // 0.375 < 0.5 → GPU
    assert_eq!(
        s.select(&[gpu, cpu_a, cpu_b], &req(16), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        0
    );
}

#[test]
fn direct_and_pinned_workers() {
    let mut fleet = vec![cand(0, 0, 0, 0), cand(1, 0, 0, 0)];
    let mut second_rank = cand(1, 5, 0, 0);
    second_rank.info.worker.dp_rank = 1;
    second_rank.load.worker.dp_rank = 1;
    fleet.push(second_rank);
    let mut s = selector(RouterMode::Direct);
    assert_eq!(
        s.select(&fleet, &req(16), &mut rng()),
        Err(SelectError::MissingPinnedWorker)
    );
    let pin = |id, rank| SelectionRequest {
        pinned_worker: Some(id),
        dp_rank: rank,
        ..req(16)
    };
    assert_eq!(
        s.select(&fleet, &pin(0, None), &mut rng()).unwrap().worker,
        WorkerWithDpRank::new(0, 0)
    );
    assert_eq!(
        s.select(&fleet, &pin(1, Some(1)), &mut rng())
            .unwrap()
            .worker,
        WorkerWithDpRank::new(1, 1)
    );
    assert_eq!(
        s.select(&fleet, &pin(9, None), &mut rng()),
        Err(SelectError::PinnedWorkerNotFound(9))
    );
    // A pin overrides KV mode's choice too (nvext.backend_instance_id).
    let mut kv = selector(RouterMode::Kv);
    assert_eq!(
        kv.select(&fleet, &pin(0, None), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        0
    );
    // dp_rank alone: best worker among that rank.
    let only_rank1 = SelectionRequest {
        dp_rank: Some(1),
        ..req(16)
    };
    assert_eq!(
        kv.select(&fleet, &only_rank1, &mut rng()).unwrap().worker,
        WorkerWithDpRank::new(1, 1)
    );
    let rank7 = SelectionRequest {
        dp_rank: Some(7),
        ..req(16)
    };
    assert_eq!(
        kv.select(&fleet, &rank7, &mut rng()),
        Err(SelectError::NoWorkerWithRank(7))
    );
}

#[test]
fn busy_thresholds_filter_and_all_busy_is_an_error() {
    let mut a = cand(0, 8, 0, 0);
    a.load.active_prefill_tokens = 5000;
    a.info.max_num_batched_tokens = Some(8192);
    let mut b = cand(1, 0, 0, 0);
    b.load.active_decode_blocks = 95;
    b.info.total_kv_blocks = Some(100);
    let c = cand(2, 0, 50, 0);
    let cfg = |t: LoadThresholds| RouterConfig {
        mode: RouterMode::Kv,
        thresholds: t,
        ..Default::default()
    };
    let tok = Selector::new(cfg(LoadThresholds {
        active_prefill_tokens_threshold: Some(4096),
        ..Default::default()
    }))
    .select(&[a, c], &req(8 * BS), &mut rng())
    .unwrap();
    assert_eq!(
        tok.worker.worker_id, 2,
        "worker 0 is over the prefill-token threshold"
    );
    let frac = LoadThresholds {
        active_prefill_tokens_threshold_frac: Some(0.5),
        ..Default::default()
    };
    assert_eq!(
        Selector::new(cfg(frac))
            .select(&[a, c], &req(8 * BS), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        2
    );
    let dec = LoadThresholds {
        active_decode_blocks_threshold: Some(0.9),
        ..Default::default()
    };
    assert_eq!(
        Selector::new(cfg(dec))
            .select(&[b, c], &req(8 * BS), &mut rng())
            .unwrap()
            .worker
            .worker_id,
        2
    );
    let all = LoadThresholds {
        active_decode_blocks_threshold: Some(0.9),
        active_prefill_tokens_threshold: Some(10),
        ..Default::default()
    };
    assert_eq!(
        Selector::new(cfg(all)).select(&[a, b], &req(8 * BS), &mut rng()),
        Err(SelectError::AllWorkersBusy(2))
    );
    let mut s = Selector::new(cfg(all));
    assert_eq!(
        s.select(
            &[a, b],
            &SelectionRequest {
                pinned_worker: Some(0),
                ..req(16)
            },
            &mut rng()
        ),
        Err(SelectError::PinnedWorkerBusy(0))
    );
    assert_eq!(
        s.select(&[], &req(16), &mut rng()),
        Err(SelectError::NoWorkers)
    );
}
