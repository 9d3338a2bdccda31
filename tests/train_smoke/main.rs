//! cxr-train end to end on generated images (no data set, no network): a tiny
//! DenseNet trains a few steps, stops and resumes from its checkpoint, and writes an
//! ONNX file and card that cxr-serve loads and serves.
#![cfg(feature = "train")]

#[path = "../common/mod.rs"]
mod common;
mod signed;
mod weights;

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
    let mut rng = cxr::model::arch::SplitMix64(3);
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
    let wa = cxr::model::onnx::read_weights(&std::fs::read(&a.onnx).unwrap()).unwrap();
    let wb = cxr::model::onnx::read_weights(&std::fs::read(&b.onnx).unwrap()).unwrap();
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
    let resumed = cxr::model::onnx::read_weights(
        &std::fs::read(run.path().join("interim/weighted.onnx")).unwrap(),
    )
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

/// Copies a run folder (files only, one level: what a run keeps).
fn copy_run(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// A stopped and resumed run ends where the uninterrupted one ends: from one
/// checkpoint (after the first step, weights and optimizer state), five steps
/// straight, and three steps, a stop, a resume and two steps, leave the same weights
/// (within 1e-6), with AdamW and with SGD: the optimizer's moments and step count
/// are saved with the checkpoint and restored. (Both continue one copied checkpoint:
/// libtorch's initialisation draws from a random generator the tests running beside
/// this one share.)
#[test]
fn six_steps_straight_equal_four_stop_resume_two() {
    common::ort_env();
    let data = tempfile::tempdir().unwrap();
    make_data(data.path());
    for optimizer in ["adamw", "sgd"] {
        let run = |dir: &Path, extra: &[&str]| {
            let mut flags = vec!["--optimizer", optimizer, "--resume"];
            flags.extend_from_slice(extra);
            let mut a = args(data.path(), dir, "weighted", &flags);
            a.no_int8 = true;
            cxr::train::run(&a).unwrap()
        };
        let straight = tempfile::tempdir().unwrap();
        assert!(run(straight.path(), &["--stop-after-steps", "1"]).is_none());
        let resumed = tempfile::tempdir().unwrap();
        copy_run(straight.path(), resumed.path());
        assert_eq!(state(resumed.path()).global_step, 1);

        run(straight.path(), &[]).expect("finished");
        assert!(run(resumed.path(), &["--stop-after-steps", "3"]).is_none());
        assert_eq!(state(resumed.path()).global_step, 4);
        run(resumed.path(), &[]).expect("finished");
        assert_eq!(state(straight.path()).global_step, 6);
        assert_eq!(state(resumed.path()).global_step, 6);
        let read = |dir: &Path| -> std::collections::BTreeMap<String, Vec<f32>> {
            tch::Tensor::read_safetensors(dir.join("checkpoint.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(k, t)| {
                    (
                        k,
                        Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap(),
                    )
                })
                .collect()
        };
        let (a, b) = (read(straight.path()), read(resumed.path()));
        assert_eq!(a.len(), b.len());
        let mut worst = 0f32;
        for (name, w) in &a {
            for (x, y) in w.iter().zip(&b[name]) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(
            worst <= 1e-6,
            "{optimizer}: weights differ by up to {worst}"
        );
    }
}
