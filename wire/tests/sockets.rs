//! Real-socket tests against libzmq peers driven by pyzmq (issue 3 items 4, 5, 8; issue 13
//! item 3): our subscriber against a pyzmq publisher sending the recorded engine frames (live,
//! late join, gaps recovered by replay in both reply layouts, incomplete replay, publisher
//! restart, bad frames, queue overflow, bind mode, oversize frames, hostile replay rings), and
//! our publisher against a pyzmq subscriber.
//!
//! Waits below only synchronise with other processes (generous deadlines, failure = hang
//! guard); nothing asserts on speed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use common::{load, python};
use kvrouter_core::event::{KvCacheEventData, RouterEvent, WorkerWithDpRank};
use kvrouter_wire::engine::{
    decode_batch, BlockRemoved, BlockStored, DecodeStats, Encoding, EngineBatch, EngineEvent,
};
use kvrouter_wire::subscriber::{ReplayLimits, SubscriberState, SubscriberStats};
use kvrouter_wire::{
    Converter, KvEventPublisher, KvEventSubscriber, PublisherConfig, SubscriberConfig,
};
use serde_json::Value;

const W: WorkerWithDpRank = WorkerWithDpRank::new(42, 0);
const FILE: &str = "vllm-0.33.0/shared-prefix.jsonl";
const DEADLINE: Duration = Duration::from_secs(30);

fn script(name: &str) -> String {
    format!("{}/tests/py/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Lines of a child's stdout, read on a thread.
fn line_reader(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &Receiver<String>) -> String {
    rx.recv_timeout(DEADLINE)
        .expect("python helper did not answer (is pyzmq installed? run scripts/test)")
}

struct PyPub {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    endpoint: String,
    replay: Option<String>,
    /// Recorded payloads in the order the script sends them.
    payloads: Vec<Vec<u8>>,
    cursor: usize,
}

impl PyPub {
    fn spawn(extra: &[&str]) -> Self {
        let path = common::kv_events_dir().join(FILE);
        let mut child = Command::new(python())
            .arg(script("kv_pub.py"))
            .args(extra)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python");
        let stdin = child.stdin.take().unwrap();
        let lines = line_reader(&mut child);
        let hello: Value = serde_json::from_str(&next_line(&lines)).unwrap();
        let payloads = load(FILE).into_iter().map(|r| r.payload).collect();
        Self {
            child,
            stdin,
            lines,
            endpoint: hello["endpoint"].as_str().unwrap().to_owned(),
            replay: hello["replay"].as_str().map(str::to_owned),
            payloads,
            cursor: 0,
        }
    }

    fn with_replay(layout: &str) -> Self {
        Self::spawn(&[
            "--pub",
            "tcp://127.0.0.1:*",
            "--replay",
            "tcp://127.0.0.1:*",
            "--layout",
            layout,
        ])
    }

    /// Runs a command; returns the payloads it consumed (sent or skipped).
    fn cmd(&mut self, c: &str) -> Vec<Vec<u8>> {
        writeln!(self.stdin, "{c}").unwrap();
        let reply = next_line(&self.lines);
        let parts: Vec<&str> = reply.split_whitespace().collect();
        assert_eq!(parts[0], "ok", "{reply}");
        let cursor: usize = parts[2].parse().unwrap();
        let used = (self.cursor..cursor)
            .map(|i| self.payloads[i % self.payloads.len()].clone())
            .collect();
        self.cursor = cursor;
        used
    }
}

impl Drop for PyPub {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

struct Sub {
    sub: Option<KvEventSubscriber>,
    rx: Receiver<RouterEvent>,
    events: Vec<RouterEvent>,
}

impl Sub {
    fn start(cfg: SubscriberConfig, sink_capacity: usize) -> Self {
        let (tx, rx) = sync_channel(sink_capacity);
        Self {
            sub: Some(KvEventSubscriber::start(cfg, tx).unwrap()),
            rx,
            events: Vec::new(),
        }
    }

    fn stats(&self) -> SubscriberStats {
        self.sub.as_ref().unwrap().stats()
    }

    /// Drains events until `cond(stats)` holds.
    fn wait(&mut self, what: &str, cond: impl Fn(&SubscriberStats) -> bool) {
        self.wait_for(what, |st, _| cond(st));
    }

    /// Drains events until `cond(stats, events so far)` holds.
    fn wait_for(&mut self, what: &str, cond: impl Fn(&SubscriberStats, &[RouterEvent]) -> bool) {
        let t = Instant::now();
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.events.push(ev);
            }
            let st = self.stats();
            if cond(&st, &self.events) {
                // Everything the processor emitted before updating the counters is queued.
                while let Ok(ev) = self.rx.try_recv() {
                    self.events.push(ev);
                }
                return;
            }
            assert!(
                t.elapsed() < DEADLINE,
                "timed out waiting for {what}: {st:?}"
            );
            if let Ok(ev) = self.rx.recv_timeout(Duration::from_millis(20)) {
                self.events.push(ev);
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        // No draining first: `stop` must return even when the sink is full.
        if let Some(s) = self.sub.take() {
            s.stop();
        }
    }
}

fn sub_config(endpoint: &str, replay: Option<&str>) -> SubscriberConfig {
    SubscriberConfig {
        worker: W,
        endpoint: endpoint.to_owned(),
        replay_endpoint: replay.map(str::to_owned),
        topic: String::new(),
        bind: false,
        block_size: 16,
        queue_capacity: 1024,
        ..Default::default()
    }
}

/// Sends recorded batches one at a time until the subscriber has received one live (the
/// ZMQ slow-joiner window); what it missed is recovered as a late join.
fn sync(p: &mut PyPub, s: &mut Sub) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    let t = Instant::now();
    while s.stats().received == 0 {
        assert!(t.elapsed() < DEADLINE, "subscriber never connected");
        sent.extend(p.cmd("send 1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    sent
}

/// What the subscriber must emit for these payloads in this order, with `Cleared` where `None`.
fn expected(items: &[Option<&Vec<u8>>]) -> Vec<RouterEvent> {
    let mut conv = Converter::new(W, 16);
    let mut out = Vec::new();
    for it in items {
        match it {
            Some(p) => {
                let b = decode_batch(p, &mut DecodeStats::default()).unwrap();
                conv.convert_batch(&b, &mut out);
            }
            None => conv.cleared(&mut out),
        }
    }
    out
}

fn some(v: &[Vec<u8>]) -> Vec<Option<&Vec<u8>>> {
    v.iter().map(Some).collect()
}

#[test]
fn late_join_is_replayed_then_live_follows() {
    let mut p = PyPub::with_replay("new");
    // Published before anyone listens: only the replay buffer has these.
    let mut sent = p.cmd("send 5");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    sent.extend(sync(&mut p, &mut s));
    sent.extend(p.cmd("send 10"));
    let n = sent.len() as u64;
    s.wait("all batches", |st| st.applied == n);
    let st = s.stats();
    assert_eq!(st.gaps, 1, "{st:?}");
    assert_eq!(st.recovered, 1, "{st:?}");
    assert_eq!(st.cleared, 0, "{st:?}");
    assert!(st.replayed >= 5, "{st:?}");
    assert_eq!(s.events, expected(&some(&sent)));
}

fn gap_recovery(layout: &str) {
    let mut p = PyPub::with_replay(layout);
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let mut sent = sync(&mut p, &mut s);
    let gaps0 = s.stats().gaps;
    sent.extend(p.cmd("send 2"));
    sent.extend(p.cmd("skip 1")); // lost on the live socket, kept in replay
    sent.extend(p.cmd("send 3"));
    let n = sent.len() as u64;
    s.wait("all batches", |st| st.applied == n);
    let st = s.stats();
    assert_eq!(st.gaps, gaps0 + 1, "{st:?}");
    assert_eq!(st.recovered, st.gaps, "{st:?}");
    assert_eq!(st.cleared, 0);
    // The skipped batch is applied in order, before the newer live ones.
    assert_eq!(s.events, expected(&some(&sent)));
}

#[test]
fn gap_is_recovered_from_replay_vllm_026_layout() {
    gap_recovery("new");
}

#[test]
fn gap_is_recovered_from_replay_vllm_025_layout() {
    gap_recovery("old");
}

#[test]
fn incomplete_replay_clears_the_worker() {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let before = sync(&mut p, &mut s);
    let skipped = p.cmd("skip 2");
    assert_eq!(skipped.len(), 2);
    p.cmd("drop_ring"); // the engine's buffer no longer holds the gap
    let after = p.cmd("send 3");
    s.wait("live batches after the gap", |st| {
        st.cleared == 1 && st.applied >= (before.len() + 3) as u64
    });
    let st = s.stats();
    assert_eq!(st.recovered, st.gaps - 1, "{st:?}");
    let mut items = some(&before);
    items.push(None);
    items.extend(after.iter().map(Some));
    assert_eq!(s.events, expected(&items));
}

#[test]
fn gap_without_replay_endpoint_clears_the_worker() {
    let mut p = PyPub::spawn(&["--pub", "tcp://127.0.0.1:*"]);
    let mut s = Sub::start(sub_config(&p.endpoint, None), 1024);
    sync(&mut p, &mut s);
    s.wait("synced", |st| st.applied == st.received);
    // A late join without replay already cleared once; frames lost before it are gone.
    let (cleared0, applied0) = (s.stats().cleared, s.stats().applied);
    p.cmd("skip 1");
    let after = p.cmd("send 2");
    s.wait("batches after the gap", |st| {
        st.cleared == cleared0 + 1 && st.applied == applied0 + 2
    });
    let tail: Vec<RouterEvent> =
        s.events[s.events.len() - expected(&some(&after)).len() - 1..].to_vec();
    let mut items = vec![None];
    items.extend(after.iter().map(Some));
    let want = expected(&items);
    // Same content, the event ids differ by the prefix already emitted.
    let strip = |v: &[RouterEvent]| v.iter().map(|e| e.event.data.clone()).collect::<Vec<_>>();
    assert_eq!(strip(&tail), strip(&want));
}

#[test]
fn publisher_restart_clears_the_worker() {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let mut before = sync(&mut p, &mut s);
    before.extend(p.cmd("send 2"));
    s.wait("first life", |st| st.applied == before.len() as u64);
    p.cmd("restart");
    let after = p.cmd("send 3");
    s.wait("second life", |st| {
        st.restarts == 1 && st.applied == (before.len() + 3) as u64
    });
    let st = s.stats();
    assert_eq!(st.cleared, 1, "{st:?}");
    let mut items = some(&before);
    items.push(None);
    items.extend(after.iter().map(Some));
    assert_eq!(s.events, expected(&items));
}

#[test]
fn bad_frames_and_payloads_are_counted_not_fatal() {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let mut sent = sync(&mut p, &mut s);
    p.cmd("badframes");
    p.cmd("garbage"); // consumes a seq: a decode error, not a gap
    sent.extend(p.cmd("send 2"));
    s.wait("batches after the garbage", |st| {
        st.applied == sent.len() as u64 && st.decode_errors == 1
    });
    let st = s.stats();
    assert_eq!(st.bad_frames, 3, "{st:?}");
    assert_eq!(st.cleared, 0, "{st:?}");
    assert_eq!(s.events, expected(&some(&sent)));
}

#[test]
fn queue_overflow_is_dropped_then_recovered_as_a_gap() {
    let mut p = PyPub::with_replay("new");
    let mut cfg = sub_config(&p.endpoint, p.replay.as_deref());
    cfg.queue_capacity = 1;
    // A sink that holds one event: the processor blocks, the queue fills, the reader drops.
    let mut s = Sub::start(cfg, 1);
    let mut sent = Vec::new();
    let t = Instant::now();
    while s.stats().dropped == 0 {
        assert!(t.elapsed() < DEADLINE, "nothing dropped: {:?}", s.stats());
        sent.extend(p.cmd("send 5"));
        std::thread::sleep(Duration::from_millis(20));
    }
    // No further live batch needs to reveal the gap: an idle processor replays a dropped tail.
    let n = sent.len() as u64;
    s.wait("everything", |st| st.applied == n);
    let st = s.stats();
    assert!(
        st.dropped > 0 && st.gaps >= 1 && st.recovered == st.gaps && st.cleared == 0,
        "{st:?}"
    );
    assert_eq!(s.events, expected(&some(&sent)));
}

#[test]
fn bind_mode_accepts_a_connecting_engine() {
    // vLLM connects its PUB when the endpoint has no wildcard; then the router binds.
    let (tx, rx) = sync_channel(1024);
    let mut cfg = sub_config("tcp://127.0.0.1:0", None);
    cfg.bind = true;
    let sub = KvEventSubscriber::start(cfg, tx).unwrap();
    let ep = sub.endpoint().to_owned();
    assert!(!ep.ends_with(":0"), "{ep}");
    let mut p = PyPub::spawn(&["--pub", &ep, "--connect", "--replay", "tcp://127.0.0.1:*"]);
    let mut s = Sub {
        sub: Some(sub),
        rx,
        events: Vec::new(),
    };
    let sent = sync(&mut p, &mut s);
    // Connect mode gave the subscriber no replay endpoint: a missed start clears, but every
    // batch received live is applied in order.
    s.wait("live", |st| st.applied >= 1);
    assert!(s.stats().bad_frames == 0 && !sent.is_empty());
    assert!(matches!(
        s.events.last().map(|e| &e.event.data),
        Some(KvCacheEventData::Stored(_))
    ));
}

fn sample_batch(i: u64) -> EngineBatch {
    let toks: Vec<u32> = (0..32).map(|t| (i as u32) * 100 + t).collect();
    EngineBatch {
        ts: 1000.0 + i as f64,
        events: vec![
            EngineEvent::BlockStored(BlockStored {
                block_hashes: vec![i * 2 + (1 << 63), i * 2 + 1],
                parent_block_hash: None,
                token_ids: toks,
                block_size: 16,
                medium: Some("GPU".into()),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                ..Default::default()
            }),
            EngineEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![7],
                medium: Some("GPU".into()),
                ..Default::default()
            }),
            EngineEvent::AllBlocksCleared,
        ],
        dp_rank: Some(0),
    }
}

fn our_publisher_to_pyzmq(encoding: Encoding) {
    let publisher = KvEventPublisher::bind(PublisherConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: "kv-events".into(),
        buffer_steps: 100,
        encoding,
    })
    .unwrap();
    let mut child = Command::new(python())
        .arg(script("kv_sub.py"))
        .args([
            "--sub",
            publisher.endpoint(),
            "--replay",
            publisher.replay_endpoint().unwrap(),
            "--topic",
            "kv",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = line_reader(&mut child);
    // Publish until the pyzmq SUB sees one live message (slow joiner), then replay from 0.
    let mut i = 0;
    let first_live = loop {
        assert!(i < 1000, "pyzmq subscriber never received");
        publisher.publish(&sample_batch(i)).unwrap();
        i += 1;
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(20)) {
            break l;
        }
    };
    assert!(
        first_live.starts_with("live ") && first_live.ends_with(" kv-events"),
        "{first_live}"
    );
    writeln!(stdin, "replay 0").unwrap();
    let mut replies = Vec::new();
    loop {
        let l = next_line(&lines);
        if l == "end" {
            break;
        }
        if l.starts_with('{') {
            replies.push(serde_json::from_str::<Value>(&l).unwrap());
        }
    }
    let _ = writeln!(stdin, "quit");
    let _ = child.wait();
    let published = publisher.next_seq();
    assert_eq!(
        replies.len() as u64,
        published + 1,
        "every batch then the end marker"
    );
    let end = replies.last().unwrap();
    assert_eq!(
        (end["seq"].as_i64(), end["frames"].as_u64()),
        (Some(-1), Some(4))
    );
    for (k, r) in replies[..replies.len() - 1].iter().enumerate() {
        assert_eq!(r["seq"], k as u64);
        assert_eq!(r["topic"], "kv-events");
        let d = &r["decoded"];
        let want = sample_batch(k as u64);
        assert_eq!(d[0].as_f64().unwrap(), want.ts);
        assert_eq!(d[2], 0);
        let evs = d[1].as_array().unwrap();
        assert_eq!(evs.len(), 3);
        let EngineEvent::BlockStored(s) = &want.events[0] else {
            unreachable!()
        };
        match encoding {
            Encoding::Map => {
                // vLLM 0.33 key order and always-present nullable fields.
                assert_eq!(
                    r["event_keys"][0],
                    serde_json::json!([
                        "type",
                        "block_hashes",
                        "parent_block_hash",
                        "token_ids",
                        "block_size",
                        "lora_id",
                        "medium",
                        "lora_name",
                        "group_idx",
                        "kv_cache_spec_kind"
                    ])
                );
                assert_eq!(evs[0]["block_hashes"][0].as_u64(), Some(s.block_hashes[0]));
                assert_eq!(evs[0]["token_ids"].as_array().unwrap().len(), 32);
                assert_eq!(evs[1]["type"], "BlockRemoved");
                assert_eq!(evs[2], serde_json::json!({"type": "AllBlocksCleared"}));
            }
            Encoding::Array => {
                let a = evs[0].as_array().unwrap();
                assert_eq!(a[0], "BlockStored");
                assert_eq!(a[1][0].as_u64(), Some(s.block_hashes[0]));
                assert_eq!(a[4], 16);
                assert_eq!(a[6], "GPU");
                assert_eq!(evs[1], serde_json::json!(["BlockRemoved", [7], "GPU"]));
                assert_eq!(evs[2], serde_json::json!(["AllBlocksCleared"]));
            }
            Encoding::Sglang => {
                // SGLang 0.5.23's keys: no lora_name, group_idx or kv_cache_spec_kind.
                assert_eq!(
                    r["event_keys"][0],
                    serde_json::json!([
                        "type",
                        "block_hashes",
                        "parent_block_hash",
                        "token_ids",
                        "block_size",
                        "lora_id",
                        "medium"
                    ])
                );
                // A hash at or above 2^63 is a negative int64, as SGLang sends it.
                let h = evs[0]["block_hashes"][0].as_i64().unwrap();
                assert!(h < 0 && h as u64 == s.block_hashes[0], "{h}");
                assert_eq!(
                    evs[1],
                    serde_json::json!({"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"})
                );
                assert_eq!(evs[2], serde_json::json!({"type": "AllBlocksCleared"}));
            }
        }
    }
}

#[test]
fn our_sglang_publisher_to_pyzmq_subscriber() {
    our_publisher_to_pyzmq(Encoding::Sglang);
}

#[test]
fn our_map_publisher_to_pyzmq_subscriber() {
    our_publisher_to_pyzmq(Encoding::Map);
}

#[test]
fn our_array_publisher_to_pyzmq_subscriber() {
    our_publisher_to_pyzmq(Encoding::Array);
}

#[test]
fn our_publisher_to_our_subscriber_from_many_threads() {
    let publisher = std::sync::Arc::new(
        KvEventPublisher::bind(PublisherConfig {
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            ..Default::default()
        })
        .unwrap(),
    );
    let mut s = Sub::start(
        sub_config(publisher.endpoint(), publisher.replay_endpoint()),
        1024,
    );
    let t = Instant::now();
    let mut n = 0;
    while s.stats().received == 0 {
        assert!(t.elapsed() < DEADLINE);
        publisher
            .publish(&EngineBatch {
                ts: 0.0,
                events: vec![],
                dp_rank: Some(0),
            })
            .unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let p = publisher.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    p.publish(&sample_batch(k * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let total = n + 100;
    s.wait("all", |st| st.applied == total);
    let st = s.stats();
    assert_eq!(st.cleared, 0, "{st:?}");
    // 100 sample batches × (store, remove, clear).
    let kinds = s.events.iter().fold([0; 3], |mut a, e| {
        a[match e.event.data {
            KvCacheEventData::Stored(_) => 0,
            KvCacheEventData::Removed(_) => 1,
            KvCacheEventData::Cleared => 2,
        }] += 1;
        a
    });
    assert_eq!(s.events.len(), 300, "{st:?} n={n} {kinds:?}");
    assert_eq!(
        s.events
            .iter()
            .map(|e| e.event.event_id)
            .collect::<Vec<_>>(),
        (0..300).collect::<Vec<u64>>()
    );
}

#[test]
fn reconnects_to_a_restarted_publisher_and_clears_the_worker() {
    let cfg = |ep: &str, rep: &str| PublisherConfig {
        endpoint: ep.into(),
        replay_endpoint: Some(rep.into()),
        ..Default::default()
    };
    let p1 = KvEventPublisher::bind(cfg("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")).unwrap();
    let (ep, rep) = (
        p1.endpoint().to_owned(),
        p1.replay_endpoint().unwrap().to_owned(),
    );
    let mut s = Sub::start(sub_config(&ep, Some(&rep)), 1024);
    let t = Instant::now();
    while s.stats().received == 0 {
        assert!(t.elapsed() < DEADLINE);
        p1.publish(&EngineBatch {
            ts: 0.0,
            events: vec![],
            dp_rank: Some(0),
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    // Enough history that the new life's first seen seq is certainly lower.
    for i in 0..50 {
        p1.publish(&sample_batch(i)).unwrap();
    }
    let first_life = p1.next_seq();
    s.wait("first life", |st| st.applied == first_life);
    drop(p1);

    // Same addresses, sequence starts at 0 again; libzmq reconnects the SUB by itself.
    let p2 = KvEventPublisher::bind(cfg(&ep, &rep)).unwrap();
    let t = Instant::now();
    let mut i = 1000;
    while s.stats().restarts == 0 {
        assert!(t.elapsed() < DEADLINE, "no restart seen: {:?}", s.stats());
        p2.publish(&sample_batch(i)).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let total = first_life + p2.next_seq();
    s.wait("second life", |st| st.applied == total);
    let st = s.stats();
    assert_eq!((st.restarts, st.cleared), (1, 1), "{st:?}");
    // After the Cleared: exactly the second life's batches, replayed from its seq 0.
    let pos = s
        .events
        .iter()
        .position(|e| e.event.data == KvCacheEventData::Cleared && e.event.event_id >= 150)
        .unwrap();
    let after = &s.events[pos + 1..];
    assert_eq!(after.len() as u64, 3 * p2.next_seq(), "{st:?}");
    let first_store = after.iter().find_map(|e| match &e.event.data {
        KvCacheEventData::Stored(d) => Some(d.blocks[0].block_hash.0),
        _ => None,
    });
    assert_eq!(
        first_store,
        Some(1000 * 2 + (1 << 63)),
        "replay starts at the new seq 0"
    );
}

#[test]
fn batches_published_before_the_subscriber_joined_are_replayed_without_later_traffic() {
    // The slow-joiner case: the engine publishes once, before our SUB is connected, and then
    // stays idle. Nothing live reveals the gap; the subscriber must fetch it from the ring.
    let publisher = KvEventPublisher::bind(PublisherConfig {
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        ..Default::default()
    })
    .unwrap();
    for i in 0..3 {
        publisher.publish(&sample_batch(i)).unwrap();
    }
    let mut s = Sub::start(
        sub_config(publisher.endpoint(), publisher.replay_endpoint()),
        1024,
    );
    s.wait("replayed", |st| st.applied == 3);
    let st = s.stats();
    assert_eq!(st.received, 0, "nothing came live: {st:?}");
    assert_eq!(st.cleared, 0, "the ring held everything from seq 0: {st:?}");
    assert_eq!(
        s.events.len(),
        9,
        "3 batches × (store, remove, clear): {st:?}"
    );
    // Live traffic afterwards continues the sequence without duplicates.
    publisher.publish(&sample_batch(3)).unwrap();
    s.wait("live", |st| st.applied == 4);
    assert_eq!(s.stats().duplicates, 0);
}

// ---------------------------------------------------------------------------------------------
// Hostile replay rings and oversize frames (issue 13 item 3). Each reproducer waits on
// behaviour (events reaching the sink in order); the counters it then checks go through the
// helpers below.

const SEQ_2_62: u64 = 1 << 62;

/// `cfg` with its replay limits changed by `f`.
fn with_limits(mut cfg: SubscriberConfig, f: impl FnOnce(&mut ReplayLimits)) -> SubscriberConfig {
    f(&mut cfg.replay);
    cfg
}

fn replay_failures(st: &SubscriberStats) -> u64 {
    st.replay_failures
}

fn oversize(st: &SubscriberStats) -> u64 {
    st.oversize
}

/// Events without their ids (which depend on what was emitted before).
fn strip(v: &[RouterEvent]) -> Vec<KvCacheEventData> {
    v.iter().map(|e| e.event.data.clone()).collect()
}

/// A subscriber synced with `p` (late join recovered), `n` more batches applied; returns every
/// payload sent so far.
fn synced(p: &mut PyPub, s: &mut Sub, n: usize) -> Vec<Vec<u8>> {
    let mut before = sync(p, s);
    before.extend(p.cmd(&format!("send {n}")));
    let k = before.len() as u64;
    s.wait("synced", |st| st.applied == k);
    before
}

/// After a failed replay: honest again, two more live batches are applied after the rest.
fn live_flows_again(p: &mut PyPub, s: &mut Sub, items: &mut Vec<Option<Vec<u8>>>) {
    p.cmd("hostile off");
    let more = p.cmd("send 2");
    let n = items.iter().flatten().count() as u64 + 2;
    s.wait("live batches after the failed replay", |st| st.applied == n);
    items.extend(more.into_iter().map(Some));
    let want: Vec<Option<&Vec<u8>>> = items.iter().map(Option::as_ref).collect();
    assert_eq!(s.events, expected(&want), "{:?}", s.stats());
}

/// The common shape: a gap answered by the ring in `mode`, which must fail the replay: the
/// worker is cleared once, the live batches after the gap are applied, nothing the ring sent
/// is, and live events keep flowing.
fn failed_gap_replay(
    mode: &str,
    gap: usize,
    cfg: impl FnOnce(SubscriberConfig) -> SubscriberConfig,
) {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(cfg(sub_config(&p.endpoint, p.replay.as_deref())), 1024);
    let before = synced(&mut p, &mut s, 2);
    let (failures0, cleared0) = (replay_failures(&s.stats()), s.stats().cleared);
    p.cmd(&format!("hostile {mode}"));
    p.cmd(&format!("skip {gap}"));
    let after = p.cmd("send 2");
    let n = (before.len() + 2) as u64;
    s.wait("live batches after the gap", |st| {
        st.cleared == cleared0 + 1 && st.applied == n
    });
    let st = s.stats();
    assert!(replay_failures(&st) > failures0, "{st:?}");
    assert_eq!(st.duplicates, 0, "{st:?}");
    let mut items: Vec<Option<Vec<u8>>> = before.into_iter().map(Some).collect();
    items.push(None);
    items.extend(after.into_iter().map(Some));
    live_flows_again(&mut p, &mut s, &mut items);
}

#[test]
fn gap_replay_answering_seq_2_62_fails_and_live_batches_are_still_applied() {
    // Old behaviour: the 2^62 batch was applied and every later live batch was a "duplicate".
    failed_gap_replay(&format!("seq {SEQ_2_62}"), 1, |c| c);
}

#[test]
fn join_probe_answered_with_seq_2_62_does_not_make_live_batches_duplicates() {
    let mut p = PyPub::with_replay("new");
    p.cmd(&format!("hostile seq {SEQ_2_62}"));
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    // Nothing published: the join probe gets the ring's only batch, seq 2^62, and applies it
    // after clearing (the ring does not start at 0).
    s.wait("join probe", |st| st.applied == 1);
    let _ = sync(&mut p, &mut s);
    let after = p.cmd("send 5");
    let want = strip(&expected(&some(&after)));
    // The last batches' events are in the sink, and every live batch received is applied (the
    // 1 is the probe's): none was taken for a duplicate.
    s.wait_for("live batches after the probe", |st, ev| {
        ev.len() >= want.len()
            && strip(&ev[ev.len() - want.len()..]) == want
            && st.applied == 1 + st.received
    });
    let st = s.stats();
    assert_eq!(st.duplicates, 0, "{st:?}");
    assert!(replay_failures(&st) >= 1, "{st:?}");
    // Cleared once by the probe (its ring lacked seq 0), once when live seqs showed it bogus.
    assert_eq!(st.cleared, 2, "{st:?}");
}

#[test]
fn replay_with_duplicated_batches_and_seqs_past_live_fails_and_live_resumes() {
    // 3 batches past the live seq, then every in-range batch twice.
    failed_gap_replay("dup", 3, |c| c);
}

#[test]
fn replay_batches_at_or_past_the_live_seq_are_ignored() {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let mut sent = synced(&mut p, &mut s, 2);
    let (gaps0, recovered0) = (s.stats().gaps, s.stats().recovered);
    // The ring first sends 3 batches with the publisher's next seqs (fake payloads), then the
    // honest ones: only `[from, live)` may be applied; the live batches come live.
    p.cmd("hostile extra");
    sent.extend(p.cmd("skip 2"));
    sent.extend(p.cmd("send 2"));
    let n = sent.len() as u64;
    s.wait("the gap", |st| st.applied >= n);
    p.cmd("hostile off");
    sent.extend(p.cmd("send 2"));
    let n = sent.len() as u64;
    s.wait("everything", |st| st.applied >= n);
    let st = s.stats();
    assert_eq!(st.applied, n, "{st:?}");
    assert_eq!(
        (st.gaps, st.recovered, st.cleared, st.duplicates),
        (gaps0 + 1, recovered0 + 1, 0, 0),
        "{st:?}"
    );
    assert_eq!(replay_failures(&st), 0, "{st:?}");
    assert_eq!(s.events, expected(&some(&sent)));
}

#[test]
fn replay_streaming_1mib_batches_without_end_is_cut_by_the_byte_cap() {
    // 1 MiB every 100 ms, never silent for long, no end marker: only `max_bytes` stops it
    // within the hang guard (the deadline is longer than the guard).
    failed_gap_replay("stream 1048576 100", 1, |c| {
        with_limits(c, |l| {
            l.max_bytes = 8 << 20;
            l.deadline = Duration::from_secs(120);
        })
    });
}

#[test]
fn replay_streaming_1mib_batches_without_end_is_cut_by_the_total_deadline() {
    // 1 MiB every 400 ms: far under the byte cap and never `silence` long; only the total
    // deadline (not reset by each reply) stops it within the hang guard.
    failed_gap_replay("stream 1048576 400", 1, |c| {
        with_limits(c, |l| {
            l.max_bytes = 1 << 30;
            l.deadline = Duration::from_secs(3);
        })
    });
}

#[test]
fn replay_streaming_small_batches_without_end_is_cut_by_the_batch_cap() {
    failed_gap_replay("stream 16 5", 1, |c| {
        with_limits(c, |l| {
            l.max_batches = 100;
            l.deadline = Duration::from_secs(120);
        })
    });
}

#[test]
fn live_frame_over_max_frame_bytes_is_dropped_counted_and_the_stream_continues() {
    let mut p = PyPub::with_replay("new");
    let mut s = Sub::start(sub_config(&p.endpoint, p.replay.as_deref()), 1024);
    let before = synced(&mut p, &mut s, 2);
    // A decodable batch of 5 MiB (default limit 4 MiB), kept in the ring too: dropped live,
    // then its replay fails on the same limit, so the worker is cleared.
    p.cmd(&format!("oversize {}", 5 << 20));
    let after = p.cmd("send 2");
    let n = (before.len() + 2) as u64;
    s.wait("live batches after the oversize frame", |st| {
        st.cleared == 1 && st.applied == n
    });
    let st = s.stats();
    assert_eq!(oversize(&st), 1, "{st:?}");
    assert!(replay_failures(&st) >= 1, "{st:?}");
    assert_eq!(st.decode_errors, 0, "{st:?}");
    let mut items: Vec<Option<Vec<u8>>> = before.into_iter().map(Some).collect();
    items.push(None);
    items.extend(after.into_iter().map(Some));
    live_flows_again(&mut p, &mut s, &mut items);
}

#[test]
fn state_next_seq_and_backpressure_are_visible() {
    let mut p = PyPub::with_replay("new");
    let cfg = sub_config(&p.endpoint, p.replay.as_deref());
    // A sink of one event: the processor waits for room.
    let (tx, rx) = sync_channel(1);
    let sub = KvEventSubscriber::start(cfg, tx).unwrap();
    assert_eq!(sub.stats().next_seq, None);
    assert!(
        matches!(
            sub.stats().state,
            SubscriberState::Joining | SubscriberState::Replaying
        ),
        "{:?}",
        sub.stats()
    );
    let mut s = Sub {
        sub: Some(sub),
        rx,
        events: Vec::new(),
    };
    let mut sent = synced(&mut p, &mut s, 0);
    // Nobody drains the sink meanwhile: the processor must wait for room.
    sent.extend(p.cmd("send 20"));
    let t = Instant::now();
    while s.stats().backpressure == 0 {
        assert!(t.elapsed() < DEADLINE, "no backpressure: {:?}", s.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = sent.len() as u64;
    s.wait("settled", |st| st.next_seq == Some(n));
    let st = s.stats();
    assert_eq!(st.state, SubscriberState::Live, "{st:?}");
    assert_eq!(st.state.as_str(), "live");
    assert!(st.backpressure > 0, "{st:?}");
    assert_eq!(s.events, expected(&some(&sent)));
    // The sink's receiver goes away: the subscriber stops by itself, visibly.
    let Sub { sub, rx, .. } = &mut s;
    drop(std::mem::replace(rx, sync_channel(1).1));
    p.cmd("send 1");
    let t = Instant::now();
    while sub.as_ref().unwrap().stats().state != SubscriberState::Stopped {
        assert!(
            t.elapsed() < DEADLINE,
            "{:?}",
            sub.as_ref().unwrap().stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
