//! What a site's validation measures, with its uncertainty: Wilson score intervals
//! for proportions (sensitivity, specificity, accuracy, a share refused), percentile
//! bootstrap intervals for AUC and ECE (resampling images with replacement, within
//! each class so that every resample keeps the site's class counts), the
//! reliability curve, and quantiles of a score.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{auc, expected_calibration_error};
use crate::model::arch::SplitMix64;

/// A point estimate and its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Interval {
    /// The estimate.
    pub value: f64,
    /// Lower bound of the 95 % interval.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// `k` of `n` with its 95 % Wilson score interval (null for `n = 0`). Wilson's
/// interval, unlike the normal approximation, stays within [0, 1] and keeps its
/// coverage near 0 and 1, where a good classifier's rates lie.
pub fn wilson(k: u64, n: u64) -> Option<Interval> {
    if n == 0 {
        return None;
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    Some(Interval {
        value: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    })
}

/// Uniform in `0..n` (n > 0) from the seeded generator (the same resamples on every
/// run).
fn below(rng: &mut SplitMix64, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// The `q` quantile of sorted `v` (linear between order statistics).
pub fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// `stat` on `scores`/`labels` with a 95 % percentile bootstrap interval over
/// `reps` stratified resamples (seeded). Null when `stat` is undefined on the data.
pub fn bootstrap(
    scores: &[f64],
    labels: &[u8],
    reps: usize,
    seed: u64,
    stat: impl Fn(&[f64], &[u8]) -> Option<f64>,
) -> Option<Interval> {
    let value = stat(scores, labels)?;
    let pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 1).collect();
    let neg: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != 1).collect();
    let mut rng = SplitMix64(seed);
    let mut stats = Vec::with_capacity(reps);
    let (mut s, mut l) = (
        Vec::with_capacity(scores.len()),
        Vec::with_capacity(scores.len()),
    );
    for _ in 0..reps {
        s.clear();
        l.clear();
        for class in [&pos, &neg] {
            for _ in 0..class.len() {
                let i = class[below(&mut rng, class.len())];
                s.push(scores[i]);
                l.push(labels[i]);
            }
        }
        if let Some(v) = stat(&s, &l) {
            stats.push(v);
        }
    }
    if stats.is_empty() {
        return Some(Interval {
            value,
            low: value,
            high: value,
        });
    }
    stats.sort_by(f64::total_cmp);
    Some(Interval {
        value,
        low: quantile_sorted(&stats, 0.025),
        high: quantile_sorted(&stats, 0.975),
    })
}

/// AUC with its bootstrap interval.
pub fn auc_interval(scores: &[f64], labels: &[u8], reps: usize, seed: u64) -> Option<Interval> {
    bootstrap(scores, labels, reps, seed, auc)
}

/// ECE (10 bins, at `threshold`) with its bootstrap interval.
pub fn ece_interval(
    scores: &[f64],
    labels: &[u8],
    threshold: f64,
    reps: usize,
    seed: u64,
) -> Option<Interval> {
    if scores.is_empty() {
        return None;
    }
    bootstrap(scores, labels, reps, seed, |s, l| {
        Some(expected_calibration_error(s, l, threshold, 10))
    })
}

/// One bin of a reliability curve: images whose P(PNEUMONIA) fell in
/// `[low, high)`, their mean predicted probability and the share that were
/// PNEUMONIA.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReliabilityBin {
    /// Lower edge of the bin.
    pub low: f64,
    /// Upper edge.
    pub high: f64,
    /// Images in it.
    pub n: u64,
    /// Their mean P(PNEUMONIA).
    pub predicted: f64,
    /// The share of them labelled PNEUMONIA.
    pub observed: f64,
}

/// The reliability curve of P(PNEUMONIA) in `bins` equal bins on [0, 1] (empty
/// bins left out).
pub fn reliability(scores: &[f64], labels: &[u8], bins: usize) -> Vec<ReliabilityBin> {
    let mut n = vec![0u64; bins];
    let mut p = vec![0f64; bins];
    let mut y = vec![0u64; bins];
    for (&s, &l) in scores.iter().zip(labels) {
        let b = ((s * bins as f64) as usize).min(bins - 1);
        n[b] += 1;
        p[b] += s;
        y[b] += u64::from(l == 1);
    }
    (0..bins)
        .filter(|&b| n[b] > 0)
        .map(|b| ReliabilityBin {
            low: b as f64 / bins as f64,
            high: (b + 1) as f64 / bins as f64,
            n: n[b],
            predicted: p[b] / n[b] as f64,
            observed: y[b] as f64 / n[b] as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_hand_computed_interval() {
        // 8 of 10: p = 0.8, z = 1.96; centre = (0.8 + 0.19208) / 1.38415 = 0.716743,
        // half = 1.96 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.226576.
        let w = wilson(8, 10).unwrap();
        assert!((w.value - 0.8).abs() < 1e-12);
        assert!((w.low - 0.490_16).abs() < 1e-4, "{w:?}");
        assert!((w.high - 0.943_32).abs() < 1e-4, "{w:?}");
        // 10 of 10: the upper bound is 1, the lower 1 / (1 + z²/n) = 0.72246.
        let w = wilson(10, 10).unwrap();
        assert!((w.high - 1.0).abs() < 1e-12);
        assert!((w.low - 0.722_46).abs() < 1e-4, "{w:?}");
        assert!(wilson(0, 0).is_none());
    }

    #[test]
    fn the_bootstrap_interval_holds_the_estimate_and_is_seeded() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.4, 0.55, 0.3, 0.2, 0.1, 0.65];
        let labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
        let a = auc_interval(&scores, &labels, 500, 7).unwrap();
        // 25 pairs; positives 0.4 loses to 0.55 and 0.65, 0.6 loses to 0.65: 22/25.
        assert!((a.value - 0.88).abs() < 1e-12, "{a:?}");
        assert!(
            a.low <= a.value && a.value <= a.high && a.high <= 1.0,
            "{a:?}"
        );
        assert!(a.low < 0.88 && a.low > 0.5, "{a:?}");
        assert_eq!(a, auc_interval(&scores, &labels, 500, 7).unwrap());
        // One class only: no AUC.
        assert!(auc_interval(&scores[..5], &labels[..5], 100, 1).is_none());
    }

    #[test]
    fn reliability_bins_count_and_average() {
        let r = reliability(&[0.05, 0.15, 0.12, 0.95], &[0, 1, 0, 1], 10);
        assert_eq!(r.len(), 3);
        assert_eq!((r[1].n, r[1].observed), (2, 0.5));
        assert!((r[1].predicted - 0.135).abs() < 1e-12);
        assert_eq!(r[2].low, 0.9);
        assert!((quantile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.5).abs() < 1e-12);
    }
}
