//! Who may ask and the record of every answer, through the real app: API keys and
//! scopes, the separate metrics listener, the audit trail in the log and the file
//! (one record per image, every field, rotation, a failed write is a 503); and the
//! real binary with all three on real sockets.

mod audit;
#[path = "../common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::http::{get, json, multipart, raw, send};
use cxr::audit::Audit;
use cxr::http::auth::ApiKeys;
use sha2::{Digest, Sha256};

const KEY_RIS: &str = "cxr_key-of-the-ris-gateway";
const KEY_DASH: &str = "cxr_key-of-the-dashboard";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `ris` may predict and read models; `dashboard` may only read models.
fn keys_toml() -> String {
    format!(
        "[[callers]]\nname = \"ris\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\", \"models\"]\n\n\
         [[callers]]\nname = \"dashboard\"\nkey_sha256 = \"{}\"\nscopes = [\"models\"]\n",
        hex(&Sha256::digest(KEY_RIS)),
        hex(&Sha256::digest(KEY_DASH))
    )
}

fn keyed(mut req: Request<Body>, name: &str, value: &str) -> Request<Body> {
    req.headers_mut().insert(
        name.parse::<header::HeaderName>().unwrap(),
        value.parse().unwrap(),
    );
    req
}

fn png() -> Vec<u8> {
    common::png_bytes(&common::gray_image(40, 32, 3))
}

/// The whole line of a Prometheus sample, or None.
fn metric_line(text: &str, sample: &str) -> Option<String> {
    text.lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(k, _)| k == sample))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_predict_and_models_and_leave_operations_open() {
    let keys = ApiKeys::parse(&keys_toml(), false).unwrap();
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_api_keys(keys)
    });
    let app = &t.app;
    let predict = || raw("/predict", "image/png", png());

    // No key: 401 with a challenge and no error code (RFC 6750 §3.1).
    let (s, h, b) = send(app, predict()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&b)["error_type"], "unauthorized");
    assert_eq!(h[header::WWW_AUTHENTICATE], r#"Bearer realm="cxr""#);
    // A wrong key, in either header: 401 invalid_token.
    for req in [
        keyed(predict(), "authorization", "Bearer cxr_not-a-key"),
        keyed(predict(), "x-api-key", "cxr_not-a-key"),
        // The hash in the file is not a key.
        keyed(
            predict(),
            "authorization",
            &format!("Bearer {}", hex(&Sha256::digest(KEY_RIS))),
        ),
        // A key sent with another scheme is not a bearer key (counted as missing).
        keyed(predict(), "authorization", &format!("Basic {KEY_RIS}")),
    ] {
        let (s, h, b) = send(app, req).await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(json(&b)["error_type"], "unauthorized");
        let challenge = h[header::WWW_AUTHENTICATE].to_str().unwrap().to_string();
        assert!(challenge.starts_with("Bearer "), "{challenge}");
    }
    // The right key, in either header and any scheme case: 200.
    for req in [
        keyed(predict(), "authorization", &format!("Bearer {KEY_RIS}")),
        keyed(predict(), "authorization", &format!("bearer {KEY_RIS}")),
        keyed(predict(), "x-api-key", KEY_RIS),
    ] {
        let (s, _, b) = send(app, req).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        assert!(json(&b)["label"].is_string());
    }
    // A key without the `predict` scope: 403, no challenge.
    let (s, h, b) = send(
        app,
        keyed(predict(), "authorization", &format!("Bearer {KEY_DASH}")),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(json(&b)["error_type"], "forbidden");
    assert!(h.get(header::WWW_AUTHENTICATE).is_none());
    // ... which may read the models.
    for uri in ["/models", "/models/alpha"] {
        let (s, _, _) = send(app, keyed(get(uri), "x-api-key", KEY_DASH)).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        let (s, _, _) = send(app, get(uri)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
    }
    // Operations stay open.
    for uri in ["/health", "/ready", "/docs", "/openapi.json", "/metrics"] {
        let (s, _, _) = send(app, get(uri)).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
    let (_, _, b) = send(app, get("/metrics")).await;
    let text = String::from_utf8_lossy(&b);
    for (sample, n) in [
        // No key (once), `Basic` (not a bearer key), /models and /models/alpha.
        (r#"cxr_auth_refused_total{reason="missing"}"#, 4),
        (r#"cxr_auth_refused_total{reason="invalid"}"#, 3),
        (r#"cxr_auth_refused_total{reason="forbidden"}"#, 1),
        (r#"cxr_requests_total{path="/predict",status="401"}"#, 5),
        (r#"cxr_requests_total{path="/predict",status="403"}"#, 1),
        (r#"cxr_requests_total{path="/predict",status="200"}"#, 3),
    ] {
        assert_eq!(
            metric_line(&text, sample),
            Some(format!("{sample} {n}")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_alone_serves_metrics() {
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.without_public_metrics()
    });
    let (s, _, b) = send(&t.app, get("/metrics")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(json(&b)["error_type"], "not_found");
    let (s, _, _) = send(&t.app, raw("/predict", "image/png", png())).await;
    assert_eq!(s, StatusCode::OK);
    let admin = cxr::build_admin_app(t.state.clone());
    let (s, h, b) = send(&admin, get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8_lossy(&b);
    let sample = r#"cxr_requests_total{path="/predict",status="200"}"#;
    assert_eq!(metric_line(&text, sample), Some(format!("{sample} 1")));
    // Nothing else is on the admin listener.
    let (s, _, _) = send(&admin, raw("/predict", "image/png", png())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = send(&admin, get("/models")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// The binary: a key made by `--new-api-key`, the keys file, `--metrics-port`, and
/// `--audit-log`, on real sockets.
#[test]
fn the_binary_with_keys_metrics_port_and_audit_file() {
    let bin = env!("CARGO_BIN_EXE_cxr-serve");
    let out = Command::new(bin)
        .args(["--new-api-key", "ris"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let entry = String::from_utf8(out.stdout).unwrap();
    let key = entry
        .lines()
        .find_map(|l| l.strip_prefix("# key: "))
        .expect("the key is printed")
        .to_string();
    assert!(!entry.contains(&format!("key_sha256 = \"{key}\"")));

    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys.toml");
    std::fs::write(&keys, &entry).unwrap();
    let audit = work.path().join("audit.jsonl");
    let dir = common::models_dir();
    let mut server = common::Server::start(
        dir.path(),
        &[
            "--metrics-port".as_ref(),
            "0".as_ref(),
            "--api-keys-file".as_ref(),
            keys.as_os_str(),
            "--audit-log".as_ref(),
            audit.as_os_str(),
        ] as &[&std::ffi::OsStr],
    );
    let addr = server.addr.clone();
    let metrics_addr = server.startup_field("metrics_addr").unwrap();
    server.wait_ready();
    // The real server's geometry gate: 64 px sides and up.
    let img = common::png_bytes(&common::gray_image(128, 100, 4));
    let (s, _) = common::tcp_http(&addr, "POST", "/predict", Some("image/png"), &img);
    assert_eq!(s, 401);
    let bearer = format!("Bearer {key}");
    let (s, body) = common::tcp_http_headers(
        &addr,
        "POST",
        "/predict",
        &[("Content-Type", "image/png"), ("Authorization", &bearer)],
        &img,
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(common::tcp_http(&addr, "GET", "/metrics", None, b"").0, 404);
    let (s, text) = common::tcp_http(&metrics_addr, "GET", "/metrics", None, b"");
    assert_eq!(s, 200);
    assert!(
        text.contains(r#"cxr_requests_total{path="/predict",status="200"} 1"#),
        "{text}"
    );
    let records = std::fs::read_to_string(&audit).unwrap();
    // The answer's record, and the refusal of the request without a key.
    assert_eq!(records.lines().count(), 2, "{records}");
    assert!(records.contains(r#""caller":"ris""#), "{records}");
    assert!(
        records.contains(r#""event":"auth_refused","#) && records.contains(r#""reason":"missing""#),
        "{records}"
    );
    assert!(!records.contains(&key));

    server.sigterm();
    let (rest, exited_0) = server.finish();
    assert!(exited_0, "{rest:?}");
    // The audit line is in the log too, and the key never is.
    assert!(
        rest.iter().any(|l| l.contains(r#""target":"cxr::audit""#)),
        "{rest:?}"
    );
    assert!(!rest.iter().any(|l| l.contains(&key)));
}

#[test]
fn an_open_server_warns_once_and_a_bad_keys_file_stops_start_up() {
    let dir = common::models_dir();
    let server = common::Server::start::<&str>(dir.path(), &[]);
    let warnings: Vec<String> = server
        .startup
        .iter()
        .filter(|v| v["level"] == "WARN")
        .map(|v| v["fields"]["message"].as_str().unwrap_or("").to_string())
        .collect();
    drop(server);
    // The start-up log now runs to the API port's opening, after the models load
    // (their own warnings: the test models have no OOD model and are unsigned).
    let open: Vec<&String> = warnings
        .iter()
        .filter(|w| {
            !w.starts_with("no out-of-distribution model")
                && !w.starts_with("model loads without a verified signature")
        })
        .collect();
    assert_eq!(open.len(), 1, "{warnings:?}");
    assert!(open[0].contains("open to anyone"), "{warnings:?}");

    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys.json");
    std::fs::write(&keys, r#"{"callers": []}"#).unwrap();
    let err = common::serve_fails(
        dir.path(),
        &[std::ffi::OsStr::new("--api-keys-file"), keys.as_os_str()],
    );
    assert!(
        err.contains("keys.json") && err.contains("no callers"),
        "{err}"
    );
}

/// The real binary under a file size limit (`prlimit --fsize`): the audit file fills
/// up mid-record. Requests whose records do not fit are refused 503
/// `audit_unavailable` (a multi-image request whole), the server lives on, and every
/// line of the file parses: one per answer given, none torn.
#[test]
fn an_audit_file_that_fills_mid_record_keeps_whole_lines_only() {
    use std::io::BufRead;
    let dir = common::models_dir();
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit.jsonl");
    let mut child = Command::new("prlimit")
        .arg("--fsize=1800")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_cxr-serve"))
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
        .args([
            "--log-format",
            "json",
            "--intra-threads",
            "1",
            "--min-image-side",
            "16",
        ])
        .arg("--audit-log")
        .arg(&audit)
        .arg("--models-dir")
        .arg(dir.path())
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs cxr-serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.ok()?).ok()?;
            v["fields"]["addr"].as_str().map(str::to_string)
        })
        .expect("the server logs its address");
    std::thread::spawn(move || for _ in lines {});
    let mut answered = 0;
    let mut refused = 0;
    for i in 0..6 {
        let img = common::png_bytes(&common::gray_image(40, 32, i));
        let (status, body) = common::tcp_http(&addr, "POST", "/predict", Some("image/png"), &img);
        match status {
            200 => answered += 1,
            503 => {
                assert_eq!(json(body.as_bytes())["error_type"], "audit_unavailable");
                refused += 1;
            }
            s => panic!("{s}: {body}"),
        }
    }
    assert!(
        answered >= 1 && refused >= 1,
        "{answered} answered, {refused} refused"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.ends_with('\n'), "a torn last line: {text:?}");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(records.len(), answered);
    assert_eq!(common::tcp_http(&addr, "GET", "/health", None, b"").0, 200);
    let _ = child.kill();
    let _ = child.wait();
}
