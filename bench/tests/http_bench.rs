//! The HTTP benchmark end to end against in-process mock workers (no modelled delay): every
//! request succeeds, usage sums add up, per-request streams are consistent, and the engine's
//! measured hit rate equals the bound where it must.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvrouter_bench::bound::bound;
use kvrouter_bench::client::{http_client, Api};
use kvrouter_bench::report::{self, Results, WorkloadInfo};
use kvrouter_bench::runner::{run, RunOptions};
use kvrouter_bench::trace::load_trace;
use kvrouter_bench::workload::{
    from_trace, poisson_offsets, prefix_workload, BenchRequest, PrefixSpec, Schedule,
};
use kvrouter_mocker::{spawn_workers, MockerConfig};

fn options(url: &str) -> RunOptions {
    RunOptions {
        label: "mock".into(),
        base_url: url.to_string(),
        more_urls: Vec::new(),
        model: None,
        api: Api::Completions,
        tokenizer: None,
        timeout: Duration::from_secs(120),
        max_duration: Some(Duration::from_secs(600)),
        progress: false,
    }
}

fn spec(requests: usize) -> PrefixSpec {
    PrefixSpec {
        requests,
        prefixes: 3,
        prefix_len: (64, 130),
        suffix_len: (5, 40),
        osl: (2, 6),
        seed: 11,
    }
}

/// Per-request checks against what was asked: all succeeded, once each, with consistent usage,
/// chunks and latencies. A mock worker sends one chunk per token; a frontend that decodes text
/// may send fewer (a token whose text is still an incomplete character has no chunk of its own).
fn check_records(
    reqs: &[BenchRequest],
    records: &[kvrouter_bench::client::RequestRecord],
    block: u64,
    chunk_per_token: bool,
) {
    assert_eq!(records.len(), reqs.len());
    let mut seen = vec![false; reqs.len()];
    for r in records {
        assert!(r.ok, "request {} failed: {:?}", r.index, r.error);
        assert!(!seen[r.index], "request {} twice", r.index);
        seen[r.index] = true;
        let want = &reqs[r.index];
        let u = r.usage.expect("usage in every stream");
        assert_eq!(u.prompt_tokens, want.prompt.len() as u64);
        assert_eq!(u.completion_tokens, want.max_tokens as u64);
        assert!(u.cached_tokens < u.prompt_tokens);
        assert_eq!(u.cached_tokens % block, 0, "whole blocks only");
        if chunk_per_token {
            assert_eq!(r.chunks, want.max_tokens as u64, "one chunk per token");
        } else {
            assert!((1..=want.max_tokens as u64).contains(&r.chunks));
        }
        assert_eq!(r.itl_ms.len() as u64, r.chunks - 1);
        let ttft = r.ttft_ms.expect("a first token");
        assert!(ttft <= r.e2e_ms);
    }
}

/// Mock workers without delays whose 4,096 blocks of 16 tokens never fill in these tests.
fn infinite_cache() -> MockerConfig {
    MockerConfig {
        speedup_ratio: 0.0,
        num_gpu_blocks: 4096,
        block_size: 16,
        kv_events: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_run_hits_exactly_what_an_infinite_cache_hits() {
    let config = infinite_cache();
    let workers = spawn_workers(&config, 1).await.unwrap();
    let reqs = prefix_workload(&spec(40));
    let b = bound(reqs.iter().map(|r| r.prompt.as_slice()), 16, 4096);
    let outcome = run(
        &http_client(),
        &options(&workers[0].info.url),
        Arc::new(reqs.clone()),
        &Schedule::Closed { concurrency: 1 },
    )
    .await
    .unwrap();
    check_records(&reqs, &outcome.records, 16, true);
    let r = &outcome.report;
    assert_eq!((r.errors, r.succeeded, r.requests), (0, 40, 40));
    let prompt: usize = reqs.iter().map(|q| q.prompt.len()).sum();
    let out: usize = reqs.iter().map(|q| q.max_tokens).sum();
    assert_eq!(r.prompt_tokens, prompt as u64);
    assert_eq!(r.completion_tokens, out as u64);
    assert_eq!(b.prompt_tokens, prompt as u64);
    // One worker whose cache never fills, one request at a time: the engine's prefix cache is
    // the infinite cache, token for token.
    assert!(b.infinite_hit_rate > 0.3, "{b:?}");
    assert_eq!(b.pooled_lru_hit_rate, b.infinite_hit_rate);
    assert_eq!(r.hit_rate, Some(b.infinite_hit_rate));
    assert_eq!(r.cached_tokens as f64 / prompt as f64, b.infinite_hit_rate);
    // A mock worker has no router metrics.
    assert_eq!(r.predicted_hit_rate, None);
    assert_eq!(r.router_overhead_us, None);
    assert_eq!(
        r.model, workers[0].info.model,
        "model discovered from /v1/models"
    );
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_several_urls_sends_to_each_in_turn() {
    let config = infinite_cache();
    let workers = spawn_workers(&config, 2).await.unwrap();
    let urls: Vec<String> = workers.iter().map(|w| w.info.url.clone()).collect();
    let reqs = prefix_workload(&spec(40));
    let client = http_client();
    let outcome = run(
        &client,
        &RunOptions {
            more_urls: vec![urls[1].clone()],
            ..options(&urls[0])
        },
        Arc::new(reqs.clone()),
        &Schedule::Closed { concurrency: 1 },
    )
    .await
    .unwrap();
    check_records(&reqs, &outcome.records, 16, true);
    let r = &outcome.report;
    assert_eq!(r.errors, 0);
    // Each worker computed the uncached prompts of its half; together, all of them.
    let mut computed = Vec::new();
    for u in &urls {
        let text = client
            .get(format!("{u}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let name = "kvrouter_mocker_computed_prefill_tokens_total";
        let v: f64 = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        computed.push(v);
    }
    assert!(computed.iter().all(|&c| c > 0.0), "{computed:?}");
    let even: usize = reqs.iter().step_by(2).map(|q| q.prompt.len()).sum();
    assert!(
        computed[0] <= even as f64,
        "worker 0 took only the even requests"
    );
    assert_eq!(
        computed.iter().sum::<f64>(),
        (r.prompt_tokens - r.cached_tokens) as f64
    );
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_open_loop_runs_add_up_and_write_reports() {
    let config = MockerConfig {
        speedup_ratio: 0.0,
        num_gpu_blocks: 64,
        block_size: 16,
        ..Default::default()
    };
    let workers = spawn_workers(&config, 1).await.unwrap();
    let url = &workers[0].info.url;
    let client = http_client();
    let reqs = Arc::new(prefix_workload(&spec(60)));

    let closed = run(
        &client,
        &options(url),
        reqs.clone(),
        &Schedule::Closed { concurrency: 6 },
    )
    .await
    .unwrap();
    check_records(&reqs, &closed.records, 16, true);
    let open = run(
        &client,
        &RunOptions {
            label: "open".into(),
            ..options(&format!("{url}/v1/"))
        },
        reqs.clone(),
        &Schedule::Open {
            offsets_ms: poisson_offsets(reqs.len(), 2000.0, 3),
        },
    )
    .await
    .unwrap();
    check_records(&reqs, &open.records, 16, true);
    for o in [&closed, &open] {
        let r = &o.report;
        assert_eq!(r.errors, 0);
        let cached: u64 = o
            .records
            .iter()
            .map(|x| x.usage.unwrap().cached_tokens)
            .sum();
        assert_eq!(r.cached_tokens, cached);
        assert_eq!(r.hit_rate, Some(cached as f64 / r.prompt_tokens as f64));
        assert!(r.requests_per_s > 0.0 && r.output_tokens_per_s > r.requests_per_s);
        assert_eq!(r.ttft_ms.unwrap().count, 60);
    }

    // Reports from both runs.
    let b = bound(reqs.iter().map(|r| r.prompt.as_slice()), 16, 64);
    let results = Results {
        config: serde_json::json!({"workload": "prefix"}),
        workload: WorkloadInfo {
            kind: "prefix".into(),
            requests: reqs.len(),
            ..Default::default()
        },
        runs: vec![closed.report.clone(), open.report.clone()],
        bound: b,
    };
    let dir = std::env::temp_dir().join(format!("kvrouter-bench-test-{}", std::process::id()));
    let written = report::write_all(
        &dir,
        &results,
        &[
            ("mock".into(), closed.records.clone()),
            ("open".into(), open.records.clone()),
        ],
    )
    .unwrap();
    assert_eq!(written.len(), 6);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["runs"][0]["mode"], "mock");
    for key in [
        "hit_rate",
        "requests_per_s",
        "output_tokens_per_s",
        "errors",
    ] {
        assert!(json["runs"][1][key].is_number(), "{key}");
    }
    for fig in ["ttft_ms", "itl_ms", "e2e_ms"] {
        for p in ["p50", "p90", "p99", "mean"] {
            assert!(json["runs"][0][fig][p].is_number(), "{fig}.{p}");
        }
    }
    assert!(json["bound"]["pooled_lru_hit_rate"].is_number());
    assert!(json["bound"]["infinite_hit_rate"].is_number());
    let lines = std::fs::read_to_string(dir.join("requests.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 120);
    for svg in ["ttft_cdf.svg", "hit_rate.svg", "throughput.svg"] {
        let s = std::fs::read_to_string(dir.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("open"), "{svg}");
    }
    assert!(std::fs::read_to_string(dir.join("report.md"))
        .unwrap()
        .contains("| open |"));
    std::fs::remove_dir_all(&dir).ok();
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mooncake_trace_replays_and_errors_are_counted() {
    let shared = std::env::var("KVROUTER_SHARED")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").to_string());
    let trace = load_trace(
        &Path::new(&shared).join("data/traces/conversation_trace.jsonl"),
        Some(12),
    )
    .unwrap();
    let config = MockerConfig {
        speedup_ratio: 0.0,
        ..Default::default()
    };
    let workers = spawn_workers(&config, 1).await.unwrap();
    let url = &workers[0].info.url;
    // Compress the first 12 arrivals into well under a second.
    let span = (trace.last().unwrap().timestamp - trace[0].timestamp) as f64;
    let (reqs, schedule) = from_trace(&trace, span / 200.0);
    let Schedule::Open { offsets_ms } = &schedule else {
        panic!("traces are open loop")
    };
    assert!((offsets_ms.last().unwrap() - 200.0).abs() < 1e-6);
    let client = http_client();
    let o = run(&client, &options(url), Arc::new(reqs.clone()), &schedule)
        .await
        .unwrap();
    check_records(&reqs, &o.records, 64, true);
    // Every conversation request starts with hash id 0: all but the first reuse it (whole
    // 64-token blocks of the 512-token block at least), unless they arrived together.
    let hits = o
        .records
        .iter()
        .filter(|r| r.usage.unwrap().cached_tokens >= 512)
        .count();
    assert!(hits >= 1, "{:?}", o.report);

    // A wrong model name: every request fails with the server's message, nothing is lost.
    let bad = run(
        &client,
        &RunOptions {
            model: Some("no-such-model".into()),
            ..options(url)
        },
        Arc::new(reqs.clone()),
        &Schedule::Closed { concurrency: 3 },
    )
    .await
    .unwrap();
    assert_eq!((bad.report.errors, bad.report.succeeded), (12, 0));
    assert_eq!(bad.report.hit_rate, None);
    assert!(
        bad.report.error_samples[0].starts_with("HTTP 4"),
        "{:?}",
        bad.report
    );
    let by_index: HashMap<usize, _> = bad.records.iter().map(|r| (r.index, r)).collect();
    assert_eq!(by_index.len(), 12);

    // Nothing listening: connection errors, not a hang or a panic.
    let closed = run(
        &client,
        &RunOptions {
            model: Some("m".into()),
            ..options("http://127.0.0.1:9")
        },
        Arc::new(reqs[..2].to_vec()),
        &Schedule::Closed { concurrency: 1 },
    )
    .await
    .unwrap();
    assert_eq!(closed.report.errors, 2);
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvrouter_frontend_figures_are_scraped() {
    use kvrouter_core::config::RouterMode;
    use kvrouter_server::up::{EmbeddedStack, UpConfig};
    let mut cfg = UpConfig {
        workers: 2,
        ..UpConfig::default()
    };
    cfg.mocker.speedup_ratio = 0.0;
    cfg.mocker.num_gpu_blocks = 1024;
    cfg.mocker.block_size = 16;
    cfg.frontend.router_mode = RouterMode::Kv;
    cfg.frontend.kv_cache_block_size = Some(16);
    cfg.frontend.fleet.no_admin = true;
    let stack = EmbeddedStack::start(cfg).await.unwrap();
    let reqs = Arc::new(prefix_workload(&spec(30)));
    let o = run(
        &http_client(),
        &options(&stack.url()),
        reqs.clone(),
        &Schedule::Closed { concurrency: 2 },
    )
    .await
    .unwrap();
    stack.stop().await;
    check_records(&reqs, &o.records, 16, false);
    let r = &o.report;
    assert_eq!(r.model, "Qwen/Qwen3-0.6B");
    let predicted = r
        .predicted_hit_rate
        .expect("kvrouter exposes predicted tokens");
    assert!(predicted > 0.0 && predicted <= 1.0, "{r:?}");
    let overhead = r.router_overhead_us.as_ref().expect("and routing overhead");
    assert!(overhead["total"] > 0.0, "{overhead:?}");
    let per_worker = r.requests_per_worker.as_ref().expect("and decisions");
    assert_eq!(per_worker.values().sum::<u64>(), 30, "{per_worker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompts_are_decoded_text_and_still_share_prefixes() {
    let shared = std::env::var("KVROUTER_SHARED")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").to_string());
    let dir = Path::new(&shared).join("data/tokenizers/qwen3");
    let config = MockerConfig {
        speedup_ratio: 0.0,
        block_size: 16,
        model_path: Some(dir.clone()),
        ..Default::default()
    };
    let workers = spawn_workers(&config, 1).await.unwrap();
    let tokenizer = Arc::new(kvrouter_preprocess::Preprocessor::from_model_dir(&dir).unwrap());
    let reqs = Arc::new(prefix_workload(&spec(12)));
    let o = run(
        &http_client(),
        &RunOptions {
            api: Api::Chat,
            tokenizer: Some(tokenizer),
            ..options(&workers[0].info.url)
        },
        reqs.clone(),
        &Schedule::Closed { concurrency: 1 },
    )
    .await
    .unwrap();
    let r = &o.report;
    assert_eq!((r.errors, r.succeeded), (0, 12), "{r:?}");
    // The text re-tokenizes to a different count, but a chat-templated prompt of it is there
    // and the shared system prompts are still shared.
    assert!(r.prompt_tokens > 12 * 50, "{r:?}");
    assert!(r.hit_rate.unwrap() > 0.2, "{r:?}");
    assert_eq!(
        r.completion_tokens,
        reqs.iter().map(|q| q.max_tokens as u64).sum::<u64>()
    );
    // Without a tokenizer the chat API cannot be driven.
    let err = run(
        &http_client(),
        &RunOptions {
            api: Api::Chat,
            ..options(&workers[0].info.url)
        },
        reqs,
        &Schedule::Closed { concurrency: 1 },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, kvrouter_bench::runner::RunError::NoTokenizer));
    for w in workers {
        w.stop().await;
    }
}
