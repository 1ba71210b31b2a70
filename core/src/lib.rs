//! # kvrouter-core
//!
//! The router's heart, as a pure library: no I/O, no async, no clocks or entropy of its own
//! (callers pass `now` and an RNG, so behaviour is deterministic in tests and replays).
//!
//! Data flows through it in the order of a request (see `docs/DESIGN.md`):
//!
//! 1. [`hash`] — tokens → local block hashes → sequence hashes.
//! 2. [`index`] — which `(worker, dp_rank)` holds how many leading blocks (exact index fed by KV
//!    [`event`]s, approximate index fed by the router's own decisions, predicted side index).
//! 3. [`sequences`] — active requests and the load they put on each worker.
//!    [`prefill_time`] predicts how long a prefill takes, for the `aic` load model.
//! 4. [`selection`] — cost function, temperature, busy thresholds and every router mode
//!    ([`policy`]: the `kv` mode's selection policies).
//! 5. [`queue`] — requests waiting in the router while every worker is past the threshold.
//!
//! [`router::Router`] composes the four for single-threaded callers (simulations, bindings).
pub mod config;
pub mod event;
pub mod hash;
pub mod index;
pub mod policy;
pub mod prefill_time;
pub mod queue;
pub mod router;
pub mod selection;
pub mod sequences;

pub use config::{KvRouterConfig, LoadThresholds, RouterConfig, RouterConfigOverride, RouterMode};
pub use event::{RouterEvent, WorkerId, WorkerWithDpRank};
pub use policy::SelectionPolicy;
pub use router::{
    BookingRecord, BookingTerms, RequestHashes, RouteError, RouteRequest, Router, ScheduleRequest,
    Scheduler,
};
pub use selection::{
    Candidate, DeviceType, RolePool, SelectError, Selection, SelectionRequest, Selector,
    WorkerInfo, WorkerRole,
};
