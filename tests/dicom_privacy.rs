//! No patient attribute of a DICOM upload reaches the logs (every level, every
//! thread: this binary installs a global TRACE subscriber), the audit file or any
//! answer, on success or on refusal.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use common::dicom::{self as d, Spec};
use common::http::{multipart, raw, send};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_patient_tag_in_logs_or_answers() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.jsonl");
    let audit = cxr::audit::Audit::with_file(&audit_path, 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let g = d::test_gray(40, 30, 4);
    let good = Spec::new(30, 40, 16, d::stored(&g, |v| v * 257));
    let full = d::build(&good);
    let dcm = |bytes: Vec<u8>| raw("/predict", "application/dicom", bytes);
    let variant = |f: &dyn Fn(&mut Spec)| {
        let mut spec = good.clone();
        f(&mut spec);
        dcm(d::build(&spec))
    };
    let requests = vec![
        (StatusCode::OK, dcm(full.clone())),
        (
            StatusCode::OK,
            multipart(
                "/predict",
                &[("image", "application/octet-stream", full.clone())],
            ),
        ),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            variant(&|s| s.view_position = Some("RL")),
        ),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            variant(&|s| s.modality = Some("MR")),
        ),
        (
            StatusCode::BAD_REQUEST,
            dcm(full[..full.len() - 7].to_vec()),
        ),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            variant(&|s| s.transfer_syntax_override = Some("1.2.840.10008.1.2.4.81")),
        ),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            variant(&|s| s.pixel_data = false),
        ),
    ];
    let mut bodies = Vec::new();
    for (want, req) in requests {
        let (s, _, b) = send(&t.app, req).await;
        assert_eq!(s, want, "{}", String::from_utf8_lossy(&b));
        bodies.push(String::from_utf8_lossy(&b).to_string());
    }
    drop(t);
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();

    // The capture works: the decoded upload and the refusals are logged.
    assert!(logs.contains("DICOM decoded"), "{logs}");
    assert!(logs.contains(d::SOP_UID), "{logs}");
    assert!(logs.contains("request refused"), "{logs}");
    assert!(bodies[0].contains(d::STUDY_UID));
    // The audit file has a record per answered image (two), naming the image by
    // its SOP Instance UID, and one per refused image (its error type; a refused
    // upload was not read far enough to name it); the log has the same records.
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let answered: Vec<_> = records
        .iter()
        .filter(|v| v["decision"] == "answered")
        .collect();
    assert_eq!(answered.len(), 2, "{audit}");
    for v in &answered {
        assert_eq!(v["sop_instance_uid"], d::SOP_UID, "{v}");
    }
    let refused = bodies.len() - 2;
    assert_eq!(records.len(), 2 + refused, "{audit}");
    for v in &records {
        assert_eq!(v["input_kind"], "dicom", "{v}");
        assert_eq!(
            v["decision"] == "refused",
            v.get("error_type").is_some(),
            "{v}"
        );
    }
    assert_eq!(logs.matches("cxr::audit").count(), records.len(), "{logs}");

    for secret in d::PATIENT_SECRETS {
        assert!(!logs.contains(secret), "`{secret}` in the logs:\n{logs}");
        assert!(
            !audit.contains(secret),
            "`{secret}` in the audit file:\n{audit}"
        );
        for b in &bodies {
            assert!(!b.contains(secret), "`{secret}` in an answer: {b}");
        }
    }
}
