//! First-chunk latency of streamed completions on a reused keep-alive connection, through an
//! embedded stack with no modelled engine delay. Nagle's algorithm plus delayed ACKs would
//! hold the first small SSE write for ~40 ms on a reused connection (Dynamo's frontend shows
//! this); with `TCP_NODELAY` on both sides the median is a few ms.
//!
//! `cargo bench -p kvrouter-bench --bench first_chunk` prints min / median / p90 / max over
//! 200 requests and flags a median above 25 ms.
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvrouter_bench::stats::percentile;
use kvrouter_core::RouterMode;
use kvrouter_server::up::{EmbeddedStack, UpConfig};
use serde_json::json;

const REQUESTS: u32 = 200;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut cfg = UpConfig {
            workers: 1,
            ..UpConfig::default()
        };
        cfg.mocker.speedup_ratio = 0.0;
        cfg.mocker.num_gpu_blocks = 1024;
        cfg.frontend.router_mode = RouterMode::Kv;
        let s = EmbeddedStack::start(cfg).await.expect("stack starts");
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let url = format!("{}/v1/completions", s.url());
        let mut ms = Vec::new();
        for i in 0..REQUESTS {
            let prompt: Vec<u32> = (0..64).map(|j| 1000 + (i * 7919 + j * 104_729) % 100_000).collect();
            let body = json!({"model": kvrouter_server::VENDORED_MODEL_NAME, "prompt": prompt,
                              "max_tokens": 2, "stream": true});
            let t = Instant::now();
            let r = c.post(&url).json(&body).send().await.expect("sent");
            let mut st = r.bytes_stream();
            let _first = st.next().await.expect("a first chunk").expect("bytes");
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            while st.next().await.is_some() {}
        }
        ms.sort_by(f64::total_cmp);
        let p = |q| percentile(&ms, q).unwrap_or(f64::NAN);
        println!(
            "first chunk on a keep-alive connection, {REQUESTS} requests: min {:.2} ms, median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            p(0.0), p(50.0), p(90.0), p(100.0)
        );
        if p(50.0) > 25.0 {
            println!("WARNING: median above 25 ms — a Nagle/delayed-ACK stall is likely back");
        }
        s.stop().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
