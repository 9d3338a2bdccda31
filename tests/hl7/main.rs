//! Results to the RIS as HL7 v2.5.1 ORU^R01 over MLLP (issue #46), through the real
//! `cxr-serve` binary: a real MLLP listener (python-hl7's asyncio server,
//! `listener.py`) ACKs and records each message, which hl7apy parses and validates
//! against v2.5.1 ORU^R01 (VALIDATION_LEVEL.STRICT); the DICOM node's results go to
//! a real storage SCP (dcmtk's storescp) as well; the films are made by pydicom
//! (`make_films.py`). The fields are checked against the source DICOM and
//! `/predict`'s answers.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::ops::{ADMIN, call};

use common::{free_port, python, root, tool};

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The MLLP listener (python-hl7 + hl7apy) on `port`, recording to `record`.
fn listener(port: u16, record: &Path) -> Proc {
    let child = common::spawn_mllp_listener(port, record);
    wait_port(port, "the MLLP listener");
    Proc(child)
}

/// dcmtk's storescp: the DICOM node's destination for its SR and SC.
fn storescp(dir: &Path) -> (Proc, u16) {
    let out = dir.join("scp-out");
    std::fs::create_dir_all(&out).unwrap();
    let port = free_port();
    let child = Command::new(tool("storescp"))
        .args(["-aet", "STORESCP", "-od"])
        .arg(&out)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp");
    wait_port(port, "storescp");
    (Proc(child), port)
}

/// The films (make_films.py) in `dir/films`.
fn films(dir: &Path) -> PathBuf {
    let films = dir.join("films");
    let ok = Command::new(python())
        .arg(root().join("tests/hl7/make_films.py"))
        .arg(&films)
        .status()
        .unwrap();
    assert!(ok.success(), "make_films.py failed");
    films
}

/// Every message the listener recorded, in order.
fn received(record: &Path) -> Vec<Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (up to 60 s) until the listener recorded `n` messages.
fn wait_received(record: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = received(record);
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} message(s) received, {n} expected",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn store(port: u16, file: &Path) {
    let out = common::storescu("MODALITY", port, &[file]);
    assert!(
        out.status.success(),
        "storescu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dicom_text(file: &Path, keyword: &str) -> String {
    let out = Command::new(python())
        .args([
            "-c",
            "import sys, pydicom; print(str(pydicom.dcmread(sys.argv[1]).get(sys.argv[2], '')))",
        ])
        .arg(file)
        .arg(keyword)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

fn metric(server: &common::Server, name: &str) -> f64 {
    common::metrics_of(server)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The OBX of `code` (OBX-3.1), if any.
fn obx<'a>(m: &'a Value, code: &str) -> Option<&'a Value> {
    m["fields"]["obx"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["code"][0] == code)
}

fn obx_text(m: &Value, code: &str) -> String {
    obx(m, code).unwrap_or_else(|| panic!("no OBX {code}: {}", m["raw"]))["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What every ORU says the same way: valid (hl7apy, strict), v2.5.1 ORU^R01,
/// UTF-8 declared, preliminary, the intended use, the model.
fn check_common(m: &Value, card: &Value) {
    assert_eq!(m["errors"], serde_json::json!([]), "hl7apy: {}", m["raw"]);
    let f = &m["fields"];
    assert_eq!(f["structure"], "ORU^R01^ORU_R01");
    assert_eq!(f["version"], "2.5.1");
    assert_eq!(f["charset"], "UNICODE UTF-8");
    assert_eq!(f["obr_25"], "P");
    assert_eq!(f["nte"], serde_json::json!([cxr::delivery::INTENDED_USE]));
    for o in f["obx"].as_array().unwrap() {
        assert_eq!(o["status"], "P", "{o}");
    }
    assert_eq!(
        obx_text(m, "cxr-model"),
        format!(
            "{} {}",
            card["name"].as_str().unwrap(),
            card["version"].as_str().unwrap()
        )
    );
    assert_eq!(obx_text(m, "cxr-model-sha256"), card["onnx"]["sha256"]);
}

/// The finding's value (`Present`/`Absent`) and OBX-8.
fn finding(m: &Value) -> (String, String) {
    let o = obx(m, "233604007").unwrap_or_else(|| panic!("no finding: {}", m["raw"]));
    assert_eq!(
        o["code"],
        serde_json::json!(["233604007", "Pneumonia", "SCT"])
    );
    assert_eq!(o["type"], "CWE");
    (
        o["value"][1].as_str().unwrap().to_string(),
        o["flag"].as_str().unwrap().to_string(),
    )
}

fn control_ids(msgs: &[Value]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for m in msgs {
        *n.entry(m["fields"]["control_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    n
}

/// Guards issue #46 (HL7): every analysed or refused instance of the DICOM node,
/// and `/predict` answers given the order's identifiers, reach the RIS as one valid
/// ORU^R01 each, with the source's patient and order (escaped, the PN reordered as
/// an XPN), the study, the finding and its probability, threshold and model; a
/// positive result at or above `--urgent-at` is flagged (OBR-5, counted in
/// `cxr_urgent_results_total`), a negative or refused one never; an AR is a dead
/// letter with its reason; a message queued while the listener is down is
/// delivered once after both it and cxr-serve restart; a resent image is not sent
/// again.
#[test]
fn the_ris_gets_one_valid_oru_per_result_flagged_when_urgent_and_after_an_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let films = films(dir);
    let (film, lateral, film2) = (
        films.join("film.dcm"),
        films.join("lateral.dcm"),
        films.join("film2.dcm"),
    );
    let models = common::models_dir();
    let record = dir.join("received.jsonl");
    let hl7_port = free_port();
    let mut mllp = Some(listener(hl7_port, &record));
    let (_scp, scp_port) = storescp(dir);
    let peers = dir.join("peers.toml");
    std::fs::write(
        &peers,
        "[[peers]]\nae_title = \"MODALITY\"\nhosts = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let args: Vec<String> = [
        "--dicom-port",
        "0",
        "--dicom-ae-title",
        "CXR",
        "--dicom-peers-file",
        &peers.display().to_string(),
        "--dicom-destination",
        &format!("STORESCP@127.0.0.1:{scp_port}"),
        "--hl7-destination",
        &format!("127.0.0.1:{hl7_port}"),
        "--outbox",
        &dir.join("outbox.sqlite").display().to_string(),
        "--urgent-at",
        "0.000001",
        "--dicom-max-attempts",
        "1",
        "--api-keys-file",
        &common::ops::keys(dir),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (server, port) = common::start_node(models.path(), &args);
    let (_, listed) = call(
        &server.addr,
        "GET",
        "/models",
        Some(ADMIN),
        "text/plain",
        b"",
    );
    let card = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["default"] == true)
        .unwrap()["card"]
        .clone();

    // The DICOM node: an analysed film and a refused lateral view, one ORU each.
    store(port, &film);
    store(port, &lateral);
    let msgs = wait_received(&record, 2);
    let by_sop = |m: &Value| obx(m, "cxr-not-analysed").is_none();
    let analysed = msgs.iter().find(|m| by_sop(m)).expect("the film's ORU");
    let refused = msgs.iter().find(|m| !by_sop(m)).expect("the lateral's ORU");
    for m in [analysed, refused] {
        check_common(m, &card);
        let f = &m["fields"];
        // PID from the source's patient module: the ID with its issuer, the PN as
        // an XPN (suffix before prefix), values unescaped back to the source's.
        assert_eq!(f["pid_3"], serde_json::json!(["PAT|7", "", "", "HOSP"]));
        assert_eq!(
            f["pid_5"],
            serde_json::json!(["Müller&Co", "Zoë", "Q", "Jr", "Dr"])
        );
        assert_eq!(f["pid_7"], dicom_text(&film, "PatientBirthDate"));
        assert_eq!(f["pid_8"], "F");
        assert_eq!(f["orc_1"], "RE");
        assert_eq!(
            f["obr_2"],
            dicom_text(&film, "PlacerOrderNumberImagingServiceRequest")
        );
        assert_eq!(
            f["obr_3"],
            dicom_text(&film, "FillerOrderNumberImagingServiceRequest")
        );
        assert_eq!(f["obr_18"], dicom_text(&film, "AccessionNumber"));
        assert_eq!(obx_text(m, "110180"), dicom_text(&film, "StudyInstanceUID"));
        // Escaped on the wire.
        let raw = m["raw"].as_str().unwrap();
        assert!(raw.contains("PAT\\F\\7^^^HOSP|"), "{raw}");
        assert!(raw.contains("|Müller\\T\\Co^Zoë^Q^Jr^Dr|"), "{raw}");
        assert!(raw.contains("|PL\\R\\7|FL-9|"), "{raw}");
    }
    let (value, flag) = finding(analysed);
    let positive = value == "Present";
    assert_eq!(flag, if positive { "A" } else { "N" });
    // Urgent at P >= 1e-6: every positive film; never a negative one.
    assert_eq!(analysed["fields"]["obr_5"], if positive { "S" } else { "" });
    assert_eq!(obx_text(analysed, "cxr-threshold-source"), "card");
    assert!(obx(analysed, "cxr-probability").is_some());
    assert!(obx(analysed, "cxr-ood").is_some());
    // The refusal says why; no finding, never urgent.
    assert!(obx(refused, "233604007").is_none());
    assert!(
        obx_text(refused, "cxr-not-analysed").starts_with("lateral_view: "),
        "{}",
        refused["raw"]
    );
    assert_eq!(refused["fields"]["obr_5"], "");
    // The same image again: already analysed, nothing sent again.
    store(port, &film);

    // /predict with the order's identifiers: delivered; positive at a threshold
    // under its probability (urgent), negative above it (not urgent).
    let dicom = std::fs::read(&film2).unwrap();
    let predict = |query: &str| {
        let (s, v) = call(
            &server.addr,
            "POST",
            &format!("/predict?{query}"),
            Some(ADMIN),
            "application/dicom",
            &dicom,
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let plain = predict("");
    let p = plain["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    assert!(
        p > 1e-5 && p < 0.99999,
        "P(PNEUMONIA) {p}: the test needs room either side"
    );
    let order = "accession_number=ACC-P&patient_id=PID-P&study_instance_uid=1.2.3.9";
    let pos = predict(&format!("{order}&threshold=0.00001"));
    let neg = predict(&format!("{order}&threshold=0.99999"));
    assert_eq!(
        (pos["label"].as_str(), neg["label"].as_str()),
        (Some("PNEUMONIA"), Some("NORMAL"))
    );
    // Without identifiers, and resent with the same: nothing more.
    predict("threshold=0.00001");
    predict(&format!("{order}&threshold=0.00001"));
    let msgs = wait_received(&record, 4);
    std::thread::sleep(Duration::from_secs(2));
    let msgs_now = received(&record);
    assert_eq!(
        msgs_now.len(),
        4,
        "a resend or an order-less answer was delivered"
    );
    for (m, answer, urgent) in [(&msgs[2], &pos, true), (&msgs[3], &neg, false)] {
        check_common(m, &card);
        let f = &m["fields"];
        assert_eq!(f["pid_3"], serde_json::json!(["PID-P"]));
        assert_eq!(f["obr_18"], "ACC-P");
        assert_eq!(obx_text(m, "110180"), "1.2.3.9");
        // Another patient ID than the upload's: none of the upload's
        // demographics (HL7's null for the required name).
        assert_eq!(f["pid_5"], serde_json::json!(["\"\""]));
        assert_eq!(f["pid_7"], "");
        let p_sent: f64 = obx_text(m, "cxr-probability").parse().unwrap();
        assert!((p_sent - answer["probabilities"]["PNEUMONIA"].as_f64().unwrap()).abs() < 1e-6);
        let t_sent: f64 = obx_text(m, "cxr-threshold").parse().unwrap();
        assert!((t_sent - answer["threshold"].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(obx_text(m, "cxr-threshold-source"), "query");
        assert_eq!(
            finding(m),
            if urgent {
                ("Present".into(), "A".into())
            } else {
                ("Absent".into(), "N".into())
            }
        );
        assert_eq!(f["obr_5"], if urgent { "S" } else { "" });
    }
    // The identifiers as multipart text parts, beside the image.
    let boundary = "cxr-hl7-test";
    let mut body = Vec::new();
    for (name, value) in [("accession_number", "ACC-M"), ("patient_id", "PAT|7")] {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.dcm\"\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&dicom);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (s, _) = call(
        &server.addr,
        "POST",
        "/predict?threshold=0.99999",
        Some(ADMIN),
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    );
    assert_eq!(s, 200);
    let msgs = wait_received(&record, 5);
    let m = &msgs[4];
    check_common(m, &card);
    assert_eq!(m["fields"]["obr_18"], "ACC-M");
    // The upload's own patient ID: its demographics and study come along.
    assert_eq!(
        m["fields"]["pid_3"],
        serde_json::json!(["PAT|7", "", "", "HOSP"])
    );
    assert_eq!(m["fields"]["pid_5"][1], "Zoë");
    assert_eq!(
        obx_text(m, "110180"),
        dicom_text(&film2, "StudyInstanceUID")
    );
    // A refused upload with the order's identifiers: its ORU says why, not urgent.
    let (s, v) = call(
        &server.addr,
        "POST",
        "/predict?accession_number=ACC-L&patient_id=PAT%7C7&threshold=0.00001",
        Some(ADMIN),
        "application/dicom",
        &std::fs::read(&lateral).unwrap(),
    );
    assert_eq!(
        (s, v["error_type"].as_str()),
        (422, Some("lateral_view")),
        "{v}"
    );
    let msgs = wait_received(&record, 6);
    let m = &msgs[5];
    check_common(m, &card);
    assert_eq!(m["fields"]["obr_18"], "ACC-L");
    assert!(obx(m, "233604007").is_none());
    assert_eq!(
        obx_text(m, "cxr-not-analysed"),
        format!("lateral_view: {}", v["error"].as_str().unwrap())
    );
    assert_eq!(m["fields"]["obr_5"], "");
    let urgent_count = 1 + usize::from(positive);
    assert_eq!(
        metric(&server, "cxr_urgent_results_total"),
        urgent_count as f64
    );

    // An AR: a dead letter with the listener's reason, not retried.
    predict("accession_number=ACC-R&patient_id=REFUSE-9");
    let msgs = wait_received(&record, 7);
    assert!(msgs[6]["ack"].as_str().unwrap().contains("MSA|AR|"));
    let letters = || {
        let (s, v) = call(
            &server.addr,
            "GET",
            "/dicom/outbox/dead-letters",
            Some(ADMIN),
            "text/plain",
            b"",
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    common::ops::wait_for("the AR's dead letter", || {
        !letters()["dead_letters"].as_array().unwrap().is_empty()
    });
    let v = letters();
    let letter = &v["dead_letters"][0];
    assert_eq!(letter["kind"], "oru");
    assert_eq!(letter["destination"], format!("hl7:127.0.0.1:{hl7_port}"));
    assert_eq!(letter["sop_instance_uid"], msgs[6]["fields"]["control_id"]);
    let reason = letter["last_error"].as_str().unwrap();
    assert!(
        reason.contains("MSA-1 AR") && reason.contains("unknown patient REFUSE-9"),
        "{reason}"
    );

    // The listener down: the next film's ORU waits in the outbox, through a
    // restart of cxr-serve, and is delivered once both are back.
    drop(mllp.take());
    store(port, &film2);
    let depth = format!("cxr_dicom_outbox_depth{{destination=\"hl7:127.0.0.1:{hl7_port}\"}} 1");
    common::ops::wait_for("the ORU queued", || {
        common::metrics_of(&server).contains(&depth)
    });
    drop(server);
    let _mllp = listener(hl7_port, &record);
    let (server, _) = common::start_node(models.path(), &args);
    let msgs = wait_received(&record, 8);
    check_common(&msgs[7], &card);
    assert_eq!(msgs[7]["fields"]["pid_3"][0], "PAT|7");
    std::thread::sleep(Duration::from_secs(3));
    let all = received(&record);
    assert_eq!(all.len(), 8, "a message was delivered twice");
    assert!(
        control_ids(&all).values().all(|n| *n == 1),
        "{:?}",
        control_ids(&all)
    );
    // CXR_HL7_CAPTURE=FILE keeps the messages (docs/ris-ehr.md's example).
    if let Some(path) = std::env::var_os("CXR_HL7_CAPTURE") {
        let text: Vec<String> = all
            .iter()
            .map(|m| m["raw"].as_str().unwrap().replace('\r', "\n"))
            .collect();
        std::fs::write(path, text.join("\n")).unwrap();
    }
    let depth0 = format!("cxr_dicom_outbox_depth{{destination=\"hl7:127.0.0.1:{hl7_port}\"}} 0");
    common::ops::wait_for("the outbox emptied", || {
        common::metrics_of(&server).contains(&depth0)
    });
}

/// Guards issue #46 (HL7, the folder door): `cxr-serve --job IN OUT` with
/// `--hl7-destination` sends one valid ORU per DICOM instance, analysed or refused
/// (none for a PNG, which has no patient), before it exits; run again over the same
/// folder and outbox, nothing is sent twice.
#[test]
fn the_folder_job_sends_one_oru_per_dicom_instance_before_it_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let films = films(dir);
    std::fs::remove_file(films.join("film2.dcm")).unwrap();
    std::fs::write(
        films.join("photo.png"),
        common::png_bytes(&common::gray_image(96, 96, 3)),
    )
    .unwrap();
    let models = common::models_dir();
    let record = dir.join("received.jsonl");
    let hl7_port = free_port();
    let _mllp = listener(hl7_port, &record);
    let (dest, outbox) = (
        format!("127.0.0.1:{hl7_port}"),
        dir.join("outbox.sqlite").display().to_string(),
    );
    let extra = [
        "--hl7-destination",
        dest.as_str(),
        "--outbox",
        outbox.as_str(),
    ];
    let job = || common::job(models.path(), &films, &dir.join("out"), &extra);
    let stdout = job();
    assert!(!stdout.contains("not yet delivered"), "{stdout}");
    // Delivered before the job ended: recorded already.
    let msgs = received(&record);
    assert_eq!(msgs.len(), 2, "{stdout}");
    for m in &msgs {
        assert_eq!(m["errors"], serde_json::json!([]), "hl7apy: {}", m["raw"]);
        assert_eq!(m["fields"]["pid_3"][0], "PAT|7");
        assert_eq!(m["fields"]["nte"][0], cxr::delivery::INTENDED_USE);
    }
    assert_eq!(
        msgs.iter()
            .filter(|m| obx(m, "cxr-not-analysed").is_some())
            .count(),
        1
    );
    job();
    assert_eq!(received(&record).len(), 2, "the second run sent again");
}
