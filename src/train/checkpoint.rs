//! The checkpoint: what a run keeps between invocations (weights in
//! `checkpoint.safetensors`, [`TrainState`] in `checkpoint.state`, the history as CSV), the
//! fingerprint a resume must match, and atomic writes.

use crate::train::config::TrainArgs;
use crate::train::error::TrainError;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn;

/// One row of `history.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: u32,
    /// Image size trained at.
    pub image_size: u32,
    /// Learning rate at the epoch end.
    pub lr: f64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (augmented images).
    pub train_accuracy: f64,
    /// Validation cross-entropy (unweighted).
    pub val_loss: f64,
    /// Validation accuracy at 0.5.
    pub val_accuracy: f64,
    /// Validation AUC.
    pub val_auc: f64,
    /// Seconds the epoch took.
    pub seconds: f64,
    /// Validation cross-entropy under the stress perturbations (runs that measured it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stress_val_loss: Option<f64>,
    /// Validation AUC under the stress perturbations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stress_val_auc: Option<f64>,
}

/// What the checkpoint state keeps between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Epoch in progress (0-based).
    pub epoch: u32,
    /// Steps done in that epoch.
    pub step: usize,
    /// Steps done in all.
    pub global_step: usize,
    /// Finished epochs.
    pub history: Vec<EpochRecord>,
    /// Best finished epoch (1-based) by validation loss, among those at the export size.
    pub best_epoch: Option<u32>,
    /// Its validation loss.
    pub best_val_loss: Option<f64>,
    /// Training seconds so far, across resumes.
    pub wall_time_s: f64,
    /// Flags that must not change across a resume.
    pub fingerprint: String,
    /// Each `--resume-from` this run took: which interim model, at which step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed_from: Vec<String>,
}

/// The checkpoint's state (JSON; not `.json`, so that a run folder also loads as a
/// models folder).
pub const STATE_FILE: &str = "checkpoint.state";

/// What a checkpoint must have been trained with to be resumed: the flags that change
/// what the run computes, by name, as JSON. The destructuring is exhaustive, so a new
/// flag does not compile until it is put in one group or the other.
pub(super) fn fingerprint(a: &TrainArgs) -> String {
    let TrainArgs {
        // Where data comes from and results go, how the run is driven and exported:
        // none changes the weights a step computes.
        data: _,
        out: _,
        name: _,
        model_version: _,
        device: _,
        threads: _,
        checkpoint_every: _,
        resume: _,
        resume_from: _,
        init_weights: _,
        import_weights: _,
        import_history: _,
        threshold: _,
        storage: _,
        stop_after_steps: _,
        export_only: _,
        no_int8: _,
        sign_key: _,
        ort_lib: _,
        // The recipe.
        strategy,
        arch,
        epochs,
        image_size,
        final_image_size,
        final_epochs,
        batch_size,
        final_batch_size,
        optimizer,
        lr,
        weight_decay,
        schedule,
        label_smoothing,
        val_fraction,
        seed,
        max_steps_per_epoch,
        limit_per_class,
    } = a;
    serde_json::json!({
        "strategy": format!("{strategy:?}"),
        "arch": format!("{arch:?}"),
        "epochs": epochs,
        "image_size": image_size,
        "final_image_size": final_image_size,
        "final_epochs": final_epochs,
        "batch_size": batch_size,
        "final_batch_size": final_batch_size,
        "optimizer": format!("{optimizer:?}"),
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": format!("{schedule:?}"),
        "label_smoothing": label_smoothing,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_steps_per_epoch": max_steps_per_epoch,
        "limit_per_class": limit_per_class,
    })
    .to_string()
}

/// The fingerprint checkpoints written before the JSON one carry (positional, without
/// the label smoothing and validation fraction): still accepted on resume.
pub(super) fn legacy_fingerprint(a: &TrainArgs) -> String {
    format!(
        "{:?}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{:?}|{}|{:?}|{:?}",
        a.strategy,
        a.arch,
        a.epochs,
        a.image_size,
        a.final_image_size,
        a.final_epochs,
        a.batch_size,
        a.final_batch_size,
        a.lr,
        a.weight_decay,
        a.optimizer,
        a.schedule,
        a.seed,
        a.max_steps_per_epoch,
        a.limit_per_class
    )
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .map_err(|e| TrainError::Write(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Write(format!("{}: {e}", path.display())))
}

pub(super) fn save_vs(vs: &nn::VarStore, path: &Path) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp.safetensors");
    vs.save(&tmp)
        .map_err(|e| TrainError::Write(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Write(format!("{}: {e}", path.display())))
}

/// Reads a checkpoint state (a run folder's, or the one shipped beside an interim
/// model) and refuses it when it was made with other flags than `args` (its
/// [`fingerprint`], or the legacy one of older checkpoints).
pub(super) fn read_state(
    path: &Path,
    args: &TrainArgs,
    flag: &str,
    hint: &str,
) -> anyhow::Result<TrainState> {
    use anyhow::Context;
    let fingerprint = fingerprint(args);
    let mut s: TrainState = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("reading the training state in {}", path.display()))?;
    if s.fingerprint == legacy_fingerprint(args) {
        // Written before the JSON fingerprint; the next save writes the new one.
        s.fingerprint = fingerprint;
    } else if s.fingerprint != fingerprint {
        anyhow::bail!(
            "{flag}: {} was made with other flags ({}); {hint}",
            path.display(),
            s.fingerprint
        );
    }
    Ok(s)
}

pub(super) fn checkpoint(
    vs: &nn::VarStore,
    state: &TrainState,
    ckpt: &Path,
    state_path: &Path,
) -> anyhow::Result<()> {
    save_vs(vs, ckpt)?;
    Ok(write_atomic(
        state_path,
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?)
}

pub(super) fn write_history(path: &Path, h: &[EpochRecord]) -> anyhow::Result<()> {
    let mut s = String::from(
        "epoch,image_size,lr,train_loss,train_accuracy,val_loss,val_accuracy,val_auc,seconds,stress_val_loss,stress_val_auc\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.5}"));
    for r in h {
        s += &format!(
            "{},{},{:.3e},{:.5},{:.5},{:.5},{:.5},{:.5},{:.1},{},{}\n",
            r.epoch,
            r.image_size,
            r.lr,
            r.train_loss,
            r.train_accuracy,
            r.val_loss,
            r.val_accuracy,
            r.val_auc,
            r.seconds,
            opt(r.stress_val_loss),
            opt(r.stress_val_auc)
        );
    }
    Ok(write_atomic(path, s.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> TrainArgs {
        use clap::Parser;
        let base = [
            "cxr-train",
            "--data",
            "d",
            "--out",
            "o",
            "--strategy",
            "weighted",
        ];
        TrainArgs::parse_from(base.iter().chain(extra))
    }

    #[test]
    fn fingerprint_names_the_recipe_and_ignores_the_plumbing() {
        let base = fingerprint(&args(&[]));
        let v: serde_json::Value = serde_json::from_str(&base).unwrap();
        assert_eq!(v["seed"], 42);
        assert_eq!(v["strategy"], "Weighted");
        // Each recipe flag changes it (the last two were missing from the positional
        // fingerprint).
        for flag in [
            ["--epochs", "3"],
            ["--lr", "0.01"],
            ["--seed", "7"],
            ["--image-size", "64"],
            ["--label-smoothing", "0.1"],
            ["--val-fraction", "0.2"],
        ] {
            assert_ne!(fingerprint(&args(&flag)), base, "{flag:?}");
        }
        // Where files go, how many threads, how it is exported: not.
        for flag in [
            ["--name", "other"],
            ["--threads", "3"],
            ["--checkpoint-every", "5"],
            ["--storage", "fp32"],
        ] {
            assert_eq!(fingerprint(&args(&flag)), base, "{flag:?}");
        }
    }

    #[test]
    fn resume_takes_its_own_and_legacy_fingerprints_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.state");
        let a = args(&[]);
        let state = |fp: String| TrainState {
            epoch: 1,
            step: 2,
            global_step: 3,
            history: vec![],
            best_epoch: None,
            best_val_loss: None,
            wall_time_s: 0.0,
            fingerprint: fp,
            resumed_from: vec![],
        };
        let write =
            |s: &TrainState| std::fs::write(&path, serde_json::to_string(s).unwrap()).unwrap();
        write(&state(fingerprint(&a)));
        assert_eq!(
            read_state(&path, &a, "--resume", "").unwrap().global_step,
            3
        );
        // A checkpoint from before the JSON fingerprint resumes, and is upgraded.
        write(&state(legacy_fingerprint(&a)));
        let s = read_state(&path, &a, "--resume", "").unwrap();
        assert_eq!(s.fingerprint, fingerprint(&a));
        // Other flags, in either format: refused.
        let other = args(&["--epochs", "3"]);
        write(&state(fingerprint(&other)));
        assert!(read_state(&path, &a, "--resume", "").is_err());
        write(&state(legacy_fingerprint(&other)));
        assert!(read_state(&path, &a, "--resume", "").is_err());
    }
}
