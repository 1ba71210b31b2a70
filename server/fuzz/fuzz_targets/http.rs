//! Fuzz the HTTP API end to end: the input is everything a client sends on one HTTP/1.1
//! connection to the real API router (no workers) (`kvrouter_server_fuzz::fuzz_http`).
//! Run: `cd server/fuzz && cargo +nightly fuzz run http seeds/http` (or `scripts/fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: kvrouter_server_fuzz::init_http(), |data: &[u8]| {
    let _ = kvrouter_server_fuzz::fuzz_http(data);
});
