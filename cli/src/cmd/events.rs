//! `kvrouter events`: subscribe to one engine's KV events and print each decoded event as one
//! canonical JSON line (`kvrouter_wire::json`), with gap / replay / clear notices on stderr.
//! The operator's tool for checking a worker's event stream before routing on it.

use std::io::Write;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::Duration;

use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_wire::json::to_json_line;
use kvrouter_wire::{KvEventSubscriber, SubscriberConfig, SubscriberStats};

#[derive(clap::Args)]
pub struct Args {
    /// The engine's KV-event PUB endpoint (vLLM/SGLang `--kv-events-config` "endpoint"), e.g.
    /// tcp://10.0.0.5:5557. With --bind: the address we bind for an engine that connects.
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: String,
    /// The engine's replay ROUTER endpoint ("replay_endpoint"), used to recover gaps.
    #[arg(long, value_name = "ENDPOINT")]
    pub replay: Option<String>,
    /// Topic prefix to subscribe to (vLLM configs often use "kv-events"; default: all).
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Bind instead of connecting (vLLM connects when its endpoint has no wildcard).
    #[arg(long)]
    pub bind: bool,
    /// The engine's block size in tokens (vLLM --block-size, SGLang --page-size).
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Worker id to put on the events.
    #[arg(long, default_value_t = 0)]
    pub worker_id: u64,
    /// Data-parallel rank of this endpoint (rank r publishes on port + r).
    #[arg(long, default_value_t = 0)]
    pub dp_rank: u32,
    /// Exit after printing this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (tx, rx) = sync_channel(4096);
    let cfg = SubscriberConfig {
        worker: WorkerWithDpRank::new(args.worker_id, args.dp_rank),
        endpoint: args.connect.clone(),
        replay_endpoint: args.replay.clone(),
        topic: args.topic.clone(),
        bind: args.bind,
        block_size: args.block_size,
        ..SubscriberConfig::default()
    };
    let sub = KvEventSubscriber::start(cfg, tx)?;
    let how = if args.bind {
        "listening on"
    } else {
        "subscribed to"
    };
    eprintln!(
        "kvrouter events: {how} {} (topic {:?}, replay {}, block size {})",
        sub.endpoint(),
        args.topic,
        args.replay.as_deref().unwrap_or("none"),
        args.block_size
    );
    let stdout = std::io::stdout();
    let mut prev = SubscriberStats::default();
    let mut printed = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => {
                let mut out = stdout.lock();
                writeln!(out, "{}", to_json_line(&ev))?;
                out.flush()?;
                printed += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = sub.stats();
        notices(&prev, &now);
        prev = now;
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
    }
    sub.stop();
    Ok(())
}

/// One stderr line per counter that moved since the last look.
fn notices(a: &SubscriberStats, b: &SubscriberStats) {
    let moved = [
        (b.gaps - a.gaps, "sequence gap(s) detected (incl. late join / dropped messages)"),
        (b.recovered - a.recovered, "gap(s) recovered by replay"),
        (b.replayed - a.replayed, "batch(es) applied from replay"),
        (b.cleared - a.cleared, "worker cleared (replay impossible or incomplete, or publisher restart)"),
        (b.restarts - a.restarts, "publisher restart(s) detected (sequence went back)"),
        (b.dropped - a.dropped, "message(s) dropped by the full queue"),
        (b.bad_frames - a.bad_frames, "malformed message(s) (frame count / seq frame)"),
        (b.decode_errors - a.decode_errors, "undecodable payload(s)"),
        (b.skipped_events - a.skipped_events, "unknown or malformed event(s) skipped"),
        (b.filtered - a.filtered, "event(s) filtered (non-full-attention group, remote, block size, dp rank, self-reference, empty)"),
    ];
    for (n, what) in moved {
        if n > 0 {
            eprintln!("kvrouter events: {n} {what}");
        }
    }
}
