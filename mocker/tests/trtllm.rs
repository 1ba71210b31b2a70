//! `--engine trtllm` over real sockets: KV events served on `POST /kv_cache_events` in
//! TensorRT-LLM's JSON shapes (drained per call, bounded buffer whose drops show as
//! `event_id` jumps, `attention_dp_rank` per rank), usage with cached tokens, and the ZMQ
//! option publishing vLLM's format.
use kvrouter_mocker::cli::Engine;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use serde_json::{json, Value};

fn cfg(dp: usize) -> MockerConfig {
    MockerConfig {
        engine: Engine::Trtllm,
        data_parallel_size: dp,
        num_gpu_blocks: 64,
        block_size: 32,
        speedup_ratio: 0.0,
        vocab_size: 1000,
        ..Default::default()
    }
}

async fn one(cfg: &MockerConfig) -> RunningWorker {
    spawn_workers(cfg, 1).await.unwrap().pop().unwrap()
}

async fn complete(w: &RunningWorker, prompt: &[u32], rank: Option<u32>) -> Value {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", w.info.url))
        .json(&json!({"prompt": prompt, "max_tokens": 2}));
    if let Some(rank) = rank {
        r = r.header("X-data-parallel-rank", rank.to_string());
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn drain(w: &RunningWorker) -> Vec<Value> {
    let r = reqwest::Client::new()
        .post(format!("{}/kv_cache_events", w.info.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

#[tokio::test]
async fn events_are_served_in_trtllms_shapes_and_drained_per_call() {
    let w = one(&cfg(1)).await;
    let line = serde_json::to_value(&w.info).unwrap();
    assert_eq!(line["engine"], "trtllm");
    assert!(
        line["kv_events_endpoint"].is_null(),
        "no ZMQ endpoint: {line}"
    );
    let prompt: Vec<u32> = (0..100).collect();
    let first = complete(&w, &prompt, None).await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let ev = drain(&w).await;
    assert_eq!(ev[0]["event_id"], 0);
    assert_eq!(
        ev[0]["data"],
        json!({"type": "created", "num_blocks_per_cache_level": [64, 0]})
    );
    assert!(ev[0].get("attention_dp_rank").is_none());
    let stored = &ev[1];
    assert_eq!(stored["event_id"], 1);
    assert_eq!(stored["window_size"], 32_768);
    assert_eq!(stored["data"]["type"], "stored");
    assert!(stored["data"]["parent_hash"].is_null());
    let blocks = stored["data"]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 3, "100 tokens: three full 32-token blocks");
    assert_eq!(blocks[0]["type"], "stored_block");
    assert_eq!(blocks[0]["cache_level"], 0);
    assert_eq!(
        blocks[1]["tokens"][0],
        json!({"type": "unique_token", "token_id": 32, "token_extra_id": 0})
    );
    // The wire crate decodes what the mock serves.
    let body = serde_json::to_vec(&ev).unwrap();
    let mut st = Default::default();
    let decoded = kvrouter_wire::trtllm::decode_events(&body, 100, &mut st).unwrap();
    assert_eq!(decoded.len(), ev.len());
    // Drained: a second call has nothing until something happens.
    assert_eq!(drain(&w).await, Vec::<Value>::new());
    let again = complete(&w, &prompt, None).await;
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    w.stop().await;
}

#[tokio::test]
async fn a_full_buffer_drops_the_oldest_events_and_ranks_are_named() {
    let w = one(&MockerConfig {
        event_buffer_max_size: 2,
        num_gpu_blocks: 8,
        ..cfg(2)
    })
    .await;
    // Eight distinct prompts of four blocks on rank 1: stores, then evictions.
    for s in 0..8u32 {
        let p: Vec<u32> = (0..128).map(|i| (i * 7 + s * 131) % 1000).collect();
        complete(&w, &p, Some(1)).await;
    }
    let ev = drain(&w).await;
    let rank =
        |r: u64| -> Vec<&Value> { ev.iter().filter(|e| e["attention_dp_rank"] == r).collect() };
    assert_eq!(rank(0).len(), 1, "rank 0 holds only its created event");
    let r1 = rank(1);
    assert_eq!(r1.len(), 2, "the buffer keeps two events");
    let ids: Vec<u64> = r1.iter().map(|e| e["event_id"].as_u64().unwrap()).collect();
    assert!(ids[0] > 1, "older events were dropped: {ids:?}");
    assert_eq!(ids[1], ids[0] + 1);
    assert!(r1.iter().any(|e| e["data"]["type"] == "removed"), "{r1:?}");
    w.stop().await;
}

#[tokio::test]
async fn the_zmq_option_publishes_vllms_format_and_http_answers_empty() {
    let w = one(&MockerConfig {
        trtllm_zmq_events: true,
        ..cfg(1)
    })
    .await;
    assert!(w.info.kv_events_endpoint.is_some());
    assert_eq!(drain(&w).await, Vec::<Value>::new());
    w.stop().await;
}
