//! Many subscribers in one process share a few poller threads and cost 2 descriptors each
//! (the router's budget is 3 per worker) (issue 18 item 5). Its own test binary, so the process's threads and descriptors
//! (`/proc/self/task`, `/proc/self/fd`) are this test's alone. The publishers run in a child
//! process (this binary again, `KV_MANY_PUBLISHERS` set) so they cost us nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_wire::engine::{BlockStored, EngineBatch, EngineEvent};
use kvrouter_wire::subscriber::{SubscriberState, POLLERS};
use kvrouter_wire::{KvEventPublisher, KvEventSubscriber, PublisherConfig, SubscriberConfig};

const N: usize = 64;
const DEADLINE: Duration = Duration::from_secs(60);
const TEST: &str = "many_subscribers_share_a_few_threads_and_at_most_3_descriptors_each";

fn entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn batch(i: u64) -> EngineBatch {
    EngineBatch {
        ts: i as f64,
        events: vec![EngineEvent::BlockStored(BlockStored {
            block_hashes: vec![i + 1],
            parent_block_hash: None,
            token_ids: (0..16).collect(),
            block_size: 16,
            ..Default::default()
        })],
        dp_rank: Some(0),
    }
}

/// The child: `N` publishers with replay rings, each publishing a batch every 20 ms until
/// stdin closes. Prints `endpoint replay_endpoint` per publisher.
fn publish() {
    let pubs: Vec<KvEventPublisher> = (0..N)
        .map(|_| {
            KvEventPublisher::bind(PublisherConfig {
                replay_endpoint: Some("tcp://127.0.0.1:0".into()),
                buffer_steps: 1000,
                ..Default::default()
            })
            .unwrap()
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for p in &pubs {
        writeln!(out, "{} {}", p.endpoint(), p.replay_endpoint().unwrap()).unwrap();
    }
    out.flush().unwrap();
    let (tx, rx) = sync_channel::<()>(1);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_line(&mut String::new());
        let _ = tx.send(());
    });
    let mut i = 0;
    while rx.try_recv().is_err() {
        for p in &pubs {
            p.publish(&batch(i)).unwrap();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drain(rx: &Receiver<RouterEvent>, per_worker: &mut BTreeMap<u64, usize>) {
    while let Ok(ev) = rx.try_recv() {
        *per_worker.entry(ev.worker_id).or_default() += 1;
    }
}

#[test]
fn many_subscribers_share_a_few_threads_and_at_most_3_descriptors_each() {
    if std::env::var_os("KV_MANY_PUBLISHERS").is_some() {
        return publish();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("KV_MANY_PUBLISHERS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut endpoints = Vec::new();
    while endpoints.len() < N {
        let line = lines.next().expect("publisher exited").unwrap();
        // libtest may print its own words before ours on the first line.
        let Some(at) = line.find("tcp://") else {
            continue;
        };
        if let Some((ep, replay)) = line[at..].split_once(' ') {
            endpoints.push((ep.to_owned(), replay.trim().to_owned()));
        }
    }

    let (threads0, fds0) = (entries("/proc/self/task"), entries("/proc/self/fd"));
    let (tx, rx) = sync_channel(100_000);
    let mut subs: Vec<KvEventSubscriber> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (ep, replay))| {
            let cfg = SubscriberConfig {
                worker: WorkerWithDpRank::new(i as u64, 0),
                endpoint: ep.clone(),
                replay_endpoint: Some(replay.clone()),
                block_size: 16,
                ..Default::default()
            };
            KvEventSubscriber::start(cfg, tx.clone()).unwrap()
        })
        .collect();
    drop(tx);

    // Every subscriber applies batches (late joins recovered by replay), all of them live.
    let mut per_worker = BTreeMap::new();
    let t = Instant::now();
    while !subs.iter().all(|s| {
        let st = s.stats();
        st.applied >= 10 && st.state == SubscriberState::Live
    }) {
        assert!(t.elapsed() < DEADLINE, "not all applied");
        drain(&rx, &mut per_worker);
        std::thread::sleep(Duration::from_millis(10));
    }
    drain(&rx, &mut per_worker);
    assert_eq!(per_worker.len(), N, "events from every worker");
    for s in &subs {
        let st = s.stats();
        assert_eq!(
            (st.bad_frames, st.decode_errors, st.cleared),
            (0, 0, 0),
            "{st:?}"
        );
        assert!(st.events_out >= 10, "{st:?}");
    }

    let (threads, fds) = (entries("/proc/self/task"), entries("/proc/self/fd"));
    // The pollers, plus libzmq's I/O and reaper threads (started with the first socket).
    assert!(
        threads <= threads0 + POLLERS + 2,
        "{N} subscribers took {} threads",
        threads - threads0
    );
    // Two each (the TCP connection, the socket's eventfd mailbox) and a few for the pollers
    // and libzmq's threads; the router's budget is 3 per worker, one left for HTTP.
    assert!(
        fds <= fds0 + 2 * N + 16,
        "{N} subscribers took {} descriptors",
        fds.saturating_sub(fds0)
    );

    // Stopping half closes their sockets, and no event of theirs arrives afterwards.
    let kept = subs.split_off(N / 2);
    let stopped: BTreeSet<u64> = (0..(N / 2) as u64).collect();
    for s in subs {
        s.stop();
    }
    drain(&rx, &mut BTreeMap::new());
    let t = Instant::now();
    // libzmq's reaper closes descriptors just after the sockets are closed.
    while entries("/proc/self/fd") + N > fds {
        assert!(
            t.elapsed() < DEADLINE,
            "stopped subscribers kept their sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut after = BTreeMap::new();
    drain(&rx, &mut after);
    assert!(after.keys().all(|w| !stopped.contains(w)), "{after:?}");
    assert_eq!(after.len(), N / 2, "the others go on: {after:?}");

    drop(kept);
    drop(child.stdin.take());
    let _ = child.wait();
}
