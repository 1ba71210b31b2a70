//! `kvrouter replay`: a workload (a Mooncake trace, or the prefix workload of `kvrouter bench`)
//! replayed offline through N of the mocker's engines and the router core in virtual time
//! ([`kvrouter_bench::replay`]), once per `--compare` mode; figures as `kvrouter bench` reports
//! them (table, or one JSON object per mode with `--json`; `--out DIR` writes the same
//! `results.json`, `report.md`, `requests.jsonl` and plots).
//!
//! Router flags are `kvrouter frontend`'s own (flattened [`FrontendConfig`], turned into the
//! core's configuration by the same code); the frontend's serving flags are accepted and
//! ignored (hidden from `--help`).
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use kvrouter_bench::client::RequestRecord;
use kvrouter_bench::replay::{self, ReplayConfig, ReplayOutcome, ReplayWorkload};
use kvrouter_bench::report::{self, Results, WorkloadInfo};
use kvrouter_bench::stats::Summary;
use kvrouter_bench::trace::load_trace_skipping;
use kvrouter_bench::workload::prefix_workload;
use kvrouter_core::config::RouterMode;
use kvrouter_core::{RouterConfig, SelectionPolicy};
use kvrouter_mocker::MockerConfig;
use kvrouter_server::FrontendConfig;

use super::bench::{WorkloadArgs, WorkloadKind};

/// `kvrouter replay` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Engines in the fleet.
    #[arg(long = "workers", default_value_t = 4)]
    pub fleet_workers: usize,
    /// KV blocks per engine.
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV block (engines and router).
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// Running sequences per engine at most.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens per engine step.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Divides the engines' modelled step times (0 = no time passes in steps).
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// What to replay, comma-separated: router modes (`kv`, `round-robin`, …), selection
    /// policies of kv mode (`default`, `lmetric`, `affinity`), or `kv:POLICY`. Default:
    /// `--router-mode` with `--router-selection-policy`.
    #[arg(long, value_delimiter = ',', value_parser = parse_entry)]
    pub compare: Vec<Entry>,
    /// KV events reach the router's index this long after the engine step that produced them
    /// ends (0: at once).
    #[arg(long, default_value_t = 0.0)]
    pub kv_event_delay_ms: f64,
    /// Print one JSON object per compared mode (one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write results.json, report.md, requests.jsonl and SVG plots here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replays run at once (default: the machine's cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// The router: `kvrouter frontend`'s router flags (`--router-mode`, `--router-temperature`,
    /// `--router-kv-overlap-score-credit`, `--no-kv-events`, thresholds, …).
    #[command(flatten)]
    pub frontend: FrontendConfig,
}

/// Hides `kvrouter frontend` flags that mean nothing offline (ports, admin API, parsers, …);
/// router flags and the replay's own stay in `--help`.
pub fn hide_frontend_only(a: clap::Arg) -> clap::Arg {
    static FRONTEND: OnceLock<Vec<String>> = OnceLock::new();
    let frontend = FRONTEND.get_or_init(|| {
        use clap::Args as _;
        FrontendConfig::augment_args(clap::Command::new("f"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    });
    let id = a.get_id().as_str();
    let router = id.starts_with("router_")
        || id.starts_with("no_router_")
        || id.starts_with("active_")
        || matches!(
            id,
            "kv_events" | "no_kv_events" | "kv_overlap_score_weight" | "context_length"
        );
    if frontend.iter().any(|f| f == id) && !router {
        a.hide(true)
    } else {
        a
    }
}

fn build_workload(w: &WorkloadArgs) -> anyhow::Result<ReplayWorkload> {
    let workload = match w.workload {
        WorkloadKind::Mooncake => {
            let (trace, skipped) = load_trace_skipping(&w.trace, w.requests)?;
            for s in skipped.iter().take(20) {
                eprintln!("{}:{}: skipped: {}", w.trace.display(), s.line, s.reason);
            }
            if skipped.len() > 20 {
                eprintln!("… {} bad lines skipped in all", skipped.len());
            }
            anyhow::ensure!(!trace.is_empty(), "{} has no requests", w.trace.display());
            ReplayWorkload::from_trace(trace, w.time_scale)
        }
        WorkloadKind::Prefix => ReplayWorkload::from_requests(
            prefix_workload(&w.prefix_spec()),
            WorkloadArgs::PREFIX_SCHEDULE,
        ),
    };
    let schedule = w.schedule(workload.len(), workload.schedule.clone());
    Ok(workload.with_schedule(schedule))
}

/// One replayed configuration: a router mode and, in kv mode, a selection policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The router mode.
    pub mode: RouterMode,
    /// kv mode's selection policy (None: `--router-selection-policy`).
    pub policy: Option<SelectionPolicy>,
}

/// `kv`, `round-robin`, … (a mode), `lmetric`, … (a kv policy) or `kv:lmetric`.
pub fn parse_entry(s: &str) -> Result<Entry, String> {
    let s = s.trim();
    if let Some((m, p)) = s.split_once(':') {
        let mode: RouterMode = m.parse()?;
        if mode != RouterMode::Kv {
            return Err(format!("{s}: only kv mode has selection policies"));
        }
        return Ok(Entry {
            mode,
            policy: Some(p.trim().parse()?),
        });
    }
    if let Ok(mode) = s.parse::<RouterMode>() {
        return Ok(Entry { mode, policy: None });
    }
    match s.parse::<SelectionPolicy>() {
        Ok(p) => Ok(Entry {
            mode: RouterMode::Kv,
            policy: Some(p),
        }),
        Err(_) => Err(format!(
            "{s:?} is neither a router mode ({}) nor a selection policy (default, lmetric, \
             affinity)",
            RouterMode::ALL.map(|m| m.as_str()).join(", ")
        )),
    }
}

impl Entry {
    /// The router configuration of this entry, from the flags' one.
    fn router(&self, base: &RouterConfig) -> RouterConfig {
        let mut r = base.clone();
        r.mode = self.mode;
        if let Some(p) = self.policy {
            r.kv.router_selection_policy = p;
        }
        r
    }
}

/// The label of a run: the mode, and in kv mode a policy other than the reference cost.
fn label(r: &RouterConfig) -> String {
    match (r.mode, r.kv.router_selection_policy) {
        (RouterMode::Kv, SelectionPolicy::Default) => "kv".into(),
        (RouterMode::Kv, p) => format!("kv:{p}"),
        (m, _) => m.as_str().into(),
    }
}

fn summary_of(v: impl Iterator<Item = usize>) -> Option<Summary> {
    Summary::of(&v.map(|x| x as f64).collect::<Vec<_>>())
}

/// Runs the subcommand. Errors: bad flags, an unreadable trace, an unwritable `--out`.
pub fn run(args: Args) -> anyhow::Result<()> {
    args.workload.validate()?;
    let router = args.frontend.router_config()?;
    let entries: Vec<RouterConfig> = if args.compare.is_empty() {
        vec![router.clone()]
    } else {
        args.compare.iter().map(|e| e.router(&router)).collect()
    };
    let workload = build_workload(&args.workload)?;
    let base = ReplayConfig {
        workers: args.fleet_workers,
        mocker: MockerConfig {
            num_gpu_blocks: args.num_gpu_blocks,
            block_size: args.block_size,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            speedup_ratio: args.speedup_ratio,
            ..MockerConfig::default()
        },
        router,
        kv_event_delay_s: args.kv_event_delay_ms / 1e3,
        max_prompt_tokens: args.frontend.context_length,
        seed: args.workload.seed,
    };
    base.validate().map_err(anyhow::Error::msg)?;
    let bound = replay::bound(&workload, &base);

    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut outcomes: Vec<(RouterConfig, ReplayOutcome)> = Vec::with_capacity(entries.len());
    for group in entries.chunks(jobs) {
        let done = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|r| {
                    let mut cfg = base.clone();
                    cfg.router = r.clone();
                    let workload = &workload;
                    s.spawn(move || {
                        let mut o = replay::replay(workload, &cfg)?;
                        o.report.mode = label(&cfg.router);
                        Ok((cfg.router, o))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a replay thread panicked"))
                .collect::<Result<Vec<_>, String>>()
        })
        .map_err(anyhow::Error::msg)?;
        for (_, o) in &done {
            eprintln!(
                "{}: {} requests in {:.1} s of virtual time, replayed in {:.2} s ({} engine steps)",
                o.report.mode, o.report.requests, o.report.duration_s, o.wall_s, o.engine_steps
            );
        }
        outcomes.extend(done);
    }

    let n = workload.len();
    let info = WorkloadInfo {
        kind: match args.workload.workload {
            WorkloadKind::Prefix => "prefix".into(),
            WorkloadKind::Mooncake => "mooncake".into(),
        },
        requests: n,
        isl: summary_of((0..n).map(|i| workload.prompt_len(i))),
        osl: summary_of((0..n).map(|i| workload.max_tokens(i))),
        schedule: workload.schedule.describe(),
    };
    let config = serde_json::json!({
        "tool": "kvrouter replay",
        "command": super::bench::command_line(),
        "workload": args.workload,
        "workers": args.fleet_workers,
        "num_gpu_blocks": args.num_gpu_blocks,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "speedup_ratio": args.speedup_ratio,
        "kv_event_delay_ms": args.kv_event_delay_ms,
        "router": base.router,
        "wall_s": outcomes.iter().map(|(_, o)| (o.report.mode.clone(), o.wall_s)).collect::<Vec<_>>(),
    });
    let results = Results {
        config,
        workload: info,
        runs: outcomes.iter().map(|(_, o)| o.report.clone()).collect(),
        bound: bound.clone(),
    };
    if args.json {
        for (r, o) in &outcomes {
            println!("{}", serde_json::to_string(&json_entry(r, o, &bound)?)?);
        }
    } else {
        print!("{}", report::table(&results));
    }
    if let Some(dir) = &args.out {
        let records: Vec<(String, Vec<RequestRecord>)> = outcomes
            .into_iter()
            .map(|(_, o)| (o.report.mode, o.records))
            .collect();
        let written = report::write_all(dir, &results, &records).map_err(anyhow::Error::msg)?;
        let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        eprintln!("wrote {}", paths.join(", "));
    }
    Ok(())
}

/// One compared entry as a JSON object: the run report's fields (`hit_rate`,
/// `predicted_hit_rate`, `ttft_ms` / `itl_ms` / `e2e_ms` with `p50`, `p90`, `p99`, `max`,
/// `requests_per_worker`, …) plus `mode`, `policy` (kv mode's selection policy, null in the
/// other modes), `label`, `throughput_rps`, the bounds and the wall time.
fn json_entry(
    r: &RouterConfig,
    o: &ReplayOutcome,
    bound: &kvrouter_bench::bound::Bound,
) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(&o.report).context("serialising a report")?;
    v["label"] = o.report.mode.clone().into();
    v["mode"] = r.mode.as_str().into();
    v["policy"] = match r.mode {
        RouterMode::Kv => r.kv.router_selection_policy.to_string().into(),
        _ => serde_json::Value::Null,
    };
    v["throughput_rps"] = o.report.requests_per_s.into();
    v["pooled_lru_hit_rate"] = bound.pooled_lru_hit_rate.into();
    v["infinite_hit_rate"] = bound.infinite_hit_rate.into();
    v["bound"] = serde_json::to_value(bound)?;
    v["wall_s"] = o.wall_s.into();
    v["engine_steps"] = o.engine_steps.into();
    v["index_errors"] = o.index_errors.into();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(
        mut_arg("router_mode", |a| a.default_value("kv")),
        mut_args(hide_frontend_only)
    )]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(words: &[&str]) -> Args {
        let cmd = <Cli as clap::CommandFactory>::command().mut_args(|a| a.env(None::<&str>));
        let m = cmd
            .try_get_matches_from(std::iter::once("replay").chain(words.iter().copied()))
            .unwrap();
        <Cli as clap::FromArgMatches>::from_arg_matches(&m)
            .unwrap()
            .args
    }

    #[test]
    fn compare_entries_are_modes_policies_or_both() {
        let e = |mode, policy| Entry { mode, policy };
        assert_eq!(parse_entry("kv"), Ok(e(RouterMode::Kv, None)));
        assert_eq!(
            parse_entry("round-robin"),
            Ok(e(RouterMode::RoundRobin, None))
        );
        assert_eq!(
            parse_entry("lmetric"),
            Ok(e(RouterMode::Kv, Some(SelectionPolicy::Lmetric)))
        );
        assert_eq!(
            parse_entry("kv:affinity"),
            Ok(e(RouterMode::Kv, Some(SelectionPolicy::Affinity)))
        );
        assert!(parse_entry("random:lmetric").is_err());
        assert!(parse_entry("fastest").unwrap_err().contains("lmetric"));
        let a = parse(&["--compare", "kv,lmetric,round-robin"]);
        assert_eq!(a.compare.len(), 3);
        let base = a.frontend.router_config().unwrap();
        assert_eq!(
            base.mode,
            RouterMode::Kv,
            "kv by default, as in kvrouter up"
        );
        let labels: Vec<String> = a.compare.iter().map(|e| label(&e.router(&base))).collect();
        assert_eq!(labels, ["kv", "kv:lmetric", "round-robin"]);
    }

    #[test]
    fn bad_trace_lines_are_skipped_by_number_and_the_rest_replays() {
        let dir = std::env::temp_dir().join(format!("kvrouter-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = dir.join("trace.jsonl");
        let good = |ts: u64| {
            format!(
                "{{\"timestamp\":{ts},\"input_length\":700,\"output_length\":3,\"hash_ids\":[1,2]}}\n"
            )
        };
        let body = [
            good(0),
            "{not json}\n".into(),
            "\u{0}\u{ff}\n".into(),
            "{\"timestamp\":5,\"input_length\":99999999999,\"output_length\":1,\"hash_ids\":[3]}\n"
                .into(),
            good(10),
            "{\"timestamp\":-1,\"input_length\":1,\"output_length\":1,\"hash_ids\":[]}\n".into(),
        ]
        .concat();
        std::fs::write(&trace, body).unwrap();
        let w = build_workload(
            &parse(&["--trace", trace.to_str().unwrap(), "--num-gpu-blocks", "64"]).workload,
        )
        .unwrap();
        // Lines 2, 3 and 6 are not requests; line 4 is one no engine can serve.
        assert_eq!(w.len(), 3);
        let out = dir.join("out");
        let args = parse(&[
            "--trace",
            trace.to_str().unwrap(),
            "--workers",
            "2",
            "--num-gpu-blocks",
            "64",
            "--compare",
            "kv,round-robin",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]);
        run(args).unwrap();
        let results: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
        let runs = results["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for r in runs {
            assert_eq!(
                (r["requests"].as_u64(), r["errors"].as_u64()),
                (Some(3), Some(1))
            );
        }
        assert!(std::fs::read_to_string(out.join("report.md"))
            .unwrap()
            .starts_with("# kvrouter replay: mooncake workload"));
        // What --json prints per entry.
        let base = parse(&[]).frontend.router_config().unwrap();
        let w = build_workload(&parse(&["--trace", trace.to_str().unwrap()]).workload).unwrap();
        let cfg = ReplayConfig {
            router: Entry {
                mode: RouterMode::Kv,
                policy: Some(SelectionPolicy::Lmetric),
            }
            .router(&base),
            ..ReplayConfig::fleet(2, 64, 64, base.clone())
        };
        let mut o = replay::replay(&w, &cfg).unwrap();
        o.report.mode = label(&cfg.router);
        let v = json_entry(&cfg.router, &o, &replay::bound(&w, &cfg)).unwrap();
        assert_eq!(
            (v["mode"].as_str(), v["policy"].as_str()),
            (Some("kv"), Some("lmetric"))
        );
        assert_eq!(v["label"], "kv:lmetric");
        for k in [
            "hit_rate",
            "predicted_hit_rate",
            "throughput_rps",
            "pooled_lru_hit_rate",
        ] {
            assert!(v[k].is_number(), "{k}: {v}");
        }
        for k in ["ttft_ms", "e2e_ms"] {
            for q in ["p50", "p90", "p99", "max"] {
                assert!(v[k][q].is_number(), "{k}.{q}: {v}");
            }
        }
        assert_eq!(v["requests_per_worker"].as_object().unwrap().len(), 2);
        assert!(v["bound"]["infinite_hit_rate"].is_number());
        std::fs::remove_dir_all(&dir).ok();
    }
}
