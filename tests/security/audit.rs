//! The audit trail: one record per image, in the log and the file, rotation, and failing closed.

use super::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn file_records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("audit.jsonl")
        {
            for l in std::fs::read_to_string(&p).unwrap().lines() {
                out.push(serde_json::from_str(l).unwrap());
            }
        }
    }
    out
}

// current_thread: the handler runs on this thread, where the capture is installed.
#[tokio::test]
async fn one_image_one_audit_record_with_every_field_in_log_and_file() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // The audit record's log callsite, reached once here with the capture installed,
    // then every callsite's interest rebuilt from this thread: had another test's
    // thread reached it first (their requests are audited too), the lack of a
    // subscriber there would have been cached as its interest for every thread
    // (tracing-core asks only the registering thread while one subscriber is
    // registered), and this test would find no record in the log, as it did about
    // one run in two.
    let throwaway = cxr::audit::AuditRecord {
        time: cxr::audit::now_rfc3339(),
        request_id: "warm-up".into(),
        client_request_id: None,
        image_index: 0,
        caller: "test".into(),
        decision: cxr::audit::Decision::Answered,
        error_type: None,
        model: "none".into(),
        model_version: "0".into(),
        model_sha256: String::new(),
        model_signer: None,
        threshold: 0.5,
        threshold_source: "card".into(),
        site_card: None,
        p_normal: Some(0.5),
        p_pneumonia: Some(0.5),
        label: Some("NORMAL".into()),
        ood_score: None,
        input_sha256: String::new(),
        input_kind: "png".into(),
        input_bytes: 0,
        sop_instance_uid: None,
        shadow: None,
        trace_id: None,
    };
    Audit::log_only().record_all(&[throwaway]).await.unwrap();
    tracing::callsite::rebuild_interest_cache();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let keys = ApiKeys::parse(&keys_toml(), false).unwrap();
    let audit = Audit::with_file(&path, 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_api_keys(keys).with_audit(audit)
    });
    let bytes = png();
    let before = std::time::SystemTime::now();
    let (s, h, b) = send(
        &t.app,
        keyed(
            raw("/predict?threshold=0.4", "image/png", bytes.clone()),
            "x-api-key",
            KEY_RIS,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let answer = json(&b);
    let rid = h["x-request-id"].to_str().unwrap().to_string();
    assert!(!rid.is_empty());

    let records = file_records(dir.path());
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.dir.path().join("alpha.json")).unwrap()).unwrap();
    assert_eq!(r["request_id"], rid.as_str());
    assert_eq!(r["request_id"], answer["request_id"]);
    assert!(r.get("client_request_id").is_none(), "{r}");
    assert_eq!(r["decision"], "answered");
    assert_eq!(r["image_index"], 0);
    assert_eq!(r["caller"], "ris");
    assert_eq!(r["model"], "alpha");
    assert_eq!(r["model_version"], card["version"]);
    assert_eq!(r["model_sha256"], card["onnx"]["sha256"]);
    assert_eq!(r["threshold"], 0.4);
    assert_eq!(r["threshold_source"], "query");
    assert_eq!(r["p_normal"], answer["probabilities"]["NORMAL"]);
    assert_eq!(r["p_pneumonia"], answer["probabilities"]["PNEUMONIA"]);
    assert_eq!(r["label"], answer["label"]);
    assert_eq!(r["input_sha256"], hex(&Sha256::digest(&bytes)).as_str());
    assert_eq!(r["input_kind"], "png");
    assert_eq!(r["input_bytes"], bytes.len());
    assert!(r.get("sop_instance_uid").is_none());
    // Server time, RFC 3339 UTC, within this test's run.
    let time = r["time"].as_str().unwrap();
    let after = std::time::SystemTime::now();
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    };
    assert!(
        time >= cxr::audit::rfc3339(secs(before), 0).as_str()
            && time <= cxr::audit::rfc3339(secs(after) + 1, 0).as_str(),
        "{time}"
    );
    // Every inference request is traced: the record names the trace the answer's
    // `traceparent` continues.
    let traceparent = h["traceparent"].to_str().unwrap();
    assert_eq!(r["trace_id"], traceparent.split('-').nth(1).unwrap(), "{r}");
    let keys_in_record = r.as_object().unwrap().len();
    assert_eq!(keys_in_record, 17, "{r}");

    // The same record, once, in the log at INFO.
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "cxr::audit" && v["fields"]["message"] == "audit")
        .filter(|v| v["fields"]["request_id"] != "warm-up")
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    let f = &lines[0]["fields"];
    assert_eq!(lines[0]["level"], "INFO");
    for k in [
        "time",
        "request_id",
        "caller",
        "model",
        "model_version",
        "model_sha256",
        "threshold_source",
        "label",
        "input_sha256",
        "input_kind",
        "trace_id",
    ] {
        assert_eq!(f[k], r[k], "{k}");
    }
    for k in ["threshold", "p_normal", "p_pneumonia"] {
        assert!(
            (f[k].as_f64().unwrap() - r[k].as_f64().unwrap()).abs() < 1e-6,
            "{k}: {f}"
        );
    }
    assert_eq!(f["input_bytes"], r["input_bytes"]);
    assert_eq!(f["image_index"], 0);
    // No key, no image bytes.
    for text in [logs.as_str(), &std::fs::read_to_string(&path).unwrap()] {
        assert!(!text.contains(KEY_RIS));
        assert!(!text.contains("IHDR"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_record_of_every_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // About two records a file.
    let audit = Audit::with_file(&path, 1400).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let mut rids = Vec::new();
    for i in 0..5 {
        let img = common::png_bytes(&common::gray_image(40, 32, i));
        let (s, h, _) = send(&t.app, raw("/predict", "image/png", img)).await;
        assert_eq!(s, StatusCode::OK);
        rids.push(h["x-request-id"].to_str().unwrap().to_string());
    }
    let (s, h, _) = send(
        &t.app,
        multipart(
            "/predict?model=beta",
            &[
                ("image", "image/png", png()),
                ("image", "image/png", png()),
                ("image", "image/png", png()),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let multi = h["x-request-id"].to_str().unwrap().to_string();
    let records = file_records(dir.path());
    assert_eq!(records.len(), 8);
    for rid in &rids {
        assert_eq!(
            records
                .iter()
                .filter(|r| r["request_id"] == rid.as_str())
                .count(),
            1
        );
    }
    let mut idx: Vec<u64> = records
        .iter()
        .filter(|r| r["request_id"] == multi.as_str())
        .map(|r| r["image_index"].as_u64().unwrap())
        .collect();
    idx.sort_unstable();
    assert_eq!(idx, [0, 1, 2]);
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(files >= 4, "{files} files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_file_fails_the_request() {
    // /dev/full opens and refuses every write (ENOSPC), even for root (the CI user),
    // for whom a read-only file would still be writable.
    let audit = Audit::with_file(std::path::Path::new("/dev/full"), 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let (s, h, b) = send(&t.app, raw("/predict", "image/png", png())).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let v = json(&b);
    assert_eq!(v["error_type"], "audit_unavailable");
    assert!(v.get("label").is_none(), "{v}");
    assert_eq!(h[header::RETRY_AFTER], "1");
    let (_, _, b) = send(&t.app, get("/metrics")).await;
    let text = String::from_utf8_lossy(&b);
    assert_eq!(
        metric_line(&text, "cxr_audit_failures_total"),
        Some("cxr_audit_failures_total 1".into())
    );
    assert!(!text.contains("cxr_predictions_total{"), "{text}");

    // A path that cannot be opened at all (a directory): the same.
    let dir = tempfile::tempdir().unwrap();
    let (audit, problem) = Audit::with_file(dir.path(), 0);
    assert!(problem.is_some());
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let (s, _, b) = send(&t.app, raw("/predict", "image/png", png())).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&b)["error_type"], "audit_unavailable");
}

/// A caller's `x-request-id` never becomes the record's id: the server's own id is
/// the `request_id`, the caller's is kept, bounded and sanitised, as
/// `client_request_id`; two requests with the same forged id get two ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_request_id_is_kept_beside_the_servers_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Audit::with_file(&path, 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let forged = format!("{}\"}},\"caller\":\"admin{}", "r-1", "x".repeat(500));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/predict")
            .header(header::CONTENT_TYPE, "image/png")
            .header("x-request-id", forged.as_str())
            .body(axum::body::Body::from(png()))
            .unwrap();
        let (s, h, b) = send(&t.app, req).await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&b);
        let kept = v["client_request_id"].as_str().unwrap().to_string();
        assert_eq!(h["x-request-id"], kept.as_str());
        assert!(
            kept.len() <= 128 && kept.starts_with("r-1caller:admin"),
            "{kept}"
        );
        assert!(
            kept.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:/+=@".contains(c))
        );
        ids.push(v["request_id"].as_str().unwrap().to_string());
    }
    assert_ne!(ids[0], ids[1]);
    let records = file_records(dir.path());
    assert_eq!(records.len(), 2);
    for (r, id) in records.iter().zip(&ids) {
        assert_eq!(r["request_id"], id.as_str());
        assert!(uuid_like(id), "{id}");
        assert!(
            r["client_request_id"]
                .as_str()
                .unwrap()
                .starts_with("r-1caller:admin")
        );
        assert_eq!(r["caller"], "anonymous");
    }
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

/// Refusals are decisions about an image: a blank image refused by a content gate,
/// and one image of a multipart request that a gate refuses, each leave one
/// `refused` record per image of the request, with the error type and no label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_the_gates_have_their_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Audit::with_file(&path, 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let blank = common::png_bytes(&image::GrayImage::from_pixel(64, 64, image::Luma([128])));
    let (s, h, b) = send(&t.app, raw("/predict", "image/png", blank.clone())).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let error_type = json(&b)["error_type"].as_str().unwrap().to_string();
    let rid = h["x-request-id"].to_str().unwrap().to_string();
    let (s, _, _) = send(
        &t.app,
        multipart(
            "/predict",
            &[
                ("image", "image/png", png()),
                ("image", "image/png", blank.clone()),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let records = file_records(dir.path());
    assert_eq!(records.len(), 3, "{records:?}");
    let r = &records[0];
    assert_eq!(r["request_id"], rid.as_str());
    assert_eq!(r["decision"], "refused");
    assert_eq!(r["error_type"], error_type.as_str());
    assert_eq!(r["input_sha256"], hex(&Sha256::digest(&blank)).as_str());
    assert!(
        r.get("label").is_none() && r.get("p_pneumonia").is_none(),
        "{r}"
    );
    // The multipart request: both images recorded as refused, none as answered.
    assert_eq!(records[1]["request_id"], records[2]["request_id"]);
    for r in &records[1..] {
        assert_eq!(r["decision"], "refused");
    }
    assert_eq!(records[1]["image_index"], 0);
    assert_eq!(records[2]["image_index"], 1);
}
