//! The relay end to end, all in Rust: recorded engine frames published by a `KvEventPublisher`
//! standing in for the engine, relayed by a `KvEventRelay` onto a second publisher, read back by
//! our own `KvEventSubscriber`. Both joins are late (the engine published before the relay
//! subscribed, the relay before the subscriber did), so both replay paths are exercised; the
//! router events must equal those of converting the recorded frames directly.
//!
//! Waits only synchronise with the threads involved (generous deadlines, failure = hang guard).

mod common;

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load;
use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_wire::engine::{decode_batch, DecodeStats, EngineBatch};
use kvrouter_wire::KvEventSubscriber;
use kvrouter_wire::{
    Converter, KvEventPublisher, KvEventRelay, PublisherConfig, RelayConfig, SubscriberConfig,
};

const W: WorkerWithDpRank = WorkerWithDpRank::new(7, 0);
const DEADLINE: Duration = Duration::from_secs(30);

fn publisher() -> KvEventPublisher {
    KvEventPublisher::bind(PublisherConfig {
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn relayed_recordings_convert_as_the_originals() {
    for file in [
        "vllm-0.33.0/shared-prefix.jsonl",
        "vllm-0.20.0/shared-prefix.jsonl",
        "sglang-0.5.23/shared-prefix.jsonl",
    ] {
        let recorded = load(file);
        let mut want = Vec::new();
        let mut conv = Converter::new(W, 16);
        for r in &recorded {
            let batch = decode_batch(&r.payload, &mut DecodeStats::default()).unwrap();
            conv.convert_batch(&batch, &mut want);
        }

        let engine = publisher();
        for r in &recorded {
            engine.publish_payload(r.payload.clone().into()).unwrap();
        }
        let out = Arc::new(publisher());
        let relay = KvEventRelay::start(
            RelayConfig {
                endpoint: engine.endpoint().to_owned(),
                replay_endpoint: engine.replay_endpoint().map(str::to_owned),
                topic: String::new(),
                bind: false,
                dp_rank: 0,
                block_size: 16,
                replay: Default::default(),
            },
            out.clone(),
        )
        .unwrap();
        // The relay acts on live messages: empty batches (which it drops) until one arrives;
        // it then replays what it missed from the engine's ring.
        let since = Instant::now();
        while relay.stats().received == 0 {
            assert!(
                since.elapsed() < DEADLINE,
                "{file}: the relay never received"
            );
            engine.publish(&EngineBatch::default()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        while relay.stats().published < recorded.len() as u64 {
            assert!(since.elapsed() < DEADLINE, "{file}: {:?}", relay.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = relay.stats();
        assert_eq!(
            (stats.gaps, stats.recovered, stats.cleared),
            (1, 1, 0),
            "{file}"
        );

        let (tx, rx) = sync_channel::<RouterEvent>(10_000);
        let sub = KvEventSubscriber::start(
            SubscriberConfig {
                worker: W,
                endpoint: out.endpoint().to_owned(),
                replay_endpoint: out.replay_endpoint().map(str::to_owned),
                block_size: 16,
                ..Default::default()
            },
            tx,
        )
        .unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(
                rx.recv_timeout(DEADLINE)
                    .unwrap_or_else(|_| panic!("{file}: {} of {} events", got.len(), want.len())),
            );
        }
        assert_eq!(got, want, "{file}");
        sub.stop();
        relay.stop();
    }
}
