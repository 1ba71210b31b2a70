//! ZMQ publisher of KV events in the engines' wire format (`kv-event-wire.md` §2.1), for the
//! mock engine and custom engines.
//!
//! * PUB socket: 3-frame messages `[topic, seq (8-byte BE, from 0), msgpack batch]`.
//! * Optional replay ROUTER with a ring buffer of the last `buffer_steps` batches, served on its
//!   own thread: a request `["", start_seq]` gets one reply `["", topic, seq, payload]` per
//!   buffered batch with `seq >= start_seq`, then `["", "", ff×8, ""]` (vLLM ≥ 0.26 layout).
//!
//! `publish` takes `&self` (the socket sits behind a mutex held only for the non-blocking
//! send); a full PUB queue drops the message as libzmq does, and it stays replayable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::engine::{encode_batch, Encoding, EngineBatch};
use crate::frame::END_SEQ;
use crate::WireError;

/// Publisher settings. Defaults: `tcp://127.0.0.1:0` (ephemeral port), no replay, empty topic,
/// 10 000 buffered batches (vLLM's `buffer_steps`), map encoding (vLLM ≥ 0.24).
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Where the PUB socket binds, e.g. `tcp://*:5557`; port 0 picks a free port.
    pub endpoint: String,
    /// Where the replay ROUTER binds, if any (port 0 allowed).
    pub replay_endpoint: Option<String>,
    /// Topic frame of every message.
    pub topic: String,
    /// Batches kept for replay (0 = replay socket answers with the end marker only).
    pub buffer_steps: usize,
    /// Event encoding: [`Encoding::Map`] (vLLM ≥ 0.24, default), [`Encoding::Array`] (vLLM ≤
    /// 0.23) or [`Encoding::Sglang`].
    pub encoding: Encoding,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            endpoint: "tcp://127.0.0.1:0".into(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            encoding: Encoding::Map,
        }
    }
}

type Ring = VecDeque<(u64, Arc<[u8]>)>;

struct PubState {
    socket: zmq::Socket,
    next_seq: u64,
}

/// A KV-event publisher (PUB + optional replay ROUTER). Shareable across threads (`&self`).
pub struct KvEventPublisher {
    state: Mutex<PubState>,
    ring: Arc<Mutex<Ring>>,
    topic: Vec<u8>,
    encoding: Encoding,
    buffer_steps: usize,
    endpoint: String,
    replay_endpoint: Option<String>,
    stop: Arc<AtomicBool>,
    replay_thread: Option<JoinHandle<()>>,
    _ctx: zmq::Context,
}

/// libzmq wants `*`-style wildcards for ephemeral ports; accept `:0` too.
fn bind_addr(endpoint: &str) -> String {
    match endpoint.strip_suffix(":0") {
        Some(host) if endpoint.starts_with("tcp://") => format!("{host}:*"),
        _ => endpoint.to_owned(),
    }
}

fn last_endpoint(s: &zmq::Socket) -> Result<String, WireError> {
    let ep = s
        .get_last_endpoint()?
        .map_err(|_| WireError::Config("non-UTF-8 endpoint".into()))?;
    // A wildcard bind reports 0.0.0.0; give callers something they can connect to.
    Ok(ep.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:"))
}

impl KvEventPublisher {
    /// Binds the PUB socket (and the replay ROUTER when configured) and starts the replay thread.
    ///
    /// Errors: [`WireError::Zmq`] when an endpoint cannot be bound.
    pub fn bind(config: PublisherConfig) -> Result<Self, WireError> {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::PUB)?;
        socket.set_sndhwm(100_000)?; // vLLM's default HWM
        socket.set_linger(0)?;
        socket.bind(&bind_addr(&config.endpoint))?;
        let endpoint = last_endpoint(&socket)?;
        let ring: Arc<Mutex<Ring>> = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let topic = config.topic.into_bytes();
        let (replay_endpoint, replay_thread) = match &config.replay_endpoint {
            None => (None, None),
            Some(ep) => {
                let router = ctx.socket(zmq::ROUTER)?;
                router.set_linger(0)?;
                router.set_sndhwm(0)?; // replies are bounded by the ring; never drop them
                router.bind(&bind_addr(ep))?;
                let actual = last_endpoint(&router)?;
                let (ring, stop, topic) = (ring.clone(), stop.clone(), topic.clone());
                let h = std::thread::Builder::new()
                    .name("kv-replay".into())
                    .spawn(move || serve_replay(router, ring, stop, topic))
                    .map_err(|_| WireError::Thread("replay"))?;
                (Some(actual), Some(h))
            }
        };
        Ok(Self {
            state: Mutex::new(PubState {
                socket,
                next_seq: 0,
            }),
            ring,
            topic,
            encoding: config.encoding,
            buffer_steps: if config.replay_endpoint.is_some() {
                config.buffer_steps
            } else {
                0
            },
            endpoint,
            replay_endpoint,
            stop,
            replay_thread,
            _ctx: ctx,
        })
    }

    /// Encodes and publishes one batch; returns its sequence number (0, 1, 2, ...).
    ///
    /// Never blocks on slow subscribers: at the PUB high-water mark libzmq drops the message
    /// (subscribers see a gap and replay it). Errors: [`WireError::Zmq`] on socket failure.
    pub fn publish(&self, batch: &EngineBatch) -> Result<u64, WireError> {
        let payload: Arc<[u8]> = encode_batch(batch, self.encoding).into();
        self.publish_payload(payload)
    }

    /// Publishes an already encoded payload (for relays and tests of foreign encodings).
    pub fn publish_payload(&self, payload: Arc<[u8]>) -> Result<u64, WireError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = st.next_seq;
        st.next_seq += 1;
        if self.buffer_steps > 0 {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() == self.buffer_steps {
                ring.pop_front();
            }
            ring.push_back((seq, payload.clone()));
        }
        let seq_bytes = seq.to_be_bytes();
        let frames: [&[u8]; 3] = [&self.topic, &seq_bytes, &payload];
        match st.socket.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) | Err(zmq::Error::EAGAIN) => Ok(seq),
            Err(e) => Err(e.into()),
        }
    }

    /// The PUB socket's actual address (resolved port when bound to port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay ROUTER's actual address.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_seq
    }
}

impl Drop for KvEventPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.replay_thread.take() {
            let _ = h.join();
        }
    }
}

fn serve_replay(
    router: zmq::Socket,
    ring: Arc<Mutex<Ring>>,
    stop: Arc<AtomicBool>,
    topic: Vec<u8>,
) {
    while !stop.load(Ordering::Relaxed) {
        match router.poll(zmq::POLLIN, 100) {
            Ok(n) if n > 0 => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("replay socket poll failed: {e}");
                return;
            }
        }
        let Ok(frames) = router.recv_multipart(zmq::DONTWAIT) else {
            continue;
        };
        // [identity, "", start_seq] (DEALER) or [identity, start_seq].
        let Some(identity) = frames.first() else {
            continue;
        };
        let start = frames
            .last()
            .and_then(|f| <[u8; 8]>::try_from(f.as_slice()).ok())
            .map(u64::from_be_bytes);
        let Some(start) = start.filter(|_| frames.len() >= 2) else {
            tracing::warn!(
                "malformed replay request of {} frames ignored",
                frames.len()
            );
            continue;
        };
        let batches: Vec<(u64, Arc<[u8]>)> = {
            let ring = ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.iter().filter(|(s, _)| *s >= start).cloned().collect()
        };
        for (seq, payload) in batches {
            let seq = seq.to_be_bytes();
            let msg: [&[u8]; 5] = [identity, b"", &topic, &seq, &payload];
            if router.send_multipart(msg, 0).is_err() {
                break;
            }
        }
        let end = END_SEQ.to_be_bytes();
        let msg: [&[u8]; 5] = [identity, b"", b"", &end, b""];
        let _ = router.send_multipart(msg, 0);
    }
}
