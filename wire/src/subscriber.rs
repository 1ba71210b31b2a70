//! ZMQ subscriber of one worker rank's KV events, with gap detection and bounded replay
//! (`kv-event-wire.md` §2.1, `dynamo-router-spec.md` §3.2 and §3.4; issue 3 item 4, issue 13
//! item 3).
//!
//! **Threads** (issue 18 item 5): no thread per subscriber. Every subscriber of the process
//! lives in one of at most [`POLLERS`] poller threads, which own their SUB and replay
//! sockets and wait on all of them with one `zmq_poll`; the libzmq context (one I/O thread)
//! is shared too. A subscriber costs its SUB socket (two descriptors: the TCP connection and
//! libzmq's mailbox), a DEALER only while a replay runs, and a few hundred bytes of state.
//! Nothing in a poller blocks: a replay is read as its replies arrive, and a full sink parks
//! the subscriber's converted events (its later messages wait in its queue) while the others
//! run on. [`KvEventSubscriber::start`] opens the socket and hands it over;
//! [`KvEventSubscriber::stop`] waits until the poller has closed it.
//!
//! * **Reading**: the SUB socket (topic prefix filter; connect, or bind when the engine
//!   connects as vLLM does for non-wildcard endpoints) is read as messages arrive and each is
//!   processed at once; when the subscriber is busy (replaying, or its sink full) messages
//!   wait in a queue of `queue_capacity` messages and at most the *hard ceiling* of bytes
//!   (below); beyond it they are dropped and counted (`dropped`). A message larger than
//!   `max_frame_bytes` (all frames together) is dropped and counted (`oversize`). Either drop
//!   is a missing sequence number, so it is treated as a gap. libzmq reconnects on connection
//!   loss; heartbeats detect a silent peer.
//! * **Processing** tracks the publisher's sequence number and converts batches in order:
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
//! `stopped` (`stop`, the sink closed, or the socket failed).
//!
//! Converted [`RouterEvent`]s go to the caller's `SyncSender` in order, from the poller thread
//! (never blocking it: the caller's backpressure fills our bounded queue, whose drops are then
//! recovered by replay; each event that waits for room is counted in `backpressure`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};

use crate::convert::Converter;
use crate::engine::{decode_batch, DecodeStats, FormatCounts, WireFormat};
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
/// Longest wait of a poller thread (timers are checked at least this often), ms.
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
    /// The LoRA adapters the engine serves, in its `--lora-modules` order: names the
    /// `lora_id` of stores that carry no `lora_name` ([`Converter::with_lora_adapters`]).
    pub lora_adapters: Arc<[String]>,
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
            lora_adapters: Arc::from([]),
        }
    }
}

/// The hard per-subscriber memory ceiling in bytes: `ZMQ_MAXMSGSIZE` of both sockets and the
/// most bytes queued between reader and processor.
fn hard_ceiling(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(4).max(MIN_HARD_CEILING)
}

/// Most sockets of the subscribers' libzmq context: a SUB per worker rank, a DEALER per replay
/// in flight. libzmq's default is 1,023, which fails registrations past ~1,000 workers with
/// "Too many open files" however high the descriptor limit.
const MAX_SOCKETS: i32 = 1 << 16;

/// The subscribers' libzmq context, created through the C API because `zmq::Context` cannot
/// set `ZMQ_MAX_SOCKETS`. Never terminated: it lives as long as the process.
struct RawContext(*mut std::ffi::c_void);
// SAFETY: a libzmq context is thread-safe.
unsafe impl Send for RawContext {}
unsafe impl Sync for RawContext {}

/// A new socket of `kind` (`zmq_sys::ZMQ_SUB`, …) in the one libzmq context of every
/// subscriber of the process (one I/O thread in all).
fn socket(kind: u32) -> zmq::Result<zmq::Socket> {
    static CTX: OnceLock<RawContext> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        // SAFETY: plain C calls; the context is checked for null before use.
        unsafe {
            let c = zmq_sys::zmq_ctx_new();
            if !c.is_null() {
                zmq_sys::zmq_ctx_set(c, zmq_sys::ZMQ_MAX_SOCKETS as _, MAX_SOCKETS);
            }
            RawContext(c)
        }
    });
    if ctx.0.is_null() {
        return Err(zmq::Error::EMFILE);
    }
    // SAFETY: `ctx.0` is a live context (never terminated); a non-null result is a new socket
    // that the returned `Socket` owns and closes on drop.
    unsafe {
        let s = zmq_sys::zmq_socket(ctx.0, kind as _);
        if s.is_null() {
            Err(zmq::Error::from_raw(zmq_sys::zmq_errno()))
        } else {
            Ok(zmq::Socket::from_raw(s))
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
    /// Ended (`stop`, the sink closed, or the socket failed): no more events.
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
    /// Decoded batches by the wire format their events showed (vLLM positional, vLLM map,
    /// SGLang, or no evidence; see [`crate::WireFormat`]).
    pub formats: FormatCounts,
    /// Engine events dropped by the converter's filters (group, locality, block size,
    /// self-reference, empty) plus whole batches for another rank.
    pub filtered: u64,
    /// LoRA stores with a `lora_id` but neither a `lora_name` nor an adapter of the worker's
    /// list by that id: indexed without the adapter.
    pub lora_unmapped: u64,
    /// Router events sent to the sink.
    pub events_out: u64,
    /// Times an event had to wait because the sink was full.
    pub backpressure: u64,
    /// HTTP polls of the worker's events (TensorRT-LLM's `POST /kv_cache_events`, shared by
    /// its ranks); 0 for a ZMQ subscriber.
    pub polls: u64,
    /// Polls that failed (connection, status, timeout, oversize or undecodable answer).
    pub poll_errors: u64,
    /// Events of a sliding-window KV pool ignored (TensorRT-LLM's `window_size`).
    pub window_ignored: u64,
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
    /// Per [`FormatCounts`] field, in [`WireFormat::ALL`] order.
    formats: [AtomicU64; 5],
    filtered: AtomicU64,
    lora_unmapped: AtomicU64,
    events_out: AtomicU64,
    backpressure: AtomicU64,
    /// `next` of the subscriber, valid when `has_next`.
    next_seq: AtomicU64,
    has_next: AtomicBool,
    /// [`SubscriberState`] as `u8`.
    state: AtomicU8,
}

impl Counters {
    fn set_state(&self, s: SubscriberState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A running subscriber: a handle on its place in one of the process's poller threads.
/// Dropping it stops it too.
pub struct KvEventSubscriber {
    id: u64,
    shard: Arc<Shard>,
    counters: Arc<Counters>,
    endpoint: String,
    stopped: bool,
}

impl KvEventSubscriber {
    /// Opens the SUB socket (in the calling thread, so endpoint errors are returned here) and
    /// hands it to the least loaded poller thread, starting one if fewer than [`POLLERS`]
    /// run. Does not wait for the first message.
    ///
    /// Errors: [`WireError::Zmq`] when the endpoint cannot be bound/connected,
    /// [`WireError::Config`] for a zero block size or a zero `max_frame_bytes`,
    /// [`WireError::Thread`] when no poller thread can be started or reached.
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
        let sub = socket(zmq_sys::ZMQ_SUB)?;
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

        let counters = Arc::new(Counters::default());
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let state = Sub {
            id,
            sock: sub,
            counters: counters.clone(),
            converter: Converter::new(config.worker, config.block_size)
                .with_lora_adapters(config.lora_adapters.clone()),
            topic: config.topic.into_bytes(),
            replay_endpoint: config.replay_endpoint,
            sink,
            max_frame_bytes: config.max_frame_bytes,
            ceiling,
            limits: config.replay,
            queue: VecDeque::new(),
            queue_capacity: config.queue_capacity.max(1),
            queued_bytes: 0,
            dropped_seq_plus1: 0,
            next: None,
            last_live: None,
            replay_floor: None,
            probe_at: Instant::now() + FIRST_PROBE,
            probe_gap: FIRST_PROBE,
            replay: None,
            replayed: VecDeque::new(),
            resume: None,
            scratch: Vec::new(),
            out: VecDeque::new(),
            blocked: false,
            unapplied: 0,
        };
        let shard = shard_for_new()?;
        shard.send(Cmd::Add(Box::new(state)))?;
        Ok(Self {
            id,
            shard,
            counters,
            endpoint,
            stopped: false,
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
            formats: FormatCounts {
                vllm_array: g(&c.formats[0]),
                vllm_map: g(&c.formats[1]),
                sglang: g(&c.formats[2]),
                trtllm: g(&c.formats[3]),
                unknown: g(&c.formats[4]),
            },
            filtered: g(&c.filtered),
            lora_unmapped: g(&c.lora_unmapped),
            events_out: g(&c.events_out),
            backpressure: g(&c.backpressure),
            polls: 0,
            poll_errors: 0,
            window_ignored: 0,
            next_seq: c.has_next.load(Ordering::Relaxed).then(|| g(&c.next_seq)),
            state: SubscriberState::from_u8(c.state.load(Ordering::Relaxed)),
        }
    }

    /// Stops it: its sockets are closed and no event of it reaches the sink after this
    /// returns. Returns promptly even when the sink is full.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.shard.send(Cmd::Remove(self.id, tx)).is_ok() {
            // An error means the poller is gone, and with it the subscriber.
            let _ = rx.recv();
        }
        self.shard.load.fetch_sub(1, Ordering::Relaxed);
        self.counters.set_state(SubscriberState::Stopped);
    }
}

impl Drop for KvEventSubscriber {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Most poller threads in the process; subscribers are spread over them, least loaded first.
pub const POLLERS: usize = 2;
/// Messages read from one socket before the poller moves on to the others (fairness).
const READS_PER_ROUND: usize = 1024;

/// What a poller is asked to do.
enum Cmd {
    Add(Box<Sub>),
    /// Drop the subscriber with this id (closing its sockets), then answer.
    Remove(u64, SyncSender<()>),
}

/// One poller thread's mailbox: commands, and an inproc PUSH socket that wakes its poll.
struct Shard {
    mailbox: Mutex<(Sender<Cmd>, zmq::Socket)>,
    /// Subscribers assigned to it (started and not stopped).
    load: AtomicUsize,
}

impl Shard {
    fn send(&self, cmd: Cmd) -> Result<(), WireError> {
        let mb = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        mb.0.send(cmd)
            .map_err(|_| WireError::Thread("subscriber poller gone"))?;
        // A full wake queue already has a wake-up pending.
        match mb.1.send(&b""[..], zmq::DONTWAIT) {
            Ok(()) | Err(zmq::Error::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The least loaded poller, starting a new one while fewer than [`POLLERS`] run; its load
/// already counts the new subscriber.
fn shard_for_new() -> Result<Arc<Shard>, WireError> {
    static SHARDS: Mutex<Vec<Arc<Shard>>> = Mutex::new(Vec::new());
    let mut shards = SHARDS.lock().unwrap_or_else(|e| e.into_inner());
    let shard = if shards.len() < POLLERS {
        let s = spawn_poller(shards.len())?;
        shards.push(s.clone());
        s
    } else {
        shards
            .iter()
            .min_by_key(|s| s.load.load(Ordering::Relaxed))
            .cloned()
            .ok_or(WireError::Thread("subscriber poller"))?
    };
    shard.load.fetch_add(1, Ordering::Relaxed);
    Ok(shard)
}

fn spawn_poller(n: usize) -> Result<Arc<Shard>, WireError> {
    let addr = format!("inproc://kvrouter-subscriber-wake-{n}");
    let wake_rx = socket(zmq_sys::ZMQ_PULL)?;
    wake_rx.bind(&addr)?;
    let wake_tx = socket(zmq_sys::ZMQ_PUSH)?;
    wake_tx.set_sndhwm(16)?;
    wake_tx.connect(&addr)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = Poller {
        wake: wake_rx,
        cmds: rx,
        subs: Vec::new(),
    };
    std::thread::Builder::new()
        .name(format!("kv-events-{n}"))
        .spawn(move || poller.run())
        .map_err(|_| WireError::Thread("subscriber poller"))?;
    Ok(Arc::new(Shard {
        mailbox: Mutex::new((tx, wake_tx)),
        load: AtomicUsize::new(0),
    }))
}

/// A poller thread: owns the sockets of its subscribers and runs them all, event-driven.
/// Nothing in it blocks: replays are read as their replies arrive, and a full sink parks the
/// subscriber's converted events until there is room.
struct Poller {
    wake: zmq::Socket,
    cmds: Receiver<Cmd>,
    subs: Vec<Sub>,
}

impl Poller {
    fn run(mut self) {
        // Per subscriber: its SUB socket is readable.
        let mut ready: Vec<bool> = Vec::new();
        loop {
            let now = Instant::now();
            let timeout = self
                .subs
                .iter()
                .filter_map(|s| s.wake_at())
                .min()
                .map_or(TICK_MS, |t| {
                    let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                    (ms as i64).clamp(1, TICK_MS)
                });
            let woken = {
                let mut items = Vec::with_capacity(1 + self.subs.len() * 2);
                items.push(self.wake.as_poll_item(zmq::POLLIN));
                for s in &self.subs {
                    items.push(s.sock.as_poll_item(zmq::POLLIN));
                    if let Some(d) = s.replay.as_ref().and_then(|r| r.dealer.as_ref()) {
                        items.push(d.as_poll_item(zmq::POLLIN));
                    }
                }
                if let Err(e) = zmq::poll(&mut items, timeout) {
                    if e != zmq::Error::EINTR {
                        tracing::error!("KV event poll failed: {e}");
                        std::thread::sleep(Duration::from_millis(TICK_MS as u64));
                    }
                    continue;
                }
                ready.clear();
                let mut i = 1;
                for s in &self.subs {
                    let sub = items[i].is_readable();
                    i += 1;
                    // Replay sockets are read on every round; polled only to wake us.
                    if s.replay.as_ref().is_some_and(|r| r.dealer.is_some()) {
                        i += 1;
                    }
                    ready.push(sub);
                }
                items[0].is_readable()
            };
            let now = Instant::now();
            let mut k = 0;
            while k < self.subs.len() {
                let readable = ready.get(k).copied().unwrap_or_default();
                let s = &mut self.subs[k];
                let alive = if readable { s.read(now) } else { s.step(now) };
                if alive.is_err() {
                    // The sink is gone or the socket failed: no more events from it.
                    s.counters.set_state(SubscriberState::Stopped);
                    self.subs.swap_remove(k);
                    ready.swap_remove(k);
                } else {
                    k += 1;
                }
            }
            if woken {
                while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            // Commands are read every round: a wake-up may coalesce several.
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Add(s)) => self.subs.push(*s),
                    Ok(Cmd::Remove(id, ack)) => {
                        if let Some(i) = self.subs.iter().position(|s| s.id == id) {
                            // Closes its sockets (linger 0).
                            drop(self.subs.swap_remove(i));
                        }
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    // Every handle is gone (process exit): nothing more will come.
                    Err(TryRecvError::Disconnected) => return,
                }
            }
        }
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

/// One subscriber's sockets and sequence state, run by its poller thread.
struct Sub {
    id: u64,
    sock: zmq::Socket,
    counters: Arc<Counters>,
    converter: Converter,
    topic: Vec<u8>,
    replay_endpoint: Option<String>,
    sink: SyncSender<RouterEvent>,
    max_frame_bytes: usize,
    /// `ZMQ_MAXMSGSIZE` of the replay socket and the most bytes queued.
    ceiling: usize,
    limits: ReplayLimits,
    /// Live messages read but not processed (a replay is running or the sink is full).
    queue: VecDeque<Vec<Vec<u8>>>,
    queue_capacity: usize,
    queued_bytes: usize,
    /// 1 + the highest sequence number dropped unread (0 = none): lets an idle subscriber
    /// recover a dropped tail even when no later message arrives to reveal the gap.
    dropped_seq_plus1: u64,
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
    /// The replay being read, if any.
    replay: Option<Replay>,
    /// Batches of a finished replay, to apply in order.
    replayed: VecDeque<Vec<u8>>,
    /// The live batch `(seq, payload)` that revealed a gap, applied after its replay.
    resume: Option<(u64, Vec<u8>)>,
    scratch: Vec<RouterEvent>,
    /// Converted events not yet in the sink (at most one batch's, plus a `Cleared`).
    out: VecDeque<RouterEvent>,
    /// The front of `out` already waited for room (counted once in `backpressure`).
    blocked: bool,
    /// Batches whose events are in `out`: counted `applied` once `out` is empty.
    unapplied: u64,
}

/// The sink is gone or the socket failed: the subscriber ends.
struct SinkClosed;

/// Why a replay brought nothing to apply.
enum ReplayError {
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

/// Why a replay runs.
#[derive(Clone, Copy)]
enum ReplayKind {
    /// Recover `[from, live)`.
    Gap { from: u64, live: u64 },
    /// The join probe: everything the ring holds.
    Probe,
}

/// A replay in flight: its DEALER socket and what it has read, within [`ReplayLimits`].
/// With `until`, it ends with exactly the batches `from..until` (replies outside the range
/// are read and ignored) or fails; without it (join probe), with every batch at or above
/// `from` up to the end marker.
struct Replay {
    kind: ReplayKind,
    /// `None` when it could not be opened (`outcome` says why).
    dealer: Option<zmq::Socket>,
    from: u64,
    until: Option<u64>,
    deadline: Instant,
    quiet_until: Instant,
    got: BTreeMap<u64, Vec<u8>>,
    replies: usize,
    bytes: usize,
    outcome: Option<Result<BTreeMap<u64, Vec<u8>>, ReplayError>>,
}

impl Replay {
    fn open(ep: &str, from: u64, ceiling: usize) -> zmq::Result<zmq::Socket> {
        let dealer = socket(zmq_sys::ZMQ_DEALER)?;
        dealer.set_linger(0)?;
        // Unbounded so an honest ring's burst is not dropped; `max_bytes` bounds what we keep.
        dealer.set_rcvhwm(0)?;
        dealer.set_maxmsgsize(ceiling.min(i64::MAX as usize) as i64)?;
        dealer.connect(ep)?;
        let start = from.to_be_bytes();
        let req: [&[u8]; 2] = [b"", &start];
        dealer.send_multipart(req, 0)?;
        Ok(dealer)
    }

    fn fail(&mut self, why: String) {
        self.outcome = Some(Err(ReplayError::Failed(why)));
    }

    /// Reads the replies available now (at most [`READS_PER_ROUND`]), then checks the
    /// clock; sets `outcome` when the replay is over.
    fn pump(&mut self, now: Instant, max_frame_bytes: usize, l: &ReplayLimits) {
        if let Some(d) = self.dealer.take() {
            self.read_replies(&d, max_frame_bytes, l);
            self.dealer = Some(d);
        }
        let want = self.until.map(|u| u - self.from);
        if self.outcome.is_some() {
            return;
        }
        if want == Some(self.got.len() as u64) {
            self.outcome = Some(Ok(std::mem::take(&mut self.got)));
        } else if now >= self.deadline {
            let (r, b) = (self.replies, self.bytes);
            self.fail(format!(
                "deadline of {:?} passed ({r} replies, {b} bytes)",
                l.deadline
            ));
        } else if now >= self.quiet_until {
            if self.replies == 0 {
                self.outcome = Some(Err(ReplayError::NoAnswer));
            } else {
                let r = self.replies;
                self.fail(format!(
                    "no reply for {:?} and no end marker ({r} replies)",
                    l.silence
                ));
            }
        }
    }

    fn read_replies(&mut self, dealer: &zmq::Socket, max_frame_bytes: usize, l: &ReplayLimits) {
        let want = self.until.map(|u| u - self.from);
        for _ in 0..READS_PER_ROUND {
            if self.outcome.is_some() {
                return;
            }
            if want == Some(self.got.len() as u64) {
                self.outcome = Some(Ok(std::mem::take(&mut self.got)));
                return;
            }
            let mut frames = match recv_bounded(dealer, zmq::DONTWAIT, max_frame_bytes) {
                Ok(Received::Frames(f, n)) => {
                    self.bytes = self.bytes.saturating_add(n);
                    f
                }
                Ok(Received::Oversize(_)) => {
                    return self.fail(format!("a reply over max_frame_bytes ({max_frame_bytes})"))
                }
                Ok(Received::TooManyFrames) => Vec::new(),
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return self.fail(format!("replay socket: {e}")),
            };
            self.quiet_until = Instant::now() + l.silence;
            let seq = match split_replay_reply(&frames) {
                Ok(ReplayReply::End) => {
                    if self.until.is_none() {
                        self.outcome = Some(Ok(std::mem::take(&mut self.got)));
                        return;
                    }
                    return self.fail(format!(
                        "end marker with {} of the {} batches asked for (the ring no longer holds them)",
                        self.got.len(),
                        want.unwrap_or_default()
                    ));
                }
                Ok(ReplayReply::Batch { seq, .. }) => Some(seq),
                Err(e) => {
                    tracing::warn!("malformed replay reply ignored: {e}");
                    None
                }
            };
            self.replies += 1;
            if self.replies > l.max_batches {
                return self.fail(format!("more than max_batches ({}) replies", l.max_batches));
            }
            if self.bytes > l.max_bytes {
                return self.fail(format!("more than max_bytes ({}) read", l.max_bytes));
            }
            let Some(seq) = seq else { continue };
            if seq < self.from || self.until.is_some_and(|u| seq >= u) {
                continue; // outside the range asked for: never applied
            }
            // The payload is the last frame in both layouts.
            let payload = frames.pop().unwrap_or_default();
            if self.got.insert(seq, payload).is_some() {
                return self.fail(format!("sequence number {seq} replayed twice"));
            }
        }
    }
}

impl Sub {
    /// When the poller must come back to it without a socket event: a replay's timers, the
    /// sink to retry, the next join probe.
    fn wake_at(&self) -> Option<Instant> {
        if !self.out.is_empty() {
            return Some(Instant::now()); // the poller waits 1 ms
        }
        if let Some(r) = &self.replay {
            return Some(r.deadline.min(r.quiet_until));
        }
        (self.next.is_none() && self.replay_endpoint.is_some()).then_some(self.probe_at)
    }

    /// Reads what the SUB socket holds (at most [`READS_PER_ROUND`] messages), processing
    /// as it goes; what cannot be processed now waits in the bounded queue, beyond which it
    /// is dropped (a gap, recovered later).
    fn read(&mut self, now: Instant) -> Result<(), SinkClosed> {
        for _ in 0..READS_PER_ROUND {
            let (frames, bytes) =
                match recv_bounded(&self.sock, zmq::DONTWAIT, self.max_frame_bytes) {
                    Ok(Received::Frames(f, n)) => (f, n),
                    Ok(Received::Oversize(seq)) => {
                        inc(&self.counters.received);
                        inc(&self.counters.oversize);
                        self.note_dropped(seq);
                        tracing::warn!(
                            seq,
                            max = self.max_frame_bytes,
                            "KV event message over max_frame_bytes dropped"
                        );
                        continue;
                    }
                    Ok(Received::TooManyFrames) => {
                        inc(&self.counters.received);
                        inc(&self.counters.bad_frames);
                        continue;
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => {
                        tracing::error!(worker = %self.converter.worker(), "SUB recv failed: {e}");
                        return Err(SinkClosed);
                    }
                };
            inc(&self.counters.received);
            if self.queue.len() >= self.queue_capacity || self.queued_bytes + bytes > self.ceiling {
                inc(&self.counters.dropped);
                self.note_dropped(live_seq(&frames));
                continue;
            }
            self.queued_bytes += bytes;
            self.queue.push_back(frames);
            self.step(now)?;
        }
        self.step(now)
    }

    /// A message with this seq frame (if it has one) was dropped unread.
    fn note_dropped(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq.filter(|&s| s != END_SEQ) {
            self.dropped_seq_plus1 = self.dropped_seq_plus1.max(seq + 1);
        }
    }

    /// Does all that can be done now without waiting, in order: hand converted events to
    /// the sink, read the running replay, apply a finished replay's batches and the live
    /// batch that revealed its gap, then the queued live messages; when idle, recover a
    /// dropped tail or probe the replay ring.
    fn step(&mut self, now: Instant) -> Result<(), SinkClosed> {
        loop {
            if !self.flush()? {
                return Ok(()); // the sink is full: retried on the next round
            }
            if let Some(r) = &mut self.replay {
                r.pump(now, self.max_frame_bytes, &self.limits);
                let Some(outcome) = r.outcome.take() else {
                    return Ok(());
                };
                let kind = r.kind;
                self.replay = None; // closes the DEALER
                self.finish_replay(kind, outcome);
                continue;
            }
            if let Some(p) = self.replayed.pop_front() {
                self.apply(&p);
                inc(&self.counters.replayed);
                continue;
            }
            if let Some((seq, p)) = self.resume.take() {
                self.apply(&p);
                self.next = Some(seq + 1);
                continue;
            }
            if let Some(frames) = self.queue.pop_front() {
                self.queued_bytes -= frames.iter().map(Vec::len).sum::<usize>();
                self.live(frames)?;
                continue;
            }
            if self.recover_dropped_tail()? || self.probe_join(now) {
                continue;
            }
            self.publish_state();
            return Ok(());
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

    fn live(&mut self, frames: Vec<Vec<u8>>) -> Result<(), SinkClosed> {
        let s = match split_message(&frames) {
            Ok(m) if m.topic.starts_with(&self.topic) && m.seq != END_SEQ => m.seq,
            Ok(_) | Err(_) => {
                inc(&self.counters.bad_frames);
                tracing::warn!(worker = %self.converter.worker(), "malformed KV event message ignored");
                return Ok(());
            }
        };
        let worker = self.converter.worker();
        if self.last_live.is_some_and(|last| s <= last) {
            inc(&self.counters.restarts);
            tracing::warn!(%worker, seq = s, "publisher restarted (sequence went back): clearing worker");
            self.clear();
            self.next = None;
            self.replay_floor = None;
            self.dropped_seq_plus1 = 0;
        }
        self.last_live = Some(s);
        // The payload is the last of the 3 frames `split_message` accepted.
        let payload = || frames.into_iter().next_back().unwrap_or_default();
        match self.next {
            None if s == 0 => {}
            None => {
                // Late join: fetch what was published before we connected.
                inc(&self.counters.gaps);
                self.resume = Some((s, payload()));
                self.recover(0, s);
                return Ok(());
            }
            Some(n) if s > n => {
                inc(&self.counters.gaps);
                tracing::warn!(%worker, expected = n, got = s, "sequence gap");
                self.resume = Some((s, payload()));
                self.recover(n, s);
                return Ok(());
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
                self.clear();
                self.replay_floor = None;
            }
            Some(_) => {}
        }
        self.apply(&payload());
        self.next = Some(s + 1);
        Ok(())
    }

    /// Slow joiner: batches published before our subscription reached the publisher never
    /// arrive live, and nothing reveals them until the engine publishes again — possibly
    /// never, for an idle worker. While no batch has been applied, ask the replay ring now and
    /// then (200 ms after start, then backing off to every 30 s). One fetch: the end marker
    /// must arrive within the limits and the seqs must be contiguous. Returns whether a probe
    /// started.
    fn probe_join(&mut self, now: Instant) -> bool {
        if self.next.is_some() || now < self.probe_at || self.replay_endpoint.is_none() {
            return false;
        }
        self.probe_gap = (self.probe_gap * 2).min(MAX_PROBE_GAP);
        self.probe_at = now + self.probe_gap;
        self.start_replay(ReplayKind::Probe, 0, None, now);
        true
    }

    /// The end of a join probe (see [`Self::probe_join`]).
    fn probe_done(&mut self, outcome: Result<BTreeMap<u64, Vec<u8>>, ReplayError>) {
        let worker = self.converter.worker();
        let batches = match outcome {
            Ok(b) => b,
            Err(ReplayError::NoAnswer) => return,
            Err(ReplayError::Failed(why)) => {
                // Nothing applied since start (or the last clear): nothing to clear.
                inc(&self.counters.replay_failures);
                tracing::warn!(%worker, "join probe failed, nothing applied: {why}");
                return;
            }
        };
        let (Some((&first, _)), Some((&last, _))) =
            (batches.first_key_value(), batches.last_key_value())
        else {
            return; // the ring is empty: nothing was published
        };
        if last - first + 1 != batches.len() as u64 {
            inc(&self.counters.replay_failures);
            tracing::warn!(%worker, first, last, n = batches.len(), "join probe failed, nothing applied: sequence numbers not contiguous");
            return;
        }
        inc(&self.counters.gaps);
        if first == 0 {
            inc(&self.counters.recovered);
            tracing::info!(%worker, last, "batches published before we joined: replaying");
        } else {
            // The ring no longer holds the start of the stream.
            inc(&self.counters.replay_failures);
            tracing::warn!(%worker, first, last, "the replay ring lost the start of the stream: clearing worker, applying what it holds");
            self.clear();
        }
        self.replayed.extend(batches.into_values());
        self.replay_floor = Some(first);
        self.next = Some(last + 1);
    }

    /// The queue is idle but a batch we have not applied was dropped: a gap nobody else
    /// will reveal. Replay up to and including it. Returns whether there was one.
    fn recover_dropped_tail(&mut self) -> Result<bool, SinkClosed> {
        let d = self.dropped_seq_plus1;
        match self.next {
            Some(n) if d > n => {
                inc(&self.counters.gaps);
                tracing::warn!(worker = %self.converter.worker(), expected = n, dropped = d - 1, "dropped batches: replaying");
                self.recover(n, d);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn clear(&mut self) {
        self.converter.cleared(&mut self.scratch);
        self.out.extend(self.scratch.drain(..));
        inc(&self.counters.cleared);
    }

    /// Hands `out` to the sink without blocking. `Ok(false)`: the sink is full, the rest
    /// waits. Errors: the sink is gone.
    fn flush(&mut self) -> Result<bool, SinkClosed> {
        while let Some(ev) = self.out.pop_front() {
            match self.sink.try_send(ev) {
                Ok(()) => {
                    self.blocked = false;
                    inc(&self.counters.events_out);
                }
                Err(TrySendError::Full(ev)) => {
                    self.out.push_front(ev);
                    if !std::mem::replace(&mut self.blocked, true) {
                        inc(&self.counters.backpressure);
                    }
                    return Ok(false);
                }
                Err(TrySendError::Disconnected(_)) => return Err(SinkClosed),
            }
        }
        // Counted once its events are in the sink, so `applied` is a safe sync point.
        if self.unapplied > 0 {
            self.counters
                .applied
                .fetch_add(std::mem::take(&mut self.unapplied), Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Decodes and converts one batch into `out`.
    fn apply(&mut self, payload: &[u8]) {
        let mut ds = DecodeStats::default();
        match decode_batch(payload, &mut ds) {
            Ok(batch) => {
                let before = self.converter.stats();
                self.converter.convert_batch(&batch, &mut self.scratch);
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
                self.counters.lora_unmapped.fetch_add(
                    after.lora_without_name - before.lora_without_name,
                    Ordering::Relaxed,
                );
                self.out.extend(self.scratch.drain(..));
                self.unapplied += 1;
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
        for (c, f) in self.counters.formats.iter().zip(WireFormat::ALL) {
            let n = ds.formats.get(f);
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Starts recovering `[from, live)` from the replay socket. When it is over,
    /// `self.next == Some(live)`: either every batch of the range was applied in order, or
    /// none was and the worker was cleared.
    fn recover(&mut self, from: u64, live: u64) {
        let worker = self.converter.worker();
        if from >= live {
            self.next = Some(live);
            return;
        }
        if self.replay_endpoint.is_none() {
            tracing::warn!(%worker, from, live, "no replay endpoint: clearing worker");
            self.clear();
            self.replay_floor = None;
            self.next = Some(live);
            return;
        }
        self.start_replay(
            ReplayKind::Gap { from, live },
            from,
            Some(live),
            Instant::now(),
        );
    }

    fn start_replay(&mut self, kind: ReplayKind, from: u64, until: Option<u64>, now: Instant) {
        let Some(ep) = self.replay_endpoint.as_deref() else {
            return;
        };
        self.counters.set_state(SubscriberState::Replaying);
        // A socket that cannot be opened fails the replay at once (read by the next step).
        let (dealer, outcome) = match Replay::open(ep, from, self.ceiling) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(Err(ReplayError::from(e)))),
        };
        self.replay = Some(Replay {
            kind,
            dealer,
            from,
            until,
            deadline: now + self.limits.deadline,
            quiet_until: now + self.limits.silence,
            got: BTreeMap::new(),
            replies: 0,
            bytes: 0,
            outcome,
        });
    }

    fn finish_replay(
        &mut self,
        kind: ReplayKind,
        outcome: Result<BTreeMap<u64, Vec<u8>>, ReplayError>,
    ) {
        let ReplayKind::Gap { from, live } = kind else {
            return self.probe_done(outcome);
        };
        let worker = self.converter.worker();
        match outcome {
            Ok(batches) => {
                inc(&self.counters.recovered);
                tracing::info!(%worker, from, live, "gap recovered by replay");
                self.replayed.extend(batches.into_values());
                self.replay_floor = Some(from);
            }
            Err(ReplayError::NoAnswer) => {
                self.replay_failed(from, live, "no reply from the replay endpoint")
            }
            Err(ReplayError::Failed(why)) => self.replay_failed(from, live, &why),
        }
        self.next = Some(live);
    }

    fn replay_failed(&mut self, from: u64, live: u64, why: &str) {
        inc(&self.counters.replay_failures);
        tracing::warn!(worker = %self.converter.worker(), from, live, "replay failed: {why}; clearing worker, resuming from the live stream");
        self.replay_floor = None;
        self.clear();
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
