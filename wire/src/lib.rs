//! # kvrouter-wire
//!
//! KV events on the wire: what vLLM and SGLang publish over ZMQ, turned into the core's
//! [`RouterEvent`]s, and the same format published by us (`README.md` beside this crate).
//!
//! * [`msgpack`] — tolerant, borrowing MessagePack reader (never panics, bounded lengths).
//! * [`engine`] — engine events of every vLLM/SGLang version ([`EngineBatch`]) and their codec.
//! * [`frame`] — the 3-frame ZMQ message and both replay reply layouts.
//! * [`convert`] — engine events → [`RouterEvent`]s (re-hashing, filters, event ids).
//! * [`json`] — canonical JSON lines of [`RouterEvent`]s.
//! * [`subscriber`] — ZMQ SUB per worker rank with gap detection and bounded replay.
//! * [`publisher`] — ZMQ PUB + replay ROUTER with a ring buffer.
//! * [`relay`] — an engine's events normalised and republished on a [`KvEventPublisher`].
//! * [`trtllm`] — TensorRT-LLM's JSON events (`POST /kv_cache_events`) and their conversion.

pub mod convert;
pub mod engine;
pub mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod json;
pub mod msgpack;
pub mod publisher;
pub mod relay;
pub mod subscriber;
pub mod trtllm;

pub use convert::{ConvertStats, Converter};
pub use engine::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, DecodeStats, Encoding, EngineBatch,
    EngineEvent, FormatCounts, WireFormat,
};
pub use frame::FrameError;
pub use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
pub use msgpack::MsgpackError;
pub use publisher::{KvEventPublisher, PublisherConfig};
pub use relay::{KvEventRelay, RelayConfig, RelayStats};
pub use subscriber::{
    KvEventSubscriber, ReplayLimits, SubscriberConfig, SubscriberState, SubscriberStats,
};

/// Every error this crate returns.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A socket could not be created, bound, connected or used.
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    /// A multipart message is not `[topic, seq, payload]` (or a replay reply).
    #[error("bad frames: {0}")]
    Frame(#[from] FrameError),
    /// A payload is not a decodable `KVEventBatch`.
    #[error("bad msgpack: {0}")]
    Msgpack(#[from] MsgpackError),
    /// A canonical JSON event line does not parse.
    #[error("bad JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An error on a given 1-based line of a JSON-lines input.
    #[error("line {line}: {source}")]
    Line { line: usize, source: Box<WireError> },
    /// Reading or writing a stream failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A configuration value is unusable (e.g. block size 0).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A worker thread could not be spawned.
    #[error("{0} thread could not be started or stopped")]
    Thread(&'static str),
}
