//! TensorRT-LLM workers on the NATS event plane, with a real nats-server: their
//! `POST /kv_cache_events` is drained by each call, so the relay polls them and publishes
//! the converted events; a frontend on `--event-plane nats` polls nobody and routes on what
//! the stream brings. A repeated prompt goes back to its worker, which reports the hit; an
//! engine-side gap clears the worker in the frontend's index through the relay.
use std::time::{Duration, Instant};

use kvrouter_core::{RolePool, RouterMode};
use kvrouter_mocker::RunningWorker;
use kvrouter_server::config::FrontendConfig;
use kvrouter_server::replicas::relay::{Relay, RelayOptions};
use kvrouter_server::replicas::relay_status::StatusServer;
use kvrouter_server::replicas::EventPlane;
use kvrouter_server::up::worker_spec;
use kvrouter_server::{Frontend, WorkerSpec};
use serde_json::Value;

use crate::common::*;
use crate::nats_server::NatsServer;
use crate::trtllm::{rank_events, repeats_hit, send, trtllm_mocks, HIT, PROMPT_TOKENS};

/// Specs of `ws` with ids 1..=n (relay and routers must agree on them), polled every
/// `poll_ms` if given.
fn specs(ws: &[RunningWorker], poll_ms: Option<u64>) -> Vec<WorkerSpec> {
    ws.iter()
        .enumerate()
        .map(|(i, w)| WorkerSpec {
            id: Some(i as u64 + 1),
            kv_events_poll_interval_ms: poll_ms,
            ..worker_spec(w)
        })
        .collect()
}

async fn relay(nats: &NatsServer, specs: &[WorkerSpec]) -> Relay {
    Relay::start(
        RelayOptions {
            nats_server: nats.url(),
            ..Default::default()
        },
        specs.to_vec(),
    )
    .await
    .expect("relay starts")
}

/// A frontend in KV mode on the NATS event plane, its admin API on.
async fn frontend(nats: &NatsServer, specs: &[WorkerSpec]) -> Frontend {
    let mut cfg = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    cfg.fleet.health_interval_ms = 100;
    cfg.fleet.replicas.event_plane = EventPlane::Nats;
    cfg.fleet.replicas.nats_server = nats.url();
    cfg.fleet.replicas.router_id = Some("frontend".into());
    Frontend::start(cfg, specs.to_vec())
        .await
        .expect("frontend starts")
}

/// The frontend made no poll of worker `id` itself and decoded none of its answers.
fn not_polled_by_the_router(ev: &Value) {
    let zero = |k: &str| ev[k].as_u64().unwrap_or(0) == 0;
    assert!(zero("polls") && zero("poll_errors"), "{ev}");
    assert_eq!(ev["formats"]["trtllm"].as_u64().unwrap_or(0), 0, "{ev}");
}

/// Sum of a metric's samples in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_polls_trtllm_workers_and_a_nats_router_routes_repeats_to_their_cache() {
    let nats = NatsServer::start();
    let ws = trtllm_mocks(2, |_| {}).await;
    let specs = specs(&ws, None);
    assert!(specs.iter().all(|s| s.polls_kv_events()), "{specs:?}");
    let relay = relay(&nats, &specs).await;
    let status = StatusServer::start("127.0.0.1:0".parse().unwrap(), relay.metrics())
        .await
        .expect("status server");
    let f = frontend(&nats, &specs).await;
    let c = client();

    let seen = repeats_hit(&c, &f, PROMPT_TOKENS as u64).await;
    for id in seen {
        not_polled_by_the_router(&rank_events(&c, &f, id).await);
    }
    // The index came through the stream; the relay did the polling.
    let m = metrics_text(&c, &f.url()).await;
    assert!(
        metric(&m, "kvrouter_event_stream_events_total") > 0.0,
        "{m}"
    );
    let st = relay.stats();
    assert!(st.polls > 0 && st.events_published > 0, "{st:?}");
    assert_eq!((st.poll_errors, st.publish_failures), (0, 0), "{st:?}");
    let rm = metrics_text(&c, &format!("http://{}", status.addr)).await;
    assert!(
        metric(&rm, "kvrouter_relay_kv_event_polls_total") > 0.0,
        "{rm}"
    );
    assert_eq!(
        metric(&rm, "kvrouter_relay_kv_event_poll_errors_total"),
        0.0
    );

    f.stop().await;
    status.stop().await;
    relay.stop().await;
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_side_gap_the_relay_sees_clears_the_worker_in_a_nats_router() {
    // One event buffered between polls every 200 ms: a burst of prompts overflows it.
    let nats = NatsServer::start();
    let ws = trtllm_mocks(1, |m| m.event_buffer_max_size = 1).await;
    let specs = specs(&ws, Some(200));
    let relay = relay(&nats, &specs).await;
    let f = frontend(&nats, &specs).await;
    let (c, url) = (client(), f.url());
    let router = &f.fleet.router;
    let cached =
        |t: &[u32]| router.best_cached_tokens(t, RolePool::Any, &Default::default()) as u64;

    let before = prompt(100, PROMPT_TOKENS);
    send(&c, &url, &before).await;
    assert!(
        eventually(10.0, || cached(&before) == PROMPT_TOKENS as u64).await,
        "the relayed events reached the index"
    );
    let mut seed = 200;
    let mut cleared = false;
    for _ in 0..20 {
        for _ in 0..5 {
            send(&c, &url, &prompt(seed, 256)).await;
            seed += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while cached(&before) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if cached(&before) == 0 {
            cleared = true;
            break;
        }
    }
    assert!(
        cleared,
        "a burst past the engine's buffer cleared the worker"
    );
    // Cleared, not evicted: the engine still holds the prompt and reports the hit.
    let (_, predicted, reported) = send(&c, &url, &before).await;
    assert_eq!((predicted, reported), (0, HIT));
    // Rebuilt by what the engine stores next, through the relay.
    let after = prompt(999, PROMPT_TOKENS);
    send(&c, &url, &after).await;
    assert!(
        eventually(10.0, || cached(&after) == PROMPT_TOKENS as u64).await,
        "rebuilt after the clear"
    );
    let (_, predicted, reported) = send(&c, &url, &after).await;
    assert_eq!((predicted, reported), (PROMPT_TOKENS as u64, HIT));
    not_polled_by_the_router(&rank_events(&c, &f, 1).await);

    f.stop().await;
    relay.stop().await;
    for w in ws {
        w.stop().await;
    }
}
