//! The DICOM node against a real PACS: Debian's Orthanc (one reached by C-STORE,
//! one by DICOMweb STOW-RS through its DICOMweb plugin), dcmtk's echoscu and
//! storescu as the modality, radiographs made by pydicom (make_instances.py), the
//! results read back by pydicom (read_result.py) and checked by dciodvfy. And the
//! folder door (`cxr-serve --job`) on a folder of mixed files.

#[path = "../common/mod.rs"]
mod common;
mod door;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: run scripts/setup.sh --test (Debian packages orthanc, orthanc-dicomweb, dcmtk, dicom3tools)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

/// A running Orthanc.
struct Orthanc {
    child: Child,
    http: u16,
    dicom: u16,
    config: PathBuf,
}

impl Orthanc {
    fn start(dir: &Path, name: &str) -> Self {
        Self::start_with(dir, name, serde_json::json!({}))
    }

    /// [`Orthanc::start`] with `extra` settings over the test's own.
    fn start_with(dir: &Path, name: &str, extra: Value) -> Self {
        let (http, dicom) = (free_port(), free_port());
        let db = dir.join(format!("{name}-db"));
        std::fs::create_dir_all(&db).unwrap();
        let plugin = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("orthanc-dicomweb is not installed: run scripts/setup.sh --test");
        let config = dir.join(format!("{name}.json"));
        let mut settings = serde_json::json!({
            "Name": name,
            "StorageDirectory": db,
            "IndexDirectory": db,
            "HttpPort": http,
            "DicomPort": dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
            "DicomCheckCalledAet": false,
        });
        for (k, v) in extra.as_object().unwrap() {
            settings[k] = v.clone();
        }
        std::fs::write(&config, serde_json::to_string_pretty(&settings).unwrap()).unwrap();
        let mut o = Self {
            child: Self::spawn(&config),
            http,
            dicom,
            config,
        };
        o.wait_up();
        o
    }

    fn spawn(config: &Path) -> Child {
        Command::new(tool("Orthanc"))
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Orthanc")
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/system").is_none() {
            assert!(Instant::now() < deadline, "Orthanc did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.config);
        self.wait_up();
    }

    fn get_bytes(&self, path: &str) -> Option<Vec<u8>> {
        let (status, body) =
            common::tcp_http_bytes(&format!("127.0.0.1:{}", self.http), "GET", path, &[], b"")?;
        (status == 200).then_some(body)
    }

    fn get(&self, path: &str) -> Option<Value> {
        serde_json::from_slice(&self.get_bytes(path)?).ok()
    }

    /// Every instance's (Orthanc id, SOP Instance UID, Modality), in the study.
    fn study_instances(&self, study_uid: &str) -> Vec<(String, String, String)> {
        let Some(ids) = self.get("/instances") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for id in ids.as_array().unwrap() {
            let id = id.as_str().unwrap();
            let t = self
                .get(&format!("/instances/{id}/simplified-tags"))
                .unwrap();
            if t["StudyInstanceUID"] == study_uid {
                out.push((
                    id.to_string(),
                    t["SOPInstanceUID"].as_str().unwrap().to_string(),
                    t["Modality"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    /// Waits (up to `secs`) until the study holds `n` instances.
    fn wait_count(&self, study: &str, n: usize, secs: u64) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.study_instances(study);
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn dcmtk(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool(name)).args(args).output().expect(name)
}

fn store(ae: &str, port: u16, files: &[&Path]) -> std::process::Output {
    let mut args = vec!["-aet".to_string(), ae.into(), "-aec".into(), "CXR".into()];
    args.extend(["127.0.0.1".to_string(), port.to_string()]);
    args.extend(files.iter().map(|f| f.display().to_string()));
    Command::new(tool("storescu"))
        .args(&args)
        .output()
        .expect("storescu")
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

const STUDY: &str = "1.2.826.0.1.3680043.8.498.11111111111111111111";

fn start_cxr(models: &Path, extra: &[String]) -> (common::Server, u16) {
    let mut s = common::Server::start(models, extra);
    let dicom = s.wait_log_field("dicom_addr");
    s.discard_logs();
    let port = dicom.rsplit(':').next().unwrap().parse().unwrap();
    (s, port)
}

#[test]
fn a_pacs_gets_each_radiographs_sr_and_sc_in_its_study_once_and_after_an_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let files = instances(dir);
    let models = common::models_dir();
    let mut store_pacs = Orthanc::start(dir, "pacs");
    let stow_pacs = Orthanc::start(dir, "web");
    let peers = dir.join("peers.toml");
    std::fs::write(
        &peers,
        "[[peers]]\nae_title = \"MODALITY\"\nhosts = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let outbox = dir.join("outbox.sqlite");
    let args: Vec<String> = vec![
        "--dicom-port".into(),
        "0".into(),
        "--dicom-ae-title".into(),
        "CXR".into(),
        "--dicom-peers-file".into(),
        peers.display().to_string(),
        "--dicom-destination".into(),
        format!("ORTHANC@127.0.0.1:{}", store_pacs.dicom),
        "--stow-url".into(),
        format!("http://127.0.0.1:{}/dicom-web", stow_pacs.http),
        "--dicom-outbox".into(),
        outbox.display().to_string(),
    ];
    let (server, port) = start_cxr(models.path(), &args);

    // C-ECHO: a known peer succeeds; an unknown calling AE is rejected.
    let echo = dcmtk(
        "echoscu",
        &[
            "-aet",
            "MODALITY",
            "-aec",
            "CXR",
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    assert!(
        echo.status.success(),
        "{}",
        String::from_utf8_lossy(&echo.stderr)
    );
    let echo = dcmtk(
        "echoscu",
        &[
            "-aet",
            "STRANGER",
            "-aec",
            "CXR",
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    assert!(!echo.status.success());
    assert!(
        String::from_utf8_lossy(&echo.stderr).contains("Calling AE Title Not Recognized"),
        "{}",
        String::from_utf8_lossy(&echo.stderr)
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
        let out = Command::new(tool("storescu"))
            .args(["-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1"])
            .arg(pacs.dicom.to_string())
            .args([&cr, &dx, &lateral])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sent = store("MODALITY", port, &[&cr, &dx, &lateral]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // A CT slice: no presentation context is accepted for its SOP class.
    let refused = store("MODALITY", port, &[&ct]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("No presentation context"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
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
    let m = common::tcp_http(&server.addr, "GET", "/metrics", None, b"").1;
    assert!(
        m.contains("cxr_dicom_stores_total{outcome=\"duplicate\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cxr_dicom_stores_total{outcome=\"analysed\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("cxr_dicom_stores_total{outcome=\"not_analysed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cxr_dicom_associations_total{outcome=\"rejected\"} 1"),
        "{m}"
    );

    // The PACS is down: a new CR is accepted, its results wait in the outbox, and
    // reach the PACS after it is back, across a restart of cxr-serve.
    store_pacs.stop();
    let sent = store("MODALITY", port, &[&cr2]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let metrics = || common::tcp_http(&server.addr, "GET", "/metrics", None, b"").1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics().contains(&format!(
        "cxr_dicom_results_total{{destination=\"ORTHANC@127.0.0.1:{}\",outcome=\"retried\"}}",
        store_pacs.dicom
    )) {
        assert!(
            Instant::now() < deadline,
            "no retry counted:\n{}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metrics().contains("cxr_dicom_outbox_depth"));
    // The STOW-RS PACS, never down, has them before this replica stops.
    assert_eq!(stow_pacs.wait_count(STUDY, 10, 60).len(), 10);
    server.sigterm();
    drop(server);
    store_pacs.restart();
    let (_server, _port) = start_cxr(models.path(), &args);
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
    let mut fresh = args.clone();
    let n = fresh.len();
    fresh[n - 1] = dir.join("other-outbox.sqlite").display().to_string();
    let (server, port) = start_cxr(models.path(), &fresh);
    assert!(store("MODALITY", port, &[&cr]).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::tcp_http(&server.addr, "GET", "/metrics", None, b"")
        .1
        .contains("outcome=\"sent\"} 2")
    {
        assert!(Instant::now() < deadline, "the replica did not send");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(store_pacs.study_instances(STUDY).len(), 10);
}

#[test]
fn the_folder_job_writes_json_sr_and_sc_per_image_and_a_line_per_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let files = instances(dir);
    std::fs::remove_file(files.join("cr2.dcm")).unwrap();
    std::fs::create_dir_all(files.join("more")).unwrap();
    std::fs::write(
        files.join("more/film.png"),
        common::png_bytes(&common::gray_image(96, 96, 3)),
    )
    .unwrap();
    std::fs::write(files.join("notes.txt"), "not an image").unwrap();
    let models = common::models_dir();
    let out = dir.join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args([
            "--device",
            "cpu",
            "--intra-threads",
            "1",
            "--min-image-side",
            "16",
        ])
        .arg("--models-dir")
        .arg(models.path())
        .arg("--job")
        .arg(&files)
        .arg(&out)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
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

/// Orthanc as the router, with the shipped settings and Lua script: a CR stored in
/// it reaches cxr, and cxr's SR and SC come back into its study.
#[test]
fn orthanc_with_the_shipped_configuration_routes_radiographs_to_cxr() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let files = instances(dir);
    let models = common::models_dir();
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
    let peers = dir.join("peers.toml");
    let pacs_ae = shipped["DicomAet"].as_str().unwrap();
    std::fs::write(&peers, format!("[[peers]]\nae_title = \"{pacs_ae}\"\n")).unwrap();
    let args: Vec<String> = vec![
        "--dicom-port".into(),
        cxr_port.to_string(),
        "--dicom-ae-title".into(),
        ae.clone(),
        "--dicom-peers-file".into(),
        peers.display().to_string(),
        "--dicom-destination".into(),
        format!("{pacs_ae}@127.0.0.1:{}", pacs.dicom),
        "--dicom-outbox".into(),
        dir.join("outbox.sqlite").display().to_string(),
    ];
    let (_server, _) = start_cxr(models.path(), &args);
    let out = Command::new(tool("storescu"))
        .args(["-aet", "MODALITY", "-aec", pacs_ae, "127.0.0.1"])
        .arg(pacs.dicom.to_string())
        .arg(files.join("cr.dcm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = pacs.wait_count(STUDY, 3, 60);
    let mut modalities: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
    modalities.sort_unstable();
    assert_eq!(modalities, ["CR", "OT", "SR"], "{got:?}");
}

/// A PostgreSQL server of Debian's, started for a test on a free port (by
/// `pg_ctl`, stopped by it when dropped).
struct Postgres {
    pg_ctl: PathBuf,
    data: PathBuf,
    root: bool,
    url: String,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// `program` run as the data directory's owner: the server refuses to run as
    /// root, so as the `postgres` user then.
    fn command(&self, program: &Path) -> Command {
        owner_command(self.root, program)
    }

    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .find(|p| p.join("initdb").exists())
            })
            .expect("PostgreSQL is not installed: run scripts/setup.sh --test (Debian package postgresql)");
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let data = dir.path().join("data");
        let init = owner_command(root, &bin.join("initdb"))
            .args(["-U", "cxr", "--auth=trust", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let pg = Self {
            pg_ctl: bin.join("pg_ctl"),
            data,
            root,
            url: format!("postgres://cxr@127.0.0.1:{port}/postgres"),
            _dir: dir,
        };
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            pg._dir.path().display()
        );
        let started = pg
            .command(&pg.pg_ctl)
            .arg("-D")
            .arg(&pg.data)
            .args(["-o", &options, "-l"])
            .arg(pg._dir.path().join("server.log"))
            .args(["-w", "-t", "30", "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&started.stdout),
            std::fs::read_to_string(pg._dir.path().join("server.log")).unwrap_or_default()
        );
        pg
    }
}

fn owner_command(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Two replicas sharing their outbox in PostgreSQL: the second recognises an image
/// the first analysed, and sends what the first queued after the first is gone.
#[test]
fn replicas_sharing_postgresql_send_each_result_once_and_take_over_a_dead_ones_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let files = instances(dir);
    let models = common::models_dir();
    let pg = Postgres::start();
    let mut pacs = Orthanc::start(dir, "pacs");
    let peers = dir.join("peers.toml");
    std::fs::write(&peers, "[[peers]]\nae_title = \"MODALITY\"\n").unwrap();
    let args: Vec<String> = vec![
        "--dicom-port".into(),
        "0".into(),
        "--dicom-peers-file".into(),
        peers.display().to_string(),
        "--dicom-destination".into(),
        format!("ORTHANC@127.0.0.1:{}", pacs.dicom),
        "--database-url".into(),
        pg.url.clone(),
    ];
    let (a, a_port) = start_cxr(models.path(), &args);
    let (b, b_port) = start_cxr(models.path(), &args);
    let metric = |s: &common::Server, m: &str| {
        common::tcp_http(&s.addr, "GET", "/metrics", None, b"")
            .1
            .contains(m)
    };
    let (cr, cr2) = (files.join("cr.dcm"), files.join("cr2.dcm"));
    assert!(store("MODALITY", a_port, &[&cr]).status.success());
    assert_eq!(pacs.wait_count(STUDY, 2, 30).len(), 2);
    // The router sends the same image to the other replica: recognised, not redone.
    assert!(store("MODALITY", b_port, &[&cr]).status.success());
    assert!(metric(
        &b,
        "cxr_dicom_stores_total{outcome=\"duplicate\"} 1"
    ));
    // A queues results while the PACS is down, then dies; B sends them.
    pacs.stop();
    assert!(store("MODALITY", a_port, &[&cr2]).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metric(&a, "outcome=\"retried\"") {
        assert!(Instant::now() < deadline, "A never tried");
        std::thread::sleep(Duration::from_millis(200));
    }
    // (Killed: a row it held while sending is another's once its claim lapses.)
    drop(a);
    pacs.restart();
    let got = pacs.wait_count(STUDY, 4, 90);
    assert_eq!(got.len(), 4, "{got:?}");
    // (Counted once the association that sent them is done.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metric(&b, "outcome=\"sent\"} 2") {
        assert!(Instant::now() < deadline, "B did not count its sends");
        std::thread::sleep(Duration::from_millis(200));
    }
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
