//! `kvrouter router`, the standalone router service, over real sockets: mock workers on
//! loopback HTTP and ZMQ, the router's JSON API driven by a real HTTP client.
use std::time::Duration;

use futures::StreamExt;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};
use kvrouter_server::router_service::{RouterService, RouterServiceConfig};
use kvrouter_server::up::worker_spec;
use serde_json::{json, Value};

use crate::common::*;

const ENDPOINT: &str = "dynamo.prefill.generate";

struct RouterStack {
    router: RouterService,
    workers: Vec<RunningWorker>,
}

impl RouterStack {
    fn url(&self, call: &str) -> String {
        format!("{}/v1/router/{call}", self.router.url())
    }

    async fn stop(self) {
        self.router.stop().await;
        for w in self.workers {
            w.stop().await;
        }
    }
}

/// `n` mock workers (64-token blocks, no modelled delay), worker `i` registered for
/// `endpoint_of(i)` (None: the default endpoint), and a router for [`ENDPOINT`].
async fn router_stack(
    n: usize,
    endpoint_of: impl Fn(usize) -> Option<&'static str>,
    tweak: impl FnOnce(&mut RouterServiceConfig),
) -> RouterStack {
    let mocker = MockerConfig {
        model_path: Some(kvrouter_server::vendored_model_dir()),
        speedup_ratio: 0.0,
        num_gpu_blocks: 1024,
        block_size: 64,
        ..MockerConfig::default()
    };
    let workers = spawn_workers(&mocker, n).await.expect("mock workers start");
    let specs = workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut s = worker_spec(w);
            s.endpoint = endpoint_of(i).map(String::from);
            s
        })
        .collect();
    let mut cfg = RouterServiceConfig::new(ENDPOINT, 64);
    cfg.fleet.health_interval_ms = 100;
    tweak(&mut cfg);
    let router = RouterService::start(cfg, specs)
        .await
        .expect("router starts");
    RouterStack { router, workers }
}

fn all_ours(_: usize) -> Option<&'static str> {
    Some(ENDPOINT)
}

/// POST `body` to `url`: (status, JSON answer).
async fn call(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.expect("request sent");
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.unwrap_or(Value::Null))
}

/// The router's SSE answer to `generate`: (serving worker, chunks).
async fn generate(c: &reqwest::Client, s: &RouterStack, body: Value) -> (u64, Vec<Value>) {
    let r = c
        .post(s.url("generate"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let worker = worker_of(&r).expect("worker header");
    let text = r.text().await.expect("body");
    let chunks = sse_events(&text)
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}")))
        .collect();
    (worker, chunks)
}

fn loads_idle(s: &RouterStack) -> bool {
    let fleet = &s.router.fleet;
    fleet.registry.all().iter().all(|w| {
        fleet
            .router
            .loads(w.spec.ranks())
            .iter()
            .all(|l| *l == Default::default())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_chunks_and_best_worker_id_follows_the_cache() {
    let s = router_stack(4, all_ours, |_| {}).await;
    let c = client();
    let tokens = prompt(1, 1024); // 16 blocks of 64
    let body = json!({"token_ids": tokens, "model": MODEL,
        "stop_conditions": {"max_tokens": 4}, "sampling_options": {"temperature": 0.5}});
    let (first, chunks) = generate(&c, &s, body.clone()).await;
    assert!(!chunks.is_empty());
    let mut ids = 0;
    for ch in &chunks {
        let o = ch.as_object().expect("an object");
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 4, "{ch}");
        for k in ["token_ids", "text", "finish_reason", "usage"] {
            assert!(o.contains_key(k), "{k} missing: {ch}");
        }
        ids += ch["token_ids"].as_array().expect("ids").len();
        assert!(ch["text"].is_string());
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["finish_reason"], "length", "{last}");
    assert_eq!(last["usage"]["prompt_tokens"], 1024, "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(ids, 4, "every generated token id arrived");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["finish_reason"].is_null() && c["usage"].is_null()));
    assert!(loads_idle(&s), "the stream's end freed its booking");
    // The worker's KV events reach the router's index: the prompt goes back to its cache.
    let index = s.router.fleet.router.index().clone();
    assert!(
        eventually(10.0, || index.current_size() >= 16).await,
        "events never arrived"
    );
    let (st, best) = call(&c, &s.url("best_worker_id"), json!({"token_ids": tokens})).await;
    assert_eq!(st, 200, "{best}");
    assert_eq!(
        (
            &best["worker_id"],
            &best["dp_rank"],
            &best["overlap_blocks"]
        ),
        (&json!(first), &json!(0), &json!(16)),
        "{best}"
    );
    // kvrouter's additions: enough to send the request oneself.
    assert_eq!(best["cached_tokens"], 1024, "{best}");
    assert!(best["cost"].as_f64().is_some(), "{best}");
    let url = best["registration"]["url"].as_str().expect("registration");
    assert!(url.starts_with("http://127.0.0.1:"), "{best}");
    let (again, chunks) = generate(&c, &s, body).await;
    assert_eq!(again, first, "generate follows the cache too");
    let cached = &chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert!(cached.as_u64() >= Some(960), "cached {cached}");
    // The overlap scores say the same, per rank.
    let (st, o) = call(
        &c,
        &s.url("get_overlap_scores"),
        json!({"token_ids": tokens}),
    )
    .await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(
        (o["block_size"].as_u64(), o["num_blocks"].as_u64()),
        (Some(64), Some(16))
    );
    assert!(o["shared_cache"].is_null());
    let workers = o["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 4);
    for w in workers {
        let device = if w["worker_id"] == first { 16 } else { 0 };
        assert_eq!(w["device"], device, "{w}");
        assert_eq!(
            (w["host_pinned"].as_u64(), w["shared"].as_u64()),
            (Some(0), Some(0))
        );
    }
    // The dump is the index as router events.
    let dump: Value = c
        .get(s.url("dump_events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = dump.as_array().expect("an array of events");
    assert!(!events.is_empty());
    assert!(events
        .iter()
        .all(|e| e["worker_id"] == first && e["event"]["data"]["stored"].is_object()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_queries_change_nothing() {
    // Predicted index on: a booking records its prompt there, a query must not.
    let s = router_stack(3, all_ours, |c| {
        c.router.router_predicted_ttl_secs = Some(600.0)
    })
    .await;
    let c = client();
    let cached = prompt(2, 640);
    let (_, _) = generate(
        &c,
        &s,
        json!({"token_ids": cached, "stop_conditions": {"max_tokens": 2}}),
    )
    .await;
    let index = s.router.fleet.router.index().clone();
    assert!(eventually(10.0, || index.current_size() >= 10).await);
    for (id, seed) in [("held-1", 3), ("held-2", 4)] {
        let (st, v) = call(
            &c,
            &s.url("best_worker_id"),
            json!({"token_ids": prompt(seed, 300), "request_id": id}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, _) = call(
        &c,
        &s.url("mark_prefill_complete"),
        json!({"request_id": "held-1"}),
    )
    .await;
    assert_eq!(st, 200);
    let probes = [prompt(2, 640), prompt(3, 300), prompt(9, 200)];
    let state = || async {
        let mut out = Vec::new();
        for p in &probes {
            let (_, loads) = call(&c, &s.url("get_potential_loads"), json!({"token_ids": p})).await;
            let (_, scores) = call(&c, &s.url("get_overlap_scores"), json!({"token_ids": p})).await;
            out.push(json!([loads, scores]));
        }
        let dump: Value = c
            .get(s.url("dump_events"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(dump);
        out
    };
    let before = state().await;
    assert!(
        before[1][0]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["active_requests"] == 1),
        "bookings show: {}",
        before[1][0]
    );
    let url = s.url("best_worker_id");
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..1000u32)
        .map(|i| {
            let body = json!({"token_ids": probes[i as usize % 3].clone()});
            let (c, url) = (c.clone(), url.clone());
            async move { call(&c, &url, body).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(answers.iter().all(|(st, _)| *st == 200), "{:?}", answers[0]);
    assert_eq!(state().await, before, "a query changed loads or indexes");
    // Booked requests end: everything returns to zero.
    for id in ["held-1", "held-2"] {
        let (st, v) = call(&c, &s.url("free"), json!({"request_id": id})).await;
        assert_eq!(st, 200, "{v}");
    }
    assert!(loads_idle(&s));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booked_request_holds_its_load_until_freed_and_errors_are_json() {
    let s = router_stack(2, all_ours, |_| {}).await;
    let c = client();
    let tokens = prompt(5, 300);
    let (st, best) = call(
        &c,
        &s.url("best_worker_id"),
        json!({"token_ids": tokens, "request_id": "req-1"}),
    )
    .await;
    assert_eq!(st, 200, "{best}");
    let w = best["worker_id"].as_u64().unwrap();
    let load_of = |loads: &Value| {
        loads
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["worker_id"] == w)
            .cloned()
            .unwrap()
    };
    let (_, loads) = call(
        &c,
        &s.url("get_potential_loads"),
        json!({"token_ids": [1, 2, 3]}),
    )
    .await;
    assert_eq!(loads.as_array().unwrap().len(), 2, "{loads}");
    let l = load_of(&loads);
    assert_eq!(l["active_requests"], 1);
    assert_eq!(l["potential_prefill_tokens"], 300 + 3, "{l}");
    // A second booking under the same id is refused.
    let (st, v) = call(
        &c,
        &s.url("best_worker_id"),
        json!({"token_ids": tokens, "request_id": "req-1"}),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("req-1"));
    // First token: the prompt leaves the prefill load.
    let (st, v) = call(
        &c,
        &s.url("mark_prefill_complete"),
        json!({"request_id": "req-1"}),
    )
    .await;
    assert_eq!((st, v), (200, json!({"request_id": "req-1"})));
    let (_, loads) = call(
        &c,
        &s.url("get_potential_loads"),
        json!({"token_ids": [1, 2, 3]}),
    )
    .await;
    assert_eq!(load_of(&loads)["potential_prefill_tokens"], 3);
    let (st, v) = call(&c, &s.url("free"), json!({"request_id": "req-1"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v,
        json!({"request_id": "req-1", "worker_id": w, "dp_rank": 0})
    );
    assert!(loads_idle(&s), "freed: every load back to zero");
    // Unknown ids: 404 with a message naming the id.
    for call_name in ["free", "mark_prefill_complete"] {
        let (st, v) = call(&c, &s.url(call_name), json!({"request_id": "req-1"})).await;
        assert_eq!(st, 404, "{call_name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("unknown request id `req-1`"), "{msg}");
    }
    // Bad bodies: 400 with what is wrong.
    for (call_name, body, why) in [
        ("best_worker_id", "not json", "invalid body"),
        (
            "best_worker_id",
            r#"{"tokens": [1]}"#,
            "unknown field `tokens`",
        ),
        ("best_worker_id", r#"{}"#, "missing field `token_ids`"),
        (
            "best_worker_id",
            r#"{"token_ids": []}"#,
            "must not be empty",
        ),
        (
            "best_worker_id",
            r#"{"token_ids": [-1]}"#,
            "array of integers",
        ),
        (
            "best_worker_id",
            r#"{"token_ids": [1], "router_config_override": {"router_temperature": -1}}"#,
            "router_temperature",
        ),
        ("free", r#"{"request_id": ""}"#, "must not be empty"),
        (
            "generate",
            r#"{"token_ids": [1], "prompt": "x"}"#,
            "unknown field `prompt`",
        ),
        (
            "generate",
            r#"{"token_ids": [1], "sampling_options": {"n": 3}}"#,
            "sampling_options.n",
        ),
        ("get_potential_loads", "[1, 2]", "invalid body"),
    ] {
        let r = c
            .post(s.url(call_name))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{call_name} {body}");
        let v: Value = r.json().await.expect("a JSON error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{call_name} {body}: {msg}");
    }
    // A pinned worker that is not there: 404 naming the field.
    let (st, v) = call(
        &c,
        &s.url("generate"),
        json!({"token_ids": [1, 2], "worker_id": 77}),
    )
    .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["param"], "worker_id");
    // Unknown routes and methods answer JSON too.
    let r = c.get(s.url("nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"].is_object());
    let r = c.get(s.url("free")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"].is_object());
    let m = metrics_text(&c, &s.router.url()).await;
    assert!(metric(&m, "kvrouter_router_service_requests_total") >= 10.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workers_and_all_busy_are_503() {
    let s = router_stack(0, all_ours, |_| {}).await;
    let c = client();
    for call_name in ["best_worker_id", "generate"] {
        let (st, v) = call(&c, &s.url(call_name), json!({"token_ids": [1, 2, 3]})).await;
        assert_eq!(st, 503, "{call_name}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no healthy worker"));
    }
    let (st, v) = call(&c, &s.url("get_potential_loads"), json!({"token_ids": [1]})).await;
    assert_eq!((st, v), (200, json!([])));
    assert_eq!(
        get_status(&c, &format!("{}/ready", s.router.url())).await,
        503
    );
    let r = c
        .get(format!("{}/health", s.router.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let h: Value = r.json().await.unwrap();
    assert_eq!(
        (h["status"].as_str(), h["endpoint"].as_str()),
        (Some("unhealthy"), Some(ENDPOINT))
    );
    s.stop().await;

    // Busy past one token of prefill: the first booking fills the only worker.
    let s = router_stack(1, all_ours, |c| {
        c.router.active_prefill_tokens_threshold = Some(0)
    })
    .await;
    let (st, _) = call(
        &c,
        &s.url("best_worker_id"),
        json!({"token_ids": prompt(6, 100), "request_id": "a"}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, v) = call(
        &c,
        &s.url("best_worker_id"),
        json!({"token_ids": prompt(7, 100)}),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("busy"),
        "{v}"
    );
    assert_eq!(
        get_status(&c, &format!("{}/live", s.router.url())).await,
        200
    );
    assert_eq!(
        get_status(&c, &format!("{}/ready", s.router.url())).await,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_never_freed_expire_and_are_counted() {
    let s = router_stack(2, all_ours, |c| {
        c.router.router_active_request_expiry_secs = 0.3;
    })
    .await;
    let c = client();
    for i in 0..3 {
        let (st, v) = call(
            &c,
            &s.url("best_worker_id"),
            json!({"token_ids": prompt(20 + i, 200), "request_id": format!("lost-{i}")}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    assert!(!loads_idle(&s));
    let base = s.router.url();
    let mut expired = 0.0;
    for _ in 0..100 {
        expired = metric(
            &metrics_text(&c, &base).await,
            "kvrouter_router_expired_requests_total",
        );
        if expired >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(expired, 3.0, "three lost bookings counted");
    assert!(loads_idle(&s), "their load is released");
    let (st, _) = call(&c, &s.url("free"), json!({"request_id": "lost-0"})).await;
    assert_eq!(st, 404, "an expired id is unknown");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_another_endpoint_are_ignored() {
    // Worker 0 serves the prefill endpoint, worker 1 the default one.
    let s = router_stack(2, |i| (i == 0).then_some(ENDPOINT), |_| {}).await;
    let c = client();
    let registered = s.router.fleet.registry.all();
    assert_eq!(registered.len(), 1, "only the endpoint's worker");
    assert_eq!(registered[0].spec.url, s.workers[0].info.url);
    let (_, loads) = call(&c, &s.url("get_potential_loads"), json!({"token_ids": [1]})).await;
    assert_eq!(loads.as_array().unwrap().len(), 1, "{loads}");
    for i in 0..4 {
        let (st, v) = call(
            &c,
            &s.url("best_worker_id"),
            json!({"token_ids": prompt(30 + i, 100)}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["worker_id"].as_u64(), registered[0].spec.id);
    }
    // Registering the other one on the admin API is refused, naming both endpoints.
    let admin = s.router.admin_url().expect("admin API");
    let spec = worker_spec(&s.workers[1]);
    let r = c
        .post(format!("{admin}/v1/workers"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("dynamo.backend.generate") && msg.contains(ENDPOINT),
        "{msg}"
    );
    s.stop().await;
}
