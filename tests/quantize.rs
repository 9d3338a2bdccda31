//! Static INT8 (QDQ) graphs from our writer, on a writer-made tiny DenseNet: the
//! quantised graph loads in ONNX Runtime, its probabilities stay within 0.05 of the
//! FP32 graph's on images it was not calibrated on, and every stored INT8 weight
//! dequantises to the original within half a quantisation step (one rounding): the
//! original itself, or for a convolution followed by a batch norm, the original with
//! that norm folded in (computed here by hand).

mod common;

use cxr::imaging::{Preprocessing, Preprocessor};
use cxr::model::arch::DenseNetConfig;
use cxr::model::onnx::{WeightStorage, WriteOptions};
use prost::Message;

fn batches(pre: &Preprocessor, seeds: std::ops::Range<u32>) -> Vec<(usize, Vec<f32>)> {
    seeds
        .map(|seed| {
            let g = pre.resize(&common::gray_image(64, 48, seed));
            (1, pre.normalize(&g))
        })
        .collect()
}

#[test]
fn int8_graph_loads_answers_close_to_fp32_and_keeps_its_weights() {
    let config = DenseNetConfig::tiny();
    let mut weights = config.random_weights(11);
    // Batch norms with statistics of their own (random weights give identities),
    // so that a fold that forgot γ, β, μ or σ² would show.
    for (k, (name, t)) in weights.iter_mut().enumerate() {
        if !name.contains("norm") {
            continue;
        }
        let wave = |i: usize, a: f32| ((i * 7 + k * 13) as f32 * 0.37).sin() * a;
        for (i, v) in t.data.iter_mut().enumerate() {
            *v = match name.rsplit('.').next().unwrap() {
                "weight" => 1.0 + wave(i, 0.4),
                "bias" => wave(i + 3, 0.3),
                "running_mean" => wave(i + 5, 0.2),
                "running_var" => 1.0 + wave(i + 1, 0.5),
                _ => *v,
            };
        }
    }
    let opts = WriteOptions {
        input_size: 32,
        storage: WeightStorage::Fp32,
        metadata: vec![],
    };
    let pre = Preprocessor::new(32, &Preprocessing::default()).unwrap();
    let fp32 = cxr::model::onnx::write_densenet(&config, &weights, &opts)
        .unwrap()
        .encode_to_vec();
    let calib = cxr::model::int8::calibration_graph(&config, &weights, &opts).unwrap();
    let mut cs = common::cpu_model(&calib);
    let ranges =
        cxr::model::int8::calibrate(|b, n, s| cs.run_named(b, n, s), batches(&pre, 0..24), 32)
            .unwrap();
    // Every conv's input and output and the classifier's input have a range; a
    // dense layer's first conv (its norm folded in) outputs the second one's input.
    let convs = weights
        .keys()
        .filter(|k| k.contains("conv") && k.ends_with(".weight"))
        .count();
    assert_eq!(
        ranges.len(),
        2 * convs + 1 - config.block_config.iter().sum::<usize>(),
        "{:?}",
        ranges.keys().collect::<Vec<_>>()
    );
    let int8 = cxr::model::int8::int8_graph(&config, &weights, &opts, ranges).unwrap();
    // The INT8 graph: Q/DQ pairs, INT8 weights.
    let model = cxr::model::onnx::proto::ModelProto::decode(&int8[..]).unwrap();
    let graph = model.graph.unwrap();
    assert!(graph.node.iter().any(|n| n.op_type == "QuantizeLinear"));
    let mut a = common::cpu_session(&fp32);
    let mut b = common::cpu_session(&int8);
    let mut worst = 0f32;
    let mut worst_rel = 0f32;
    for (_, x) in batches(&pre, 100..116) {
        let oa = cxr::inference::run_outputs(&mut a, x.clone(), 1, 32).unwrap();
        let ob = cxr::inference::run_outputs(&mut b, x, 1, 32).unwrap();
        worst = worst.max((oa[0].probabilities[1] - ob[0].probabilities[1]).abs());
        // The pooled features (computed by the quantised convolutions) stay within
        // 10 % of the FP32 ones: a tiny random net's probabilities barely move with
        // the input, its features do.
        let (ea, eb) = (
            oa[0].embedding.as_ref().unwrap(),
            ob[0].embedding.as_ref().unwrap(),
        );
        let diff: f32 = ea
            .iter()
            .zip(eb)
            .map(|(p, q)| (p - q).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = ea.iter().map(|p| p * p).sum::<f32>().sqrt();
        worst_rel = worst_rel.max(diff / norm);
    }
    assert!(
        worst_rel < 0.1,
        "INT8 features differ from FP32 by {worst_rel} (relative)"
    );
    assert!(
        worst < 0.05,
        "INT8 P(PNEUMONIA) differs from FP32 by up to {worst}"
    );
    assert!(
        worst > 0.0,
        "the INT8 graph computed exactly the FP32 numbers: not quantised"
    );
    // The batch norms that follow a convolution directly (norm0, every norm2) are
    // folded into it: none is left in the graph.
    let norms = |g: &cxr::model::onnx::proto::GraphProto| {
        g.node
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
            .count()
    };
    let fp32_graph = cxr::model::onnx::proto::ModelProto::decode(&fp32[..])
        .unwrap()
        .graph
        .unwrap();
    let layers: usize = config.block_config.iter().sum();
    assert_eq!(norms(&graph), norms(&fp32_graph) - 1 - layers);
    // Each stored weight: q × scale within half a step of the original (folded by
    // hand with its batch norm where the graph folds one).
    for (name, w) in weights.iter().filter(|(k, _)| {
        k.ends_with("conv.weight")
            || k.ends_with("conv1.weight")
            || k.ends_with("conv2.weight")
            || k.as_str() == "features.conv0.weight"
            || k.as_str() == "classifier.weight"
    }) {
        let init = |suffix: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == format!("{name}::{suffix}"))
                .unwrap_or_else(|| panic!("{name}::{suffix} stored"))
        };
        let q = &init("int8").raw_data;
        let scales: Vec<f32> = init("wscale")
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let per = w.data.len() / scales.len();
        let norm = if name == "features.conv0.weight" {
            Some("features.norm0".to_string())
        } else {
            name.strip_suffix("conv1.weight")
                .map(|p| format!("{p}norm2"))
        };
        let expected: Vec<f32> = match &norm {
            None => w.data.clone(),
            Some(bn) => {
                let get = |s: &str| weights[&format!("{bn}.{s}")].data.clone();
                let (gamma, var) = (get("weight"), get("running_var"));
                w.data
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let c = i / per;
                        v * gamma[c] / (var[c] + 1e-5).sqrt()
                    })
                    .collect()
            }
        };
        for (i, (&orig, &qi)) in expected.iter().zip(q).enumerate() {
            let s = scales[i / per];
            let back = f32::from(qi as i8) * s;
            assert!(
                (back - orig).abs() <= s / 2.0 + 1e-6 * orig.abs().max(1e-1),
                "{name}[{i}]: {orig} stored as {back} (step {s})"
            );
        }
    }
}

/// An INT8 copy is served as a variant of its own that says its precision, and
/// `prefer=` never swaps it in for the FP32 default, even when its card measures
/// better.
#[tokio::test]
async fn an_int8_variant_is_served_by_name_and_says_so() {
    use common::http::{json, raw, send};
    let dir = common::models_dir();
    // `alpha-int8`: alpha's network, quantised, with a card that claims the best
    // sensitivity of all.
    let card_text = std::fs::read_to_string(dir.path().join("alpha.json")).unwrap();
    let mut card: cxr::registry::ModelCard = serde_json::from_str(&card_text).unwrap();
    let loaded = cxr::registry::load_card(&dir.path().join("alpha.json")).unwrap();
    let weights = cxr::model::onnx::read_weights(&loaded.onnx_bytes).unwrap();
    let opts = WriteOptions {
        input_size: 32,
        storage: WeightStorage::Fp32,
        metadata: vec![],
    };
    let config = card.architecture.config.clone();
    let pre = Preprocessor::new(32, &Preprocessing::default()).unwrap();
    let calib = cxr::model::int8::calibration_graph(&config, &weights, &opts).unwrap();
    let mut calib_model = common::cpu_model(&calib);
    let ranges = cxr::model::int8::calibrate(
        |b, n, s| calib_model.run_named(b, n, s),
        batches(&pre, 0..8),
        32,
    )
    .unwrap();
    let bytes = cxr::model::int8::int8_graph(&config, &weights, &opts, ranges).unwrap();
    std::fs::write(dir.path().join("alpha-int8.onnx"), &bytes).unwrap();
    card.name = "alpha-int8".into();
    card.precision = cxr::model::int8::Precision::Int8;
    card.onnx.file = "alpha-int8.onnx".into();
    card.onnx.sha256 = cxr::registry::sha256_hex(&bytes);
    card.metrics.test.as_mut().unwrap().sensitivity = 1.0;
    std::fs::write(
        dir.path().join("alpha-int8.json"),
        serde_json::to_string_pretty(&card).unwrap(),
    )
    .unwrap();
    let t = common::test_app_in(dir, common::test_limits(), common::default_batch(), |s| s);
    let img = common::png_bytes(&common::gray_image(64, 48, 2));
    let (s, _, b) = send(
        &t.app,
        raw("/predict?model=alpha-int8", "image/png", img.clone()),
    )
    .await;
    let v = json(&b);
    assert_eq!(s, axum::http::StatusCode::OK, "{v}");
    assert_eq!(v["model"]["precision"], "int8", "{v}");
    let (_, _, b) = send(&t.app, raw("/predict?prefer=sensitivity", "image/png", img)).await;
    let v = json(&b);
    assert_eq!(v["model"]["name"], "alpha", "{v}");
    assert_eq!(v["model"]["precision"], "fp32", "{v}");
    let (_, _, b) = send(&t.app, common::http::get("/models/alpha-int8")).await;
    assert_eq!(json(&b)["card"]["precision"], "int8");
}

/// An INT8 copy's card names `precision` and `quantization` after its `ood` entry
/// (the card's field order). Refitting its OOD model (`cxr-train fit-ood` on the
/// copy, bench/ood_int8.sh) replaces that entry in place and keeps them.
#[test]
fn a_new_ood_entry_on_an_int8_card_keeps_its_precision_and_quantization() {
    let dir = common::models_dir();
    let entry = common::ood_above_everything(dir.path(), "alpha", None);
    let path = dir.path().join("alpha.json");
    let mut card: cxr::registry::ModelCard =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    card.precision = cxr::model::int8::Precision::Int8;
    card.quantization = Some(cxr::model::int8::QuantizationInfo {
        scheme: "test".into(),
        calibration_method: "test".into(),
        calibration_set: "test".into(),
        source_model: "alpha".into(),
        source_sha256: card.onnx.sha256.clone(),
        test_label_agreement: 1.0,
        test_max_abs_probability_diff: 0.0,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&card).unwrap() + "\n").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.find("\"ood\"").unwrap() < text.find("\"quantization\"").unwrap(),
        "the fixture has ood before quantization"
    );
    let refit = cxr::ood_score::OodCard {
        method: "refitted on this copy's embeddings".into(),
        refuse_threshold: Some(1e12),
        refuse_rule: Some("test".into()),
        ..entry
    };
    cxr::registry::set_card_ood(&path, &refit).unwrap();
    let after = cxr::registry::load_card(&path).unwrap().card;
    assert_eq!(after.precision, cxr::model::int8::Precision::Int8);
    assert_eq!(after.quantization, card.quantization);
    let ood = after.ood.unwrap();
    assert_eq!(ood.method, refit.method);
    assert_eq!(ood.refuse_threshold, Some(1e12));
    // Everything but the entry is the card's text as it was.
    let text_after = std::fs::read_to_string(&path).unwrap();
    let cut = |t: &str| {
        let a = t.find(",\n  \"ood\": ").unwrap();
        let b = a + 1 + t[a + 1..].find(",\n  \"").unwrap();
        format!("{}{}", &t[..a], &t[b..])
    };
    assert_eq!(cut(&text), cut(&text_after));
}
