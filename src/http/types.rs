//! Request and response bodies of the API (the OpenAPI schemas come from here).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::imaging::dicom::DicomInfo;
use crate::inference::{Prefer, models::LatencySummary};
use crate::registry::{ModelCard, Strategy};

/// `POST /predict` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PredictQuery {
    /// Variant by name (see `GET /models`).
    pub model: Option<String>,
    /// Pick the variant with the best measured sensitivity or specificity.
    pub prefer: Option<Prefer>,
    /// Answer at the threshold that reached this target on the variant's validation
    /// ROC (`sensitivity:0.95` or `specificity:0.90`); 422 when no threshold reaches it.
    pub operating_point: Option<String>,
    /// Answer at this threshold on P(PNEUMONIA), in (0, 1), instead of the variant's.
    pub threshold: Option<f64>,
    /// `cam`: add the class activation maps to each answer (`heatmap`).
    pub explain: Option<Explain>,
}

/// What explanation to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Explain {
    /// Class activation maps of the last dense block.
    Cam,
}

/// Where the applied threshold came from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ThresholdSource {
    /// `card` (the variant's own, chosen on validation), `query` (`threshold=`) or
    /// `operating_point` (`operating_point=`).
    pub kind: String,
    /// How the card's threshold was chosen (`card`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The requested target (`operating_point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Sensitivity this threshold reached on the variant's validation ROC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_sensitivity: Option<f64>,
    /// Specificity this threshold reached on the variant's validation ROC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_specificity: Option<f64>,
}

/// Both class probabilities.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[allow(non_snake_case)]
pub struct Probabilities {
    /// P(NORMAL).
    pub NORMAL: f32,
    /// P(PNEUMONIA).
    pub PNEUMONIA: f32,
}

/// The variant that answered.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelRef {
    /// Variant name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its imbalance strategy.
    pub strategy: Strategy,
    /// SHA-256 of its ONNX file.
    pub sha256: String,
    /// The precision that answered: `fp32` or `int8`.
    pub precision: crate::model::int8::Precision,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Decoding and preprocessing.
    pub decode: f64,
    /// Waiting in the model's queue.
    pub queue: f64,
    /// The inference batch this image ran in.
    pub inference: f64,
    /// The whole request, as the server saw it.
    pub total: f64,
}

/// One image's answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "label": "PNEUMONIA", "confidence": 0.97,
    "probabilities": {"NORMAL": 0.03, "PNEUMONIA": 0.97}, "threshold": 0.5,
    "threshold_source": {"kind": "card", "rule": "youden on validation"},
    "model": {"name": "weighted", "version": "1.0.0", "strategy": "weighted", "sha256": "9f2c…"},
    "execution_provider": "CPUExecutionProvider",
    "timings_ms": {"decode": 1.2, "queue": 0.1, "inference": 80.5, "total": 82.3},
    "request_id": "6f1c2c1e-3f0b-4c1e-9a55-2b7c0d9e4a11"
}))]
pub struct Prediction {
    /// `PNEUMONIA` when P(PNEUMONIA) >= threshold, else `NORMAL`.
    pub label: String,
    /// Probability of the answered label.
    pub confidence: f32,
    /// Both probabilities (calibrated with the card's temperature, when it has one).
    pub probabilities: Probabilities,
    /// The decision threshold applied to P(PNEUMONIA).
    pub threshold: f64,
    /// Where that threshold came from.
    pub threshold_source: ThresholdSource,
    /// The variant that answered.
    pub model: ModelRef,
    /// `CPUExecutionProvider` or `CUDAExecutionProvider`.
    pub execution_provider: String,
    /// Timings.
    pub timings_ms: Timings,
    /// The server's id of the request (in the `x-request-id` header too when the
    /// caller sent none); the audit record and feedback name it.
    pub request_id: String,
    /// The caller's own `x-request-id`, bounded and sanitised (echoed in the
    /// `x-request-id` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// For a DICOM upload: its UIDs (to file the result) and technical facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<DicomInfo>,
    /// Caveats about this answer (a lateral view, a multi-frame object).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How far the image's features lie from the model's training images (see
    /// `/models/{name}` → `card.ood`); null when the variant has no OOD model or
    /// `--ood-action off`.
    pub ood_score: Option<f64>,
    /// Whether `ood_score` is at or under the variant's threshold; null when there is
    /// no score. With `--ood-action refuse` (the default) an answer is only given when
    /// true.
    pub in_distribution: Option<bool>,
    /// With `explain=cam`: the class activation maps (an attention map, not a
    /// localisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<super::explain::Heatmap>,
}

/// Live facts about a served variant.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LiveFacts {
    /// Provider in use.
    pub execution_provider: String,
    /// Why CUDA was not used (with `--device auto`), if it was tried.
    pub cuda_fallback_reason: Option<String>,
    /// Session creation and warm-up time, ms.
    pub load_time_ms: f64,
    /// Images answered since start.
    pub requests_served: u64,
    /// Requests waiting or running now.
    pub queue_depth: usize,
    /// Recent latency.
    pub latency: LatencySummary,
}

/// A variant: its model card plus live facts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    /// The model card (`models/<name>.json`).
    pub card: ModelCard,
    /// Whether it is the default variant.
    pub default: bool,
    /// Live facts.
    pub live: LiveFacts,
    /// Paths of its training plots (ROC, curves, confusion matrix) that were found
    /// beside the card.
    pub plots: Vec<String>,
}

/// `GET /models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Name of the default variant.
    pub default: String,
    /// Every variant.
    pub models: Vec<ModelInfo>,
}

/// `GET /health` and `GET /ready`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: String,
    /// Loaded variants (`/ready`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}
