//! `cxr-train`: trains a DenseNet variant with libtorch (tch) and writes what
//! `cxr-serve` loads: `<name>.onnx` (our writer), `<name>.json` (model card with the
//! test metrics), `history.csv` and plots.
//!
//! The loop checkpoints every N steps and at each epoch end (`checkpoint.safetensors`
//! and `state.json`), so `--resume` continues a stopped run from its last step. The
//! best epoch and the decision threshold are chosen on the validation split (carved
//! from train by patient); the test split is evaluated once, at the end.

pub mod config;
pub mod data;
pub mod import;
pub mod model;
pub mod ood;
mod plots;
pub mod quantize;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::GrayImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

pub use config::TrainArgs;
use config::{ArchArg, DeviceArg, OptimizerArg, ScheduleArg, StrategyArg, ThresholdRule};
use data::{AugmentSpec, Sample};

use crate::arch::{DenseNetConfig, SplitMix64};
use crate::eval::calibration::nll;
use crate::eval::{
    Calibration, Metrics, OperatingCurve, fit_temperature, roc_curve, served_probabilities, stress,
};
use crate::imaging::{Preprocessing, Preprocessor};
use crate::inference::ModelOutput;
use crate::registry::{CardMetrics, ModelCard, NewModel, Recipe, Strategy};

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
pub struct State {
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

/// What a finished run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// The card written beside the model.
    pub card: ModelCard,
    /// Path of the ONNX file.
    pub onnx: PathBuf,
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

fn limit(samples: Vec<Sample>, per_class: Option<usize>) -> Vec<Sample> {
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

/// What a checkpoint must have been trained with to be resumed: the flags that change
/// what the run computes, by name, as JSON. The destructuring is exhaustive, so a new
/// flag does not compile until it is put in one group or the other.
fn fingerprint(a: &TrainArgs) -> String {
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
fn legacy_fingerprint(a: &TrainArgs) -> String {
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

/// A progress line, through `tracing` (timestamps and filtering are the
/// subscriber's; `RUST_LOG=cxr::train=warn` silences them).
fn log(msg: impl AsRef<str>) {
    tracing::info!(target: "cxr::train", "{}", msg.as_ref());
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn save_vs(vs: &nn::VarStore, path: &Path) -> Result<(), String> {
    let tmp = path.with_extension("tmp.safetensors");
    vs.save(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
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

fn tensor_batch(pre: &Preprocessor, imgs: &[GrayImage], device: Device) -> Tensor {
    let s = i64::from(pre.size());
    let mut buf = Vec::with_capacity(imgs.len() * 3 * (s * s) as usize);
    for g in imgs {
        buf.extend(pre.normalize(g));
    }
    Tensor::from_slice(&buf)
        .view([imgs.len() as i64, 3, s, s])
        .to_device(device)
}

/// P(PNEUMONIA) for each image, eval mode.
fn predict(
    net: &model::DenseNet,
    pre: &Preprocessor,
    imgs: &[GrayImage],
    device: Device,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(imgs.len());
    tch::no_grad(|| {
        for chunk in imgs.chunks(32) {
            let x = tensor_batch(pre, chunk, device);
            let p = net
                .forward_t(&x, false)
                .softmax(1, Kind::Float)
                .to_device(Device::Cpu);
            let col =
                Vec::<f32>::try_from(p.select(1, 1).contiguous()).expect("float probabilities");
            out.extend(col.into_iter().map(f64::from));
        }
    });
    out
}

fn val_loss(scores: &[f64], labels: &[u8]) -> f64 {
    let eps = 1e-7;
    scores
        .iter()
        .zip(labels)
        .map(|(&p, &l)| -(if l == 1 { p } else { 1.0 - p }).max(eps).ln())
        .sum::<f64>()
        / scores.len().max(1) as f64
}

/// Runs training end to end.
/// Returns `None` when `--stop-after-steps` stopped it (checkpoint saved).
pub fn run(args: &TrainArgs) -> anyhow::Result<Option<RunOutput>> {
    use anyhow::{Context, anyhow};
    args.validate().map_err(|e| anyhow!(e))?;
    let name = args.name();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Auto => Device::cuda_if_available(),
        DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceArg::Cuda => return Err(anyhow!("--device cuda: libtorch sees no CUDA device")),
    };
    tch::manual_seed(args.seed as i64);
    let arch = match args.arch {
        ArchArg::Densenet161 => DenseNetConfig::densenet161(),
        ArchArg::Tiny => DenseNetConfig::tiny(),
    };

    // Data: split train by patient; test stays untouched until the end.
    let all_train = limit(
        data::scan(&args.data, "train").map_err(|e| anyhow!(e))?,
        args.limit_per_class,
    );
    let test = Split::new(limit(
        data::scan(&args.data, "test").map_err(|e| anyhow!(e))?,
        args.limit_per_class,
    ));
    let (mut train, val) = data::split_by_patient(&all_train, args.val_fraction, args.seed);
    let val = Split::new(val);
    let counts = data::class_counts(&train);
    log(format!(
        "{name}: train {} (NORMAL {}, PNEUMONIA {}), validation {} ({} patients apart), test {}; device {device:?}",
        train.len(),
        counts[0],
        counts[1],
        val.samples.len(),
        val.samples
            .iter()
            .map(|s| &s.patient)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        test.samples.len()
    ));
    let mut generated = 0;
    let loss_weights = match args.strategy {
        StrategyArg::Weighted => Some(data::class_weights(counts)),
        // An imported run made its own copies; its card says how many.
        StrategyArg::Augmented if args.import_weights.is_some() => None,
        StrategyArg::Augmented => {
            let need = counts[1].saturating_sub(counts[0]);
            let extra = data::top_up(
                &train,
                need,
                &args.out.join("generated").join("NORMAL"),
                args.seed,
            )
            .map_err(|e| anyhow!(e))?;
            generated = extra.len();
            train.extend(extra);
            let c = data::class_counts(&train);
            log(format!(
                "augmented: generated {generated} NORMAL images; classes now {} / {}",
                c[0], c[1]
            ));
            None
        }
    };
    let train = Split::new(train);

    // Model and optimizer.
    let mut vs = nn::VarStore::new(device);
    let net = model::DenseNet::new(&vs.root(), &arch);
    if let Some(w) = &args.init_weights {
        let n = model::load_torchvision(&mut vs, w).map_err(|e| anyhow!(e))?;
        log(format!("initialised {n} tensors from {}", w.display()));
    }
    let export = ExportInputs {
        args,
        arch: &arch,
        train: &train,
        val: &val,
        test: &test,
        loss_weights,
        generated,
        device,
        imported: None,
    };
    if let (Some(w), Some(h)) = (&args.import_weights, &args.import_history) {
        let strategy = match args.strategy {
            StrategyArg::Weighted => "weighted",
            StrategyArg::Augmented => "augmented",
        };
        let run =
            import::ImportedRun::read(h, w, strategy, &val.samples).map_err(|e| anyhow!(e))?;
        let n = model::load_torchvision_full(&mut vs, w).map_err(|e| anyhow!(e))?;
        log(format!(
            "imported {n} tensors from {} (best epoch {} of {}, trained on {})",
            w.display(),
            run.recipe.best_epoch,
            run.recipe.epochs,
            run.recipe.device
        ));
        let state = State {
            epoch: run.history.len() as u32,
            history: run.records(),
            best_epoch: Some(run.recipe.best_epoch),
            wall_time_s: run.recipe.wall_time_s,
            fingerprint: fingerprint(args),
            ..Default::default()
        };
        let export = ExportInputs {
            imported: Some(&run),
            ..export
        };
        write_history(&args.out.join("history.csv"), &state.history)?;
        return finish(&export, &mut vs, &net, &state, false).map(Some);
    }
    let mut opt = match args.optimizer {
        OptimizerArg::Adamw => nn::AdamW {
            wd: args.weight_decay,
            ..Default::default()
        }
        .build(&vs, args.lr)?,
        OptimizerArg::Sgd => nn::Sgd {
            momentum: 0.9,
            nesterov: true,
            wd: args.weight_decay,
            ..Default::default()
        }
        .build(&vs, args.lr)?,
    };
    let state_path = args.out.join(STATE_FILE);
    let ckpt_path = args.out.join("checkpoint.safetensors");
    let best_path = args.out.join("best.safetensors");
    let mut state = State {
        fingerprint: fingerprint(args),
        ..Default::default()
    };
    // Runs started before the state file was renamed write `state.json`: take the
    // newer of the two.
    let legacy_state = args.out.join("state.json");
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let existing = [state_path.clone(), legacy_state]
        .into_iter()
        .filter(|p| p.exists())
        .max_by_key(|p| modified(p));
    if let (true, None, Some(model)) = (args.resume, &existing, &args.resume_from) {
        let s = read_state(
            &model.with_extension("state"),
            args,
            "--resume-from",
            "use the same flags",
        )?;
        let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
        let weights = crate::onnx::read_weights(&bytes)
            .with_context(|| format!("reading the weights of {}", model.display()))?;
        model::load_weights(&mut vs, &weights)
            .map_err(|e| anyhow!("--resume-from {}: {e}", model.display()))?;
        state = s;
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
            save_vs(&vs, &best_path).map_err(|e| anyhow!(e))?;
        } else if let Some(b) = state.best_epoch.take() {
            state.best_val_loss = None;
            log(format!(
                "the best epoch so far ({b}) is not the interim model's; the best is chosen among the epochs from here on"
            ));
        }
        // From here on the run folder holds the checkpoint, as after any other step.
        checkpoint(&vs, &state, &ckpt_path, &state_path)?;
        write_history(&args.out.join("history.csv"), &state.history)?;
        log(format!(
            "resumed from {} at epoch {} step {} (global step {})",
            model.display(),
            state.epoch + 1,
            state.step,
            state.global_step
        ));
    }
    if let (true, Some(existing)) = (args.resume, existing) {
        let s = read_state(
            &existing,
            args,
            "--resume",
            "use the same flags or another --out",
        )?;
        vs.load(&ckpt_path)
            .with_context(|| format!("loading {}", ckpt_path.display()))?;
        state = s;
        log(format!(
            "resumed at epoch {} step {} (global step {})",
            state.epoch + 1,
            state.step,
            state.global_step
        ));
    }
    if args.export_only {
        if state.history.is_empty() {
            return Err(anyhow!(
                "--export-only: no finished epoch in {} yet",
                args.out.display()
            ));
        }
        return finish(&export, &mut vs, &net, &state, true).map(Some);
    }
    let loss_w =
        loss_weights.map(|w| Tensor::from_slice(&[w[0] as f32, w[1] as f32]).to_device(device));

    let steps_in = |e: u32| {
        let (_, b) = args.epoch_shape(e);
        let s = (train.samples.len() / b).max(1);
        args.max_steps_per_epoch.map_or(s, |m| s.min(m))
    };
    let total_steps: usize = (0..args.epochs).map(steps_in).sum();
    let mut cache: Option<(u32, Vec<GrayImage>, Vec<GrayImage>)> = None;
    let run_start = Instant::now();
    let base_wall = state.wall_time_s;
    let mut steps_this_run = 0usize;

    while state.epoch < args.epochs {
        let e = state.epoch;
        let (size, batch) = args.epoch_shape(e);
        let pre = Preprocessor::new(size, &Preprocessing::default()).map_err(|e| anyhow!(e))?;
        if cache.as_ref().is_none_or(|c| c.0 != size) {
            let t = Instant::now();
            let (tr, bad) = data::load_resized(&train.samples, &pre);
            report_bad(&bad, train.samples.len())?;
            let (va, bad) = data::load_resized(&val.samples, &pre);
            report_bad(&bad, val.samples.len())?;
            log(format!(
                "decoded {} images at {size} px in {:.1}s",
                tr.len() + va.len(),
                t.elapsed().as_secs_f64()
            ));
            cache = Some((size, tr, va));
        }
        let (_, tr_imgs, va_imgs) = cache.as_ref().expect("cache filled above");
        let steps = steps_in(e);
        let mut order: Vec<usize> = (0..train.samples.len()).collect();
        data::shuffle(
            &mut order,
            &mut SplitMix64(args.seed.wrapping_add(1000 + u64::from(e))),
        );
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", e + 1, args.epochs));
        bar.set_position(state.step as u64);
        let epoch_start = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = args.lr;
        while state.step < steps {
            let idx = &order[state.step * batch..(state.step + 1) * batch];
            let imgs: Vec<GrayImage> = idx
                .iter()
                .map(|&i| {
                    let mut rng = SplitMix64(args.seed ^ (u64::from(e) << 32) ^ i as u64);
                    data::augment(&tr_imgs[i], &AugmentSpec::TRAIN, &mut rng)
                })
                .collect();
            let x = tensor_batch(&pre, &imgs, device);
            let y = Tensor::from_slice(
                &idx.iter()
                    .map(|&i| i64::from(train.labels[i]))
                    .collect::<Vec<_>>(),
            )
            .to_device(device);
            lr = lr_at(args.schedule, args.lr, state.global_step, total_steps);
            opt.set_lr(lr);
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_loss(
                &y,
                loss_w.as_ref(),
                tch::Reduction::Mean,
                -100,
                args.label_smoothing,
            );
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(anyhow!(
                    "loss became {l} at epoch {} step {}: lower --lr",
                    e + 1,
                    state.step
                ));
            }
            loss_sum += l * batch as f64;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]) as usize;
            seen += batch;
            state.step += 1;
            state.global_step += 1;
            bar.set_position(state.step as u64);
            let ips = seen as f64 / epoch_start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4} acc {:.3} {ips:.1} img/s",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ));
            if state.step.is_multiple_of(10) && bar.is_hidden() {
                // No terminal (nohup): the bar is hidden, so log progress lines.
                log(format!(
                    "epoch {} step {}/{steps} loss {:.4} acc {:.3} lr {lr:.2e} {ips:.1} img/s",
                    e + 1,
                    state.step,
                    loss_sum / seen as f64,
                    correct as f64 / seen as f64
                ));
            }
            steps_this_run += 1;
            let stop =
                args.stop_after_steps.is_some_and(|n| steps_this_run >= n) && state.step < steps;
            if (state.step.is_multiple_of(args.checkpoint_every) && state.step < steps) || stop {
                state.wall_time_s = base_wall + run_start.elapsed().as_secs_f64();
                checkpoint(&vs, &state, &ckpt_path, &state_path)?;
            }
            if stop {
                bar.finish_and_clear();
                log(format!(
                    "stopped after {steps_this_run} steps at epoch {} step {}; continue with --resume",
                    e + 1,
                    state.step
                ));
                return Ok(None);
            }
        }
        bar.finish_and_clear();
        let scores = predict(&net, &pre, va_imgs, device);
        let m = Metrics::compute(&scores, &val.labels, 0.5);
        let rec = EpochRecord {
            epoch: e + 1,
            image_size: size,
            lr,
            train_loss: if seen > 0 {
                loss_sum / seen as f64
            } else {
                f64::NAN
            },
            train_accuracy: if seen > 0 {
                correct as f64 / seen as f64
            } else {
                f64::NAN
            },
            val_loss: val_loss(&scores, &val.labels),
            val_accuracy: m.accuracy,
            val_auc: m.auc.unwrap_or(f64::NAN),
            seconds: epoch_start.elapsed().as_secs_f64(),
            stress_val_loss: None,
            stress_val_auc: None,
        };
        log(format!(
            "epoch {} done: train loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} auc {:.4} | {:.0}s",
            rec.epoch,
            rec.train_loss,
            rec.train_accuracy,
            rec.val_loss,
            rec.val_accuracy,
            rec.val_auc,
            rec.seconds
        ));
        if size == args.export_size() && state.best_val_loss.is_none_or(|b| rec.val_loss <= b) {
            state.best_val_loss = Some(rec.val_loss);
            state.best_epoch = Some(rec.epoch);
            save_vs(&vs, &best_path).map_err(|e| anyhow!(e))?;
        }
        state.history.push(rec);
        state.epoch += 1;
        state.step = 0;
        state.wall_time_s = base_wall + run_start.elapsed().as_secs_f64();
        checkpoint(&vs, &state, &ckpt_path, &state_path)?;
        write_history(&args.out.join("history.csv"), &state.history)?;
    }
    finish(&export, &mut vs, &net, &state, false).map(Some)
}

/// Reads a checkpoint state (a run folder's, or the one shipped beside an interim
/// model) and refuses it when it was made with other flags than `args` (its
/// [`fingerprint`], or the legacy one of older checkpoints).
fn read_state(path: &Path, args: &TrainArgs, flag: &str, hint: &str) -> anyhow::Result<State> {
    use anyhow::Context;
    let fingerprint = fingerprint(args);
    let mut s: State = serde_json::from_str(
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

fn checkpoint(
    vs: &nn::VarStore,
    state: &State,
    ckpt: &Path,
    state_path: &Path,
) -> anyhow::Result<()> {
    save_vs(vs, ckpt).map_err(|e| anyhow::anyhow!(e))?;
    write_atomic(state_path, serde_json::to_string_pretty(state)?.as_bytes())
        .map_err(|e| anyhow::anyhow!(e))
}

fn write_history(path: &Path, h: &[EpochRecord]) -> anyhow::Result<()> {
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
    write_atomic(path, s.as_bytes()).map_err(|e| anyhow::anyhow!(e))
}

#[allow(clippy::too_many_arguments)]
/// What an export needs besides the weights and the state: fixed for the whole run.
#[derive(Clone, Copy)]
struct ExportInputs<'a> {
    args: &'a TrainArgs,
    arch: &'a DenseNetConfig,
    train: &'a Split,
    val: &'a Split,
    test: &'a Split,
    loss_weights: Option<[f64; 2]>,
    generated: usize,
    device: Device,
    /// A run trained elsewhere (`--import-weights`): its recipe goes into the card.
    imported: Option<&'a import::ImportedRun>,
}

fn finish(
    inputs: &ExportInputs<'_>,
    vs: &mut nn::VarStore,
    net: &model::DenseNet,
    state: &State,
    interim: bool,
) -> anyhow::Result<RunOutput> {
    use anyhow::{Context, anyhow};
    let ExportInputs {
        args,
        arch,
        train,
        val,
        test,
        loss_weights,
        generated,
        device,
        imported,
    } = *inputs;
    // An interim export (`--export-only`) takes the latest checkpoint as it is, at the
    // size it was last trained at, into `<out>/interim/`.
    let dest = if interim {
        args.out.join("interim")
    } else {
        args.out.clone()
    };
    let best_path = args.out.join("best.safetensors");
    if !interim && imported.is_none() && best_path.exists() {
        vs.load(&best_path)
            .with_context(|| format!("loading {}", best_path.display()))?;
    }
    let size = if interim {
        state
            .history
            .last()
            .map_or(args.image_size, |r| r.image_size)
    } else {
        args.export_size()
    };
    let pre = Preprocessor::new(size, &Preprocessing::default()).map_err(|e| anyhow!(e))?;
    let (va_imgs, _) = data::load_resized(&val.samples, &pre);
    // tch's validation scores, for the export parity check only: the card's metrics
    // are measured on the exported ONNX file through ONNX Runtime, as served.
    let tch_val = predict(net, &pre, &va_imgs, device);
    let (te_imgs, bad) = data::load_resized(&test.samples, &pre);
    report_bad(&bad, test.samples.len())?;
    let name = args.name();
    let version = if interim {
        format!("{}-interim.{}", args.model_version, state.global_step)
    } else {
        args.model_version.clone()
    };
    let weights = model::export_weights(vs);
    let strategy = match args.strategy {
        StrategyArg::Weighted => Strategy::Weighted,
        StrategyArg::Augmented => Strategy::Augmented,
    };
    let mut sizes: Vec<u32> = state.history.iter().map(|r| r.image_size).collect();
    sizes.dedup();
    let recipe = Recipe {
        strategy,
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
        train_images: train.samples.len() as u64,
        train_class_counts: data::class_counts(&train.samples)
            .iter()
            .map(|&c| c as u64)
            .collect(),
        validation_images: val.samples.len() as u64,
        class_weights: loss_weights.map(|w| w.to_vec()).unwrap_or_default(),
        generated_images: generated as u64,
        init: args
            .init_weights
            .as_ref()
            .map_or("scratch".into(), |p| p.display().to_string()),
        device: format!("{device:?}").to_lowercase(),
        wall_time_s: state.wall_time_s,
        export_parity_max_abs_diff: None,
        notes: {
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
            notes.join(" ")
        },
    };
    let recipe = match imported {
        None => recipe,
        Some(run) => imported_recipe(recipe, run),
    };
    let description = match strategy {
        Strategy::Weighted => {
            "DenseNet-161, class-weighted cross-entropy (weight = 1 - n_class/n_total)."
        }
        Strategy::Augmented => {
            "DenseNet-161, NORMAL topped up with transformed copies to balance the classes."
        }
        Strategy::None => "DenseNet.",
    };
    let mut card = crate::registry::write_model(
        &dest,
        &NewModel {
            name: &name,
            version: &version,
            description,
            architecture_name: match args.arch {
                ArchArg::Densenet161 => "densenet161",
                ArchArg::Tiny => "densenet-tiny",
            },
            config: arch,
            weights: &weights,
            input_size: size,
            storage: args.storage.into(),
            // Placeholders until the ONNX file is measured below.
            threshold: 0.5,
            training: recipe,
            metrics: CardMetrics::default(),
        },
    )
    .map_err(|e| anyhow!(e))?;
    let onnx = dest.join(&card.onnx.file);

    // Measure the written file with ONNX Runtime, exactly as cxr-serve runs it.
    let lib = crate::inference::resolve_library(args.ort_lib.as_deref());
    let env = crate::inference::environment(&lib)?;
    let bytes = std::fs::read(&onnx)?;
    let opts = crate::inference::SessionOptions {
        device: crate::inference::Device::Cpu,
        intra_threads: 0,
        cpu_arena: false,
        intra_spinning: true,
    };
    let (mut session, _, _) = crate::inference::create_session(env, &bytes, opts)?;
    debug_assert_eq!(
        pre.size(),
        size,
        "the export measures at the model's input size"
    );
    let mut ort_outputs = |imgs: &[GrayImage]| run_images(&mut session, &pre, imgs);
    let val_out = ort_outputs(&va_imgs)?;
    let diff = val_out
        .iter()
        .zip(&tch_val)
        .map(|(o, t)| (f64::from(o.probabilities[1]) - t).abs())
        .fold(0.0, f64::max);
    let bound = match args.storage {
        config::StorageArg::Fp32 => 1e-4,
        config::StorageArg::Fp16 => 1e-2,
    };
    log(format!(
        "export parity: max |ORT - tch| = {diff:.2e} on {} validation images (bound {bound:.0e})",
        val_out.len()
    ));
    if diff > bound {
        let _ = std::fs::remove_file(&onnx);
        let _ = std::fs::remove_file(dest.join(format!("{name}.json")));
        anyhow::bail!(
            "export parity check failed: ONNX Runtime and tch differ by {diff:.2e} > {bound:.0e}"
        );
    }
    // The stress validation: the same images under fixed, seeded perturbations.
    let stress_imgs: Vec<GrayImage> = va_imgs
        .iter()
        .enumerate()
        .map(|(i, g)| stress::perturb(g, stress::STRESS_SEED, i as u64))
        .collect();
    let stress_out = ort_outputs(&stress_imgs)?;
    // Calibration on the clean validation logits; every figure below is of the served
    // (calibrated) probabilities, computed by the function the server uses.
    let logits = |o: &[ModelOutput]| o.iter().map(|o| o.logits).collect::<Vec<_>>();
    let val_logits = logits(&val_out);
    let temperature = fit_temperature(&val_logits, &val.labels);
    let served = |o: &[ModelOutput]| -> Vec<f64> {
        o.iter()
            .map(|o| {
                f64::from(served_probabilities(o.logits, o.probabilities, Some(temperature))[1])
            })
            .collect()
    };
    let val_scores = served(&val_out);
    let stress_scores = served(&stress_out);
    let pooled_scores = [val_scores.clone(), stress_scores.clone()].concat();
    let pooled_labels = [val.labels.clone(), val.labels.clone()].concat();
    let threshold = choose_threshold(args.threshold, &pooled_scores, &pooled_labels);
    let val_metrics = Metrics::compute(&val_scores, &val.labels, threshold);
    let stress_metrics = Metrics::compute(&stress_scores, &val.labels, threshold);
    let source = format!(
        "validation, clean and stressed together ({} + {} images)",
        val_scores.len(),
        stress_scores.len()
    );
    let curve = OperatingCurve::from_roc(
        source.clone(),
        pooled_scores.len() as u64,
        &roc_curve(&pooled_scores, &pooled_labels),
    )
    .thinned(200);
    log(format!(
        "temperature {temperature:.3}; threshold {threshold:.3} ({} on {source}); validation clean: sens {:.4} spec {:.4} AUC {:.4}; stressed: sens {:.4} spec {:.4} AUC {:.4}",
        args.threshold,
        val_metrics.sensitivity,
        val_metrics.specificity,
        val_metrics.auc.unwrap_or(f64::NAN),
        stress_metrics.sensitivity,
        stress_metrics.specificity,
        stress_metrics.auc.unwrap_or(f64::NAN)
    ));
    // The test split, once.
    let test_out = ort_outputs(&te_imgs)?;
    let test_scores = served(&test_out);
    let test_metrics = Metrics::compute(&test_scores, &test.labels, threshold);
    // The same decisions on the uncalibrated probabilities: p >= sigmoid(T * logit(t)).
    let raw_threshold = 1.0 / (1.0 + (-temperature * (threshold / (1.0 - threshold)).ln()).exp());
    let raw_test: Vec<f64> = test_out
        .iter()
        .map(|o| f64::from(o.probabilities[1]))
        .collect();
    let test_ece_before =
        crate::eval::expected_calibration_error(&raw_test, &test.labels, raw_threshold, 10);
    log(format!(
        "test (n={}): accuracy {:.4} sensitivity {:.4} specificity {:.4} AUC {:.4} ECE {:.4} (uncalibrated {:.4}) at threshold {threshold:.3}",
        test_metrics.n,
        test_metrics.accuracy,
        test_metrics.sensitivity,
        test_metrics.specificity,
        test_metrics.auc.unwrap_or(f64::NAN),
        test_metrics.ece,
        test_ece_before
    ));
    card.threshold = threshold;
    card.threshold_rule = Some(format!(
        "{} on the calibrated probabilities of the {source}",
        args.threshold
    ));
    card.calibration = Some(Calibration {
        temperature,
        method: format!(
            "temperature scaling: T minimising the negative log-likelihood of the {} clean validation images (golden-section search on log T in [0.05, 20])",
            val_scores.len()
        ),
        validation_nll_before: nll(&val_logits, &val.labels, 1.0),
        validation_nll_after: nll(&val_logits, &val.labels, temperature),
        test_ece_before: Some(test_ece_before),
        test_ece_after: Some(test_metrics.ece),
    });
    card.operating_curve = Some(curve);
    card.metrics = CardMetrics {
        test: Some(test_metrics.clone()),
        validation: Some(val_metrics),
        validation_stressed: Some(stress_metrics),
    };
    card.training.export_parity_max_abs_diff = Some(diff);
    card.training.wall_time_s = state.wall_time_s;
    if !card.training.notes.is_empty() {
        card.training.notes.push(' ');
    }
    card.training.notes += &format!("Stress validation: {}.", stress::DESCRIPTION);
    let json = serde_json::to_string_pretty(&card)? + "\n";
    write_atomic(&dest.join(format!("{name}.json")), json.as_bytes()).map_err(|e| anyhow!(e))?;
    let scores = TestScores::new(&card, &args.data.join("test"), &test.samples, &test_scores);
    write_atomic(
        &dest.join(format!("{name}.test-scores.json")),
        (serde_json::to_string_pretty(&scores)? + "\n").as_bytes(),
    )
    .map_err(|e| anyhow!(e))?;
    if !interim {
        // The out-of-distribution model, on the embeddings of the training split as
        // this run split it (a run on a subset of the data has no split to rebuild).
        if args.limit_per_class.is_none() {
            let summary = ood::fit_card(
                &dest.join(format!("{name}.json")),
                &args.data,
                &lib,
                &args.out.join("ood-cache"),
                0.99,
                args.val_fraction,
                false,
            )?;
            tracing::info!(target: "cxr::train", "{summary}");
            // The INT8 copy, measured against this file (it needs the OOD entry).
            if !args.no_int8 {
                let summary = quantize::quantize_card(
                    &dest.join(format!("{name}.json")),
                    &args.data,
                    &lib,
                    args.val_fraction,
                )?;
                tracing::info!(target: "cxr::train", "{summary}");
            }
        } else {
            tracing::warn!(target: "cxr::train", "no OOD model fitted: --limit-per-class trains on a subset; run cxr-train fit-ood on the full data");
        }
    }
    if interim {
        // The progress this model was exported at, for `--resume-from` on a machine
        // that lacks the run folder (the ONNX file holds the weights).
        write_atomic(
            &dest.join(format!("{name}.state")),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
        .map_err(|e| anyhow!(e))?;
    }
    if let Err(e) = plots::write_all(
        &dest,
        &state.history,
        &val_scores,
        &val.labels,
        &test_scores,
        &test.labels,
        &test_metrics,
    ) {
        tracing::warn!(target: "cxr::train", "plots not written: {e}");
    }
    log(format!("wrote {} and its card", onnx.display()));
    Ok(RunOutput { card, onnx })
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
        let state = |fp: String| State {
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
        let write = |s: &State| std::fs::write(&path, serde_json::to_string(s).unwrap()).unwrap();
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

/// Every test image's served probability and answer, as the card's measurement saw
/// them (`<name>.test-scores.json` beside the card): what
/// `scripts/check_served_metrics.py` compares a running server with, image by image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestScores {
    /// Variant name.
    pub model: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the ONNX file measured.
    pub onnx_sha256: String,
    /// The card's threshold.
    pub threshold: f64,
    /// The card's temperature (none: the file's softmax).
    pub temperature: Option<f64>,
    /// One entry per test image, in file order.
    pub images: Vec<TestScore>,
}

/// One test image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestScore {
    /// Path under the test folder, `NORMAL/…` or `PNEUMONIA/…`.
    pub file: String,
    /// 0 NORMAL, 1 PNEUMONIA.
    pub label: u8,
    /// Served (calibrated) P(PNEUMONIA).
    pub p_pneumonia: f64,
    /// The label answered at the card's threshold.
    pub answer: String,
}

impl TestScores {
    /// The scores of `samples` (under `root`) for `card`.
    pub fn new(card: &ModelCard, root: &Path, samples: &[data::Sample], scores: &[f64]) -> Self {
        Self {
            model: card.name.clone(),
            version: card.version.clone(),
            onnx_sha256: card.onnx.sha256.clone(),
            threshold: card.threshold,
            temperature: card.temperature(),
            images: samples
                .iter()
                .zip(scores)
                .map(|(s, &p)| TestScore {
                    file: s
                        .path
                        .strip_prefix(root)
                        .unwrap_or(&s.path)
                        .to_string_lossy()
                        .into_owned(),
                    label: s.label,
                    p_pneumonia: p,
                    answer: if p >= card.threshold {
                        "PNEUMONIA"
                    } else {
                        "NORMAL"
                    }
                    .into(),
                })
                .collect(),
        }
    }
}

/// Every image's outputs through `session` (images already resized; batches of 8), as
/// the export, `test-scores`, `fit-ood` and `quantize` measure them.
pub(crate) fn run_images(
    session: &mut ort::session::Session,
    pre: &Preprocessor,
    imgs: &[GrayImage],
) -> anyhow::Result<Vec<ModelOutput>> {
    let s = pre.size() as usize;
    let mut out = Vec::with_capacity(imgs.len());
    for chunk in imgs.chunks(8) {
        let batch: Vec<f32> = chunk.iter().flat_map(|g| pre.normalize(g)).collect();
        out.extend(
            crate::inference::run_outputs(session, batch, chunk.len(), s)
                .map_err(|e| anyhow::anyhow!(e))?,
        );
    }
    Ok(out)
}

/// A shipped model's preprocessing and a CPU session on its verified ONNX bytes, as the
/// export measures them.
pub(crate) fn measuring_session(
    loaded: &crate::registry::LoadedModel,
    ort_lib: &Path,
) -> anyhow::Result<(Preprocessor, ort::session::Session)> {
    let card = &loaded.card;
    let pre =
        Preprocessor::new(card.input_size, &card.preprocessing).map_err(|e| anyhow::anyhow!(e))?;
    let env = crate::inference::environment(ort_lib)?;
    let opts = crate::inference::SessionOptions {
        device: crate::inference::Device::Cpu,
        intra_threads: 0,
        cpu_arena: false,
        intra_spinning: true,
    };
    let (session, _, _) = crate::inference::create_session(env, &loaded.onnx_bytes, opts)?;
    Ok((pre, session))
}

/// `cxr-train test-scores`: measures a shipped model's ONNX file on the test split
/// through ONNX Runtime as the export does (same preprocessing, batches of 8, the
/// card's temperature), checks the accuracy, confusion matrix and AUC equal the
/// card's, and writes `<name>.test-scores.json` beside the card.
pub fn write_test_scores(
    card_path: &Path,
    data_dir: &Path,
    ort_lib: &Path,
) -> anyhow::Result<usize> {
    let loaded = crate::registry::load_card(card_path)?;
    let (pre, mut session) = measuring_session(&loaded, ort_lib)?;
    let card = loaded.card;
    let test = data::scan(data_dir, "test").map_err(|e| anyhow::anyhow!(e))?;
    let (imgs, bad) = data::load_resized(&test, &pre);
    report_bad(&bad, test.len())?;
    let scores: Vec<f64> = run_images(&mut session, &pre, &imgs)?
        .into_iter()
        .map(|o| f64::from(served_probabilities(o.logits, o.probabilities, card.temperature())[1]))
        .collect();
    let labels: Vec<u8> = test.iter().map(|t| t.label).collect();
    let m = Metrics::compute(&scores, &labels, card.threshold);
    let want = card
        .metrics
        .test
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the card has no test metrics to check against"))?;
    if m.confusion != want.confusion
        || (m.auc.unwrap_or(0.0) - want.auc.unwrap_or(0.0)).abs() > 1e-9
    {
        anyhow::bail!(
            "the measurement differs from the card: confusion {:?} AUC {:?} vs {:?} {:?}",
            m.confusion,
            m.auc,
            want.confusion,
            want.auc
        );
    }
    let out = TestScores::new(&card, &data_dir.join("test"), &test, &scores);
    let path = card_path.with_file_name(format!("{}.test-scores.json", card.name));
    write_atomic(
        &path,
        (serde_json::to_string_pretty(&out)? + "\n").as_bytes(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(out.images.len())
}
