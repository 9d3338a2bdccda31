//! The buffered-bytes budget every door shares (`--max-buffered-bytes`): a request
//! reserves the bytes it will hold (an HTTP body's declared length, a gRPC message's
//! declared length) before they are read, and gives them back when its answer is
//! done. Over budget, the door refuses at once ([`PredictError::BufferFull`], 503 /
//! RESOURCE_EXHAUSTED with a retry delay) instead of buffering.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;

use crate::predict::upload::kilo;

/// Reservations up to this size count as small (a JPEG or PNG radiograph).
pub const SMALL_BYTES: u64 = 4 << 20;
/// Small reservations keep 1/this of `--max-buffered-bytes` for themselves.
pub const SMALL_SHARE: usize = 8;

/// `--max-buffered-bytes` in KiB permits, and the part of it large reservations may
/// use (all but a share kept for small ones, so that a flood of large bodies never
/// refuses an ordinary X-ray).
pub(super) struct BufferBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl BufferBudget {
    pub(super) fn new(max_buffered_bytes: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(kilo(max_buffered_bytes as u64) as usize)),
            large: Arc::new(Semaphore::new(kilo(
                (max_buffered_bytes - max_buffered_bytes / SMALL_SHARE) as u64,
            ) as usize)),
        }
    }

    /// `n` bytes, or `None` when the budget (or the large share, for a large
    /// reservation) is full.
    pub(super) fn try_reserve(&self, n: u64) -> Option<Reservation> {
        let large = if n > SMALL_BYTES {
            Some(self.large.clone().try_acquire_many_owned(kilo(n)).ok()?)
        } else {
            None
        };
        let bytes = self.all.clone().try_acquire_many_owned(kilo(n)).ok()?;
        Some(Reservation {
            _bytes: bytes,
            _large: large,
        })
    }
}

impl BufferBudget {
    /// An empty reservation that grows as its request arrives ([`Buffered::grow`]).
    pub(super) fn growing(&self) -> Buffered {
        Buffered {
            all: self.all.clone(),
            large: self.large.clone(),
            bytes: 0,
            held: None,
            held_large: None,
        }
    }
}

/// Bytes of a request that arrives in pieces (a DICOM data set), held in the
/// buffered-bytes budget as it grows: past `SMALL_BYTES` they come from the
/// large share too, as a large body's do. Given back when dropped.
pub struct Buffered {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
    bytes: u64,
    held: Option<OwnedSemaphorePermit>,
    held_large: Option<OwnedSemaphorePermit>,
}

impl Buffered {
    /// Reserves `n` more bytes, or `false` at once when the budget has not them
    /// (nothing more is reserved then).
    pub fn grow(&mut self, n: usize) -> bool {
        let total = self.bytes + n as u64;
        let kib =
            |p: &Option<OwnedSemaphorePermit>| p.as_ref().map_or(0, |p| p.num_permits() as u32);
        let more = kilo(total).saturating_sub(kib(&self.held));
        let more_large = if total > SMALL_BYTES {
            kilo(total).saturating_sub(kib(&self.held_large))
        } else {
            0
        };
        // Both parts or neither: a permit not merged is given back when dropped.
        let take = |sem: &Arc<Semaphore>, k: u32| {
            if k == 0 {
                Ok(None)
            } else {
                sem.clone().try_acquire_many_owned(k).map(Some)
            }
        };
        let Ok(large) = take(&self.large, more_large) else {
            return false;
        };
        let Ok(all) = take(&self.all, more) else {
            return false;
        };
        for (held, p) in [(&mut self.held, all), (&mut self.held_large, large)] {
            if let Some(p) = p {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
            }
        }
        self.bytes = total;
        true
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Bytes held in the buffered-bytes budget (and in the large share), given back when
/// dropped.
#[must_use = "the bytes are given back when the reservation is dropped"]
pub struct Reservation {
    _bytes: OwnedSemaphorePermit,
    _large: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("kib", &self._bytes.num_permits())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_reservations_leave_the_small_share_and_bytes_come_back() {
        let b = BufferBudget::new(40 << 20);
        let big = b.try_reserve(30 << 20).expect("within the large share");
        assert!(b.try_reserve(30 << 20).is_none(), "over the budget");
        // 5 MiB of the large share (35 MiB) is left: a 6 MiB body is refused ...
        assert!(b.try_reserve(6 << 20).is_none());
        // ... and a radiograph still comes from the small share.
        let small = b.try_reserve(4 << 20).expect("the small share");
        drop(big);
        assert!(b.try_reserve(30 << 20).is_some(), "given back when dropped");
        drop(small);
    }
}
