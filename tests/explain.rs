//! Explanations through the real app: `explain=cam` adds the class activation maps of
//! the answered class (and the other) to each answer, normalised, with a PNG overlay
//! of the input's size; `Accept: image/png` answers the overlay itself; a model file
//! without a `cam` output still serves, and says the explanation is unavailable.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use common::http::{json, multipart, raw, send};
use prost::Message;
use sha2::Digest;

fn img(seed: u32) -> Vec<u8> {
    common::png_bytes(&common::gray_image(60, 48, seed))
}

fn with_accept(mut r: Request<Body>, accept: &str) -> Request<Body> {
    r.headers_mut()
        .insert(header::ACCEPT, accept.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_cam_adds_normalised_maps_and_an_overlay() {
    let t = common::test_app();
    let (s, _, b) = send(&t.app, raw("/predict", "image/png", img(3))).await;
    assert_eq!(s, StatusCode::OK);
    let plain = json(&b);
    assert!(plain.get("heatmap").is_none());

    let (s, _, b) = send(&t.app, raw("/predict?explain=cam", "image/png", img(3))).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    // The same answer, with its maps.
    assert_eq!(v["label"], plain["label"]);
    assert_eq!(v["probabilities"], plain["probabilities"]);
    let h = &v["heatmap"];
    assert_eq!(h["method"], "cam");
    assert_eq!(h["class"], v["label"]);
    assert!(h["note"].as_str().unwrap().contains("not a localisation"));
    let (gh, gw) = (
        h["grid_height"].as_u64().unwrap() as usize,
        h["grid_width"].as_u64().unwrap() as usize,
    );
    assert!(gh >= 1 && gw >= 1);
    for key in ["answered", "other"] {
        let g: Vec<f64> = h[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(g.len(), gh * gw);
        assert!(g.iter().all(|x| (0.0..=1.0).contains(x)), "{key}: {g:?}");
        if g.iter().any(|x| *x > 0.0) {
            assert!(g.contains(&0.0) && g.contains(&1.0));
        }
    }
    let png = base64::engine::general_purpose::STANDARD
        .decode(h["overlay_png"].as_str().unwrap())
        .unwrap();
    let overlay = image::load_from_memory(&png).unwrap();
    // The input as the model saw it: the card's input size (32 for the test models).
    assert_eq!((overlay.width(), overlay.height()), (32, 32));
    // Its background alone: the upload resized to the model's input, gray (the resize
    // itself is pinned to Pillow's in tests/imaging_reference.rs).
    let input = image::load_from_memory(
        &base64::engine::general_purpose::STANDARD
            .decode(h["input_png"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
    .to_luma8();
    let card = t
        .state
        .models()
        .unwrap()
        .select(Some("alpha"), None)
        .unwrap()
        .card
        .clone();
    let pre = cxr::imaging::Preprocessor::new(card.input_size, &card.preprocessing).unwrap();
    let upload = image::load_from_memory(&img(3)).unwrap().to_luma8();
    assert_eq!(input, pre.resize(&upload));

    // Several images: each answer has its own maps.
    let (s, _, b) = send(
        &t.app,
        multipart(
            "/predict?explain=cam",
            &[
                ("image", "image/png", img(1)),
                ("image", "image/png", img(7)),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let arr = json(&b);
    assert_ne!(
        arr[0]["heatmap"]["overlay_png"],
        arr[1]["heatmap"]["overlay_png"]
    );

    // Accept: image/png answers the overlay itself.
    let (s, hd, b) = send(
        &t.app,
        with_accept(raw("/predict", "image/png", img(3)), "image/png"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd[header::CONTENT_TYPE], "image/png");
    assert_eq!(b, png, "the same overlay as explain=cam draws");
    // ... for one image only.
    let (s, _, b) = send(
        &t.app,
        with_accept(
            multipart(
                "/predict",
                &[
                    ("image", "image/png", img(1)),
                    ("image", "image/png", img(7)),
                ],
            ),
            "image/png",
        ),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_ACCEPTABLE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    // An unknown explanation is a query error.
    let (s, _, b) = send(&t.app, raw("/predict?explain=gradcam", "image/png", img(3))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json(&b)["error_type"], "invalid_query");
}

/// Rewrites `<name>.onnx` without its `cam` and `embedding` outputs (a model file
/// made before they existed) and its card's hash and size to match.
fn strip_cam(dir: &std::path::Path, name: &str) {
    let path = dir.join(format!("{name}.onnx"));
    let mut m =
        cxr::model::onnx::proto::ModelProto::decode(&std::fs::read(&path).unwrap()[..]).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.output
        .retain(|o| o.name == "logits" || o.name == "probabilities");
    let bytes = m.encode_to_vec();
    std::fs::write(&path, &bytes).unwrap();
    let card_path = dir.join(format!("{name}.json"));
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
    card["onnx"]["sha256"] = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into();
    card["onnx"]["bytes"] = bytes.len().into();
    std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_cam_serves_and_refuses_an_explanation_before_classifying() {
    common::ort_env();
    let dir = common::models_dir();
    strip_cam(dir.path(), "alpha");
    let metrics = std::sync::Arc::new(cxr::http::ServerMetrics::new());
    let state = cxr::AppState::new(common::test_limits(), metrics.clone());
    let (set, _w) = cxr::inference::load_models(
        &common::load_config(dir.path(), common::default_batch()),
        |n| metrics.observer(n),
    )
    .expect("a model file without cam loads");
    state.set_models(set);
    let app = cxr::build_app(state);
    // It answers without an explanation.
    let (s, _, b) = send(&app, raw("/predict", "image/png", img(2))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(json(&b).get("heatmap").is_none());
    let answered = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("cxr_predictions_total") && l.contains("alpha"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(answered(&metrics.render()), 1.0);
    // An explanation asked of it, in JSON or as the PNG overlay, is refused before
    // the image is classified: nothing answered, nothing counted.
    for req in [
        raw("/predict?explain=cam", "image/png", img(2)),
        with_accept(raw("/predict", "image/png", img(2)), "image/png"),
    ] {
        let (s, _, b) = send(&app, req).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(json(&b)["error_type"], "explanation_unavailable");
        assert!(
            json(&b)["error"]
                .as_str()
                .unwrap()
                .contains("no `cam` output")
        );
    }
    assert_eq!(
        answered(&metrics.render()),
        1.0,
        "a refused explanation was classified"
    );
    // The other variant still has its maps.
    let (s, _, b) = send(
        &app,
        raw("/predict?model=beta&explain=cam", "image/png", img(2)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(json(&b)["heatmap"].is_object());
}
