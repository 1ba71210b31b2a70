//! Reading a request body within limits: its size and the time it may take to arrive once
//! the request head has (both APIs; the admin API reads small bodies its own way).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;

use crate::error::ApiError;

/// A request body of at most `max_bytes` arriving within `timeout`. Errors: 413 (too large),
/// 408 (not received within `timeout`), 400 (broken).
pub async fn read_body(body: Body, max_bytes: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|src| src.is::<http_body_util::LengthLimitError>());
            Err(if too_big {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("request body exceeds {max_bytes} bytes"),
                )
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            })
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )),
    }
}
