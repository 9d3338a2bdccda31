//! The [`Trainer`]: what a run holds from start to export (flags, device, splits,
//! weights, progress), made by [`Trainer::new`] and advanced by [`Trainer::resume`],
//! the epoch loop (`epochs.rs`) and the export (`export.rs`).

use crate::model::arch::DenseNetConfig;
use crate::train::Split;
use crate::train::checkpoint::STATE_FILE;
use crate::train::checkpoint::TrainState;
use crate::train::checkpoint::checkpoint;
use crate::train::checkpoint::fingerprint;
use crate::train::checkpoint::read_state;
use crate::train::checkpoint::save_vs;
use crate::train::checkpoint::write_history;
use crate::train::config::ArchArg;
use crate::train::config::DeviceArg;
use crate::train::config::StrategyArg;
use crate::train::config::TrainArgs;
use crate::train::data;
use crate::train::data::Sample;
use crate::train::import;
use crate::train::limit_per_class;
use crate::train::log;
use crate::train::model;
use crate::train::optim;
use std::path::Path;
use std::path::PathBuf;
use tch::Device;
use tch::nn;

/// Where a run keeps its progress, under `--out`.
pub(super) struct RunFiles {
    /// The progress ([`STATE_FILE`]).
    pub(super) state: PathBuf,
    /// The latest weights.
    pub(super) checkpoint: PathBuf,
    /// The best epoch's weights.
    pub(super) best: PathBuf,
    /// One line per finished epoch.
    pub(super) history: PathBuf,
    /// The optimizer's state (moments, step count).
    pub(super) optim: PathBuf,
}

/// One training run.
pub(super) struct Trainer<'a> {
    pub(super) args: &'a TrainArgs,
    pub(super) arch: DenseNetConfig,
    pub(super) device: Device,
    pub(super) train: Split,
    pub(super) val: Split,
    pub(super) test: Split,
    /// Cross-entropy class weights (the weighted strategy).
    pub(super) loss_weights: Option<[f64; 2]>,
    /// NORMAL copies made to balance the classes (the augmented strategy).
    pub(super) generated: usize,
    pub(super) vs: nn::VarStore,
    pub(super) net: model::DenseNet,
    /// The optimizer, its state saved with every checkpoint.
    pub(super) optim: optim::Optim,
    pub(super) state: TrainState,
    pub(super) files: RunFiles,
    /// A run trained elsewhere (`--import-weights`): its recipe goes into the card.
    pub(super) imported: Option<import::ImportedRun>,
}

impl<'a> Trainer<'a> {
    /// The device, the splits (train split by patient; test untouched until the end),
    /// the class balance of the strategy, and the network (from `--init-weights`).
    pub(super) fn new(args: &'a TrainArgs) -> anyhow::Result<Self> {
        let device = match args.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Auto => Device::cuda_if_available(),
            DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceArg::Cuda => anyhow::bail!("--device cuda: libtorch sees no CUDA device"),
        };
        tch::manual_seed(args.seed as i64);
        let arch = match args.arch {
            ArchArg::Densenet161 => DenseNetConfig::densenet161(),
            ArchArg::Tiny => DenseNetConfig::tiny(),
        };
        let all_train = limit_per_class(data::scan(&args.data, "train")?, args.limit_per_class);
        let test = Split::new(limit_per_class(
            data::scan(&args.data, "test")?,
            args.limit_per_class,
        ));
        let (mut train, val) = data::split_by_patient(&all_train, args.val_fraction, args.seed);
        let val = Split::new(val);
        log_splits(args, &train, &val, &test, device);
        let (loss_weights, generated) = balance(args, &mut train)?;
        let vs = nn::VarStore::new(device);
        let net = model::DenseNet::new(&vs.root(), &arch);
        let optim = optim::Optim::new(&vs, args.optimizer, args.lr, args.weight_decay);
        let out = &args.out;
        let mut t = Self {
            args,
            arch,
            device,
            train: Split::new(train),
            val,
            test,
            loss_weights,
            generated,
            vs,
            net,
            optim,
            state: TrainState {
                fingerprint: fingerprint(args),
                ..Default::default()
            },
            files: RunFiles {
                state: out.join(STATE_FILE),
                checkpoint: out.join("checkpoint.safetensors"),
                best: out.join("best.safetensors"),
                history: out.join("history.csv"),
                optim: out.join("checkpoint.optim.safetensors"),
            },
            imported: None,
        };
        if let Some(w) = &args.init_weights {
            let n = model::load_torchvision(&mut t.vs, w)?;
            log(format!("initialised {n} tensors from {}", w.display()));
        }
        Ok(t)
    }

    /// Takes the weights and history of a run trained elsewhere (`--import-weights`
    /// with `--import-history`), ready for the export.
    pub(super) fn import(&mut self, weights: &Path, history: &Path) -> anyhow::Result<()> {
        let strategy = match self.args.strategy {
            StrategyArg::Weighted => "weighted",
            StrategyArg::Augmented => "augmented",
        };
        let run = import::ImportedRun::read(history, weights, strategy, &self.val.samples)?;
        let n = model::load_torchvision_full(&mut self.vs, weights)?;
        log(format!(
            "imported {n} tensors from {} (best epoch {} of {}, trained on {})",
            weights.display(),
            run.recipe.best_epoch,
            run.recipe.epochs,
            run.recipe.device
        ));
        self.state = TrainState {
            epoch: run.history.len() as u32,
            history: run.records(),
            best_epoch: Some(run.recipe.best_epoch),
            wall_time_s: run.recipe.wall_time_s,
            fingerprint: fingerprint(self.args),
            ..Default::default()
        };
        self.imported = Some(run);
        write_history(&self.files.history, &self.state.history)
    }

    /// With `--resume`: continues from the run folder's checkpoint when there is one,
    /// else from an interim model (`--resume-from`); without it, nothing.
    pub(super) fn resume(&mut self) -> anyhow::Result<()> {
        if !self.args.resume {
            return Ok(());
        }
        // Runs started before the state file was renamed write `state.json`: take the
        // newer of the two.
        let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let existing = [self.files.state.clone(), self.args.out.join("state.json")]
            .into_iter()
            .filter(|p| p.exists())
            .max_by_key(|p| modified(p));
        match (existing, &self.args.resume_from) {
            (Some(existing), _) => self.resume_checkpoint(&existing),
            (None, Some(model)) => self.resume_from_model(model),
            (None, None) => Ok(()),
        }
    }

    fn resume_checkpoint(&mut self, state: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let s = read_state(
            state,
            self.args,
            "--resume",
            "use the same flags or another --out",
        )?;
        let ckpt = &self.files.checkpoint;
        self.vs
            .load(ckpt)
            .with_context(|| format!("loading {}", ckpt.display()))?;
        self.state = s;
        let optim = &self.files.optim;
        if optim.exists() {
            self.optim
                .load(optim)
                .with_context(|| format!("loading {}", optim.display()))?;
        } else {
            log(format!(
                "{} is missing (a checkpoint from before it was kept): the optimizer's moments restart",
                optim.display()
            ));
        }
        log(format!(
            "resumed at epoch {} step {} (global step {}, optimizer step {})",
            self.state.epoch + 1,
            self.state.step,
            self.state.global_step,
            self.optim.steps()
        ));
        Ok(())
    }

    /// Continues from an interim model (its ONNX file holds the weights, `.state`
    /// beside it the progress), on a machine that lacks the run folder.
    fn resume_from_model(&mut self, model: &Path) -> anyhow::Result<()> {
        use anyhow::{Context, anyhow};
        let s = read_state(
            &model.with_extension("state"),
            self.args,
            "--resume-from",
            "use the same flags",
        )?;
        let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
        let weights = crate::model::onnx::read_weights(&bytes)
            .with_context(|| format!("reading the weights of {}", model.display()))?;
        model::load_weights(&mut self.vs, &weights)
            .map_err(|e| anyhow!("--resume-from {}: {e}", model.display()))?;
        self.state = s;
        let state = &mut self.state;
        state.resumed_from.push(format!(
            "{} at global step {}",
            model.display(),
            state.global_step
        ));
        // The best epoch's weights travel only when they are the interim model's own
        // (exported right at the end of that epoch); otherwise the choice starts over
        // with the epochs still to come, rather than pointing at weights we lack.
        let at_best_epoch_end = state.step == 0
            && state.best_epoch.is_some()
            && state.best_epoch == state.history.last().map(|r| r.epoch);
        if at_best_epoch_end {
            save_vs(&self.vs, &self.files.best)?;
        } else if let Some(b) = state.best_epoch.take() {
            state.best_val_loss = None;
            log(format!(
                "the best epoch so far ({b}) is not the interim model's; the best is chosen among the epochs from here on"
            ));
        }
        let optim = model.with_extension("optim.safetensors");
        if optim.exists() {
            self.optim
                .load(&optim)
                .with_context(|| format!("loading {}", optim.display()))?;
        } else {
            log(format!(
                "no {} beside the interim model: the optimizer's moments restart",
                optim.display()
            ));
        }
        // From here on the run folder holds the checkpoint, as after any other step.
        self.save_checkpoint()?;
        write_history(&self.files.history, &self.state.history)?;
        log(format!(
            "resumed from {} at epoch {} step {} (global step {})",
            model.display(),
            self.state.epoch + 1,
            self.state.step,
            self.state.global_step
        ));
        Ok(())
    }

    /// Saves the latest weights and the progress.
    pub(super) fn save_checkpoint(&self) -> anyhow::Result<()> {
        self.optim.save(&self.files.optim)?;
        checkpoint(
            &self.vs,
            &self.state,
            &self.files.checkpoint,
            &self.files.state,
        )
    }
}

fn log_splits(args: &TrainArgs, train: &[Sample], val: &Split, test: &Split, device: Device) {
    let counts = data::class_counts(train);
    let patients = val
        .samples
        .iter()
        .map(|s| &s.patient)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    log(format!(
        "{}: train {} (NORMAL {}, PNEUMONIA {}), validation {} ({patients} patients apart), test {}; device {device:?}",
        args.name(),
        train.len(),
        counts[0],
        counts[1],
        val.samples.len(),
        test.samples.len()
    ));
}

/// The strategy's answer to the class imbalance: loss weights (weighted), or NORMAL
/// copies added to `train` (augmented; their number is returned).
fn balance(args: &TrainArgs, train: &mut Vec<Sample>) -> anyhow::Result<(Option<[f64; 2]>, usize)> {
    let counts = data::class_counts(train);
    match args.strategy {
        StrategyArg::Weighted => Ok((Some(data::class_weights(counts)), 0)),
        // An imported run made its own copies; its card says how many.
        StrategyArg::Augmented if args.import_weights.is_some() => Ok((None, 0)),
        StrategyArg::Augmented => {
            let need = counts[1].saturating_sub(counts[0]);
            let extra = data::top_up(
                train,
                need,
                &args.out.join("generated").join("NORMAL"),
                args.seed,
            )?;
            let generated = extra.len();
            train.extend(extra);
            let c = data::class_counts(train);
            log(format!(
                "augmented: generated {generated} NORMAL images; classes now {} / {}",
                c[0], c[1]
            ));
            Ok((None, generated))
        }
    }
}
