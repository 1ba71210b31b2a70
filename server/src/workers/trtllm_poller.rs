//! The KV events of a TensorRT-LLM worker, polled: `POST {url}/kv_cache_events` every
//! interval (`kv-event-wire.md` §3), each answer converted by the wire crate's
//! [`TrtWorker`] and sent to a sink: the index queue the ZMQ subscribers feed (a frontend or
//! router on `--event-plane zmq`), or the relay's channel to NATS
//! ([`crate::replicas::relay`]).
//!
//! * **One task per worker** on the async runtime (no thread), on the worker client's
//!   kept-alive connections. Each call drains the engine's buffer, so exactly one poller may
//!   run per worker: registration guarantees one per URL in a router, and routers on
//!   `--event-plane nats` poll none (the relay does).
//! * **Errors** (connection, status, timeout, an answer over the size limit or not a JSON
//!   array) are counted (`poll_errors`) and back off: the wait doubles from the interval up
//!   to [`MAX_BACKOFF`], and returns to the interval after a good answer. Events lost with a
//!   failed answer show as an `event_id` gap in the next one: the rank is cleared.
//! * **Stopping** ([`TrtPoller::stop`]) waits until no event of the poller can reach the
//!   index any more, so a deregistration's clear comes after its last event.
//! * **Counters** per rank are [`SubscriberStats`], as for a ZMQ subscriber: received (events),
//!   batches and `formats.trtllm` (answers with events for the rank), gaps and restarts (both
//!   clear), filtered, skipped, events out, and the worker's polls and poll errors.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvrouter_core::event::RouterEvent;
use kvrouter_wire::subscriber::{SubscriberState, SubscriberStats};
use kvrouter_wire::trtllm::{TrtWorker, DEFAULT_MAX_EVENTS};

use super::client::WorkerClient;
use super::fleet::PollSettings;
use super::spec::WorkerSpec;

/// Longest wait between polls after repeated errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Wait before retrying a send into a full index queue.
const FULL_QUEUE_WAIT: Duration = Duration::from_millis(1);

/// Counters the task updates and readers copy.
#[derive(Default)]
struct Counters {
    ranks: Vec<SubscriberStats>,
}

struct Shared {
    /// Set by `stop`; checked under `sending` before every send.
    stopped: AtomicBool,
    /// Held while events go to the index queue: `stop` takes it to wait out a send.
    sending: Mutex<()>,
    counters: Mutex<Counters>,
}

/// A running poller of one TensorRT-LLM worker.
pub struct TrtPoller {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl TrtPoller {
    /// Starts polling `spec`'s worker (id, `dp_size`, URL and interval from its registration)
    /// on `rt`, converting at the router's `block_size` into `sink`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        spec: &WorkerSpec,
        block_size: u32,
        client: WorkerClient,
        settings: PollSettings,
        sink: SyncSender<RouterEvent>,
    ) -> Self {
        let dp = spec.dp_size.max(1);
        let shared = Arc::new(Shared {
            stopped: AtomicBool::new(false),
            sending: Mutex::new(()),
            counters: Mutex::new(Counters {
                ranks: vec![SubscriberStats::default(); dp as usize],
            }),
        });
        let interval = spec
            .kv_events_poll_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(settings.interval)
            .max(Duration::from_millis(1));
        let run = Run {
            url: spec.url.clone(),
            client,
            settings,
            interval,
            sink,
            shared: shared.clone(),
            worker: TrtWorker::new(spec.id.unwrap_or(0), dp, block_size, DEFAULT_MAX_EVENTS),
        };
        let task = rt.spawn(run.run());
        Self { shared, task }
    }

    /// Per rank, its counters and state.
    pub fn stats(&self) -> Vec<SubscriberStats> {
        let mut v = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ranks
            .clone();
        if self.shared.stopped.load(Ordering::Acquire) {
            for s in &mut v {
                s.state = SubscriberState::Stopped;
            }
        }
        v
    }

    /// Its worker's polls and failed polls so far.
    pub fn polls(&self) -> (u64, u64) {
        let c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.ranks.first().map_or((0, 0), |r| (r.polls, r.poll_errors))
    }

    /// Stops it; once this returns no event of it reaches the sink. Blocks for at most one
    /// send in progress (call off the async runtime, as for the ZMQ subscribers).
    pub fn stop(self) {
        {
            let _wait = self
                .shared
                .sending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.stopped.store(true, Ordering::Release);
        }
        self.task.abort();
    }
}

impl Drop for TrtPoller {
    /// Dropped without [`stop`](Self::stop) (its owner gone): no more polls.
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Run {
    url: String,
    client: WorkerClient,
    settings: PollSettings,
    interval: Duration,
    sink: SyncSender<RouterEvent>,
    shared: Arc<Shared>,
    worker: TrtWorker,
}

impl Run {
    fn stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    async fn run(mut self) {
        let mut wait = self.interval;
        let mut failing = false;
        let mut out = Vec::new();
        loop {
            tokio::time::sleep(wait).await;
            if self.stopped() {
                return;
            }
            let answer = self
                .client
                .post_bytes(
                    &self.url,
                    "/kv_cache_events",
                    "",
                    &[],
                    self.settings.max_bytes,
                    self.settings.timeout,
                )
                .await;
            let result = match answer {
                Ok(body) => self
                    .worker
                    .apply_body(&body, &mut out)
                    .map_err(|e| format!("answer is not a JSON array of events: {e}")),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(seen) => {
                    if failing {
                        tracing::info!(url = %self.url, "TensorRT-LLM KV events answered again");
                    }
                    failing = false;
                    wait = self.interval;
                    self.count(true, &seen);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(url = %self.url, "polling TensorRT-LLM KV events failed, backing off: {e}");
                    }
                    failing = true;
                    wait = (wait * 2).min(MAX_BACKOFF).max(self.interval);
                    self.count(false, &[]);
                }
            }
            if !self.send(&mut out).await {
                return;
            }
        }
    }

    /// Sends `out` to the index queue in order, waiting while it is full; false when stopped
    /// or the queue is gone. `out` is empty afterwards.
    async fn send(&self, out: &mut Vec<RouterEvent>) -> bool {
        let mut queue: VecDeque<RouterEvent> = out.drain(..).collect();
        let mut waits = 0u64;
        let sent = loop {
            {
                let _g = self
                    .shared
                    .sending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if self.stopped() {
                    break false;
                }
                while let Some(ev) = queue.pop_front() {
                    match self.sink.try_send(ev) {
                        Ok(()) => {}
                        Err(TrySendError::Full(ev)) => {
                            queue.push_front(ev);
                            break;
                        }
                        Err(TrySendError::Disconnected(_)) => return false,
                    }
                }
                if queue.is_empty() {
                    break true;
                }
            }
            waits += 1;
            tokio::time::sleep(FULL_QUEUE_WAIT).await;
        };
        if waits > 0 {
            let mut c = self
                .shared
                .counters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for r in &mut c.ranks {
                r.backpressure += waits;
            }
        }
        sent
    }

    /// Copies the converter's counters into each rank's [`SubscriberStats`].
    fn count(&self, ok: bool, seen: &[bool]) {
        let ws = self.worker.stats();
        let mut c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (i, (s, rank)) in c.ranks.iter_mut().zip(self.worker.ranks()).enumerate() {
            let t = rank.stats();
            s.polls += 1;
            if !ok {
                s.poll_errors += 1;
            }
            if seen.get(i).copied().unwrap_or(false) {
                s.applied += 1;
                s.formats.trtllm += 1;
            }
            s.received = t.events_in;
            s.gaps = t.gaps;
            s.restarts = t.restarts;
            s.cleared = t.convert.cleared;
            s.window_ignored = t.window_ignored;
            s.decode_errors = ws.decode_errors;
            s.skipped_events = t.unknown_events + t.malformed + ws.skipped;
            s.filtered = t.window_ignored
                + t.partial_blocks
                + t.extra_id_blocks
                + t.unknown_level
                + t.orphans
                + t.convert.dropped_non_full_attention
                + t.convert.self_referencing
                + t.convert.empty;
            s.events_out = t.convert.events_out;
            s.next_seq = t.next_event_id;
            if ok {
                s.state = SubscriberState::Live;
            }
        }
    }
}
