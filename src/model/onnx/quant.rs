//! The numbers of static quantisation: batch norm folded into its convolution,
//! per-channel symmetric INT8 weights, and uint8 activation scales.

use crate::model::arch::{BN_EPS, Weights};

/// Conv weight `conv` (shape `[c, ...]`, no bias) with batch norm `bn` (prefix of its
/// weight, bias, running mean and variance) folded in: per output channel `k`,
/// `w·γ/√(σ²+ε)` and bias `β − μ·γ/√(σ²+ε)`.
pub fn fold_bn(weights: &Weights, conv: &str, bn: &str) -> (Vec<f32>, Vec<f32>) {
    let w = &weights[conv];
    let get = |s: &str| &weights[&format!("{bn}.{s}")].data;
    let (gamma, beta, mean, var) = (
        get("weight"),
        get("bias"),
        get("running_mean"),
        get("running_var"),
    );
    let c = w.shape[0];
    let per = w.data.len() / c.max(1);
    let mut folded = Vec::with_capacity(w.data.len());
    let mut bias = Vec::with_capacity(c);
    for k in 0..c {
        let f = f64::from(gamma[k]) / (f64::from(var[k]) + f64::from(BN_EPS)).sqrt();
        folded.extend(
            w.data[k * per..(k + 1) * per]
                .iter()
                .map(|&v| (f64::from(v) * f) as f32),
        );
        bias.push((f64::from(beta[k]) - f64::from(mean[k]) * f) as f32);
    }
    (folded, bias)
}

/// Per-output-channel symmetric INT8 of a weight whose first axis has `channels`
/// rows: each row's scale is max|w| / 127 (a zero row gets scale 1), values rounded
/// to the nearest step and kept in [-127, 127]. Returns the values and the scales.
pub fn quantize_per_channel(data: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per = data.len() / channels.max(1);
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(channels);
    for row in data.chunks(per.max(1)) {
        let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        scales.push(s);
        q.extend(
            row.iter()
                .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

/// The uint8 asymmetric (scale, zero point) of a range; the range is widened to hold
/// 0 (so that zero, ReLU's floor and the padding, is exact).
pub fn activation_qparams(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    if hi - lo <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}
