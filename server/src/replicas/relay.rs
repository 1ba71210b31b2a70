//! The relay (`kvrouter relay`, `kvrouter register --relay`): a sidecar that subscribes to
//! its workers' ZMQ KV events, or polls those of TensorRT-LLM workers without a ZMQ endpoint
//! (`POST /kv_cache_events`, [`crate::workers::trtllm_poller`]), and publishes them to the
//! endpoint's JetStream stream, for routers started with `--event-plane nats`
//! ([`super::event_plane`]). Such an endpoint is drained by each call, so with the NATS
//! event plane the relay is its one consumer: the routers do not poll it.
//!
//! **Messages**: one message is a JSON array ([`kvrouter_wire::json::to_json_array`]) of at
//! most [`MAX_EVENTS_PER_MESSAGE`] consecutive `RouterEvent`s of one worker rank, on
//! [`Names::event_subject`] of its worker. Event ids are per (worker, dp_rank), consecutive
//! from 0 for the life of the relay process (the engine's own numbering is not kept).
//!
//! **Publishing**: acks are pipelined (at most `max_in_flight` publishes wait for theirs);
//! whatever arrives meanwhile is batched. While NATS is down, messages wait in a buffer of at
//! most `buffer_events` events.
//!
//! **Never lost silently**: the relay keeps an index of what each rank holds (the core's
//! [`TieredIndex`], fed with the same events). A rank whose messages may be lost — the buffer
//! overflowed (its queued messages are dropped), or a publish was not acknowledged — is marked
//! *dirty*: nothing more of it is published until NATS takes messages again; then it gets a
//! recovery: `Cleared` (every tier) followed by a dump of its index, with the next ids. A
//! router seeing the id gap and then the clear knows the rank is whole again. A router that
//! detects a gap itself asks for the same recovery on [`Names::redump_subject`].
//!
//! A polled worker's event-id gap (events lost in the engine: it has no replay) clears the
//! rank: the poller's `Cleared` event is published like any other.
//!
//! Threads: the ZMQ subscribers live in the wire crate's pollers, the TensorRT-LLM pollers
//! are tasks on the runtime; one bridge thread moves their events to the async task that
//! does everything else.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use futures::stream::{FuturesOrdered, StreamExt};
use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::index::TieredIndex;
use kvrouter_wire::subscriber::KvEventSubscriber;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::stream::{self, MAX_EVENTS_PER_MESSAGE};
use super::Names;
use crate::workers::client::WorkerClient;
use crate::workers::fleet::PollSettings;
use crate::workers::spec::WorkerSpec;
use crate::workers::trtllm_poller::TrtPoller;

/// Relay settings.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// NATS server URL (`nats://host:port`).
    pub nats_server: String,
    /// `ns.component.endpoint` whose stream the events go to.
    pub endpoint: String,
    /// Most events buffered while NATS does not take them; beyond it the oldest messages
    /// are dropped and their rank recovered later. Default 200,000.
    pub buffer_events: usize,
    /// Most publishes waiting for their ack. Default 256.
    pub max_in_flight: usize,
    /// Largest ZMQ message accepted from an engine, bytes. Default 4 MiB.
    pub max_frame_bytes: usize,
    /// How TensorRT-LLM workers without a ZMQ endpoint are polled (`--kv-events-poll-*`).
    pub poll: PollSettings,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            nats_server: "nats://127.0.0.1:4222".into(),
            endpoint: crate::workers::spec::DEFAULT_ENDPOINT.into(),
            buffer_events: 200_000,
            max_in_flight: 256,
            max_frame_bytes: kvrouter_wire::subscriber::DEFAULT_MAX_FRAME_BYTES,
            poll: PollSettings::default(),
        }
    }
}

/// A router's request for a rank's recovery (JSON on [`Names::redump_subject`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RedumpRequest {
    /// The rank of the subject's worker.
    pub dp_rank: u32,
    /// The id of the event after which the router saw the gap: a recovery that started at
    /// or after it already answers the request.
    pub event_id: u64,
}

/// Counters since the relay started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Events received from the engines' subscribers.
    pub events_in: u64,
    /// Events whose message was acknowledged by JetStream.
    pub events_published: u64,
    /// Messages acknowledged.
    pub messages_published: u64,
    /// Publishes not acknowledged (timeout, NATS down, no stream): their rank is recovered.
    pub publish_failures: u64,
    /// Events dropped from a full buffer: their rank is recovered.
    pub dropped_events: u64,
    /// Recoveries published (a clear and a dump of one rank).
    pub recoveries: u64,
    /// Re-dump requests from routers that started a recovery.
    pub redump_requests: u64,
    /// `POST /kv_cache_events` calls to TensorRT-LLM workers (all answered or not).
    pub polls: u64,
    /// Of those, the ones that failed (connection, status, timeout, not a JSON array).
    pub poll_errors: u64,
}

/// The relay's counters and gauges as Prometheus metrics, shared with its status server
/// (`kvrouter relay --system-port`, [`super::relay_status`]); cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    events_in: Counter,
    events_published: Counter,
    messages_published: Counter,
    publish_failures: Counter,
    dropped_events: Counter,
    recoveries: Counter,
    redump_requests: Counter,
    /// Polls of TensorRT-LLM workers, copied from their pollers.
    polls: Counter,
    poll_errors: Counter,
    /// Events waiting to be published (the buffer's fill).
    buffered_events: Gauge,
    /// 1 while NATS is connected and the stream takes messages, else 0.
    publishing: Gauge,
}

impl RelayMetrics {
    /// Register every metric in `r` (names under the registry's prefix, e.g. `kvrouter_`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "relay_events_received",
            "KV events received from the engines (ZMQ publishers and polled TensorRT-LLM workers)",
            self.events_in.clone(),
        );
        r.register(
            "relay_events_published",
            "KV events whose message JetStream acknowledged",
            self.events_published.clone(),
        );
        r.register(
            "relay_messages_published",
            "Messages JetStream acknowledged",
            self.messages_published.clone(),
        );
        r.register(
            "relay_publish_failures",
            "Publishes not acknowledged (timeout, NATS down, no stream): their rank is recovered",
            self.publish_failures.clone(),
        );
        r.register(
            "relay_dropped_events",
            "Events dropped from a full buffer (a gap routers see): their rank is recovered",
            self.dropped_events.clone(),
        );
        r.register(
            "relay_recoveries",
            "Recoveries published: a clear and a re-dump of one rank, after a gap or a router's request",
            self.recoveries.clone(),
        );
        r.register(
            "relay_redump_requests",
            "Re-dump requests from routers that saw a gap and started a recovery",
            self.redump_requests.clone(),
        );
        r.register(
            "relay_kv_event_polls",
            "POST /kv_cache_events calls to TensorRT-LLM workers",
            self.polls.clone(),
        );
        r.register(
            "relay_kv_event_poll_errors",
            "POST /kv_cache_events calls that failed (connection, status, timeout, not a JSON array)",
            self.poll_errors.clone(),
        );
        r.register(
            "relay_buffered_events",
            "Events waiting to be published",
            self.buffered_events.clone(),
        );
        r.register(
            "relay_publishing",
            "1 while NATS is connected and the stream takes messages, else 0",
            self.publishing.clone(),
        );
    }
}

fn add(c: &Counter, n: u64) {
    c.inc_by(n);
}

/// A running relay. Dropping it without [`stop`](Self::stop) stops it without draining.
pub struct Relay {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    counters: RelayMetrics,
}

impl Relay {
    /// Subscribes to every rank of `workers` and starts publishing (NATS may come up later).
    /// Must be called inside a Tokio runtime.
    ///
    /// Workers with a `kv_events_endpoint` are subscribed to; TensorRT-LLM workers without
    /// one are polled ([`WorkerSpec::polls_kv_events`]).
    ///
    /// Errors: no workers, a worker without `id` (routers must know its events by the same
    /// id), a worker with neither a `kv_events_endpoint` nor `engine: trtllm`, a ZMQ endpoint
    /// that cannot be opened, a malformed NATS URL.
    pub async fn start(opts: RelayOptions, workers: Vec<WorkerSpec>) -> anyhow::Result<Self> {
        if workers.is_empty() {
            anyhow::bail!("no workers to relay");
        }
        let mut configs = Vec::new();
        let mut polled = Vec::new();
        for w in &workers {
            w.validate()
                .map_err(|e| anyhow::anyhow!("worker {}: {e}", w.url))?;
            if w.id.is_none() {
                anyhow::bail!(
                    "worker {}: the NATS event plane needs its \"id\" (routers know its events by it)",
                    w.url
                );
            }
            let block_size = w.block_size.unwrap_or(16) as u32;
            if w.polls_kv_events() {
                polled.push((w.clone(), block_size));
                continue;
            }
            if w.kv_events_endpoint.is_none() {
                anyhow::bail!(
                    "worker {}: no kv_events_endpoint to relay (nor engine trtllm to poll)",
                    w.url
                );
            }
            configs.extend(w.subscriber_configs(block_size, opts.max_frame_bytes));
        }
        let names = Names::for_endpoint(&opts.endpoint);
        let client = stream::connect(&opts.nats_server, "kvrouter-relay").await?;
        let redump = client
            .subscribe(names.redump_subjects())
            .await
            .context("subscribing to re-dump requests")?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<RouterEvent>(65_536);
        let poll_tx = tx.clone();
        let subs = tokio::task::spawn_blocking(move || {
            let mut subs = Vec::new();
            for cfg in configs {
                let rank = cfg.worker;
                match KvEventSubscriber::start(cfg, tx.clone()) {
                    Ok(s) => subs.push(s),
                    Err(e) => {
                        for s in subs {
                            KvEventSubscriber::stop(s);
                        }
                        return Err(anyhow::anyhow!("KV events of rank {rank}: {e}"));
                    }
                }
            }
            Ok(subs)
        })
        .await??;
        // Started once nothing can fail any more; one client (kept-alive connections) for all.
        let rt = tokio::runtime::Handle::current();
        let http = WorkerClient::new(opts.poll.timeout);
        let pollers: Vec<TrtPoller> = polled
            .iter()
            .map(|(w, block_size)| {
                TrtPoller::start(
                    &rt,
                    w,
                    *block_size,
                    http.clone(),
                    opts.poll,
                    poll_tx.clone(),
                )
            })
            .collect();
        drop(poll_tx);
        let (chunk_tx, chunk_rx) = mpsc::channel(64);
        std::thread::Builder::new()
            .name("relay-bridge".into())
            .spawn(move || bridge(rx, chunk_tx))
            .context("starting the relay thread")?;
        let counters = RelayMetrics::default();
        let (stop_tx, stop_rx) = oneshot::channel();
        let state = Pump {
            js: stream::jetstream(client.clone()),
            client,
            names,
            counters: counters.clone(),
            ranks: HashMap::new(),
            queue: VecDeque::new(),
            queued_events: 0,
            in_flight: FuturesOrdered::new(),
            max_in_flight: opts.max_in_flight.max(1),
            buffer_events: opts.buffer_events.max(1),
            stream_ok: false,
        };
        let sources = Sources { subs, pollers };
        let task = tokio::spawn(state.run(chunk_rx, redump, sources, stop_rx));
        Ok(Self {
            stop: Some(stop_tx),
            task: Some(task),
            counters,
        })
    }

    /// The counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let g = |a: &Counter| a.get();
        RelayStats {
            events_in: g(&c.events_in),
            events_published: g(&c.events_published),
            messages_published: g(&c.messages_published),
            publish_failures: g(&c.publish_failures),
            dropped_events: g(&c.dropped_events),
            recoveries: g(&c.recoveries),
            redump_requests: g(&c.redump_requests),
            polls: g(&c.polls),
            poll_errors: g(&c.poll_errors),
        }
    }

    /// Its metrics, live (for a status server).
    pub fn metrics(&self) -> RelayMetrics {
        self.counters.clone()
    }

    /// Stops the subscribers, publishes what is buffered (for at most 3 s while NATS is
    /// reachable) and returns.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Moves the subscribers' events to the async task in chunks of whatever queued up (at
/// most 512). Ends when the subscribers' senders are all gone or the task is.
fn bridge(rx: std::sync::mpsc::Receiver<RouterEvent>, tx: mpsc::Sender<Vec<RouterEvent>>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => {
                let mut chunk = vec![ev];
                while chunk.len() < 512 {
                    match rx.try_recv() {
                        Ok(ev) => chunk.push(ev),
                        Err(_) => break,
                    }
                }
                if tx.blocking_send(chunk).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) if tx.is_closed() => return,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Where the events come from: stopped (all of their events sent) before the relay drains.
struct Sources {
    subs: Vec<KvEventSubscriber>,
    pollers: Vec<TrtPoller>,
}

impl Sources {
    /// Blocks for at most one send in progress per source.
    fn stop(self) {
        self.subs.into_iter().for_each(drop);
        self.pollers.into_iter().for_each(TrtPoller::stop);
    }

    /// Polls and failed polls of all pollers.
    fn polls(&self) -> (u64, u64) {
        self.pollers
            .iter()
            .map(TrtPoller::polls)
            .fold((0, 0), |(a, b), (p, e)| (a + p, b + e))
    }
}

/// Raises monotonic `c` to `total` (copied from a source's own count).
fn raise(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// One rank as the relay knows it.
#[derive(Default)]
struct Rank {
    /// The id of its next event.
    next_id: u64,
    /// What it holds.
    index: TieredIndex,
    /// Messages of it may be lost: publish nothing until its recovery.
    dirty: bool,
    /// The id of the clear of its last recovery.
    last_recovery: Option<u64>,
    /// Its publishes waiting for their ack.
    in_flight: usize,
}

/// A message to publish.
struct Outgoing {
    rank: WorkerWithDpRank,
    events: Vec<RouterEvent>,
}

type Acked = (WorkerWithDpRank, usize, bool);

/// The async side of the relay.
struct Pump {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    names: Names,
    counters: RelayMetrics,
    ranks: HashMap<WorkerWithDpRank, Rank>,
    queue: VecDeque<Outgoing>,
    queued_events: usize,
    in_flight: FuturesOrdered<futures::future::BoxFuture<'static, Acked>>,
    max_in_flight: usize,
    buffer_events: usize,
    /// The stream is known to exist (checked after every failure).
    stream_ok: bool,
}

impl Pump {
    async fn run(
        mut self,
        mut chunks: mpsc::Receiver<Vec<RouterEvent>>,
        mut redump: async_nats::Subscriber,
        sources: Sources,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut sources = Some(sources);
        loop {
            self.recover_dirty();
            self.publish().await;
            let c = &self.counters;
            if let Some(s) = &sources {
                let (polls, errors) = s.polls();
                raise(&c.polls, polls);
                raise(&c.poll_errors, errors);
            }
            c.buffered_events.set(self.queued_events as i64);
            c.publishing
                .set(i64::from(self.stream_ok && self.connected()));
            tokio::select! {
                _ = &mut stop => break,
                chunk = chunks.recv() => match chunk {
                    Some(c) => self.ingest(c),
                    None => break,
                },
                Some(acked) = self.in_flight.next(), if !self.in_flight.is_empty() => self.acked(acked),
                Some(msg) = redump.next() => self.redump(&msg),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // Drain: no more events, then what is buffered, for a bounded time.
        if let Some(s) = sources.take() {
            let _ = tokio::task::spawn_blocking(move || s.stop()).await;
        }
        while let Ok(c) = chunks.try_recv() {
            self.ingest(c);
        }
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        while (!self.queue.is_empty() || !self.in_flight.is_empty())
            && tokio::time::Instant::now() < end
        {
            self.publish().await;
            tokio::select! {
                Some(acked) = self.in_flight.next(), if !self.in_flight.is_empty() => self.acked(acked),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Number the events, index them and queue them; drop the oldest messages beyond the
    /// buffer.
    fn ingest(&mut self, chunk: Vec<RouterEvent>) {
        add(&self.counters.events_in, chunk.len() as u64);
        for mut ev in chunk {
            let rank = ev.worker();
            let st = self.ranks.entry(rank).or_default();
            // A rejected event (unknown parent, …) is rejected by the routers too.
            let _ = st.index.apply(&ev);
            if st.dirty {
                continue; // its recovery dumps the index, this event included
            }
            ev.event.event_id = st.next_id;
            st.next_id += 1;
            self.push(rank, ev);
        }
        while self.queued_events > self.buffer_events {
            let Some(o) = self.queue.pop_front() else {
                break;
            };
            self.mark_dirty(o.rank);
            let mut dropped = o.events.len();
            self.queue.retain(|q| {
                let drop = q.rank == o.rank;
                if drop {
                    dropped += q.events.len();
                }
                !drop
            });
            self.queued_events -= dropped;
            add(&self.counters.dropped_events, dropped as u64);
            tracing::warn!(%o.rank, dropped, "relay buffer full: events dropped, the rank will be re-dumped");
        }
    }

    fn push(&mut self, rank: WorkerWithDpRank, ev: RouterEvent) {
        self.queued_events += 1;
        if let Some(last) = self.queue.back_mut() {
            if last.rank == rank && last.events.len() < MAX_EVENTS_PER_MESSAGE {
                last.events.push(ev);
                return;
            }
        }
        self.queue.push_back(Outgoing {
            rank,
            events: vec![ev],
        });
    }

    fn mark_dirty(&mut self, rank: WorkerWithDpRank) {
        if let Some(st) = self.ranks.get_mut(&rank) {
            st.dirty = true;
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Queue a recovery for every dirty rank with nothing in flight, once NATS is up.
    fn recover_dirty(&mut self) {
        if !self.connected() {
            return;
        }
        let ready: Vec<WorkerWithDpRank> = self
            .ranks
            .iter()
            .filter(|(_, s)| s.dirty && s.in_flight == 0)
            .map(|(r, _)| *r)
            .collect();
        for rank in ready {
            let Some(st) = self.ranks.get_mut(&rank) else {
                continue;
            };
            st.dirty = false;
            st.last_recovery = Some(st.next_id);
            let mut events: Vec<RouterEvent> = crate::routing::clear_events(rank).collect();
            events.extend(st.index.dump_events());
            for ev in &mut events {
                ev.event.event_id = st.next_id;
                st.next_id += 1;
            }
            add(&self.counters.recoveries, 1);
            tracing::info!(%rank, events = events.len(), "relay: publishing a clear and a re-dump");
            for ev in events {
                self.push(rank, ev);
            }
        }
    }

    /// Publish queued messages while NATS is up and fewer than `max_in_flight` wait.
    async fn publish(&mut self) {
        if !self.stream_ok && self.connected() {
            self.stream_ok = match stream::ensure_stream(&self.js, &self.names).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!("relay: {e:#}");
                    false
                }
            };
        }
        while self.stream_ok && self.connected() && self.in_flight.len() < self.max_in_flight {
            let Some(o) = self.queue.pop_front() else {
                return;
            };
            self.queued_events -= o.events.len();
            let payload = kvrouter_wire::json::to_json_array(&o.events);
            let subject = self.names.event_subject(o.rank.worker_id);
            let n = o.events.len();
            match self.js.publish(subject, payload.into()).await {
                Ok(ack) => {
                    if let Some(st) = self.ranks.get_mut(&o.rank) {
                        st.in_flight += 1;
                    }
                    self.in_flight.push_back(Box::pin(wait_ack(o.rank, n, ack)));
                }
                Err(e) => {
                    tracing::warn!(rank = %o.rank, "relay: publish failed: {e}");
                    self.failed(o.rank, n);
                    return;
                }
            }
        }
    }

    fn acked(&mut self, (rank, n, ok): Acked) {
        if let Some(st) = self.ranks.get_mut(&rank) {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        if ok {
            add(&self.counters.messages_published, 1);
            add(&self.counters.events_published, n as u64);
        } else {
            self.failed(rank, n);
        }
    }

    /// A message of `rank` may be lost: recover the rank (and check the stream again).
    fn failed(&mut self, rank: WorkerWithDpRank, _events: usize) {
        add(&self.counters.publish_failures, 1);
        self.stream_ok = false;
        self.mark_dirty(rank);
        let mut dropped = 0;
        self.queue.retain(|q| {
            let drop = q.rank == rank;
            if drop {
                dropped += q.events.len();
            }
            !drop
        });
        self.queued_events -= dropped;
    }

    /// A router asks for a rank's recovery.
    fn redump(&mut self, msg: &async_nats::Message) {
        let Some(worker_id) = stream::subject_worker(&msg.subject) else {
            return;
        };
        let Ok(req) = serde_json::from_slice::<RedumpRequest>(&msg.payload) else {
            return;
        };
        let rank = WorkerWithDpRank::new(worker_id, req.dp_rank);
        let Some(st) = self.ranks.get_mut(&rank) else {
            return;
        };
        if st.dirty || st.last_recovery.is_some_and(|c| c >= req.event_id) {
            return; // a recovery is on its way or already answers it
        }
        add(&self.counters.redump_requests, 1);
        self.mark_dirty(rank);
    }
}

/// Awaits one publish's ack: (rank, events, acknowledged).
async fn wait_ack(rank: WorkerWithDpRank, n: usize, ack: PublishAckFuture) -> Acked {
    match ack.await {
        Ok(_) => (rank, n, true),
        Err(e) => {
            if e.kind() != PublishErrorKind::TimedOut {
                tracing::warn!(%rank, "relay: publish not acknowledged: {e}");
            }
            (rank, n, false)
        }
    }
}
