//! The real binary on a real socket, with requests held in flight by a long batch
//! wait: SIGTERM answers every request in flight before the process exits 0; a
//! request past `--request-timeout-s` is a 503 `timeout`; with `--max-inflight 1` a
//! second concurrent request is refused with 503.

mod common;

use std::time::{Duration, Instant};

/// A started, ready server over the test models, its log read on a thread.
fn start(extra: &[&str]) -> (common::Server, tempfile::TempDir) {
    let dir = common::models_dir();
    let mut s = common::Server::start(dir.path(), extra);
    s.discard_logs();
    s.wait_ready();
    (s, dir)
}

fn png() -> Vec<u8> {
    common::png_bytes(&common::gray_image(128, 100, 5))
}

fn post(addr: &str) -> std::thread::JoinHandle<(u16, String)> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        common::tcp_http(&addr, "POST", "/predict", Some("image/png"), &png())
    })
}

#[test]
fn sigterm_answers_every_request_in_flight_then_exits_0() {
    // Each batch waits up to a second for company: the requests stay in flight.
    let (mut s, _models) = start(&["--max-batch", "64", "--batch-wait-us", "1000000"]);
    let inflight: Vec<_> = (0..4).map(|_| post(&s.addr)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    s.sigterm();
    for h in inflight {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "a request in flight at SIGTERM: {body}");
        assert!(body.contains("\"label\""), "{body}");
    }
    let exit = s.child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}");
    assert!(sent.elapsed() < Duration::from_secs(30));
    // Gone: new connections are refused.
    assert!(std::net::TcpStream::connect(&s.addr).is_err());
}

#[test]
fn request_timeout_and_max_inflight_answer_503() {
    let (s, _models) = start(&[
        "--max-batch",
        "64",
        "--batch-wait-us",
        "1000000",
        "--request-timeout-s",
        "0.6",
        "--max-inflight",
        "1",
    ]);
    // The first request waits a second for its batch: well past the 0.6 s timeout
    // (a batch wait equal to the timeout raced it, and lost on a loaded CI machine).
    let first = post(&s.addr);
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile it holds the only in-flight slot.
    let (status, body) = common::tcp_http(&s.addr, "POST", "/predict", Some("image/png"), &png());
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error_type"], "overloaded", "{v}");
    let (status, body) = first.join().unwrap();
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error_type"], "timeout", "{v}");
    // The refusals are counted, whole lines.
    let (_, metrics) = common::tcp_http(&s.addr, "GET", "/metrics", None, b"");
    for line in [
        r#"cxr_requests_total{path="/predict",status="503"} 2"#,
        r#"cxr_overloaded_total{model="all"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
}

/// At SIGTERM every listener stops taking connections at once: the gRPC port is
/// closed while an HTTP request in flight (its body still arriving) is being
/// drained (a gateway fails over from both), and that request is answered all the
/// same once its body is in.
#[test]
fn sigterm_closes_the_grpc_port_while_http_drains() {
    use std::io::{Read, Write};
    let dir = common::models_dir();
    let mut s = common::Server::start(dir.path(), &["--grpc-port", "0"]);
    let grpc = s.wait_log_field("grpc_addr");
    s.discard_logs();
    s.wait_ready();
    assert!(
        std::net::TcpStream::connect(&grpc).is_ok(),
        "the gRPC port is open"
    );
    // A request in flight: its head and half its body, the rest held back.
    let body = png();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut http = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(
        http,
        "POST /predict HTTP/1.1\r\nHost: cxr\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    http.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    s.sigterm();
    // Closed within a moment, while the HTTP request is still in flight.
    loop {
        if std::net::TcpStream::connect(&grpc).is_err() {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "the gRPC port still takes connections {:?} after SIGTERM",
            sent.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    http.write_all(rest).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = http.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"label\""), "{answer}");
    assert!(s.child.wait().unwrap().success());
}
