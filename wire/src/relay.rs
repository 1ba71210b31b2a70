//! Relay: an engine's KV events, normalised and republished on our own [`KvEventPublisher`]
//! (the Python `KvEventPublisher(zmq_endpoint=...)`, like Dynamo's relay mode).
//!
//! One thread owns a SUB socket on the engine's PUB endpoint (connect, or bind when the engine
//! connects). Each live batch, of any vLLM or SGLang version, is decoded by
//! [`decode_batch`](crate::engine::decode_batch) and *normalised*: events the router would drop
//! anyway are dropped here (KV groups other than full attention, `locality` other than
//! `LOCAL`, stores whose `block_size` differs from the configured one), a batch published for
//! another data-parallel rank is dropped whole, and the rest is re-encoded in vLLM's current
//! encoding with our dp rank and republished under our own sequence numbers (a batch left
//! empty is not republished). Engine hashes, token ids, LoRA names, salts and multimodal infos
//! pass through unchanged.
//!
//! Upstream sequence numbers are followed as the subscriber does (`subscriber` module): a gap
//! (or a late join whose first seq is above 0) is replayed from the engine's replay ROUTER when
//! one is configured and republished in order; a gap that cannot be replayed, and a publisher
//! restart (seq going back), are republished as `AllBlocksCleared`, so that whoever follows us
//! drops what may be stale rather than route on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::convert::is_full_attention;
use crate::engine::{decode_batch, DecodeStats, EngineBatch, EngineEvent};
use crate::frame::{split_message, split_replay_reply, ReplayReply, END_SEQ};
use crate::publisher::KvEventPublisher;
use crate::subscriber::ReplayLimits;
use crate::WireError;

/// Poll interval for noticing `stop`.
const TICK_MS: i64 = 50;
/// Largest live message or replay reply accepted (all frames), as the subscriber's default.
const MAX_MESSAGE_BYTES: i64 = 64 << 20;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The engine's PUB endpoint (or our address to bind when `bind`).
    pub endpoint: String,
    /// The engine's replay ROUTER, used to recover gaps and late joins.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (`""` = all).
    pub topic: String,
    /// Bind the SUB socket instead of connecting (vLLM connects for non-wildcard endpoints).
    pub bind: bool,
    /// Data-parallel rank of the engine endpoint; batches for another rank are dropped.
    pub dp_rank: u32,
    /// The engine's block size; stores of another size are dropped.
    pub block_size: u32,
    /// Bounds on one replay.
    pub replay: ReplayLimits,
}

/// Counters since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Live messages read from the engine.
    pub received: u64,
    /// Batches republished (live, replayed, and the `AllBlocksCleared` the relay adds).
    pub published: u64,
    /// Events dropped by normalisation (group, locality, block size).
    pub filtered_events: u64,
    /// Batches dropped whole: another dp rank, or nothing left after normalisation.
    pub dropped_batches: u64,
    /// Messages that are not `[topic, seq, payload]` or whose payload does not decode.
    pub bad_messages: u64,
    /// Upstream gaps (and late joins) seen.
    pub gaps: u64,
    /// Gaps recovered by replay.
    pub recovered: u64,
    /// `AllBlocksCleared` batches published for unrecoverable gaps and restarts.
    pub cleared: u64,
    /// Upstream publisher restarts (seq went back).
    pub restarts: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    published: AtomicU64,
    filtered_events: AtomicU64,
    dropped_batches: AtomicU64,
    bad_messages: AtomicU64,
    gaps: AtomicU64,
    recovered: AtomicU64,
    cleared: AtomicU64,
    restarts: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A running relay. Dropping it stops it.
pub struct KvEventRelay {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
    endpoint: String,
}

impl KvEventRelay {
    /// Opens the SUB socket and starts relaying into `publisher`.
    ///
    /// Errors: [`WireError::Zmq`] when the endpoint cannot be connected or bound,
    /// [`WireError::Config`] for a zero block size.
    pub fn start(config: RelayConfig, publisher: Arc<KvEventPublisher>) -> Result<Self, WireError> {
        if config.block_size == 0 {
            return Err(WireError::Config("block_size must be > 0".into()));
        }
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_rcvhwm(100_000)?;
        sub.set_linger(0)?;
        sub.set_maxmsgsize(MAX_MESSAGE_BYTES)?;
        sub.set_reconnect_ivl(100)?;
        sub.set_reconnect_ivl_max(5_000)?;
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
        let worker = Worker {
            ctx,
            sub,
            config,
            publisher,
            counters: counters.clone(),
            stop: stop.clone(),
            next: None,
            last_live: None,
            warned: 0,
        };
        let thread = std::thread::Builder::new()
            .name("kv-relay".into())
            .spawn(move || worker.run())
            .map_err(|_| WireError::Thread("relay"))?;
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
            endpoint,
        })
    }

    /// The upstream endpoint in use (the resolved address when bound to port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        let c = &*self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            received: g(&c.received),
            published: g(&c.published),
            filtered_events: g(&c.filtered_events),
            dropped_batches: g(&c.dropped_batches),
            bad_messages: g(&c.bad_messages),
            gaps: g(&c.gaps),
            recovered: g(&c.recovered),
            cleared: g(&c.cleared),
            restarts: g(&c.restarts),
        }
    }

    /// Stops the relay thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for KvEventRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    ctx: zmq::Context,
    sub: zmq::Socket,
    config: RelayConfig,
    publisher: Arc<KvEventPublisher>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Next upstream seq expected; `None` before the first message.
    next: Option<u64>,
    /// Last upstream seq seen live.
    last_live: Option<u64>,
    /// Warnings already logged (bit per kind), so a misconfigured engine logs once.
    warned: u8,
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            match self.sub.poll(zmq::POLLIN, TICK_MS) {
                Ok(n) if n > 0 => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!("relay SUB poll failed: {e}");
                    return;
                }
            }
            loop {
                let frames = match self.sub.recv_multipart(zmq::DONTWAIT) {
                    Ok(f) => f,
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => {
                        tracing::error!("relay SUB recv failed: {e}");
                        return;
                    }
                };
                inc(&self.counters.received);
                self.live(&frames);
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        }
    }

    fn live(&mut self, frames: &[Vec<u8>]) {
        let msg = match split_message(frames) {
            Ok(m) if m.seq != END_SEQ => m,
            _ => {
                inc(&self.counters.bad_messages);
                return;
            }
        };
        let seq = msg.seq;
        if self.last_live.is_some_and(|last| seq <= last) {
            inc(&self.counters.restarts);
            tracing::warn!(
                seq,
                "relayed publisher restarted (sequence went back): clearing"
            );
            self.publish_cleared();
            self.next = None;
        }
        self.last_live = Some(seq);
        // (ZMQ keeps order, so a seq at or below the last one is a restart, handled above.)
        match self.next {
            Some(n) if seq > n => self.recover(n, seq),
            None if seq > 0 => self.recover(0, seq),
            _ => {}
        }
        self.relay(msg.payload);
        self.next = Some(seq + 1);
    }

    /// Replays `[from, live)` and republishes it, or clears when that is impossible. A late
    /// join (`from == 0`, nothing relayed yet) republishes whatever the ring still has and
    /// clears nothing: nothing of this engine was published before.
    fn recover(&mut self, from: u64, live: u64) {
        inc(&self.counters.gaps);
        let joining = self.next.is_none();
        let Some(ep) = self.config.replay_endpoint.clone() else {
            if !joining {
                tracing::warn!(
                    from,
                    live,
                    "relay: upstream gap and no replay endpoint: clearing"
                );
                self.publish_cleared();
            }
            return;
        };
        match self.fetch(&ep, from, live) {
            Ok((batches, complete)) if complete || joining => {
                if complete {
                    inc(&self.counters.recovered);
                }
                // Only the batches right before `live` are contiguous with it.
                let mut first = live;
                while first > from && batches.contains_key(&(first - 1)) {
                    first -= 1;
                }
                for (_, payload) in batches.range(first..live) {
                    self.relay(payload);
                }
            }
            Ok(_) => {
                tracing::warn!(
                    from,
                    live,
                    "relay: the replay ring no longer holds the gap: clearing"
                );
                self.publish_cleared();
            }
            Err(why) => {
                if !joining {
                    tracing::warn!(from, live, "relay: replay failed ({why}): clearing");
                    self.publish_cleared();
                }
            }
        }
    }

    /// Asks the replay ROUTER for the batches `[from, until)`. Returns those received and
    /// whether all of them were.
    fn fetch(
        &self,
        ep: &str,
        from: u64,
        until: u64,
    ) -> Result<(BTreeMap<u64, Vec<u8>>, bool), String> {
        let l = &self.config.replay;
        let e = |e: zmq::Error| format!("replay socket: {e}");
        let dealer = self.ctx.socket(zmq::DEALER).map_err(e)?;
        dealer.set_linger(0).map_err(e)?;
        dealer.set_rcvhwm(0).map_err(e)?;
        dealer.set_maxmsgsize(MAX_MESSAGE_BYTES).map_err(e)?;
        dealer.connect(ep).map_err(e)?;
        let start = from.to_be_bytes();
        let req: [&[u8]; 2] = [b"", &start];
        dealer.send_multipart(req, 0).map_err(e)?;
        let want = until - from;
        let deadline = Instant::now() + l.deadline;
        let mut quiet_until = Instant::now() + l.silence;
        let mut got = BTreeMap::new();
        let (mut replies, mut bytes) = (0usize, 0usize);
        loop {
            if got.len() as u64 == want {
                return Ok((got, true));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err("stopped".into());
            }
            let now = Instant::now();
            if now >= deadline || now >= quiet_until {
                return Err(format!("no complete answer ({replies} replies)"));
            }
            let wait = (deadline.min(quiet_until) - now).as_millis() as i64;
            if dealer
                .poll(zmq::POLLIN, wait.clamp(1, TICK_MS))
                .map_err(e)?
                == 0
            {
                continue;
            }
            let mut frames = dealer.recv_multipart(0).map_err(e)?;
            quiet_until = Instant::now() + l.silence;
            replies += 1;
            bytes += frames.iter().map(Vec::len).sum::<usize>();
            if replies > l.max_batches || bytes > l.max_bytes {
                return Err("replay limits exceeded".into());
            }
            match split_replay_reply(&frames) {
                Ok(ReplayReply::End) => return Ok((got, false)),
                Ok(ReplayReply::Batch { seq, .. }) if (from..until).contains(&seq) => {
                    let payload = frames.pop().unwrap_or_default();
                    got.insert(seq, payload);
                }
                Ok(ReplayReply::Batch { .. }) | Err(_) => {}
            }
        }
    }

    /// Decodes, normalises and republishes one upstream batch.
    fn relay(&mut self, payload: &[u8]) {
        let mut stats = DecodeStats::default();
        let batch = match decode_batch(payload, &mut stats) {
            Ok(b) => b,
            Err(e) => {
                inc(&self.counters.bad_messages);
                self.warn_once(
                    1,
                    format_args!("relay: undecodable KV event batch dropped: {e}"),
                );
                return;
            }
        };
        let rank = self.config.dp_rank;
        if batch.dp_rank.is_some_and(|r| r != rank) {
            inc(&self.counters.dropped_batches);
            let got = batch.dp_rank;
            self.warn_once(
                2,
                format_args!("relay: batch for dp rank {got:?} dropped (relaying rank {rank})"),
            );
            return;
        }
        let before = batch.events.len();
        let events: Vec<EngineEvent> = batch
            .events
            .into_iter()
            .filter(|ev| self.keep(ev))
            .collect();
        let dropped = (before - events.len()) as u64;
        if dropped > 0 {
            self.counters
                .filtered_events
                .fetch_add(dropped, Ordering::Relaxed);
            self.warn_once(
                4,
                format_args!("relay: events of other KV groups, remote locality or another block size dropped"),
            );
        }
        if events.is_empty() {
            inc(&self.counters.dropped_batches);
            return;
        }
        self.publish(EngineBatch {
            ts: batch.ts,
            events,
            dp_rank: Some(rank),
        });
    }

    fn keep(&self, ev: &EngineEvent) -> bool {
        let local =
            |l: &Option<String>| l.as_deref().is_none_or(|l| l.eq_ignore_ascii_case("LOCAL"));
        match ev {
            EngineEvent::BlockStored(s) => {
                local(&s.locality)
                    && is_full_attention(
                        s.kv_cache_spec_kind.as_deref(),
                        s.kv_cache_spec_sliding_window,
                        s.group_idx,
                    )
                    && s.block_size == self.config.block_size
            }
            EngineEvent::BlockRemoved(r) => {
                local(&r.locality)
                    && is_full_attention(
                        r.kv_cache_spec_kind.as_deref(),
                        r.kv_cache_spec_sliding_window,
                        r.group_idx,
                    )
            }
            EngineEvent::AllBlocksCleared => true,
        }
    }

    fn publish_cleared(&mut self) {
        inc(&self.counters.cleared);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.publish(EngineBatch {
            ts,
            events: vec![EngineEvent::AllBlocksCleared],
            dp_rank: Some(self.config.dp_rank),
        });
    }

    fn publish(&mut self, batch: EngineBatch) {
        match self.publisher.publish(&batch) {
            Ok(_) => inc(&self.counters.published),
            Err(e) => self.warn_once(8, format_args!("relay: publishing failed: {e}")),
        }
    }

    fn warn_once(&mut self, bit: u8, msg: std::fmt::Arguments<'_>) {
        if self.warned & bit == 0 {
            self.warned |= bit;
            tracing::warn!("{msg}");
        }
    }
}
