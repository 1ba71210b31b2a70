//! `kvrouter._core`: the Rust half of the `kvrouter` Python package.
//!
//! Conversion only. Hashing, the indexes and the configuration types are
//! [`kvrouter_core`]'s; the KV event publisher, its wire format and the relay are
//! [`kvrouter_wire`]'s. Each module here turns Python arguments into those types (checking
//! them, with errors that name the argument), calls the library with the GIL released, and
//! turns the result back. The package's Python side (`kvrouter/`) re-exports these classes and
//! declares the exception types; `kvrouter/_core.pyi` is their typed interface.
//!
//! | module | Python names |
//! | --- | --- |
//! | [`hashing`] | `compute_block_hash_for_seq`, `compute_seq_hash_for_block` |
//! | [`index`] | `RadixTree`, `ApproxKvIndexer`, `OverlapScores` |
//! | [`config`] | `KvRouterConfig`, `RouterConfig`, `RouterMode` |
//! | [`publisher`] | `KvEventPublisher` |
//! | [`router`] | `KvRouter`, `GenerateStream`, `Ready` |

use pyo3::prelude::*;

mod config;
mod errors;
mod hashing;
mod index;
mod ints;
mod json;
mod publisher;
mod router;

/// kvrouter's Rust extension: Dynamo-compatible block hashing, the exact and approximate KV
/// indexes, router configuration and the KV event publisher. Import these from `kvrouter`.
#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    ints::init(m.py())?;
    // The bridge between asyncio and Tokio (`KvRouter.generate`): one thread suffices, the
    // work runs on each router's own runtime.
    let mut bridge = tokio::runtime::Builder::new_multi_thread();
    bridge
        .worker_threads(1)
        .thread_name("kvrouter-asyncio")
        .enable_all();
    pyo3_async_runtimes::tokio::init(bridge);
    m.add_function(wrap_pyfunction!(ints::_fast_int_layout, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::compute_block_hash_for_seq, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::compute_seq_hash_for_block, m)?)?;
    m.add_class::<index::OverlapScores>()?;
    m.add_class::<index::RadixTree>()?;
    m.add_class::<index::ApproxKvIndexer>()?;
    m.add_class::<index::Completed>()?;
    m.add_class::<config::KvRouterConfig>()?;
    m.add_class::<config::RouterConfig>()?;
    m.add_class::<config::RouterMode>()?;
    m.add_class::<publisher::KvEventPublisher>()?;
    m.add_class::<router::KvRouter>()?;
    m.add_class::<router::GenerateStream>()?;
    m.add_class::<router::Ready>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
