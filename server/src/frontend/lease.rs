//! What a request in flight holds on the worker serving it: a booking in this frontend's own
//! router, or one in a `kvrouter router` it asked (`--prefill-router`, `--pool`). Either way
//! the first token marks its prefill complete and the end — or drop, on failure or
//! cancellation — frees it.

use kvrouter_core::WorkerWithDpRank;

use crate::routing::Booking;
use crate::workers::remote_router::RemoteBooking;

/// A booking, local or remote.
pub enum Lease {
    Local(Booking),
    Remote(RemoteBooking),
}

impl Lease {
    /// The rank serving the request.
    pub fn worker(&self) -> WorkerWithDpRank {
        match self {
            Lease::Local(b) => b.worker(),
            Lease::Remote(b) => b.worker(),
        }
    }

    /// The first token arrived: its prompt leaves the prefill load.
    pub fn first_token(&mut self) {
        match self {
            Lease::Local(b) => b.first_token(),
            Lease::Remote(b) => b.first_token(),
        }
    }

    /// Release the load now (also done on drop).
    pub fn free(&mut self) {
        match self {
            Lease::Local(b) => b.free(),
            Lease::Remote(b) => b.free(),
        }
    }

    /// The cached tokens this frontend's router predicted on the worker (`None` when another
    /// router chose it).
    pub fn predicted_cached_tokens(&self) -> Option<usize> {
        match self {
            Lease::Local(b) => Some(b.selection().cached_tokens),
            Lease::Remote(_) => None,
        }
    }

    /// Whether the worker is one of this frontend's (a failure may make it suspect here).
    pub fn is_local(&self) -> bool {
        matches!(self, Lease::Local(_))
    }
}

impl From<Booking> for Lease {
    fn from(b: Booking) -> Self {
        Lease::Local(b)
    }
}

impl From<RemoteBooking> for Lease {
    fn from(b: RemoteBooking) -> Self {
        Lease::Remote(b)
    }
}

/// A request started on its worker: what the response then owns.
pub struct Started {
    pub lease: Lease,
    pub stream: crate::workers::client::WorkerStream,
    /// The prefill worker, for a disaggregated request.
    pub prefill_worker: Option<u64>,
    /// The router pool that chose the worker (`--pool`).
    pub pool: Option<std::sync::Arc<str>>,
}
