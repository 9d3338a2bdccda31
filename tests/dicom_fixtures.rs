//! DICOM encoded by encoders nobody here wrote (tests/fixtures/dicom, made by
//! make_dicom_fixtures.py): pydicom + pylibjpeg-openjpeg (JPEG 2000 lossless) and
//! dcmtk's dcmcjpeg (JPEG lossless SV1) compressed one 12-bit image that pydicom also
//! stored natively. Lossless codecs: every file must be answered exactly as the native.

mod common;

use axum::http::StatusCode;
use common::http::{json, raw, send};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dicom")
            .join(name),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independently_encoded_files_decode_like_the_native_one() {
    let t = common::test_app();
    let answer = |bytes: Vec<u8>| {
        let app = t.app.clone();
        async move {
            let (s, _, b) = send(&app, raw("/predict", "application/dicom", bytes)).await;
            assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            json(&b)
        }
    };
    let native = answer(fixture("native.dcm")).await;
    assert_eq!(native["dicom"]["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert_eq!(native["dicom"]["bits_stored"], 12);
    for (file, ts) in [
        ("j2k_lossless.dcm", "1.2.840.10008.1.2.4.90"),
        ("jpeg_lossless_sv1.dcm", "1.2.840.10008.1.2.4.70"),
    ] {
        let v = answer(fixture(file)).await;
        assert_eq!(v["dicom"]["transfer_syntax"], ts, "{file}");
        assert_eq!(v["probabilities"], native["probabilities"], "{file}");
        assert_eq!(v["dicom"]["voi"], native["dicom"]["voi"], "{file}");
    }
}

/// A VOI LUT Sequence (a square-root curve, no window): the server's rendering equals
/// pydicom's `apply_voi_lut` (written as an 8-bit PNG by Pillow), so both answers are
/// the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voi_lut_sequence_renders_as_pydicom_renders_it() {
    let t = common::test_app();
    let (s, _, b) = send(
        &t.app,
        raw(
            "/predict",
            "application/dicom",
            fixture("voi_lut_sequence.dcm"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let dcm = json(&b);
    assert_eq!(dcm["dicom"]["voi"], "voi_lut_sequence");
    let (s, _, b) = send(
        &t.app,
        raw(
            "/predict",
            "image/png",
            fixture("voi_lut_sequence_pydicom.png"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["probabilities"], dcm["probabilities"]);
    // And not merely any rendering: the native file (no VOI: min-max) answers otherwise.
    let (_, _, b) = send(
        &t.app,
        raw("/predict", "application/dicom", fixture("native.dcm")),
    )
    .await;
    assert_ne!(json(&b)["probabilities"], dcm["probabilities"]);
}

/// VOI LUTs as other writers store them, each rendered by dcmtk's dcm2pnm (an
/// implementation independent of ours) as the PNG the server must answer alike:
/// 8-bit entries one per 16-bit value, the same table packed two entries per 16-bit
/// word (OW, half as many words as entries), and a 65536-entry table (descriptor 0).
/// The packed and unpacked tables are one table: the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voi_luts_of_8_bit_entries_and_65536_entries_render_as_dcmtk_renders_them() {
    let t = common::test_app();
    let mut answers = Vec::new();
    for name in ["voi_lut_8bit_words", "voi_lut_8bit_packed", "voi_lut_65536"] {
        let (s, _, b) = send(
            &t.app,
            raw(
                "/predict",
                "application/dicom",
                fixture(&format!("{name}.dcm")),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{name}: {}", String::from_utf8_lossy(&b));
        let dcm = json(&b);
        assert_eq!(dcm["dicom"]["voi"], "voi_lut_sequence", "{name}");
        let (s, _, b) = send(
            &t.app,
            raw(
                "/predict",
                "image/png",
                fixture(&format!("{name}_dcmtk.png")),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let png = json(&b);
        let p = |v: &serde_json::Value| v["probabilities"]["PNEUMONIA"].as_f64().unwrap();
        // dcmtk and we may round a gray level apart: equal answers within 1e-3.
        assert!(
            (p(&dcm) - p(&png)).abs() < 1e-3,
            "{name}: DICOM {} vs dcmtk's rendering {}",
            p(&dcm),
            p(&png)
        );
        answers.push(p(&dcm));
    }
    assert_eq!(answers[0], answers[1], "packed and unpacked 8-bit tables");
    // Not any rendering: the 65536-entry curve answers otherwise than the 8-bit one.
    assert!((answers[0] - answers[2]).abs() > 1e-3, "{answers:?}");
}

/// JPEG 2000 codestreams from OpenJPEG's opj_compress (make_j2k_padding_fixtures.py):
/// an odd-length codestream padded after its end marker with 0xFF or 0x00 decodes
/// exactly as its even-length twin (and the native file: lossless); a codestream cut
/// before its end is still refused, padded or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_jpeg_2000_frames_decode_like_their_twin_and_cut_ones_are_refused() {
    let t = common::test_app();
    let answer = |bytes: Vec<u8>| {
        let app = t.app.clone();
        async move {
            let (s, _, b) = send(&app, raw("/predict", "application/dicom", bytes)).await;
            (s, json(&b))
        }
    };
    let (s, native) = answer(fixture("native.dcm")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, twin) = answer(fixture("j2k_opj_even.dcm")).await;
    assert_eq!(s, StatusCode::OK, "{twin}");
    assert_eq!(twin["probabilities"], native["probabilities"]);
    for padded in ["j2k_opj_pad_ff.dcm", "j2k_opj_pad_00.dcm"] {
        let (s, v) = answer(fixture(padded)).await;
        assert_eq!(s, StatusCode::OK, "{padded}: {v}");
        assert_eq!(v["dicom"]["transfer_syntax"], "1.2.840.10008.1.2.4.90");
        assert_eq!(v["probabilities"], twin["probabilities"], "{padded}");
    }
    for cut in ["j2k_opj_cut.dcm", "j2k_opj_cut_pad_ff.dcm"] {
        let (s, v) = answer(fixture(cut)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{cut}: {v}");
        assert_eq!(v["error_type"], "invalid_dicom", "{cut}");
    }
}
