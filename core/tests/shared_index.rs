//! The shared index (one copy behind a reader-writer lock): readers see published ops only,
//! never half an event (torn-state test), and rejected ops are reported once.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::hash::{ExternalHash, LocalBlockHash};
use kvrouter_core::index::{removed_event, shared_index, stored_event, IndexOp};

fn chain(w: WorkerWithDpRank, id: u64, n: u64) -> kvrouter_core::RouterEvent {
    stored_event(
        w,
        id,
        None,
        (0..n).map(|i| (ExternalHash(1000 + i), LocalBlockHash(i))),
    )
}

/// An error sink that counts the rejections it is given.
fn counting_sink() -> (Arc<AtomicUsize>, kvrouter_core::index::ErrorSink) {
    let errors = Arc::new(AtomicUsize::new(0));
    let e2 = errors.clone();
    let sink: kvrouter_core::index::ErrorSink = Arc::new(move |_, _| {
        e2.fetch_add(1, Ordering::Relaxed);
    });
    (errors, sink)
}

#[test]
fn readers_see_published_batches_and_errors_are_reported_once() {
    let (errors, sink) = counting_sink();
    let (mut writer, reader) = shared_index(Some(sink));
    let a = WorkerWithDpRank::new(1, 0);
    let b = WorkerWithDpRank::new(2, 0);
    let q: Vec<LocalBlockHash> = (0..8).map(LocalBlockHash).collect();

    writer.append(IndexOp::Event(chain(a, 0, 8)));
    assert!(
        reader.find_matches(&q, false).scores.is_empty(),
        "unpublished op visible"
    );
    assert_eq!(writer.publish(), 1);
    assert_eq!(reader.find_matches(&q, false).scores, vec![(a, 8)]);

    // A removal from block 4 on, a stored chain for b, and one bad removal (unknown block).
    writer.append(IndexOp::Event(removed_event(
        a,
        1,
        vec![ExternalHash(1004)],
    )));
    writer.append(IndexOp::Event(chain(b, 0, 3)));
    writer.append(IndexOp::Event(removed_event(b, 1, vec![ExternalHash(77)])));
    writer.publish();
    let mut s = reader.find_matches(&q, false).scores;
    s.sort();
    assert_eq!(s, vec![(a, 4), (b, 3)]);
    // Another publish makes the other copy current: it must hold the same state.
    writer.append(IndexOp::RemoveWorker(2));
    writer.publish();
    assert_eq!(reader.find_matches(&q, false).scores, vec![(a, 4)]);
    assert_eq!(reader.current_size(), 4);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        1,
        "each rejection reported exactly once"
    );
}

#[test]
fn concurrent_readers_always_see_a_prefix_closed_state() {
    let (mut writer, reader) = shared_index(None);
    let w = WorkerWithDpRank::new(9, 0);
    let q: Vec<LocalBlockHash> = (0..16).map(LocalBlockHash).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let r = reader.clone();
            let (stop, reads) = (stop.clone(), reads.clone());
            let q = q.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let s = r.find_matches(&q, false).scores;
                    // Every batch stores all 16 blocks or removes them all.
                    assert!(s.is_empty() || s == vec![(w, 16)], "torn state {s:?}");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // At least 2,000 store/remove rounds, and on until the readers have overlapped with many
    // of them (on two cores they may start late).
    let mut i = 0u64;
    while i < 2000 || reads.load(Ordering::Relaxed) < 1000 {
        writer.append(IndexOp::Event(chain(w, 2 * i, 16)));
        writer.publish();
        writer.append(IndexOp::Event(removed_event(
            w,
            2 * i + 1,
            vec![ExternalHash(1000)],
        )));
        writer.publish();
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
    assert_eq!(reader.current_size(), 0);
}

#[test]
fn event_batches_apply_in_order_and_report_each_rejection_once() {
    let (errors, sink) = counting_sink();
    let (mut writer, reader) = shared_index(Some(sink));
    let a = WorkerWithDpRank::new(1, 0);
    let b = WorkerWithDpRank::new(2, 0);
    let q: Vec<LocalBlockHash> = (0..8).map(LocalBlockHash).collect();
    let mut offloaded = chain(b, 1, 4);
    offloaded.storage_tier = kvrouter_core::event::StorageTier::HostPinned;
    writer.append(IndexOp::Events(vec![
        chain(a, 0, 8),
        removed_event(a, 1, vec![ExternalHash(1006)]),
        removed_event(a, 2, vec![ExternalHash(5)]),
        offloaded,
        chain(b, 2, 3),
        removed_event(b, 3, vec![ExternalHash(999)]),
    ]));
    assert_eq!(writer.publish(), 1, "a batch is one op");
    let expect = |reader: &kvrouter_core::index::IndexReader| {
        let mut s = reader.find_matches(&q, false).scores;
        s.sort();
        assert_eq!(s, vec![(a, 6), (b, 3)]);
        assert_eq!(reader.with(|ix| ix.host.current_size()), Some(4));
    };
    expect(&reader);
    // An unrelated op later: the batch's state and its error count stay.
    writer.append(IndexOp::RemoveWorker(99));
    writer.publish();
    expect(&reader);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        2,
        "each rejection reported once"
    );
}
