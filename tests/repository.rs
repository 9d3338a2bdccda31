//! Models changed without downtime, on the real binary: versions side by side
//! (`models/<name>/<version>/`), each answering with its own card; the repository
//! extension's load (and swap) and unload under steady load with no failed request
//! and one switch per client; a version that does not check out refused while
//! serving goes on; `SIGHUP` rescans; and a candidate in the shadow whose agreement
//! in `/models` and `/metrics` is what its audit records say.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, gray_image, png_bytes, write_tiny_model, write_tiny_version};
use serde_json::{Value, json};

use common::ops::{READER, admin, get, hup, keys, wait_for};

/// A request with `key` (always sent here).
fn call(addr: &str, method: &str, path: &str, key: &str, ct: &str, body: &[u8]) -> (u16, Value) {
    common::ops::call(addr, method, path, Some(key), ct, body)
}

fn predict(addr: &str, query: &str, seed: u32) -> (u16, Value) {
    let img = png_bytes(&gray_image(96, 80, seed));
    call(
        addr,
        "POST",
        &format!("/predict{query}"),
        READER,
        "image/png",
        &img,
    )
}

fn card_sha(models: &Path, rel: &str) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(models.join(rel)).unwrap()).unwrap();
    v["onnx"]["sha256"].as_str().unwrap().to_string()
}

fn versions_of(models: &Value, name: &str) -> Vec<(String, String)> {
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["card"]["name"] == name)
        .map(|m| {
            m["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    (
                        v["version"].as_str().unwrap().to_string(),
                        v["role"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
fn versions_side_by_side_each_answer_with_their_own_card() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    write_tiny_version(models, "alpha", "1.0.0", 11);
    write_tiny_version(models, "alpha", "1.10.0", 12);
    write_tiny_model(models, "beta", 13, 0.9, 0.8);
    let keys = keys(models);
    let mut server = Server::start(models, &["--api-keys-file", keys.as_str()]);
    server.discard_logs();
    server.wait_ready();
    let addr = server.addr.clone();

    // Both versions are listed, each with its card; the highest (by number, not
    // text: 1.10.0 > 1.9) is the default.
    let list = get(&addr, "/models");
    assert_eq!(
        versions_of(&list, "alpha"),
        [pair("1.0.0", "loaded"), pair("1.10.0", "default")]
    );
    assert_eq!(versions_of(&list, "beta"), [pair("0.0.1-test", "default")]);
    let alpha = get(&addr, "/models/alpha");
    assert_eq!(alpha["card"]["version"], "1.10.0");
    assert_eq!(
        alpha["versions"][0]["card"]["onnx"]["sha256"],
        card_sha(models, "alpha/1.0.0/alpha.json")
    );
    assert_eq!(
        get(&addr, "/models/alpha@1.0.0")["card"]["version"],
        "1.0.0"
    );

    // Answers name the version that produced them, by the file's hash too.
    let (s, newest) = predict(&addr, "?model=alpha", 3);
    assert_eq!(s, 200, "{newest}");
    assert_eq!(newest["model"]["version"], "1.10.0");
    assert_eq!(
        newest["model"]["sha256"],
        card_sha(models, "alpha/1.10.0/alpha.json")
    );
    let (s, pinned) = predict(&addr, "?model=alpha@1.0.0", 3);
    assert_eq!(s, 200, "{pinned}");
    assert_eq!(pinned["model"]["version"], "1.0.0");
    assert_eq!(
        pinned["model"]["sha256"],
        card_sha(models, "alpha/1.0.0/alpha.json")
    );
    assert_ne!(
        newest["probabilities"], pinned["probabilities"],
        "two different files"
    );
    let (s, e) = predict(&addr, "?model=alpha@9.9.9", 3);
    assert_eq!(s, 404, "{e}");
    assert_eq!(e["error_type"], "model_not_found");
    assert!(
        e["error"].as_str().unwrap().contains("1.0.0, 1.10.0"),
        "{e}"
    );

    // The Open Inference Protocol: the versions, and one version's answer.
    let meta = get(&addr, "/v2/models/alpha");
    assert_eq!(meta["versions"], json!(["1.0.0", "1.10.0"]));
    let b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        png_bytes(&gray_image(96, 80, 3)),
    );
    let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                      "outputs": [{"name": "probabilities"}]});
    let (s, v) = call(
        &addr,
        "POST",
        "/v2/models/alpha/versions/1.0.0/infer",
        READER,
        "application/json",
        body.to_string().as_bytes(),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model_version"], "1.0.0");
    let p = v["outputs"][0]["data"][1].as_f64().unwrap();
    assert!((p - pinned["probabilities"]["PNEUMONIA"].as_f64().unwrap()).abs() < 1e-6);

    // The repository needs the admin scope.
    let (s, e) = call(
        &addr,
        "POST",
        "/v2/repository/index",
        READER,
        "application/json",
        b"{}",
    );
    assert_eq!(s, 403, "{e}");
    let (s, index) = admin(&addr, "/v2/repository/index", json!({"ready": true}));
    assert_eq!(s, 200, "{index}");
    assert_eq!(index.as_array().unwrap().len(), 3, "{index}");

    // models/<name>/DEFAULT pins the default; a rescan applies it.
    std::fs::write(models.join("alpha/DEFAULT"), "1.0.0\n").unwrap();
    hup(&server);
    wait_for("the pinned default", || {
        versions_of(&get(&addr, "/models"), "alpha")
            == [pair("1.0.0", "default"), pair("1.10.0", "loaded")]
    });
    let (_, v) = predict(&addr, "", 3);
    assert_eq!(v["model"]["name"], "alpha", "the server's default variant");
    assert_eq!(v["model"]["version"], "1.0.0");
    assert_eq!(v["probabilities"], pinned["probabilities"]);
}

/// The must-show at small scale: 4 clients, a swap and an unload, a corrupted file.
#[test]
fn a_new_version_is_swapped_in_under_load_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    write_tiny_version(models, "alpha", "1.0.0", 21);
    write_tiny_model(models, "beta", 23, 0.9, 0.8);
    let keys = keys(models);
    let mut server = Server::start(
        models,
        &["--api-keys-file", keys.as_str(), "--default-model", "alpha"],
    );
    server.discard_logs();
    server.wait_ready();
    let addr = server.addr.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let not_ready = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (s, v) = predict(&addr, "", c * 1000 + i);
                    seen.push((
                        s,
                        v["model"]["version"].as_str().unwrap_or("").to_string(),
                        v,
                    ));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    let ready = {
        let (addr, stop, not_ready) = (addr.clone(), stop.clone(), not_ready.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if common::tcp_http(&addr, "GET", "/ready", None, b"").0 != 200 {
                    not_ready.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(800));

    // A corrupted file: the card's hash no longer matches. Refused; serving stays.
    write_tiny_version(models, "alpha", "1.2.0", 25);
    let onnx = models.join("alpha/1.2.0/alpha.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&onnx, bytes).unwrap();
    let (s, e) = admin(
        &addr,
        "/v2/repository/models/alpha/load",
        json!({"parameters": {"version": "1.2.0", "default": true}}),
    );
    assert_eq!(s, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("SHA-256"), "{e}");
    std::thread::sleep(Duration::from_millis(400));

    // The new version, loaded beside the default: it answers only when named, though
    // it is the highest.
    write_tiny_version(models, "alpha", "1.1.0", 22);
    let (s, change) = admin(
        &addr,
        "/v2/repository/models/alpha/load",
        json!({"parameters": {"version": "1.1.0"}}),
    );
    assert_eq!(s, 200, "{change}");
    assert_eq!(change["loaded"], json!(["alpha@1.1.0"]));
    assert_eq!(change["defaults"]["alpha"], "1.0.0");
    let (s, v) = predict(&addr, "?model=alpha@1.1.0", 7);
    assert_eq!((s, v["model"]["version"].as_str()), (200, Some("1.1.0")));
    std::thread::sleep(Duration::from_millis(400));
    // Then made the default: at once.
    let (s, change) = admin(
        &addr,
        "/v2/repository/models/alpha/load",
        json!({"parameters": {"version": "1.1.0", "default": true}}),
    );
    assert_eq!(s, 200, "{change}");
    assert_eq!(change["loaded"], json!([]), "already loaded and warm");
    assert_eq!(change["defaults"]["alpha"], "1.1.0");
    std::thread::sleep(Duration::from_millis(800));
    // The old one: out of the set, unloaded once its requests are done.
    let (s, change) = admin(
        &addr,
        "/v2/repository/models/alpha/unload",
        json!({"parameters": {"version": "1.0.0"}}),
    );
    assert_eq!(s, 200, "{change}");
    assert_eq!(change["unloaded"], json!(["alpha@1.0.0"]));
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    ready.join().unwrap();

    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.join().unwrap();
        assert!(seen.len() > 10, "client {c} made {} requests", seen.len());
        for (s, _, v) in &seen {
            assert_eq!(*s, 200, "client {c}: {v}");
        }
        let versions: Vec<&str> = seen.iter().map(|(_, v, _)| v.as_str()).collect();
        let switches = versions.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(switches, 1, "client {c}: {versions:?}");
        assert_eq!(versions.first(), Some(&"1.0.0"), "client {c}");
        assert_eq!(versions.last(), Some(&"1.1.0"), "client {c}");
    }
    assert_eq!(
        not_ready.load(Ordering::Relaxed),
        0,
        "/ready failed during the swap"
    );

    let (s, index) = admin(&addr, "/v2/repository/index", json!({}));
    assert_eq!(s, 200);
    let state = |v: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "alpha" && e["version"] == v)
            .cloned()
            .unwrap_or_else(|| panic!("alpha {v} in {index}"))
    };
    assert_eq!(state("1.0.0")["state"], "UNAVAILABLE");
    assert_eq!(state("1.0.0")["reason"], "unloaded");
    assert_eq!(state("1.1.0")["state"], "READY");
    assert_eq!(state("1.1.0")["default"], true);
    assert_eq!(state("1.2.0")["state"], "UNAVAILABLE");
    assert!(
        state("1.2.0")["reason"]
            .as_str()
            .unwrap()
            .contains("SHA-256")
    );
    let (s, _) = predict(&addr, "?model=alpha@1.0.0", 1);
    assert_eq!(s, 404);
    let metrics = common::tcp_http(&addr, "GET", "/metrics", None, b"").1;
    assert!(
        metrics.contains(r#"cxr_model_version{model="alpha",role="default",version="1.1.0"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"version="1.0.0""#));
    assert!(metrics.contains(
        r#"cxr_repository_operations_total{operation="load",outcome="refused_invalid"} 1"#
    ));

    // What cannot go: the --default-model, a variant's only version.
    let (s, e) = admin(&addr, "/v2/repository/models/alpha/unload", json!({}));
    assert_eq!(s, 400, "{e}");
    let (s, e) = admin(
        &addr,
        "/v2/repository/models/beta/unload",
        json!({"parameters": {"version": "0.0.1-test"}}),
    );
    assert_eq!(s, 400, "{e}");
    // A whole variant can; it answers no more, and a load brings it back.
    let (s, _) = admin(&addr, "/v2/repository/models/beta/unload", json!({}));
    assert_eq!(s, 200);
    assert_eq!(predict(&addr, "?model=beta", 1).0, 404);
    let (s, _) = admin(&addr, "/v2/repository/models/beta/load", json!({}));
    assert_eq!(s, 200);
    assert_eq!(predict(&addr, "?model=beta", 1).0, 200);
    let (s, e) = admin(&addr, "/v2/repository/models/gamma/load", json!({}));
    assert_eq!(s, 404, "{e}");
}

#[test]
fn sighup_rescans_new_versions_in_and_removed_ones_out() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    write_tiny_version(models, "alpha", "1.0.0", 31);
    let keys = keys(models);
    let mut server = Server::start(models, &["--api-keys-file", keys.as_str()]);
    server.discard_logs();
    server.wait_ready();
    let addr = server.addr.clone();

    write_tiny_version(models, "alpha", "1.1.0", 32);
    hup(&server);
    wait_for("1.1.0 as the default", || {
        versions_of(&get(&addr, "/models"), "alpha")
            == [pair("1.0.0", "loaded"), pair("1.1.0", "default")]
    });
    std::fs::remove_dir_all(models.join("alpha/1.0.0")).unwrap();
    hup(&server);
    wait_for("1.0.0 unloaded", || {
        versions_of(&get(&addr, "/models"), "alpha") == [pair("1.1.0", "default")]
    });
    // A card that no longer matches its file: refused, 1.1.0 serves on.
    write_tiny_version(models, "alpha", "1.2.0", 33);
    let card = models.join("alpha/1.2.0/alpha.json");
    let text = std::fs::read_to_string(&card).unwrap();
    let sha = card_sha(models, "alpha/1.2.0/alpha.json");
    std::fs::write(&card, text.replace(&sha, &"0".repeat(64))).unwrap();
    hup(&server);
    wait_for("1.2.0 refused", || {
        let (_, index) = admin(&addr, "/v2/repository/index", json!({}));
        index.as_array().is_some_and(|es| {
            es.iter().any(|e| {
                e["version"] == "1.2.0"
                    && e["state"] == "UNAVAILABLE"
                    && e["reason"].as_str().unwrap_or("").contains("SHA-256")
            })
        })
    });
    assert_eq!(
        versions_of(&get(&addr, "/models"), "alpha"),
        [pair("1.1.0", "default")]
    );
    let (s, v) = predict(&addr, "", 1);
    assert_eq!((s, v["model"]["version"].as_str()), (200, Some("1.1.0")));
}

/// An answer without what differs between two runs of the same request.
fn comparable(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("timings_ms");
    v.as_object_mut().unwrap().remove("request_id");
    v
}

#[test]
fn a_shadow_runs_after_the_answer_and_its_agreement_is_what_the_audit_says() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    write_tiny_version(models, "alpha", "1.0.0", 41);
    // No DEFAULT: the candidate is the highest version, but a shadow is never the
    // default.
    write_tiny_version(models, "alpha", "1.1.0", 42);
    let keys = keys(models);
    let audit = models.join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let mut shadowed = Server::start(
        models,
        &[
            "--api-keys-file",
            keys.as_str(),
            "--audit-log",
            audit_arg.as_str(),
            "--shadow",
            "alpha@1.1.0",
        ],
    );
    shadowed.discard_logs();
    shadowed.wait_ready();
    // Without a shadow the highest would answer: pin 1.0.0 for the comparison.
    std::fs::write(models.join("alpha/DEFAULT"), "1.0.0").unwrap();
    let mut plain = Server::start(models, &["--api-keys-file", keys.as_str()]);
    plain.discard_logs();
    shadowed.wait_ready();
    plain.wait_ready();
    let (a, b) = (shadowed.addr.clone(), plain.addr.clone());

    // Answers are the same with and without the shadow.
    let n = 16;
    for i in 0..n {
        let (s1, with) = predict(&a, "", i);
        let (s2, without) = predict(&b, "", i);
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(with["model"]["version"], "1.0.0");
        assert_eq!(comparable(with), comparable(without));
        // Room for the shadow: it runs once the server is idle.
        std::thread::sleep(Duration::from_millis(120));
    }
    wait_for("every shadow run", || {
        get(&a, "/models/alpha")["shadow"]["agreement"]["overall"]["images"] == n
    });
    let info = get(&a, "/models/alpha");
    assert_eq!(info["shadow"]["version"], "1.1.0");
    assert_eq!(info["versions"][1]["role"], "shadow");

    // The audit trail: one shadow record per answer, beside it.
    let records = common::audit_records(&audit);
    let answered: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "answered")
        .collect();
    let shadows: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "shadow")
        .collect();
    assert_eq!((answered.len(), shadows.len()), (n as usize, n as usize));
    let mut by_label = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for (i, s) in shadows.iter().enumerate() {
        let a_rec = answered
            .iter()
            .find(|r| r["request_id"] == s["request_id"])
            .expect("the answer the shadow compares with");
        assert_eq!(s["model_version"], "1.1.0");
        assert_eq!(s["shadow"]["answered_version"], "1.0.0");
        assert_eq!(s["shadow"]["answered_label"], a_rec["label"]);
        assert_eq!(s["shadow"]["answered_p_pneumonia"], a_rec["p_pneumonia"]);
        let agreed = s["label"] == a_rec["label"];
        assert_eq!(s["shadow"]["agreed"], agreed);
        let dp =
            (s["p_pneumonia"].as_f64().unwrap() - a_rec["p_pneumonia"].as_f64().unwrap()).abs();
        assert!((s["shadow"]["abs_delta_p"].as_f64().unwrap() - dp).abs() < 1e-6);
        let e = by_label
            .entry(a_rec["label"].as_str().unwrap().to_string())
            .or_default();
        e.0 += 1;
        e.1 += u64::from(agreed);
        // The candidate's own answer for that image, asked by name: the same.
        if i < 3 {
            let seed = (0..n)
                .find(|&k| {
                    cxr::digest::sha256_hex(&png_bytes(&gray_image(96, 80, k)))
                        == s["input_sha256"].as_str().unwrap()
                })
                .unwrap();
            let (_, direct) = predict(&a, "?model=alpha@1.1.0", seed);
            let p = direct["probabilities"]["PNEUMONIA"].as_f64().unwrap();
            assert!((p - s["p_pneumonia"].as_f64().unwrap()).abs() < 1e-6);
        }
    }
    // /models and /metrics say what the records say.
    let agreement = &get(&a, "/models/alpha")["shadow"]["agreement"];
    let metrics = common::tcp_http(&a, "GET", "/metrics", None, b"").1;
    for (label, (images, agreed)) in &by_label {
        let l = &agreement["by_answered_label"][label];
        assert_eq!(
            (l["images"].as_u64(), l["agreed"].as_u64()),
            (Some(*images), Some(*agreed))
        );
        for (kind, count) in [("agree", *agreed), ("disagree", images - agreed)] {
            if count > 0 {
                let line = format!(
                    "cxr_shadow_images_total{{agreement=\"{kind}\",answered_label=\"{label}\",model=\"alpha\",version=\"1.1.0\"}} {count}"
                );
                assert!(metrics.contains(&line), "{line} in\n{metrics}");
            }
        }
    }
}
