//! Model variants on disk: `models/<name>.onnx` beside its `models/<name>.json` card.
//!
//! Loading reads every card in the folder and refuses, with the file and the reason,
//! any card that does not parse, names a missing file, disagrees with the file's
//! SHA-256, or asks for an input shape, class list or preprocessing we do not serve.

mod card;

use std::path::{Path, PathBuf};

pub use card::{Architecture, CLASS_NAMES, CardMetrics, ModelCard, OnnxFile, Recipe, Strategy};
use sha2::{Digest, Sha256};

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
    /// Path of the ONNX file.
    pub onnx_path: PathBuf,
    /// The ONNX file's bytes (verified against the card's SHA-256).
    pub onnx_bytes: Vec<u8>,
    /// The out-of-distribution model the card names (verified against its SHA-256).
    pub ood: Option<std::sync::Arc<crate::ood::OodModel>>,
    /// The training run's plots found beside the card (`plots/<name>-<kind>.png`,
    /// kinds in [`PLOT_KINDS`]), PNG bytes.
    pub plots: Vec<(&'static str, Vec<u8>)>,
}

/// The plots a variant may have: ROC, training curves, confusion matrix.
pub const PLOT_KINDS: [&str; 3] = ["roc", "curves", "confusion"];

/// Largest plot read (a plot is a few tens of KB).
const MAX_PLOT_BYTES: u64 = 4 << 20;

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Loads and checks every `<name>.json` card in `dir` (sorted by name); JSON files
/// with a further dot in their name (`<name>.test-scores.json`) are not cards.
pub fn load_dir(dir: &Path) -> Result<Vec<LoadedModel>, RegistryError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RegistryError::Folder {
        path: dir.into(),
        source,
    })?;
    let mut cards: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        // `<name>.json` with no other dot: `<name>.test-scores.json` and the like are
        // companions of a card, not cards.
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_stem()
                    .is_some_and(|s| !s.to_string_lossy().contains('.'))
                && p.is_file()
        })
        .collect();
    cards.sort();
    if cards.is_empty() {
        return Err(RegistryError::Empty(dir.into()));
    }
    cards.iter().map(|p| load_card(p)).collect()
}

/// Loads one card and its ONNX file, checking everything the server relies on.
pub fn load_card(card_path: &Path) -> Result<LoadedModel, RegistryError> {
    let invalid = |path: &Path, reason: String| RegistryError::Invalid {
        path: path.into(),
        reason,
    };
    let text = std::fs::read_to_string(card_path)
        .map_err(|e| invalid(card_path, format!("cannot read: {e}")))?;
    let card: ModelCard = serde_json::from_str(&text)
        .map_err(|e| invalid(card_path, format!("not a valid model card: {e}")))?;
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
    let onnx_path = card_path.with_file_name(&card.onnx.file);
    if Path::new(&card.onnx.file).components().count() != 1 {
        return Err(invalid(
            card_path,
            "onnx.file must be a file name beside the card".into(),
        ));
    }
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
    let sig =
        crate::onnx::signature(&onnx_bytes).map_err(|e| invalid(&onnx_path, e.to_string()))?;
    sig.check_contract(card.input_size, CLASS_NAMES.len())
        .map_err(|e| {
            invalid(
                &onnx_path,
                format!("{e} (card input_size {})", card.input_size),
            )
        })?;
    let ood = match &card.ood {
        None => None,
        Some(o) => {
            if Path::new(&o.file).components().count() != 1 {
                return Err(invalid(
                    card_path,
                    "ood.file must be a file name beside the card".into(),
                ));
            }
            let path = card_path.with_file_name(&o.file);
            let m = crate::ood::OodModel::load(&path, &o.sha256)
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
            Some(std::sync::Arc::new(m))
        }
    };
    let plots = PLOT_KINDS
        .iter()
        .filter_map(|kind| {
            let p = card_path
                .with_file_name("plots")
                .join(format!("{}-{kind}.png", card.name));
            let meta = std::fs::metadata(&p).ok()?;
            (meta.is_file() && meta.len() <= MAX_PLOT_BYTES)
                .then(|| std::fs::read(&p).ok())
                .flatten()
                .filter(|b| b.starts_with(b"\x89PNG"))
                .map(|b| (*kind, b))
        })
        .collect();
    Ok(LoadedModel {
        card,
        onnx_path,
        onnx_bytes,
        ood,
        plots,
    })
}

/// Names `ood` (a fitted out-of-distribution model beside the card) in the card at
/// `card_path`, replacing any earlier entry; nothing else in the card changes.
pub fn set_card_ood(card_path: &Path, ood: &crate::ood::OodCard) -> Result<(), String> {
    // The card's text is edited, not re-serialised: serde_json's float parsing is not
    // exact to the last bit, so a parse-print round trip would move its numbers. The
    // writer puts `ood` last; an earlier entry is cut from there.
    let text = std::fs::read_to_string(card_path).map_err(|e| e.to_string())?;
    let card: ModelCard = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let body = match (&card.ood, text.rfind(",\n  \"ood\": ")) {
        (Some(_), Some(at)) => &text[..at],
        (Some(_), None) => {
            return Err("the card's ood entry is not where its writer puts it".into());
        }
        (None, _) => text
            .trim_end()
            .strip_suffix('}')
            .ok_or("the card does not end with `}`")?
            .trim_end(),
    };
    let entry = serde_json::to_string_pretty(ood).map_err(|e| e.to_string())?;
    let json = format!("{body},\n  \"ood\": {}\n}}\n", entry.replace('\n', "\n  "));
    let tmp = card_path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, card_path).map_err(|e| e.to_string())?;
    load_card(card_path).map(|_| ()).map_err(|e| e.to_string())
}

/// What [`write_model`] needs to write a variant.
#[derive(Debug, Clone)]
pub struct NewModel<'a> {
    /// Variant name (file stem).
    pub name: &'a str,
    /// Version string.
    pub version: &'a str,
    /// Card description.
    pub description: &'a str,
    /// Architecture name for humans (`densenet161`, `densenet-tiny`).
    pub architecture_name: &'a str,
    /// Network configuration.
    pub config: &'a crate::arch::DenseNetConfig,
    /// Weights with torchvision names.
    pub weights: &'a crate::arch::Weights,
    /// Square input size.
    pub input_size: u32,
    /// Weight storage in the file.
    pub storage: crate::onnx::WeightStorage,
    /// Decision threshold on P(PNEUMONIA).
    pub threshold: f64,
    /// Training recipe.
    pub training: Recipe,
    /// Measured metrics.
    pub metrics: CardMetrics,
}

/// Writes `<dir>/<name>.onnx` and its card `<dir>/<name>.json`; returns the card.
pub fn write_model(dir: &Path, m: &NewModel<'_>) -> Result<ModelCard, String> {
    use prost::Message;
    let opts = crate::onnx::WriteOptions {
        input_size: m.input_size,
        storage: m.storage,
        metadata: vec![
            ("cxr.name".into(), m.name.into()),
            ("cxr.version".into(), m.version.into()),
        ],
    };
    let bytes = crate::onnx::write_densenet(m.config, m.weights, &opts)?.encode_to_vec();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let file = format!("{}.onnx", m.name);
    let card = ModelCard {
        name: m.name.into(),
        version: m.version.into(),
        description: m.description.into(),
        architecture: Architecture {
            name: m.architecture_name.into(),
            config: m.config.clone(),
            parameters: m.config.trainable_parameter_count() as u64,
        },
        input_size: m.input_size,
        preprocessing: crate::imaging::Preprocessing::default(),
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        threshold: m.threshold,
        threshold_rule: None,
        calibration: None,
        operating_curve: None,
        onnx: OnnxFile {
            file: file.clone(),
            sha256: sha256_hex(&bytes),
            weight_storage: m.storage,
            bytes: bytes.len() as u64,
        },
        training: m.training.clone(),
        metrics: m.metrics.clone(),
        ood: None,
        precision: crate::quantize::Precision::Fp32,
        quantization: None,
    };
    std::fs::write(dir.join(&file), &bytes).map_err(|e| format!("cannot write {file}: {e}"))?;
    let json = serde_json::to_string_pretty(&card).expect("a model card always serialises") + "\n";
    std::fs::write(dir.join(format!("{}.json", m.name)), json)
        .map_err(|e| format!("cannot write the card: {e}"))?;
    Ok(card)
}

/// Rewrites a model's ONNX file with the current writer, from the file's own weights
/// (same storage, input size and metadata), so that older files gain the outputs the
/// writer has added since (`cam`, `embedding`); checks on random inputs that the new
/// file's `logits` and `probabilities` equal the old file's, then updates the card's
/// hash and size. Returns the old and new SHA-256.
pub fn rewrite_onnx(card_path: &Path, ort_lib: &Path) -> Result<(String, String), String> {
    use prost::Message;
    let loaded = load_card(card_path).map_err(|e| e.to_string())?;
    let mut card = loaded.card;
    let old = loaded.onnx_bytes;
    let weights = crate::onnx::read_weights(&old).map_err(|e| e.to_string())?;
    let model = crate::onnx::proto::ModelProto::decode(&old[..]).map_err(|e| e.to_string())?;
    let opts = crate::onnx::WriteOptions {
        input_size: card.input_size,
        storage: card.onnx.weight_storage,
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    };
    let new =
        crate::onnx::write_densenet(&card.architecture.config, &weights, &opts)?.encode_to_vec();

    let load =
        |bytes: &[u8]| crate::inference::CpuModel::load(ort_lib, bytes).map_err(|e| e.to_string());
    let (mut a, mut b) = (load(&old)?, load(&new)?);
    let s = card.input_size as usize;
    let mut r = crate::arch::SplitMix64(20261126);
    let x: Vec<f32> = (0..2 * 3 * s * s)
        .map(|_| (r.uniform() * 4.0 - 2.0) as f32)
        .collect();
    let oa = a.run(x.clone(), 2, s).map_err(|e| e.to_string())?;
    let ob = b.run(x, 2, s).map_err(|e| e.to_string())?;
    for (p, q) in oa.iter().zip(&ob) {
        if p.logits != q.logits || p.probabilities != q.probabilities {
            return Err(format!(
                "the rewritten file answers differently: {:?} vs {:?}",
                (p.logits, p.probabilities),
                (q.logits, q.probabilities)
            ));
        }
    }
    if ob.iter().any(|o| o.cam.is_none()) {
        return Err("the rewritten file has no cam output".into());
    }
    let dir = card_path.parent().unwrap_or(Path::new("."));
    let old_sha = card.onnx.sha256.clone();
    let new_sha = sha256_hex(&new);
    // Only the hash and the size change: the card's text is edited in place, so that
    // no other value (floats included) is re-serialised.
    let text = std::fs::read_to_string(card_path).map_err(|e| e.to_string())?;
    let (from_sha, from_bytes) = (
        format!("\"sha256\": \"{old_sha}\""),
        format!("\"bytes\": {}", card.onnx.bytes),
    );
    if text.matches(&from_sha).count() != 1 || text.matches(&from_bytes).count() != 1 {
        return Err("the card's onnx sha256 and bytes are not where its writer puts them".into());
    }
    let text = text
        .replace(&from_sha, &format!("\"sha256\": \"{new_sha}\""))
        .replace(&from_bytes, &format!("\"bytes\": {}", new.len()));
    std::fs::write(dir.join(&card.onnx.file), &new)
        .map_err(|e| format!("cannot write {}: {e}", card.onnx.file))?;
    std::fs::write(card_path, text).map_err(|e| format!("cannot write the card: {e}"))?;
    card.onnx.sha256 = new_sha;
    Ok((old_sha, card.onnx.sha256))
}
