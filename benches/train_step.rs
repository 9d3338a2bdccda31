//! Training-step speed of our tch DenseNet-161 (the cxr-train step: forward,
//! class-weighted cross-entropy with label smoothing, backward, AdamW) on random
//! data. `bench/train_speed.sh` runs it beside the same step in PyTorch.
//!
//!   cargo bench --features train --bench train_step -- SIZE BATCH STEPS THREADS

use std::time::Instant;

use cxr::model::arch::DenseNetConfig;
use cxr::train::model::DenseNet;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

fn main() {
    let a: Vec<i64> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let (size, batch, steps, threads) = match a.as_slice() {
        [s, b, n, t, ..] => (*s, *b, *n, *t),
        _ => (112, 32, 3, 2),
    };
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DenseNet::new(&vs.root(), &DenseNetConfig::densenet161());
    let mut opt = nn::AdamW {
        wd: 0.05,
        ..Default::default()
    }
    .build(&vs, 1e-3)
    .unwrap();
    let x = Tensor::randn([batch, 3, size, size], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(2, [batch], (Kind::Int64, Device::Cpu));
    let w = Tensor::from_slice(&[0.74f32, 0.26]);
    let mut step = || {
        let loss = net.forward_t(&x, true).cross_entropy_loss(
            &y,
            Some(&w),
            tch::Reduction::Mean,
            -100,
            0.1,
        );
        opt.backward_step(&loss);
    };
    step();
    let t = Instant::now();
    for _ in 0..steps {
        step();
    }
    println!("{:.3}", (batch * steps) as f64 / t.elapsed().as_secs_f64());
}
