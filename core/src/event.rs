//! The KV event model every engine's events are converted to (Dynamo's `RouterEvent`).
//!
//! Shapes follow `dynamo-router-spec.md` §3.1; the serde derives give exactly Dynamo's JSON
//! (`{"worker_id":7,"storage_tier":"device","event":{"event_id":0,"data":{"stored":{..}},"dp_rank":0}}`,
//! with `data` one of `{"stored":{parent_hash,start_position,blocks}}`, `{"removed":{block_hashes}}`
//! or the bare string `"cleared"`). Unknown JSON fields are ignored on input.

use serde::{Deserialize, Serialize};

use crate::hash::{ExternalHash, LocalBlockHash};

/// A worker's id (Dynamo's instance id). One worker may serve several data-parallel ranks.
pub type WorkerId = u64;

/// Data-parallel rank inside a worker.
pub type DpRank = u32;

/// The routing unit: one data-parallel rank of one worker.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize,
)]
pub struct WorkerWithDpRank {
    pub worker_id: WorkerId,
    #[serde(default)]
    pub dp_rank: DpRank,
}

impl WorkerWithDpRank {
    pub const fn new(worker_id: WorkerId, dp_rank: DpRank) -> Self {
        Self { worker_id, dp_rank }
    }
}

impl std::fmt::Display for WorkerWithDpRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.worker_id, self.dp_rank)
    }
}

/// Where a cached block lives. Engines report it as `medium`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    /// Accelerator memory (`GPU`, `DEVICE`).
    #[default]
    Device,
    /// Host memory (`CPU`, `CPU_PINNED`, `CPU_TIER1`).
    HostPinned,
    /// Local disk (`CPU_TIER2`, `DISK`, `NVME`, `STORAGE`).
    Disk,
    /// Outside the worker (`EXTERNAL`, `NETWORK`, `REMOTE`, `SHARED`); not routed on.
    External,
}

impl StorageTier {
    /// Dynamo's mapping of an engine `medium` string (case-insensitive); `None` if unknown.
    pub fn from_medium(medium: &str) -> Option<Self> {
        let m = medium.to_ascii_uppercase();
        Some(match m.as_str() {
            "GPU" | "DEVICE" => Self::Device,
            "CPU" | "CPU_PINNED" | "CPU_TIER1" => Self::HostPinned,
            "CPU_TIER2" | "DISK" | "NVME" | "STORAGE" => Self::Disk,
            "EXTERNAL" | "NETWORK" | "REMOTE" | "SHARED" => Self::External,
            _ => return None,
        })
    }
}

/// One multimodal object placed in a block: its hash and token offset ranges (not hashed).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct MmObject {
    pub mm_hash: u64,
    #[serde(default)]
    pub offsets: Vec<(u32, u32)>,
}

/// Multimodal objects of one block (`block_mm_infos[i]` on the wire).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct BlockMmInfo {
    pub mm_objects: Vec<MmObject>,
}

/// One stored block: the engine's hash (opaque) and the router's hash of its tokens.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StoredBlock {
    /// Engine hash, used for parent lookups and removals of this worker only.
    pub block_hash: ExternalHash,
    /// Router local hash of the block's tokens: what the index is keyed by.
    pub tokens_hash: LocalBlockHash,
    #[serde(default)]
    pub mm_extra_info: Option<BlockMmInfo>,
}

/// A chain of newly cached blocks, the first one a child of `parent_hash` (or of the sequence
/// start when `None`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StoredData {
    pub parent_hash: Option<ExternalHash>,
    /// Absolute position of the first block, when the publisher knows it. Informational.
    #[serde(default)]
    pub start_position: Option<u32>,
    pub blocks: Vec<StoredBlock>,
}

/// Blocks evicted from the cache, by engine hash.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct RemovedData {
    pub block_hashes: Vec<ExternalHash>,
}

/// What happened to a worker rank's cache.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(StoredData),
    Removed(RemovedData),
    /// Every block of the rank is gone (engine `AllBlocksCleared`, e.g. on `reset_prefix_cache`).
    Cleared,
}

/// One event of one `(worker, dp_rank)` publisher. `event_id` increases by one per event of
/// that publisher; a jump is a gap (spec §3.4).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KvCacheEvent {
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: DpRank,
}

/// A KV event addressed to a worker: the unit the index applies.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: WorkerId,
    #[serde(default)]
    pub storage_tier: StorageTier,
    pub event: KvCacheEvent,
}

impl RouterEvent {
    pub fn new(worker: WorkerWithDpRank, event_id: u64, data: KvCacheEventData) -> Self {
        Self {
            worker_id: worker.worker_id,
            storage_tier: StorageTier::Device,
            event: KvCacheEvent {
                event_id,
                data,
                dp_rank: worker.dp_rank,
            },
        }
    }

    /// The routing unit this event belongs to.
    pub fn worker(&self) -> WorkerWithDpRank {
        WorkerWithDpRank::new(self.worker_id, self.event.dp_rank)
    }

    /// Number of blocks the event carries (0 for removals' hashes are counted, cleared is 0).
    pub fn num_blocks(&self) -> usize {
        match &self.event.data {
            KvCacheEventData::Stored(s) => s.blocks.len(),
            KvCacheEventData::Removed(r) => r.block_hashes.len(),
            KvCacheEventData::Cleared => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_matches_dynamo_shape() {
        let ev = RouterEvent::new(
            WorkerWithDpRank::new(7, 0),
            0,
            KvCacheEventData::Stored(StoredData {
                parent_hash: None,
                start_position: None,
                blocks: vec![StoredBlock {
                    block_hash: ExternalHash(1000),
                    tokens_hash: LocalBlockHash(16863443419780771464),
                    mm_extra_info: None,
                }],
            }),
        );
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            json,
            r#"{"worker_id":7,"storage_tier":"device","event":{"event_id":0,"data":{"stored":{"parent_hash":null,"start_position":null,"blocks":[{"block_hash":1000,"tokens_hash":16863443419780771464,"mm_extra_info":null}]}},"dp_rank":0}}"#
        );
        let cleared: RouterEvent = serde_json::from_str(
            r#"{"worker_id":3,"event":{"event_id":5,"data":"cleared","dp_rank":1},"residency_domain":"worker"}"#,
        )
        .unwrap();
        assert_eq!(cleared.worker(), WorkerWithDpRank::new(3, 1));
        assert_eq!(cleared.storage_tier, StorageTier::Device);
        assert_eq!(cleared.event.data, KvCacheEventData::Cleared);
        let removed: KvCacheEvent =
            serde_json::from_str(r#"{"event_id":1,"data":{"removed":{"block_hashes":[1,2]}}}"#)
                .unwrap();
        assert_eq!(
            removed.data,
            KvCacheEventData::Removed(RemovedData {
                block_hashes: vec![ExternalHash(1), ExternalHash(2)]
            })
        );
    }

    #[test]
    fn medium_mapping() {
        assert_eq!(StorageTier::from_medium("GPU"), Some(StorageTier::Device));
        assert_eq!(
            StorageTier::from_medium("cpu_tier1"),
            Some(StorageTier::HostPinned)
        );
        assert_eq!(StorageTier::from_medium("NVME"), Some(StorageTier::Disk));
        assert_eq!(
            StorageTier::from_medium("SHARED"),
            Some(StorageTier::External)
        );
        assert_eq!(StorageTier::from_medium("floppy"), None);
    }
}
