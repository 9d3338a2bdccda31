//! The decision threshold, chosen on validation scores by a stated rule, and the
//! validation loss the best epoch is chosen by.

use super::roc_curve;

/// How the decision threshold is chosen, always on the validation split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdRule {
    /// A fixed value.
    Fixed(f64),
    /// Maximise Youden's J (sensitivity + specificity − 1); the middle of the best
    /// plateau.
    Youden,
    /// The highest threshold whose validation sensitivity is at least this.
    MinSensitivity(f64),
}

impl std::str::FromStr for ThresholdRule {
    type Err = crate::eval::ParseError;
    fn from_str(s: &str) -> Result<Self, crate::eval::ParseError> {
        let prob = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p < 1.0)
                .ok_or_else(|| {
                    crate::eval::ParseError(format!("`{v}` is not a probability in (0, 1)"))
                })
        };
        match s {
            "youden" => Ok(Self::Youden),
            _ => match s.strip_prefix("sensitivity:") {
                Some(v) => prob(v).map(Self::MinSensitivity),
                None => prob(s).map(Self::Fixed).map_err(|e| {
                    crate::eval::ParseError(format!("{e}; use 0.5, youden or sensitivity:0.95"))
                }),
            },
        }
    }
}

impl std::fmt::Display for ThresholdRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(v) => write!(f, "{v}"),
            Self::Youden => write!(f, "youden"),
            Self::MinSensitivity(v) => write!(f, "sensitivity:{v}"),
        }
    }
}

/// Chooses the threshold on validation scores (P(PNEUMONIA)) by `rule`.
pub fn choose_threshold(rule: ThresholdRule, scores: &[f64], labels: &[u8]) -> f64 {
    let roc = roc_curve(scores, labels);
    if roc.len() < 2 {
        return 0.5;
    }
    // Candidate thresholds: each distinct score; point i means "score >= roc[i].threshold".
    match rule {
        ThresholdRule::Fixed(t) => t,
        ThresholdRule::Youden => {
            let best = roc
                .iter()
                .skip(1)
                .map(|p| p.tpr - p.fpr)
                .fold(f64::MIN, f64::max);
            let plateau: Vec<usize> = (1..roc.len())
                .filter(|&i| roc[i].tpr - roc[i].fpr >= best - 1e-12)
                .collect();
            // Every threshold in (next lower score, roc[i].threshold] gives point i; take
            // the middle of the whole plateau's interval.
            let hi = roc[plateau[0]].threshold;
            let last = *plateau.last().expect("non-empty plateau");
            let lo = roc.get(last + 1).map_or(0.0, |p| p.threshold);
            ((hi + lo) / 2.0).clamp(0.01, 0.99)
        }
        ThresholdRule::MinSensitivity(s) => roc
            .iter()
            .skip(1)
            .find(|p| p.tpr >= s)
            .map_or(0.5, |p| p.threshold)
            .clamp(0.01, 0.99),
    }
}

/// Mean negative log-likelihood of binary `labels` under P(PNEUMONIA) `scores`
/// (the validation loss an epoch is chosen by).
pub fn mean_log_loss(scores: &[f64], labels: &[u8]) -> f64 {
    let eps = 1e-7;
    scores
        .iter()
        .zip(labels)
        .map(|(&p, &l)| -(if l == 1 { p } else { 1.0 - p }).max(eps).ln())
        .sum::<f64>()
        / scores.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_rules() {
        let s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9];
        let l = [0, 0, 0, 1, 1, 1];
        // Perfect separation between 0.3 and 0.6: Youden picks the middle.
        assert!((choose_threshold(ThresholdRule::Youden, &s, &l) - 0.45).abs() < 1e-9);
        assert_eq!(choose_threshold(ThresholdRule::Fixed(0.5), &s, &l), 0.5);
        assert_eq!(
            choose_threshold(ThresholdRule::MinSensitivity(0.6), &s, &l),
            0.7
        );
    }

    #[test]
    fn log_loss_of_confident_answers() {
        assert!(mean_log_loss(&[1.0, 0.0], &[1, 0]) < 1e-6);
        assert!((mean_log_loss(&[0.5, 0.5], &[1, 0]) - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
