//! The export: the ONNX file by our writer, measured through ONNX Runtime with the
//! serving preprocessing (validation → threshold and temperature; test once), the
//! card, per-image test scores and plots; and the measuring helpers that `fit-ood`,
//! `quantize` and `test-scores` share.

use crate::eval::Calibration;
use crate::eval::Metrics;
use crate::eval::OperatingCurve;
use crate::eval::calibration::nll;
use crate::eval::choose_threshold;
use crate::eval::fit_temperature;
use crate::eval::roc_curve;
use crate::eval::stress;
use crate::imaging::Preprocessing;
use crate::imaging::Preprocessor;
use crate::inference::ModelOutput;
use crate::registry::CardMetrics;
use crate::registry::ModelCard;
use crate::registry::NewModel;
use crate::registry::Strategy;
use crate::train::RunOutput;
use crate::train::checkpoint::write_atomic;
use crate::train::config;
use crate::train::config::ArchArg;
use crate::train::config::ThresholdRule;
use crate::train::data;
use crate::train::epochs::predict;
use crate::train::error::TrainError;
use crate::train::fit_ood;
use crate::train::int8_copy;
use crate::train::log;
use crate::train::model;
use crate::train::plots;
use crate::train::report_bad;
use crate::train::scores::TestScores;
use crate::train::scores::served_scores;
use crate::train::trainer::Trainer;
use image::GrayImage;
use std::path::Path;

/// The images an export measures, at the model's input size.
struct ExportImages {
    pre: Preprocessor,
    val: Vec<GrayImage>,
    test: Vec<GrayImage>,
    /// tch's validation P(PNEUMONIA), for the export parity check only: the card's
    /// metrics are measured on the exported ONNX file through ONNX Runtime, as served.
    tch_val: Vec<f64>,
}

/// What the measurement of the written file found.
struct Measured {
    /// Largest |ONNX Runtime − tch| on validation.
    parity: f64,
    temperature: f64,
    threshold: f64,
    /// The validation set the threshold was chosen on, in words.
    source: String,
    val_logits: Vec<[f32; 2]>,
    val_scores: Vec<f64>,
    val: Metrics,
    stressed: Metrics,
    curve: OperatingCurve,
    test_scores: Vec<f64>,
    test: Metrics,
    test_ece_before: f64,
}

impl Trainer<'_> {
    /// Writes the model, measures it through ONNX Runtime and completes its card and
    /// the files beside it. An interim export (`--export-only`) takes the latest
    /// checkpoint as it is, at the size it was last trained at, into `<out>/interim/`;
    /// a final one takes the best epoch's weights.
    pub(super) fn export(&mut self, interim: bool) -> anyhow::Result<RunOutput> {
        use anyhow::Context;
        let args = self.args;
        let dest = if interim {
            args.out.join("interim")
        } else {
            args.out.clone()
        };
        let best = &self.files.best;
        if !interim && self.imported.is_none() && best.exists() {
            self.vs
                .load(best)
                .with_context(|| format!("loading {}", best.display()))?;
        }
        let size = if interim {
            let last = self.state.history.last();
            last.map_or(args.image_size, |r| r.image_size)
        } else {
            args.export_size()
        };
        let images = self.export_images(size)?;
        let mut card = self.write_model(&dest, size, interim)?;
        let onnx = dest.join(&card.onnx.file);
        let lib = crate::inference::resolve_library(args.ort_lib.as_deref());
        let measured = match self.measure(&lib, &onnx, &images) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&onnx);
                let _ = std::fs::remove_file(dest.join(format!("{}.json", args.name())));
                return Err(e);
            }
        };
        self.complete_card(&mut card, &measured);
        let cards = self.write_beside(&dest, &card, &lib, &measured, interim)?;
        log(format!("wrote {} and its card", onnx.display()));
        Ok(RunOutput {
            card,
            onnx,
            cards,
            signed: Vec::new(),
        })
    }

    fn export_images(&self, size: u32) -> anyhow::Result<ExportImages> {
        let pre = Preprocessor::new(size, &Preprocessing::default())
            .map_err(|e| TrainError::Flags(e.0))?;
        let (val, _) = data::load_resized(&self.val.samples, &pre);
        let tch_val = predict(&self.net, &pre, &val, self.device);
        let (test, bad) = data::load_resized(&self.test.samples, &pre);
        report_bad(&bad, self.test.samples.len())?;
        Ok(ExportImages {
            pre,
            val,
            test,
            tch_val,
        })
    }

    /// Writes the ONNX file and a card whose measured fields are placeholders.
    fn write_model(&self, dest: &Path, size: u32, interim: bool) -> anyhow::Result<ModelCard> {
        let args = self.args;
        let version = if interim {
            format!("{}-interim.{}", args.model_version, self.state.global_step)
        } else {
            args.model_version.clone()
        };
        let recipe = self.recipe(interim);
        let description = match recipe.strategy {
            Strategy::Weighted => {
                "DenseNet-161, class-weighted cross-entropy (weight = 1 - n_class/n_total)."
            }
            Strategy::Augmented => {
                "DenseNet-161, NORMAL topped up with transformed copies to balance the classes."
            }
            Strategy::None => "DenseNet.",
        };
        let weights = model::export_weights(&self.vs);
        let card = crate::registry::write_model(
            dest,
            &NewModel {
                name: &args.name(),
                version: &version,
                description,
                architecture_name: match args.arch {
                    ArchArg::Densenet161 => "densenet161",
                    ArchArg::Tiny => "densenet-tiny",
                },
                config: &self.arch,
                weights: &weights,
                input_size: size,
                storage: args.storage.into(),
                // Placeholders until the ONNX file is measured.
                threshold: 0.5,
                training: recipe,
                metrics: CardMetrics::default(),
            },
        )
        .map_err(|e| TrainError::Write(e.to_string()))?;
        Ok(card)
    }

    /// Measures the written file with ONNX Runtime, exactly as cxr-serve runs it:
    /// parity with tch, calibration and threshold on validation (clean and stressed),
    /// then the test split, once.
    fn measure(&self, lib: &Path, onnx: &Path, images: &ExportImages) -> anyhow::Result<Measured> {
        let args = self.args;
        let mut session = crate::inference::CpuModel::load(lib, &std::fs::read(onnx)?)?;
        let pre = &images.pre;
        let val_out = session.run_images(pre, &images.val)?;
        let parity = export_parity(args.storage, &val_out, &images.tch_val)?;
        // The stress validation: the same images under fixed, seeded perturbations.
        let stress_imgs: Vec<GrayImage> = images
            .val
            .iter()
            .enumerate()
            .map(|(i, g)| stress::perturb(g, stress::STRESS_SEED, i as u64))
            .collect();
        let stress_out = session.run_images(pre, &stress_imgs)?;
        // Calibration on the clean validation logits; every figure below is of the
        // served (calibrated) probabilities, computed by the function the server uses.
        let val_logits: Vec<[f32; 2]> = val_out.iter().map(|o| o.logits).collect();
        let labels = &self.val.labels;
        let temperature = fit_temperature(&val_logits, labels);
        let served = |o: &[ModelOutput]| served_scores(o, Some(temperature));
        let val_scores = served(&val_out);
        let stress_scores = served(&stress_out);
        let pooled_scores = [val_scores.clone(), stress_scores.clone()].concat();
        let pooled_labels = [labels.clone(), labels.clone()].concat();
        let threshold = choose_threshold(args.threshold, &pooled_scores, &pooled_labels);
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
        let val = Metrics::compute(&val_scores, labels, threshold);
        let stressed = Metrics::compute(&stress_scores, labels, threshold);
        log_validation(
            args.threshold,
            temperature,
            threshold,
            &source,
            &val,
            &stressed,
        );
        // The test split, once.
        let test_out = session.run_images(pre, &images.test)?;
        let test_scores = served(&test_out);
        let test = Metrics::compute(&test_scores, &self.test.labels, threshold);
        // The same decisions on the uncalibrated probabilities: p >= sigmoid(T·logit(t)).
        let raw_threshold =
            1.0 / (1.0 + (-temperature * (threshold / (1.0 - threshold)).ln()).exp());
        let raw_test = served_scores(&test_out, None);
        let test_ece_before = crate::eval::expected_calibration_error(
            &raw_test,
            &self.test.labels,
            raw_threshold,
            10,
        );
        log_test(&test, test_ece_before, threshold);
        Ok(Measured {
            parity,
            temperature,
            threshold,
            source,
            val_logits,
            val_scores,
            val,
            stressed,
            curve,
            test_scores,
            test,
            test_ece_before,
        })
    }

    fn complete_card(&self, card: &mut ModelCard, m: &Measured) {
        let labels = &self.val.labels;
        card.threshold = m.threshold;
        card.threshold_rule = Some(format!(
            "{} on the calibrated probabilities of the {}",
            self.args.threshold, m.source
        ));
        card.calibration = Some(Calibration {
            temperature: m.temperature,
            method: format!(
                "temperature scaling: T minimising the negative log-likelihood of the {} clean validation images (golden-section search on log T in [0.05, 20])",
                m.val_scores.len()
            ),
            validation_nll_before: nll(&m.val_logits, labels, 1.0),
            validation_nll_after: nll(&m.val_logits, labels, m.temperature),
            test_ece_before: Some(m.test_ece_before),
            test_ece_after: Some(m.test.ece),
        });
        card.operating_curve = Some(m.curve.clone());
        card.metrics = CardMetrics {
            test: Some(m.test.clone()),
            validation: Some(m.val.clone()),
            validation_stressed: Some(m.stressed.clone()),
        };
        card.training.export_parity_max_abs_diff = Some(m.parity);
        card.training.wall_time_s = self.state.wall_time_s;
        if !card.training.notes.is_empty() {
            card.training.notes.push(' ');
        }
        card.training.notes += &format!("Stress validation: {}.", stress::DESCRIPTION);
    }

    /// The card, the per-image test scores, the OOD model and INT8 copy (final
    /// exports of the full data), the progress (interim exports) and the plots.
    /// Returns the cards of the versions written (this one's, the INT8 copy's).
    fn write_beside(
        &self,
        dest: &Path,
        card: &ModelCard,
        lib: &Path,
        m: &Measured,
        interim: bool,
    ) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let (args, name) = (self.args, &card.name);
        let card_path = dest.join(format!("{name}.json"));
        let mut cards = vec![card_path.clone()];
        write_atomic(
            &card_path,
            (serde_json::to_string_pretty(card)? + "\n").as_bytes(),
        )?;
        let scores = TestScores::new(
            card,
            &args.data.join("test"),
            &self.test.samples,
            &m.test_scores,
        );
        write_atomic(
            &dest.join(format!("{name}.test-scores.json")),
            (serde_json::to_string_pretty(&scores)? + "\n").as_bytes(),
        )?;
        if interim {
            // The progress this model was exported at, for `--resume-from` on a
            // machine that lacks the run folder (the ONNX file holds the weights).
            write_atomic(
                &dest.join(format!("{name}.state")),
                serde_json::to_string_pretty(&self.state)?.as_bytes(),
            )?;
            // And the optimizer's state, so that a resume from this model continues
            // as the run folder would (twice the weights' size: scripts/train-models.sh
            // does not ship it in models/, and a resume without it restarts the
            // moments).
            self.optim
                .save(&dest.join(format!("{name}.optim.safetensors")))?;
        } else if args.limit_per_class.is_some() {
            tracing::warn!(target: "cxr::train", "no OOD model fitted: --limit-per-class trains on a subset; run cxr-train fit-ood on the full data");
        } else {
            // The out-of-distribution model, on the embeddings of the training split
            // as this run split it (a run on a subset of the data has no split to
            // rebuild).
            let cache = args.out.join("ood-cache");
            let summary = fit_ood::fit_card(
                &card_path,
                &args.data,
                lib,
                &cache,
                0.99,
                args.val_fraction,
                false,
            )?;
            tracing::info!(target: "cxr::train", "{summary}");
            // The INT8 copy, measured against this file (it needs the OOD entry).
            if !args.no_int8 {
                let summary =
                    int8_copy::quantize_card(&card_path, &args.data, lib, args.val_fraction)?;
                tracing::info!(target: "cxr::train", "{summary}");
                cards.push(int8_copy::card_path(&card_path, name));
            }
        }
        let plot_data = plots::PlotData {
            history: &self.state.history,
            val_scores: &m.val_scores,
            val_labels: &self.val.labels,
            test_scores: &m.test_scores,
            test_labels: &self.test.labels,
            test: &m.test,
        };
        if let Err(e) = plots::write_all(dest, &plot_data) {
            tracing::warn!(target: "cxr::train", "plots not written: {e}");
        }
        Ok(cards)
    }
}

/// The largest |ONNX Runtime − tch| on validation; an error over the storage's bound.
fn export_parity(
    storage: config::StorageArg,
    ort: &[ModelOutput],
    tch: &[f64],
) -> anyhow::Result<f64> {
    let diff = ort
        .iter()
        .zip(tch)
        .map(|(o, t)| (f64::from(o.probabilities[1]) - t).abs())
        .fold(0.0, f64::max);
    let bound = match storage {
        config::StorageArg::Fp32 => 1e-4,
        config::StorageArg::Fp16 => 1e-2,
    };
    log(format!(
        "export parity: max |ORT - tch| = {diff:.2e} on {} validation images (bound {bound:.0e})",
        ort.len()
    ));
    if diff > bound {
        anyhow::bail!(
            "export parity check failed: ONNX Runtime and tch differ by {diff:.2e} > {bound:.0e}"
        );
    }
    Ok(diff)
}

fn log_validation(
    rule: ThresholdRule,
    temperature: f64,
    threshold: f64,
    source: &str,
    clean: &Metrics,
    stressed: &Metrics,
) {
    log(format!(
        "temperature {temperature:.3}; threshold {threshold:.3} ({rule} on {source}); validation clean: sens {:.4} spec {:.4} AUC {:.4}; stressed: sens {:.4} spec {:.4} AUC {:.4}",
        clean.sensitivity,
        clean.specificity,
        clean.auc.unwrap_or(f64::NAN),
        stressed.sensitivity,
        stressed.specificity,
        stressed.auc.unwrap_or(f64::NAN)
    ));
}

fn log_test(test: &Metrics, ece_before: f64, threshold: f64) {
    log(format!(
        "test (n={}): accuracy {:.4} sensitivity {:.4} specificity {:.4} AUC {:.4} ECE {:.4} (uncalibrated {:.4}) at threshold {threshold:.3}",
        test.n,
        test.accuracy,
        test.sensitivity,
        test.specificity,
        test.auc.unwrap_or(f64::NAN),
        test.ece,
        ece_before
    ));
}
