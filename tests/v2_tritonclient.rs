//! Interoperability: NVIDIA's `tritonclient[http]` (PyPI; installed into .venv by
//! scripts/test.sh) against the real server on port 0: metadata, readiness, and
//! inference with each input kind, with and without binary data, whose probabilities
//! equal `/predict`'s for the same image (tests/interop/tritonclient_check.py).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
            .args(["--log-format", "json", "--intra-threads", "1"])
            .arg("--models-dir")
            .arg(dir.path())
            .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.ok()?).ok()?;
            v["fields"]["addr"].as_str().map(str::to_string)
        })
        .expect("the server logs its address");
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::tcp_http(&addr, "GET", "/ready", None, b"").0 != 200 {
        assert!(Instant::now() < deadline, "not ready in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The image, and its preprocessed tensor as the model's own transform makes it.
    let work = tempfile::tempdir().unwrap();
    let png = common::png_bytes(&common::gray_image(128, 100, 6));
    let card = cxr::registry::load_card(&dir.path().join("beta.json"))
        .unwrap()
        .card;
    let pre = cxr::imaging::Preprocessor::new(card.input_size, &card.preprocessing).unwrap();
    let tensor = pre
        .preprocess_checked(&png, 1 << 24, &cxr::imaging::Geometry::default())
        .unwrap();
    let png_path = work.path().join("x.png");
    let tensor_path = work.path().join("x.f32");
    std::fs::write(&png_path, &png).unwrap();
    std::fs::write(
        &tensor_path,
        tensor
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();

    let out = Command::new(&python)
        .arg(root.join("tests/interop/tritonclient_check.py"))
        .arg(&addr)
        .arg("beta")
        .arg(&png_path)
        .arg(&tensor_path)
        .arg(card.input_size.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("8 inferences agree"), "{text}");
}
