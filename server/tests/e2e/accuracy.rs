//! Closed-loop accuracy: the router's predicted cached tokens against the engine's reported
//! ones, per worker — agreement on a healthy stack; predictions stuck at 0 while the engines
//! hit when the router's block size is not the engines', with one warning naming the cause.
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvrouter_core::RouterMode;
use kvrouter_mocker::DisaggregationMode;
use kvrouter_server::frontend::PREDICTED_CACHED_HEADER;
use kvrouter_server::up::worker_spec;
use kvrouter_server::{Frontend, FrontendConfig};
use serde_json::{json, Value};

use crate::common::*;

/// Everything logged by this test binary (installed once).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_env_filter("warn")
            .try_init();
    });
}

/// Accuracy warnings logged about the worker at `url`.
fn warnings_about(url: &str) -> Vec<String> {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains("KV routing accuracy") && l.contains(url))
        .map(str::to_string)
        .collect()
}

/// Send each of `prompts` (seed, pinned worker) `times` times, half of them streamed; waits
/// `settle` after the first send of each for the KV events. Returns (predicted, reported) of
/// every response.
async fn send(
    c: &reqwest::Client,
    url: &str,
    prompts: &[(u32, u64)],
    times: usize,
    mut settle: impl FnMut(u64) -> bool,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(seed, worker) in prompts {
        let tokens = prompt(seed, 1024);
        for i in 0..times {
            let stream = i % 2 == 1;
            let mut body = completion_body(&tokens, 2);
            body["nvext"] = json!({"backend_instance_id": worker});
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let r = c
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(worker_of(&r), Some(worker));
            let predicted: u64 = r
                .headers()
                .get(PREDICTED_CACHED_HEADER)
                .expect("predicted cached tokens header")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let usage = if stream {
                let text = r.text().await.unwrap();
                let events = sse_events(&text);
                let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                last["usage"].clone()
            } else {
                r.json::<Value>().await.unwrap()["usage"].clone()
            };
            let reported = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            out.push((predicted, reported));
            if i == 0 {
                let mut ok = false;
                for _ in 0..500 {
                    if settle(worker) {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                assert!(ok, "KV events of worker {worker} never arrived");
            }
        }
    }
    out
}

async fn workers_json(c: &reqwest::Client, admin: &str) -> Vec<Value> {
    get_json(c, &format!("{admin}/v1/workers")).await["workers"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_agree_with_the_engines_on_a_healthy_stack() {
    capture_logs();
    let s = stack(RouterMode::Kv, 2, |_| {}).await;
    let (c, url) = (client(), s.url());
    let admin = s.frontend.admin_url().unwrap();
    let ids: Vec<u64> = s
        .frontend
        .fleet
        .registry
        .all()
        .iter()
        .map(|w| w.id())
        .collect();
    let prompts: Vec<(u32, u64)> = (0..10).map(|i| (100 + i, ids[i as usize % 2])).collect();
    let index = s.frontend.fleet.router.index().clone();
    let mut cold = 0;
    let got = send(&c, &url, &prompts, 2, |_| {
        // Each cold prompt adds its 16 blocks.
        let arrived = index.current_size() >= (cold + 1) * 16;
        cold += arrived as usize;
        arrived
    })
    .await;
    // Cold: 0 and 0; warm: the router predicted what the engine then found.
    for (i, (p, r)) in got.iter().enumerate() {
        assert!(
            p.abs_diff(*r) <= 64,
            "request {i}: predicted {p}, reported {r}"
        );
    }
    assert!(
        got.iter().filter(|(_, r)| *r >= 960).count() >= 10,
        "{got:?}"
    );
    let workers = workers_json(&c, &admin).await;
    for w in &workers {
        let a = &w["accuracy"];
        assert_eq!(a["requests"], 10, "{a}");
        assert_eq!(a["verdict"], "ok", "{a}");
        assert_eq!(a["cause"], Value::Null, "{a}");
        assert!(
            a["reported_cached_tokens"].as_u64().unwrap() >= 5 * 960,
            "{a}"
        );
        assert!(warnings_about(w["spec"]["url"].as_str().unwrap()).is_empty());
    }
    let m = metrics_text(&c, &url).await;
    let predicted = metric(&m, "kvrouter_worker_predicted_cached_tokens_total");
    let reported = metric(&m, "kvrouter_worker_reported_cached_tokens_total");
    assert!(predicted >= 10.0 * 960.0, "{predicted}");
    assert!(
        (predicted - reported).abs() <= 10.0 * 64.0,
        "{predicted} vs {reported}"
    );
    assert_eq!(metric(&m, "kvrouter_worker_accuracy_requests_total"), 20.0);
    assert_eq!(metric(&m, "kvrouter_worker_accuracy_mismatches_total"), 0.0);
    assert!(
        m.contains(&format!(
            "kvrouter_worker_accuracy_verdict{{worker_id=\"{}\",verdict=\"ok\"}} 1",
            ids[0]
        )),
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_size_mismatch_is_caught_and_named() {
    capture_logs();
    // The engines use 64-token blocks; the frontend is told 32 and the workers are
    // registered without one: every store they publish is dropped, nothing is predicted.
    let workers = mock_workers(2, DisaggregationMode::Agg).await;
    let specs = workers
        .iter()
        .map(|w| {
            let mut s = worker_spec(w);
            s.block_size = None;
            s
        })
        .collect();
    let fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        kv_cache_block_size: Some(32),
        ..FrontendConfig::default()
    };
    let f = Frontend::start(fc, specs).await.expect("frontend starts");
    let (c, url) = (client(), f.url());
    let admin = f.admin_url().unwrap();
    let ids: Vec<u64> = f.fleet.registry.all().iter().map(|w| w.id()).collect();
    let prompts: Vec<(u32, u64)> = (0..6).map(|i| (200 + i, ids[i as usize % 2])).collect();
    let fleet = f.fleet.clone();
    let got = send(&c, &url, &prompts, 3, |w| {
        let st = fleet.registry.get(w).unwrap().event_flow();
        st.received > 0 && st.filtered > 0
    })
    .await;
    assert!(got.iter().all(|(p, _)| *p == 0), "{got:?}");
    assert!(
        got.iter().filter(|(_, r)| *r >= 960).count() >= 12,
        "{got:?}"
    );
    for w in workers_json(&c, &admin).await {
        let a = &w["accuracy"];
        assert_eq!(a["requests"], 9, "{a}");
        assert_eq!(a["verdict"], "under_predicting", "{a}");
        assert_eq!(a["cause"], "block_size", "{a}");
        assert!(a["advice"].as_str().unwrap().contains("block size"), "{a}");
        assert_eq!(a["predicted_cached_tokens"], 0, "{a}");
        let url = w["spec"]["url"].as_str().unwrap();
        let warned = warnings_about(url);
        assert_eq!(warned.len(), 1, "one warning per episode: {warned:?}");
        assert!(
            warned[0].contains("cause=\"block_size\"") || warned[0].contains("cause=block_size"),
            "{warned:?}"
        );
    }
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, "kvrouter_worker_predicted_cached_tokens_total"),
        0.0
    );
    assert!(metric(&m, "kvrouter_worker_reported_cached_tokens_total") >= 12.0 * 960.0);
    assert!(metric(&m, "kvrouter_worker_accuracy_mismatches_total") >= 12.0);
    assert!(
        m.contains(&format!(
            "kvrouter_worker_accuracy_verdict{{worker_id=\"{}\",verdict=\"under_predicting\"}} 1",
            ids[1]
        )),
        "{m}"
    );
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_huge_reports_are_skipped_or_clamped() {
    use axum::routing::{get, post};
    // A scripted worker whose usage reports, in turn, each of these as cached_tokens.
    const REPORTS: [&str; 7] = [
        "\"garbage\"",
        "-5",
        "1e300",
        "18446744073709551615",
        "99999999999999999999999",
        "null",
        "7",
    ];
    let n = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/completions",
            post(move || {
                let i = n.fetch_add(1, Ordering::Relaxed) % REPORTS.len();
                async move {
                    let body = format!(
                        "data: {{\"choices\":[{{\"index\":0,\"text\":\"x\",\"token_ids\":[1],\"finish_reason\":\"stop\"}}]}}\n\n\
                         data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":100,\"completion_tokens\":1,\"prompt_tokens_details\":{{\"cached_tokens\":{}}}}}}}\n\n\
                         data: [DONE]\n\n",
                        REPORTS[i]
                    );
                    ([("content-type", "text/event-stream")], body)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        kv_cache_block_size: Some(16),
        ..FrontendConfig::default()
    };
    let spec = kvrouter_server::WorkerSpec::from_url(&format!("http://{waddr}"));
    let f = Frontend::start(fc, vec![spec]).await.unwrap();
    let (c, url) = (client(), f.url());
    for _ in 0..REPORTS.len() {
        let (st, _, v) = complete(&c, &url, completion_body(&prompt(300, 100), 1)).await;
        assert_eq!(st, 200, "{v}");
    }
    let w = &workers_json(&c, &f.admin_url().unwrap()).await[0];
    let a = &w["accuracy"];
    // Only the two unsigned integers were compared; the huge one clamped to the prompt.
    assert_eq!(a["requests"], 2, "{a}");
    assert_eq!(a["reported_cached_tokens"], 100 + 7, "{a}");
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, "kvrouter_worker_reported_cached_tokens_total"),
        107.0
    );
    f.stop().await;
}
