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
use crate::model::int8::{Precision, QuantizationInfo};
use crate::registry::{CardMetrics, ModelCard};
use crate::train::checkpoint::write_atomic;

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

/// The INT8 copy's card beside the FP32 card `card_path` of the variant `name`.
pub fn card_path(card_path: &Path, name: &str) -> std::path::PathBuf {
    card_path.with_file_name(format!("{name}-int8.json"))
}

/// Makes, measures and writes `<name>-int8.onnx` and its card beside `card_path`;
/// returns a one-line summary.
pub fn quantize_card(
    card_path: &Path,
    data_dir: &Path,
    ort_lib: &Path,
    val_fraction: f64,
) -> anyhow::Result<String> {
    let loaded = crate::registry::load_card(card_path)?;
    let card = &loaded.card;
    if card.precision != Precision::Fp32 {
        anyhow::bail!("{} is already {}", card.name, card.precision.as_str());
    }
    let (pre, mut fp32) = super::measuring_session(&loaded, ort_lib)?;
    let name = format!("{}-int8", card.name);
    let images = Images::load(card, data_dir, val_fraction, &pre)?;
    let (bytes, calibration_set) = make_int8(&loaded, &name, &pre, &images.val, ort_lib)?;
    let mut q = crate::inference::CpuModel::load(ort_lib, &bytes)?;
    let m = Measured::new(card, &mut q, &mut fp32, &pre, &images)?;
    let out = int8_card(
        &loaded,
        &name,
        &bytes,
        &m,
        &images.val_labels,
        calibration_set,
    );
    let dir = card_path.parent().unwrap_or(Path::new("."));
    write_atomic(&dir.join(&out.onnx.file), &bytes)?;
    let scores = super::TestScores::new(
        &out,
        &data_dir.join("test"),
        &images.test_samples,
        &m.test.p,
    );
    write_atomic(
        &dir.join(format!("{name}.test-scores.json")),
        (serde_json::to_string_pretty(&scores)? + "\n").as_bytes(),
    )?;
    write_atomic(
        &dir.join(format!("{name}.json")),
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )?;
    crate::registry::load_card(&dir.join(format!("{name}.json")))?;
    let fp = card.metrics.test.as_ref();
    Ok(format!(
        "{name}: test accuracy {:.4} (FP32 {:.4}), label agreement {:.4}, max |Δp| {:.4}; {} bytes",
        m.test_metrics.accuracy,
        fp.map_or(f64::NAN, |m| m.accuracy),
        m.agreement,
        m.max_diff,
        bytes.len()
    ))
}

/// The images an INT8 copy is calibrated and measured on, resized to its input.
struct Images {
    /// The run's validation split (by patient, checked against the card).
    val: Vec<GrayImage>,
    val_labels: Vec<u8>,
    /// The validation images under the stress perturbations.
    stressed: Vec<GrayImage>,
    test: Vec<GrayImage>,
    test_labels: Vec<u8>,
    test_samples: Vec<data::Sample>,
}

impl Images {
    fn load(
        card: &ModelCard,
        data_dir: &Path,
        val_fraction: f64,
        pre: &Preprocessor,
    ) -> anyhow::Result<Self> {
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
        let (val_imgs, bad) = data::load_resized(&val, pre);
        super::report_bad(&bad, val.len())?;
        let (test_imgs, bad) = data::load_resized(&test, pre);
        super::report_bad(&bad, test.len())?;
        let stressed: Vec<GrayImage> = val_imgs
            .iter()
            .enumerate()
            .map(|(i, g)| stress::perturb(g, stress::STRESS_SEED, i as u64))
            .collect();

        Ok(Self {
            val_labels: val.iter().map(|x| x.label).collect(),
            test_labels: test.iter().map(|x| x.label).collect(),
            val: val_imgs,
            stressed,
            test: test_imgs,
            test_samples: test,
        })
    }
}

/// The INT8 file (calibrated min–max on every k-th validation image) and the
/// calibration set in words.
fn make_int8(
    loaded: &crate::registry::LoadedModel,
    name: &str,
    pre: &Preprocessor,
    val_imgs: &[GrayImage],
    ort_lib: &Path,
) -> anyhow::Result<(Vec<u8>, String)> {
    let card = &loaded.card;
    let weights = crate::model::onnx::read_weights(&loaded.onnx_bytes)?;
    let opts = int8_options(loaded, name)?;
    let config = &card.architecture.config;
    let step = (val_imgs.len() / CALIBRATION_IMAGES).max(1);
    let calib: Vec<&GrayImage> = val_imgs
        .iter()
        .step_by(step)
        .take(CALIBRATION_IMAGES)
        .collect();
    let calib_bytes = crate::model::int8::calibration_graph(config, &weights, &opts)
        .map_err(|e| super::TrainError::Graph(e.to_string()))?;
    let mut cs = crate::inference::CpuModel::load(ort_lib, &calib_bytes)?;
    let s = pre.size() as usize;
    let ranges = crate::model::int8::calibrate(
        |b, n, s| cs.run_named(b, n, s),
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
    .map_err(|e| super::TrainError::Graph(e.to_string()))?;
    drop(cs);
    let bytes = crate::model::int8::int8_graph(config, &weights, &opts, ranges)
        .map_err(|e| super::TrainError::Graph(e.to_string()))?;
    let set = format!(
        "{} validation images (every {step}th of the {} by patient; never test images)",
        calib.len(),
        val_imgs.len()
    );
    Ok((bytes, set))
}

/// The FP32 file's write options, renamed and marked INT8.
fn int8_options(
    loaded: &crate::registry::LoadedModel,
    name: &str,
) -> anyhow::Result<crate::model::onnx::WriteOptions> {
    let model = {
        use prost::Message;
        crate::model::onnx::proto::ModelProto::decode(&loaded.onnx_bytes[..])?
    };
    let mut metadata: Vec<(String, String)> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    for (k, v) in metadata.iter_mut() {
        if k == "cxr.name" {
            *v = name.to_string();
        }
    }
    metadata.push(("cxr.precision".into(), "int8".into()));
    Ok(crate::model::onnx::WriteOptions {
        input_size: loaded.card.input_size,
        storage: crate::model::onnx::WeightStorage::Fp32,
        metadata,
    })
}

/// The INT8 copy's answers as served, against the FP32 file's on the test split.
struct Measured {
    test: Answers,
    val: Answers,
    stressed: Answers,
    /// Share of test images answered with the FP32 label.
    agreement: f64,
    /// Largest |P(PNEUMONIA) INT8 − FP32| on test.
    max_diff: f64,
    test_metrics: Metrics,
    val_metrics: Metrics,
    stressed_metrics: Metrics,
}

impl Measured {
    fn new(
        card: &ModelCard,
        q: &mut crate::inference::CpuModel,
        fp32: &mut crate::inference::CpuModel,
        pre: &Preprocessor,
        images: &Images,
    ) -> anyhow::Result<Self> {
        let t = card.temperature();
        let test = answers(q, pre, &images.test, t)?;
        let f_test = answers(fp32, pre, &images.test, t)?;
        let val = answers(q, pre, &images.val, t)?;
        let stressed = answers(q, pre, &images.stressed, t)?;
        let thr = card.threshold;
        let agreement = test
            .p
            .iter()
            .zip(&f_test.p)
            .filter(|(a, b)| (**a >= thr) == (**b >= thr))
            .count() as f64
            / images.test.len().max(1) as f64;
        let max_diff = test
            .p
            .iter()
            .zip(&f_test.p)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        Ok(Self {
            test_metrics: Metrics::compute(&test.p, &images.test_labels, thr),
            val_metrics: Metrics::compute(&val.p, &images.val_labels, thr),
            stressed_metrics: Metrics::compute(&stressed.p, &images.val_labels, thr),
            test,
            val,
            stressed,
            agreement,
            max_diff,
        })
    }
}

/// The INT8 copy's card: the FP32 card with this file, its own measurements, its OOD
/// acceptance re-measured, and how it was quantised.
fn int8_card(
    loaded: &crate::registry::LoadedModel,
    name: &str,
    bytes: &[u8],
    m: &Measured,
    val_labels: &[u8],
    calibration_set: String,
) -> ModelCard {
    let card = &loaded.card;
    let pooled: Vec<f64> = m.val.p.iter().chain(&m.stressed.p).copied().collect();
    let pooled_labels: Vec<u8> = val_labels.iter().chain(val_labels).copied().collect();
    let mut out: ModelCard = card.clone();
    out.name = name.to_string();
    out.description = format!(
        "{} Static INT8 copy (QDQ: per-channel symmetric INT8 weights, uint8 activations) of `{}`.",
        card.description, card.name
    );
    out.precision = Precision::Int8;
    out.onnx.file = format!("{name}.onnx");
    out.onnx.sha256 = crate::digest::sha256_hex(bytes);
    out.onnx.bytes = bytes.len() as u64;
    out.onnx.weight_storage = crate::model::onnx::WeightStorage::Fp32;
    out.metrics = CardMetrics {
        test: Some(m.test_metrics.clone()),
        validation: Some(m.val_metrics.clone()),
        validation_stressed: Some(m.stressed_metrics.clone()),
    };
    out.operating_curve = Some(
        OperatingCurve::from_roc(
            format!(
                "validation, clean and stressed together ({} + {} images), INT8",
                m.val.p.len(),
                m.stressed.p.len()
            ),
            pooled.len() as u64,
            &roc_curve(&pooled, &pooled_labels),
        )
        .thinned(200),
    );
    if let (Some(ood), Some(model)) = (out.ood.as_mut(), loaded.ood.as_ref()) {
        // The FP32 variant's density model, its acceptance re-measured on this copy's
        // embeddings (the threshold is the FP32 one).
        let acc = |e: &[Vec<f32>]| {
            e.iter()
                .filter(|x| model.score(x) <= model.threshold)
                .count() as f64
                / e.len().max(1) as f64
        };
        ood.test_acceptance = Some(acc(&m.test.embeddings));
        ood.validation_acceptance = acc(&m.val.embeddings);
        ood.validation_stressed_acceptance = acc(&m.stressed.embeddings);
        ood.ood_set_refused = None;
        ood.ood_set = None;
    }
    out.quantization = Some(QuantizationInfo {
        scheme: "QDQ static INT8 by cxr's ONNX writer: every convolution and the classifier take per-output-channel symmetric INT8 weights (scale max|w|/127) and uint8 asymmetric activations on their inputs and convolution outputs; the batch norm that directly follows a convolution (norm0, each dense layer's norm2) is folded into it (INT32 bias) and its ReLU output is the quantised tensor, so the two convolutions of a dense layer run back to back in INT8; the other batch norms (before a concatenation's ReLU), pooling, concatenation and the CAM stay float".into(),
        calibration_method: "min-max of each quantised tensor over the calibration images (range widened to hold 0)".into(),
        calibration_set,
        source_model: card.name.clone(),
        source_sha256: card.onnx.sha256.clone(),
        test_label_agreement: m.agreement,
        test_max_abs_probability_diff: m.max_diff,
    });
    out
}
