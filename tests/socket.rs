//! The real binary on a real socket (port 0): start, readiness, a prediction over
//! TCP, graceful shutdown on SIGTERM; and a clear start-up failure on a bad card.

mod common;

use std::io::{BufRead, BufReader};

use common::tcp_http as http;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serves_on_a_real_socket_and_stops_on_sigterm() {
    let dir = common::models_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-format",
            "json",
            "--intra-threads",
            "1",
        ])
        .arg("--models-dir")
        .arg(dir.path())
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start cxr-serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("JSON log line: {line}"));
        if let Some(a) = v["fields"]["addr"].as_str() {
            addr = Some(a.to_string());
            break;
        }
    }
    let addr = addr.expect("the server logs its address");
    assert_eq!(http(&addr, "GET", "/health", None, b"").0, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&addr, "GET", "/ready", None, b"").0 != 200 {
        assert!(Instant::now() < deadline, "not ready in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let png = common::png_bytes(&common::gray_image(128, 100, 4));
    let (status, body) = http(
        &addr,
        "POST",
        "/predict?prefer=specificity",
        Some("image/png"),
        &png,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"]["name"], "beta");
    let (status, body) = http(&addr, "POST", "/predict", Some("image/png"), b"junk");
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("junk"));

    // The container HEALTHCHECK: the binary probes /health itself.
    let port = addr.rsplit(':').next().unwrap();
    let probe = |port: &str| {
        Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
            .args(["--health-check", "--port", port])
            .status()
            .unwrap()
    };
    assert!(probe(port).success(), "health check on the live port");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}; logs {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    // Image bytes never reach the logs.
    assert!(!rest.iter().any(|l| l.contains("IHDR")));
    assert_eq!(
        probe(port).code(),
        Some(1),
        "health check on a closed port fails"
    );
}

#[test]
fn a_bad_card_stops_start_up_with_a_clear_message() {
    let dir = common::models_dir();
    std::fs::write(dir.path().join("beta.onnx"), b"tampered").unwrap();
    let err = common::serve_fails(dir.path(), &["--host", "127.0.0.1", "--device", "cpu"]);
    assert!(
        err.contains("beta.onnx") && err.contains("SHA-256"),
        "{err}"
    );

    // The flag wins over ORT_DYLIB_PATH.
    let models = common::models_dir();
    let err = common::serve_fails(
        models.path(),
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
    );
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("scripts/setup.sh"),
        "{err}"
    );
}
