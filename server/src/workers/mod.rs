//! Workers: how one is described and validated ([`spec`]), the live set with each worker's
//! health and KV event subscribers ([`registry`]), registration and the health loop
//! ([`fleet`]), the HTTP client every request to a worker goes through ([`client`], over the
//! small HTTP/1.1 client of [`http1`]), and a routed request started on its worker
//! ([`dispatch`]); a `kvrouter router` asked to choose the worker instead ([`remote_router`]);
//! TensorRT-LLM's KV events polled over HTTP ([`trtllm_poller`]).

pub mod accuracy;
pub mod client;
pub mod discovery;
pub mod dispatch;
pub mod fleet;
pub mod http1;
pub mod registry;
pub mod remote_router;
pub mod spec;
pub mod trtllm_poller;
