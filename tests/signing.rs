//! Only signed models answer, on the real binaries: a version signed (by `cxr-sign`,
//! key made by `openssl`) with a trusted key loads; each tampering after signing is
//! refused at start with its own reason; under load, a refused version swapped in
//! (load API, shadow, SIGHUP) leaves what serves serving with no failed request; and
//! OMS bundles interoperate both ways with PyPI `model_signing` (1.1.x, from the
//! project's .venv: scripts/setup.sh --test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::ops::{READER, admin, get, hup, keys};
use common::sign::{keygen, model_signing, run};
use common::{Server, gray_image, png_bytes, write_tiny_model, write_tiny_version};
use serde_json::{Value, json};

/// A trusted signers file naming `public` as `name`, with `expires` if given.
fn signers(dir: &Path, name: &str, public: &Path, expires: Option<&str>) -> String {
    let path = dir.join(format!("signers-{name}.toml"));
    let mut text = format!(
        "[[signer]]\nname = \"{name}\"\npublic_key_file = \"{}\"\n",
        public.display()
    );
    if let Some(e) = expires {
        text.push_str(&format!("expires = \"{e}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `cxr-sign --key KEY --models-dir MODELS --model M`.
fn sign(models: &Path, key: &Path, model: &str) {
    let (ok, said) = run(Command::new(env!("CARGO_BIN_EXE_cxr-sign"))
        .arg("--key")
        .arg(key)
        .arg("--models-dir")
        .arg(models)
        .args(["--model", model]));
    assert!(ok, "{said}");
}

/// `model_signing verify key FOLDER --signature FOLDER/alpha.sig --public_key KEY`
/// with `extra` flags.
fn model_signing_verifies(folder: &Path, public: &Path, extra: &[&str]) -> (bool, String) {
    run(model_signing()
        .args(["verify", "key"])
        .arg(folder)
        .arg("--signature")
        .arg(folder.join("alpha.sig"))
        .arg("--public_key")
        .arg(public)
        .args(extra))
}

fn predict(addr: &str, query: &str, seed: u32) -> (u16, Value) {
    let img = png_bytes(&gray_image(96, 80, seed));
    common::ops::call(
        addr,
        "POST",
        &format!("/predict{query}"),
        Some(READER),
        "image/png",
        &img,
    )
}

/// Runs cxr-serve over `models` with `args`, expecting it to refuse to start within
/// 60 s (a server that starts is killed and fails the test rather than hang it): its
/// stderr.
fn serve_fails(models: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args(["--port", "0", "--device", "cpu"])
        .args(args)
        .arg("--models-dir")
        .arg(models)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cxr-serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("cxr-serve started over {}", models.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A log field's value, logged before or after the address.
fn log_field(server: &mut Server, field: &str) -> String {
    server
        .startup_field(field)
        .unwrap_or_else(|| server.wait_log_field(field))
}

fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0xff;
    std::fs::write(p, b).unwrap();
}

/// The card's ONNX file and SHA-256 rewritten together, as whoever can write the
/// volume would.
fn swap_onnx_and_card(dir: &Path, name: &str) {
    let onnx = dir.join(format!("{name}.onnx"));
    let card = dir.join(format!("{name}.json"));
    let old = cxr::digest::sha256_hex(&std::fs::read(&onnx).unwrap());
    flip_byte(&onnx);
    let new = cxr::digest::sha256_hex(&std::fs::read(&onnx).unwrap());
    let text = std::fs::read_to_string(&card).unwrap();
    assert!(text.contains(&old));
    std::fs::write(&card, text.replace(&old, &new)).unwrap();
}

/// The tamperings, each after signing a flat `alpha`, and the reason the refusal
/// must give.
type Tamper = fn(&Path, &Path);

fn tamperings() -> Vec<(&'static str, Tamper, &'static str)> {
    vec![
        (
            "one byte of the ONNX file (its card's hash rewritten to match)",
            |m, _| swap_onnx_and_card(m, "alpha"),
            "file digest mismatch: `alpha.onnx`",
        ),
        (
            "one byte of the ONNX file alone",
            |m, _| flip_byte(&m.join("alpha.onnx")),
            "SHA-256",
        ),
        (
            "the card edited after signing",
            |m, _| {
                let card = m.join("alpha.json");
                let t = std::fs::read_to_string(&card).unwrap();
                std::fs::write(
                    &card,
                    t.replacen("\"threshold\": 0.5", "\"threshold\": 0.05", 1),
                )
                .unwrap();
            },
            "file digest mismatch: `alpha.json`",
        ),
        (
            "a file added",
            |m, _| std::fs::write(m.join("alpha.extra.json"), b"{}").unwrap(),
            "extra file: `alpha.extra.json`",
        ),
        (
            "a signed file removed",
            |m, _| std::fs::remove_file(m.join("alpha.notes.txt")).unwrap(),
            "file missing: `alpha.notes.txt`",
        ),
        (
            "signed by an untrusted key",
            |m, keys| sign(m, &keys.join("mallory.pem"), "alpha"),
            "signed by an untrusted key",
        ),
        (
            "the envelope's statement altered (signature no longer covers it)",
            |m, _| {
                let p = m.join("alpha.sig");
                let mut b: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                let payload = b["dsseEnvelope"]["payload"].as_str().unwrap();
                use base64::Engine;
                let e = base64::engine::general_purpose::STANDARD;
                let text = String::from_utf8(e.decode(payload).unwrap()).unwrap();
                let text = text.replacen("alpha.notes.txt", "alpha.notes.txz", 1);
                b["dsseEnvelope"]["payload"] = e.encode(text).into();
                std::fs::write(&p, b.to_string()).unwrap();
            },
            "bad signature",
        ),
        (
            "a malformed bundle",
            |m, _| {
                let p = m.join("alpha.sig");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            "malformed signature bundle",
        ),
    ]
}

/// A tampering of a version folder (the folder, the models folder, an untrusted key).
type SwapTamper = fn(&Path, &Path, &Path);

/// A flat `alpha` with a notes file, signed by `release`: the models folder.
fn signed_alpha(root: &Path, key: &Path) -> PathBuf {
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    write_tiny_model(&models, "alpha", 3, 0.9, 0.8);
    std::fs::write(models.join("alpha.notes.txt"), b"release notes").unwrap();
    sign(&models, key, "alpha");
    models
}

#[test]
fn a_signed_version_loads_and_each_tampering_is_refused_at_start_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "release", "prime256v1");
    keygen(dir.path(), "mallory", "prime256v1");
    let trusted = signers(dir.path(), "release", &public, None);
    let required = [
        "--require-signed-models",
        "--trusted-signers",
        trusted.as_str(),
    ];

    // Signed by the trusted key: it loads and answers, saying who signed it (the key
    // id as model-signing's hint: SHA-256 of the PEM openssl wrote).
    let key_id = cxr::digest::sha256_hex(&std::fs::read(&public).unwrap());
    let models = signed_alpha(&dir.path().join("ok"), &key);
    let audit = dir.path().join("audit.jsonl");
    let audit_flag = audit.display().to_string();
    let mut server = Server::start(
        &models,
        &[&required[..], &["--audit-log", audit_flag.as_str()]].concat(),
    );
    server.discard_logs();
    server.wait_ready();
    let (s, v) = predict(&server.addr, "", 1);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"]["signed_by"]["signer"], "release", "{v}");
    assert_eq!(v["model"]["signed_by"]["key_id"], key_id.as_str(), "{v}");
    assert!(v.get("warnings").is_none(), "{v}");
    let live = &get(&server.addr, "/models/alpha")["live"];
    assert_eq!(live["signed_by"]["key_id"], key_id.as_str(), "{live}");
    let record = common::audit_records(&audit)
        .pop()
        .expect("an audit record");
    assert_eq!(
        record["model_signer"],
        format!("release (key {key_id})"),
        "{record}"
    );
    drop(server);

    for (i, (what, tamper, reason)) in tamperings().into_iter().enumerate() {
        let models = signed_alpha(&dir.path().join(format!("case{i}")), &key);
        tamper(&models, dir.path());
        let err = serve_fails(&models, &required);
        assert!(
            err.contains(reason),
            "{what}: expected `{reason}` in:\n{err}"
        );
    }

    // A trusted signer past its last day.
    let models = signed_alpha(&dir.path().join("expired"), &key);
    let expired = signers(dir.path(), "old", &public, Some("2020-01-31"));
    let err = serve_fails(&models, &["--trusted-signers", expired.as_str()]);
    assert!(
        err.contains("expired: signer `old` is trusted until 2020-01-31"),
        "{err}"
    );

    // Unsigned: refused when signatures are required, else served with a warning.
    let unsigned = dir.path().join("unsigned");
    std::fs::create_dir_all(&unsigned).unwrap();
    write_tiny_model(&unsigned, "alpha", 3, 0.9, 0.8);
    let err = serve_fails(&unsigned, &required);
    assert!(err.contains("no signature bundle"), "{err}");
    let mut server = Server::start(&unsigned, &["--trusted-signers", trusted.as_str()]);
    let warned = log_field(&mut server, "reason");
    assert!(warned.contains("unsigned"), "{warned}");
    server.discard_logs();
    server.wait_ready();
    let (s, v) = predict(&server.addr, "", 1);
    assert_eq!((s, &v["model"]["signed_by"]), (200, &Value::Null), "{v}");
    assert!(
        v["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("not signature-verified")),
        "{v}"
    );
    let live = &get(&server.addr, "/models/alpha")["live"];
    assert!(
        live["signature_warning"]
            .as_str()
            .is_some_and(|w| w.contains("no signature bundle")),
        "{live}"
    );
}

#[test]
fn a_refused_version_swapped_in_under_load_leaves_what_serves_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "release", "prime256v1");
    let (mallory, _) = keygen(dir.path(), "mallory", "prime256v1");
    let trusted = signers(dir.path(), "release", &public, None);
    let models = dir.path().join("models");
    write_tiny_version(&models, "alpha", "1.0.0", 21);
    sign(&models, &key, "alpha@1.0.0");
    let keys = keys(dir.path());
    let mut server = Server::start(
        &models,
        &[
            "--api-keys-file",
            keys.as_str(),
            "--require-signed-models",
            "--trusted-signers",
            trusted.as_str(),
        ],
    );
    server.discard_logs();
    server.wait_ready();
    let addr = server.addr.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (s, v) = predict(&addr, "", c * 1000 + i);
                    seen.push((s, v["model"]["version"].as_str().unwrap_or("").to_string()));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Each refused through the load API as the new default, with its reason.
    let cases: [(&str, SwapTamper, &str); 4] = [
        (
            "1.1.0",
            |v, _, _| swap_onnx_and_card(v, "alpha"),
            "file digest mismatch: `alpha.onnx`",
        ),
        (
            "1.2.0",
            |v, _, _| std::fs::write(v.join("extra.bin"), b"x").unwrap(),
            "extra file: `extra.bin`",
        ),
        (
            "1.3.0",
            |_, m, k| sign(m, k, "alpha@1.3.0"),
            "signed by an untrusted key",
        ),
        (
            "1.4.0",
            |v, _, _| std::fs::remove_file(v.join("alpha.sig")).unwrap(),
            "no signature bundle",
        ),
    ];
    for (version, tamper, reason) in cases {
        write_tiny_version(&models, "alpha", version, 30);
        sign(&models, &key, &format!("alpha@{version}"));
        tamper(&models.join("alpha").join(version), &models, &mallory);
        let (s, e) = admin(
            &addr,
            "/v2/repository/models/alpha/load",
            json!({"parameters": {"version": version, "default": true}}),
        );
        assert_eq!(s, 400, "{version}: {e}");
        assert!(
            e["error"].as_str().unwrap().contains(reason),
            "{version}: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // As a shadow candidate: refused too.
    let (s, e) = admin(
        &addr,
        "/v2/repository/models/alpha/load",
        json!({"parameters": {"version": "1.1.0", "shadow": true}}),
    );
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("file digest mismatch"),
        "{e}"
    );
    // By SIGHUP: the refused versions stay out, with their reasons in the index.
    hup(&server);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.join().unwrap();
        assert!(seen.len() > 5, "client {c} made {} requests", seen.len());
        for (s, v) in &seen {
            assert_eq!((*s, v.as_str()), (200, "1.0.0"), "client {c}");
        }
    }
    let (_, index) = admin(&addr, "/v2/repository/index", json!({}));
    let reason = |v: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["version"] == v)
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(reason("1.3.0").contains("untrusted key"), "{index}");
    let models_json = get(&addr, "/models");
    assert!(
        models_json.to_string().contains("\"1.0.0\""),
        "{models_json}"
    );
}

#[test]
fn bundles_interoperate_with_pypi_model_signing_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "release", "prime256v1");
    let models = dir.path().join("models");

    // model_signing signs a version folder; cxr-serve verifies it and serves.
    write_tiny_version(&models, "alpha", "1.0.0", 41);
    let folder = models.join("alpha/1.0.0");
    let (ok, said) = run(model_signing()
        .args(["sign", "key"])
        .arg(&folder)
        .arg("--signature")
        .arg(folder.join("alpha.sig"))
        .arg("--private_key")
        .arg(&key));
    assert!(ok, "model_signing (.venv, scripts/setup.sh --test): {said}");
    let trusted = signers(dir.path(), "release", &public, None);
    let args = [
        "--require-signed-models",
        "--trusted-signers",
        trusted.as_str(),
    ];
    let mut server = Server::start(&models, &args);
    let signer = log_field(&mut server, "signer");
    assert_eq!(signer, "release");
    server.discard_logs();
    server.wait_ready();
    assert_eq!(predict(&server.addr, "", 2).0, 200);
    drop(server);
    // ... and refuses it once a file changes.
    std::fs::write(folder.join("added.txt"), b"x").unwrap();
    let err = serve_fails(&models, &args);
    assert!(err.contains("extra file: `added.txt`"), "{err}");
    std::fs::remove_file(folder.join("added.txt")).unwrap();

    // cxr-sign signs (a P-384 key too); model_signing verifies with the public key.
    let (key384, public384) = keygen(dir.path(), "release384", "secp384r1");
    for (k, p) in [(&key, &public), (&key384, &public384)] {
        sign(&models, k, "alpha@1.0.0");
        let (ok, said) = model_signing_verifies(&folder, p, &[]);
        assert!(ok, "{said}");
        // A changed file fails model_signing's check too.
        flip_byte(&folder.join("alpha.onnx"));
        assert!(!model_signing_verifies(&folder, p, &[]).0);
        flip_byte(&folder.join("alpha.onnx"));
    }
    // The flat layout: the bundle covers alpha's files only, verified as such.
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    write_tiny_model(&flat, "alpha", 5, 0.9, 0.8);
    write_tiny_model(&flat, "beta", 6, 0.9, 0.8);
    sign(&flat, &key, "alpha");
    let (ok, said) = model_signing_verifies(&flat, &public, &["--ignore_unsigned_files"]);
    assert!(ok, "{said}");
    // ... and not as the whole folder (beta's files are not in it).
    assert!(!model_signing_verifies(&flat, &public, &[]).0);
}
