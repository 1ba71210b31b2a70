//! Fuzz the frame decoder: framing, msgpack batch decoding, conversion and re-encoding.
//! Run: `cd wire/fuzz && cargo +nightly fuzz run frames`; copy crashes to
//! `wire/tests/regressions/` (they then run in `cargo test -p kvrouter-wire`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kvrouter_wire::fuzz::fuzz_frames(data);
});
