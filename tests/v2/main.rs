//! The Open Inference Protocol (KServe V2) through the real app: every endpoint, both
//! input kinds, JSON and Triton's binary tensor data extension both ways, each error
//! with its status and `{"error"}` body; answers equal `/predict`'s for the same image.
//! (tests/v2_tritonclient.rs drives the real server with NVIDIA's own client.)

#[path = "../common/mod.rs"]
mod common;
mod errors;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use common::http::{get, json, raw, send};
use serde_json::{Value, json};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn post_json(uri: &str, v: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

/// A binary-extension request: the JSON, then `tail`.
fn post_binary(uri: &str, v: &Value, tail: &[u8]) -> Request<Body> {
    let mut body = serde_json::to_vec(v).unwrap();
    let n = body.len();
    body.extend_from_slice(tail);
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Inference-Header-Content-Length", n.to_string())
        .body(Body::from(body))
        .unwrap()
}

fn image(seed: u32) -> Vec<u8> {
    common::png_bytes(&common::gray_image(48, 40, seed))
}

/// `/predict`'s probabilities and label for `bytes` on `model`.
async fn predicted(app: &axum::Router, model: &str, bytes: &[u8]) -> ([f64; 2], String) {
    let (s, _, b) = send(
        app,
        raw(
            &format!("/predict?model={model}"),
            "image/png",
            bytes.to_vec(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    (
        [
            v["probabilities"]["NORMAL"].as_f64().unwrap(),
            v["probabilities"]["PNEUMONIA"].as_f64().unwrap(),
        ],
        v["label"].as_str().unwrap().to_string(),
    )
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-6, "{got:?} vs {want:?}");
    }
}

fn output<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {v}"))
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_and_readiness() {
    let t = common::test_app();
    let (s, _, b) = send(&t.app, get("/v2")).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["name"], "cxr");
    assert!(
        v["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    for uri in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/alpha/ready",
        "/v2/models/beta/versions/0.0.1-test/ready",
    ] {
        let (s, _, _) = send(&t.app, get(uri)).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
    for uri in [
        "/v2/models/nope/ready",
        "/v2/models/alpha/versions/9.9.9/ready",
        "/v2/models/nope",
        "/v2/models/alpha/versions/9.9.9",
    ] {
        let (s, _, b) = send(&t.app, get(uri)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        let v = json(&b);
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        assert!(v["error"].as_str().unwrap().contains("alpha") || uri.contains("nope"));
    }
    for uri in ["/v2/models/alpha", "/v2/models/alpha/versions/0.0.1-test"] {
        let (s, _, b) = send(&t.app, get(uri)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            json(&b),
            json!({
                "name": "alpha",
                "versions": ["0.0.1-test"],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [-1]},
                    {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
                ],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}
                ]
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_is_400() {
    let state = cxr::AppState::new(
        common::test_limits(),
        std::sync::Arc::new(cxr::http::ServerMetrics::new()),
    );
    let app = cxr::build_app(state);
    for uri in ["/v2/health/ready", "/v2/models/alpha/ready"] {
        let (s, _, b) = send(&app, get(uri)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(json(&b), json!({"ready": false}));
    }
    let (s, _, _) = send(&app, get("/v2/health/live")).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_files_in_json_answer_as_predict() {
    let t = common::test_app();
    let (a, b) = (image(1), image(9));
    let (pa, la) = predicted(&t.app, "beta", &a).await;
    let (pb, lb) = predicted(&t.app, "beta", &b).await;
    assert_ne!(pa, pb, "distinct images must give distinct answers");
    let req = json!({
        "id": "req-42",
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                    "data": [b64(&a), {"b64": b64(&b)}]}]
    });
    for uri in [
        "/v2/models/beta/infer",
        "/v2/models/beta/versions/0.0.1-test/infer",
    ] {
        let (s, h, body) = send(&t.app, post_json(uri, &req)).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(
            h[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let v = json(&body);
        assert_eq!(v["model_name"], "beta");
        assert_eq!(v["model_version"], "0.0.1-test");
        assert_eq!(v["id"], "req-42");
        let p = output(&v, "probabilities");
        assert_eq!(p["datatype"], "FP32");
        assert_eq!(p["shape"], json!([2, 2]));
        assert_close(&f64s(&p["data"]), &[pa[0], pa[1], pb[0], pb[1]]);
        let l = output(&v, "label");
        assert_eq!(l["datatype"], "BYTES");
        assert_eq!(l["shape"], json!([2]));
        assert_eq!(l["data"], json!([la, lb]));
        assert_eq!(v["parameters"]["threshold"], 0.5);
    }
    // A parameter threshold, and one output asked for.
    let req = json!({
        "parameters": {"threshold": 0.999},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(&a)]}],
        "outputs": [{"name": "label"}]
    });
    let (s, _, body) = send(&t.app, post_json("/v2/models/beta/infer", &req)).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&body);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    let want = if pa[1] >= 0.999 {
        "PNEUMONIA"
    } else {
        "NORMAL"
    };
    assert_eq!(output(&v, "label")["data"], json!([want]));
    assert_eq!(v["parameters"]["threshold_source"], "query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessed_tensors_in_json_and_binary() {
    let t = common::test_app();
    let a = image(5);
    let (pa, la) = predicted(&t.app, "alpha", &a).await;
    let models = t.state.models().unwrap();
    let tensor = models
        .get("alpha")
        .unwrap()
        .preprocessor
        .preprocess_checked(
            &a,
            1 << 20,
            &common::test_geometry(),
            &mut cxr::imaging::GateTime::default(),
        )
        .unwrap();
    assert_eq!(tensor.len(), 3 * 32 * 32);
    // JSON, nested rows are fine.
    let nested: Vec<Vec<f32>> = tensor.chunks(32).map(<[f32]>::to_vec).collect();
    let req = json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": nested}]});
    let (s, _, body) = send(&t.app, post_json("/v2/models/alpha/infer", &req)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_close(&f64s(&output(&v, "probabilities")["data"]), &pa);
    assert_eq!(output(&v, "label")["data"], json!([la]));

    // Binary both ways: the tensor's bytes after the JSON; outputs as bytes too.
    let bytes: Vec<u8> = tensor.iter().flat_map(|x| x.to_le_bytes()).collect();
    let req = json!({
        "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                    "parameters": {"binary_data_size": bytes.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}},
                    {"name": "label", "parameters": {"binary_data": true}}]
    });
    let (s, h, body) = send(&t.app, post_binary("/v2/models/alpha/infer", &req, &bytes)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let n: usize = h["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&body[..n]).unwrap();
    let tail = &body[n..];
    let p = output(&v, "probabilities");
    assert!(p.get("data").is_none());
    assert_eq!(p["parameters"]["binary_data_size"], 8);
    let probs: Vec<f64> = tail[..8]
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    assert_close(&probs, &pa);
    let label = &tail[8..];
    assert_eq!(
        output(&v, "label")["parameters"]["binary_data_size"],
        label.len()
    );
    assert_eq!(
        u32::from_le_bytes(label[..4].try_into().unwrap()) as usize,
        la.len()
    );
    assert_eq!(&label[4..], la.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_files_as_binary_with_binary_data_output() {
    let t = common::test_app();
    let (a, b) = (image(2), image(3));
    let (pa, _) = predicted(&t.app, "alpha", &a).await;
    let (pb, _) = predicted(&t.app, "alpha", &b).await;
    let mut tail = Vec::new();
    for f in [&a, &b] {
        tail.extend_from_slice(&(f.len() as u32).to_le_bytes());
        tail.extend_from_slice(f);
    }
    let req = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": tail.len()}}]
    });
    let (s, h, body) = send(&t.app, post_binary("/v2/models/alpha/infer", &req, &tail)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let n: usize = h["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let probs: Vec<f64> = body[n..n + 16]
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    assert_close(&probs, &[pa[0], pa[1], pb[0], pb[1]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_audit_cover_the_protocol() {
    use sha2::Digest;
    let key = "cxr_v2-test-key";
    let hash: String = sha2::Sha256::digest(key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = cxr::http::auth::ApiKeys::parse(
        &format!(
            "[[callers]]\nname = \"mlops\"\nkey_sha256 = \"{hash}\"\nscopes = [\"predict\"]\n"
        ),
        false,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = cxr::audit::Audit::with_file(&dir.path().join("audit.jsonl"), 0).0;
    let t = common::test_app_configured(common::test_limits(), common::default_batch(), |s| {
        s.with_api_keys(keys).with_audit(audit)
    });
    let req = json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": vec![0.25f32; 3072]}]});
    let (s, h, b) = send(&t.app, post_json("/v2/models/alpha/infer", &req)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(json(&b).as_object().unwrap().len(), 1);
    let mut r = post_json("/v2/models/alpha/infer", &req);
    r.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let (s, _, _) = send(&t.app, r).await;
    assert_eq!(s, StatusCode::OK);
    // Metadata needs the `models` scope; health stays open.
    let mut r = get("/v2/models/alpha");
    r.headers_mut().insert("x-api-key", key.parse().unwrap());
    let (s, _, b) = send(&t.app, r).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&b));
    for uri in ["/v2", "/v2/health/ready", "/v2/models/alpha/ready"] {
        assert_eq!(send(&t.app, get(uri)).await.0, StatusCode::OK, "{uri}");
    }
    let records = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let lines: Vec<Value> = records
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One image decided about; the refused callers are events (the 401 written
    // before the answer's record; the 403 may still be on its way).
    let images: Vec<&Value> = lines.iter().filter(|l| l.get("event").is_none()).collect();
    assert_eq!(images.len(), 1, "{records}");
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "auth_refused" && l["detail"]["reason"] == "missing"),
        "{records}"
    );
    let v = images[0];
    assert_eq!(v["caller"], "mlops");
    assert_eq!(v["input_kind"], "tensor");
    assert_eq!(v["input_bytes"], 3072 * 4);
}
