//! Weights trained elsewhere: torchvision files, and whole runs imported with their history.

use super::*;

#[test]
fn torchvision_weight_files_load_except_the_classifier() {
    use cxr::model::arch::DenseNetConfig;
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
    use cxr::model::arch::DenseNetConfig;
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
    let written = cxr::model::onnx::read_weights(&onnx).unwrap();
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
