//! `shared`: the router's index as the frontend holds it, one writer applying KV events while
//! other threads look up prompts, for three shared indexes fed the same stream (issue 14,
//! item 5):
//!
//! * **one copy**: kvrouter's `shared_index` today, one `TieredIndex` behind a `RwLock`, the
//!   writer taking the write lock per chunk of `WRITE_CHUNK` events;
//! * **left-right**: the version it replaced (commit 4178cfd, vendored in `leftright.rs`): two
//!   copies, wait-free reads, each event applied to both;
//! * **Dynamo CRTC**: Dynamo 1.6.1's `ConcurrentRadixTreeCompressed`, one copy with per-node
//!   locks, its events applied by its own `SyncIndexer::worker` loop on a thread of its own
//!   (what Dynamo's `ThreadPoolIndexer` runs, here with one event thread), lookups calling
//!   `SyncIndexer::find_matches` directly on the reader threads.
//!
//! The fleet is 64 workers with 16,384-block caches, about 1.05 M `(block, worker)` entries
//! once warm. Memory is measured in a child process per index (heap bytes counted by the
//! allocator wrapper, and RSS growth with mimalloc's free pages given back, as `memory` does),
//! with the index built on a thread of its own that stays alive while it is measured (Dynamo's
//! per-worker lookup tables live on its event thread's stack).
//!
//! Latency: the three indexes are built in this process, then run the same phases in turn,
//! each phase giving every index the same next segment of the steady stream: readers (1 or 2
//! threads) issue 64-block lookups back to back, each one timed, while the writer applies the
//! segment either at full speed (batches of 4,096, as the server's index thread drains a full
//! queue) or paced at a fixed rate (every millisecond, the events due, as one batch). Before
//! and after the phases every lookup's answer is compared: one copy and left-right must agree
//! exactly; agreement with Dynamo's tree is printed (its lookups are documented as
//! best-effort, with an "equal-size skip" approximation).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dynamo_kv_router::indexer::{SyncIndexer, WorkerTask};
use dynamo_kv_router::protocols as dyn_proto;
use dynamo_kv_router::ConcurrentRadixTreeCompressed;
use kvrouter_bench::stream::{generate, Workload};
use kvrouter_core::event::RouterEvent;
use kvrouter_core::hash::LocalBlockHash;
use kvrouter_core::index::{self, IndexOp};

use crate::{collect_free_pages, leftright, rss_bytes, to_dynamo, unsalted, COUNTING, LIVE};

/// Events per publish when the writer runs flat out: the server's index thread drains up to
/// this many queued events into one batch (`server/src/routing.rs`, `MAX_BATCH`).
const FULL_BATCH: usize = 4096;
/// The paced writer's period: every tick, the events due so far go in as one batch.
const TICK: Duration = Duration::from_millis(1);
/// Steady-stream events applied untimed after warm-up, so the first queries have chains.
const PRE_EVENTS: usize = 50_000;
/// Lookups per phase's query set (recent requests' chains, padded to 64 blocks).
const QUERIES: usize = 20_000;
const QUERY_BLOCKS: usize = 64;

/// 64 workers, 16,384-block caches: about 1.05 M `(block, worker)` entries once warm.
fn workload() -> Workload {
    Workload {
        workers: 64,
        capacity: 16_384,
        prefixes: 64,
        prefix_blocks: 32,
        suffix_blocks: (1, 32),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ours,
    LeftRight,
    Dynamo,
}

const KINDS: [Kind; 3] = [Kind::Ours, Kind::LeftRight, Kind::Dynamo];

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::LeftRight => "leftright",
            Kind::Dynamo => "dynamo",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Ours => "(a) kvrouter one copy, RwLock",
            Kind::LeftRight => "(b) kvrouter left-right (4178cfd)",
            Kind::Dynamo => "(c) Dynamo 1.6.1 CRTC",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.arg() == s)
    }
}

/// One lookup, in both crates' types.
struct Query {
    ours: Vec<LocalBlockHash>,
    dynamo: Vec<dyn_proto::LocalBlockHash>,
}

/// A reader handle: cheap to clone, used from any thread.
#[derive(Clone)]
enum Reader {
    Ours(index::IndexReader),
    LeftRight(leftright::IndexReader),
    Dynamo(Arc<ConcurrentRadixTreeCompressed>),
}

impl Reader {
    /// One lookup, result dropped (its map's free is part of the cost, as in the router).
    #[inline]
    fn find(&self, q: &Query) -> usize {
        match self {
            Reader::Ours(r) => r.find_matches(&q.ours, false).scores.len(),
            Reader::LeftRight(r) => r.find_matches(&q.ours, false).scores.len(),
            Reader::Dynamo(t) => t.find_matches(&q.dynamo, false).scores.len(),
        }
    }

    /// `(worker, rank, score)`, sorted: for comparing answers.
    fn answer(&self, q: &Query) -> Vec<(u64, u32, u32)> {
        let mut v: Vec<(u64, u32, u32)> = match self {
            Reader::Ours(r) => r
                .find_matches(&q.ours, false)
                .scores
                .iter()
                .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
                .collect(),
            Reader::LeftRight(r) => r
                .find_matches(&q.ours, false)
                .scores
                .iter()
                .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
                .collect(),
            Reader::Dynamo(t) => t
                .find_matches(&q.dynamo, false)
                .scores
                .iter()
                .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
                .collect(),
        };
        v.sort_unstable();
        v
    }
}

/// One shared index with its writer side.
enum Shared {
    Ours(index::SharedIndexWriter),
    LeftRight(leftright::SharedIndexWriter),
    /// The tree, the channel its event thread reads, and that thread.
    Dynamo(
        Arc<ConcurrentRadixTreeCompressed>,
        flume::Sender<WorkerTask>,
        Option<JoinHandle<()>>,
    ),
}

/// A phase's events, owned (the indexes take events by value), made before the clock starts.
enum Payload {
    Ours(Vec<RouterEvent>),
    Dynamo(Vec<dyn_proto::RouterEvent>),
}

impl Shared {
    fn new(kind: Kind) -> Shared {
        match kind {
            Kind::Ours => Shared::Ours(index::shared_index(None).0),
            Kind::LeftRight => Shared::LeftRight(leftright::shared_index(None).0),
            Kind::Dynamo => {
                let tree = Arc::new(ConcurrentRadixTreeCompressed::new());
                let (tx, rx) = flume::unbounded();
                let t = tree.clone();
                let thread = std::thread::Builder::new()
                    .name("crtc-events".into())
                    .spawn(move || {
                        t.worker(rx, None).expect("CRTC event loop");
                    })
                    .expect("spawn CRTC event thread");
                Shared::Dynamo(tree, tx, Some(thread))
            }
        }
    }

    fn reader(&self) -> Reader {
        match self {
            Shared::Ours(w) => Reader::Ours(w.reader()),
            Shared::LeftRight(w) => Reader::LeftRight(w.reader()),
            Shared::Dynamo(t, ..) => Reader::Dynamo(t.clone()),
        }
    }

    fn payload(&self, evs: &[RouterEvent], dyn_evs: &[dyn_proto::RouterEvent]) -> Payload {
        match self {
            Shared::Dynamo(..) => Payload::Dynamo(dyn_evs.to_vec()),
            _ => Payload::Ours(evs.to_vec()),
        }
    }

    /// Apply one batch and make it visible (for Dynamo: queue it on the event thread).
    fn apply(&mut self, batch: Payload) {
        match (self, batch) {
            (Shared::Ours(w), Payload::Ours(b)) => {
                w.append(IndexOp::Events(b));
                w.publish();
            }
            (Shared::LeftRight(w), Payload::Ours(b)) => {
                w.append(leftright::IndexOp::Events(b));
                w.publish();
            }
            (Shared::Dynamo(_, tx, _), Payload::Dynamo(b)) => {
                for e in b {
                    tx.send(WorkerTask::Event(e))
                        .expect("CRTC event thread alive");
                }
            }
            _ => unreachable!("payload of the other crate"),
        }
    }

    /// Wait until everything applied so far is visible to readers (Dynamo: its event thread
    /// has drained its queue). The left-right writer also publishes an empty batch, so that
    /// its oplog no longer holds the last batch's events.
    fn settle(&mut self) {
        match self {
            Shared::Ours(_) => {}
            Shared::LeftRight(w) => {
                w.append(leftright::IndexOp::Events(Vec::new()));
                w.publish();
            }
            Shared::Dynamo(_, tx, _) => {
                let (otx, orx) = tokio::sync::oneshot::channel();
                tx.send(WorkerTask::Flush(otx))
                    .expect("CRTC event thread alive");
                orx.blocking_recv().expect("CRTC flush acknowledged");
            }
        }
    }

    /// Apply `evs` untimed, in batches of `batch`, and settle.
    fn load(&mut self, evs: &[RouterEvent], dyn_evs: &[dyn_proto::RouterEvent], batch: usize) {
        match self {
            Shared::Dynamo(..) => {
                for c in dyn_evs.chunks(batch) {
                    self.apply(Payload::Dynamo(c.to_vec()));
                    // Keep the channel's queue short: its buffer is not given back.
                    self.settle();
                }
            }
            _ => {
                for c in evs.chunks(batch) {
                    self.apply(Payload::Ours(c.to_vec()));
                }
            }
        }
        self.settle();
    }

    /// `(block, worker)` entries: ours count them; Dynamo's event thread reports the size of
    /// each worker's block lookup table.
    fn entries(&mut self) -> usize {
        match self {
            Shared::Ours(w) => w.reader().current_size(),
            Shared::LeftRight(w) => w.reader().current_size(),
            Shared::Dynamo(_, tx, _) => {
                let (otx, orx) = tokio::sync::oneshot::channel();
                tx.send(WorkerTask::Stats(otx))
                    .expect("CRTC event thread alive");
                orx.blocking_recv()
                    .expect("CRTC stats")
                    .worker_blocks
                    .iter()
                    .map(|(_, n)| n)
                    .sum()
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Shared::Dynamo(_, tx, thread) = self {
            let _ = tx.send(WorkerTask::Terminate);
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Memory
// ------------------------------------------------------------------------------------------

struct Mem {
    entries: usize,
    heap: f64,
    resident: f64,
}

/// `shared-memory <kind>`, run as a child process: one index, built from the warm-up stream
/// on a thread of its own that is still alive when the process is measured.
pub fn memory_child(which: &str) {
    let Some(kind) = Kind::parse(which) else {
        eprintln!("unknown index {which:?}: ours, leftright or dynamo");
        std::process::exit(2);
    };
    let s = generate(&workload(), 1, 1);
    let warm: Vec<RouterEvent> = s.warmup.iter().map(unsalted).collect();
    let dyn_warm: Vec<dyn_proto::RouterEvent> = if kind == Kind::Dynamo {
        warm.iter().map(to_dynamo).collect()
    } else {
        Vec::new()
    };
    drop(s);
    collect_free_pages();
    let (before, rss_before) = (LIVE.load(Relaxed), rss_bytes());
    let (built_tx, built_rx) = mpsc::channel();
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let builder = std::thread::spawn(move || {
        let mut sh = Shared::new(kind);
        // 256-event batches: the batch sizes of a frontend that keeps up.
        sh.load(&warm, &dyn_warm, 256);
        built_tx.send(sh.entries()).expect("main waits");
        let _ = quit_rx.recv();
        // The stream was counted before the build: it stays until the index is measured.
        drop(sh);
        drop((warm, dyn_warm));
    });
    let entries = built_rx.recv().expect("index built");
    collect_free_pages();
    let (live, rss) = (LIVE.load(Relaxed), rss_bytes());
    quit_tx.send(()).expect("builder waits");
    builder.join().expect("builder");
    println!(
        "SHARED-MEMORY {} entries {} heap_bytes {} rss_bytes {}",
        kind.arg(),
        entries,
        live.saturating_sub(before),
        rss.saturating_sub(rss_before)
    );
}

/// Runs `shared-memory` for each index in a child process of this binary.
fn memory_all() -> Vec<(Kind, Mem)> {
    let exe = std::env::current_exe().expect("own path");
    KINDS
        .into_iter()
        .map(|kind| {
            let out = std::process::Command::new(&exe)
                .args(["shared-memory", kind.arg()])
                .output()
                .expect("run memory child");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("SHARED-MEMORY"))
                .unwrap_or_else(|| {
                    panic!(
                        "memory child for {} failed: {}",
                        kind.arg(),
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f[i].parse::<usize>().expect("number");
            let entries = num(3);
            let m = Mem {
                entries,
                heap: num(5) as f64 / entries as f64,
                resident: num(7) as f64 / entries as f64,
            };
            eprintln!(
                "memory {}: {entries} entries, heap {:.1} B/entry, resident {:.1} B/entry",
                kind.arg(),
                m.heap,
                m.resident
            );
            (kind, m)
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Latency under concurrent writes
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// No writer: readers alone for this long.
    Idle(Duration),
    /// The segment applied flat out.
    Full,
    /// The segment applied at this many events per second.
    Rate(f64),
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Idle(_) => "no writer".into(),
            Mode::Full => "writer flat out".into(),
            Mode::Rate(r) => format!("writer at {:.0}k ev/s", r / 1e3),
        }
    }
}

struct PhaseResult {
    /// Every lookup's time in ns, all reader threads.
    lat: Vec<u32>,
    /// Wall time of the phase.
    wall: Duration,
    /// Events applied and the writer's time to make them all visible.
    events: usize,
    writer: Duration,
}

impl PhaseResult {
    fn pct(&self, p: f64) -> f64 {
        self.lat[((self.lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
    }
}

fn run_phase(
    sh: &mut Shared,
    mode: Mode,
    readers: usize,
    queries: &[Query],
    evs: &[RouterEvent],
    dyn_evs: &[dyn_proto::RouterEvent],
) -> PhaseResult {
    let payload = match mode {
        Mode::Idle(_) => None,
        _ => Some(sh.payload(evs, dyn_evs)),
    };
    let reader = sh.reader();
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(readers + 1);
    let n = queries.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..readers)
            .map(|k| {
                let (reader, stop, barrier) = (reader.clone(), &stop, &barrier);
                scope.spawn(move || {
                    let mut lat: Vec<u32> = Vec::with_capacity(1 << 21);
                    let mut i = k * n / readers.max(1);
                    // First use outside the clock (left-right's per-thread handle).
                    black_box(reader.find(&queries[i % n]));
                    barrier.wait();
                    while !stop.load(Relaxed) {
                        let q = &queries[i % n];
                        i += 1;
                        let t = Instant::now();
                        black_box(reader.find(black_box(q)));
                        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let events = match (mode, payload) {
            (Mode::Idle(d), _) => {
                std::thread::sleep(d);
                0
            }
            (Mode::Full, Some(p)) => {
                let n = match p {
                    Payload::Ours(v) => {
                        let n = v.len();
                        let mut it = v.into_iter();
                        loop {
                            let b: Vec<_> = it.by_ref().take(FULL_BATCH).collect();
                            if b.is_empty() {
                                break;
                            }
                            sh.apply(Payload::Ours(b));
                        }
                        n
                    }
                    Payload::Dynamo(v) => {
                        let n = v.len();
                        sh.apply(Payload::Dynamo(v));
                        n
                    }
                };
                sh.settle();
                n
            }
            (Mode::Rate(rate), Some(p)) => {
                let total = match &p {
                    Payload::Ours(v) => v.len(),
                    Payload::Dynamo(v) => v.len(),
                };
                let (mut ours, mut theirs) = match p {
                    Payload::Ours(v) => (Some(v.into_iter()), None),
                    Payload::Dynamo(v) => (None, Some(v.into_iter())),
                };
                let mut sent = 0;
                let mut next = started;
                while sent < total {
                    let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
                    if due > sent {
                        let k = due - sent;
                        let batch = match (&mut ours, &mut theirs) {
                            (Some(it), _) => Payload::Ours(it.by_ref().take(k).collect()),
                            (_, Some(it)) => Payload::Dynamo(it.by_ref().take(k).collect()),
                            _ => unreachable!(),
                        };
                        sh.apply(batch);
                        sent = due;
                    }
                    next += TICK;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
                sh.settle();
                total
            }
            _ => unreachable!("a writing phase has its events"),
        };
        let writer = started.elapsed();
        stop.store(true, Relaxed);
        let mut lat: Vec<u32> = Vec::new();
        for h in handles {
            lat.extend(h.join().expect("reader"));
        }
        let wall = started.elapsed();
        lat.sort_unstable();
        PhaseResult {
            lat,
            wall,
            events,
            writer,
        }
    })
}

fn queries_from(chains: &[Vec<LocalBlockHash>], end: usize, seed: u64) -> Vec<Query> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let recent = end.min(5000).max(1) as u64;
    (0..QUERIES)
        .map(|_| {
            let ch = &chains[end - 1 - (next() % recent) as usize];
            let mut q: Vec<LocalBlockHash> = ch.iter().take(QUERY_BLOCKS).copied().collect();
            while q.len() < QUERY_BLOCKS {
                q.push(LocalBlockHash(next()));
            }
            let dynamo = q.iter().map(|h| dyn_proto::LocalBlockHash(h.0)).collect();
            Query { ours: q, dynamo }
        })
        .collect()
}

/// Compare every query's answer: one copy against left-right (must be equal) and against
/// Dynamo's tree (printed). Returns the Dynamo agreement count.
fn check_answers(ix: &[(Kind, Shared)], queries: &[Query], when: &str) -> usize {
    let r: Vec<Reader> = ix.iter().map(|(_, s)| s.reader()).collect();
    let mut agree = 0;
    for q in queries {
        let a = r[0].answer(q);
        assert_eq!(
            a,
            r[1].answer(q),
            "one copy and left-right disagree ({when})"
        );
        agree += usize::from(a == r[2].answer(q));
    }
    eprintln!(
        "answers {when}: one copy = left-right on all {} lookups; Dynamo CRTC agrees on {agree}",
        queries.len()
    );
    agree
}

/// `shared [rate] [full_events] [rate_seconds]`: memory of each index (child processes), then
/// lookup latency under writes.
pub fn run(args: &[String]) {
    let arg = |i: usize, default: f64| -> f64 {
        args.get(i)
            .map(|s| s.parse().unwrap_or_else(|_| panic!("not a number: {s}")))
            .unwrap_or(default)
    };
    let rate = arg(0, 200_000.0);
    let full_events = arg(1, 250_000.0) as usize;
    let rate_secs = arg(2, 1.0);
    let rate_events = (rate * rate_secs) as usize;
    let t0 = Instant::now();

    let mem = memory_all();

    // Lookup timing: counting every allocation on a shared atomic would add cross-thread
    // traffic to every lookup.
    COUNTING.store(false, Relaxed);
    let phases: Vec<(Mode, usize, usize)> = vec![
        (Mode::Idle(Duration::from_millis(500)), 1, 0),
        (Mode::Idle(Duration::from_millis(500)), 2, 0),
        (Mode::Full, 1, full_events),
        (Mode::Full, 2, full_events),
        (Mode::Rate(rate), 1, rate_events),
        (Mode::Rate(rate), 2, rate_events),
    ];
    let steady_total = PRE_EVENTS + phases.iter().map(|p| p.2).sum::<usize>();
    let s = generate(&workload(), steady_total, 7);
    let warm: Vec<RouterEvent> = s.warmup.iter().map(unsalted).collect();
    let steady: Vec<RouterEvent> = s.steady.iter().map(unsalted).collect();
    let dyn_warm: Vec<dyn_proto::RouterEvent> = warm.iter().map(to_dynamo).collect();
    let dyn_steady: Vec<dyn_proto::RouterEvent> = steady.iter().map(to_dynamo).collect();
    let chains = s.chains;
    drop((s.warmup, s.steady));
    // Chain i belongs to the request served around steady event i × events/chains.
    let chain_at = |event: usize| (event * chains.len() / steady.len()).max(1);
    eprintln!(
        "stream: {} warm-up + {} steady events, {} requests ({:.1} s)",
        warm.len(),
        steady.len(),
        chains.len(),
        t0.elapsed().as_secs_f64()
    );

    let mut ix: Vec<(Kind, Shared)> = KINDS
        .into_iter()
        .map(|k| {
            let t = Instant::now();
            let mut sh = Shared::new(k);
            sh.load(&warm, &dyn_warm, FULL_BATCH);
            sh.load(&steady[..PRE_EVENTS], &dyn_steady[..PRE_EVENTS], FULL_BATCH);
            let e = sh.entries();
            eprintln!(
                "built {}: {e} entries ({:.1} s)",
                k.arg(),
                t.elapsed().as_secs_f64()
            );
            (k, sh)
        })
        .collect();
    drop((warm, dyn_warm));
    let q0 = queries_from(&chains, chain_at(PRE_EVENTS), 11);
    let agree_before = check_answers(&ix, &q0, "after warm-up");

    // results[phase][kind]
    let mut results: Vec<Vec<PhaseResult>> = Vec::new();
    let mut at = PRE_EVENTS;
    for (p, &(mode, readers, n)) in phases.iter().enumerate() {
        let queries = queries_from(&chains, chain_at(at), 100 + p as u64);
        let (evs, devs) = (&steady[at..at + n], &dyn_steady[at..at + n]);
        let mut row: Vec<Option<PhaseResult>> = (0..3).map(|_| None).collect();
        // Rotate the order, so that no index always runs first after a pause.
        for j in 0..3 {
            let k = (p + j) % 3;
            let r = run_phase(&mut ix[k].1, mode, readers, &queries, evs, devs);
            eprintln!(
                "{} / {readers} reader(s) / {}: {} lookups, p50 {:.2} p99 {:.2} p999 {:.2} µs{}",
                mode.label(),
                ix[k].0.arg(),
                r.lat.len(),
                r.pct(0.5),
                r.pct(0.99),
                r.pct(0.999),
                if r.events > 0 {
                    format!(
                        ", writer {:.2} M events/s",
                        r.events as f64 / r.writer.as_secs_f64() / 1e6
                    )
                } else {
                    String::new()
                }
            );
            row[k] = Some(r);
        }
        results.push(row.into_iter().map(|r| r.expect("ran")).collect());
        at += n;
    }
    let q1 = queries_from(&chains, chain_at(at), 12);
    let agree_after = check_answers(&ix, &q1, "after the phases");
    drop(ix);

    // The table.
    let dyn_res = mem
        .iter()
        .find(|(k, _)| *k == Kind::Dynamo)
        .map(|(_, m)| m.resident)
        .unwrap_or(f64::NAN);
    println!();
    println!(
        "shared index, 64 workers × 16,384-block caches; rate {:.0}k events/s, flat-out segments of {full_events} events",
        rate / 1e3
    );
    println!();
    println!("| index | entries | heap B/entry | resident B/entry | resident / Dynamo CRTC |");
    println!("| --- | --- | --- | --- | --- |");
    for (k, m) in &mem {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |",
            k.label(),
            m.entries,
            m.heap,
            m.resident,
            m.resident / dyn_res
        );
    }
    println!();
    println!("| phase | readers | index | lookups | p50 µs | p99 µs | p999 µs | lookups/s | writer M events/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (p, &(mode, readers, _)) in phases.iter().enumerate() {
        for (k, r) in results[p].iter().enumerate() {
            println!(
                "| {} | {readers} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} M | {} |",
                mode.label(),
                KINDS[k].label(),
                r.lat.len(),
                r.pct(0.5),
                r.pct(0.99),
                r.pct(0.999),
                r.lat.len() as f64 / r.wall.as_secs_f64() / 1e6,
                if r.events > 0 {
                    format!("{:.3}", r.events as f64 / r.writer.as_secs_f64() / 1e6)
                } else {
                    "—".into()
                },
            );
        }
    }
    println!();
    println!(
        "answers: one copy = left-right on every lookup; Dynamo CRTC agrees on {agree_before}/{QUERIES} after warm-up, {agree_after}/{QUERIES} after the phases"
    );
    // Machine-readable lines, for runs to be aggregated.
    for (k, m) in &mem {
        println!(
            "SUMMARY shared memory {} heap {:.2} resident {:.2}",
            k.arg(),
            m.heap,
            m.resident
        );
    }
    for (p, &(mode, readers, _)) in phases.iter().enumerate() {
        let tag = match mode {
            Mode::Idle(_) => "idle".to_string(),
            Mode::Full => "full".to_string(),
            Mode::Rate(r) => format!("rate{:.0}k", r / 1e3),
        };
        for (k, r) in results[p].iter().enumerate() {
            println!(
                "SUMMARY shared latency {tag} r{readers} {} p50 {:.3} p99 {:.3} p999 {:.3} lookups_per_s {:.0} writer_events_per_s {:.0}",
                KINDS[k].arg(),
                r.pct(0.5),
                r.pct(0.99),
                r.pct(0.999),
                r.lat.len() as f64 / r.wall.as_secs_f64(),
                if r.events > 0 {
                    r.events as f64 / r.writer.as_secs_f64()
                } else {
                    0.0
                },
            );
        }
    }
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}
