//! End-to-end tests on real sockets: an embedded stack (frontend + in-process mock workers
//! over loopback HTTP and ZMQ) driven by a real HTTP client.
mod accuracy;
mod admin;
mod api;
mod common;
mod disagg;
mod discovery;
mod engines;
mod errors;
#[cfg(feature = "etcd")]
mod etcd_discovery;
#[cfg(feature = "nats")]
mod event_plane;
mod fidelity;
#[cfg(feature = "kubernetes")]
mod kubernetes_discovery;
mod lifecycle;
mod limits;
mod lora;
#[cfg(feature = "nats")]
mod nats_server;
mod probes;
mod queue;
mod remote_routers;
#[cfg(feature = "nats")]
mod replica_sync;
mod router_service;
mod routing;
mod stall;
mod trtllm;
#[cfg(feature = "nats")]
mod trtllm_relay;
