//! OpenAI fidelity (issue 21): every field of the contract is forwarded to the worker or refused
//! with its name; a worker's output is parsed into choices, reasoning, tool calls and logprobs,
//! streamed and whole. The worker here is scripted (a real HTTP server on loopback that records
//! what it is sent), so what reaches the worker and what the client gets are both exact.
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kvrouter_core::RouterMode;
use kvrouter_server::frontend::contract::{Disposition, Neutral, On, FIELDS};
use kvrouter_server::frontend::reasoning::ReasoningParser;
use kvrouter_server::frontend::tools::ToolCallParser;
use kvrouter_server::{Frontend, FrontendConfig};
use serde_json::{json, Value};

use crate::common::*;

/// Two choices: 0 thinks, then calls a tool, split at awkward places; 1 answers plainly.
const SCRIPT: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"text\":\"<think>\\nPlan\",\"token_ids\":[1],\"logprobs\":{\"tokens\":[\"<think>\\nPlan\"],\"token_logprobs\":[-0.1],\"top_logprobs\":[{\"<think>\\nPlan\":-0.1,\"x\":-2.0}],\"text_offset\":[0]}}]}\n\n",
    "data: {\"choices\":[{\"index\":1,\"text\":\"Hello\",\"token_ids\":[2]}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"text\":\".</thi\",\"token_ids\":[3]}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"text\":\"nk>\\n\\n<tool_call>\\n{\\\"name\\\": \\\"get_weather\\\", \",\"token_ids\":[4]}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"text\":\"\\\"arguments\\\": {\\\"city\\\": \\\"Paris\\\"}}\\n</tool_call>\",\"token_ids\":[5],\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[{\"index\":1,\"text\":\" there\",\"token_ids\":[6],\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":6,\"total_tokens\":16}}\n\n",
    "data: [DONE]\n\n",
);

/// A scripted worker that records every request body; and a frontend in front of it.
async fn scripted(tweak: impl FnOnce(&mut FrontendConfig)) -> (Frontend, Arc<Mutex<Vec<Value>>>) {
    use axum::routing::{get, post};
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let rec = seen.clone();
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/completions",
            post(move |body: axum::body::Bytes| {
                let rec = rec.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    // One choice unless asked for more: choice 1's events only with n = 2.
                    let two = v["n"] == 2;
                    rec.lock().unwrap().push(v);
                    let script: String = SCRIPT
                        .split_inclusive("\n\n")
                        .filter(|e| two || !e.contains("\"index\":1"))
                        .collect();
                    ([("content-type", "text/event-stream")], script)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut cfg = FrontendConfig {
        router_mode: RouterMode::RoundRobin,
        kv_cache_block_size: Some(16),
        ..FrontendConfig::default()
    };
    cfg.fleet.health_interval_ms = 50;
    cfg.fleet.no_admin = true;
    tweak(&mut cfg);
    let f = Frontend::start(
        cfg,
        vec![kvrouter_server::WorkerSpec::from_url(&format!(
            "http://{waddr}"
        ))],
    )
    .await
    .unwrap();
    (f, seen)
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 16});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

async fn post(c: &reqwest::Client, url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_contract_is_forwarded_or_refused_by_name() {
    let (f, seen) = scripted(|_| {}).await;
    let c = client();
    let url = f.url();
    for (field, on, disp, _) in FIELDS {
        let endpoints: &[(&str, Value)] = &match on {
            On::Both => vec![
                (
                    "/v1/completions",
                    json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4}),
                ),
                ("/v1/chat/completions", chat(json!({}))),
            ],
            On::Chat => vec![("/v1/chat/completions", chat(json!({})))],
            On::Completions => vec![(
                "/v1/completions",
                json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4}),
            )],
        };
        for (path, base) in endpoints {
            let mut body = base.clone();
            match disp {
                Disposition::Forward => {
                    let probe = json!({"probe": field});
                    body[*field] = probe.clone();
                    seen.lock().unwrap().clear();
                    let (st, v) = post(&c, &url, path, &body).await;
                    assert_eq!(st, 200, "{field} on {path}: {v}");
                    let sent = seen
                        .lock()
                        .unwrap()
                        .pop()
                        .expect("the worker got the request");
                    assert_eq!(
                        sent[*field], probe,
                        "{field} on {path} was not forwarded: {sent}"
                    );
                }
                Disposition::Refuse(neutral) => {
                    body[*field] = match neutral {
                        Neutral::False => json!(true),
                        Neutral::One => json!(3),
                        _ => json!("something"),
                    };
                    let (st, v) = post(&c, &url, path, &body).await;
                    assert_eq!(st, 400, "{field} on {path}: {v}");
                    let msg = v["error"]["message"].as_str().unwrap_or_default();
                    assert!(msg.contains(&format!("`{field}`")), "{field}: {v}");
                    assert_eq!(v["error"]["param"], *field, "{v}");
                    // The neutral value passes.
                    let neutral_value = match neutral {
                        Neutral::False => Some(json!(false)),
                        Neutral::One => Some(json!(1)),
                        _ => None,
                    };
                    if let Some(nv) = neutral_value {
                        body[*field] = nv;
                        let (st, v) = post(&c, &url, path, &body).await;
                        assert_eq!(st, 200, "{field}={} on {path}: {v}", body[*field]);
                    }
                }
                Disposition::Frontend | Disposition::Unused => {}
            }
        }
    }
    // Unknown fields are named too, and a chat-only field is unknown on completions.
    for (path, body) in [
        ("/v1/chat/completions", chat(json!({"frobnicate": 1}))),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1], "tools": []}),
        ),
    ] {
        let (st, v) = post(&c, &url, path, &body).await;
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unsupported field"),
            "{v}"
        );
    }
    // `user` is accepted (and not sent on).
    seen.lock().unwrap().clear();
    let (st, _) = post(
        &c,
        &url,
        "/v1/chat/completions",
        &chat(json!({"user": "u-1"})),
    )
    .await;
    assert_eq!(st, 200);
    assert!(seen.lock().unwrap()[0].get("user").is_none());
    f.stop().await;
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_reasoning_tool_calls_and_logprobs_streamed_and_whole() {
    let (f, seen) = scripted(|c| {
        c.tool_call_parser = Some(ToolCallParser::Hermes);
        c.reasoning_parser = Some(ReasoningParser::Qwen3);
    })
    .await;
    let c = client();
    let url = f.url();
    let body = chat(json!({"n": 2, "tools": tools(), "logprobs": true, "top_logprobs": 1}));

    // Whole.
    let (st, v) = post(&c, &url, "/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let sent = seen.lock().unwrap().pop().unwrap();
    assert_eq!(
        (sent["n"].clone(), sent["logprobs"].clone()),
        (json!(2), json!(1)),
        "{sent}"
    );
    let c0 = &v["choices"][0];
    assert_eq!(c0["index"], 0);
    assert_eq!(c0["message"]["reasoning_content"], "\nPlan.");
    assert_eq!(c0["message"]["content"], Value::Null, "{v}");
    let call = &c0["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(c0["finish_reason"], "tool_calls");
    let lp = &c0["logprobs"]["content"][0];
    assert_eq!(lp["token"], "<think>\nPlan");
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 1);
    let c1 = &v["choices"][1];
    assert_eq!(
        (c1["index"].clone(), c1["message"]["content"].clone()),
        (json!(1), json!("Hello there"))
    );
    assert_eq!(c1["finish_reason"], "stop");
    assert!(c1["message"].get("tool_calls").is_none());
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // Streamed, with usage in every chunk.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&sbody)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut all = String::new();
    while let Some(b) = bytes.next().await {
        all.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
    }
    let mut content = [String::new(), String::new()];
    let mut reasoning = [String::new(), String::new()];
    let mut calls = Vec::new();
    let mut finish = [None, None];
    let mut roles = 0;
    for line in all.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(
            v["usage"]["completion_tokens"].is_u64(),
            "usage in every chunk: {v}"
        );
        let Some(ch) = v["choices"].get(0) else {
            continue;
        };
        let i = ch["index"].as_u64().unwrap() as usize;
        let d = &ch["delta"];
        assert!(
            !d.to_string().contains("</thi"),
            "a partial tag leaked: {d}"
        );
        roles += usize::from(d["role"] == "assistant");
        content[i] += d["content"].as_str().unwrap_or("");
        reasoning[i] += d["reasoning_content"].as_str().unwrap_or("");
        if let Some(tc) = d["tool_calls"].as_array() {
            calls.extend(tc.iter().cloned());
        }
        if let Some(fr) = ch["finish_reason"].as_str() {
            finish[i] = Some(fr.to_string());
        }
    }
    assert_eq!(roles, 2, "one role per choice");
    assert_eq!(reasoning[0], "\nPlan.");
    assert_eq!(content[0].trim(), "");
    assert_eq!(
        (content[1].as_str(), reasoning[1].as_str()),
        ("Hello there", "")
    );
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(
        finish,
        [Some("tool_calls".to_string()), Some("stop".to_string())]
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_required_and_named_hold_the_worker_to_a_schema() {
    let (f, seen) = scripted(|_| {}).await;
    let c = client();
    let url = f.url();
    // Auto without a parser: refused, as vLLM does.
    let (st, v) = post(
        &c,
        &url,
        "/v1/chat/completions",
        &chat(json!({"tools": tools(), "tool_choice": "auto"})),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].clone()),
        (400, json!("tool_choice")),
        "{v}"
    );
    // `none`: no parsing, no schema.
    let (st, v) = post(
        &c,
        &url,
        "/v1/chat/completions",
        &chat(json!({"tools": tools(), "tool_choice": "none", "n": 2})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("<tool_call>"));
    assert!(seen
        .lock()
        .unwrap()
        .pop()
        .unwrap()
        .get("response_format")
        .is_none());
    // Named and required send vLLM's schema.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for (choice, parallel, want) in [
        (
            named.clone(),
            true,
            json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        ),
        (json!("required"), false, Value::Null),
    ] {
        let (st, v) = post(
            &c,
            &url,
            "/v1/chat/completions",
            &chat(
                json!({"tools": tools(), "tool_choice": choice, "parallel_tool_calls": parallel}),
            ),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let sent = seen.lock().unwrap().pop().unwrap();
        let schema = &sent["response_format"]["json_schema"]["schema"];
        assert_eq!(sent["response_format"]["type"], "json_schema", "{sent}");
        if want.is_null() {
            assert_eq!(schema["type"], "array");
            assert_eq!(schema["maxItems"], 1);
        } else {
            assert_eq!(*schema, want);
        }
    }
    // A name that is not a tool, and a schema on top of structured output: named errors.
    for extra in [
        json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        json!({"tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
        json!({"tool_choice": "required"}),
        json!({"tools": [{"type": "function"}]}),
    ] {
        let (st, v) = post(&c, &url, "/v1/chat/completions", &chat(extra.clone())).await;
        assert_eq!(st, 400, "{extra}: {v}");
    }
    // Chat logprobs limits and completions logprobs pass through in the worker's shape.
    let (st, v) = post(
        &c,
        &url,
        "/v1/chat/completions",
        &chat(json!({"logprobs": true, "top_logprobs": 21})),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].clone()),
        (400, json!("top_logprobs"))
    );
    let (st, v) = post(
        &c,
        &url,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2], "logprobs": 2, "n": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"],
        json!(["<think>\nPlan"])
    );
    assert_eq!(v["choices"][1]["logprobs"], Value::Null);
    assert_eq!(v["choices"][1]["text"], "Hello there");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_gets_every_feature_from_mock_workers() {
    // The openai SDK, field by field, streamed and not, against mock workers that think, call
    // tools, follow schemas, stop, seed and report logprobs (server/tests/openai_fidelity.py).
    let Ok(python) = std::env::var("KVROUTER_PYTHON") else {
        panic!("KVROUTER_PYTHON is not set: run the suite through scripts/test, which creates the venv with the openai SDK");
    };
    let s = stack(RouterMode::Kv, 2, |c| {
        c.mocker.reasoning = true;
        c.frontend.tool_call_parser = Some(ToolCallParser::Hermes);
        c.frontend.reasoning_parser = Some(ReasoningParser::Qwen3);
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_fidelity.py");
    let url = format!("{}/v1", s.url());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(&url)
            .arg(MODEL)
            .output()
    })
    .await
    .unwrap()
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK fidelity script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("openai fidelity: all checks passed"),
        "{stdout}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frontends_never_hand_out_the_same_ids() {
    // Response ids (and the tool-call ids built from them) start at a random point per
    // process: replicas and restarts do not repeat `chatcmpl-0000000000000001`.
    let c = client();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (f, _) = scripted(|_| {}).await;
        let (st, v) = post(&c, &f.url(), "/v1/chat/completions", &chat(json!({}))).await;
        assert_eq!(st, 200, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
        f.stop().await;
    }
    assert_ne!(ids[0], ids[1]);
}
