//! An operator's calls on the real binary: a keys file with an operator (every
//! scope) and a reader (predict, models), requests with either key, and waiting.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Server, tcp_http_headers};

/// The operator's key: predict, models, feedback and admin.
pub const ADMIN: &str = "cxr_repository_admin_key";
/// The reader's key: predict and models.
pub const READER: &str = "cxr_repository_reader_key";

/// Writes the keys file into `dir`; its path.
pub fn keys(dir: &Path) -> String {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!(
            "[[callers]]\nname = \"ops\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\", \"models\", \"feedback\", \"admin\"]\n\n\
             [[callers]]\nname = \"reader\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\", \"models\"]\n",
            cxr::digest::sha256_hex(ADMIN.as_bytes()),
            cxr::digest::sha256_hex(READER.as_bytes())
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// A request with `key` (none: no `Authorization`); the status and the body (JSON,
/// or the text as a string).
pub fn call(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    ct: &str,
    body: &[u8],
) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", ct)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (s, b) = tcp_http_headers(addr, method, path, &headers, body);
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

/// A JSON POST by the operator.
pub fn admin(addr: &str, path: &str, body: Value) -> (u16, Value) {
    call(
        addr,
        "POST",
        path,
        Some(ADMIN),
        "application/json",
        body.to_string().as_bytes(),
    )
}

/// A GET by the reader, which must answer 200.
pub fn get(addr: &str, path: &str) -> Value {
    let (s, v) = call(addr, "GET", path, Some(READER), "text/plain", b"");
    assert_eq!(s, 200, "{path}: {v}");
    v
}

/// Waits (up to 60 s) until `ok`.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends the server `SIGHUP` (a rescan of its models folder).
pub fn hup(server: &Server) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
