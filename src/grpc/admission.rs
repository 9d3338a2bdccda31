//! Admitting a gRPC call before its message is read (the HTTP door's admission, in
//! gRPC's terms), as a tower layer around every service of the listener:
//!
//! 1. The API key, from the call's metadata (`authorization: Bearer …` or
//!    `x-api-key`), for the method's scope (`ModelInfer`: predict, `ModelMetadata`:
//!    models): UNAUTHENTICATED or PERMISSION_DENIED at once, before any byte of the
//!    message, counted as the service counts its refusals and noted in the audit
//!    trail as the HTTP door notes them (door `grpc`, the method as the route).
//! 2. Each message's declared length (gRPC's 5-byte prefix), as its first bytes
//!    arrive: at most `--max-body-bytes` for `ModelInfer`, at most
//!    [`PRE_AUTH_MESSAGE_BYTES`] for every method that needs no key; then reserved
//!    in the core's buffered-bytes budget ([`Core::reserve_bytes`], the one the
//!    HTTP door uses), held until the call's answer is sent. Over either,
//!    RESOURCE_EXHAUSTED at once (with a retry delay for the budget).
//! 3. The inference service's messages arrive within `--body-timeout-s`
//!    (DEADLINE_EXCEEDED after).
//! 4. Its calls are counted on their connection while in flight, so that the
//!    connection's idle timer waits for their answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

use crate::access::ApiKeys;
use crate::access::Scope;
use crate::access::presented_key;
use crate::grpc::Refusal;
use crate::grpc::door_status;
use crate::predict::Core;
use crate::predict::Reservation;

/// The largest message of a method that needs no API key (readiness, metadata,
/// health, reflection: a name and a version), read before anyone is known.
pub const PRE_AUTH_MESSAGE_BYTES: usize = 64 << 10;

/// The inference service's path prefix.
const INFERENCE: &str = "/inference.GRPCInferenceService/";
/// The health service's unary check (a call that keeps its connection, as the
/// protocol's do).
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The inference service's methods (the metric's `method` label).
const METHODS: [&str; 6] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
];

/// The calls in flight on one connection, and when the last one ended.
#[derive(Debug, Default)]
pub struct Calls {
    running: AtomicUsize,
    last_end: Mutex<Option<tokio::time::Instant>>,
}

/// A call in flight keeps its connection ([`crate::conn::Quiet`]).
impl crate::conn::Keep for Calls {
    /// Until when a connection quiet for `idle` stays open: `idle` from now while
    /// a call runs, `idle` after the last call ended; `None` to close it now.
    fn keep_until(&self, idle: Duration) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        if self.running.load(Ordering::Acquire) > 0 {
            return Some(now + idle);
        }
        let ended = *self.last_end.lock().unwrap_or_else(|p| p.into_inner());
        ended.map(|t| t + idle).filter(|t| *t > now)
    }

    /// Only calls keep a gRPC connection: a preface trickled a byte at a time, or
    /// PINGs and SETTINGS with no call, do not hold its slot past the first-bytes
    /// timeout or the idle timeout after the last call.
    fn bytes_keep(&self) -> bool {
        false
    }
}

/// One call in flight on its connection, until dropped.
struct InFlight(Arc<Calls>);

impl InFlight {
    fn start(calls: Arc<Calls>) -> Self {
        calls.running.fetch_add(1, Ordering::AcqRel);
        Self(calls)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now());
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the listener tells each call about its connection (in the request's
/// extensions): the peer, and the connection's calls in flight.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub tcp: tonic::transport::server::TcpConnectInfo,
    /// The connection's calls in flight.
    pub calls: Arc<Calls>,
}

/// Reads gRPC's message framing (a compressed flag, a 4-byte big-endian length,
/// then the message) from a body's data frames as they come, split anywhere.
#[derive(Debug, Default, Clone)]
pub struct Framing {
    head: [u8; 5],
    have: usize,
    left: u64,
}

impl Framing {
    /// Reads `data`, calling `on_message` with the declared length of each message
    /// whose prefix it completes (before the message's bytes arrive).
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        mut on_message: impl FnMut(u32) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(5 - self.have);
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                self.left = u64::from(len);
                on_message(len)?;
            }
        }
        Ok(())
    }
}

/// The layer (see the module's header).
#[derive(Clone)]
pub(super) struct Admission {
    core: Core,
    keys: Option<Arc<ApiKeys>>,
    /// `--max-body-bytes`: the largest `ModelInfer` message.
    max_message: usize,
    /// Longest a message may take to arrive (`--body-timeout-s`).
    body_timeout: Duration,
}

impl Admission {
    pub(super) fn new(
        core: Core,
        keys: Option<Arc<ApiKeys>>,
        max_message: usize,
        body_timeout: Duration,
    ) -> Self {
        Self {
            core,
            keys,
            max_message,
            body_timeout,
        }
    }

    /// Counts a refused call of the inference service, as the service counts its
    /// answers.
    fn count(core: &Core, method: Option<&'static str>, code: tonic::Code) {
        if let Some(m) = method {
            core.metrics()
                .grpc_requests
                .with_label_values(&[m, &format!("{code:?}")])
                .inc();
        }
    }

    /// The caller, when `scope` needs a key and the keys file is set; else the
    /// refusal to answer at once.
    fn authorize(
        &self,
        headers: &http::HeaderMap,
        method: Option<&'static str>,
    ) -> Result<Option<crate::access::Caller>, Status> {
        let scope = match method {
            Some("ModelInfer") => Scope::Predict,
            Some("ModelMetadata") => Scope::Models,
            _ => return Ok(None),
        };
        let (Some(keys), Some(m)) = (&self.keys, method) else {
            return Ok(None);
        };
        keys.authorize(presented_key(headers), scope)
            .map(Some)
            .map_err(|e| {
                let reason = e.reason();
                self.core
                    .metrics()
                    .auth_refused
                    .with_label_values(&[reason])
                    .inc();
                self.core
                    .audit()
                    .note_refusal(crate::audit::AuditEvent::auth_refused(
                        "grpc",
                        format!("{}{m}", &INFERENCE[1..]),
                        uuid::Uuid::new_v4().to_string(),
                        scope,
                        &e,
                    ));
                let s = door_status(&Refusal::Auth(e));
                Self::count(&self.core, method, s.code());
                s
            })
    }
}

impl<S> tower::Layer<S> for Admission {
    type Service = Admitted<S>;
    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted {
            inner,
            admission: self.clone(),
        }
    }
}

/// The services behind [`Admission`].
#[derive(Clone)]
pub(super) struct Admitted<S> {
    inner: S,
    admission: Admission,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Admitted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The service that was made ready, keeping a fresh clone for the next call.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let a = &self.admission;
        let path = req.uri().path();
        let inference = path.starts_with(INFERENCE);
        // The calls that keep a connection open: the protocol's (all unary) and the
        // health check's (not the health Watch or reflection streams: a stream held
        // open would hold the slot for ever).
        let kept = inference || path == HEALTH_CHECK;
        let method = path
            .strip_prefix(INFERENCE)
            .and_then(|m| METHODS.iter().copied().find(|k| *k == m));
        // 1. The key, before any byte of the message is read.
        match a.authorize(req.headers(), method) {
            Ok(Some(caller)) => {
                req.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(s) => return Box::pin(async move { Ok(s.into_http()) }),
        }
        // 4. In flight on its connection until its answer is sent.
        let in_flight = kept
            .then(|| req.extensions().get::<ConnInfo>())
            .flatten()
            .map(|c| InFlight::start(c.calls.clone()));
        // 2 and 3, as the message arrives.
        let limit = if method == Some("ModelInfer") {
            a.max_message
        } else {
            PRE_AUTH_MESSAGE_BYTES.min(a.max_message)
        };
        let held = Arc::new(Mutex::new(None));
        let body_timeout = a.body_timeout;
        let (parts, body) = req.into_parts();
        let metered = Metered {
            inner: body,
            framing: Framing::default(),
            limit,
            core: a.core.clone(),
            held: held.clone(),
            deadline: inference.then(|| Box::pin(tokio::time::sleep(body_timeout))),
            body_timeout,
            method,
            failed: false,
        };
        let req = http::Request::from_parts(parts, Body::new(metered));
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(Held {
                    inner: body,
                    _held: (held, in_flight),
                }),
            ))
        })
    }
}

/// A call's request body, read through: each message's declared length is checked
/// and reserved as its prefix arrives (see the module's header).
struct Metered {
    inner: Body,
    framing: Framing,
    /// The largest message.
    limit: usize,
    core: Core,
    /// The reservation of the latest message, held until the answer is sent.
    held: Arc<Mutex<Option<Reservation>>>,
    /// When the whole body must have arrived (the inference service's calls).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    body_timeout: Duration,
    method: Option<&'static str>,
    /// Refused: nothing more is read.
    failed: bool,
}

impl Metered {
    fn refuse(&mut self, e: &Refusal) -> Status {
        self.failed = true;
        let s = door_status(e);
        Admission::count(&self.core, self.method, s.code());
        s
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        if let Some(d) = &mut this.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            let e = Refusal::BodyTimeout(this.body_timeout.as_secs());
            return Poll::Ready(Some(Err(this.refuse(&e))));
        }
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.deadline = None;
                return Poll::Ready(None);
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let (limit, core, held) = (this.limit, &this.core, &this.held);
            let checked = this.framing.feed(data, |len| {
                if len as usize > limit {
                    return Err(Refusal::MessageTooLarge(limit));
                }
                // The message's bytes, before they arrive; the previous message's
                // reservation (a stream's) is given back.
                let r = core.reserve_bytes(u64::from(len)).map_err(Refusal::Core)?;
                *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                Ok(())
            });
            if let Err(e) = checked {
                return Poll::Ready(Some(Err(this.refuse(&e))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body, holding the call's reservation and its place among its
/// connection's calls in flight until it is sent.
struct Held<T> {
    inner: Body,
    _held: T,
}

impl<T: Unpin> http_body::Body for Held<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Keep as _;

    #[test]
    fn message_lengths_are_read_from_prefixes_split_anywhere() {
        let mut wire = Vec::new();
        for len in [3u32, 0, 70_000] {
            wire.push(0);
            wire.extend_from_slice(&len.to_be_bytes());
            wire.resize(wire.len() + len as usize, 7);
        }
        for split in [1, 2, 4, 5, 6, 4096, wire.len()] {
            let (mut f, mut got) = (Framing::default(), Vec::new());
            for chunk in wire.chunks(split) {
                f.feed(chunk, |n| {
                    got.push(n);
                    Ok::<_, ()>(())
                })
                .unwrap();
            }
            assert_eq!(got, [3, 0, 70_000], "chunks of {split}");
        }
    }

    #[test]
    fn an_idle_connection_waits_for_its_calls() {
        let calls = Arc::new(Calls::default());
        let idle = Duration::from_secs(2);
        assert!(calls.keep_until(idle).is_none());
        let call = InFlight::start(calls.clone());
        assert!(calls.keep_until(idle).is_some());
        drop(call);
        // Ended just now: kept for the idle timeout after it.
        assert!(calls.keep_until(idle).is_some());
        assert!(calls.keep_until(Duration::ZERO).is_none());
    }
}
