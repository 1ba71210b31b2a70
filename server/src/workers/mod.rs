//! Workers: how one is described and validated ([`spec`]), the live set with each worker's
//! health and KV event subscribers ([`registry`]), registration and the health loop
//! ([`fleet`]), and the HTTP client every request to a worker goes through ([`client`]).

pub mod client;
pub mod fleet;
pub mod registry;
pub mod spec;
