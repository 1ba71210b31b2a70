//! `kvrouter bench`: replay a Mooncake trace or a shared-prefix workload over HTTP against any
//! OpenAI-compatible endpoint (`--url`, repeatable for side-by-side runs) or against a fresh
//! embedded stack per router mode (`--embedded --compare kv,round-robin,random`), and report
//! TTFT / ITL / end-to-end latency, throughput, KV hit rate, the router's own figures and the
//! pooled-LRU bound: a table on stdout; with `--out DIR`, `results.json`, `report.md`,
//! `requests.jsonl` and SVG plots.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kvrouter_bench::bound::bound;
use kvrouter_bench::client::{http_client, Api, RequestRecord};
use kvrouter_bench::report::{self, Results, WorkloadInfo};
use kvrouter_bench::runner::{self, RunOptions};
use kvrouter_bench::stats::Summary;
use kvrouter_bench::trace::load_trace;
use kvrouter_bench::workload::{
    from_trace, poisson_offsets, prefix_workload, BenchRequest, PrefixSpec, Schedule,
};
use kvrouter_core::config::RouterMode;
use serde::Serialize;

/// Which requests to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Shared system prompts plus unique suffixes (`--prefixes`, `--prefix-len`, …).
    Prefix,
    /// A Mooncake-format trace (`--trace`), open loop at its timestamps.
    Mooncake,
}

pub fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').unwrap_or((s, s));
    let p = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("{x:?}: {e} (expected MIN:MAX)"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("{s}: MIN is above MAX"));
    }
    Ok((a, b))
}

/// What is sent and when: the workload flags `kvrouter bench` and `kvrouter replay` share.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct WorkloadArgs {
    /// What to send.
    #[arg(long, value_enum, default_value = "mooncake")]
    pub workload: WorkloadKind,
    /// Mooncake-format JSONL trace (`--workload mooncake`).
    #[arg(long, default_value = "../shared/data/traces/synthetic_trace.jsonl")]
    pub trace: PathBuf,
    /// Requests to send (mooncake: the trace's first N, default bench 1000, replay all;
    /// prefix: default 800).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Closed loop at this many requests in flight (prefix default: 16; mooncake: replaces the
    /// trace's timestamps).
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop, Poisson arrivals at this many requests/s (mooncake: replaces the trace's
    /// timestamps).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Divide the trace's timestamps by this (4 = four times as fast).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Shared system prompts (prefix workload).
    #[arg(long, default_value_t = 64)]
    pub prefixes: usize,
    /// System prompt length range, tokens (prefix workload).
    #[arg(long, value_parser = parse_range, default_value = "2048:4096")]
    pub prefix_len: (usize, usize),
    /// User suffix length range, tokens (prefix workload).
    #[arg(long, value_parser = parse_range, default_value = "32:256")]
    pub suffix_len: (usize, usize),
    /// Output length range, tokens (prefix workload).
    #[arg(long, value_parser = parse_range, default_value = "32:128")]
    pub osl: (usize, usize),
    /// Seed of the prefix workload, Poisson arrivals and the replay's random choices.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// The flags of `kvrouter bench` (also serialised into `results.json` as `config`).
#[derive(clap::Args, Debug, Serialize)]
pub struct Args {
    /// Base URL of an OpenAI-compatible endpoint (`http://host:port`, with or without `/v1`).
    /// Repeat for side-by-side runs of the same workload against several endpoints.
    #[arg(
        long,
        required_unless_present = "embedded",
        conflicts_with = "embedded"
    )]
    url: Vec<String>,
    /// Name of each `--url` run in reports (default: "endpoint", "endpoint-2", …; with
    /// `--round-robin`, "round-robin").
    #[arg(long)]
    label: Vec<String>,
    /// One run over all the `--url`s, request `i` to the `i mod n`-th: several router
    /// replicas of one deployment behind a round-robin client. Router figures (overhead,
    /// predicted hits, requests per worker) are the first URL's.
    #[arg(long, requires = "url")]
    round_robin: bool,
    /// Start a fresh embedded stack (frontend + mock workers, cold caches) per `--compare`
    /// mode and run against each.
    #[arg(long)]
    embedded: bool,
    /// Router modes to compare with `--embedded`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "kv,round-robin,random")]
    compare: Vec<RouterMode>,
    /// Instead of router modes, compare ways of serving on the same `--workers` (kv mode):
    /// `agg` (all aggregated), `disagg` (half prefill, half decode), `conditional` (the same,
    /// `--conditional-disagg`). Comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "url")]
    serving: Vec<Serving>,
    #[command(flatten)]
    #[serde(flatten)]
    pub workload: WorkloadArgs,
    /// Workers in the fleet (embedded stack; and the bound's capacity).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// KV blocks per worker (embedded stack; and the bound's capacity).
    #[arg(long, default_value_t = 16384)]
    num_gpu_blocks: usize,
    /// Tokens per KV block (embedded stack; and the bound).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Mock workers' speed-up of modelled time (embedded; 0 = no delay).
    #[arg(long, default_value_t = 1.0)]
    speedup_ratio: f64,
    /// Softmax temperature of the embedded kv router (0 = argmin).
    #[arg(long, default_value_t = 0.0)]
    router_temperature: f64,
    /// Model name to send (default: the first id of GET BASE/v1/models).
    #[arg(long)]
    model: Option<String>,
    /// API to drive: completions (token-id prompts) or chat (prompts decoded to text).
    #[arg(long, default_value = "completions")]
    endpoint: Api,
    /// Tokenizer directory decoding prompts for `--endpoint chat`, and the embedded workers'
    /// model (default: models/qwen3, else ../shared/data/tokenizers/qwen3).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Per-request limit, seconds (connect to end of stream).
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Whole-run limit per mode, seconds: nothing is sent after it and requests still in
    /// flight are cut (counted as errors).
    #[arg(long, default_value_t = 3600.0)]
    max_duration: f64,
    /// Write results.json, report.md, requests.jsonl and SVG plots here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print results.json to stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl Args {
    fn tokenizer_dir(&self) -> Option<PathBuf> {
        if let Some(t) = &self.tokenizer {
            return Some(t.clone());
        }
        ["models/qwen3", "../shared/data/tokenizers/qwen3"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("tokenizer.json").is_file())
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.workers > 0 && self.block_size > 0 && self.num_gpu_blocks > 0,
            "--workers, --block-size and --num-gpu-blocks must be at least 1"
        );
        self.workload.validate()?;
        anyhow::ensure!(self.timeout > 0.0, "--timeout must be > 0");
        anyhow::ensure!(self.max_duration > 0.0, "--max-duration must be > 0");
        anyhow::ensure!(
            self.label.len() <= self.url.len(),
            "more --label than --url"
        );
        anyhow::ensure!(
            !(self.embedded && self.compare.is_empty()),
            "--compare needs at least one mode"
        );
        Ok(())
    }
}

impl WorkloadArgs {
    /// Checks the workload flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.time_scale > 0.0 && self.time_scale.is_finite(),
            "--time-scale must be > 0"
        );
        anyhow::ensure!(
            self.concurrency != Some(0),
            "--concurrency must be at least 1"
        );
        if let Some(r) = self.rate {
            anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be > 0");
        }
        anyhow::ensure!(self.prefixes > 0, "--prefixes must be at least 1");
        Ok(())
    }

    /// The prefix workload's shape (`--requests`, default 800).
    pub fn prefix_spec(&self) -> PrefixSpec {
        PrefixSpec {
            requests: self.requests.unwrap_or(800),
            prefixes: self.prefixes,
            prefix_len: self.prefix_len,
            suffix_len: self.suffix_len,
            osl: self.osl,
            seed: self.seed,
        }
    }

    /// The prefix workload's default schedule: closed loop at 16.
    pub const PREFIX_SCHEDULE: Schedule = Schedule::Closed { concurrency: 16 };

    /// `default` unless `--concurrency` or `--rate` replace it, for `n` requests.
    pub fn schedule(&self, n: usize, default: Schedule) -> Schedule {
        match (self.concurrency, self.rate) {
            (Some(c), _) => Schedule::Closed { concurrency: c },
            (None, Some(r)) => Schedule::Open {
                offsets_ms: poisson_offsets(n, r, self.seed),
            },
            (None, None) => default,
        }
    }
}

/// The workload's requests and schedule.
fn build_workload(args: &Args) -> anyhow::Result<(Vec<BenchRequest>, Schedule)> {
    let w = &args.workload;
    let (requests, default_schedule) = match w.workload {
        WorkloadKind::Mooncake => {
            let n = w.requests.unwrap_or(1000);
            let trace = load_trace(&w.trace, Some(n))?;
            anyhow::ensure!(!trace.is_empty(), "{} has no requests", w.trace.display());
            from_trace(&trace, w.time_scale)
        }
        WorkloadKind::Prefix => (
            prefix_workload(&w.prefix_spec()),
            WorkloadArgs::PREFIX_SCHEDULE,
        ),
    };
    anyhow::ensure!(!requests.is_empty(), "the workload has no requests");
    let schedule = w.schedule(requests.len(), default_schedule);
    Ok((requests, schedule))
}

fn summary_of(v: impl Iterator<Item = usize>) -> Option<Summary> {
    Summary::of(&v.map(|x| x as f64).collect::<Vec<_>>())
}

/// Runs the subcommand: builds the workload and the bound, runs it against each `--url` or each
/// `--compare` mode's embedded stack in turn, prints the table (or JSON) and writes `--out`.
/// Errors: bad flags, an unreadable trace or tokenizer, a stack that cannot start, an endpoint
/// whose model cannot be discovered, an unwritable `--out`; failed requests are counted, not
/// errors.
pub fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let (requests, schedule) = build_workload(&args)?;
    let requests = Arc::new(requests);
    let bound = bound(
        requests.iter().map(|r| r.prompt.as_slice()),
        args.block_size,
        args.workers * args.num_gpu_blocks,
    );
    let tokenizer = match args.endpoint {
        Api::Completions => None,
        Api::Chat => {
            let dir = args
                .tokenizer_dir()
                .context("--endpoint chat needs --tokenizer DIR")?;
            Some(Arc::new(
                kvrouter_preprocess::Preprocessor::from_model_dir(&dir)
                    .with_context(|| format!("loading the tokenizer in {}", dir.display()))?,
            ))
        }
    };
    let workload = WorkloadInfo {
        kind: match args.workload.workload {
            WorkloadKind::Prefix => "prefix".into(),
            WorkloadKind::Mooncake => "mooncake".into(),
        },
        requests: requests.len(),
        isl: summary_of(requests.iter().map(|r| r.prompt.len())),
        osl: summary_of(requests.iter().map(|r| r.max_tokens)),
        schedule: schedule.describe(),
    };
    let mut config = serde_json::to_value(&args)?;
    config["command"] = serde_json::Value::String(command_line());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcomes = rt.block_on(async {
        let client = http_client();
        let mut outcomes = Vec::new();
        let opts = |label: String, base_url: String, more_urls: Vec<String>| RunOptions {
            label,
            base_url,
            more_urls,
            model: args.model.clone(),
            api: args.endpoint,
            tokenizer: tokenizer.clone(),
            timeout: Duration::from_secs_f64(args.timeout),
            max_duration: Some(Duration::from_secs_f64(args.max_duration)),
            progress: !args.no_progress,
        };
        if args.embedded {
            let entries: Vec<(RouterMode, Option<Serving>)> = if args.serving.is_empty() {
                args.compare.iter().map(|&m| (m, None)).collect()
            } else {
                args.serving
                    .iter()
                    .map(|&s| (RouterMode::Kv, Some(s)))
                    .collect()
            };
            for (mode, serving) in entries {
                let label = serving.map_or(mode.as_str(), Serving::as_str);
                let stack = embedded::start(&args, mode, serving)
                    .await
                    .with_context(|| format!("starting the embedded stack ({label})"))?;
                let o = opts(label.to_string(), stack.url(), Vec::new());
                let engines = embedded::engine_counters(&client, &stack).await;
                let result = runner::run(&client, &o, requests.clone(), &schedule).await;
                let engines_after = embedded::engine_counters(&client, &stack).await;
                stack.stop().await;
                let mut outcome = result?;
                let r = &mut outcome.report;
                let computed = engines_after.0 - engines.0;
                if r.prompt_tokens > 0 {
                    r.engine_hit_rate = Some(1.0 - computed / r.prompt_tokens as f64);
                }
                r.transferred_blocks = Some((engines_after.1 - engines.1).max(0.0) as u64);
                eprintln!("{}", one_line(&outcome.report));
                outcomes.push(outcome);
            }
        } else {
            let runs: Vec<(String, Vec<String>)> = if args.round_robin {
                vec![(args.url[0].clone(), args.url[1..].to_vec())]
            } else {
                args.url.iter().map(|u| (u.clone(), Vec::new())).collect()
            };
            for (i, (url, more)) in runs.into_iter().enumerate() {
                let label = args.label.get(i).cloned().unwrap_or_else(|| match i {
                    _ if args.round_robin => "round-robin".into(),
                    0 => "endpoint".into(),
                    _ => format!("endpoint-{}", i + 1),
                });
                let outcome = runner::run(
                    &client,
                    &opts(label, url, more),
                    requests.clone(),
                    &schedule,
                )
                .await?;
                eprintln!("{}", one_line(&outcome.report));
                outcomes.push(outcome);
            }
        }
        anyhow::Ok(outcomes)
    })?;

    let results = Results {
        config,
        workload,
        runs: outcomes.iter().map(|o| o.report.clone()).collect(),
        bound,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", report::table(&results));
    }
    if let Some(dir) = &args.out {
        let records: Vec<(String, Vec<RequestRecord>)> = outcomes
            .into_iter()
            .map(|o| (o.report.mode, o.records))
            .collect();
        let written = report::write_all(dir, &results, &records).map_err(anyhow::Error::msg)?;
        eprintln!("wrote {}", display_paths(&written));
    }
    Ok(())
}

fn one_line(r: &kvrouter_bench::runner::RunReport) -> String {
    format!(
        "{}: {} requests, {} errors, hit {}, TTFT p50 {} ms, {:.2} req/s",
        r.mode,
        r.requests,
        r.errors,
        r.hit_rate.map_or("–".into(), |h| format!("{h:.3}")),
        r.ttft_ms.map_or("–".into(), |t| format!("{:.1}", t.p50)),
        r.requests_per_s
    )
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command line as typed, shell-quoted where needed.
pub fn command_line() -> String {
    let mut words = vec!["kvrouter".to_string()];
    for a in std::env::args().skip(1) {
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@".contains(c))
            && !a.is_empty()
        {
            words.push(a);
        } else {
            words.push(format!("'{}'", a.replace('\'', "'\\''")));
        }
    }
    words.join(" ")
}

/// How an embedded fleet serves (`--serving`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Serving {
    /// Every worker aggregated.
    Agg,
    /// Half prefill, half decode.
    Disagg,
    /// Half prefill, half decode, short uncached prompts whole on decode.
    Conditional,
}

impl Serving {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agg => "agg",
            Self::Disagg => "disagg",
            Self::Conditional => "conditional",
        }
    }
}

/// The embedded stack: frontend + mock workers in this process, one per mode, cold caches.
mod embedded {
    use super::{Args, Serving};
    use kvrouter_core::config::RouterMode;
    use kvrouter_server::up::{EmbeddedStack, UpConfig};

    /// Start a stack for `mode` with the flags' worker parameters (count, blocks, block size,
    /// speedup; the tokenizer when `--tokenizer` is given), its workers split by `serving`.
    pub async fn start(
        args: &Args,
        mode: RouterMode,
        serving: Option<Serving>,
    ) -> anyhow::Result<EmbeddedStack> {
        let split = !matches!(serving, None | Some(Serving::Agg));
        let mut cfg = UpConfig::fleet(
            if split { 0 } else { args.workers },
            args.num_gpu_blocks,
            args.block_size,
            args.speedup_ratio,
            args.tokenizer.as_deref(),
        );
        cfg.frontend.router_mode = mode;
        cfg.frontend.router.router_temperature = args.router_temperature;
        cfg.frontend.kv_cache_block_size = Some(args.block_size);
        cfg.frontend.http_host = "127.0.0.1".into();
        cfg.frontend.http_port = 0;
        cfg.frontend.fleet.no_admin = true;
        if split {
            cfg.prefill = (args.workers / 2).max(1);
            cfg.decode = args.workers.saturating_sub(cfg.prefill).max(1);
            cfg.frontend.conditional_disagg = serving == Some(Serving::Conditional);
        }
        EmbeddedStack::start(cfg).await
    }

    /// `(Σ computed prompt tokens, Σ KV blocks pulled)` over the stack's mock workers now.
    pub async fn engine_counters(
        client: &kvrouter_bench::runner::HttpClient,
        stack: &EmbeddedStack,
    ) -> (f64, f64) {
        let urls: Vec<String> = stack.workers.iter().map(|w| w.info.url.clone()).collect();
        kvrouter_bench::runner::mock_engine_counters(client, &urls).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(words: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(words.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_and_workload_defaults() {
        assert_eq!(parse_range("32:256"), Ok((32, 256)));
        assert_eq!(parse_range("7"), Ok((7, 7)));
        assert!(parse_range("9:3").is_err());
        assert!(parse_range("a:3").is_err());

        let a = parse(&[
            "--url",
            "http://h",
            "--workload",
            "prefix",
            "--requests",
            "10",
        ])
        .unwrap();
        a.validate().unwrap();
        let (reqs, sched) = build_workload(&a).unwrap();
        assert_eq!(reqs.len(), 10);
        assert_eq!(sched, Schedule::Closed { concurrency: 16 });
        assert!(reqs
            .iter()
            .all(|r| (2048 + 32..=4096 + 256).contains(&r.prompt.len())));

        let a = parse(&[
            "--embedded",
            "--workload",
            "prefix",
            "--rate",
            "5",
            "--requests",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            build_workload(&a).unwrap().1,
            Schedule::Open { .. }
        ));
        assert_eq!(
            a.compare,
            vec![RouterMode::Kv, RouterMode::RoundRobin, RouterMode::Random]
        );

        // One of --url / --embedded, not both; --concurrency and --rate exclude each other.
        assert!(parse(&["--workload", "prefix"]).is_err());
        let a = parse(&["--embedded", "--serving", "agg,disagg,conditional"]).unwrap();
        assert_eq!(
            a.serving,
            [Serving::Agg, Serving::Disagg, Serving::Conditional]
        );
        assert!(
            parse(&["--url", "u", "--serving", "disagg"]).is_err(),
            "--serving starts embedded stacks"
        );
        assert!(parse(&["--url", "u", "--embedded", "--workload", "prefix"]).is_err());
        assert!(parse(&[
            "--url",
            "u",
            "--workload",
            "prefix",
            "--rate",
            "1",
            "--concurrency",
            "2"
        ])
        .is_err());
        let a = parse(&["--url", "u", "--workload", "prefix", "--concurrency", "0"]).unwrap();
        assert!(a.validate().is_err());
    }
}
