//! ZMQ subscriber of one worker rank's KV events, with gap detection and replay.
use std::sync::mpsc::SyncSender;

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};

use crate::WireError;

/// Subscriber settings.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The worker rank whose events these are.
    pub worker: WorkerWithDpRank,
    /// The engine's PUB endpoint (connect) or our address (bind).
    pub endpoint: String,
    /// The engine's replay ROUTER, if it has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (`""` = all).
    pub topic: String,
    /// Bind instead of connect (vLLM connects when its endpoint has no wildcard).
    pub bind: bool,
    /// The engine's block size in tokens.
    pub block_size: u32,
    /// Raw messages buffered between the socket and the converter; beyond it they are dropped.
    pub queue_capacity: usize,
}

/// Per-worker counters (totals since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    pub received: u64,
    pub applied: u64,
    pub dropped: u64,
    pub gaps: u64,
    pub recovered: u64,
}

/// A running subscriber (its own threads).
pub struct KvEventSubscriber {}

impl KvEventSubscriber {
    pub fn start(
        _config: SubscriberConfig,
        _sink: SyncSender<RouterEvent>,
    ) -> Result<Self, WireError> {
        Err(WireError::Config("subscriber not implemented yet".into()))
    }

    pub fn stats(&self) -> SubscriberStats {
        SubscriberStats::default()
    }

    pub fn stop(self) {}
}
