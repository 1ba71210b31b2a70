//! A routed request started on its worker, for the frontend and the standalone router alike:
//! route and book ([`crate::routing`]), send the worker its request ([`super::client`]); a
//! worker found unreachable before streaming becomes suspect (no new requests until its health
//! check passes) and the request is routed again, a few times at most.

use std::sync::Arc;

use kvrouter_core::RouteError;

use crate::error::{worker_error, ApiError};
use crate::routing::{Booking, RouteInput};
use crate::workers::client::{WorkerClient, WorkerStream};
use crate::workers::fleet::Fleet;

/// Attempts per request when the chosen worker turns out unreachable before streaming.
pub const MAX_ATTEMPTS: usize = 3;

/// Route `input`, book it, and start it on the chosen worker with the body `body` makes from
/// that worker's registered model name (`None`: it registered none). Returns the booking
/// (freed when dropped) and the worker's stream. `request_id` names the request in logs and
/// client-facing messages.
///
/// Errors: routing failures as `route_err` shapes them (the frontend's [`route_error`](crate::error::route_error): 503
/// no worker / all busy / queue full, 404 unknown pinned worker, 400 bad hints), a worker's
/// refusal or failure ([`worker_error`]), 503 when every attempt found its worker
/// unreachable.
pub async fn dispatch(
    fleet: &Arc<Fleet>,
    client: &WorkerClient,
    input: &RouteInput<'_>,
    body: impl Fn(Option<&str>) -> Vec<u8>,
    route_err: impl Fn(RouteError) -> ApiError,
    request_id: &str,
) -> Result<(Booking, WorkerStream), ApiError> {
    let mut tried = 0;
    for _ in 0..MAX_ATTEMPTS {
        let booking = fleet.router.route(input).await.map_err(&route_err)?;
        let rank = booking.worker();
        let Some(worker) = fleet.registry.get(rank.worker_id) else {
            // Deregistered between routing and here.
            continue;
        };
        let sent = client
            .generate(
                &worker.spec.url,
                worker.spec.rank_pin(rank.dp_rank),
                body(worker.spec.model.as_deref()),
            )
            .await;
        match sent {
            Ok(stream) => return Ok((booking, stream)),
            Err(e) if e.worker_gone() => {
                tracing::warn!(
                    request_id,
                    worker_id = rank.worker_id,
                    "worker unreachable, routing again: {e}"
                );
                fleet.suspect(rank.worker_id, &e.to_string());
                tried += 1;
            }
            Err(e) => return Err(worker_error(&e, request_id, rank.worker_id)),
        }
    }
    Err(ApiError::unavailable(if tried > 0 {
        format!("no worker could take the request: {tried} unreachable (request {request_id})")
    } else {
        "no healthy worker is available".to_string()
    }))
}
