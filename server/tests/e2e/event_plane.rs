//! The NATS event plane with a real nats-server (issue 18 items 1, 2, 6 and its faults):
//! mock workers publish KV events on ZMQ, an in-process relay publishes them to the
//! endpoint's JetStream stream, router replicas (`--event-plane nats`) consume it.
//! Indexes are compared as sets of (rank, tier, parent, block) edges, which do not depend
//! on how a dump splits its events.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::event::{KvCacheEventData, RouterEvent, WorkerWithDpRank};
use kvrouter_core::RouterMode;
use kvrouter_mocker::{DisaggregationMode, RunningWorker};
use kvrouter_server::config::FrontendConfig;
use kvrouter_server::replicas::relay::{Relay, RelayOptions};
use kvrouter_server::replicas::relay_status::StatusServer;
use kvrouter_server::replicas::snapshot;
use kvrouter_server::replicas::{EventPlane, Names};
use kvrouter_server::router_service::{Router, RouterServiceConfig};
use kvrouter_server::routing::RouteInput;
use kvrouter_server::up::worker_spec;
use kvrouter_server::workers::fleet::Fleet;
use kvrouter_server::{Frontend, WorkerSpec};

use crate::common::*;
use crate::nats_server::NatsServer;

const ENDPOINT: &str = kvrouter_server::workers::spec::DEFAULT_ENDPOINT;

/// `n` mock workers with explicit ids 1..=n (relays and routers must agree on them).
async fn workers(n: usize) -> (Vec<RunningWorker>, Vec<WorkerSpec>) {
    let ws = mock_workers(n, DisaggregationMode::Agg).await;
    let specs = ws
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut s = worker_spec(w);
            s.id = Some(i as u64 + 1);
            s
        })
        .collect();
    (ws, specs)
}

async fn relay(nats: &NatsServer, specs: &[WorkerSpec]) -> Relay {
    relay_buffering(nats, specs, RelayOptions::default().buffer_events).await
}

async fn relay_buffering(nats: &NatsServer, specs: &[WorkerSpec], buffer_events: usize) -> Relay {
    Relay::start(
        RelayOptions {
            nats_server: nats.url(),
            endpoint: ENDPOINT.into(),
            buffer_events,
            ..Default::default()
        },
        specs.to_vec(),
    )
    .await
    .expect("relay starts")
}

/// A standalone router replica `id` on the NATS event plane.
async fn replica(
    nats: &NatsServer,
    id: &str,
    specs: &[WorkerSpec],
    tweak: impl FnOnce(&mut RouterServiceConfig),
) -> Arc<Router> {
    let mut cfg = RouterServiceConfig::new(ENDPOINT, 64);
    cfg.fleet.health_interval_ms = 100;
    let r = &mut cfg.fleet.replicas;
    r.event_plane = EventPlane::Nats;
    r.nats_server = nats.url();
    r.router_id = Some(id.into());
    tweak(&mut cfg);
    Router::start(&cfg, specs.to_vec())
        .await
        .expect("router replica starts")
}

/// Run a prompt on worker `w` directly (it caches the prompt and publishes its blocks).
async fn run_on(c: &reqwest::Client, w: &RunningWorker, tokens: &[u32]) {
    let r = c
        .post(format!("{}/v1/completions", w.info.url))
        .json(&serde_json::json!({"model": w.info.model, "prompt": tokens, "max_tokens": 1}))
        .send()
        .await
        .expect("worker answers");
    assert!(r.status().is_success(), "{}", r.status());
    let _ = r.bytes().await;
}

/// The worker with the most device blocks of `tokens` cached, if any.
fn cached_on(fleet: &Fleet, tokens: &[u32]) -> Option<u64> {
    let report = fleet.router.overlap_scores(&RouteInput {
        tokens,
        ..Default::default()
    });
    report
        .ranks
        .iter()
        .filter(|(_, o)| o.device > 0)
        .max_by_key(|(_, o)| o.device)
        .map(|(r, _)| r.worker_id)
}

type Edge = (WorkerWithDpRank, String, Option<u64>, u64, u64);

/// An index as its edges: (rank, tier, parent engine hash, block engine hash, local hash).
fn edges(dump: &[RouterEvent]) -> BTreeSet<Edge> {
    let mut out = BTreeSet::new();
    for ev in dump {
        let KvCacheEventData::Stored(s) = &ev.event.data else {
            continue;
        };
        let tier = format!("{:?}", ev.storage_tier);
        let mut parent = s.parent_hash.map(|h| h.0);
        for b in &s.blocks {
            out.insert((
                ev.worker(),
                tier.clone(),
                parent,
                b.block_hash.0,
                b.tokens_hash.0,
            ));
            parent = Some(b.block_hash.0);
        }
    }
    out
}

fn index_of(fleet: &Fleet) -> BTreeSet<Edge> {
    edges(&fleet.router.dump_events())
}

/// Eventually the two indexes are equal and not empty.
async fn converge(a: &Fleet, b: &Fleet, secs: f64) -> bool {
    eventually(secs, || {
        let x = index_of(a);
        !x.is_empty() && x == index_of(b)
    })
    .await
}

fn ep(r: &Router) -> &kvrouter_server::metrics::EventPlaneMetrics {
    &r.metrics().event_plane
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_route_on_events_from_nats() {
    let nats = NatsServer::start();
    let (ws, specs) = workers(2).await;
    let relay = relay(&nats, &specs).await;
    // A frontend and a standalone router: both consume the stream.
    let mut fcfg = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    fcfg.fleet.health_interval_ms = 100;
    fcfg.fleet.no_admin = true;
    fcfg.http_port = 0;
    fcfg.fleet.replicas.event_plane = EventPlane::Nats;
    fcfg.fleet.replicas.nats_server = nats.url();
    fcfg.fleet.replicas.router_id = Some("frontend-a".into());
    let front = Frontend::start(fcfg, specs.clone())
        .await
        .expect("frontend starts");
    let router = replica(&nats, "router-b", &specs, |_| {}).await;
    assert!(
        front
            .fleet
            .registry
            .all()
            .iter()
            .all(|w| w.event_stats().iter().all(|(_, s)| s.received == 0)),
        "no ZMQ subscriber with --event-plane nats"
    );

    let c = client();
    let (a, b) = (prompt(1, 640), prompt(2, 640));
    run_on(&c, &ws[0], &a).await;
    run_on(&c, &ws[1], &b).await;
    for fleet in [&front.fleet, router.fleet()] {
        assert!(
            eventually(10.0, || cached_on(fleet, &a) == Some(1)
                && cached_on(fleet, &b) == Some(2))
            .await,
            "the events reached the replica through NATS"
        );
    }
    // The frontend routes the repeat to the worker that cached it.
    let (st, worker, _) = complete(&c, &front.url(), completion_body(&a, 1)).await;
    assert_eq!((st, worker), (200, Some(1)));
    assert!(
        converge(&front.fleet, router.fleet(), 10.0).await,
        "equal indexes"
    );
    let m = ep(&router);
    assert!(m.events.get() > 0 && m.messages.get() > 0);
    assert_eq!(m.gaps.get(), 0);
    assert_eq!(m.duplicates.get(), 0);
    assert!(
        eventually(10.0, || front.metrics.event_plane.events.get()
            == m.events.get())
        .await,
        "every event once in each"
    );
    assert!(relay.stats().events_published >= m.events.get());
    router.stop().await;
    front.stop().await;
    relay.stop().await;
}

/// Events in the stream (every message's array length), read directly.
async fn events_in_stream(nats: &NatsServer) -> u64 {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(Names::for_endpoint(ENDPOINT).stream())
        .await
        .unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut n = 0;
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            n += kvrouter_wire::json::from_json_array(&m.payload).map_or(0, |v| v.len() as u64);
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restarted_under_load_loses_and_repeats_nothing() {
    let mut nats = NatsServer::start();
    let (ws, specs) = workers(2).await;
    let relay = relay(&nats, &specs).await;
    let a = replica(&nats, "a", &specs, |_| {}).await;
    let b = replica(&nats, "b", &specs, |_| {}).await;
    let c = client();
    let first = prompt(10, 640);
    run_on(&c, &ws[0], &first).await;
    assert!(eventually(10.0, || cached_on(a.fleet(), &first) == Some(1)).await);

    // Load: prompts keep going to the workers while NATS is killed and restarted.
    let load = {
        let c = c.clone();
        let urls: Vec<_> = ws
            .iter()
            .map(|w| (w.info.url.clone(), w.info.model.clone()))
            .collect();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..60u32 {
                let (url, model) = &urls[i as usize % 2];
                let p = prompt(100 + i, 256);
                let _ = c
                    .post(format!("{url}/v1/completions"))
                    .json(&serde_json::json!({"model": model, "prompt": p, "max_tokens": 1}))
                    .send()
                    .await;
                sent.push((i as usize % 2 + 1, p));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.kill();
    // Routing goes on from the last state.
    for r in [&a, &b] {
        assert_eq!(
            cached_on(r.fleet(), &first),
            Some(1),
            "routing on the last state"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart();
    let sent = load.await.unwrap();
    // The stream catches up: every prompt of the load is known where it ran.
    for r in [&a, &b] {
        assert!(
            eventually(30.0, || sent
                .iter()
                .all(|(w, p)| cached_on(r.fleet(), p) == Some(*w as u64)))
            .await,
            "caught up after the restart"
        );
    }
    assert!(converge(a.fleet(), b.fleet(), 10.0).await, "equal indexes");
    // No event applied twice: each replica applied exactly the events the stream holds.
    let (relay_stats, in_stream) = (relay.stats(), events_in_stream(&nats).await);
    assert!(
        eventually(10.0, || ep(&a).events.get() == in_stream
            && ep(&b).events.get() == in_stream)
        .await,
        "applied {} and {}, stream {in_stream}, relay {relay_stats:?}",
        ep(&a).events.get(),
        ep(&b).events.get()
    );
    eprintln!(
        "relay {relay_stats:?}; a: redeliveries {} duplicates {} gaps {} recovered {}",
        ep(&a).redeliveries.get(),
        ep(&a).duplicates.get(),
        ep(&a).gaps.get(),
        ep(&a).gaps_recovered.get()
    );
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

/// Publish raw payloads on `subject` of the stream.
async fn publish_raw(nats: &NatsServer, subject: String, payloads: Vec<Vec<u8>>) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for p in payloads {
        js.publish(subject.clone(), p.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_restarts_gaps_and_hostile_messages_are_recovered_or_counted() {
    let nats = NatsServer::start();
    let (ws, specs) = workers(2).await;
    let mut relay1 = Some(relay(&nats, &specs).await);
    let a = replica(&nats, "a", &specs, |_| {}).await;
    let b = replica(&nats, "b", &specs, |_| {}).await;
    let c = client();
    let p = prompt(20, 640);
    run_on(&c, &ws[0], &p).await;
    assert!(eventually(10.0, || cached_on(a.fleet(), &p) == Some(1)).await);

    // The relay restarts: its ids start again from 0; the new one replays the engine's ring.
    relay1.take().unwrap().stop().await;
    let relay2 = relay(&nats, &specs).await;
    let q = prompt(21, 640);
    run_on(&c, &ws[1], &q).await;
    for r in [&a, &b] {
        assert!(
            eventually(10.0, || ep(r).relay_restarts.get() >= 1).await,
            "restart seen"
        );
        assert!(
            eventually(10.0, || cached_on(r.fleet(), &p) == Some(1)
                && cached_on(r.fleet(), &q) == Some(2))
            .await,
            "rebuilt after the relay restart"
        );
    }

    // A gap: someone published worker 1's event 1,000,000 (ids in between missing). The
    // routers clear the rank and ask the relay, which publishes a clear and a re-dump.
    let names = Names::for_endpoint(ENDPOINT);
    let gap = kvrouter_core::index::stored_event(
        WorkerWithDpRank::new(1, 0),
        1_000_000,
        None,
        [(
            kvrouter_core::hash::ExternalHash(7),
            kvrouter_core::hash::LocalBlockHash(7),
        )],
    );
    publish_raw(
        &nats,
        names.event_subject(1),
        vec![kvrouter_wire::json::to_json_array(&[gap])],
    )
    .await;
    for r in [&a, &b] {
        assert!(
            eventually(10.0, || ep(r).gaps.get() >= 1
                && ep(r).gaps_recovered.get() >= 1)
            .await,
            "gap detected and recovered: {} {}",
            ep(r).gaps.get(),
            ep(r).gaps_recovered.get()
        );
        assert!(
            eventually(10.0, || cached_on(r.fleet(), &p) == Some(1)).await,
            "worker 1 known again"
        );
    }
    assert!(relay2.stats().redump_requests >= 1);
    assert!(relay2.stats().recoveries >= 1);

    // Hostile messages: counted, never applied, never a panic.
    let bad_before = ep(&a).bad_messages.get();
    let unknown_before = ep(&a).unknown_workers.get();
    let foreign = RouterEvent::new(WorkerWithDpRank::new(99, 0), 0, KvCacheEventData::Cleared);
    publish_raw(
        &nats,
        names.event_subject(1),
        vec![
            b"garbage".to_vec(),
            b"[{\"worker_id\": 1}]".to_vec(),
            vec![b'['; 500_000],
            kvrouter_wire::json::to_json_array(std::slice::from_ref(&foreign)), // another worker's
        ],
    )
    .await;
    publish_raw(
        &nats,
        names.event_subject(99),
        vec![kvrouter_wire::json::to_json_array(&[foreign])],
    )
    .await;
    for r in [&a, &b] {
        assert!(
            eventually(10.0, || ep(r).bad_messages.get() >= bad_before + 4).await,
            "bad counted"
        );
        assert!(
            eventually(10.0, || ep(r).unknown_workers.get() > unknown_before).await,
            "unknown counted"
        );
    }
    assert_eq!(cached_on(a.fleet(), &p), Some(1), "still routing");
    assert!(converge(a.fleet(), b.fleet(), 10.0).await, "equal indexes");
    a.stop().await;
    b.stop().await;
    relay2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_replica_loads_the_snapshot_and_catches_up() {
    let nats = NatsServer::start();
    let (ws, specs) = workers(2).await;
    let relay = relay(&nats, &specs).await;
    let small = |c: &mut RouterServiceConfig| c.fleet.replicas.router_snapshot_threshold = 5;
    let a = replica(&nats, "a", &specs, small).await;
    let b = replica(&nats, "b", &specs, small).await;
    let c = client();
    for i in 0..20u32 {
        run_on(&c, &ws[i as usize % 2], &prompt(300 + i, 256)).await;
    }
    assert!(
        eventually(20.0, || ep(&a).snapshots_taken.get()
            + ep(&b).snapshots_taken.get()
            >= 1)
        .await,
        "a snapshot was taken"
    );
    assert!(converge(a.fleet(), b.fleet(), 10.0).await);
    let client_nats = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client_nats);
    let names = Names::for_endpoint(ENDPOINT);
    let (snap, size) = snapshot::load(&js, &names)
        .await
        .unwrap()
        .expect("a snapshot");
    assert!(size > 0 && !snap.events.is_empty() && snap.stream_seq > 0);
    let mut stream = js.get_stream(names.stream()).await.unwrap();
    let mut purged = false;
    for _ in 0..100 {
        purged = stream.info().await.unwrap().state.first_sequence > 1;
        if purged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(purged, "the stream was purged below the snapshot");

    // b dies; more events; b starts again: snapshot + the stream after it.
    b.stop().await;
    drop(b);
    for i in 0..6u32 {
        run_on(&c, &ws[i as usize % 2], &prompt(400 + i, 256)).await;
    }
    let started = std::time::Instant::now();
    let b = replica(&nats, "b", &specs, small).await;
    assert!(
        converge(a.fleet(), b.fleet(), 5.0).await,
        "routes like its peer within seconds"
    );
    eprintln!(
        "restarted replica equal to its peer after {:?}",
        started.elapsed()
    );
    assert_eq!(ep(&b).snapshots_loaded.get(), 1);
    assert_eq!(
        ep(&b).gaps.get(),
        0,
        "nothing missing between snapshot and stream"
    );
    let p = prompt(405, 256);
    assert_eq!(cached_on(b.fleet(), &p), Some(2));

    // --router-reset-states: the snapshot is deleted and the replica starts empty (then
    // rebuilds from what the stream still holds plus the relay's re-dumps of the rest).
    b.stop().await;
    a.stop().await;
    let r = replica(&nats, "r", &specs, |c| {
        c.fleet.replicas.router_reset_states = true
    })
    .await;
    assert!(eventually(10.0, || ep(&r).messages.get() > 0).await);
    assert_eq!(ep(&r).snapshots_loaded.get(), 0);
    assert!(
        snapshot::load(&js, &names).await.unwrap().is_none(),
        "snapshot deleted"
    );
    assert!(
        eventually(10.0, || cached_on(r.fleet(), &p) == Some(2)).await,
        "rebuilt: gaps {} recovered {}",
        ep(&r).gaps.get(),
        ep(&r).gaps_recovered.get()
    );
    r.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_buffer_overflow_is_recovered_not_lost() {
    let mut nats = NatsServer::start();
    let (ws, specs) = workers(1).await;
    let relay = relay_buffering(&nats, &specs, 4).await;
    // Its status server (`kvrouter relay --system-port`) shows what happens.
    let status = StatusServer::start("127.0.0.1:0".parse().unwrap(), relay.metrics())
        .await
        .expect("status server starts");
    let status_url = format!("http://{}", status.addr);
    let a = replica(&nats, "a", &specs, |_| {}).await;
    let c = client();
    let first = prompt(500, 256);
    run_on(&c, &ws[0], &first).await;
    assert!(eventually(10.0, || cached_on(a.fleet(), &first) == Some(1)).await);
    let m = metrics_text(&c, &status_url).await;
    assert!(
        metric(&m, "kvrouter_relay_events_published_total") >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "kvrouter_relay_publishing"), 1.0, "{m}");
    nats.kill();
    // Ten events while NATS is down, four buffered at most: some are dropped.
    let down: Vec<Vec<u32>> = (0..10).map(|i| prompt(510 + i, 256)).collect();
    for p in &down {
        run_on(&c, &ws[0], p).await;
    }
    assert!(
        eventually(10.0, || relay.stats().dropped_events > 0).await,
        "{:?}",
        relay.stats()
    );
    let m = metrics_text(&c, &status_url).await;
    assert!(
        metric(&m, "kvrouter_relay_dropped_events_total") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "kvrouter_relay_publishing"),
        0.0,
        "NATS is down: {m}"
    );
    assert!(metric(&m, "kvrouter_relay_buffered_events") <= 4.0, "{m}");
    nats.restart();
    // The rank is re-dumped: every prompt is known again, none lost silently.
    assert!(
        eventually(20.0, || down
            .iter()
            .chain([&first])
            .all(|p| cached_on(a.fleet(), p) == Some(1)))
        .await,
        "recovered: relay {:?}, gaps {} recovered {}",
        relay.stats(),
        ep(&a).gaps.get(),
        ep(&a).gaps_recovered.get()
    );
    assert!(relay.stats().recoveries >= 1);
    assert!(ep(&a).gaps_recovered.get() >= 1);
    let m = metrics_text(&c, &status_url).await;
    assert!(metric(&m, "kvrouter_relay_recoveries_total") >= 1.0, "{m}");
    assert_eq!(
        metric(&m, "kvrouter_relay_events_received_total"),
        relay.stats().events_in as f64
    );
    assert_eq!(get_status(&c, &format!("{status_url}/live")).await, 200);
    let om = c
        .get(format!("{status_url}/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE kvrouter_relay_recoveries counter"),
        "{om}"
    );
    a.stop().await;
    relay.stop().await;
    status.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_deleted_under_a_replica_is_created_again() {
    let nats = NatsServer::start();
    let (ws, specs) = workers(1).await;
    let relay = relay(&nats, &specs).await;
    let a = replica(&nats, "a", &specs, |_| {}).await;
    let c = client();
    let p = prompt(600, 256);
    run_on(&c, &ws[0], &p).await;
    assert!(eventually(10.0, || cached_on(a.fleet(), &p) == Some(1)).await);
    // A peer's clean-up (or an operator) deletes a's consumer.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js
        .get_stream(Names::for_endpoint(ENDPOINT).stream())
        .await
        .unwrap();
    stream
        .delete_consumer("a")
        .await
        .expect("consumer a exists");
    let q = prompt(601, 256);
    run_on(&c, &ws[0], &q).await;
    assert!(
        eventually(20.0, || cached_on(a.fleet(), &q) == Some(1)).await,
        "consuming again after the consumer vanished"
    );
    assert_eq!(ep(&a).gaps.get(), 0);
    assert_eq!(ep(&a).duplicates.get(), 0);
    a.stop().await;
    relay.stop().await;
}
