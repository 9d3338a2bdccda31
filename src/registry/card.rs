//! The model card: what `models/<name>.json` says about `models/<name>.onnx`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::eval::{Calibration, Metrics, OperatingCurve};
use crate::imaging::Preprocessing;
use crate::model::arch::DenseNetConfig;
use crate::model::onnx::WeightStorage;

/// Class names every cxr model uses, in output order.
pub const CLASS_NAMES: [&str; 2] = ["NORMAL", "PNEUMONIA"];

/// A class, as answered: `NORMAL` or `PNEUMONIA`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Label {
    /// No pneumonia found.
    #[serde(rename = "NORMAL")]
    Normal,
    /// Pneumonia found (the positive class).
    #[serde(rename = "PNEUMONIA")]
    Pneumonia,
}

impl Label {
    /// The label of P(PNEUMONIA) `p` at `threshold`: positive at or above it.
    pub fn at(p: f64, threshold: f64) -> Self {
        if p >= threshold {
            Label::Pneumonia
        } else {
            Label::Normal
        }
    }

    /// Its index among the model's outputs.
    pub fn index(self) -> usize {
        match self {
            Label::Normal => 0,
            Label::Pneumonia => 1,
        }
    }

    /// Whether it is the positive class.
    pub fn is_pneumonia(self) -> bool {
        self == Label::Pneumonia
    }

    /// Its name, as in [`CLASS_NAMES`].
    pub fn as_str(self) -> &'static str {
        CLASS_NAMES[self.index()]
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Label {
    type Err = String;

    /// `NORMAL` or `PNEUMONIA`, in any case, surrounding spaces ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "NORMAL" => Ok(Label::Normal),
            "PNEUMONIA" => Ok(Label::Pneumonia),
            _ => Err(format!("label `{s}` is neither NORMAL nor PNEUMONIA")),
        }
    }
}

/// How the class imbalance was handled in training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Class-weighted cross-entropy, weight of a class = 1 − n_class / n_total.
    Weighted,
    /// NORMAL topped up with transformed copies until the classes are equal.
    Augmented,
    /// Neither (test fixtures, experiments).
    #[default]
    None,
}

/// The network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Architecture {
    /// Human name, e.g. `densenet161`.
    pub name: String,
    /// Exact configuration.
    #[schema(value_type = Object)]
    pub config: DenseNetConfig,
    /// Trainable parameters.
    pub parameters: u64,
}

/// The ONNX file the card describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OnnxFile {
    /// File name beside the card.
    pub file: String,
    /// Lower-case hex SHA-256 of the file; loading fails when it differs.
    pub sha256: String,
    /// How the weights are stored.
    #[schema(value_type = String, example = "fp16")]
    pub weight_storage: WeightStorage,
    /// Size in bytes.
    pub bytes: u64,
}

/// How the model was trained (what `cxr-train` did).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Recipe {
    /// Imbalance strategy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Data set description.
    #[serde(default)]
    pub data: String,
    /// Epochs actually run.
    #[serde(default)]
    pub epochs: u32,
    /// Image size per epoch (progressive resizing), when it changed.
    #[serde(default)]
    pub image_sizes: Vec<u32>,
    /// Batch size.
    #[serde(default)]
    pub batch_size: u32,
    /// Optimizer and schedule, e.g. `adamw lr=1e-3 wd=1e-4 onecycle`.
    #[serde(default)]
    pub optimizer: String,
    /// Seed of every random choice (split, augmentation, init).
    #[serde(default)]
    pub seed: u64,
    /// Images in the training split (after top-up for `augmented`).
    #[serde(default)]
    pub train_images: u64,
    /// Training images per class [NORMAL, PNEUMONIA] (after top-up for `augmented`).
    #[serde(default)]
    pub train_class_counts: Vec<u64>,
    /// Images in the validation split (carved from train by patient).
    #[serde(default)]
    pub validation_images: u64,
    /// Loss weights per class (`weighted`).
    #[serde(default)]
    pub class_weights: Vec<f64>,
    /// Generated NORMAL images (`augmented`).
    #[serde(default)]
    pub generated_images: u64,
    /// Initial weights (`scratch` or a file name).
    #[serde(default)]
    pub init: String,
    /// Where it ran (`cpu`, `cuda`).
    #[serde(default)]
    pub device: String,
    /// Wall-clock training time in seconds.
    #[serde(default)]
    pub wall_time_s: f64,
    /// Max |ONNX Runtime − tch| on validation probabilities at export.
    #[serde(default)]
    pub export_parity_max_abs_diff: Option<f64>,
    /// Anything else worth knowing.
    #[serde(default)]
    pub notes: String,
}

/// Measured quality.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CardMetrics {
    /// On the held-out test split, touched once per final model.
    #[serde(default)]
    pub test: Option<Metrics>,
    /// On the validation split (used to choose the epoch and the threshold).
    #[serde(default)]
    pub validation: Option<Metrics>,
    /// On the validation split under fixed, seeded acquisition perturbations (the
    /// stress validation, see `training.notes`), at the same threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_stressed: Option<Metrics>,
}

/// `models/<name>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    /// Variant name, also the file stem and the `?model=` value.
    pub name: String,
    /// Version of this variant.
    pub version: String,
    /// One paragraph for humans.
    #[serde(default)]
    pub description: String,
    /// The network.
    pub architecture: Architecture,
    /// Square input size in pixels.
    pub input_size: u32,
    /// How images become tensors.
    pub preprocessing: Preprocessing,
    /// Output classes in order; must be `["NORMAL", "PNEUMONIA"]`.
    pub class_names: Vec<String>,
    /// PNEUMONIA is answered when P(PNEUMONIA) >= threshold (the served, calibrated
    /// probability).
    pub threshold: f64,
    /// How `threshold` was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_rule: Option<String>,
    /// Temperature scaling of the probabilities (absent: the file's own softmax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// The validation ROC, for `operating_point=sensitivity:…|specificity:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_curve: Option<OperatingCurve>,
    /// The ONNX file.
    pub onnx: OnnxFile,
    /// How it was trained.
    #[serde(default)]
    pub training: Recipe,
    /// Measured quality.
    #[serde(default)]
    pub metrics: CardMetrics,
    /// The out-of-distribution model (absent: the variant's answers carry no
    /// `ood_score` and nothing is refused as out of distribution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood: Option<crate::ood_score::OodCard>,
    /// The precision the file computes in (absent: fp32).
    #[serde(
        default,
        skip_serializing_if = "crate::model::int8::Precision::is_fp32"
    )]
    pub precision: crate::model::int8::Precision,
    /// For an INT8 copy: how it was made and how it compares with its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::model::int8::QuantizationInfo>,
}

impl ModelCard {
    /// The temperature the server applies, if any.
    pub fn temperature(&self) -> Option<f64> {
        self.calibration.as_ref().map(|c| c.temperature)
    }
}
