//! `cxr-train quantize CARD...`: a statically quantised (QDQ INT8) copy of a shipped
//! FP32 variant, served as a variant of its own (`<name>-int8`) with its own measured
//! card. The ranges are calibrated (min–max) on validation images, the copy is
//! measured through ONNX Runtime exactly as the server answers (the FP32 card's
//! temperature and threshold), on the test split, the validation split and its
//! stressed copy, and compared with the FP32 file's answers image by image.

use std::path::Path;

use image::GrayImage;

use super::data;
use crate::eval::{Metrics, OperatingCurve, roc_curve, served_probabilities, stress};
use crate::imaging::Preprocessor;
use crate::quantize::{Precision, QuantizationInfo};
use crate::registry::{CardMetrics, ModelCard};

/// Validation images the ranges are calibrated on (every k-th, both classes).
pub const CALIBRATION_IMAGES: usize = 200;

struct Answers {
    p: Vec<f64>,
    embeddings: Vec<Vec<f32>>,
}

fn answers(
    session: &mut crate::inference::CpuModel,
    pre: &Preprocessor,
    imgs: &[GrayImage],
    temperature: Option<f64>,
) -> anyhow::Result<Answers> {
    let mut out = Answers {
        p: Vec::with_capacity(imgs.len()),
        embeddings: Vec::new(),
    };
    for o in session.run_images(pre, imgs)? {
        out.p.push(f64::from(
            served_probabilities(o.logits, o.probabilities, temperature)[1],
        ));
        out.embeddings.extend(o.embedding);
    }
    Ok(out)
}

/// Makes, measures and writes `<name>-int8.onnx` and its card beside `card_path`;
/// returns a one-line summary.
pub fn quantize_card(
    card_path: &Path,
    data_dir: &Path,
    ort_lib: &Path,
    val_fraction: f64,
) -> anyhow::Result<String> {
    use anyhow::anyhow;
    let loaded = crate::registry::load_card(card_path)?;
    let card = loaded.card.clone();
    if card.precision != Precision::Fp32 {
        anyhow::bail!("{} is already {}", card.name, card.precision.as_str());
    }
    let (pre, mut fp32) = super::measuring_session(&loaded, ort_lib)?;
    let weights = crate::onnx::read_weights(&loaded.onnx_bytes)?;
    let model = {
        use prost::Message;
        crate::onnx::proto::ModelProto::decode(&loaded.onnx_bytes[..])?
    };
    let name = format!("{}-int8", card.name);
    let mut metadata: Vec<(String, String)> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    for (k, v) in metadata.iter_mut() {
        if k == "cxr.name" {
            *v = name.clone();
        }
    }
    metadata.push(("cxr.precision".into(), "int8".into()));
    let opts = crate::onnx::WriteOptions {
        input_size: card.input_size,
        storage: crate::onnx::WeightStorage::Fp32,
        metadata,
    };
    let config = &card.architecture.config;

    // Splits: the run's patient split (checked against the card), and the test split.
    let all = data::scan(data_dir, "train")?;
    let (_, val) = data::split_by_patient(&all, val_fraction, card.training.seed);
    if val.len() as u64 != card.training.validation_images {
        anyhow::bail!(
            "the validation split has {} images, the card {}",
            val.len(),
            card.training.validation_images
        );
    }
    let test = data::scan(data_dir, "test")?;
    let (val_imgs, bad) = data::load_resized(&val, &pre);
    super::report_bad(&bad, val.len())?;
    let (test_imgs, bad) = data::load_resized(&test, &pre);
    super::report_bad(&bad, test.len())?;
    let stressed: Vec<GrayImage> = val_imgs
        .iter()
        .enumerate()
        .map(|(i, g)| stress::perturb(g, stress::STRESS_SEED, i as u64))
        .collect();

    // Calibration: every k-th validation image.
    let step = (val_imgs.len() / CALIBRATION_IMAGES).max(1);
    let calib: Vec<&GrayImage> = val_imgs
        .iter()
        .step_by(step)
        .take(CALIBRATION_IMAGES)
        .collect();
    let calib_bytes =
        crate::quantize::calibration_graph(config, &weights, &opts).map_err(|e| anyhow!(e))?;
    let mut cs = crate::inference::CpuModel::load(ort_lib, &calib_bytes)?;
    let s = pre.size() as usize;
    let ranges = crate::quantize::calibrate(
        &mut cs,
        calib.chunks(4).map(|c| {
            (
                c.len(),
                c.iter()
                    .flat_map(|g| pre.normalize(g))
                    .collect::<Vec<f32>>(),
            )
        }),
        s,
    )
    .map_err(|e| anyhow!(e))?;
    drop(cs);
    let bytes =
        crate::quantize::int8_graph(config, &weights, &opts, ranges).map_err(|e| anyhow!(e))?;
    let mut q = crate::inference::CpuModel::load(ort_lib, &bytes)?;

    // Measurement, as served.
    let t = card.temperature();
    let q_test = answers(&mut q, &pre, &test_imgs, t)?;
    let f_test = answers(&mut fp32, &pre, &test_imgs, t)?;
    let q_val = answers(&mut q, &pre, &val_imgs, t)?;
    let q_stress = answers(&mut q, &pre, &stressed, t)?;
    let test_labels: Vec<u8> = test.iter().map(|x| x.label).collect();
    let val_labels: Vec<u8> = val.iter().map(|x| x.label).collect();
    let thr = card.threshold;
    let agree = q_test
        .p
        .iter()
        .zip(&f_test.p)
        .filter(|(a, b)| (**a >= thr) == (**b >= thr))
        .count() as f64
        / test_imgs.len().max(1) as f64;
    let max_diff = q_test
        .p
        .iter()
        .zip(&f_test.p)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let test_m = Metrics::compute(&q_test.p, &test_labels, thr);
    let val_m = Metrics::compute(&q_val.p, &val_labels, thr);
    let stress_m = Metrics::compute(&q_stress.p, &val_labels, thr);
    let pooled: Vec<f64> = q_val.p.iter().chain(&q_stress.p).copied().collect();
    let pooled_labels: Vec<u8> = val_labels.iter().chain(&val_labels).copied().collect();

    let mut out: ModelCard = card.clone();
    out.name = name.clone();
    out.description = format!(
        "{} Static INT8 copy (QDQ: per-channel symmetric INT8 weights, uint8 activations) of `{}`.",
        card.description, card.name
    );
    out.precision = Precision::Int8;
    out.onnx.file = format!("{name}.onnx");
    out.onnx.sha256 = crate::registry::sha256_hex(&bytes);
    out.onnx.bytes = bytes.len() as u64;
    out.onnx.weight_storage = crate::onnx::WeightStorage::Fp32;
    out.metrics = CardMetrics {
        test: Some(test_m.clone()),
        validation: Some(val_m),
        validation_stressed: Some(stress_m),
    };
    out.operating_curve = Some(
        OperatingCurve::from_roc(
            format!(
                "validation, clean and stressed together ({} + {} images), INT8",
                q_val.p.len(),
                q_stress.p.len()
            ),
            pooled.len() as u64,
            &roc_curve(&pooled, &pooled_labels),
        )
        .thinned(200),
    );
    if let (Some(ood), Some(m)) = (out.ood.as_mut(), loaded.ood.as_ref()) {
        // The FP32 variant's density model, its acceptance re-measured on this copy's
        // embeddings (the threshold is the FP32 one).
        let acc = |e: &[Vec<f32>]| {
            e.iter().filter(|x| m.score(x) <= m.threshold).count() as f64 / e.len().max(1) as f64
        };
        ood.test_acceptance = Some(acc(&q_test.embeddings));
        ood.validation_acceptance = acc(&q_val.embeddings);
        ood.validation_stressed_acceptance = acc(&q_stress.embeddings);
        ood.ood_set_refused = None;
        ood.ood_set = None;
    }
    out.quantization = Some(QuantizationInfo {
        scheme: "QDQ static INT8 by cxr's ONNX writer: every convolution and the classifier take per-output-channel symmetric INT8 weights (scale max|w|/127) and uint8 asymmetric activations on their inputs and convolution outputs; the batch norm that directly follows a convolution (norm0, each dense layer's norm2) is folded into it (INT32 bias) and its ReLU output is the quantised tensor, so the two convolutions of a dense layer run back to back in INT8; the other batch norms (before a concatenation's ReLU), pooling, concatenation and the CAM stay float".into(),
        calibration_method: "min-max of each quantised tensor over the calibration images (range widened to hold 0)".into(),
        calibration_set: format!(
            "{} validation images (every {step}th of the {} by patient; never test images)",
            calib.len(),
            val_imgs.len()
        ),
        source_model: card.name.clone(),
        source_sha256: card.onnx.sha256.clone(),
        test_label_agreement: agree,
        test_max_abs_probability_diff: max_diff,
    });
    let dir = card_path.parent().unwrap_or(Path::new("."));
    super::write_atomic(&dir.join(&out.onnx.file), &bytes)?;
    let scores = super::TestScores::new(&out, &data_dir.join("test"), &test, &q_test.p);
    super::write_atomic(
        &dir.join(format!("{name}.test-scores.json")),
        (serde_json::to_string_pretty(&scores)? + "\n").as_bytes(),
    )?;
    super::write_atomic(
        &dir.join(format!("{name}.json")),
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )?;
    crate::registry::load_card(&dir.join(format!("{name}.json")))?;
    let fp = card.metrics.test.as_ref();
    Ok(format!(
        "{name}: test accuracy {:.4} (FP32 {:.4}), label agreement {:.4}, max |Δp| {:.4}; {} bytes",
        test_m.accuracy,
        fp.map_or(f64::NAN, |m| m.accuracy),
        agree,
        max_diff,
        bytes.len()
    ))
}
