//! `--import-weights`: a run trained elsewhere (on a GPU, by
//! `scripts/gpu/train_v2.py`, torchvision's DenseNet with the same split, data and
//! strategies) comes in as a torchvision-layout safetensors file plus its history
//! JSON, and leaves as a model exported and measured exactly like one trained here:
//! our ONNX writer, ONNX Runtime, the same validation, stress validation, calibration
//! and test split.
//!
//! The history must name the validation images this split holds, file for file: a
//! model that trained on any of them would make its validation figures (and the
//! threshold and temperature chosen on them) meaningless.

use std::path::Path;

use serde::Deserialize;

use super::data::Sample;
use crate::train::checkpoint::EpochRecord;
use crate::train::error::TrainError;

/// What the GPU script says about its run.
#[derive(Debug, Clone, Deserialize)]
pub struct ImportedRun {
    /// The recipe, as the script ran it.
    pub recipe: ImportedRecipe,
    /// One record per epoch.
    pub history: Vec<ImportedEpoch>,
    /// SHA-256 of the weights file it wrote.
    pub sha256: String,
    /// File names of the validation images it held out.
    pub validation_files: Vec<String>,
}

/// The script's recipe block.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct ImportedRecipe {
    pub strategy: String,
    pub epochs: u32,
    pub image_size: u32,
    pub batch_size: u32,
    pub optimizer: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: String,
    pub label_smoothing: f64,
    pub seed: u64,
    pub precision: String,
    pub best_epoch: u32,
    pub best_rule: String,
    pub augmentation: String,
    pub train_images: u64,
    pub train_class_counts: Vec<u64>,
    pub class_weights: Vec<f64>,
    pub generated_images: u64,
    pub wall_time_s: f64,
    pub device: String,
    pub torch: String,
    pub torchvision: String,
}

/// One epoch of the script's history.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct ImportedEpoch {
    pub epoch: u32,
    pub image_size: u32,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_auc: f64,
    pub stress_val_loss: f64,
    pub stress_val_auc: f64,
    pub seconds: f64,
}

impl ImportedRun {
    /// Reads the history JSON and checks it against the weights file and this run's
    /// strategy and validation split.
    pub fn read(
        path: &Path,
        weights: &Path,
        strategy: &str,
        val: &[Sample],
    ) -> Result<Self, super::TrainError> {
        Self::read_checked(path, weights, strategy, val)
    }

    fn read_checked(
        path: &Path,
        weights: &Path,
        strategy: &str,
        val: &[Sample],
    ) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Import(format!("cannot read {}: {e}", path.display())))?;
        let run: Self = serde_json::from_str(&text).map_err(|e| {
            TrainError::Import(format!("{} is not a run history: {e}", path.display()))
        })?;
        let bytes = std::fs::read(weights)
            .map_err(|e| TrainError::Import(format!("cannot read {}: {e}", weights.display())))?;
        let digest = crate::digest::sha256_hex(&bytes);
        if digest != run.sha256 {
            return Err(TrainError::Import(format!(
                "{} has SHA-256 {digest}, but {} was written for {}",
                weights.display(),
                path.display(),
                run.sha256
            )));
        }
        if run.recipe.strategy != strategy {
            return Err(TrainError::Import(format!(
                "{} trained the `{}` strategy, not `{strategy}`",
                path.display(),
                run.recipe.strategy
            )));
        }
        let ours: Vec<String> = val
            .iter()
            .map(|s| {
                s.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        if ours != run.validation_files {
            let missing = ours
                .iter()
                .find(|n| !run.validation_files.contains(n))
                .or_else(|| run.validation_files.iter().find(|n| !ours.contains(n)));
            return Err(TrainError::Import(format!(
                "{} held out another validation split ({} images, this one {}; e.g. `{}` differs): \
                 use the same data, --val-fraction and --seed",
                path.display(),
                run.validation_files.len(),
                ours.len(),
                missing.map_or("(order)", String::as_str)
            )));
        }
        if run.history.is_empty() || run.recipe.best_epoch == 0 {
            return Err(TrainError::Import(format!(
                "{} records no finished epoch",
                path.display()
            )));
        }
        Ok(run)
    }

    /// The history as the trainer's own records.
    pub fn records(&self) -> Vec<EpochRecord> {
        self.history
            .iter()
            .map(|h| EpochRecord {
                epoch: h.epoch,
                image_size: h.image_size,
                lr: h.lr,
                train_loss: h.train_loss,
                train_accuracy: h.train_accuracy,
                val_loss: h.val_loss,
                val_accuracy: h.val_accuracy,
                val_auc: h.val_auc,
                seconds: h.seconds,
                stress_val_loss: Some(h.stress_val_loss),
                stress_val_auc: Some(h.stress_val_auc),
            })
            .collect()
    }

    /// The card's `training.optimizer` line.
    pub fn optimizer_line(&self) -> String {
        let r = &self.recipe;
        format!(
            "{} lr={} wd={} schedule={} label_smoothing={} best_epoch={} ({}) {}",
            r.optimizer,
            r.lr,
            r.weight_decay,
            r.schedule,
            r.label_smoothing,
            r.best_epoch,
            r.best_rule,
            r.precision
        )
    }
}
