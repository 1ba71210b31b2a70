//! ZMQ publisher of KV events in the engines' wire format.
use crate::engine::{Encoding, EngineBatch};
use crate::WireError;

/// Publisher settings. Defaults: `tcp://127.0.0.1:0` (ephemeral port), no replay, empty topic,
/// 10 000 buffered batches (vLLM's `buffer_steps`), map encoding (vLLM ≥ 0.24).
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Where the PUB socket binds, e.g. `tcp://*:5557`; port 0 picks a free port.
    pub endpoint: String,
    /// Where the replay ROUTER binds, if any.
    pub replay_endpoint: Option<String>,
    /// Topic frame of every message.
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
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

/// A KV-event publisher (PUB + optional replay ROUTER). `publish` takes `&self` and never blocks.
pub struct KvEventPublisher {
    endpoint: String,
    replay_endpoint: Option<String>,
}

impl KvEventPublisher {
    /// Binds the sockets.
    pub fn bind(_config: PublisherConfig) -> Result<Self, WireError> {
        Err(WireError::Config("publisher not implemented yet".into()))
    }

    /// Publishes one batch; returns its sequence number.
    pub fn publish(&self, _batch: &EngineBatch) -> Result<u64, WireError> {
        Err(WireError::Config("publisher not implemented yet".into()))
    }

    /// The PUB socket's actual address (resolved port when bound to port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay ROUTER's actual address.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }
}
