//! The virtual-time replay against the live engine: the same requests through one mock worker
//! over HTTP (`kvrouter bench`'s runner) and through the replay give the same prefix-cache hits
//! request by request, and, with modelled time on, the same time to first token within 10 %.

use std::sync::Arc;
use std::time::Duration;

use kvrouter_bench::client::{http_client, Api};
use kvrouter_bench::replay::{replay, ReplayConfig, ReplayWorkload};
use kvrouter_bench::runner::{run, RunOptions};
use kvrouter_bench::workload::{prefix_workload, PrefixSpec, Schedule};
use kvrouter_core::config::{RouterConfig, RouterMode};
use kvrouter_mocker::{spawn_workers, MockerConfig};

fn options(url: &str) -> RunOptions {
    RunOptions {
        label: "live".into(),
        base_url: url.to_string(),
        more_urls: Vec::new(),
        model: None,
        api: Api::Completions,
        tokenizer: None,
        timeout: Duration::from_secs(120),
        max_duration: Some(Duration::from_secs(600)),
        progress: false,
    }
}

fn spec(requests: usize, suffix_len: (usize, usize), osl: (usize, usize)) -> PrefixSpec {
    PrefixSpec {
        requests,
        prefixes: 3,
        prefix_len: (64, 300),
        suffix_len,
        osl,
        seed: 5,
    }
}

fn mocker(speedup_ratio: f64, num_gpu_blocks: usize) -> MockerConfig {
    MockerConfig {
        speedup_ratio,
        num_gpu_blocks,
        block_size: 16,
        kv_events: false,
        ..Default::default()
    }
}

/// Live over HTTP and replayed: (per-request cached tokens, TTFT p50 ms) of each.
async fn both(spec: &PrefixSpec, m: MockerConfig) -> ((Vec<u64>, f64), (Vec<u64>, f64)) {
    let reqs = prefix_workload(spec);
    let schedule = Schedule::Closed { concurrency: 1 };
    let workers = spawn_workers(&m, 1).await.unwrap();
    let live = run(
        &http_client(),
        &options(&workers[0].info.url),
        Arc::new(reqs.clone()),
        &schedule,
    )
    .await
    .unwrap();
    for w in workers {
        w.stop().await;
    }
    let mut cfg = ReplayConfig::fleet(
        1,
        m.num_gpu_blocks,
        m.block_size,
        RouterConfig {
            mode: RouterMode::RoundRobin,
            ..Default::default()
        },
    );
    cfg.mocker = m;
    let virt = replay(&ReplayWorkload::from_requests(reqs, schedule), &cfg).unwrap();
    let cached = |records: &[kvrouter_bench::client::RequestRecord]| {
        let mut v: Vec<(usize, u64)> = records
            .iter()
            .map(|r| (r.index, r.usage.expect("usage").cached_tokens))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, c)| c).collect::<Vec<u64>>()
    };
    assert_eq!(live.report.errors, 0);
    assert_eq!(virt.report.errors, 0);
    (
        (cached(&live.records), live.report.ttft_ms.unwrap().p50),
        (cached(&virt.records), virt.report.ttft_ms.unwrap().p50),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_hits_are_the_live_engines_request_by_request() {
    // A pool of 64 blocks of 16 tokens holds about three prompts: the replay must evict what
    // the live engine evicts, too.
    for blocks in [4096, 64] {
        let ((live, _), (virt, _)) = both(&spec(60, (5, 40), (2, 6)), mocker(0.0, blocks)).await;
        assert_eq!(live, virt, "{blocks} blocks");
        assert!(virt.iter().sum::<u64>() > 0, "the workload shares prefixes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_ttft_is_the_live_engines_within_ten_percent() {
    // Uncached suffixes of 8,000–12,000 tokens: prefills of 150–250 ms modelled, so that what
    // live adds per request — HTTP, JSON of the prompt, task wake-ups: 4–9 ms in a debug build
    // on a busy machine — stays well inside the 10 %.
    let s = spec(20, (8000, 12000), (2, 4));
    let ((live, live_ttft), (virt, virt_ttft)) = both(&s, mocker(1.0, 16384)).await;
    assert_eq!(live, virt);
    eprintln!("TTFT p50: live {live_ttft:.2} ms, replayed {virt_ttft:.2} ms");
    assert!(
        (live_ttft - virt_ttft).abs() <= 0.1 * virt_ttft,
        "live TTFT p50 {live_ttft:.2} ms, replayed {virt_ttft:.2} ms"
    );
}
