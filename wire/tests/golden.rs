//! Golden tests over every recorded engine frame in `shared/data/kv-events/` (issue 3 item 3).
//!
//! The oracle is the capture harness's own msgpack decode (`decoded`, Python `msgpack`), so our
//! decoder is checked against an independent implementation, and the local hashes against the
//! core's hashing of the frame's token ids.

mod common;

use std::collections::{HashMap, HashSet};

use common::{all_files, load, oracle_hash, Recorded};
use kvrouter_core::event::{KvCacheEventData, RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{compute_block_hashes, HashOptions, LocalBlockHash};
use kvrouter_core::index::KvIndex;
use kvrouter_wire::engine::{
    decode_batch, encode_batch, DecodeStats, Encoding, EngineBatch, EngineEvent, WireFormat,
};
use kvrouter_wire::frame::split_message;
use kvrouter_wire::Converter;
use serde_json::Value;

const W: WorkerWithDpRank = WorkerWithDpRank::new(1, 0);

fn decode(r: &Recorded) -> EngineBatch {
    let frames = [
        r.topic.as_bytes().to_vec(),
        r.seq.to_be_bytes().to_vec(),
        r.payload.clone(),
    ];
    let msg = split_message(&frames).unwrap();
    let mut st = DecodeStats::default();
    let b = decode_batch(msg.payload, &mut st)
        .unwrap_or_else(|e| panic!("{} seq {}: {e}", r.file, r.seq));
    assert_eq!(
        st.skipped(),
        0,
        "{} seq {}: something skipped: {st:?}",
        r.file,
        r.seq
    );
    b
}

/// The wire format `decode_batch` tells for one recorded payload.
fn format_of(r: &Recorded) -> WireFormat {
    let mut st = DecodeStats::default();
    decode_batch(&r.payload, &mut st).unwrap();
    let seen: Vec<WireFormat> = WireFormat::ALL
        .into_iter()
        .filter(|&f| st.formats.get(f) > 0)
        .collect();
    assert_eq!(seen.len(), 1, "{} seq {}: {st:?}", r.file, r.seq);
    seen[0]
}

#[test]
fn each_engine_version_is_told_by_its_wire_format() {
    for file in all_files() {
        let want = match file.split('/').next().unwrap() {
            "sglang-0.5.23" => WireFormat::Sglang,
            "vllm-0.33.0" => WireFormat::VllmMap,
            "vllm-0.20.0" | "vllm-0.11.0" => WireFormat::VllmArray,
            other => panic!("no expected format for {other}"),
        };
        let formats: Vec<WireFormat> = load(&file).iter().map(format_of).collect();
        // Every batch with a store shows its engine; removal-only map batches show nothing.
        assert!(formats.contains(&want), "{file}: {formats:?}");
        assert!(
            formats
                .iter()
                .all(|&f| f == want || f == WireFormat::Unknown),
            "{file}: {formats:?}"
        );
    }
}

#[test]
fn sglang_encoding_reproduces_sglang_frames_byte_for_byte() {
    let mut n = 0;
    for file in [
        "sglang-0.5.23/basic.jsonl",
        "sglang-0.5.23/shared-prefix.jsonl",
    ] {
        for r in load(file) {
            let b = decode(&r);
            assert_eq!(
                encode_batch(&b, Encoding::Sglang),
                r.payload,
                "{file} seq {}",
                r.seq
            );
            n += 1;
        }
    }
    assert!(n > 40, "{n} frames");
}

/// Field `name` of an oracle event, whichever encoding it used (positional = vLLM ≤ 0.23 order).
fn field<'a>(ev: &'a Value, name: &str) -> Option<&'a Value> {
    if ev.is_object() {
        return ev.get(name);
    }
    let a = ev.as_array().unwrap();
    let order: &[&str] = match a[0].as_str().unwrap() {
        "BlockStored" => &[
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
            "group_idx",
        ],
        "BlockRemoved" => &["block_hashes", "medium", "group_idx"],
        _ => &[],
    };
    order
        .iter()
        .position(|n| *n == name)
        .and_then(|i| a.get(i + 1))
}

fn tag(ev: &Value) -> &str {
    if ev.is_object() {
        ev["type"].as_str().unwrap()
    } else {
        ev[0].as_str().unwrap()
    }
}

fn hashes(v: Option<&Value>) -> Vec<u64> {
    v.unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(oracle_hash)
        .collect()
}

#[test]
fn every_recorded_file_is_present() {
    let files = all_files();
    // The README's table: if a file disappears or appears, this test must be revisited.
    assert_eq!(files.len(), 11, "{files:?}");
}

#[test]
fn every_frame_decodes_like_the_oracle() {
    let mut frames = 0;
    for file in all_files() {
        for r in load(&file) {
            frames += 1;
            let b = decode(&r);
            let d = r.decoded.as_array().unwrap();
            // serde_json (without `float_roundtrip`) may parse the oracle's floats 1 ulp off.
            assert!((b.ts - d[0].as_f64().unwrap()).abs() < 1e-6, "{file}");
            assert_eq!(
                b.dp_rank.map(u64::from),
                d.get(2).and_then(Value::as_u64),
                "{file}"
            );
            let evs = d[1].as_array().unwrap();
            assert_eq!(b.events.len(), evs.len(), "{file} seq {}", r.seq);
            for (got, want) in b.events.iter().zip(evs) {
                match got {
                    EngineEvent::BlockStored(s) => {
                        assert_eq!(tag(want), "BlockStored");
                        assert_eq!(
                            s.block_hashes,
                            hashes(field(want, "block_hashes")),
                            "{file}"
                        );
                        let parent = field(want, "parent_block_hash")
                            .filter(|v| !v.is_null())
                            .map(oracle_hash);
                        assert_eq!(s.parent_block_hash, parent, "{file}");
                        let toks: Vec<u32> = field(want, "token_ids")
                            .unwrap()
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|t| t.as_u64().unwrap() as u32)
                            .collect();
                        assert_eq!(s.token_ids, toks, "{file}");
                        assert_eq!(
                            s.block_size as u64,
                            field(want, "block_size").unwrap().as_u64().unwrap()
                        );
                        assert_eq!(
                            s.medium.as_deref(),
                            field(want, "medium").and_then(Value::as_str),
                            "{file}"
                        );
                        assert_eq!(
                            s.group_idx.map(u64::from),
                            field(want, "group_idx").and_then(Value::as_u64)
                        );
                        assert_eq!(
                            s.kv_cache_spec_kind.as_deref(),
                            field(want, "kv_cache_spec_kind").and_then(Value::as_str)
                        );
                        let n_keys = field(want, "extra_keys")
                            .and_then(Value::as_array)
                            .map(Vec::len);
                        assert_eq!(s.extra_keys.as_ref().map(Vec::len), n_keys, "{file}");
                    }
                    EngineEvent::BlockRemoved(rm) => {
                        assert_eq!(tag(want), "BlockRemoved");
                        assert_eq!(
                            rm.block_hashes,
                            hashes(field(want, "block_hashes")),
                            "{file}"
                        );
                        assert_eq!(
                            rm.medium.as_deref(),
                            field(want, "medium").and_then(Value::as_str)
                        );
                    }
                    EngineEvent::AllBlocksCleared => assert_eq!(tag(want), "AllBlocksCleared"),
                }
            }
        }
    }
    assert_eq!(frames, 161);
}

#[test]
fn local_hashes_are_core_hashes_of_the_frame_tokens() {
    let mut blocks = 0;
    for file in all_files() {
        let mut conv = Converter::new(W, 16);
        for r in load(&file) {
            let b = decode(&r);
            let mut out = Vec::new();
            conv.convert_batch(&b, &mut out);
            let stores: Vec<_> = b
                .events
                .iter()
                .filter_map(|e| {
                    if let EngineEvent::BlockStored(s) = e {
                        Some(s)
                    } else {
                        None
                    }
                })
                .collect();
            let router_stores: Vec<_> = out
                .iter()
                .filter_map(|e| {
                    if let KvCacheEventData::Stored(s) = &e.event.data {
                        Some(s)
                    } else {
                        None
                    }
                })
                .collect();
            assert_eq!(
                stores.len(),
                router_stores.len(),
                "{file}: a store was filtered"
            );
            for (s, rs) in stores.iter().zip(router_stores) {
                let want = compute_block_hashes(&s.token_ids, 16, &HashOptions::default(), None);
                let got: Vec<LocalBlockHash> = rs.blocks.iter().map(|b| b.tokens_hash).collect();
                assert_eq!(got, want, "{file} seq {}", r.seq);
                let ext: Vec<u64> = rs.blocks.iter().map(|b| b.block_hash.0).collect();
                assert_eq!(ext, s.block_hashes);
                assert_eq!(rs.parent_hash.map(|h| h.0), s.parent_block_hash);
                blocks += got.len();
            }
        }
        let st = conv.stats();
        assert_eq!(st.events_in, st.events_out, "{file}: {st:?}");
    }
    assert!(blocks > 1000, "{blocks}");
}

fn apply_file(file: &str, index: &mut KvIndex, mut each: impl FnMut(&KvIndex)) -> Converter {
    let mut conv = Converter::new(W, 16);
    for r in load(file) {
        let mut out: Vec<RouterEvent> = Vec::new();
        conv.convert_batch(&decode(&r), &mut out);
        for ev in &out {
            index
                .apply(ev)
                .unwrap_or_else(|e| panic!("{file} seq {}: {e:?}", r.seq));
        }
        each(index);
    }
    conv
}

fn sorted_dump(index: &KvIndex) -> Vec<String> {
    // event ids of a dump are the index's own; compare content only.
    let mut v: Vec<String> = index
        .dump_events()
        .into_iter()
        .map(|mut e| {
            e.event.event_id = 0;
            serde_json::to_string(&e).unwrap()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn vllm_basic_encodings_give_identical_index_states() {
    // 0.11 (array, no lora_name/extra_keys), 0.20 (array), 0.33 (map), 0.33 with 32-byte bin
    // hashes: same tokens and hash values, four encodings.
    let files = [
        "vllm-0.11.0/basic.jsonl",
        "vllm-0.20.0/basic.jsonl",
        "vllm-0.33.0/basic.jsonl",
        "vllm-0.33.0/basic-bytes-hashes.jsonl",
    ];
    let mut states: Vec<Vec<Vec<String>>> = Vec::new();
    for f in files {
        let mut idx = KvIndex::new();
        let mut s = Vec::new();
        apply_file(f, &mut idx, |i| s.push(sorted_dump(i)));
        states.push(s);
    }
    assert_eq!(states[0].len(), 4);
    assert!(!states[0][1].is_empty(), "store then extend leaves blocks");
    assert!(
        states[0][3].is_empty(),
        "AllBlocksCleared empties the worker"
    );
    for (f, s) in files.iter().zip(&states).skip(1) {
        assert_eq!(s, &states[0], "{f} differs from {}", files[0]);
    }
    // The other vLLM 0.33 hash settings change engine hashes only: same answers to queries.
    let q = compute_block_hashes(
        &(1..=48).collect::<Vec<u32>>(),
        16,
        &HashOptions::default(),
        None,
    );
    for f in [
        "vllm-0.33.0/basic.jsonl",
        "vllm-0.33.0/basic-default-seed.jsonl",
        "vllm-0.33.0/basic-sha256_cbor.jsonl",
        "sglang-0.5.23/basic.jsonl",
    ] {
        let mut idx = KvIndex::new();
        let mut overlaps = Vec::new();
        apply_file(f, &mut idx, |i| {
            overlaps.push(i.find_matches(&q, false).get(W))
        });
        // store 2 blocks, extend by 1, remove the 3rd, clear.
        assert_eq!(overlaps, [2, 3, 2, 0], "{f}");
    }
}

/// An oracle built from the harness's decode only: which engine hashes are live, their parent
/// and the token ids of each block, so every request's expected overlap can be computed
/// without our decoder, converter or index.
struct Oracle {
    live: HashSet<u64>,
    parent: HashMap<u64, Option<u64>>,
    tokens: HashMap<u64, Vec<u32>>,
    /// Every chain ever stored, as its last block's engine hash.
    leaves: Vec<u64>,
}

impl Oracle {
    fn build(file: &str) -> Self {
        let mut o = Oracle {
            live: HashSet::new(),
            parent: HashMap::new(),
            tokens: HashMap::new(),
            leaves: Vec::new(),
        };
        for r in load(file) {
            for ev in r.decoded[1].as_array().unwrap() {
                match tag(ev) {
                    "BlockStored" => {
                        let hs = hashes(field(ev, "block_hashes"));
                        let mut p = field(ev, "parent_block_hash")
                            .filter(|v| !v.is_null())
                            .map(oracle_hash);
                        let toks = field(ev, "token_ids").unwrap().as_array().unwrap();
                        for (i, h) in hs.iter().enumerate() {
                            let t = toks[i * 16..(i + 1) * 16]
                                .iter()
                                .map(|t| t.as_u64().unwrap() as u32)
                                .collect();
                            o.tokens.insert(*h, t);
                            o.parent.insert(*h, p);
                            o.live.insert(*h);
                            p = Some(*h);
                        }
                        o.leaves.push(*hs.last().unwrap());
                    }
                    "BlockRemoved" => {
                        for h in hashes(field(ev, "block_hashes")) {
                            o.live.remove(&h);
                        }
                    }
                    _ => o.live.clear(),
                }
            }
        }
        o
    }

    /// Chain from the root to `leaf`.
    fn chain(&self, leaf: u64) -> Vec<u64> {
        let mut c = vec![leaf];
        while let Some(Some(p)) = self.parent.get(c.last().unwrap()) {
            c.push(*p);
        }
        c.reverse();
        c
    }
}

#[test]
fn shared_prefix_scenarios_give_the_expected_overlaps() {
    for file in [
        "vllm-0.20.0/shared-prefix.jsonl",
        "vllm-0.33.0/shared-prefix.jsonl",
        "sglang-0.5.23/shared-prefix.jsonl",
    ] {
        let oracle = Oracle::build(file);
        let mut idx = KvIndex::new();
        apply_file(file, &mut idx, |_| {});
        assert_eq!(idx.num_blocks(), oracle.live.len(), "{file}: live blocks");
        let mut full = 0;
        let mut by_prefix: HashMap<Vec<u32>, u32> = HashMap::new();
        for &leaf in &oracle.leaves {
            let chain = oracle.chain(leaf);
            let tokens: Vec<u32> = chain
                .iter()
                .flat_map(|h| oracle.tokens[h].clone())
                .collect();
            let q = compute_block_hashes(&tokens, 16, &HashOptions::default(), None);
            let expected = chain.iter().take_while(|h| oracle.live.contains(h)).count() as u32;
            let got = idx.find_matches(&q, false).get(W);
            assert_eq!(got, expected, "{file}: request ending in {leaf}");
            full += (expected == chain.len() as u32) as u32;
            // The 3-block system prompts stay cached: LRU keeps the hot shared prefix.
            if q.len() >= 3 {
                by_prefix.insert(
                    tokens[..48].to_vec(),
                    idx.find_matches(&q[..3], false).get(W),
                );
            }
        }
        assert_eq!(by_prefix.len(), 2, "{file}: two system prompts");
        assert!(by_prefix.values().all(|&v| v == 3), "{file}: {by_prefix:?}");
        assert!(
            full > 0 && full < oracle.leaves.len() as u32,
            "{file}: some requests fully cached, some evicted ({full})"
        );
    }
}

#[test]
fn engines_agree_on_the_shared_prefix_scenario() {
    // Same requests, same LRU size: vLLM 0.20, vLLM 0.33 and SGLang leave the same cache content.
    let answers: Vec<Vec<u32>> = [
        "vllm-0.20.0/shared-prefix.jsonl",
        "vllm-0.33.0/shared-prefix.jsonl",
        "sglang-0.5.23/shared-prefix.jsonl",
    ]
    .iter()
    .map(|f| {
        let oracle = Oracle::build("vllm-0.33.0/shared-prefix.jsonl");
        let mut idx = KvIndex::new();
        apply_file(f, &mut idx, |_| {});
        oracle
            .leaves
            .iter()
            .map(|&leaf| {
                let tokens: Vec<u32> = oracle
                    .chain(leaf)
                    .iter()
                    .flat_map(|h| oracle.tokens[h].clone())
                    .collect();
                idx.find_matches(
                    &compute_block_hashes(&tokens, 16, &HashOptions::default(), None),
                    false,
                )
                .get(W)
            })
            .collect()
    })
    .collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
}

#[test]
fn mooncake_conversation_builds_and_clears() {
    let file = "vllm-0.33.0/mooncake-conversation-12req.jsonl";
    let oracle = Oracle::build(file);
    let mut idx = KvIndex::new();
    let mut sizes = Vec::new();
    let conv = apply_file(file, &mut idx, |i| sizes.push(i.num_blocks()));
    assert!(sizes.iter().max().unwrap() > &1000, "{sizes:?}");
    assert_eq!(*sizes.last().unwrap(), 0, "ends with AllBlocksCleared");
    assert_eq!(oracle.live.len(), 0);
    assert_eq!(conv.stats().cleared, 1);
}
