//! Every error case of the API: clear OpenAI-shaped errors, nothing booked afterwards.
use std::time::Duration;

use futures::StreamExt;
use kvrouter_core::RouterMode;
use kvrouter_server::{Frontend, FrontendConfig};
use serde_json::{json, Value};

use crate::common::*;

async fn post_raw(c: &reqwest::Client, url: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = c
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn assert_openai_error(v: &Value, kind: &str) {
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.frontend.listener.max_body_bytes = 64 * 1024;
        c.frontend.context_length = Some(2048);
    })
    .await;
    let c = client();
    let url = s.url();
    let (st, v) = post_raw(&c, &url, "/v1/completions", b"{not json".to_vec()).await;
    assert_eq!(st, 400);
    assert_openai_error(&v, "invalid_request_error");
    let (st, v) = post_raw(&c, &url, "/v1/chat/completions", b"[1,2]".to_vec()).await;
    assert_eq!(st, 400);
    assert_openai_error(&v, "invalid_request_error");
    let (st, v) = post_raw(
        &c,
        &url,
        "/v1/chat/completions",
        serde_json::to_vec(&json!({"model": MODEL, "messages": []})).unwrap(),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = post_raw(
        &c,
        &url,
        "/v1/completions",
        serde_json::to_vec(&json!({"model": "gpt-9", "prompt": "x"})).unwrap(),
    )
    .await;
    assert_eq!(st, 404);
    assert_openai_error(&v, "NotFoundError");
    let (st, v) = post_raw(
        &c,
        &url,
        "/v1/completions",
        serde_json::to_vec(&json!({"model": MODEL, "prompt": [1, -3]})).unwrap(),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // n is bounded (1..=16; n > 1 is served, see fidelity.rs).
    let (st, v) = post_raw(
        &c,
        &url,
        "/v1/completions",
        serde_json::to_vec(&json!({"model": MODEL, "prompt": "x", "n": 17})).unwrap(),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "n", "{v}");
    // Over the context length, before routing.
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(1, 3000), 4)).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 2048"),
        "{v}"
    );
    let (st, _, _) = complete(&c, &url, completion_body(&prompt(1, 2040), 100)).await;
    assert_eq!(
        st, 400,
        "prompt + max_tokens over the context must be refused"
    );
    // A max_tokens near u64::MAX must not wrap past the check.
    let mut huge = completion_body(&prompt(1, 10), 1);
    huge["max_tokens"] = json!(u64::MAX - 5);
    let (st, _, v) = complete(&c, &url, huge).await;
    assert_eq!(st, 400, "{v}");
    // Body over the limit.
    let big = serde_json::to_vec(&json!({"model": MODEL, "prompt": "a".repeat(100_000)})).unwrap();
    let (st, v) = post_raw(&c, &url, "/v1/completions", big).await;
    assert_eq!(st, 413, "{v}");
    assert_openai_error(&v, "invalid_request_error");
    // Pinned to a worker that does not exist.
    let (st, _, v) = complete(
        &c,
        &url,
        json!({"model": MODEL, "prompt": "hi", "nvext": {"backend_instance_id": 99}}),
    )
    .await;
    assert_eq!(st, 404, "{v}");
    // Invalid override.
    let (st, _, v) = complete(&c, &url, json!({"model": MODEL, "prompt": "hi", "nvext": {"router_config_override": {"router_temperature": -1}}})).await;
    assert_eq!(st, 400, "{v}");
    let (st, _, v) = complete(
        &c,
        &url,
        json!({"model": MODEL, "prompt": "hi", "nvext": {"router_config_override": {"bogus": 1}}}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // Unknown route.
    let r = c.get(format!("{url}/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(all_idle(&s));
    // And the server still serves.
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(2, 100), 2)).await;
    assert_eq!(st, 200, "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_is_503_and_unhealthy() {
    let cfg = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    let f = Frontend::start(cfg, Vec::new())
        .await
        .expect("frontend starts without workers");
    let c = client();
    let (st, _, v) = complete(&c, &f.url(), completion_body(&prompt(1, 100), 2)).await;
    assert_eq!(st, 503, "{v}");
    assert_openai_error(&v, "service_unavailable");
    assert_eq!(get_status(&c, &format!("{}/health", f.url())).await, 503);
    assert_eq!(get_status(&c, &format!("{}/ready", f.url())).await, 503);
    assert_eq!(get_status(&c, &format!("{}/live", f.url())).await, 200);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_workers_busy_is_503_with_the_reason() {
    // Busy as soon as a rank has any prompt tokens in prefill; prefill is slowed 100x so the
    // first request is still in prefill when the second arrives.
    let s = stack(RouterMode::Kv, 1, |c| {
        c.mocker.speedup_ratio = 0.01;
        c.frontend.router.active_prefill_tokens_threshold = Some(0);
    })
    .await;
    let c = client();
    let url = s.url();
    let first = start_stream(&c, &url, completion_body(&prompt(4, 2000), 8)).await;
    assert_eq!(first.status(), 200);
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(5, 100), 2)).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("busy"),
        "{v}"
    );
    drop(first); // client gives up: its booking must be released
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "cancelled request left load booked"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dying_mid_stream_gives_an_error_event_and_frees_the_load() {
    let mut s = stack(RouterMode::Kv, 2, |c| c.mocker.speedup_ratio = 1.0).await;
    let c = client();
    let url = s.url();
    let r = start_stream(&c, &url, completion_body(&prompt(6, 256), 2000)).await;
    assert_eq!(r.status(), 200);
    let victim = worker_of(&r).expect("worker header");
    let request_id = r
        .headers()
        .get(kvrouter_server::frontend::REQUEST_ID_HEADER)
        .expect("x-request-id header")
        .to_str()
        .unwrap()
        .to_string();
    let worker_url = s
        .frontend
        .fleet
        .registry
        .get(victim)
        .unwrap()
        .spec
        .url
        .clone();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("a chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).starts_with("data: {"));
    // Kill the worker that is streaming.
    kill_worker(&mut s, victim).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(b) = stream.next().await {
            match b {
                Ok(b) => rest.extend_from_slice(&b),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "client hung after the worker died");
    let text = String::from_utf8_lossy(&rest);
    let events = sse_events(&text);
    let error = events
        .iter()
        .find(|e| e.contains("\"error\""))
        .unwrap_or_else(|| panic!("no error event in {text:?}"));
    let port = worker_url.rsplit(':').next().unwrap();
    assert!(
        !error.contains(&worker_url) && !error.contains(port),
        "the client sees the worker's address: {error}"
    );
    assert!(
        error.contains(&request_id),
        "the client gets the request id: {error}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(eventually(5.0, || all_idle(&s)).await, "load left booked");
    // The dead worker left the routing set; the survivor serves.
    let fleet = s.frontend.fleet.clone();
    assert!(eventually(5.0, || !fleet.registry.get(victim).unwrap().is_healthy()).await);
    let (st, w, v) = complete(&c, &url, completion_body(&prompt(7, 100), 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_ne!(w, Some(victim));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_malformed_event_fails_the_request_not_the_worker() {
    // A worker whose completion stream carries one bad event: that request fails with an
    // error event, the worker stays healthy and keeps serving (it used to be marked failed,
    // its index cleared).
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/completions",
            post(|| async {
                (
                    [("content-type", "text/event-stream")],
                    "data: {\"choices\":[{\"text\":\"a\",\"token_ids\":[5]}]}\n\ndata: {not json\n\n",
                )
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
    let f = Frontend::start(
        cfg,
        vec![kvrouter_server::WorkerSpec::from_url(&format!(
            "http://{waddr}"
        ))],
    )
    .await
    .unwrap();
    let c = client();
    for _ in 0..2 {
        let r = start_stream(&c, &f.url(), completion_body(&prompt(1, 20), 4)).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("malformed event"), "{text}");
        let w = f.fleet.registry.all();
        assert!(w[0].is_healthy(), "one bad event made the worker unhealthy");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(f.fleet.registry.all()[0].is_healthy());
    f.stop().await;
}
