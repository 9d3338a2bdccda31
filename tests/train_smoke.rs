//! cxr-train end to end on generated images (no data set, no network): a tiny
//! DenseNet trains a few steps, stops and resumes from its checkpoint, and writes an
//! ONNX file and card that cxr-serve loads and serves.
#![cfg(feature = "train")]

mod common;

use std::path::Path;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use clap::Parser;
use cxr::train::{STATE_FILE, TrainArgs, TrainState};
use http_body_util::BodyExt;
use image::{GrayImage, Luma};
use tower::ServiceExt;

/// A Kermany-like folder: NORMAL images are bright discs, PNEUMONIA dark blotches;
/// several images per patient; 3:1 imbalance in train.
fn make_data(root: &Path) {
    let mut rng = cxr::arch::SplitMix64(3);
    for (split, normals, sick) in [("train", 8, 24), ("test", 6, 6)] {
        for (class, n) in [("NORMAL", normals), ("PNEUMONIA", sick)] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = GrayImage::from_fn(48, 40, |x, y| {
                    let noise = (rng.uniform() * 40.0) as i32;
                    let d = ((x as i32 - 24).pow(2) + (y as i32 - 20).pow(2)) as f64;
                    let base = if class == "NORMAL" {
                        200.0 - d.sqrt() * 3.0
                    } else {
                        60.0 + (x * y % 37) as f64
                    };
                    Luma([(base as i32 + noise).clamp(0, 255) as u8])
                });
                let name = if class == "NORMAL" {
                    format!(
                        "IM-{:04}-{:04}.png",
                        i / 2 + if split == "test" { 500 } else { 0 },
                        i % 2
                    )
                } else {
                    format!(
                        "person{}_bacteria_{i}.png",
                        i / 3 + if split == "test" { 900 } else { 0 }
                    )
                };
                img.save(dir.join(name)).unwrap();
            }
        }
    }
}

fn args(data: &Path, out: &Path, strategy: &str, extra: &[&str]) -> TrainArgs {
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut a = vec![
        "cxr-train",
        "--data",
        d,
        "--out",
        o,
        "--strategy",
        strategy,
        "--arch",
        "tiny",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps-per-epoch",
        "3",
        "--checkpoint-every",
        "1",
        "--val-fraction",
        "0.25",
        "--threads",
        "1",
        "--storage",
        "fp32",
    ];
    a.extend_from_slice(extra);
    let mut t = TrainArgs::parse_from(a);
    t.ort_lib = Some(cxr::inference::resolve_library(None));
    t
}

fn state(out: &Path) -> TrainState {
    serde_json::from_str(&std::fs::read_to_string(out.join(STATE_FILE)).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_run_stops_resumes_exports_and_serves() {
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    let out = tempfile::tempdir().unwrap();

    // Stop after 4 steps (epoch 2, step 1), as a killed session would.
    let stopped = cxr::train::run(&args(
        data.path(),
        out.path(),
        "weighted",
        &["--stop-after-steps", "4", "--resume"],
    ))
    .unwrap();
    assert!(stopped.is_none());
    let s = state(out.path());
    assert_eq!(
        (s.epoch, s.step, s.global_step, s.history.len()),
        (1, 1, 4, 1)
    );

    // Resume: continues at that step and finishes the remaining 2.
    let done = cxr::train::run(&args(data.path(), out.path(), "weighted", &["--resume"]))
        .unwrap()
        .expect("finished");
    let s = state(out.path());
    assert_eq!((s.epoch, s.global_step, s.history.len()), (2, 6, 2));

    let card = &done.card;
    assert_eq!(card.name, "weighted");
    // The weighted strategy's weights are exactly 1 - n_class / n_total.
    let c = &card.training.train_class_counts;
    let n = (c[0] + c[1]) as f64;
    assert_eq!(
        card.training.class_weights,
        vec![1.0 - c[0] as f64 / n, 1.0 - c[1] as f64 / n]
    );
    assert!(c[1] > c[0]);
    let test = card.metrics.test.as_ref().expect("test metrics");
    assert_eq!(test.n, 12);
    assert!(card.training.export_parity_max_abs_diff.unwrap() <= 1e-4);
    for f in [
        "history.csv",
        "curves.png",
        "roc.png",
        "confusion.png",
        "weighted.onnx",
        "weighted.json",
        "weighted.ood.json",
    ] {
        assert!(out.path().join(f).exists(), "{f} written");
    }
    // The export fitted the OOD model on the run's training split and named it.
    let on_disk = cxr::registry::load_card(&out.path().join("weighted.json")).unwrap();
    let ood = on_disk
        .card
        .ood
        .as_ref()
        .expect("the card names its OOD model");
    assert_eq!(ood.fit_images, card.training.train_images);
    assert!(on_disk.ood.is_some());

    // cxr-serve loads the run folder as it is and answers.
    let metrics = std::sync::Arc::new(cxr::http::ServerMetrics::new());
    let state_ = cxr::AppState::new(common::test_limits(), metrics.clone());
    let mut cfg = common::load_config(out.path(), common::default_batch());
    cfg.default_model = None;
    let (set, _w) = cxr::inference::load_models(&cfg, |n| metrics.observer(n)).unwrap();
    state_.set_models(set);
    let app = cxr::build_app(state_);
    let png = std::fs::read(
        std::fs::read_dir(data.path().join("test/NORMAL"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let resp = app
        .oneshot(
            Request::post("/predict")
                .header(header::CONTENT_TYPE, "image/png")
                .body(Body::from(png))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["model"]["name"], "weighted");
    assert_eq!(v["model"]["strategy"], "weighted");
}

#[test]
fn augmented_run_balances_the_classes_exactly() {
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    let out = tempfile::tempdir().unwrap();
    let done = cxr::train::run(&args(data.path(), out.path(), "augmented", &[]))
        .unwrap()
        .expect("finished");
    let r = &done.card.training;
    assert!(r.generated_images > 0);
    // After the top-up both classes hold the same number of training images.
    assert_eq!(r.train_class_counts[0], r.train_class_counts[1]);
    assert_eq!(
        r.train_class_counts[0] + r.train_class_counts[1],
        r.train_images
    );
    let generated = std::fs::read_dir(out.path().join("generated/NORMAL"))
        .unwrap()
        .count() as u64;
    assert_eq!(generated, r.generated_images);
    assert!(r.class_weights.is_empty(), "plain cross-entropy");
}

/// A fresh machine has no run folder, only the interim model shipped in `models/`:
/// `--resume-from` continues from it exactly where the checkpoint was (fp32 storage
/// here, so the continuation equals one from the run folder bit for bit). Progressive
/// resizing as in the shipped recipe: the best epoch is chosen among the final ones.
#[test]
fn resume_from_an_interim_model_equals_resuming_the_run_folder() {
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    let first = tempfile::tempdir().unwrap();
    let resize = ["--final-image-size", "40", "--final-epochs", "1"];
    let args = |out: &Path, extra: &[&str]| {
        args(data.path(), out, "weighted", &[&resize[..], extra].concat())
    };
    let stop = ["--stop-after-steps", "4", "--resume"];
    assert!(
        cxr::train::run(&args(first.path(), &stop))
            .unwrap()
            .is_none()
    );
    cxr::train::run(&args(first.path(), &["--resume", "--export-only"]))
        .unwrap()
        .expect("interim export");
    let interim = first.path().join("interim/weighted.onnx");
    assert!(first.path().join("interim/weighted.state").exists());

    // Another flag set is refused before anything is trained.
    let fresh = tempfile::tempdir().unwrap();
    let from = interim.to_str().unwrap();
    let err = cxr::train::run(&args(
        fresh.path(),
        &["--resume", "--resume-from", from, "--lr", "0.5"],
    ))
    .unwrap_err();
    assert!(err.to_string().contains("other flags"), "{err}");

    let a = cxr::train::run(&args(first.path(), &["--resume"]))
        .unwrap()
        .expect("finished from the run folder");
    let b = cxr::train::run(&args(fresh.path(), &["--resume", "--resume-from", from]))
        .unwrap()
        .expect("finished from the interim model");
    let s = state(fresh.path());
    assert_eq!((s.epoch, s.global_step, s.history.len()), (2, 6, 2));
    let wa = cxr::onnx::read_weights(&std::fs::read(&a.onnx).unwrap()).unwrap();
    let wb = cxr::onnx::read_weights(&std::fs::read(&b.onnx).unwrap()).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert_eq!(t.data, wb[name].data, "{name}");
    }
    assert_eq!(a.card.metrics.test, b.card.metrics.test);
    assert_eq!(s.resumed_from.len(), 1);
    assert!(
        b.card
            .training
            .notes
            .contains("Continued from the interim model")
    );
    assert!(!a.card.training.notes.contains("Continued from"));
}

#[test]
fn resume_with_other_flags_is_refused() {
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    let out = tempfile::tempdir().unwrap();
    assert!(
        cxr::train::run(&args(
            data.path(),
            out.path(),
            "weighted",
            &["--stop-after-steps", "1"]
        ))
        .unwrap()
        .is_none()
    );
    let err = cxr::train::run(&args(
        data.path(),
        out.path(),
        "weighted",
        &["--resume", "--lr", "0.5"],
    ))
    .unwrap_err();
    assert!(err.to_string().contains("other flags"), "{err}");
}

#[test]
fn missing_folders_and_empty_classes_are_named() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = cxr::train::run(&args(data.path(), out.path(), "weighted", &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train") && err.contains("NORMAL"), "{err}");
    make_data(data.path());
    for f in std::fs::read_dir(data.path().join("train/PNEUMONIA")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let err = cxr::train::run(&args(data.path(), out.path(), "weighted", &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("PNEUMONIA is empty"), "{err}");
}

#[test]
fn torchvision_weight_files_load_except_the_classifier() {
    use cxr::arch::DenseNetConfig;
    use cxr::train::model::{DenseNet, export_weights, load_torchvision};
    use tch::{Device, Tensor, nn};
    let cfg = DenseNetConfig::tiny();
    // A "torchvision" file: another network's weights, old-style layer keys
    // (`norm.1`, `conv.2`), and a 1000-class classifier.
    let src = nn::VarStore::new(Device::Cpu);
    let _ = DenseNet::new(&src.root(), &cfg);
    let mut named: Vec<(String, Tensor)> = src
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, t)| {
            (
                k.replace(".norm1.", ".norm.1.")
                    .replace(".conv2.", ".conv.2."),
                t,
            )
        })
        .collect();
    let feats = cfg.num_features() as i64;
    named.push((
        "classifier.weight".into(),
        Tensor::zeros([1000, feats], (tch::Kind::Float, Device::Cpu)),
    ));
    named.push((
        "classifier.bias".into(),
        Tensor::zeros([1000], (tch::Kind::Float, Device::Cpu)),
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tv.safetensors");
    Tensor::write_safetensors(&named, &file).unwrap();

    let mut dst = nn::VarStore::new(Device::Cpu);
    let _ = DenseNet::new(&dst.root(), &cfg);
    let n = load_torchvision(&mut dst, &file).unwrap();
    let (a, b) = (export_weights(&src), export_weights(&dst));
    assert_eq!(n, a.len() - 2, "everything but the classifier");
    for (k, t) in &a {
        if !k.starts_with("classifier.") {
            assert_eq!(t, &b[k], "{k} copied");
        }
    }
    assert_eq!(
        b["classifier.weight"].shape,
        vec![2, feats as usize],
        "a fresh 2-class classifier"
    );

    // A file of another architecture is refused with the variable's name.
    let other = nn::VarStore::new(Device::Cpu);
    let _ = DenseNet::new(
        &other.root(),
        &DenseNetConfig {
            growth_rate: 6,
            ..cfg.clone()
        },
    );
    let f2 = dir.path().join("other.safetensors");
    other.save(&f2).unwrap();
    let err = load_torchvision(&mut dst, &f2).unwrap_err();
    assert!(err.to_string().contains("the architecture needs"), "{err}");
}

/// `--import-weights`: a run trained elsewhere (torchvision layout, classifier
/// included) is exported with exactly its weights and measured like a final model
/// (calibration, stress validation, operating curve); a history that held out another
/// validation split, or belongs to another file, is refused.
#[test]
fn imported_runs_are_exported_with_their_own_weights_and_measured() {
    use cxr::arch::DenseNetConfig;
    use cxr::train::model::{DenseNet, export_weights};
    use tch::{Device, nn};
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    tch::manual_seed(77);
    let src = nn::VarStore::new(Device::Cpu);
    let _ = DenseNet::new(&src.root(), &DenseNetConfig::tiny());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.safetensors");
    src.save(&file).unwrap();
    let sha = cxr::registry::sha256_hex(&std::fs::read(&file).unwrap());
    let all = cxr::train::data::scan(data.path(), "train").unwrap();
    let (_, val) = cxr::train::data::split_by_patient(&all, 0.25, 42);
    let names: Vec<String> = val
        .iter()
        .map(|s| s.path.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    let history = |names: &[String], sha: &str| {
        let epochs: Vec<serde_json::Value> = [1, 2]
            .iter()
            .map(|e| {
                serde_json::json!({
                    "epoch": e, "image_size": 32, "lr": 0.001, "train_loss": 0.6,
                    "train_accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.8,
                    "val_auc": 0.9, "stress_val_loss": 0.55, "stress_val_auc": 0.85,
                    "seconds": 6.0
                })
            })
            .collect();
        serde_json::json!({
            "recipe": {
                "strategy": "weighted", "epochs": 2, "image_size": 32, "batch_size": 4,
                "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05,
                "schedule": "cosine", "label_smoothing": 0.1, "seed": 42,
                "precision": "bf16 autocast", "best_epoch": 2, "best_rule": "test rule",
                "augmentation": "test augmentation", "train_images": 20,
                "train_class_counts": [6, 14], "class_weights": [0.7, 0.3],
                "generated_images": 0, "wall_time_s": 12.5, "device": "test-gpu",
                "torch": "x", "torchvision": "y"
            },
            "history": epochs,
            "sha256": sha,
            "validation_files": names
        })
        .to_string()
    };
    let hist = dir.path().join("h.json");
    std::fs::write(&hist, history(&names, &sha)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (f, h) = (file.to_str().unwrap(), hist.to_str().unwrap());
    let import = ["--import-weights", f, "--import-history", h];
    let done = cxr::train::run(&args(data.path(), out.path(), "weighted", &import))
        .unwrap()
        .expect("exported");
    // Exactly the file's weights, classifier included, are in the ONNX file.
    let onnx = std::fs::read(&done.onnx).unwrap();
    let written = cxr::onnx::read_weights(&onnx).unwrap();
    let want = export_weights(&src);
    assert_eq!(written.len(), want.len());
    for (k, t) in &want {
        assert_eq!(&written[k], t, "{k}");
    }
    let card = &done.card;
    // Every test image's served score beside the card: they reproduce the card's test
    // metrics, and `cxr-train test-scores` re-measures the same values.
    let scores_path = done.onnx.with_file_name("weighted.test-scores.json");
    let read = |p: &std::path::Path| -> cxr::train::TestScores {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let scores = read(&scores_path);
    assert_eq!(scores.onnx_sha256, card.onnx.sha256);
    let (p, l): (Vec<f64>, Vec<u8>) = scores
        .images
        .iter()
        .map(|i| (i.p_pneumonia, i.label))
        .unzip();
    let m = cxr::eval::Metrics::compute(&p, &l, card.threshold);
    let test = card.metrics.test.as_ref().unwrap();
    assert_eq!(m.confusion, test.confusion);
    assert_eq!(m.auc, test.auc);
    assert!(
        scores
            .images
            .iter()
            .all(|i| i.file.starts_with("NORMAL/") || i.file.starts_with("PNEUMONIA/"))
    );
    std::fs::remove_file(&scores_path).unwrap();
    let card_path = done.onnx.with_file_name("weighted.json");
    let n = cxr::train::write_test_scores(
        &card_path,
        data.path(),
        &cxr::inference::resolve_library(None),
    )
    .unwrap();
    assert_eq!(n, scores.images.len());
    let again = read(&scores_path);
    for (a, b) in scores.images.iter().zip(&again.images) {
        assert_eq!(
            (&a.file, a.label, a.p_pneumonia),
            (&b.file, b.label, b.p_pneumonia)
        );
    }
    // The scores files beside the cards are not taken for cards; the run made the
    // INT8 copy beside its model (a full run, not `--limit-per-class`).
    let loaded = cxr::registry::load_dir(out.path()).unwrap();
    let variants: Vec<(&str, &str)> = loaded
        .iter()
        .map(|m| (m.card.name.as_str(), m.card.precision.as_str()))
        .collect();
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert!(variants.contains(&("weighted", "fp32")), "{variants:?}");
    assert!(
        variants.contains(&("weighted-int8", "int8")),
        "{variants:?}"
    );
    let cal = card.calibration.as_ref().expect("calibration");
    assert!(cal.temperature > 0.0 && cal.validation_nll_after <= cal.validation_nll_before + 1e-12);
    assert!(card.metrics.validation_stressed.is_some());
    let curve = card.operating_curve.as_ref().expect("operating curve");
    assert!(!curve.points.is_empty());
    assert_eq!(curve.n, 2 * val.len() as u64);
    assert_eq!(card.training.device, "cuda (test-gpu)");
    assert_eq!(card.training.epochs, 2);
    assert!(card.training.notes.contains("test augmentation"));
    let csv = std::fs::read_to_string(out.path().join("history.csv")).unwrap();
    assert!(
        csv.lines().nth(1).unwrap().ends_with(",0.55000,0.85000"),
        "{csv}"
    );

    // Another validation split, or another weights file: refused.
    std::fs::write(&hist, history(&names[1..], &sha)).unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let err = cxr::train::run(&args(data.path(), out2.path(), "weighted", &import)).unwrap_err();
    assert!(
        err.to_string().contains("another validation split"),
        "{err}"
    );
    std::fs::write(&hist, history(&names, &"0".repeat(64))).unwrap();
    let err = cxr::train::run(&args(data.path(), out2.path(), "weighted", &import)).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
}

/// The trainer learns: on separable images (bright discs against dark blotches) the
/// validation loss falls and the test AUC beats chance by far. And a resume starts
/// from the checkpoint's weights, exactly: the interim export of a resumed run holds
/// the checkpoint file's tensors bit for bit (read independently, with libtorch's
/// safetensors reader), and they are not a fresh initialisation.
#[test]
fn training_learns_and_a_resume_restores_the_checkpoint_exactly() {
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());

    let out = tempfile::tempdir().unwrap();
    let mut a = args(data.path(), out.path(), "weighted", &[]);
    a.epochs = 4;
    a.max_steps_per_epoch = Some(8);
    let done = cxr::train::run(&a).unwrap().expect("finished");
    let h = &state(out.path()).history;
    assert_eq!(h.len(), 4);
    assert!(
        h.last().unwrap().val_loss < h[0].val_loss,
        "validation loss did not fall: {:?}",
        h.iter().map(|r| r.val_loss).collect::<Vec<_>>()
    );
    let auc = done.card.metrics.test.as_ref().unwrap().auc.unwrap();
    assert!(auc > 0.9, "test AUC {auc}");

    // Stop after 4 steps: a checkpoint. Then resume, exporting at once.
    let run = tempfile::tempdir().unwrap();
    let stop = ["--stop-after-steps", "4", "--resume"];
    assert!(
        cxr::train::run(&args(data.path(), run.path(), "weighted", &stop))
            .unwrap()
            .is_none()
    );
    let ckpt = tch::Tensor::read_safetensors(run.path().join("checkpoint.safetensors")).unwrap();
    cxr::train::run(&args(
        data.path(),
        run.path(),
        "weighted",
        &["--resume", "--export-only"],
    ))
    .unwrap()
    .expect("interim export");
    let resumed =
        cxr::onnx::read_weights(&std::fs::read(run.path().join("interim/weighted.onnx")).unwrap())
            .unwrap();
    // A fresh run's weights before any step, for contrast.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh_stop = ["--stop-after-steps", "1", "--resume"];
    cxr::train::run(&args(
        data.path(),
        fresh_dir.path(),
        "weighted",
        &fresh_stop,
    ))
    .unwrap();
    let fresh =
        tch::Tensor::read_safetensors(fresh_dir.path().join("checkpoint.safetensors")).unwrap();
    let fresh: std::collections::HashMap<String, Vec<f32>> = fresh
        .into_iter()
        .map(|(k, t)| (k, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    let mut compared = 0;
    let mut differ_from_fresh = 0;
    for (name, t) in ckpt {
        let want = Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap();
        let got = &resumed
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing from the resumed export"))
            .data;
        if name.contains("num_batches_tracked") {
            continue;
        }
        assert_eq!(
            got, &want,
            "{name}: the resumed weights are not the checkpoint's"
        );
        compared += 1;
        if fresh.get(&name).is_some_and(|f| f != &want) {
            differ_from_fresh += 1;
        }
    }
    assert!(compared > 10, "{compared} tensors compared");
    assert!(
        differ_from_fresh > compared / 2,
        "the checkpoint is barely trained: {differ_from_fresh} of {compared} tensors differ from one step"
    );
}
