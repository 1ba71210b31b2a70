//! One exact index per storage tier, so blocks offloaded to host memory or disk earn partial
//! credit in the cost function (spec §4.3 "Lower tiers", §6.2 host 0.75 / disk 0.25).

use crate::event::{RouterEvent, StorageTier, WorkerId, WorkerWithDpRank};
use crate::hash::LocalBlockHash;
use crate::index::{IndexError, KvIndex, OverlapScores};

/// Matched blocks of one rank by tier. `host` and `disk` count only blocks *beyond* the faster
/// tiers' prefix, so a block both on device and in host memory is credited once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierOverlap {
    pub device: u32,
    pub host: u32,
    pub disk: u32,
}

/// Exact indexes for the device, host and disk tiers. Events of the `external` tier are not
/// routed on and are ignored.
#[derive(Debug, Default)]
pub struct TieredIndex {
    pub device: KvIndex,
    pub host: KvIndex,
    pub disk: KvIndex,
}

impl TieredIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply an event to the index of its storage tier.
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), IndexError> {
        match event.storage_tier {
            StorageTier::Device => self.device.apply(event),
            StorageTier::HostPinned => self.host.apply(event),
            StorageTier::Disk => self.disk.apply(event),
            StorageTier::External => Ok(()),
        }
    }

    /// Apply events in order, as [`TieredIndex::apply`] would one by one, calling `on_error`
    /// for each rejected event; runs of device-tier events go through
    /// [`KvIndex::apply_batch`](crate::index::KvIndex::apply_batch), which prefetches.
    pub fn apply_batch<'e>(
        &mut self,
        events: &'e [RouterEvent],
        mut on_error: impl FnMut(&'e RouterEvent, IndexError),
    ) {
        let mut rest = events;
        while !rest.is_empty() {
            let device = rest
                .iter()
                .take_while(|e| e.storage_tier == StorageTier::Device)
                .count();
            if device > 0 {
                self.device.apply_batch(&rest[..device], &mut on_error);
                rest = &rest[device..];
            } else {
                if let Err(e) = self.apply(&rest[0]) {
                    on_error(&rest[0], e);
                }
                rest = &rest[1..];
            }
        }
    }

    /// Device-tier overlap only (the common case: no offloading configured).
    pub fn find_matches(&self, query: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        self.device.find_matches(query, early_exit)
    }

    /// Per rank, matched blocks in each tier (ranks with none anywhere omitted).
    pub fn find_tier_matches(
        &self,
        query: &[LocalBlockHash],
    ) -> Vec<(WorkerWithDpRank, TierOverlap)> {
        let dev = self.device.find_matches(query, false);
        let mut out: Vec<(WorkerWithDpRank, TierOverlap)> = dev
            .scores
            .iter()
            .map(|&(w, d)| {
                (
                    w,
                    TierOverlap {
                        device: d,
                        ..Default::default()
                    },
                )
            })
            .collect();
        if self.host.num_blocks() == 0 && self.disk.num_blocks() == 0 {
            return out;
        }
        let host = self.host.find_matches(query, false);
        let disk = self.disk.find_matches(query, false);
        for (w, h) in host.scores {
            entry(&mut out, w).host = h;
        }
        for (w, d) in disk.scores {
            entry(&mut out, w).disk = d;
        }
        for (_, t) in &mut out {
            let host_total = t.host.max(t.device);
            t.host = host_total - t.device;
            t.disk = t.disk.saturating_sub(host_total);
        }
        out
    }

    /// Every tier as `Stored` events that rebuild an identical index when applied to an
    /// empty one ([`KvIndex::dump_events`] per tier, each event carrying its `storage_tier`):
    /// device first, then host, then disk.
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        let mut out = self.device.dump_events();
        for (tier, index) in [
            (StorageTier::HostPinned, &self.host),
            (StorageTier::Disk, &self.disk),
        ] {
            out.extend(index.dump_events().into_iter().map(|mut ev| {
                ev.storage_tier = tier;
                ev
            }));
        }
        out
    }

    /// `(block, worker)` pairs across tiers.
    pub fn current_size(&self) -> usize {
        self.device.current_size() + self.host.current_size() + self.disk.current_size()
    }

    /// Blocks `worker` holds across tiers.
    pub fn worker_blocks(&self, worker: WorkerWithDpRank) -> usize {
        self.device.worker_blocks(worker)
            + self.host.worker_blocks(worker)
            + self.disk.worker_blocks(worker)
    }

    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.device.remove_worker(worker_id);
        self.host.remove_worker(worker_id);
        self.disk.remove_worker(worker_id);
    }

    pub fn clear_worker_rank(&mut self, worker: WorkerWithDpRank) {
        self.device.clear_worker_rank(worker);
        self.host.clear_worker_rank(worker);
        self.disk.clear_worker_rank(worker);
    }
}

fn entry(v: &mut Vec<(WorkerWithDpRank, TierOverlap)>, w: WorkerWithDpRank) -> &mut TierOverlap {
    let i = match v.iter().position(|(x, _)| *x == w) {
        Some(i) => i,
        None => {
            v.push((w, TierOverlap::default()));
            v.len() - 1
        }
    };
    &mut v[i].1
}
