//! What a served Structured Report must hold, item by item (TID 1500, IHE AIR).

use super::*;

pub(super) fn check_sr(sr: &InMemDicomObject, answer: &serde_json::Value, model_sha: &str) {
    assert_eq!(text(sr, tags::SOP_CLASS_UID).unwrap(), SR_CLASS);
    assert_eq!(text(sr, tags::MODALITY).unwrap(), "SR");
    assert_eq!(text(sr, tags::STUDY_INSTANCE_UID).unwrap(), d::STUDY_UID);
    let series = text(sr, tags::SERIES_INSTANCE_UID).unwrap();
    let sop = text(sr, tags::SOP_INSTANCE_UID).unwrap();
    assert_ne!(series, d::SERIES_UID);
    assert_ne!(sop, d::SOP_UID);
    assert_eq!(text(sr, tags::VERIFICATION_FLAG).unwrap(), "UNVERIFIED");
    assert_eq!(text(sr, tags::COMPLETION_FLAG).unwrap(), "COMPLETE");
    assert!(
        text(sr, tags::SERIES_DESCRIPTION)
            .unwrap()
            .contains("not for standalone diagnosis")
    );
    // Copied for filing, exactly.
    assert_eq!(text(sr, tags::PATIENT_NAME).unwrap(), d::PATIENT_NAME);
    assert_eq!(text(sr, tags::PATIENT_ID).unwrap(), d::PATIENT_ID);
    assert_eq!(
        text(sr, tags::PATIENT_BIRTH_DATE).unwrap(),
        d::PATIENT_BIRTH_DATE
    );
    assert_eq!(text(sr, tags::PATIENT_SEX).unwrap(), "F");
    assert_eq!(text(sr, tags::STUDY_DATE).unwrap(), "20261120");
    assert_eq!(text(sr, tags::STUDY_TIME).unwrap(), "101500");
    assert_eq!(text(sr, tags::ACCESSION_NUMBER).unwrap(), "ACC-777");
    assert_eq!(
        text(sr, tags::REFERRING_PHYSICIAN_NAME).unwrap(),
        "REFERRER^DOC"
    );
    // Nothing else of the source: neither the planted attributes nor the issuer.
    for (t, _, v) in NOT_COPIED {
        assert_ne!(text(sr, t).as_deref(), Some(v), "{t} copied");
    }
    assert!(
        sr.element_opt(tags::ISSUER_OF_PATIENT_ID)
            .unwrap()
            .is_none()
    );
    assert!(sr.element_opt(tags::PIXEL_DATA).unwrap().is_none());
    assert!(sr.element_opt(tags::VIEW_POSITION).unwrap().is_none());

    // The evidence: the analysed image, by its study, series and SOP UIDs.
    let ev = &items(sr, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)[0];
    assert_eq!(text(ev, tags::STUDY_INSTANCE_UID).unwrap(), d::STUDY_UID);
    let se = &items(ev, tags::REFERENCED_SERIES_SEQUENCE)[0];
    assert_eq!(text(se, tags::SERIES_INSTANCE_UID).unwrap(), d::SERIES_UID);
    let im = &items(se, tags::REFERENCED_SOP_SEQUENCE)[0];
    assert_eq!(
        text(im, tags::REFERENCED_SOP_CLASS_UID).unwrap(),
        "1.2.840.10008.5.1.4.1.1.1"
    );
    assert_eq!(
        text(im, tags::REFERENCED_SOP_INSTANCE_UID).unwrap(),
        d::SOP_UID
    );
    // The device.
    let eq = &items(sr, tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)[0];
    assert_eq!(text(eq, tags::MANUFACTURER).unwrap(), "cxr");
    let model = answer["model"]["name"].as_str().unwrap();
    assert_eq!(
        text(eq, tags::MANUFACTURER_MODEL_NAME).unwrap(),
        format!("cxr {model}")
    );
    assert!(text(eq, tags::SOFTWARE_VERSIONS).unwrap().contains(model));

    // The TID 1500 tree.
    assert_eq!(text(sr, tags::VALUE_TYPE).unwrap(), "CONTAINER");
    assert_eq!(
        code(sr, tags::CONCEPT_NAME_CODE_SEQUENCE),
        ("126000".into(), "DCM".into())
    );
    let tpl = &items(sr, tags::CONTENT_TEMPLATE_SEQUENCE)[0];
    assert_eq!(text(tpl, tags::TEMPLATE_IDENTIFIER).unwrap(), "1500");
    assert_eq!(text(tpl, tags::MAPPING_RESOURCE).unwrap(), "DCMR");
    let observer = child(sr, "121005", "DCM");
    assert_eq!(
        code(&observer, tags::CONCEPT_CODE_SEQUENCE),
        ("121007".into(), "DCM".into())
    );
    let library = child(&child(sr, "111028", "DCM"), "126200", "DCM");
    let image = child(&library, "260753009", "SCT");
    assert_eq!(text(&image, tags::VALUE_TYPE).unwrap(), "IMAGE");
    let r = &items(&image, tags::REFERENCED_SOP_SEQUENCE)[0];
    assert_eq!(
        text(r, tags::REFERENCED_SOP_INSTANCE_UID).unwrap(),
        d::SOP_UID
    );
    let group = child(&child(sr, "126010", "DCM"), "125007", "DCM");
    let finding = child(&group, "121071", "DCM");
    assert_eq!(
        code(&finding, tags::CONCEPT_CODE_SEQUENCE),
        ("233604007".into(), "SCT".into())
    );
    let presence = child(&group, "233604007", "SCT");
    let want = if answer["label"] == "PNEUMONIA" {
        "52101004"
    } else {
        "272519000"
    };
    assert_eq!(
        code(&presence, tags::CONCEPT_CODE_SEQUENCE),
        (want.into(), "SCT".into())
    );
    let p = number(&child(&group, "122157", "DCM"));
    let served = answer["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    assert!((p - served).abs() < 1e-6, "{p} vs {served}");
    let t = number(&child(&group, "THRESHOLD", "99CXR"));
    assert!((t - answer["threshold"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(
        text(&child(&group, "VARIANT", "99CXR"), tags::TEXT_VALUE).unwrap(),
        model
    );
    let algo = child(&group, "111001", "DCM");
    assert_eq!(
        text(&algo, tags::TEXT_VALUE).unwrap(),
        format!("cxr {model}")
    );
    assert_eq!(
        text(&child(&algo, "111003", "DCM"), tags::TEXT_VALUE).unwrap(),
        answer["model"]["version"].as_str().unwrap()
    );
    let params = text(&child(&algo, "111002", "DCM"), tags::TEXT_VALUE).unwrap();
    assert!(params.contains(model_sha), "{params}");
    // Who signed the model (the test models are unsigned: said so).
    let signed = match answer["model"]["signed_by"].as_object() {
        Some(s) => format!(
            "signed_by={}; signer_key_id={}",
            s["signer"].as_str().unwrap(),
            s["key_id"].as_str().unwrap()
        ),
        None => "signed_by=none (unsigned)".into(),
    };
    assert!(params.contains(&signed), "{params}");
}
