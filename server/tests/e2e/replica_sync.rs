//! Replica sync (issue 18 item 3) with a real nats-server: frontends with
//! `--router-replica-sync` over the same mock workers see each other's bookings, free them
//! when the booking replica frees them or dies, keep routing while NATS is away, and ignore
//! what a hostile publisher puts on the subject.

use std::time::Duration;

use futures::StreamExt;
use kvrouter_core::sequences::WorkerLoad;
use kvrouter_core::{RouterMode, WorkerWithDpRank};
use kvrouter_mocker::{DisaggregationMode, RunningWorker};
use kvrouter_server::config::FrontendConfig;
use kvrouter_server::replicas::Names;
use kvrouter_server::routing::RouteInput;
use kvrouter_server::up::worker_spec;
use kvrouter_server::workers::spec::DEFAULT_ENDPOINT;
use kvrouter_server::Frontend;

use crate::common::*;
use crate::nats_server::NatsServer;

/// A frontend replica `id` over `workers`, syncing through `nats`; peers silent for
/// `timeout` seconds are expired.
async fn replica(id: &str, nats: &NatsServer, workers: &[RunningWorker], timeout: f64) -> Frontend {
    let mut cfg = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    cfg.fleet.health_interval_ms = 100;
    let r = &mut cfg.fleet.replicas;
    r.router_replica_sync = true;
    r.nats_server = nats.url();
    r.router_id = Some(id.into());
    r.router_replica_timeout_secs = timeout;
    Frontend::start(cfg, workers.iter().map(worker_spec).collect())
        .await
        .expect("replica starts")
}

fn ranks(workers: &[RunningWorker]) -> Vec<WorkerWithDpRank> {
    (0..workers.len() as u64)
        .map(|i| WorkerWithDpRank::new(i, 0))
        .collect()
}

fn loads(f: &Frontend, workers: &[RunningWorker]) -> Vec<WorkerLoad> {
    f.fleet.router.loads(ranks(workers))
}

async fn sync_metric(c: &reqwest::Client, f: &Frontend, name: &str) -> f64 {
    metric(&metrics_text(c, &f.url()).await, name)
}

/// Wait until every replica has heard from all the others.
async fn until_peers(c: &reqwest::Client, replicas: &[&Frontend]) {
    for f in replicas {
        let want = (replicas.len() - 1) as f64;
        let mut ok = false;
        for _ in 0..500 {
            if sync_metric(c, f, "kvrouter_replica_sync_peers").await == want {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "replica {} never saw its {want} peers", f.url());
    }
}

/// A nats-server, two mock workers, and replicas `a` and `b` over them that have heard each
/// other (peers expired after `timeout` seconds).
struct Pair {
    nats: NatsServer,
    workers: Vec<RunningWorker>,
    a: Frontend,
    b: Frontend,
    c: reqwest::Client,
}

async fn pair(timeout: f64) -> Pair {
    let nats = NatsServer::start();
    let workers = mock_workers(2, DisaggregationMode::Agg).await;
    let a = replica("a", &nats, &workers, timeout).await;
    let b = replica("b", &nats, &workers, timeout).await;
    let c = client();
    until_peers(&c, &[&a, &b]).await;
    Pair {
        nats,
        workers,
        a,
        b,
        c,
    }
}

fn input(tokens: &[u32]) -> RouteInput<'_> {
    RouteInput {
        tokens,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_replica_s_bookings_show_in_the_others_load_until_it_frees_them() {
    let Pair {
        nats: _nats,
        workers,
        a,
        b,
        c,
    } = pair(3.0).await;

    // A routed request in flight on A: B carries exactly the same load.
    let p = prompt(1, 300);
    let mut booking = a.fleet.router.try_route(&input(&p)).unwrap();
    assert!(
        eventually(5.0, || loads(&b, &workers) == loads(&a, &workers)).await,
        "B {:?} != A {:?}",
        loads(&b, &workers),
        loads(&a, &workers)
    );
    let w = booking.worker().worker_id as usize;
    assert_eq!(loads(&b, &workers)[w].active_requests, 1);
    assert_eq!(loads(&b, &workers)[w].active_prefill_tokens, 300);
    // B now sends a same-sized request elsewhere (load-aware, no herding).
    let mut on_b = b.fleet.router.try_route(&input(&prompt(2, 300))).unwrap();
    assert_ne!(on_b.worker(), booking.worker(), "B herded onto A's worker");
    assert!(eventually(5.0, || loads(&b, &workers) == loads(&a, &workers)).await);
    booking.first_token();
    assert!(eventually(5.0, || loads(&b, &workers)[w].active_prefill_tokens == 0).await);
    drop(booking);
    on_b.first_token();
    drop(on_b);
    assert!(eventually(5.0, || fleet_idle(&b.fleet) && fleet_idle(&a.fleet)).await);

    // An external booking (the standalone router's `best_worker_id` with a request id).
    let sel = a.fleet.router.book_external(&input(&p), "ext-1").unwrap();
    let r = sel.worker.worker_id as usize;
    assert!(eventually(5.0, || loads(&b, &workers)[r].active_requests == 1).await);
    a.fleet.router.free_external("ext-1").unwrap();
    assert!(eventually(5.0, || fleet_idle(&b.fleet)).await);

    // Requests through the HTTP API of both replicas: everything freed everywhere.
    for i in 0..10 {
        let f = if i % 2 == 0 { &a } else { &b };
        let (st, _, _) = complete(&c, &f.url(), completion_body(&prompt(10 + i, 200), 4)).await;
        assert_eq!(st, 200);
    }
    assert!(eventually(5.0, || fleet_idle(&b.fleet) && fleet_idle(&a.fleet)).await);
    let sent = sync_metric(&c, &a, "kvrouter_replica_sync_ops_sent_total").await;
    assert!(sent >= 5.0 + 5.0 * 2.0, "A sent {sent}");
    let mut received = 0.0;
    for _ in 0..500 {
        received = sync_metric(&c, &b, "kvrouter_replica_sync_ops_received_total").await;
        if received >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(received, sent, "B received {received} of A's {sent}");
    assert_eq!(
        sync_metric(&c, &b, "kvrouter_replica_sync_ops_ignored_total").await,
        0.0
    );
    assert_eq!(
        sync_metric(&c, &b, "kvrouter_replica_sync_remote_bookings").await,
        0.0
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_killed_replica_s_bookings_are_expired_by_the_others() {
    let timeout = 2.0;
    let Pair {
        nats,
        workers,
        a,
        b,
        c,
    } = pair(timeout).await;
    for i in 0..3 {
        // Never freed: A dies with them in flight.
        std::mem::forget(a.fleet.router.try_route(&input(&prompt(i, 300))).unwrap());
    }
    a.fleet
        .router
        .book_external(&input(&prompt(9, 300)), "ext")
        .unwrap();
    let booked = |f: &Frontend| {
        loads(f, &workers)
            .iter()
            .map(|l| l.active_requests)
            .sum::<u32>()
    };
    assert!(eventually(5.0, || booked(&b) == 4).await);
    let killed = std::time::Instant::now();
    a.stop().await; // its sync task is aborted: no free, no heartbeat
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(booked(&b), 4, "expired before the timeout");
    assert!(
        eventually(timeout + 3.0, || booked(&b) == 0).await,
        "A's bookings still on B"
    );
    assert!(killed.elapsed() >= Duration::from_secs_f64(timeout * 0.5));
    assert!(fleet_idle(&b.fleet));
    assert_eq!(
        sync_metric(&c, &b, "kvrouter_replica_sync_peer_bookings_expired_total").await,
        4.0
    );
    assert_eq!(
        sync_metric(&c, &b, "kvrouter_replica_sync_peers").await,
        0.0
    );

    // A comes back under the same id: it starts clean.
    let a2 = replica("a", &nats, &workers, timeout).await;
    until_peers(&c, &[&a2, &b]).await;
    let bk = a2.fleet.router.try_route(&input(&prompt(20, 300))).unwrap();
    assert!(eventually(5.0, || booked(&b) == 1).await);
    drop(bk);
    assert!(eventually(5.0, || booked(&b) == 0).await);
    a2.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn routing_goes_on_without_nats_and_sync_resumes_when_it_returns() {
    let timeout = 1.5;
    let Pair {
        mut nats,
        workers,
        a,
        b,
        c,
    } = pair(timeout).await;
    let before = a.fleet.router.try_route(&input(&prompt(1, 300))).unwrap();
    let w = before.worker().worker_id as usize;
    assert!(eventually(5.0, || loads(&b, &workers)[w].active_requests == 1).await);

    nats.kill();
    // Partitioned: both keep routing on their own view, never failing, never waiting; B
    // expires A's booking after the timeout.
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs_f64(timeout + 1.0) {
        for f in [&a, &b] {
            let t = std::time::Instant::now();
            let (st, _, _) =
                complete(&c, &f.url(), completion_body(&prompt(100 + i, 200), 2)).await;
            assert_eq!(st, 200, "a request failed while NATS was down");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "a request waited on NATS"
            );
            i += 1;
        }
    }
    assert!(
        eventually(3.0, || loads(&b, &workers)[w].active_requests == 0).await,
        "B kept the booking of a replica it cannot hear"
    );

    nats.restart();
    until_peers(&c, &[&a, &b]).await;
    // Sync resumed: a new booking shows on B; the one of before the partition does not
    // come back.
    let after = a.fleet.router.try_route(&input(&prompt(2, 300))).unwrap();
    let booked_on_b = || {
        loads(&b, &workers)
            .iter()
            .map(|l| l.active_requests)
            .sum::<u32>()
    };
    let aw = after.worker().worker_id as usize;
    assert!(
        eventually(5.0, || booked_on_b() == 1
            && loads(&b, &workers)[aw].active_requests == 1)
        .await,
        "sync did not resume: {:?}",
        loads(&b, &workers)
    );
    drop(before);
    drop(after);
    assert!(eventually(5.0, || fleet_idle(&b.fleet) && fleet_idle(&a.fleet)).await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn hostile_messages_on_the_subject_are_counted_and_change_nothing() {
    let nats = NatsServer::start();
    let workers = mock_workers(2, DisaggregationMode::Agg).await;
    let b = replica("b", &nats, &workers, 3.0).await;
    let c = client();
    let evil = async_nats::connect(nats.url()).await.unwrap();
    let subject = Names::for_endpoint(DEFAULT_ENDPOINT).sync_subject();
    // B subscribes before it publishes: once its heartbeat is heard, it listens.
    let mut heard = evil.subscribe(subject.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), heard.next())
        .await
        .expect("B's heartbeat");
    let add = |id: &str, worker: u64, bs: u64, isl: u64| {
        format!(
            r#"{{"request_id":"{id}","worker":{{"worker_id":{worker},"dp_rank":0}},"data":{{"AddRequest":{{"token_sequence":[1,2],"local_hashes":[3,4],"isl":{isl},"cached_tokens":0,"block_size":{bs},"track_active_blocks":true,"assume_kv_reuse":true,"track_prefill_tokens":true}}}}}}"#
        )
    };
    let batch = |seq: u64, events: &[String]| {
        format!(
            r#"{{"router_id":"evil","epoch":1,"seq":{seq},"events":[{}]}}"#,
            events.join(",")
        )
    };
    let messages = [
        "not json".to_string(),
        r#"{"router_id":"evil"}"#.into(),
        r#"{"router_id":"ev:il","epoch":1,"seq":0,"events":[]}"#.into(),
        batch(
            0,
            &[r#"{"request_id":"r1","worker":{"worker_id":0},"data":"Explode"}"#.into()],
        ),
        batch(
            1,
            &[
                add("r1", 77, 64, 130),    // unknown worker
                add("r2", 0, 16, 130),     // another block size
                add("r3", 0, 64, 60),      // two hashes for one block: invalid
                add("r4", 0, 64, 1 << 40), // absurd prompt
                r#"{"request_id":"r1","worker":{"worker_id":0},"data":"Free"}"#.into(),
                r#"{"request_id":"r2","worker":{"worker_id":0},"data":"MarkPrefillCompleted"}"#
                    .into(),
            ],
        ),
    ];
    for m in messages {
        evil.publish(subject.clone(), m.into()).await.unwrap();
    }
    evil.flush().await.unwrap();
    let text = || async { metrics_text(&c, &b.url()).await };
    let mut ok = false;
    for _ in 0..500 {
        if metric(&text().await, "kvrouter_replica_sync_ops_ignored_total") >= 10.0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = text().await;
    assert!(ok, "not all counted:\n{t}");
    for (reason, n) in [
        ("malformed", 4.0),
        ("unknown_worker", 1.0),
        ("block_size", 1.0),
        ("invalid", 2.0),
        ("unknown_request", 2.0),
    ] {
        let line = format!("kvrouter_replica_sync_ops_ignored_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&t, &line), n, "{reason}:\n{t}");
    }
    assert!(fleet_idle(&b.fleet), "a hostile message booked load");
    assert_eq!(metric(&t, "kvrouter_replica_sync_remote_bookings"), 0.0);
    // Still routing.
    let (st, _, _) = complete(&c, &b.url(), completion_body(&prompt(1, 200), 2)).await;
    assert_eq!(st, 200);
    b.stop().await;
}

#[tokio::test]
async fn standalone_router_replicas_share_external_bookings() {
    // `kvrouter router --router-replica-sync`: a `best_worker_id` booked on one replica counts
    // in the other's `get_potential_loads` until `free`.
    use kvrouter_server::router_service::{RouterService, RouterServiceConfig};
    use serde_json::{json, Value};
    let nats = NatsServer::start();
    let workers = mock_workers(2, DisaggregationMode::Agg).await;
    let mut replicas = Vec::new();
    for id in ["ra", "rb"] {
        let mut cfg = RouterServiceConfig::new(DEFAULT_ENDPOINT, 64);
        cfg.http_port = 0;
        cfg.fleet.admin_port = 0;
        cfg.fleet.health_interval_ms = 100;
        let r = &mut cfg.fleet.replicas;
        r.router_replica_sync = true;
        r.nats_server = nats.url();
        r.router_id = Some(id.into());
        replicas.push(
            RouterService::start(cfg, workers.iter().map(worker_spec).collect())
                .await
                .expect("router replica starts"),
        );
    }
    let c = client();
    let active = |loads: &Value| -> u64 {
        loads
            .as_array()
            .expect("loads")
            .iter()
            .map(|l| l["active_requests"].as_u64().unwrap_or(0))
            .sum()
    };
    let p = prompt(5, 640);
    // Both replicas subscribed before the booking (sync is fire-and-forget).
    for r in &replicas {
        let mut peers = 0.0;
        for _ in 0..500 {
            peers = metric(
                &metrics_text(&c, &r.url()).await,
                "kvrouter_replica_sync_peers",
            );
            if peers == 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(peers, 1.0, "replica {} never saw its peer", r.url());
    }
    let a = replicas[0].url();
    router_call(
        &c,
        &a,
        "best_worker_id",
        json!({"token_ids": p, "request_id": "req-1"}),
    )
    .await;
    let seen = |want: u64| {
        let (c, b, p) = (c.clone(), replicas[1].url(), p.clone());
        async move {
            for _ in 0..500 {
                let l = router_call(&c, &b, "get_potential_loads", json!({ "token_ids": p })).await;
                if active(&l) == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    assert!(seen(1).await, "replica b never counted a's booking");
    router_call(&c, &a, "free", json!({"request_id": "req-1"})).await;
    assert!(seen(0).await, "replica b kept a's freed booking");
    for r in replicas {
        r.stop().await;
    }
    for w in workers {
        w.stop().await;
    }
}

/// A `kvrouter router` call that must succeed; its JSON answer.
async fn router_call(
    c: &reqwest::Client,
    base: &str,
    method: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let resp = c
        .post(format!("{base}/v1/router/{method}"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert!(resp.status().is_success(), "{method}: {}", resp.status());
    resp.json().await.expect("json")
}
