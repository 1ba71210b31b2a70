//! Shared helpers of the end-to-end tests: embedded stacks on ephemeral ports, a keep-alive
//! HTTP client, prompts, and polling.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use kvrouter_core::RouterMode;
use kvrouter_mocker::{spawn_workers, DisaggregationMode, MockerConfig, RunningWorker};
use kvrouter_server::up::{EmbeddedStack, UpConfig};
use kvrouter_server::workers::fleet::Fleet;
use serde_json::{json, Value};

pub const MODEL: &str = kvrouter_server::VENDORED_MODEL_NAME;

/// An embedded stack: `workers` mock workers (no modelled delay unless `tweak` says so),
/// small caches, 64-token blocks, the frontend in `mode`.
pub async fn stack(
    mode: RouterMode,
    workers: usize,
    tweak: impl FnOnce(&mut UpConfig),
) -> EmbeddedStack {
    let mut cfg = UpConfig {
        workers,
        ..UpConfig::default()
    };
    cfg.mocker.speedup_ratio = 0.0;
    cfg.mocker.num_gpu_blocks = 1024;
    cfg.frontend.router_mode = mode;
    cfg.frontend.fleet.health_interval_ms = 100;
    tweak(&mut cfg);
    EmbeddedStack::start(cfg)
        .await
        .expect("embedded stack starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client")
}

/// `n` distinct-looking token ids starting from `seed`.
pub fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1000 + (seed.wrapping_mul(7919).wrapping_add(i * 104_729)) % 100_000)
        .collect()
}

/// A non-streamed completion: (status, serving worker id, body).
pub async fn complete(c: &reqwest::Client, url: &str, body: Value) -> (u16, Option<u64>, Value) {
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let worker = worker_of(&r);
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, worker, v)
}

pub fn worker_of(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get(kvrouter_server::frontend::WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

pub fn completion_body(tokens: &[u32], max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": tokens, "max_tokens": max_tokens})
}

/// Poll `f` every 10 ms until it holds or `secs` pass; returns whether it held.
pub async fn eventually(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether every registered rank, routable or not, has no booked load.
pub fn all_idle(s: &EmbeddedStack) -> bool {
    fleet_idle(&s.frontend.fleet)
}

/// Whether no registered rank of `fleet` has booked load.
pub fn fleet_idle(fleet: &Fleet) -> bool {
    fleet.registry.all().iter().all(|w| {
        fleet.router.loads(w.spec.ranks()).iter().all(|l| {
            l.active_requests == 0 && l.active_decode_blocks == 0 && l.active_prefill_tokens == 0
        })
    })
}

/// `n` mock workers in this process (64-token blocks, 1,024 of them, no modelled delay) in
/// disaggregation `mode`, transfers instantaneous.
pub async fn mock_workers(n: usize, mode: DisaggregationMode) -> Vec<RunningWorker> {
    let cfg = MockerConfig {
        model_path: Some(kvrouter_server::vendored_model_dir()),
        speedup_ratio: 0.0,
        num_gpu_blocks: 1024,
        block_size: 64,
        disaggregation_mode: mode,
        // Any free side-channel port: tests start prefill workers in parallel.
        disaggregation_bootstrap_port: 0,
        kv_transfer_bandwidth: 0.0,
        ..MockerConfig::default()
    };
    spawn_workers(&cfg, n).await.expect("mock workers start")
}

/// URLs of `fleet`'s registered workers that are in its routing set, sorted.
pub fn routable_urls(fleet: &Fleet) -> Vec<String> {
    let input = kvrouter_server::routing::RouteInput {
        tokens: &[1],
        ..Default::default()
    };
    let routable: Vec<u64> = fleet
        .router
        .potential_loads(&input)
        .iter()
        .map(|l| l.worker.worker_id)
        .collect();
    let mut u: Vec<String> = fleet
        .registry
        .all()
        .iter()
        .filter(|w| routable.contains(&w.id()))
        .map(|w| w.spec.url.clone())
        .collect();
    u.sort();
    u
}

/// Parse an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// `GET url` answered as JSON.
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let r = c.get(url).send().await.expect("request sent");
    r.json().await.expect("a JSON answer")
}

/// Start a streamed completion and return the response (headers received).
pub async fn start_stream(c: &reqwest::Client, url: &str, mut body: Value) -> reqwest::Response {
    body["stream"] = Value::Bool(true);
    c.post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// Stop the in-process worker registered as `id`; returns the HTTP port it had.
pub async fn kill_worker(s: &mut EmbeddedStack, id: u64) -> u16 {
    let url = s
        .frontend
        .fleet
        .registry
        .get(id)
        .expect("registered")
        .spec
        .url
        .clone();
    let i = s
        .workers
        .iter()
        .position(|w| w.info.url == url)
        .expect("one of the stack's workers");
    let w = s.workers.remove(i);
    let port = w.http_addr.port();
    w.stop().await;
    port
}

/// HTTP status of `GET url`.
pub async fn get_status(c: &reqwest::Client, url: &str) -> u16 {
    c.get(url)
        .send()
        .await
        .expect("request sent")
        .status()
        .as_u16()
}

/// The frontend's `/metrics` text.
pub async fn metrics_text(c: &reqwest::Client, url: &str) -> String {
    c.get(format!("{url}/metrics"))
        .send()
        .await
        .expect("request sent")
        .text()
        .await
        .expect("metrics body")
}

/// Sum of a metric's samples (all label sets) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A numeric response header (e.g. `x-kvrouter-worker-id`), if present and a number.
pub fn header_u64(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
