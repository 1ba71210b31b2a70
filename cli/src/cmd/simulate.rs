//! `kvrouter simulate`: route a Mooncake trace through the router core against a simulated
//! fleet (engine prefix caches publishing KV events) and print hit rates, load and router
//! overhead — the core on real input, no network needed.
use std::path::PathBuf;

use kvrouter_bench::sim::{simulate, SimConfig, SimReport};
use kvrouter_bench::trace::load_trace;
use kvrouter_core::config::{RouterConfig, RouterMode};

#[derive(clap::Args)]
pub struct Args {
    /// Mooncake-format JSONL trace.
    #[arg(long, default_value = "../shared/data/traces/synthetic_trace.jsonl")]
    trace: PathBuf,
    /// First N requests of the trace.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// KV cache capacity of each worker, in blocks.
    #[arg(long, default_value_t = 16384)]
    num_gpu_blocks: usize,
    /// Router modes to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "kv,round-robin,random")]
    compare: Vec<RouterMode>,
    /// Softmax temperature for kv mode (0 = argmin).
    #[arg(long, default_value_t = 0.0)]
    router_temperature: f64,
    /// Divide trace timestamps by this (2 = replay twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Print one JSON object per mode instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.workers > 0 && args.block_size > 0 && args.num_gpu_blocks > 0,
        "--workers, --block-size and --num-gpu-blocks must be at least 1"
    );
    let trace = load_trace(&args.trace, Some(args.requests))?;
    anyhow::ensure!(
        !trace.is_empty(),
        "{} has no requests",
        args.trace.display()
    );
    let mut reports = Vec::new();
    for mode in &args.compare {
        let mut router = RouterConfig {
            mode: *mode,
            ..Default::default()
        };
        router.kv.router_temperature = args.router_temperature;
        router.kv.validate()?;
        let cfg = SimConfig {
            workers: args.workers,
            block_size: args.block_size,
            capacity_blocks: args.num_gpu_blocks,
            router,
            time_scale: args.time_scale,
            seed: 42,
        };
        let r = simulate(&trace, &cfg);
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        reports.push(r);
    }
    if !args.json {
        print_table(&args, &reports);
    }
    Ok(())
}

fn print_table(args: &Args, reports: &[SimReport]) {
    println!(
        "{} requests of {} on {} simulated workers × {} blocks of {} tokens\n",
        reports.first().map_or(0, |r| r.requests),
        args.trace.display(),
        args.workers,
        args.num_gpu_blocks,
        args.block_size
    );
    println!(
        "{:<14} {:>8} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "mode", "hit rate", "predicted", "TTFT ms", "route µs p50", "route µs p99", "index"
    );
    for r in reports {
        println!(
            "{:<14} {:>8.3} {:>10.3} {:>12.1} {:>12.1} {:>12.1} {:>10}",
            r.mode,
            r.hit_rate,
            r.predicted_hit_rate,
            r.ttft_ms_mean,
            r.route_us_p50,
            r.route_us_p99,
            r.index_entries
        );
    }
    for r in reports {
        println!(
            "\n{} — per worker: requests, hit rate, peak active requests, peak active blocks",
            r.mode
        );
        for w in &r.workers {
            let hit = w.cached_tokens as f64 / w.prompt_tokens.max(1) as f64;
            println!(
                "  worker {:>2}: {:>6} {:>7.3} {:>6} {:>8}",
                w.worker_id, w.requests, hit, w.peak_active_requests, w.peak_active_blocks
            );
        }
    }
}
