//! Writing models and editing cards: a new variant's ONNX file and card, and the OOD
//! entry of a card.

use crate::digest::sha256_hex;
use crate::registry::RegistryError;
use crate::registry::card::Architecture;
use crate::registry::card::CLASS_NAMES;
use crate::registry::card::CardMetrics;
use crate::registry::card::ModelCard;
use crate::registry::card::OnnxFile;
use crate::registry::card::Recipe;
use crate::registry::load_card;
use std::path::Path;

/// Names `ood` (a fitted out-of-distribution model beside the card) in the card at
/// `card_path`, replacing any earlier entry; nothing else in the card changes.
pub fn set_card_ood(
    card_path: &Path,
    ood: &crate::ood_score::OodCard,
) -> Result<(), RegistryError> {
    let bad = |reason: String| RegistryError::Invalid {
        path: card_path.to_path_buf(),
        reason,
    };
    // The card's text is edited, not re-serialised: serde_json's float parsing is not
    // exact to the last bit, so a parse-print round trip would move its numbers. An
    // earlier entry is cut out up to the next top-level key (an INT8 copy's card has
    // `precision` and `quantization` after it) or the card's end; a new one goes last.
    let text = std::fs::read_to_string(card_path).map_err(|e| bad(e.to_string()))?;
    let card: ModelCard = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let (body, rest) = match (&card.ood, text.rfind(",\n  \"ood\": ")) {
        (Some(_), Some(at)) => {
            let after = &text[at + 1..];
            // The next top-level key: two spaces of indentation, then its name.
            match after.find(",\n  \"") {
                Some(next) => (&text[..at], &after[next..]),
                None => (&text[..at], "\n}\n"),
            }
        }
        (Some(_), None) => {
            return Err(bad(
                "the card's ood entry is not where its writer puts it".into()
            ));
        }
        (None, _) => (
            text.trim_end()
                .strip_suffix('}')
                .ok_or_else(|| bad("the card does not end with `}`".into()))?
                .trim_end(),
            "\n}\n",
        ),
    };
    let entry = serde_json::to_string_pretty(ood).map_err(|e| bad(e.to_string()))?;
    let json = format!("{body},\n  \"ood\": {}{rest}", entry.replace('\n', "\n  "));
    // Nothing else in the card goes: the same top-level entries, `ood` among them.
    let keys = |t: &str| -> Result<Vec<String>, RegistryError> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(t).map_err(|e| bad(e.to_string()))?;
        let mut k: Vec<String> = v.keys().filter(|k| *k != "ood").cloned().collect();
        k.sort();
        Ok(k)
    };
    if keys(&text)? != keys(&json)? {
        return Err(bad(
            "editing the ood entry would change the card's other entries".into(),
        ));
    }
    let tmp = card_path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| bad(e.to_string()))?;
    std::fs::rename(&tmp, card_path).map_err(|e| bad(e.to_string()))?;
    load_card(card_path).map(|_| ())
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
    pub config: &'a crate::model::arch::DenseNetConfig,
    /// Weights with torchvision names.
    pub weights: &'a crate::model::arch::Weights,
    /// Square input size.
    pub input_size: u32,
    /// Weight storage in the file.
    pub storage: crate::model::onnx::WeightStorage,
    /// Decision threshold on P(PNEUMONIA).
    pub threshold: f64,
    /// Training recipe.
    pub training: Recipe,
    /// Measured metrics.
    pub metrics: CardMetrics,
}

/// Writes `<dir>/<name>.onnx` and its card `<dir>/<name>.json`; returns the card.
pub fn write_model(dir: &Path, m: &NewModel<'_>) -> Result<ModelCard, RegistryError> {
    let bad = |reason: String| RegistryError::Invalid {
        path: dir.to_path_buf(),
        reason,
    };
    use prost::Message;
    let opts = crate::model::onnx::WriteOptions {
        input_size: m.input_size,
        storage: m.storage,
        metadata: vec![
            ("cxr.name".into(), m.name.into()),
            ("cxr.version".into(), m.version.into()),
        ],
    };
    let bytes = crate::model::onnx::write_densenet(m.config, m.weights, &opts)
        .map_err(|e| bad(e.to_string()))?
        .encode_to_vec();
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
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
        precision: crate::model::int8::Precision::Fp32,
        quantization: None,
    };
    std::fs::write(dir.join(&file), &bytes)
        .map_err(|e| bad(format!("cannot write {file}: {e}")))?;
    let json = serde_json::to_string_pretty(&card).expect("a model card always serialises") + "\n";
    std::fs::write(dir.join(format!("{}.json", m.name)), json)
        .map_err(|e| bad(format!("cannot write the card: {e}")))?;
    Ok(card)
}
