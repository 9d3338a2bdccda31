//! Admitting a request before its work starts: who called, a processing slot, the
//! request timeout and the buffered-body budget.

use crate::AppState;
use crate::http::auth::Caller;
use crate::http::error::ApiError;
use crate::http::upload::SMALL_BODY_BYTES;
use crate::http::upload::kilo;
use axum::extract::Request;
use axum::response::Response;

/// The caller the auth middleware let in (`anonymous` when the API is open).
pub(super) fn caller_of(req: &Request) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

/// One of the `--max-inflight` processing slots, or 503 at once.
pub(super) fn inflight_slot(
    state: &AppState,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    state.inner.inflight.try_acquire().map_err(|_| {
        state.metrics().overloaded.with_label_values(&["all"]).inc();
        ApiError::Overloaded("any".into())
    })
}

/// `job` under `--request-timeout-s` (503 `timeout` past it).
pub(super) async fn within_request_timeout(
    state: &AppState,
    job: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let timeout = state.inner.limits.request_timeout;
    tokio::time::timeout(timeout, job)
        .await
        .unwrap_or(Err(ApiError::Timeout(timeout.as_secs_f64())))
}

/// Reserves a request body's bytes in the buffered-body budget before it is read (its
/// declared length, or the most a body may be): what is buffered stays bounded.
pub(super) fn reserve_body<'a>(
    state: &'a AppState,
    req: &Request,
) -> Result<BodyReservation<'a>, ApiError> {
    let limits = &state.inner.limits;
    // Reserve the body's bytes before reading it: what is buffered stays bounded. A
    // body of unknown length (chunked) reserves the most a body may be.
    let declared = axum::body::HttpBody::size_hint(req.body()).exact();
    let reserve = declared
        .unwrap_or(limits.max_body_bytes as u64)
        .min(limits.max_body_bytes as u64);
    // Large bodies may fill all but 1/SMALL_BODY_SHARE of the budget, so that a flood
    // of them never refuses an ordinary X-ray.
    let large = if reserve > SMALL_BODY_BYTES {
        match state
            .inner
            .large_body_budget
            .try_acquire_many(kilo(reserve))
        {
            Ok(p) => Some(p),
            Err(_) => {
                state.metrics().overloaded.with_label_values(&["all"]).inc();
                return Err(ApiError::BufferFull(limits.max_buffered_bytes));
            }
        }
    } else {
        None
    };
    let Ok(bytes) = state.inner.body_budget.try_acquire_many(kilo(reserve)) else {
        state.metrics().overloaded.with_label_values(&["all"]).inc();
        return Err(ApiError::BufferFull(limits.max_buffered_bytes));
    };
    Ok((bytes, large))
}

/// A body's bytes in the buffered-body budget (and in the large-body share).
pub(super) type BodyReservation<'a> = (
    tokio::sync::SemaphorePermit<'a>,
    Option<tokio::sync::SemaphorePermit<'a>>,
);
