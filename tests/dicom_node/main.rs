//! The DICOM node against a real PACS: Debian's Orthanc (one reached by C-STORE,
//! one by DICOMweb STOW-RS through its DICOMweb plugin), dcmtk's echoscu and
//! storescu as the modality, radiographs made by pydicom (make_instances.py), the
//! results read back by pydicom (read_result.py) and checked by dciodvfy. And the
//! folder door (`cxr-serve --job`) on a folder of mixed files.

#[path = "../common/mod.rs"]
mod common;
mod door;
mod harness;
mod ris;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{free_port, metrics_of, python, root, storescu as store, tool};
use harness::{
    Node, Orthanc, Postgres, PythonScp, READER_KEY, Storescp, admin_dead_letters, assert_metrics,
    assert_ok, dead_letters, keys_file, outbox_column, stderr, store_ok, wait_metric, wait_until,
};

/// The radiographs, made by pydicom.
fn instances(dir: &Path) -> PathBuf {
    let out = dir.join("in");
    let ok = Command::new(python())
        .arg(root().join("tests/dicom_node/make_instances.py"))
        .arg(&out)
        .status()
        .expect("python");
    assert!(ok.success(), "make_instances.py failed");
    out
}

fn dcmtk(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool(name)).args(args).output().expect(name)
}

/// `bytes` in a new file under `dir`.
fn temp_file(bytes: &[u8], dir: &Path) -> PathBuf {
    let f = dir.join(format!("object-{}.dcm", uuid::Uuid::new_v4()));
    std::fs::write(&f, bytes).unwrap();
    f
}

/// The object read back by pydicom.
fn read_result(bytes: &[u8], dir: &Path) -> Value {
    let f = temp_file(bytes, dir);
    let out = Command::new(python())
        .arg(root().join("tests/dicom_node/read_result.py"))
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// dciodvfy's errors (its warnings are kept out: a local coding scheme and the
/// absent Study ID are warnings).
fn dciodvfy_errors(bytes: &[u8], dir: &Path) -> Vec<String> {
    let f = temp_file(bytes, dir);
    let out = Command::new(tool("dciodvfy")).arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect()
}

fn sop_instance_uid(file: &Path) -> String {
    let out = Command::new(python())
        .args([
            "-c",
            "import sys, pydicom; print(pydicom.dcmread(sys.argv[1]).SOPInstanceUID)",
        ])
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A test's folder with the radiographs of [`instances`] in it, their folder, and
/// the models to serve.
fn setup() -> (tempfile::TempDir, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let files = instances(tmp.path());
    (tmp, files, common::models_dir())
}

const STUDY: &str = "1.2.826.0.1.3680043.8.498.11111111111111111111";

#[test]
fn a_pacs_gets_each_radiographs_sr_and_sc_in_its_study_once_and_after_an_outage() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let mut store_pacs = Orthanc::start(dir, "pacs");
    let stow_pacs = Orthanc::start(dir, "web");
    let node = Node::new(dir)
        .peers("[[peers]]\nae_title = \"MODALITY\"\nhosts = [\"127.0.0.1\"]\n")
        .flag("--dicom-ae-title", "CXR")
        .flag(
            "--dicom-destination",
            format!("ORTHANC@127.0.0.1:{}", store_pacs.dicom),
        )
        .flag(
            "--stow-url",
            format!("http://127.0.0.1:{}/dicom-web", stow_pacs.http),
        )
        .outbox(&dir.join("outbox.sqlite"));
    let (server, port) = node.start(models.path());

    // C-ECHO: a known peer succeeds; an unknown calling AE is rejected.
    let echo = |ae: &str| {
        dcmtk(
            "echoscu",
            &["-aet", ae, "-aec", "CXR", "127.0.0.1", &port.to_string()],
        )
    };
    assert_ok(&echo("MODALITY"));
    let echo = echo("STRANGER");
    assert!(!echo.status.success());
    assert!(
        stderr(&echo).contains("Calling AE Title Not Recognized"),
        "{}",
        stderr(&echo)
    );

    // The sources go to the PACS too (as a modality sends them), then to cxr.
    let (cr, dx, lateral, ct, cr2) = (
        files.join("cr.dcm"),
        files.join("dx.dcm"),
        files.join("lateral.dcm"),
        files.join("ct.dcm"),
        files.join("cr2.dcm"),
    );
    for pacs in [&store_pacs, &stow_pacs] {
        pacs.store("ORTHANC", &[&cr, &dx, &lateral]);
    }
    store_ok(port, &[&cr, &dx, &lateral]);
    // A CT slice: no presentation context is accepted for its SOP class.
    let refused = store("MODALITY", port, &[&ct]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("No presentation context"),
        "{}",
        stderr(&refused)
    );

    // What /predict answers for the same files.
    let predict = |f: &Path| -> Value {
        let (status, body) = common::tcp_http_headers(
            &server.addr,
            "POST",
            "/predict",
            &[("Content-Type", "application/dicom")],
            &std::fs::read(f).unwrap(),
        );
        assert!(status == 200 || status == 422, "{status} {body}");
        serde_json::from_str(&body).unwrap()
    };
    let uid = |f: &Path| sop_instance_uid(f);
    let expected = [(uid(&cr), predict(&cr)), (uid(&dx), predict(&dx))];
    let lateral_answer = predict(&lateral);
    assert_eq!(
        lateral_answer["error_type"], "lateral_view",
        "{lateral_answer}"
    );

    // 3 sources + SR and SC of the CR and of the DX + the SR of the lateral view.
    for pacs in [&store_pacs, &stow_pacs] {
        let got = pacs.wait_count(STUDY, 8, 60);
        assert_eq!(got.len(), 8, "{got:?}");
        let mut seen_sr = Vec::new();
        let mut seen_sc = Vec::new();
        for (id, _, modality) in &got {
            if modality != "SR" && modality != "OT" {
                continue;
            }
            let bytes = pacs.get_bytes(&format!("/instances/{id}/file")).unwrap();
            let errors = dciodvfy_errors(&bytes, dir);
            assert!(errors.is_empty(), "{modality}: {errors:?}");
            let r = read_result(&bytes, dir);
            assert_eq!(r["study"], STUDY, "{r}");
            assert_eq!(r["patient_id"], "CXR-0001", "{r}");
            let source = r["references"][0].as_str().unwrap().to_string();
            if modality == "SR" {
                seen_sr.push(source.clone());
                if source == uid(&lateral) {
                    assert_eq!(r["finding"], "Not analysed", "{r}");
                    assert!(
                        r["reason"].as_str().unwrap().starts_with("lateral_view"),
                        "{r}"
                    );
                    continue;
                }
                let (_, answer) = expected
                    .iter()
                    .find(|(u, _)| *u == source)
                    .expect("an SR of a source");
                let present = answer["label"] == "PNEUMONIA";
                assert_eq!(
                    r["finding"],
                    if present { "Present" } else { "Absent" },
                    "{r} {answer}"
                );
                let p = answer["probabilities"]["PNEUMONIA"].as_f64().unwrap();
                assert!(
                    (r["probability"].as_f64().unwrap() - p).abs() < 1e-6,
                    "{r} {answer}"
                );
            } else {
                seen_sc.push(source);
                assert_eq!(r["photometric"], "RGB", "{r}");
                assert_eq!(r["burned_in"], "YES", "{r}");
                assert_eq!(r["sop_class"], "1.2.840.10008.5.1.4.1.1.7", "{r}");
            }
        }
        seen_sr.sort();
        seen_sc.sort();
        let mut want_sr = vec![uid(&cr), uid(&dx), uid(&lateral)];
        want_sr.sort();
        let mut want_sc = vec![uid(&cr), uid(&dx)];
        want_sc.sort();
        assert_eq!(seen_sr, want_sr);
        assert_eq!(seen_sc, want_sc);
    }

    // The same CR again: recognised (not analysed again), no second SR or SC.
    let again = store("MODALITY", port, &[&cr]);
    assert!(again.status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(store_pacs.study_instances(STUDY).len(), 8);
    assert_eq!(stow_pacs.study_instances(STUDY).len(), 8);
    assert_metrics(
        &server,
        &[
            "cxr_dicom_stores_total{outcome=\"duplicate\"} 1",
            "cxr_dicom_stores_total{outcome=\"analysed\"} 2",
            "cxr_dicom_stores_total{outcome=\"not_analysed\"} 1",
            "cxr_dicom_associations_total{outcome=\"rejected\"} 1",
        ],
    );

    // The PACS is down: a new CR is accepted, its results wait in the outbox, and
    // reach the PACS after it is back, across a restart of cxr-serve.
    store_pacs.stop();
    store_ok(port, &[&cr2]);
    wait_metric(
        &[&server],
        &format!(
            "cxr_dicom_results_total{{destination=\"ORTHANC@127.0.0.1:{}\",outcome=\"retried\"}}",
            store_pacs.dicom
        ),
        20,
    );
    assert_metrics(&server, &["cxr_dicom_outbox_depth"]);
    // The STOW-RS PACS, never down, has them before this replica stops.
    assert_eq!(stow_pacs.wait_count(STUDY, 10, 60).len(), 10);
    server.sigterm();
    drop(server);
    store_pacs.restart();
    let (_server, _port) = node.start(models.path());
    let got = store_pacs.wait_count(STUDY, 10, 60);
    assert_eq!(
        got.len(),
        10,
        "the queued SR and SC arrive after the outage: {got:?}"
    );
    // And the STOW-RS PACS, never down, got them once.
    assert_eq!(stow_pacs.wait_count(STUDY, 10, 30).len(), 10);
    drop(_server);

    // Another replica with no shared record sees the CR again: its results carry the
    // same UIDs (derived from the image and the model file), so the PACS still holds
    // one SR and one SC of it.
    let (server, port) = node
        .clone()
        .outbox(&dir.join("other-outbox.sqlite"))
        .start(models.path());
    assert!(store("MODALITY", port, &[&cr]).status.success());
    wait_metric(&[&server], "outcome=\"sent\"} 2", 20);
    assert_eq!(store_pacs.study_instances(STUDY).len(), 10);
}

#[test]
fn the_folder_job_writes_json_sr_and_sc_per_image_and_a_line_per_refusal() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    std::fs::remove_file(files.join("cr2.dcm")).unwrap();
    std::fs::create_dir_all(files.join("more")).unwrap();
    std::fs::write(
        files.join("more/film.png"),
        common::png_bytes(&common::gray_image(96, 96, 3)),
    )
    .unwrap();
    std::fs::write(files.join("notes.txt"), "not an image").unwrap();
    let out = dir.join("out");
    let stdout = common::job(models.path(), &files, &out, &[]);
    for (name, status) in [
        ("cr.dcm", "analysed"),
        ("dx.dcm", "analysed"),
        ("more/film.png", "analysed"),
        ("lateral.dcm", "refused"),
        ("ct.dcm", "refused"),
        ("notes.txt", "skipped"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(status) && l.contains(name)),
            "{name} {status}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("done: 3 analysed, 2 refused, 1 skipped, 0 failed"),
        "{stdout}"
    );
    let exists = |p: &str| out.join(p).exists();
    for f in ["cr.dcm", "dx.dcm"] {
        for suffix in [".json", ".sr.dcm", ".sc.dcm"] {
            assert!(exists(&format!("{f}{suffix}")), "{f}{suffix}");
        }
        let answer: Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("{f}.json"))).unwrap()).unwrap();
        let sr = read_result(
            &std::fs::read(out.join(format!("{f}.sr.dcm"))).unwrap(),
            dir,
        );
        let p = answer["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        assert!((sr["probability"].as_f64().unwrap() - p).abs() < 1e-6);
        assert!(
            dciodvfy_errors(
                &std::fs::read(out.join(format!("{f}.sc.dcm"))).unwrap(),
                dir
            )
            .is_empty()
        );
    }
    // A refused DICOM: its refusal and the SR that says why; no SC.
    let refusal: Value =
        serde_json::from_slice(&std::fs::read(out.join("lateral.dcm.json")).unwrap()).unwrap();
    assert_eq!(refusal["error_type"], "lateral_view");
    assert!(exists("lateral.dcm.sr.dcm") && !exists("lateral.dcm.sc.dcm"));
    // A PNG has no study to file an SR or SC in: its JSON answer only.
    assert!(exists("more/film.png.json") && !exists("more/film.png.sr.dcm"));
    assert!(!exists("notes.txt.json"));
}

/// `deploy/orthanc/orthanc.json` without its comments.
fn shipped_orthanc_config() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/orthanc/orthanc.json")).unwrap();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("a closed comment");
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    serde_json::from_str(&out).expect("deploy/orthanc/orthanc.json is JSON with comments")
}

/// Orthanc as the router, with the shipped settings and Lua script: a pediatric CR
/// (a 6-year-old's) stored in it reaches cxr, and cxr's SR and SC come back into
/// its study, one ORU reaches the RIS's MLLP listener and one DiagnosticReport the
/// FHIR server: all with the film's accession number and one result's identity
/// (MSH-10, the report's identifiers and the SR's and SC's UIDs all derive from the
/// result id the report carries, which names the film's SOP Instance UID).
#[test]
fn orthanc_with_the_shipped_configuration_routes_radiographs_to_cxr_and_the_ris_and_ehr() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let shipped = shipped_orthanc_config();
    let cxr_port = free_port();
    let ae = shipped["DicomModalities"]["cxr"][0]
        .as_str()
        .unwrap()
        .to_string();
    let pacs = Orthanc::start_with(
        dir,
        "router",
        serde_json::json!({
            "DicomModalities": {"cxr": [ae, "127.0.0.1", cxr_port]},
            "DicomAlwaysAllowStore": shipped["DicomAlwaysAllowStore"],
            "LuaScripts": [root().join("deploy/orthanc/route-to-cxr.lua")],
        }),
    );
    let pacs_ae = shipped["DicomAet"].as_str().unwrap();
    let hl7_port = free_port();
    let record = dir.join("hl7.jsonl");
    let _listener = ris::mllp_listener(hl7_port, &record);
    let (_fhir_server, fhir) = ris::fhir_server();
    let (_server, _) = Node::new(dir)
        .peers(&format!("[[peers]]\nae_title = \"{pacs_ae}\"\n"))
        .flag("--dicom-port", cxr_port)
        .flag("--dicom-ae-title", &ae)
        .flag(
            "--dicom-destination",
            format!("{pacs_ae}@127.0.0.1:{}", pacs.dicom),
        )
        .outbox(&dir.join("outbox.sqlite"))
        .flag("--hl7-destination", format!("127.0.0.1:{hl7_port}"))
        .flag("--fhir-url", format!("http://{fhir}"))
        .start(models.path());
    pacs.store(pacs_ae, &[&files.join("cr.dcm")]);
    let got = pacs.wait_count(STUDY, 3, 60);
    let mut modalities: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
    modalities.sort_unstable();
    assert_eq!(modalities, ["CR", "OT", "SR"], "{got:?}");

    common::ops::wait_for("the ORU and the DiagnosticReport", || {
        !ris::messages(&record).is_empty() && !ris::reports(&fhir).is_empty()
    });
    // Once each: nothing more arrives while the outbox would resend.
    std::thread::sleep(Duration::from_secs(2));
    let oru = ris::messages(&record);
    assert_eq!(oru.len(), 1, "{oru:?}");
    assert_eq!(oru[0]["errors"], serde_json::json!([]), "{oru:?}");
    let oru = &oru[0]["fields"];
    let reports = ris::reports(&fhir);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0];
    assert_eq!(pacs.wait_count(STUDY, 3, 1).len(), 3);

    // One accession number: the film's, in the SR, the SC, OBR-18 and basedOn.
    let cr = files.join("cr.dcm");
    let film_uid = sop_instance_uid(&cr);
    let tags = |id: &str| {
        pacs.get(&format!("/instances/{id}/simplified-tags"))
            .unwrap()
    };
    let object = |modality: &str| {
        let (id, uid, _) = got.iter().find(|(_, _, m)| m == modality).unwrap();
        (uid.clone(), tags(id))
    };
    let ((sr_uid, sr), (sc_uid, sc)) = (object("SR"), object("OT"));
    for t in [&sr, &sc] {
        assert_eq!(t["AccessionNumber"], "ACC123", "{t}");
        assert_eq!(t["PatientBirthDate"], "20200101", "{t}");
    }
    assert_eq!(oru["obr_18"], "ACC123", "{oru}");
    assert_eq!(
        ris::order_identifier(report, "ACSN").as_deref(),
        Some("ACC123"),
        "{report}"
    );

    // One result: its id (the report's secondary identifier) names the film; MSH-10,
    // the report's own identifier and the SR's and SC's UIDs all derive from it.
    let ids = report["identifier"].as_array().unwrap();
    let result_id = ids
        .iter()
        .find(|i| i["use"] == "secondary")
        .and_then(|i| i["value"].as_str())
        .unwrap_or_else(|| panic!("no result id: {report}"));
    assert_eq!(
        result_id.split('/').nth(2),
        Some(film_uid.as_str()),
        "{result_id}"
    );
    assert_eq!(oru["control_id"], ris::control_id(result_id), "{oru}");
    assert_eq!(
        ids[0]["value"],
        ris::report_identifier(result_id),
        "{report}"
    );
    let derived = ris::answered_uids(result_id, ris::probability(&fhir), &sr_uid);
    assert_eq!(
        derived,
        Some((sr_uid.clone(), sc_uid.clone())),
        "{result_id}"
    );
    let study = &report["imagingStudy"][0]["identifier"]["value"];
    assert_eq!(study, &format!("urn:oid:{STUDY}"), "{report}");
}

/// Two replicas sharing their outbox in PostgreSQL: the second recognises an image
/// the first analysed, and sends what the first queued after the first is gone.
#[test]
fn replicas_sharing_postgresql_send_each_result_once_and_take_over_a_dead_ones_queue() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let pg = Postgres::start();
    let mut pacs = Orthanc::start(dir, "pacs");
    let node = Node::new(dir)
        .flag(
            "--dicom-destination",
            format!("ORTHANC@127.0.0.1:{}", pacs.dicom),
        )
        .flag("--database-url", &pg.url);
    let (a, a_port) = node.start(models.path());
    let (b, b_port) = node.start(models.path());
    let (cr, cr2) = (files.join("cr.dcm"), files.join("cr2.dcm"));
    assert!(store("MODALITY", a_port, &[&cr]).status.success());
    assert_eq!(pacs.wait_count(STUDY, 2, 30).len(), 2);
    // The router sends the same image to the other replica: recognised, not redone.
    assert!(store("MODALITY", b_port, &[&cr]).status.success());
    assert_metrics(&b, &["cxr_dicom_stores_total{outcome=\"duplicate\"} 1"]);
    // A queues results while the PACS is down, then dies; B sends them.
    pacs.stop();
    assert!(store("MODALITY", a_port, &[&cr2]).status.success());
    wait_metric(&[&a], "outcome=\"retried\"", 20);
    // (Killed: a row it held while sending is another's once its claim lapses.)
    drop(a);
    pacs.restart();
    let got = pacs.wait_count(STUDY, 4, 90);
    assert_eq!(got.len(), 4, "{got:?}");
    // (Counted once the association that sent them is done.)
    wait_metric(&[&b], "outcome=\"sent\"} 2", 20);
}

/// Outcomes in PostgreSQL are shared by replicas: an image answered by one is
/// confirmed through the other, and both show the same live matrix.
#[test]
fn replicas_sharing_postgresql_share_answers_and_confirmed_labels() {
    let models = common::models_dir();
    let pg = Postgres::start();
    let args = ["--database-url", pg.url.as_str()];
    let mut a = common::Server::start(models.path(), &args);
    a.discard_logs();
    let mut b = common::Server::start(models.path(), &args);
    b.discard_logs();
    let png = common::png_bytes(&common::gray_image(96, 96, 5));
    let (status, body) = common::tcp_http(
        &a.addr,
        "POST",
        "/predict?model=alpha",
        Some("image/png"),
        &png,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let feedback = format!(
        r#"{{"request_id": "{}", "label": "PNEUMONIA"}}"#,
        answer["request_id"].as_str().unwrap()
    );
    let (status, body) = common::tcp_http(
        &b.addr,
        "POST",
        "/feedback",
        Some("application/json"),
        feedback.as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = common::tcp_http(
        &a.addr,
        "POST",
        "/feedback",
        Some("application/json"),
        feedback.as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("already_recorded"), "{body}");
    let positive = answer["label"] == "PNEUMONIA";
    for s in [&a, &b] {
        let (_, body) = common::tcp_http(&s.addr, "GET", "/models/alpha", None, b"");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let c = &v["live_outcomes"]["confusion"];
        assert_eq!(c["tp"], u64::from(positive), "{v}");
        assert_eq!(c["fn"], u64::from(!positive), "{v}");
    }
}

/// The outbox's contract ([`cxr::delivery::outbox::contract::exercise`], run on
/// SQLite by the unit tests) on PostgreSQL: the same answers, dead letters included.
#[test]
fn the_outbox_contract_holds_on_postgresql() {
    use cxr::delivery::outbox::{Outbox, contract};
    let pg = Postgres::start();
    let open = || Outbox::connect(&pg.url, contract::policy(10)).unwrap();
    contract::exercise(open(), open);
}

/// An outbox made in PostgreSQL before the migrations were versioned (its first
/// schema, with and without the columns added since) opens migrated, its rows kept
/// ([`cxr::delivery::outbox::contract::migrates`], run on SQLite by the unit tests).
#[test]
fn an_unversioned_outbox_opens_migrated_on_postgresql() {
    use cxr::delivery::outbox::{Outbox, contract};
    let pg = Postgres::start();
    contract::migrates(
        || cxr::store::Db::connect(&pg.url).unwrap(),
        || Outbox::connect(&pg.url, contract::policy(10)).unwrap(),
    );
}

/// Rows another replica is claiming (its transaction open, the rows locked) are
/// skipped by a claim meanwhile, not claimed twice (PostgreSQL's `FOR UPDATE SKIP
/// LOCKED`, from the store layer).
#[test]
fn a_claim_skips_the_rows_another_replica_is_claiming_on_postgresql() {
    use cxr::delivery::outbox::{Outbox, contract};
    use cxr::store::{Db, StoreError};
    let pg = Postgres::start();
    let o = Outbox::connect(&pg.url, contract::policy(10)).unwrap();
    let objs = vec![("sr", "1.2.3".to_string(), vec![1u8])];
    assert_eq!(o.add("k", &objs, &["PACS".to_string()]).unwrap(), 1);
    let other = Db::connect(&pg.url).unwrap();
    other
        .transaction(|t| {
            let sql = format!(
                "SELECT id FROM cxr_outbox WHERE state = 'pending'{}",
                t.skip_locked()
            );
            assert_eq!(t.query(&sql, &[])?.len(), 1);
            assert!(o.due(10).unwrap().is_empty());
            Ok::<_, StoreError>(())
        })
        .unwrap();
    // Its transaction over (nothing claimed): due.
    assert_eq!(o.due(10).unwrap().len(), 1);
}

/// Guards issue #43 rows 4 and (b). A destination that takes Secondary Captures but
/// refuses Structured Reports (dcmtk's storescp without a presentation context for
/// them): each SR is refused `--dicom-max-attempts` times, then set aside as a dead
/// letter (listed for the `admin` scope, counted in `/metrics`) and no longer
/// counted against `--dicom-outbox-capacity`, so new images are still taken once
/// the outbox would be "full" of refused objects (row 4; they were retried forever
/// and every new C-STORE was refused A700). The SC queued behind a refused SR goes
/// on the same association, in the same round, without an attempt counted against
/// it (row (b); a refusal used to abort the rest of the round, each counted as a
/// failed attempt).
#[test]
fn objects_a_destination_refuses_become_dead_letters_and_free_the_outbox() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    // dcmtk's storescp as a destination that takes Secondary Captures (and CRs)
    // but not Structured Reports: its association profile has no presentation
    // context for them, so each SR is refused at the association (a presentation
    // context the destination did not accept).
    let pacs = Storescp::start(
        dir,
        "[[TransferSyntaxes]]\n[LE]\nTransferSyntax1 = 1.2.840.10008.1.2.1\nTransferSyntax2 = 1.2.840.10008.1.2\n\n\
         [[PresentationContexts]]\n[NoSR]\nPresentationContext1 = 1.2.840.10008.5.1.4.1.1.7\\LE\n\n\
         [[Profiles]]\n[Default]\nPresentationContexts = NoSR\n",
        "Default",
    );
    let outbox = dir.join("outbox.sqlite");
    let destination = format!("STORESCP@127.0.0.1:{}", pacs.port);
    let (server, port) = Node::new(dir)
        .flag("--dicom-destination", &destination)
        .outbox(&outbox)
        .flag("--dicom-outbox-capacity", 3)
        .flag("--dicom-max-attempts", 3)
        .flag("--api-keys-file", keys_file(dir))
        .start(models.path());
    let (cr, dx, cr2) = (
        files.join("cr.dcm"),
        files.join("dx.dcm"),
        files.join("cr2.dcm"),
    );
    // Two radiographs: 4 objects, over the capacity of 3 once the SRs stay.
    let results = |outcome: &str, n: u32| {
        format!(
            "cxr_dicom_results_total{{destination=\"{destination}\",outcome=\"{outcome}\"}} {n}"
        )
    };
    let dead = |n: u32| results("dead_letter", n);
    assert!(store("MODALITY", port, &[&cr]).status.success());
    // (Its SC sent: one object waits, the refused SR.)
    wait_metric(&[&server], &results("sent", 1), 30);
    assert!(store("MODALITY", port, &[&dx]).status.success());
    wait_metric(&[&server], &dead(2), 60);
    // The outbox holds no waiting object: a third radiograph is taken.
    let third = store("MODALITY", port, &[&cr2]);
    assert!(
        third.status.success() && !String::from_utf8_lossy(&third.stderr).contains("Refused"),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    wait_metric(&[&server], &dead(3), 60);
    // The destination has the three SCs, and no SR.
    assert_eq!(pacs.stored(), 3);
    assert_metrics(
        &server,
        &[
            format!("cxr_dicom_dead_letters{{destination=\"{destination}\"}} 3"),
            format!("cxr_dicom_outbox_depth{{destination=\"{destination}\"}} 0"),
            results("sent", 3),
            // Two refusals retried per SR, and nothing else: the SCs never waited.
            results("retried", 6),
        ],
    );
    // Listed for the admin scope only.
    let (s, v) = dead_letters(&server, READER_KEY);
    assert_eq!(
        (s, v["error_type"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (letters, v) = admin_dead_letters(&server);
    assert_eq!(letters.len(), 3, "{v}");
    for l in &letters {
        assert_eq!(l["destination"], destination.as_str(), "{l}");
        assert_eq!(l["kind"], "sr", "{l}");
        assert_eq!(l["attempts"], 3, "{l}");
        assert!(
            l["last_error"].as_str().unwrap().starts_with(
                "the destination did not accept SOP class 1.2.840.10008.5.1.4.1.1.88.34"
            ),
            "{l}"
        );
        assert!(l["dead_at"].as_str().unwrap() >= l["created_at"].as_str().unwrap());
        // No patient data in a dead letter.
        assert!(!l.to_string().contains("CXR-0001") && !l.to_string().contains("TEST^CXR"));
    }
    // Each SC went in the round of its refused SR: never an attempt counted.
    let sc_attempts: Vec<i64> =
        outbox_column(&outbox, "SELECT attempts FROM outbox WHERE kind = 'sc'");
    assert_eq!(sc_attempts, [0, 0, 0]);
}

/// A STOW-RS server of the test's own (a real HTTP/1.1 socket): answers each POST
/// with what `answer` says for the posted object's SOP class and instance UID
/// (read from its meta group), after `delay`; keeps every (SOP class, UID) posted.
struct StowServer {
    url: String,
    posts: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    answer: std::sync::Arc<std::sync::Mutex<StowAnswer>>,
}

type StowAnswer = Box<dyn Fn(&str, &str) -> (u16, String) + Send>;

const SR_CLASS: &str = "1.2.840.10008.5.1.4.1.1.88.34";
const SC_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";

impl StowServer {
    fn start(delay: Duration, answer: StowAnswer) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/dicom-web", listener.local_addr().unwrap());
        let posts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer = std::sync::Arc::new(std::sync::Mutex::new(answer));
        let (p, a) = (posts.clone(), answer.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (p, a) = (p.clone(), a.clone());
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 65536];
                    let body_start = loop {
                        let Ok(n) = conn.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < body_start + length {
                        let Ok(n) = conn.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = &buf[body_start..];
                    let (class, uid) = (meta_ui(body, 0x0002), meta_ui(body, 0x0003));
                    p.lock().unwrap().push((class.clone(), uid.clone()));
                    std::thread::sleep(delay);
                    let (status, json) = (a.lock().unwrap())(&class, &uid);
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/dicom+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                            json.len()
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        Self { url, posts, answer }
    }

    fn set_answer(&self, answer: StowAnswer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn posts(&self) -> Vec<(String, String)> {
        self.posts.lock().unwrap().clone()
    }

    /// How many times `uid` was posted.
    fn count(&self, uid: &str) -> usize {
        self.posts().iter().filter(|(_, u)| u == uid).count()
    }
}

/// The value of the meta group's UI element (0002,`element`) in a posted Part-10
/// file (explicit VR little endian, as the meta group always is).
fn meta_ui(body: &[u8], element: u16) -> String {
    let mut pattern = vec![0x02, 0x00];
    pattern.extend_from_slice(&element.to_le_bytes());
    pattern.extend_from_slice(b"UI");
    let Some(at) = body.windows(6).position(|w| w == pattern.as_slice()) else {
        return String::new();
    };
    let len = u16::from_le_bytes([body[at + 6], body[at + 7]]) as usize;
    String::from_utf8_lossy(&body[at + 8..at + 8 + len])
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// A STOW-RS response body (PS3.18 10.5.3) listing `uid` as failed (FailureReason
/// `reason`), or as stored with WarningReason `warning`.
fn stow_body(uid: &str, failed: Option<u16>, warning: Option<u16>) -> String {
    match (failed, warning) {
        (Some(r), _) => serde_json::json!({"00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [r]}}]}})
        .to_string(),
        (None, Some(w)) => serde_json::json!({"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081196": {"vr": "US", "Value": [w]}}]}})
        .to_string(),
        (None, None) => "{}".into(),
    }
}

/// Guards issue #43 row 5. STOW-RS answers are read as PS3.18 says: `202 Accepted`
/// (stored, with warnings) is stored and posted once (it used to be posted again
/// and again: only 200 counted); a 409, and a 202 whose FailedSOPSequence lists the
/// instance, are refusals, posted `--dicom-max-attempts` times and then dead
/// letters; a 503 is a failure retried (not a refusal).
#[test]
fn stow_rs_202_is_stored_once_and_409_or_a_failed_instance_is_a_dead_letter() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    // First: the SR stored with a warning (B000H, coercion), the SC refused (409).
    let stow = StowServer::start(
        Duration::ZERO,
        Box::new(|class, uid| {
            if class == SR_CLASS {
                (202, stow_body(uid, None, Some(0xB000)))
            } else {
                (409, stow_body(uid, Some(0x0110), None))
            }
        }),
    );
    let (server, port) = Node::new(dir)
        .flag("--stow-url", &stow.url)
        .outbox(&dir.join("outbox.sqlite"))
        .flag("--dicom-max-attempts", 3)
        .flag("--api-keys-file", keys_file(dir))
        .start(models.path());
    let url = stow.url.clone();
    let results = |outcome: &str, n: u32| {
        format!("cxr_dicom_results_total{{destination=\"{url}\",outcome=\"{outcome}\"}} {n}")
    };
    assert!(
        store("MODALITY", port, &[&files.join("cr.dcm")])
            .status
            .success()
    );
    wait_metric(&[&server], &results("dead_letter", 1), 60);
    // Time for more posts, had any been due.
    std::thread::sleep(Duration::from_secs(5));
    let posts = stow.posts();
    let uid_of = |class: &str| {
        posts
            .iter()
            .find(|(c, _)| c == class)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| panic!("no {class} posted: {posts:?}"))
    };
    let (sr, sc) = (uid_of(SR_CLASS), uid_of(SC_CLASS));
    assert_eq!(stow.count(&sr), 1, "the 202 was posted again: {posts:?}");
    assert_eq!(stow.count(&sc), 3, "{posts:?}");
    assert_metrics(&server, &[results("sent", 1)]);
    let (letters, v) = admin_dead_letters(&server);
    assert_eq!(letters.len(), 1, "{v}");
    assert_eq!(
        (
            letters[0]["sop_instance_uid"].as_str(),
            letters[0]["kind"].as_str()
        ),
        (Some(sc.as_str()), Some("sc"))
    );
    let error = letters[0]["last_error"].as_str().unwrap();
    assert!(
        error.contains("status 409") && error.contains("FailureReason 0110H"),
        "{error}"
    );

    // Then: a 202 that lists the SR as failed (a refusal), and a 503 for the SC (a
    // failure, retried, never a refusal).
    stow.set_answer(Box::new(|class, uid| {
        if class == SR_CLASS {
            (202, stow_body(uid, Some(0xC000), None))
        } else {
            (503, "{}".into())
        }
    }));
    assert!(
        store("MODALITY", port, &[&files.join("dx.dcm")])
            .status
            .success()
    );
    wait_metric(&[&server], &results("dead_letter", 2), 60);
    let (letters, v) = admin_dead_letters(&server);
    assert_eq!(letters.len(), 2, "{v}");
    assert_eq!(letters[0]["kind"], "sr", "{v}");
    assert!(
        letters[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("status 202, FailedSOPSequence FailureReason C000H"),
        "{v}"
    );
    // The SC of the DX keeps being tried (refusals would have set it aside by now).
    std::thread::sleep(Duration::from_secs(8));
    let sc_dx = stow
        .posts()
        .iter()
        .filter(|(c, u)| c == SC_CLASS && *u != sc)
        .count();
    assert!(sc_dx > 3, "the 503 was not retried like a failure: {sc_dx}");
    let (letters, v) = admin_dead_letters(&server);
    assert_eq!(letters.len(), 2, "{v}");
    assert_metrics(
        &server,
        &[format!("cxr_dicom_outbox_depth{{destination=\"{url}\"}} 1")],
    );
}

/// Guards issue #43 row (a). Two replicas share their outbox in PostgreSQL and a
/// STOW-RS destination that takes 25 s per object: the replica sending a round of
/// two holds both for 50 s, beyond the 45 s claim; its claim is renewed before each
/// send, so the other replica never takes (and posts again) an object this one
/// holds. (A claim used to last 45 s from the round's start: the second object, and
/// the first not yet marked, were posted again by the other replica.)
#[test]
fn a_slow_destination_does_not_let_another_replica_send_what_one_holds() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let pg = Postgres::start();
    let stow = StowServer::start(Duration::from_secs(25), Box::new(|_, _| (200, "{}".into())));
    let node = Node::new(dir)
        .flag("--stow-url", &stow.url)
        .flag("--database-url", &pg.url);
    let (a, a_port) = node.start(models.path());
    let (b, _) = node.start(models.path());
    assert!(
        store("MODALITY", a_port, &[&files.join("cr.dcm")])
            .status
            .success()
    );
    let sent = |s: &common::Server| {
        let m = metrics_of(s);
        m.lines()
            .filter(|l| l.starts_with("cxr_dicom_results_total") && l.contains("outcome=\"sent\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    wait_until(&format!("not sent: {:?}", stow.posts()), 120, || {
        sent(&a) + sent(&b) >= 2
    });
    // Time for a late duplicate to arrive.
    std::thread::sleep(Duration::from_secs(5));
    let posts = stow.posts();
    assert_eq!(posts.len(), 2, "posted more than once: {posts:?}");
    assert_ne!(posts[0].1, posts[1].1, "{posts:?}");
}

/// Guards issue #43 row 7. After every result was sent, the outbox's files hold
/// no patient data: not the SQLite file (`secure_delete` overwrites the dropped
/// payloads) nor its write-ahead log (emptied after each round that sent). The
/// files are owner-only (0600). Sent records past `--retention-days` are deleted.
#[test]
fn sent_results_leave_no_patient_data_on_disk_and_old_records_are_pruned() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let pacs = Orthanc::start(dir, "pacs");
    let outbox = dir.join("outbox.sqlite");
    let node = Node::new(dir)
        .flag(
            "--dicom-destination",
            format!("ORTHANC@127.0.0.1:{}", pacs.dicom),
        )
        .outbox(&outbox)
        .flag("--retention-days", 30);
    let (server, port) = node.start(models.path());
    assert!(
        store(
            "MODALITY",
            port,
            &[&files.join("cr.dcm"), &files.join("dx.dcm")]
        )
        .status
        .success()
    );
    assert_eq!(pacs.wait_count(STUDY, 4, 60).len(), 4);
    wait_metric(&[&server], "outcome=\"sent\"} 4", 30);
    let side = |suffix: &str| PathBuf::from(format!("{}{suffix}", outbox.display()));
    let phi = |bytes: &[u8]| {
        [b"TEST^CXR".as_slice(), b"CXR-0001".as_slice()]
            .iter()
            .any(|p| bytes.windows(p.len()).any(|w| w == *p))
    };
    let on_disk = || {
        ["", "-wal"]
            .iter()
            .filter(|s| phi(&std::fs::read(side(s)).unwrap_or_default()))
            .map(|s| format!("outbox.sqlite{s}"))
            .collect::<Vec<_>>()
    };
    // (The log is emptied once the round that sent is over.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !on_disk().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(on_disk(), Vec::<String>::new(), "patient data left in");
    for s in ["", "-wal", "-shm"] {
        let mode = std::fs::metadata(side(s)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "outbox.sqlite{s}");
    }
    drop(server);

    // Two of the records were sent 40 days ago: gone at the next start.
    let conn = rusqlite::Connection::open(&outbox).unwrap();
    conn.execute(
        "UPDATE outbox SET sent_at = sent_at - 40 * 86400000 WHERE kind = 'sc'",
        [],
    )
    .unwrap();
    drop(conn);
    let (_server, _) = node.start(models.path());
    let kinds: Vec<String> = outbox_column(&outbox, "SELECT kind FROM outbox ORDER BY id");
    assert_eq!(kinds, ["sr", "sr"]);
}

/// Guards issue #43 rows 4 and (b), with a failure status. A destination (a
/// pynetdicom SCP) that negotiates SR but answers each SR's C-STORE with 0122H (SOP
/// class not supported): the SR is refused `--dicom-max-attempts` times, then a dead
/// letter whose last error names the status; the SC after it goes on the same
/// association, and is stored once, no attempt counted against it. (A failure
/// status used to abort the rest of the association's round, each counted as a
/// failed attempt, and the SR was retried forever.)
#[test]
fn a_failure_status_refuses_one_object_and_the_association_goes_on() {
    let (tmp, files, models) = setup();
    let dir = tmp.path();
    let log = dir.join("scp.jsonl");
    let scp = PythonScp::start(&log, &[SR_CLASS, "0122"]);
    let outbox = dir.join("outbox.sqlite");
    let destination = format!("REFUSER@127.0.0.1:{}", scp.port);
    let (server, cxr_port) = Node::new(dir)
        .flag("--dicom-destination", &destination)
        .outbox(&outbox)
        .flag("--dicom-max-attempts", 2)
        .flag("--api-keys-file", keys_file(dir))
        .start(models.path());
    assert!(
        store("MODALITY", cxr_port, &[&files.join("cr.dcm")])
            .status
            .success()
    );
    wait_metric(
        &[&server],
        &format!(
            "cxr_dicom_results_total{{destination=\"{destination}\",outcome=\"dead_letter\"}} 1"
        ),
        60,
    );
    std::thread::sleep(Duration::from_secs(3));
    drop(scp);
    let stores: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of =
        |class: &str| -> Vec<&Value> { stores.iter().filter(|s| s["class"] == class).collect() };
    let (srs, scs) = (of(SR_CLASS), of(SC_CLASS));
    assert_eq!((srs.len(), scs.len()), (2, 1), "{stores:?}");
    // The SC went on the association that refused the SR first.
    assert_eq!(scs[0]["association"], srs[0]["association"], "{stores:?}");
    let (letters, v) = admin_dead_letters(&server);
    let letter = &letters[0];
    assert_eq!(
        (
            letter["kind"].as_str(),
            letter["attempts"].as_u64(),
            letter["last_error"].as_str()
        ),
        (
            Some("sr"),
            Some(2),
            Some("C-STORE failed with status 0122H")
        ),
        "{v}"
    );
    let conn =
        rusqlite::Connection::open_with_flags(&outbox, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let sc: (String, i64) = conn
        .query_row(
            "SELECT state, attempts FROM outbox WHERE kind = 'sc'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(sc, ("sent".to_string(), 0));
}
