//! Every kind of bad DICOM upload gets its own 4xx.

use super::*;

#[tokio::test]
async fn bad_dicom_gets_the_right_4xx() {
    let t = common::test_app();
    let g = d::test_gray(40, 30, 9);
    let good = cases(&g).remove(1).1;
    let post = |bytes: Vec<u8>| raw("/predict", "application/dicom", bytes);

    // Not DICOM, empty, truncated → 400.
    expect_error(
        &t.app,
        post(b"hello, not dicom".to_vec()),
        StatusCode::BAD_REQUEST,
        "invalid_dicom",
    )
    .await;
    expect_error(
        &t.app,
        post(common::png_bytes(&g)),
        StatusCode::BAD_REQUEST,
        "invalid_dicom",
    )
    .await;
    let full = d::build(&good);
    for cut in [100, 140, 300, full.len() / 2, full.len() - 1] {
        let v = expect_error(
            &t.app,
            post(full[..cut].to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_dicom",
        )
        .await;
        assert!(v["error"].as_str().unwrap().contains("DICOM"), "{v}");
    }
    // An element claiming 4 GB in a small body is refused before any allocation.
    let mut huge = full.clone();
    huge.extend_from_slice(&[
        0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
    ]);
    huge.extend_from_slice(&[0u8; 64]);
    let v = expect_error(&t.app, post(huge), StatusCode::BAD_REQUEST, "invalid_dicom").await;
    assert!(v["error"].as_str().unwrap().contains("declares"), "{v}");

    // Transfer syntaxes we cannot decode → 415 naming them.
    for (uid, what) in [
        ("1.2.840.10008.1.2.4.80", "JPEG-LS"),
        ("1.2.3.4.5.6", "unknown"),
        ("1.2.840.10008.1.2.1.99", "Deflate"),
        ("1.2.840.10008.1.2.2", "Big Endian"),
    ] {
        let spec = Spec {
            transfer_syntax_override: Some(uid),
            ..good.clone()
        };
        let v = expect_error(
            &t.app,
            post(d::build(&spec)),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_transfer_syntax",
        )
        .await;
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(uid), "{msg}");
        assert!(msg.to_lowercase().contains(&what.to_lowercase()), "{msg}");
    }

    // Valid DICOM that is not a classifiable radiograph → 422.
    let no_pixels = Spec {
        pixel_data: false,
        ..good.clone()
    };
    expect_error(
        &t.app,
        post(d::build(&no_pixels)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_pixel_data",
    )
    .await;
    let ct = Spec {
        modality: Some("CT"),
        ..good.clone()
    };
    let v = expect_error(
        &t.app,
        post(d::build(&ct)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_dicom",
    )
    .await;
    assert!(v["error"].as_str().unwrap().contains("CT"), "{v}");
    let no_modality = Spec {
        modality: None,
        ..good.clone()
    };
    expect_error(
        &t.app,
        post(d::build(&no_modality)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_dicom",
    )
    .await;
    let rgb = Spec {
        samples_per_pixel: 3,
        ..good.clone()
    };
    let v = expect_error(
        &t.app,
        post(d::build(&rgb)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_dicom",
    )
    .await;
    assert!(
        v["error"].as_str().unwrap().contains("SamplesPerPixel"),
        "{v}"
    );

    // Rows × Columns × frames over the pixel limit → 413 before decoding.
    let giant = Spec {
        rows: 60000,
        columns: 60000,
        ..good.clone()
    };
    expect_error(
        &t.app,
        post(d::build(&giant)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_pixels",
    )
    .await;
    let mut frames = good.clone();
    frames.frames = vec![frames.frames[0].clone(); 3];
    let small = common::test_app_with(
        Limits {
            max_pixels: 40 * 30 * 2,
            ..common::test_limits()
        },
        common::default_batch(),
    );
    expect_error(
        &small.app,
        post(d::build(&frames)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_pixels",
    )
    .await;

    // --allow-any-modality takes the CT.
    let any = common::test_app_with(
        Limits {
            dicom: DicomOptions {
                allow_any_modality: true,
                ..d::test_opts()
            },
            ..common::test_limits()
        },
        common::default_batch(),
    );
    let (s, _, b) = send(&any.app, post(d::build(&ct))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["dicom"]["modality"], "CT");
}
