//! Temperature scaling and operating points: what turns a model's logits into the
//! probability and the label that the server answers.
//!
//! * **Temperature** (Guo et al., 2017): `P = softmax(logits / T)`, one scalar fitted on
//!   the validation split by minimising the negative log-likelihood. It changes no
//!   ranking (AUC, ROC) and no label at a matching threshold; it makes the
//!   confidence mean what it says.
//! * **Operating curve**: the validation ROC stored in the card, so that a caller can
//!   ask for `sensitivity:0.95` or `specificity:0.90` and get the threshold that
//!   reached that target on validation.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::RocPoint;

/// The two class probabilities served for `logits`, given the ONNX file's own
/// `probabilities` output and the card's temperature. Without a temperature (or at
/// `T = 1`) the file's output is served as it is, bit for bit; otherwise
/// `softmax(logits / T)` in f64. The trainer measures cards with this same function.
pub fn served_probabilities(logits: [f32; 2], probabilities: [f32; 2], t: Option<f64>) -> [f32; 2] {
    match t {
        None | Some(1.0) => probabilities,
        Some(t) => {
            let d = (f64::from(logits[1]) - f64::from(logits[0])) / t;
            let p1 = sigmoid(d);
            let p0 = sigmoid(-d);
            [p0 as f32, p1 as f32]
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Mean negative log-likelihood of `labels` (1 = PNEUMONIA) under
/// `softmax(logits / t)`, computed stably from the logit difference.
pub fn nll(logits: &[[f32; 2]], labels: &[u8], t: f64) -> f64 {
    assert_eq!(logits.len(), labels.len(), "one logit pair per label");
    if logits.is_empty() {
        return 0.0;
    }
    let sum: f64 = logits
        .iter()
        .zip(labels)
        .map(|(l, &y)| {
            let d = (f64::from(l[1]) - f64::from(l[0])) / t;
            // -log sigmoid(±d) = softplus(∓d)
            let z = if y == 1 { -d } else { d };
            softplus(z)
        })
        .sum();
    sum / logits.len() as f64
}

fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// The temperature in [0.05, 20] that minimises [`nll`] on (`logits`, `labels`):
/// golden-section search on log T (the NLL is unimodal in log T for a fixed set of
/// logits). Returns 1 for an empty set.
pub fn fit_temperature(logits: &[[f32; 2]], labels: &[u8]) -> f64 {
    if logits.is_empty() {
        return 1.0;
    }
    let f = |log_t: f64| nll(logits, labels, log_t.exp());
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - g * (b - a);
    let mut d = a + g * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..100 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// How a model card's probabilities are calibrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Calibration {
    /// `P = softmax(logits / temperature)`; the server applies it.
    pub temperature: f64,
    /// How it was fitted.
    pub method: String,
    /// Validation NLL at T = 1.
    pub validation_nll_before: f64,
    /// Validation NLL at the fitted temperature.
    pub validation_nll_after: f64,
    /// Test expected calibration error (10 bins) of the uncalibrated probabilities, at
    /// the same decisions.
    #[serde(default)]
    pub test_ece_before: Option<f64>,
    /// Test expected calibration error of the served (calibrated) probabilities.
    #[serde(default)]
    pub test_ece_after: Option<f64>,
}

/// The validation ROC a card stores for operating-point requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OperatingCurve {
    /// Which images it was measured on.
    pub source: String,
    /// How many images.
    pub n: u64,
    /// Points from the strictest threshold to the loosest (served, calibrated
    /// probabilities; `P(PNEUMONIA) >= threshold` is positive). Every point where the
    /// curve turns is kept, so each target gets the threshold it would get from the
    /// full curve.
    pub points: Vec<RocPoint>,
}

/// What the caller wants the operating point to reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At least this sensitivity (recall of PNEUMONIA) on validation.
    Sensitivity(f64),
    /// At least this specificity (recall of NORMAL) on validation.
    Specificity(f64),
}

impl std::str::FromStr for Target {
    type Err = crate::eval::ParseError;
    fn from_str(s: &str) -> Result<Self, crate::eval::ParseError> {
        let (kind, v) = s.split_once(':').ok_or_else(|| {
            format!("operating point `{s}`: use sensitivity:<0..1> or specificity:<0..1>")
        })?;
        let v: f64 = v
            .parse()
            .ok()
            .filter(|v: &f64| *v > 0.0 && *v <= 1.0)
            .ok_or_else(|| format!("operating point `{s}`: the target must lie in (0, 1]"))?;
        match kind {
            "sensitivity" => Ok(Self::Sensitivity(v)),
            "specificity" => Ok(Self::Specificity(v)),
            _ => Err(crate::eval::ParseError(format!(
                "operating point `{s}`: use sensitivity:<0..1> or specificity:<0..1>"
            ))),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sensitivity(v) => write!(f, "sensitivity:{v}"),
            Self::Specificity(v) => write!(f, "specificity:{v}"),
        }
    }
}

impl OperatingCurve {
    /// Stores `roc` (as [`super::roc_curve`] returns it), keeping the points where
    /// it turns: the last point of each vertical run (highest sensitivity at that
    /// false-positive rate) and the first of each horizontal run (lowest
    /// false-positive rate at that sensitivity), plus both ends. No target's answer
    /// changes by dropping the others.
    pub fn from_roc(source: impl Into<String>, n: u64, roc: &[RocPoint]) -> Self {
        let mut points: Vec<RocPoint> = Vec::new();
        for (i, p) in roc.iter().enumerate() {
            let keep =
                i == 0 || i + 1 == roc.len() || roc[i + 1].fpr > p.fpr || roc[i - 1].tpr < p.tpr;
            if keep && p.threshold.is_finite() {
                points.push(*p);
            }
        }
        Self {
            source: source.into(),
            n,
            points,
        }
    }

    /// Keeps at most about `2 * levels` points: for each sensitivity level `j / levels`
    /// the point a sensitivity target of that level picks, and for each specificity
    /// level the point a specificity target of that level picks. Targets on that grid
    /// get exactly the full curve's answer; a target between two levels gets the
    /// answer of the next level up (it still reaches the target on validation).
    pub fn thinned(mut self, levels: u32) -> Self {
        let full = self.clone();
        let mut keep = vec![false; full.points.len()];
        let index = |p: &RocPoint| full.points.iter().position(|q| q == p);
        for j in 0..=levels {
            let v = f64::from(j) / f64::from(levels);
            for t in [Target::Sensitivity(v), Target::Specificity(v)] {
                if v > 0.0
                    && let Some(i) = full.threshold_for(t).as_ref().and_then(index)
                {
                    keep[i] = true;
                }
            }
        }
        if let Some(k) = keep.first_mut() {
            *k = true;
        }
        if let Some(k) = keep.last_mut() {
            *k = true;
        }
        self.points = full
            .points
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| *p)
            .collect();
        self
    }

    /// The threshold that reaches `target` on this curve: for a sensitivity, the
    /// highest threshold whose sensitivity is at least the target (the fewest false
    /// alarms that still catch that share); for a specificity, the lowest threshold
    /// whose specificity is at least the target (the most pneumonias caught without
    /// raising more false alarms than that). `None` when no point reaches it.
    pub fn threshold_for(&self, target: Target) -> Option<RocPoint> {
        // Rounding guard: 0.95 of 389 images is a ratio that may sit a hair below.
        let eps = 1e-9;
        match target {
            Target::Sensitivity(s) => self.points.iter().find(|p| p.tpr + eps >= s).copied(),
            Target::Specificity(s) => self
                .points
                .iter()
                .rev()
                .find(|p| 1.0 - p.fpr + eps >= s)
                .copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::roc_curve;

    #[test]
    fn temperature_one_serves_the_file_output_bit_for_bit() {
        let p = [0.25f32, 0.75];
        assert_eq!(served_probabilities([0.0, 1.0986], p, None), p);
        assert_eq!(served_probabilities([0.0, 1.0986], p, Some(1.0)), p);
        // T = 2 halves the logit difference: sigmoid(2 / 2) by hand.
        let q = served_probabilities([1.0, 3.0], p, Some(2.0));
        let want = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((f64::from(q[1]) - want).abs() < 1e-7, "{q:?}");
        assert!((f64::from(q[0]) - (1.0 - want)).abs() < 1e-7);
        // Huge logits neither overflow nor NaN.
        let r = served_probabilities([-500.0, 500.0], p, Some(0.5));
        assert_eq!(r, [0.0, 1.0]);
    }

    #[test]
    fn nll_by_hand() {
        // d = 0 → -ln 0.5 for either label.
        assert!((nll(&[[0.0, 0.0]], &[1], 1.0) - 2f64.ln()).abs() < 1e-12);
        // d = 2, label 1, T = 2 → -ln sigmoid(1).
        let want = -(1.0 / (1.0 + (-1.0f64).exp())).ln();
        assert!((nll(&[[0.0, 2.0]], &[1], 2.0) - want).abs() < 1e-12);
    }

    #[test]
    fn fitted_temperature_recovers_the_one_that_made_the_labels() {
        // Logit differences d_i, labels drawn so that P(y=1) = sigmoid(d_i / 3): the
        // expected-NLL minimiser is T = 3. Use exact expected counts: for each d, 1000
        // copies split by that probability.
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for k in -20..=20 {
            let d = f64::from(k) * 0.5;
            let p = 1.0 / (1.0 + (-d / 3.0).exp());
            let pos = (p * 1000.0).round() as usize;
            for i in 0..1000 {
                logits.push([0.0, d as f32]);
                labels.push(u8::from(i < pos));
            }
        }
        let t = fit_temperature(&logits, &labels);
        assert!((t - 3.0).abs() < 0.02, "fitted {t}");
        // And it is a minimum: both neighbours are worse.
        let at = nll(&logits, &labels, t);
        assert!(nll(&logits, &labels, t * 1.1) > at && nll(&logits, &labels, t / 1.1) > at);
    }

    #[test]
    fn operating_points_on_a_known_curve() {
        // 5 positives, 5 negatives; scores by hand.
        let s = [0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3, 0.2, 0.1];
        let l = [1, 1, 0, 1, 1, 0, 1, 0, 0, 0];
        let roc = roc_curve(&s, &l);
        let c = OperatingCurve::from_roc("validation", 10, &roc);
        // sensitivity >= 0.8 first at 0.6 (4 of 5 positives, 1 false alarm).
        let p = c.threshold_for(Target::Sensitivity(0.8)).unwrap();
        assert_eq!((p.threshold, p.tpr, p.fpr), (0.6, 0.8, 0.2));
        // sensitivity 1.0 needs 0.4 (2 false alarms).
        assert_eq!(
            c.threshold_for(Target::Sensitivity(1.0)).unwrap().threshold,
            0.4
        );
        // specificity >= 0.8 (at most 1 false alarm): the loosest such threshold is 0.6.
        assert_eq!(
            c.threshold_for(Target::Specificity(0.8)).unwrap().threshold,
            0.6
        );
        // specificity 1.0: no false alarm, loosest is 0.9.
        assert_eq!(
            c.threshold_for(Target::Specificity(1.0)).unwrap().threshold,
            0.9
        );
        // Dropped points change no answer: the full curve gives the same thresholds.
        let full = OperatingCurve {
            source: String::new(),
            n: 10,
            points: roc
                .iter()
                .copied()
                .filter(|p| p.threshold.is_finite())
                .collect(),
        };
        assert!(c.points.len() < full.points.len());
        // Thinned to a 20-level grid: grid targets keep the full curve's answer, and an
        // off-grid target still reaches its target.
        let thin = c.clone().thinned(20);
        for k in 1..=20 {
            let v = f64::from(k) / 20.0;
            for t in [Target::Sensitivity(v), Target::Specificity(v)] {
                assert_eq!(thin.threshold_for(t), full.threshold_for(t), "{t}");
            }
        }
        let p = thin.threshold_for(Target::Sensitivity(0.61)).unwrap();
        assert!(p.tpr >= 0.61);
        for k in 1..=20 {
            let v = f64::from(k) / 20.0;
            for t in [Target::Sensitivity(v), Target::Specificity(v)] {
                assert_eq!(c.threshold_for(t), full.threshold_for(t), "{t}");
            }
        }
    }

    #[test]
    fn unreachable_target_is_none_and_targets_parse() {
        // Every negative outscores... a curve without a point at specificity 1.
        let s = [0.9, 0.8];
        let l = [0, 1];
        let c = OperatingCurve::from_roc("v", 2, &roc_curve(&s, &l));
        assert_eq!(c.threshold_for(Target::Specificity(1.0)), None);
        assert_eq!(
            "sensitivity:0.95".parse::<Target>(),
            Ok(Target::Sensitivity(0.95))
        );
        assert_eq!(
            "specificity:0.9".parse::<Target>(),
            Ok(Target::Specificity(0.9))
        );
        assert!("recall:0.9".parse::<Target>().is_err());
        assert!("sensitivity:1.5".parse::<Target>().is_err());
        assert!("sensitivity".parse::<Target>().is_err());
    }
}
