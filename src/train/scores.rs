//! Per-image test scores (`<name>.test-scores.json`) and `cxr-train test-scores`,
//! which re-measures a shipped model's file as the export did.

use crate::eval::Metrics;
use crate::eval::served_probabilities;
use crate::imaging::Preprocessor;
use crate::inference::ModelOutput;
use crate::registry::ModelCard;
use crate::train::checkpoint::write_atomic;
use crate::train::data;
use crate::train::error::TrainError;
use crate::train::report_bad;
use std::path::Path;

/// Every test image's served probability and answer, as the card's measurement saw
/// them (`<name>.test-scores.json` beside the card): what
/// `scripts/check_served_metrics.py` compares a running server with, image by image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestScores {
    /// Variant name.
    pub model: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the ONNX file measured.
    pub onnx_sha256: String,
    /// The card's threshold.
    pub threshold: f64,
    /// The card's temperature (none: the file's softmax).
    pub temperature: Option<f64>,
    /// One entry per test image, in file order.
    pub images: Vec<TestScore>,
}

/// One test image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestScore {
    /// Path under the test folder, `NORMAL/…` or `PNEUMONIA/…`.
    pub file: String,
    /// 0 NORMAL, 1 PNEUMONIA.
    pub label: u8,
    /// Served (calibrated) P(PNEUMONIA).
    pub p_pneumonia: f64,
    /// The label answered at the card's threshold.
    pub answer: String,
}

impl TestScores {
    /// The scores of `samples` (under `root`) for `card`.
    pub fn new(card: &ModelCard, root: &Path, samples: &[data::Sample], scores: &[f64]) -> Self {
        Self {
            model: card.name.clone(),
            version: card.version.clone(),
            onnx_sha256: card.onnx.sha256.clone(),
            threshold: card.threshold,
            temperature: card.temperature(),
            images: samples
                .iter()
                .zip(scores)
                .map(|(s, &p)| TestScore {
                    file: s
                        .path
                        .strip_prefix(root)
                        .unwrap_or(&s.path)
                        .to_string_lossy()
                        .into_owned(),
                    label: s.label,
                    p_pneumonia: p,
                    answer: if p >= card.threshold {
                        "PNEUMONIA"
                    } else {
                        "NORMAL"
                    }
                    .into(),
                })
                .collect(),
        }
    }
}

/// A shipped model's preprocessing and a CPU session on its verified ONNX bytes, as the
/// export measures them.
pub(crate) fn measuring_session(
    loaded: &crate::registry::LoadedModel,
    ort_lib: &Path,
) -> anyhow::Result<(Preprocessor, crate::inference::CpuModel)> {
    let card = &loaded.card;
    let pre = Preprocessor::new(card.input_size, &card.preprocessing)
        .map_err(|e| TrainError::Weights(e.0))?;
    let session = crate::inference::CpuModel::load(ort_lib, &loaded.onnx_bytes)?;
    Ok((pre, session))
}

/// `cxr-train test-scores`: measures a shipped model's ONNX file on the test split
/// through ONNX Runtime as the export does (same preprocessing, batches of 8, the
/// card's temperature), checks the accuracy, confusion matrix and AUC equal the
/// card's, and writes `<name>.test-scores.json` beside the card.
pub fn write_test_scores(
    card_path: &Path,
    data_dir: &Path,
    ort_lib: &Path,
) -> anyhow::Result<usize> {
    let loaded = crate::registry::load_card(card_path)?;
    let (pre, mut session) = measuring_session(&loaded, ort_lib)?;
    let card = loaded.card;
    let test = data::scan(data_dir, "test")?;
    let (imgs, bad) = data::load_resized(&test, &pre);
    report_bad(&bad, test.len())?;
    let scores = served_scores(&session.run_images(&pre, &imgs)?, card.temperature());
    let labels: Vec<u8> = test.iter().map(|t| t.label).collect();
    let m = Metrics::compute(&scores, &labels, card.threshold);
    let want = card
        .metrics
        .test
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the card has no test metrics to check against"))?;
    if m.confusion != want.confusion
        || (m.auc.unwrap_or(0.0) - want.auc.unwrap_or(0.0)).abs() > 1e-9
    {
        anyhow::bail!(
            "the measurement differs from the card: confusion {:?} AUC {:?} vs {:?} {:?}",
            m.confusion,
            m.auc,
            want.confusion,
            want.auc
        );
    }
    let out = TestScores::new(&card, &data_dir.join("test"), &test, &scores);
    let path = card_path.with_file_name(format!("{}.test-scores.json", card.name));
    write_atomic(
        &path,
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )?;
    Ok(out.images.len())
}

/// Served P(PNEUMONIA) of each output, at `temperature` (none: the file's softmax).
pub(super) fn served_scores(outputs: &[ModelOutput], temperature: Option<f64>) -> Vec<f64> {
    outputs
        .iter()
        .map(|o| f64::from(served_probabilities(o.logits, o.probabilities, temperature)[1]))
        .collect()
}
