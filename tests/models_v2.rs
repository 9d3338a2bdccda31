//! Models v2 on the serving side: the card's temperature applied to the logits, the
//! caller's `threshold=` and `operating_point=` (from the card's validation ROC), and
//! where each answer's threshold came from. Every expectation is computed here from
//! the model's raw logits (ONNX Runtime directly) or from a curve written by hand.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use cxr::http::{AppState, ServerMetrics};
use cxr::inference::load_models;
use serde_json::{Value, json as j};

use common::http::{expect_error, json, raw, send};

/// A tiny model `cal` whose card has temperature 2, threshold 0.5 and a known
/// validation curve; `plain` is the same kind of model with a v1 card (no
/// calibration, no curve).
fn app() -> (axum::Router, tempfile::TempDir) {
    common::ort_env();
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), "cal", 11, 0.99, 0.70);
    common::write_tiny_model(dir.path(), "plain", 11, 0.90, 0.95);
    let path = dir.path().join("cal.json");
    let mut card: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    card["calibration"] = j!({
        "temperature": 2.0, "method": "test", "validation_nll_before": 0.5,
        "validation_nll_after": 0.4
    });
    card["threshold_rule"] = j!("youden (test)");
    card["operating_curve"] = j!({
        "source": "hand-written", "n": 100,
        "points": [
            {"threshold": 0.9, "fpr": 0.0, "tpr": 0.5},
            {"threshold": 0.7, "fpr": 0.1, "tpr": 0.8},
            {"threshold": 0.4, "fpr": 0.3, "tpr": 0.96},
            {"threshold": 0.2, "fpr": 0.6, "tpr": 1.0}
        ]
    });
    std::fs::write(&path, serde_json::to_string_pretty(&card).unwrap()).unwrap();
    // `narrow`: a curve on which no threshold avoids every false alarm.
    common::write_tiny_model(dir.path(), "narrow", 12, 0.5, 0.5);
    let path = dir.path().join("narrow.json");
    let mut card: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    card["operating_curve"] = j!({
        "source": "hand-written", "n": 100,
        "points": [
            {"threshold": 0.7, "fpr": 0.1, "tpr": 0.8},
            {"threshold": 0.2, "fpr": 0.6, "tpr": 1.0}
        ]
    });
    std::fs::write(&path, serde_json::to_string_pretty(&card).unwrap()).unwrap();
    let metrics = Arc::new(ServerMetrics::new());
    let state = AppState::new(common::test_limits(), metrics.clone());
    let mut cfg = common::load_config(dir.path(), common::default_batch());
    cfg.default_model = Some("cal".into());
    let (set, _w) = load_models(&cfg, |n| metrics.observer(n)).unwrap();
    state.set_models(set);
    (cxr::build_app(state), dir)
}

fn image() -> Vec<u8> {
    common::png_bytes(&common::gray_image(96, 80, 3))
}

/// The model's raw logits for `image()`, straight from ONNX Runtime.
fn raw_logits(dir: &std::path::Path) -> [f32; 2] {
    let onnx = std::fs::read(dir.join("cal.onnx")).unwrap();
    let mut session = common::cpu_session(&onnx);
    let pre = cxr::imaging::Preprocessor::new(32, &cxr::imaging::Preprocessing::default()).unwrap();
    let x = cxr::imaging::preprocess(&pre, &image(), 1 << 30).unwrap();
    cxr::inference::run_outputs(&mut session, x, 1, 32).unwrap()[0].logits
}

async fn predict(app: &axum::Router, query: &str) -> Value {
    let (s, _, b) = send(app, raw(&format!("/predict{query}"), "image/png", image())).await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

#[tokio::test]
async fn the_cards_temperature_is_applied_to_the_logits() {
    let (app, dir) = app();
    let l = raw_logits(dir.path());
    let d = f64::from(l[1]) - f64::from(l[0]);
    let want = 1.0 / (1.0 + (-d / 2.0).exp());
    let v = predict(&app, "").await;
    let p1 = v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    let p0 = v["probabilities"]["NORMAL"].as_f64().unwrap();
    assert!(
        (p1 - want).abs() < 1e-6,
        "served {p1}, softmax(logits / 2) = {want}"
    );
    assert!((p0 - (1.0 - want)).abs() < 1e-6);
    // The uncalibrated file output differs (the temperature is not a no-op here).
    let raw1 = 1.0 / (1.0 + (-d).exp());
    assert!((p1 - raw1).abs() > 1e-4, "T = 2 changes {raw1}");
    assert_eq!(v["threshold"], 0.5);
    assert_eq!(v["threshold_source"]["kind"], "card");
    assert_eq!(v["threshold_source"]["rule"], "youden (test)");
    // A card without calibration serves the file's own softmax.
    let plain = predict(&app, "?model=plain").await;
    let q1 = plain["probabilities"]["PNEUMONIA"].as_f64().unwrap();
    assert!((q1 - raw1).abs() < 1e-6, "{q1} vs {raw1}");
}

#[tokio::test]
async fn a_query_threshold_decides_with_greater_or_equal() {
    let (app, _dir) = app();
    let v = predict(&app, "").await;
    let p1 = v["probabilities"]["PNEUMONIA"].as_f64().unwrap() as f32;
    // Exactly the probability: PNEUMONIA (>=). One f32 step above: NORMAL.
    let at = format!("?threshold={:.17}", f64::from(p1));
    let above = format!(
        "?threshold={:.17}",
        f64::from(f32::from_bits(p1.to_bits() + 1))
    );
    let a = predict(&app, &at).await;
    assert_eq!(a["label"], "PNEUMONIA", "{a}");
    assert_eq!(a["threshold_source"]["kind"], "query");
    let b = predict(&app, &above).await;
    assert_eq!(b["label"], "NORMAL", "{b}");
    assert!((b["confidence"].as_f64().unwrap() - (1.0 - f64::from(p1))).abs() < 1e-6);
}

#[tokio::test]
async fn operating_points_come_from_the_validation_curve() {
    let (app, _dir) = app();
    for (q, threshold, sens, spec) in [
        ("sensitivity:0.95", 0.4, 0.96, 0.7),
        ("sensitivity:0.8", 0.7, 0.8, 0.9),
        ("sensitivity:1", 0.2, 1.0, 0.4),
        ("specificity:0.9", 0.7, 0.8, 0.9),
        ("specificity:0.75", 0.7, 0.8, 0.9),
        ("specificity:0.7", 0.4, 0.96, 0.7),
        ("specificity:1.0", 0.9, 0.5, 1.0),
    ] {
        let v = predict(&app, &format!("?operating_point={q}")).await;
        let src = &v["threshold_source"];
        assert_eq!(v["threshold"], threshold, "{q}: {v}");
        assert_eq!(src["kind"], "operating_point");
        assert_eq!(
            src["target"].as_str().unwrap().split(':').next(),
            q.split(':').next()
        );
        assert!(
            (src["validation_sensitivity"].as_f64().unwrap() - sens).abs() < 1e-12,
            "{q}"
        );
        assert!(
            (src["validation_specificity"].as_f64().unwrap() - spec).abs() < 1e-12,
            "{q}"
        );
        let p1 = v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        let want = if p1 >= threshold {
            "PNEUMONIA"
        } else {
            "NORMAL"
        };
        assert_eq!(v["label"], want, "{q}");
    }
    // `prefer` still selects, and the operating point applies to the variant chosen.
    let v = predict(&app, "?prefer=sensitivity&operating_point=sensitivity:0.95").await;
    assert_eq!(v["model"]["name"], "cal");
}

#[tokio::test]
async fn unreachable_or_malformed_operating_points_are_422() {
    let (app, _dir) = app();
    let req = |q: &str| raw(&format!("/predict{q}"), "image/png", image());
    // No point of the curve has sensitivity above 1 - nothing reaches 1.0 with fpr 0
    // on `plain`, which has no curve at all.
    expect_error(
        &app,
        req("?model=plain&operating_point=sensitivity:0.9"),
        StatusCode::UNPROCESSABLE_ENTITY,
        "operating_point_unreachable",
    )
    .await;
    // A curve that never reaches the target.
    let v = expect_error(
        &app,
        req("?model=narrow&operating_point=specificity:0.95"),
        StatusCode::UNPROCESSABLE_ENTITY,
        "operating_point_unreachable",
    )
    .await;
    assert!(
        v["error"].as_str().unwrap().contains("specificity:0.95"),
        "{v}"
    );
    // The same curve answers a target it reaches.
    let (s, _, _) = send(&app, req("?model=narrow&operating_point=specificity:0.9")).await;
    assert_eq!(s, StatusCode::OK);
    for q in [
        "?operating_point=recall:0.9",
        "?operating_point=sensitivity:1.5",
        "?operating_point=sensitivity",
        "?threshold=0",
        "?threshold=1",
        "?threshold=0.3&operating_point=sensitivity:0.9",
    ] {
        expect_error(
            &app,
            req(q),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_query",
        )
        .await;
    }
}

#[test]
fn an_unreachable_target_on_a_curve_is_reported() {
    use cxr::eval::{OperatingCurve, Target, roc_curve};
    // Every threshold that catches a pneumonia also raises a false alarm.
    let c = OperatingCurve::from_roc("t", 4, &roc_curve(&[0.9, 0.8, 0.3, 0.2], &[0, 1, 0, 1]));
    assert_eq!(c.threshold_for(Target::Specificity(1.0)), None);
    assert!(c.threshold_for(Target::Sensitivity(1.0)).is_some());
}
