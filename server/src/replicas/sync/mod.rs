//! Replica sync (`--router-replica-sync`, `dynamo-router-spec.md` §5.1): every booking this
//! router makes (routed requests and external bookings), its first token and its end are
//! sent to the other router replicas of the endpoint over NATS core, on
//! [`Names::sync_subject`](super::Names::sync_subject); theirs are mirrored in this router's
//! load view, so replicas behind a round-robin client see each other's in-flight requests.
//!
//! * Hot path ([`outbox`]): a non-blocking push of a small owned operation into a bounded
//!   queue; a full queue drops the newest (counted).
//! * Out ([`transport`]): batches of ≤ 256 operations or 1 ms, one JSON message each
//!   ([`wire`]), fire-and-forget; an empty batch every second (or a third of the peer
//!   timeout, if shorter) as a heartbeat.
//! * In ([`receiver`], [`peers`]): other replicas' operations booked under
//!   `peer:<router id>:<request id>`, own echoes ignored; operations on ranks not in this
//!   router's routing set ignored; every field validated and every message bounded.
//! * A peer not heard from for `--router-replica-timeout-secs` (default 5 s) has all its
//!   bookings freed here: a dead or partitioned replica leaves no load behind. A peer that
//!   restarted, or whose messages were lost (a new epoch, a gap in its sequence numbers), is
//!   also reset, and starts clean.
//! * NATS down or partitioned: routing goes on with the local view, never waiting; async-nats
//!   reconnects and sync resumes. Bookings made meanwhile are *not* replayed: operations that
//!   did not fit the outbox are dropped, and the epoch changes, so peers free what they
//!   mirrored of this router and count only its bookings made after the return; this
//!   router's in-flight requests of before are missing from their view until they end.
//!   Prefix-cache state is not synced (each replica has its own index, fed by the same KV
//!   events), nor are output blocks (as in the reference).

mod outbox;
mod peers;
mod receiver;
mod transport;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use super::{Names, ReplicaArgs};
use crate::metrics::Metrics;
use crate::routing::RouterState;

pub use peers::{MAX_PEERS, MAX_PEER_BLOCKS, MAX_PEER_BOOKINGS};
pub use transport::BATCH_WINDOW;
pub use wire::{MAX_BATCH_OPS, MAX_MESSAGE_BYTES};

/// Heartbeat period at most.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Connect to `args.nats_server` and sync `router`'s bookings with the other replicas of
/// `endpoint` (`ns.component.endpoint`). Returns at once, NATS reachable or not (the
/// connection is made and remade in the background); the task runs until aborted.
///
/// Errors: an invalid `--router-id` (1 to 256 bytes of `[A-Za-z0-9_.-]`) or
/// `--router-replica-timeout-secs`, a malformed NATS URL, a router that already has a
/// booking sink.
pub async fn start(
    args: &ReplicaArgs,
    endpoint: &str,
    router: &Arc<RouterState>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<JoinHandle<()>> {
    let router_id = args.router_id();
    anyhow::ensure!(
        wire::valid_router_id(&router_id),
        "--router-id `{router_id}`: 1 to {} bytes of letters, digits, `_`, `.` and `-`",
        wire::MAX_ID_BYTES
    );
    let timeout = args.replica_timeout()?;
    let epoch = outbox::Epoch::new();
    let on_event = epoch.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("kvrouter {router_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(1000)))
        .event_callback(move |ev| {
            let epoch = on_event.clone();
            async move {
                match ev {
                    // Operations in flight may be lost: peers must start over with us.
                    async_nats::Event::Disconnected => {
                        epoch.bump();
                        tracing::warn!(
                            "replica sync: NATS disconnected; routing on the local view"
                        );
                    }
                    async_nats::Event::Connected => tracing::info!("replica sync: NATS connected"),
                    ev => tracing::debug!(%ev, "replica sync: NATS event"),
                }
            }
        })
        .connect(&args.nats_server)
        .await
        .with_context(|| format!("replica sync: NATS server `{}`", args.nats_server))?;
    let subject = Names::for_endpoint(endpoint).sync_subject();
    // Subscribed before anything is published on this connection: a peer that hears this
    // router knows it listens.
    let sub = client
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("replica sync: subscribing to `{subject}`"))?;
    let (outbox, rx) = outbox::Outbox::new(epoch.clone(), metrics.clone());
    router.set_booking_sink(Arc::new(outbox))?;
    let receiver = receiver::Receiver::new(
        router_id.clone(),
        peers::Peers::new(timeout),
        router,
        metrics.clone(),
    );
    tracing::info!(router_id = %router_id, %subject, nats = %args.nats_server,
        timeout_secs = timeout.as_secs_f64(), "replica sync on");
    let link = transport::Link {
        client,
        subject,
        router_id,
        epoch,
        heartbeat: HEARTBEAT.min(timeout / 3),
        metrics: metrics.clone(),
    };
    let tick = (timeout / 10).max(Duration::from_millis(10));
    Ok(tokio::spawn(transport::run(link, rx, sub, receiver, tick)))
}
