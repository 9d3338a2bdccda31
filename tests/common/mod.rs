//! Helpers shared by the integration tests: the ONNX Runtime environment, tiny
//! models written by our own writer, and generated images. No test needs the data
//! set or the network.
#![allow(dead_code)]

pub mod dicom;
pub mod http;

use std::io::Cursor;
use std::path::Path;

use cxr::arch::{DenseNetConfig, Weights};
use cxr::eval::Metrics as EvalMetrics;
use cxr::onnx::WeightStorage;
use cxr::registry::{CardMetrics, NewModel, Recipe, Strategy};
use image::{GrayImage, ImageFormat, Luma};

/// The process-wide ONNX Runtime environment (library from scripts/setup.sh).
pub fn ort_env() -> &'static ort::environment::Environment {
    let lib = cxr::inference::resolve_library(None);
    cxr::inference::environment(&lib).unwrap_or_else(|e| panic!("{e}"))
}

/// A CPU session on `bytes` with one intra-op thread.
pub fn cpu_session(bytes: &[u8]) -> ort::session::Session {
    let opts = cxr::inference::SessionOptions {
        device: cxr::inference::Device::Cpu,
        intra_threads: 1,
        cpu_arena: false,
    };
    cxr::inference::create_session(ort_env(), bytes, opts)
        .expect("session")
        .0
}

/// Writes a tiny DenseNet variant named `name` with a test-metrics card into `dir`.
pub fn write_tiny_model(
    dir: &Path,
    name: &str,
    seed: u64,
    sensitivity: f64,
    specificity: f64,
) -> Weights {
    write_tiny_model_at(dir, name, seed, sensitivity, specificity, 0.5)
}

/// [`write_tiny_model`] with the card's decision threshold.
pub fn write_tiny_model_at(
    dir: &Path,
    name: &str,
    seed: u64,
    sensitivity: f64,
    specificity: f64,
    threshold: f64,
) -> Weights {
    let config = DenseNetConfig::tiny();
    let weights = config.random_weights(seed);
    let mut test = EvalMetrics::compute(&[0.9, 0.1], &[1, 0], 0.5);
    test.sensitivity = sensitivity;
    test.specificity = specificity;
    cxr::registry::write_model(
        dir,
        &NewModel {
            name,
            version: "0.0.1-test",
            description: "tiny random DenseNet for tests",
            architecture_name: "densenet-tiny",
            config: &config,
            weights: &weights,
            input_size: 32,
            storage: WeightStorage::Fp32,
            threshold,
            training: Recipe {
                strategy: Strategy::None,
                ..Default::default()
            },
            metrics: CardMetrics {
                test: Some(test),
                validation: None,
                validation_stressed: None,
            },
        },
    )
    .expect("write tiny model");
    weights
}

/// A grayscale gradient with a seed-dependent pattern.
pub fn gray_image(w: u32, h: u32, seed: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([((x * 7 + y * 3 + seed * 31) % 256) as u8 ^ ((x * y) % 7) as u8])
    })
}

/// PNG bytes of `img`.
pub fn png_bytes(img: &GrayImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .expect("encode png");
    out
}

/// JPEG bytes of `img`.
pub fn jpeg_bytes(img: &GrayImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
        .expect("encode jpeg");
    out
}

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cxr::http::{AppState, Limits, Metrics};
use cxr::inference::{BatchConfig, Device, LoadConfig, load_models};

/// A test app over two tiny variants: `alpha` (sensitivity 0.99, specificity 0.70)
/// and `beta` (sensitivity 0.90, specificity 0.95). `alpha` is the default.
pub struct TestApp {
    pub app: Router,
    pub state: AppState,
    pub dir: tempfile::TempDir,
}

pub fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(dir.path(), "alpha", 1, 0.99, 0.70);
    write_tiny_model(dir.path(), "beta", 2, 0.90, 0.95);
    dir
}

pub fn load_config(dir: &Path, batch: BatchConfig) -> LoadConfig {
    LoadConfig {
        models_dir: dir.to_path_buf(),
        default_model: Some("alpha".into()),
        ort_lib: cxr::inference::resolve_library(None),
        device: Device::Cpu,
        intra_threads: 1,
        cpu_mem_arena: false,
        batch,
    }
}

pub fn test_app_with(limits: Limits, batch: BatchConfig) -> TestApp {
    test_app_configured(limits, batch, |s| s)
}

/// [`test_app_with`], the state first passed through `configure` (API keys, audit,
/// metrics port).
pub fn test_app_configured(
    limits: Limits,
    batch: BatchConfig,
    configure: impl FnOnce(AppState) -> AppState,
) -> TestApp {
    ort_env();
    let dir = models_dir();
    let metrics = Arc::new(Metrics::new());
    let state = configure(AppState::new(limits, metrics.clone()));
    let (set, _workers) =
        load_models(&load_config(dir.path(), batch), |n| metrics.observer(n)).expect("load models");
    state.set_models(set);
    TestApp {
        app: cxr::build_app(state.clone()),
        state,
        dir,
    }
}

pub fn default_batch() -> BatchConfig {
    BatchConfig {
        max_batch: 4,
        batch_wait: Duration::from_micros(500),
        capacity: 64,
    }
}

/// Geometry bounds small enough for the tests' tiny images (16 px sides and up);
/// the real defaults (64 px) are tested on their own.
pub fn test_geometry() -> cxr::imaging::Geometry {
    cxr::imaging::Geometry {
        min_side: 16,
        max_aspect: 4.0,
    }
}

/// The default limits, with [`test_geometry`].
pub fn test_limits() -> Limits {
    Limits {
        geometry: test_geometry(),
        ..Limits::default()
    }
}

pub fn test_app() -> TestApp {
    test_app_with(test_limits(), default_batch())
}

/// One HTTP/1.1 request over a real socket (`Connection: close`): status and body.
pub fn tcp_http(
    addr: &str,
    method: &str,
    path: &str,
    ct: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let headers: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
    tcp_http_headers(addr, method, path, &headers, body)
}

/// [`tcp_http`] with any headers.
pub fn tcp_http_headers(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
