//! Fuzz the OpenAI request parser: first byte = endpoint, client routing on/off and limits,
//! the rest = the body (`kvrouter_server_fuzz::fuzz_request`).
//! Run: `cd server/fuzz && cargo +nightly fuzz run request seeds/request` (or `scripts/fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: kvrouter_server_fuzz::init_request(), |data: &[u8]| {
    kvrouter_server_fuzz::fuzz_request(data);
});
