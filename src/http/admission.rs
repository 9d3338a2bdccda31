//! Admitting an HTTP request before its body is read: the buffered-body budget. (The processing slot and the request
//! timeout every door shares are the core's: [`crate::predict::Core::slot`].)

use std::sync::Arc;

use crate::AppState;
use crate::http::error::ApiError;
use crate::predict::kilo;
use axum::extract::Request;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;

/// Bodies up to this size count as small (a JPEG or PNG radiograph).
pub(super) const SMALL_BODY_BYTES: u64 = 4 << 20;
/// Small bodies keep 1/this of `--max-buffered-bytes` for themselves.
pub(super) const SMALL_BODY_SHARE: usize = 8;

/// The buffered-body budget: `--max-buffered-bytes` in KiB permits, and the part of
/// it large bodies may use (all but a reserve kept for small ones).
pub(super) struct BodyBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl BodyBudget {
    pub(super) fn new(max_buffered_bytes: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(kilo(max_buffered_bytes as u64) as usize)),
            large: Arc::new(Semaphore::new(kilo(
                (max_buffered_bytes - max_buffered_bytes / SMALL_BODY_SHARE) as u64,
            ) as usize)),
        }
    }
}

/// Reserves a request body's bytes in the buffered-body budget before it is read (its
/// declared length, or the most a body may be): what is buffered stays bounded.
pub(super) fn reserve_body(state: &AppState, req: &Request) -> Result<BodyReservation, ApiError> {
    let limits = state.limits();
    // A body of unknown length (chunked) reserves the most a body may be.
    let declared = axum::body::HttpBody::size_hint(req.body()).exact();
    let reserve = declared
        .unwrap_or(limits.max_body_bytes as u64)
        .min(limits.max_body_bytes as u64);
    let budget = state.body_budget();
    let full = || {
        state.metrics().overloaded.with_label_values(&["all"]).inc();
        ApiError::BufferFull(limits.max_buffered_bytes)
    };
    // Large bodies may fill all but 1/SMALL_BODY_SHARE of the budget, so that a flood
    // of them never refuses an ordinary X-ray.
    let large = if reserve > SMALL_BODY_BYTES {
        Some(
            budget
                .large
                .clone()
                .try_acquire_many_owned(kilo(reserve))
                .map_err(|_| full())?,
        )
    } else {
        None
    };
    let bytes = budget
        .all
        .clone()
        .try_acquire_many_owned(kilo(reserve))
        .map_err(|_| full())?;
    Ok(BodyReservation {
        _bytes: bytes,
        _large: large,
    })
}

/// A body's bytes in the buffered-body budget (and in the large-body share), given
/// back when dropped.
pub(crate) struct BodyReservation {
    _bytes: OwnedSemaphorePermit,
    _large: Option<OwnedSemaphorePermit>,
}
