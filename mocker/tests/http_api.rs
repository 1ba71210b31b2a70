//! The HTTP API on real sockets with a real client.
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use serde_json::{json, Value};
use std::path::PathBuf;

fn fast(blocks: usize, block_size: usize) -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: blocks,
        block_size,
        speedup_ratio: 0.0,
        vocab_size: 1000,
        ..Default::default()
    }
}

/// The Qwen3 tokenizer vendored in the repository.
fn qwen3_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3")
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn post_raw(url: &str, body: &'static str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// SSE `data:` payloads of a finished stream.
async fn sse(url: &str, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter(|s| !s.is_empty())
        .map(|s| s.strip_prefix("data: ").expect("data line").to_owned())
        .collect()
}

fn tokens(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 13 + salt) % 1000).collect()
}

async fn one(cfg: &MockerConfig) -> RunningWorker {
    spawn_workers(cfg, 1).await.unwrap().pop().unwrap()
}

#[tokio::test]
async fn token_prompt_completion_reports_the_real_prefix_hit() {
    let w = one(&fast(256, 16)).await;
    let url = format!("{}/v1/completions", w.info.url);
    let p = tokens(100, 1);
    let (s, a) = post(
        &url,
        json!({"model": "mock-model", "prompt": p, "max_tokens": 5}),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(a["choices"][0]["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(a["usage"]["prompt_tokens"], 100);
    assert_eq!(a["usage"]["completion_tokens"], 5);
    assert_eq!(a["usage"]["total_tokens"], 105);
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Same prompt again (nested form): 6 full blocks of 16 are cached.
    let (_, b) = post(&url, json!({"prompt": [p], "max_tokens": 5})).await;
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    assert_eq!(
        a["choices"][0]["token_ids"], b["choices"][0]["token_ids"],
        "deterministic output"
    );
    // Default max_tokens is 16.
    let (_, c) = post(&url, json!({"prompt": tokens(10, 7)})).await;
    assert_eq!(c["usage"]["completion_tokens"], 16);
    w.stop().await;
}

#[tokio::test]
async fn streaming_with_usage_and_done() {
    let w = one(&fast(256, 16)).await;
    let url = format!("{}/v1/completions", w.info.url);
    let p = tokens(40, 2);
    post(&url, json!({"prompt": p, "max_tokens": 1})).await;
    let chunks = sse(
        &url,
        json!({"prompt": p, "max_tokens": 4, "stream": true,
                                  "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(chunks.len(), 4 + 1 + 1, "{chunks:?}");
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = chunks[..5]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    for (i, c) in parsed[..4].iter().enumerate() {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["token_ids"].as_array().unwrap().len(), 1);
        let fr = &c["choices"][0]["finish_reason"];
        if i == 3 {
            assert_eq!(fr, "length")
        } else {
            assert!(fr.is_null())
        }
    }
    assert_eq!(parsed[4]["choices"], json!([]));
    assert_eq!(parsed[4]["usage"]["completion_tokens"], 4);
    assert_eq!(
        parsed[4]["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );
    // Without include_usage: tokens then [DONE].
    let chunks = sse(&url, json!({"prompt": p, "max_tokens": 3, "stream": true})).await;
    assert_eq!(chunks.len(), 4);
    w.stop().await;
}

#[tokio::test]
async fn bad_input_gets_openai_errors_and_the_engine_keeps_serving() {
    let w = one(&fast(8, 16)).await; // capacity 128 tokens, vocab 1000
    let url = format!("{}/v1/completions", w.info.url);
    let check = |(s, v): (u16, Value), code: u16, needle: &str| {
        assert_eq!(s, code, "{v}");
        let e = &v["error"];
        assert_eq!(e["code"], code, "{v}");
        assert!(e["type"].is_string() && e.get("param").is_some(), "{v}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
    };
    check(
        post_raw(&url, "{\"prompt\": [1, 2").await,
        400,
        "Invalid JSON",
    );
    check(post_raw(&url, "not json").await, 400, "Invalid JSON");
    check(post(&url, json!({"prompt": []})).await, 400, "empty");
    check(post(&url, json!({"prompt": [[]]})).await, 400, "empty");
    check(post(&url, json!({"max_tokens": 3})).await, 400, "prompt");
    check(
        post(&url, json!({"prompt": tokens(120, 0), "max_tokens": 9})).await,
        400,
        "maximum context length is 128",
    );
    check(
        post(&url, json!({"prompt": tokens(200, 0)})).await,
        400,
        "maximum context length",
    );
    check(
        post(&url, json!({"prompt": [1, 1000]})).await,
        400,
        "out of vocabulary",
    );
    check(
        post(&url, json!({"prompt": [1, -1]})).await,
        400,
        "out of vocabulary",
    );
    check(
        post(&url, json!({"prompt": [1, 99999999999u64]})).await,
        400,
        "out of vocabulary",
    );
    check(
        post(&url, json!({"prompt": [1, 2.5]})).await,
        400,
        "Invalid request",
    );
    check(
        post(&url, json!({"prompt": [[1], [2]]})).await,
        400,
        "batched",
    );
    check(
        post(&url, json!({"prompt": [1, 2], "max_tokens": 0})).await,
        400,
        "max_tokens must be at least 1",
    );
    check(
        post(&url, json!({"prompt": [1, 2], "max_tokens": -5})).await,
        400,
        "max_tokens",
    );
    check(
        post(&url, json!({"prompt": "text"})).await,
        400,
        "tokenizer",
    );
    check(
        post(&url, json!({"prompt": [1], "model": "other"})).await,
        404,
        "does not exist",
    );
    check(
        post(
            &format!("{}/v1/chat/completions", w.info.url),
            json!({"messages": []}),
        )
        .await,
        404,
        "chat template",
    );
    let r = reqwest::get(format!("{}/nope", w.info.url)).await.unwrap();
    assert_eq!(r.status(), 404);
    // Still serving.
    let (s, v) = post(&url, json!({"prompt": tokens(100, 0), "max_tokens": 28})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 28);
    w.stop().await;
}

#[tokio::test]
async fn models_health_metrics_and_reset() {
    let w = one(&fast(256, 16)).await;
    let base = w.info.url.clone();
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "mock-model");
    assert_eq!(m["data"][0]["max_model_len"], 4096);
    let url = format!("{base}/v1/completions");
    let p = tokens(64, 5);
    post(&url, json!({"prompt": p, "max_tokens": 3})).await;
    post(&url, json!({"prompt": p, "max_tokens": 3})).await;
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, want) in [
        ("vllm:num_requests_running", "0.0"),
        ("vllm:num_requests_waiting", "0.0"),
        ("vllm:kv_cache_usage_perc", "0.0"),
        ("vllm:prefix_cache_queries_total", "128"),
        ("vllm:prefix_cache_hits_total", "48"),
        ("vllm:prompt_tokens_total", "128"),
        ("vllm:generation_tokens_total", "6"),
        ("vllm:time_to_first_token_seconds_count", "2"),
        ("vllm:inter_token_latency_seconds_count", "4"),
    ] {
        let line = format!("{name}{{engine=\"0\",model_name=\"mock-model\"}} {want}\n");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"256\""),
        "{text}"
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/reset_prefix_cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, v) = post(&url, json!({"prompt": p, "max_tokens": 3})).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    w.stop().await;
}

#[tokio::test]
async fn n_workers_are_independent() {
    let ws = spawn_workers(&fast(64, 16), 3).await.unwrap();
    let mut ports: Vec<u16> = ws.iter().map(|w| w.http_addr.port()).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    let p = tokens(64, 9);
    let (_, a) = post(
        &format!("{}/v1/completions", ws[0].info.url),
        json!({"prompt": p, "max_tokens": 1}),
    )
    .await;
    let (_, b) = post(
        &format!("{}/v1/completions", ws[1].info.url),
        json!({"prompt": p, "max_tokens": 1}),
    )
    .await;
    let (_, c) = post(
        &format!("{}/v1/completions", ws[0].info.url),
        json!({"prompt": p, "max_tokens": 1}),
    )
    .await;
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        b["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "worker 1 has its own cache"
    );
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 48);
    for w in &ws {
        assert!(w
            .info
            .kv_events_endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("tcp://127.0.0.1:")));
        assert!(w.info.replay_endpoint.is_some());
        assert_eq!(w.info.block_size, 16);
        assert_eq!(w.info.total_kv_blocks, 64);
    }
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test]
async fn client_disconnect_frees_the_request() {
    let mut cfg = fast(256, 16);
    cfg.speedup_ratio = 1.0; // ~6 ms per decode step: the request is still running when we leave
    let w = one(&cfg).await;
    let url = format!("{}/v1/completions", w.info.url);
    let mut r = reqwest::Client::new()
        .post(&url)
        .json(&json!({"prompt": tokens(50, 3), "max_tokens": 3000, "stream": true}))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(r);
    // Wait (bounded) for the engine to notice; not a timing assertion.
    let mut idle = false;
    for _ in 0..500 {
        let s = w.handle.snapshot().await.unwrap();
        if s.num_running == 0 && s.active_blocks == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(idle, "the aborted request must release its blocks");
    // The gauges say so too, though no step ran after the abort.
    let m = reqwest::get(format!("{}/metrics", w.info.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for gauge in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc"] {
        let line = m
            .lines()
            .find(|l| l.starts_with(&format!("{gauge}{{")))
            .unwrap();
        assert!(line.ends_with(" 0.0"), "{line}");
    }
    w.stop().await;
}

#[tokio::test]
async fn text_and_chat_with_the_qwen3_tokenizer() {
    let cfg = MockerConfig {
        model_path: Some(qwen3_dir()),
        model_name: Some("Qwen/Qwen3-0.6B".into()),
        num_gpu_blocks: 256,
        block_size: 4,
        speedup_ratio: 0.0,
        ..Default::default()
    };
    let w = one(&cfg).await;
    let chat = format!("{}/v1/chat/completions", w.info.url);
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let (s, v) = post(
        &chat,
        json!({"model": "Qwen/Qwen3-0.6B", "messages": msgs, "max_tokens": 6}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    assert!(v["choices"][0].get("token_ids").is_none());
    // The same conversation as token ids hits the cache the chat request filled: 2 blocks of 4.
    let comp = format!("{}/v1/completions", w.info.url);
    let ids = json!([151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]);
    let (_, v) = post(
        &comp,
        json!({"prompt": ids, "max_tokens": 2, "return_token_ids": true}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 2);
    // Text prompt.
    let (_, v) = post(&comp, json!({"prompt": "Hello world", "max_tokens": 2})).await;
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    // Streaming chat: role chunk, 5 content chunks, usage, [DONE].
    let chunks = sse(
        &chat,
        json!({"messages": msgs, "max_tokens": 5, "stream": true,
                                   "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(chunks.len(), 1 + 5 + 1 + 1, "{chunks:?}");
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..6]
        .iter()
        .map(|c| {
            serde_json::from_str::<Value>(c).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let (_, whole) = post(&chat, json!({"messages": msgs, "max_tokens": 5})).await;
    assert_eq!(
        text, whole["choices"][0]["message"]["content"],
        "stream text equals the full text"
    );
    // Chat errors.
    let (s, v) = post(&chat, json!({"messages": "nope"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = post(&chat, json!({"messages": [{"content": "no role"}]})).await;
    assert_eq!(s, 400);
    w.stop().await;
}
