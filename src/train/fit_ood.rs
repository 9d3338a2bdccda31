//! `cxr-train fit-ood`: the out-of-distribution model of a shipped variant.
//!
//! The model's own `embedding` output (the globally pooled features of the last dense
//! block) is computed, through ONNX Runtime and the serving preprocessing, for the
//! training split's images; a density model is fitted on the images the network was
//! trained on (the training split less the validation patients), and its threshold is
//! chosen on the validation images so that a stated share of them is accepted. The fit
//! itself is [`fit`] (the score it fits is [`crate::ood_score`]'s); this module gathers the embeddings (cached on disk by
//! the ONNX file's hash: they cost minutes per split on a CPU) and writes the file the
//! card names.

use std::path::{Path, PathBuf};

use image::GrayImage;

use super::data::{self, Sample};
use crate::eval::stress;
use crate::imaging::Preprocessor;
use crate::train::checkpoint::write_atomic;

/// One split's embeddings, one row per image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Embeddings {
    /// Features per row.
    pub dim: usize,
    /// 0 NORMAL, 1 PNEUMONIA, per row.
    pub labels: Vec<u8>,
    /// The image files, per row.
    pub files: Vec<String>,
    /// `labels.len() × dim` values, row-major (not in the JSON sidecar).
    #[serde(skip)]
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        let bytes: Vec<u8> = self.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path.with_extension("f32"), bytes)?;
        std::fs::write(path.with_extension("json"), serde_json::to_vec(self)?)?;
        Ok(())
    }

    fn load(path: &Path) -> Option<Self> {
        let mut e: Self =
            serde_json::from_slice(&std::fs::read(path.with_extension("json")).ok()?).ok()?;
        let bytes = std::fs::read(path.with_extension("f32")).ok()?;
        if bytes.len() != e.labels.len() * e.dim * 4 {
            return None;
        }
        e.data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(e)
    }
}

/// Computes the embeddings of `images` (already resized) with `session`.
pub fn embed(
    session: &mut crate::inference::CpuModel,
    pre: &Preprocessor,
    images: &[GrayImage],
) -> anyhow::Result<(usize, Vec<f32>)> {
    let mut out = Vec::new();
    let mut dim = 0;
    for o in session.run_images(pre, images)? {
        let e = o.embedding.ok_or_else(|| {
            anyhow::anyhow!(
                "the model file has no `embedding` output: rewrite it first (cxr-train rewrite-onnx)"
            )
        })?;
        dim = e.len();
        out.extend(e);
    }
    Ok((dim, out))
}

/// The splits an OOD fit reads.
pub struct Splits {
    /// Training images the network learnt from (training split less validation).
    pub fit: Embeddings,
    /// Validation images, as they are.
    pub val: Embeddings,
    /// Validation images under the stress perturbations (crate::eval::stress).
    pub val_stressed: Embeddings,
    /// The test split (measurement only; never used to choose anything).
    pub test: Embeddings,
}

/// Embeddings of every split for one model, from `cache` when there (keyed by the ONNX
/// file's hash), else computed and cached.
pub fn splits(
    session: &mut crate::inference::CpuModel,
    pre: &Preprocessor,
    onnx_sha256: &str,
    data_dir: &Path,
    val_fraction: f64,
    seed: u64,
    cache: &Path,
) -> anyhow::Result<Splits> {
    let key = &onnx_sha256[..16.min(onnx_sha256.len())];
    let all = data::scan(data_dir, "train")?;
    let (fit, val) = data::split_by_patient(&all, val_fraction, seed);
    let test = data::scan(data_dir, "test")?;
    let mut get = |tag: &str, samples: &[Sample], stressed: bool| -> anyhow::Result<Embeddings> {
        let path: PathBuf = cache.join(format!("{key}-{tag}"));
        if let Some(e) = Embeddings::load(&path)
            && e.len() == samples.len()
        {
            tracing::info!(target: "cxr::train", split = tag, rows = e.len(), "embeddings from the cache");
            return Ok(e);
        }
        let t = std::time::Instant::now();
        let (mut images, bad) = data::load_resized(samples, pre);
        super::report_bad(&bad, samples.len())?;
        if stressed {
            for (i, g) in images.iter_mut().enumerate() {
                *g = stress::perturb(g, stress::STRESS_SEED, i as u64);
            }
        }
        let (dim, data) = embed(session, pre, &images)?;
        let e = Embeddings {
            dim,
            labels: samples.iter().map(|s| s.label).collect(),
            files: samples
                .iter()
                .map(|s| s.path.to_string_lossy().into_owned())
                .collect(),
            data,
        };
        e.save(&path)?;
        tracing::info!(target: "cxr::train", split = tag, rows = e.len(), seconds = t.elapsed().as_secs_f64(), "embeddings computed");
        Ok(e)
    };
    Ok(Splits {
        val: get("val", &val, false)?,
        val_stressed: get("val-stressed", &val, true)?,
        test: get("test", &test, false)?,
        fit: get("fit", &fit, false)?,
    })
}

/// Principal components kept by `cxr-train fit-ood`.
pub const COMPONENTS: usize = 256;
/// Shrinkage of the shared class covariance toward its mean variance.
pub const SHRINK: f64 = 0.1;

/// Fits the density model of [`crate::ood_score`] on `fit` (threshold left at 1: see
/// [`acceptance_threshold`]). `components` is capped by the embedding width and the
/// number of rows.
pub fn fit(
    fit: &Embeddings,
    components: usize,
    shrink: f64,
) -> anyhow::Result<crate::ood_score::OodModel> {
    use tch::{Kind, Tensor};
    let (n, dim) = (fit.len(), fit.dim);
    if n < 4 || dim < 2 {
        anyhow::bail!("an OOD fit needs at least 4 embeddings of width 2 or more ({n} of {dim})");
    }
    let k = components.min(dim - 1).min(n - 2).max(1);
    let x = Tensor::from_slice(&fit.data)
        .view([n as i64, dim as i64])
        .to_kind(Kind::Double);
    let center = x.mean_dim(0, false, Kind::Double);
    let xc = &x - &center;
    // Principal subspace: the top-k eigenvectors of the embeddings' covariance.
    let cov = xc.transpose(0, 1).matmul(&xc) / n as f64;
    let (_, vecs) = cov.linalg_eigh("L");
    // Ascending eigenvalues: the last k columns, as rows.
    let p = vecs
        .narrow(1, (dim - k) as i64, k as i64)
        .transpose(0, 1)
        .contiguous();
    let z = xc.matmul(&p.transpose(0, 1));
    // Class means and the shared (within-class) covariance in the subspace.
    let labels = Tensor::from_slice(&fit.labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>());
    let mut means = Vec::new();
    let mut within = Tensor::zeros([n as i64, k as i64], (Kind::Double, tch::Device::Cpu));
    for c in 0..2i64 {
        let idx = labels.eq(c).nonzero().squeeze_dim(1);
        if idx.size()[0] == 0 {
            continue;
        }
        let zc = z.index_select(0, &idx);
        let mu = zc.mean_dim(0, false, Kind::Double);
        let _ = within.index_copy_(0, &idx, &(&zc - &mu));
        means.push(mu);
    }
    let sigma = within.transpose(0, 1).matmul(&within) / n as f64;
    let mean_var = f64::try_from(sigma.trace())? / k as f64;
    let sigma = sigma * (1.0 - shrink)
        + Tensor::eye(k as i64, (Kind::Double, tch::Device::Cpu)) * (shrink * mean_var);
    // Rotate the subspace's basis so that the shared covariance is diagonal.
    let (lambda, q) = sigma.linalg_eigh("L");
    let basis = q.transpose(0, 1).matmul(&p);
    let class_means: Vec<Vec<f64>> = means
        .iter()
        .map(|mu| Vec::<f64>::try_from(mu.matmul(&q)))
        .collect::<Result<_, _>>()?;
    let zr = xc.matmul(&basis.transpose(0, 1));
    let residual = (xc.square().sum_dim_intlist(1, false, Kind::Double)
        - zr.square().sum_dim_intlist(1, false, Kind::Double))
    .clamp_min(0.0);
    let residual_mean_square = f64::try_from(residual.mean(Kind::Double))?.max(1e-12);
    let to_f32 = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(Vec::<f32>::try_from(
            t.to_kind(Kind::Float).contiguous().view(-1),
        )?)
    };
    Ok(crate::ood_score::OodModel {
        dim,
        center: to_f32(&center)?,
        basis: to_f32(&basis)?,
        variances: Vec::<f64>::try_from(lambda.clamp_min(1e-12))?,
        class_means,
        residual_mean_square,
        threshold: 1.0,
    })
}

/// The smallest score at or under which at least `accept` of `scores` lie.
pub fn acceptance_threshold(scores: &[f64], accept: f64) -> f64 {
    let mut s: Vec<f64> = scores.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((accept * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Share of `scores` at or under `threshold`.
pub fn accepted(scores: &[f64], threshold: f64) -> f64 {
    scores.iter().filter(|&&s| s <= threshold).count() as f64 / scores.len().max(1) as f64
}

/// Scores of every row.
pub fn scores(m: &crate::ood_score::OodModel, e: &Embeddings) -> Vec<f64> {
    (0..e.len()).map(|i| m.score(e.row(i))).collect()
}

/// `cxr-train fit-ood` for one card: the embeddings, then (unless `embed_only`) the
/// fit, the file and the card's `ood` entry. `val_fraction` and the card's seed
/// rebuild the training run's patient split (its size is checked against the card).
/// Returns a one-line summary.
pub fn fit_card(
    card_path: &Path,
    data_dir: &Path,
    ort_lib: &Path,
    cache: &Path,
    accept: f64,
    val_fraction: f64,
    embed_only: bool,
) -> anyhow::Result<String> {
    let loaded = crate::registry::load_card(card_path)?;
    let card = &loaded.card;
    let (pre, mut session) = super::measuring_session(&loaded, ort_lib)?;
    let sp = splits(
        &mut session,
        &pre,
        &card.onnx.sha256,
        data_dir,
        val_fraction,
        card.training.seed,
        cache,
    )?;
    if sp.val.len() as u64 != card.training.validation_images {
        anyhow::bail!(
            "the validation split has {} images, the card {}: not the split the model was trained with",
            sp.val.len(),
            card.training.validation_images
        );
    }
    if embed_only {
        return Ok(format!(
            "embeddings cached: fit {}, val {}, test {}",
            sp.fit.len(),
            sp.val.len(),
            sp.test.len()
        ));
    }
    let mut model = fit(&sp.fit, COMPONENTS, SHRINK)?;
    let (sv, svs, st) = (
        scores(&model, &sp.val),
        scores(&model, &sp.val_stressed),
        scores(&model, &sp.test),
    );
    // The validation images as they are and under the stress perturbations together:
    // a threshold chosen on clean validation alone refuses films made differently.
    let pooled: Vec<f64> = sv.iter().chain(&svs).copied().collect();
    model.threshold = acceptance_threshold(&pooled, accept);
    let bytes = model.to_json();
    let ood = ood_card(&card.name, &model, &bytes, accept, &sp, [&sv, &svs, &st]);
    let file = ood.file.clone();
    let dir = card_path.parent().unwrap_or(Path::new("."));
    write_atomic(&dir.join(&file), &bytes)?;
    crate::registry::set_card_ood(card_path, &ood)
        .map_err(|e| super::TrainError::Write(e.to_string()))?;
    Ok(format!(
        "{file} written: threshold {:.3}; accepted: validation {:.1} %, stressed {:.1} %, test {:.1} %",
        ood.threshold,
        ood.validation_acceptance * 100.0,
        ood.validation_stressed_acceptance * 100.0,
        st.iter().filter(|&&s| s <= ood.threshold).count() as f64 * 100.0 / st.len().max(1) as f64
    ))
}

/// The card's `ood` entry for `model` (its threshold set) and its file's `bytes`;
/// `scores` are the validation, stressed validation and test scores.
fn ood_card(
    name: &str,
    model: &crate::ood_score::OodModel,
    bytes: &[u8],
    accept: f64,
    sp: &Splits,
    scores: [&[f64]; 3],
) -> crate::ood_score::OodCard {
    let [sv, svs, st] = scores;
    crate::ood_score::OodCard {
        file: format!("{name}.ood.json"),
        sha256: crate::digest::sha256_hex(bytes),
        method: format!(
            "class-conditional Mahalanobis distance (shared covariance shrunk {SHRINK} toward its mean variance) in the top {} principal components of the training embeddings, divided by the components, plus the squared norm outside them relative to its training mean (Lee et al. 2018); fitted on the {} training images (training split less validation)",
            model.components(),
            sp.fit.len()
        ),
        threshold: model.threshold,
        target_acceptance: accept,
        threshold_source: format!(
            "the {:.1}th percentile of the validation images, as they are and under the stress perturbations together ({} + {})",
            accept * 100.0,
            sp.val.len(),
            sp.val_stressed.len()
        ),
        validation_acceptance: accepted(sv, model.threshold),
        validation_stressed_acceptance: accepted(svs, model.threshold),
        test_acceptance: Some(accepted(st, model.threshold)),
        fit_images: sp.fit.len() as u64,
        components: model.components(),
        ood_set_refused: None,
        ood_set: None,
        refuse_threshold: None,
        refuse_rule: None,
    }
}
