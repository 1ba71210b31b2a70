//! Engines and data-parallel ranks end to end (issue 20 items 2 and 3): the frontend in KV mode
//! in front of mock workers that speak SGLang's protocols (`--engine sglang`: its event
//! format, usage shape and rank field) and of workers with several data-parallel ranks, each
//! with its own pool and publisher. A repeated prompt goes back to the same `(worker,
//! dp_rank)` and the engine itself reports the hit; the index was filled from the engine's
//! own event format; loads per rank return to zero, a cancelled stream's too.
use std::time::Duration;

use futures::StreamExt;
use kvrouter_core::{RolePool, RouterMode};
use kvrouter_mocker::cli::Engine;
use kvrouter_server::frontend::{DP_RANK_HEADER, PREDICTED_CACHED_HEADER};
use kvrouter_server::up::EmbeddedStack;
use serde_json::{json, Value};

use crate::common::*;

/// 1024 tokens in 64-token blocks: a full repeat hits 15 blocks (the last token is computed).
const PROMPT_TOKENS: usize = 1024;
const HIT: u64 = 960;

/// One completion: (worker, dp_rank, predicted cached tokens, engine-reported cached tokens),
/// streamed or not; the usage is the engine's, passed through.
async fn send(
    c: &reqwest::Client,
    url: &str,
    tokens: &[u32],
    stream: bool,
) -> (u64, u32, u64, u64) {
    let mut body = completion_body(tokens, 2);
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let worker = worker_of(&r).expect("worker header");
    let rank = header_u64(&r, DP_RANK_HEADER).expect("rank header") as u32;
    let predicted = header_u64(&r, PREDICTED_CACHED_HEADER).expect("predicted header");
    let usage = if stream {
        let text = r.text().await.unwrap();
        let events = sse_events(&text);
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        last["usage"].clone()
    } else {
        r.json::<Value>().await.unwrap()["usage"].clone()
    };
    let reported = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{usage}"));
    (worker, rank, predicted, reported)
}

/// Waits until the router's index holds `tokens`' blocks (their KV events arrived).
async fn indexed(s: &EmbeddedStack, tokens: &[u32]) {
    let router = &s.frontend.fleet.router;
    assert!(
        eventually(
            10.0,
            || router.best_cached_tokens(tokens, RolePool::Any, &Default::default()) as u64 >= HIT
        )
        .await,
        "the KV events of the first send never reached the index"
    );
}

/// The admin API's rank entries of worker `id`.
async fn admin_ranks(c: &reqwest::Client, s: &EmbeddedStack, id: u64) -> Vec<Value> {
    let admin = s.frontend.admin_url().expect("admin API");
    let v = get_json(c, &format!("{admin}/v1/workers")).await;
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["spec"]["id"] == id)
        .unwrap_or_else(|| panic!("worker {id} in {v}"))["ranks"]
        .as_array()
        .unwrap()
        .clone()
}

/// A mock worker's own per-rank counter `name{engine="rank"}` from its `/metrics`.
async fn engine_metric(
    c: &reqwest::Client,
    s: &EmbeddedStack,
    id: u64,
    rank: u32,
    name: &str,
) -> f64 {
    let url = s.frontend.fleet.registry.get(id).unwrap().spec.url.clone();
    let text = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let head = format!("{name}{{engine=\"{rank}\"");
    text.lines()
        .find(|l| l.starts_with(&head))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {head} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_workers_route_repeats_to_their_cache_from_sglang_events() {
    let s = stack(RouterMode::Kv, 2, |c| {
        c.mocker.engine = Engine::Sglang;
        c.mocker.enable_cache_report = true;
    })
    .await;
    let (c, url) = (client(), s.url());
    for w in s.frontend.fleet.registry.all() {
        assert_eq!(w.spec.engine.as_str(), "sglang");
    }
    let mut seen = Vec::new();
    for seed in 0..4 {
        let tokens = prompt(seed, PROMPT_TOKENS);
        let (first, rank, _, reported) = send(&c, &url, &tokens, false).await;
        assert_eq!((rank, reported), (0, 0), "a new prompt has nothing cached");
        indexed(&s, &tokens).await;
        for i in 0..3 {
            let (w, _, predicted, reported) = send(&c, &url, &tokens, i % 2 == 1).await;
            assert_eq!(w, first, "prompt {seed}: the repeat goes back to its cache");
            // The router sees all 16 blocks cached; the engine computes the last token.
            assert_eq!(
                (predicted, reported),
                (PROMPT_TOKENS as u64, HIT),
                "prompt {seed}: the router predicted and the engine reported the hit"
            );
        }
        seen.push(first);
    }
    // The index of the workers that served was filled from SGLang's format, batch by batch:
    // the admin API and /metrics say so, and never saw vLLM's.
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        let ranks = admin_ranks(&c, &s, id).await;
        let f = &ranks[0]["kv_events"]["formats"];
        assert!(f["sglang"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(
            (&f["vllm_map"], &f["vllm_array"]),
            (&json!(0), &json!(0)),
            "{f}"
        );
    }
    let m = metrics_text(&c, &url).await;
    let by_format = |format: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("kvrouter_kv_event_batches_by_format_total{")
                    && l.contains(&format!("format=\"{format}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(by_format("sglang") >= 4.0, "{m}");
    assert_eq!(by_format("vllm_map") + by_format("vllm_array"), 0.0);
    assert!(eventually(5.0, || all_idle(&s)).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_data_parallel_ranks_are_routed_pinned_and_released() {
    data_parallel_ranks(Engine::Vllm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_data_parallel_ranks_are_routed_pinned_and_released() {
    data_parallel_ranks(Engine::Sglang).await;
}

/// Two workers of two ranks each. Distinct prompts spread over the four ranks; each repeat
/// returns to its `(worker, dp_rank)` and that rank's engine reports the hit — which it can
/// only do if the request ran there: unpinned, the mock would place it by its own rule (vLLM:
/// least loaded, SGLang: round robin). Loads per rank return to zero, a cancelled stream's
/// too.
async fn data_parallel_ranks(engine: Engine) {
    let s = stack(RouterMode::Kv, 2, |c| {
        c.mocker.engine = engine;
        c.mocker.data_parallel_size = 2;
        c.mocker.enable_cache_report = true;
        // Modelled time, so that a long stream is still running when it is cancelled.
        c.mocker.speedup_ratio = 1.0;
    })
    .await;
    let (c, url) = (client(), s.url());
    let workers = s.frontend.fleet.registry.all();
    assert_eq!(workers.len(), 2);
    for w in &workers {
        assert_eq!(w.spec.dp_size, 2);
        assert_eq!(w.spec.engine.as_str(), engine.as_str());
    }
    let mut ranks_used = std::collections::HashSet::new();
    for seed in 0..8 {
        let tokens = prompt(100 + seed, PROMPT_TOKENS);
        let (worker, rank, _, reported) = send(&c, &url, &tokens, false).await;
        assert_eq!(reported, 0);
        indexed(&s, &tokens).await;
        for i in 0..2 {
            let (w, r, predicted, reported) = send(&c, &url, &tokens, i == 1).await;
            assert_eq!(
                (w, r),
                (worker, rank),
                "prompt {seed}: the repeat goes back to its rank"
            );
            assert_eq!(
                (predicted, reported),
                (PROMPT_TOKENS as u64, HIT),
                "prompt {seed}"
            );
        }
        ranks_used.insert((worker, rank));
        if ranks_used.len() == 4 {
            break;
        }
    }
    assert!(
        ranks_used.iter().any(|&(_, r)| r == 1) && ranks_used.iter().any(|&(_, r)| r == 0),
        "prompts spread over both ranks: {ranks_used:?}"
    );
    // The hits were the pinned rank's own: each used rank's engine counted them.
    for &(w, r) in &ranks_used {
        let hits = engine_metric(&c, &s, w, r, "vllm:prefix_cache_hits_total").await;
        assert!(hits >= 2.0 * HIT as f64, "worker {w} rank {r}: {hits}");
    }
    assert!(eventually(5.0, || all_idle(&s)).await, "loads back to zero");

    // A cancelled stream: booked on its rank while it runs, released when the client leaves.
    let tokens = prompt(999, PROMPT_TOKENS);
    let mut body = completion_body(&tokens, 2000);
    body["stream"] = json!(true);
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (w, rank) = (
        worker_of(&r).unwrap(),
        header_u64(&r, DP_RANK_HEADER).unwrap() as u32,
    );
    let mut body = r.bytes_stream();
    body.next().await.expect("a first chunk").unwrap();
    let ranks = admin_ranks(&c, &s, w).await;
    assert_eq!(ranks[rank as usize]["active_requests"], 1, "{ranks:?}");
    assert_eq!(
        engine_metric(&c, &s, w, rank, "vllm:num_requests_running").await,
        1.0,
        "running on the rank it was pinned to"
    );
    drop(body);
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "the cancelled stream's load is released"
    );
    for w in s.frontend.fleet.registry.all() {
        for r in admin_ranks(&c, &s, w.id()).await {
            assert_eq!(
                (
                    &r["active_requests"],
                    &r["active_decode_blocks"],
                    &r["active_prefill_tokens"]
                ),
                (&json!(0), &json!(0), &json!(0)),
                "{r}"
            );
        }
    }
    // And the engine stopped it.
    let mut stopped = false;
    for _ in 0..100 {
        if engine_metric(&c, &s, w, rank, "vllm:num_requests_running").await == 0.0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped, "the engine still runs the cancelled request");
    s.stop().await;
}
