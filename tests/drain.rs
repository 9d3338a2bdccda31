//! The real binary on a real socket, with requests held in flight by a long batch
//! wait: SIGTERM answers every request in flight before the process exits 0; a
//! request past `--request-timeout-s` is a 503 `timeout`; with `--max-inflight 1` a
//! second concurrent request is refused with 503.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let dir = common::models_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
        .args(["--log-format", "json", "--intra-threads", "1"])
        .args(extra)
        .arg("--models-dir")
        .arg(dir.path())
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.ok()?).ok()?;
            v["fields"]["addr"].as_str().map(str::to_string)
        })
        .expect("the server logs its address");
    std::thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::tcp_http(&addr, "GET", "/ready", None, b"").0 != 200 {
        assert!(Instant::now() < deadline, "not ready in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server {
        child,
        addr,
        _dir: dir,
    }
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
    let mut s = start(&["--max-batch", "64", "--batch-wait-us", "1000000"]);
    let inflight: Vec<_> = (0..4).map(|_| post(&s.addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
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
    let s = start(&[
        "--max-batch",
        "64",
        "--batch-wait-us",
        "1000000",
        "--request-timeout-s",
        "1",
        "--max-inflight",
        "1",
    ]);
    // The first request waits a second for its batch: past the 1 s timeout.
    let first = post(&s.addr);
    std::thread::sleep(Duration::from_millis(300));
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
