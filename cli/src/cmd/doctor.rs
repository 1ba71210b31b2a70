//! `kvrouter doctor URL`: check that a running deployment's KV routing works, worker by
//! worker. For each worker it sends a long, never-seen prompt twice, pinned to the worker with
//! `nvext.backend_instance_id`, and compares the overlap the router predicted for the second
//! send (response header `x-kvrouter-predicted-cached-tokens`) with the cached tokens the
//! engine reported (`usage.prompt_tokens_details.cached_tokens`). With `--admin-url` it lists
//! the workers from the admin API, waits for each one's KV events between the two sends, and
//! reads its block size, event flow and the router's own running accuracy verdict
//! (`kvrouter_server::workers::accuracy`); without it, it probes the worker the router picks.
//!
//! Per worker it prints `OK`, `WARN` (the engine reported no cache hit for a repeated prompt:
//! prefix caching off, or its usage carries no `cached_tokens` — nothing to compare) or `FAIL`
//! with the likely cause, and exits non-zero when any worker fails.
use std::time::{Duration, Instant};

use anyhow::Context;
use kvrouter_server::frontend::{PREDICTED_CACHED_HEADER, WORKER_HEADER};
use kvrouter_server::workers::accuracy::{Cause, EventFlow, Sample, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

/// `kvrouter doctor` flags.
#[derive(clap::Args)]
pub struct Args {
    /// Base URL of the frontend's OpenAI API (e.g. http://127.0.0.1:8000).
    pub url: String,
    /// Base URL of its admin API (e.g. http://127.0.0.1:8001): every worker is probed, and its
    /// block size, KV event flow and running accuracy checked.
    #[arg(long)]
    pub admin_url: Option<String>,
    /// Bearer token of the admin API.
    #[arg(long, env = "KVROUTER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Model to probe (default: the first of `/v1/models`).
    #[arg(long)]
    pub model: Option<String>,
    /// Words in the probe prompt (about as many tokens).
    #[arg(long, default_value_t = 1500)]
    pub prompt_words: usize,
    /// How long to wait for a worker's KV events between the two sends, milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub settle_ms: u64,
    /// Timeout of each HTTP request, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_secs: f64,
}

/// The part of a worker in `GET /v1/workers` the doctor reads.
#[derive(Deserialize)]
struct AdminWorker {
    spec: AdminSpec,
    health: String,
    accuracy: Option<AdminAccuracy>,
}

#[derive(Deserialize)]
struct AdminSpec {
    id: u64,
    url: String,
    block_size: Option<usize>,
}

#[derive(Deserialize)]
struct AdminAccuracy {
    verdict: Verdict,
    cause: Option<Cause>,
    requests: u64,
    window_predicted_tokens: u64,
    window_reported_tokens: u64,
    events: EventFlow,
}

/// One probe's result: the worker that served it, predicted and reported cached tokens.
struct Probe {
    worker: u64,
    predicted: Option<u64>,
    reported: Option<u64>,
    prompt_tokens: u64,
}

/// A worker's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// The verdict on a worker's second probe: `sample` (predicted and reported cached tokens),
/// blocks of `block_size`, its KV event `flow` when the admin API told it. Returns the status
/// and why.
pub fn judge_probe(
    sample: Sample,
    block_size: usize,
    flow: Option<&EventFlow>,
) -> (Status, String) {
    let bs = block_size.max(1) as u64;
    let seen = format!(
        "predicted {} / reported {} cached tokens of the repeated prompt",
        sample.predicted, sample.reported
    );
    let verdict = match sample.mismatch(block_size) {
        Some("under") => Verdict::UnderPredicting,
        Some(_) => Verdict::OverPredicting,
        None if sample.reported < bs => {
            return (
                Status::Warn,
                format!("{seen}: the engine reported no cache hit — prefix caching off, or its usage has no cached_tokens (vLLM: --enable-prompt-tokens-details); nothing to compare"),
            )
        }
        None => return (Status::Ok, seen),
    };
    let why = match flow {
        Some(f) => Cause::of(verdict, f).map(|c| format!("{}: {}", c.as_str(), c.advice())),
        None if verdict == Verdict::UnderPredicting => Some(
            "no overlap predicted while the engine hits: no KV events arriving, block size, hash seed (PYTHONHASHSEED / --prefix-caching-hash-algo), tokenizer or chat template mismatch (give --admin-url to tell them apart)".into(),
        ),
        None => Cause::of(verdict, &EventFlow::default()).map(|c| format!("{}: {}", c.as_str(), c.advice())),
    };
    (
        Status::Fail,
        format!("{seen}: {} — {}", verdict.as_str(), why.unwrap_or_default()),
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let failed = rt.block_on(doctor(&args))?;
    if failed > 0 {
        anyhow::bail!("{failed} worker(s) failed");
    }
    Ok(())
}

struct Doctor<'a> {
    args: &'a Args,
    http: reqwest::Client,
    url: String,
    model: String,
}

/// Check every worker; returns how many failed.
async fn doctor(args: &Args) -> anyhow::Result<usize> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout_secs))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = http
                .get(format!("{url}/v1/models"))
                .send()
                .await
                .with_context(|| format!("reaching {url}"))?
                .error_for_status()?
                .json()
                .await?;
            v["data"][0]["id"]
                .as_str()
                .context("the frontend lists no model")?
                .to_string()
        }
    };
    let d = Doctor {
        args,
        http,
        url,
        model,
    };
    let nonce: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_nanos() as u64)
        .unwrap_or(0);
    let mut failed = 0;
    let Some(admin) = args.admin_url.as_deref() else {
        println!(
            "kvrouter doctor: {} (no --admin-url: probing the worker the router picks)",
            d.url
        );
        let status = d.check(None, nonce).await;
        return Ok((status == Status::Fail) as usize);
    };
    let workers = d.workers(admin).await?;
    println!(
        "kvrouter doctor: {} — {} worker(s) registered",
        d.url,
        workers.len()
    );
    if workers.is_empty() {
        println!("FAIL  no workers registered");
        return Ok(1);
    }
    for w in &workers {
        if w.health != "healthy" {
            println!(
                "FAIL  worker {} {}: {} — not in the routing set",
                w.spec.id, w.spec.url, w.health
            );
            failed += 1;
            continue;
        }
        if d.check(Some(w), nonce).await == Status::Fail {
            failed += 1;
        }
    }
    Ok(failed)
}

impl Doctor<'_> {
    async fn workers(&self, admin: &str) -> anyhow::Result<Vec<AdminWorker>> {
        let admin = admin.trim_end_matches('/');
        let mut req = self.http.get(format!("{admin}/v1/workers"));
        if let Some(t) = &self.args.admin_token {
            req = req.bearer_auth(t);
        }
        let v: Value = req
            .send()
            .await
            .with_context(|| format!("reaching the admin API at {admin}"))?
            .error_for_status()?
            .json()
            .await?;
        serde_json::from_value(v["workers"].clone()).context("reading the admin API's worker list")
    }

    /// The worker `id` as the admin API shows it now.
    async fn worker(&self, id: u64) -> Option<AdminWorker> {
        let admin = self.args.admin_url.as_deref()?;
        let ws = self.workers(admin).await.ok()?;
        ws.into_iter().find(|w| w.spec.id == id)
    }

    /// Send the probe prompt, pinned to `worker` when given.
    async fn probe(&self, prompt: &str, worker: Option<u64>) -> anyhow::Result<Probe> {
        let mut body = json!({"model": self.model, "prompt": prompt, "max_tokens": 1});
        if let Some(w) = worker {
            body["nvext"] = json!({"backend_instance_id": w});
        }
        let r = self
            .http
            .post(format!("{}/v1/completions", self.url))
            .json(&body)
            .send()
            .await?;
        let header =
            |name: &str| -> Option<u64> { r.headers().get(name)?.to_str().ok()?.parse().ok() };
        let served = header(WORKER_HEADER);
        let predicted = header(PREDICTED_CACHED_HEADER);
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            anyhow::bail!(
                "HTTP {status}: {}",
                v["error"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(Probe {
            worker: served.or(worker).context(
                "the response names no worker (x-kvrouter-worker-id): is this a kvrouter frontend?",
            )?,
            predicted,
            reported: v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        })
    }

    /// Probe one worker (`None`: the one the router picks) and print its verdict.
    async fn check(&self, w: Option<&AdminWorker>, nonce: u64) -> Status {
        let id = w.map(|w| w.spec.id);
        let label = match w {
            Some(w) => format!("worker {} {}", w.spec.id, w.spec.url),
            None => "worker ?".to_string(),
        };
        let prompt = probe_prompt(nonce, id.unwrap_or(u64::MAX), self.args.prompt_words);
        let before = w.map(|w| w.accuracy.as_ref().map_or(0, |a| a.events.received));
        let first = match self.probe(&prompt, id).await {
            Ok(p) => p,
            Err(e) => {
                println!("FAIL  {label}: probe failed: {e:#}");
                return Status::Fail;
            }
        };
        let id = first.worker;
        let label = match w {
            Some(_) => label,
            None => format!("worker {id}"),
        };
        // The engine publishes the prompt's blocks; give the router time to index them.
        let settle = Duration::from_millis(self.args.settle_ms);
        match before {
            Some(before) => {
                let end = Instant::now() + settle;
                while Instant::now() < end {
                    let received = self
                        .worker(id)
                        .await
                        .and_then(|w| w.accuracy)
                        .map_or(0, |a| a.events.received);
                    if received > before {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(200).min(settle)).await;
            }
            None => tokio::time::sleep(settle).await,
        }
        let second = match self.probe(&prompt, Some(id)).await {
            Ok(p) => p,
            Err(e) => {
                println!("FAIL  {label}: probe failed: {e:#}");
                return Status::Fail;
            }
        };
        let now = self.worker(id).await;
        let block_size = now.as_ref().and_then(|w| w.spec.block_size).unwrap_or(1);
        let flow = now
            .as_ref()
            .and_then(|w| w.accuracy.as_ref())
            .map(|a| a.events);
        let (mut status, mut why) = match (second.predicted, second.reported) {
            (None, _) => (
                Status::Fail,
                "the response carries no predicted cached tokens (x-kvrouter-predicted-cached-tokens): the worker was not chosen by this frontend's router".to_string(),
            ),
            (_, None) => (
                Status::Warn,
                "the engine's usage has no prompt_tokens_details.cached_tokens (vLLM: --enable-prompt-tokens-details): nothing to compare".to_string(),
            ),
            (Some(p), Some(r)) => judge_probe(
                Sample::new(p, r, second.prompt_tokens.max(p).max(r)),
                block_size,
                flow.as_ref(),
            ),
        };
        // The router's own running verdict over real traffic.
        if let Some(a) = now.as_ref().and_then(|w| w.accuracy.as_ref()) {
            if a.verdict.is_bad() && status != Status::Fail {
                status = Status::Fail;
                why = format!(
                    "{why}; but over its last requests the router is {} ({})",
                    a.verdict.as_str(),
                    a.cause.map_or("", Cause::as_str)
                );
            }
        }
        println!("{:<5} {label}: {why}", status.as_str());
        if let Some(w) = &now {
            let ev = match w.accuracy.as_ref().map(|a| a.events) {
                Some(f) if f.subscribed => format!(
                    "KV events: {} received, {} applied, {} filtered, {} lost, {} live rank(s)",
                    f.received, f.applied, f.filtered, f.lost, f.live_ranks
                ),
                Some(_) => "KV events: no subscriber in this router (approximate mode or the NATS event plane)".to_string(),
                None => "KV events: unknown (admin API without accuracy)".to_string(),
            };
            println!("      block size {block_size}; {ev}");
            if let Some(a) = &w.accuracy {
                println!(
                    "      running accuracy: {} over {} request(s) compared; last window predicted {} / reported {} tokens",
                    a.verdict.as_str(),
                    a.requests,
                    a.window_predicted_tokens,
                    a.window_reported_tokens
                );
            }
        }
        status
    }
}

/// A long prompt no one sent before: a nonce first, so that no cached prefix is shared with
/// real traffic or another probe.
fn probe_prompt(nonce: u64, worker: u64, words: usize) -> String {
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut s = format!("kvrouter doctor probe {nonce:x} for worker {worker}:");
    for i in 0..words {
        s.push(' ');
        s.push_str(WORDS[(i * 7 + i / 16) % WORDS.len()]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_judged_by_the_documented_rules() {
        let s = |p, r| Sample::new(p, r, 2048);
        assert_eq!(judge_probe(s(1984, 2000), 64, None).0, Status::Ok);
        assert_eq!(judge_probe(s(0, 0), 64, None).0, Status::Warn);
        let (st, why) = judge_probe(s(0, 1984), 64, None);
        assert_eq!(st, Status::Fail);
        assert!(why.contains("under_predicting"), "{why}");
        let flow = EventFlow {
            subscribed: true,
            received: 3,
            filtered: 3,
            ..Default::default()
        };
        let (st, why) = judge_probe(s(0, 1984), 64, Some(&flow));
        assert_eq!(st, Status::Fail);
        assert!(why.contains("block_size"), "{why}");
        let (st, why) = judge_probe(s(1984, 0), 64, Some(&flow));
        assert_eq!(st, Status::Fail);
        assert!(why.contains("stale_index"), "{why}");
    }
}
