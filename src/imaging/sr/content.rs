//! SR content items (PS3.3 C.17.3) and the TID 1500 tree of one answer.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{LOCAL_SCHEME, SrFinding, SrResult, UidMaker, name_uid};

pub(super) fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put_str(tags::CODE_VALUE, VR::SH, value);
    o.put_str(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
    o.put_str(tags::CODE_MEANING, VR::LO, meaning);
    o
}

pub(super) fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
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

pub(super) fn dcm(value: &str, meaning: &str) -> InMemDicomObject {
    code(value, "DCM", meaning)
}

fn local(value: &str, meaning: &str) -> InMemDicomObject {
    code(value, LOCAL_SCHEME, meaning)
}

/// The content of the root container: language, observer context (the device), the
/// procedure, the image library (the source) and the measurement group.
pub(super) fn content_tree(
    result: &SrResult<'_>,
    image_ref: InMemDicomObject,
    uids: &UidMaker,
    algorithm: &str,
) -> Vec<InMemDicomObject> {
    let mut image = item("CONTAINS", "IMAGE", code("260753009", "SCT", "Source"));
    image.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![image_ref]));
    let group = measurement_group(result, uids, algorithm);
    vec![
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
            algorithm,
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
    ]
}

/// TID 1501: the finding, its presence, the probability, the threshold, the variant
/// and the algorithm that answered; or, for an image not analysed, the finding and
/// why it was not evaluated.
/// The model's signer as the Algorithm Parameters state it.
fn signed_by(result: &SrResult<'_>) -> String {
    match result.signer {
        Some((name, key_id)) => format!("signed_by={name}; signer_key_id={key_id}"),
        None => "signed_by=none (unsigned)".into(),
    }
}

fn measurement_group(result: &SrResult<'_>, uids: &UidMaker, algorithm: &str) -> InMemDicomObject {
    let finding = code("233604007", "SCT", "Pneumonia");
    let mut items = vec![
        text_item(
            "HAS OBS CONTEXT",
            dcm("112039", "Tracking Identifier"),
            "pneumonia classification",
        ),
        uid_item(
            "HAS OBS CONTEXT",
            dcm("112040", "Tracking Unique Identifier"),
            &uids.instance("tracking"),
        ),
        code_item("CONTAINS", dcm("121071", "Finding"), finding.clone()),
    ];
    let params = match &result.finding {
        SrFinding::Classified {
            probability,
            threshold,
            pneumonia,
            caution,
        } => {
            let presence = if *pneumonia {
                code("52101004", "SCT", "Present")
            } else {
                code("272519000", "SCT", "Absent")
            };
            items.extend([
                code_item("CONTAINS", finding, presence),
                num_item("CONTAINS", dcm("122157", "Probability"), *probability),
                num_item(
                    "CONTAINS",
                    local("THRESHOLD", "Decision threshold"),
                    *threshold,
                ),
            ]);
            if let Some(c) = caution {
                items.push(text_item("CONTAINS", local("CAUTION", "Caution"), c));
            }
            format!(
                "model_sha256={}; variant={}; threshold={threshold}; {}",
                result.model_sha256,
                result.variant,
                signed_by(result)
            )
        }
        SrFinding::NotAnalysed { kind, reason } => {
            items.extend([
                code_item("CONTAINS", finding, local("NOTANALYSED", "Not analysed")),
                text_item(
                    "CONTAINS",
                    local("REASON", "Reason not analysed"),
                    &format!("{kind}: {reason}"),
                ),
            ]);
            format!(
                "model_sha256={}; variant={}; {}; not analysed: {kind}",
                result.model_sha256,
                result.variant,
                signed_by(result)
            )
        }
    };
    items.extend([
        text_item(
            "CONTAINS",
            local("VARIANT", "Model variant"),
            result.variant,
        ),
        with_children(
            text_item("CONTAINS", dcm("111001", "Algorithm Name"), algorithm),
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
    ]);
    container("CONTAINS", dcm("125007", "Measurement Group"), items)
}
