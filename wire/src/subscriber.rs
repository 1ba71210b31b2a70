//! ZMQ subscriber of one worker rank's KV events, with gap detection and bounded replay
//! (`kv-event-wire.md` §2.1, `dynamo-router-spec.md` §3.2 and §3.4; issue 3 item 4, issue 13
//! item 3).
//!
//! Two threads per subscriber, and one libzmq context (one I/O thread) shared by every
//! subscriber of the process:
//!
//! * **reader** — owns the SUB socket (topic prefix filter; connect, or bind when the engine
//!   connects as vLLM does for non-wildcard endpoints). It moves raw messages into a bounded
//!   queue of `queue_capacity` messages and at most the *hard ceiling* of bytes (below); when
//!   the queue is full the message is dropped and counted (`dropped`). A message larger than
//!   `max_frame_bytes` (all frames together) is dropped and counted (`oversize`). Either drop
//!   is a missing sequence number, so the processor treats it as a gap. libzmq reconnects on
//!   connection loss; heartbeats detect a silent peer.
//! * **processor** — tracks the publisher's sequence number and converts batches in order:
//!   * `seq == next`: apply;
//!   * `seq > next` (gap, drop, or a late join whose first seq is above 0): replay `[next, seq)`
//!     from the engine's replay ROUTER (DEALER; both reply layouts; end marker seq −1), then
//!     apply the live batch;
//!   * `seq < next` after a replay that started at or below `seq` (`replay_floor`): a live
//!     duplicate of a replayed batch, skipped (`duplicates`). Below the floor the replay was
//!     bogus (or the publisher restarted): count a replay failure, `Cleared`, and follow the
//!     live stream from `seq` without replaying again;
//!   * a live seq not above the previous live seq means the publisher restarted: `Cleared`, and
//!     the new stream is followed from its first message (replaying from 0 if that is above 0);
//!   * nothing applied yet and the socket idle (slow joiner: the engine published before our
//!     subscription reached it, and may not publish again): probe the replay ring from 0,
//!     backing off from 200 ms to 30 s.
//!
//! **Replay bounds** ([`ReplayLimits`]). A gap replay asks for `[from, live)` and keeps only
//! batches in that range (those at or past `live` arrive live anyway); it stops as soon as
//! every seq of the range is in hand. It *fails* on a duplicated seq, a reply over
//! `max_frame_bytes`, more than `max_batches` replies or `max_bytes` read in total, the total
//! `deadline` passing, `silence` without a reply, or an end marker before the range is complete
//! (the ring no longer holds it). A failed replay applies nothing: the worker is cleared (core
//! `Cleared` event; stale state routes worse than none), `replay_failures` counts it, and the
//! live stream resumes at `live`. Without a replay endpoint a gap just clears. The join probe
//! (no upper bound known) must get an end marker within the same limits and contiguous seqs;
//! a ring that no longer starts at 0 clears the worker first (counted as a failure too), and a
//! probe that fails applies nothing (nothing to clear) and is retried with back-off. Sequence
//! numbers outside the asked range are never applied.
//!
//! **Memory**: each queued or replayed message is at most `max_frame_bytes`; the queue holds at
//! most the hard ceiling `max(4 × max_frame_bytes, 64 MiB)` bytes, a replay at most `max_bytes`;
//! libzmq's `ZMQ_MAXMSGSIZE` on both sockets is the hard ceiling too (a peer sending a larger
//! frame is disconnected).
//!
//! **State** ([`SubscriberState`], in [`SubscriberStats`]): `joining` (nothing applied yet),
//! `live`, `replaying` (a replay or join probe is running; live messages wait in the queue),
//! `stopped` (threads ended: `stop`, the sink closed, or the socket failed).
//!
//! Converted [`RouterEvent`]s go to the caller's `SyncSender` in order, from the processor
//! thread only (blocking: the caller's backpressure fills our bounded queue, whose drops are
//! then recovered by replay; each wait for room is counted in `backpressure`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};

use crate::convert::Converter;
use crate::engine::{decode_batch, DecodeStats};
use crate::frame::{split_message, split_replay_reply, ReplayReply, END_SEQ};
use crate::WireError;

/// Default [`ReplayLimits::silence`]: how long the replay socket may stay silent.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
/// Default [`SubscriberConfig::max_frame_bytes`]: 4 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 << 20;
/// Floor of the hard memory ceiling (`ZMQ_MAXMSGSIZE`, queued bytes): 64 MiB.
const MIN_HARD_CEILING: usize = 64 << 20;
/// Frames kept of one message; a live message has 3, a replay reply at most 4.
const MAX_PARTS: usize = 8;
/// First replay probe for batches published before the subscription took effect.
const FIRST_PROBE: Duration = Duration::from_millis(200);
/// Longest wait between such probes while nothing has arrived.
const MAX_PROBE_GAP: Duration = Duration::from_secs(30);
/// Poll interval of both threads for noticing `stop`.
const TICK_MS: i64 = 50;

/// Bounds on one replay (a gap replay or the join probe). Exceeding any of them fails the
/// replay: the worker is cleared and the live stream resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// Most reply messages (batches, in range or not) read in one replay. Default 100 000
    /// (vLLM's ring holds 10 000).
    pub max_batches: usize,
    /// Most bytes (all frames of all replies) read in one replay. Default 64 MiB.
    pub max_bytes: usize,
    /// Total wall time one replay may take, from the request; not reset by replies.
    /// Default 10 s.
    pub deadline: Duration,
    /// Longest wait for the next reply. Default 2 s ([`REPLAY_TIMEOUT`]).
    pub silence: Duration,
}

impl Default for ReplayLimits {
    fn default() -> Self {
        Self {
            max_batches: 100_000,
            max_bytes: 64 << 20,
            deadline: Duration::from_secs(10),
            silence: REPLAY_TIMEOUT,
        }
    }
}

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
    /// Largest message accepted, in bytes (all frames together), live or replayed; a larger
    /// live message is dropped (`oversize`, then a gap), a larger replay reply fails the
    /// replay. Must be > 0. Default 4 MiB ([`DEFAULT_MAX_FRAME_BYTES`]).
    pub max_frame_bytes: usize,
    /// Bounds on every replay.
    pub replay: ReplayLimits,
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
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            replay: ReplayLimits::default(),
        }
    }
}

/// The hard per-subscriber memory ceiling in bytes: `ZMQ_MAXMSGSIZE` of both sockets and the
/// most bytes queued between reader and processor.
fn hard_ceiling(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(4).max(MIN_HARD_CEILING)
}

/// The one libzmq context of every subscriber in the process (one I/O thread in all).
fn context() -> zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new).clone()
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

/// What a subscriber is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubscriberState {
    /// Nothing applied yet (waiting for the first live batch or a join probe).
    #[default]
    Joining,
    /// Following the live stream.
    Live,
    /// Fetching (or applying) a replay; live messages wait in the queue.
    Replaying,
    /// Threads ended (`stop`, the sink closed, or the socket failed): no more events.
    Stopped,
}

impl SubscriberState {
    /// `"joining"`, `"live"`, `"replaying"` or `"stopped"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Live => "live",
            Self::Replaying => "replaying",
            Self::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Joining,
            1 => Self::Live,
            2 => Self::Replaying,
            _ => Self::Stopped,
        }
    }
}

impl std::fmt::Display for SubscriberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-worker counters, totals since start, and the current state. Batches = engine
/// `KVEventBatch` messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Live messages read from the SUB socket (including those dropped afterwards).
    pub received: u64,
    /// Batches decoded and converted (live or replayed).
    pub applied: u64,
    /// Live messages dropped because the queue was full (recovered like gaps).
    pub dropped: u64,
    /// Live messages dropped because they exceed `max_frame_bytes` (handled like gaps).
    pub oversize: u64,
    /// Sequence gaps detected (including late joins, drops and join probes that found
    /// batches).
    pub gaps: u64,
    /// Gaps fully recovered by replay.
    pub recovered: u64,
    /// Replays that did not recover their whole range (limits, deadline, silence, duplicated
    /// or missing seqs, a ring that lost the range) and replays shown bogus by a later live
    /// seq below them; each clears the worker (except a failed join probe, which applied
    /// nothing) and resumes from the live stream.
    pub replay_failures: u64,
    /// Times the worker was cleared (no replay endpoint, failed replay, publisher restart).
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
    /// Times an event had to wait because the sink was full.
    pub backpressure: u64,
    /// The next publisher sequence number expected; `None` before the first batch applied
    /// (and right after a publisher restart).
    pub next_seq: Option<u64>,
    /// What the subscriber is doing now.
    pub state: SubscriberState,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    applied: AtomicU64,
    dropped: AtomicU64,
    oversize: AtomicU64,
    gaps: AtomicU64,
    recovered: AtomicU64,
    replay_failures: AtomicU64,
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
    backpressure: AtomicU64,
    /// `next` of the processor, valid when `has_next`.
    next_seq: AtomicU64,
    has_next: AtomicBool,
    /// [`SubscriberState`] as `u8`.
    state: AtomicU8,
    /// Bytes of the messages in the reader → processor queue.
    queued_bytes: AtomicUsize,
    /// 1 + the highest sequence number the reader dropped (0 = none): lets the processor
    /// recover a dropped tail even when no later message arrives to reveal the gap.
    dropped_seq_plus1: AtomicU64,
}

impl Counters {
    fn set_state(&self, s: SubscriberState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// A message with this seq frame (if it has one) was dropped by the reader.
    fn note_dropped(&self, seq: Option<u64>) {
        if let Some(seq) = seq.filter(|&s| s != END_SEQ) {
            self.dropped_seq_plus1.fetch_max(seq + 1, Ordering::Relaxed);
        }
    }
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
    /// [`WireError::Config`] for a zero block size or a zero `max_frame_bytes`.
    pub fn start(
        config: SubscriberConfig,
        sink: SyncSender<RouterEvent>,
    ) -> Result<Self, WireError> {
        if config.block_size == 0 {
            return Err(WireError::Config("block_size must be > 0".into()));
        }
        if config.max_frame_bytes == 0 {
            return Err(WireError::Config("max_frame_bytes must be > 0".into()));
        }
        let ceiling = hard_ceiling(config.max_frame_bytes);
        let ctx = context();
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_rcvhwm(100_000)?;
        sub.set_linger(0)?;
        sub.set_maxmsgsize(ceiling.min(i64::MAX as usize) as i64)?;
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
            let reader = Reader {
                sub,
                tx,
                stop: stop.clone(),
                counters: counters.clone(),
                max_frame_bytes: config.max_frame_bytes,
                max_queued_bytes: ceiling,
            };
            std::thread::Builder::new()
                .name(format!("kv-sub-{}", config.worker))
                .spawn(move || reader.run())
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
                max_frame_bytes: config.max_frame_bytes,
                ceiling,
                limits: config.replay,
                next: None,
                last_live: None,
                replay_floor: None,
                probe_at: Instant::now() + FIRST_PROBE,
                probe_gap: FIRST_PROBE,
                out: Vec::new(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("kv-conv-{}", config.worker))
                .spawn(move || proc.run(rx));
            match spawned {
                Ok(h) => h,
                Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    let _ = reader.join();
                    return Err(WireError::Thread("subscriber processor"));
                }
            }
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

    /// A snapshot of the counters and state.
    pub fn stats(&self) -> SubscriberStats {
        let c = &*self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SubscriberStats {
            received: g(&c.received),
            applied: g(&c.applied),
            dropped: g(&c.dropped),
            oversize: g(&c.oversize),
            gaps: g(&c.gaps),
            recovered: g(&c.recovered),
            replay_failures: g(&c.replay_failures),
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
            backpressure: g(&c.backpressure),
            next_seq: c.has_next.load(Ordering::Relaxed).then(|| g(&c.next_seq)),
            state: SubscriberState::from_u8(c.state.load(Ordering::Relaxed)),
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
        self.counters.set_state(SubscriberState::Stopped);
    }
}

impl Drop for KvEventSubscriber {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One multipart message read with bounds.
enum Received {
    /// The frames and their total size in bytes.
    Frames(Vec<Vec<u8>>, usize),
    /// Over the size limit (discarded); the seq frame (index 1) if it was 8 bytes.
    Oversize(Option<u64>),
    /// More than [`MAX_PARTS`] frames (discarded).
    TooManyFrames,
}

/// Reads one whole multipart message (the first part with `flags`), keeping at most
/// `max_bytes` in all and [`MAX_PARTS`] frames; the rest of a larger message is read and
/// discarded.
fn recv_bounded(sock: &zmq::Socket, flags: i32, max_bytes: usize) -> zmq::Result<Received> {
    let mut msg = zmq::Message::new();
    sock.recv(&mut msg, flags)?;
    let mut frames: Vec<Vec<u8>> = Vec::with_capacity(3);
    let mut total = 0usize;
    let mut seq = None;
    let (mut oversize, mut too_many) = (false, false);
    let mut index = 0;
    loop {
        total = total.saturating_add(msg.len());
        if index == 1 {
            seq = <[u8; 8]>::try_from(&msg[..]).ok().map(u64::from_be_bytes);
        }
        oversize |= total > max_bytes;
        too_many |= index >= MAX_PARTS;
        if oversize || too_many {
            frames = Vec::new();
        } else {
            frames.push(msg.to_vec());
        }
        if !msg.get_more() {
            break;
        }
        sock.recv(&mut msg, 0)?;
        index += 1;
    }
    Ok(if oversize {
        Received::Oversize(seq)
    } else if too_many {
        Received::TooManyFrames
    } else {
        Received::Frames(frames, total)
    })
}

/// The seq frame of a live message, if it has one.
fn live_seq(frames: &[Vec<u8>]) -> Option<u64> {
    frames
        .get(1)
        .and_then(|f| <[u8; 8]>::try_from(f.as_slice()).ok())
        .map(u64::from_be_bytes)
}

struct Reader {
    sub: zmq::Socket,
    tx: SyncSender<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    max_frame_bytes: usize,
    max_queued_bytes: usize,
}

impl Reader {
    fn run(self) {
        let c = &*self.counters;
        while !self.stop.load(Ordering::Relaxed) {
            match self.sub.poll(zmq::POLLIN, TICK_MS) {
                Ok(n) if n > 0 => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!("SUB poll failed: {e}");
                    return;
                }
            }
            // Drain everything readable before polling again.
            while !self.stop.load(Ordering::Relaxed) {
                let (frames, bytes) =
                    match recv_bounded(&self.sub, zmq::DONTWAIT, self.max_frame_bytes) {
                        Ok(Received::Frames(f, n)) => (f, n),
                        Ok(Received::Oversize(seq)) => {
                            inc(&c.received);
                            inc(&c.oversize);
                            c.note_dropped(seq);
                            tracing::warn!(
                                seq,
                                max = self.max_frame_bytes,
                                "KV event message over max_frame_bytes dropped"
                            );
                            continue;
                        }
                        Ok(Received::TooManyFrames) => {
                            inc(&c.received);
                            inc(&c.bad_frames);
                            continue;
                        }
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => {
                            tracing::error!("SUB recv failed: {e}");
                            return;
                        }
                    };
                inc(&c.received);
                if c.queued_bytes.load(Ordering::Relaxed) + bytes > self.max_queued_bytes {
                    inc(&c.dropped);
                    c.note_dropped(live_seq(&frames));
                    continue;
                }
                c.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
                match self.tx.try_send(frames) {
                    Ok(()) => {}
                    Err(TrySendError::Full(frames)) => {
                        c.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        inc(&c.dropped);
                        c.note_dropped(live_seq(&frames));
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
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
    max_frame_bytes: usize,
    /// `ZMQ_MAXMSGSIZE` of the replay socket.
    ceiling: usize,
    limits: ReplayLimits,
    /// Next sequence number to apply; `None` before the first message (or after a restart).
    next: Option<u64>,
    /// Last sequence number seen on the live socket.
    last_live: Option<u64>,
    /// Lowest seq of the last replay applied: a live seq below `next` is a duplicate of a
    /// replayed batch only if it is at least this; `None` = no replay to trust.
    replay_floor: Option<u64>,
    /// When to next ask the replay ring for batches published before we joined.
    probe_at: Instant,
    probe_gap: Duration,
    out: Vec<RouterEvent>,
}

/// The sink is gone or `stop` was asked: stop processing.
struct SinkClosed;

/// Why a replay brought nothing to apply.
enum ReplayError {
    /// `stop` was asked meanwhile.
    Stopped,
    /// Not a single reply before `silence` (the ring is not there or not answering).
    NoAnswer,
    /// The replay failed; the reason, for the log.
    Failed(String),
}

impl From<zmq::Error> for ReplayError {
    fn from(e: zmq::Error) -> Self {
        ReplayError::Failed(format!("replay socket: {e}"))
    }
}

impl Processor {
    fn run(mut self, rx: Receiver<Vec<Vec<u8>>>) {
        self.process(rx);
        self.counters.set_state(SubscriberState::Stopped);
        // The reader has no one to feed any more.
        self.stop.store(true, Ordering::Relaxed);
    }

    fn process(&mut self, rx: Receiver<Vec<Vec<u8>>>) {
        while !self.stop.load(Ordering::Relaxed) {
            match rx.recv_timeout(Duration::from_millis(TICK_MS as u64)) {
                Ok(frames) => {
                    let bytes = frames.iter().map(Vec::len).sum();
                    self.counters
                        .queued_bytes
                        .fetch_sub(bytes, Ordering::Relaxed);
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
            self.publish_state();
        }
    }

    /// Publishes `next` and the settled state (`Live` once a batch was applied).
    fn publish_state(&self) {
        let c = &*self.counters;
        if let Some(n) = self.next {
            c.next_seq.store(n, Ordering::Relaxed);
        }
        c.has_next.store(self.next.is_some(), Ordering::Relaxed);
        c.set_state(if self.next.is_some() {
            SubscriberState::Live
        } else {
            SubscriberState::Joining
        });
    }

    fn live(&mut self, frames: &[Vec<u8>]) -> Result<(), SinkClosed> {
        let msg = match split_message(frames) {
            Ok(m) if m.topic.starts_with(&self.topic) && m.seq != END_SEQ => m,
            Ok(_) | Err(_) => {
                inc(&self.counters.bad_frames);
                tracing::warn!(worker = %self.converter.worker(), "malformed KV event message ignored");
                return Ok(());
            }
        };
        let worker = self.converter.worker();
        let s = msg.seq;
        if self.last_live.is_some_and(|last| s <= last) {
            inc(&self.counters.restarts);
            tracing::warn!(%worker, seq = s, "publisher restarted (sequence went back): clearing worker");
            self.clear()?;
            self.next = None;
            self.replay_floor = None;
            self.counters.dropped_seq_plus1.store(0, Ordering::Relaxed);
        }
        self.last_live = Some(s);
        match self.next {
            None if s == 0 => {}
            None => {
                // Late join: fetch what was published before we connected.
                inc(&self.counters.gaps);
                self.recover(0, s)?;
            }
            Some(n) if s > n => {
                inc(&self.counters.gaps);
                tracing::warn!(%worker, expected = n, got = s, "sequence gap");
                self.recover(n, s)?;
            }
            Some(n) if s < n => {
                if self.replay_floor.is_some_and(|floor| s >= floor) {
                    inc(&self.counters.duplicates);
                    return Ok(());
                }
                // Below anything a replay gave us: that replay was bogus (or the publisher
                // restarted unseen). Trust the live stream, and do not replay again for it,
                // so a hostile ring cannot make us loop.
                inc(&self.counters.replay_failures);
                tracing::warn!(%worker, expected = n, got = s, floor = self.replay_floor,
                    "live sequence below the replayed range: replay was bogus or the publisher restarted; clearing worker, following the live stream");
                self.clear()?;
                self.replay_floor = None;
            }
            Some(_) => {}
        }
        self.apply(msg.payload)?;
        self.next = Some(s + 1);
        Ok(())
    }

    /// Slow joiner: batches published before our subscription reached the publisher never
    /// arrive live, and nothing reveals them until the engine publishes again — possibly
    /// never, for an idle worker. While no batch has been applied, ask the replay ring now and
    /// then (200 ms after start, then backing off to every 30 s). One fetch: the end marker
    /// must arrive within the limits and the seqs must be contiguous.
    fn probe_join(&mut self) -> Result<(), SinkClosed> {
        if self.next.is_some() || Instant::now() < self.probe_at {
            return Ok(());
        }
        self.probe_gap = (self.probe_gap * 2).min(MAX_PROBE_GAP);
        self.probe_at = Instant::now() + self.probe_gap;
        let Some(ep) = self.replay_endpoint.clone() else {
            return Ok(());
        };
        let worker = self.converter.worker();
        self.counters.set_state(SubscriberState::Replaying);
        let batches = match self.fetch(&ep, 0, None) {
            Ok(b) => b,
            Err(ReplayError::Stopped) => return Err(SinkClosed),
            Err(ReplayError::NoAnswer) => return Ok(()),
            Err(ReplayError::Failed(why)) => {
                // Nothing applied since start (or the last clear): nothing to clear.
                inc(&self.counters.replay_failures);
                tracing::warn!(%worker, "join probe failed, nothing applied: {why}");
                return Ok(());
            }
        };
        let (Some((&first, _)), Some((&last, _))) =
            (batches.first_key_value(), batches.last_key_value())
        else {
            return Ok(()); // the ring is empty: nothing was published
        };
        if last - first + 1 != batches.len() as u64 {
            inc(&self.counters.replay_failures);
            tracing::warn!(%worker, first, last, n = batches.len(), "join probe failed, nothing applied: sequence numbers not contiguous");
            return Ok(());
        }
        inc(&self.counters.gaps);
        if first == 0 {
            inc(&self.counters.recovered);
            tracing::info!(%worker, last, "batches published before we joined: replaying");
        } else {
            // The ring no longer holds the start of the stream.
            inc(&self.counters.replay_failures);
            tracing::warn!(%worker, first, last, "the replay ring lost the start of the stream: clearing worker, applying what it holds");
            self.clear()?;
        }
        for payload in batches.values() {
            self.apply(payload)?;
            inc(&self.counters.replayed);
        }
        self.replay_floor = Some(first);
        self.next = Some(last + 1);
        Ok(())
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
            let mut waited = false;
            loop {
                match self.sink.try_send(ev) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) => {
                        if !waited {
                            waited = true;
                            inc(&self.counters.backpressure);
                        }
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

    /// Recovers `[from, live)` from the replay socket. Afterwards `self.next == Some(live)`:
    /// either every batch of the range was applied in order, or none was and the worker was
    /// cleared.
    fn recover(&mut self, from: u64, live: u64) -> Result<(), SinkClosed> {
        let worker = self.converter.worker();
        if from >= live {
            self.next = Some(live);
            return Ok(());
        }
        let Some(ep) = self.replay_endpoint.clone() else {
            tracing::warn!(%worker, from, live, "no replay endpoint: clearing worker");
            self.clear()?;
            self.replay_floor = None;
            self.next = Some(live);
            return Ok(());
        };
        self.counters.set_state(SubscriberState::Replaying);
        match self.fetch(&ep, from, Some(live)) {
            Ok(batches) => {
                inc(&self.counters.recovered);
                tracing::info!(%worker, from, live, "gap recovered by replay");
                for payload in batches.values() {
                    self.apply(payload)?;
                    inc(&self.counters.replayed);
                }
                self.replay_floor = Some(from);
            }
            Err(ReplayError::Stopped) => return Err(SinkClosed),
            Err(ReplayError::NoAnswer) => {
                self.replay_failed(from, live, "no reply from the replay endpoint")?
            }
            Err(ReplayError::Failed(why)) => self.replay_failed(from, live, &why)?,
        }
        self.next = Some(live);
        Ok(())
    }

    fn replay_failed(&mut self, from: u64, live: u64, why: &str) -> Result<(), SinkClosed> {
        inc(&self.counters.replay_failures);
        tracing::warn!(worker = %self.converter.worker(), from, live, "replay failed: {why}; clearing worker, resuming from the live stream");
        self.replay_floor = None;
        self.clear()
    }

    /// Asks the replay ROUTER at `ep` for the batches from `from`, within [`ReplayLimits`]
    /// and `max_frame_bytes`. With `until`, returns exactly the batches `from..until` (once
    /// all are in hand; replies outside the range are read and ignored) or fails; without it
    /// (join probe), every batch at or above `from` up to the end marker.
    fn fetch(
        &self,
        ep: &str,
        from: u64,
        until: Option<u64>,
    ) -> Result<BTreeMap<u64, Vec<u8>>, ReplayError> {
        let l = &self.limits;
        let dealer = self.ctx.socket(zmq::DEALER)?;
        dealer.set_linger(0)?;
        // Unbounded so an honest ring's burst is not dropped; `max_bytes` bounds what we keep.
        dealer.set_rcvhwm(0)?;
        dealer.set_maxmsgsize(self.ceiling.min(i64::MAX as usize) as i64)?;
        dealer.connect(ep)?;
        let start = from.to_be_bytes();
        let req: [&[u8]; 2] = [b"", &start];
        dealer.send_multipart(req, 0)?;

        let deadline = Instant::now() + l.deadline;
        let mut quiet_until = Instant::now() + l.silence;
        let want = until.map(|u| u - from);
        let mut got: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let (mut replies, mut bytes) = (0usize, 0usize);
        let fail = |why: String| Err(ReplayError::Failed(why));
        loop {
            if want == Some(got.len() as u64) {
                return Ok(got);
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(ReplayError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return fail(format!(
                    "deadline of {:?} passed ({replies} replies, {bytes} bytes)",
                    l.deadline
                ));
            }
            if now >= quiet_until {
                if replies == 0 {
                    return Err(ReplayError::NoAnswer);
                }
                return fail(format!(
                    "no reply for {:?} and no end marker ({replies} replies)",
                    l.silence
                ));
            }
            let wait = deadline.min(quiet_until) - now;
            let wait_ms = (wait.as_millis() as i64).clamp(1, TICK_MS);
            if dealer.poll(zmq::POLLIN, wait_ms)? == 0 {
                continue;
            }
            let (mut frames, size) = match recv_bounded(&dealer, 0, self.max_frame_bytes)? {
                Received::Frames(f, n) => (f, n),
                Received::Oversize(_) => {
                    return fail(format!(
                        "a reply over max_frame_bytes ({})",
                        self.max_frame_bytes
                    ))
                }
                Received::TooManyFrames => (Vec::new(), 0),
            };
            quiet_until = Instant::now() + l.silence;
            bytes = bytes.saturating_add(size);
            let seq = match split_replay_reply(&frames) {
                Ok(ReplayReply::End) => {
                    if until.is_none() {
                        return Ok(got);
                    }
                    return fail(format!(
                        "end marker with {} of the {} batches asked for (the ring no longer holds them)",
                        got.len(),
                        want.unwrap_or_default()
                    ));
                }
                Ok(ReplayReply::Batch { seq, .. }) => Some(seq),
                Err(e) => {
                    tracing::warn!("malformed replay reply ignored: {e}");
                    None
                }
            };
            replies += 1;
            if replies > l.max_batches {
                return fail(format!("more than max_batches ({}) replies", l.max_batches));
            }
            if bytes > l.max_bytes {
                return fail(format!("more than max_bytes ({}) read", l.max_bytes));
            }
            let Some(seq) = seq else { continue };
            if seq < from || until.is_some_and(|u| seq >= u) {
                continue; // outside the range asked for: never applied
            }
            // The payload is the last frame in both layouts.
            let payload = frames.pop().unwrap_or_default();
            if got.insert(seq, payload).is_some() {
                return fail(format!("sequence number {seq} replayed twice"));
            }
        }
    }
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

    #[test]
    fn defaults_and_state_names() {
        let c = SubscriberConfig::default();
        assert_eq!(c.max_frame_bytes, 4 << 20);
        assert_eq!(
            c.replay,
            ReplayLimits {
                max_batches: 100_000,
                max_bytes: 64 << 20,
                deadline: Duration::from_secs(10),
                silence: Duration::from_secs(2),
            }
        );
        assert_eq!(hard_ceiling(c.max_frame_bytes), 64 << 20);
        assert_eq!(hard_ceiling(32 << 20), 128 << 20);
        assert_eq!(hard_ceiling(usize::MAX), usize::MAX);
        let all = [
            SubscriberState::Joining,
            SubscriberState::Live,
            SubscriberState::Replaying,
            SubscriberState::Stopped,
        ];
        let names: Vec<_> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["joining", "live", "replaying", "stopped"]);
        for s in all {
            assert_eq!(SubscriberState::from_u8(s as u8), s);
        }
        assert_eq!(SubscriberStats::default().state, SubscriberState::Joining);
        assert_eq!(SubscriberStats::default().next_seq, None);
    }

    #[test]
    fn config_errors() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let cfg = SubscriberConfig {
            max_frame_bytes: 0,
            ..Default::default()
        };
        assert!(matches!(
            KvEventSubscriber::start(cfg, tx.clone()),
            Err(WireError::Config(_))
        ));
        // Nothing listens there: the subscriber waits, joining, with no sequence yet.
        let cfg = SubscriberConfig {
            endpoint: "tcp://127.0.0.1:1".into(),
            ..Default::default()
        };
        let sub = KvEventSubscriber::start(cfg, tx).unwrap();
        let st = sub.stats();
        assert_eq!((st.state, st.next_seq), (SubscriberState::Joining, None));
        sub.stop();
    }
}
