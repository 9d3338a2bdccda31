//! Admitting an HTTP request before its body is read: its bytes in the core's
//! buffered-bytes budget ([`crate::predict::Core::reserve_bytes`], shared with the
//! gRPC door). (The processing slot and the request timeout every door shares are
//! the core's too: [`crate::predict::Core::slot`].)

use crate::AppState;
use crate::http::error::ApiError;
use axum::extract::Request;

/// A body's bytes in the buffered-bytes budget, given back when dropped.
pub(crate) type BodyReservation = crate::predict::Reservation;

/// Reserves a request body's bytes in the buffered-body budget before it is read (its
/// declared length, or the most a body may be): what is buffered stays bounded.
pub(super) fn reserve_body(state: &AppState, req: &Request) -> Result<BodyReservation, ApiError> {
    let limits = state.body_limits();
    // A body of unknown length (chunked) reserves the most a body may be.
    let declared = axum::body::HttpBody::size_hint(req.body()).exact();
    let reserve = declared
        .unwrap_or(limits.max_body_bytes as u64)
        .min(limits.max_body_bytes as u64);
    Ok(state.core().reserve_bytes(reserve)?)
}
