//! kvrouter's exception types live in `kvrouter/exceptions.py` (plain classes, so that they can
//! have two bases: `KvRouterError` and the built-in that Dynamo raised for the same case). This
//! module raises them from Rust.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use kvrouter_core::index::IndexError;

/// Exception classes of `kvrouter.exceptions` raised from Rust.
#[derive(Clone, Copy)]
pub enum Kind {
    ParentBlockNotFound,
    BlockNotFound,
    InvalidBlockSequence,
    UnsupportedOption,
    WorkerUnavailable,
    AllWorkersBusy,
    RouterQueueLimitExceeded,
    UnknownRequest,
    WorkerError,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::ParentBlockNotFound => "ParentBlockNotFound",
            Kind::BlockNotFound => "BlockNotFound",
            Kind::InvalidBlockSequence => "InvalidBlockSequence",
            Kind::UnsupportedOption => "UnsupportedOption",
            Kind::WorkerUnavailable => "WorkerUnavailable",
            Kind::AllWorkersBusy => "AllWorkersBusy",
            Kind::RouterQueueLimitExceeded => "RouterQueueLimitExceeded",
            Kind::UnknownRequest => "UnknownRequest",
            Kind::WorkerError => "WorkerError",
        }
    }
}

static CLASSES: [PyOnceLock<Py<PyType>>; 9] = [
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
];

/// A `PyErr` of class `kind` with `msg`.
pub fn new_err(py: Python<'_>, kind: Kind, msg: String) -> PyErr {
    let class = CLASSES[kind as usize].get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let module = py.import("kvrouter.exceptions")?;
        Ok(module.getattr(kind.name())?.cast_into::<PyType>()?.unbind())
    });
    match class {
        Ok(c) => PyErr::from_type(c.bind(py).clone(), msg),
        Err(e) => e,
    }
}

/// The exception for an event the index rejected (Dynamo raised `RuntimeError("Failed to apply
/// event: …")`; ours are `RuntimeError` subclasses too).
pub fn index_error(py: Python<'_>, e: &IndexError) -> PyErr {
    let kind = match e {
        IndexError::ParentBlockNotFound { .. } => Kind::ParentBlockNotFound,
        IndexError::BlockNotFound { .. } => Kind::BlockNotFound,
        IndexError::InvalidBlockSequence { .. } => Kind::InvalidBlockSequence,
    };
    new_err(py, kind, format!("Failed to apply event: {e}"))
}
