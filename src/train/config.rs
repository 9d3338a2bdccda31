//! `cxr-train`'s flags (clap, with `CXR_*` environment fallbacks).

use std::path::PathBuf;

use crate::model::onnx::WeightStorage;

/// Imbalance strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// Class-weighted cross-entropy (weight = 1 − n_class / n_total).
    Weighted,
    /// Top NORMAL up with transformed copies, then plain cross-entropy.
    Augmented,
}

/// Network size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchArg {
    /// torchvision DenseNet-161.
    Densenet161,
    /// A tiny DenseNet (smoke tests).
    Tiny,
}

/// Optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerArg {
    /// AdamW (decoupled weight decay).
    Adamw,
    /// SGD with Nesterov momentum 0.9.
    Sgd,
}

/// Learning-rate schedule over all steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleArg {
    /// Warm up to `--lr` over 25 % of the steps, then cosine down to lr/1e4.
    Onecycle,
    /// Cosine from `--lr` to lr/1e4.
    Cosine,
    /// Constant `--lr`.
    Constant,
}

/// Training device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when libtorch sees a GPU, else CPU.
    Auto,
    /// CPU.
    Cpu,
    /// CUDA or fail.
    Cuda,
}

pub use crate::eval::threshold::ThresholdRule;
use crate::train::error::TrainError;

/// Trains one DenseNet variant on the Kermany layout and writes `<name>.onnx`, its
/// model card `<name>.json`, `history.csv` and plots into `--out`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cxr-train", version, about)]
pub struct TrainArgs {
    /// Data root holding train/{NORMAL,PNEUMONIA} and test/{NORMAL,PNEUMONIA}.
    #[arg(long, env = "CXR_DATA")]
    pub data: PathBuf,
    /// Output folder of this run (checkpoints, model, card, plots).
    #[arg(long, env = "CXR_TRAIN_OUT")]
    pub out: PathBuf,
    /// Imbalance strategy.
    #[arg(long, value_enum, env = "CXR_STRATEGY")]
    pub strategy: StrategyArg,
    /// Variant name (file stem and `?model=` value); defaults to the strategy.
    #[arg(long, env = "CXR_NAME")]
    pub name: Option<String>,
    /// Version written in the card.
    #[arg(long, env = "CXR_MODEL_VERSION", default_value = "1.0.0")]
    pub model_version: String,
    /// Network.
    #[arg(long, env = "CXR_ARCH", value_enum, default_value = "densenet161")]
    pub arch: ArchArg,
    /// Epochs in all (including the final ones).
    #[arg(long, env = "CXR_EPOCHS", default_value_t = 10)]
    pub epochs: u32,
    /// Image size of the first epochs.
    #[arg(long, env = "CXR_IMAGE_SIZE", default_value_t = 112)]
    pub image_size: u32,
    /// Image size of the last `--final-epochs` epochs and of the exported model
    /// (progressive resizing); defaults to `--image-size`.
    #[arg(long, env = "CXR_FINAL_IMAGE_SIZE")]
    pub final_image_size: Option<u32>,
    /// Epochs at `--final-image-size`.
    #[arg(long, env = "CXR_FINAL_EPOCHS", default_value_t = 0)]
    pub final_epochs: u32,
    /// Batch size.
    #[arg(long, env = "CXR_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Batch size of the final epochs (memory grows with the image); defaults to
    /// `--batch-size`.
    #[arg(long, env = "CXR_FINAL_BATCH_SIZE")]
    pub final_batch_size: Option<usize>,
    /// Optimizer.
    #[arg(long, env = "CXR_OPTIMIZER", value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// Peak learning rate.
    #[arg(long, env = "CXR_LR", default_value_t = 2e-3)]
    pub lr: f64,
    /// Weight decay.
    #[arg(long, env = "CXR_WEIGHT_DECAY", default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Learning-rate schedule.
    #[arg(long, env = "CXR_SCHEDULE", value_enum, default_value = "onecycle")]
    pub schedule: ScheduleArg,
    /// Label smoothing of the cross-entropy.
    #[arg(long, env = "CXR_LABEL_SMOOTHING", default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Fraction of each class's training images moved to validation (by patient).
    #[arg(long, env = "CXR_VAL_FRACTION", default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seed of the split, the augmentation, the top-up and the initial weights.
    #[arg(long, env = "CXR_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Training device.
    #[arg(long, env = "CXR_TRAIN_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// CPU threads for libtorch (0 = its default).
    #[arg(long, env = "CXR_TRAIN_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Save a checkpoint every N steps (and at every epoch end).
    #[arg(long, env = "CXR_CHECKPOINT_EVERY", default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue from `--out`'s checkpoint.
    #[arg(long, env = "CXR_RESUME")]
    pub resume: bool,
    /// With `--resume` and no checkpoint in `--out` yet: continue from an interim
    /// model written by `--export-only` (its ONNX file holds the weights, the
    /// `.state` file beside it the progress), e.g. the one shipped in `models/`, so
    /// that a machine without the run folder picks up where the last one stopped.
    /// The optimizer's state comes from `<name>.optim.safetensors` beside it when
    /// there is one (the interim export writes it); without it the moments restart.
    #[arg(long, env = "CXR_RESUME_FROM", requires = "resume")]
    pub resume_from: Option<PathBuf>,
    /// torchvision-layout DenseNet weights (safetensors) to start from; the
    /// classifier is replaced by a 2-class one.
    #[arg(long, env = "CXR_INIT_WEIGHTS")]
    pub init_weights: Option<PathBuf>,
    /// Skip training: export and measure, like a final model, the weights of a run
    /// trained elsewhere, e.g. on a GPU by `scripts/gpu/train_v2.py`: a
    /// torchvision-layout DenseNet safetensors file, classifier included.
    #[arg(long, env = "CXR_IMPORT_WEIGHTS", requires = "import_history")]
    pub import_weights: Option<PathBuf>,
    /// That run's history JSON (recipe, epochs, validation file list); its validation
    /// split must be this one, file for file.
    #[arg(long, env = "CXR_IMPORT_HISTORY", requires = "import_weights")]
    pub import_history: Option<PathBuf>,
    /// Decision threshold rule, applied to the calibrated probabilities of the clean
    /// and the stressed validation images together: a probability, `youden` or
    /// `sensitivity:0.95`.
    #[arg(long, env = "CXR_THRESHOLD", default_value = "youden")]
    pub threshold: ThresholdRule,
    /// Weight storage of the exported ONNX file.
    #[arg(long, env = "CXR_STORAGE", value_enum, default_value = "fp16")]
    pub storage: StorageArg,
    /// Stop each epoch after this many steps (smoke tests).
    #[arg(long, env = "CXR_MAX_STEPS_PER_EPOCH")]
    pub max_steps_per_epoch: Option<usize>,
    /// Save a checkpoint and exit once this many steps ran in this invocation
    /// (time-boxed sessions); continue later with `--resume`.
    #[arg(long, env = "CXR_STOP_AFTER_STEPS")]
    pub stop_after_steps: Option<usize>,
    /// Export the latest checkpoint (with `--resume` and the run's flags) as an
    /// interim model into `<out>/interim/`, measured like a final one, and exit.
    #[arg(long, env = "CXR_EXPORT_ONLY")]
    pub export_only: bool,
    /// Use at most this many images per class and split (smoke tests).
    #[arg(long, env = "CXR_LIMIT_PER_CLASS")]
    pub limit_per_class: Option<usize>,
    /// Do not make the INT8 copy (`<name>-int8`) at the end of a full run (it is
    /// calibrated and measured like `cxr-train quantize`, about 4 min on 2 cores).
    #[arg(long, env = "CXR_NO_INT8")]
    pub no_int8: bool,
    /// Sign each version exported (the model, its card and the files beside it, the
    /// INT8 copy's too) with this PEM key (ECDSA P-256/P-384) after its last file is
    /// written: the `<name>.sig` bundle `cxr-sign` writes, checked by
    /// `cxr-serve --trusted-signers`.
    #[arg(long, env = "CXR_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    /// ONNX Runtime library for the export parity check (else ORT_DYLIB_PATH or
    /// .ort/lib/libonnxruntime.so).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
}

/// ONNX weight storage flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageArg {
    /// float32.
    Fp32,
    /// float16 (half the file; parity bound 1e-2).
    Fp16,
}

impl From<StorageArg> for WeightStorage {
    fn from(s: StorageArg) -> Self {
        match s {
            StorageArg::Fp32 => WeightStorage::Fp32,
            StorageArg::Fp16 => WeightStorage::Fp16,
        }
    }
}

impl TrainArgs {
    /// Checks the flags and says what to fix.
    pub fn validate(&self) -> Result<(), super::TrainError> {
        self.check()
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.epochs == 0 {
            return Err(TrainError::Flags("--epochs must be >= 1".into()));
        }
        if self.final_epochs > self.epochs {
            return Err(TrainError::Flags(
                "--final-epochs cannot exceed --epochs".into(),
            ));
        }
        if self.batch_size == 0 || self.final_batch_size == Some(0) {
            return Err(TrainError::Flags("--batch-size must be >= 1".into()));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 0.5) {
            return Err(TrainError::Flags(
                "--val-fraction must lie in (0, 0.5)".into(),
            ));
        }
        if self.lr.is_nan()
            || self.lr <= 0.0
            || self.weight_decay < 0.0
            || !(0.0..1.0).contains(&self.label_smoothing)
        {
            return Err(TrainError::Flags(
                "--lr must be > 0, --weight-decay >= 0, --label-smoothing in [0, 1)".into(),
            ));
        }
        for s in [Some(self.image_size), self.final_image_size]
            .into_iter()
            .flatten()
        {
            if !(32..=1024).contains(&s) {
                return Err(TrainError::Flags(format!(
                    "image size {s} is outside 32..=1024"
                )));
            }
        }
        if self.checkpoint_every == 0 {
            return Err(TrainError::Flags("--checkpoint-every must be >= 1".into()));
        }
        Ok(())
    }

    /// The variant name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| match self.strategy {
            StrategyArg::Weighted => "weighted".into(),
            StrategyArg::Augmented => "augmented".into(),
        })
    }

    /// Image size of the exported model.
    pub fn export_size(&self) -> u32 {
        self.final_image_size.unwrap_or(self.image_size)
    }

    /// (image size, batch size) of epoch `e` (0-based).
    pub fn epoch_shape(&self, e: u32) -> (u32, usize) {
        if e >= self.epochs - self.final_epochs {
            (
                self.export_size(),
                self.final_batch_size.unwrap_or(self.batch_size),
            )
        } else {
            (self.image_size, self.batch_size)
        }
    }
}
