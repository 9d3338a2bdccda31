//! `cxr-train`: trains a DenseNet variant with libtorch (tch) and writes what
//! `cxr-serve` loads: `<name>.onnx` (our writer), `<name>.json` (model card with the
//! test metrics), `history.csv` and plots.
//!
//! The loop checkpoints every N steps and at each epoch end (`checkpoint.safetensors`
//! and `checkpoint.state`), so `--resume` continues a stopped run from its last step. The
//! best epoch and the decision threshold are chosen on the validation split (carved
//! from train by patient); the test split is evaluated once, at the end.

mod checkpoint;
pub mod config;
pub mod data;
mod epochs;
mod error;
mod export;
pub mod fit_ood;
pub mod import;
pub mod int8_copy;
pub mod model;
mod optim;
mod plots;
mod recipe;
mod rewrite;
mod scores;
mod trainer;

use std::path::PathBuf;

pub use checkpoint::{EpochRecord, STATE_FILE, TrainState};
use config::ScheduleArg;
pub use config::TrainArgs;
use data::Sample;
use epochs::Trained;
pub use error::TrainError;
pub use rewrite::rewrite_onnx;
pub(crate) use scores::measuring_session;
pub use scores::{TestScore, TestScores, write_test_scores};
use trainer::Trainer;

use crate::registry::ModelCard;

/// What a finished run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// The card written beside the model.
    pub card: ModelCard,
    /// Path of the ONNX file.
    pub onnx: PathBuf,
    /// The cards of the versions written (this model's; its INT8 copy's when made).
    pub cards: Vec<PathBuf>,
    /// The versions signed (`--sign-key`), one per card.
    pub signed: Vec<crate::registry::SignedVersion>,
}

struct Split {
    samples: Vec<Sample>,
    labels: Vec<u8>,
}

impl Split {
    fn new(samples: Vec<Sample>) -> Self {
        let labels = samples.iter().map(|s| s.label).collect();
        Self { samples, labels }
    }
}

fn limit_per_class(samples: Vec<Sample>, per_class: Option<usize>) -> Vec<Sample> {
    match per_class {
        None => samples,
        Some(k) => {
            let mut seen = [0usize; 2];
            samples
                .into_iter()
                .filter(|s| {
                    seen[s.label as usize] += 1;
                    seen[s.label as usize] <= k
                })
                .collect()
        }
    }
}

/// A progress line, through `tracing` (timestamps and filtering are the
/// subscriber's; `RUST_LOG=cxr::train=warn` silences them).
fn log(msg: impl AsRef<str>) {
    tracing::info!(target: "cxr::train", "{}", msg.as_ref());
}

/// Learning rate at `step` of `total`.
pub fn lr_at(schedule: ScheduleArg, peak: f64, step: usize, total: usize) -> f64 {
    let t = step as f64 / total.max(1) as f64;
    let floor = peak / 1e4;
    let cos = |x: f64, hi: f64, lo: f64| {
        lo + (hi - lo) * (1.0 + (std::f64::consts::PI * x.clamp(0.0, 1.0)).cos()) / 2.0
    };
    match schedule {
        ScheduleArg::Constant => peak,
        ScheduleArg::Cosine => cos(t, peak, floor),
        ScheduleArg::Onecycle => {
            let warm = 0.25;
            if t < warm {
                cos(1.0 - t / warm, peak, peak / 25.0)
            } else {
                cos((t - warm) / (1.0 - warm), peak, floor)
            }
        }
    }
}

/// Runs training end to end: a run trained elsewhere is imported and exported;
/// otherwise the run resumes when asked, trains its remaining epochs and exports.
/// Returns `None` when `--stop-after-steps` stopped it (checkpoint saved).
pub fn run(args: &TrainArgs) -> anyhow::Result<Option<RunOutput>> {
    args.validate()?;
    // The key is read before hours of training, not after.
    let key = args
        .sign_key
        .as_deref()
        .map(crate::signing::PrivateKey::read)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let out = train_and_export(args)?;
    let Some(mut out) = out else { return Ok(None) };
    if let Some(key) = &key {
        // After the last file of each version (plots included) is written.
        for card in &out.cards {
            out.signed.push(crate::registry::sign_card(card, key)?);
        }
    }
    Ok(Some(out))
}

fn train_and_export(args: &TrainArgs) -> anyhow::Result<Option<RunOutput>> {
    use anyhow::Context;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let mut trainer = Trainer::new(args)?;
    if let (Some(w), Some(h)) = (&args.import_weights, &args.import_history) {
        trainer.import(w, h)?;
        return trainer.export(false).map(Some);
    }
    trainer.resume()?;
    if args.export_only {
        if trainer.state.history.is_empty() {
            anyhow::bail!(
                "--export-only: no finished epoch in {} yet",
                args.out.display()
            );
        }
        return trainer.export(true).map(Some);
    }
    match trainer.train()? {
        Trained::Done => trainer.export(false).map(Some),
        Trained::Stopped => Ok(None),
    }
}

pub(crate) fn report_bad(bad: &[(PathBuf, String)], total: usize) -> anyhow::Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = bad
        .iter()
        .take(5)
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .collect();
    // Skip a few unreadable files (they train as black images no more: they are
    // counted and listed), but a broken data set fails.
    if bad.len() * 100 > total {
        anyhow::bail!(
            "{} of {total} images are unreadable (over 1 %), e.g. {}",
            bad.len(),
            list.join("; ")
        );
    }
    log(format!(
        "warning: {} unreadable images replaced by black ones, e.g. {}",
        bad.len(),
        list.join("; ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onecycle_warms_up_then_decays() {
        let s = ScheduleArg::Onecycle;
        assert!((lr_at(s, 1.0, 0, 100) - 0.04).abs() < 1e-9);
        assert!((lr_at(s, 1.0, 25, 100) - 1.0).abs() < 1e-9);
        assert!(lr_at(s, 1.0, 99, 100) < 0.01);
    }
}
