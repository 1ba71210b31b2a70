//! LoRA adapters and cache salts end to end (issue 20 items 4 and 5): the frontend in KV mode
//! in front of mock workers with data-parallel ranks that serve adapters
//! (`--enable-lora --lora-modules`). A request whose `model` is an adapter runs on a worker
//! serving it and is hashed with it, as the workers' KV events are (`lora_name`); a
//! `cache_salt` is forwarded and hashed alike. The same prompt under one adapter or salt
//! shares cache — the router predicts it and the engine reports it — and under another, or
//! none, never does.
use kvrouter_core::hash::HashOptions;
use kvrouter_core::{RolePool, RouterMode};
use kvrouter_mocker::lora::LoraModule;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use kvrouter_server::frontend::{DP_RANK_HEADER, PREDICTED_CACHED_HEADER};
use kvrouter_server::up::worker_spec;
use kvrouter_server::{Frontend, FrontendConfig};
use serde_json::{json, Value};

use crate::common::*;

/// 1024 tokens in 64-token blocks: a full repeat hits 15 blocks (the last token is computed).
const PROMPT_TOKENS: usize = 1024;
const HIT: u64 = 960;

/// What one completion got: the rank that served it, the prompt tokens the router predicted
/// cached there, and those the engine reported cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Served {
    worker: u64,
    rank: u32,
    predicted: u64,
    reported: u64,
}

/// A completion of `tokens` as `model`, with `cache_salt` when given.
async fn send(
    c: &reqwest::Client,
    url: &str,
    tokens: &[u32],
    model: &str,
    salt: Option<&str>,
) -> Served {
    send_with(c, url, tokens, model, salt, Value::Null).await
}

/// [`send`] with routing hints `nvext` (null: none).
async fn send_with(
    c: &reqwest::Client,
    url: &str,
    tokens: &[u32],
    model: &str,
    salt: Option<&str>,
    nvext: Value,
) -> Served {
    let mut body = json!({"model": model, "prompt": tokens, "max_tokens": 2, "nvext": nvext});
    if let Some(s) = salt {
        body["cache_salt"] = json!(s);
    }
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{model} {salt:?}");
    let worker = worker_of(&r).expect("worker header");
    let rank = header_u64(&r, DP_RANK_HEADER).expect("rank header") as u32;
    let predicted = header_u64(&r, PREDICTED_CACHED_HEADER).expect("predicted header");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], model, "answered as the model asked for");
    let reported = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{v}"));
    Served {
        worker,
        rank,
        predicted,
        reported,
    }
}

/// Mock workers, two ranks each, serving `adapters` (none: LoRA off).
async fn workers(n: usize, adapters: &[&str]) -> Vec<RunningWorker> {
    let cfg = MockerConfig {
        model_path: Some(kvrouter_server::vendored_model_dir()),
        speedup_ratio: 0.0,
        num_gpu_blocks: 1024,
        block_size: 64,
        data_parallel_size: 2,
        enable_lora: !adapters.is_empty(),
        lora_modules: adapters
            .iter()
            .map(|a| format!("{a}=/adapters/{a}").parse::<LoraModule>().unwrap())
            .collect(),
        ..MockerConfig::default()
    };
    spawn_workers(&cfg, n).await.expect("mock workers start")
}

/// The frontend in KV mode in front of `workers`.
async fn frontend(workers: &[RunningWorker]) -> Frontend {
    let fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    let specs = workers.iter().map(worker_spec).collect();
    Frontend::start(fc, specs).await.expect("frontend starts")
}

/// Waits until the router's index holds `tokens`' blocks hashed with `opts` (their KV events
/// arrived).
async fn indexed(f: &Frontend, tokens: &[u32], opts: HashOptions<'_>) {
    let router = &f.fleet.router;
    assert!(
        eventually(
            10.0,
            || router.best_cached_tokens(tokens, RolePool::Any, &opts) as u64 >= HIT
        )
        .await,
        "the KV events of {opts:?} never reached the index"
    );
}

async fn stop(f: Frontend, workers: Vec<RunningWorker>) {
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_shares_cache_under_one_adapter_and_never_across_adapters() {
    // Worker 0 serves `sql` and `chat`, worker 1 `sql` only; two ranks each.
    let mut ws = workers(1, &["sql", "chat"]).await;
    ws.extend(workers(1, &["sql"]).await);
    let f = frontend(&ws).await;
    let (c, url) = (client(), f.url());
    let id_of = |i: usize| {
        f.fleet
            .registry
            .all()
            .iter()
            .find(|w| w.spec.url == ws[i].info.url)
            .unwrap()
            .id()
    };
    let (both, sql_only) = (id_of(0), id_of(1));

    // The models list: the served model, then each adapter with the served one as parent.
    let models = get_json(&c, &format!("{url}/v1/models")).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "chat", "sql"], "{models}");
    assert_eq!(models["data"][1]["parent"], MODEL);
    let card = get_json(&c, &format!("{url}/v1/models/chat")).await;
    assert_eq!(
        (&card["id"], &card["parent"]),
        (&json!("chat"), &json!(MODEL))
    );

    // An adapter no worker serves is an unknown model.
    let p = prompt(1, PROMPT_TOKENS);
    let (st, _, v) = complete(&c, &url, json!({"model": "nope", "prompt": p})).await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    assert_eq!(get_status(&c, &format!("{url}/v1/models/nope")).await, 404);

    // Under `chat` (worker 0 only): a miss, then the repeat goes back to its rank, where
    // the router predicts and the engine reports the hit.
    let first = send(&c, &url, &p, "chat", None).await;
    assert_eq!(
        (first.worker, first.predicted, first.reported),
        (both, 0, 0)
    );
    let chat = HashOptions {
        lora_name: Some("chat"),
        ..Default::default()
    };
    indexed(&f, &p, chat).await;
    let again = send(&c, &url, &p, "chat", None).await;
    assert_eq!(
        again,
        Served {
            predicted: PROMPT_TOKENS as u64,
            reported: HIT,
            ..first
        }
    );
    // The same prompt under `sql`, or the base model, shares nothing with `chat`'s blocks:
    // not predicted, not reported, wherever it runs.
    for model in ["sql", MODEL] {
        let other = send(&c, &url, &p, model, None).await;
        assert_eq!(
            (other.predicted, other.reported),
            (0, 0),
            "{model}: {other:?}"
        );
    }
    let sql = HashOptions {
        lora_name: Some("sql"),
        ..Default::default()
    };
    indexed(&f, &p, sql).await;
    let sql_again = send(&c, &url, &p, "sql", None).await;
    assert_eq!(
        (sql_again.predicted, sql_again.reported),
        (PROMPT_TOKENS as u64, HIT),
        "{sql_again:?}"
    );

    // New prompts under each adapter, placed first on every rank that serves it (by rank,
    // or by worker and rank): each repeat, unplaced, goes back to that rank's cache. `chat`
    // goes to worker 0 only, even when its first send names no worker.
    let placements = [
        ("chat", json!({"dp_rank": 0})),
        ("chat", json!({"dp_rank": 1})),
        ("chat", Value::Null),
        ("sql", json!({"backend_instance_id": both, "dp_rank": 0})),
        ("sql", json!({"backend_instance_id": both, "dp_rank": 1})),
        (
            "sql",
            json!({"backend_instance_id": sql_only, "dp_rank": 0}),
        ),
        (
            "sql",
            json!({"backend_instance_id": sql_only, "dp_rank": 1}),
        ),
    ];
    let mut seen = Vec::new();
    for (seed, (model, nvext)) in (10..).zip(placements) {
        let p = prompt(seed, PROMPT_TOKENS);
        let first = send_with(&c, &url, &p, model, None, nvext.clone()).await;
        if let Some(r) = nvext.get("dp_rank") {
            assert_eq!(json!(first.rank), *r, "{model} {nvext}");
        }
        if model == "chat" {
            assert_eq!(first.worker, both, "only worker {both} serves chat");
        }
        let opts = HashOptions {
            lora_name: Some(model),
            ..Default::default()
        };
        indexed(&f, &p, opts).await;
        let again = send(&c, &url, &p, model, None).await;
        assert_eq!(
            again,
            Served {
                predicted: PROMPT_TOKENS as u64,
                reported: HIT,
                ..first
            },
            "{model} {nvext}"
        );
        seen.push((model, first.worker, first.rank));
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen.len(),
        6,
        "every (adapter, worker, rank) served: {seen:?}"
    );

    // The mock's events named their adapters: nothing was indexed without one.
    let admin = f.admin_url().expect("admin API");
    let v = get_json(&c, &format!("{admin}/v1/workers")).await;
    for w in v["workers"].as_array().unwrap() {
        for r in w["ranks"].as_array().unwrap() {
            assert_eq!(r["kv_events"]["lora_unmapped"], 0, "{r}");
        }
    }
    assert_eq!(
        v["workers"][0]["spec"]["lora_adapters"],
        json!(["sql", "chat"])
    );
    assert!(eventually(5.0, || fleet_idle(&f.fleet)).await);
    stop(f, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_that_salt_never_share_blocks() {
    let ws = workers(2, &["chat"]).await;
    let f = frontend(&ws).await;
    let (c, url) = (client(), f.url());
    let p = prompt(3, PROMPT_TOKENS);
    let first = send(&c, &url, &p, MODEL, Some("tenant-1")).await;
    assert_eq!((first.predicted, first.reported), (0, 0));
    let salted = |salt| HashOptions {
        cache_salt: Some(salt),
        ..Default::default()
    };
    indexed(&f, &p, salted("tenant-1")).await;
    // The same tenant shares its blocks, on the rank that holds them.
    let again = send(&c, &url, &p, MODEL, Some("tenant-1")).await;
    assert_eq!(
        again,
        Served {
            predicted: PROMPT_TOKENS as u64,
            reported: HIT,
            ..first
        }
    );
    // Another tenant, no salt, or the salt under an adapter: no prediction, no engine hit.
    for (model, salt) in [
        (MODEL, Some("tenant-2")),
        (MODEL, None),
        ("chat", Some("tenant-1")),
    ] {
        let other = send(&c, &url, &p, model, salt).await;
        assert_eq!(
            (other.predicted, other.reported),
            (0, 0),
            "{model} {salt:?}: {other:?}"
        );
    }
    // Each of those is cached under its own key now: its repeat hits.
    indexed(&f, &p, salted("tenant-2")).await;
    let t2 = send(&c, &url, &p, MODEL, Some("tenant-2")).await;
    assert_eq!((t2.predicted, t2.reported), (PROMPT_TOKENS as u64, HIT));
    // A salt must be a non-empty string, as vLLM wants it.
    let (st, _, v) = complete(
        &c,
        &url,
        json!({"model": MODEL, "prompt": p, "cache_salt": 7}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert!(eventually(5.0, || fleet_idle(&f.fleet)).await);
    stop(f, ws).await;
}
