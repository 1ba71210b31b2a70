//! Load on one router call over HTTP: the same request (a prompt of `--tokens` token ids) sent
//! back to back by `--concurrency` keep-alive clients for `--secs`; prints calls per second,
//! latency percentiles, the router's own routing time per call (Δ of
//! `kvrouter_router_overhead_seconds{stage="total"}`) and, with `--pid` (repeatable: a
//! frontend and the routers it asks), each process's CPU time per call and their sum.
//!
//! ```sh
//! cargo run --release -p kvrouter-bench --example router_load -- \
//!     --url http://127.0.0.1:8090 --call best_worker_id --tokens 4096 --concurrency 1 --secs 10
//! ```
//!
//! `--call best_worker_id` posts a query-only `/v1/router/best_worker_id` (after one
//! `generate` of the prompt with `--prime`, so a worker caches it); `--call completions` posts
//! the prompt to a frontend's `/v1/completions` with `max_tokens: 1` (its routing cost per
//! request, for comparison; `--max-tokens N` for longer outputs, `ignore_eos`).
use std::time::{Duration, Instant};

use kvrouter_bench::scrape::{RouterFigures, Samples, STAGES};
use kvrouter_bench::stats::percentile;
use serde_json::json;

struct Args {
    url: String,
    call: String,
    tokens: usize,
    concurrency: usize,
    secs: f64,
    pids: Vec<u32>,
    prime: bool,
    model: String,
    /// `--call completions`: tokens generated per request.
    max_tokens: u32,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:8090".into(),
        call: "best_worker_id".into(),
        tokens: 4096,
        concurrency: 1,
        secs: 10.0,
        pids: Vec::new(),
        prime: false,
        model: "Qwen/Qwen3-0.6B".into(),
        max_tokens: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v()?,
            "--call" => a.call = v()?,
            "--tokens" => a.tokens = v()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--concurrency" => {
                a.concurrency = v()?.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            "--secs" => a.secs = v()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--pid" => a
                .pids
                .push(v()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "--model" => a.model = v()?,
            "--max-tokens" => {
                a.max_tokens = v()?.parse().map_err(|e| format!("--max-tokens: {e}"))?
            }
            "--prime" => a.prime = true,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

/// CPU time of every thread of process `pid` so far (`/proc/PID/task/*/schedstat`).
fn cpu_time(pid: u32) -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

/// `(sum, count)` of the routing overhead histogram's `total` stage.
/// The frontend's metrics now (empty if it cannot be read).
async fn scrape(c: &reqwest::Client, url: &str) -> Samples {
    let text = match c.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    Samples::parse(&text)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a = args()?;
    // A prompt unlike the mock engine's output, the same every run.
    let tokens: Vec<u32> = (0..a.tokens as u32)
        .map(|i| 1000 + (i * 104_729 + 7) % 100_000)
        .collect();
    let c = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(a.concurrency.max(1))
        .build()
        .map_err(|e| e.to_string())?;
    let (target, body) = match a.call.as_str() {
        "best_worker_id" => (
            format!("{}/v1/router/best_worker_id", a.url),
            json!({"token_ids": tokens}),
        ),
        "completions" => (
            format!("{}/v1/completions", a.url),
            json!({"model": a.model, "prompt": tokens, "max_tokens": a.max_tokens, "ignore_eos": true}),
        ),
        other => return Err(format!("unknown --call {other}")),
    };
    if a.prime {
        let r = c
            .post(format!("{}/v1/router/generate", a.url))
            .json(&json!({"token_ids": tokens, "stop_conditions": {"max_tokens": 1}}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let _ = r.text().await;
        if !status.is_success() {
            return Err(format!("priming generate answered {status}"));
        }
        // The worker's KV events reach the router's index asynchronously.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One copy for the whole run: each call sends it without copying.
    let body: &'static [u8] = Vec::leak(serde_json::to_vec(&body).map_err(|e| e.to_string())?);
    // Warm up connections and caches.
    for _ in 0..200 {
        let r = c
            .post(&target)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("{target} answered {}", r.status()));
        }
        let _ = r.bytes().await;
    }
    let before = scrape(&c, &a.url).await;
    let cpu0: Vec<Duration> = a.pids.iter().map(|&p| cpu_time(p)).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.secs);
    let tasks: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| {
            let (c, target) = (c.clone(), target.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    let ok = match c
                        .post(&target)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu: Vec<Duration> = a
        .pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, &c0)| cpu_time(p).saturating_sub(c0))
        .collect();
    let after = scrape(&c, &a.url).await;
    lat.sort_by(f64::total_cmp);
    let n = lat.len();
    let p = |q: f64| percentile(&lat, q).unwrap_or(f64::NAN);
    println!(
        "{} calls ({errors} errors) in {elapsed:.1} s, concurrency {}: {:.0} calls/s",
        n,
        a.concurrency,
        n as f64 / elapsed
    );
    println!(
        "latency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}",
        p(50.0),
        p(90.0),
        p(99.0),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    if let Some(f) = RouterFigures::between(&before, &after) {
        for stage in STAGES {
            if let (Some(mean), Some(p50)) =
                (f.overhead_us.get(stage), f.overhead_p50_us.get(stage))
            {
                println!("routing {stage:>12} (kvrouter_router_overhead_seconds): mean {mean:.1} µs, p50 {p50:.1} µs");
            }
        }
    }
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    for (pid, d) in a.pids.iter().zip(&cpu) {
        println!(
            "process {pid} CPU: {:.1} µs/call ({:.2} cores busy)",
            per_call(*d),
            d.as_secs_f64() / elapsed
        );
    }
    if cpu.len() > 1 {
        let total: Duration = cpu.iter().sum();
        println!("all processes CPU: {:.1} µs/call", per_call(total));
    }
    Ok(())
}
