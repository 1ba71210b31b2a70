//! TensorRT-LLM workers end to end (issue 20 item 1): the frontend in KV mode in front of mock
//! workers that play `trtllm-serve` (`--engine trtllm`): KV events drained from
//! `POST /kv_cache_events` by the router's poller, in TensorRT-LLM's JSON format, at its
//! default 32-token blocks. A repeated prompt goes back to its worker and the engine itself
//! reports the hit; the index was filled from TensorRT-LLM's format (the admin API's
//! `formats.trtllm`, `kvrouter_kv_event_batches_by_format_total`); a router at 16-token
//! blocks splits each engine block; events lost from a full engine buffer clear the worker's
//! entries, which new traffic rebuilds; a worker answering garbage is counted and backed off;
//! and the ZMQ publisher of newer releases (vLLM's format) goes through the subscribers.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrouter_core::{RolePool, RouterMode};
use kvrouter_mocker::cli::Engine;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use kvrouter_server::frontend::PREDICTED_CACHED_HEADER;
use kvrouter_server::up::{worker_spec, UpConfig};
use kvrouter_server::workers::spec::WorkerSpec;
use kvrouter_server::Frontend;
use serde_json::{json, Value};

use crate::common::*;

/// 1024 tokens in TensorRT-LLM's 32-token blocks: a repeat hits 31 blocks (the engine
/// computes the last token), the router predicts all 32.
pub(crate) const PROMPT_TOKENS: usize = 1024;
pub(crate) const HIT: u64 = 992;

fn trtllm(c: &mut UpConfig) {
    c.mocker.engine = Engine::Trtllm;
    c.mocker.block_size = 32;
}

/// One completion: (worker, predicted cached tokens, engine-reported cached tokens).
pub(crate) async fn send(c: &reqwest::Client, url: &str, tokens: &[u32]) -> (u64, u64, u64) {
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&completion_body(tokens, 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let worker = worker_of(&r).expect("worker header");
    let predicted = r
        .headers()
        .get(PREDICTED_CACHED_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("predicted header");
    let usage = r.json::<Value>().await.unwrap()["usage"].clone();
    let reported = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{usage}"));
    (worker, predicted, reported)
}

async fn indexed(f: &Frontend, tokens: &[u32], at_least: u64) -> bool {
    let router = &f.fleet.router;
    eventually(10.0, || {
        router.best_cached_tokens(tokens, RolePool::Any, &Default::default()) as u64 >= at_least
    })
    .await
}

/// The admin API's `kv_events` of rank 0 of worker `id`.
pub(crate) async fn rank_events(c: &reqwest::Client, f: &Frontend, id: u64) -> Value {
    let admin = f.admin_url().expect("admin API");
    let v = get_json(c, &format!("{admin}/v1/workers")).await;
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["spec"]["id"] == id)
        .unwrap_or_else(|| panic!("worker {id} in {v}"))["ranks"][0]["kv_events"]
        .clone()
}

fn by_format(metrics: &str, format: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("kvrouter_kv_event_batches_by_format_total{")
                && l.contains(&format!("format=\"{format}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Repeats of distinct prompts: each goes back to its first worker with the full predicted
/// and engine-reported hit. Returns the workers that served.
pub(crate) async fn repeats_hit(c: &reqwest::Client, f: &Frontend, predicted_hit: u64) -> Vec<u64> {
    let url = f.url();
    let mut seen = Vec::new();
    for seed in 0..4 {
        let tokens = prompt(seed, PROMPT_TOKENS);
        let (first, _, reported) = send(c, &url, &tokens).await;
        assert_eq!(reported, 0, "a new prompt has nothing cached");
        assert!(
            indexed(f, &tokens, predicted_hit).await,
            "the polled events of prompt {seed} never reached the index"
        );
        for _ in 0..2 {
            let (w, predicted, reported) = send(c, &url, &tokens).await;
            assert_eq!(w, first, "prompt {seed}: the repeat goes back to its cache");
            assert_eq!(
                (predicted, reported),
                (predicted_hit, HIT),
                "prompt {seed}: the router predicted and the engine reported the hit"
            );
        }
        seen.push(first);
    }
    seen.sort_unstable();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trtllm_workers_route_repeats_to_their_cache_from_polled_events() {
    let s = stack(RouterMode::Kv, 2, trtllm).await;
    let c = client();
    for w in s.frontend.fleet.registry.all() {
        assert_eq!(w.spec.engine.as_str(), "trtllm");
        assert!(
            w.spec.kv_events_endpoint.is_none(),
            "polled, not subscribed"
        );
    }
    let seen = repeats_hit(&c, &s.frontend, PROMPT_TOKENS as u64).await;
    for id in seen {
        let ev = rank_events(&c, &s.frontend, id).await;
        let f = &ev["formats"];
        assert!(f["trtllm"].as_u64().unwrap() > 0, "{ev}");
        assert_eq!(
            (&f["vllm_map"], &f["sglang"]),
            (&json!(0), &json!(0)),
            "{f}"
        );
        assert!(ev["polls"].as_u64().unwrap() > 0, "{ev}");
        assert_eq!(
            (&ev["poll_errors"], &ev["gaps"], &ev["state"]),
            (&json!(0), &json!(0), &json!("live")),
            "{ev}"
        );
    }
    let m = metrics_text(&c, &s.url()).await;
    assert!(by_format(&m, "trtllm") >= 4.0, "{m}");
    assert_eq!(by_format(&m, "vllm_map") + by_format(&m, "sglang"), 0.0);
    assert!(m.contains("outcome=\"polls\""), "poll counters exported");
    assert!(eventually(5.0, || all_idle(&s)).await);
    s.stop().await;
}

pub(crate) async fn trtllm_mocks(
    n: usize,
    tweak: impl FnOnce(&mut MockerConfig),
) -> Vec<RunningWorker> {
    let mut m = UpConfig::default().mocker;
    m.engine = Engine::Trtllm;
    m.block_size = 32;
    m.num_gpu_blocks = 1024;
    m.speedup_ratio = 0.0;
    tweak(&mut m);
    spawn_workers(&m, n).await.unwrap()
}

async fn frontend(specs: Vec<WorkerSpec>) -> Frontend {
    let mut cfg = UpConfig::default().frontend;
    cfg.router_mode = RouterMode::Kv;
    cfg.fleet.health_interval_ms = 100;
    Frontend::start(cfg, specs).await.expect("frontend starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_at_16_token_blocks_splits_trtllms_32_token_blocks() {
    let workers = trtllm_mocks(2, |_| {}).await;
    let specs = workers
        .iter()
        .map(|w| WorkerSpec {
            block_size: Some(16),
            ..worker_spec(w)
        })
        .collect();
    let f = frontend(specs).await;
    assert_eq!(f.fleet.router.block_size(), 16);
    let c = client();
    // The router holds all 64 of its blocks; the engine reports its 31 reused blocks.
    repeats_hit(&c, &f, PROMPT_TOKENS as u64).await;
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_from_a_full_engine_buffer_clear_the_worker_and_traffic_rebuilds_it() {
    // One event buffered between polls, polls every 200 ms: a burst of prompts overflows it.
    let workers = trtllm_mocks(1, |m| m.event_buffer_max_size = 1).await;
    let spec = WorkerSpec {
        kv_events_poll_interval_ms: Some(200),
        ..worker_spec(&workers[0])
    };
    let f = frontend(vec![spec]).await;
    let (c, url) = (client(), f.url());
    let id = f.fleet.registry.all()[0].id();
    let before = prompt(100, PROMPT_TOKENS);
    send(&c, &url, &before).await;
    assert!(indexed(&f, &before, PROMPT_TOKENS as u64).await);
    let gaps = |ev: &Value| ev["gaps"].as_u64().unwrap();
    let mut seed = 200;
    for _ in 0..20 {
        for _ in 0..5 {
            send(&c, &url, &prompt(seed, 256)).await;
            seed += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while gaps(&rank_events(&c, &f, id).await) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if gaps(&rank_events(&c, &f, id).await) > 0 {
            break;
        }
    }
    let ev = rank_events(&c, &f, id).await;
    assert!(
        gaps(&ev) >= 1,
        "a burst past the buffer shows as a gap: {ev}"
    );
    assert!(
        ev["cleared"].as_u64().unwrap() >= 1,
        "the gap cleared the worker: {ev}"
    );
    // Cleared: the prompt stored before the gap is no longer credited (its blocks are still
    // in the engine, which will not announce them again).
    assert_eq!(
        f.fleet
            .router
            .best_cached_tokens(&before, RolePool::Any, &Default::default()),
        0
    );
    // Rebuilt by what the engine stores next.
    let after = prompt(999, PROMPT_TOKENS);
    send(&c, &url, &after).await;
    assert!(
        indexed(&f, &after, PROMPT_TOKENS as u64).await,
        "rebuilt after the clear"
    );
    let (_, predicted, reported) = send(&c, &url, &after).await;
    assert_eq!((predicted, reported), (PROMPT_TOKENS as u64, HIT));
    let m = metrics_text(&c, &url).await;
    assert!(
        m.lines().any(|l| l.starts_with("kvrouter_kv_events_total{")
            && l.contains("outcome=\"gaps\"")
            && !l.ends_with(" 0")),
        "gaps exported"
    );
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}

/// A fake TensorRT-LLM worker: healthy, answering `POST /kv_cache_events` with `body`, and
/// recording when each poll came.
async fn fake_worker(body: &'static str) -> (String, Arc<Mutex<Vec<Instant>>>) {
    use axum::routing::{get, post};
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/kv_cache_events",
            post(move || {
                seen.lock().unwrap().push(Instant::now());
                async move { body }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_answering_garbage_is_counted_and_backed_off() {
    let (url, calls) = fake_worker(r#"{"not": "an array"} <html>"#).await;
    let spec = WorkerSpec {
        engine: kvrouter_server::workers::spec::Engine::Trtllm,
        block_size: Some(32),
        kv_events_poll_interval_ms: Some(10),
        ..WorkerSpec::from_url(&url)
    };
    let f = frontend(vec![spec]).await;
    let c = client();
    let id = f.fleet.registry.all()[0].id();
    assert!(
        eventually(20.0, || calls.lock().unwrap().len() >= 6).await,
        "the poller keeps polling"
    );
    let ev = rank_events(&c, &f, id).await;
    let errors = ev["poll_errors"].as_u64().unwrap();
    assert!(errors >= 5, "{ev}");
    assert_eq!(ev["polls"], ev["poll_errors"], "every poll failed: {ev}");
    assert!(ev["decode_errors"].as_u64().unwrap() >= 5, "{ev}");
    assert_eq!(ev["events_out"], 0);
    // Backed off: the wait after the k-th error in a row is at least 10 ms × 2^k (a lower
    // bound: sleeps never end early).
    let t = calls.lock().unwrap().clone();
    assert!(
        t[5] - t[4] >= Duration::from_millis(160),
        "waits between polls: {:?}",
        t.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    );
    // Still serving, the worker still registered.
    assert_eq!(get_status(&c, &format!("{}/health", f.url())).await, 200);
    assert_eq!(f.fleet.registry.all().len(), 1);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trtllms_zmq_publisher_of_vllms_format_goes_through_the_subscribers() {
    let s = stack(RouterMode::Kv, 2, |c| {
        trtllm(c);
        c.mocker.trtllm_zmq_events = true;
    })
    .await;
    let c = client();
    for w in s.frontend.fleet.registry.all() {
        assert!(w.spec.kv_events_endpoint.is_some());
        assert!(!w.spec.polls_kv_events());
    }
    let seen = repeats_hit(&c, &s.frontend, PROMPT_TOKENS as u64).await;
    for id in seen {
        let ev = rank_events(&c, &s.frontend, id).await;
        assert!(ev["formats"]["vllm_map"].as_u64().unwrap() > 0, "{ev}");
        assert_eq!(
            (&ev["formats"]["trtllm"], &ev["polls"]),
            (&json!(0), &json!(0))
        );
    }
    s.stop().await;
}
