//! Out-of-distribution refusal. The fit is checked against the closed-form score of
//! a known Gaussian mixture; then a tiny writer-made model gets an OOD model fitted
//! on embeddings of one family of generated images ("films": two dark lung fields on
//! a lighter body, jittered and noisy), and the server answers such images, refuses
//! images of other families (checkerboards, text-like stripes, noise) with 422
//! `out_of_distribution`, and follows `--ood-action warn|off`.
#![cfg(feature = "train")]

mod common;

use axum::http::StatusCode;
use common::http::{json, raw, send};
use cxr::imaging::Preprocessor;
use cxr::model::arch::SplitMix64;
use cxr::ood_score::OodAction;
use cxr::train::fit_ood::{Embeddings, acceptance_threshold, embed, fit, scores};
use image::{GrayImage, Luma};

/// Gaussian N(0, 1) from the generator (Box–Muller).
fn normal(r: &mut SplitMix64) -> f64 {
    let (u, v) = (r.uniform().max(1e-12), r.uniform());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

#[test]
fn the_fit_recovers_the_closed_form_score_of_a_known_mixture() {
    // Two classes in 3-D: means (∓2, 0, 0), shared covariance diag(1, 4, 0.25). The
    // two leading principal axes are x (variance 1 + 4 between the classes) and y (4);
    // z is left outside. So, for k = 2 and no shrinkage:
    // score = min_c ((x ∓ 2)² / 1 + y² / 4) / 2 + z² / 0.25.
    let mut r = SplitMix64(7);
    let n = 20_000;
    let mut data = Vec::with_capacity(n * 3);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i % 2) as u8;
        let mx = if c == 0 { -2.0 } else { 2.0 };
        data.extend([
            (mx + normal(&mut r)) as f32,
            (2.0 * normal(&mut r)) as f32,
            (0.5 * normal(&mut r)) as f32,
        ]);
        labels.push(c);
    }
    let e = Embeddings {
        dim: 3,
        files: vec![String::new(); n],
        labels,
        data,
    };
    let m = fit(&e, 2, 0.0).unwrap();
    assert_eq!(m.components(), 2);
    let reference = |x: f64, y: f64, z: f64| {
        let d = |mx: f64| ((x - mx).powi(2) + y * y / 4.0) / 2.0;
        d(-2.0).min(d(2.0)) + z * z / 0.25
    };
    for p in [
        [-2.0, 0.0, 0.0],
        [2.0, 1.0, 0.2],
        [0.0, 0.0, 0.0],
        [5.0, -3.0, 0.5],
        [-1.0, 6.0, -1.0],
    ] {
        let got = m.score(&[p[0] as f32, p[1] as f32, p[2] as f32]);
        let want = reference(p[0], p[1], p[2]);
        assert!(
            (got - want).abs() <= 0.05 * want.max(0.2),
            "{p:?}: fitted {got}, closed form {want}"
        );
    }
    // The acceptance threshold is an order statistic: 99 % of 100 scores at or under.
    let s: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(acceptance_threshold(&s, 0.99), 99.0);
    assert_eq!(acceptance_threshold(&s, 1.0), 100.0);
}

/// A generated "film": lighter body, two dark lung fields, a bright spine, jittered
/// and noisy.
fn film(seed: u64) -> GrayImage {
    let mut r = SplitMix64(seed);
    let (w, h) = (64u32, 64u32);
    let jx = r.uniform() * 6.0 - 3.0;
    let jy = r.uniform() * 6.0 - 3.0;
    let dark = 40.0 + r.uniform() * 30.0;
    let body = 150.0 + r.uniform() * 40.0;
    let mut noise = SplitMix64(seed ^ 0xABCD);
    GrayImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (f64::from(x) - jx, f64::from(y) - jy);
        let lung = |cx: f64| ((fx - cx) / 11.0).powi(2) + ((fy - 32.0) / 20.0).powi(2) < 1.0;
        let mut v = if lung(18.0) || lung(46.0) { dark } else { body };
        if (fx - 32.0).abs() < 3.0 {
            v = 220.0;
        }
        v += normal(&mut noise) * 6.0;
        Luma([v.clamp(0.0, 255.0) as u8])
    })
}

/// Images of other kinds: checkerboards, text-like stripes, noise.
fn other(kind: usize, seed: u64) -> GrayImage {
    let mut r = SplitMix64(seed);
    let period = 2 + (r.uniform() * 6.0) as u32;
    GrayImage::from_fn(64, 64, |x, y| {
        Luma([match kind % 3 {
            0 => {
                if (x / period + y / period).is_multiple_of(2) {
                    20
                } else {
                    235
                }
            }
            1 => {
                if y % 8 < 3 && (x * 7 + y) % 5 != 0 {
                    30
                } else {
                    250
                }
            }
            _ => (r.uniform() * 255.0) as u8,
        }])
    })
}

fn embeddings(bytes: &[u8], pre: &Preprocessor, imgs: &[GrayImage]) -> Embeddings {
    let mut s = common::cpu_model(bytes);
    let resized: Vec<GrayImage> = imgs.iter().map(|g| pre.resize(g)).collect();
    let (dim, data) = embed(&mut s, pre, &resized).unwrap();
    Embeddings {
        dim,
        labels: (0..imgs.len()).map(|i| (i % 2) as u8).collect(),
        files: vec![String::new(); imgs.len()],
        data,
    }
}

/// Fits an OOD model for `alpha` in `dir` on films 0..200, threshold at 99 % of
/// films 1000..1100; returns the threshold.
fn fit_alpha(dir: &std::path::Path) -> f64 {
    let card = dir.join("alpha.json");
    let loaded = cxr::registry::load_card(&card).unwrap();
    let pre = Preprocessor::new(loaded.card.input_size, &loaded.card.preprocessing).unwrap();
    let train: Vec<GrayImage> = (0..200).map(film).collect();
    let val: Vec<GrayImage> = (1000..1100).map(film).collect();
    let mut m = fit(&embeddings(&loaded.onnx_bytes, &pre, &train), 8, 0.1).unwrap();
    let sv = scores(&m, &embeddings(&loaded.onnx_bytes, &pre, &val));
    m.threshold = acceptance_threshold(&sv, 0.99);
    let bytes = m.to_json();
    std::fs::write(dir.join("alpha.ood.json"), &bytes).unwrap();
    let entry = cxr::ood_score::OodCard {
        file: "alpha.ood.json".into(),
        sha256: cxr::registry::sha256_hex(&bytes),
        method: "test".into(),
        threshold: m.threshold,
        target_acceptance: 0.99,
        threshold_source: "films 1000..1100".into(),
        validation_acceptance: 0.99,
        validation_stressed_acceptance: 0.99,
        test_acceptance: None,
        fit_images: 200,
        components: m.components(),
        ood_set_refused: None,
        ood_set: None,
        refuse_threshold: None,
        refuse_rule: None,
    };
    cxr::registry::set_card_ood(&card, &entry).unwrap();
    m.threshold
}

fn app(action: OodAction) -> (common::TestApp, f64) {
    let dir = common::models_dir();
    let threshold = fit_alpha(dir.path());
    let limits = cxr::http::Limits {
        ood_action: action,
        ..common::test_limits()
    };
    (
        common::test_app_in(dir, limits, common::default_batch(), |s| s),
        threshold,
    )
}

fn png(img: &GrayImage) -> Vec<u8> {
    common::png_bytes(img)
}

/// POST one image as PNG to `/predict?model=…`: status and JSON body.
async fn answer(
    app: &axum::Router,
    model: &str,
    img: &GrayImage,
) -> (StatusCode, serde_json::Value) {
    let (s, _, b) = send(
        app,
        raw(&format!("/predict?model={model}"), "image/png", png(img)),
    )
    .await;
    (s, json(&b))
}

/// Answered, with neither a score nor a verdict.
fn unscored(v: &serde_json::Value) -> bool {
    v["ood_score"].is_null() && v["in_distribution"].is_null()
}

#[tokio::test]
async fn films_are_answered_and_other_images_refused() {
    let (t, threshold) = app(OodAction::Refuse);
    // New films (not fitted on, not the threshold's): nearly all answered, scored.
    let mut answered = 0;
    for seed in 5000..5040 {
        let (s, v) = answer(&t.app, "alpha", &film(seed)).await;
        if s == StatusCode::OK {
            answered += 1;
            assert_eq!(v["in_distribution"], true, "{v}");
            assert!(v["ood_score"].as_f64().unwrap() <= threshold, "{v}");
        } else {
            assert_eq!(v["error_type"], "out_of_distribution", "{v}");
        }
    }
    assert!(answered >= 36, "{answered}/40 new films answered");
    // Every image of another kind: 422 with its score above the threshold.
    for (i, seed) in (0..30).zip(100..) {
        let (s, v) = answer(&t.app, "alpha", &other(i, seed)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "kind {i}: {v}");
        assert_eq!(v["error_type"], "out_of_distribution", "{v}");
        assert_eq!(v["details"]["image"], 0, "{v}");
        assert_eq!(v["details"]["threshold"].as_f64().unwrap(), threshold);
        assert!(
            v["details"]["ood_score"].as_f64().unwrap() > threshold,
            "{v}"
        );
    }
    // A multipart request with one such image among films is refused, naming it.
    let parts = [
        ("image", "image/png", png(&film(6000))),
        ("image", "image/png", png(&other(0, 7))),
    ];
    let (s, _, b) = send(
        &t.app,
        common::http::multipart("/predict?model=alpha", &parts),
    )
    .await;
    let v = json(&b);
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["details"]["image"], 1, "{v}");
    // `beta` has no OOD model: answered, with null fields (the server logged it at
    // start).
    let (s, v) = answer(&t.app, "beta", &other(0, 7)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(unscored(&v), "{v}");
    // The card shows the method and threshold; refusals are counted.
    let (_, _, b) = send(&t.app, common::http::get("/models/alpha")).await;
    let v = json(&b);
    assert_eq!(v["card"]["ood"]["threshold"].as_f64().unwrap(), threshold);
    let (_, _, m) = send(&t.app, common::http::get("/metrics")).await;
    let m = String::from_utf8(m).unwrap();
    let line = r#"cxr_out_of_distribution_total{action="refuse",model="alpha"} "#;
    let n: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("no {line} in\n{m}"))
        .parse()
        .unwrap();
    assert_eq!(n, 31 + (40 - answered), "{m}");
}

#[tokio::test]
async fn warn_answers_with_a_warning_and_off_does_not_score() {
    let (t, threshold) = app(OodAction::Warn);
    let (s, v) = answer(&t.app, "alpha", &other(1, 3)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["in_distribution"], false, "{v}");
    assert!(v["ood_score"].as_f64().unwrap() > threshold);
    assert!(
        v["warnings"].to_string().contains("out of distribution"),
        "{v}"
    );
    let (t, _) = app(OodAction::Off);
    let (s, v) = answer(&t.app, "alpha", &other(1, 3)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(unscored(&v), "{v}");
    assert!(!v.to_string().contains("out of distribution"), "{v}");
}

#[test]
fn a_card_whose_ood_file_was_changed_does_not_load() {
    let dir = common::models_dir();
    fit_alpha(dir.path());
    assert!(cxr::registry::load_card(&dir.path().join("alpha.json")).is_ok());
    let p = dir.path().join("alpha.ood.json");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text = text.replacen("\"threshold\": ", "\"threshold\": 1", 1);
    std::fs::write(&p, text).unwrap();
    let e = cxr::registry::load_card(&dir.path().join("alpha.json")).unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
}

#[tokio::test]
async fn the_open_inference_protocol_gives_the_score_and_refuses_alike() {
    use base64::Engine as _;
    let (t, threshold) = app(OodAction::Refuse);
    let infer = |model: &str, img: &GrayImage, outputs: &[&str]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(png(img));
        let body = serde_json::json!({
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
            "outputs": outputs.iter().map(|o| serde_json::json!({"name": o})).collect::<Vec<_>>(),
        });
        raw(
            &format!("/v2/models/{model}/infer"),
            "application/json",
            serde_json::to_vec(&body).unwrap(),
        )
    };
    let (s, _, b) = send(&t.app, infer("alpha", &film(7000), &["label", "ood_score"])).await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][1]["name"], "ood_score", "{v}");
    assert_eq!(v["outputs"][1]["datatype"], "FP64", "{v}");
    assert!(
        v["outputs"][1]["data"][0].as_f64().unwrap() <= threshold,
        "{v}"
    );
    let (s, _, b) = send(&t.app, infer("alpha", &other(0, 9), &["label"])).await;
    let v = json(&b);
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("out of distribution"),
        "{v}"
    );
    let (s, _, b) = send(&t.app, infer("beta", &film(7000), &["ood_score"])).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (_, _, b) = send(&t.app, common::http::get("/v2/models/alpha")).await;
    assert!(json(&b)["outputs"].to_string().contains("ood_score"));
    let (_, _, b) = send(&t.app, common::http::get("/v2/models/beta")).await;
    assert!(!json(&b)["outputs"].to_string().contains("ood_score"));
}

/// An OOD refusal is a decision about a patient's image: its audit record says
/// `refused`, `out_of_distribution`, the score, the model's probabilities and no
/// label; an answered film's record carries its score too.
#[tokio::test]
async fn an_ood_refusal_has_its_audit_record() {
    let dir = common::models_dir();
    let threshold = fit_alpha(dir.path());
    let log = tempfile::tempdir().unwrap();
    let path = log.path().join("audit.jsonl");
    let audit = cxr::audit::Audit::with_file(&path, 0).0;
    let t = common::test_app_in(dir, common::test_limits(), common::default_batch(), |s| {
        s.with_audit(audit)
    });
    let (s, v) = answer(&t.app, "alpha", &other(0, 7)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let score = v["details"]["ood_score"].as_f64().unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["decision"], "refused");
    assert_eq!(r["error_type"], "out_of_distribution");
    assert_eq!(r["model"], "alpha");
    assert!(
        (r["ood_score"].as_f64().unwrap() - score).abs() < 1e-9,
        "{r}"
    );
    assert!(score > threshold);
    assert!(
        r["p_pneumonia"].is_number() && r.get("label").is_none(),
        "{r}"
    );
    assert_eq!(
        r["input_sha256"],
        cxr::registry::sha256_hex(&png(&other(0, 7))).as_str()
    );
}

/// The prediction core, driven with no HTTP in between, answers one image exactly
/// as `/predict` does for the same bytes: decoded, classified, scored for
/// distribution and labelled at the card's threshold; and refuses an image of
/// another kind with the same error type.
#[tokio::test]
async fn the_core_answers_as_predict_does_for_the_same_bytes() {
    use cxr::predict::{Ask, Asker, Upload};
    let (t, threshold) = app(OodAction::Refuse);
    let core = t.state.core();
    let ask = Ask {
        model: Some("alpha".into()),
        ..Ask::default()
    };
    let asker = || Asker {
        caller: cxr::access::Caller::anonymous(),
        request_id: "core-test".into(),
        client_request_id: None,
        trace: None,
    };
    let bytes = png(&film(7100));
    let valid = core
        .validate(asker(), &ask, std::time::Instant::now())
        .unwrap();
    let answered = core
        .answer_files(&valid, vec![Upload::encoded(bytes.clone().into())])
        .await
        .unwrap();
    // As JSON text, the way /predict's answer travels.
    let direct: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&answered.predictions[0]).unwrap()).unwrap();
    let (s, via_http) = answer(&t.app, "alpha", &film(7100)).await;
    assert_eq!(s, StatusCode::OK, "{via_http}");
    for field in [
        "label",
        "confidence",
        "probabilities",
        "threshold",
        "threshold_source",
        "model",
        "ood_score",
        "in_distribution",
        "execution_provider",
    ] {
        assert_eq!(direct[field], via_http[field], "{field}");
    }
    assert!(direct["ood_score"].as_f64().unwrap() <= threshold);
    assert_eq!(direct["request_id"], "core-test");

    // Another kind of image: refused by the OOD score at both doors.
    let other_bytes = png(&other(0, 9));
    let valid = core
        .validate(asker(), &ask, std::time::Instant::now())
        .unwrap();
    let refused = core
        .answer_files(&valid, vec![Upload::encoded(other_bytes.into())])
        .await
        .err()
        .expect("refused");
    let (s, via_http) = answer(&t.app, "alpha", &other(0, 9)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.error_type().as_str(), via_http["error_type"]);
    assert_eq!(refused.details().unwrap(), via_http["details"]);
}

/// Two verdicts: with a second threshold in the card, an image scoring between the
/// two is answered as a radiograph unlike the training films (`in_distribution:
/// false`, a `distribution_shift` warning), one above the second is refused; a
/// constant or colour image is refused by its gate before any score. The second
/// threshold is put by the rule of `bench/ood_verdicts.py`: below every image of
/// another kind that the first threshold refuses, halfway above the radiographs
/// (films, and films perturbed as the stress validation perturbs them) when they
/// all score below those.
#[tokio::test]
async fn two_verdicts_flag_a_shifted_film_and_refuse_what_is_not_a_radiograph() {
    let dir = common::models_dir();
    let inner = fit_alpha(dir.path());
    // Every candidate's score, as the server computes it (refusal off).
    let limits = cxr::http::Limits {
        ood_action: OodAction::Warn,
        ..common::test_limits()
    };
    let t = common::test_app_in(dir, limits, common::default_batch(), |s| s);
    let radiographs: Vec<GrayImage> = (0..40)
        .map(|i| {
            let f = film(8000 + i);
            if i % 2 == 0 {
                f
            } else {
                cxr::eval::stress::perturb(&f, cxr::eval::stress::STRESS_SEED, i)
            }
        })
        .collect();
    let others: Vec<GrayImage> = (0..20).zip(300..).map(|(i, s)| other(i, s)).collect();
    let mut r_scores = Vec::new();
    for img in &radiographs {
        let (s, v) = answer(&t.app, "alpha", img).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        r_scores.push(v["ood_score"].as_f64().unwrap());
    }
    let mut o_scores = Vec::new();
    for img in &others {
        let (_, v) = answer(&t.app, "alpha", img).await;
        o_scores.push(v["ood_score"].as_f64().unwrap());
    }
    let top_r = r_scores.iter().copied().fold(f64::MIN, f64::max);
    let low_o = o_scores
        .iter()
        .copied()
        .filter(|&o| o > inner)
        .fold(f64::MAX, f64::min);
    assert!(
        low_o < f64::MAX,
        "the other kinds score above the first threshold"
    );
    let outer = if top_r < low_o {
        (top_r + low_o) / 2.0
    } else {
        low_o * (1.0 - 1e-6)
    }
    .max(inner);
    let common::TestApp { dir, .. } = t;
    let card_path = dir.path().join("alpha.json");
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
    card["ood"]["refuse_threshold"] = serde_json::json!(outer);
    card["ood"]["refuse_rule"] = serde_json::json!("test");
    std::fs::write(&card_path, serde_json::to_vec_pretty(&card).unwrap()).unwrap();

    let t = common::test_app_in(dir, common::test_limits(), common::default_batch(), |s| s);
    let mut shifted = 0;
    for (img, &score) in radiographs
        .iter()
        .chain(&others)
        .zip(r_scores.iter().chain(&o_scores))
    {
        let (s, v) = answer(&t.app, "alpha", img).await;
        if score <= inner {
            assert_eq!(
                (s, &v["in_distribution"]),
                (StatusCode::OK, &serde_json::json!(true)),
                "{v}"
            );
        } else if score <= outer {
            shifted += 1;
            assert_eq!(s, StatusCode::OK, "{score} in ({inner}, {outer}]: {v}");
            assert_eq!(v["in_distribution"], false, "{v}");
            assert!(
                v["warnings"][0]
                    .as_str()
                    .unwrap()
                    .starts_with("distribution_shift"),
                "{v}"
            );
        } else {
            assert_eq!(
                s,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{score} > {outer}: {v}"
            );
            assert_eq!(v["error_type"], "out_of_distribution");
            assert_eq!(v["details"]["threshold"].as_f64().unwrap(), outer);
        }
    }
    // Every image of another kind the first threshold refused is still refused.
    for (img, &score) in others.iter().zip(&o_scores) {
        if score > inner {
            let (s, _) = answer(&t.app, "alpha", img).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }
    // A constant image and a colour one: refused by their gates, before any score.
    let (s, v) = answer(&t.app, "alpha", &GrayImage::from_pixel(64, 64, Luma([128]))).await;
    assert_eq!(
        (s, v["error_type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("blank_image")),
        "{v}"
    );
    let colour = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 40])
    });
    let mut bytes = Vec::new();
    colour
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    let (s, _, b) = send(&t.app, raw("/predict?model=alpha", "image/png", bytes)).await;
    assert_eq!(
        (s, json(&b)["error_type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("colour_image"))
    );
    eprintln!(
        "first threshold {inner:.3}, second {outer:.3}; {shifted} images answered as a shift"
    );
}
