//! Request and response bodies of the API (the OpenAPI schemas come from here).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::inference::{Prefer, models::LatencySummary};
use crate::registry::ModelCard;

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
    /// The order's accession number: with `patient_id`, the answer (or the
    /// refusal) of the one image is also delivered to the RIS and the EHR
    /// (`--hl7-destination`, `--fhir-url`) as the DICOM node's results are; without
    /// them nothing is sent.
    pub accession_number: Option<String>,
    /// The patient's identifier (PID-3), for the delivered result.
    pub patient_id: Option<String>,
    /// The study's instance UID, for the delivered result (a DICOM upload's own
    /// when not given).
    pub study_instance_uid: Option<String>,
}

/// The order identifiers a `/predict` caller gave for its answer to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderIds {
    /// AccessionNumber.
    pub accession_number: String,
    /// PatientID.
    pub patient_id: String,
    /// StudyInstanceUID.
    pub study_instance_uid: Option<String>,
}

/// What explanation to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Explain {
    /// Class activation maps of the last dense block.
    Cam,
}

pub use crate::predict::ModelRef;
pub use crate::predict::Prediction;
pub use crate::predict::Probabilities;
pub use crate::predict::ThresholdSource;
pub use crate::predict::Timings;

/// Live facts about a served variant.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LiveFacts {
    /// Provider in use.
    pub execution_provider: String,
    /// Why CUDA was not used (with `--device auto`), if it was tried.
    pub cuda_fallback_reason: Option<String>,
    /// With `--backend openvino` or `auto`: why this CPU backend serves (the
    /// measurement of both, or why OpenVINO is not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_choice: Option<String>,
    /// With `--backend auto`: the deployment's backend decision this model serves by
    /// (`source`: `measured` by this replica as it started, or `read` from `file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_decision: Option<crate::inference::decision::BackendDecision>,
    /// Who signed its files, verified before it loaded (`--trusted-signers`); null
    /// when it loaded unsigned.
    pub signed_by: Option<crate::signing::SignedBy>,
    /// Why it loaded without a verified signature (`--require-signed-models` off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_warning: Option<String>,
    /// OpenVINO serving with its compiled-model cache (`--openvino-cache-dir`):
    /// whether this start loaded its compiled models from the cache (`false`: they
    /// were compiled, the first start on the cache, or a cache that is not read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openvino_from_cache: Option<bool>,
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
    /// The P(PNEUMONIA) at or above which a positive answer of this version is a
    /// suspected finding (`--urgent-at`: a probability, or this card's threshold at an
    /// operating point): the passive urgent flag its HL7 and FHIR results carry and
    /// the page shows; nothing is reordered or hidden.
    pub urgent_threshold: f64,
    /// Live facts.
    pub live: LiveFacts,
    /// Paths of its training plots (ROC, curves, confusion matrix) that were found
    /// beside the card.
    pub plots: Vec<String>,
    /// What the site chose for it after validating it on its own films
    /// (`--site-card`), with where it came from; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_card: Option<crate::registry::site::AppliedSite>,
    /// Its live figures from confirmed labels (`POST /feedback`), when the server
    /// keeps outcomes (`--outcomes`, `--database-url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_outcomes: Option<crate::outcomes::LiveOutcomes>,
    /// Every loaded version of the variant, ascending, each with its own card and
    /// live facts (`model=NAME@VERSION` answers from one).
    pub versions: Vec<VersionInfo>,
    /// The candidate version running in the shadow of this one, and its agreement
    /// with the answers given so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowInfo>,
}

/// One loaded version of a variant.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VersionInfo {
    /// The version (its card's).
    pub version: String,
    /// `default` (answers that name no version), `shadow` (runs in the default's
    /// shadow, answers only when named), or `loaded` (answers only when named).
    pub role: String,
    /// Its model card.
    pub card: ModelCard,
    /// Its live facts.
    pub live: LiveFacts,
}

/// A shadow candidate and what it has shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ShadowInfo {
    /// The candidate's version.
    pub version: String,
    /// The share of this variant's requests it runs on.
    pub share: f64,
    /// Its agreement with the answers given, overall and by the label answered.
    pub agreement: crate::inference::shadow::ShadowReport,
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
