//! `kvrouter`: one binary, one subcommand per job. Each subcommand lives in `cmd/<name>.rs`.
use clap::{Parser, Subcommand};

mod cmd;

// The frontend allocates many small, short-lived buffers per request (tokenizer pieces, JSON);
// mimalloc serves them about twice as fast as glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kvrouter",
    version,
    about = "KV-cache-aware request router for LLM inference fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the embedded default: frontend on 127.0.0.1:8000 (KV mode, `affinity` policy) with
    /// in-process mock workers and the vendored Qwen3 tokenizer.
    #[command(
        mut_arg("router_mode", |a| a.default_value("kv")),
        // kvrouter's best measured policy (docs/benchmarks.md "Selection policies");
        // `kvrouter frontend` keeps the reference cost so Dynamo's flags mean what they meant.
        mut_arg("router_selection_policy", |a| a.default_value("affinity"))
    )]
    Up(cmd::up::Args),
    /// Run the OpenAI-compatible frontend with its embedded router in front of workers.
    Frontend(cmd::frontend::Args),
    /// Run the standalone router service (`python -m dynamo.router`'s counterpart): the
    /// workers of one endpoint, its calls as JSON over HTTP on 127.0.0.1:8090.
    // Its admin API beside it, so that a frontend and a router on one host do not collide.
    #[command(mut_arg("admin_port", |a| a.default_value("8091")))]
    Router(cmd::router::Args),
    /// Announce a worker to the routers through a discovery backend (`file`: a registration
    /// under `--file-kv`), keep its lease alive, withdraw it on exit.
    Register(cmd::register::Args),
    /// Publish workers' KV events (ZMQ) to the endpoint's NATS JetStream stream, for routers
    /// started with `--event-plane nats` (a build with `--features nats`).
    Relay(cmd::relay::Args),
    /// Print the router's block hashes for token ids read as a JSON array on stdin.
    Hash(cmd::hash::Args),
    /// Print a worker's KV event stream (vLLM/SGLang ZMQ) as canonical JSON lines.
    Events(cmd::events::Args),
    /// Run CPU-only mock inference engines (vLLM's or, with --engine sglang / trtllm, SGLang's
    /// or TensorRT-LLM's HTTP API and KV events; --data-parallel-size ranks each).
    Mocker(cmd::mocker::Args),
    /// Check a running deployment's KV routing per worker: probe each worker with a repeated
    /// prompt, compare the router's predicted cache hits with the engine's, check block sizes
    /// and KV event flow; exits non-zero when a worker fails.
    Doctor(cmd::doctor::Args),
    /// Benchmark an OpenAI-compatible endpoint (or embedded stacks per router mode) over HTTP.
    Bench(cmd::bench::Args),
    /// Replay a trace offline through mock engines and the router core in virtual time
    /// (`simulate` is its old name).
    #[command(
        alias = "simulate",
        mut_arg("router_mode", |a| a.default_value("kv")),
        mut_args(cmd::replay::hide_frontend_only)
    )]
    Replay(Box<cmd::replay::Args>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(a) => cmd::up::run(a),
        Command::Frontend(a) => cmd::frontend::run(a),
        Command::Router(a) => cmd::router::run(a),
        Command::Register(a) => cmd::register::run(a),
        Command::Relay(a) => cmd::relay::run(a),
        Command::Hash(a) => cmd::hash::run(a),
        Command::Events(a) => cmd::events::run(a),
        Command::Mocker(a) => cmd::mocker::run(a),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Replay(a) => cmd::replay::run(*a),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_subcommand_has_a_consistent_command_line() {
        use clap::CommandFactory;
        // Duplicate ids, conflicting defaults, bad aliases: clap checks them all here.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn up_routes_with_affinity_and_the_frontend_with_the_reference_cost() {
        use clap::Parser;
        use kvrouter_core::SelectionPolicy;
        let policy = |args: &[&str]| match super::Cli::try_parse_from(args).unwrap().command {
            super::Command::Up(a) => a.frontend.router.router_selection_policy,
            super::Command::Frontend(a) => a.frontend.router.router_selection_policy,
            _ => unreachable!(),
        };
        assert_eq!(policy(&["kvrouter", "up"]), SelectionPolicy::Affinity);
        assert_eq!(
            policy(&["kvrouter", "up", "--router-selection-policy", "default"]),
            SelectionPolicy::Default
        );
        assert_eq!(policy(&["kvrouter", "frontend"]), SelectionPolicy::Default);
    }

    #[test]
    fn router_takes_the_reference_command_line() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "kvrouter",
            "router",
            "--endpoint",
            "dynamo.prefill.generate",
            "--router-block-size",
            "64",
            "--router-reset-states",
            "--no-router-track-active-blocks",
        ])
        .unwrap();
        let super::Command::Router(a) = cli.command else {
            unreachable!()
        };
        let r = a.router;
        assert_eq!((r.http_port, r.fleet.admin_port), (8090, 8091));
        assert!(!r.router_config().unwrap().kv.router_track_active_blocks);
    }
}
