//! The ONNX writer against ONNX Runtime: DenseNet-161 loads and runs, a tiny network
//! matches an independent reference forward pass, FP16 storage matches FP32.

#[path = "../common/mod.rs"]
mod common;

use cxr::inference::run_probabilities;
use cxr::model::arch::{BN_EPS, DenseNetConfig, Tensor, Weights};
use cxr::model::onnx::{WeightStorage, WriteOptions, write_densenet};
use prost::Message;

fn write(config: &DenseNetConfig, w: &Weights, size: u32, storage: WeightStorage) -> Vec<u8> {
    let opts = WriteOptions {
        input_size: size,
        storage,
        metadata: vec![],
    };
    write_densenet(config, w, &opts)
        .expect("write")
        .encode_to_vec()
}

fn logits(session: &mut ort::session::Session, x: Vec<f32>, n: usize, s: usize) -> Vec<f32> {
    let input = ort::value::Tensor::from_array(([n, 3, s, s], x.into_boxed_slice())).unwrap();
    let out = session.run(ort::inputs!["image" => input]).unwrap();
    out["logits"]
        .try_extract_tensor::<f32>()
        .unwrap()
        .1
        .to_vec()
}

fn input(n: usize, s: usize, seed: u64) -> Vec<f32> {
    let mut r = cxr::model::arch::SplitMix64(seed);
    (0..n * 3 * s * s)
        .map(|_| (r.uniform() * 4.0 - 2.0) as f32)
        .collect()
}

#[test]
fn densenet161_loads_in_onnx_runtime_and_batches() {
    let config = DenseNetConfig::densenet161();
    let w = config.random_weights(7);
    let params = config.trainable_parameter_count();
    assert!((26_400_000..26_600_000).contains(&params), "{params}");
    let all_values: usize = config.parameters().iter().map(|p| p.numel()).sum();
    for (storage, bytes_per) in [(WeightStorage::Fp32, 4), (WeightStorage::Fp16, 2)] {
        let file = write(&config, &w, 224, storage);
        let expected = all_values * bytes_per;
        // Graph structure and names add well under 1 % to the raw weights.
        assert!(
            file.len() >= expected && file.len() < expected + expected / 100,
            "{storage:?}: {} vs {expected}",
            file.len()
        );
        if storage == WeightStorage::Fp16 {
            assert!(
                file.len() < 60_000_000,
                "FP16 DenseNet-161 must fit 60 MB: {}",
                file.len()
            );
            continue;
        }
        let mut s = common::cpu_session(&file);
        for n in [1usize, 2] {
            let p = run_probabilities(&mut s, input(n, 224, n as u64), n, 224).unwrap();
            assert_eq!(p.len(), n);
            for row in p {
                assert!(row.iter().all(|v| v.is_finite()));
                assert!((row[0] + row[1] - 1.0).abs() < 1e-5, "{row:?}");
            }
        }
    }
}

/// Two dense blocks of 2 and 3 layers, growth 3, 6 initial features: every kind of
/// layer, small enough for the reference forward pass.
fn tiny_config() -> DenseNetConfig {
    DenseNetConfig {
        growth_rate: 3,
        block_config: vec![2, 3],
        num_init_features: 6,
        bn_size: 2,
        num_classes: 2,
    }
}

#[test]
fn tiny_network_matches_reference_forward() {
    let config = tiny_config();
    let mut w = config.random_weights(11);
    // Non-trivial BatchNorm statistics and biases, so every parameter matters.
    let mut r = cxr::model::arch::SplitMix64(5);
    for (name, t) in w.iter_mut() {
        if name.ends_with("running_var") {
            t.data
                .iter_mut()
                .for_each(|v| *v = 0.5 + r.uniform() as f32);
        } else if name.ends_with("running_mean") || name.ends_with("bias") {
            t.data
                .iter_mut()
                .for_each(|v| *v = (r.uniform() - 0.5) as f32);
        } else if name.contains("norm") && name.ends_with("weight") {
            t.data
                .iter_mut()
                .for_each(|v| *v = 0.5 + r.uniform() as f32);
        }
    }
    let s = 29; // odd size exercises pooling edges
    let file = write(&config, &w, s as u32, WeightStorage::Fp32);
    let mut session = common::cpu_session(&file);
    let x = input(2, s, 99);
    let got = logits(&mut session, x.clone(), 2, s);
    for b in 0..2 {
        let img = Tensor::new(
            vec![3, s, s],
            x[b * 3 * s * s..(b + 1) * 3 * s * s].to_vec(),
        );
        let want = reference::densenet(&config, &w, img);
        for k in 0..2 {
            let d = (got[b * 2 + k] - want[k]).abs();
            assert!(
                d <= 1e-5 * want[k].abs().max(1.0),
                "logit {b},{k}: onnx {} reference {}",
                got[b * 2 + k],
                want[k]
            );
        }
    }
}

/// The `cam` and `embedding` outputs: against the reference's final features (the
/// classifier's rows over each position; their spatial mean), and the identity
/// mean_hw(cam[:, c]) + bias[c] = logits[:, c].
#[test]
fn cam_and_embedding_match_the_reference_and_sum_to_the_logits() {
    let config = tiny_config();
    let mut w = config.random_weights(21);
    let mut r = cxr::model::arch::SplitMix64(8);
    for v in &mut w.get_mut("classifier.bias").unwrap().data {
        *v = (r.uniform() - 0.5) as f32;
    }
    let s = 40;
    let file = write(&config, &w, s as u32, WeightStorage::Fp32);
    let sig = cxr::model::onnx::signature(&file).unwrap();
    let names: Vec<&str> = sig.outputs.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(names, ["logits", "probabilities", "cam", "embedding"]);
    let mut session = common::cpu_session(&file);
    let n = 2;
    let x = input(n, s, 7);
    let t = ort::value::Tensor::from_array(([n, 3, s, s], x.clone().into_boxed_slice())).unwrap();
    let out = session.run(ort::inputs!["image" => t]).unwrap();
    let (lshape, logits) = out["logits"].try_extract_tensor::<f32>().unwrap();
    assert_eq!(&lshape[..], &[n as i64, 2]);
    let (cshape, cam) = out["cam"].try_extract_tensor::<f32>().unwrap();
    let (eshape, emb) = out["embedding"].try_extract_tensor::<f32>().unwrap();
    let (h, wd) = (cshape[2] as usize, cshape[3] as usize);
    assert_eq!(&cshape[..2], &[n as i64, 2]);
    let bias = &w["classifier.weight"];
    let cw = &bias.data;
    let channels = bias.shape[1];
    assert_eq!(&eshape[..], &[n as i64, channels as i64]);
    let cb = &w["classifier.bias"].data;
    for b in 0..n {
        let img = Tensor::new(
            vec![3, s, s],
            x[b * 3 * s * s..(b + 1) * 3 * s * s].to_vec(),
        );
        let f = reference::final_features(&config, &w, img);
        assert_eq!(f.shape, vec![channels, h, wd]);
        let hw = h * wd;
        for c in 0..2 {
            let map = &cam[(b * 2 + c) * hw..(b * 2 + c + 1) * hw];
            for (p, got) in map.iter().enumerate() {
                let want: f32 = (0..channels)
                    .map(|k| cw[c * channels + k] * f.data[k * hw + p])
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "cam {b},{c},{p}"
                );
            }
            let mean = map.iter().sum::<f32>() / hw as f32;
            let logit = logits[b * 2 + c];
            assert!(
                (mean + cb[c] - logit).abs() <= 1e-4,
                "mean_hw(cam) + bias = {} vs logit {logit}",
                mean + cb[c]
            );
        }
        for k in 0..channels {
            let want = f.data[k * hw..(k + 1) * hw].iter().sum::<f32>() / hw as f32;
            assert!((emb[b * channels + k] - want).abs() <= 1e-5 * want.abs().max(1.0));
        }
    }
}

#[test]
fn fp16_storage_agrees_with_fp32() {
    let config = DenseNetConfig::tiny();
    let w = config.random_weights(3);
    let s = 32;
    let mut a = common::cpu_session(&write(&config, &w, s as u32, WeightStorage::Fp32));
    let mut b = common::cpu_session(&write(&config, &w, s as u32, WeightStorage::Fp16));
    let x = input(4, s, 1);
    let pa = run_probabilities(&mut a, x.clone(), 4, s).unwrap();
    let pb = run_probabilities(&mut b, x, 4, s).unwrap();
    for (ra, rb) in pa.iter().zip(&pb) {
        assert!((ra[1] - rb[1]).abs() <= 1e-2, "{ra:?} vs {rb:?}");
    }
}

#[test]
fn weights_read_back_exactly_fp32_and_within_half_precision_fp16() {
    let config = DenseNetConfig::tiny();
    let w = config.random_weights(5);
    let back =
        cxr::model::onnx::read_weights(&write(&config, &w, 32, WeightStorage::Fp32)).unwrap();
    assert_eq!(back.len(), w.len());
    for (name, t) in &w {
        assert_eq!(back[name].shape, t.shape, "{name}");
        assert_eq!(back[name].data, t.data, "{name}");
    }
    let half =
        cxr::model::onnx::read_weights(&write(&config, &w, 32, WeightStorage::Fp16)).unwrap();
    assert_eq!(half.len(), w.len());
    for (name, t) in &w {
        assert_eq!(half[name].shape, t.shape, "{name}");
        for (a, b) in t.data.iter().zip(&half[name].data) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-7, "{name}: {a} vs {b}");
        }
    }
    assert!(cxr::model::onnx::read_weights(b"not an onnx file").is_err());
}

#[test]
fn wrong_input_shape_is_an_error_not_a_panic() {
    let config = DenseNetConfig::tiny();
    let file = write(&config, &config.random_weights(1), 32, WeightStorage::Fp32);
    let mut s = common::cpu_session(&file);
    assert!(run_probabilities(&mut s, input(1, 16, 1), 1, 16).is_err());
}

mod reference;

#[test]
fn device_auto_falls_back_to_cpu_and_cuda_refuses_without_a_gpu() {
    use cxr::inference::{Device, Provider, SessionOptions, create_session};
    let config = DenseNetConfig::tiny();
    let file = write(&config, &config.random_weights(1), 32, WeightStorage::Fp32);
    let env = common::ort_env();
    let (mut s, provider, reason) = create_session(
        env,
        &file,
        SessionOptions {
            device: Device::Auto,
            intra_threads: 1,
            cpu_arena: false,
            intra_spinning: true,
        },
    )
    .expect("auto always yields a session");
    match provider {
        // No CUDA here (CPU wheel or no GPU): the reason is kept for /models and the log.
        Provider::Cpu => assert!(
            reason.as_deref().is_some_and(|r| !r.is_empty()),
            "fallback says why"
        ),
        Provider::Cuda => assert!(reason.is_none()),
        Provider::OpenVinoCpu => panic!("create_session never makes an OpenVINO backend"),
    }
    assert_eq!(
        run_probabilities(&mut s, input(1, 32, 2), 1, 32)
            .unwrap()
            .len(),
        1
    );
    let cuda = create_session(
        env,
        &file,
        SessionOptions {
            device: Device::Cuda,
            intra_threads: 1,
            cpu_arena: false,
            intra_spinning: true,
        },
    );
    match (provider, cuda) {
        (Provider::Cpu, Err(e)) => assert!(e.to_string().contains("Cuda"), "{e}"),
        (Provider::Cuda, Ok((_, Provider::Cuda, None))) => {}
        (p, other) => panic!("auto gave {p:?} but cuda gave {:?}", other.map(|r| r.1)),
    }
}

/// The CUDA attempt fails after registration (session creation on the provider, as
/// on a machine whose GPU is busy or whose driver is too old): `--device auto` falls
/// back to a working CPU session and keeps the reason; `--device cuda` refuses with
/// it; `--device cpu` never tries.
#[test]
fn a_cuda_session_that_fails_falls_back_to_the_cpu_with_its_reason() {
    use cxr::inference::{Device, Provider, SessionOptions, create_session_via};
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), "m", 1, 0.9, 0.9);
    let bytes = std::fs::read(dir.path().join("m.onnx")).unwrap();
    let env = common::ort_env();
    let opts = |device| SessionOptions {
        device,
        intra_threads: 1,
        cpu_arena: false,
        intra_spinning: true,
    };
    let failing = |_: &ort::environment::Environment,
                   _: &[u8]|
     -> Result<ort::session::Session, cxr::inference::CudaError> {
        Err(cxr::inference::CudaError::Session(
            "CUDA provider registered; session creation failed: out of memory (simulated)".into(),
        ))
    };
    let (mut s, provider, reason) =
        create_session_via(env, &bytes, opts(Device::Auto), failing).unwrap();
    assert_eq!(provider, Provider::Cpu);
    assert!(
        reason
            .as_deref()
            .unwrap()
            .contains("session creation failed"),
        "{reason:?}"
    );
    // The fallback session answers.
    let p = cxr::inference::run_probabilities(&mut s, vec![0.1; 3 * 32 * 32], 1, 32).unwrap();
    assert!((p[0][0] + p[0][1] - 1.0).abs() < 1e-5);
    let e = create_session_via(env, &bytes, opts(Device::Cuda), failing).unwrap_err();
    assert!(e.to_string().contains("session creation failed"), "{e}");
    let tried = std::cell::Cell::new(false);
    let (_, provider, reason) = create_session_via(env, &bytes, opts(Device::Cpu), |_, _| {
        tried.set(true);
        Err(cxr::inference::CudaError::Session("never".into()))
    })
    .unwrap();
    assert!(!tried.get() && provider == Provider::Cpu && reason.is_none());
}
