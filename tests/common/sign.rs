//! Signing keys for the tests, made by openssl (an independent implementation:
//! `scripts/setup.sh --test` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// An ECDSA key made by openssl (`curve`: prime256v1 or secp384r1): the private
/// key's path and the public key's.
pub fn keygen(dir: &Path, name: &str, curve: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let ok = Command::new("openssl")
        .args(["ecparam", "-name", curve, "-genkey", "-noout", "-out"])
        .arg(&key)
        .status()
        .expect("openssl");
    assert!(ok.success());
    let ok = Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    (key, public)
}

/// Runs `cmd`: whether it succeeded, and what it printed.
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("the command runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// PyPI `model_signing` (1.1.x) in `.venv` (`scripts/setup.sh --test`).
pub fn model_signing() -> Command {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.venv/bin/model_signing"
    ))
}
