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
//!        ├ CONTAINS TEXT   Model variant (99CXR) = the variant's name
//!        └ CONTAINS TEXT   Algorithm Name = "cxr <variant>"       TID 4019
//!           ├ HAS CONCEPT MOD TEXT Algorithm Version
//!           └ HAS CONCEPT MOD TEXT Algorithm Parameters (the model file's sha256, …)
//! ```
//!
//! From the source it copies only what filing in the patient's study needs (patient
//! name, ID, birth date, sex; study date, time, accession number, referring
//! physician; the Study Instance UID and the character set they are written in), and
//! nothing else; none of it is logged.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// The source attributes an SR carries for filing, copied as they were encoded.
pub const COPIED_TAGS: [Tag; 9] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::REFERRING_PHYSICIAN_NAME,
];

/// What an SR needs of its source image. Its `Debug` shows no patient attribute.
#[derive(Clone, Default)]
pub struct SrSource {
    copied: Vec<DataElement<InMemDicomObject>>,
    /// StudyInstanceUID.
    pub study_instance_uid: Option<String>,
    /// SeriesInstanceUID.
    pub series_instance_uid: Option<String>,
    /// SOPClassUID (or the meta's MediaStorageSOPClassUID).
    pub sop_class_uid: Option<String>,
    /// SOPInstanceUID.
    pub sop_instance_uid: Option<String>,
}

impl std::fmt::Debug for SrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrSource")
            .field("copied_attributes", &self.copied.len())
            .field("sop_instance_uid", &self.sop_instance_uid)
            .finish()
    }
}

impl SrSource {
    /// Takes the attributes an SR needs from a decoded source object.
    pub fn from_object(obj: &InMemDicomObject, meta_sop_class: Option<&str>) -> Self {
        let text = |tag| {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
                .filter(|s| !s.is_empty())
        };
        Self {
            copied: COPIED_TAGS
                .iter()
                .filter_map(|t| obj.element_opt(*t).ok().flatten().cloned())
                .collect(),
            study_instance_uid: text(tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(tags::SERIES_INSTANCE_UID),
            sop_class_uid: text(tags::SOP_CLASS_UID)
                .or_else(|| meta_sop_class.map(|s| s.trim_end_matches('\0').to_string())),
            sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        }
    }
}

/// What the SR reports.
#[derive(Debug, Clone)]
pub struct SrResult<'a> {
    /// Variant name.
    pub variant: &'a str,
    /// Model version (the card's).
    pub version: &'a str,
    /// SHA-256 of the model file.
    pub model_sha256: &'a str,
    /// P(PNEUMONIA) as served.
    pub probability: f64,
    /// The threshold applied.
    pub threshold: f64,
    /// Whether the answer is PNEUMONIA.
    pub pneumonia: bool,
}

/// A new UID: `2.25.<UUID as an integer>` (ISO/IEC 9834-8), or under `root` with the
/// UUID's digits that fit in 64 characters.
pub fn new_uid(root: Option<&str>) -> String {
    let n = uuid::Uuid::new_v4().as_u128();
    match root {
        None => format!("2.25.{n}"),
        Some(r) => {
            let digits = n.to_string();
            let room = 64usize.saturating_sub(r.len() + 1).min(digits.len());
            let tail = digits[digits.len() - room..].trim_start_matches('0');
            format!("{r}.{}", if tail.is_empty() { "0" } else { tail })
        }
    }
}

/// Checks a `--uid-root`: numeric components without leading zeros, at most 40
/// characters (so that at least 23 random digits follow).
pub fn check_uid_root(root: &str) -> Result<(), String> {
    let ok = !root.is_empty()
        && root.len() <= 40
        && root.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--uid-root `{root}` must be a DICOM UID root: digits and dots, no leading zeros, at most 40 characters"
        ))
    }
}

/// `2.25.` + the first 128 bits of SHA-256(`name`): a stable UID for a named thing.
fn name_uid(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    // Mark it as a name-based (version 5 style) UUID, as ISO/IEC 9834-8 asks.
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(b))
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put_str(tags::CODE_VALUE, VR::SH, value);
    o.put_str(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
    o.put_str(tags::CODE_MEANING, VR::LO, meaning);
    o
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// A content item with its relationship, value type and concept name.
fn item(rel: &str, vt: &str, concept: InMemDicomObject) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put_str(tags::RELATIONSHIP_TYPE, VR::CS, rel);
    o.put_str(tags::VALUE_TYPE, VR::CS, vt);
    o.put(seq(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![concept]));
    o
}

fn text_item(rel: &str, concept: InMemDicomObject, value: &str) -> InMemDicomObject {
    let mut o = item(rel, "TEXT", concept);
    o.put_str(tags::TEXT_VALUE, VR::UT, value);
    o
}

fn code_item(rel: &str, concept: InMemDicomObject, value: InMemDicomObject) -> InMemDicomObject {
    let mut o = item(rel, "CODE", concept);
    o.put(seq(tags::CONCEPT_CODE_SEQUENCE, vec![value]));
    o
}

fn uid_item(rel: &str, concept: InMemDicomObject, uid: &str) -> InMemDicomObject {
    let mut o = item(rel, "UIDREF", concept);
    o.put_str(tags::UID, VR::UI, uid);
    o
}

fn num_item(rel: &str, concept: InMemDicomObject, value: f64) -> InMemDicomObject {
    let mut o = item(rel, "NUM", concept);
    let mut mv = InMemDicomObject::new_empty();
    // DS holds at most 16 characters.
    mv.put_str(tags::NUMERIC_VALUE, VR::DS, format!("{value:.10}"));
    mv.put(seq(
        tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
        vec![code("1", "UCUM", "no units")],
    ));
    o.put(seq(tags::MEASURED_VALUE_SEQUENCE, vec![mv]));
    o
}

fn container(
    rel: &str,
    concept: InMemDicomObject,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut o = item(rel, "CONTAINER", concept);
    o.put_str(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    o.put(seq(tags::CONTENT_SEQUENCE, children));
    o
}

fn with_children(mut o: InMemDicomObject, children: Vec<InMemDicomObject>) -> InMemDicomObject {
    o.put(seq(tags::CONTENT_SEQUENCE, children));
    o
}

fn dcm(value: &str, meaning: &str) -> InMemDicomObject {
    code(value, "DCM", meaning)
}

fn local(value: &str, meaning: &str) -> InMemDicomObject {
    code(value, LOCAL_SCHEME, meaning)
}

/// The coding scheme of the two concepts no standard names (a `99` local scheme,
/// declared in the Coding Scheme Identification Sequence).
pub const LOCAL_SCHEME: &str = "99CXR";

/// Date (YYYYMMDD) and time (HHMMSS) now, UTC.
fn now_da_tm() -> (String, String) {
    let t = crate::audit::now_rfc3339(); // 2026-11-26T16:52:54.123Z
    let da = t[..10].replace('-', "");
    let tm = t[11..19].replace(':', "");
    (da, tm)
}

/// Builds the SR for `result` on `source`, as a Part-10 file.
pub fn build_sr(
    source: &SrSource,
    result: &SrResult<'_>,
    uid_root: Option<&str>,
) -> Result<Vec<u8>, String> {
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
    let series_uid = new_uid(uid_root);
    let sop_uid = new_uid(uid_root);
    let (da, tm) = now_da_tm();
    let software = env!("CARGO_PKG_VERSION");
    let algorithm = format!("cxr {}", result.variant);

    let mut o = InMemDicomObject::new_empty();
    for e in &source.copied {
        o.put(e.clone());
    }
    // Patient and General Study: type 2 attributes the source lacked are present empty.
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
    // SOP Common.
    o.put_str(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_3D_SR);
    o.put_str(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    o.put_str(tags::INSTANCE_CREATION_DATE, VR::DA, &da);
    o.put_str(tags::INSTANCE_CREATION_TIME, VR::TM, &tm);
    o.put_str(tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000");
    // SR Document Series.
    o.put_str(tags::MODALITY, VR::CS, "SR");
    o.put_str(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    o.put_str(tags::SERIES_NUMBER, VR::IS, "9901");
    o.put_str(tags::SERIES_DATE, VR::DA, &da);
    o.put_str(tags::SERIES_TIME, VR::TM, &tm);
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
    o.put_str(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        format!("{software}\\{} {}", result.variant, result.version),
    );
    // SR Document General.
    o.put_str(tags::INSTANCE_NUMBER, VR::IS, "1");
    o.put_str(tags::CONTENT_DATE, VR::DA, &da);
    o.put_str(tags::CONTENT_TIME, VR::TM, &tm);
    o.put_str(tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    o.put_str(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    o.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    let mut image_ref = InMemDicomObject::new_empty();
    image_ref.put_str(tags::REFERENCED_SOP_CLASS_UID, VR::UI, src_class);
    image_ref.put_str(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, src_instance);
    let mut series_ref = InMemDicomObject::new_empty();
    series_ref.put_str(tags::SERIES_INSTANCE_UID, VR::UI, src_series);
    series_ref.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![image_ref.clone()]));
    let mut evidence = InMemDicomObject::new_empty();
    evidence.put_str(tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
    evidence.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series_ref]));
    o.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence],
    ));
    // The device, as a contributor.
    let mut equipment = InMemDicomObject::new_empty();
    equipment.put_str(tags::MANUFACTURER, VR::LO, "cxr");
    equipment.put_str(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.as_str());
    equipment.put_str(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        format!("{software}\\{} {}", result.variant, result.version),
    );
    equipment.put(seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![dcm("109102", "Processing Equipment")],
    ));
    equipment.put_str(
        tags::CONTRIBUTION_DATE_TIME,
        VR::DT,
        format!("{da}{tm}+0000"),
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

    // SR Document Content: the TID 1500 tree.
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

    let mut image = item("CONTAINS", "IMAGE", code("260753009", "SCT", "Source"));
    image.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![image_ref]));
    let finding = code("233604007", "SCT", "Pneumonia");
    let presence = if result.pneumonia {
        code("52101004", "SCT", "Present")
    } else {
        code("272519000", "SCT", "Absent")
    };
    let params = format!(
        "model_sha256={}; variant={}; threshold={}",
        result.model_sha256, result.variant, result.threshold
    );
    let group = container(
        "CONTAINS",
        dcm("125007", "Measurement Group"),
        vec![
            text_item(
                "HAS OBS CONTEXT",
                dcm("112039", "Tracking Identifier"),
                "pneumonia classification",
            ),
            uid_item(
                "HAS OBS CONTEXT",
                dcm("112040", "Tracking Unique Identifier"),
                &new_uid(uid_root),
            ),
            code_item("CONTAINS", dcm("121071", "Finding"), finding.clone()),
            code_item("CONTAINS", finding, presence),
            num_item("CONTAINS", dcm("122157", "Probability"), result.probability),
            num_item(
                "CONTAINS",
                local("THRESHOLD", "Decision threshold"),
                result.threshold,
            ),
            text_item(
                "CONTAINS",
                local("VARIANT", "Model variant"),
                result.variant,
            ),
            with_children(
                text_item("CONTAINS", dcm("111001", "Algorithm Name"), &algorithm),
                vec![
                    text_item(
                        "HAS CONCEPT MOD",
                        dcm("111003", "Algorithm Version"),
                        result.version,
                    ),
                    text_item(
                        "HAS CONCEPT MOD",
                        dcm("111002", "Algorithm Parameters"),
                        &params,
                    ),
                ],
            ),
        ],
    );
    let content = vec![
        code_item(
            "HAS CONCEPT MOD",
            dcm("121049", "Language of Content Item and Descendants"),
            code("en-US", "RFC5646", "English (United States)"),
        ),
        code_item(
            "HAS OBS CONTEXT",
            dcm("121005", "Observer Type"),
            dcm("121007", "Device"),
        ),
        uid_item(
            "HAS OBS CONTEXT",
            dcm("121012", "Device Observer UID"),
            &name_uid(&format!("cxr-serve {}", result.model_sha256)),
        ),
        text_item(
            "HAS OBS CONTEXT",
            dcm("121013", "Device Observer Name"),
            &algorithm,
        ),
        text_item(
            "HAS OBS CONTEXT",
            dcm("121014", "Device Observer Manufacturer"),
            "cxr",
        ),
        text_item(
            "HAS OBS CONTEXT",
            dcm("121015", "Device Observer Model Name"),
            "cxr-serve",
        ),
        code_item(
            "HAS CONCEPT MOD",
            dcm("121058", "Procedure reported"),
            code("413815006", "SCT", "Chest imaging"),
        ),
        container(
            "CONTAINS",
            dcm("111028", "Image Library"),
            vec![container(
                "CONTAINS",
                dcm("126200", "Image Library Group"),
                vec![image],
            )],
        ),
        container(
            "CONTAINS",
            dcm("126010", "Imaging Measurements"),
            vec![group],
        ),
    ];
    o.put(seq(tags::CONTENT_SEQUENCE, content));

    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_VR_LE)
        .media_storage_sop_class_uid(COMPREHENSIVE_3D_SR)
        .media_storage_sop_instance_uid(&sop_uid)
        .implementation_class_uid(name_uid("cxr-serve implementation"))
        .implementation_version_name(format!("CXR_{software}"));
    let file = o.with_meta(meta).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_and_fit() {
        for root in [None, Some("1.2.826.0.1.3680043.10.999"), Some("1.2.3")] {
            let u = new_uid(root);
            assert!(u.len() <= 64, "{u}");
            assert!(check_uid_root(&u).is_ok() || u.len() > 40, "{u}");
            assert!(u.split('.').all(|c| c == "0" || !c.starts_with('0')), "{u}");
            assert_ne!(u, new_uid(root));
            if let Some(r) = root {
                assert!(u.starts_with(&format!("{r}.")));
            } else {
                assert!(u.starts_with("2.25."));
            }
        }
        assert!(check_uid_root("1.2.3").is_ok());
        for bad in ["", "1..2", "1.02", "a.1", &"1.".repeat(30)] {
            assert!(check_uid_root(bad).is_err(), "{bad}");
        }
        assert!(name_uid("x").len() <= 64);
        assert_eq!(name_uid("x"), name_uid("x"));
    }
}
