//! Serving benchmark: raw ONNX Runtime (no HTTP) vs cxr-serve under a closed-loop
//! load generator at concurrency 1, 2, 4 and 8, on a DenseNet-161 FP32 file with the
//! same thread settings; and the preprocessing cost of a 224 px JPEG and a
//! 2000 × 1600 grayscale JPEG on one core.
//!
//!   cargo bench --bench serve                 (CXR_BENCH_REQUESTS=N per level, default 48)
//!
//! Prints a Markdown table with ratios against raw ONNX Runtime measured in the same
//! run. Nothing here is a pass/fail test: results go to bench/RESULTS.md.

use std::io::{Cursor, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxr::http::{AppState, Limits, ServerMetrics};
use cxr::imaging::{Preprocessing, Preprocessor};
use cxr::inference::{BatchConfig, Device, LoadConfig, SessionOptions};
use cxr::model::arch::DenseNetConfig;
use cxr::model::onnx::WeightStorage;
use cxr::registry::{CardMetrics, NewModel, Recipe};
use image::{GrayImage, ImageFormat, Luma};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut r = cxr::model::arch::SplitMix64(1);
    let img = GrayImage::from_fn(w, h, |x, y| {
        let v =
            128.0 + 60.0 * ((x as f64 / 37.0).sin() + (y as f64 / 23.0).cos()) + r.uniform() * 20.0;
        Luma([v.clamp(0.0, 255.0) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
        .unwrap();
    out
}

/// One keep-alive HTTP/1.1 connection.
struct Conn(TcpStream);

impl Conn {
    fn post(&mut self, body: &[u8]) -> u16 {
        let head = format!(
            "POST /predict HTTP/1.1\r\nHost: b\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.0.write_all(head.as_bytes()).unwrap();
        self.0.write_all(body).unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            self.0.read_exact(&mut byte).unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).unwrap();
        status
    }
}

fn main() {
    let per_level: usize = std::env::var("CXR_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let threads: usize = std::env::var("CXR_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let lib = cxr::inference::resolve_library(None);
    let env = cxr::inference::environment(&lib).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let config = DenseNetConfig::densenet161();
    let weights = config.random_weights(1);
    cxr::registry::write_model(
        dir.path(),
        &NewModel {
            name: "bench",
            version: "0",
            description: "",
            architecture_name: "densenet161",
            config: &config,
            weights: &weights,
            input_size: 224,
            storage: WeightStorage::Fp32,
            threshold: 0.5,
            training: Recipe::default(),
            metrics: CardMetrics::default(),
        },
    )
    .unwrap();
    drop(weights);
    let onnx = std::fs::read(dir.path().join("bench.onnx")).unwrap();
    let body = jpeg(224, 224);
    let pre = Preprocessor::new(224, &Preprocessing::default()).unwrap();
    let x = pre.preprocess(&body, u64::MAX).unwrap();

    println!(
        "DenseNet-161 FP32, 224 px, ONNX Runtime intra-op threads = {}",
        if threads == 0 {
            "default (one per core)".into()
        } else {
            threads.to_string()
        }
    );
    println!();
    // Raw ONNX Runtime.
    let opts = SessionOptions {
        device: Device::Cpu,
        intra_threads: threads,
        cpu_arena: false,
        intra_spinning: true,
    };
    let (mut session, _, _) = cxr::inference::create_session(env, &onnx, opts).unwrap();
    for _ in 0..3 {
        cxr::inference::run_probabilities(&mut session, x.clone(), 1, 224).unwrap();
    }
    let mut lat = Vec::new();
    let t = Instant::now();
    for _ in 0..per_level {
        let s = Instant::now();
        cxr::inference::run_probabilities(&mut session, x.clone(), 1, 224).unwrap();
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let raw1 = per_level as f64 / t.elapsed().as_secs_f64();
    let (raw_p50, raw_p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let b8: Vec<f32> = (0..8).flat_map(|_| x.iter().copied()).collect();
    cxr::inference::run_probabilities(&mut session, b8.clone(), 8, 224).unwrap();
    let t = Instant::now();
    let reps = (per_level / 8).max(2);
    for _ in 0..reps {
        cxr::inference::run_probabilities(&mut session, b8.clone(), 8, 224).unwrap();
    }
    let raw8 = (reps * 8) as f64 / t.elapsed().as_secs_f64();
    let raw_best = raw1.max(raw8);
    drop(session);

    // cxr-serve in-process on a real socket.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(ServerMetrics::new());
    let state = AppState::new(Limits::default(), metrics.clone());
    let cfg = LoadConfig {
        models_dir: dir.path().to_path_buf(),
        default_model: None,
        door_models: Vec::new(),
        ort_lib: lib.clone(),
        device: Device::Cpu,
        intra_threads: threads,
        cpu_mem_arena: false,
        intra_spinning: true,
        shared_pool: false,
        cuda_max_batch: cxr::inference::CUDA_MAX_BATCH,
        backend: cxr::inference::BackendChoice::Ort,
        model_backends: Default::default(),
        decision: Default::default(),
        site_card: None,
        trusted_signers: None,
        require_signed: false,
        batch: BatchConfig {
            max_batch: cxr::inference::CPU_MAX_BATCH,
            batch_wait: Duration::ZERO,
            arrival_wait: Duration::from_millis(20),
            capacity: 64,
        },
    };
    let (set, _workers) = cxr::inference::load_models(&cfg, |n| metrics.observer(n)).unwrap();
    state.set_models(set);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, cxr::build_app(state)).await });

    println!("| load | images/s | ratio to raw | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    println!("| raw ORT, batch 1, sequential | {raw1:.2} | 1.00 | {raw_p50:.1} | {raw_p99:.1} |");
    println!("| raw ORT, batch 8 | {raw8:.2} | {:.2} | | |", raw8 / raw1);
    for conc in [1usize, 2, 4, 8] {
        let mut conns: Vec<Conn> = (0..conc)
            .map(|_| Conn(TcpStream::connect(addr).unwrap()))
            .collect();
        for c in &mut conns {
            assert_eq!(c.post(&body), 200);
        }
        let t = Instant::now();
        let per_conn = per_level.div_ceil(conc);
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let body = body.clone();
                std::thread::spawn(move || {
                    (0..per_conn)
                        .map(|_| {
                            let s = Instant::now();
                            assert_eq!(c.post(&body), 200);
                            s.elapsed().as_secs_f64() * 1e3
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        let mut lat: Vec<f64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let ips = lat.len() as f64 / t.elapsed().as_secs_f64();
        let ratio = if conc == 1 {
            ips / raw1
        } else {
            ips / raw_best
        };
        println!(
            "| cxr-serve, concurrency {conc} | {ips:.2} | {ratio:.2} (vs {}) | {:.1} | {:.1} |",
            if conc == 1 { "raw batch 1" } else { "best raw" },
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );
    }

    // Preprocessing, one core (this thread).
    println!();
    println!(
        "| preprocessing (decode + grayscale + resize + normalise), one thread | mean ms | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|");
    for (label, w, h) in [
        ("224 x 224 JPEG", 224, 224),
        ("2000 x 1600 grayscale JPEG", 2000, 1600),
    ] {
        let b = jpeg(w, h);
        let n = if w > 1000 { 60 } else { 2000 };
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            std::hint::black_box(pre.preprocess(std::hint::black_box(&b), u64::MAX).unwrap());
            lat.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let mean = lat.iter().sum::<f64>() / n as f64;
        println!(
            "| {label} ({} KB) | {mean:.3} | {:.3} | {:.3} |",
            b.len() / 1024,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );
    }
}
