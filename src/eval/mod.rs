//! Classification metrics shared by the trainer (model cards) and the tools that
//! check a served model: confusion matrix, accuracy, sensitivity, specificity,
//! precision, F1, ROC curve and AUC, expected calibration error.
//!
//! The positive class is PNEUMONIA (label 1): sensitivity is its recall, specificity
//! the recall of NORMAL.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

crate::message_error!(
    /// Why a target or operating point given as text (`sensitivity:0.95`) is unusable.
    ParseError
);

pub mod calibration;
pub mod site;
pub mod stress;
pub mod threshold;

pub use calibration::{Calibration, OperatingCurve, Target, fit_temperature, served_probabilities};
pub use threshold::{ThresholdRule, choose_threshold, mean_log_loss};

/// Binary confusion matrix, positive = PNEUMONIA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Confusion {
    /// PNEUMONIA predicted PNEUMONIA.
    pub tp: u64,
    /// NORMAL predicted PNEUMONIA.
    pub fp: u64,
    /// NORMAL predicted NORMAL.
    pub tn: u64,
    /// PNEUMONIA predicted NORMAL.
    // `fn` in JSON (`fn` is a Rust keyword); cards written before said `fn_` and still load.
    #[serde(rename = "fn", alias = "fn_")]
    pub fn_: u64,
}

impl Confusion {
    /// Counts predictions `score >= threshold` against `labels` (1 = positive).
    pub fn at_threshold(scores: &[f64], labels: &[u8], threshold: f64) -> Self {
        assert_eq!(scores.len(), labels.len(), "one score per label");
        let mut c = Self::default();
        for (&s, &l) in scores.iter().zip(labels) {
            c.add(l == 1, s >= threshold);
        }
        c
    }

    /// Adds one (truth, prediction) pair.
    pub fn add(&mut self, actual_positive: bool, predicted_positive: bool) {
        match (actual_positive, predicted_positive) {
            (true, true) => self.tp += 1,
            (true, false) => self.fn_ += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
        }
    }

    /// Number of cases.
    pub fn n(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// (tp + tn) / n.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.n())
    }

    /// Recall of PNEUMONIA: tp / (tp + fn).
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Recall of NORMAL: tn / (tn + fp).
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }

    /// Positive predictive value: tp / (tp + fp).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Harmonic mean of precision and sensitivity.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.sensitivity());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

/// 0 when the denominator is 0 (a metric of an empty class is reported as 0, and the
/// confusion matrix beside it shows why).
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One point of a ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RocPoint {
    /// Threshold: scores `>=` it are positive.
    pub threshold: f64,
    /// False positive rate.
    pub fpr: f64,
    /// True positive rate.
    pub tpr: f64,
}

/// ROC curve from the strictest threshold to the loosest, one point per distinct
/// score (tied scores move together, giving a diagonal segment), starting at (0, 0).
/// Empty when either class is absent.
pub fn roc_curve(scores: &[f64], labels: &[u8]) -> Vec<RocPoint> {
    assert_eq!(scores.len(), labels.len(), "one score per label");
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = vec![RocPoint {
        threshold: f64::INFINITY,
        fpr: 0.0,
        tpr: 0.0,
    }];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] == 1 {
                tp += 1.0
            } else {
                fp += 1.0
            }
            i += 1;
        }
        out.push(RocPoint {
            threshold: s,
            fpr: fp / neg,
            tpr: tp / pos,
        });
    }
    out
}

/// Area under the ROC curve (trapezoids; equals the Mann–Whitney probability that a
/// random positive outscores a random negative, ties counting one half). `None` when
/// either class is absent.
pub fn auc(scores: &[f64], labels: &[u8]) -> Option<f64> {
    let roc = roc_curve(scores, labels);
    if roc.is_empty() {
        return None;
    }
    Some(
        roc.windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
            .sum(),
    )
}

/// Expected calibration error of the predicted label's confidence, over `bins` equal
/// bins on [0.5, 1] (binary case): Σ |bin| / n · |accuracy(bin) − confidence(bin)|.
pub fn expected_calibration_error(
    scores: &[f64],
    labels: &[u8],
    threshold: f64,
    bins: usize,
) -> f64 {
    assert_eq!(scores.len(), labels.len(), "one score per label");
    assert!(bins > 0, "at least one bin");
    if scores.is_empty() {
        return 0.0;
    }
    let mut count = vec![0usize; bins];
    let mut correct = vec![0usize; bins];
    let mut conf = vec![0f64; bins];
    for (&s, &l) in scores.iter().zip(labels) {
        let predicted = s >= threshold;
        let c = if predicted { s } else { 1.0 - s };
        // Confidence of a binary prediction lies in [0.5, 1] at threshold 0.5; clamp
        // for other thresholds.
        let b = (((c - 0.5) * 2.0 * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        conf[b] += c;
        if predicted == (l == 1) {
            correct[b] += 1;
        }
    }
    let n = scores.len() as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let k = count[b] as f64;
            k / n * (correct[b] as f64 / k - conf[b] / k).abs()
        })
        .sum()
}

/// Everything a model card reports about a labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Metrics {
    /// Number of images.
    pub n: u64,
    /// Decision threshold on P(PNEUMONIA) the counts were made at.
    pub threshold: f64,
    /// Fraction correct.
    pub accuracy: f64,
    /// Recall of PNEUMONIA.
    pub sensitivity: f64,
    /// Recall of NORMAL.
    pub specificity: f64,
    /// Positive predictive value.
    pub precision: f64,
    /// F1 of PNEUMONIA.
    pub f1: f64,
    /// Area under the ROC curve (null when a class is absent).
    pub auc: Option<f64>,
    /// Expected calibration error (10 bins).
    pub ece: f64,
    /// Confusion matrix.
    pub confusion: Confusion,
}

impl Metrics {
    /// Computes every metric from P(PNEUMONIA) scores and labels (1 = PNEUMONIA).
    pub fn compute(scores: &[f64], labels: &[u8], threshold: f64) -> Self {
        let c = Confusion::at_threshold(scores, labels, threshold);
        Self {
            n: c.n(),
            threshold,
            accuracy: c.accuracy(),
            sensitivity: c.sensitivity(),
            specificity: c.specificity(),
            precision: c.precision(),
            f1: c.f1(),
            auc: auc(scores, labels),
            ece: expected_calibration_error(scores, labels, threshold, 10),
            confusion: c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn confusion_metrics_by_hand() {
        // labels:  1    1    1    0    0    0    0
        // scores: .9   .6   .2   .7   .4   .1   .3   at 0.5: tp=2 fn=1 fp=1 tn=3
        let s = [0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.3];
        let l = [1, 1, 1, 0, 0, 0, 0];
        let m = Metrics::compute(&s, &l, 0.5);
        assert_eq!(
            m.confusion,
            Confusion {
                tp: 2,
                fp: 1,
                tn: 3,
                fn_: 1
            }
        );
        assert!(close(m.accuracy, 5.0 / 7.0));
        assert!(close(m.sensitivity, 2.0 / 3.0));
        assert!(close(m.specificity, 3.0 / 4.0));
        assert!(close(m.precision, 2.0 / 3.0));
        assert!(close(m.f1, 2.0 / 3.0));
        // Pairs (pos, neg) with pos > neg: .9 beats 4, .6 beats 3 (.4 .1 .3), .2 beats 1 → 8/12.
        assert!(close(m.auc.unwrap(), 8.0 / 12.0));
    }

    #[test]
    fn confusion_json_says_fn_and_reads_older_cards() {
        let c = Confusion {
            tp: 4,
            fp: 3,
            tn: 2,
            fn_: 1,
        };
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"tp": 4, "fp": 3, "tn": 2, "fn": 1})
        );
        let old: Confusion =
            serde_json::from_str(r#"{"tp": 4, "fp": 3, "tn": 2, "fn_": 1}"#).unwrap();
        assert_eq!(old, c);
    }

    #[test]
    fn auc_counts_ties_as_half() {
        let s = [0.5, 0.5, 0.5, 0.5];
        let l = [1, 0, 1, 0];
        assert!(close(auc(&s, &l).unwrap(), 0.5));
        let s = [0.8, 0.5, 0.5, 0.2];
        let l = [1, 1, 0, 0];
        // pairs: (.8,.5)=1 (.8,.2)=1 (.5,.5)=.5 (.5,.2)=1 → 3.5/4
        assert!(close(auc(&s, &l).unwrap(), 3.5 / 4.0));
        let roc = roc_curve(&s, &l);
        assert_eq!(roc.len(), 4);
        assert_eq!((roc[2].fpr, roc[2].tpr), (0.5, 1.0));
    }

    #[test]
    fn perfect_and_inverted_rankings() {
        let l = [0, 0, 1, 1];
        assert!(close(auc(&[0.1, 0.2, 0.8, 0.9], &l).unwrap(), 1.0));
        assert!(close(auc(&[0.9, 0.8, 0.2, 0.1], &l).unwrap(), 0.0));
    }

    #[test]
    fn single_class_is_degenerate_not_a_panic() {
        let m = Metrics::compute(&[0.9, 0.2], &[1, 1], 0.5);
        assert_eq!(m.auc, None);
        assert_eq!(m.specificity, 0.0);
        assert!(close(m.sensitivity, 0.5));
        assert!(roc_curve(&[0.3], &[0]).is_empty());
        let empty = Metrics::compute(&[], &[], 0.5);
        assert_eq!(empty.n, 0);
        assert_eq!(empty.accuracy, 0.0);
        assert_eq!(empty.ece, 0.0);
    }

    #[test]
    fn ece_by_hand() {
        // Confidences .9 (correct), .9 (wrong), .6 (correct), .6 (correct).
        // Bin of .9: acc .5 conf .9 → .4 · 2/4; bin of .6: acc 1 conf .6 → .4 · 2/4.
        let s = [0.9, 0.9, 0.4, 0.6];
        let l = [1, 0, 0, 1];
        assert!((expected_calibration_error(&s, &l, 0.5, 10) - 0.4).abs() < 1e-12);
    }
}
