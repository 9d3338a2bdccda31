//! Model variants on disk: `models/<name>.onnx` beside its `models/<name>.json` card
//! (one version of each name), or several versions side by side in
//! `models/<name>/<version>/<name>.json` (each folder a card, its ONNX file, its
//! OOD model and plots), with an optional `models/<name>/DEFAULT` naming the
//! version answers default to (else the highest).
//!
//! Loading reads every card in the folder and refuses, with the file and the reason,
//! any card that does not parse, names a missing file, disagrees with the file's
//! SHA-256, or asks for an input shape, class list or preprocessing we do not serve.

mod card;
pub mod site;
mod write;

use std::path::{Path, PathBuf};

pub use card::{
    Architecture, CLASS_NAMES, CardMetrics, Label, ModelCard, OnnxFile, Recipe, Strategy,
};
pub use write::{NewModel, set_card_ood, write_model};

use crate::imaging::Preprocessor;

/// A problem with the models folder.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The folder cannot be read.
    #[error("cannot read models folder {path}: {source}")]
    Folder {
        /// Folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No card in the folder.
    #[error(
        "no model cards (*.json) in {0}; train models with cxr-train or point --models-dir elsewhere"
    )]
    Empty(PathBuf),
    /// A card or its model is wrong.
    #[error("{path}: {reason}")]
    Invalid {
        /// The card or ONNX file at fault.
        path: PathBuf,
        /// What is wrong and what would fix it.
        reason: String,
    },
}

/// A card with its verified ONNX bytes.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The card.
    pub card: ModelCard,
    /// Path of the card.
    pub card_path: PathBuf,
    /// Path of the ONNX file.
    pub onnx_path: PathBuf,
    /// The ONNX file's bytes (verified against the card's SHA-256).
    pub onnx_bytes: Vec<u8>,
    /// The out-of-distribution model the card names (verified against its SHA-256).
    pub ood: Option<std::sync::Arc<crate::ood_score::OodModel>>,
    /// Whether the file has a `cam` output (class activation maps: heatmaps can be
    /// drawn), as its graph declares.
    pub has_cam: bool,
    /// SHA-256 of the card's bytes as read (what its signature must list).
    pub card_sha256: String,
    /// The training run's plots found beside the card (`plots/<name>-<kind>.png`,
    /// kinds in [`PLOT_KINDS`]), PNG bytes.
    pub plots: Vec<(&'static str, Vec<u8>)>,
}

/// The plots a variant may have: ROC, training curves, confusion matrix.
pub const PLOT_KINDS: [&str; 3] = ["roc", "curves", "confusion"];

/// Largest plot read (a plot is a few tens of KB).
const MAX_PLOT_BYTES: u64 = 4 << 20;

pub use crate::digest::sha256_hex;

/// A card found on disk: its variant name, the version its folder names (none in
/// the flat layout) and its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardEntry {
    /// The variant name (the card's file name).
    pub name: String,
    /// The version folder (`models/<name>/<version>/`), none for `models/<name>.json`.
    pub folder_version: Option<String>,
    /// The card.
    pub path: PathBuf,
}

/// The file in `models/<name>/` that names the default version.
pub const DEFAULT_FILE: &str = "DEFAULT";

/// Every card in `dir`: the flat `<name>.json` cards and the versioned
/// `<name>/<version>/<name>.json` ones, sorted by name then path. JSON files with a
/// further dot in their name (`<name>.test-scores.json`) are not cards.
pub fn scan(dir: &Path) -> Result<Vec<CardEntry>, RegistryError> {
    let folder = |source| RegistryError::Folder {
        path: dir.into(),
        source,
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir)
        .map_err(folder)?
        .filter_map(Result::ok)
    {
        let p = e.path();
        if let Some(name) = card_name(&p) {
            found.push(CardEntry {
                name,
                folder_version: None,
                path: p,
            });
        } else if p.is_dir() {
            let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let Ok(versions) = std::fs::read_dir(&p) else {
                continue;
            };
            for v in versions.filter_map(Result::ok) {
                let card = v.path().join(format!("{name}.json"));
                if v.path().is_dir() && card.is_file() {
                    found.push(CardEntry {
                        name: name.clone(),
                        folder_version: Some(v.file_name().to_string_lossy().into_owned()),
                        path: card,
                    });
                }
            }
        }
    }
    found.sort_by(|a, b| (&a.name, &a.path).cmp(&(&b.name, &b.path)));
    Ok(found)
}

/// The variant name of `p` when it is a flat card (`<name>.json`, no other dot).
fn card_name(p: &Path) -> Option<String> {
    let stem = p.file_stem()?.to_str()?;
    (p.extension().is_some_and(|e| e == "json") && !stem.contains('.') && p.is_file())
        .then(|| stem.to_string())
}

/// The version `models/<name>/DEFAULT` names, if that file exists.
pub fn default_version(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name).join(DEFAULT_FILE)).ok()?;
    let v = text.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Orders versions as numbers where they are (`2.10.0` after `2.9.1`), else as text.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(['.', '-', '+'])
            .map(|p| (p.parse::<u64>().unwrap_or(u64::MAX), p.to_string()))
            .collect()
    };
    parts(a).cmp(&parts(b)).then_with(|| a.cmp(b))
}

/// Loads and checks every card in `dir` (the flat and the versioned layouts, sorted
/// by name then version).
pub fn load_dir(dir: &Path) -> Result<Vec<LoadedModel>, RegistryError> {
    let cards = scan(dir)?;
    if cards.is_empty() {
        return Err(RegistryError::Empty(dir.into()));
    }
    let mut loaded = cards
        .iter()
        .map(load_entry)
        .collect::<Result<Vec<_>, _>>()?;
    loaded.sort_by(|a, b| {
        (a.card.name.as_str())
            .cmp(&b.card.name)
            .then_with(|| version_cmp(&a.card.version, &b.card.version))
    });
    for w in loaded.windows(2) {
        if w[0].card.name == w[1].card.name && w[0].card.version == w[1].card.version {
            return Err(invalid(
                &w[1].card_path,
                format!(
                    "model `{}` version `{}` is also at {}",
                    w[1].card.name,
                    w[1].card.version,
                    w[0].card_path.display()
                ),
            ));
        }
    }
    Ok(loaded)
}

/// Loads a card found by [`scan`]: in a version folder, the card's version must be
/// the folder's.
pub fn load_entry(e: &CardEntry) -> Result<LoadedModel, RegistryError> {
    let m = load_card(&e.path)?;
    if let Some(v) = &e.folder_version
        && *v != m.card.version
    {
        return Err(invalid(
            &e.path,
            format!(
                "the card says version `{}` but its folder is `{v}`",
                m.card.version
            ),
        ));
    }
    Ok(m)
}

/// The version and ONNX SHA-256 a card declares, read without its ONNX file (to
/// tell whether a loaded version changed on disk).
pub fn peek(card_path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(card_path).ok()?;
    let card: ModelCard = serde_json::from_str(&text).ok()?;
    Some((card.version, card.onnx.sha256.to_ascii_lowercase()))
}

/// Loads one card and its ONNX file, checking everything the server relies on.
pub fn load_card(card_path: &Path) -> Result<LoadedModel, RegistryError> {
    let text = std::fs::read_to_string(card_path)
        .map_err(|e| invalid(card_path, format!("cannot read: {e}")))?;
    let card: ModelCard = serde_json::from_str(&text)
        .map_err(|e| invalid(card_path, format!("not a valid model card: {e}")))?;
    check_card(&card, card_path)?;
    let (onnx_path, onnx_bytes, sig) = read_onnx(&card, card_path)?;
    let ood = match &card.ood {
        None => None,
        Some(o) => Some(load_ood(o, card_path, &sig)?),
    };
    let plots = read_plots(&card.name, card_path);
    let has_cam = sig
        .outputs
        .iter()
        .any(|(n, _, _)| n == crate::model::onnx::CAM_NAME);
    Ok(LoadedModel {
        card,
        card_sha256: sha256_hex(text.as_bytes()),
        card_path: card_path.into(),
        onnx_path,
        onnx_bytes,
        ood,
        has_cam,
        plots,
    })
}

impl LoadedModel {
    /// The files of this version as its signature covers them: the version folder
    /// (`models/<name>/<version>/`), or in the flat layout `models/<name>.*` and the
    /// files the card names (see [`crate::signing`]).
    pub fn signed_files(&self) -> crate::signing::VersionFiles {
        let root = self
            .card_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let is = |p: Option<&Path>, s: &str| p.and_then(|p| p.file_name()).is_some_and(|n| n == s);
        let flat = !(is(Some(&root), &self.card.version) && is(root.parent(), &self.card.name));
        // The order a mismatch is looked for: what answers first.
        let mut named = vec![self.card.onnx.file.clone()];
        named.extend(self.card.ood.iter().map(|o| o.file.clone()));
        named.push(format!("{}.json", self.card.name));
        crate::signing::VersionFiles {
            root,
            name: self.card.name.clone(),
            flat,
            named,
        }
    }

    /// Digests of the files read and checked here (the card, the ONNX file, the OOD
    /// model), by their name in [`LoadedModel::signed_files`].
    pub fn known_digests(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::from([
            (format!("{}.json", self.card.name), self.card_sha256.clone()),
            (
                self.card.onnx.file.clone(),
                self.card.onnx.sha256.to_ascii_lowercase(),
            ),
        ]);
        if let Some(o) = &self.card.ood {
            m.insert(o.file.clone(), o.sha256.to_ascii_lowercase());
        }
        m
    }
}

/// One version signed by [`sign_dir`]: `name@version` and its root digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedVersion {
    /// `name@version`.
    pub model: String,
    /// The bundle written.
    pub bundle: PathBuf,
    /// The statement's subject digest.
    pub root_digest: String,
}

/// Signs every version in `dir` (or those `only` names: `NAME` or `NAME@VERSION`),
/// each checked as the server loads it first: an OMS bundle `<name>.sig` beside each
/// card ([`crate::signing::sign`]). Signing again with the same key and files writes
/// the same bytes.
pub fn sign_dir(
    dir: &Path,
    key: &crate::signing::PrivateKey,
    only: &[String],
) -> Result<Vec<SignedVersion>, RegistryError> {
    versions_named(dir, only)?
        .iter()
        .map(|m| sign_loaded(m, key))
        .collect()
}

/// Signs the version of one card (`<name>.json`, checked as the server loads it),
/// as [`sign_dir`] does: what `cxr-train --sign-key` runs after its last file.
pub fn sign_card(
    card_path: &Path,
    key: &crate::signing::PrivateKey,
) -> Result<SignedVersion, RegistryError> {
    sign_loaded(&load_card(card_path)?, key)
}

fn sign_loaded(
    m: &LoadedModel,
    key: &crate::signing::PrivateKey,
) -> Result<SignedVersion, RegistryError> {
    let files = m.signed_files();
    let root_digest = crate::signing::sign(&files, key)
        .map_err(|err| invalid(&files.bundle_path(), format!("cannot sign: {err}")))?;
    Ok(SignedVersion {
        model: format!("{}@{}", m.card.name, m.card.version),
        bundle: files.bundle_path(),
        root_digest,
    })
}

/// One version's signature check: who signed it, or why it is refused.
pub type Verified = Result<crate::signing::SignedBy, crate::signing::SigningError>;

/// Verifies every version in `dir` (or those `only` names) as the server does before
/// loading it: `name@version` and who signed it, or why not.
pub fn verify_dir(
    dir: &Path,
    trusted: &crate::signing::TrustedSigners,
    only: &[String],
) -> Result<Vec<(String, Verified)>, RegistryError> {
    let today = crate::clock::now_rfc3339();
    Ok(versions_named(dir, only)?
        .into_iter()
        .map(|m| {
            let r = crate::signing::verify(
                &m.signed_files(),
                &m.known_digests(),
                trusted,
                &today[..10],
            );
            (format!("{}@{}", m.card.name, m.card.version), r)
        })
        .collect())
}

/// The versions in `dir` that `only` names (`NAME` or `NAME@VERSION`; none: all),
/// each loaded and checked.
fn versions_named(dir: &Path, only: &[String]) -> Result<Vec<LoadedModel>, RegistryError> {
    let mut out = Vec::new();
    for e in scan(dir)? {
        let m = load_entry(&e)?;
        let (name, version) = (&m.card.name, &m.card.version);
        if only.is_empty()
            || only
                .iter()
                .any(|o| o == name || *o == format!("{name}@{version}"))
        {
            out.push(m);
        }
    }
    Ok(out)
}

fn invalid(path: &Path, reason: String) -> RegistryError {
    RegistryError::Invalid {
        path: path.into(),
        reason,
    }
}

/// The card's own fields: its name (the file's), classes, threshold, temperature,
/// preprocessing and file name.
fn check_card(card: &ModelCard, card_path: &Path) -> Result<(), RegistryError> {
    let stem = card_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if card.name != stem {
        return Err(invalid(
            card_path,
            format!(
                "card name `{}` differs from the file name `{stem}`",
                card.name
            ),
        ));
    }
    if !card
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || card.name.is_empty()
    {
        return Err(invalid(
            card_path,
            "name must be non-empty ASCII letters, digits, '-' or '_'".into(),
        ));
    }
    if card.version.is_empty()
        || card.version.len() > 64
        || !card
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
    {
        return Err(invalid(
            card_path,
            format!(
                "version `{}` must be 1-64 ASCII letters, digits, '.', '_', '-' or '+'",
                card.version
            ),
        ));
    }
    if card.class_names != CLASS_NAMES {
        return Err(invalid(
            card_path,
            format!(
                "class_names {:?}; cxr serves {:?}",
                card.class_names, CLASS_NAMES
            ),
        ));
    }
    if !(card.threshold > 0.0 && card.threshold < 1.0) {
        return Err(invalid(
            card_path,
            format!("threshold {} must lie in (0, 1)", card.threshold),
        ));
    }
    if let Some(t) = card.temperature()
        && !(t.is_finite() && t > 0.0)
    {
        return Err(invalid(
            card_path,
            format!("calibration.temperature {t} must be a positive number"),
        ));
    }
    if card.architecture.config.num_classes != CLASS_NAMES.len() {
        return Err(invalid(
            card_path,
            "architecture.config.num_classes must be 2".into(),
        ));
    }
    Preprocessor::new(card.input_size, &card.preprocessing)
        .map_err(|e| invalid(card_path, format!("unsupported preprocessing: {e}")))?;
    if Path::new(&card.onnx.file).components().count() != 1 {
        return Err(invalid(
            card_path,
            "onnx.file must be a file name beside the card".into(),
        ));
    }
    Ok(())
}

/// The ONNX file the card names: its path, bytes (hash checked) and signature
/// (contract checked).
fn read_onnx(
    card: &ModelCard,
    card_path: &Path,
) -> Result<(PathBuf, Vec<u8>, crate::model::onnx::Signature), RegistryError> {
    let onnx_path = card_path.with_file_name(&card.onnx.file);
    let onnx_bytes = std::fs::read(&onnx_path).map_err(|e| {
        invalid(
            &onnx_path,
            format!("cannot read the model file named by the card: {e}"),
        )
    })?;
    let digest = sha256_hex(&onnx_bytes);
    if digest != card.onnx.sha256.to_ascii_lowercase() {
        return Err(invalid(
            &onnx_path,
            format!(
                "SHA-256 is {digest} but the card says {}: the file and card do not belong together",
                card.onnx.sha256
            ),
        ));
    }
    let sig = crate::model::onnx::signature(&onnx_bytes)
        .map_err(|e| invalid(&onnx_path, e.to_string()))?;
    sig.check_contract(card.input_size, CLASS_NAMES.len())
        .map_err(|e| {
            invalid(
                &onnx_path,
                format!("{e} (card input_size {})", card.input_size),
            )
        })?;
    Ok((onnx_path, onnx_bytes, sig))
}

/// The out-of-distribution model the card names, checked against the ONNX file's
/// embedding and the card's threshold.
fn load_ood(
    o: &crate::ood_score::OodCard,
    card_path: &Path,
    sig: &crate::model::onnx::Signature,
) -> Result<std::sync::Arc<crate::ood_score::OodModel>, RegistryError> {
    if Path::new(&o.file).components().count() != 1 {
        return Err(invalid(
            card_path,
            "ood.file must be a file name beside the card".into(),
        ));
    }
    let path = card_path.with_file_name(&o.file);
    let m = crate::ood_score::OodModel::load(&path, &o.sha256)
        .map_err(|e| invalid(&path, format!("out-of-distribution model: {e}")))?;
    let width = sig.embedding_width();
    if width != Some(m.dim) {
        return Err(invalid(
            &path,
            format!(
                "fitted on embeddings {} wide, but the ONNX file's embedding output is {}",
                m.dim,
                width.map_or("absent".to_string(), |w| format!("{w} wide"))
            ),
        ));
    }
    if (m.threshold - o.threshold).abs() > 1e-9 * o.threshold.abs().max(1.0) {
        return Err(invalid(
            card_path,
            format!(
                "ood.threshold {} differs from the file's {}",
                o.threshold, m.threshold
            ),
        ));
    }
    Ok(std::sync::Arc::new(m))
}

/// The training plots beside the card (`plots/<name>-<kind>.png`), those that are
/// PNG files within the size limit.
fn read_plots(name: &str, card_path: &Path) -> Vec<(&'static str, Vec<u8>)> {
    PLOT_KINDS
        .iter()
        .filter_map(|kind| {
            let p = card_path
                .with_file_name("plots")
                .join(format!("{name}-{kind}.png"));
            let meta = std::fs::metadata(&p).ok()?;
            (meta.is_file() && meta.len() <= MAX_PLOT_BYTES)
                .then(|| std::fs::read(&p).ok())
                .flatten()
                .filter(|b| b.starts_with(b"\x89PNG"))
                .map(|b| (*kind, b))
        })
        .collect()
}
