//! Decode + convert throughput (issue 3 "How fast": ≥ 1 M blocks/s per core including
//! re-hashing the tokens). Throughput is reported in blocks (`elem/s`).
//!
//! `cargo bench -p kvrouter-wire --bench decode`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_wire::engine::{
    decode_batch, encode_batch, BlockStored, DecodeStats, Encoding, EngineBatch, EngineEvent,
};
use kvrouter_wire::Converter;

fn shared() -> PathBuf {
    std::env::var_os("KVROUTER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every recorded payload of the kv-events data set whose path contains `filter`.
fn recorded(filter: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let root = shared().join("data/kv-events");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("shared/data/kv-events")
        .map(|d| d.unwrap().path())
        .filter(|d| d.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|f| f.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "jsonl") && p.to_string_lossy().contains(filter)
        })
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push(hex(v["payload_hex"].as_str().unwrap()));
        }
    }
    out
}

fn blocks_in(payloads: &[Vec<u8>]) -> u64 {
    payloads
        .iter()
        .map(|p| {
            decode_batch(p, &mut DecodeStats::default())
                .unwrap()
                .events
                .iter()
                .map(|e| match e {
                    EngineEvent::BlockStored(s) => s.block_hashes.len() as u64,
                    _ => 0,
                })
                .sum::<u64>()
        })
        .sum()
}

/// A batch of `events` stores of `blocks` blocks each (vLLM 0.33 shape, realistic token ids).
fn synthetic(events: usize, blocks: usize, encoding: Encoding) -> Vec<u8> {
    let mut seed = 0x1234_5678u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let evs = (0..events)
        .map(|_| {
            EngineEvent::BlockStored(BlockStored {
                block_hashes: (0..blocks).map(|_| next()).collect(),
                parent_block_hash: Some(next()),
                token_ids: (0..blocks * 16)
                    .map(|_| (next() % 151_000) as u32)
                    .collect(),
                block_size: 16,
                medium: Some("GPU".into()),
                extra_keys: Some(vec![None; blocks]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                ..Default::default()
            })
        })
        .collect();
    encode_batch(
        &EngineBatch {
            ts: 1.0,
            events: evs,
            dp_rank: Some(0),
        },
        encoding,
    )
}

fn decode_convert(
    payloads: &[Vec<u8>],
    conv: &mut Converter,
    out: &mut Vec<kvrouter_core::event::RouterEvent>,
) {
    for p in payloads {
        let b = decode_batch(p, &mut DecodeStats::default()).unwrap();
        conv.convert_batch(&b, out);
    }
}

fn bench(c: &mut Criterion) {
    let w = WorkerWithDpRank::new(1, 0);
    let mut g = c.benchmark_group("decode_convert");
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("recorded_all_frames", recorded("")),
        // One BlockStored per page: the per-event worst case of real engines.
        (
            "recorded_sglang_shared_prefix",
            recorded("sglang-0.5.23/shared-prefix"),
        ),
        (
            "recorded_vllm033_shared_prefix",
            recorded("vllm-0.33.0/shared-prefix"),
        ),
        (
            "synthetic_map_1x1024_blocks",
            vec![synthetic(1, 1024, Encoding::Map)],
        ),
        (
            "synthetic_map_64x16_blocks",
            vec![synthetic(64, 16, Encoding::Map)],
        ),
        (
            "synthetic_array_64x16_blocks",
            vec![synthetic(64, 16, Encoding::Array)],
        ),
        (
            "synthetic_map_256x1_block",
            vec![synthetic(256, 1, Encoding::Map)],
        ),
    ];
    for (name, payloads) in &cases {
        g.throughput(Throughput::Elements(blocks_in(payloads)));
        g.bench_function(*name, |b| {
            b.iter_batched_ref(
                || (Converter::new(w, 16), Vec::with_capacity(1024)),
                |(conv, out)| {
                    decode_convert(payloads, conv, out);
                    black_box(out.len())
                },
                BatchSize::SmallInput,
            )
        });
    }
    // Decode alone, for the split between parsing and hashing.
    let big = [synthetic(1, 1024, Encoding::Map)];
    g.throughput(Throughput::Elements(1024));
    g.bench_function("decode_only_map_1x1024_blocks", |b| {
        b.iter(|| {
            black_box(
                decode_batch(&big[0], &mut DecodeStats::default())
                    .unwrap()
                    .events
                    .len(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
