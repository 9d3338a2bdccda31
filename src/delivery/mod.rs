//! Results to the RIS and the EHR: what one analysed (or refused) image says, in the
//! terms an HL7 v2 ORU^R01 and a FHIR R4 DiagnosticReport carry, made once by the
//! core's caller (the DICOM node, the folder job, `/predict` with order identifiers)
//! and written by each format's writer (`hl7`, `fhir`).
//!
//! These are facts the code already has, typed: nothing here is parsed back out of a
//! message or an answer's text.
//!
//! The durable outbox lives here too ([`outbox`]: SQLite or PostgreSQL, dead
//! letters, retention), with the one sending loop ([`sender`]) that hands each
//! destination's items to its [`Channel`]: the DICOM node's C-STORE and STOW-RS
//! senders, [`hl7`]'s MLLP client, the FHIR writer. Every door files its results
//! through [`Delivery::file`]; [`report_facts`] makes one result's facts.
//!
//! - `outbox.rs`: items waiting (any kind), claims, dead letters, retention.
//! - `sender.rs`: the loop, rounds, settling (sent, retried, dead).
//! - `hl7.rs`: ORU^R01 (v2.5.1) from [`ReportFacts`], and the MLLP channel.
//! - `fhir.rs`: a FHIR R4 transaction Bundle from [`ReportFacts`], and the channel
//!   that POSTs it.

pub mod fhir;
pub mod hl7;
pub mod outbox;
pub mod sender;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::delivery::outbox::Entry;
use crate::delivery::outbox::Item;
use crate::delivery::outbox::Outbox;
use crate::delivery::outbox::OutboxError;
use crate::delivery::outbox::Policy;
use crate::delivery::sender::Round;
use crate::eval::calibration::Target;
use crate::imaging::dicom::SrSource;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::Prediction;
use crate::predict::ResultObject;
use crate::predict::Valid;

/// The intended-use wording every message carries.
pub const INTENDED_USE: &str = "AI result: preliminary, not for standalone diagnosis";

/// SNOMED CT: pneumonia (disorder).
pub const SNOMED_PNEUMONIA: (&str, &str) = ("233604007", "Pneumonia");

/// One result, as the RIS and the EHR are told it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFacts {
    /// The result's identity: the same image analysed by the same model file with
    /// the same decision inputs gives the same id (HL7 MSH-10 and the FHIR
    /// identifiers derive from it, so a resend is recognised as one result).
    pub result_id: String,
    /// When the result was made (RFC 3339, UTC).
    pub observed_at: String,
    /// The patient, from the source image's patient module (or the caller's id).
    pub patient: Patient,
    /// The order the image was taken for.
    pub order: Order,
    /// The imaging study and the image the result is of.
    pub study: Study,
    /// The model that answered (or that refused the image).
    pub model: ModelFacts,
    /// What was found, or why nothing was.
    pub outcome: Outcome,
    /// A positive result at or above the urgency threshold: the passive "suspected
    /// finding" flag (it reorders nothing).
    pub urgent: bool,
}

/// The patient module. Text values are as decoded from the source (Unicode).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patient {
    /// PatientID (0010,0020).
    pub id: Option<String>,
    /// IssuerOfPatientID (0010,0021).
    pub issuer: Option<String>,
    /// PatientName (0010,0010) as DICOM PN: `Family^Given^Middle^Prefix^Suffix`
    /// (the alphabetic group only).
    pub name: Option<String>,
    /// PatientBirthDate (0010,0030), `YYYYMMDD`.
    pub birth_date: Option<String>,
    /// PatientSex (0010,0040): `M`, `F` or `O`.
    pub sex: Option<String>,
}

/// The order's identifiers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Order {
    /// AccessionNumber (0008,0050).
    pub accession_number: Option<String>,
    /// PlacerOrderNumberImagingServiceRequest (0040,2016).
    pub placer_order_number: Option<String>,
    /// FillerOrderNumberImagingServiceRequest (0040,2017).
    pub filler_order_number: Option<String>,
}

/// The study and the image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Study {
    /// StudyInstanceUID (0020,000D).
    pub study_instance_uid: Option<String>,
    /// SeriesInstanceUID (0020,000E).
    pub series_instance_uid: Option<String>,
    /// SOPInstanceUID (0008,0018) of the image analysed.
    pub sop_instance_uid: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
}

/// The model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    /// Variant name (`weighted`).
    pub name: String,
    /// Version (`2.0.0`).
    pub version: String,
    /// SHA-256 of its ONNX file.
    pub sha256: String,
}

/// The out-of-distribution verdict on an analysed image (the core's, typed).
pub use crate::predict::Verdict;

/// Which threshold answered (the core's, typed).
pub use crate::predict::ThresholdKind;

/// What the analysis gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The image was classified.
    Classified {
        /// Pneumonia present (P(PNEUMONIA) at or above the threshold).
        pneumonia: bool,
        /// P(PNEUMONIA), calibrated.
        probability: f64,
        /// The threshold applied.
        threshold: f64,
        /// Where it came from: the card, the site card, the caller's threshold or
        /// operating point.
        threshold_source: ThresholdKind,
        /// The OOD verdict, with the score when there is one.
        verdict: Verdict,
        /// The OOD score.
        ood_score: Option<f64>,
        /// The answer's caveats (a distribution-shift caution, a lateral view).
        warnings: Vec<String>,
    },
    /// The image was not analysed: refused by a gate or as out of distribution.
    NotAnalysed {
        /// The refusal's `error_type` (as in the API's error table).
        error_type: String,
        /// Its message.
        reason: String,
    },
}

/// What kind of destination a channel is: which results it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DICOM objects (SR, SC) by C-STORE or STOW-RS.
    Dicom,
    /// HL7 v2 ORU^R01 over MLLP.
    Hl7,
    /// FHIR R4 (DiagnosticReport and Observation).
    Fhir,
}

/// One channel's item for a result, made from its [`ReportFacts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The outbox row's kind (`oru`, ...).
    pub kind: &'static str,
    /// Its identity at the destination (derived from the result's id: a resend of
    /// the same result is the same item, never queued twice).
    pub uid: String,
    /// The bytes sent.
    pub payload: Vec<u8>,
}

/// A boxed sending future.
pub type Sending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One destination: its name (the outbox rows'), its kind, how it writes a result
/// ([`Channel::render`]: none for the DICOM channels, whose objects the core makes)
/// and how it sends a round's items (settling each through the [`Round`]).
pub trait Channel: Send + Sync + 'static {
    /// Its name in the outbox and the metrics (`hl7:host:port`, `AE@host:port`, a
    /// URL).
    fn name(&self) -> String;
    /// Its kind.
    fn kind(&self) -> Kind;
    /// Its item for one result (the report writers); none for the DICOM channels.
    fn render(&self, _facts: &ReportFacts) -> Option<Rendered> {
        None
    }
    /// Sends `items` (all of them this channel's), settling each in `round`.
    fn send(self: Arc<Self>, round: Arc<Round>, items: Vec<Item>) -> Sending;
}

/// Where the outbox is: `--outbox` (SQLite; `--dicom-outbox` is its older name) or
/// `--database-url` (PostgreSQL).
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The SQLite file (without `database_url`).
    pub path: PathBuf,
    /// PostgreSQL, shared by replicas.
    pub database_url: Option<String>,
    /// How items are tried and kept.
    pub policy: Policy,
}

/// At what P(PNEUMONIA) a positive result is flagged urgent (`--urgent-at`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UrgentAt {
    /// A fixed probability.
    Probability(f64),
    /// The card's threshold at an operating point on its validation ROC (the card's
    /// own threshold when it has no ROC, or no point reaches the target).
    OperatingPoint(Target),
}

impl Default for UrgentAt {
    fn default() -> Self {
        Self::OperatingPoint(Target::Sensitivity(crate::defaults::URGENT_SENSITIVITY))
    }
}

impl std::str::FromStr for UrgentAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(p) = s.parse::<f64>() {
            return if p > 0.0 && p < 1.0 {
                Ok(Self::Probability(p))
            } else {
                Err(format!("--urgent-at {s}: a probability must lie in (0, 1)"))
            };
        }
        s.parse::<Target>()
            .map(Self::OperatingPoint)
            .map_err(|e| format!("--urgent-at {s}: {}; or a probability", e.0))
    }
}

impl UrgentAt {
    /// The probability at or above which `card`'s positive results are urgent.
    pub fn threshold(&self, card: &crate::registry::ModelCard) -> f64 {
        self.on(card.threshold, card.operating_curve.as_ref())
    }

    /// The probability for a card's `threshold` and validation ROC.
    fn on(&self, threshold: f64, curve: Option<&crate::eval::calibration::OperatingCurve>) -> f64 {
        match self {
            Self::Probability(p) => *p,
            Self::OperatingPoint(t) => curve
                .and_then(|c| c.threshold_for(*t))
                .map_or(threshold, |p| p.threshold),
        }
    }
}

/// One result's facts, as every door reports it: the answer (or the refusal),
/// the model, the source's patient, order and study (none without a DICOM source:
/// the door may add the caller's identifiers), `result_id` the result's filing key
/// ([`Core::filing_key`]), and the urgent flag (`urgent_at`).
pub fn report_facts(
    valid: &Valid,
    outcome: Result<&Prediction, &PredictError>,
    source: Option<&SrSource>,
    result_id: &str,
    urgent_at: UrgentAt,
) -> ReportFacts {
    let card = &valid.model.card;
    let ids = source.map(|s| s.ids.clone()).unwrap_or_default();
    let outcome = match outcome {
        Ok(p) => Outcome::Classified {
            pneumonia: p.label.is_pneumonia(),
            probability: f64::from(p.probabilities.PNEUMONIA),
            threshold: p.threshold,
            threshold_source: p.threshold_source.kind,
            verdict: p.verdict,
            ood_score: p.ood_score,
            warnings: p.warnings.clone(),
        },
        Err(e) => Outcome::NotAnalysed {
            error_type: e.error_type().as_str().to_string(),
            reason: e.to_string(),
        },
    };
    let urgent = matches!(
        &outcome,
        Outcome::Classified { pneumonia: true, probability, .. }
            if *probability >= urgent_at.threshold(card)
    );
    ReportFacts {
        result_id: result_id.to_string(),
        observed_at: crate::clock::now_rfc3339(),
        patient: Patient {
            id: ids.patient_id,
            issuer: ids.issuer_of_patient_id,
            name: ids.patient_name,
            birth_date: ids.patient_birth_date,
            sex: ids.patient_sex,
        },
        order: Order {
            accession_number: ids.accession_number,
            placer_order_number: ids.placer_order_number,
            filler_order_number: ids.filler_order_number,
        },
        study: Study {
            study_instance_uid: source.and_then(|s| s.study_instance_uid.clone()),
            series_instance_uid: source.and_then(|s| s.series_instance_uid.clone()),
            sop_instance_uid: source.and_then(|s| s.sop_instance_uid.clone()),
            modality: ids.modality,
        },
        model: ModelFacts {
            name: card.name.clone(),
            version: card.version.clone(),
            sha256: card.onnx.sha256.clone(),
        },
        outcome,
        urgent,
    }
}

/// The outbox, its channels and its sending loop: what every door files results
/// through.
pub struct Delivery {
    /// The server's metrics (not the core: the loop must not keep the models'
    /// workers alive after the doors are gone).
    metrics: Arc<crate::metrics::ServerMetrics>,
    outbox: Arc<Outbox>,
    channels: Vec<Arc<dyn Channel>>,
    urgent_at: UrgentAt,
    /// Wakes the sending loop when results are queued.
    wake: Notify,
}

impl Delivery {
    /// Opens the outbox and starts the sending loop.
    pub async fn start(
        core: &Core,
        cfg: OutboxConfig,
        channels: Vec<Arc<dyn Channel>>,
        urgent_at: UrgentAt,
    ) -> Result<Arc<Self>, OutboxError> {
        let outbox = tokio::task::spawn_blocking(move || match &cfg.database_url {
            Some(url) => Outbox::connect(url, cfg.policy),
            None => Outbox::open(&cfg.path, cfg.policy),
        })
        .await
        .map_err(|e| OutboxError(e.to_string()))??;
        tracing::info!(database = outbox.kind(), destinations = ?channels.iter().map(|c| c.name()).collect::<Vec<_>>(), "outbox open");
        let d = Arc::new(Self {
            metrics: core.metrics().clone(),
            outbox: Arc::new(outbox),
            channels,
            urgent_at,
            wake: Notify::new(),
        });
        tokio::spawn(sender::run(d.clone()));
        Ok(d)
    }

    /// The outbox (its dead letters: `GET /dicom/outbox/dead-letters`).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Whether a channel of `kind` is configured.
    pub fn has(&self, kind: Kind) -> bool {
        self.channels.iter().any(|c| c.kind() == kind)
    }

    /// The urgency rule.
    pub fn urgent_at(&self) -> UrgentAt {
        self.urgent_at
    }

    /// Queues one result for every channel, all or none: `objects` (the core's
    /// DICOM objects) for the DICOM channels, and each report channel's rendering of
    /// `facts`. Items already queued or sent (the same result) are not added again;
    /// an urgent result newly queued is counted (`cxr_urgent_results_total`).
    /// Blocks (a database write): call it from a blocking thread.
    pub fn file(
        &self,
        source_key: &str,
        objects: &[ResultObject],
        facts: Option<&ReportFacts>,
    ) -> Result<usize, OutboxError> {
        let mut entries = Vec::new();
        for c in &self.channels {
            if c.kind() == Kind::Dicom {
                entries.extend(objects.iter().map(|o| Entry {
                    destination: c.name(),
                    kind: o.kind.to_string(),
                    uid: o.sop_instance_uid.clone(),
                    payload: o.bytes.clone(),
                }));
            } else if let Some(r) = facts.and_then(|f| c.render(f)) {
                entries.push(Entry {
                    destination: c.name(),
                    kind: r.kind.to_string(),
                    uid: r.uid,
                    payload: r.payload,
                });
            }
        }
        let added = self.outbox.queue(source_key, &entries)?;
        if added > 0 {
            if facts.is_some_and(|f| f.urgent) {
                self.metrics.urgent_results.inc();
            }
            self.wake.notify_one();
        }
        Ok(added)
    }

    /// Waits until nothing is due within `within` (the folder job, before it
    /// exits); returns the items still waiting.
    pub async fn settle_within(&self, within: Duration) -> i64 {
        let until = tokio::time::Instant::now() + within;
        loop {
            let o = self.outbox.clone();
            let waiting: i64 = sender::blocking(move || o.depth())
                .await
                .and_then(Result::ok)
                .map_or(0, |d| d.iter().map(|(_, n)| n).sum());
            if waiting == 0 || tokio::time::Instant::now() >= until {
                return waiting;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn update_gauges(&self) {
        let metrics = &self.metrics;
        let depth = self.outbox.depth().unwrap_or_default();
        let dead = self.outbox.dead_depth().unwrap_or_default();
        let of = |counts: &[(String, i64)], name: &str| {
            counts
                .iter()
                .find(|(d, _)| d == name)
                .map_or(0, |(_, n)| *n)
        };
        for c in &self.channels {
            let name = c.name();
            metrics
                .dicom_outbox_depth
                .with_label_values(&[&name])
                .set(of(&depth, &name));
            metrics
                .dicom_dead_letters
                .with_label_values(&[&name])
                .set(of(&dead, &name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::RocPoint;
    use crate::eval::calibration::OperatingCurve;

    #[test]
    fn the_urgency_threshold_is_a_probability_or_the_cards_operating_point() {
        assert_eq!("0.7".parse::<UrgentAt>(), Ok(UrgentAt::Probability(0.7)));
        assert!("1.5".parse::<UrgentAt>().is_err());
        assert!("fast".parse::<UrgentAt>().is_err());
        let point = |threshold, tpr| RocPoint {
            threshold,
            fpr: 1.0 - threshold,
            tpr,
        };
        let curve = OperatingCurve {
            source: "validation".into(),
            n: 100,
            points: vec![
                point(0.9, 0.5),
                point(0.6, 0.93),
                point(0.4, 0.96),
                point(0.1, 1.0),
            ],
        };
        // The default: the strictest threshold reaching 95 % validation sensitivity.
        let default = UrgentAt::default();
        assert_eq!(default, "sensitivity:0.95".parse().unwrap());
        assert_eq!(default.on(0.5, Some(&curve)), 0.4);
        // Without a ROC, the card's own threshold.
        assert_eq!(default.on(0.5, None), 0.5);
        assert_eq!(UrgentAt::Probability(0.8).on(0.5, Some(&curve)), 0.8);
    }
}
