//! The answer as DICOM: a Comprehensive 3D SR (TID 1500 Measurement Report) that a
//! PACS files next to the analysed image, in the IHE AI Results (AIR) shape.
//!
//! Tree (relationship, value type, concept):
//!
//! ```text
//! CONTAINER (126000, DCM, "Imaging Measurement Report")          TID 1500
//!  ├ HAS CONCEPT MOD  CODE  Language of Content … = English (United States)
//!  ├ HAS OBS CONTEXT  CODE  Observer Type = Device                TID 1001/1004
//!  ├ HAS OBS CONTEXT  UIDREF Device Observer UID
//!  ├ HAS OBS CONTEXT  TEXT  Device Observer Name / Manufacturer / Model Name
//!  ├ HAS CONCEPT MOD  CODE  Procedure reported = Chest imaging
//!  ├ CONTAINS CONTAINER Image Library → Image Library Group → IMAGE (the source)
//!  └ CONTAINS CONTAINER Imaging Measurements
//!     └ CONTAINS CONTAINER Measurement Group                      TID 1501
//!        ├ HAS OBS CONTEXT TEXT/UIDREF Tracking Identifier / Unique Identifier
//!        ├ CONTAINS CODE   Finding = Pneumonia (233604007, SCT)
//!        ├ CONTAINS CODE   Pneumonia = Present | Absent           (qualitative evaluation)
//!        ├ CONTAINS NUM    Probability (122157, DCM) = P(PNEUMONIA), unit 1
//!        ├ CONTAINS NUM    Decision threshold (99CXR) = the threshold, unit 1
//!        ├ CONTAINS TEXT   Caution (99CXR) = a distribution shift, when flagged
//!        ├ CONTAINS TEXT   Model variant (99CXR) = the variant's name
//!        └ CONTAINS TEXT   Algorithm Name = "cxr <variant>"       TID 4019
//!           ├ HAS CONCEPT MOD TEXT Algorithm Version
//!           └ HAS CONCEPT MOD TEXT Algorithm Parameters (the model file's sha256,
//!             its signer and key id, …)
//! ```
//!
//! From the source it copies only what filing in the patient's study needs (patient
//! name, ID, birth date, sex; study date, time, accession number, referring
//! physician; the Study Instance UID and the character set they are written in), and
//! nothing else; none of it is logged.

use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

crate::message_error!(
    /// Why a Structured Report could not be made.
    SrError
);

mod content;
mod sc;
mod uid;

pub use sc::{SECONDARY_CAPTURE, ScImage, build_sc};

use content::{content_tree, dcm, seq};
use uid::name_uid;
pub use uid::{UidMaker, check_uid_root, new_uid};

/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

pub use crate::imaging::dicom::{COPIED_TAGS, SrSource};

/// What the SR reports.
#[derive(Debug, Clone)]
pub struct SrResult<'a> {
    /// Variant name.
    pub variant: &'a str,
    /// Model version (the card's).
    pub version: &'a str,
    /// SHA-256 of the model file.
    pub model_sha256: &'a str,
    /// Who signed the model's files (`name`, key id), verified before it loaded;
    /// none when it loaded unsigned.
    pub signer: Option<(&'a str, &'a str)>,
    /// What was found, or why the image was not analysed.
    pub finding: SrFinding,
}

/// What an SR reports of its image.
#[derive(Debug, Clone)]
pub enum SrFinding {
    /// The image was classified.
    Classified {
        /// P(PNEUMONIA) as served.
        probability: f64,
        /// The threshold applied.
        threshold: f64,
        /// Whether the answer is PNEUMONIA.
        pneumonia: bool,
        /// What a reader must know of the answer (a distribution shift), if any.
        caution: Option<String>,
    },
    /// The image was seen but not classified (not a chest radiograph the model can
    /// answer for), and why: so that the PACS shows the AI saw it.
    NotAnalysed {
        /// The refusal's `error_type`.
        kind: String,
        /// The refusal, for a reader.
        reason: String,
    },
}

/// The source's identifiers an SR references.
pub(super) struct SourceRefs<'a> {
    pub(super) study: &'a str,
    series: &'a str,
    sop_class: &'a str,
    sop_instance: &'a str,
}

impl<'a> SourceRefs<'a> {
    pub(super) fn of(source: &'a SrSource) -> Result<Self, SrError> {
        let missing = |what: &str| {
            format!("the source DICOM has no {what}, so a Structured Report cannot reference it")
        };
        let study_uid = source
            .study_instance_uid
            .as_deref()
            .ok_or_else(|| missing("Study Instance UID"))?;
        let src_series = source
            .series_instance_uid
            .as_deref()
            .ok_or_else(|| missing("Series Instance UID"))?;
        let src_class = source
            .sop_class_uid
            .as_deref()
            .ok_or_else(|| missing("SOP Class UID"))?;
        let src_instance = source
            .sop_instance_uid
            .as_deref()
            .ok_or_else(|| missing("SOP Instance UID"))?;
        Ok(Self {
            study: study_uid,
            series: src_series,
            sop_class: src_class,
            sop_instance: src_instance,
        })
    }

    /// The Referenced SOP Sequence item of the source image.
    pub(super) fn image(&self) -> InMemDicomObject {
        let mut image_ref = InMemDicomObject::new_empty();
        image_ref.put_str(tags::REFERENCED_SOP_CLASS_UID, VR::UI, self.sop_class);
        image_ref.put_str(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, self.sop_instance);
        image_ref
    }
}

/// What every module of one SR shares: its new UIDs and its creation date and time.
struct Instance {
    series_uid: String,
    sop_uid: String,
    da: String,
    tm: String,
    /// `cxr <variant>`.
    algorithm: String,
    /// The software versions, as written in the equipment modules.
    versions: String,
}

/// Builds the SR for `result` on `source`, as a Part-10 file.
pub fn build_sr(
    source: &SrSource,
    result: &SrResult<'_>,
    uids: &UidMaker,
) -> Result<Vec<u8>, SrError> {
    let refs = SourceRefs::of(source)?;
    let (da, tm) = now_da_tm();
    let software = env!("CARGO_PKG_VERSION");
    let inst = Instance {
        series_uid: uids.series("sr-series"),
        sop_uid: uids.instance("sr"),
        da,
        tm,
        algorithm: format!("cxr {}", result.variant),
        versions: format!("{software}\\{} {}", result.variant, result.version),
    };
    let mut o = InMemDicomObject::new_empty();
    put_patient_and_study(&mut o, source, refs.study);
    put_sop_series_equipment(&mut o, &inst);
    put_document_general(&mut o, &inst, &refs);
    put_contributing_equipment(&mut o, &inst);
    put_document_root(&mut o);
    if let SrFinding::NotAnalysed { .. } = result.finding {
        o.put_str(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            "cxr AI result: image not analysed",
        );
    }
    let content = content_tree(result, refs.image(), uids, &inst.algorithm);
    o.put(seq(tags::CONTENT_SEQUENCE, content));
    part10(o, COMPREHENSIVE_3D_SR, &inst.sop_uid, software)
}

/// Patient and General Study: the copied source attributes; type 2 attributes the
/// source lacked are present empty.
pub(super) fn put_patient_and_study(o: &mut InMemDicomObject, source: &SrSource, study_uid: &str) {
    for e in source.copied() {
        o.put(e.clone());
    }
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
    ] {
        if o.element_opt(tag).ok().flatten().is_none() {
            o.put(DataElement::new(tag, vr, dicom_core::PrimitiveValue::Empty));
        }
    }
    o.put_str(tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
}

/// SOP Common, SR Document Series, General and Enhanced General Equipment.
fn put_sop_series_equipment(o: &mut InMemDicomObject, inst: &Instance) {
    let (da, tm) = (inst.da.as_str(), inst.tm.as_str());
    // SOP Common.
    o.put_str(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_3D_SR);
    o.put_str(tags::SOP_INSTANCE_UID, VR::UI, &inst.sop_uid);
    o.put_str(tags::INSTANCE_CREATION_DATE, VR::DA, da);
    o.put_str(tags::INSTANCE_CREATION_TIME, VR::TM, tm);
    o.put_str(tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000");
    // SR Document Series.
    o.put_str(tags::MODALITY, VR::CS, "SR");
    o.put_str(tags::SERIES_INSTANCE_UID, VR::UI, &inst.series_uid);
    o.put_str(tags::SERIES_NUMBER, VR::IS, "9901");
    o.put_str(tags::SERIES_DATE, VR::DA, da);
    o.put_str(tags::SERIES_TIME, VR::TM, tm);
    o.put_str(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "cxr AI result: computer-generated, not for standalone diagnosis",
    );
    o.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    // General and Enhanced General Equipment.
    o.put_str(tags::MANUFACTURER, VR::LO, "cxr");
    o.put_str(tags::MANUFACTURER_MODEL_NAME, VR::LO, "cxr-serve");
    o.put_str(tags::DEVICE_SERIAL_NUMBER, VR::LO, "cxr-serve");
    o.put_str(tags::SOFTWARE_VERSIONS, VR::LO, inst.versions.as_str());
}

/// SR Document General, with the source as the evidence.
fn put_document_general(o: &mut InMemDicomObject, inst: &Instance, refs: &SourceRefs<'_>) {
    let (da, tm) = (inst.da.as_str(), inst.tm.as_str());
    // SR Document General.
    o.put_str(tags::INSTANCE_NUMBER, VR::IS, "1");
    o.put_str(tags::CONTENT_DATE, VR::DA, da);
    o.put_str(tags::CONTENT_TIME, VR::TM, tm);
    o.put_str(tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    o.put_str(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    o.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    let mut series_ref = InMemDicomObject::new_empty();
    series_ref.put_str(tags::SERIES_INSTANCE_UID, VR::UI, refs.series);
    series_ref.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![refs.image()]));
    let mut evidence = InMemDicomObject::new_empty();
    evidence.put_str(tags::STUDY_INSTANCE_UID, VR::UI, refs.study);
    evidence.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series_ref]));
    o.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence],
    ));
}

/// The device as a contributor, and the local coding scheme's declaration.
fn put_contributing_equipment(o: &mut InMemDicomObject, inst: &Instance) {
    let mut equipment = InMemDicomObject::new_empty();
    equipment.put_str(tags::MANUFACTURER, VR::LO, "cxr");
    equipment.put_str(
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        inst.algorithm.as_str(),
    );
    equipment.put_str(tags::SOFTWARE_VERSIONS, VR::LO, inst.versions.as_str());
    equipment.put(seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![dcm("109102", "Processing Equipment")],
    ));
    equipment.put_str(
        tags::CONTRIBUTION_DATE_TIME,
        VR::DT,
        format!("{}{}+0000", inst.da, inst.tm),
    );
    o.put(seq(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, vec![equipment]));
    let mut scheme = InMemDicomObject::new_empty();
    scheme.put_str(tags::CODING_SCHEME_DESIGNATOR, VR::SH, LOCAL_SCHEME);
    scheme.put_str(tags::CODING_SCHEME_NAME, VR::ST, "cxr local concepts");
    scheme.put_str(
        tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
        VR::ST,
        "the cxr project",
    );
    o.put(seq(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![scheme],
    ));
}

/// SR Document Content: the root container of the TID 1500 tree.
fn put_document_root(o: &mut InMemDicomObject) {
    o.put_str(tags::VALUE_TYPE, VR::CS, "CONTAINER");
    o.put(seq(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![dcm("126000", "Imaging Measurement Report")],
    ));
    o.put_str(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    let mut template = InMemDicomObject::new_empty();
    template.put_str(tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    template.put_str(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500");
    o.put(seq(tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]));
}

/// `o` with its file meta group, written as a Part-10 file.
pub(super) fn part10(
    o: InMemDicomObject,
    sop_class: &str,
    sop_uid: &str,
    software: &str,
) -> Result<Vec<u8>, SrError> {
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_VR_LE)
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_uid)
        .implementation_class_uid(name_uid("cxr-serve implementation"))
        .implementation_version_name(format!("CXR_{software}"));
    let file = o.with_meta(meta).map_err(|e| SrError(e.to_string()))?;
    let mut out = Vec::new();
    file.write_all(&mut out)
        .map_err(|e| SrError(e.to_string()))?;
    Ok(out)
}

/// The coding scheme of the two concepts no standard names (a `99` local scheme,
/// declared in the Coding Scheme Identification Sequence).
pub const LOCAL_SCHEME: &str = "99CXR";

/// Date (YYYYMMDD) and time (HHMMSS) now, UTC.
pub(super) fn now_da_tm() -> (String, String) {
    let t = crate::clock::now_rfc3339(); // 2026-11-26T16:52:54.123Z
    let da = t[..10].replace('-', "");
    let tm = t[11..19].replace(':', "");
    (da, tm)
}
