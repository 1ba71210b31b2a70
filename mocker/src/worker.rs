//! The live driver: one tokio task per engine stepping it against the wall clock, and the
//! handle the HTTP layer talks to.
//!
//! The task drains commands (new requests, aborts, resets, snapshots), runs a step, sleeps for
//! the step's modelled duration (none at `speedup_ratio` 0, where it only yields so requests
//! arriving meanwhile join the next batch), then delivers tokens, publishes the step's KV
//! events as one batch and updates the metrics.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, OutputSource, StepOutput, StopReason, TokenOutput};
use crate::events::{EventSink, KvEvent};
use crate::metrics::Metrics;
use crate::scheduler::SeqId;

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
}

/// Starts the engine task on the current tokio runtime. It stops when every handle is gone
/// or `shutdown` fires.
pub fn spawn_engine(
    engine: Engine,
    sink: Box<dyn EventSink>,
    shutdown: oneshot::Receiver<()>,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let handle = WorkerHandle {
        tx,
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(run(engine, rx, sink, metrics, shutdown));
    (handle, task)
}

/// Largest lag behind the modelled step cadence that the next step absorbs.
const MAX_STEP_LAG: std::time::Duration = std::time::Duration::from_millis(5);

struct Pending {
    reply: Reply,
    tokens: Vec<u32>,
}

struct Loop {
    engine: Engine,
    sink: Box<dyn EventSink>,
    metrics: Arc<Mutex<Metrics>>,
    pending: HashMap<SeqId, Pending>,
    start: Instant,
    batches: u64,
    idle_events: Vec<KvEvent>,
}

async fn run(
    engine: Engine,
    mut rx: mpsc::UnboundedReceiver<Command>,
    sink: Box<dyn EventSink>,
    metrics: Arc<Mutex<Metrics>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut l = Loop {
        engine,
        sink,
        metrics,
        pending: HashMap::new(),
        start: Instant::now(),
        batches: 0,
        idle_events: Vec::new(),
    };
    let mut out = StepOutput::default();
    let mut aborted = Vec::new();
    // When the previous step is modelled to end; None after an idle wait.
    let mut planned_end: Option<Instant> = None;
    loop {
        if !l.engine.has_work() {
            planned_end = None;
            tokio::select! {
                _ = &mut shutdown => return,
                cmd = rx.recv() => match cmd {
                    Some(c) => l.handle(c),
                    None => return,
                },
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
            } => {
                let now = self.start.elapsed().as_secs_f64();
                match self
                    .engine
                    .add_request_with(id, prompt, max_tokens, now, output)
                {
                    Ok(()) => {
                        self.pending.insert(
                            id,
                            Pending {
                                reply,
                                tokens: Vec::new(),
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
                });
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
                continue;
            };
            let gone = match &p.reply {
                Reply::Stream(tx) => tx.send(*t).is_err(),
                Reply::Final(tx) => {
                    p.tokens.push(t.token);
                    tx.is_closed()
                }
            };
            if gone {
                self.pending.remove(&t.id);
                if !t.finished {
                    aborted.push(t.id);
                }
                continue;
            }
            if t.finished {
                // Streams end with the `finished` token itself; finals get everything now.
                if let Some(Pending {
                    reply: Reply::Final(tx),
                    tokens,
                }) = self.pending.remove(&t.id)
                {
                    let _ = tx.send(FinalOutput {
                        tokens,
                        prompt_tokens: t.prompt_tokens,
                        cached_tokens: t.cached_tokens,
                        stop: t.stop,
                    });
                }
            }
        }
    }
}
