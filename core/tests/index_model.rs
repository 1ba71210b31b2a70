//! Property test: the exact index agrees with a naive model — per worker rank, a set of held
//! prefixes — on random streams of stored / removed / cleared events, and a dump rebuilds it.
use std::collections::{HashMap, HashSet};

use kvrouter_core::event::{KvCacheEventData, RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{ExternalHash, LocalBlockHash};
use kvrouter_core::index::{removed_event, stored_event, IndexError, KvIndex};
use proptest::prelude::*;

type Prefix = Vec<u8>;

#[derive(Clone, Debug)]
enum Op {
    Store {
        w: usize,
        parent: Prefix,
        blocks: Vec<u8>,
    },
    Remove {
        w: usize,
        prefix: Prefix,
    },
    Clear {
        w: usize,
    },
    RemoveWorker {
        id: u64,
    },
}

const WORKERS: [(u64, u32); 4] = [(1, 0), (1, 1), (2, 0), (3, 0)];

fn key(i: usize) -> WorkerWithDpRank {
    WorkerWithDpRank::new(WORKERS[i].0, WORKERS[i].1)
}

/// Engine hash of a prefix: unique per (worker rank, prefix), as an engine's chained hash is.
fn ext(w: usize, p: &[u8]) -> ExternalHash {
    let mut h: u64 = 0xcbf29ce484222325 ^ (w as u64).wrapping_mul(0x9e3779b97f4a7c15);
    for &b in p {
        h = (h ^ (b as u64 + 1)).wrapping_mul(0x100000001b3);
    }
    ExternalHash(h)
}

fn local(b: u8) -> LocalBlockHash {
    LocalBlockHash(1000 + b as u64)
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly block 0, so that chains are long and shared (runs grow, are extended in place,
    // truncated, and branch in their middle), with 1 and 2 for divergence.
    let block = || prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)];
    let prefix = move || prop::collection::vec(block(), 0..7);
    prop_oneof![
        6 => (0..WORKERS.len(), prefix(), prop::collection::vec(block(), 1..6)).prop_map(|(w, parent, blocks)| Op::Store { w, parent, blocks }),
        3 => (0..WORKERS.len(), prop::collection::vec(block(), 1..8)).prop_map(|(w, prefix)| Op::Remove { w, prefix }),
        1 => (0..WORKERS.len()).prop_map(|w| Op::Clear { w }),
        1 => (1u64..4).prop_map(|id| Op::RemoveWorker { id }),
    ]
}

#[derive(Default)]
struct Model {
    held: HashMap<usize, HashSet<Prefix>>,
    /// Stored, then dropped by an ancestor's removal; the engine may still remove them.
    stale: HashMap<usize, HashSet<Prefix>>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> Result<(), &'static str> {
        match op {
            Op::Store { w, parent, blocks } => {
                let held = self.held.entry(*w).or_default();
                if !parent.is_empty() && !held.contains(parent) {
                    return Err("parent");
                }
                let mut p = parent.clone();
                for &b in blocks {
                    p.push(b);
                    held.insert(p.clone());
                    self.stale.entry(*w).or_default().remove(&p);
                }
                Ok(())
            }
            Op::Remove { w, prefix } => {
                let held = self.held.entry(*w).or_default();
                let stale = self.stale.entry(*w).or_default();
                if held.contains(prefix) {
                    let gone: Vec<Prefix> = held
                        .iter()
                        .filter(|p| p.starts_with(prefix))
                        .cloned()
                        .collect();
                    for p in gone {
                        held.remove(&p);
                        if &p != prefix {
                            stale.insert(p);
                        }
                    }
                    Ok(())
                } else if stale.remove(prefix) {
                    Ok(())
                } else {
                    Err("block")
                }
            }
            Op::Clear { w } => {
                self.held.remove(w);
                self.stale.remove(w);
                Ok(())
            }
            Op::RemoveWorker { id } => {
                for (i, (wid, _)) in WORKERS.iter().enumerate() {
                    if wid == id {
                        self.held.remove(&i);
                        self.stale.remove(&i);
                    }
                }
                Ok(())
            }
        }
    }

    fn score(&self, w: usize, q: &[u8]) -> u32 {
        let held = match self.held.get(&w) {
            Some(h) => h,
            None => return 0,
        };
        (1..=q.len())
            .take_while(|&k| held.contains(&q[..k]))
            .count() as u32
    }

    fn size(&self) -> usize {
        self.held.values().map(HashSet::len).sum()
    }
}

fn to_event(op: &Op) -> Option<RouterEvent> {
    Some(match op {
        Op::Store { w, parent, blocks } => {
            let mut p = parent.clone();
            let chain: Vec<_> = blocks
                .iter()
                .map(|&b| {
                    p.push(b);
                    (ext(*w, &p), local(b))
                })
                .collect();
            let parent = (!parent.is_empty()).then(|| ext(*w, parent));
            stored_event(key(*w), 0, parent, chain)
        }
        Op::Remove { w, prefix } => removed_event(key(*w), 0, vec![ext(*w, prefix)]),
        Op::Clear { w } => RouterEvent::new(key(*w), 0, KvCacheEventData::Cleared),
        Op::RemoveWorker { .. } => return None,
    })
}

fn all_queries() -> Vec<Prefix> {
    let mut out = vec![vec![]];
    let mut frontier = vec![vec![]];
    for _ in 0..5 {
        let mut next = Vec::new();
        for p in &frontier {
            for b in 0..3u8 {
                let mut q: Prefix = p.clone();
                q.push(b);
                next.push(q);
            }
        }
        out.extend(next.iter().cloned());
        frontier = next;
    }
    out.retain(|q| q.len() == 5 || q.len() == 2);
    out
}

fn check(ix: &KvIndex, model: &Model, queries: &[Prefix]) -> Result<(), TestCaseError> {
    prop_assert_eq!(ix.current_size(), model.size());
    // Besides the fixed queries: every held prefix, one block longer (deep chains).
    let mut queries = queries.to_vec();
    for held in model.held.values() {
        for p in held {
            for b in 0..3u8 {
                let mut q = p.clone();
                q.push(b);
                queries.push(q);
            }
        }
    }
    for q in &queries {
        let hashes: Vec<LocalBlockHash> = q.iter().map(|&b| local(b)).collect();
        let got = ix.find_matches(&hashes, false);
        for w in 0..WORKERS.len() {
            prop_assert_eq!(
                got.get(key(w)),
                model.score(w, q),
                "worker {:?} query {:?}",
                key(w),
                q
            );
        }
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES=5000 for a longer search.
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_naive_model(ops in prop::collection::vec(op(), 1..80)) {
        let queries = all_queries();
        let mut ix = KvIndex::new();
        let mut model = Model::default();
        // The same events through `apply_batch`, in batches cut at each worker removal: same
        // errors in the same order, same index.
        let mut batched = KvIndex::new();
        let mut pending: Vec<RouterEvent> = Vec::new();
        let (mut errors, mut batch_errors) = (Vec::new(), Vec::new());
        let flush = |batched: &mut KvIndex, pending: &mut Vec<RouterEvent>, out: &mut Vec<IndexError>| {
            batched.apply_batch(pending, |_, e| out.push(e));
            pending.clear();
        };
        for op in &ops {
            let want = model.apply(op);
            match to_event(op) {
                Some(ev) => {
                    pending.push(ev.clone());
                    let got = ix.apply(&ev);
                    errors.extend(got.clone().err());
                    match (want, got) {
                        (Ok(()), Ok(())) => {}
                        (Err("parent"), Err(IndexError::ParentBlockNotFound { .. })) => {}
                        (Err("block"), Err(IndexError::BlockNotFound { .. })) => {}
                        (w, g) => prop_assert!(false, "op {:?}: model {:?}, index {:?}", op, w, g),
                    }
                }
                None => {
                    let Op::RemoveWorker { id } = op else { unreachable!() };
                    ix.remove_worker(*id);
                    flush(&mut batched, &mut pending, &mut batch_errors);
                    batched.remove_worker(*id);
                }
            }
        }
        flush(&mut batched, &mut pending, &mut batch_errors);
        check(&ix, &model, &queries)?;
        check(&batched, &model, &queries)?;
        prop_assert_eq!(errors, batch_errors);

        // dump → rebuild is identity (scores, size, and each rank's engine hashes still work).
        let mut rebuilt = KvIndex::new();
        for ev in ix.dump_events() {
            prop_assert_eq!(rebuilt.apply(&ev), Ok(()));
        }
        check(&rebuilt, &model, &queries)?;
        // Removals by each rank's own engine hashes work on the rebuilt index as on the original.
        let removals: Vec<Op> = model
            .held
            .iter()
            .filter_map(|(w, held)| held.iter().min().map(|p| Op::Remove { w: *w, prefix: p.clone() }))
            .collect();
        for op in &removals {
            let ev = to_event(op).unwrap();
            prop_assert_eq!(model.apply(op), Ok(()));
            prop_assert_eq!(ix.apply(&ev), Ok(()));
            prop_assert_eq!(rebuilt.apply(&ev), Ok(()));
        }
        check(&ix, &model, &queries)?;
        check(&rebuilt, &model, &queries)?;
    }
}
