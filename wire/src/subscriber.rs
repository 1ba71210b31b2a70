//! ZMQ subscriber of one worker rank's KV events, with gap detection and replay
//! (`kv-event-wire.md` §2.1, `dynamo-router-spec.md` §3.2 and §3.4; issue 3 item 4).
//!
//! Two threads per subscriber:
//!
//! * **reader** — owns the SUB socket (topic prefix filter; connect, or bind when the engine
//!   connects as vLLM does for non-wildcard endpoints). It moves raw messages into a bounded
//!   queue of `queue_capacity`; when the queue is full the message is dropped and counted. A
//!   dropped message is a missing sequence number, so the processor treats it as a gap.
//!   libzmq reconnects on connection loss; heartbeats detect a silent peer.
//! * **processor** — tracks the publisher's sequence number and converts batches in order:
//!   * `seq == next`: apply;
//!   * `seq > next` (gap, or a late join whose first seq is above 0): fetch `[next, ...]` from
//!     the engine's replay ROUTER (DEALER; both reply layouts; end marker seq −1), apply them in
//!     order, then skip live batches already covered;
//!   * replay impossible (no endpoint, timeout) or incomplete (the ring no longer holds `next`):
//!     emit a core `Cleared` event for the worker (stale state routes worse than none), then
//!     continue with whatever replay returned and the live stream;
//!   * a live seq not above the previous live seq means the publisher restarted: `Cleared`, and
//!     the new stream is followed from its first message (replaying from 0 if that is above 0);
//!   * nothing applied yet and the socket idle (slow joiner: the engine published before our
//!     subscription reached it, and may not publish again): probe the replay ring from 0,
//!     backing off from 200 ms to 30 s.
//!
//! Converted [`RouterEvent`]s go to the caller's `SyncSender` (blocking: the caller's
//! backpressure fills our bounded queue, whose drops are then recovered by replay).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};

use crate::convert::Converter;
use crate::engine::{decode_batch, DecodeStats};
use crate::frame::{split_message, split_replay_reply, ReplayReply};
use crate::WireError;

/// How long the replay socket may stay silent before the replay counts as failed.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
/// First replay probe for batches published before the subscription took effect.
const FIRST_PROBE: Duration = Duration::from_millis(200);
/// Longest wait between such probes while nothing has arrived.
const MAX_PROBE_GAP: Duration = Duration::from_secs(30);
/// Poll interval of both threads for noticing `stop`.
const TICK_MS: i64 = 50;

/// Subscriber settings.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The worker rank whose events these are (its `dp_rank` must match the batches').
    pub worker: WorkerWithDpRank,
    /// The engine's PUB endpoint to connect to, or our address to bind when `bind`.
    pub endpoint: String,
    /// The engine's replay ROUTER, if it has one (`replay_endpoint` of its kv-events config).
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (`""` = all).
    pub topic: String,
    /// Bind instead of connect (vLLM connects when its endpoint has no wildcard).
    pub bind: bool,
    /// The engine's block size in tokens; stores of another size are dropped.
    pub block_size: u32,
    /// Raw messages buffered between socket and converter; beyond it they are dropped (gap).
    pub queue_capacity: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            worker: WorkerWithDpRank::default(),
            endpoint: "tcp://127.0.0.1:5557".into(),
            replay_endpoint: None,
            topic: String::new(),
            bind: false,
            block_size: 16,
            queue_capacity: 10_000,
        }
    }
}

/// The endpoint of data-parallel rank `rank` given rank 0's (vLLM: `port + rank` for tcp,
/// `<endpoint>_dp<rank>` otherwise; `kv-event-wire.md` §2.1).
pub fn dp_endpoint(base: &str, rank: u32) -> String {
    if rank == 0 {
        return base.to_owned();
    }
    if let Some(rest) = base.strip_prefix("tcp://") {
        if let Some((host, port)) = rest.rsplit_once(':') {
            if let Ok(p) = port.parse::<u32>() {
                return format!("tcp://{host}:{}", p + rank);
            }
        }
    }
    format!("{base}_dp{rank}")
}

/// Per-worker counters, totals since start. Batches = engine `KVEventBatch` messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Live messages read from the SUB socket.
    pub received: u64,
    /// Batches decoded and converted (live or replayed).
    pub applied: u64,
    /// Live messages dropped because the queue was full (recovered like gaps).
    pub dropped: u64,
    /// Sequence gaps detected (including late joins and drops).
    pub gaps: u64,
    /// Gaps fully recovered by replay.
    pub recovered: u64,
    /// Times the worker was cleared (replay impossible or incomplete, publisher restart).
    pub cleared: u64,
    /// Publisher restarts detected (sequence went back).
    pub restarts: u64,
    /// Batches applied from replay.
    pub replayed: u64,
    /// Live duplicates skipped (already applied from replay).
    pub duplicates: u64,
    /// Messages with wrong frame counts or a bad sequence frame.
    pub bad_frames: u64,
    /// Payloads that are not a decodable batch.
    pub decode_errors: u64,
    /// Events skipped inside decodable batches (unknown tag or malformed fields).
    pub skipped_events: u64,
    /// Unknown fields skipped.
    pub unknown_fields: u64,
    /// Engine events dropped by the converter's filters (group, locality, block size,
    /// self-reference, empty) plus whole batches for another rank.
    pub filtered: u64,
    /// Router events sent to the sink.
    pub events_out: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    applied: AtomicU64,
    dropped: AtomicU64,
    gaps: AtomicU64,
    recovered: AtomicU64,
    cleared: AtomicU64,
    restarts: AtomicU64,
    replayed: AtomicU64,
    duplicates: AtomicU64,
    bad_frames: AtomicU64,
    decode_errors: AtomicU64,
    skipped_events: AtomicU64,
    unknown_fields: AtomicU64,
    filtered: AtomicU64,
    events_out: AtomicU64,
    /// 1 + the highest sequence number the reader dropped (0 = none): lets the processor
    /// recover a dropped tail even when no later message arrives to reveal the gap.
    dropped_seq_plus1: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A running subscriber. Dropping it stops it too.
pub struct KvEventSubscriber {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    endpoint: String,
}

impl KvEventSubscriber {
    /// Opens the SUB socket and starts the reader and processor threads.
    ///
    /// Errors: [`WireError::Zmq`] when the endpoint cannot be bound/connected,
    /// [`WireError::Config`] for a zero block size.
    pub fn start(
        config: SubscriberConfig,
        sink: SyncSender<RouterEvent>,
    ) -> Result<Self, WireError> {
        if config.block_size == 0 {
            return Err(WireError::Config("block_size must be > 0".into()));
        }
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_rcvhwm(100_000)?;
        sub.set_linger(0)?;
        sub.set_reconnect_ivl(100)?;
        sub.set_reconnect_ivl_max(5_000)?;
        sub.set_heartbeat_ivl(1_000)?;
        sub.set_heartbeat_timeout(5_000)?;
        sub.set_subscribe(config.topic.as_bytes())?;
        let endpoint = if config.bind {
            let addr = match config.endpoint.strip_suffix(":0") {
                Some(h) if config.endpoint.starts_with("tcp://") => format!("{h}:*"),
                _ => config.endpoint.clone(),
            };
            sub.bind(&addr)?;
            sub.get_last_endpoint()?
                .unwrap_or_else(|_| config.endpoint.clone())
        } else {
            sub.connect(&config.endpoint)?;
            config.endpoint.clone()
        };

        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(config.queue_capacity.max(1));

        let reader = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("kv-sub-{}", config.worker))
                .spawn(move || read_loop(sub, tx, stop, counters))
                .map_err(|_| WireError::Thread("subscriber reader"))?
        };
        let processor = {
            let proc = Processor {
                converter: Converter::new(config.worker, config.block_size),
                topic: config.topic.into_bytes(),
                replay_endpoint: config.replay_endpoint,
                ctx,
                sink,
                counters: counters.clone(),
                stop: stop.clone(),
                next: None,
                last_live: None,
                probe_at: Instant::now() + FIRST_PROBE,
                probe_gap: FIRST_PROBE,
                out: Vec::new(),
            };
            std::thread::Builder::new()
                .name(format!("kv-conv-{}", config.worker))
                .spawn(move || proc.run(rx))
                .map_err(|_| WireError::Thread("subscriber processor"))?
        };
        Ok(Self {
            stop,
            counters,
            threads: vec![reader, processor],
            endpoint,
        })
    }

    /// The endpoint in use (the resolved address when bound to port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SubscriberStats {
        let c = &*self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SubscriberStats {
            received: g(&c.received),
            applied: g(&c.applied),
            dropped: g(&c.dropped),
            gaps: g(&c.gaps),
            recovered: g(&c.recovered),
            cleared: g(&c.cleared),
            restarts: g(&c.restarts),
            replayed: g(&c.replayed),
            duplicates: g(&c.duplicates),
            bad_frames: g(&c.bad_frames),
            decode_errors: g(&c.decode_errors),
            skipped_events: g(&c.skipped_events),
            unknown_fields: g(&c.unknown_fields),
            filtered: g(&c.filtered),
            events_out: g(&c.events_out),
        }
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for KvEventSubscriber {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn read_loop(
    sub: zmq::Socket,
    tx: SyncSender<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    while !stop.load(Ordering::Relaxed) {
        match sub.poll(zmq::POLLIN, TICK_MS) {
            Ok(n) if n > 0 => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::error!("SUB poll failed: {e}");
                return;
            }
        }
        // Drain everything readable before polling again.
        loop {
            let frames = match sub.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::error!("SUB recv failed: {e}");
                    return;
                }
            };
            inc(&counters.received);
            match tx.try_send(frames) {
                Ok(()) => {}
                Err(TrySendError::Full(frames)) => {
                    inc(&counters.dropped);
                    if let Some(seq) = frames
                        .get(1)
                        .and_then(|f| <[u8; 8]>::try_from(f.as_slice()).ok())
                    {
                        let seq = u64::from_be_bytes(seq);
                        counters
                            .dropped_seq_plus1
                            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
                    }
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

struct Processor {
    converter: Converter,
    topic: Vec<u8>,
    replay_endpoint: Option<String>,
    ctx: zmq::Context,
    sink: SyncSender<RouterEvent>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Next sequence number to apply; `None` before the first message (or after a restart).
    next: Option<u64>,
    /// Last sequence number seen on the live socket.
    last_live: Option<u64>,
    /// When to next ask the replay ring for batches published before we joined.
    probe_at: Instant,
    probe_gap: Duration,
    out: Vec<RouterEvent>,
}

/// The sink is gone: stop processing.
struct SinkClosed;

impl Processor {
    fn run(mut self, rx: Receiver<Vec<Vec<u8>>>) {
        while !self.stop.load(Ordering::Relaxed) {
            match rx.recv_timeout(Duration::from_millis(TICK_MS as u64)) {
                Ok(frames) => {
                    if self.live(&frames).is_err() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.recover_dropped_tail().is_err() || self.probe_join().is_err() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn live(&mut self, frames: &[Vec<u8>]) -> Result<(), SinkClosed> {
        let msg = match split_message(frames) {
            Ok(m) if m.topic.starts_with(&self.topic) => m,
            Ok(_) | Err(_) => {
                inc(&self.counters.bad_frames);
                tracing::warn!(worker = %self.converter.worker(), "malformed KV event message ignored");
                return Ok(());
            }
        };
        let s = msg.seq;
        if self.last_live.is_some_and(|last| s <= last) {
            inc(&self.counters.restarts);
            tracing::warn!(worker = %self.converter.worker(), seq = s, "publisher restarted (sequence went back): clearing worker");
            self.clear()?;
            self.next = None;
            self.counters.dropped_seq_plus1.store(0, Ordering::Relaxed);
        }
        self.last_live = Some(s);
        let next = match self.next {
            None if s == 0 => 0,
            None => {
                // Late join: fetch what was published before we connected.
                inc(&self.counters.gaps);
                self.recover(0, s)?;
                self.next.unwrap_or(s)
            }
            Some(n) if s > n => {
                inc(&self.counters.gaps);
                tracing::warn!(worker = %self.converter.worker(), expected = n, got = s, "sequence gap");
                self.recover(n, s)?;
                self.next.unwrap_or(s)
            }
            Some(n) => n,
        };
        if s < next {
            inc(&self.counters.duplicates);
            return Ok(());
        }
        self.apply(msg.payload)?;
        self.next = Some(s + 1);
        Ok(())
    }

    /// Slow joiner: batches published before our subscription reached the publisher never
    /// arrive live, and nothing reveals them until the engine publishes again — possibly
    /// never, for an idle worker. While no batch has been applied, ask the replay ring now and
    /// then (200 ms after start, then backing off to every 30 s).
    fn probe_join(&mut self) -> Result<(), SinkClosed> {
        if self.next.is_some() || Instant::now() < self.probe_at {
            return Ok(());
        }
        self.probe_gap = (self.probe_gap * 2).min(MAX_PROBE_GAP);
        self.probe_at = Instant::now() + self.probe_gap;
        let Some(ep) = self.replay_endpoint.clone() else {
            return Ok(());
        };
        let last = match fetch_replay(&self.ctx, &ep, 0) {
            Ok((batches, _)) => batches.last().map(|b| b.0),
            Err(_) => None,
        };
        match last {
            Some(last) => {
                inc(&self.counters.gaps);
                tracing::info!(worker = %self.converter.worker(), last, "batches published before we joined: replaying");
                self.recover(0, last + 1)
            }
            None => Ok(()),
        }
    }

    /// The queue is idle but the reader dropped a batch we have not applied: a gap nobody
    /// else will reveal. Replay up to and including it.
    fn recover_dropped_tail(&mut self) -> Result<(), SinkClosed> {
        let d = self.counters.dropped_seq_plus1.load(Ordering::Relaxed);
        match self.next {
            Some(n) if d > n => {
                inc(&self.counters.gaps);
                tracing::warn!(worker = %self.converter.worker(), expected = n, dropped = d - 1, "dropped batches: replaying");
                self.recover(n, d)
            }
            _ => Ok(()),
        }
    }

    fn clear(&mut self) -> Result<(), SinkClosed> {
        self.converter.cleared(&mut self.out);
        self.flush()?;
        inc(&self.counters.cleared);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkClosed> {
        // Blocking send with a stop check: a caller that stops reading cannot hang `stop()`.
        for mut ev in self.out.drain(..) {
            loop {
                match self.sink.try_send(ev) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) => {
                        if self.stop.load(Ordering::Relaxed) {
                            return Err(SinkClosed);
                        }
                        ev = back;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(TrySendError::Disconnected(_)) => return Err(SinkClosed),
                }
            }
            inc(&self.counters.events_out);
        }
        Ok(())
    }

    fn apply(&mut self, payload: &[u8]) -> Result<(), SinkClosed> {
        let mut ds = DecodeStats::default();
        match decode_batch(payload, &mut ds) {
            Ok(batch) => {
                let before = self.converter.stats();
                self.converter.convert_batch(&batch, &mut self.out);
                let after = self.converter.stats();
                let filtered = |s: &crate::ConvertStats| {
                    s.dropped_non_full_attention
                        + s.dropped_remote
                        + s.dropped_block_size
                        + s.dropped_wrong_rank
                        + s.self_referencing
                        + s.empty
                };
                self.counters
                    .filtered
                    .fetch_add(filtered(&after) - filtered(&before), Ordering::Relaxed);
                self.flush()?;
                // Counted once its events are in the sink, so `applied` is a safe sync point.
                inc(&self.counters.applied);
            }
            Err(e) => {
                inc(&self.counters.decode_errors);
                tracing::warn!(worker = %self.converter.worker(), "undecodable KV event batch skipped: {e}");
            }
        }
        self.counters
            .skipped_events
            .fetch_add(ds.unknown_events + ds.malformed_events, Ordering::Relaxed);
        self.counters
            .unknown_fields
            .fetch_add(ds.unknown_fields, Ordering::Relaxed);
        self.flush()
    }

    /// Recovers `[from, live)` from the replay socket; sets `self.next` past what was applied.
    fn recover(&mut self, from: u64, live: u64) -> Result<(), SinkClosed> {
        let worker = self.converter.worker();
        let Some(ep) = self.replay_endpoint.clone() else {
            tracing::warn!(%worker, from, live, "no replay endpoint: clearing worker");
            self.clear()?;
            self.next = Some(live);
            return Ok(());
        };
        let (batches, ended) = match fetch_replay(&self.ctx, &ep, from) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%worker, "replay request failed: {e}");
                (Vec::new(), false)
            }
        };
        // Complete = ended, starts exactly at `from`, contiguous, and reaches the live batch.
        let contiguous = batches.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        let reaches = batches.last().is_some_and(|b| b.0 + 1 >= live);
        let complete =
            ended && contiguous && reaches && batches.first().is_some_and(|b| b.0 == from);
        if complete {
            inc(&self.counters.recovered);
            tracing::info!(%worker, from, n = batches.len(), "gap recovered by replay");
        } else {
            tracing::warn!(%worker, from, live, got = batches.len(), ended, "replay incomplete: clearing worker");
            self.clear()?;
        }
        let mut next = if complete { from } else { 0 };
        for (seq, payload) in &batches {
            if *seq < next {
                continue;
            }
            self.apply(payload)?;
            inc(&self.counters.replayed);
            next = seq + 1;
        }
        self.next = Some(next.max(if complete { from } else { live }));
        Ok(())
    }
}

/// One replayed batch: its sequence number and payload.
pub type ReplayedBatch = (u64, Vec<u8>);

/// Asks a replay ROUTER for every buffered batch with `seq >= from`. Returns the batches sorted
/// by seq and whether the end marker arrived before [`REPLAY_TIMEOUT`] of silence.
pub fn fetch_replay(
    ctx: &zmq::Context,
    endpoint: &str,
    from: u64,
) -> Result<(Vec<ReplayedBatch>, bool), WireError> {
    let dealer = ctx.socket(zmq::DEALER)?;
    dealer.set_linger(0)?;
    dealer.set_rcvhwm(0)?;
    dealer.connect(endpoint)?;
    let start = from.to_be_bytes();
    let req: [&[u8]; 2] = [b"", &start];
    dealer.send_multipart(req, 0)?;
    let mut out: Vec<ReplayedBatch> = Vec::new();
    let mut ended = false;
    let mut deadline = Instant::now() + REPLAY_TIMEOUT;
    while !ended {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || dealer.poll(zmq::POLLIN, left.as_millis() as i64)? == 0 {
            break;
        }
        let frames = dealer.recv_multipart(0)?;
        match split_replay_reply(&frames) {
            Ok(ReplayReply::Batch { seq, payload }) if seq >= from => {
                out.push((seq, payload.to_vec()))
            }
            Ok(ReplayReply::Batch { .. }) => {}
            Ok(ReplayReply::End) => ended = true,
            Err(e) => tracing::warn!("malformed replay reply ignored: {e}"),
        }
        deadline = Instant::now() + REPLAY_TIMEOUT;
    }
    out.sort_by_key(|b| b.0);
    out.dedup_by_key(|b| b.0);
    Ok((out, ended))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dp_endpoints() {
        assert_eq!(dp_endpoint("tcp://*:5557", 0), "tcp://*:5557");
        assert_eq!(dp_endpoint("tcp://10.0.0.1:5557", 2), "tcp://10.0.0.1:5559");
        assert_eq!(dp_endpoint("inproc://kv", 1), "inproc://kv_dp1");
        assert_eq!(dp_endpoint("ipc:///tmp/kv", 3), "ipc:///tmp/kv_dp3");
    }
}
