//! The OpenAI surface: shapes of responses and chunks, the chat template, streaming latency,
//! and the official `openai` Python SDK against the running server.

use kvrouter_core::RouterMode;
use kvrouter_preprocess::Preprocessor;
use kvrouter_server::frontend::request::{parse_request, Endpoint, Limits};
use serde_json::{json, Value};

use crate::common::*;

#[test]
fn chat_template_gives_the_reference_token_ids() {
    let pre = Preprocessor::from_model_dir(kvrouter_server::vendored_model_dir())
        .expect("vendored tokenizer");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    let req = parse_request(
        Endpoint::ChatCompletions,
        &serde_json::to_vec(&body).unwrap(),
        MODEL,
        &pre,
        None,
        Limits {
            context_length: 1000,
            max_tokens: 1000,
            client_routing: true,
            tool_parser: None,
            reasoning_parser: None,
        },
    )
    .expect("parses");
    assert_eq!(
        req.tokens,
        vec![151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_chunks_have_openai_shapes() {
    let s = stack(RouterMode::Kv, 2, |_| {}).await;
    let c = client();
    let url = s.url();
    let models: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let h = c.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(h.json::<Value>().await.unwrap()["healthy_workers"], 2);

    // Chat, not streamed: the rendered "Hi" prompt is 9 tokens.
    let v: Value = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    // Chat, streamed with usage.
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                      "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}))
        .send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let finish: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, vec!["length"]);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.is_empty());

    // Completions with a text prompt, streamed without usage.
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "stream": true}))
        .send().await.unwrap();
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.len(), 4, "3 token chunks and [DONE]: {events:?}");
    assert!(events.iter().all(|e| !e.contains("\"usage\":{")));

    let m = metrics_text(&c, &url).await;
    for name in [
        "kvrouter_frontend_requests_total{",
        "kvrouter_frontend_time_to_first_token_seconds_bucket",
        "kvrouter_frontend_inter_token_latency_seconds_bucket",
        "kvrouter_frontend_request_duration_seconds_bucket",
        "kvrouter_frontend_input_tokens_total",
        "kvrouter_frontend_output_tokens_total",
        "kvrouter_frontend_cached_tokens_total",
        "kvrouter_frontend_inflight_requests",
        "kvrouter_router_overhead_seconds_bucket{le=\"0.000001\",stage=\"hashing\"}",
        "kvrouter_router_overhead_seconds_count{stage=\"find_matches\"}",
        "kvrouter_router_overhead_seconds_count{stage=\"selection\"}",
        "kvrouter_router_predicted_cached_tokens_total",
        "kvrouter_worker_active_decode_blocks{",
        "kvrouter_worker_active_prefill_tokens{",
        "kvrouter_kv_events_total{",
        "kvrouter_kv_index_entries",
    ] {
        assert!(m.contains(name), "metric {name} missing from:\n{m}");
    }
    assert_eq!(metric(&m, "kvrouter_frontend_output_tokens_total"), 14.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_against_the_frontend() {
    let Some(python) = std::env::var_os("KVROUTER_PYTHON") else {
        panic!("KVROUTER_PYTHON is not set: run the suite through scripts/test, which creates the venv with the openai SDK");
    };
    let s = stack(RouterMode::Kv, 2, |_| {}).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let url = format!("{}/v1", s.url());
    // Blocking is fine: the stack runs on the runtime's other worker threads.
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&url)
        .arg(MODEL)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("openai sdk: all checks passed"), "{stdout}");
    s.stop().await;
}
