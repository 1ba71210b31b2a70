//! `--engine sglang` and `--data-parallel-size` over real sockets: SGLang's response shapes,
//! and ranks with their own KV pools, rank fields, choices and per-rank metrics.
use kvrouter_mocker::cli::Engine;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use reqwest::RequestBuilder;
use serde_json::{json, Value};

fn cfg(engine: Engine, dp: usize) -> MockerConfig {
    MockerConfig {
        engine,
        data_parallel_size: dp,
        num_gpu_blocks: 256,
        block_size: 16,
        speedup_ratio: 0.0,
        vocab_size: 1000,
        ..Default::default()
    }
}

async fn one(cfg: &MockerConfig) -> RunningWorker {
    spawn_workers(cfg, 1).await.unwrap().pop().unwrap()
}

fn tokens(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 13 + salt) % 1000).collect()
}

fn post(w: &RunningWorker, body: &Value) -> RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/v1/completions", w.info.url))
        .json(body)
}

async fn answer(r: RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `usage.prompt_tokens_details.cached_tokens`, 0 when SGLang leaves the details out.
fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

async fn metrics(w: &RunningWorker) -> String {
    reqwest::get(format!("{}/metrics", w.info.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line `name{labels…} v` whose labels start with `labels`.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let head = format!("{name}{{{labels}");
    text.lines()
        .find(|l| l.starts_with(&head))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {head} in\n{text}"))
}

#[tokio::test]
async fn sglang_usage_and_chunks_have_sglangs_shape() {
    let w = one(&MockerConfig {
        enable_cache_report: true,
        ..cfg(Engine::Sglang, 1)
    })
    .await;
    assert_eq!(
        serde_json::to_value(&w.info).unwrap()["engine"],
        "sglang",
        "the worker line names the engine"
    );
    let p = tokens(100, 1);
    let body = json!({"prompt": p, "max_tokens": 3});
    let r = post(&w, &body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let raw = r.text().await.unwrap();
    // No hit: SGLang's UsageInfo with null details, in its field order.
    assert!(
        raw.contains(r#""usage":{"prompt_tokens":100,"total_tokens":103,"completion_tokens":3,"prompt_tokens_details":null,"reasoning_tokens":0}"#),
        "{raw}"
    );
    let a: Value = serde_json::from_str(&raw).unwrap();
    let c = &a["choices"][0];
    assert!(
        c.get("matched_stop").is_some() && c.get("stop_reason").is_none(),
        "{c}"
    );
    // A hit: 6 full blocks of 16.
    let (_, b) = answer(post(&w, &body)).await;
    assert_eq!(
        b["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 96})
    );
    // Streamed: `"usage": null` in content chunks; the usage chunk has no null fields.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let text = post(&w, &sb).send().await.unwrap().text().await.unwrap();
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3 + 1, "{text}");
    assert!(
        text.contains(r#""usage":{"prompt_tokens":100,"total_tokens":103,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":96},"reasoning_tokens":0}"#),
        "{text}"
    );
    for c in &chunks[..3] {
        assert!(c["usage"].is_null() && c.get("usage").is_some(), "{c}");
        assert!(c["choices"][0].get("matched_stop").is_some(), "{c}");
    }
    let last = &chunks[3];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    w.stop().await;

    // Without --enable-cache-report SGLang never reports cached tokens.
    let w = one(&cfg(Engine::Sglang, 1)).await;
    answer(post(&w, &body)).await;
    let (_, b) = answer(post(&w, &body)).await;
    assert!(b["usage"]["prompt_tokens_details"].is_null(), "{b}");
    let text = post(&w, &sb).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("prompt_tokens_details"), "{text}");
    w.stop().await;
}

#[tokio::test]
async fn each_rank_has_its_own_pool_and_metrics() {
    let w = one(&cfg(Engine::Vllm, 2)).await;
    let info = serde_json::to_value(&w.info).unwrap();
    assert_eq!(
        (&info["dp_size"], &info["engine"]),
        (&json!(2), &json!("vllm"))
    );
    let body = json!({"prompt": tokens(100, 2), "max_tokens": 2});
    let on = |rank: &str| post(&w, &body).header("X-data-parallel-rank", rank);
    assert_eq!(cached(&answer(on("1")).await.1), 0);
    assert_eq!(cached(&answer(on("1")).await.1), 96, "rank 1 hits");
    assert_eq!(
        cached(&answer(on("0")).await.1),
        0,
        "rank 0 has its own pool"
    );
    assert_eq!(w.ranks.len(), 2);
    let m = metrics(&w).await;
    let hits = |r: &str| {
        sample(
            &m,
            "vllm:prefix_cache_hits_total",
            &format!("engine=\"{r}\""),
        )
    };
    assert_eq!((hits("0"), hits("1")), (0.0, 96.0), "{m}");
    assert_eq!(
        sample(&m, "vllm:prompt_tokens_total", "engine=\"1\""),
        200.0
    );
    // A rank out of range, or not a number, is refused as vLLM refuses it.
    let (s, e) = answer(on("2")).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("out of range"),
        "{e}"
    );
    assert_eq!(answer(on("x")).await.0, 400);
    // Reset clears every rank.
    let r = reqwest::Client::new()
        .post(format!("{}/reset_prefix_cache", w.info.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for h in &w.ranks {
        assert!(h.snapshot().await.unwrap().cached_block_hashes.is_empty());
    }
    w.stop().await;
}

#[tokio::test]
async fn sglang_ranks_are_named_in_the_body_or_the_header() {
    let w = one(&MockerConfig {
        enable_cache_report: true,
        ..cfg(Engine::Sglang, 3)
    })
    .await;
    let p = tokens(100, 3);
    let with = |extra: Value| {
        let mut b = json!({"prompt": p, "max_tokens": 1});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // Warm rank 2 by the old field name; the new name and the header find it.
    answer(post(&w, &with(json!({"data_parallel_rank": 2})))).await;
    let (_, a) = answer(post(&w, &with(json!({"routed_dp_rank": 2})))).await;
    assert_eq!(cached(&a), 96, "{a}");
    let (_, a) = answer(post(&w, &with(json!({}))).header("X-Data-Parallel-Rank", "2")).await;
    assert_eq!(cached(&a), 96, "{a}");
    // The header wins over the body, as in SGLang.
    let (_, a) = answer(
        post(&w, &with(json!({"data_parallel_rank": 1}))).header("X-Data-Parallel-Rank", "2"),
    )
    .await;
    assert_eq!(cached(&a), 96, "{a}");
    let (s, e) = answer(post(&w, &with(json!({"data_parallel_rank": 3})))).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = answer(post(&w, &with(json!({"routed_dp_rank": -1})))).await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("routed_dp_rank"))
    );
    let snap = |r: usize| w.ranks[r].snapshot();
    assert!(snap(0).await.unwrap().cached_block_hashes.is_empty());
    assert!(snap(1).await.unwrap().cached_block_hashes.is_empty());
    assert!(!snap(2).await.unwrap().cached_block_hashes.is_empty());
    w.stop().await;
}

#[tokio::test]
async fn without_a_rank_each_engine_picks_as_it_does() {
    // SGLang: round robin, so a repeated prompt lands on the next rank (no hit) and comes
    // back to the first on the third send.
    let w = one(&MockerConfig {
        enable_cache_report: true,
        ..cfg(Engine::Sglang, 2)
    })
    .await;
    let body = json!({"prompt": tokens(100, 4), "max_tokens": 1});
    let hits: Vec<u64> = [
        answer(post(&w, &body)).await.1,
        answer(post(&w, &body)).await.1,
        answer(post(&w, &body)).await.1,
    ]
    .iter()
    .map(cached)
    .collect();
    assert_eq!(hits, [0, 0, 96]);
    w.stop().await;
    // vLLM: the least loaded rank, the lowest when all are idle: a repeat hits.
    let w = one(&cfg(Engine::Vllm, 2)).await;
    assert_eq!(cached(&answer(post(&w, &body)).await.1), 0);
    assert_eq!(cached(&answer(post(&w, &body)).await.1), 96);
    assert!(w.ranks[1]
        .snapshot()
        .await
        .unwrap()
        .cached_block_hashes
        .is_empty());
    w.stop().await;
}

#[tokio::test]
async fn rank_event_ports_follow_rank_zeros() {
    let ws = spawn_workers(&cfg(Engine::Sglang, 3), 2).await.unwrap();
    for w in &ws {
        let port = |e: &Option<String>| -> u16 {
            e.as_deref()
                .unwrap()
                .rsplit_once(':')
                .unwrap()
                .1
                .parse()
                .unwrap()
        };
        let (ep, rep) = (
            port(&w.info.kv_events_endpoint),
            port(&w.info.replay_endpoint),
        );
        // Ranks 1 and 2 hold the next two ports of each kind: binding them again fails.
        for p in [ep + 1, ep + 2, rep + 1, rep + 2] {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", p)).is_err(),
                "port {p} is free"
            );
        }
    }
    for w in ws {
        w.stop().await;
    }
    // Data parallelism is for aggregated workers only.
    let bad = MockerConfig {
        disaggregation_mode: kvrouter_mocker::DisaggregationMode::Prefill,
        ..cfg(Engine::Vllm, 2)
    };
    assert!(spawn_workers(&bad, 1).await.is_err());
}
