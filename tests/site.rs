//! Site validation and the site card, end to end with the real binaries:
//! `cxr-train validate` on a folder of films made here, its metrics checked against
//! the answers `cxr-serve` gives for the same films (an independent path: HTTP, the
//! server's own decoding) counted by hand; then `cxr-serve --site-card` applies the
//! site's threshold, names it in the answer, `/models/{name}` and the audit trail,
//! and refuses a site card measured on another file.

#![cfg(feature = "train")]

mod common;

use std::path::Path;

fn film(dir: &Path, rel: &str, seed: u32) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    // 96 px: above the default geometry gate (64 px), distinct per seed.
    std::fs::write(
        &p,
        common::png_bytes(&common::gray_image(96, 96 + seed % 7, seed)),
    )
    .unwrap();
}

fn validate(models: &Path, films: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cxr-train"))
        .arg("validate")
        .arg("--films")
        .arg(films)
        .arg("--out")
        .arg(out)
        .arg("--models-dir")
        .arg(models)
        .args([
            "--site",
            "Test site",
            "--date",
            "2026-12-07",
            "--bootstrap",
            "200",
        ])
        .args(extra)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .output()
        .expect("run cxr-train validate")
}

fn post(server: &common::Server, model: &str, png: &[u8]) -> serde_json::Value {
    let (status, body) = common::tcp_http(
        &server.addr,
        "POST",
        &format!("/predict?model={model}"),
        Some("image/png"),
        png,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn validate_on_labelled_films_then_serve_with_the_site_card() {
    let models = common::models_dir();
    let films = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut labelled = Vec::new();
    for i in 0..8u32 {
        let (class, label) = if i % 2 == 0 {
            ("NORMAL", 0u8)
        } else {
            ("PNEUMONIA", 1)
        };
        let rel = format!("{class}/film{i}.png");
        film(films.path(), &rel, 100 + i * 13);
        labelled.push((rel, label));
    }
    // Not an image: skipped. Too small for the geometry gate: refused before the model.
    std::fs::write(films.path().join("NORMAL/notes.txt"), b"not a film").unwrap();
    std::fs::write(
        films.path().join("NORMAL/tiny.png"),
        common::png_bytes(&common::gray_image(20, 20, 1)),
    )
    .unwrap();
    let run = validate(
        models.path(),
        films.path(),
        out.path(),
        &[
            "--labels",
            "folders",
            "--model",
            "alpha",
            "--choose",
            "sensitivity:0.5",
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report_bytes = std::fs::read(out.path().join("site-report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report_bytes).unwrap();
    assert_eq!(report["images"], 9);
    assert_eq!(report["skipped"], 1);
    let m = &report["models"][0];
    assert_eq!(m["name"], "alpha");
    assert_eq!(m["answered"], 8);
    assert_eq!(
        m["refused"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        1
    );
    for p in m["plots"].as_array().unwrap() {
        let svg = std::fs::read_to_string(out.path().join(p.as_str().unwrap())).unwrap();
        assert!(svg.starts_with("<svg"), "{p}");
    }
    assert!(
        std::fs::read_to_string(out.path().join("site-report.md"))
            .unwrap()
            .contains("Test site")
    );

    // The same films through the server, counted by hand.
    let mut server = common::Server::start(models.path(), &[] as &[&str]);
    server.discard_logs();
    let threshold = m["card_threshold"].as_f64().unwrap();
    let (mut tp, mut fp, mut tn, mut fn_) = (0u64, 0u64, 0u64, 0u64);
    let mut positives = Vec::new();
    for (rel, label) in &labelled {
        let a = post(
            &server,
            "alpha",
            &std::fs::read(films.path().join(rel)).unwrap(),
        );
        let p = a["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        let row = m["films"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["file"] == rel.as_str())
            .unwrap();
        assert!(
            (row["p_pneumonia"].as_f64().unwrap() - p).abs() < 1e-6,
            "{rel}: {row} vs {p}"
        );
        assert_eq!(row["label"].as_u64().unwrap(), u64::from(*label));
        match (*label == 1, p >= threshold) {
            (true, true) => tp += 1,
            (true, false) => fn_ += 1,
            (false, true) => fp += 1,
            (false, false) => tn += 1,
        }
        if *label == 1 {
            positives.push(p);
        }
    }
    let at = &m["labelled"]["at_card_threshold"];
    assert_eq!(
        [
            &at["confusion"]["tp"],
            &at["confusion"]["fp"],
            &at["confusion"]["tn"],
            &at["confusion"]["fn"]
        ]
        .map(|v| v.as_u64().unwrap()),
        [tp, fp, tn, fn_]
    );
    let sens = at["sensitivity"]["value"].as_f64().unwrap();
    assert!((sens - tp as f64 / (tp + fn_) as f64).abs() < 1e-12);
    // Wilson's interval holds the estimate.
    assert!(at["sensitivity"]["low"].as_f64().unwrap() <= sens);
    assert!(at["sensitivity"]["high"].as_f64().unwrap() >= sens);
    // sensitivity:0.5 on 4 positives: the highest threshold catching 2 of them is the
    // second-highest positive score.
    positives.sort_by(|a, b| b.total_cmp(a));
    let chosen = m["labelled"]["chosen"]["threshold"].as_f64().unwrap();
    assert!(
        (chosen - positives[1]).abs() < 1e-6,
        "{chosen} vs {positives:?}"
    );
    drop(server);

    // The site card: written beside the report, naming the report's hash.
    let card_path = out.path().join("site-card.json");
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
    assert_eq!(
        card["report_sha256"],
        cxr::digest::sha256_hex(&report_bytes)
    );
    assert_eq!(card["models"][0]["name"], "alpha");
    let site_threshold = card["models"][0]["threshold"].as_f64().unwrap();
    assert!((site_threshold - chosen).abs() < 1e-12);

    // Served with it: alpha answers at the site's threshold, named as the site's.
    let audit = out.path().join("audit.jsonl");
    let mut server = common::Server::start(
        models.path(),
        &[
            "--site-card".as_ref(),
            card_path.as_os_str(),
            "--audit-log".as_ref(),
            audit.as_os_str(),
        ],
    );
    server.discard_logs();
    let png = std::fs::read(films.path().join(&labelled[1].0)).unwrap();
    let a = post(&server, "alpha", &png);
    assert_eq!(a["threshold"].as_f64().unwrap(), site_threshold, "{a}");
    assert_eq!(a["threshold_source"]["kind"], "site", "{a}");
    assert_eq!(a["threshold_source"]["site"]["site"], "Test site");
    assert_eq!(
        a["threshold_source"]["site"]["report_sha256"],
        card["report_sha256"]
    );
    let p = a["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    assert_eq!(
        a["label"],
        if p >= site_threshold {
            "PNEUMONIA"
        } else {
            "NORMAL"
        }
    );
    // A caller's own threshold still wins; beta has no entry: its card's threshold.
    let q = common::tcp_http(
        &server.addr,
        "POST",
        "/predict?model=alpha&threshold=0.99",
        Some("image/png"),
        &png,
    );
    assert!(q.1.contains("\"kind\":\"query\""), "{}", q.1);
    assert_eq!(
        post(&server, "beta", &png)["threshold_source"]["kind"],
        "card"
    );
    let (status, body) = common::tcp_http(&server.addr, "GET", "/models/alpha", None, b"");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["site_card"]["model"]["threshold"].as_f64().unwrap(),
        site_threshold
    );
    assert_eq!(info["site_card"]["provenance"]["site"], "Test site");
    drop(server);
    let records = common::audit_records(&audit);
    let site_record = records
        .iter()
        .find(|r| r["model"] == "alpha" && r["threshold_source"] == "site")
        .expect("a site record");
    assert!(
        site_record["site_card"]
            .as_str()
            .unwrap()
            .contains(card["report_sha256"].as_str().unwrap())
    );
    assert_eq!(site_record["threshold"].as_f64().unwrap(), site_threshold);

    // A site card measured on another file of alpha is refused at start.
    let mut other = card.clone();
    other["models"][0]["onnx_sha256"] = serde_json::json!("0".repeat(64));
    let other_path = out.path().join("other-card.json");
    std::fs::write(&other_path, serde_json::to_vec(&other).unwrap()).unwrap();
    let err = common::serve_fails(
        models.path(),
        &[
            "--site-card".as_ref(),
            other_path.as_os_str(),
            "--device".as_ref(),
            "cpu".as_ref(),
        ],
    );
    assert!(err.contains("another file"), "{err}");
}

#[test]
fn an_unlabelled_folder_gets_distributions_and_no_metrics() {
    let models = common::models_dir();
    let films = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for i in 0..5u32 {
        film(films.path(), &format!("day1/film{i}.png"), 7 + i);
    }
    let run = validate(
        models.path(),
        films.path(),
        out.path(),
        &["--model", "beta"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("site-report.json")).unwrap())
            .unwrap();
    let m = &report["models"][0];
    assert_eq!(m["answered"], 5);
    assert!(m["labelled"].is_null());
    assert!(m["p_pneumonia"]["p50"].is_number());
    assert!(!out.path().join("site-card.json").exists());
    // Choosing an operating point needs labels.
    let run = validate(
        models.path(),
        films.path(),
        out.path(),
        &["--choose", "sensitivity:0.9"],
    );
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("labels"));
}
