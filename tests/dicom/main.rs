//! DICOM uploads: files built in code (MONOCHROME1/2, 8/12/16-bit, signed, rescale,
//! window, native explicit/implicit and RLE-compressed) decode to exactly the 8-bit
//! radiograph they encode, and the served prediction equals the PNG's; every refusal
//! has its status.

mod bad_dicom;
#[path = "../common/mod.rs"]
mod common;

use axum::http::StatusCode;
use cxr::http::Limits;
use cxr::imaging::dicom::{DicomOptions, decode_dicom};
use image::GrayImage;
use serde_json::Value;

use common::dicom::{self as d, Encoding, Spec};
use common::http::{expect_error, json, multipart, raw, send};

/// Each case: a name, the file, the VOI path it must take.
fn cases(g: &GrayImage) -> Vec<(&'static str, Spec, &'static str)> {
    let (w, h) = (g.width() as u16, g.height() as u16);
    let inv = |v: u16| 255 - v;

    let m2_16 = Spec::new(h, w, 16, d::stored(g, |v| v * 257));

    // HU = 2·stored − 1024 = 4·g − 500; the window [−500, 520] maps it back to g.
    let mut m2_12 = Spec::new(h, w, 12, d::stored(g, |v| 2 * v + 262));
    m2_12.rescale = Some((2.0, -1024.0));
    m2_12.window = Some((10.5, 1021.0));

    let m1_12 = Spec {
        photometric: "MONOCHROME1",
        ..Spec::new(h, w, 12, d::stored(g, |v| 16 * inv(v)))
    };

    // Signed 16-bit, implicit VR: v = −2000 + 8·(255 − g); window [−2000, 40]; inverted.
    let mut m1_16s = Spec::new(
        h,
        w,
        16,
        d::stored(g, |v| (-2000i32 + 8 * i32::from(inv(v))) as i16 as u16),
    );
    m1_16s.photometric = "MONOCHROME1";
    m1_16s.signed = true;
    m1_16s.window = Some((-979.5, 2041.0));
    m1_16s.encoding = Encoding::ImplicitLe;

    let rle = Spec {
        encoding: Encoding::Rle,
        ..m2_12.clone()
    };
    let rle_m1 = Spec {
        encoding: Encoding::Rle,
        ..m1_12.clone()
    };
    let m2_8 = Spec::new(h, w, 8, d::stored(g, |v| v));

    vec![
        ("MONOCHROME2 16-bit, no rescale/window", m2_16, "min_max"),
        ("MONOCHROME2 12-bit, rescale + window", m2_12, "window"),
        ("MONOCHROME1 12-bit, min-max", m1_12, "min_max"),
        (
            "MONOCHROME1 signed 16-bit, window, implicit VR",
            m1_16s,
            "window",
        ),
        ("RLE MONOCHROME2 12-bit, rescale + window", rle, "window"),
        ("RLE MONOCHROME1 12-bit", rle_m1, "min_max"),
        ("MONOCHROME2 8-bit", m2_8, "min_max"),
    ]
}

#[test]
fn pixel_pipeline_reproduces_the_8bit_radiograph_exactly() {
    let g = d::test_gray(40, 30, 3);
    for (name, spec, voi) in cases(&g) {
        let bytes = d::build(&spec);
        let img =
            decode_dicom(&bytes, 1 << 30, d::test_opts()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.info.voi, voi, "{name}");
        assert_eq!(img.info.bits_stored, spec.bits_stored, "{name}");
        assert_eq!(img.info.study_instance_uid.as_deref(), Some(d::STUDY_UID));
        assert!(img.warnings.is_empty(), "{name}: {:?}", img.warnings);
        let diff = img
            .gray
            .as_raw()
            .iter()
            .zip(g.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(img.gray.dimensions(), g.dimensions(), "{name}");
        assert_eq!(diff, 0, "{name}: {diff} pixels differ from the 8-bit image");
    }
    // And a pipeline step missing would show: MONOCHROME1 read as MONOCHROME2 is the
    // negative.
    let mut not_inverted = cases(&g).remove(2).1;
    not_inverted.photometric = "MONOCHROME2";
    let img = decode_dicom(&d::build(&not_inverted), 1 << 30, d::test_opts()).unwrap();
    assert!(
        img.gray
            .as_raw()
            .iter()
            .zip(g.as_raw())
            .all(|(a, b)| *a == 255 - *b)
    );
}

#[test]
fn jpeg_baseline_frames_decode_like_the_jpeg_itself() {
    let g = d::test_gray(40, 30, 6);
    let jpeg: &'static [u8] = Box::leak(common::jpeg_bytes(&g).into_boxed_slice());
    let expected = cxr::imaging::decode_gray(jpeg, 1 << 30).unwrap();
    let spec = Spec {
        encoding: Encoding::JpegBaseline(jpeg),
        ..Spec::new(30, 40, 8, d::stored(&g, |v| v))
    };
    let img = decode_dicom(&d::build(&spec), 1 << 30, d::test_opts()).unwrap();
    assert_eq!(img.info.transfer_syntax, "1.2.840.10008.1.2.4.50");
    // Two JPEG decoders (dicom-rs's jpeg-decoder, image's zune-jpeg) may round the
    // inverse DCT differently; min–max VOI may also stretch by a level or two.
    let worst = img
        .gray
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 3,
        "JPEG frame differs from the JPEG by up to {worst} levels"
    );

    // A JPEG whose own header disagrees with Rows/Columns is refused before decoding.
    let lying = Spec {
        rows: 300,
        columns: 400,
        ..spec
    };
    let e = decode_dicom(&d::build(&lying), 1 << 30, d::test_opts()).unwrap_err();
    assert!(e.to_string().contains("40x30"), "{e}");
}

fn probs(v: &Value) -> (f64, f64) {
    (
        v["probabilities"]["NORMAL"].as_f64().unwrap(),
        v["probabilities"]["PNEUMONIA"].as_f64().unwrap(),
    )
}

fn assert_no_patient_data(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    for secret in d::PATIENT_SECRETS {
        assert!(!text.contains(secret), "patient data `{secret}` in {text}");
    }
}

#[tokio::test]
async fn served_prediction_equals_the_png_prediction() {
    let t = common::test_app();
    for seed in [3, 11] {
        let g = d::test_gray(40, 30, seed);
        let (s, _, b) = send(&t.app, raw("/predict", "image/png", common::png_bytes(&g))).await;
        assert_eq!(s, StatusCode::OK);
        let (pn, pp) = probs(&json(&b));
        for (name, spec, voi) in cases(&g) {
            let (s, _, b) = send(
                &t.app,
                raw("/predict", "application/dicom", d::build(&spec)),
            )
            .await;
            let v = json(&b);
            assert_eq!(s, StatusCode::OK, "{name}: {v}");
            let (n, p) = probs(&v);
            assert!(
                (n - pn).abs() <= 1e-4 && (p - pp).abs() <= 1e-4,
                "{name}: DICOM ({n}, {p}) vs PNG ({pn}, {pp})"
            );
            assert_eq!(v["dicom"]["study_instance_uid"], d::STUDY_UID, "{v}");
            assert_eq!(v["dicom"]["series_instance_uid"], d::SERIES_UID, "{v}");
            assert_eq!(v["dicom"]["sop_instance_uid"], d::SOP_UID, "{v}");
            assert_eq!(v["dicom"]["modality"], "CR");
            assert_eq!(v["dicom"]["voi"], voi);
            // None about the image (the test models are unsigned: that one only).
            assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1), "{v}");
            assert!(
                v["warnings"][0]
                    .as_str()
                    .unwrap()
                    .starts_with(cxr::predict::UNVERIFIED_MODEL),
                "{v}"
            );
            assert_no_patient_data(&b);
        }
    }
}

#[tokio::test]
async fn multipart_dicom_parts_typed_or_sniffed() {
    let t = common::test_app();
    let g = d::test_gray(40, 30, 5);
    let dcm = d::build(&cases(&g).remove(1).1);
    let png = common::png_bytes(&g);
    let (s, _, b) = send(
        &t.app,
        multipart(
            "/predict",
            &[
                ("image", "application/dicom", dcm.clone()),
                ("image", "application/octet-stream", dcm),
                ("image", "image/png", png),
            ],
        ),
    )
    .await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK, "{v}");
    let answers = v.as_array().expect("an array for three images");
    assert_eq!(answers[0]["dicom"]["sop_instance_uid"], d::SOP_UID);
    assert_eq!(answers[1]["dicom"]["sop_instance_uid"], d::SOP_UID);
    assert!(answers[2].get("dicom").is_none());
    assert_eq!(probs(&answers[0]), probs(&answers[2]));
    assert_eq!(probs(&answers[1]), probs(&answers[2]));
}

#[tokio::test]
async fn lateral_view_and_multiframe_answer_with_warnings() {
    // Lateral views are refused by default (tests/gates.rs); --allow-lateral answers
    // them with a warning.
    let t = common::test_app_with(
        cxr::Limits {
            dicom: cxr::imaging::dicom::DicomOptions {
                allow_lateral: true,
                ..Default::default()
            },
            ..common::test_limits()
        },
        common::default_batch(),
    );
    let g = d::test_gray(40, 30, 7);
    let other = d::test_gray(40, 30, 8);
    let (_, _, b) = send(&t.app, raw("/predict", "image/png", common::png_bytes(&g))).await;
    let png = probs(&json(&b));

    let mut lateral = cases(&g).remove(0).1;
    lateral.view_position = Some("LL");
    let (s, _, b) = send(
        &t.app,
        raw("/predict", "application/dicom", d::build(&lateral)),
    )
    .await;
    let v = json(&b);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["warnings"][0].as_str().unwrap().contains("lateral"),
        "{v}"
    );
    assert_eq!(probs(&v), png);

    let mut multi = cases(&g).remove(0).1;
    multi.frames.push(d::stored(&other, |v| v * 257));
    for encoding in [Encoding::ExplicitLe, Encoding::Rle] {
        multi.encoding = encoding;
        let (s, _, b) = send(
            &t.app,
            raw("/predict", "application/dicom", d::build(&multi)),
        )
        .await;
        let v = json(&b);
        assert_eq!(s, StatusCode::OK, "{encoding:?}: {v}");
        assert!(
            v["warnings"][0].as_str().unwrap().contains("first frame"),
            "{v}"
        );
        assert_eq!(
            probs(&v),
            png,
            "{encoding:?}: the first frame is classified"
        );
    }
}

#[test]
fn random_corruption_never_panics() {
    let g = d::test_gray(24, 16, 1);
    let mut rng = cxr::model::arch::SplitMix64(7);
    for (_, spec, _) in cases(&g) {
        let good = d::build(&spec);
        for _ in 0..400 {
            let mut b = good.clone();
            for _ in 0..(1 + rng.next_u64() % 8) {
                let i = (rng.next_u64() as usize) % b.len();
                b[i] = rng.next_u64() as u8;
            }
            if rng.next_u64().is_multiple_of(3) {
                b.truncate((rng.next_u64() as usize) % b.len());
            }
            // Any answer is fine except a panic, an unbounded allocation or a hang: a
            // corrupt length used to make the parser zero-fill gigabytes (seconds of
            // CPU for a 2 kB body) before the length checks ran first. The bound is a
            // hang detector, 1000× the normal cost, not a speed goal.
            let t = std::time::Instant::now();
            let r = decode_dicom(&b, 1 << 16, d::test_opts());
            assert!(
                t.elapsed().as_secs_f64() < 2.0,
                "{:?} for a {} B file: {:?}",
                t.elapsed(),
                b.len(),
                r.err().map(|e| e.to_string())
            );
        }
    }
}

/// The blank check's time goes to the caller's `GateTime` (the trace's `gates` span
/// inside `decode`), a refusal's included.
#[test]
fn the_content_gate_is_timed_into_the_callers_gate_time() {
    use cxr::imaging::GateTime;
    use cxr::imaging::dicom::decode_dicom_timed;
    use std::time::{Duration, Instant};
    let g = d::test_gray(40, 30, 3);
    let file = d::build(&Spec::new(30, 40, 16, d::stored(&g, |v| v * 257)));
    let mut gates = GateTime::default();
    let before = Instant::now();
    decode_dicom_timed(&file, 1 << 30, d::test_opts(), &mut gates).unwrap();
    let after = Instant::now();
    let (start, total) = gates.span().expect("the blank check ran");
    assert!(
        before <= start && start + total <= after,
        "within the decode"
    );
    assert!(total > Duration::ZERO);
    let flat = GrayImage::from_pixel(40, 30, image::Luma([90]));
    let blank = d::build(&Spec::new(30, 40, 16, d::stored(&flat, |v| v * 257)));
    let mut refused = GateTime::default();
    assert!(matches!(
        decode_dicom_timed(&blank, 1 << 30, d::test_opts(), &mut refused),
        Err(cxr::imaging::dicom::DicomError::Content(_))
    ));
    assert!(refused.total > Duration::ZERO, "the refusing gate is timed");
}
