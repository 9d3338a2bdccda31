//! What every listener does to its connections, whatever it speaks: the cap on
//! connections open at once ([`Slots`]: a [`Slot`] per connection, none beyond
//! the cap, so the door closes the new one at once; the drain's wait for every
//! slot back), and the quiet-peer timer over any byte stream ([`Quiet`]: closed
//! when the peer sends no first bytes in time or nothing more for the idle
//! timeout, unless what runs on it keeps it ([`Keep`])).
//!
//! The HTTP door (`http::server`) takes a slot per connection and drains on
//! shutdown; its quiet-peer limits are hyper's and its own, by request. The gRPC
//! door (`grpc`) takes a slot and wraps each connection in [`Quiet`], kept open by
//! its calls in flight. Only tokio here: no protocol.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The connections a listener may hold open at once.
#[derive(Debug, Clone)]
pub struct Slots {
    open: Arc<Semaphore>,
    max: usize,
}

/// One connection's place under the cap, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// At most `max` connections (at least one; at most what a semaphore counts).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            open: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many connections hold a slot now.
    pub fn open(&self) -> usize {
        self.max - self.open.available_permits()
    }

    /// A slot for a new connection; `None` at the cap (the door closes it at once:
    /// a gateway retries another replica sooner than a queued connection waits).
    pub fn take(&self) -> Option<Slot> {
        self.open
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Slot { _permit: p })
    }

    /// Waits until every slot is back (every connection closed), at most `within`;
    /// `Err` with the number still open when the time is up.
    ///
    /// Cancel safe: dropping the future gives back whatever it had gathered.
    pub async fn drained(&self, within: Duration) -> Result<(), usize> {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        match tokio::time::timeout(within, self.open.acquire_many(all)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.open()),
        }
    }
}

/// What runs on a connection and may keep it open while its peer is quiet (the
/// gRPC door's calls in flight: the answer is what the peer waits for).
pub trait Keep: Send + Sync {
    /// Until when a connection quiet for `idle` stays open; `None` to close it now.
    fn keep_until(&self, idle: Duration) -> Option<Instant>;

    /// Whether the peer's bytes keep the connection (true: a quiet-peer timer), or
    /// only what runs on it does (false: the gRPC door, where a preface sent a byte
    /// at a time, or PINGs with no call, must not hold a slot).
    fn bytes_keep(&self) -> bool {
        true
    }
}

/// Nothing keeps the connection: a quiet peer is closed.
impl Keep for () {
    fn keep_until(&self, _: Duration) -> Option<Instant> {
        None
    }
}

/// A connection (any byte stream) closed when its peer sends nothing: no first
/// bytes within `first`, or nothing more for `idle`, unless its [`Keep`] keeps it
/// (with a [`Keep`] whose bytes do not count, only what it keeps matters: closed at
/// `first`, then `idle` after its last call, whatever bytes arrive).
/// A read then fails with `TimedOut`, which ends the connection. Writes do not
/// count: a peer that only reads is quiet.
pub struct Quiet<IO, K> {
    io: IO,
    /// When the connection is closed if nothing more arrives.
    quiet: Pin<Box<Sleep>>,
    idle: Duration,
    keep: Arc<K>,
    /// The connection's place under the cap, given back when it is dropped.
    _slot: Option<Slot>,
}

impl<IO, K: Keep> Quiet<IO, K> {
    /// `io`, closed unless its first bytes come within `first` and then no
    /// silence lasts `idle` (or `keep` keeps it).
    pub fn new(io: IO, first: Duration, idle: Duration, keep: Arc<K>) -> Self {
        Self {
            io,
            quiet: Box::pin(tokio::time::sleep(first)),
            idle,
            keep,
            _slot: None,
        }
    }

    /// The connection holding `slot` until it is dropped.
    #[must_use]
    pub fn holding(mut self, slot: Slot) -> Self {
        self._slot = Some(slot);
        self
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// What keeps it open.
    pub fn keep(&self) -> &Arc<K> {
        &self.keep
    }
}

impl<IO: AsyncRead + Unpin, K: Keep> AsyncRead for Quiet<IO, K> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && self.keep.bytes_keep() {
                    let next = Instant::now() + self.idle;
                    self.quiet.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => loop {
                if self.quiet.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Quiet for the timeout: closed, unless kept (the timer is set
                // again, and polled again so that it wakes this task).
                match self.keep.keep_until(self.idle) {
                    Some(until) => self.quiet.as_mut().reset(until),
                    None => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer sent nothing within the header-read or idle timeout",
                        )));
                    }
                }
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin, K> AsyncWrite for Quiet<IO, K> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_cap_admits_max_connections_and_no_more_until_one_closes() {
        let slots = Slots::new(2);
        let a = slots.take().expect("first of two");
        let _b = slots.take().expect("second of two");
        assert!(slots.take().is_none(), "a third beyond a cap of two");
        assert_eq!(slots.open(), 2);
        drop(a);
        assert_eq!(slots.open(), 1);
        assert!(slots.take().is_some(), "a slot given back is taken again");
        // A cap of zero still lets one connection in, as the flag always did.
        let one = Slots::new(0);
        let _c = one.take().expect("the one");
        assert!(one.take().is_none());
    }

    #[tokio::test]
    async fn the_drain_waits_for_every_slot_and_no_longer_than_its_deadline() {
        let slots = Slots::new(3);
        assert_eq!(slots.drained(Duration::from_millis(10)).await, Ok(()));
        let slots = Slots::new(3);
        let held = slots.take().expect("a slot");
        let started = std::time::Instant::now();
        assert_eq!(slots.drained(Duration::from_millis(100)).await, Err(1));
        assert!(started.elapsed() >= Duration::from_millis(100));
        // Given back during the drain: it ends then, before its deadline.
        let slots = Slots::new(3);
        let held2 = slots.take().expect("a slot");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held2);
        });
        let started = std::time::Instant::now();
        assert_eq!(slots.drained(Duration::from_secs(10)).await, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(held);
    }

    /// Kept while `running` says so (a call in flight), for the idle timeout.
    #[derive(Default)]
    struct Running(AtomicBool);

    impl Keep for Running {
        fn keep_until(&self, idle: Duration) -> Option<Instant> {
            self.0
                .load(Ordering::Acquire)
                .then(|| Instant::now() + idle)
        }
    }

    /// Reads until the stream fails or ends: the error's kind, or `None` at the
    /// end of the stream; `Err` when it is still open after `within`.
    async fn closed_within<S: AsyncRead + Unpin>(
        s: &mut S,
        within: Duration,
    ) -> Result<Option<io::ErrorKind>, ()> {
        let mut buf = [0u8; 64];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(e.kind()),
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    #[tokio::test]
    async fn a_peer_without_first_bytes_is_closed_after_the_first_timeout() {
        let (_peer, ours) = tokio::io::duplex(64);
        let first = Duration::from_millis(100);
        let mut q = Quiet::new(ours, first, Duration::from_secs(30), Arc::new(()));
        let started = std::time::Instant::now();
        assert_eq!(
            closed_within(&mut q, Duration::from_secs(5)).await,
            Ok(Some(io::ErrorKind::TimedOut))
        );
        let took = started.elapsed();
        assert!(took >= first, "closed before its first timeout: {took:?}");
        assert!(took < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_peer_that_goes_quiet_is_closed_after_the_idle_timeout_and_not_before() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let idle = Duration::from_millis(300);
        let mut q = Quiet::new(ours, Duration::from_millis(200), idle, Arc::new(()));
        // Bytes every 100 ms for 600 ms: past the first timeout, never quiet.
        for _ in 0..6 {
            peer.write_all(b"x").await.expect("the duplex is open");
            let mut one = [0u8; 1];
            q.read_exact(&mut one)
                .await
                .expect("the byte the peer sent");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Then quiet: closed after the idle timeout.
        let started = std::time::Instant::now();
        assert_eq!(
            closed_within(&mut q, Duration::from_secs(5)).await,
            Ok(Some(io::ErrorKind::TimedOut))
        );
        assert!(started.elapsed() >= idle - Duration::from_millis(120));
        // The answer still goes out while the peer reads: writes pass through.
        q.write_all(b"ok").await.expect("writes pass through");
    }

    /// Kept only by calls (none here): the peer's bytes do not count.
    struct CallsOnly;

    impl Keep for CallsOnly {
        fn keep_until(&self, _: Duration) -> Option<Instant> {
            None
        }
        fn bytes_keep(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn bytes_alone_do_not_keep_a_connection_kept_only_by_calls() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let first = Duration::from_millis(300);
        let mut q = Quiet::new(ours, first, Duration::from_secs(30), Arc::new(CallsOnly));
        // A byte every 50 ms (a preface trickled, PINGs): closed at the first
        // timeout all the same.
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                if peer.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = std::time::Instant::now();
        assert_eq!(
            closed_within(&mut q, Duration::from_secs(3)).await,
            Ok(Some(io::ErrorKind::TimedOut)),
            "a trickling peer held the connection"
        );
        let took = started.elapsed();
        assert!(took >= first - Duration::from_millis(20), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        trickle.abort();
    }

    #[tokio::test]
    async fn a_call_in_flight_keeps_a_quiet_peer_and_its_end_lets_it_close() {
        let (_peer, ours) = tokio::io::duplex(64);
        let running = Arc::new(Running::default());
        running.0.store(true, Ordering::Release);
        let idle = Duration::from_millis(100);
        let mut q = Quiet::new(ours, idle, idle, running.clone());
        // Kept for five idle timeouts while the call runs.
        assert_eq!(
            closed_within(&mut q, Duration::from_millis(500)).await,
            Err(())
        );
        running.0.store(false, Ordering::Release);
        assert_eq!(
            closed_within(&mut q, Duration::from_secs(5)).await,
            Ok(Some(io::ErrorKind::TimedOut))
        );
    }
}
