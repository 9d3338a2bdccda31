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
