//! Raw ONNX Runtime through cxr's own session settings (the shared intra-op pool,
//! no memory arena, spinning threads: what `cxr-serve` runs by default), by batch
//! size: milliseconds per image, the median of `rounds` interleaved rounds. What
//! the CPU default of `--max-batch` was chosen with (bench/RESULTS.md).
//!
//!   cargo run --release --example raw_batches -- models/weighted.onnx [secs] [rounds] [1,2,4,8]
//!
//! `POOL=session` gives the session its own pool of two threads instead.

use std::time::{Duration, Instant};

use cxr::inference::{
    Device, SessionOptions, SharedPool, create_session, environment_with, resolve_library,
    run_outputs,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .expect("usage: raw_batches MODEL.onnx [secs] [rounds] [sizes]");
    let secs: f64 = args.get(2).map_or(1.5, |a| a.parse().expect("seconds"));
    let rounds: usize = args.get(3).map_or(3, |a| a.parse().expect("rounds"));
    let sizes: Vec<usize> = args
        .get(4)
        .map_or("1,2,4,8", String::as_str)
        .split(',')
        .map(|x| x.parse().expect("batch sizes"))
        .collect();
    let shared = std::env::var("POOL").map_or(true, |v| v != "session");
    let pool = shared.then_some(SharedPool {
        threads: 0,
        spinning: true,
    });
    let env = environment_with(&resolve_library(None), pool).expect("ONNX Runtime");
    let bytes = std::fs::read(model).expect("model file");
    let opts = SessionOptions {
        device: Device::Cpu,
        intra_threads: if shared { 0 } else { 2 },
        cpu_arena: false,
        intra_spinning: true,
    };
    let (mut session, _, _) = create_session(env, &bytes, opts).expect("session");
    let s = 224;
    let mut r = cxr::model::arch::SplitMix64(7);
    let largest = sizes.iter().copied().max().unwrap_or(1);
    let noise: Vec<f32> = (0..largest * 3 * s * s)
        .map(|_| (r.uniform() as f32 - 0.5) * 3.4)
        .collect();
    let input = |b: usize| noise[..b * 3 * s * s].to_vec();
    for &b in &sizes {
        run_outputs(&mut session, input(b), b, s).expect("warm-up run");
    }
    let mut ms = vec![Vec::new(); sizes.len()];
    for _ in 0..rounds {
        for (i, &b) in sizes.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(30));
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed().as_secs_f64() < secs {
                run_outputs(&mut session, input(b), b, s).expect("run");
                n += b;
            }
            ms[i].push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
        }
    }
    let cells: Vec<String> = sizes
        .iter()
        .zip(&mut ms)
        .map(|(b, v)| {
            v.sort_by(f64::total_cmp);
            format!("b{b} {:.1}", v[v.len() / 2])
        })
        .collect();
    let pool = if shared { "shared pool" } else { "own pool" };
    println!(
        "{model} ({pool}) ms/image, median of {rounds}: {}",
        cells.join(", ")
    );
}
