//! KV events the engine emits, and where they go.
//!
//! The engine collects its events per step in the order they happened (removals made room
//! during scheduling, then stores of the blocks the step filled) and hands the step's list to
//! an [`EventSink`] as one batch, as vLLM publishes one `KVEventBatch` per scheduler step
//! (`kv-event-wire.md` §2.1). Hashes are the engine's own (see [`crate::kv_pool`]), never the
//! router's.
use std::sync::{mpsc, Arc};

use crate::lora::CacheKeys;

/// One KV cache event, in vLLM's vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// A request's newly cached full blocks of one step, as one chain: `block_hashes[i]` is
    /// block i's engine hash, `parent_block_hash` the block before the first (None at the
    /// sequence start), `token_ids` all their tokens (`len == block_hashes.len() * block_size`).
    Stored {
        /// Engine chained hashes, one per block.
        block_hashes: Vec<u64>,
        /// Engine hash of the block preceding the chain.
        parent_block_hash: Option<u64>,
        /// Tokens of every block, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// The request's adapter and cache salt, when it had either (see [`crate::lora`]).
        keys: Option<Arc<CacheKeys>>,
    },
    /// One evicted block.
    Removed {
        /// Engine hash of the block.
        block_hash: u64,
    },
    /// Every cached block is gone (`reset_prefix_cache`).
    AllCleared,
}

/// Where a worker's event batches go. Called from the worker's engine task once per step that
/// produced events; `ts` is the wall clock in seconds since the Unix epoch.
pub trait EventSink: Send + 'static {
    /// Publishes one step's events, in order. Failures are the sink's to log; the engine
    /// keeps serving.
    fn publish(&mut self, ts: f64, events: &[KvEvent]);
}

/// Drops every event (prefix caching off, or nobody listens).
#[derive(Debug, Default)]
pub struct NullSink;

impl EventSink for NullSink {
    fn publish(&mut self, _ts: f64, _events: &[KvEvent]) {}
}

/// Sends each batch down a channel (tests, in-process consumers). A gone receiver is ignored.
#[derive(Debug)]
pub struct ChannelSink(pub mpsc::Sender<Vec<KvEvent>>);

impl EventSink for ChannelSink {
    fn publish(&mut self, _ts: f64, events: &[KvEvent]) {
        let _ = self.0.send(events.to_vec());
    }
}

impl<F: FnMut(f64, &[KvEvent]) + Send + 'static> EventSink for F {
    fn publish(&mut self, ts: f64, events: &[KvEvent]) {
        self(ts, events)
    }
}
