//! Static INT8 quantisation of a DenseNet written by our writer: calibration of the
//! activation ranges on real inputs (min–max over the calibration images), then the
//! QDQ graph ([`crate::model::onnx::Quant::Int8`]). `cxr-train quantize` drives it for a
//! shipped model and measures the copy (src/train/quantize.rs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::arch::{DenseNetConfig, Weights};
use crate::model::onnx::{
    OnnxError, Quant, WriteOptions, activation_qparams, write_densenet_quant,
};

/// The numeric precision a model file computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float32 (weights may be stored as float16; compute is float32).
    #[default]
    Fp32,
    /// Static INT8: INT8 weights and activations in the convolutions and classifier.
    Int8,
}

impl Precision {
    /// `fp32` or `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }

    /// Whether this is the default (for serde's `skip_serializing_if`).
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }
}

/// How an INT8 copy was made and how it compares with its source (a card's
/// `quantization`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuantizationInfo {
    /// The scheme, in words.
    pub scheme: String,
    /// Activation calibration method.
    pub calibration_method: String,
    /// The images the ranges were measured on.
    pub calibration_set: String,
    /// The FP32 variant it was made from.
    pub source_model: String,
    /// SHA-256 of the FP32 file.
    pub source_sha256: String,
    /// Share of the test split answered with the FP32 variant's label.
    pub test_label_agreement: f64,
    /// Largest |P(PNEUMONIA) INT8 − FP32| over the test split.
    pub test_max_abs_probability_diff: f64,
}

/// Min–max range of every tensor the calibration graph exposes, over `batches` (each
/// `(rows, [rows, 3, s, s] values)`), run by `run` (batch, rows, side → each named
/// output; a session of the [`Quant::Calibrate`] graph, e.g.
/// `|b, n, s| model.run_named(b, n, s)`); returns each tensor's uint8 (scale, zero
/// point). The runner is an argument: the model definition does not depend on the
/// runtime.
pub fn calibrate<E: std::fmt::Display>(
    mut run: impl FnMut(Vec<f32>, usize, usize) -> Result<Vec<(String, Vec<f32>)>, E>,
    batches: impl IntoIterator<Item = (usize, Vec<f32>)>,
    s: usize,
) -> Result<BTreeMap<String, (f32, u8)>, OnnxError> {
    let mut ranges: BTreeMap<String, (f32, f32)> = BTreeMap::new();
    let standard = [
        crate::model::onnx::LOGITS_NAME,
        crate::model::onnx::PROBABILITIES_NAME,
        crate::model::onnx::CAM_NAME,
    ];
    for (n, batch) in batches {
        // The input's range is the batch's own (the graph input is not an output).
        let (lo, hi) = batch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let r = ranges
            .entry(crate::model::onnx::INPUT_NAME.to_string())
            .or_insert((lo, hi));
        r.0 = r.0.min(lo);
        r.1 = r.1.max(hi);
        for (name, data) in run(batch, n, s).map_err(|e| OnnxError::Calibration(e.to_string()))? {
            if standard.contains(&name.as_str()) {
                continue;
            }
            let (lo, hi) = data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let r = ranges.entry(name).or_insert((lo, hi));
            r.0 = r.0.min(lo);
            r.1 = r.1.max(hi);
        }
    }
    if ranges.is_empty() {
        return Err(OnnxError::Calibration(
            "the calibration graph exposed no tensors".into(),
        ));
    }
    Ok(ranges
        .into_iter()
        .map(|(k, (lo, hi))| (k, activation_qparams(lo, hi)))
        .collect())
}

/// The calibration graph's bytes.
pub fn calibration_graph(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
) -> Result<Vec<u8>, OnnxError> {
    use prost::Message;
    Ok(write_densenet_quant(config, weights, opts, &Quant::Calibrate)?.encode_to_vec())
}

/// The INT8 (QDQ) graph's bytes for `ranges`.
pub fn int8_graph(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
    ranges: BTreeMap<String, (f32, u8)>,
) -> Result<Vec<u8>, OnnxError> {
    use prost::Message;
    Ok(write_densenet_quant(config, weights, opts, &Quant::Int8(ranges))?.encode_to_vec())
}
