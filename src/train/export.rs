//! The export: the ONNX file by our writer, measured through ONNX Runtime with the
//! serving preprocessing (validation → threshold and temperature; test once), the
//! card, per-image test scores and plots; and the measuring helpers that `fit-ood`,
//! `quantize` and `test-scores` share.

use super::*;

#[allow(clippy::too_many_arguments)]
/// What an export needs besides the weights and the state: fixed for the whole run.
#[derive(Clone, Copy)]
pub(super) struct ExportInputs<'a> {
    pub(super) args: &'a TrainArgs,
    pub(super) arch: &'a DenseNetConfig,
    pub(super) train: &'a Split,
    pub(super) val: &'a Split,
    pub(super) test: &'a Split,
    pub(super) loss_weights: Option<[f64; 2]>,
    pub(super) generated: usize,
    pub(super) device: Device,
    /// A run trained elsewhere (`--import-weights`): its recipe goes into the card.
    pub(super) imported: Option<&'a import::ImportedRun>,
}

pub(super) fn finish(
    inputs: &ExportInputs<'_>,
    vs: &mut nn::VarStore,
    net: &model::DenseNet,
    state: &TrainState,
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
    write_atomic(&dest.join(format!("{name}.json")), json.as_bytes())?;
    let scores = TestScores::new(&card, &args.data.join("test"), &test.samples, &test_scores);
    write_atomic(
        &dest.join(format!("{name}.test-scores.json")),
        (serde_json::to_string_pretty(&scores)? + "\n").as_bytes(),
    )?;
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
        )?;
    }
    let plot_data = plots::PlotData {
        history: &state.history,
        val_scores: &val_scores,
        val_labels: &val.labels,
        test_scores: &test_scores,
        test_labels: &test.labels,
        test: &test_metrics,
    };
    if let Err(e) = plots::write_all(&dest, &plot_data) {
        tracing::warn!(target: "cxr::train", "plots not written: {e}");
    }
    log(format!("wrote {} and its card", onnx.display()));
    Ok(RunOutput { card, onnx })
}

/// The card's recipe for a run trained elsewhere: what the run's own history says.
pub(super) fn imported_recipe(mut r: Recipe, run: &import::ImportedRun) -> Recipe {
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
    let test = data::scan(data_dir, "test")?;
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
    )?;
    Ok(out.images.len())
}
