//! The result of one film at the RIS and the EHR as well as in the PACS: a real MLLP
//! listener (`tests/hl7/listener.py`: python-hl7, hl7apy) and a real FHIR R4 server
//! (`tests/fhir_server/server.js`: Medplum's router), and the identities that tie
//! the ORU, the DiagnosticReport and the SR and SC to one result, re-derived here
//! as the code derives them (not by calling it).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest as _;

use crate::common::{root, tcp_http};

/// A process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The MLLP listener on `port`, recording each message it ACKs to `record`.
pub fn mllp_listener(port: u16, record: &Path) -> Killed {
    let child = crate::common::spawn_mllp_listener(port, record);
    wait_port(port, "the MLLP listener", 20);
    Killed(child)
}

/// Waits (up to `secs`) until something listens on `port`.
pub fn wait_port(port: u16, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The FHIR server (no token) and its address (`127.0.0.1:PORT`).
pub fn fhir_server() -> (Killed, String) {
    let dir = root().join("tests/fhir_server");
    assert!(
        dir.join("node_modules/@medplum/fhir-router").is_dir(),
        "the FHIR server is not installed: run `bash scripts/setup.sh --test`"
    );
    let mut child = Command::new("node")
        .arg(dir.join("server.js"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("the FHIR server did not start: {line:?}"))
        .to_string();
    (Killed(child), format!("127.0.0.1:{port}"))
}

/// Every message the listener recorded.
pub fn messages(record: &Path) -> Vec<Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every DiagnosticReport the FHIR server holds (a search, as a client would).
pub fn reports(fhir: &str) -> Vec<Value> {
    let (status, body) = tcp_http(fhir, "GET", "/DiagnosticReport?_count=1000", None, b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["entry"]
        .as_array()
        .map(|e| e.iter().map(|e| e["resource"].clone()).collect())
        .unwrap_or_default()
}

fn sha256(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// The first 128 bits of SHA-256(`name`), marked name-based (version 5 layout).
fn name_bits(name: &str) -> u128 {
    let mut b: [u8; 16] = sha256(name)[..16].try_into().unwrap();
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    u128::from_be_bytes(b)
}

/// MSH-10 of a result: `CXR` + 17 hex digits of SHA-256(result id).
pub fn control_id(result_id: &str) -> String {
    let hex: String = sha256(result_id)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("CXR{}", &hex[..17])
}

/// The DiagnosticReport's own identifier of a result.
pub fn report_identifier(result_id: &str) -> String {
    let u = uuid::Uuid::from_u128(name_bits(&format!("cxr report {result_id}")));
    format!("urn:uuid:{u}")
}

/// The SOP Instance UIDs (SR, SC) an answered result's objects get (no
/// `--uid-root`): from the result id and what was answered (label, P(PNEUMONIA)
/// as f32 bits, the OOD verdict). The report carries P(PNEUMONIA) to 6 decimals,
/// so every f32 that rounds to it is tried: `None` when none gives `sr_uid`.
pub fn answered_uids(result_id: &str, probability: f64, sr_uid: &str) -> Option<(String, String)> {
    let mut p = ((probability - 1e-6) as f32).to_bits();
    while f64::from(f32::from_bits(p)) <= probability + 1e-6 {
        for label in ["NORMAL", "PNEUMONIA"] {
            for verdict in ["in", "shift", "unscored"] {
                let seed = format!("{result_id}/answered/{label}/{p}/{verdict}");
                let uid = |what: &str| format!("2.25.{}", name_bits(&format!("{seed}/{what}")));
                if uid("sr") == sr_uid {
                    return Some((uid("sr"), uid("sc")));
                }
            }
        }
        p += 1;
    }
    None
}

/// A DiagnosticReport's order identifier of `code` (ACSN: the accession number).
pub fn order_identifier(report: &Value, code: &str) -> Option<String> {
    report["basedOn"].as_array()?.iter().find_map(|o| {
        let i = &o["identifier"];
        (i["type"]["coding"][0]["code"] == code).then(|| i["value"].as_str().unwrap().to_string())
    })
}

/// P(PNEUMONIA) of the one Observation the FHIR server holds.
pub fn probability(fhir: &str) -> f64 {
    let (status, body) = tcp_http(fhir, "GET", "/Observation?_count=1000", None, b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let obs = v["entry"].as_array().expect("observations");
    assert_eq!(obs.len(), 1, "{v}");
    obs[0]["resource"]["component"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"]["coding"][0]["code"] == "probability")
        .and_then(|c| c["valueQuantity"]["value"].as_f64())
        .unwrap_or_else(|| panic!("no probability: {v}"))
}
