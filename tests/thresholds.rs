//! The card's threshold decides the label, with `>=`; `prefer=` picks by measured
//! quality even when that is not the default; ties keep the default. The variants
//! `low` (threshold 0.3) and `high` (threshold 0.7) share their weights, so an image
//! has the same probability under both: its label can only differ by the threshold.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::http::{json, raw, send};

struct App {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

/// `low`: threshold 0.3, sensitivity 0.80, specificity 0.95; `high`: threshold 0.7,
/// sensitivity 0.97, specificity 0.60; `tie`: threshold 0.5, sensitivity 0.97.
fn app(default: &str) -> App {
    common::ort_env();
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model_at(dir.path(), "low", 4, 0.80, 0.95, 0.3);
    common::write_tiny_model_at(dir.path(), "high", 4, 0.97, 0.60, 0.7);
    common::write_tiny_model_at(dir.path(), "tie", 4, 0.97, 0.50, 0.5);
    let metrics = Arc::new(cxr::http::ServerMetrics::new());
    let state = cxr::AppState::new(common::test_limits(), metrics.clone());
    let mut cfg = common::load_config(dir.path(), common::default_batch());
    cfg.default_model = Some(default.into());
    let (set, _w) = cxr::inference::load_models(&cfg, |n| metrics.observer(n)).unwrap();
    state.set_models(set);
    App {
        app: cxr::build_app(state),
        _dir: dir,
    }
}

async fn answer(app: &axum::Router, query: &str, img: &[u8]) -> serde_json::Value {
    let (s, _, b) = send(
        app,
        raw(&format!("/predict{query}"), "image/png", img.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    json(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_card_threshold_decides_with_greater_or_equal() {
    let a = app("low");
    // An image whose P(PNEUMONIA) lies strictly between the two thresholds.
    let mut found = None;
    for seed in 0..200 {
        let img = common::png_bytes(&common::gray_image(48, 40, seed));
        let v = answer(&a.app, "?model=low", &img).await;
        let p = v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        if p > 0.32 && p < 0.68 {
            found = Some((img, p));
            break;
        }
    }
    let (img, p) = found.expect("an image with 0.3 < P(PNEUMONIA) < 0.7");
    let low = answer(&a.app, "?model=low", &img).await;
    let high = answer(&a.app, "?model=high", &img).await;
    assert_eq!(
        low["probabilities"], high["probabilities"],
        "shared weights"
    );
    // Fixed by construction, not by re-applying the rule.
    assert_eq!(low["label"], "PNEUMONIA");
    assert_eq!(low["threshold"], 0.3);
    assert_eq!(high["label"], "NORMAL");
    assert_eq!(high["threshold"], 0.7);
    assert_eq!(low["confidence"].as_f64().unwrap(), p);
    assert!((high["confidence"].as_f64().unwrap() - (1.0 - p)).abs() < 1e-6);

    // The boundary: a threshold equal to the served probability answers PNEUMONIA;
    // the next representable threshold above it answers NORMAL. The probability is an
    // f32 (JSON prints its shortest form); the server compares it widened to f64.
    let p = f64::from(p as f32);
    let at = format!("?model=high&threshold={p}");
    assert_eq!(answer(&a.app, &at, &img).await["label"], "PNEUMONIA");
    let above = f64::from_bits(p.to_bits() + 1);
    let v = answer(&a.app, &format!("?model=high&threshold={above}"), &img).await;
    assert_eq!(v["label"], "NORMAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_picks_by_measured_quality_and_ties_keep_the_default() {
    let img = common::png_bytes(&common::gray_image(48, 40, 3));
    let a = app("low");
    let pick = |v: serde_json::Value| v["model"]["name"].as_str().unwrap().to_string();
    assert_eq!(pick(answer(&a.app, "", &img).await), "low");
    // `high` and `tie` share the best sensitivity: the first by name wins over the
    // later one, and neither is the default.
    assert_eq!(
        pick(answer(&a.app, "?prefer=sensitivity", &img).await),
        "high"
    );
    assert_eq!(
        pick(answer(&a.app, "?prefer=specificity", &img).await),
        "low"
    );
    // With `tie` as the default, the tie keeps the default.
    let b = app("tie");
    assert_eq!(
        pick(answer(&b.app, "?prefer=sensitivity", &img).await),
        "tie"
    );
    assert_eq!(
        pick(answer(&b.app, "?prefer=specificity", &img).await),
        "low"
    );
}
