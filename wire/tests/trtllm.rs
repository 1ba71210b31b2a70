//! TensorRT-LLM's JSON events under hostile input: arbitrary bytes, and valid answers with
//! random bytes changed, cut or spliced, through decoding, conversion and re-encoding
//! ([`fuzz_trtllm`], the `cargo fuzz` target's body) — never a panic. Also the events a
//! converted answer leaves in the index match the router's own hashing of the prompt.

use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::hash::{compute_block_hashes, HashOptions};
use kvrouter_core::index::KvIndex;
use kvrouter_wire::fuzz::fuzz_trtllm;
use kvrouter_wire::trtllm::{encode_events, TrtBlock, TrtData, TrtEvent, TrtWorker};
use proptest::prelude::*;

fn answer(n: u64, rank: Option<u32>) -> Vec<u8> {
    let mut events = vec![TrtEvent {
        event_id: 0,
        window_size: Some(4096),
        attention_dp_rank: rank,
        data: TrtData::Created {
            num_blocks_per_cache_level: vec![128, 0],
        },
    }];
    let mut parent = None;
    for i in 0..n {
        events.push(TrtEvent {
            event_id: i + 1,
            window_size: Some(4096),
            attention_dp_rank: rank,
            data: TrtData::Stored {
                parent_hash: parent,
                blocks: vec![TrtBlock {
                    block_hash: 1000 + i,
                    tokens: (0..32).map(|t| (t + 32 * i as u32, 0)).collect(),
                    cache_level: 0,
                    priority: 35,
                }],
            },
        });
        parent = Some(1000 + i);
    }
    events.push(TrtEvent {
        event_id: n + 1,
        window_size: Some(4096),
        attention_dp_rank: rank,
        data: TrtData::Updated {
            block_hash: 1000,
            cache_level: Some((0, 1)),
            priority: Some((35, 0)),
        },
    });
    encode_events(&events)
}

#[test]
fn a_converted_answer_indexes_the_prompts_blocks() {
    let mut w = TrtWorker::new(4, 1, 16, 1000);
    let mut out = Vec::new();
    w.apply_body(&answer(3, None), &mut out).unwrap();
    let mut index = KvIndex::new();
    // Without the final move: device blocks only.
    for e in &out[..3] {
        index.apply(e).unwrap();
    }
    let tokens: Vec<u32> = (0..96).collect();
    let q = compute_block_hashes(&tokens, 16, &HashOptions::default(), None);
    let m = index.find_matches(&q, false);
    assert_eq!(m.scores, vec![(WorkerWithDpRank::new(4, 0), 6)]);
    assert_eq!(w.ranks()[0].stats().capacity, [128, 0]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzz_trtllm(&data);
    }

    #[test]
    fn mutated_answers_never_panic(
        n in 0u64..6,
        rank in proptest::option::of(0u32..3),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
    ) {
        let mut body = answer(n, rank);
        for (at, b) in edits {
            let i = at % body.len();
            body[i] = b;
        }
        fuzz_trtllm(&body);
        body.truncate(cut % (body.len() + 1));
        fuzz_trtllm(&body);
    }

    #[test]
    fn spliced_json_values_never_panic(
        picks in proptest::collection::vec(0usize..12, 0..40),
    ) {
        // Tokens of the format, glued in random order: deep in shape, wrong in types.
        const PARTS: [&str; 12] = [
            "[", "]", "{", "}", ",", "\"event_id\":", "\"data\":", "\"type\":\"stored\"",
            "\"blocks\":", "-1", "18446744073709551616", "null",
        ];
        let s: String = picks.iter().map(|&i| PARTS[i]).collect();
        fuzz_trtllm(s.as_bytes());
    }
}
