//! The epoch loop: training steps with checkpoints every `--checkpoint-every` steps,
//! a validation pass at each epoch end (the best epoch by validation loss), and the
//! stop after `--stop-after-steps`.

use crate::eval::Metrics;
use crate::eval::mean_log_loss;
use crate::imaging::Preprocessing;
use crate::imaging::Preprocessor;
use crate::model::arch::SplitMix64;
use crate::train::checkpoint::EpochRecord;
use crate::train::checkpoint::save_vs;
use crate::train::checkpoint::write_history;
use crate::train::data;
use crate::train::data::AugmentSpec;
use crate::train::error::TrainError;
use crate::train::log;
use crate::train::lr_at;
use crate::train::model;
use crate::train::report_bad;
use crate::train::trainer::Trainer;
use image::GrayImage;
use std::time::Instant;
use tch::Device;
use tch::Kind;
use tch::Tensor;

/// How [`Trainer::train`] ended.
pub(super) enum Trained {
    /// Every epoch ran.
    Done,
    /// `--stop-after-steps` stopped it; the checkpoint is saved.
    Stopped,
}

/// The running sums of an epoch's training steps.
#[derive(Default)]
struct EpochSums {
    loss: f64,
    correct: usize,
    seen: usize,
    lr: f64,
}

impl EpochSums {
    fn loss(&self) -> f64 {
        if self.seen > 0 {
            self.loss / self.seen as f64
        } else {
            f64::NAN
        }
    }

    fn accuracy(&self) -> f64 {
        if self.seen > 0 {
            self.correct as f64 / self.seen as f64
        } else {
            f64::NAN
        }
    }
}

/// What the steps of one epoch share.
struct EpochPlan<'p> {
    epoch: u32,
    size: u32,
    batch: usize,
    steps: usize,
    pre: Preprocessor,
    images: &'p [GrayImage],
    order: Vec<usize>,
}

/// Decoded training and validation images at one size, kept while the size holds.
struct Decoded {
    size: u32,
    train: Vec<GrayImage>,
    val: Vec<GrayImage>,
}

impl Trainer<'_> {
    /// Trains from the current progress to the last epoch.
    pub(super) fn train(&mut self) -> anyhow::Result<Trained> {
        let args = self.args;
        let loss_w = self
            .loss_weights
            .map(|w| Tensor::from_slice(&[w[0] as f32, w[1] as f32]).to_device(self.device));
        let total_steps: usize = (0..args.epochs).map(|e| self.steps_in(e)).sum();
        let mut clock = RunClock {
            start: Instant::now(),
            base_wall: self.state.wall_time_s,
            steps: 0,
        };
        let mut cache: Option<Decoded> = None;
        while self.state.epoch < args.epochs {
            let e = self.state.epoch;
            let (size, batch) = args.epoch_shape(e);
            let pre = Preprocessor::new(size, &Preprocessing::default())
                .map_err(|e| TrainError::Flags(e.0))?;
            if cache.as_ref().is_none_or(|c| c.size != size) {
                cache = Some(self.decode(size, &pre)?);
            }
            let decoded = cache.as_ref().expect("cache filled above");
            let mut order: Vec<usize> = (0..self.train.samples.len()).collect();
            data::shuffle(
                &mut order,
                &mut SplitMix64(args.seed.wrapping_add(1000 + u64::from(e))),
            );
            let plan = EpochPlan {
                epoch: e,
                size,
                batch,
                steps: self.steps_in(e),
                pre,
                images: &decoded.train,
                order,
            };
            let epoch_start = Instant::now();
            let sums = match self.epoch_steps(&plan, loss_w.as_ref(), total_steps, &mut clock)? {
                Some(sums) => sums,
                None => return Ok(Trained::Stopped),
            };
            self.end_epoch(&plan, &decoded.val, &sums, epoch_start, &clock)?;
        }
        Ok(Trained::Done)
    }

    /// Training steps in epoch `e` (whole batches, at most `--max-steps-per-epoch`).
    fn steps_in(&self, e: u32) -> usize {
        let (_, b) = self.args.epoch_shape(e);
        let s = (self.train.samples.len() / b).max(1);
        self.args.max_steps_per_epoch.map_or(s, |m| s.min(m))
    }

    fn decode(&self, size: u32, pre: &Preprocessor) -> anyhow::Result<Decoded> {
        let t = Instant::now();
        let (train, bad) = data::load_resized(&self.train.samples, pre);
        report_bad(&bad, self.train.samples.len())?;
        let (val, bad) = data::load_resized(&self.val.samples, pre);
        report_bad(&bad, self.val.samples.len())?;
        log(format!(
            "decoded {} images at {size} px in {:.1}s",
            train.len() + val.len(),
            t.elapsed().as_secs_f64()
        ));
        Ok(Decoded { size, train, val })
    }

    /// The epoch's remaining steps; `None` when `--stop-after-steps` stopped the run
    /// (checkpoint saved).
    fn epoch_steps(
        &mut self,
        plan: &EpochPlan<'_>,
        loss_w: Option<&Tensor>,
        total_steps: usize,
        clock: &mut RunClock,
    ) -> anyhow::Result<Option<EpochSums>> {
        let args = self.args;
        let bar = progress_bar(plan.steps, plan.epoch, args.epochs, self.state.step);
        let start = Instant::now();
        let mut sums = EpochSums {
            lr: args.lr,
            ..Default::default()
        };
        while self.state.step < plan.steps {
            sums.lr = lr_at(args.schedule, args.lr, self.state.global_step, total_steps);
            self.optim.set_lr(sums.lr);
            self.step(plan, loss_w, &mut sums)?;
            bar.set_position(self.state.step as u64);
            let ips = sums.seen as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4} acc {:.3} {ips:.1} img/s",
                sums.loss(),
                sums.accuracy()
            ));
            if self.state.step.is_multiple_of(10) && bar.is_hidden() {
                // No terminal (nohup): the bar is hidden, so log progress lines.
                log(format!(
                    "epoch {} step {}/{} loss {:.4} acc {:.3} lr {:.2e} {ips:.1} img/s",
                    plan.epoch + 1,
                    self.state.step,
                    plan.steps,
                    sums.loss(),
                    sums.accuracy(),
                    sums.lr
                ));
            }
            clock.steps += 1;
            let more = self.state.step < plan.steps;
            let stop = args.stop_after_steps.is_some_and(|n| clock.steps >= n) && more;
            if (self.state.step.is_multiple_of(args.checkpoint_every) && more) || stop {
                self.state.wall_time_s = clock.wall_time_s();
                self.save_checkpoint()?;
            }
            if stop {
                bar.finish_and_clear();
                log(format!(
                    "stopped after {} steps at epoch {} step {}; continue with --resume",
                    clock.steps,
                    plan.epoch + 1,
                    self.state.step
                ));
                return Ok(None);
            }
        }
        bar.finish_and_clear();
        Ok(Some(sums))
    }

    /// One optimizer step on the batch at the current step of `plan.order`.
    fn step(
        &mut self,
        plan: &EpochPlan<'_>,
        loss_w: Option<&Tensor>,
        sums: &mut EpochSums,
    ) -> anyhow::Result<()> {
        let (args, step, batch) = (self.args, self.state.step, plan.batch);
        let idx = &plan.order[step * batch..(step + 1) * batch];
        let imgs: Vec<GrayImage> = idx
            .iter()
            .map(|&i| {
                let mut rng = SplitMix64(args.seed ^ (u64::from(plan.epoch) << 32) ^ i as u64);
                data::augment(&plan.images[i], &AugmentSpec::TRAIN, &mut rng)
            })
            .collect();
        let x = tensor_batch(&plan.pre, &imgs, self.device);
        let labels: Vec<i64> = idx
            .iter()
            .map(|&i| i64::from(self.train.labels[i]))
            .collect();
        let y = Tensor::from_slice(&labels).to_device(self.device);
        let logits = self.net.forward_t(&x, true);
        let loss =
            logits.cross_entropy_loss(&y, loss_w, tch::Reduction::Mean, -100, args.label_smoothing);
        self.optim.backward_step(&loss);
        let l = loss.double_value(&[]);
        if !l.is_finite() {
            anyhow::bail!(
                "loss became {l} at epoch {} step {step}: lower --lr",
                plan.epoch + 1
            );
        }
        sums.loss += l * batch as f64;
        sums.correct += logits
            .argmax(1, false)
            .eq_tensor(&y)
            .sum(Kind::Int64)
            .int64_value(&[]) as usize;
        sums.seen += batch;
        self.state.step += 1;
        self.state.global_step += 1;
        Ok(())
    }

    /// Validates, keeps the best epoch's weights (at the export size, by validation
    /// loss), records the epoch and checkpoints.
    fn end_epoch(
        &mut self,
        plan: &EpochPlan<'_>,
        val_images: &[GrayImage],
        sums: &EpochSums,
        epoch_start: Instant,
        clock: &RunClock,
    ) -> anyhow::Result<()> {
        let scores = predict(&self.net, &plan.pre, val_images, self.device);
        let m = Metrics::compute(&scores, &self.val.labels, 0.5);
        let rec = EpochRecord {
            epoch: plan.epoch + 1,
            image_size: plan.size,
            lr: sums.lr,
            train_loss: sums.loss(),
            train_accuracy: sums.accuracy(),
            val_loss: mean_log_loss(&scores, &self.val.labels),
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
        let state = &mut self.state;
        if plan.size == self.args.export_size()
            && state.best_val_loss.is_none_or(|b| rec.val_loss <= b)
        {
            state.best_val_loss = Some(rec.val_loss);
            state.best_epoch = Some(rec.epoch);
            save_vs(&self.vs, &self.files.best)?;
        }
        state.history.push(rec);
        state.epoch += 1;
        state.step = 0;
        state.wall_time_s = clock.wall_time_s();
        self.save_checkpoint()?;
        write_history(&self.files.history, &self.state.history)
    }
}

/// This process's share of the run's wall time, and its steps.
struct RunClock {
    start: Instant,
    /// Wall time of the run before this process resumed it.
    base_wall: f64,
    /// Steps taken by this process.
    steps: usize,
}

impl RunClock {
    fn wall_time_s(&self) -> f64 {
        self.base_wall + self.start.elapsed().as_secs_f64()
    }
}

fn progress_bar(steps: usize, epoch: u32, epochs: u32, at: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar.set_position(at as u64);
    bar
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
pub(super) fn predict(
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
