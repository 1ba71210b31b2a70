//! Event-plane throughput: KV events through NATS JetStream into one router (issue 18,
//! target ≥ 500k events/s). Publishes `EVENTS` events of `WORKERS` workers to a fresh
//! endpoint's stream in relay-shaped messages (JSON arrays of 256 events of one rank), then
//! starts a router replica on `--event-plane nats` and times how long it takes to consume and
//! index them all.
//!
//! ```sh
//! nats-server -js -p 4222 -sd /tmp/kvrouter-js &
//! NATS_SERVER=nats://127.0.0.1:4222 EVENTS=1000000 WORKERS=16 \
//!   cargo run --release -p kvrouter-server --features nats --example event_plane_throughput
//! ```
//!
//! Events: per rank, chains of 8 `Stored` events of 2 blocks each (parent = the chain's
//! previous block); after each chain, a `Removed` of the chain four back, so the index stays
//! at a few thousand blocks per rank, as a worker's cache would.
//!
//! `CATCH_UP=1`: the time a new replica takes to route like its peers (issue 18, target < 5 s
//! with a 1M-entry index). No removals (`EVENTS` stored events of 2 blocks: an index of
//! 2 × `EVENTS` entries); the first replica consumes them and snapshots (threshold 1), which
//! purges the stream; then a second replica starts and is timed until its index holds as many
//! entries as the first's (snapshot download, decode and apply, then the stream after it).
//!
//! ```sh
//! NATS_SERVER=nats://127.0.0.1:4222 EVENTS=500000 WORKERS=16 CATCH_UP=1 \
//!   cargo run --release -p kvrouter-server --features nats --example event_plane_throughput
//! ```
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{ExternalHash, LocalBlockHash};
use kvrouter_core::index::{removed_event, stored_event};
use kvrouter_server::replicas::{stream, EventPlane, Names};
use kvrouter_server::router_service::{Router, RouterServiceConfig};
use kvrouter_server::WorkerSpec;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The events of one rank, `n` of them; chains are removed four later when `remove`.
fn rank_events(rank: WorkerWithDpRank, n: u64, remove: bool) -> Vec<RouterEvent> {
    let base = rank.worker_id << 40;
    let block = |chain: u64, i: u64| base | (chain << 8) | i;
    let mut out = Vec::with_capacity(n as usize);
    let mut chain = 0u64;
    while (out.len() as u64) < n {
        for e in 0..8u64 {
            let parent = (e > 0).then(|| ExternalHash(block(chain, 2 * e - 1)));
            let blocks = (0..2).map(|j| {
                let h = block(chain, 2 * e + j);
                (
                    ExternalHash(h),
                    LocalBlockHash(h.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                )
            });
            out.push(stored_event(rank, out.len() as u64, parent, blocks));
        }
        if remove && chain >= 4 {
            let old = (0..16).map(|i| ExternalHash(block(chain - 4, i))).collect();
            out.push(removed_event(rank, out.len() as u64, old));
        }
        chain += 1;
    }
    out.truncate(n as usize);
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let total = env("EVENTS", 1_000_000);
    let workers = env("WORKERS", 16).max(1);
    let catch_up = env("CATCH_UP", 0) == 1;
    let endpoint = format!("bench{:08x}.backend.generate", rand::random::<u32>());
    let names = Names::for_endpoint(&endpoint);

    // Publish, acks pipelined.
    let client = stream::connect(&url, "event-plane-bench").await?;
    let js = stream::jetstream(client);
    stream::ensure_stream(&js, &names).await?;
    let t = Instant::now();
    let mut acks = Vec::new();
    let mut published = 0u64;
    for w in 1..=workers {
        let rank = WorkerWithDpRank::new(w, 0);
        let events = rank_events(rank, total / workers, !catch_up);
        for chunk in events.chunks(stream::MAX_EVENTS_PER_MESSAGE) {
            let payload = kvrouter_wire::json::to_json_array(chunk);
            acks.push(js.publish(names.event_subject(w), payload.into()).await?);
            published += chunk.len() as u64;
            if acks.len() >= 256 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }
    let state = js
        .get_stream(names.stream())
        .await?
        .info()
        .await?
        .state
        .clone();
    println!(
        "published {published} events in {:.2} s: stream messages {}, {} bytes",
        t.elapsed().as_secs_f64(),
        state.messages,
        state.bytes
    );

    // One router replica consumes them all.
    let mut cfg = RouterServiceConfig::new(&endpoint, 16);
    cfg.fleet.no_admin = true;
    cfg.fleet.health_interval_ms = 3_600_000;
    cfg.fleet.replicas.event_plane = EventPlane::Nats;
    cfg.fleet.replicas.nats_server = url;
    cfg.fleet.replicas.router_snapshot_threshold = if catch_up { 1 } else { u64::MAX };
    cfg.fleet.replicas.router_id = Some("bench-a".into());
    let specs: Vec<WorkerSpec> = (1..=workers)
        .map(|w| {
            let mut s = WorkerSpec::from_url(&format!("http://127.0.0.1:{}", 20_000 + w));
            s.id = Some(w);
            s.endpoint = Some(endpoint.clone());
            s
        })
        .collect();
    let t = Instant::now();
    let router = Router::start(&cfg, specs.clone()).await?;
    let m = &router.metrics().event_plane;
    let mut report = Instant::now();
    while m.events.get() < published {
        if report.elapsed() > Duration::from_secs(5) {
            report = Instant::now();
            eprintln!(
                "… {} events, {} messages, lag {}, redeliveries {}, bad {}",
                m.events.get(),
                m.messages.get(),
                m.lag.get(),
                m.redeliveries.get(),
                m.bad_messages.get()
            );
        }
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("only {} of {published} events after 600 s", m.events.get());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let consumed = t.elapsed();
    let fleet = router.fleet().clone();
    tokio::task::spawn_blocking(move || fleet.router.flush_events(Duration::from_secs(60))).await?;
    let indexed = t.elapsed();
    println!(
        "consumed {published} events ({} messages) in {:.2} s, indexed in {:.2} s: {:.0} events/s \
         (gaps {}, duplicates {}, index entries {})",
        m.messages.get(),
        consumed.as_secs_f64(),
        indexed.as_secs_f64(),
        published as f64 / indexed.as_secs_f64(),
        m.gaps.get(),
        m.duplicates.get(),
        router.fleet().router.index().current_size(),
    );
    if catch_up {
        time_catch_up(&router, cfg, specs).await?;
    }
    router.stop().await;
    Ok(())
}

/// Wait for `peer` to snapshot, then start a second replica and time it until its index
/// holds as many entries as `peer`'s.
async fn time_catch_up(
    peer: &Router,
    mut cfg: RouterServiceConfig,
    specs: Vec<WorkerSpec>,
) -> anyhow::Result<()> {
    let m = &peer.metrics().event_plane;
    let t = Instant::now();
    while m.snapshots_taken.get() == 0 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "no snapshot after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let entries = peer.fleet().router.index().current_size();
    println!(
        "snapshot of {entries} index entries: {} bytes, taken in {:.2} s",
        m.snapshot_size.get(),
        m.snapshot_duration.get()
    );
    cfg.fleet.replicas.router_id = Some("bench-b".into());
    cfg.fleet.replicas.router_snapshot_threshold = u64::MAX;
    let t = Instant::now();
    let fresh = Router::start(&cfg, specs).await?;
    while fresh.fleet().router.index().current_size() < entries {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "the new replica has {} of {entries} entries after 600 s",
            fresh.fleet().router.index().current_size()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "a new replica holds the same {entries} entries after {:.2} s (snapshots loaded {})",
        t.elapsed().as_secs_f64(),
        fresh.metrics().event_plane.snapshots_loaded.get()
    );
    fresh.stop().await;
    Ok(())
}
