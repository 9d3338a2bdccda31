//! Admitting an HTTP request before its body is read: the buffered-body budget. (The processing slot, the request
//! timeout and the buffered-bytes budget every door shares are the core's:
//! [`crate::predict::Core::slot`], [`crate::predict::Core::reserve_bytes`]; the share kept for
//! small bodies is this door's.)

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

/// The part of `--max-buffered-bytes` large bodies may use (all but a reserve kept for
/// small ones), in KiB permits; the whole is the core's.
pub(super) struct BodyBudget {
    large: Arc<Semaphore>,
}

impl BodyBudget {
    pub(super) fn new(max_buffered_bytes: usize) -> Self {
        Self {
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
    // The whole budget is the core's, shared with the other doors (DICOM C-STOREs).
    let mut bytes = state.core().reserve_bytes();
    if !bytes.grow(reserve as usize) {
        return Err(full());
    }
    Ok(BodyReservation {
        _bytes: bytes,
        _large: large,
    })
}

/// A body's bytes in the buffered-body budget (and in the large-body share), given
/// back when dropped.
pub(crate) struct BodyReservation {
    _bytes: crate::predict::Buffered,
    _large: Option<OwnedSemaphorePermit>,
}
