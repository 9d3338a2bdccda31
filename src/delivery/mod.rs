//! Results to the RIS and the EHR: what one analysed (or refused) image says, in the
//! terms an HL7 v2 ORU^R01 and a FHIR R4 DiagnosticReport carry, made once by the
//! core's caller (the DICOM node, the folder job, `/predict` with order identifiers)
//! and written by each format's writer (`hl7`, `fhir`).
//!
//! These are facts the code already has, typed: nothing here is parsed back out of a
//! message or an answer's text.

pub mod fhir;

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

/// The out-of-distribution verdict on an analysed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// At or under the model's threshold.
    InDistribution,
    /// Above it (answered with a caution; refused only above the refusal threshold).
    Shift,
    /// No OOD model, or `--ood-action off`.
    NotScored,
}

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
        /// Where it came from: `card`, `site`, `query` or `operating_point`.
        threshold_source: String,
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
