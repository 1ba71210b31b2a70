//! # kvrouter-bench
//!
//! What kvrouter is measured with: request workloads ([`trace`]: Mooncake traces and prompt
//! synthesis; [`workload`]: what the HTTP benchmark sends and when), LRU block caches that
//! generate KV event streams for the index benchmarks and the bound ([`cache`]), the offline
//! replay of a workload through the mocker's engines and the router core in virtual time
//! ([`replay`]: the one engine model behind routing figures), and the HTTP benchmark behind `kvrouter bench`: one streamed request
//! ([`client`]), a run against one endpoint ([`runner`]), the router's `/metrics` ([`scrape`]),
//! the pooled-cache bound ([`bound`]), percentiles ([`stats`]) and reports with plots
//! ([`report`]).
pub mod bound;
pub mod cache;
pub mod client;
pub mod replay;
pub mod report;
pub mod runner;
pub mod scrape;
pub mod stats;
pub mod stream;
pub mod trace;
pub mod workload;
