//! Exact, approximate and tiered index behaviour on hand-built event streams.
use std::time::Duration;

use kvrouter_core::event::{KvCacheEventData, RouterEvent, StorageTier, WorkerWithDpRank};
use kvrouter_core::hash::{
    compute_block_hashes, compute_sequence_hashes, ExternalHash, HashOptions, LocalBlockHash,
};
use kvrouter_core::index::{
    removed_event, stored_event, ApproxConfig, ApproxIndex, IndexError, KvIndex, TierOverlap,
    TieredIndex,
};

fn w(id: u64, rank: u32) -> WorkerWithDpRank {
    WorkerWithDpRank::new(id, rank)
}

fn lh(v: &[u64]) -> Vec<LocalBlockHash> {
    v.iter().map(|&x| LocalBlockHash(x)).collect()
}

/// Store `locals` as one chain for `worker` with engine hashes `base + i`.
fn store_chain(
    ix: &mut KvIndex,
    worker: WorkerWithDpRank,
    parent: Option<u64>,
    base: u64,
    locals: &[u64],
) -> Result<(), IndexError> {
    let blocks = locals
        .iter()
        .enumerate()
        .map(|(i, &l)| (ExternalHash(base + i as u64), LocalBlockHash(l)));
    ix.apply(&stored_event(worker, 0, parent.map(ExternalHash), blocks))
}

#[test]
fn appendix_a_radix_behaviour() {
    // Spec Appendix A, "RadixTree behaviour checks" (verified against Dynamo 1.6.1).
    let tokens: Vec<u32> = (1..=64).collect();
    let h = compute_block_hashes(&tokens, 16, &HashOptions::default(), None);
    let mut ix = KvIndex::new();
    let blocks7 = h
        .iter()
        .enumerate()
        .map(|(i, &l)| (ExternalHash(100 + i as u64), l));
    ix.apply(&stored_event(w(7, 0), 0, None, blocks7)).unwrap();
    let blocks8 = h[..2]
        .iter()
        .enumerate()
        .map(|(i, &l)| (ExternalHash(200 + i as u64), l));
    ix.apply(&stored_event(w(8, 1), 0, None, blocks8)).unwrap();
    let s = ix.find_matches(&h, false).sorted();
    assert_eq!(s.scores, vec![(w(7, 0), 4), (w(8, 1), 2)]);

    // Parent known only to worker 7: worker 8 rank 0 cannot chain onto it.
    let err = ix.apply(&stored_event(
        w(8, 0),
        1,
        Some(ExternalHash(101)),
        [(ExternalHash(300), h[2])],
    ));
    assert!(
        matches!(err, Err(IndexError::ParentBlockNotFound { .. })),
        "{err:?}"
    );

    // Removing worker 7's third block drops its score to 2.
    ix.apply(&removed_event(w(7, 0), 1, vec![ExternalHash(102)]))
        .unwrap();
    assert_eq!(
        ix.find_matches(&h, false).sorted().scores,
        vec![(w(7, 0), 2), (w(8, 1), 2)]
    );

    // Cleared on worker 7 leaves worker 8.
    ix.apply(&RouterEvent::new(w(7, 0), 2, KvCacheEventData::Cleared))
        .unwrap();
    assert_eq!(ix.find_matches(&h, false).scores, vec![(w(8, 1), 2)]);
}

#[test]
fn overlap_is_contiguous_prefix_only() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3, 4]).unwrap();
    assert_eq!(ix.find_matches(&lh(&[1, 2, 3, 4]), false).get(w(1, 0)), 4);
    assert_eq!(ix.find_matches(&lh(&[1, 2, 9, 4]), false).get(w(1, 0)), 2);
    assert_eq!(ix.find_matches(&lh(&[2, 3, 4]), false).get(w(1, 0)), 0);
    assert_eq!(
        ix.find_matches(&lh(&[1, 2, 3, 4, 5, 6]), false)
            .get(w(1, 0)),
        4
    );
    assert!(ix.find_matches(&[], false).scores.is_empty());
}

#[test]
fn removal_takes_the_block_and_everything_below_it() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3, 4]).unwrap();
    store_chain(&mut ix, w(2, 0), None, 20, &[1, 2, 3, 4]).unwrap();
    assert_eq!(ix.current_size(), 8);
    ix.apply(&removed_event(w(1, 0), 1, vec![ExternalHash(11)]))
        .unwrap();
    assert_eq!(ix.current_size(), 5, "blocks 2..4 of worker 1 are gone");
    let s = ix.find_matches(&lh(&[1, 2, 3, 4]), false);
    assert_eq!((s.get(w(1, 0)), s.get(w(2, 0))), (1, 4));
    // Worker 1 can no longer chain onto its dropped block 3.
    assert!(matches!(
        store_chain(&mut ix, w(1, 0), Some(12), 50, &[9]),
        Err(IndexError::ParentBlockNotFound { .. })
    ));
    // The engine's own later removals of the dropped blocks are accepted quietly.
    ix.apply(&removed_event(
        w(1, 0),
        2,
        vec![ExternalHash(13), ExternalHash(12)],
    ))
    .unwrap();
    // Unknown hashes are reported, the known ones still applied.
    let err = ix.apply(&removed_event(
        w(2, 0),
        1,
        vec![ExternalHash(999), ExternalHash(23)],
    ));
    assert_eq!(
        err,
        Err(IndexError::BlockNotFound {
            worker: w(2, 0),
            missing: 1
        })
    );
    assert_eq!(ix.find_matches(&lh(&[1, 2, 3, 4]), false).get(w(2, 0)), 3);
    // Removals for a worker never seen.
    assert!(matches!(
        ix.apply(&removed_event(w(9, 0), 1, vec![ExternalHash(1)])),
        Err(IndexError::BlockNotFound { .. })
    ));
}

#[test]
fn re_storing_after_removal_restores_coverage() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3]).unwrap();
    ix.apply(&removed_event(w(1, 0), 1, vec![ExternalHash(11)]))
        .unwrap();
    store_chain(&mut ix, w(1, 0), Some(10), 30, &[2, 3]).unwrap();
    assert_eq!(ix.find_matches(&lh(&[1, 2, 3]), false).get(w(1, 0)), 3);
    // Duplicate stores are harmless.
    store_chain(&mut ix, w(1, 0), Some(10), 30, &[2, 3]).unwrap();
    assert_eq!(ix.current_size(), 3);
}

#[test]
fn self_referencing_stores_are_rejected_without_change() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1]).unwrap();
    let dup = stored_event(
        w(1, 0),
        1,
        Some(ExternalHash(10)),
        [(ExternalHash(10), LocalBlockHash(2))],
    );
    assert!(matches!(
        ix.apply(&dup),
        Err(IndexError::InvalidBlockSequence { .. })
    ));
    let dup2 = stored_event(
        w(1, 0),
        1,
        None,
        [
            (ExternalHash(5), LocalBlockHash(2)),
            (ExternalHash(5), LocalBlockHash(3)),
        ],
    );
    assert!(matches!(
        ix.apply(&dup2),
        Err(IndexError::InvalidBlockSequence { .. })
    ));
    assert_eq!(ix.current_size(), 1);
}

/// Every store length on both sides of the short-store fast path (up to 96 hashes on the
/// stack, sorted beyond), with engine hashes that crowd the same slots (multiples of a power of
/// two, and 0): a repeat anywhere, or the parent among the blocks, is rejected and changes
/// nothing; a clean store goes in whole.
#[test]
fn self_referencing_stores_are_found_at_every_length() {
    for len in 1..=200u64 {
        let hash = |i: u64| ExternalHash(i << 57 | i);
        let blocks = |hashes: &[ExternalHash]| {
            hashes
                .iter()
                .enumerate()
                .map(|(i, &h)| (h, LocalBlockHash(1000 + i as u64)))
                .collect::<Vec<_>>()
        };
        let clean: Vec<ExternalHash> = (0..len).map(hash).collect();
        let mut ix = KvIndex::new();
        ix.apply(&stored_event(w(1, 0), 0, None, blocks(&clean)))
            .unwrap_or_else(|e| panic!("clean store of {len}: {e}"));
        assert_eq!(ix.current_size(), len as usize);

        let mut ix = KvIndex::new();
        store_chain(&mut ix, w(1, 0), None, 1 << 40, &[1]).unwrap();
        let (i, j) = (len as usize / 3, len as usize - 1);
        let mut dup = clean.clone();
        if i != j {
            dup[j] = dup[i];
            let e = stored_event(w(1, 0), 1, Some(ExternalHash(1 << 40)), blocks(&dup));
            assert!(
                matches!(ix.apply(&e), Err(IndexError::InvalidBlockSequence { .. })),
                "repeat at {i} and {j} of {len} not found"
            );
        }
        let e = stored_event(w(1, 0), 1, Some(clean[len as usize / 2]), blocks(&clean));
        assert!(
            matches!(ix.apply(&e), Err(IndexError::InvalidBlockSequence { .. })),
            "parent among the {len} blocks not found"
        );
        assert_eq!(
            ix.current_size(),
            1,
            "a rejected store of {len} changed the index"
        );
    }
}

#[test]
fn dp_ranks_are_separate_routing_units() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2]).unwrap();
    store_chain(&mut ix, w(1, 1), None, 10, &[1, 2, 3]).unwrap();
    ix.apply(&RouterEvent::new(w(1, 0), 1, KvCacheEventData::Cleared))
        .unwrap();
    assert_eq!(
        ix.find_matches(&lh(&[1, 2, 3]), false).scores,
        vec![(w(1, 1), 3)]
    );
    store_chain(&mut ix, w(1, 0), None, 10, &[1]).unwrap();
    ix.remove_worker(1);
    assert!(ix.find_matches(&lh(&[1, 2, 3]), false).scores.is_empty());
    assert!(ix.workers().is_empty());
}

#[test]
fn early_exit_stops_when_one_worker_remains() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3, 4, 5]).unwrap();
    store_chain(&mut ix, w(2, 0), None, 20, &[1, 2]).unwrap();
    let full = ix.find_matches(&lh(&[1, 2, 3, 4, 5]), false);
    assert_eq!(full.get(w(1, 0)), 5);
    let early = ix.find_matches(&lh(&[1, 2, 3, 4, 5]), true);
    assert_eq!((early.get(w(1, 0)), early.get(w(2, 0))), (3, 2));
}

#[test]
fn stale_hashes_stay_stale_when_a_cut_chain_grows_again() {
    let mut ix = KvIndex::new();
    // Engine hashes 10, 11, 12 for blocks 1, 2, 3.
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3]).unwrap();
    // Parent first: block 2 goes and takes block 3 (engine hash 12) with it.
    ix.apply(&removed_event(w(1, 0), 1, vec![ExternalHash(11)]))
        .unwrap();
    assert_eq!(ix.find_matches(&lh(&[1, 2, 3]), false).get(w(1, 0)), 1);
    // The chain grows again from block 1 with other blocks, in the positions 11 and 12 held.
    store_chain(&mut ix, w(1, 0), Some(10), 20, &[5, 6]).unwrap();
    assert_eq!(ix.find_matches(&lh(&[1, 5, 6]), false).get(w(1, 0)), 3);
    // The engine's late removal of 12 names a block that is gone: it must not cut block 6.
    ix.apply(&removed_event(w(1, 0), 2, vec![ExternalHash(12)]))
        .unwrap();
    assert_eq!(ix.find_matches(&lh(&[1, 5, 6]), false).get(w(1, 0)), 3);
    assert_eq!(ix.current_size(), 3);
    // Same when another rank holds the run, so it is cut short without being freed.
    store_chain(&mut ix, w(2, 0), None, 30, &[1, 2, 3, 4]).unwrap();
    store_chain(&mut ix, w(3, 0), None, 40, &[1, 2, 3, 4]).unwrap();
    ix.apply(&removed_event(w(2, 0), 1, vec![ExternalHash(31)]))
        .unwrap();
    ix.apply(&removed_event(w(3, 0), 1, vec![ExternalHash(42)]))
        .unwrap();
    store_chain(&mut ix, w(3, 0), Some(41), 50, &[7]).unwrap();
    ix.apply(&removed_event(w(2, 0), 2, vec![ExternalHash(32)]))
        .unwrap();
    let s = ix.find_matches(&lh(&[1, 2, 7]), false);
    assert_eq!((s.get(w(2, 0)), s.get(w(3, 0))), (1, 3));
}

#[test]
fn memory_is_reclaimed_when_everything_is_removed() {
    let empty = KvIndex::new().memory_bytes();
    let mut ix = KvIndex::new();
    // Shared prefixes and unique suffixes over 8 workers.
    for wk in 0..8u64 {
        for p in 0..20u64 {
            let mut locals: Vec<u64> = (0..10).map(|i| 1000 * (p % 4) + i).collect();
            locals.extend((0..6).map(|i| 1_000_000 * (wk + 1) + 100 * p + i));
            store_chain(&mut ix, w(wk, 0), None, (wk << 32) | (p << 8), &locals).unwrap();
        }
    }
    assert!(ix.current_size() > 1000);
    assert!(ix.memory_bytes() > empty);
    // Remove everything block by block, leaves first, as engines evict.
    for wk in 0..8u64 {
        for p in 0..20u64 {
            let hashes = (0..16u64)
                .rev()
                .map(|i| ExternalHash((wk << 32) | (p << 8) | i))
                .collect();
            let _ = ix.apply(&removed_event(w(wk, 0), 1, hashes));
        }
    }
    assert_eq!(ix.current_size(), 0);
    assert_eq!(ix.num_blocks(), 0);
    // Only the table of known worker ranks remains: the same as an index where the same eight
    // ranks stored and removed a single block.
    let mut reference = KvIndex::new();
    for wk in 0..8u64 {
        store_chain(&mut reference, w(wk, 0), None, 1, &[1]).unwrap();
        reference
            .apply(&removed_event(w(wk, 0), 1, vec![ExternalHash(1)]))
            .unwrap();
    }
    assert_eq!(ix.memory_bytes(), reference.memory_bytes());
    assert!(ix.memory_bytes() < empty + 1024);
}

#[test]
fn memory_is_reclaimed_after_remove_worker_and_parent_first_removal() {
    let empty = KvIndex::new().memory_bytes();
    let mut ix = KvIndex::new();
    for wk in 0..4u64 {
        store_chain(&mut ix, w(wk, 0), None, wk * 100, &[1, 2, 3, 4, 5]).unwrap();
        store_chain(
            &mut ix,
            w(wk, 0),
            Some(wk * 100 + 2),
            wk * 100 + 50,
            &[7, 8],
        )
        .unwrap();
    }
    // Worker 0: parent first (children go stale, then removed by the engine afterwards).
    ix.apply(&removed_event(w(0, 0), 1, vec![ExternalHash(0)]))
        .unwrap();
    let stale: Vec<_> = [1, 2, 3, 4, 50, 51]
        .iter()
        .map(|&h| ExternalHash(h))
        .collect();
    ix.apply(&removed_event(w(0, 0), 2, stale)).unwrap();
    for wk in 1..4 {
        ix.remove_worker(wk);
    }
    ix.remove_worker(0);
    assert_eq!(ix.current_size(), 0);
    assert_eq!(ix.num_blocks(), 0);
    assert!(ix.workers().is_empty());
    // Slot table capacity stays; nodes and per-worker maps are gone.
    let slots_bytes = ix.memory_bytes() - empty;
    assert!(slots_bytes < 1024, "left {slots_bytes} bytes behind");
}

#[test]
fn dump_rebuilds_an_identical_index() {
    let mut ix = KvIndex::new();
    store_chain(&mut ix, w(1, 0), None, 10, &[1, 2, 3, 4]).unwrap();
    store_chain(&mut ix, w(1, 0), Some(11), 20, &[5, 6]).unwrap();
    store_chain(&mut ix, w(2, 3), None, 30, &[1, 2, 7]).unwrap();
    store_chain(&mut ix, w(3, 0), None, 40, &[9]).unwrap();
    let dump = ix.dump_events();
    // One event per run a rank holds: worker 1 holds [1 2 3 4] and the branch [5 6] after
    // block 2; worker 2 the first two blocks of that run and its own branch [7]; worker 3 [9].
    assert_eq!(dump.len(), 5);
    let mut rebuilt = KvIndex::new();
    for ev in &dump {
        rebuilt.apply(ev).unwrap();
    }
    assert_eq!(rebuilt.current_size(), ix.current_size());
    for q in [&[1, 2, 3, 4][..], &[1, 2, 5, 6], &[1, 2, 7], &[9]] {
        assert_eq!(
            rebuilt.find_matches(&lh(q), false).sorted(),
            ix.find_matches(&lh(q), false).sorted()
        );
    }
    // Engine hashes survive: worker 2's own hashes still remove its blocks.
    rebuilt
        .apply(&removed_event(w(2, 3), 1, vec![ExternalHash(31)]))
        .unwrap();
    assert_eq!(rebuilt.find_matches(&lh(&[1, 2, 7]), false).get(w(2, 3)), 1);
    // The dump is canonical JSON that round-trips.
    let json = serde_json::to_string(&dump).unwrap();
    let back: Vec<RouterEvent> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, dump);
}

#[test]
fn worker_sequence_hashes_are_the_router_hashes_of_held_prefixes() {
    let tokens: Vec<u32> = (1..=64).collect();
    let h = compute_block_hashes(&tokens, 16, &HashOptions::default(), None);
    let mut ix = KvIndex::new();
    ix.apply(&stored_event(
        w(1, 0),
        0,
        None,
        h[..3]
            .iter()
            .enumerate()
            .map(|(i, &l)| (ExternalHash(i as u64), l)),
    ))
    .unwrap();
    let mut want = compute_sequence_hashes(&h[..3]);
    want.sort_unstable();
    assert_eq!(ix.worker_sequence_hashes(w(1, 0)), want);
    assert!(ix.worker_sequence_hashes(w(2, 0)).is_empty());
}

#[test]
fn approx_index_records_expires_and_prunes() {
    let tokens: Vec<u32> = (0..640).collect();
    let local = compute_block_hashes(&tokens, 64, &HashOptions::default(), None);
    let seq = compute_sequence_hashes(&local);
    let mut ax = ApproxIndex::new(ApproxConfig {
        ttl: Duration::from_secs(120),
        max_tree_size: 15,
        prune_target_ratio: 0.8,
    });
    let t0 = Duration::from_secs(1000);
    ax.record(w(1, 0), &local[..6], &seq[..6], t0);
    assert_eq!(ax.find_matches(&local, t0).get(w(1, 0)), 6);
    // A longer request extends the chain and refreshes the prefix.
    ax.record(w(1, 0), &local, &seq, t0 + Duration::from_secs(100));
    assert_eq!(ax.current_size(), 10);
    // At t0+150 the first record's TTL has passed but the refresh keeps everything.
    assert_eq!(
        ax.find_matches(&local, t0 + Duration::from_secs(150))
            .get(w(1, 0)),
        10
    );
    ax.record(
        w(2, 0),
        &local[..4],
        &seq[..4],
        t0 + Duration::from_secs(150),
    );
    assert_eq!(ax.current_size(), 14);
    // Over 15 pairs → prune the oldest down to 12: worker 1's (older) tail goes first.
    ax.record(
        w(3, 0),
        &local[..2],
        &seq[..2],
        t0 + Duration::from_secs(160),
    );
    assert!(ax.current_size() <= 12, "size {}", ax.current_size());
    let s = ax.find_matches(&local, t0 + Duration::from_secs(160));
    assert_eq!((s.get(w(2, 0)), s.get(w(3, 0))), (4, 2));
    assert!(s.get(w(1, 0)) < 10);
    // Everything expires.
    assert!(ax
        .find_matches(&local, t0 + Duration::from_secs(1000))
        .scores
        .is_empty());
    assert_eq!(ax.current_size(), 0);
}

#[test]
fn an_approx_query_at_a_time_answers_what_expiring_would_without_expiring() {
    // Two identical indexes: one answers queries in place (`&self`), the other expires first.
    let tokens: Vec<u32> = (0..640).collect();
    let local = compute_block_hashes(&tokens, 64, &HashOptions::default(), None);
    let seq = compute_sequence_hashes(&local);
    let cfg = ApproxConfig {
        ttl: Duration::from_secs(10),
        max_tree_size: 1 << 20,
        prune_target_ratio: 0.8,
    };
    let (mut pure, mut expiring) = (ApproxIndex::new(cfg), ApproxIndex::new(cfg));
    let s = Duration::from_secs;
    for ax in [&mut pure, &mut expiring] {
        ax.record(w(1, 0), &local[..4], &seq[..4], s(0));
        ax.record(w(1, 0), &local, &seq, s(5));
        ax.record(w(2, 0), &local[..7], &seq[..7], s(3));
        ax.record(w(1, 0), &local[..2], &seq[..2], s(8));
    }
    let size = pure.current_size();
    for t in [0, 9, 12, 13, 14, 15, 17, 18, 19, 30] {
        let at = pure.find_matches_at(&local, &seq, s(t)).sorted();
        assert_eq!(at, expiring.find_matches(&local, s(t)).sorted(), "t = {t}");
        assert_eq!(pure.current_size(), size, "nothing expired in place");
    }
}

#[test]
fn tiered_index_credits_lower_tiers_beyond_device() {
    let mut t = TieredIndex::new();
    let mut dev = stored_event(
        w(1, 0),
        0,
        None,
        (0..3).map(|i| (ExternalHash(i), LocalBlockHash(i + 1))),
    );
    t.apply(&dev).unwrap();
    let mut host = stored_event(
        w(1, 0),
        0,
        None,
        (0..6).map(|i| (ExternalHash(i), LocalBlockHash(i + 1))),
    );
    host.storage_tier = StorageTier::HostPinned;
    t.apply(&host).unwrap();
    let mut disk = stored_event(
        w(2, 0),
        0,
        None,
        (0..4).map(|i| (ExternalHash(i), LocalBlockHash(i + 1))),
    );
    disk.storage_tier = StorageTier::Disk;
    t.apply(&disk).unwrap();
    dev.storage_tier = StorageTier::External;
    dev.worker_id = 5;
    t.apply(&dev).unwrap();
    // The dump carries every tier's blocks with their tier, and rebuilds the same index.
    let dump = t.dump_events();
    let tiers: Vec<StorageTier> = dump.iter().map(|e| e.storage_tier).collect();
    assert_eq!(
        tiers,
        [
            StorageTier::Device,
            StorageTier::HostPinned,
            StorageTier::Disk
        ]
    );
    let mut rebuilt = TieredIndex::new();
    for ev in &dump {
        rebuilt.apply(ev).unwrap();
    }
    let q = lh(&[1, 2, 3, 4, 5, 6]);
    let sorted = |mut v: Vec<(WorkerWithDpRank, TierOverlap)>| {
        v.sort_by_key(|(w, _)| *w);
        v
    };
    assert_eq!(
        sorted(rebuilt.find_tier_matches(&q)),
        sorted(t.find_tier_matches(&q))
    );
    let mut m = t.find_tier_matches(&q);
    m.sort_by_key(|(w, _)| *w);
    assert_eq!(
        m,
        vec![
            (
                w(1, 0),
                TierOverlap {
                    device: 3,
                    host: 3,
                    disk: 0
                }
            ),
            (
                w(2, 0),
                TierOverlap {
                    device: 0,
                    host: 0,
                    disk: 4
                }
            ),
        ]
    );
}
