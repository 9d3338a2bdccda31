//! Every kind of bad input gets its own 4xx and JSON error.

use super::*;

#[tokio::test]
async fn bad_input_gets_the_right_4xx() {
    let limits = Limits {
        max_pixels: 250_000,
        max_images: 2,
        ..common::test_limits()
    };
    let t = common::test_app_configured(limits, common::default_batch(), |s| {
        s.with_max_body_bytes(200_000)
    });
    let app = &t.app;
    let png = common::png_bytes(&common::gray_image(64, 64, 1));
    expect_error(
        app,
        raw("/predict", "image/png", vec![]),
        StatusCode::BAD_REQUEST,
        "empty_image",
    )
    .await;
    expect_error(
        app,
        raw("/predict", "image/jpeg", b"definitely not a jpeg".to_vec()),
        StatusCode::BAD_REQUEST,
        "invalid_image",
    )
    .await;
    expect_error(
        app,
        raw("/predict", "image/png", png[..png.len() / 2].to_vec()),
        StatusCode::BAD_REQUEST,
        "invalid_image",
    )
    .await;
    expect_error(
        app,
        raw(
            "/predict",
            "image/png",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        app,
        raw("/predict", "text/plain", png.clone()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        app,
        raw("/predict", "application/dicom", png.clone()),
        StatusCode::BAD_REQUEST,
        "invalid_dicom",
    )
    .await;
    let no_ct = Request::post("/predict")
        .body(Body::from(png.clone()))
        .unwrap();
    expect_error(
        app,
        no_ct,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        app,
        raw("/predict", "image/png", vec![0u8; 300_000]),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // A body over the limit without Content-Length (streamed).
    let stream = Body::from_stream(futures_stream(vec![vec![1u8; 150_000], vec![2u8; 150_000]]));
    let req = Request::post("/predict")
        .header(header::CONTENT_TYPE, "image/png")
        .body(stream)
        .unwrap();
    expect_error(app, req, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let big = common::png_bytes(&common::gray_image(600, 500, 1));
    expect_error(
        app,
        raw("/predict", "image/png", big),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_pixels",
    )
    .await;
    let three: Vec<(&str, &str, Vec<u8>)> = (0..3)
        .map(|_| ("image", "image/png", png.clone()))
        .collect();
    expect_error(
        app,
        multipart("/predict", &three),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_images",
    )
    .await;
    expect_error(
        app,
        multipart("/predict", &[("file", "image/png", png.clone())]),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        app,
        multipart("/predict", &[]),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        app,
        multipart("/predict", &[("image", "text/html", png.clone())]),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let broken = Request::post("/predict")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=zz")
        .body(Body::from("--zz\r\nnonsense"))
        .unwrap();
    expect_error(app, broken, StatusCode::BAD_REQUEST, "invalid_request").await;
    let no_boundary = Request::post("/predict")
        .header(header::CONTENT_TYPE, "multipart/form-data")
        .body(Body::from("x"))
        .unwrap();
    expect_error(app, no_boundary, StatusCode::BAD_REQUEST, "invalid_request").await;
    expect_error(app, get("/nope"), StatusCode::NOT_FOUND, "not_found").await;
    expect_error(
        app,
        get("/predict"),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    // After all that, the service still answers.
    let (s, _, _) = send(app, raw("/predict", "image/png", png)).await;
    assert_eq!(s, StatusCode::OK);
}
