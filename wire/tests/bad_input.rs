//! Hostile and broken input (issue 3 item 9): counted or rejected with typed errors, never a
//! panic, never touching other workers' state. Also runs every fuzzer-found input in
//! `tests/regressions/`.

mod common;

use common::{all_files, load};
use kvrouter_core::event::{KvCacheEventData, WorkerWithDpRank};
use kvrouter_core::hash::{compute_block_hashes, HashOptions};
use kvrouter_core::index::KvIndex;
use kvrouter_wire::engine::{
    decode_batch, BlockStored, DecodeStats, Encoding, EngineBatch, EngineEvent,
};
use kvrouter_wire::frame::{split_message, FrameError};
use kvrouter_wire::fuzz::{fuzz_frames, fuzz_trtllm};
use kvrouter_wire::msgpack::{MsgpackError, Writer};
use kvrouter_wire::{encode_batch, Converter};

/// xorshift64*: deterministic, dependency-free randomness for the tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn all_payloads() -> Vec<Vec<u8>> {
    all_files()
        .iter()
        .flat_map(|f| load(f))
        .map(|r| r.payload)
        .collect()
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..5_000 {
        let len = rng.below(256);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Bias towards msgpack-looking starts so the decoder gets past the first byte.
        if !data.is_empty() && rng.below(2) == 0 {
            data[0] = 0x93;
        }
        fuzz_frames(&data);
    }
}

#[test]
fn every_truncation_of_every_recorded_payload_fails_cleanly() {
    let mut rng = Rng(3);
    for p in all_payloads() {
        assert!(decode_batch(&p, &mut DecodeStats::default()).is_ok());
        // Every cut of small payloads; 200 random cuts of the big (Mooncake) ones.
        let cuts: Vec<usize> = if p.len() <= 4096 {
            (0..p.len()).collect()
        } else {
            (0..200).map(|_| rng.below(p.len())).collect()
        };
        for cut in cuts {
            let r = decode_batch(&p[..cut], &mut DecodeStats::default());
            assert!(r.is_err(), "a strict prefix of {} bytes decoded", cut);
        }
    }
}

#[test]
fn mutated_recorded_payloads_never_panic() {
    let mut rng = Rng(42);
    // The small recorded payloads (the big ones cost much more per round in debug builds).
    let payloads: Vec<Vec<u8>> = all_payloads()
        .into_iter()
        .filter(|p| p.len() <= 4096)
        .collect();
    for round in 0..5_000 {
        let mut p = payloads[round % payloads.len()].clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(p.len());
            p[i] = rng.next() as u8;
        }
        fuzz_frames(&p);
    }
}

#[test]
fn wrong_frame_counts_are_typed_errors() {
    let seq = 1u64.to_be_bytes();
    let two: [&[u8]; 2] = [b"t", &seq];
    let four: [&[u8]; 4] = [b"t", &seq, b"\x90", b"x"];
    let bad_seq: [&[u8]; 3] = [b"t", b"\x00\x01", b"\x90"];
    assert!(matches!(
        split_message(&two),
        Err(FrameError::FrameCount { got: 2, .. })
    ));
    assert!(matches!(
        split_message(&four),
        Err(FrameError::FrameCount { got: 4, .. })
    ));
    assert_eq!(split_message(&bad_seq), Err(FrameError::SeqLength(2)));
    assert!(matches!(
        split_message::<&[u8]>(&[]),
        Err(FrameError::FrameCount { got: 0, .. })
    ));
}

#[test]
fn huge_declared_lengths_are_rejected_without_allocating() {
    // [ts, events: array32(4 294 967 295)] and a BlockStored whose token_ids claims 2^32-1.
    let mut p = vec![0x93, 0xcb];
    p.extend_from_slice(&1.0f64.to_be_bytes());
    p.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        decode_batch(&p, &mut DecodeStats::default()),
        Err(MsgpackError::TooLong { .. })
    ));

    let mut w = Writer::default();
    w.array_len(3);
    w.f64(1.0);
    w.array_len(1);
    w.array_len(4);
    w.str("BlockStored");
    w.array_len(0);
    w.nil();
    let mut p = w.into_inner();
    p.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    // The bad event cannot even be skipped structurally: the batch fails, typed.
    assert!(matches!(
        decode_batch(&p, &mut DecodeStats::default()),
        Err(MsgpackError::TooLong { .. })
    ));
}

#[test]
fn unknown_tags_fields_and_malformed_events_are_counted_and_skipped() {
    let mut w = Writer::default();
    w.array_len(3);
    w.f64(1.0);
    w.array_len(4);
    // 1: unknown tag (map) — skipped.
    w.map_len(2);
    w.str("type");
    w.str("BlockPinned");
    w.str("block_hashes");
    w.array_len(0);
    // 2: known tag with an unknown field — kept.
    w.map_len(3);
    w.str("type");
    w.str("BlockRemoved");
    w.str("block_hashes");
    w.array_len(1);
    w.uint(5);
    w.str("future_field");
    w.map_len(0);
    // 3: wrong field type (token_ids a string) — skipped, counted malformed.
    w.map_len(2);
    w.str("type");
    w.str("BlockStored");
    w.str("token_ids");
    w.str("oops");
    // 4: unknown positional tag.
    w.array_len(2);
    w.str("LoadStat");
    w.uint(3);
    w.uint(0);
    let p = w.into_inner();
    let mut st = DecodeStats::default();
    let b = decode_batch(&p, &mut st).unwrap();
    assert_eq!(b.events.len(), 1);
    assert!(matches!(&b.events[0], EngineEvent::BlockRemoved(r) if r.block_hashes == [5]));
    assert_eq!(
        st,
        DecodeStats {
            unknown_events: 2,
            unknown_fields: 1,
            malformed_events: 1,
            // No store decoded, no positional event of a known tag: no evidence.
            formats: kvrouter_wire::FormatCounts {
                unknown: 1,
                ..Default::default()
            },
        }
    );
}

#[test]
fn unknown_parents_are_rejected_by_the_index_without_touching_other_workers() {
    let (a, b) = (WorkerWithDpRank::new(1, 0), WorkerWithDpRank::new(2, 0));
    let tokens: Vec<u32> = (1..=32).collect();
    let store = |parent: Option<u64>, hashes: Vec<u64>| EngineBatch {
        ts: 0.0,
        events: vec![EngineEvent::BlockStored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens.clone(),
            block_size: 16,
            ..Default::default()
        })],
        dp_rank: Some(0),
    };
    let mut idx = KvIndex::new();
    let mut out = Vec::new();
    Converter::new(a, 16).convert_batch(&store(None, vec![10, 11]), &mut out);
    for ev in &out {
        idx.apply(ev).unwrap();
    }
    let q = compute_block_hashes(&tokens, 16, &HashOptions::default(), None);
    let before = idx.find_matches(&q, false);
    // Worker b's first event references a parent b never stored (only a did).
    let mut out = Vec::new();
    let mut cb = Converter::new(b, 16);
    cb.convert_batch(&store(Some(10), vec![20, 21]), &mut out);
    assert!(matches!(out[0].event.data, KvCacheEventData::Stored(_)));
    assert!(
        idx.apply(&out[0]).is_err(),
        "unknown parent must be rejected"
    );
    assert_eq!(idx.find_matches(&q, false), before);
    assert_eq!(before.get(a), 2);
    assert_eq!(before.get(b), 0);
}

#[test]
fn encode_decode_round_trip_in_both_encodings() {
    for p in all_payloads() {
        let b = decode_batch(&p, &mut DecodeStats::default()).unwrap();
        for enc in [Encoding::Map, Encoding::Array] {
            let again = decode_batch(&encode_batch(&b, enc), &mut DecodeStats::default()).unwrap();
            assert_eq!(again, b, "{enc:?}");
        }
    }
}

/// Every input the fuzzer ever found (copied from `wire/fuzz/artifacts/`) stays fixed.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let mut n = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        fuzz_frames(&bytes);
        // TensorRT-LLM answers (`cargo fuzz run trtllm`) are `trtllm-*.json`.
        if f.extension().is_some_and(|e| e == "json") {
            fuzz_trtllm(&bytes);
        }
        n += 1;
    }
    assert!(n >= 10, "regression inputs missing from {}", dir.display());
}

/// Long randomized run of the decoder (stand-in where `cargo fuzz` is unavailable):
/// `cargo test -p kvrouter-wire --release --test bad_input -- --ignored`.
#[test]
#[ignore]
fn long_randomized_decoder_run() {
    let iters: u64 = std::env::var("KVROUTER_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let payloads = all_payloads();
    let mut rng = Rng(7);
    for i in 0..iters {
        let mut p = payloads[(i as usize) % payloads.len()].clone();
        match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let k = rng.below(p.len());
                    p[k] = rng.next() as u8;
                }
            }
            1 => p.truncate(rng.below(p.len())),
            _ => p = (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
        }
        fuzz_frames(&p);
    }
}
