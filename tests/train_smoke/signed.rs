//! `cxr-train --sign-key`: every version a run exports (the model and its INT8 copy)
//! is signed after its last file, and the bundles verify with `cxr-sign
//! --verify-with` and with PyPI `model_signing` (an independent implementation).

use std::path::Path;
use std::process::Command;

use super::common::sign::{keygen, model_signing, run};
use super::{args, make_data};

/// `cxr-sign --verify-with SIGNERS --models-dir DIR`: whether every version
/// verified, and what it printed.
fn cxr_sign_verifies(dir: &Path, signers: &Path) -> (bool, String) {
    run(Command::new(env!("CARGO_BIN_EXE_cxr-sign"))
        .arg("--verify-with")
        .arg(signers)
        .arg("--models-dir")
        .arg(dir))
}

/// `model_signing verify key DIR --signature DIR/NAME.sig` (the flat layout: the
/// bundle covers NAME's files, the run folder's others are not in it).
fn model_signing_verifies(dir: &Path, name: &str, public: &Path) -> (bool, String) {
    run(model_signing()
        .args(["verify", "key"])
        .arg(dir)
        .arg("--signature")
        .arg(dir.join(format!("{name}.sig")))
        .arg("--public_key")
        .arg(public)
        .arg("--ignore_unsigned_files"))
}

#[test]
fn a_signed_export_verifies_with_cxr_sign_and_model_signing() {
    super::common::ort_env();
    let (data, out, keys) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    make_data(data.path());
    let (key, public) = keygen(keys.path(), "release", "prime256v1");
    let signers = keys.path().join("signers.toml");
    std::fs::write(
        &signers,
        format!(
            "[[signer]]\nname = \"release\"\npublic_key_file = \"{}\"\n",
            public.display()
        ),
    )
    .unwrap();
    let key_arg = key.to_str().unwrap();
    let done = cxr::train::run(&args(
        data.path(),
        out.path(),
        "weighted",
        &["--sign-key", key_arg],
    ))
    .unwrap()
    .expect("finished");
    // The model and its INT8 copy, each with its bundle.
    let signed: Vec<&str> = done.signed.iter().map(|s| s.model.as_str()).collect();
    let version = &done.card.version;
    assert_eq!(
        signed,
        [
            format!("weighted@{version}"),
            format!("weighted-int8@{version}")
        ]
    );
    for name in ["weighted", "weighted-int8"] {
        assert!(out.path().join(format!("{name}.sig")).is_file());
    }
    // Both verify as cxr-serve checks them before loading ...
    let (ok, said) = cxr_sign_verifies(out.path(), &signers);
    assert!(ok, "{said}");
    assert!(
        said.contains("weighted@") && said.contains("weighted-int8@"),
        "{said}"
    );
    // ... and with model_signing, over every file the version wrote (the OOD model
    // and test scores included: signed after the last of them).
    for name in ["weighted", "weighted-int8"] {
        let (ok, said) = model_signing_verifies(out.path(), name, &public);
        assert!(ok, "{name}: {said}");
    }
    // A file the card does not name (only the signature covers it) changed after
    // the export: both refuse, cxr-sign naming it.
    let scores = out.path().join("weighted.test-scores.json");
    let mut bytes = std::fs::read(&scores).unwrap();
    bytes.push(b'\n');
    std::fs::write(&scores, bytes).unwrap();
    assert!(!model_signing_verifies(out.path(), "weighted", &public).0);
    let (ok, said) = cxr_sign_verifies(out.path(), &signers);
    assert!(
        !ok && said.contains("file digest mismatch: `weighted.test-scores.json`"),
        "{said}"
    );
}

#[test]
fn an_unreadable_sign_key_fails_before_training() {
    let (data, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_data(data.path());
    let bad = out.path().join("not-a-key.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let err = cxr::train::run(&args(
        data.path(),
        out.path(),
        "weighted",
        &["--sign-key", bad.to_str().unwrap()],
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("not-a-key.pem"), "{err}");
    assert!(
        !out.path().join(cxr::train::STATE_FILE).exists(),
        "no step ran"
    );
}
