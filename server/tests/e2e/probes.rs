//! The endpoints clients probe (issue 21): `GET /v1/models/{id}` (the SDK's
//! `models.retrieve`), `/version`, `POST /tokenize` and `/detokenize` in vLLM's shapes, and
//! `/metrics` read by Python's `prometheus_client` parsers in both text formats.

use kvrouter_core::RouterMode;
use serde_json::{json, Value};

use crate::common::*;

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn ids(v: &Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn is_not_found_error(v: &Value) -> bool {
    v["error"]["type"] == "NotFoundError"
        && v["error"]["code"] == 404
        && v["error"]["param"] == "model"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_retrieve_and_version() {
    let s = stack(RouterMode::Kv, 1, |_| {}).await;
    let c = client();
    let url = s.url();
    let (_, list) = get(&c, &format!("{url}/v1/models")).await;
    // The id has a slash: sent as is (older SDKs) and percent-encoded (newer ones).
    for path in [MODEL.to_string(), MODEL.replace('/', "%2F")] {
        let (status, card) = get(&c, &format!("{url}/v1/models/{path}")).await;
        assert_eq!(status, 200, "{path}: {card}");
        assert_eq!(card, list["data"][0], "{path}");
    }
    for other in ["gpt-4", "Qwen/other", "%FF%FE"] {
        let (status, e) = get(&c, &format!("{url}/v1/models/{other}")).await;
        assert_eq!(status, 404, "{other}: {e}");
        assert!(is_not_found_error(&e), "{e}");
    }
    let (status, v) = get(&c, &format!("{url}/version")).await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"version": env!("CARGO_PKG_VERSION")}));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_gives_the_ids_requests_are_routed_on() {
    // A small inline limit: the long prompt below is tokenized on the blocking pool.
    let s = stack(RouterMode::Kv, 1, |c| {
        c.frontend.inline_parse_bytes = 1024;
        c.frontend.listener.max_body_bytes = 64 * 1024;
    })
    .await;
    let c = client();
    let url = s.url();
    let tok = format!("{url}/tokenize");
    let detok = format!("{url}/detokenize");
    let (_, list) = get(&c, &format!("{url}/v1/models")).await;
    let max_model_len = list["data"][0]["max_model_len"].clone();

    // Chat: the chat endpoint's ids, its prompt_tokens.
    let chat = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]);
    let (status, t) = post(&c, &tok, &json!({"model": MODEL, "messages": chat})).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["max_model_len"], max_model_len);
    assert_eq!(t["count"].as_u64(), Some(ids(&t).len() as u64));
    let (status, v) = post(
        &c,
        &format!("{url}/v1/chat/completions"),
        &json!({"model": MODEL, "messages": chat, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);
    let (_, hi) = post(
        &c,
        &tok,
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(
        ids(&hi),
        vec![151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
    );

    // Completion prompts, short and long (the long one parsed off the async threads).
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(100);
    for prompt in ["The capital of France is", long.as_str()] {
        let (status, t) = post(
            &c,
            &tok,
            &json!({"model": MODEL, "prompt": prompt, "return_token_strs": true}),
        )
        .await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(
            t["token_strs"].as_array().map(Vec::len),
            Some(ids(&t).len())
        );
        let (status, _, v) = complete(
            &c,
            &url,
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], t["count"]);
        // And back.
        let (status, d) = post(&c, &detok, &json!({"model": MODEL, "tokens": t["tokens"]})).await;
        assert_eq!(status, 200, "{d}");
        assert_eq!(d["prompt"], prompt);
    }

    // Errors: OpenAI-shaped, 404 for another model, 400 for the rest.
    let (status, e) = post(&c, &tok, &json!({"model": "gpt-4", "prompt": "x"})).await;
    assert_eq!(status, 404);
    assert!(is_not_found_error(&e), "{e}");
    let (status, e) = post(&c, &detok, &json!({"model": "gpt-4", "tokens": [1]})).await;
    assert_eq!(status, 404);
    assert!(is_not_found_error(&e), "{e}");
    for (path, body) in [
        (&detok, json!({"tokens": [10_000_000]})),
        (&detok, json!({"tokens": [-1]})),
        (&detok, json!({"tokens": "abc"})),
        (&tok, json!({})),
        (
            &tok,
            json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}),
        ),
        (&tok, json!({"prompt": "x", "add_special_tokens": 1})),
    ] {
        let (status, e) = post(&c, path, &body).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["code"], 400, "{e}");
    }
    let r = c
        .post(&tok)
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Bounded like the completion endpoints.
    let huge = json!({"prompt": "x".repeat(100 * 1024)});
    for path in [&tok, &detok] {
        let (status, e) = post(&c, path, &huge).await;
        assert_eq!(status, 413, "{e}");
    }
    assert!(
        get_status(&c, &format!("{url}/health")).await == 200,
        "server still healthy"
    );
    s.stop().await;
}

/// Run a Python script of `server/tests` with `args`; panics with its output unless it
/// succeeds and prints `done`.
fn python(script: &str, args: &[&str], done: &str) {
    let Some(python) = std::env::var_os("KVROUTER_PYTHON") else {
        panic!("KVROUTER_PYTHON is not set: run the suite through scripts/test, which creates the venv with the openai SDK and prometheus_client");
    };
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    // Blocking is fine: the stack runs on the runtime's other worker threads.
    let out = std::process::Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(done),
        "{script} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_retrieves_the_model() {
    let s = stack(RouterMode::Kv, 1, |_| {}).await;
    let url = format!("{}/v1", s.url());
    python(
        "openai_models.py",
        &[&url, MODEL],
        "openai models: all checks passed",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_in_both_text_formats() {
    let s = stack(RouterMode::Kv, 2, |_| {}).await;
    let c = client();
    let url = s.url();
    let (status, _, v) = complete(&c, &url, completion_body(&prompt(1, 100), 4)).await;
    assert_eq!(status, 200, "{v}");
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("[DONE]"));

    // The classic format by default, OpenMetrics when asked for.
    let r = c.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let classic = r.text().await.unwrap();
    assert!(
        classic.contains("# TYPE kvrouter_frontend_requests_total counter\n"),
        "{classic}"
    );
    assert!(!classic.contains("# EOF"));
    let r = c
        .get(format!("{url}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = r.text().await.unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE kvrouter_frontend_requests counter\n"));

    python(
        "metrics_parse.py",
        &[&url],
        "metrics parse: all checks passed",
    );
    s.stop().await;
}
