//! OpenTelemetry tracing: the W3C Trace Context a request brings, one span per stage
//! of its answer, and their export over OTLP/gRPC (`--otlp-endpoint`).
//!
//! - The caller's `traceparent` (and `tracestate`) is taken when valid (W3C Trace
//!   Context level 1: version 00, or a later version read as 00; a trace id and a
//!   parent id not all zeros); else the request starts a trace of its own. The
//!   answer carries a `traceparent` naming the server's span, so the caller's
//!   trace continues from it; `tracestate` is passed on unchanged.
//! - A request's spans: the server span (`POST /predict`, kind SERVER, a child of
//!   the caller's span) and under it one span per stage: `admission`, `body`,
//!   `decode` (each image, with `gates` inside it), `queue`, `inference`, `ood`,
//!   `audit`, `answer`, each with the request id. Stages that run on other threads
//!   (the model's worker) are placed from the times they measured.
//! - Export: the OpenTelemetry protocol's own messages and client
//!   (`opentelemetry-proto`), batched by one task, bounded: when the collector is
//!   slow or gone, spans are dropped and counted (`cxr_otlp_spans_dropped_total`),
//!   never requests slowed. The spans of refused requests (401, 403, 404 and their
//!   gRPC codes) are not exported unless `--otlp-export-refused`: anyone who can
//!   reach the port could otherwise fill the collector.
//! - The server span is named from the route's template (`POST
//!   /v2/models/{name}/infer`; only the method when no route matched), never from
//!   the path the client sent, which may carry anything (a patient's name).
//!   Nothing is exported without `--otlp-endpoint`, but the context is still read,
//!   passed on, logged and audited.
//! - The trace id is in the request's log span (`trace_id`) and in its audit
//!   records.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// A header's value when it was sent once; a header sent twice is read as not sent
/// (W3C trace context: a duplicated `traceparent` restarts the trace; the same for
/// `x-request-id`), whichever door reads it.
pub fn single<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    match (values.next(), values.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
}

/// A W3C trace context: the trace, the caller's span, whether it is sampled, and the
/// vendors' `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The caller's span (8 bytes, not all zero); none when the trace starts here.
    pub parent_span_id: Option<[u8; 8]>,
    /// The sampled flag.
    pub sampled: bool,
    /// `tracestate`, passed on unchanged (only with a valid `traceparent`).
    pub tracestate: Option<String>,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl TraceContext {
    /// The caller's context from its headers or gRPC metadata (`header` looks a
    /// name up): `traceparent` and `tracestate`, when valid.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Self> {
        Self::parse(header(TRACEPARENT)?, header(TRACESTATE))
    }

    /// The context of a `traceparent` value (and `tracestate`), when valid.
    pub fn parse(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<Self> {
        let s = std::str::from_utf8(traceparent).ok()?.trim();
        let version = hex_bytes::<1>(s.get(0..2)?)?[0];
        if version == 0xff {
            return None;
        }
        // Version 00 is exactly 55 characters; a later version may add fields
        // after a dash, and is read as 00.
        if (version == 0 && s.len() != 55) || s.len() < 55 {
            return None;
        }
        if s.len() > 55 && s.as_bytes()[55] != b'-' {
            return None;
        }
        let b = s.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = hex_bytes::<16>(&s[3..35])?;
        let parent = hex_bytes::<8>(&s[36..52])?;
        let flags = hex_bytes::<1>(&s[53..55])?[0];
        if trace_id == [0; 16] || parent == [0; 8] {
            return None;
        }
        let tracestate = tracestate
            .and_then(|t| std::str::from_utf8(t).ok())
            .map(str::trim)
            .filter(|t| {
                !t.is_empty() && t.len() <= 512 && t.bytes().all(|c| (0x20..0x7f).contains(&c))
            })
            .map(str::to_string);
        Some(Self {
            trace_id,
            parent_span_id: Some(parent),
            sampled: flags & 1 == 1,
            tracestate,
        })
    }

    /// A new trace, sampled.
    pub fn root() -> Self {
        Self {
            trace_id: random_id(),
            parent_span_id: None,
            sampled: true,
            tracestate: None,
        }
    }

    /// The trace id in hex.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut b = [0u8; N];
        if getrandom::fill(&mut b).is_err() {
            // No entropy source: a UUID's randomness instead.
            let u = uuid::Uuid::new_v4();
            b.copy_from_slice(&u.as_bytes()[..N]);
        }
        if b != [0; N] {
            return b;
        }
    }
}

/// One finished span.
#[derive(Debug, Clone)]
struct Finished {
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    kind: span::SpanKind,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<(String, String)>,
    error: Option<String>,
}

/// The spans of one request, collected as its stages finish and exported when its
/// answer is sent.
#[derive(Debug)]
pub struct RequestTrace {
    ctx: TraceContext,
    /// The server span (every stage's parent).
    span_id: [u8; 8],
    /// An instant and the wall clock at that instant (stages are timed by instants).
    origin: (Instant, SystemTime),
    request_id: Mutex<String>,
    spans: Mutex<Vec<Finished>>,
    /// Whether spans are kept (sampled, and an exporter to send them to).
    recording: bool,
}

impl RequestTrace {
    /// A request's trace, under the caller's context (or a new trace), starting now;
    /// its spans are kept when it is sampled and `exporting` (else only the context
    /// is read, passed on, logged and audited).
    pub fn start(ctx: TraceContext, exporting: bool) -> Arc<Self> {
        Arc::new(Self {
            recording: ctx.sampled && exporting,
            ctx,
            span_id: random_id(),
            origin: (Instant::now(), SystemTime::now()),
            request_id: Mutex::new(String::new()),
            spans: Mutex::new(Vec::new()),
        })
    }

    /// The trace context.
    pub fn context(&self) -> &TraceContext {
        &self.ctx
    }

    /// Whether its spans are kept (sampled, and exported): callers skip building a
    /// stage's attributes otherwise.
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// The trace id, hex.
    pub fn trace_id(&self) -> String {
        self.ctx.trace_id_hex()
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.origin.0
    }

    /// The request id every span carries.
    pub fn set_request_id(&self, id: &str) {
        *self.request_id.lock().unwrap_or_else(|p| p.into_inner()) = id.to_string();
    }

    /// The `traceparent` to answer with: this trace, the server's span.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.ctx.trace_id),
            hex(&self.span_id),
            u8::from(self.ctx.sampled)
        )
    }

    fn wall(&self, at: Instant) -> SystemTime {
        let (i0, w0) = self.origin;
        match at.checked_duration_since(i0) {
            Some(d) => w0 + d,
            None => w0 - i0.duration_since(at),
        }
    }

    /// Records a stage that ran from `start` to `end`, under the server span.
    pub fn stage(&self, name: &str, start: Instant, end: Instant, attributes: &[(&str, String)]) {
        self.stage_under(None, name, start, end, attributes);
    }

    /// Records a stage under another stage (`parent`: that stage's span id).
    pub fn stage_under(
        &self,
        parent: Option<[u8; 8]>,
        name: &str,
        start: Instant,
        end: Instant,
        attributes: &[(&str, String)],
    ) -> [u8; 8] {
        if !self.recording {
            return [0; 8];
        }
        let id = random_id();
        self.push(Finished {
            span_id: id,
            parent: Some(parent.unwrap_or(self.span_id)),
            name: name.into(),
            kind: span::SpanKind::Internal,
            start: self.wall(start),
            end: self.wall(end.max(start)),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
            error: None,
        });
        id
    }

    /// Records a stage that took `took` and ended at `end`.
    pub fn stage_took(
        &self,
        name: &str,
        took: Duration,
        end: Instant,
        attributes: &[(&str, String)],
    ) {
        let start = end.checked_sub(took).unwrap_or(end);
        self.stage(name, start, end, attributes);
    }

    fn push(&self, f: Finished) {
        if self.recording {
            self.spans.lock().unwrap_or_else(|p| p.into_inner()).push(f);
        }
    }

    /// Ends the server span (`name`, e.g. `POST /predict`) now, with its
    /// attributes (the status, `http.response.status_code` or
    /// `rpc.grpc.status_code`, and the route) and the error when it failed on the
    /// server's side, and hands every span of the request to `exporter`.
    pub fn finish(
        &self,
        name: &str,
        attributes: &[(&str, String)],
        error: Option<String>,
        exporter: Option<&Exporter>,
    ) {
        let Some(exporter) = exporter.filter(|_| self.recording) else {
            return;
        };
        let request_id = self
            .request_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut spans = std::mem::take(&mut *self.spans.lock().unwrap_or_else(|p| p.into_inner()));
        spans.push(Finished {
            span_id: self.span_id,
            parent: self.ctx.parent_span_id,
            name: name.into(),
            kind: span::SpanKind::Server,
            start: self.origin.1,
            end: SystemTime::now(),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
            error,
        });
        let tracestate = self.ctx.tracestate.clone().unwrap_or_default();
        let out: Vec<Span> = spans
            .into_iter()
            .map(|f| {
                let mut attributes: Vec<KeyValue> =
                    f.attributes.into_iter().map(|(k, v)| kv(&k, v)).collect();
                attributes.push(kv("cxr.request_id", request_id.clone()));
                // Trace flags (sampled), and whether the parent is remote: only the
                // server span's parent (the caller's span) is.
                let remote = f.kind == span::SpanKind::Server && f.parent.is_some();
                Span {
                    trace_id: self.ctx.trace_id.to_vec(),
                    span_id: f.span_id.to_vec(),
                    trace_state: tracestate.clone(),
                    parent_span_id: f.parent.map(|p| p.to_vec()).unwrap_or_default(),
                    flags: 0x100 | (u32::from(remote) << 9) | 1,
                    name: f.name,
                    kind: f.kind as i32,
                    start_time_unix_nano: nanos(f.start),
                    end_time_unix_nano: nanos(f.end),
                    attributes,
                    status: f.error.map(|m| Status {
                        message: m,
                        code: 2,
                    }),
                    ..Span::default()
                }
            })
            .collect();
        exporter.send(out);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(k: &str, v: String) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..KeyValue::default()
    }
}

/// Spans waiting for export, most.
const QUEUE_SPANS: usize = 8192;
/// Spans per export call, most.
const BATCH_SPANS: usize = 512;
/// Longest an export call may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends spans to an OTLP/gRPC collector from one background task.
#[derive(Debug, Clone)]
pub struct Exporter {
    tx: tokio::sync::mpsc::Sender<Vec<Span>>,
    /// `cxr_otlp_spans_dropped_total{reason}`.
    dropped: prometheus::IntCounterVec,
    /// Whether refused requests' spans are exported too (`--otlp-export-refused`).
    refused: bool,
}

impl Exporter {
    /// Starts the exporter task (call within the tokio runtime): `endpoint` is the
    /// collector's OTLP/gRPC address (`http://collector:4317`); the connection is
    /// made when the first spans go, and again after a failure. Spans it cannot
    /// export are counted in `dropped` (`cxr_otlp_spans_dropped_total{reason}`).
    pub fn start(
        endpoint: &str,
        service: &str,
        dropped: prometheus::IntCounterVec,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Span>>(QUEUE_SPANS / 8);
        let failed = dropped.with_label_values(&["export_failed"]);
        let resource = Resource {
            attributes: vec![
                kv("service.name", service.to_string()),
                kv("service.version", env!("CARGO_PKG_VERSION").to_string()),
                kv("telemetry.sdk.language", "rust".into()),
                kv("telemetry.sdk.name", "cxr".into()),
            ],
            ..Resource::default()
        };
        let endpoint = endpoint.to_string();
        let task = tokio::spawn(async move {
            let mut client = TraceServiceClient::new(channel);
            let mut failing = false;
            while let Some(first) = rx.recv().await {
                let mut spans = first;
                while spans.len() < BATCH_SPANS {
                    match rx.try_recv() {
                        Ok(more) => spans.extend(more),
                        Err(_) => break,
                    }
                }
                let n = spans.len() as u64;
                let req = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "cxr".into(),
                                version: env!("CARGO_PKG_VERSION").into(),
                                ..InstrumentationScope::default()
                            }),
                            spans,
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.export(req)).await;
                if !matches!(sent, Ok(Ok(_))) {
                    failed.inc_by(n);
                }
                match sent {
                    Ok(Ok(_)) => {
                        if failing {
                            tracing::info!(endpoint = %endpoint, "OTLP export works again");
                        }
                        failing = false;
                    }
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(endpoint = %endpoint, error = %e, "OTLP export failed; spans are dropped until it works");
                    }
                    Err(_) if !failing => {
                        failing = true;
                        tracing::warn!(endpoint = %endpoint, "OTLP export timed out; spans are dropped until it works");
                    }
                    _ => {}
                }
            }
        });
        Ok((
            Self {
                tx,
                dropped,
                refused: false,
            },
            task,
        ))
    }

    /// Exports the spans of refused requests too (`--otlp-export-refused`).
    #[must_use]
    pub fn exporting_refused(mut self, yes: bool) -> Self {
        self.refused = yes;
        self
    }

    /// This exporter for a request's spans: `None` for a refused request (401,
    /// 403, 404) unless refused requests are exported.
    pub fn unless_refused(&self, refused: bool) -> Option<&Self> {
        (!refused || self.refused).then_some(self)
    }

    /// Queues one request's spans (dropped and counted when the queue is full).
    pub fn send(&self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        if self.tx.try_send(spans).is_err() {
            self.dropped.with_label_values(&["queue_full"]).inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_the_w3c_spec_says() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(ok, Some(b"rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(c.sampled);
        assert_eq!(c.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7"));
        let unsampled = TraceContext::parse(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        )
        .unwrap();
        assert!(!unsampled.sampled);
        // A later version with more fields is read as 00.
        assert!(
            TraceContext::parse(
                b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future",
                None
            )
            .is_some()
        );
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert!(
                TraceContext::parse(bad, None).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_answer_names_the_server_span_in_the_callers_trace() {
        let c = TraceContext::parse(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap();
        let t = RequestTrace::start(c, false);
        let tp = t.traceparent();
        let back = TraceContext::parse(tp.as_bytes(), None).unwrap();
        assert_eq!(back.trace_id, t.context().trace_id);
        assert_ne!(back.parent_span_id, t.context().parent_span_id);
        assert!(back.sampled);
    }
}
