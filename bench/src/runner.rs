//! Run a workload against one endpoint over HTTP and summarise what it measured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvrouter_preprocess::Preprocessor;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::client::{send, Api, Prompt, RequestRecord, Target};
use crate::scrape::{RouterFigures, Samples};
use crate::stats::Summary;
use crate::workload::{BenchRequest, Schedule};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The model name could not be discovered from `GET BASE/v1/models`.
    #[error("cannot discover the model at {url} (pass --model): {reason}")]
    Model {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Chat prompts need a tokenizer to turn token ids into text.
    #[error("the chat endpoint needs a tokenizer (--tokenizer DIR)")]
    NoTokenizer,
    /// Decoding a prompt to text failed.
    #[error("decoding a prompt: {0}")]
    Decode(String),
    /// The schedule does not fit the workload.
    #[error("schedule: {0}")]
    Schedule(String),
}

/// How one run talks to its endpoint.
#[derive(Clone)]
pub struct RunOptions {
    /// Name of the run in reports (a router mode, or any label).
    pub label: String,
    /// Base URL, e.g. `http://127.0.0.1:8000` (a trailing `/` or `/v1` is dropped).
    pub base_url: String,
    /// More base URLs of the same deployment (router replicas): request `i` goes to the
    /// `i mod n`-th of `base_url` and these, a round-robin client. Router figures are
    /// `base_url`'s alone.
    pub more_urls: Vec<String>,
    /// Model name to send; `None` = the first id of `GET BASE/v1/models`.
    pub model: Option<String>,
    /// Completions (token ids) or chat (text).
    pub api: Api,
    /// Tokenizer that decodes prompts to text for [`Api::Chat`].
    pub tokenizer: Option<Arc<Preprocessor>>,
    /// Per-request limit, connect to end of stream.
    pub timeout: Duration,
    /// Whole-run limit: no request is sent after it, and requests in flight then are cut and
    /// counted as errors. `None` = no limit.
    pub max_duration: Option<Duration>,
    /// Draw a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// Figures of one run: what `results.json` lists under `"runs"`. Latencies in ms; rates per
/// second of wall time from the first send to the last answer; hit rates in 0–1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Router mode or label.
    pub mode: String,
    /// Σ usage.prompt_tokens_details.cached_tokens / Σ usage.prompt_tokens over successful
    /// requests (`None` when no response carried usage).
    pub hit_rate: Option<f64>,
    /// Time to first token.
    pub ttft_ms: Option<Summary>,
    /// Inter-token latency: every gap between successive token chunks.
    pub itl_ms: Option<Summary>,
    /// End-to-end latency of successful requests.
    pub e2e_ms: Option<Summary>,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Σ usage.completion_tokens (token chunks when usage is missing) per second.
    pub output_tokens_per_s: f64,
    /// Failed requests (including those cut by the run's time limit).
    pub errors: u64,
    /// Requests sent.
    pub requests: u64,
    /// Requests that succeeded.
    pub succeeded: u64,
    /// Successful requests whose stream had no usage.
    pub usage_missing: u64,
    /// Σ usage.prompt_tokens.
    pub prompt_tokens: u64,
    /// Σ usage.prompt_tokens_details.cached_tokens.
    pub cached_tokens: u64,
    /// Σ usage.completion_tokens.
    pub completion_tokens: u64,
    /// Wall time, first send to last answer, s.
    pub duration_s: f64,
    /// The router's predicted hit rate over the run (from `/metrics`), when exposed.
    pub predicted_hit_rate: Option<f64>,
    /// Mean routing overhead per stage, µs (from `/metrics`), when exposed.
    pub router_overhead_us: Option<std::collections::BTreeMap<String, f64>>,
    /// Requests the router sent to each worker over the run (from `/metrics`), when exposed.
    pub requests_per_worker: Option<std::collections::BTreeMap<String, u64>>,
    /// 1 − Σ prompt tokens the engines computed / Σ prompt tokens, from the mock workers'
    /// `kvrouter_mocker_computed_prefill_tokens_total` (embedded stacks): the hit rate of a
    /// disaggregated fleet, whose decode workers report transferred tokens as cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_hit_rate: Option<f64>,
    /// KV blocks the decode workers pulled from prefill workers over the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_blocks: Option<u64>,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
    /// Where the requests went.
    pub url: String,
    /// The model name sent.
    pub model: String,
    /// How requests were released.
    pub schedule: String,
}

/// A run's report plus every request's record (in completion order).
#[derive(Clone, Debug, Default)]
pub struct RunOutcome {
    /// The summary.
    pub report: RunReport,
    /// One record per request sent.
    pub records: Vec<RequestRecord>,
}

/// Strip a trailing `/` and `/v1` from a base URL.
pub fn normalize_base(url: &str) -> String {
    let mut s = url.trim().trim_end_matches('/').to_string();
    if let Some(stripped) = s.strip_suffix("/v1") {
        s = stripped.to_string();
    }
    s
}

/// The first model id of `GET BASE/v1/models`.
pub async fn discover_model(client: &reqwest::Client, base: &str) -> Result<String, RunError> {
    let url = format!("{base}/v1/models");
    let err = |reason: String| RunError::Model {
        url: url.clone(),
        reason,
    };
    let resp = client
        .get(&url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| err(e.to_string()))?;
    v.pointer("/data/0/id")
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| err("no model listed".into()))
}

/// The HTTP client runs share.
pub type HttpClient = reqwest::Client;

/// `(Σ prompt tokens computed, Σ KV blocks pulled by decode workers)` over mock workers at
/// `urls` now (`kvrouter_mocker_computed_prefill_tokens_total`,
/// `kvrouter_mocker_kv_transfer_blocks_total`); unreachable workers count 0.
pub async fn mock_engine_counters(client: &reqwest::Client, urls: &[String]) -> (f64, f64) {
    let mut out = (0.0, 0.0);
    for u in urls {
        if let Some(m) = scrape(client, u).await {
            out.0 += m
                .sum("kvrouter_mocker_computed_prefill_tokens_total", &[])
                .unwrap_or(0.0);
            out.1 += m
                .sum("kvrouter_mocker_kv_transfer_blocks_total", &[])
                .unwrap_or(0.0);
        }
    }
    out
}

/// `GET {base}/metrics`, parsed; None when unreachable or not 2xx.
pub async fn scrape(client: &reqwest::Client, base: &str) -> Option<Samples> {
    let resp = client
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    Some(Samples::parse(&resp.text().await.ok()?))
}

/// Send `requests` to `opts.base_url` as `schedule` releases them, streaming, through `client`
/// (share one client across runs for one connection pool), and summarise. Router figures are
/// the deltas of the endpoint's `/metrics` across the run, when it has them. Fails only before
/// sending anything (model discovery, chat without tokenizer, a schedule of the wrong length);
/// request failures are counted in the report.
pub async fn run(
    client: &reqwest::Client,
    opts: &RunOptions,
    requests: Arc<Vec<BenchRequest>>,
    schedule: &Schedule,
) -> Result<RunOutcome, RunError> {
    let base = normalize_base(&opts.base_url);
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => discover_model(client, &base).await?,
    };
    if let Schedule::Open { offsets_ms } = schedule {
        if offsets_ms.len() != requests.len() {
            return Err(RunError::Schedule(format!(
                "{} send times for {} requests",
                offsets_ms.len(),
                requests.len()
            )));
        }
    }
    if let Schedule::Closed { concurrency: 0 } = schedule {
        return Err(RunError::Schedule("concurrency must be at least 1".into()));
    }
    // Chat prompts are decoded up front (tokenizer time is not the endpoint's).
    let texts: Option<Arc<Vec<String>>> = match opts.api {
        Api::Completions => None,
        Api::Chat => {
            let tok = opts.tokenizer.as_ref().ok_or(RunError::NoTokenizer)?;
            let texts = requests
                .iter()
                .map(|r| tok.decode(&r.prompt))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RunError::Decode(e.to_string()))?;
            Some(Arc::new(texts))
        }
    };
    let targets: Arc<Vec<Target>> = Arc::new(
        std::iter::once(base.clone())
            .chain(opts.more_urls.iter().map(|u| normalize_base(u)))
            .map(|base| Target {
                client: client.clone(),
                base,
                model: model.clone(),
                timeout: opts.timeout,
            })
            .collect(),
    );
    let before = scrape(client, &base).await;

    let n = requests.len();
    let bar = if opts.progress {
        ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(opts.label.clone());

    let start = Instant::now();
    let deadline = opts.max_duration.map(|d| start + d);
    let (tx, mut rx) = mpsc::unbounded_channel::<RequestRecord>();
    let one = {
        let targets = targets.clone();
        let requests = requests.clone();
        let texts = texts.clone();
        move |i: usize| {
            let targets = targets.clone();
            let requests = requests.clone();
            let texts = texts.clone();
            async move {
                let r = &requests[i];
                let prompt = match &texts {
                    Some(t) => Prompt::ChatText(t[i].clone()),
                    None => Prompt::Tokens(&r.prompt),
                };
                let fut = send(&targets[i % targets.len()], i, prompt, r.max_tokens, start);
                match deadline {
                    None => fut.await,
                    Some(d) => {
                        let t0 = Instant::now();
                        tokio::select! {
                            rec = fut => rec,
                            _ = tokio::time::sleep_until(d.into()) => RequestRecord {
                                index: i,
                                start_ms: (t0 - start).as_secs_f64() * 1e3,
                                e2e_ms: t0.elapsed().as_secs_f64() * 1e3,
                                error: Some("cut by the run's time limit".into()),
                                ..Default::default()
                            },
                        }
                    }
                }
            }
        }
    };
    let past_deadline = move || deadline.is_some_and(|d| Instant::now() >= d);
    match schedule {
        Schedule::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..(*concurrency).min(n) {
                let (tx, next, one) = (tx.clone(), next.clone(), one.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n || past_deadline() {
                            break;
                        }
                        if tx.send(one(i).await).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        Schedule::Open { offsets_ms } => {
            let offsets = offsets_ms.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for (i, off) in offsets.into_iter().enumerate() {
                    let at = start + Duration::from_secs_f64(off.max(0.0) / 1e3);
                    tokio::time::sleep_until(at.into()).await;
                    if past_deadline() {
                        break;
                    }
                    let (tx, one) = (tx.clone(), one.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(one(i).await);
                    });
                }
            });
        }
    }
    drop(tx);

    let mut records = Vec::with_capacity(n);
    let (mut errors, mut prompt, mut cached) = (0u64, 0u64, 0u64);
    let mut last_end = start;
    while let Some(rec) = rx.recv().await {
        last_end = last_end.max(Instant::now());
        if rec.ok {
            if let Some(u) = rec.usage {
                prompt += u.prompt_tokens;
                cached += u.cached_tokens;
            }
        } else {
            errors += 1;
        }
        records.push(rec);
        bar.inc(1);
        let hit = if prompt > 0 {
            format!("hit {:.3}", cached as f64 / prompt as f64)
        } else {
            "hit –".into()
        };
        bar.set_message(format!("{hit}, errors {errors}"));
    }
    bar.finish_and_clear();
    let duration = (last_end - start).as_secs_f64();
    let after = scrape(client, &base).await;
    let router = after
        .as_ref()
        .and_then(|a| RouterFigures::between(&before.unwrap_or_default(), a));

    let mut report = summarise(&opts.label, &records, duration);
    report.predicted_hit_rate = router.as_ref().and_then(|r| r.predicted_hit_rate);
    report.requests_per_worker = router
        .as_ref()
        .map(|r| r.requests_per_worker.clone())
        .filter(|m| !m.is_empty());
    report.router_overhead_us = router
        .map(|r| r.overhead_us)
        .filter(|m: &std::collections::BTreeMap<String, f64>| !m.is_empty());
    report.url = base;
    report.model = model;
    report.schedule = schedule.describe();
    Ok(RunOutcome { report, records })
}

/// Summarise request records over a run of `duration_s` seconds (see [`RunReport`]; the
/// endpoint-specific fields are left empty).
pub fn summarise(label: &str, records: &[RequestRecord], duration_s: f64) -> RunReport {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
    let (mut prompt, mut cached, mut completion, mut out_tokens, mut missing) = (0, 0, 0, 0, 0);
    for r in &ok {
        match r.usage {
            Some(u) => {
                prompt += u.prompt_tokens;
                cached += u.cached_tokens;
                completion += u.completion_tokens;
                out_tokens += u.completion_tokens;
            }
            None => {
                missing += 1;
                out_tokens += r.chunks;
            }
        }
    }
    let mut error_samples: Vec<String> = Vec::new();
    for e in records.iter().filter_map(|r| r.error.as_ref()) {
        if error_samples.len() < 5 && !error_samples.contains(e) {
            error_samples.push(e.clone());
        }
    }
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    RunReport {
        mode: label.to_string(),
        hit_rate: (prompt > 0).then(|| cached as f64 / prompt as f64),
        ttft_ms: Summary::of(&ttft),
        itl_ms: Summary::of(&itl),
        e2e_ms: Summary::of(&e2e),
        requests_per_s: per_s(ok.len() as f64),
        output_tokens_per_s: per_s(out_tokens as f64),
        errors: (records.len() - ok.len()) as u64,
        requests: records.len() as u64,
        succeeded: ok.len() as u64,
        usage_missing: missing,
        prompt_tokens: prompt,
        cached_tokens: cached,
        completion_tokens: completion,
        duration_s,
        error_samples,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Usage;

    #[test]
    fn summaries_add_up() {
        let rec = |ok: bool, ttft: f64, itl: Vec<f64>, usage: Option<Usage>| RequestRecord {
            ok,
            ttft_ms: Some(ttft),
            e2e_ms: ttft + itl.iter().sum::<f64>(),
            chunks: itl.len() as u64 + 1,
            itl_ms: itl,
            usage,
            error: (!ok).then(|| "HTTP 500: x".to_string()),
            ..Default::default()
        };
        let u = |p, c, k| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
                cached_tokens: k,
            })
        };
        let records = [
            rec(true, 10.0, vec![1.0, 3.0], u(100, 3, 50)),
            rec(true, 30.0, vec![2.0], u(300, 2, 0)),
            rec(false, 99.0, vec![], u(1000, 1, 1000)),
            rec(true, 20.0, vec![4.0, 4.0, 4.0], None),
        ];
        let r = summarise("kv", &records, 2.0);
        assert_eq!(r.hit_rate, Some(50.0 / 400.0));
        assert_eq!(
            (r.errors, r.succeeded, r.requests, r.usage_missing),
            (1, 3, 4, 1)
        );
        assert_eq!(r.requests_per_s, 1.5);
        // 3 + 2 from usage, 4 chunks where usage is missing.
        assert_eq!(r.output_tokens_per_s, 4.5);
        assert_eq!(r.ttft_ms.unwrap().p50, 20.0);
        assert_eq!(r.itl_ms.unwrap().count, 6);
        assert_eq!(r.itl_ms.unwrap().mean, 3.0);
        assert_eq!(r.e2e_ms.unwrap().p50, 32.0);
        assert_eq!(r.e2e_ms.unwrap().mean, 26.0);
        assert_eq!(r.error_samples, vec!["HTTP 500: x".to_string()]);
        assert_eq!(normalize_base("http://h:1/v1/"), "http://h:1");
        assert_eq!(normalize_base("http://h:1"), "http://h:1");
    }
}
