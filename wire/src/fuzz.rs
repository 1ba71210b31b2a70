//! The whole untrusted-input path in one call, shared by the `cargo fuzz` target
//! (`wire/fuzz/`) and the regression tests (`tests/regressions/`).

use kvrouter_core::event::WorkerWithDpRank;

use crate::convert::Converter;
use crate::engine::{decode_batch, encode_batch, DecodeStats, Encoding};
use crate::frame::{split_message, split_replay_reply};

/// Splits `data` into frames (a `0xff 0x00` pair separates frames, so the fuzzer can vary the
/// frame count), then runs framing, batch decoding, conversion (block size 16), re-encoding
/// and decoding again. Must never panic; returns the number of router events produced.
pub fn fuzz_frames(data: &[u8]) -> usize {
    let frames: Vec<&[u8]> = split_frames(data);
    let _ = split_replay_reply(&frames);
    // Whole input as one payload too: most interesting inputs are payloads.
    let mut n = fuzz_payload(data);
    if let Ok(msg) = split_message(&frames) {
        n += fuzz_payload(msg.payload);
    }
    n
}

fn split_frames(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0x00 {
            out.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&data[start.min(data.len())..]);
    out
}

/// Decode → convert → encode → decode of one payload; checks the re-encoding round-trips.
pub fn fuzz_payload(payload: &[u8]) -> usize {
    let mut stats = DecodeStats::default();
    let Ok(batch) = decode_batch(payload, &mut stats) else {
        return 0;
    };
    let mut conv = Converter::new(WorkerWithDpRank::new(1, 0), 16);
    let mut out = Vec::new();
    conv.convert_batch(&batch, &mut out);
    for enc in [Encoding::Map, Encoding::Array, Encoding::Sglang] {
        let bytes = encode_batch(&batch, enc);
        let mut st = DecodeStats::default();
        let again = decode_batch(&bytes, &mut st);
        // Our own encoding always decodes; the array and SGLang layouts cannot carry a few of
        // vLLM's map-only fields, but every encoding keeps every event.
        assert!(again.is_ok(), "re-encoded batch does not decode: {again:?}");
        if enc != Encoding::Array {
            let again = again.unwrap_or_default();
            assert_eq!(
                again.events.len(),
                batch.events.len(),
                "map re-encoding lost events"
            );
        }
    }
    out.len()
}

/// TensorRT-LLM's JSON answer path: decode (at most 1,000 events), convert for a worker of two
/// ranks at block size 16, then re-encode what decoded and check it decodes to the same
/// events. Must never panic; returns the number of router events produced.
pub fn fuzz_trtllm(data: &[u8]) -> usize {
    use crate::trtllm::{decode_events, encode_events, TrtData, TrtDecodeStats, TrtWorker};
    let mut worker = TrtWorker::new(1, 2, 16, 1_000);
    let mut out = Vec::new();
    let _ = worker.apply_body(data, &mut out);
    let mut st = TrtDecodeStats::default();
    if let Ok(events) = decode_events(data, 1_000, &mut st) {
        let known: Vec<_> = events
            .into_iter()
            .filter(|e| !matches!(e.data, TrtData::Unknown | TrtData::Malformed))
            .collect();
        let again = decode_events(&encode_events(&known), 1_000, &mut st);
        assert_eq!(
            again.ok().as_ref(),
            Some(&known),
            "re-encoding changed events"
        );
    }
    out.len()
}
