//! FHIR R4 out, against a real FHIR server: Medplum's FHIR router over its in-memory
//! repository (`tests/fhir_server/server.js`, started here on port 0, no network).
//! Bundles made by `delivery::fhir::bundle` from typed `ReportFacts` (positive,
//! urgent positive, negative, refused) go through `FhirTarget::post`; what the server
//! then holds is read back and validated with fhir.resources' R4 models
//! (`tests/fhir_server/check.py`), references followed (DiagnosticReport.result →
//! Observation, Observation.device → Device). A resend creates nothing twice; the
//! server's refusals (bad token, an invalid resource, an ambiguous conditional
//! create) are refusals with the server's OperationOutcome text; a server that is down
//! or does not answer is a failure to retry. `scripts/setup.sh --test` installs the
//! server and fhir.resources.

mod common;

use std::io::BufRead as _;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use cxr::delivery::ModelFacts;
use cxr::delivery::Order;
use cxr::delivery::Outcome;
use cxr::delivery::Patient;
use cxr::delivery::ReportFacts;
use cxr::delivery::Study;
use cxr::delivery::Verdict;
use cxr::delivery::fhir::FhirTarget;
use cxr::delivery::fhir::Posted;
use cxr::delivery::fhir::bundle;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The FHIR server, killed when dropped.
struct FhirServer {
    _child: Killed,
    url: String,
}

impl FhirServer {
    fn start(token: Option<&str>) -> Self {
        Self::start_on(token, 0)
    }

    /// On `port` (0: any), e.g. the port of a server stopped before.
    fn start_on(token: Option<&str>, port: u16) -> Self {
        let dir = root().join("tests/fhir_server");
        assert!(
            dir.join("node_modules/@medplum/fhir-router").is_dir(),
            "the FHIR server is not installed: run `bash scripts/setup.sh --test`"
        );
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("server.js"))
            .args(["--port", &port.to_string()]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node (scripts/setup.sh --test installs it)");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the FHIR server starts within 60 s");
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the FHIR server did not start: {line:?}"));
        Self {
            _child: Killed(child),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Every DiagnosticReport, Observation and Device it holds, validated as R4,
    /// with the reports' references followed.
    fn check(&self, token: Option<&str>) -> Value {
        let python = root().join("tests/fhir_server/.venv/bin/python");
        assert!(
            python.is_file(),
            "fhir.resources is not installed: run `bash scripts/setup.sh --test`"
        );
        let mut cmd = Command::new(python);
        cmd.arg(root().join("tests/fhir_server/check.py"))
            .arg(&self.url);
        if let Some(t) = token {
            cmd.arg(t);
        }
        let out = cmd.output().expect("run check.py");
        assert!(
            out.status.success(),
            "check.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("check.py prints JSON")
    }
}

impl FhirServer {
    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// How many `kind` resources it holds (a search, as a client would).
    fn count(&self, kind: &str, token: &str) -> usize {
        let auth = format!("Bearer {token}");
        let (status, body) = common::tcp_http_headers(
            self.url.trim_start_matches("http://"),
            "GET",
            &format!("/{kind}?_count=1000"),
            &[("Authorization", auth.as_str())],
            b"",
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["entry"].as_array().map_or(0, Vec::len)
    }
}

fn facts(result_id: &str, outcome: Outcome, urgent: bool) -> ReportFacts {
    ReportFacts {
        result_id: result_id.into(),
        observed_at: "2026-12-07T10:00:00Z".into(),
        patient: Patient {
            id: Some("P-77".into()),
            issuer: Some("St Elsewhere".into()),
            name: Some("Müller^Zoë".into()),
            birth_date: Some("20210304".into()),
            sex: Some("F".into()),
        },
        order: Order {
            accession_number: Some(format!("A-{result_id}")),
            placer_order_number: Some("PL-1".into()),
            filler_order_number: None,
        },
        study: Study {
            study_instance_uid: Some("1.2.826.0.1.3680043.8.498.1".into()),
            series_instance_uid: Some("1.2.826.0.1.3680043.8.498.1.1".into()),
            sop_instance_uid: Some(format!("1.2.826.0.1.3680043.8.498.1.1.{}", result_id.len())),
            modality: Some("CR".into()),
        },
        model: ModelFacts {
            name: "weighted".into(),
            version: "2.0.0".into(),
            sha256: "5e".repeat(32),
        },
        outcome,
        urgent,
    }
}

fn classified(pneumonia: bool, probability: f64) -> Outcome {
    Outcome::Classified {
        pneumonia,
        probability,
        threshold: 0.42,
        threshold_source: cxr::delivery::ThresholdKind::Site,
        verdict: Verdict::Shift,
        ood_score: Some(2.25),
        warnings: vec!["distribution shift: read with caution".into()],
    }
}

fn refused() -> Outcome {
    Outcome::NotAnalysed {
        error_type: "out_of_distribution".into(),
        reason: "the image is unlike the training data".into(),
    }
}

fn body(facts: &ReportFacts) -> Vec<u8> {
    serde_json::to_vec(&bundle(facts)).unwrap()
}

fn report_with<'a>(checked: &'a Value, result_id: &str) -> &'a Value {
    checked["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["identifiers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == result_id)
        })
        .unwrap_or_else(|| panic!("no report for {result_id}: {checked}"))
}

#[tokio::test]
async fn results_are_stored_as_valid_r4_with_resolving_references_once() {
    let server = FhirServer::start(Some("s3cret"));
    let target = FhirTarget::new(&server.url, Some("s3cret".into())).unwrap();
    let urgent = facts("urgent", classified(true, 0.97), true);
    let positive = facts("positive", classified(true, 0.61), false);
    let negative = facts("negative", classified(false, 0.08), false);
    let not_analysed = facts("refused", refused(), false);
    for f in [&urgent, &positive, &negative, &not_analysed] {
        assert_eq!(target.post(&body(f)).await, Posted::Sent, "{}", f.result_id);
    }
    // The example in docs/ris-ehr.md is this Bundle, as sent.
    let example = root().join("target/fhir-example-bundle.json");
    let _ = std::fs::write(
        &example,
        serde_json::to_string_pretty(&bundle(&urgent)).unwrap(),
    );
    // A resend (the answer lost, the process restarted): the same Bundle, nothing new.
    for f in [&urgent, &not_analysed] {
        assert_eq!(target.post(&body(f)).await, Posted::Sent);
    }
    let checked = server.check(Some("s3cret"));
    // One report per result, one Observation per analysed result, one Device for
    // the one model file.
    assert_eq!(checked["counts"]["DiagnosticReport"], 4, "{checked}");
    assert_eq!(checked["counts"]["Observation"], 3, "{checked}");
    assert_eq!(checked["counts"]["Device"], 1, "{checked}");

    let r = report_with(&checked, "urgent");
    assert_eq!(r["status"], "preliminary");
    assert!(r["category"].as_array().unwrap().iter().any(|c| c == "RAD"));
    assert_eq!(r["security"], serde_json::json!(["AIAST"]));
    assert_eq!(r["tags"], serde_json::json!(["suspected-finding"]));
    assert!(
        r["conclusion"]
            .as_str()
            .unwrap()
            .starts_with(cxr::delivery::INTENDED_USE)
    );
    assert_eq!(
        r["imagingStudy"][0]["identifier"]["value"],
        "urn:oid:1.2.826.0.1.3680043.8.498.1"
    );
    assert_eq!(r["basedOn"][0]["identifier"]["value"], "A-urgent");
    assert_eq!(
        r["basedOn"][0]["identifier"]["type"]["coding"][0]["code"],
        "ACSN"
    );
    assert_eq!(r["subject"]["display"], "Zoë Müller");
    let obs = &r["observations"][0];
    assert_eq!(obs["code"], serde_json::json!(["233604007"]));
    assert_eq!(obs["value"], serde_json::json!(["52101004"]));
    assert_eq!(obs["interpretation"], serde_json::json!(["AA"]));
    assert_eq!(obs["security"], serde_json::json!(["AIAST"]));
    assert_eq!(obs["components"]["probability"], 0.97);
    assert_eq!(obs["components"]["threshold"], 0.42);
    assert_eq!(obs["components"]["threshold-source"], "site");
    assert_eq!(
        obs["components"]["ood-verdict"],
        serde_json::json!(["distribution-shift"])
    );
    assert_eq!(obs["components"]["ood-score"], 2.25);
    assert_eq!(obs["derivedFrom"][0]["type"], "ImagingStudy");
    assert_eq!(obs["device"]["names"], serde_json::json!(["cxr weighted"]));
    assert_eq!(
        obs["device"]["versions"],
        serde_json::json!(["2.0.0", "5e".repeat(32)])
    );

    let r = report_with(&checked, "positive");
    assert!(r["tags"].as_array().unwrap().is_empty());
    assert_eq!(
        r["observations"][0]["interpretation"],
        serde_json::json!(["A"])
    );
    let r = report_with(&checked, "negative");
    assert!(r["tags"].as_array().unwrap().is_empty());
    assert_eq!(
        r["observations"][0]["value"],
        serde_json::json!(["2667000"])
    );
    assert_eq!(
        r["observations"][0]["interpretation"],
        serde_json::json!(["N"])
    );
    // The three Observations name the one Device.
    let devices: std::collections::BTreeSet<String> = checked["reports"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["observations"].as_array().unwrap().clone())
        .map(|o| o["device"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(devices.len(), 1);

    let r = report_with(&checked, "refused");
    assert!(r["observations"].as_array().unwrap().is_empty());
    assert!(r["tags"].as_array().unwrap().is_empty());
    let c = r["conclusion"].as_str().unwrap();
    assert!(c.starts_with(cxr::delivery::INTENDED_USE), "{c}");
    assert!(c.contains("the image is unlike the training data"), "{c}");
}

#[tokio::test]
async fn refusals_carry_the_servers_reason_and_failures_are_retried() {
    let server = FhirServer::start(Some("s3cret"));
    let f = facts("r1", classified(true, 0.9), false);

    // A wrong token: refused, as the server said.
    let wrong = FhirTarget::new(&server.url, Some("guess".into())).unwrap();
    let Posted::Refused(reason) = wrong.post(&body(&f)).await else {
        panic!("a wrong token is a refusal")
    };
    assert!(reason.contains("status 401"), "{reason}");

    let target = FhirTarget::new(&server.url, Some("s3cret".into())).unwrap();
    // A resource the server finds invalid: refused with its OperationOutcome's text.
    let mut invalid = bundle(&f);
    invalid["entry"][2]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("code");
    let Posted::Refused(reason) = target.post(&serde_json::to_vec(&invalid).unwrap()).await else {
        panic!("an invalid resource is a refusal")
    };
    assert!(reason.contains("status 400"), "{reason}");
    assert!(reason.contains("DiagnosticReport.code"), "{reason}");

    // Two reports already hold the result's identifier (another writer's): the
    // conditional create is ambiguous, and the server refuses it.
    let mut unconditional = bundle(&f);
    for e in unconditional["entry"].as_array_mut().unwrap() {
        e["request"].as_object_mut().unwrap().remove("ifNoneExist");
    }
    let unconditional = serde_json::to_vec(&unconditional).unwrap();
    assert_eq!(target.post(&unconditional).await, Posted::Sent);
    assert_eq!(target.post(&unconditional).await, Posted::Sent);
    let Posted::Refused(reason) = target.post(&body(&f)).await else {
        panic!("an ambiguous conditional create is a refusal")
    };
    assert!(
        reason.ends_with("status 412: Multiple resources found matching condition"),
        "{reason}"
    );

    // Down: a failure to retry.
    let url = server.url.clone();
    drop(server);
    let down = FhirTarget::new(&url, Some("s3cret".into())).unwrap();
    assert!(
        matches!(down.post(&body(&f)).await, Posted::Transient(_)),
        "a server that is down is retried"
    );

    // Connected, but no answer in time: a failure to retry.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut slow =
        FhirTarget::new(&format!("http://{}", silent.local_addr().unwrap()), None).unwrap();
    slow.timeout = Duration::from_millis(500);
    let Posted::Transient(reason) = slow.post(&body(&f)).await else {
        panic!("no answer is retried")
    };
    assert!(reason.contains("no answer"), "{reason}");
}

/// `cxr-serve --fhir-url` with the token from the environment, an outbox in `dir`
/// and the keys of `common::ops`.
fn serve(
    models: &std::path::Path,
    dir: &std::path::Path,
    fhir_url: &str,
    token: &str,
    extra: &[&str],
) -> common::Server {
    // The token travels by the environment only (never a flag on a command line).
    let outbox = dir.join("outbox.sqlite");
    let keys = common::ops::keys(dir);
    let mut args: Vec<String> = vec![
        "--min-image-side".into(),
        "16".into(),
        "--api-keys-file".into(),
        keys,
        "--outbox".into(),
        outbox.display().to_string(),
        "--fhir-url".into(),
        fhir_url.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let s = common::Server::start_with_env(models, &args, "addr", &[("CXR_FHIR_TOKEN", token)]);
    s.wait_ready();
    s
}

fn predict(server: &common::Server, image: &[u8], accession: &str) -> Value {
    let (status, body) = common::ops::call(
        &server.addr,
        "POST",
        &format!("/predict?accession_number={accession}&patient_id=P-42"),
        Some(common::ops::ADMIN),
        "image/png",
        image,
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn metric(server: &common::Server, name: &str, outcome: &str) -> f64 {
    let (_, m) = common::tcp_http(&server.addr, "GET", "/metrics", None, b"");
    m.lines()
        .filter(|l| {
            l.starts_with(name)
                && l.contains("destination=\"fhir:")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The real binary: a `/predict` answer with the order's identifiers becomes a
/// DiagnosticReport on the FHIR server; queued while the server is down, kept
/// across a restart of cxr-serve, delivered once the server is back, and never
/// twice (the same image for the same order again adds nothing); a refused image is
/// a report saying why.
#[test]
fn predict_with_an_order_is_delivered_once_across_a_down_server_and_a_restart() {
    let models = common::models_dir();
    let dir = tempfile::tempdir().unwrap();
    // A port with no server on it (one was there; it is stopped).
    let port = FhirServer::start(Some("tok")).port();
    let url = format!("http://127.0.0.1:{port}");
    let image = common::png_bytes(&common::gray_image(128, 100, 3));

    let mut s = serve(models.path(), dir.path(), &url, "tok", &[]);
    s.discard_logs();
    let answer = predict(&s, &image, "ACC-1");
    // Tried, failed (nothing listens), to be retried.
    common::ops::wait_for("a failed FHIR send", || {
        metric(&s, "cxr_dicom_results_total", "retried") >= 1.0
    });
    assert_eq!(metric(&s, "cxr_dicom_results_total", "sent"), 0.0);
    drop(s);

    let fhir = FhirServer::start_on(Some("tok"), port);
    let mut s = serve(models.path(), dir.path(), &url, "tok", &[]);
    s.discard_logs();
    common::ops::wait_for("the report on the FHIR server", || {
        fhir.count("DiagnosticReport", "tok") == 1
    });
    // Again: the same image for the same order is the same result.
    predict(&s, &image, "ACC-1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(metric(&s, "cxr_dicom_results_total", "sent"), 1.0);
    let checked = fhir.check(Some("tok"));
    assert_eq!(checked["counts"]["DiagnosticReport"], 1, "{checked}");
    let r = &checked["reports"][0];
    assert_eq!(r["basedOn"][0]["identifier"]["value"], "ACC-1");
    assert_eq!(r["subject"]["identifier"]["value"], "P-42");
    assert_eq!(r["security"], serde_json::json!(["AIAST"]));
    // The report says what /predict answered.
    let label = answer["label"].as_str().unwrap_or_default().to_string();
    let obs = &r["observations"][0];
    let expected = if label == "PNEUMONIA" {
        "52101004"
    } else {
        "2667000"
    };
    assert_eq!(obs["value"], serde_json::json!([expected]), "{answer}");
    let p = answer["probabilities"]["PNEUMONIA"].as_f64();
    let stored = obs["components"]["probability"].as_f64().unwrap();
    assert!((stored - p.unwrap()).abs() < 1e-6, "{stored} {answer}");
    assert_eq!(checked["counts"]["Device"], 1);

    // A refused image (blank) for another order: a report that says why, no finding.
    let blank = image::GrayImage::from_pixel(128, 100, image::Luma([0]));
    let (status, body) = common::ops::call(
        &s.addr,
        "POST",
        "/predict?accession_number=ACC-3&patient_id=P-42",
        Some(common::ops::ADMIN),
        "image/png",
        &common::png_bytes(&blank),
    );
    assert_eq!(status, 422, "{body}");
    common::ops::wait_for("the refusal's report", || {
        fhir.count("DiagnosticReport", "tok") == 2
    });
    let checked = fhir.check(Some("tok"));
    let r = checked["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["basedOn"][0]["identifier"]["value"] == "ACC-3")
        .unwrap_or_else(|| panic!("{checked}"));
    assert!(r["observations"].as_array().unwrap().is_empty(), "{r}");
    let c = r["conclusion"].as_str().unwrap();
    assert!(c.starts_with(cxr::delivery::INTENDED_USE), "{c}");
    assert!(c.contains("Not analysed (blank_image)"), "{c}");
}

/// The real binary: a FHIR server that refuses (a wrong token) makes the result a
/// dead letter with the server's reason, listed at `/dicom/outbox/dead-letters`.
#[test]
fn a_refused_bundle_is_a_dead_letter_with_the_servers_reason() {
    let models = common::models_dir();
    let dir = tempfile::tempdir().unwrap();
    let fhir = FhirServer::start(Some("right"));
    let mut s = serve(
        models.path(),
        dir.path(),
        &fhir.url,
        "wrong",
        &["--dicom-max-attempts", "1"],
    );
    s.discard_logs();
    predict(
        &s,
        &common::png_bytes(&common::gray_image(128, 100, 4)),
        "ACC-2",
    );
    common::ops::wait_for("a dead letter", || {
        metric(&s, "cxr_dicom_results_total", "dead_letter") >= 1.0
    });
    let (status, dead) = common::ops::call(
        &s.addr,
        "GET",
        "/dicom/outbox/dead-letters",
        Some(common::ops::ADMIN),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200, "{dead}");
    let letters = dead
        .as_array()
        .cloned()
        .or_else(|| dead["dead_letters"].as_array().cloned())
        .unwrap_or_default();
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(letters[0]["kind"], "fhir", "{dead}");
    let reason = letters[0]["last_error"].as_str().unwrap();
    assert!(reason.contains("status 401: Unauthorized"), "{reason}");
    assert_eq!(fhir.count("DiagnosticReport", "right"), 0);
}

/// A child process, killed when dropped (a failing test leaves none behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program of Debian's dcmtk (`scripts/setup.sh --test`).
fn dcmtk(name: &str) -> Command {
    let path = ["/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/setup.sh --test"));
    Command::new(path)
}

/// The real binary as a DICOM node: films from pydicom (`tests/hl7/make_films.py`:
/// a patient and an order with characters that need care, UTF-8) sent by dcmtk's
/// storescu become DiagnosticReports whose references carry the films' own
/// attributes (the mapping of docs/ris-ehr.md); the lateral view, refused, becomes a
/// report saying why. The node's DICOM results go to dcmtk's storescp.
#[test]
fn the_dicom_nodes_results_map_the_films_attributes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let python = root().join(".venv/bin/python");
    let films = dir.join("films");
    let made = Command::new(&python)
        .arg(root().join("tests/hl7/make_films.py"))
        .arg(&films)
        .status()
        .expect("python (scripts/setup.sh --test installs pydicom)");
    assert!(made.success());
    let study_uid = {
        let out = Command::new(&python)
            .args([
                "-c",
                "import sys, pydicom; print(pydicom.dcmread(sys.argv[1]).StudyInstanceUID)",
            ])
            .arg(films.join("film.dcm"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let scp_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir.join("scp")).unwrap();
    let _scp = Killed(
        dcmtk("storescp")
            .args(["-aet", "STORESCP", "-od"])
            .arg(dir.join("scp"))
            .arg(scp_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let fhir = FhirServer::start(Some("tok"));
    let peers = dir.join("peers.toml");
    std::fs::write(
        &peers,
        "[[peers]]\nae_title = \"MODALITY\"\nhosts = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let peers = peers.display().to_string();
    let destination = format!("STORESCP@127.0.0.1:{scp_port}");
    let models = common::models_dir();
    let mut s = serve(
        models.path(),
        dir,
        &fhir.url,
        "tok",
        &[
            "--dicom-port",
            "0",
            "--dicom-peers-file",
            &peers,
            "--dicom-destination",
            &destination,
        ],
    );
    let node = s.wait_log_field("dicom_addr");
    s.discard_logs();
    let node_port = node.rsplit(':').next().unwrap();
    for film in ["film.dcm", "lateral.dcm"] {
        let out = dcmtk("storescu")
            .args(["-aet", "MODALITY", "-aec", "CXR", "127.0.0.1", node_port])
            .arg(films.join(film))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "storescu: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    common::ops::wait_for("two reports", || fhir.count("DiagnosticReport", "tok") == 2);
    let checked = fhir.check(Some("tok"));
    for r in checked["reports"].as_array().unwrap() {
        let subject = &r["subject"];
        assert_eq!(subject["identifier"]["value"], "PAT|7", "{r}");
        assert_eq!(subject["identifier"]["assigner"]["display"], "HOSP");
        assert_eq!(subject["display"], "Dr Zoë Q Müller&Co Jr");
        let orders: Vec<(String, String)> = r["basedOn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let i = &o["identifier"];
                (
                    i["type"]["coding"][0]["code"].as_str().unwrap().to_string(),
                    i["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want = [("ACSN", "ACC^1"), ("PLAC", "PL~7"), ("FILL", "FL-9")];
        assert_eq!(
            orders,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
        assert!(r["category"].as_array().unwrap().iter().any(|c| c == "RAD"));
    }
    let analysed = checked["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| !r["observations"].as_array().unwrap().is_empty())
        .unwrap_or_else(|| panic!("the film's report: {checked}"));
    assert_eq!(
        analysed["imagingStudy"][0]["identifier"]["value"],
        format!("urn:oid:{study_uid}")
    );
    assert!(
        analysed["category"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "CR")
    );
    let refused = checked["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["observations"].as_array().unwrap().is_empty())
        .unwrap_or_else(|| panic!("the lateral's report: {checked}"));
    let c = refused["conclusion"].as_str().unwrap();
    assert!(c.contains("Not analysed ("), "{c}");
}
