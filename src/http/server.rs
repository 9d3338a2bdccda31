//! The connection layer: accepts TCP connections for the router with the limits a
//! server behind a hospital gateway needs against slow and idle clients, the same
//! for HTTP/1 and HTTP/2 (h2c prior knowledge):
//!
//! - a connection that has not brought its first request within
//!   `header_read_timeout` is closed (HTTP/2: a connection that sent its preface and
//!   SETTINGS but no stream);
//! - a connection with no request in flight for `idle_timeout` is closed
//!   (keep-alive on HTTP/1, GOAWAY on HTTP/2); on a kept-alive HTTP/1 connection the
//!   next request's head, once its first byte arrives, has `header_read_timeout`
//!   (hyper's own head timeout would count the idle time too, closing a gateway's
//!   kept-alive connection after `header_read_timeout`: it is set past the idle
//!   timeout, a backstop);
//! - beyond `max_connections` open connections a new one is closed at once (the
//!   gateway retries another replica): the cap is [`crate::conn::Slots`], the gRPC
//!   door's too.
//!
//! Request bodies have their own deadline in the handler (`--body-timeout-s`).
//!
//! Shutdown ([`serve`]'s `shutdown` future): the listener closes first, so a new
//! connection is refused and a gateway fails over without sending anything; every
//! answer from then on carries `Connection: close` (HTTP/1), so a keep-alive
//! connection ends on an answer rather than under a request; an HTTP/1 connection
//! that stays idle for [`DRAIN_IDLE_GRACE`] and every HTTP/2 connection (GOAWAY) are
//! then shut down gracefully; requests in flight finish, within `shutdown_timeout`
//! (the wait for every connection's slot back: [`Slots::drained`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conn::Slots;

/// How long an idle HTTP/1 keep-alive connection is kept open once the drain has
/// begun, for a request the gateway may already have sent on it (answered with
/// `Connection: close`); then it is closed.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a connection being closed gracefully may take once nothing is in flight
/// (an HTTP/2 client must answer the GOAWAY's PING); then it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest wait for the first request's head (request line and headers), and for
    /// an HTTP/2 connection's first stream.
    pub header_read_timeout: Duration,
    /// Longest a connection may stay open with no request in flight (keep-alive).
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest the drain may take after the listener closed; connections still open
    /// then are dropped.
    pub shutdown_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(crate::defaults::IDLE_TIMEOUT_S),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(crate::defaults::SHUTDOWN_TIMEOUT_S),
        }
    }
}

/// What one connection is doing, shared between its service and its watchdog.
struct Activity {
    opened: Instant,
    /// Requests answered or in flight.
    requests: AtomicU64,
    /// Requests whose answer head has not been produced yet.
    active: AtomicUsize,
    /// Milliseconds after `opened` when the last answer head was produced.
    last_ms: AtomicU64,
    /// The connection speaks HTTP/2.
    http2: AtomicBool,
    /// Milliseconds after `opened` when the first byte of the next HTTP/1 request
    /// head arrived on a kept-alive connection ([`NO_HEAD`]: none yet): from then
    /// the head has `header_read_timeout`, however long the connection was idle.
    head_ms: AtomicU64,
    /// Told when a request's answer head is produced.
    ended: tokio::sync::Notify,
}

/// No request head has begun since the last answer.
const NO_HEAD: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            head_ms: AtomicU64::new(NO_HEAD),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn since_open_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// When the connection becomes closable for idleness (`None`: a request is in
    /// flight, look again later). `idle` is the idle limit that applies.
    fn idle_deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.requests.load(Ordering::Acquire) == 0 {
            return Some(self.opened + first);
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        // A head begun within the idle time has `first` from its first byte (a
        // request sent just before the idle deadline is not cut for it).
        match self.head_ms.load(Ordering::Acquire) {
            NO_HEAD => Some(self.opened + last + idle),
            ms => Some(self.opened + Duration::from_millis(ms) + first),
        }
    }

    /// Bytes arrived: on a kept-alive HTTP/1 connection with nothing in flight,
    /// the next request's head has begun.
    fn bytes_read(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.requests.load(Ordering::Acquire) > 0
            && !self.http2.load(Ordering::Acquire)
            && self.head_ms.load(Ordering::Acquire) == NO_HEAD
        {
            self.head_ms.store(self.since_open_ms(), Ordering::Release);
        }
    }
}

/// The connection's bytes, telling its [`Activity`] when a request head begins
/// (hyper's own head timeout also runs over the idle time before it, so it is set
/// past the idle timeout and this one bounds the head).
struct Watched {
    io: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Decrements the connection's in-flight count however the request ends.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .last_ms
            .store(self.0.since_open_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_one();
    }
}

/// The router, counting a connection's requests and marking answers
/// `Connection: close` once the server drains.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    draining: watch::Receiver<bool>,
}

impl tower::Service<Request<hyper::body::Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let activity = self.activity.clone();
        activity.active.fetch_add(1, Ordering::AcqRel);
        activity.requests.fetch_add(1, Ordering::AcqRel);
        activity.head_ms.store(NO_HEAD, Ordering::Release);
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            activity.http2.store(true, Ordering::Release);
        }
        let guard = InFlight(activity);
        let draining = self.draining.clone();
        let app = self.app.clone();
        Box::pin(async move {
            let _guard = guard;
            let mut resp = tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await?;
            if http1 && *draining.borrow() {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp)
        })
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (see the module
/// documentation).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Slots::new(limits.max_connections);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = slots.take() else {
                    tracing::debug!(%peer, max = limits.max_connections, "connection refused: at the connection limit");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let drain = drain_rx.clone();
                tokio::spawn(async move {
                    connection(stream, peer, app, limits, drain).await;
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    // Refuse new connections first: a gateway then fails over before sending.
    drop(listener);
    let _ = drain_tx.send(true);
    match slots.drained(limits.shutdown_timeout).await {
        Ok(()) => tracing::debug!("every connection closed"),
        Err(open) => tracing::warn!(
            timeout_s = limits.shutdown_timeout.as_secs_f64(),
            open,
            "drain deadline (--shutdown-timeout-s) passed; dropping the connections still open"
        ),
    }
}

/// One connection: HTTP/1 or HTTP/2, with the idle watchdog and the drain.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    limits: ConnLimits,
    mut drain: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let service = Tracked {
        app,
        activity: activity.clone(),
        draining: drain.clone(),
    };
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper's head timeout runs from the last answer, over the idle time: set past
    // the idle timeout as a backstop; the watchdog bounds the first request (from
    // the connection's opening) and each later head (from its first byte).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout);
    builder.http2().timer(TokioTimer::new());
    let stream = Watched {
        io: stream,
        activity: activity.clone(),
    };
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    // Since when the connection is being closed gracefully.
    let mut closing: Option<Instant> = None;
    let mut drain_seen = false;
    let mut drain_started: Option<Instant> = None;
    loop {
        let busy = activity.active.load(Ordering::Acquire) > 0;
        let now = Instant::now();
        // With a request in flight, look again in a while (its end also wakes us).
        let wake = match (closing, busy) {
            (_, true) => now + Duration::from_millis(250),
            (Some(since), false) => since + CLOSE_GRACE,
            (None, false) => idle_deadline(&activity, &limits, drain_started).unwrap_or(now),
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if activity.active.load(Ordering::Acquire) > 0 {
                    continue;
                }
                if let Some(since) = closing {
                    if now >= since + CLOSE_GRACE {
                        // An HTTP/2 client that does not answer the GOAWAY's PING.
                        tracing::debug!(%peer, "dropping a connection that did not close");
                        return;
                    }
                    continue;
                }
                if idle_deadline(&activity, &limits, drain_started).is_some_and(|d| now >= d) {
                    if activity.requests.load(Ordering::Acquire) == 0 {
                        // Not one request in time (HTTP/2 preface and SETTINGS alone,
                        // or a slow HTTP/1 head): nothing to finish.
                        tracing::debug!(%peer, "closing a connection that brought no request in time");
                        return;
                    }
                    tracing::debug!(%peer, draining = drain_started.is_some(), "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(now);
                }
            }
            () = activity.ended.notified() => {}
            changed = drain.changed(), if !drain_seen => {
                drain_seen = true;
                if changed.is_ok() && *drain.borrow() {
                    drain_started = Some(Instant::now());
                    // A connection that never brought a request closes now; an HTTP/2
                    // one is sent GOAWAY (it tells the client which streams were
                    // taken); an HTTP/1 one gets the grace.
                    if activity.requests.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    if closing.is_none() && activity.http2.load(Ordering::Acquire) {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// When an idle connection becomes closable: its first request's deadline, the idle
/// timeout after its last answer, or during the drain the grace (HTTP/1).
fn idle_deadline(
    activity: &Activity,
    limits: &ConnLimits,
    drain_started: Option<Instant>,
) -> Option<Instant> {
    match drain_started {
        Some(t) if activity.requests.load(Ordering::Acquire) > 0 => {
            (activity.active.load(Ordering::Acquire) == 0).then_some(t + DRAIN_IDLE_GRACE)
        }
        _ => activity.idle_deadline(limits.header_read_timeout, limits.idle_timeout),
    }
}
