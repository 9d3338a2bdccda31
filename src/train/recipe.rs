//! The card's recipe: how a run was trained, from its flags and progress, or from
//! the history of a run trained elsewhere.

use crate::registry::Recipe;
use crate::registry::Strategy;
use crate::train::config::StrategyArg;
use crate::train::data;
use crate::train::import;
use crate::train::trainer::Trainer;

impl Trainer<'_> {
    /// The card's recipe: this run's flags and progress, or an imported run's own.
    pub(super) fn recipe(&self, interim: bool) -> Recipe {
        let (args, state) = (self.args, &self.state);
        let mut sizes: Vec<u32> = state.history.iter().map(|r| r.image_size).collect();
        sizes.dedup();
        let mut notes = Vec::new();
        if interim {
            notes.push(format!(
                "INTERIM model: exported from the checkpoint after {} of {} epochs (global step {}); training continues and the final model replaces it.",
                state.history.len(),
                args.epochs,
                state.global_step
            ));
        }
        for r in &state.resumed_from {
            notes.push(format!(
                "Continued from the interim model {r} (the weights stored in that file; optimizer moments restarted)."
            ));
        }
        let recipe = Recipe {
            strategy: match args.strategy {
                StrategyArg::Weighted => Strategy::Weighted,
                StrategyArg::Augmented => Strategy::Augmented,
            },
            data: format!(
                "Kermany et al. pediatric chest X-rays ({})",
                args.data.display()
            ),
            epochs: state.history.len() as u32,
            image_sizes: sizes,
            batch_size: args.batch_size as u32,
            optimizer: format!(
                "{:?} lr={} wd={} schedule={:?} label_smoothing={} best_epoch={:?} threshold_rule={}",
                args.optimizer,
                args.lr,
                args.weight_decay,
                args.schedule,
                args.label_smoothing,
                state.best_epoch,
                args.threshold
            )
            .to_lowercase(),
            seed: args.seed,
            train_images: self.train.samples.len() as u64,
            train_class_counts: data::class_counts(&self.train.samples)
                .iter()
                .map(|&c| c as u64)
                .collect(),
            validation_images: self.val.samples.len() as u64,
            class_weights: self.loss_weights.map(|w| w.to_vec()).unwrap_or_default(),
            generated_images: self.generated as u64,
            init: args
                .init_weights
                .as_ref()
                .map_or("scratch".into(), |p| p.display().to_string()),
            device: format!("{:?}", self.device).to_lowercase(),
            wall_time_s: state.wall_time_s,
            export_parity_max_abs_diff: None,
            notes: notes.join(" "),
        };
        match &self.imported {
            None => recipe,
            Some(run) => imported_recipe(recipe, run),
        }
    }
}

/// The card's recipe for a run trained elsewhere: what the run's own history says.
fn imported_recipe(mut r: Recipe, run: &import::ImportedRun) -> Recipe {
    let i = &run.recipe;
    r.epochs = i.epochs;
    r.batch_size = i.batch_size;
    r.optimizer = run.optimizer_line();
    r.seed = i.seed;
    r.train_images = i.train_images;
    r.train_class_counts = i.train_class_counts.clone();
    r.class_weights = i.class_weights.clone();
    r.generated_images = i.generated_images;
    r.init = "scratch".into();
    r.device = format!("cuda ({})", i.device);
    r.wall_time_s = i.wall_time_s;
    r.notes = format!(
        "Trained on {} by scripts/gpu/train_v2.py (torch {}, torchvision {}, {}; weights {}), then exported and measured here by cxr-train --import-weights (our ONNX writer, ONNX Runtime). Augmentation, both classes: {}. Epoch chosen by {}.",
        i.device, i.torch, i.torchvision, i.precision, run.sha256, i.augmentation, i.best_rule
    );
    r
}
