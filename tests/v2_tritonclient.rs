//! Interoperability: NVIDIA's `tritonclient[http]` (PyPI; installed into .venv by
//! scripts/test.sh) against the real server on port 0: metadata, readiness, and
//! inference with each input kind, with and without binary data, whose probabilities
//! equal `/predict`'s for the same image (tests/interop/tritonclient_check.py).

mod common;

use std::process::Command;

#[test]
fn tritonclient_talks_to_the_real_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import tritonclient.http"])
        .status()
        .expect("the project's .venv (scripts/setup.sh)");
    assert!(
        probe.success(),
        "tritonclient[http] is missing from .venv: run scripts/test.sh (it installs it)"
    );

    let dir = common::models_dir();
    let mut server = common::Server::start::<&str>(dir.path(), &[]);
    server.discard_logs();
    server.wait_ready();
    let addr = server.addr.clone();

    let work = tempfile::tempdir().unwrap();
    let (png_path, tensor_path, size) = common::interop_inputs(dir.path(), "beta", work.path());
    let text = common::succeeds(
        Command::new(&python)
            .arg(root.join("tests/interop/tritonclient_check.py"))
            .arg(&addr)
            .arg("beta")
            .arg(&png_path)
            .arg(&tensor_path)
            .arg(size.to_string()),
    );
    assert!(text.contains("8 inferences agree"), "{text}");
}
