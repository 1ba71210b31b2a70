//! The live driver: one tokio task per engine stepping it against the wall clock, and the
//! handle the HTTP layer talks to.
//!
//! The task drains commands (new requests, aborts, resets, snapshots), runs a step, sleeps for
//! the step's modelled duration (none at `speedup_ratio` 0, where it only yields so requests
//! arriving meanwhile join the next batch), then delivers tokens, publishes the step's KV
//! events as one batch and updates the metrics.
//!
//! In disaggregated serving it also keeps the [`HeldTransfers`] of a prefill worker: a
//! finished transfer's blocks are registered there, pulls ([`Command::Pull`]) and timeouts
//! release them (the loop wakes for the next deadline even when idle).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, KvTransfer, OutputSource, StepOutput, StopReason, TokenOutput};
use crate::events::{EventSink, KvEvent};
use crate::kv_pool::BlockId;
use crate::lora::CacheKeys;
use crate::metrics::Metrics;
use crate::scheduler::SeqId;
use crate::transfer::{HeldTransfers, HoldSpec, Outcomes, PullGrant, PullKey, PullReply, Released};

/// Where a request's output goes.
#[derive(Debug)]
pub enum Reply {
    /// Every token as it is produced.
    Stream(mpsc::UnboundedSender<TokenOutput>),
    /// All output ids once the request finishes, with the last token's usage facts.
    Final(oneshot::Sender<FinalOutput>),
}

/// A finished non-streaming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalOutput {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefix-cache hit in tokens.
    pub cached_tokens: usize,
    /// Why the request stopped before `max_tokens` (None: it reached `max_tokens`).
    pub stop: Option<StopReason>,
    /// For a [`KvMode::Send`] request: the block table held for the decode worker (vLLM's
    /// `remote_block_ids`).
    pub kv_blocks: Option<Vec<BlockId>>,
}

/// A request's part in a KV transfer (disaggregated serving).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KvMode {
    /// Aggregated.
    #[default]
    Local,
    /// Prefill worker: hold the blocks when it ends, under this name.
    Send(HoldSpec),
    /// Decode worker: the prompt's KV was pulled from a prefill worker.
    Receive,
}

/// A copy of an engine's state, for tests and tools.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSnapshot {
    /// Running requests.
    pub num_running: usize,
    /// Waiting requests.
    pub num_waiting: usize,
    /// Engine hashes of the cached blocks, sorted.
    pub cached_block_hashes: Vec<u64>,
    /// Blocks referenced by requests.
    pub active_blocks: usize,
    /// The engine's hash seed.
    pub hash_seed: u64,
    /// Events published so far (batches).
    pub batches_published: u64,
    /// KV transfers held for decode workers (prefill worker).
    pub held_transfers: usize,
    /// Blocks those transfers hold, summed.
    pub held_blocks: usize,
    /// Pulls waiting for their bootstrap room's prefill.
    pub waiting_pulls: usize,
}

/// Commands to an engine task.
#[derive(Debug)]
pub enum Command {
    /// Queue a validated request.
    Add {
        /// Unique id (from [`WorkerHandle::next_id`]).
        id: SeqId,
        /// Prompt token ids.
        prompt: Vec<u32>,
        /// Output tokens.
        max_tokens: usize,
        /// Chooses the output tokens (None: the default prompt-seeded ones).
        output: Option<Box<dyn OutputSource>>,
        /// Where tokens go.
        reply: Reply,
        /// Its part in a KV transfer.
        kv: KvMode,
        /// Its LoRA adapter and cache salt (see [`crate::lora`]); None: neither.
        keys: Option<Arc<CacheKeys>>,
    },
    /// A decode worker pulls a held transfer (prefill worker); answered with the grant (its
    /// blocks are released) or why not. A pull by room may wait for the room's prefill.
    Pull {
        /// Which transfer.
        key: PullKey,
        /// The answer.
        reply: PullReply,
    },
    /// Leading full blocks of a prompt cached here (see [`Engine::prefix_hit_blocks`]).
    PrefixHit {
        /// Prompt token ids.
        prompt: Vec<u32>,
        /// The answer, in blocks.
        reply: oneshot::Sender<usize>,
    },
    /// Drop a request (client gone).
    Abort(SeqId),
    /// `reset_prefix_cache`; answers whether it happened.
    Reset(oneshot::Sender<bool>),
    /// Report the engine state between two steps (see [`EngineSnapshot`]).
    Snapshot(oneshot::Sender<EngineSnapshot>),
}

/// A cloneable handle to one engine task.
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    metrics: Arc<Mutex<Metrics>>,
}

impl WorkerHandle {
    /// A fresh request id.
    pub fn next_id(&self) -> SeqId {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a command; false when the engine task has stopped.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Arc<Mutex<Metrics>> {
        &self.metrics
    }

    /// Clears the prefix cache if idle. None when the engine task has stopped.
    pub async fn reset_prefix_cache(&self) -> Option<bool> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Reset(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// The engine's state between steps. None when the engine task has stopped.
    pub async fn snapshot(&self) -> Option<EngineSnapshot> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Snapshot(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// Leading full blocks of `prompt` cached here. None when the engine task has stopped.
    pub async fn prefix_hit_blocks(&self, prompt: Vec<u32>) -> Option<usize> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::PrefixHit { prompt, reply: tx }) {
            return None;
        }
        rx.await.ok()
    }
}

/// vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`: how long a prefill worker holds unpulled blocks.
pub const DEFAULT_KV_TRANSFER_TIMEOUT: Duration = Duration::from_secs(480);

/// Starts the engine task on the current tokio runtime. It stops when every handle is gone
/// or `shutdown` fires. Held KV transfers (prefill role) use the defaults
/// ([`DEFAULT_KV_TRANSFER_TIMEOUT`], [`crate::transfer::DEFAULT_MAX_HELD`]).
pub fn spawn_engine(
    engine: Engine,
    sink: Box<dyn EventSink>,
    shutdown: oneshot::Receiver<()>,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    let transfers = HeldTransfers::new(
        crate::transfer::DEFAULT_MAX_HELD,
        DEFAULT_KV_TRANSFER_TIMEOUT,
    );
    spawn_engine_with(engine, sink, shutdown, transfers)
}

/// [`spawn_engine`] with the table of held KV transfers to use.
pub fn spawn_engine_with(
    engine: Engine,
    sink: Box<dyn EventSink>,
    shutdown: oneshot::Receiver<()>,
    transfers: HeldTransfers,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let handle = WorkerHandle {
        tx,
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(run(engine, rx, sink, metrics, shutdown, transfers));
    (handle, task)
}

/// Largest lag behind the modelled step cadence that the next step absorbs.
const MAX_STEP_LAG: std::time::Duration = std::time::Duration::from_millis(5);

struct Pending {
    reply: Reply,
    tokens: Vec<u32>,
    hold: Option<HoldSpec>,
}

struct Loop {
    engine: Engine,
    sink: Box<dyn EventSink>,
    metrics: Arc<Mutex<Metrics>>,
    pending: HashMap<SeqId, Pending>,
    start: Instant,
    batches: u64,
    idle_events: Vec<KvEvent>,
    transfers: HeldTransfers,
    outcomes: Outcomes,
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn run(
    engine: Engine,
    mut rx: mpsc::UnboundedReceiver<Command>,
    sink: Box<dyn EventSink>,
    metrics: Arc<Mutex<Metrics>>,
    mut shutdown: oneshot::Receiver<()>,
    transfers: HeldTransfers,
) {
    let mut l = Loop {
        engine,
        sink,
        metrics,
        pending: HashMap::new(),
        start: Instant::now(),
        batches: 0,
        idle_events: Vec::new(),
        transfers,
        outcomes: Outcomes::default(),
    };
    let mut out = StepOutput::default();
    let mut aborted = Vec::new();
    // When the previous step is modelled to end; None after an idle wait.
    let mut planned_end: Option<Instant> = None;
    loop {
        l.expire_transfers();
        if !l.engine.has_work() {
            planned_end = None;
            let wake = l.transfers.next_deadline();
            tokio::select! {
                _ = &mut shutdown => return,
                cmd = rx.recv() => match cmd {
                    Some(c) => l.handle(c),
                    None => return,
                },
                _ = sleep_until_opt(wake) => continue,
            }
        }
        while let Ok(c) = rx.try_recv() {
            l.handle(c);
        }
        if !l.engine.has_work() {
            continue;
        }
        // Back-to-back steps follow the model's clock: a step starts where the previous one
        // was modelled to end, not when the timer (1 ms granularity) woke us, or sub-ms
        // steps would each last a whole tick. Only a small lag is absorbed; a driver that
        // fell further behind (CPU starved) starts from now.
        let woke = Instant::now();
        let step_start = match planned_end {
            Some(end) if woke >= end && woke - end < MAX_STEP_LAG => end,
            _ => woke,
        };
        let now = (step_start - l.start).as_secs_f64();
        l.engine.step(now, &mut out);
        planned_end = None;
        if out.duration > 0.0 {
            let until = step_start + std::time::Duration::from_secs_f64(out.duration);
            planned_end = Some(until);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(until.into()) => {},
            }
        }
        l.deliver(&out, &mut aborted);
        for id in aborted.drain(..) {
            l.engine.abort(id);
        }
        if !out.events.is_empty() {
            l.publish(&out.events);
        }
        if let Ok(mut m) = l.metrics.lock() {
            m.record_step(
                &out,
                l.engine.num_running(),
                l.engine.num_waiting(),
                l.engine.pool().usage(),
            );
        }
        if out.duration <= 0.0 {
            // Let the HTTP tasks run so the next step sees their requests.
            tokio::task::yield_now().await;
        }
    }
}

fn wall_ts() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Loop {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                id,
                prompt,
                max_tokens,
                output,
                reply,
                kv,
                keys,
            } => {
                let now = self.start.elapsed().as_secs_f64();
                let (engine_kv, hold) = match kv {
                    KvMode::Local => (KvTransfer::None, None),
                    KvMode::Send(spec) => (KvTransfer::Send, Some(spec)),
                    KvMode::Receive => (KvTransfer::Receive, None),
                };
                match self
                    .engine
                    .add_request_keyed(id, prompt, max_tokens, now, output, engine_kv, keys)
                {
                    Ok(()) => {
                        self.pending.insert(
                            id,
                            Pending {
                                reply,
                                tokens: Vec::new(),
                                hold,
                            },
                        );
                    }
                    // Validated by the caller; a refused request just ends (reply dropped).
                    Err(e) => tracing::warn!("request refused by the engine: {e}"),
                }
            }
            Command::Abort(id) => {
                self.pending.remove(&id);
                self.engine.abort(id);
                // No step may follow (the engine may now be idle): the gauges say it now.
                if let Ok(mut m) = self.metrics.lock() {
                    m.num_running = self.engine.num_running();
                    m.num_waiting = self.engine.num_waiting();
                    m.kv_usage = self.engine.pool().usage();
                }
            }
            Command::Reset(tx) => {
                let ok = self.engine.reset_prefix_cache();
                self.idle_events.clear();
                self.engine.take_events(&mut self.idle_events);
                if !self.idle_events.is_empty() {
                    let ev = std::mem::take(&mut self.idle_events);
                    self.publish(&ev);
                    self.idle_events = ev;
                }
                let _ = tx.send(ok);
            }
            Command::Snapshot(tx) => {
                let _ = tx.send(EngineSnapshot {
                    num_running: self.engine.num_running(),
                    num_waiting: self.engine.num_waiting(),
                    cached_block_hashes: self.engine.cached_block_hashes(),
                    active_blocks: self.engine.pool().num_active(),
                    hash_seed: self.engine.pool().seed(),
                    batches_published: self.batches,
                    held_transfers: self.transfers.len(),
                    held_blocks: self.transfers.num_blocks(),
                    waiting_pulls: self.transfers.num_waiting(),
                });
            }
            Command::Pull { key, reply } => {
                let answer = self
                    .transfers
                    .pull(key, reply, Instant::now(), &mut self.outcomes);
                if let Some((reply, result)) = answer {
                    let result = result.map(|(released, grant)| {
                        self.engine.release_held(released.seq);
                        grant
                    });
                    let _ = reply.send(result);
                }
                self.transfers_changed();
            }
            Command::PrefixHit { prompt, reply } => {
                let _ = reply.send(self.engine.prefix_hit_blocks(&prompt));
            }
        }
    }

    /// Releases the blocks of transfers that left the table.
    fn release(&mut self, released: Vec<Released>) {
        for r in released {
            self.engine.release_held(r.seq);
        }
    }

    fn expire_transfers(&mut self) {
        if self.transfers.is_empty() && self.transfers.num_waiting() == 0 {
            return;
        }
        let released = self.transfers.expire(Instant::now(), &mut self.outcomes);
        if !released.is_empty() {
            self.release(released);
            self.transfers_changed();
        }
    }

    /// Held transfers changed between steps: the gauges (and KV usage) say so now, not at
    /// the next step.
    fn transfers_changed(&mut self) {
        if let Ok(mut m) = self.metrics.lock() {
            m.kv_usage = self.engine.pool().usage();
            m.kv_transfer_held = self.transfers.len();
            m.kv_transfer_held_blocks = self.transfers.num_blocks();
            m.kv_transfers_pulled = self.outcomes.pulled;
            m.kv_transfers_expired = self.outcomes.expired;
        }
    }

    /// A finished request that held its blocks (prefill role): register the transfer so a
    /// decode worker can pull it, and return its block table; release the blocks instead
    /// when nobody can ever pull them (a vLLM-style transfer whose client is gone: the block
    /// ids never left this worker). SGLang rooms are registered regardless: the router may
    /// discard the prefill's response while the decode worker still pulls by room.
    fn settle_hold(
        &mut self,
        t: &TokenOutput,
        hold: Option<HoldSpec>,
        client_alive: bool,
    ) -> Option<Vec<BlockId>> {
        let blocks = self.engine.held_blocks(t.id)?.to_vec();
        match hold {
            Some(spec) if client_alive || spec.room.is_some() => {
                let grant = PullGrant {
                    block_ids: blocks.clone(),
                    // KV is computed for every token but the last generated one.
                    num_tokens: t.prompt_tokens + t.index,
                };
                let released =
                    self.transfers
                        .hold(t.id, spec, grant, Instant::now(), &mut self.outcomes);
                self.release(released);
                self.transfers_changed();
                Some(blocks)
            }
            _ => {
                self.engine.release_held(t.id);
                None
            }
        }
    }

    fn publish(&mut self, events: &[KvEvent]) {
        self.batches += 1;
        self.sink.publish(wall_ts(), events);
    }

    fn deliver(&mut self, out: &StepOutput, aborted: &mut Vec<SeqId>) {
        for t in &out.tokens {
            let Some(p) = self.pending.get_mut(&t.id) else {
                if t.finished {
                    self.engine.release_held(t.id); // nobody waits for it
                }
                continue;
            };
            let gone = match &p.reply {
                Reply::Stream(tx) => tx.send(*t).is_err(),
                Reply::Final(tx) => {
                    p.tokens.push(t.token);
                    tx.is_closed()
                }
            };
            if !gone && !t.finished {
                continue;
            }
            let Some(p) = self.pending.remove(&t.id) else {
                continue;
            };
            let kv_blocks = if t.finished {
                self.settle_hold(t, p.hold, !gone)
            } else {
                None
            };
            if gone {
                if !t.finished {
                    aborted.push(t.id);
                }
                continue;
            }
            // Streams end with the `finished` token itself; finals get everything now.
            if let Reply::Final(tx) = p.reply {
                let _ = tx.send(FinalOutput {
                    tokens: p.tokens,
                    prompt_tokens: t.prompt_tokens,
                    cached_tokens: t.cached_tokens,
                    stop: t.stop,
                    kv_blocks,
                });
            }
        }
    }
}
