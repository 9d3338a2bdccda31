//! Every error of the protocol: its status and the protocol's error body.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_has_its_status_and_protocol_body() {
    let t = common::test_app();
    let a = b64(&image(1));
    let infer = "/v2/models/alpha/infer";
    let img = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "image", "shape": shape, "datatype": datatype, "data": data}]});
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post_json(
                "/v2/models/nope/infer",
                &img(json!([1]), "BYTES", json!([a])),
            ),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            post_json(
                "/v2/models/alpha/versions/7/infer",
                &img(json!([1]), "BYTES", json!([a])),
            ),
            StatusCode::NOT_FOUND,
            "version",
        ),
        (
            post_json(infer, &img(json!([1]), "FP32", json!([a]))),
            StatusCode::BAD_REQUEST,
            "datatype BYTES",
        ),
        (
            post_json(infer, &img(json!([2]), "BYTES", json!([a]))),
            StatusCode::BAD_REQUEST,
            "holds 1",
        ),
        (
            post_json(infer, &img(json!([1, 2, 3]), "BYTES", json!([a]))),
            StatusCode::BAD_REQUEST,
            "shape [N]",
        ),
        (
            post_json(infer, &img(json!([1]), "BYTES", json!(["not base64!"]))),
            StatusCode::BAD_REQUEST,
            "base64",
        ),
        (
            post_json(infer, &img(json!([1]), "BYTES", json!([17]))),
            StatusCode::BAD_REQUEST,
            "base64 string",
        ),
        (
            post_json(infer, &img(json!([1]), "BYTES", json!([b64(b"junk")]))),
            StatusCode::BAD_REQUEST,
            "decode",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "[N, 3, 32, 32]",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0, 1.0]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "needs 3072",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "INT8", "data": [0]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "datatype FP32",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": [a]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "unknown input",
        ),
        (
            post_json(infer, &json!({"inputs": []})),
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [a]}], "outputs": [{"name": "cam"}]}),
            ),
            StatusCode::BAD_REQUEST,
            "unknown output",
        ),
        (
            post_json(
                infer,
                &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [a]}], "parameters": {"threshold": 2.0}}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "threshold",
        ),
        (
            post_json(infer, &json!({"nothing": true})),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            post_binary(
                infer,
                &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}]}),
                b"\x08\0\0\0abc",
            ),
            StatusCode::BAD_REQUEST,
            "binary_data_size 10",
        ),
        (
            post_binary(
                infer,
                &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]}),
                b"\x08\0\0\0abc",
            ),
            StatusCode::BAD_REQUEST,
            "longer than",
        ),
        (
            post_binary(infer, &img(json!([1]), "BYTES", json!([a])), b"extra"),
            StatusCode::BAD_REQUEST,
            "declares no binary_data_size",
        ),
    ];
    for (req, status, needle) in cases {
        let (s, _, b) = send(&t.app, req).await;
        let v = json(&b);
        assert_eq!(s, status, "{needle}: {v}");
        assert_eq!(v.as_object().unwrap().len(), 1, "only `error`: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "`{needle}` not in `{msg}`");
    }
    // A header length past the body.
    let req = Request::post(infer)
        .header("Inference-Header-Content-Length", "999")
        .body(Body::from("{}"))
        .unwrap();
    let (s, _, b) = send(&t.app, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(json(&b)["error"].as_str().unwrap().contains("999"));
}
