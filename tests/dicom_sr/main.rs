//! The answer as a DICOM Structured Report (`Accept: application/dicom`): parsed back
//! with dicom-rs, every concept, value, reference and UID where TID 1500 puts them; no
//! source attribute beyond the listed ones copied; validated by `dciodvfy` (Debian's
//! dicom3tools, an independent validator) and read back by pydicom.

mod check;
#[path = "../common/mod.rs"]
mod common;

use check::check_sr;

use std::path::Path;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::dicom::{self as d, Spec};
use common::http::{json, multipart, raw, send};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};

const SR_CLASS: &str = "1.2.840.10008.5.1.4.1.1.88.34";

/// Attributes planted in the source that the SR must not copy.
const NOT_COPIED: [(Tag, VR, &str); 7] = [
    (tags::INSTITUTION_NAME, VR::LO, "SECRET-HOSPITAL"),
    (tags::STUDY_DESCRIPTION, VR::LO, "SECRET-STUDY-DESC"),
    (tags::PATIENT_ADDRESS, VR::LO, "SECRET-ADDRESS"),
    (tags::OTHER_PATIENT_NAMES, VR::PN, "SECRET^OTHER"),
    (tags::OPERATORS_NAME, VR::PN, "SECRET^OPERATOR"),
    (tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
    (tags::STUDY_ID, VR::SH, "SECRETSTUDYID"),
];

/// A CR with the test patient, a study date, time, accession number and referring
/// physician, and the attributes that must not be copied.
fn source() -> Vec<u8> {
    let g = d::test_gray(40, 30, 4);
    let bytes = d::build(&Spec::new(30, 40, 16, d::stored(&g, |v| v * 257)));
    let mut obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    let mut put = |tag: Tag, vr: VR, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    put(tags::STUDY_DATE, VR::DA, "20261120");
    put(tags::STUDY_TIME, VR::TM, "101500");
    put(tags::ACCESSION_NUMBER, VR::SH, "ACC-777");
    put(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "REFERRER^DOC");
    for (t, vr, v) in NOT_COPIED {
        put(t, vr, v);
    }
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn accept_dicom(mut req: Request<Body>) -> Request<Body> {
    req.headers_mut()
        .insert(header::ACCEPT, "application/dicom".parse().unwrap());
    req
}

fn parse(bytes: &[u8]) -> dicom_object::DefaultDicomObject {
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .expect("the SR parses")
}

fn text(o: &InMemDicomObject, tag: Tag) -> Option<String> {
    o.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

fn items(o: &InMemDicomObject, tag: Tag) -> Vec<InMemDicomObject> {
    o.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items().map(<[InMemDicomObject]>::to_vec))
        .unwrap_or_default()
}

/// (code value, scheme) of the first item of a code sequence.
fn code(o: &InMemDicomObject, tag: Tag) -> (String, String) {
    let c = &items(o, tag)[0];
    (
        text(c, tags::CODE_VALUE).unwrap(),
        text(c, tags::CODING_SCHEME_DESIGNATOR).unwrap(),
    )
}

/// The content item under `o` whose concept name is `(value, scheme)`.
fn child(o: &InMemDicomObject, value: &str, scheme: &str) -> InMemDicomObject {
    items(o, tags::CONTENT_SEQUENCE)
        .into_iter()
        .find(|c| code(c, tags::CONCEPT_NAME_CODE_SEQUENCE) == (value.into(), scheme.into()))
        .unwrap_or_else(|| panic!("no content item ({value}, {scheme})"))
}

fn number(o: &InMemDicomObject) -> f64 {
    let mv = &items(o, tags::MEASURED_VALUE_SEQUENCE)[0];
    assert_eq!(
        code(mv, tags::MEASUREMENT_UNITS_CODE_SEQUENCE),
        ("1".into(), "UCUM".into())
    );
    text(mv, tags::NUMERIC_VALUE)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dicom_upload_answers_a_tid_1500_sr() {
    let t = common::test_app();
    let src = source();
    let (s, _, b) = send(
        &t.app,
        raw("/predict?model=beta", "application/dicom", src.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let answer = json(&b);
    let sha = answer["model"]["sha256"].as_str().unwrap().to_string();
    let (s, h, b) = send(
        &t.app,
        accept_dicom(raw("/predict?model=beta", "application/dicom", src.clone())),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h[header::CONTENT_TYPE], "application/dicom");
    assert_eq!(&b[128..132], b"DICM");
    let sr = parse(&b);
    assert_eq!(
        sr.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0'),
        SR_CLASS
    );
    let uid = text(&sr, tags::SOP_INSTANCE_UID).unwrap();
    assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
    check_sr(&sr, &answer, &sha);

    // Independent readers: dciodvfy and pydicom.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sr.dcm");
    std::fs::write(&path, &b).unwrap();
    validate_with_dciodvfy(&path);
    read_with_pydicom(&path, &answer);

    // Several DICOM images: multipart/related, one SR each, in order.
    let (s, h, b) = send(
        &t.app,
        accept_dicom(multipart(
            "/predict?model=beta",
            &[
                ("image", "application/dicom", src.clone()),
                ("image", "application/octet-stream", src.clone()),
            ],
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let ct = h[header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(
        ct.starts_with("multipart/related; type=\"application/dicom\"; boundary="),
        "{ct}"
    );
    let boundary = ct.rsplit("boundary=").next().unwrap();
    let parts = split_multipart(&b, boundary);
    assert_eq!(parts.len(), 2);
    let mut uids = Vec::new();
    for p in parts {
        let sr = parse(&p);
        check_sr(&sr, &answer, &sha);
        uids.push(text(&sr, tags::SOP_INSTANCE_UID).unwrap());
    }
    assert_ne!(uids[0], uids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_root_and_refusals() {
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_uid_root("1.2.826.0.1.3680043.10.999".into())
    });
    let (s, _, b) = send(
        &t.app,
        accept_dicom(raw("/predict", "application/dicom", source())),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let sr = parse(&b);
    for tag in [tags::SOP_INSTANCE_UID, tags::SERIES_INSTANCE_UID] {
        let u = text(&sr, tag).unwrap();
        assert!(
            u.starts_with("1.2.826.0.1.3680043.10.999.") && u.len() <= 64,
            "{u}"
        );
    }
    // A PNG cannot be answered as an SR: 406, JSON.
    let png = common::png_bytes(&common::gray_image(40, 32, 1));
    let (s, _, b) = send(&t.app, accept_dicom(raw("/predict", "image/png", png))).await;
    assert_eq!(s, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(json(&b)["error_type"], "not_acceptable");
    // q=0 is a refusal of DICOM: JSON.
    let mut req = raw("/predict", "application/dicom", source());
    req.headers_mut().insert(
        header::ACCEPT,
        "application/dicom;q=0, application/json".parse().unwrap(),
    );
    let (s, h, _) = send(&t.app, req).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

fn split_multipart(body: &[u8], boundary: &str) -> Vec<Vec<u8>> {
    let delim = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut pos = 0;
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    while let Some(start) = find(text, delim.as_bytes(), pos) {
        let after = start + delim.len();
        if text[after..].starts_with(b"--") {
            break;
        }
        let head_end = find(text, b"\r\n\r\n", after).unwrap() + 4;
        let next = find(text, format!("\r\n{delim}").as_bytes(), head_end).unwrap();
        parts.push(text[head_end..next].to_vec());
        pos = next + 2;
    }
    parts
}

fn validate_with_dciodvfy(path: &Path) {
    let out = std::process::Command::new("dciodvfy")
        .arg(path)
        .output()
        .expect("dciodvfy (Debian dicom3tools; scripts/setup.sh --test installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("Error")).collect();
    assert!(errors.is_empty(), "dciodvfy errors:\n{report}");
    assert!(
        report.contains("Comprehensive3DSR") || report.contains("Comprehensive 3D SR"),
        "dciodvfy did not recognise the IOD:\n{report}"
    );
    eprintln!("dciodvfy report:\n{report}");
}

fn read_with_pydicom(path: &Path, answer: &serde_json::Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = r#"
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34", ds.SOPClassUID
assert ds.StudyInstanceUID == sys.argv[2]
assert ds.VerificationFlag == "UNVERIFIED"
def find(items, value):
    return next(i for i in items if i.ConceptNameCodeSequence[0].CodeValue == value)
group = find(find(ds.ContentSequence, "126010").ContentSequence, "125007")
p = float(find(group.ContentSequence, "122157").MeasuredValueSequence[0].NumericValue)
assert abs(p - float(sys.argv[3])) < 1e-6, p
print("pydicom read the SR: probability", p)
"#;
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", script])
        .arg(path)
        .arg(d::STUDY_UID)
        .arg(
            answer["probabilities"]["PNEUMONIA"]
                .as_f64()
                .unwrap()
                .to_string(),
        )
        .output()
        .expect("the project's .venv");
    assert!(
        out.status.success(),
        "pydicom: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An answer flagged as a distribution shift says so in its SR: a TEXT item
/// "Caution" in the measurement group, and the SR still validates.
#[test]
fn a_distribution_shift_is_a_caution_in_the_sr() {
    let instance = cxr::imaging::dicom::Instance::read(&source()).unwrap();
    let src = instance.source().clone();
    let caution = "distribution_shift: score 7.060 above the training distribution's threshold 6.692 (refused only above 7.142)";
    let bytes = cxr::imaging::sr::build_sr(
        &src,
        &cxr::imaging::sr::SrResult {
            signer: None,
            variant: "weighted",
            version: "2.0.0",
            model_sha256: &"a".repeat(64),
            finding: cxr::imaging::sr::SrFinding::Classified {
                probability: 0.81,
                threshold: 0.3,
                pneumonia: true,
                caution: Some(caution.into()),
            },
        },
        &cxr::imaging::sr::UidMaker::random(None),
    )
    .unwrap();
    let sr = parse(&bytes);
    let group = child(&child(&sr, "126010", "DCM"), "125007", "DCM");
    let item = child(&group, "CAUTION", "99CXR");
    assert_eq!(text(&item, tags::VALUE_TYPE).as_deref(), Some("TEXT"));
    assert_eq!(text(&item, tags::TEXT_VALUE).as_deref(), Some(caution));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shift.dcm");
    std::fs::write(&path, &bytes).unwrap();
    validate_with_dciodvfy(&path);
}
