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
mod error;
mod export;
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

use checkpoint::*;
pub use checkpoint::{EpochRecord, STATE_FILE, TrainState};
pub use config::TrainArgs;
use config::{ArchArg, DeviceArg, OptimizerArg, ScheduleArg, StrategyArg, ThresholdRule};
use data::{AugmentSpec, Sample};
pub use error::TrainError;
use export::*;
pub use export::{TestScore, TestScores, write_test_scores};

use crate::arch::{DenseNetConfig, SplitMix64};
use crate::eval::calibration::nll;
use crate::eval::{
    Calibration, Metrics, OperatingCurve, fit_temperature, roc_curve, served_probabilities, stress,
};
use crate::imaging::{Preprocessing, Preprocessor};
use crate::inference::ModelOutput;
use crate::registry::{CardMetrics, ModelCard, NewModel, Recipe, Strategy};

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
    args.validate()?;
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
    let all_train = limit_per_class(data::scan(&args.data, "train")?, args.limit_per_class);
    let test = Split::new(limit_per_class(
        data::scan(&args.data, "test")?,
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
        let n = model::load_torchvision(&mut vs, w)?;
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
        let run = import::ImportedRun::read(h, w, strategy, &val.samples)?;
        let n = model::load_torchvision_full(&mut vs, w)?;
        log(format!(
            "imported {n} tensors from {} (best epoch {} of {}, trained on {})",
            w.display(),
            run.recipe.best_epoch,
            run.recipe.epochs,
            run.recipe.device
        ));
        let state = TrainState {
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
    let mut state = TrainState {
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
            save_vs(&vs, &best_path)?;
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
            save_vs(&vs, &best_path)?;
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
}
