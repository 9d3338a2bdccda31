//! The cheap gates before the model, through the real app: a blank or saturated
//! image, a colour photo, a DICOM of another body part and a lateral view are refused
//! with their own error types; a grayscale image saved as RGB is not; an adult's
//! DICOM is answered with a warning that never echoes the age.

mod common;

use axum::http::StatusCode;
use common::dicom::{self as d, Spec};
use common::http::{expect_error, json, raw, send};
use dicom_core::VR;
use dicom_dictionary_std::tags;
use image::{GrayImage, Luma, Rgb, RgbImage};

fn png_rgb(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn dicom() -> Vec<u8> {
    let g = d::test_gray(40, 30, 4);
    d::build(&Spec::new(30, 40, 16, d::stored(&g, |v| v * 257)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_and_colour_images_are_refused() {
    let t = common::test_app();
    for v in [0u8, 255, 128] {
        let blank = GrayImage::from_pixel(40, 32, Luma([v]));
        expect_error(
            &t.app,
            raw("/predict", "image/png", common::png_bytes(&blank)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "blank_image",
        )
        .await;
    }
    // Near-constant: a few specks on a flat field is still blank (p1..p99).
    let mut specks = GrayImage::from_pixel(40, 32, Luma([100]));
    specks.put_pixel(3, 3, Luma([255]));
    specks.put_pixel(9, 9, Luma([0]));
    expect_error(
        &t.app,
        raw("/predict", "image/png", common::png_bytes(&specks)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "blank_image",
    )
    .await;
    // A colour photo-like image.
    let colour = RgbImage::from_fn(48, 40, |x, y| {
        Rgb([(x * 5) as u8, (200 - y * 4) as u8, ((x * y) % 256) as u8])
    });
    let v = expect_error(
        &t.app,
        raw("/predict", "image/png", png_rgb(&colour)),
        StatusCode::UNPROCESSABLE_ENTITY,
        "colour_image",
    )
    .await;
    assert!(v["error"].as_str().unwrap().contains("colour"));
    // A radiograph saved as RGB (gray in three channels) is classified, as the gray.
    let g = common::gray_image(48, 40, 2);
    let as_rgb = RgbImage::from_fn(48, 40, |x, y| {
        let v = g.get_pixel(x, y).0[0];
        Rgb([v, v, v])
    });
    let (s, _, b) = send(&t.app, raw("/predict", "image/png", png_rgb(&as_rgb))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (_, _, b2) = send(&t.app, raw("/predict", "image/png", common::png_bytes(&g))).await;
    assert_eq!(json(&b)["probabilities"], json(&b2)["probabilities"]);
    // A faint tint (a scanned film) is not a colour photo.
    let tinted = RgbImage::from_fn(48, 40, |x, y| {
        let v = g.get_pixel(x, y).0[0];
        Rgb([v.saturating_add(6), v.saturating_add(3), v])
    });
    let (s, _, _) = send(&t.app, raw("/predict", "image/png", png_rgb(&tinted))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_gates() {
    let t = common::test_app();
    let src = dicom();
    // Another body part.
    for part in ["HAND", "SKULL", "KNEE"] {
        let v = expect_error(
            &t.app,
            raw(
                "/predict",
                "application/dicom",
                d::with_tags(&src, &[(tags::BODY_PART_EXAMINED, VR::CS, part)]),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_body_part",
        )
        .await;
        assert!(v["error"].as_str().unwrap().contains(part));
    }
    for part in ["CHEST", "chest", "THORAX"] {
        let (s, _, b) = send(
            &t.app,
            raw(
                "/predict",
                "application/dicom",
                d::with_tags(&src, &[(tags::BODY_PART_EXAMINED, VR::CS, part)]),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{part}: {}", String::from_utf8_lossy(&b));
    }
    // A lateral view is refused by default.
    for view in ["LL", "RL"] {
        expect_error(
            &t.app,
            raw(
                "/predict",
                "application/dicom",
                d::with_tags(&src, &[(tags::VIEW_POSITION, VR::CS, view)]),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "lateral_view",
        )
        .await;
    }
    // An adult: answered, with a warning; the age is never echoed.
    let (s, _, b) = send(
        &t.app,
        raw(
            "/predict",
            "application/dicom",
            d::with_tags(&src, &[(tags::PATIENT_AGE, VR::AS, "047Y")]),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8_lossy(&b);
    assert!(text.contains("pediatric"), "{text}");
    assert!(!text.contains("047Y") && !text.contains("047"), "{text}");
    let (s, _, b) = send(
        &t.app,
        raw(
            "/predict",
            "application/dicom",
            d::with_tags(&src, &[(tags::PATIENT_AGE, VR::AS, "004Y")]),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // No warning about the image (the test models are unsigned: that one only).
    let w = json(&b)["warnings"].clone();
    assert!(
        w.as_array().is_some_and(|w| w.len() == 1
            && w[0]
                .as_str()
                .unwrap()
                .starts_with(cxr::predict::UNVERIFIED_MODEL)),
        "{w}"
    );
    // A blank DICOM.
    let flat = GrayImage::from_pixel(40, 30, Luma([90]));
    let blank = d::build(&Spec::new(30, 40, 16, d::stored(&flat, |v| v * 257)));
    expect_error(
        &t.app,
        raw("/predict", "application/dicom", blank),
        StatusCode::UNPROCESSABLE_ENTITY,
        "blank_image",
    )
    .await;
}
