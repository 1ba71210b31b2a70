//! Replica sync over NATS core: one task publishes this router's operations in batches and a
//! heartbeat, and applies the other replicas' messages as they arrive. NATS being down never
//! reaches the routing path: the outbox fills and drops, async-nats reconnects, and sync
//! resumes with a new epoch.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::outbox::{Epoch, Queued};
use super::receiver::Receiver;
use super::wire::{encode_op, Packer, MAX_BATCH_OPS, MAX_MESSAGE_BYTES};
use crate::metrics::{Metrics, ReasonLabels};

/// How long the first operation of a batch waits for others (spec §5.1: 256 events or 1 ms).
pub const BATCH_WINDOW: Duration = Duration::from_millis(1);
/// Message size when the server has not told its `max_payload` yet (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// What the sync task needs.
pub struct Link {
    pub client: async_nats::Client,
    pub subject: String,
    pub router_id: String,
    pub epoch: Epoch,
    pub heartbeat: Duration,
    pub metrics: Arc<Metrics>,
}

/// Publish `outbox`'s operations and apply the messages of `sub` with `receiver` until the
/// outbox closes (its router is gone) or the task is aborted.
pub async fn run(
    link: Link,
    outbox: mpsc::Receiver<Queued>,
    sub: async_nats::Subscriber,
    receiver: Receiver,
    expiry_tick: Duration,
) {
    tokio::select! {
        () = publish(&link, outbox) => {}
        () = receive(sub, receiver, expiry_tick) => {}
    }
}

async fn publish(link: &Link, mut outbox: mpsc::Receiver<Queued>) {
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval(link.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH_OPS);
    loop {
        tokio::select! {
            op = outbox.recv() => match op {
                Some(op) => batch.push(op),
                None => return,
            },
            _ = heartbeat.tick() => {}
        }
        if !batch.is_empty() {
            let deadline = Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_BATCH_OPS {
                match tokio::time::timeout_at(deadline, outbox.recv()).await {
                    Ok(Some(op)) => batch.push(op),
                    _ => break,
                }
            }
        }
        send(link, &mut seq, &batch).await;
        batch.clear();
        heartbeat.reset();
    }
}

/// Publish `batch` (a heartbeat when empty), one run of operations of one epoch at a time.
async fn send(link: &Link, seq: &mut u64, batch: &[Queued]) {
    let max = match link.client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    }
    .min(MAX_MESSAGE_BYTES);
    let packer = Packer::new(&link.router_id, max);
    let dropped = |reason, n: usize| {
        link.metrics
            .replica_sync
            .ops_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n as u64);
    };
    let mut runs: Vec<&[Queued]> = batch.chunk_by(|a, b| a.0 == b.0).collect();
    if runs.is_empty() {
        runs.push(&[]);
    }
    for run in runs {
        let epoch = run.first().map_or_else(|| link.epoch.get(), |q| q.0);
        let events: Vec<Vec<u8>> = run.iter().map(|(_, op)| encode_op(op)).collect();
        let packed = packer.pack(epoch, seq, &events);
        if packed.too_large > 0 {
            dropped("too_large", packed.too_large);
            link.epoch.bump();
        }
        for (m, n) in packed.messages {
            match link.client.publish(link.subject.clone(), m.into()).await {
                Ok(()) => {
                    link.metrics.replica_sync.ops_sent.inc_by(n as u64);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "replica sync publish failed");
                    dropped("publish_error", n);
                    link.epoch.bump();
                }
            }
        }
    }
}

async fn receive(mut sub: async_nats::Subscriber, mut receiver: Receiver, expiry_tick: Duration) {
    let mut tick = tokio::time::interval(expiry_tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = sub.next() => match m {
                Some(m) => receiver.on_message(&m.payload, std::time::Instant::now()),
                None => {
                    // The client closed for good: hear no one, keep publishing what we can.
                    tracing::error!("replica sync: subscription ended; peers' bookings freed");
                    receiver.drop_all();
                    return std::future::pending().await;
                }
            },
            _ = tick.tick() => receiver.expire(std::time::Instant::now()),
        }
    }
}
