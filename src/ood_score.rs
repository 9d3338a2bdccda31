//! Out-of-distribution scoring: how far an image's embedding (the model's globally
//! pooled last-block features) lies from the training images' embeddings.
//!
//! The density model is a class-conditional Gaussian with one shared covariance (Lee
//! et al. 2018, "A simple unified framework for detecting out-of-distribution samples
//! and adversarial attacks") in the leading principal subspace of the training
//! embeddings, plus the energy left outside that subspace (what a photo or a document
//! has and a radiograph does not). With `z` the embedding's coordinates in the
//! subspace (a basis in which the shared covariance is diagonal, variances `λ`),
//! `μ_c` the class means there and `r²` the squared norm outside the subspace:
//!
//! `score = min_c Σ_i (z_i − μ_c,i)² / λ_i / k  +  r² / mean_train(r²)`
//!
//! Both terms are about 1 for a training image. The threshold is chosen on the
//! validation split (so that a stated share of it is accepted) and stored with the
//! model; `cxr-train fit-ood` fits it (src/train/ood.rs).

use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

crate::message_error!(
    /// Why an out-of-distribution model file is unusable.
    OodError
);

/// What the card says of a variant's OOD model (`ood` in `models/<name>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OodCard {
    /// The file beside the card holding the fitted model.
    pub file: String,
    /// Its SHA-256 (checked at load).
    pub sha256: String,
    /// The method, in words.
    pub method: String,
    /// Scores above this are out of distribution.
    pub threshold: f64,
    /// The share of in-distribution validation images the threshold was chosen to
    /// accept.
    pub target_acceptance: f64,
    /// The images the threshold was chosen on.
    pub threshold_source: String,
    /// Share of the validation images (as they are) accepted.
    pub validation_acceptance: f64,
    /// Share of the validation images under the stress perturbations accepted.
    pub validation_stressed_acceptance: f64,
    /// Share of the test split accepted (measured, never used for a choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_acceptance: Option<f64>,
    /// Training images the density was fitted on.
    pub fit_images: u64,
    /// Principal components kept.
    pub components: usize,
    /// Share of an assembled out-of-distribution set refused by the served model
    /// (gates and this score together; `bench/ood.sh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_set_refused: Option<f64>,
    /// What that set was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_set: Option<String>,
    /// Two verdicts instead of one: scores above this are not a chest radiograph
    /// the model can answer for (refused, 422 `out_of_distribution`); scores between
    /// `threshold` and it are a radiograph unlike the training films (answered, with
    /// `in_distribution: false` and a `distribution_shift` warning). Absent: every
    /// score above `threshold` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_threshold: Option<f64>,
    /// How `refuse_threshold` was chosen, and what it does on the sets it was
    /// chosen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_rule: Option<String>,
}

/// The fitted density model (`models/<name>.ood.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct OodModel {
    /// Embedding width.
    pub dim: usize,
    /// Mean training embedding.
    pub center: Vec<f32>,
    /// `k × dim` orthonormal rows spanning the principal subspace, in which the shared
    /// class covariance is diagonal.
    pub basis: Vec<f32>,
    /// The shared covariance's variances along the basis (k).
    pub variances: Vec<f64>,
    /// Class means in basis coordinates (one row of k per class).
    pub class_means: Vec<Vec<f64>>,
    /// Mean squared norm of a training embedding outside the subspace.
    pub residual_mean_square: f64,
    /// Scores above this are out of distribution.
    pub threshold: f64,
}

/// The file's layout: arrays of f32 as little-endian base64 (a third of their decimal
/// size), the rest as JSON numbers.
#[derive(Serialize, Deserialize)]
struct OodFile {
    format: String,
    dim: usize,
    components: usize,
    center_f32le: String,
    basis_f32le: String,
    variances: Vec<f64>,
    class_means: Vec<Vec<f64>>,
    residual_mean_square: f64,
    threshold: f64,
}

const FORMAT: &str = "cxr-ood-mahalanobis-pca/1";

fn to_b64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn from_b64(s: &str, n: usize, what: &str) -> Result<Vec<f32>, OodError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("{what}: {e}"))?;
    if bytes.len() != n * 4 {
        return Err(OodError(format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            n * 4
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// `Σ a·x` in f64 over eight running sums, which the compiler turns into vector
/// instructions: one sum is a chain of dependent additions, 0.46 ms for the 256
/// rows of a score against 0.09 ms here (the same score to 13 digits).
fn dot(a: &[f32], x: &[f64]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (a8, x8) = (a.chunks_exact(LANES), x.chunks_exact(LANES));
    let tail: f64 = a8
        .remainder()
        .iter()
        .zip(x8.remainder())
        .map(|(&a, &x)| f64::from(a) * x)
        .sum();
    for (a, x) in a8.zip(x8) {
        for i in 0..LANES {
            acc[i] += f64::from(a[i]) * x[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

impl OodModel {
    /// Principal components kept.
    pub fn components(&self) -> usize {
        self.variances.len()
    }

    /// The score of one embedding (larger: further from the training images).
    ///
    /// # Panics
    /// If `embedding` is not `dim` wide (checked when the model is loaded against the
    /// ONNX file's output).
    pub fn score(&self, embedding: &[f32]) -> f64 {
        assert_eq!(embedding.len(), self.dim, "embedding width");
        let x: Vec<f64> = embedding
            .iter()
            .zip(&self.center)
            .map(|(&e, &m)| f64::from(e) - f64::from(m))
            .collect();
        let total: f64 = x.iter().map(|v| v * v).sum();
        let z: Vec<f64> = self
            .basis
            .chunks_exact(self.dim)
            .map(|row| dot(row, &x))
            .collect();
        let inside: f64 = z.iter().map(|v| v * v).sum();
        let k = self.components() as f64;
        let maha = self
            .class_means
            .iter()
            .map(|mu| {
                z.iter()
                    .zip(mu)
                    .zip(&self.variances)
                    .map(|((z, m), l)| (z - m) * (z - m) / l)
                    .sum::<f64>()
                    / k
            })
            .fold(f64::INFINITY, f64::min);
        maha + (total - inside).max(0.0) / self.residual_mean_square
    }

    /// The file's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let f = OodFile {
            format: FORMAT.into(),
            dim: self.dim,
            components: self.components(),
            center_f32le: to_b64(&self.center),
            basis_f32le: to_b64(&self.basis),
            variances: self.variances.clone(),
            class_means: self.class_means.clone(),
            residual_mean_square: self.residual_mean_square,
            threshold: self.threshold,
        };
        let mut out = serde_json::to_vec_pretty(&f).expect("an OOD model serialises");
        out.push(b'\n');
        out
    }

    /// Parses and checks a file's bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, OodError> {
        let f: OodFile = serde_json::from_slice(bytes).map_err(|e| OodError(e.to_string()))?;
        if f.format != FORMAT {
            return Err(OodError(format!(
                "format `{}`; this cxr reads `{FORMAT}`",
                f.format
            )));
        }
        let k = f.components;
        if f.dim == 0 || k == 0 || k > f.dim {
            return Err(OodError(format!(
                "dim {} and components {k} do not fit",
                f.dim
            )));
        }
        let m = Self {
            dim: f.dim,
            center: from_b64(&f.center_f32le, f.dim, "center")?,
            basis: from_b64(&f.basis_f32le, k * f.dim, "basis")?,
            variances: f.variances,
            class_means: f.class_means,
            residual_mean_square: f.residual_mean_square,
            threshold: f.threshold,
        };
        if m.variances.len() != k || m.variances.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(OodError("variances must be k positive numbers".into()));
        }
        if m.class_means.is_empty()
            || m.class_means
                .iter()
                .any(|r| r.len() != k || r.iter().any(|v| !v.is_finite()))
        {
            return Err(OodError(
                "class_means must be rows of k finite numbers".into(),
            ));
        }
        if !(m.residual_mean_square.is_finite() && m.residual_mean_square > 0.0) {
            return Err(OodError("residual_mean_square must be positive".into()));
        }
        if !(m.threshold.is_finite() && m.threshold > 0.0) {
            return Err(OodError("threshold must be positive".into()));
        }
        if m.center.iter().chain(&m.basis).any(|v| !v.is_finite()) {
            return Err(OodError("center and basis must be finite".into()));
        }
        Ok(m)
    }

    /// Reads `path`, checking its SHA-256 against `sha256`.
    pub fn load(path: &Path, sha256: &str) -> Result<Self, OodError> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        let digest = crate::digest::sha256_hex(&bytes);
        if digest != sha256.to_ascii_lowercase() {
            return Err(OodError(format!(
                "SHA-256 is {digest} but the card says {sha256}: the file and card do not belong together"
            )));
        }
        Self::from_json(&bytes)
    }
}

/// What the server does with an out-of-distribution image (`--ood-action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OodAction {
    /// 422 `out_of_distribution`.
    #[default]
    Refuse,
    /// Answer, with a warning.
    Warn,
    /// Neither score nor refuse.
    Off,
}

impl OodAction {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            OodAction::Refuse => "refuse",
            OodAction::Warn => "warn",
            OodAction::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> OodModel {
        // dim 3, k 1 along x; class means at x = ±1, variance 0.25.
        OodModel {
            dim: 3,
            center: vec![0.0, 0.0, 0.0],
            basis: vec![1.0, 0.0, 0.0],
            variances: vec![0.25],
            class_means: vec![vec![-1.0], vec![1.0]],
            residual_mean_square: 2.0,
            threshold: 3.0,
        }
    }

    #[test]
    fn the_eight_lane_dot_product_is_the_plain_one() {
        // Lengths below, at and past the lanes, with a tail (2211 = 276 × 8 + 3).
        for n in [0, 3, 8, 17, 2211] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let x: Vec<f64> = (0..n)
                .map(|i| ((i * 53 % 89) as f64 - 44.0) / 3.0)
                .collect();
            let plain: f64 = a.iter().zip(&x).map(|(&a, &x)| f64::from(a) * x).sum();
            let d = dot(&a, &x);
            assert!(
                (d - plain).abs() <= 1e-9 * plain.abs().max(1.0),
                "n={n}: {d} vs {plain}"
            );
        }
    }

    #[test]
    fn score_is_nearest_class_mahalanobis_plus_relative_residual() {
        let m = model();
        // At a class mean, nothing outside: 0.
        assert_eq!(m.score(&[1.0, 0.0, 0.0]), 0.0);
        // x = 0.5: (0.5)²/0.25 = 1 from the nearer mean; residual (1² + 1²)/2 = 1.
        assert!((m.score(&[0.5, 1.0, -1.0]) - 2.0).abs() < 1e-12);
        // x = -2: 1/0.25 = 4 from the mean at -1.
        assert!((m.score(&[-2.0, 0.0, 0.0]) - 4.0).abs() < 1e-12);
    }

    #[test]
    fn file_round_trips_and_refuses_damage() {
        let m = model();
        let bytes = m.to_json();
        assert_eq!(OodModel::from_json(&bytes).unwrap(), m);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["variances"] = serde_json::json!([0.0]);
        assert!(OodModel::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        let sha = crate::digest::sha256_hex(&bytes);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.ood.json");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(OodModel::load(&p, &sha).unwrap(), m);
        assert!(OodModel::load(&p, &"0".repeat(64)).is_err());
    }
}
