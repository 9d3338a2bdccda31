//! The real app in-process (tower `oneshot`): every endpoint and every error status.

mod bad_input;
#[path = "../common/mod.rs"]
mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use cxr::http::{AppState, Limits, ServerMetrics};
use serde_json::Value;

use common::http::{expect_error, get, json, multipart, raw, send};

#[tokio::test]
async fn health_ready_and_not_ready() {
    let t = common::test_app();
    let (s, _, b) = send(&t.app, get("/health")).await;
    assert_eq!(
        (s, json(&b)["status"].clone()),
        (StatusCode::OK, Value::from("ok"))
    );
    let (s, _, b) = send(&t.app, get("/ready")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["models"], serde_json::json!(["alpha", "beta"]));

    // A state whose models are still loading.
    let loading = cxr::build_app(AppState::new(
        Limits::default(),
        Arc::new(ServerMetrics::new()),
    ));
    let (s, _, _) = send(&loading, get("/health")).await;
    assert_eq!(s, StatusCode::OK);
    expect_error(
        &loading,
        get("/ready"),
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
    )
    .await;
    expect_error(
        &loading,
        get("/models"),
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
    )
    .await;
    let png = common::png_bytes(&common::gray_image(40, 40, 1));
    expect_error(
        &loading,
        raw("/predict", "image/png", png),
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
    )
    .await;
}

#[tokio::test]
async fn predict_raw_png_and_jpeg() {
    let t = common::test_app();
    let img = common::gray_image(300, 240, 3);
    for (ct, bytes) in [
        ("image/png", common::png_bytes(&img)),
        ("image/jpeg", common::jpeg_bytes(&img)),
    ] {
        let req = Request::post("/predict")
            .header(header::CONTENT_TYPE, ct)
            .header("x-request-id", "req-42")
            .body(Body::from(bytes))
            .unwrap();
        let (s, h, b) = send(&t.app, req).await;
        let v = json(&b);
        assert_eq!(s, StatusCode::OK, "{v}");
        // The caller's id is echoed and kept; the answer's own id is the server's.
        assert_eq!(h["x-request-id"], "req-42");
        assert_eq!(v["client_request_id"], "req-42");
        assert_eq!(v["request_id"].as_str().unwrap().len(), 36, "{v}");
        let pn = v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        let no = v["probabilities"]["NORMAL"].as_f64().unwrap();
        assert!((pn + no - 1.0).abs() < 1e-5);
        let thr = v["threshold"].as_f64().unwrap();
        let label = if pn >= thr { "PNEUMONIA" } else { "NORMAL" };
        assert_eq!(v["label"], label);
        let conf = v["confidence"].as_f64().unwrap();
        assert_eq!(conf, if label == "PNEUMONIA" { pn } else { no });
        assert_eq!(v["model"]["name"], "alpha");
        assert_eq!(v["model"]["version"], "0.0.1-test");
        assert_eq!(v["model"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(v["execution_provider"], "CPUExecutionProvider");
        for k in ["decode", "queue", "inference", "total"] {
            assert!(v["timings_ms"][k].as_f64().unwrap() >= 0.0);
        }
    }
    // Without a client id, one is generated and echoed.
    let (_, h, b) = send(
        &t.app,
        raw("/predict", "image/png", common::png_bytes(&img)),
    )
    .await;
    let id = h["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() >= 32);
    assert_eq!(json(&b)["request_id"], id);
}

#[tokio::test]
async fn multipart_several_images_answer_in_order() {
    let t = common::test_app();
    let imgs: Vec<Vec<u8>> = (0..3)
        .map(|i| common::png_bytes(&common::gray_image(64 + i * 10, 64, i * 50)))
        .collect();
    let mut singles = Vec::new();
    for b in &imgs {
        let (_, _, body) = send(&t.app, raw("/predict", "image/png", b.clone())).await;
        singles.push(json(&body)["probabilities"]["PNEUMONIA"].as_f64().unwrap());
    }
    let parts: Vec<(&str, &str, Vec<u8>)> = imgs
        .iter()
        .map(|b| ("image", "image/png", b.clone()))
        .collect();
    let (s, _, b) = send(&t.app, multipart("/predict", &parts)).await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK, "{v}");
    let arr = v.as_array().expect("an array for several images");
    assert_eq!(arr.len(), 3);
    for (a, single) in arr.iter().zip(&singles) {
        assert!((a["probabilities"]["PNEUMONIA"].as_f64().unwrap() - single).abs() < 1e-6);
    }
    // One multipart image answers an object; octet-stream parts are sniffed.
    let (s, _, b) = send(
        &t.app,
        multipart(
            "/predict",
            &[("image", "application/octet-stream", imgs[0].clone())],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(json(&b).is_object());
}

#[tokio::test]
async fn model_selection_by_name_and_preference() {
    let t = common::test_app();
    let png = common::png_bytes(&common::gray_image(50, 50, 9));
    for (q, want) in [
        ("", "alpha"),
        ("?model=beta", "beta"),
        ("?prefer=sensitivity", "alpha"),
        ("?prefer=specificity", "beta"),
    ] {
        let (s, _, b) = send(
            &t.app,
            raw(&format!("/predict{q}"), "image/png", png.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(json(&b)["model"]["name"], want, "query {q}");
    }
    expect_error(
        &t.app,
        raw("/predict?model=gamma", "image/png", png.clone()),
        StatusCode::NOT_FOUND,
        "model_not_found",
    )
    .await;
    expect_error(
        &t.app,
        raw("/predict?prefer=speed", "image/png", png.clone()),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_query",
    )
    .await;
    expect_error(
        &t.app,
        raw(
            "/predict?model=alpha&prefer=sensitivity",
            "image/png",
            png.clone(),
        ),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_query",
    )
    .await;
    expect_error(
        &t.app,
        raw("/predict?modle=alpha", "image/png", png),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_query",
    )
    .await;
}

fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    tokio_stream::iter(chunks.into_iter().map(Ok))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_fast_and_nothing_is_lost() {
    let batch = cxr::inference::BatchConfig {
        max_batch: 1,
        batch_wait: std::time::Duration::ZERO,
        arrival_wait: std::time::Duration::ZERO,
        capacity: 2,
    };
    // Tiny images decode in microseconds, far faster than an inference, and decoding
    // is not throttled: submissions outrun the worker, so the 2-slot queue fills
    // whatever else the machine is doing.
    let limits = Limits {
        max_decodes: 256,
        ..common::test_limits()
    };
    let t = common::test_app_with(limits, batch);
    let png = common::png_bytes(&common::gray_image(32, 32, 5));
    let n = 200;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let app = t.app.clone();
        let body = png.clone();
        tasks.push(tokio::spawn(async move {
            send(&app, raw("/predict", "image/png", body)).await
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for task in tasks {
        let (s, h, b) = task.await.unwrap();
        match s {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(json(&b)["error_type"], "overloaded");
                assert!(h.contains_key(header::RETRY_AFTER));
                overloaded += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok + overloaded, n, "every request got an answer");
    assert!(ok > 0 && overloaded > 0, "ok {ok}, overloaded {overloaded}");
    let (_, _, b) = send(&t.app, get("/metrics")).await;
    let text = String::from_utf8(b).unwrap();
    let want = format!("cxr_overloaded_total{{model=\"alpha\"}} {overloaded}");
    assert!(
        text.lines().any(|l| l == want),
        "no line `{want}` in\n{text}"
    );
}

#[tokio::test]
async fn served_probabilities_equal_direct_onnx_runtime() {
    let t = common::test_app();
    let img = common::gray_image(333, 271, 7);
    let png = common::png_bytes(&img);
    let (_, _, b) = send(&t.app, raw("/predict?model=beta", "image/png", png.clone())).await;
    let v = json(&b);
    let onnx = std::fs::read(t.dir.path().join("beta.onnx")).unwrap();
    let mut session = common::cpu_session(&onnx);
    let card: cxr::registry::ModelCard =
        serde_json::from_str(&std::fs::read_to_string(t.dir.path().join("beta.json")).unwrap())
            .unwrap();
    let pre = cxr::imaging::Preprocessor::new(card.input_size, &card.preprocessing).unwrap();
    let x = cxr::imaging::preprocess(&pre, &png, 1 << 30).unwrap();
    let s = card.input_size as usize;
    let p = cxr::inference::run_probabilities(&mut session, x, 1, s).unwrap()[0];
    assert_eq!(
        v["probabilities"]["PNEUMONIA"].as_f64().unwrap() as f32,
        p[1]
    );
    assert_eq!(v["probabilities"]["NORMAL"].as_f64().unwrap() as f32, p[0]);
}

#[tokio::test]
async fn models_endpoints_and_metrics() {
    let t = common::test_app();
    let png = common::png_bytes(&common::gray_image(64, 64, 2));
    let (_, _, b) = send(&t.app, raw("/predict", "image/png", png)).await;
    let label = json(&b)["label"].as_str().unwrap().to_string();
    let (s, _, b) = send(&t.app, get("/models")).await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["default"], "alpha");
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    let alpha = &models[0];
    assert_eq!(alpha["card"]["name"], "alpha");
    assert_eq!(alpha["default"], true);
    assert_eq!(alpha["card"]["metrics"]["test"]["sensitivity"], 0.99);
    assert!(alpha["card"]["metrics"]["test"]["confusion"]["tp"].is_u64());
    assert_eq!(alpha["live"]["execution_provider"], "CPUExecutionProvider");
    assert_eq!(alpha["live"]["requests_served"], 1);
    assert!(alpha["live"]["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
    let (s, _, b) = send(&t.app, get("/models/beta")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["card"]["name"], "beta");
    expect_error(
        &t.app,
        get("/models/gamma"),
        StatusCode::NOT_FOUND,
        "model_not_found",
    )
    .await;

    let (s, h, b) = send(&t.app, get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(b).unwrap();
    // Whole lines with their exact values (a substring `… 1` would match `… 10`).
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "cxr_requests_total{path=\"/predict\",status=\"200\"} 1".to_string(),
        "cxr_request_duration_seconds_count{path=\"/predict\"} 1".into(),
        "cxr_inference_duration_seconds_count{model=\"alpha\"} 1".into(),
        "cxr_queue_duration_seconds_count{model=\"alpha\"} 1".into(),
        "cxr_batch_size_count{model=\"alpha\"} 1".into(),
        "cxr_batch_size_sum{model=\"alpha\"} 1".into(),
        "cxr_queue_depth{model=\"alpha\"} 0".into(),
        "cxr_decode_duration_seconds_count{model=\"alpha\"} 1".into(),
        "cxr_requests_total{path=\"/models/{name}\",status=\"404\"} 1".into(),
        format!("cxr_predictions_total{{label=\"{label}\",model=\"alpha\"}} 1"),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "no line `{want}` in\n{text}"
        );
    }
    // Nothing was counted for the variant that did not answer.
    assert!(!text.contains("cxr_predictions_total{label=\"NORMAL\",model=\"beta\"}"));
}

#[tokio::test]
async fn openapi_and_docs_are_served_and_in_sync() {
    let t = common::test_app();
    let (s, _, b) = send(&t.app, get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    for p in [
        "/predict",
        "/models",
        "/models/{name}",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(v["paths"][p].is_object(), "{p} documented");
    }
    let (s, h, b) = send(&t.app, get("/docs")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(String::from_utf8(b).unwrap().contains("/openapi.json"));
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml at the repository root");
    assert!(
        committed == cxr::http::openapi_yaml(),
        "openapi.yaml is stale: regenerate it with `cargo run --bin cxr-serve -- --print-openapi > openapi.yaml`"
    );
}

/// `--device auto` without a usable CUDA provider serves on the CPU and says why in
/// `/models` (`live.cuda_fallback_reason`); `--device cpu` has no reason to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_fallback_reason_is_reported() {
    common::ort_env();
    let dir = common::models_dir();
    let metrics = std::sync::Arc::new(cxr::http::ServerMetrics::new());
    let state = cxr::AppState::new(common::test_limits(), metrics.clone());
    let mut cfg = common::load_config(dir.path(), common::default_batch());
    cfg.device = cxr::inference::Device::Auto;
    let (set, _w) = cxr::inference::load_models(&cfg, |n| metrics.observer(n)).unwrap();
    state.set_models(set);
    let app = cxr::build_app(state);
    let (_, _, b) = send(&app, get("/models")).await;
    let v = json(&b);
    for m in v["models"].as_array().unwrap() {
        let live = &m["live"];
        if live["execution_provider"] == "CUDAExecutionProvider" {
            // A GPU machine: nothing fell back.
            assert!(live["cuda_fallback_reason"].is_null(), "{live}");
        } else {
            assert_eq!(live["execution_provider"], "CPUExecutionProvider");
            let reason = live["cuda_fallback_reason"].as_str().unwrap_or_default();
            assert!(!reason.is_empty(), "no fallback reason: {live}");
        }
    }
    let t = common::test_app();
    let (_, _, b) = send(&t.app, get("/models")).await;
    for m in json(&b)["models"].as_array().unwrap() {
        assert!(m["live"]["cuda_fallback_reason"].is_null());
    }
}
