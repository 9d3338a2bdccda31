//! What the core answers: one [`Prediction`] per image (the OpenAPI schemas of the
//! answers come from here).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::imaging::dicom::DicomInfo;
use crate::registry::Label;
use crate::registry::Strategy;

/// Which threshold answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdKind {
    /// The variant's own, chosen on validation.
    Card,
    /// The site card's, chosen on the site's own films (`--site-card`).
    Site,
    /// The caller's `threshold=`.
    Query,
    /// The one that reached the caller's `operating_point=` on the card's
    /// validation ROC.
    OperatingPoint,
}

impl ThresholdKind {
    /// Its name in answers and records.
    pub fn as_str(self) -> &'static str {
        match self {
            ThresholdKind::Card => "card",
            ThresholdKind::Site => "site",
            ThresholdKind::Query => "query",
            ThresholdKind::OperatingPoint => "operating_point",
        }
    }
}

/// The out-of-distribution verdict on an answered image, typed (the JSON says it by
/// `in_distribution` and its warning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verdict {
    /// No OOD model, or `--ood-action off`.
    #[default]
    NotScored,
    /// At or under the model's threshold.
    InDistribution,
    /// Between the two thresholds: answered, with a distribution-shift caution.
    Shift,
    /// Above the refusal threshold and answered all the same (`--ood-action warn`).
    Outside,
}

/// Where the applied threshold came from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ThresholdSource {
    /// `card` (the variant's own, chosen on validation), `site` (the site card's,
    /// chosen on the site's own films: `--site-card`), `query` (`threshold=`) or
    /// `operating_point` (`operating_point=`).
    pub kind: ThresholdKind,
    /// How the card's threshold was chosen (`card`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The requested target (`operating_point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Sensitivity this threshold reached on the variant's validation ROC (for
    /// `site`: on the site's films).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_sensitivity: Option<f64>,
    /// Specificity this threshold reached on the variant's validation ROC (for
    /// `site`: on the site's films).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_specificity: Option<f64>,
    /// The site validation it came from (`site`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<crate::registry::site::SiteProvenance>,
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
    /// Who signed its files (verified before it loaded: `--trusted-signers`); null
    /// when it loaded unsigned (`--require-signed-models` off; the answer then warns).
    #[serde(default)]
    pub signed_by: Option<crate::signing::SignedBy>,
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
    pub label: Label,
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
    /// The verdict, typed (not in the JSON: `in_distribution` and the warnings say
    /// it there).
    #[serde(skip)]
    pub verdict: Verdict,
    /// The distribution-shift caution, when the verdict is [`Verdict::Shift`] (also
    /// among the warnings).
    #[serde(skip)]
    pub caution: Option<String>,
    /// With `explain=cam`: the class activation maps (an attention map, not a
    /// localisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<crate::predict::explain::Heatmap>,
}
