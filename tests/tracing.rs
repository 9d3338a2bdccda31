//! OpenTelemetry tracing against a real OTLP receiver: the collector's TraceService
//! from the protocol's own generated code (tests/otlp/receiver.py, opentelemetry-
//! proto), not a mock of our exporter. One request's spans share the caller's trace
//! id, the server span is the child of the caller's span, every stage span nests
//! under it (`gates` under `decode`) and is named, and the answer and the audit
//! record carry the trace. The server span is named from the route, never the
//! path sent; refused requests are not exported; spans the collector never took are
//! counted in `/metrics`. (The stage test fits an OOD model: `--features train`.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[cfg(feature = "train")]
use cxr::imaging::Preprocessor;
#[cfg(feature = "train")]
use cxr::train::fit_ood::{Embeddings, embed, fit};
use serde_json::Value;

#[cfg(feature = "train")]
/// Gives `alpha` in `dir` an OOD model (fitted on generated images, a threshold
/// nothing reaches), so its answers have an `ood` stage.
fn give_alpha_an_ood_model(dir: &std::path::Path) {
    let card = dir.join("alpha.json");
    let loaded = cxr::registry::load_card(&card).unwrap();
    let pre = Preprocessor::new(loaded.card.input_size, &loaded.card.preprocessing).unwrap();
    let imgs: Vec<_> = (0..40)
        .map(|i| pre.resize(&common::gray_image(64, 64, i)))
        .collect();
    let mut s = common::cpu_model(&loaded.onnx_bytes);
    let (dim, data) = embed(&mut s, &pre, &imgs).unwrap();
    let e = Embeddings {
        dim,
        labels: (0..imgs.len()).map(|i| (i % 2) as u8).collect(),
        files: vec![String::new(); imgs.len()],
        data,
    };
    let mut m = fit(&e, 2, 0.1).unwrap();
    m.threshold = 1e12;
    let bytes = m.to_json();
    std::fs::write(dir.join("alpha.ood.json"), &bytes).unwrap();
    let entry = cxr::ood_score::OodCard {
        file: "alpha.ood.json".into(),
        sha256: cxr::registry::sha256_hex(&bytes),
        method: "test".into(),
        threshold: m.threshold,
        target_acceptance: 1.0,
        threshold_source: "test".into(),
        validation_acceptance: 1.0,
        validation_stressed_acceptance: 1.0,
        test_acceptance: None,
        fit_images: 40,
        components: m.components(),
        ood_set_refused: None,
        ood_set: None,
        refuse_threshold: None,
        refuse_rule: None,
    };
    cxr::registry::set_card_ood(&card, &entry).unwrap();
}

/// The receiver, and the spans it has printed so far.
struct Receiver {
    child: std::process::Child,
    spans: mpsc::Receiver<Value>,
    port: u16,
}

impl Receiver {
    fn start() -> Self {
        let mut child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/otlp/receiver.py"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the project's .venv with opentelemetry-proto (scripts/setup.sh --test)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the receiver starts").unwrap();
        let port = first
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {first}"));
        let (tx, spans) = mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(serde_json::from_str::<Value>(&l).unwrap()).is_err() {
                    break;
                }
            }
        });
        Self { child, spans, port }
    }

    /// The spans of `trace_id`, once its server span has arrived.
    fn trace(&self, trace_id: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = self
                .spans
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no server span of {trace_id}; got {got:?}"));
            if s["trace_id"] == trace_id {
                let server = s["kind"] == "SPAN_KIND_SERVER";
                got.push(s);
                if server {
                    return got;
                }
            }
        }
    }
}

impl Receiver {
    /// Every span received until the server span of `trace_id` (of any trace).
    fn all_until(&self, trace_id: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = self
                .spans
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no server span of {trace_id}; got {got:?}"));
            let last = s["trace_id"] == trace_id && s["kind"] == "SPAN_KIND_SERVER";
            got.push(s);
            if last {
                return got;
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attr(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| a["value"]["string_value"].as_str())
        .map(str::to_string)
}

#[cfg(feature = "train")]
fn nanos(span: &Value, field: &str) -> u128 {
    span[field].as_str().unwrap().parse().unwrap()
}

#[cfg(feature = "train")]
const STAGES: [&str; 9] = [
    "admission",
    "body",
    "decode",
    "gates",
    "queue",
    "inference",
    "ood",
    "audit",
    "answer",
];

#[cfg(feature = "train")]
#[test]
fn the_spans_of_a_request_continue_the_callers_trace_and_name_its_stages() {
    let receiver = Receiver::start();
    let dir = common::models_dir();
    give_alpha_an_ood_model(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let (endpoint, audit_arg) = (
        format!("http://127.0.0.1:{}", receiver.port),
        audit.display().to_string(),
    );
    let mut server = common::Server::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            endpoint.as_str(),
            "--audit-log",
            audit_arg.as_str(),
            "--grpc-port",
            "0",
        ],
    );
    let grpc = server.wait_log_field("grpc_addr");
    server.discard_logs();
    server.wait_ready();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let png = common::png_bytes(&common::gray_image(96, 80, 5));
    std::fs::write(dir.path().join("image.png"), &png).unwrap();
    let (status, head, body) = raw_request(
        &server.addr,
        "/predict?model=alpha",
        &[
            ("Content-Type", "image/png"),
            ("traceparent", traceparent.as_str()),
            ("tracestate", "vendor=opaque"),
        ],
        &png,
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    // The answer continues the trace from the server's span, state passed on.
    let back = header(&head, "traceparent").expect("traceparent in the answer");
    let parts: Vec<&str> = back.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace_id, "01"));
    assert_ne!(parts[2], caller_span);
    assert_eq!(
        header(&head, "tracestate").as_deref(),
        Some("vendor=opaque")
    );

    let spans = receiver.trace(trace_id);
    let root = server_span(&spans);
    assert_eq!(root["name"], "POST /predict");
    assert_eq!(
        root["parent_span_id"], caller_span,
        "child of the caller's span"
    );
    assert_eq!(root["span_id"], parts[2], "the span the answer names");
    assert_eq!(root["trace_state"], "vendor=opaque");
    assert_eq!(root["resource"]["service.name"], "cxr");
    let (t0, t1) = (
        nanos(root, "start_time_unix_nano"),
        nanos(root, "end_time_unix_nano"),
    );
    let request_id = answer["request_id"].as_str().unwrap();
    for stage in STAGES {
        let s = spans
            .iter()
            .find(|s| s["name"] == stage)
            .unwrap_or_else(|| panic!("a `{stage}` span in {spans:#?}"));
        let parent = if stage == "gates" {
            spans.iter().find(|s| s["name"] == "decode").unwrap()["span_id"].clone()
        } else {
            root["span_id"].clone()
        };
        assert_eq!(
            s["parent_span_id"], parent,
            "{stage} nests under its parent"
        );
        assert_eq!(
            attr(s, "cxr.request_id").as_deref(),
            Some(request_id),
            "{stage}"
        );
        let (s0, s1) = (
            nanos(s, "start_time_unix_nano"),
            nanos(s, "end_time_unix_nano"),
        );
        assert!(
            t0 <= s0 && s0 <= s1 && s1 <= t1,
            "{stage} within the request"
        );
    }
    for s in &spans {
        assert_eq!(s["trace_id"], trace_id);
    }
    let inference = spans.iter().find(|s| s["name"] == "inference").unwrap();
    assert_eq!(attr(inference, "cxr.model").as_deref(), Some("alpha"));
    // Who signed the model that answered (the test model is unsigned).
    assert_eq!(
        attr(inference, "cxr.model_signer").as_deref(),
        Some("unsigned")
    );

    // The audit record carries the trace.
    let record = common::audit_records(&audit)
        .pop()
        .expect("an audit record");
    assert_eq!(record["trace_id"], trace_id);

    // Without a traceparent: a trace of its own, rooted at the server span.
    let (status, head, _) = raw_request(
        &server.addr,
        "/predict?model=alpha",
        &[("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(status, 200);
    let own = header(&head, "traceparent").unwrap();
    let own_trace = own.split('-').nth(1).unwrap().to_string();
    assert_ne!(own_trace, trace_id);
    let spans = receiver.trace(&own_trace);
    let root = server_span(&spans);
    assert_eq!(root["parent_span_id"], "");

    // A malformed traceparent is not continued (nor its tracestate).
    let (_, head, _) = raw_request(
        &server.addr,
        "/predict?model=alpha",
        &[
            ("Content-Type", "image/png"),
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=opaque"),
        ],
        &png,
    );
    assert!(
        !header(&head, "traceparent")
            .unwrap()
            .contains("-00000000000000000000000000000000-")
    );
    assert!(header(&head, "tracestate").is_none());

    // A traceparent sent twice is read as not sent (W3C: the trace restarts).
    let twice = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let (_, head, _) = raw_request(
        &server.addr,
        "/predict?model=alpha",
        &[
            ("Content-Type", "image/png"),
            ("traceparent", twice.as_str()),
            ("traceparent", twice.as_str()),
        ],
        &png,
    );
    assert!(
        !header(&head, "traceparent").unwrap().contains(trace_id),
        "a duplicated traceparent was continued: {head}"
    );

    // The Open Inference Protocol over REST: the same stages under its server span.
    let v2_trace = "0af7651916cd43dd8448eb211c80319c";
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
    let body = serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]});
    let v2_parent = format!("00-{v2_trace}-b7ad6b7169203331-01");
    let (status, _, _) = raw_request(
        &server.addr,
        "/v2/models/alpha/infer",
        &[
            ("Content-Type", "application/json"),
            ("traceparent", v2_parent.as_str()),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let spans = receiver.trace(v2_trace);
    let root = server_span(&spans);
    assert_eq!(root["name"], "POST /v2/models/{name}/infer");
    assert_eq!(root["parent_span_id"], "b7ad6b7169203331");
    for stage in STAGES {
        assert!(
            spans.iter().any(|s| s["name"] == stage),
            "V2 REST: no {stage} span"
        );
    }

    // Over gRPC, with NVIDIA's client: the caller's traceparent in the metadata.
    let grpc_trace = "5b8aa5a2d2c872e8321cf37308d69df2";
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg("-c")
        .arg(GRPC_CALL)
        .arg(&grpc)
        .arg(format!("00-{grpc_trace}-051581bf3cb55c13-01"))
        .arg(dir.path().join("image.png"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = receiver.trace(grpc_trace);
    let root = server_span(&spans);
    assert_eq!(root["name"], "inference.GRPCInferenceService/ModelInfer");
    assert_eq!(root["parent_span_id"], "051581bf3cb55c13");
    for stage in [
        "admission",
        "decode",
        "gates",
        "queue",
        "inference",
        "ood",
        "audit",
    ] {
        assert!(
            spans.iter().any(|s| s["name"] == stage),
            "gRPC: no {stage} span"
        );
    }
}

/// One gRPC inference with tritonclient, the trace context in its metadata.
#[cfg(feature = "train")]
const GRPC_CALL: &str = r#"
import sys, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
img = g.InferInput("image", [1], "BYTES")
img.set_data_from_numpy(np.array([open(sys.argv[3], "rb").read()], dtype=np.object_))
c.infer("alpha", [img], headers={"traceparent": sys.argv[2]})
"#;

#[cfg(feature = "train")]
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// One HTTP/1.1 POST: status, head and body.
fn raw_request(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let (status, head, body) =
        common::tcp_http_full(addr, "POST", path, headers, body).expect("an answer");
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// The request's server span among its spans.
fn server_span(spans: &[Value]) -> &Value {
    spans
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_SERVER")
        .expect("a server span")
}

/// A patient's name and MRN as a client might put them in a path: ~3,000
/// characters.
fn patient_path_segment() -> String {
    format!("DOE%5EJANE%20MRN{}", "0123456789".repeat(300))
}

/// Issue #43, row 11: the server span is named from the route's template (`POST
/// /v2/models/{name}/infer`; the method alone when no route matched), never from
/// the path sent, and no attribute carries that path; requests refused with 401,
/// 403 or 404 are not exported unless `--otlp-export-refused`. Seen before: an
/// unauthenticated 404 exported a 3,034-character span name with a patient's name
/// and MRN from its path.
#[test]
fn spans_are_named_by_route_and_refused_requests_are_not_exported() {
    let receiver = Receiver::start();
    let dir = common::models_dir();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[callers]]\nname = \"t\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\"]\n",
            cxr::digest::sha256_hex(b"k-trace")
        ),
    )
    .unwrap();
    let (endpoint, keys_arg) = (
        format!("http://127.0.0.1:{}", receiver.port),
        keys.display().to_string(),
    );
    let mut server = common::Server::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            endpoint.as_str(),
            "--api-keys-file",
            keys_arg.as_str(),
            "--grpc-port",
            "0",
        ],
    );
    let grpc = server.wait_log_field("grpc_addr");
    server.discard_logs();
    server.wait_ready();
    let png = common::png_bytes(&common::gray_image(96, 80, 5));
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
    let body = serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}).to_string();
    let patient = patient_path_segment();
    let tp = |t: &str| format!("00-{t}-00f067aa0ba902b7-01");
    let bearer = "Bearer k-trace";
    let refused = [
        // No key on a route that needs one: 401.
        (
            "11111111111111111111111111111111",
            format!("/v2/models/{patient}/infer"),
            None,
            401,
        ),
        // No route: 404, with and without a key.
        (
            "22222222222222222222222222222222",
            format!("/patients/{patient}/infer"),
            None,
            404,
        ),
        (
            "33333333333333333333333333333333",
            format!("/patients/{patient}/infer"),
            Some(bearer),
            404,
        ),
        // A key, and a model nobody serves: 404.
        (
            "44444444444444444444444444444444",
            format!("/v2/models/{patient}/infer"),
            Some(bearer),
            404,
        ),
    ];
    for (trace, path, key, want) in &refused {
        let parent = tp(trace);
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("traceparent", parent.as_str()),
        ];
        if let Some(k) = key {
            headers.push(("Authorization", k));
        }
        let (status, _, _) = raw_request(&server.addr, path, &headers, body.as_bytes());
        assert_eq!(status, *want, "{}", &path[..20]);
    }
    // Over gRPC, a model nobody serves: NOT_FOUND, not exported either.
    let grpc_trace = "77777777777777777777777777777777";
    std::fs::write(dir.path().join("image.png"), &png).unwrap();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg("-c")
        .arg(GRPC_UNKNOWN_MODEL)
        .arg(&grpc)
        .arg(tp(grpc_trace))
        .arg(dir.path().join("image.png"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("StatusCode.NOT_FOUND"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok_trace = "55555555555555555555555555555555";
    let parent = tp(ok_trace);
    let (status, _, _) = raw_request(
        &server.addr,
        "/v2/models/alpha/infer",
        &[
            ("Content-Type", "application/json"),
            ("traceparent", parent.as_str()),
            ("Authorization", bearer),
        ],
        body.as_bytes(),
    );
    assert_eq!(status, 200);
    // Spans leave in order: all those queued before the answered request's.
    let spans = receiver.all_until(ok_trace);
    for trace in refused.iter().map(|r| r.0).chain([grpc_trace]) {
        assert!(
            !spans.iter().any(|s| s["trace_id"] == trace),
            "a refused request's spans were exported: {trace}"
        );
    }
    let root = spans
        .iter()
        .find(|s| s["trace_id"] == ok_trace && s["kind"] == "SPAN_KIND_SERVER")
        .unwrap();
    assert_eq!(root["name"], "POST /v2/models/{name}/infer");
    assert_eq!(
        attr(root, "http.route").as_deref(),
        Some("/v2/models/{name}/infer")
    );
    assert_eq!(
        attr(root, "http.response.status_code").as_deref(),
        Some("200")
    );
    for s in &spans {
        let text = s.to_string();
        assert!(
            !text.contains("/v2/models/alpha"),
            "the path sent in {text}"
        );
    }
    drop(server);

    // Asked for, a refused request is exported: named by its method alone when no
    // route matched, and the path sent is nowhere in it.
    let mut server = common::Server::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            endpoint.as_str(),
            "--otlp-export-refused",
        ],
    );
    server.discard_logs();
    server.wait_ready();
    let trace = "66666666666666666666666666666666";
    let parent = tp(trace);
    let (status, _, _) = raw_request(
        &server.addr,
        &format!("/patients/{patient}/infer"),
        &[("traceparent", parent.as_str())],
        b"",
    );
    assert_eq!(status, 404);
    let spans = receiver.trace(trace);
    let root = server_span(&spans);
    assert_eq!(root["name"], "POST");
    assert_eq!(
        attr(root, "http.response.status_code").as_deref(),
        Some("404")
    );
    let text = serde_json::to_string(&spans).unwrap();
    assert!(!text.contains("MRN"), "the path sent in {text}");
    assert!(!text.contains("patients"), "the path sent in {text}");
}

/// Issue #43 (from reading): the exporter dropped spans when the collector was
/// down or slow and counted them where nobody could read them. They are in
/// `/metrics` now: `cxr_otlp_spans_dropped_total{reason="export_failed"}`, for a
/// collector that refuses connections and for one that accepts and never answers.
#[test]
fn spans_the_collector_never_took_are_counted_in_metrics() {
    // Nothing listens on `down`; `slow` accepts and never answers.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_port = down.local_addr().unwrap().port();
    drop(down);
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in slow.incoming() {
            held.push(c);
        }
    });
    let dir = common::models_dir();
    let png = common::png_bytes(&common::gray_image(96, 80, 5));
    for port in [down_port, slow_port] {
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut server = common::Server::start(dir.path(), &["--otlp-endpoint", endpoint.as_str()]);
        server.discard_logs();
        server.wait_ready();
        for _ in 0..3 {
            let (status, _, _) = raw_request(
                &server.addr,
                "/predict?model=alpha",
                &[("Content-Type", "image/png")],
                &png,
            );
            assert_eq!(status, 200);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = common::tcp_http(&server.addr, "GET", "/metrics", None, b"").1;
            let dropped: u64 = metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix("cxr_otlp_spans_dropped_total{reason=\"export_failed\"} ")
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if dropped > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no dropped spans counted for the collector on port {port}: {metrics}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One gRPC inference of a model nobody serves, with a key and the trace context
/// in its metadata: prints the status code.
const GRPC_UNKNOWN_MODEL: &str = r#"
import sys, numpy as np, tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = g.InferenceServerClient(sys.argv[1])
img = g.InferInput("image", [1], "BYTES")
img.set_data_from_numpy(np.array([open(sys.argv[3], "rb").read()], dtype=np.object_))
try:
    c.infer("nobody", [img], headers={"traceparent": sys.argv[2], "authorization": "Bearer k-trace"})
except InferenceServerException as e:
    print(e.status())
"#;
