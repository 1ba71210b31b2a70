//! The composed router: events in, decisions out, load booked and released.
use std::time::Duration;

const T0: Duration = Duration::ZERO;

use kvrouter_core::config::{KvRouterConfig, RouterConfig, RouterMode};
use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::hash::{ExternalHash, HashOptions};
use kvrouter_core::index::stored_event;
use kvrouter_core::router::{RequestHashes, RouteRequest, Router};
use kvrouter_core::selection::WorkerInfo;
use kvrouter_core::sequences::WorkerLoad;
use rand::rngs::StdRng;
use rand::SeedableRng;

const BS: usize = 16;

fn router(kv: KvRouterConfig, n: u64) -> Router {
    let mut r = Router::new(
        RouterConfig {
            mode: RouterMode::Kv,
            kv,
            ..Default::default()
        },
        BS,
    );
    for id in 0..n {
        r.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            ..Default::default()
        });
    }
    r
}

fn prompt(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| seed * 100_000 + i).collect()
}

#[test]
fn kv_mode_follows_engine_events_and_load_returns_to_zero() {
    let mut r = router(KvRouterConfig::default(), 4);
    let mut rng = StdRng::seed_from_u64(1);
    let p = prompt(1, 200);
    // Worker 2's engine reports caching the prompt's 12 full blocks.
    let h = RequestHashes::compute(&p, BS, &HashOptions::default());
    let blocks = h
        .local
        .iter()
        .enumerate()
        .map(|(i, &l)| (ExternalHash(900 + i as u64), l));
    r.apply_event(&stored_event(WorkerWithDpRank::new(2, 0), 0, None, blocks))
        .unwrap();
    let now = Duration::ZERO;
    let sel = r
        .route(
            &RouteRequest {
                request_id: Some("a"),
                tokens: &p,
                ..Default::default()
            },
            now,
            &mut rng,
        )
        .unwrap();
    assert_eq!(
        (sel.worker.worker_id, sel.overlap_blocks, sel.cached_tokens),
        (2, 12, 192)
    );
    let load = r.active().load(sel.worker, T0);
    assert_eq!(
        load,
        WorkerLoad {
            active_prefill_tokens: 8,
            active_decode_blocks: 13,
            active_requests: 1
        }
    );
    // A different prompt avoids the loaded worker.
    let q = prompt(2, 200);
    let sel2 = r
        .route(
            &RouteRequest {
                request_id: Some("b"),
                tokens: &q,
                ..Default::default()
            },
            now,
            &mut rng,
        )
        .unwrap();
    assert_ne!(sel2.worker.worker_id, 2);
    r.mark_prefill_complete("a", T0).unwrap();
    r.free("a", T0).unwrap();
    r.free("b", T0).unwrap();
    for w in r.workers().to_vec() {
        assert_eq!(r.active().load(w.worker, T0), WorkerLoad::default());
    }
    // Removing a worker drops its blocks and bookings.
    r.route(
        &RouteRequest {
            request_id: Some("c"),
            tokens: &p,
            ..Default::default()
        },
        now,
        &mut rng,
    )
    .unwrap();
    r.remove_worker(2);
    assert_eq!(r.index().current_size(), 0);
    assert!(r.free("c", T0).is_err(), "booking went with the worker");
}

#[test]
fn approximate_mode_routes_repeats_without_events() {
    let kv = KvRouterConfig {
        use_kv_events: false,
        ..Default::default()
    };
    let mut r = router(kv, 4);
    let mut rng = StdRng::seed_from_u64(2);
    let p = prompt(3, 300);
    let t0 = Duration::from_secs(10);
    let first = r
        .route(
            &RouteRequest {
                tokens: &p,
                ..Default::default()
            },
            t0,
            &mut rng,
        )
        .unwrap();
    assert_eq!(first.overlap_blocks, 0);
    for i in 1..5 {
        let s = r
            .route(
                &RouteRequest {
                    tokens: &p,
                    ..Default::default()
                },
                t0 + Duration::from_secs(i),
                &mut rng,
            )
            .unwrap();
        assert_eq!((s.worker, s.overlap_blocks), (first.worker, 18));
    }
    // After the TTL (120 s) the prediction is gone.
    let late = r
        .route(
            &RouteRequest {
                tokens: &p,
                ..Default::default()
            },
            t0 + Duration::from_secs(200),
            &mut rng,
        )
        .unwrap();
    assert_eq!(late.overlap_blocks, 0);
}

#[test]
fn predicted_index_groups_siblings_before_events_arrive() {
    let kv = KvRouterConfig {
        router_predicted_ttl_secs: Some(5.0),
        ..Default::default()
    };
    let mut r = router(kv, 8);
    let mut rng = StdRng::seed_from_u64(3);
    let p = prompt(4, 640);
    let t0 = Duration::from_secs(1);
    let ids = ["s0", "s1", "s2"];
    let first = r
        .route(
            &RouteRequest {
                request_id: Some(ids[0]),
                tokens: &p,
                ..Default::default()
            },
            t0,
            &mut rng,
        )
        .unwrap();
    // While the first is still in prefill its booked prefill tokens cancel the predicted credit
    // exactly (a tie with an idle worker). Once its first token is out — before the engine's
    // Stored events arrive — siblings see the predicted 40 blocks and follow it.
    r.mark_prefill_complete(ids[0], T0).unwrap();
    for id in &ids[1..] {
        let s = r
            .route(
                &RouteRequest {
                    request_id: Some(id),
                    tokens: &p,
                    ..Default::default()
                },
                t0,
                &mut rng,
            )
            .unwrap();
        assert_eq!((s.worker, s.overlap_blocks), (first.worker, 40));
    }
    // Past the short TTL the prediction is gone.
    let mut no_pred = router(KvRouterConfig::default(), 8);
    no_pred
        .route(
            &RouteRequest {
                tokens: &p,
                ..Default::default()
            },
            t0,
            &mut rng,
        )
        .unwrap();
    assert!(no_pred
        .overlaps(
            &RequestHashes::compute(&p, BS, &HashOptions::default()).local,
            t0
        )
        .is_empty());
    let later = r.overlaps(
        &RequestHashes::compute(&p, BS, &HashOptions::default()).local,
        t0 + Duration::from_secs(6),
    );
    assert!(later.is_empty());
}

#[test]
fn potential_loads_cover_every_worker() {
    let mut r = router(KvRouterConfig::default(), 3);
    let mut rng = StdRng::seed_from_u64(4);
    let p = prompt(5, 64);
    let s = r
        .route(
            &RouteRequest {
                request_id: Some("x"),
                tokens: &p,
                ..Default::default()
            },
            Duration::ZERO,
            &mut rng,
        )
        .unwrap();
    let loads = r.potential_loads(&p, &HashOptions::default(), T0);
    assert_eq!(loads.len(), 3);
    for l in loads {
        if l.worker == s.worker {
            // Blocks already active there count once.
            assert_eq!(
                (
                    l.potential_decode_blocks,
                    l.potential_prefill_tokens,
                    l.active_requests
                ),
                (4, 128, 1)
            );
        } else {
            assert_eq!(
                (
                    l.potential_decode_blocks,
                    l.potential_prefill_tokens,
                    l.active_requests
                ),
                (4, 64, 0)
            );
        }
    }
}

fn route(r: &mut Router, id: &str, p: &[u32], now: Duration) -> WorkerWithDpRank {
    r.route(
        &RouteRequest {
            request_id: Some(id),
            tokens: p,
            ..Default::default()
        },
        now,
        &mut StdRng::seed_from_u64(7),
    )
    .unwrap()
    .worker
}

#[test]
fn the_aic_model_lets_a_prefill_past_its_predicted_time_stop_counting() {
    use kvrouter_core::prefill_time::{PrefillCoefficients, PrefillLoadModel};
    let ms = Duration::from_millis;
    // 1 ms per token: a 1,600-token prefill is predicted to take 1.6 s.
    let coeffs = PrefillCoefficients {
        base_ms: 0.0,
        per_token_ms: 1.0,
        per_token2_ms: 0.0,
    };
    for (model, want) in [(PrefillLoadModel::None, 1), (PrefillLoadModel::Aic, 0)] {
        let mut r = router(
            KvRouterConfig {
                router_prefill_load_model: model,
                router_prefill_time_coefficients: Some(coeffs),
                // Prefill dominates the cost (the long request's decode blocks stay booked).
                prefill_load_scale: 10.0,
                ..Default::default()
            },
            2,
        );
        // Worker 0 takes a long prefill at t=0; at t=1.5 s worker 1 takes a short one.
        let w0 = route(&mut r, "long", &prompt(1, 1600), T0);
        let w1 = route(&mut r, "short", &prompt(2, 400), ms(1500));
        assert_ne!(w0, w1);
        let load = |r: &Router, w, t| r.active().load(w, t).active_prefill_tokens;
        // Without the model the long prefill weighs 1,600 tokens until its first token; with
        // it, 1,600 × (1 − 1.5/1.6) = 100 at 1.5 s and nothing from 1.6 s.
        match model {
            PrefillLoadModel::None => assert_eq!(load(&r, w0, ms(1700)), 1600),
            PrefillLoadModel::Aic => {
                assert_eq!(load(&r, w0, ms(1500)), 100);
                assert_eq!(load(&r, w0, ms(1700)), 0);
            }
        }
        // At 1.7 s a third request goes to the worker the model says is free.
        let w = route(&mut r, "next", &prompt(3, 400), ms(1700));
        assert_eq!(w.worker_id, [w0, w1][want].worker_id, "{model}");
    }
}

#[test]
fn admits_is_false_only_while_every_worker_is_past_the_queue_threshold() {
    let mut r = router(
        KvRouterConfig {
            router_queue_threshold: Some(0.5),
            ..Default::default()
        },
        2,
    );
    for id in 0..2 {
        r.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            max_num_batched_tokens: Some(1000),
            ..Default::default()
        });
    }
    assert!(r.admits(T0), "an idle fleet admits");
    route(&mut r, "a", &prompt(1, 600), T0);
    assert!(r.admits(T0), "one worker still at 0 tokens");
    route(&mut r, "b", &prompt(2, 400), T0);
    assert!(r.admits(T0), "400 ≤ 0.5 × 1000 on one worker");
    route(&mut r, "c", &prompt(3, 400), T0);
    assert!(!r.admits(T0), "600 and 800 both past 500");
    r.mark_prefill_complete("a", T0).unwrap();
    assert!(r.admits(T0), "a's first token frees its worker");
    let unlimited = router(KvRouterConfig::default(), 0);
    assert!(unlimited.admits(T0), "no threshold: never queue");
}

#[test]
fn a_request_only_some_workers_may_take_waits_for_room_on_them() {
    let mut r = router(
        KvRouterConfig {
            router_queue_threshold: Some(0.5),
            ..Default::default()
        },
        2,
    );
    for id in 0..2 {
        r.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            max_num_batched_tokens: Some(1000),
            ..Default::default()
        });
    }
    let busy = route(&mut r, "a", &prompt(1, 800), T0);
    let idle = 1 - busy.worker_id;
    assert!(r.admits(T0), "the other worker is idle");
    assert!(r.admits_among(&[idle], T0), "its own worker is idle");
    assert!(
        !r.admits_among(&[busy.worker_id], T0),
        "an idle worker it may not take (another adapter's) does not admit it"
    );
    r.mark_prefill_complete("a", T0).unwrap();
    assert!(r.admits_among(&[busy.worker_id], T0));
}

#[test]
fn without_coefficients_the_aic_model_learns_from_first_tokens() {
    use kvrouter_core::prefill_time::{PrefillLoadModel, MIN_SAMPLES};
    let mut r = router(
        KvRouterConfig {
            router_prefill_load_model: PrefillLoadModel::Aic,
            ..Default::default()
        },
        1,
    );
    let mut t = T0;
    for i in 0..MIN_SAMPLES {
        let id = format!("r{i}");
        let len = 160 * (i + 1);
        route(&mut r, &id, &prompt(i, len), t);
        assert!(r.prefill_coefficients().is_none(), "still learning");
        // Observed: 2 ms per token, each request alone on the worker.
        t += Duration::from_millis(2 * u64::from(len));
        r.mark_prefill_complete(&id, t).unwrap();
        r.free(&id, t).unwrap();
    }
    let c = r.prefill_coefficients().expect("fitted after MIN_SAMPLES");
    let predicted = c.prefill_ms(1000, None);
    assert!((predicted - 2000.0).abs() < 1.0, "{c:?} → {predicted}");
}

/// A fleet with state everywhere a query could leave a trace: engine events in the exact
/// index, booked requests, routed prompts in the approximate or predicted index (TTL 1 s).
fn busy_router(mode: RouterMode, use_kv_events: bool) -> Router {
    let kv = KvRouterConfig {
        use_kv_events,
        router_ttl_secs: 1.0,
        router_predicted_ttl_secs: use_kv_events.then_some(1.0),
        ..Default::default()
    };
    let mut r = Router::new(
        RouterConfig {
            mode,
            kv,
            ..Default::default()
        },
        BS,
    );
    for id in 0..4 {
        r.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(id, 0),
            ..Default::default()
        });
    }
    let cached = RequestHashes::compute(&prompt(1, 160), BS, &HashOptions::default());
    let blocks = cached
        .local
        .iter()
        .enumerate()
        .map(|(i, &l)| (ExternalHash(500 + i as u64), l));
    r.apply_event(&stored_event(WorkerWithDpRank::new(3, 0), 0, None, blocks))
        .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        let p = prompt(10 + i as u32, 100 + 40 * i as u32);
        r.route(
            &RouteRequest {
                request_id: Some(id),
                tokens: &p,
                ..Default::default()
            },
            Duration::from_millis(100 * i as u64),
            &mut rng,
        )
        .unwrap();
    }
    r
}

#[test]
fn a_thousand_queries_leave_loads_indexes_and_the_cursor_unchanged() {
    for (mode, events) in [
        (RouterMode::Kv, true),
        (RouterMode::Kv, false),
        (RouterMode::RoundRobin, true),
    ] {
        let r = busy_router(mode, events);
        let state = |r: &Router| (format!("{r:?}"), r.index().dump_events());
        let before = state(&r);
        let mut rng = StdRng::seed_from_u64(3);
        for i in 0..1000u32 {
            // Cached, routed and unknown prompts, before and after the approximate and
            // predicted blocks' TTL (a lookup that expires them would change the indexes).
            let p = match i % 4 {
                0 => prompt(1, 160),
                1 => prompt(10 + i % 3, 100 + 40 * (i % 3)),
                2 => prompt(1000 + i, 64),
                _ => prompt(11, 20),
            };
            let now = Duration::from_millis(u64::from(i) * 3);
            let sel = r
                .peek(
                    &RouteRequest {
                        request_id: Some("ignored"),
                        tokens: &p,
                        ..Default::default()
                    },
                    now,
                    &mut rng,
                )
                .unwrap();
            assert!(sel.worker.worker_id < 4);
        }
        assert!(
            before == state(&r),
            "{mode} events={events}: a query changed state"
        );
        assert_eq!(r.active().num_active(), 3);
    }
}

#[test]
fn a_query_chooses_what_routing_would() {
    for (mode, events) in [
        (RouterMode::Kv, true),
        (RouterMode::Kv, false),
        (RouterMode::RoundRobin, true),
    ] {
        let mut r = busy_router(mode, events);
        for (i, now_ms) in [(0u32, 350u64), (1, 900), (2, 2500)] {
            let p = match i {
                0 => prompt(1, 160),
                1 => prompt(10, 100),
                _ => prompt(12, 180),
            };
            let req = RouteRequest {
                tokens: &p,
                ..Default::default()
            };
            let now = Duration::from_millis(now_ms);
            let peeked = r.peek(&req, now, &mut StdRng::seed_from_u64(9)).unwrap();
            let again = r.peek(&req, now, &mut StdRng::seed_from_u64(9)).unwrap();
            assert_eq!(peeked, again, "a second query answers the same");
            let routed = r.route(&req, now, &mut StdRng::seed_from_u64(9)).unwrap();
            assert_eq!(peeked, routed, "{mode} events={events} at {now_ms} ms");
        }
    }
    // A routed prompt is predicted cached until its TTL, then no more, for queries as for
    // routing (nothing booked here, so the holder wins on its credit).
    for events in [true, false] {
        let mut r = router(
            KvRouterConfig {
                use_kv_events: events,
                router_ttl_secs: 1.0,
                router_predicted_ttl_secs: events.then_some(1.0),
                ..Default::default()
            },
            4,
        );
        let p = prompt(10, 100);
        let req = RouteRequest {
            tokens: &p,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let first = r.route(&req, T0, &mut rng).unwrap().worker;
        let at = |ms: u64| {
            r.peek(
                &req,
                Duration::from_millis(ms),
                &mut StdRng::seed_from_u64(1),
            )
        };
        let held = at(500).unwrap();
        assert_eq!(
            (held.worker, held.overlap_blocks),
            (first, 6),
            "6 full blocks"
        );
        assert_eq!(at(1000).unwrap().overlap_blocks, 0, "expired at its TTL");
    }
}

#[test]
fn a_remote_booking_books_what_the_schedule_booked() {
    // Replica sync: router B applies router A's booking (rank, hashes, isl, cached tokens,
    // options, predicted prefill) and must carry the same load and predicted blocks.
    use kvrouter_core::prefill_time::{PrefillCoefficients, PrefillLoadModel};
    use kvrouter_core::router::{BookingRecord, ScheduleRequest, Scheduler};
    let kv = KvRouterConfig {
        router_prefill_load_model: PrefillLoadModel::Aic,
        router_prefill_time_coefficients: Some(PrefillCoefficients {
            base_ms: 0.0,
            per_token_ms: 1.0,
            per_token2_ms: 0.0,
        }),
        router_predicted_ttl_secs: Some(60.0),
        router_assume_kv_reuse: false,
        ..Default::default()
    };
    let sched = || {
        let mut s = Scheduler::new(
            RouterConfig {
                mode: RouterMode::Kv,
                kv: kv.clone(),
                ..Default::default()
            },
            BS,
        );
        for id in 0..3 {
            s.add_worker(WorkerInfo {
                worker: WorkerWithDpRank::new(id, 0),
                ..Default::default()
            });
        }
        s
    };
    let (mut a, mut b) = (sched(), sched());
    let p = prompt(7, 300);
    let hashes = RequestHashes::compute(&p, BS, &HashOptions::default());
    let req = ScheduleRequest {
        request_id: Some("r1"),
        isl: p.len(),
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let (sel, terms) = a
        .schedule_booking(&req, &hashes, Vec::new(), T0, &mut rng)
        .unwrap();
    let terms = terms.expect("booked under an id");
    assert_eq!(terms.predicted_prefill, Some(Duration::from_millis(300)));
    assert!(!terms.opts.assume_kv_reuse);
    let rec = BookingRecord {
        worker: sel.worker,
        hashes: hashes.clone(),
        isl: p.len(),
        cached_tokens: sel.cached_tokens,
        terms,
    };
    b.book_remote("peer:a:r1", &rec, T0).unwrap();
    assert!(b.book_remote("peer:a:r1", &rec, T0).is_err(), "duplicate");
    for t in [T0, Duration::from_millis(150), Duration::from_millis(400)] {
        assert_eq!(
            a.active().load(sel.worker, t),
            b.active().load(sel.worker, t),
            "at {t:?}"
        );
    }
    assert_ne!(b.active().load(sel.worker, T0), WorkerLoad::default());
    // The predicted index saw the prompt on the same rank.
    let now = Duration::from_millis(1);
    assert_eq!(
        a.overlaps(&hashes.local, Vec::new(), now),
        b.overlaps(&hashes.local, Vec::new(), now)
    );
    assert!(!b.overlaps(&hashes.local, Vec::new(), now).is_empty());
    b.mark_prefill_complete("peer:a:r1", now).unwrap();
    b.free("peer:a:r1", now).unwrap();
    assert_eq!(b.active().load(sel.worker, now), WorkerLoad::default());
}

/// Candidates are built for the ranks of the pool only, each with its own overlap and load
/// (ranks with neither are idle), whatever the registration order and after a rank leaves.
#[test]
fn a_role_pool_sees_each_ranks_own_overlap_and_load() {
    use kvrouter_core::index::TierOverlap;
    use kvrouter_core::selection::{RolePool, WorkerRole};
    use kvrouter_core::{ScheduleRequest, Scheduler};

    let mut s = Scheduler::new(
        RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        },
        BS,
    );
    let rank = |id| WorkerWithDpRank::new(id, 0);
    for (id, role) in [
        (1, WorkerRole::Decode),
        (2, WorkerRole::Prefill),
        (3, WorkerRole::Both),
        (4, WorkerRole::Prefill),
        (5, WorkerRole::Prefill),
    ] {
        s.add_worker(WorkerInfo {
            worker: rank(id),
            role,
            ..Default::default()
        });
    }
    s.remove_worker(2);
    let p = prompt(7, 128);
    let h = RequestHashes::compute(&p, BS, &HashOptions::default());
    let mut rng = StdRng::seed_from_u64(1);
    let book = |s: &mut Scheduler, id: &str, w: u64, exact: Vec<_>| {
        let req = ScheduleRequest {
            request_id: Some(id),
            isl: p.len(),
            pinned_worker: Some(w),
            pool: RolePool::Any,
            ..Default::default()
        };
        s.schedule(&req, &h, exact, T0, &mut StdRng::seed_from_u64(2))
            .unwrap()
    };
    // Load on prefill rank 4: two bookings of the prompt.
    book(&mut s, "a", 4, Vec::new());
    book(&mut s, "b", 4, Vec::new());
    let overlap = |d| TierOverlap {
        device: d,
        ..Default::default()
    };
    // The decode rank holds the whole prompt, prefill rank 4 half of it: among prefill ranks
    // 4 has the overlap but two prefills queued, 5 nothing and no load.
    let exact = vec![(rank(1), overlap(8)), (rank(4), overlap(4))];
    let req = ScheduleRequest {
        isl: p.len(),
        pool: RolePool::Only(WorkerRole::Prefill),
        ..Default::default()
    };
    let sel = s.schedule(&req, &h, exact.clone(), T0, &mut rng).unwrap();
    assert_eq!(sel.worker, rank(5));
    assert_eq!(
        sel.max_overlap_blocks, 4,
        "rank 1's overlap is not in the pool"
    );
    // Without the load, rank 4's overlap wins.
    s.free("a", T0).unwrap();
    s.free("b", T0).unwrap();
    let sel = s.schedule(&req, &h, exact.clone(), T0, &mut rng).unwrap();
    assert_eq!((sel.worker, sel.overlap_blocks), (rank(4), 4));
    // The aggregated pool (decode and both) takes the decode rank's overlap.
    let req = ScheduleRequest {
        pool: RolePool::Aggregated,
        ..req
    };
    let sel = s.schedule(&req, &h, exact, T0, &mut rng).unwrap();
    assert_eq!((sel.worker, sel.overlap_blocks), (rank(1), 8));
}

/// A request naming its workers (those serving its LoRA adapter) is routed among their ranks
/// only, however much another worker holds; with none of them registered there is no worker.
#[test]
fn a_worker_filter_keeps_the_choice_among_its_workers() {
    use kvrouter_core::index::TierOverlap;
    use kvrouter_core::selection::SelectError;
    use kvrouter_core::{RouteError, ScheduleRequest, Scheduler};

    let mut s = Scheduler::new(
        RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        },
        BS,
    );
    for (id, rank) in [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1)] {
        s.add_worker(WorkerInfo {
            worker: WorkerWithDpRank::new(id, rank),
            ..Default::default()
        });
    }
    let p = prompt(9, 128);
    let h = RequestHashes::compute(&p, BS, &HashOptions::default());
    let mut rng = StdRng::seed_from_u64(3);
    let full = TierOverlap {
        device: 8,
        ..Default::default()
    };
    let some = TierOverlap {
        device: 2,
        ..Default::default()
    };
    // Worker 2 holds the whole prompt, rank 1 of worker 3 a quarter of it.
    let exact = vec![
        (WorkerWithDpRank::new(2, 0), full),
        (WorkerWithDpRank::new(3, 1), some),
    ];
    let serving = [1, 3];
    let req = ScheduleRequest {
        isl: p.len(),
        workers: Some(&serving),
        ..Default::default()
    };
    for _ in 0..20 {
        let sel = s.schedule(&req, &h, exact.clone(), T0, &mut rng).unwrap();
        assert_eq!(
            (sel.worker, sel.overlap_blocks),
            (WorkerWithDpRank::new(3, 1), 2)
        );
    }
    let unfiltered = ScheduleRequest {
        workers: None,
        ..req
    };
    let sel = s
        .schedule(&unfiltered, &h, exact.clone(), T0, &mut rng)
        .unwrap();
    assert_eq!(sel.worker, WorkerWithDpRank::new(2, 0));
    let nobody = ScheduleRequest {
        workers: Some(&[7]),
        ..req
    };
    assert_eq!(
        s.schedule(&nobody, &h, exact, T0, &mut rng).unwrap_err(),
        RouteError::Select(SelectError::NoWorkers)
    );
}
