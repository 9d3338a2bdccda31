//! The OpenVINO backend against ONNX Runtime on a writer-made tiny model: every
//! output (logits, probabilities, class activation maps, embedding) of a batch of
//! distinct images agrees.

mod common;

use cxr::inference::backend::Backend;
use cxr::inference::openvino::OpenVinoModel;

#[test]
fn openvino_agrees_with_onnx_runtime_on_every_output_of_a_batch() {
    let dir = common::models_dir();
    let loaded = cxr::registry::load_card(&dir.path().join("alpha.json")).unwrap();
    let card = &loaded.card;
    let pre = cxr::imaging::Preprocessor::new(card.input_size, &card.preprocessing).unwrap();
    let s = card.input_size as usize;
    let n = 3;
    let mut batch = Vec::new();
    for seed in 0..n as u32 {
        let png = common::png_bytes(&common::gray_image(64 + seed * 8, 64, seed + 1));
        batch.extend(
            pre.preprocess_checked(
                &png,
                1 << 24,
                &common::test_geometry(),
                &mut cxr::imaging::GateTime::default(),
            )
            .unwrap(),
        );
    }
    let mut ort = common::cpu_session(&loaded.onnx_bytes);
    let want = cxr::inference::runtime::run_outputs(&mut ort, batch.clone(), n, s).unwrap();
    // One thread: one stream, the batch on the latency model. Two threads: two
    // streams, the batch of three split 2 + 1 across them and joined in order.
    for threads in [1, 2] {
        let mut ov = OpenVinoModel::load(&loaded.onnx_bytes, threads, Some("f32"), None)
            .expect("OpenVINO (scripts/setup.sh installs its library at .openvino/lib)");
        if threads == 2 && std::thread::available_parallelism().map_or(1, |p| p.get()) >= 2 {
            assert!(
                ov.streams() >= 2,
                "two threads on two cores give two streams"
            );
        }
        let got = ov.run(batch.clone(), n, s).unwrap();
        agree(&got, &want, n);
    }
}

fn agree(got: &[cxr::inference::ModelOutput], want: &[cxr::inference::ModelOutput], n: usize) {
    assert_eq!(got.len(), n);
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&g.logits, &w.logits, &format!("logits {i}"));
        close(
            &g.probabilities,
            &w.probabilities,
            &format!("probabilities {i}"),
        );
        let (gc, wc) = (g.cam.as_ref().unwrap(), w.cam.as_ref().unwrap());
        assert_eq!((gc.height, gc.width), (wc.height, wc.width));
        close(&gc.data, &wc.data, &format!("cam {i}"));
        close(
            g.embedding.as_ref().unwrap(),
            w.embedding.as_ref().unwrap(),
            &format!("embedding {i}"),
        );
    }
    // Distinct images give distinct answers (the batch is not one row repeated).
    assert_ne!(got[0].logits, got[1].logits);
}

/// `/models` entry of `name` from a running server.
fn live(server: &common::Server, name: &str) -> serde_json::Value {
    let (status, body) =
        common::tcp_http(&server.addr, "GET", &format!("/models/{name}"), None, b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["live"].clone()
}

fn answer(server: &common::Server, png: &[u8]) -> serde_json::Value {
    let (status, body) = common::tcp_http(
        &server.addr,
        "POST",
        "/predict?model=alpha",
        Some("image/png"),
        png,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `--backend openvino` serves with OpenVINO (said in `/models` and in every answer)
/// and answers as ONNX Runtime does; a library that does not load falls back to ONNX
/// Runtime with the reason in the log and `/models`; `auto` reports its measurement.
#[test]
fn the_backend_is_chosen_reported_and_falls_back() {
    let dir = common::models_dir();
    let png = common::png_bytes(&common::gray_image(96, 80, 5));
    let mut ort = common::Server::start(dir.path(), &["--backend", "ort"]);
    ort.discard_logs();
    let want = answer(&ort, &png);
    assert_eq!(want["execution_provider"], "CPUExecutionProvider");
    drop(ort);

    let mut ov = common::Server::start(dir.path(), &["--backend", "openvino"]);
    ov.discard_logs();
    let got = answer(&ov, &png);
    assert_eq!(got["execution_provider"], "OpenVINO:CPU", "{got}");
    let p = |v: &serde_json::Value| v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    assert!((p(&got) - p(&want)).abs() < 1e-4, "{got} {want}");
    assert_eq!(got["label"], want["label"]);
    let l = live(&ov, "alpha");
    assert_eq!(l["execution_provider"], "OpenVINO:CPU", "{l}");
    assert!(
        l["backend_choice"].as_str().unwrap().contains("agrees"),
        "{l}"
    );
    drop(ov);

    // A library that cannot be loaded: ONNX Runtime serves, and says why.
    let mut broken = std::process::Command::new(env!("CARGO_BIN_EXE_cxr-serve"));
    broken
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-format",
            "json",
        ])
        .args(["--backend", "openvino", "--models-dir"])
        .arg(dir.path())
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .env("OPENVINO_LIB", "/nonexistent/libopenvino_c.so")
        .stdout(std::process::Stdio::piped());
    let mut child = broken.spawn().unwrap();
    let logs = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut reason = None;
    let mut addr = None;
    for line in logs.map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["fields"]["message"] == "OpenVINO not used: ONNX Runtime serves this model" {
            reason = v["fields"]["reason"].as_str().map(str::to_string);
        }
        if let Some(a) = v["fields"]["addr"].as_str() {
            addr = Some(a.to_string());
            break;
        }
    }
    let reason = reason.expect("the fallback is logged");
    assert!(reason.contains("/nonexistent"), "{reason}");
    let (status, body) = common::tcp_http(&addr.unwrap(), "GET", "/models/alpha", None, b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["live"]["execution_provider"], "CPUExecutionProvider");
    assert!(
        v["live"]["backend_choice"]
            .as_str()
            .unwrap()
            .starts_with("OpenVINO not used")
    );
    let _ = child.kill();
    let _ = child.wait();

    // auto: both measured; the choice and the numbers in /models.
    let mut auto = common::Server::start(dir.path(), &["--backend", "auto"]);
    auto.discard_logs();
    let l = live(&auto, "alpha");
    assert!(
        l["backend_choice"]
            .as_str()
            .unwrap()
            .starts_with("measured"),
        "{l}"
    );
    let got = answer(&auto, &png);
    assert!((p(&got) - p(&want)).abs() < 1e-4, "{got} {want}");
    drop(auto);

    // Per model: beta on OpenVINO, alpha on the global ONNX Runtime.
    let mut mixed = common::Server::start(
        dir.path(),
        &["--backend", "ort", "--model-backend", "beta=openvino"],
    );
    mixed.discard_logs();
    assert_eq!(
        live(&mixed, "alpha")["execution_provider"],
        "CPUExecutionProvider"
    );
    assert_eq!(live(&mixed, "beta")["execution_provider"], "OpenVINO:CPU");
}

/// Each cache entry: (name, size, modified).
fn cache_entries(cache: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(Result::unwrap)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".blob"))
        .map(|e| {
            let m = e.metadata().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, m.len(), m.modified().unwrap())
        })
        .collect();
    v.sort();
    v
}

/// On the libraries the CPU image holds, a second start on OpenVINO's cache loads
/// the compiled models from it (`live.openvino_from_cache`) and leaves every entry as
/// the first start wrote it. The image once lacked OpenVINO's IR front end, with
/// which OpenVINO reads an entry back: every entry failed to load and was compiled
/// and written again at every start (a warm start of the image 6.6 s against 2.6 s
/// for the binary; issue 45).
#[test]
fn on_the_image_libraries_a_second_start_loads_the_compiled_models_from_the_cache() {
    let models = common::models_dir();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lib = common::image_openvino_libs(&work.path().join("lib"));
    let cache = work.path().join("ov-cache");
    let start = || {
        let args: [&std::ffi::OsStr; 4] = [
            "--backend".as_ref(),
            "openvino".as_ref(),
            "--openvino-cache-dir".as_ref(),
            cache.as_os_str(),
        ];
        let mut s =
            common::Server::start_env(models.path(), &args, "addr", &[("OPENVINO_LIB", &lib)]);
        s.discard_logs();
        s
    };
    let cold = start();
    for m in ["alpha", "beta"] {
        let l = live(&cold, m);
        assert_eq!(l["execution_provider"], "OpenVINO:CPU", "{l}");
        assert_eq!(
            l["openvino_from_cache"], false,
            "compiled at the first start: {l}"
        );
    }
    drop(cold);
    let written = cache_entries(&cache);
    assert!(!written.is_empty(), "the first start wrote the cache");
    let warm = start();
    for m in ["alpha", "beta"] {
        let l = live(&warm, m);
        assert_eq!(l["execution_provider"], "OpenVINO:CPU", "{l}");
        assert_eq!(l["openvino_from_cache"], true, "loaded from the cache: {l}");
    }
    drop(warm);
    assert_eq!(
        cache_entries(&cache),
        written,
        "no entry compiled and written again"
    );
}
