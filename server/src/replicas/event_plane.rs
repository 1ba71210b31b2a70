//! `--event-plane nats`: a router replica's KV events from the endpoint's JetStream stream
//! (fed by `kvrouter relay`s, [`super::relay`]) instead of each worker's ZMQ publisher.
//!
//! One durable pull consumer, named from the router id ([`super::stream::consumer_name`]),
//! reads every worker's subject in stream order; each message (a JSON array of one rank's
//! consecutive events) is checked and handed to the router's index queue
//! ([`RouterState::event_sink`](crate::routing::RouterState::event_sink)), then acknowledged.
//!
//! * **Redeliveries**: a message whose stream sequence is not above the last applied one is
//!   skipped (counted): no event is applied twice, whatever NATS redelivers.
//! * **Event ids**: per rank, [`RankTracker`] decides (duplicates skipped, a relay restart
//!   clears the rank first, a forward gap clears the rank and asks the worker's relay for a
//!   clear and re-dump on [`Names::redump_subject`]).
//! * **Unknown workers** (not registered here) are ignored and counted; a worker that was
//!   deregistered has its index cleared by the fleet as with ZMQ.
//! * **Hostile input**: a message over [`MAX_MESSAGE_BYTES`], not a JSON array of events, or
//!   with events of another worker than its subject's is skipped and counted; never a panic.
//! * **Start**: unless `--router-reset-states`, the newest snapshot ([`super::snapshot`]) is
//!   applied and consuming starts after its sequence; any consumer of the same name is
//!   replaced. When the stream no longer holds the next message needed (purged meanwhile),
//!   the snapshot is loaded again. With `--router-reset-states` the snapshot and the
//!   consumer are deleted and the stream is read from its first message.
//! * **Order**: messages are applied in stream order only. A message past one the stream
//!   still holds (not delivered: dropped for a slow consumer, lost in a restart) makes the
//!   consumer start again from the one needed, rather than wait for a redelivery.
//! * **NATS restarts**: the client reconnects; on any error of the message stream the
//!   consumer is created again from the last applied sequence.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use tokio::sync::{mpsc, watch};

use super::relay::RedumpRequest;
use super::snapshot::{self, LastId, Snapshot, SnapshotRequest, Snapshotter};
use super::stream::{self, MAX_MESSAGE_BYTES};
use super::tracker::{RankTracker, Verdict};
use super::{Names, ReplicaArgs};
use crate::metrics::{EventPlaneMetrics, Metrics};
use crate::routing::clear_events;
use crate::workers::fleet::Fleet;

/// A message not acknowledged within this is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Times in a row the consumer is created again because messages the stream holds were
/// skipped in delivery; then the hole is taken as deleted messages.
const MAX_HOLE_RETRIES: u32 = 5;

/// The running event plane of one replica: its consumer and snapshot tasks.
pub struct NatsEventPlane {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    applied: watch::Receiver<u64>,
    router_id: String,
}

impl NatsEventPlane {
    /// Starts consuming `endpoint`'s stream into `fleet`'s router (connecting in the
    /// background: NATS may come up later). Must be called inside a Tokio runtime.
    /// Errors: a malformed NATS URL.
    pub async fn start(
        args: &ReplicaArgs,
        endpoint: &str,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let router_id = args.router_id();
        let names = Names::for_endpoint(endpoint);
        let client = stream::connect(&args.nats_server, &router_id).await?;
        let js = stream::jetstream(client.clone());
        let (stop, stop_rx) = watch::channel(false);
        let (applied_tx, applied) = watch::channel(0);
        let (req_tx, req_rx) = mpsc::channel(1);
        let newest = Arc::new(AtomicU64::new(0));
        let consumer_name = stream::consumer_name(&router_id);
        let consumer = Consumer {
            client,
            js: js.clone(),
            names: names.clone(),
            name: consumer_name.clone(),
            router_id: router_id.clone(),
            fleet,
            metrics: metrics.clone(),
            tracker: RankTracker::default(),
            applied: 0,
            applied_tx,
            reset: args.router_reset_states,
            holes: 0,
            newest: newest.clone(),
        };
        let snapshotter = Snapshotter {
            js,
            names,
            router_id: router_id.clone(),
            consumer_name,
            threshold: args.router_snapshot_threshold,
            requests: req_tx,
            applied: applied.clone(),
            metrics,
            newest,
        };
        let tasks = vec![
            tokio::spawn(consumer.run(req_rx, stop_rx.clone())),
            tokio::spawn(snapshotter.run(stop_rx)),
        ];
        tracing::info!(%router_id, endpoint, "consuming KV events from NATS");
        Ok(Self {
            stop,
            tasks,
            applied,
            router_id,
        })
    }

    /// The last stream sequence applied.
    pub fn applied_seq(&self) -> u64 {
        *self.applied.borrow()
    }

    /// This replica's id (its consumer's name comes from it).
    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    /// Stops consuming and snapshotting.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for NatsEventPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The consumer's state: everything a snapshot records.
struct Consumer {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    name: String,
    router_id: String,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    tracker: RankTracker,
    /// The last stream sequence applied.
    applied: u64,
    applied_tx: watch::Sender<u64>,
    /// `--router-reset-states`, until done.
    reset: bool,
    /// Times in a row the consumer was created again for undelivered messages.
    holes: u32,
    newest: Arc<AtomicU64>,
}

/// Why a message stream ended.
enum End {
    Stop,
    Recreate,
}

impl Consumer {
    fn m(&self) -> &EventPlaneMetrics {
        &self.metrics.event_plane
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<SnapshotRequest>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut started = false;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.open(&mut started).await {
                Ok(messages) => {
                    if let End::Stop = self.consume(messages, &mut requests, &mut stop).await {
                        return;
                    }
                }
                Err(e) => tracing::warn!("NATS event plane: {e:#}"),
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The stream, the start-up state (once), and a fresh consumer from the last applied
    /// sequence.
    async fn open(&mut self, started: &mut bool) -> anyhow::Result<pull::Stream> {
        let stream = stream::ensure_stream(&self.js, &self.names).await?;
        if !*started {
            if self.reset {
                snapshot::delete(&self.js, &self.names).await?;
                tracing::info!("--router-reset-states: snapshot deleted, starting empty");
            } else {
                self.load_snapshot().await?;
            }
            *started = true;
        }
        // A consumer of our name may be a previous process's, positioned for its own index.
        let _ = stream.delete_consumer(&self.name).await;
        let deliver_policy = match self.applied {
            0 => DeliverPolicy::All,
            s => DeliverPolicy::ByStartSequence {
                start_sequence: s + 1,
            },
        };
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(self.name.clone()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: 10_000,
                inactive_threshold: snapshot::INACTIVE,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the consumer {}: {e}", self.name))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(500)
            .max_bytes_per_batch(8 << 20)
            .expires(Duration::from_secs(6))
            .heartbeat(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("pulling from {}: {e}", self.name))?;
        Ok(messages)
    }

    /// Apply the newest snapshot if it is ahead of what is applied: every registered rank is
    /// cleared and rebuilt from it (only registered workers' events are kept).
    async fn load_snapshot(&mut self) -> anyhow::Result<()> {
        let Some((snap, size)) = snapshot::load(&self.js, &self.names).await? else {
            return Ok(());
        };
        if snap.stream_seq <= self.applied {
            return Ok(());
        }
        let sink = self.fleet.router.event_sink();
        for w in self.fleet.registry.all() {
            for rank in w.spec.ranks() {
                for ev in clear_events(rank) {
                    send(&sink, ev).await;
                }
            }
        }
        let registered = |id: u64| self.fleet.registry.get(id).is_some();
        for ev in snap.events.iter().filter(|e| registered(e.worker_id)) {
            send(&sink, ev.clone()).await;
        }
        self.tracker = RankTracker::from_last_ids(
            snap.last_ids
                .iter()
                .filter(|l| registered(l.worker_id))
                .map(|l| (l.rank(), l.event_id)),
        );
        self.set_applied(snap.stream_seq);
        snapshot::loaded(self.m(), &self.newest, &snap, size);
        tracing::info!(seq = snap.stream_seq, from = %snap.router_id, events = snap.events.len(),
            "index snapshot loaded");
        Ok(())
    }

    fn set_applied(&mut self, seq: u64) {
        self.applied = seq;
        let _ = self.applied_tx.send(seq);
    }

    async fn consume(
        &mut self,
        mut messages: pull::Stream,
        requests: &mut mpsc::Receiver<SnapshotRequest>,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        loop {
            tokio::select! {
                _ = stop.changed() => return End::Stop,
                Some(req) = requests.recv() => {
                    let snap = self.snapshot().await;
                    let _ = req.send(snap);
                }
                item = messages.next() => match item {
                    Some(Ok(msg)) => {
                        if self.handle(msg).await.is_err() {
                            tracing::debug!("event stream delivery skipped sequences; consuming again from {}", self.applied + 1);
                            return End::Recreate;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("NATS event stream: {e}; consuming again from sequence {}", self.applied + 1);
                        return End::Recreate;
                    }
                    None => return End::Recreate,
                },
            }
        }
    }

    /// The state now, between two messages, once the index has applied everything handed
    /// to it.
    async fn snapshot(&self) -> Snapshot {
        let router = self.fleet.router.clone();
        let events = tokio::task::spawn_blocking(move || {
            router.flush_events(Duration::from_secs(30));
            router.dump_events()
        })
        .await
        .unwrap_or_default();
        Snapshot {
            version: 1,
            router_id: self.router_id.clone(),
            stream_seq: self.applied,
            taken_at_ms: snapshot::now_ms(),
            last_ids: self
                .tracker
                .last_ids()
                .into_iter()
                .map(|(r, event_id)| LastId {
                    worker_id: r.worker_id,
                    dp_rank: r.dp_rank,
                    event_id,
                })
                .collect(),
            events,
        }
    }

    /// Apply one message in stream order. `Err(())`: it came before messages the stream
    /// still holds (they were not delivered: NATS dropped them for a slow consumer, or a
    /// restart lost them in flight), so consuming must start again from the next one needed.
    async fn handle(&mut self, msg: Message) -> Result<(), ()> {
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(_) => {
                self.m().bad_messages.inc();
                return Ok(());
            }
        };
        self.m().messages.inc();
        if seq <= self.applied {
            self.m().redeliveries.inc();
            let _ = msg.ack().await;
            return Ok(());
        }
        if seq > self.applied + 1 {
            match self.first_seq().await {
                Some(first) if first <= self.applied + 1 && self.holes < MAX_HOLE_RETRIES => {
                    self.holes += 1;
                    return Err(());
                }
                Some(first) if first > self.applied + 1 && self.applied > 0 => {
                    // Messages we need are gone (purged after a newer snapshot, or aged out).
                    tracing::warn!(
                        seq,
                        applied = self.applied,
                        "event stream hole: loading the snapshot"
                    );
                    if let Err(e) = self.load_snapshot().await {
                        tracing::warn!("loading the snapshot: {e:#}");
                    }
                    if seq <= self.applied {
                        self.m().redeliveries.inc();
                        let _ = msg.ack().await;
                        return Ok(());
                    }
                }
                _ => {} // deleted messages, or NATS unreachable: go on from here
            }
        }
        self.holes = 0;
        match stream::subject_worker(&msg.subject).and_then(|w| parse(&msg.payload, w)) {
            Some(events) => self.apply(events).await,
            None => {
                self.m().bad_messages.inc();
            }
        }
        if let Err(e) = msg.ack().await {
            tracing::debug!("ack: {e}");
        }
        self.set_applied(seq);
        Ok(())
    }

    /// The stream's first sequence, if NATS answers.
    async fn first_seq(&self) -> Option<u64> {
        let mut stream = self.js.get_stream(self.names.stream()).await.ok()?;
        Some(stream.info().await.ok()?.state.first_sequence)
    }

    async fn apply(&mut self, events: Vec<RouterEvent>) {
        let sink = self.fleet.router.event_sink();
        for ev in events {
            if self.fleet.registry.get(ev.worker_id).is_none() {
                self.m().unknown_workers.inc();
                self.tracker.forget_worker(ev.worker_id);
                continue;
            }
            let rank = ev.worker();
            match self.tracker.check(&ev) {
                Verdict::Duplicate => {
                    self.m().duplicates.inc();
                    continue;
                }
                Verdict::Apply => {}
                Verdict::Recovered { new_gap } => {
                    if new_gap {
                        self.m().gaps.inc();
                    }
                    self.m().gaps_recovered.inc();
                }
                Verdict::Restart => {
                    self.m().relay_restarts.inc();
                    for c in clear_events(rank) {
                        send(&sink, c).await;
                    }
                }
                Verdict::Gap => {
                    self.m().gaps.inc();
                    for c in clear_events(rank) {
                        send(&sink, c).await;
                    }
                    self.ask_redump(rank, ev.event.event_id).await;
                }
            }
            self.m().events.inc();
            if !send(&sink, ev).await {
                return;
            }
        }
    }

    async fn ask_redump(&self, rank: WorkerWithDpRank, event_id: u64) {
        let req = RedumpRequest {
            dp_rank: rank.dp_rank,
            event_id,
        };
        let payload = serde_json::to_vec(&req).unwrap_or_default();
        if let Err(e) = self
            .client
            .publish(self.names.redump_subject(rank.worker_id), payload.into())
            .await
        {
            tracing::warn!(%rank, "asking for a re-dump: {e}");
        }
    }
}

/// The events of a message of `worker`'s subject; `None` if it is too large, not a JSON
/// array of events, or has an event of another worker.
fn parse(payload: &[u8], worker: u64) -> Option<Vec<RouterEvent>> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return None;
    }
    let events = kvrouter_wire::json::from_json_array(payload).ok()?;
    events
        .iter()
        .all(|e| e.worker_id == worker)
        .then_some(events)
}

/// Hand `ev` to the index queue, waiting (without blocking the runtime) while it is full.
/// False when the index thread is gone.
async fn send(sink: &std::sync::mpsc::SyncSender<RouterEvent>, mut ev: RouterEvent) -> bool {
    use std::sync::mpsc::TrySendError;
    loop {
        match sink.try_send(ev) {
            Ok(()) => return true,
            Err(TrySendError::Full(back)) => {
                ev = back;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::event::KvCacheEventData;

    #[test]
    fn hostile_payloads_are_refused() {
        let ev = RouterEvent::new(WorkerWithDpRank::new(3, 0), 0, KvCacheEventData::Cleared);
        let ok = kvrouter_wire::json::to_json_array(&[ev.clone(), ev.clone()]);
        assert_eq!(parse(&ok, 3).map(|v| v.len()), Some(2));
        assert!(
            parse(&ok, 4).is_none(),
            "events of another worker than the subject's"
        );
        for bad in [
            &b""[..],
            b"garbage",
            b"{}",
            b"[{\"worker_id\": -1}]",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\xff\xfe",
        ] {
            assert!(parse(bad, 3).is_none());
        }
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(parse(&huge, 3).is_none());
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes(), 3).is_none());
    }
}
