//! The page for people (`/`), in a real browser: Debian's chromium, headless, driven
//! by `tests/ui/ui_check.js` (puppeteer-core, which never downloads a browser) against
//! the real binary on port 0 over writer-made tiny models. It uploads a PNG and a
//! DICOM, checks every variant's label and confidence shown equal the API's answer to
//! the same bytes, toggles the heatmap, checks the models tab against `/models`, and
//! shows the API's message for a junk upload; with API keys on, the 401 first. When
//! the variants shown disagree on a film's label or verdict, the film's row opens
//! with one sentence naming each; the models tab opens with the variants side by side.
//! Screenshots go to `target/ui-shots/` (git-ignored). `scripts/setup.sh --test`
//! installs chromium and the Node packages.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A PNG, a DICOM (12-bit CR) and a junk "PNG" in `dir`.
fn inputs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let png = dir.join("film.png");
    std::fs::write(&png, common::png_bytes(&common::gray_image(128, 100, 3))).unwrap();
    let g = common::dicom::test_gray(128, 100, 5);
    let spec = common::dicom::Spec::new(100, 128, 12, common::dicom::stored(&g, |v| 16 * v));
    let dcm = dir.join("film.dcm");
    std::fs::write(&dcm, common::dicom::build(&spec)).unwrap();
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\n this is not an image").unwrap();
    (png, dcm, junk)
}

fn run_check(addr: &str, shots: &Path, files: &[&Path], extra: &[&str]) {
    let script = root().join("tests/ui/ui_check.js");
    assert!(
        root().join("tests/ui/node_modules/puppeteer-core").is_dir(),
        "puppeteer-core is not installed: run `bash scripts/setup.sh --test`"
    );
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .args(["--url", &format!("http://{addr}")])
        .arg("--shots")
        .arg(shots);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    cmd.args(extra);
    let out = cmd
        .output()
        .expect("run node (scripts/setup.sh --test installs it)");
    assert!(
        out.status.success(),
        "ui_check.js failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_page_shows_what_the_api_answers() {
    let models = common::models_dir();
    // A plot beside a card is served and listed.
    std::fs::create_dir_all(models.path().join("plots")).unwrap();
    let roc = common::png_bytes(&common::gray_image(40, 30, 9));
    std::fs::write(models.path().join("plots/alpha-roc.png"), &roc).unwrap();
    let mut s = common::Server::start(models.path(), &["--min-image-side", "16"]);
    s.discard_logs();
    s.wait_ready();
    let (status, page) = common::tcp_http(&s.addr, "GET", "/", None, b"");
    assert_eq!(status, 200);
    assert!(page.contains("<title>cxr"), "{page}");
    let (status, _) = common::tcp_http(&s.addr, "GET", "/ui", None, b"");
    assert_eq!(status, 200);
    let (status, body) = common::tcp_http(&s.addr, "GET", "/models/alpha/plots/roc", None, b"");
    assert_eq!(status, 200);
    assert_eq!(body, String::from_utf8_lossy(&roc));
    let (status, _) = common::tcp_http(&s.addr, "GET", "/models/beta/plots/roc", None, b"");
    assert_eq!(status, 404);
    let (_, list) = common::tcp_http(&s.addr, "GET", "/models", None, b"");
    assert!(list.contains("\"/models/alpha/plots/roc\""), "{list}");

    let dir = tempfile::tempdir().unwrap();
    let (png, dcm, junk) = inputs(dir.path());
    let shots = root().join("target/ui-shots");
    run_check(
        &s.addr,
        &shots,
        &[&png, &dcm],
        &["--junk", junk.to_str().unwrap()],
    );
    for f in ["predict.png", "models.png", "error.png"] {
        assert!(shots.join(f).is_file(), "{f} written");
    }
}

#[test]
fn with_api_keys_the_page_shows_the_401_then_works_with_a_key() {
    let models = common::models_dir();
    let key = "cxr_ui_test_key_0123456789abcdef";
    let keys = models.path().join("keys.toml");
    let hash: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &keys,
        format!("[[callers]]\nname = \"ui\"\nkey_sha256 = \"{hash}\"\nscopes = [\"predict\", \"models\"]\n"),
    )
    .unwrap();
    check_one_png(
        models.path(),
        &["--api-keys-file", keys.to_str().unwrap()],
        "keys",
        &["--key", key],
    );
}

/// Serves the variants in `models` (with `server_args`) and runs the page's check on
/// one PNG film with `extra`; screenshots under `target/ui-shots/<shots>`.
fn check_one_png(models: &Path, server_args: &[&str], shots: &str, extra: &[&str]) {
    let args: Vec<&str> = ["--min-image-side", "16"]
        .into_iter()
        .chain(server_args.iter().copied())
        .collect();
    let mut s = common::Server::start(models, &args);
    s.discard_logs();
    s.wait_ready();
    let dir = tempfile::tempdir().unwrap();
    let (png, _, _) = inputs(dir.path());
    run_check(
        &s.addr,
        &root().join("target/ui-shots").join(shots),
        &[&png],
        extra,
    );
}

/// Serves the tiny variants `make` writes into a fresh folder and runs the page's
/// check on one film, requiring that the variants disagree on it (then the models
/// tab's, unless `predict_only`).
fn check_disagreement(shots: &str, predict_only: bool, make: impl FnOnce(&Path)) {
    let models = tempfile::tempdir().unwrap();
    make(models.path());
    check_one_png(
        models.path(),
        &[],
        shots,
        &[
            "--expect-disagreement",
            "yes",
            "--shot-only",
            if predict_only { "predict" } else { "all" },
        ],
    );
}

#[test]
fn variants_that_disagree_are_named_at_the_top_of_the_films_row() {
    // Three real variants that cannot agree on one film: `alpha` calls nearly
    // everything PNEUMONIA (threshold 0.001), `beta` nearly everything NORMAL
    // (threshold 0.999) and warns that every film is unlike its training films,
    // `gamma` refuses every film as out of distribution.
    check_disagreement("disagree", false, |d| {
        common::write_tiny_model_at(d, "alpha", 1, 0.99, 0.70, 0.001);
        common::write_tiny_model_at(d, "beta", 2, 0.90, 0.95, 0.999);
        common::write_tiny_model_at(d, "gamma", 3, 0.90, 0.90, 0.5);
        common::ood_above_everything(d, "beta", Some(1e12));
        common::ood_above_everything(d, "gamma", None);
    });
    // The same label, two verdicts: `alpha` finds every film in distribution, `beta`
    // warns of a distribution shift; both call it PNEUMONIA.
    check_disagreement("disagree-verdict", true, |d| {
        common::write_tiny_model_at(d, "alpha", 1, 0.99, 0.70, 0.001);
        common::write_tiny_model_at(d, "beta", 2, 0.90, 0.95, 0.001);
        common::ood_at(d, "alpha", 1e12, None);
        common::ood_above_everything(d, "beta", Some(1e12));
    });
}
