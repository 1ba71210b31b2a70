//! Fuzz TensorRT-LLM's `POST /kv_cache_events` answer path: JSON decoding, per-rank conversion
//! (gaps, windows, tiers, re-hashing) and re-encoding.
//! Run: `cd wire/fuzz && cargo +nightly fuzz run trtllm` (or `scripts/fuzz 60 trtllm`); copy
//! crashes to `wire/tests/regressions/trtllm/` (they then run in `cargo test -p kvrouter-wire`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kvrouter_wire::fuzz::fuzz_trtllm(data);
});
