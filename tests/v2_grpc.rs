//! Interoperability over gRPC: NVIDIA's `tritonclient[grpc]` (PyPI, installed into
//! .venv by scripts/setup.sh --test) against the real server's `--grpc-port`, with
//! API keys: metadata, readiness, inference with each input kind (the same
//! probabilities as `/predict` for the same image), the error codes (unknown model:
//! NOT_FOUND, wrong shape: INVALID_ARGUMENT, no or a wrong key: UNAUTHENTICATED),
//! and discovery by server reflection with grpcio-reflection's client
//! (tests/interop/tritonclient_grpc_check.py).

mod common;

use std::process::Command;

#[test]
fn tritonclient_grpc_talks_to_the_real_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import tritonclient.grpc, grpc_reflection"])
        .status()
        .expect("the project's .venv (scripts/setup.sh)");
    assert!(
        probe.success(),
        "tritonclient[grpc] or grpcio-reflection is missing from .venv: run scripts/setup.sh --test"
    );
    let dir = common::models_dir();
    let key = "cxr_grpc_test_key";
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[callers]]\nname = \"grpc-test\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\", \"models\"]\n",
            cxr::digest::sha256_hex(key.as_bytes())
        ),
    )
    .unwrap();
    let keys_arg = keys.display().to_string();
    let mut server = common::Server::start(
        dir.path(),
        &["--grpc-port", "0", "--api-keys-file", keys_arg.as_str()],
    );
    let grpc = server.wait_log_field("grpc_addr");
    server.discard_logs();
    server.wait_ready();

    let work = tempfile::tempdir().unwrap();
    let (png_path, tensor_path, size) = common::interop_inputs(dir.path(), "beta", work.path());
    let out = Command::new(&python)
        .arg(root.join("tests/interop/tritonclient_grpc_check.py"))
        .arg(&server.addr)
        .arg(&grpc)
        .arg(key)
        .arg("beta")
        .arg(&png_path)
        .arg(&tensor_path)
        .arg(size.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("3 gRPC inferences agree"), "{text}");
    let metrics = common::tcp_http(&server.addr, "GET", "/metrics", None, b"").1;
    assert!(
        metrics.contains("cxr_grpc_requests_total{code=\"Ok\",method=\"ModelInfer\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("code=\"Unauthenticated\",method=\"ModelInfer\"} 2"),
        "{metrics}"
    );
}

/// The gRPC listener closes a connection whose peer sends nothing (within
/// `--header-read-timeout-s`) or goes quiet (for `--idle-timeout-s`), as the HTTP
/// listener does.
#[test]
fn a_silent_or_idle_grpc_connection_is_closed() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = common::models_dir();
    let mut server = common::Server::start(
        dir.path(),
        &[
            "--grpc-port",
            "0",
            "--header-read-timeout-s",
            "1",
            "--idle-timeout-s",
            "2",
        ],
    );
    let grpc = server.wait_log_field("grpc_addr");
    server.discard_logs();
    // Read until the server closes; how long it took.
    let closed_after = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return t.elapsed(),
                Ok(_) => {}
            }
        }
    };
    // Nothing sent at all.
    let mut s = std::net::TcpStream::connect(&grpc).unwrap();
    let took = closed_after(&mut s);
    assert!(took < Duration::from_secs(4), "open for {took:?}");
    // The HTTP/2 preface and SETTINGS, then silence.
    let mut s = std::net::TcpStream::connect(&grpc).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let took = closed_after(&mut s);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed after {took:?}"
    );
}
