//! Robustness round 3 (issue #43), the rows that are not one door's own, each on
//! the real binary: a failed repository call changes nothing (row 8); the DICOM
//! node's model cannot be unloaded (row 9); model changes, confirmations and
//! refused callers are in the audit trail with who made them (row 10); result UIDs
//! derive from everything that makes the result (row 6); the folder job reads
//! within the body limit, reports what it does not read, and never writes through
//! a link (row 13).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::ops::{ADMIN, READER, admin, call, get, hup, keys, wait_for};
use common::{Server, gray_image, png_bytes, write_tiny_model, write_tiny_version};
use serde_json::{Value, json};

/// The variants and versions `/models` lists.
fn loaded(addr: &str) -> Vec<String> {
    get(addr, "/models")["models"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| {
            let name = m["card"]["name"].as_str().unwrap().to_string();
            m["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |v| format!("{name}@{}", v["version"].as_str().unwrap()))
        })
        .collect()
}

/// `dir/models` with two tiny variants, `alpha` and `beta`.
fn two_models(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    write_tiny_model(&models, "alpha", 1, 0.99, 0.70);
    write_tiny_model(&models, "beta", 2, 0.90, 0.95);
    models
}

/// A ready server on [`two_models`] with the operator's keys and an audit file
/// (its path), and `extra` flags.
fn audited(dir: &Path, extra: &[&str]) -> (Server, PathBuf) {
    let models = two_models(dir);
    let keys = keys(dir);
    let audit = dir.join("audit.jsonl");
    let mut args = vec![
        "--api-keys-file",
        keys.as_str(),
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut server = Server::start(&models, &args);
    server.discard_logs();
    server.wait_ready();
    (server, audit)
}

/// Row 8: unload → a load that fails (404, unknown version) → SIGHUP. Before the
/// fix the failed load cleared the "unloaded by a call" mark, and the rescan
/// brought the variant back.
#[test]
fn a_failed_load_changes_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let (server, audit) = audited(dir.path(), &[]);
    let addr = server.addr.clone();
    let (s, v) = admin(&addr, "/v2/repository/models/beta/unload", json!({}));
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin(
        &addr,
        "/v2/repository/models/beta/load",
        json!({"parameters": {"version": "9.9.9"}}),
    );
    assert_eq!(s, 404, "{v}");
    // A second failure, of another kind: `default` without a version.
    let (s, v) = admin(
        &addr,
        "/v2/repository/models/beta/load",
        json!({"parameters": {"default": true}}),
    );
    assert_eq!(s, 400, "{v}");
    hup(&server);
    wait_for("the rescan's audit event", || {
        common::audit_records(&audit)
            .iter()
            .any(|l| l["event"] == "repository_rescan")
    });
    let names = loaded(&addr);
    assert!(
        names.iter().all(|n| !n.starts_with("beta@")),
        "beta came back: {names:?}"
    );
    let (_, index) = admin(&addr, "/v2/repository/index", json!({}));
    let beta = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "beta")
        .unwrap()
        .clone();
    assert_eq!(
        (beta["state"].as_str(), beta["reason"].as_str()),
        (Some("UNAVAILABLE"), Some("unloaded"))
    );
}

/// A DICOM node started with `--dicom-model MODEL` (its destination is never
/// reached: nothing is stored here).
fn node(dir: &Path, models: &Path, model: &str) -> Server {
    let peers = dir.join("peers.toml");
    std::fs::write(&peers, "[[peers]]\nae_title = \"MODALITY\"\n").unwrap();
    let keys = keys(dir);
    let outbox = dir.join("outbox.sqlite");
    let mut server = Server::start(
        models,
        &[
            "--api-keys-file",
            keys.as_str(),
            "--dicom-port",
            "0",
            "--dicom-peers-file",
            peers.to_str().unwrap(),
            "--dicom-destination",
            "PACS@127.0.0.1:9",
            "--dicom-outbox",
            outbox.to_str().unwrap(),
            "--dicom-model",
            model,
        ],
    );
    server.discard_logs();
    server.wait_ready();
    server
}

/// Row 6, at the DICOM node: the same instance stored again under the same
/// settings is a duplicate (not analysed twice, nothing queued twice); stored
/// again after a change of a decision input (here a gate: `--max-aspect-ratio`,
/// on the same outbox after a restart) it is analysed anew and its results queued
/// with new UIDs. Before the fix the resend was logged "duplicate" and the old
/// result stood.
#[test]
fn a_resend_after_a_change_of_settings_is_a_new_result_at_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let models = two_models(dir.path());
    let peers = dir.path().join("peers.toml");
    std::fs::write(&peers, "[[peers]]\nae_title = \"MODALITY\"\n").unwrap();
    let outbox = dir.path().join("outbox.sqlite");
    let file = dir.path().join("cr.dcm");
    std::fs::write(&file, cr()).unwrap();
    let run = |extra: &[&str]| -> (u64, u64) {
        let mut args = vec![
            "--min-image-side",
            "16",
            "--dicom-port",
            "0",
            "--dicom-peers-file",
            peers.to_str().unwrap(),
            // Never reached: the results wait in the outbox.
            "--dicom-destination",
            "PACS@127.0.0.1:9",
            "--dicom-outbox",
            outbox.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut server = Server::start(&models, &args);
        let port: u16 = server
            .wait_log_field("dicom_addr")
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        server.discard_logs();
        server.wait_ready();
        for _ in 0..2 {
            let out = Command::new("storescu")
                .args(["-aet", "MODALITY", "-aec", "CXR", "127.0.0.1"])
                .arg(port.to_string())
                .arg(&file)
                .output()
                .expect("storescu (dcmtk: scripts/setup.sh --test)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (_, metrics) = call(&server.addr, "GET", "/metrics", None, "text/plain", b"");
        let count = |outcome: &str| -> u64 {
            let sample = format!("cxr_dicom_stores_total{{outcome=\"{outcome}\"}} ");
            metrics
                .as_str()
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(sample.as_str()))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        (count("analysed"), count("duplicate"))
    };
    // The same settings: analysed once, then a duplicate.
    assert_eq!(run(&[]), (1, 1));
    // Another gate setting: a new result (then a duplicate of it).
    assert_eq!(run(&["--max-aspect-ratio", "3.5"]), (1, 1));
    // The queue holds both results, with four distinct UIDs (SR and SC of each).
    let conn = rusqlite::Connection::open(&outbox).unwrap();
    let uids: Vec<String> = conn
        .prepare("SELECT sop_instance_uid FROM outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let distinct: std::collections::BTreeSet<_> = uids.iter().collect();
    assert_eq!((uids.len(), distinct.len()), (4, 4), "{uids:?}");
}

/// Row 9: the `--dicom-model` cannot be unloaded (it answers every C-STORE: without
/// it each would be refused A700, which PACSes retry forever), by name or, when
/// pinned, by version; other variants and versions can.
#[test]
fn the_dicom_model_cannot_be_unloaded() {
    let dir = tempfile::tempdir().unwrap();
    let models = two_models(dir.path());
    let server = node(dir.path(), &models, "beta");
    let (s, v) = admin(&server.addr, "/v2/repository/models/beta/unload", json!({}));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--dicom-model beta"),
        "{v}"
    );
    assert!(loaded(&server.addr).iter().any(|n| n.starts_with("beta@")));
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    write_tiny_version(&models, "alpha", "1.0.0", 1);
    write_tiny_version(&models, "beta", "1.0.0", 2);
    write_tiny_version(&models, "beta", "1.1.0", 3);
    let server = node(dir.path(), &models, "beta@1.0.0");
    let unload = |v: &str| {
        admin(
            &server.addr,
            "/v2/repository/models/beta/unload",
            json!({"parameters": {"version": v}}),
        )
    };
    let (s, v) = unload("1.0.0");
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("--dicom-model beta@1.0.0"),
        "{v}"
    );
    let (s, v) = unload("1.1.0");
    assert_eq!(s, 200, "{v}");
    assert_eq!(loaded(&server.addr), ["alpha@1.0.0", "beta@1.0.0"]);
}

/// Row 10: every change of models, every confirmation (feedback) and every refused
/// caller (401, 403) has an audit record naming the caller; no raw path in it.
#[test]
fn model_changes_feedback_and_refused_callers_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let outcomes = dir.path().join("outcomes.sqlite");
    let (server, audit) = audited(dir.path(), &["--outcomes", outcomes.to_str().unwrap()]);
    let addr = server.addr.clone();
    let img = png_bytes(&gray_image(96, 80, 7));
    // 401: no key (on a path that carries an identifier).
    let (s, _) = call(
        &addr,
        "POST",
        "/predict?model=alpha",
        None,
        "image/png",
        &img,
    );
    assert_eq!(s, 401);
    // 403: the reader on the admin routes.
    let (s, _) = call(
        &addr,
        "POST",
        "/v2/repository/models/DOE%5EJANE%20MRN12345/unload",
        Some(READER),
        "application/json",
        b"{}",
    );
    assert_eq!(s, 403);
    // The operator's changes: one refused, one done.
    let (s, _) = admin(
        &addr,
        "/v2/repository/models/beta/load",
        json!({"parameters": {"version": "9.9.9"}}),
    );
    assert_eq!(s, 404);
    let (s, _) = admin(&addr, "/v2/repository/models/beta/unload", json!({}));
    assert_eq!(s, 200);
    // An answer, confirmed.
    let (s, answer) = call(&addr, "POST", "/predict", Some(READER), "image/png", &img);
    assert_eq!(s, 200, "{answer}");
    let request_id = answer["request_id"].as_str().unwrap();
    let (s, v) = call(
        &addr,
        "POST",
        "/feedback",
        Some(ADMIN),
        "application/json",
        json!({"request_id": request_id, "label": "PNEUMONIA"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(s, 200, "{v}");
    let events = |lines: &[Value]| -> Vec<(String, String, String)> {
        lines
            .iter()
            .filter(|l| l.get("event").is_some())
            .map(|l| {
                (
                    l["event"].as_str().unwrap().to_string(),
                    l["caller"].as_str().unwrap().to_string(),
                    l["outcome"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let mut got = Vec::new();
    wait_for("five audit events", || {
        got = events(&common::audit_records(&audit));
        got.len() >= 5
    });
    let want = [
        ("auth_refused", "anonymous", "unauthorized"),
        ("auth_refused", "reader", "forbidden"),
        ("repository_load", "ops", "not_found"),
        ("repository_unload", "ops", "ok"),
        ("feedback", "ops", "ok"),
    ];
    for w in want {
        assert!(
            got.iter()
                .any(|g| (g.0.as_str(), g.1.as_str(), g.2.as_str()) == w),
            "{w:?} not in {got:?}"
        );
    }
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("MRN12345"), "a raw path in the audit trail");
    let lines = common::audit_records(&audit);
    let unload = lines
        .iter()
        .find(|l| l["event"] == "repository_unload")
        .unwrap();
    assert_eq!(unload["target"], "beta");
    assert_eq!(
        unload["detail"]["result"]["unloaded"],
        json!(["beta@0.0.1-test"])
    );
    let feedback = lines.iter().find(|l| l["event"] == "feedback").unwrap();
    assert_eq!(feedback["target"], request_id);
    assert_eq!(feedback["detail"]["label"], "PNEUMONIA");
}

/// A DICOM CR of a generated film.
fn cr() -> Vec<u8> {
    use common::dicom::{Spec, build, stored, test_gray};
    let g = test_gray(96, 96, 5);
    build(&Spec::new(96, 96, 12, stored(&g, |v| v * 16)))
}

/// The SOP Instance UID of a Part-10 file.
fn sop_instance_uid(path: &Path) -> String {
    let obj = dicom_object::OpenFileOptions::new()
        .open_file(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    obj.element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

/// Row 6: the result objects' UIDs derive from everything that makes the result.
/// The same film under the same settings gets the same UIDs (a resend is
/// idempotent); under another gate setting or threshold, other UIDs (before the
/// fix they were derived from the model file and the image only, so a changed
/// result reused the old result's UID and was dropped as a duplicate).
#[test]
fn result_uids_change_with_the_decision_inputs_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    write_tiny_model(&models, "alpha", 1, 0.99, 0.70);
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("cr.dcm"), cr()).unwrap();
    let uids = |n: &str, extra: &[&str]| {
        let out = dir.path().join(n);
        let stdout = common::job(&models, &input, &out, extra);
        assert!(stdout.contains("done: 1 analysed"), "{stdout}");
        (
            sop_instance_uid(&out.join("cr.dcm.sr.dcm")),
            sop_instance_uid(&out.join("cr.dcm.sc.dcm")),
        )
    };
    let first = uids("a", &[]);
    assert_eq!(uids("b", &[]), first, "the same inputs: the same UIDs");
    let wider = uids("c", &["--max-aspect-ratio", "3.5"]);
    assert_ne!(wider.0, first.0, "another gate setting: another SR UID");
    assert_ne!(wider.1, first.1, "another gate setting: another SC UID");
    let lateral = uids("d", &["--allow-lateral"]);
    assert_ne!(lateral.0, first.0);
    assert_ne!(lateral.0, wider.0);
}

/// Row 13: the folder job reads within `--max-body-bytes` (a 3 GiB sparse file is
/// refused by its size, never read), follows a link to a file, says what it does
/// not read (a link to a folder, a FIFO) instead of dropping it silently, and never
/// writes through a link already in OUT.
#[test]
fn the_folder_job_bounds_reads_reports_what_it_skips_and_never_writes_through_links() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    write_tiny_model(&models, "alpha", 1, 0.99, 0.70);
    let input = dir.path().join("in");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(elsewhere.join("folder")).unwrap();
    let film = png_bytes(&gray_image(96, 96, 3));
    std::fs::write(input.join("film.png"), &film).unwrap();
    std::fs::write(elsewhere.join("linked.png"), &film).unwrap();
    std::fs::write(elsewhere.join("folder/inner.png"), &film).unwrap();
    // 3 GiB, sparse: a PNG signature, then a hole.
    let huge = std::fs::File::create(input.join("huge.png")).unwrap();
    {
        use std::io::Write as _;
        (&huge).write_all(&film[..64]).unwrap();
    }
    huge.set_len(3 << 30).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("linked.png"), input.join("link.png")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("folder"), input.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), input.join("broken.png")).unwrap();
    let fifo = input.join("pipe.png");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // OUT already holds a link where a result goes.
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "do not overwrite").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("film.png.json")).unwrap();

    let stdout = common::job(&models, &input, &out, &["--max-body-bytes", "4000000"]);
    for (status, name) in [
        ("analysed", "film.png"),
        ("analysed", "link.png"),
        ("refused", "huge.png: payload_too_large"),
        ("skipped", "dirlink: a link to a folder"),
        ("skipped", "broken.png: a broken link"),
        ("skipped", "pipe.png: a FIFO"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(status) && l.contains(name)),
            "{status} {name}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("done: 2 analysed, 1 refused, 3 skipped, 0 failed"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "do not overwrite"
    );
    let written = std::fs::symlink_metadata(out.join("film.png.json")).unwrap();
    assert!(written.is_file(), "the link was replaced by the result");
    let answer: Value =
        serde_json::from_slice(&std::fs::read(out.join("film.png.json")).unwrap()).unwrap();
    assert!(answer["label"].is_string(), "{answer}");
    let refusal: Value =
        serde_json::from_slice(&std::fs::read(out.join("huge.png.json")).unwrap()).unwrap();
    assert_eq!(refusal["error_type"], "payload_too_large");
    // No temporary file is left behind.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
