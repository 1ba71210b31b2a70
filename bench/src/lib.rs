//! # kvrouter-bench
//!
//! What kvrouter is measured with: request workloads ([`trace`]: Mooncake traces and prompt
//! synthesis), simulated worker caches that publish KV events ([`cache`]), and a fleet
//! simulation that drives the router core on a virtual clock ([`sim`]).
pub mod cache;
pub mod sim;
pub mod stream;
pub mod trace;
