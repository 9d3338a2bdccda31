//! Live outcomes through the real binary: answers are recorded beside the audit
//! trail, `POST /feedback` joins a confirmed label to its answer (404 for an unknown
//! id, idempotent for the same label, 409 for another), and the live confusion
//! matrix in `/models/{name}` and `/metrics` equals the one counted by hand from the
//! answers and labels sent, and the one computed from the stored rows.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use serde_json::Value;

/// The confusion cell (tp, fp, tn, fn) of an answered and a confirmed label.
fn cell(answered: &str, confirmed: &str) -> usize {
    match (confirmed == "PNEUMONIA", answered == "PNEUMONIA") {
        (true, true) => 0,
        (false, true) => 1,
        (false, false) => 2,
        (true, false) => 3,
    }
}

/// The real binary recording outcomes in `db`, with `extra` flags.
fn outcomes_server(models: &Path, db: &Path, extra: &[&str]) -> common::Server {
    let mut args = vec![OsStr::new("--outcomes"), db.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let mut server = common::Server::start(models, &args);
    server.discard_logs();
    server
}

/// `POST /predict?model={model}` of `bytes` (`content_type`): its answer (200).
fn predict(server: &common::Server, model: &str, content_type: &str, bytes: &[u8]) -> Value {
    let (status, body) = common::tcp_http(
        &server.addr,
        "POST",
        &format!("/predict?model={model}"),
        Some(content_type),
        bytes,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `POST /feedback` of `body`: status and answer.
fn feedback(server: &common::Server, body: &str) -> (u16, Value) {
    let (status, text) = common::tcp_http(
        &server.addr,
        "POST",
        "/feedback",
        Some("application/json"),
        body.as_bytes(),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts that a feedback answer is `status` with `error_type`: the answer.
fn assert_refused((s, v): (u16, Value), status: u16, error_type: &str) -> Value {
    assert_eq!(
        (s, v["error_type"].as_str()),
        (status, Some(error_type)),
        "{v}"
    );
    v
}

/// `GET /models/alpha` (200).
fn alpha_info(server: &common::Server) -> Value {
    let (status, body) = common::tcp_http(&server.addr, "GET", "/models/alpha", None, b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn feedback_joins_answers_and_the_live_matrix_is_the_stored_one() {
    let models = common::models_dir();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("outcomes.sqlite");
    let server = outcomes_server(models.path(), &db, &[]);

    // Six answers, and the label a radiologist confirms for each.
    let mut expected = [0u64; 4]; // tp fp tn fn
    let mut ids = Vec::new();
    for i in 0..6u32 {
        let png = common::png_bytes(&common::gray_image(96, 96, 40 + i * 11));
        let a = predict(&server, "alpha", "image/png", &png);
        let confirmed = if i % 3 == 0 { "NORMAL" } else { "PNEUMONIA" };
        expected[cell(a["label"].as_str().unwrap(), confirmed)] += 1;
        ids.push((
            a["request_id"].as_str().unwrap().to_string(),
            confirmed,
            a["label"].clone(),
        ));
    }

    // Unknown id: 404; not a label: 400; not JSON: 400.
    assert_refused(
        feedback(&server, r#"{"request_id": "nope", "label": "NORMAL"}"#),
        404,
        "unknown_request",
    );
    let (s, _) = feedback(
        &server,
        &format!(r#"{{"request_id": "{}", "label": "maybe"}}"#, ids[0].0),
    );
    assert_eq!(s, 400);
    assert_refused(feedback(&server, "label=NORMAL"), 400, "invalid_request");

    for (id, confirmed, answered) in &ids {
        let (s, v) = feedback(
            &server,
            &format!(r#"{{"request_id": "{id}", "label": "{confirmed}"}}"#),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["status"], "recorded");
        assert_eq!(&v["answered"]["label"], answered);
        assert_eq!(v["agreed"], *answered == *confirmed);
    }
    // The same label again: nothing changes; another label: 409, the first stands.
    let (id, confirmed, _) = &ids[1];
    let (s, v) = feedback(
        &server,
        &format!(r#"{{"request_id": "{id}", "image_index": 0, "label": "{confirmed}"}}"#),
    );
    assert_eq!((s, v["status"].as_str()), (200, Some("already_recorded")));
    assert_refused(
        feedback(
            &server,
            &format!(r#"{{"request_id": "{id}", "label": "NORMAL"}}"#),
        ),
        409,
        "feedback_conflict",
    );

    // The live matrix: as counted by hand.
    let info = alpha_info(&server);
    let live = &info["live_outcomes"];
    let got = ["tp", "fp", "tn", "fn"].map(|k| live["confusion"][k].as_u64().unwrap());
    assert_eq!(got, expected, "{live}");
    assert_eq!(live["n"], 6);
    assert_eq!(live["reference"], "card");
    let (_, metrics) = common::tcp_http(&server.addr, "GET", "/metrics", None, b"");
    assert!(
        metrics.contains(&format!(
            "cxr_live_outcomes{{figure=\"tp\",model=\"alpha\"}} {}",
            expected[0]
        )),
        "{metrics}"
    );
    drop(server);

    // And as the stored rows say, read straight from the database.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut st = conn
        .prepare("SELECT a.label, f.label FROM feedback f JOIN answers a USING (request_id, image_index) WHERE a.model = 'alpha'")
        .unwrap();
    let mut stored = [0u64; 4];
    for row in st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
    {
        let (answered, confirmed) = row.unwrap();
        stored[cell(&answered, &confirmed)] += 1;
    }
    assert_eq!(stored, got);

    // Restarted on the same file: the outcomes are still there.
    let again = outcomes_server(models.path(), &db, &[]);
    let info = alpha_info(&again);
    assert_eq!(info["live_outcomes"]["n"], 6);
}

#[test]
fn without_an_outcomes_store_feedback_is_not_found() {
    let models = common::models_dir();
    let mut server = common::Server::start(models.path(), &[] as &[&str]);
    server.discard_logs();
    assert_refused(
        feedback(&server, r#"{"request_id": "x", "label": "NORMAL"}"#),
        404,
        "not_found",
    );
}

fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Guards issue #43 rows 7 and (c). The outcomes store is owner-only (0600), its
/// answers and confirmations older than `--retention-days` are deleted (they were
/// kept forever), and the live figures' query by model file has its index, added
/// to a database made before it.
#[test]
fn answers_and_confirmations_past_the_retention_go_and_the_store_is_private_and_indexed() {
    use std::os::unix::fs::PermissionsExt;
    let models = common::models_dir();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("outcomes.sqlite");
    let retention = ["--retention-days", "30"];
    let server = outcomes_server(models.path(), &db, &retention);
    let mut ids = Vec::new();
    for seed in [3u32, 4] {
        let png = common::png_bytes(&common::gray_image(96, 96, seed));
        let a = predict(&server, "alpha", "image/png", &png);
        let id = a["request_id"].as_str().unwrap().to_string();
        let (s, v) = feedback(
            &server,
            &format!(r#"{{"request_id": "{id}", "label": "NORMAL"}}"#),
        );
        assert_eq!(s, 200, "{v}");
        ids.push(id);
    }
    drop(server);
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "outcomes.sqlite{suffix}");
    }
    // The first answer and its confirmation are 100 days old; the index is gone
    // (a database made before it, so before the migrations were versioned: no
    // `migrations` table either).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE answers SET time = '2000-01-01T00:00:00.000Z' WHERE request_id = ?1",
        [&ids[0]],
    )
    .unwrap();
    conn.execute(
        "UPDATE feedback SET received_ms = received_ms - 100 * 86400000 WHERE request_id = ?1",
        [&ids[0]],
    )
    .unwrap();
    conn.execute_batch("DROP INDEX IF EXISTS answers_model; DROP TABLE migrations")
        .unwrap();
    drop(conn);
    let again = outcomes_server(models.path(), &db, &retention);
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM answers"), 1);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM feedback"), 1);
    let kept: String = conn
        .query_row("SELECT request_id FROM feedback", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, ids[1]);
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'answers_model'"
        ),
        1
    );
    // The live figures count what is kept.
    let info = alpha_info(&again);
    assert_eq!(info["live_outcomes"]["n"], 1, "{info}");
}

/// Guards issue #43 row (d). A confirmation by SOP Instance UID of an image that
/// several models answered names the model (`model`): without it, 409 (it used to
/// go to the most recent answer of any model, counting in that model's figures);
/// with it, that model's answer. An image one model answered needs no name.
#[test]
fn feedback_by_sop_instance_uid_names_the_model_when_several_answered() {
    use common::dicom as d;
    let models = common::models_dir();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("outcomes.sqlite");
    let server = outcomes_server(models.path(), &db, &[]);
    let g = d::test_gray(96, 96, 7);
    let dcm = d::build(&d::Spec::new(96, 96, 8, d::stored(&g, |v| v)));
    let other = d::with_tags(
        &dcm,
        &[(
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            dicom_core::VR::UI,
            "1.2.826.0.1.3680043.10.1.99",
        )],
    );
    predict(&server, "alpha", "application/dicom", &dcm);
    predict(&server, "beta", "application/dicom", &dcm);
    predict(&server, "alpha", "application/dicom", &other);
    let v = assert_refused(
        feedback(
            &server,
            &format!(
                r#"{{"sop_instance_uid": "{}", "label": "PNEUMONIA"}}"#,
                d::SOP_UID
            ),
        ),
        409,
        "feedback_conflict",
    );
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("alpha, beta") && error.contains("`model`"),
        "{error}"
    );
    let (s, v) = feedback(
        &server,
        &format!(
            r#"{{"sop_instance_uid": "{}", "model": "beta", "label": "PNEUMONIA"}}"#,
            d::SOP_UID
        ),
    );
    assert_eq!(
        (s, v["answered"]["model"].as_str()),
        (200, Some("beta")),
        "{v}"
    );
    assert_refused(
        feedback(
            &server,
            &format!(
                r#"{{"sop_instance_uid": "{}", "model": "gamma", "label": "PNEUMONIA"}}"#,
                d::SOP_UID
            ),
        ),
        404,
        "unknown_request",
    );
    let (s, v) = feedback(
        &server,
        r#"{"sop_instance_uid": "1.2.826.0.1.3680043.10.1.99", "label": "NORMAL"}"#,
    );
    assert_eq!(
        (s, v["answered"]["model"].as_str()),
        (200, Some("alpha")),
        "{v}"
    );
    // Only beta's answer to the first image counts: alpha's figures hold the other.
    let info = alpha_info(&server);
    assert_eq!(info["live_outcomes"]["n"], 1, "{info}");
}
