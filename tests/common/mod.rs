//! Helpers shared by the integration tests: the ONNX Runtime environment, tiny
//! models written by our own writer, and generated images. No test needs the data
//! set or the network.
#![allow(dead_code)]

pub mod dicom;
pub mod http;
pub mod ops;
pub mod sign;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use cxr::eval::Metrics as EvalMetrics;
use cxr::model::arch::{DenseNetConfig, Weights};
use cxr::model::onnx::WeightStorage;
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
        intra_spinning: true,
    };
    cxr::inference::create_session(ort_env(), bytes, opts)
        .expect("session")
        .0
}

/// `bytes` as the trainer measures a model file (a CPU session behind the backend
/// boundary).
pub fn cpu_model(bytes: &[u8]) -> cxr::inference::CpuModel {
    cxr::inference::CpuModel::load(&cxr::inference::resolve_library(None), bytes)
        .expect("measuring session")
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
    write_tiny(
        dir,
        name,
        "0.0.1-test",
        seed,
        sensitivity,
        specificity,
        threshold,
    )
}

/// A tiny variant `name` at `version` in the versioned layout:
/// `models/<name>/<version>/<name>.json`.
pub fn write_tiny_version(models: &Path, name: &str, version: &str, seed: u64) -> Weights {
    write_tiny(
        &models.join(name).join(version),
        name,
        version,
        seed,
        0.9,
        0.8,
        0.5,
    )
}

fn write_tiny(
    dir: &Path,
    name: &str,
    version: &str,
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
            version,
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

/// Gives `name` (in `dir`) an OOD model under which every image scores above `inner`:
/// a one-component density model centred at zero, whose score of any non-zero
/// embedding is positive. With `outer` above every score, every film is answered with
/// a distribution-shift warning; without it, every film is refused.
pub fn ood_above_everything(dir: &Path, name: &str, outer: Option<f64>) -> cxr::ood_score::OodCard {
    ood_at(dir, name, 1e-6, outer)
}

/// [`ood_above_everything`] with the first threshold `inner` (1e12: every film is in
/// distribution).
pub fn ood_at(dir: &Path, name: &str, inner: f64, outer: Option<f64>) -> cxr::ood_score::OodCard {
    let card = dir.join(format!("{name}.json"));
    let loaded = cxr::registry::load_card(&card).unwrap();
    let pre = cxr::imaging::Preprocessor::new(loaded.card.input_size, &loaded.card.preprocessing)
        .unwrap();
    let out = cpu_model(&loaded.onnx_bytes)
        .run_images(&pre, &[pre.resize(&gray_image(64, 64, 1))])
        .unwrap();
    let dim = out[0]
        .embedding
        .as_ref()
        .expect("an embedding output")
        .len();
    let mut basis = vec![0.0f32; dim];
    basis[0] = 1.0;
    let m = cxr::ood_score::OodModel {
        dim,
        center: vec![0.0; dim],
        basis,
        variances: vec![1.0],
        class_means: vec![vec![0.0], vec![0.0]],
        residual_mean_square: 1.0,
        threshold: inner,
    };
    let bytes = m.to_json();
    std::fs::write(dir.join(format!("{name}.ood.json")), &bytes).unwrap();
    let entry = cxr::ood_score::OodCard {
        file: format!("{name}.ood.json"),
        sha256: cxr::registry::sha256_hex(&bytes),
        method: "test: every non-zero embedding scores above the threshold".into(),
        threshold: inner,
        target_acceptance: 0.99,
        threshold_source: "test".into(),
        validation_acceptance: 0.0,
        validation_stressed_acceptance: 0.0,
        test_acceptance: None,
        fit_images: 0,
        components: 1,
        ood_set_refused: None,
        ood_set: None,
        refuse_threshold: outer,
        refuse_rule: outer.map(|_| "test".into()),
    };
    cxr::registry::set_card_ood(&card, &entry).unwrap();
    entry
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
use cxr::http::{AppState, Limits, ServerMetrics};
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
        door_models: Vec::new(),
        ort_lib: cxr::inference::resolve_library(None),
        device: Device::Cpu,
        intra_threads: 1,
        cpu_mem_arena: false,
        intra_spinning: true,
        shared_pool: false,
        cuda_max_batch: batch.max_batch,
        backend: cxr::inference::BackendChoice::Ort,
        model_backends: Default::default(),
        decision: Default::default(),
        site_card: None,
        trusted_signers: None,
        require_signed: false,
        batch,
    }
}

pub fn test_app_with(limits: Limits, batch: BatchConfig) -> TestApp {
    test_app_configured(limits, batch, |s| s)
}

/// What a test sets before the core and the HTTP door's state are built: the
/// core's parts (audit trail, UID root) and the door's own (API keys, metrics port).
pub struct Setup {
    core: cxr::predict::CoreBuilder,
    keys: Option<cxr::access::ApiKeys>,
    public_metrics: bool,
    body: Option<cxr::http::BodyLimits>,
}

#[allow(dead_code)]
impl Setup {
    pub fn with_audit(mut self, audit: cxr::audit::Audit) -> Self {
        self.core = self.core.audit(audit);
        self
    }

    pub fn with_uid_root(mut self, root: String) -> Self {
        self.core = self.core.uid_root(root);
        self
    }

    pub fn with_api_keys(mut self, keys: cxr::access::ApiKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn without_public_metrics(mut self) -> Self {
        self.public_metrics = false;
        self
    }

    /// The HTTP door's `--max-body-bytes` (the body timeout as by default).
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.body = Some(cxr::http::BodyLimits {
            max_body_bytes,
            ..cxr::http::BodyLimits::default()
        });
        self
    }

    fn build(self) -> AppState {
        let mut state = AppState::with_core(self.core.build());
        if let Some(b) = self.body {
            state = state.with_body_limits(b);
        }
        if let Some(k) = self.keys {
            state = state.with_api_keys(k);
        }
        if !self.public_metrics {
            state = state.without_public_metrics();
        }
        state
    }
}

/// [`test_app_with`], the core and state first set up by `configure` (API keys,
/// audit, metrics port).
pub fn test_app_configured(
    limits: Limits,
    batch: BatchConfig,
    configure: impl FnOnce(Setup) -> Setup,
) -> TestApp {
    test_app_in(models_dir(), limits, batch, configure)
}

/// [`test_app_configured`] over the models in `dir` (`alpha` among them).
pub fn test_app_in(
    dir: tempfile::TempDir,
    limits: Limits,
    batch: BatchConfig,
    configure: impl FnOnce(Setup) -> Setup,
) -> TestApp {
    ort_env();
    let metrics = Arc::new(ServerMetrics::new());
    let state = configure(Setup {
        core: cxr::Core::builder(limits, metrics.clone()),
        keys: None,
        public_metrics: true,
        body: None,
    })
    .build();
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
        arrival_wait: std::time::Duration::ZERO,
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
    let (status, body) = tcp_http_bytes(addr, method, path, headers, body).expect("connect");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One HTTP/1.1 request over a real socket: status and body as bytes; `None` when
/// nothing listens.
pub fn tcp_http_bytes(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    tcp_http_full(addr, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`tcp_http_bytes`] with the response head (status line and headers) too.
pub fn tcp_http_full(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head, out[end + 4..].to_vec()))
}

/// Runs cxr-serve on port 0 with `args`, then `--models-dir models`, expecting it to
/// refuse to start: its stderr (what an operator reads).
pub fn serve_fails<S: AsRef<std::ffi::OsStr>>(models: &Path, args: &[S]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args(["--port", "0"])
        .args(args)
        .arg("--models-dir")
        .arg(models)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .output()
        .expect("run cxr-serve");
    assert!(!out.status.success(), "cxr-serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The real `cxr-serve` binary on 127.0.0.1, port 0 (CPU, JSON logs, one intra-op
/// thread) over `models`, with `extra` flags. Killed when dropped, so a failing test
/// never leaves it holding the test runner's output open.
pub struct Server {
    pub child: std::process::Child,
    /// The API address, from the start-up log.
    pub addr: String,
    /// The start-up log lines up to the API address, parsed.
    pub startup: Vec<serde_json::Value>,
    logs: Option<std::io::Lines<std::io::BufReader<std::process::ChildStdout>>>,
}

impl Server {
    pub fn start<S: AsRef<std::ffi::OsStr>>(models: &Path, extra: &[S]) -> Self {
        Self::start_until(models, extra, "addr")
    }

    /// [`Server::start`], returning once the start-up log names `field` (e.g.
    /// `bound`, the API address before it accepts connections), which becomes
    /// [`Server::addr`].
    pub fn start_until<S: AsRef<std::ffi::OsStr>>(models: &Path, extra: &[S], field: &str) -> Self {
        Self::start_with_env(models, extra, field, &[])
    }

    /// [`Server::start_until`] with `env` set for the process (e.g. `OPENVINO_LIB`).
    #[allow(dead_code)]
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(
        models: &Path,
        extra: &[S],
        field: &str,
        env: &[(&str, &Path)],
    ) -> Self {
        let env: Vec<(&str, String)> = env
            .iter()
            .map(|(k, v)| (*k, v.display().to_string()))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Self::start_with_env(models, extra, field, &env)
    }

    /// [`Server::start_until`] with environment variables set for the server (a
    /// secret that is never a flag, e.g. `CXR_FHIR_TOKEN`).
    pub fn start_with_env<S: AsRef<std::ffi::OsStr>>(
        models: &Path,
        extra: &[S],
        field: &str,
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
            .args(["--log-format", "json", "--intra-threads", "1"])
            .args(extra)
            .arg("--models-dir")
            .arg(models)
            .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cxr-serve");
        let mut logs = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut startup = Vec::new();
        let mut addr = None;
        for line in logs.by_ref() {
            let line = line.unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("JSON log line: {line}"));
            addr = v["fields"][field].as_str().map(str::to_string);
            startup.push(v);
            if addr.is_some() {
                break;
            }
        }
        Self {
            child,
            addr: addr.unwrap_or_else(|| panic!("the server logs `{field}`")),
            startup,
            logs: Some(logs),
        }
    }

    /// Reads the log until a line has `field`; its value.
    pub fn wait_log_field(&mut self, field: &str) -> String {
        let logs = self.logs.as_mut().expect("logs not discarded");
        for line in logs.by_ref() {
            let line = line.unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("JSON log line: {line}"));
            if let Some(value) = v["fields"][field].as_str() {
                let value = value.to_string();
                self.startup.push(v);
                return value;
            }
            self.startup.push(v);
        }
        panic!("the log ended before `{field}`")
    }

    /// A start-up log field's first value (e.g. `metrics_addr`).
    pub fn startup_field(&self, name: &str) -> Option<String> {
        self.startup
            .iter()
            .find_map(|v| v["fields"][name].as_str().map(str::to_string))
    }

    /// Waits (up to 60 s) for `/ready` to answer 200.
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tcp_http(&self.addr, "GET", "/ready", None, b"").0 != 200 {
            assert!(std::time::Instant::now() < deadline, "not ready in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads the log on a thread from now on (so the server never blocks on a full
    /// pipe).
    pub fn discard_logs(&mut self) {
        if let Some(logs) = self.logs.take() {
            // CXR_TEST_LOGS=1 shows them (on the test's stderr) instead.
            let show = std::env::var_os("CXR_TEST_LOGS").is_some();
            std::thread::spawn(move || {
                for line in logs.map_while(Result::ok) {
                    if show {
                        eprintln!("{line}");
                    }
                }
            });
        }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// After [`Server::sigterm`]: the rest of the log and whether it exited 0.
    pub fn finish(&mut self) -> (Vec<String>, bool) {
        let rest: Vec<String> = self
            .logs
            .take()
            .map(|l| l.map_while(Result::ok).collect())
            .unwrap_or_default();
        (rest, self.child.wait().unwrap().success())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image for the protocol clients' tests, as a PNG file and as the preprocessed
/// tensor (`[1, 3, S, S]`, little-endian FP32) that `model`'s own transform makes of
/// it, in `work`: their paths and `S`.
pub fn interop_inputs(models: &Path, model: &str, work: &Path) -> (PathBuf, PathBuf, u32) {
    let png = png_bytes(&gray_image(128, 100, 6));
    let card = cxr::registry::load_card(&models.join(format!("{model}.json")))
        .unwrap()
        .card;
    let pre = cxr::imaging::Preprocessor::new(card.input_size, &card.preprocessing).unwrap();
    let tensor = pre
        .preprocess_checked(
            &png,
            1 << 24,
            &cxr::imaging::Geometry::default(),
            &mut cxr::imaging::GateTime::default(),
        )
        .unwrap();
    let png_path = work.join("x.png");
    let tensor_path = work.join("x.f32");
    std::fs::write(&png_path, &png).unwrap();
    std::fs::write(
        &tensor_path,
        tensor
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    (png_path, tensor_path, card.input_size)
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's Python (scripts/setup.sh --test installs the test tools there).
pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// Runs `cmd` to its end and asserts it succeeded; its stdout and stderr together.
#[allow(dead_code)]
pub fn succeeds(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// A Debian tool's path (scripts/setup.sh --test installs them).
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: run scripts/setup.sh --test (Debian packages orthanc, orthanc-dicomweb, dcmtk, dicom3tools)"
    );
}

/// A TCP port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the folder job (`cxr-serve --job`) over `input` into `out` with `extra`
/// flags; its stdout (it must succeed).
pub fn job(models: &Path, input: &Path, out: &Path, extra: &[&str]) -> String {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args([
            "--device",
            "cpu",
            "--intra-threads",
            "1",
            "--min-image-side",
            "16",
        ])
        .args(extra)
        .arg("--models-dir")
        .arg(models)
        .arg("--job")
        .arg(input)
        .arg(out)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// `cxr-serve` as a DICOM node ([`Server::start`] with `extra`, which must include
/// `--dicom-port 0`): the server, its logs discarded, and the node's port.
pub fn start_node(models: &Path, extra: &[String]) -> (Server, u16) {
    let mut s = Server::start(models, extra);
    let dicom = s.wait_log_field("dicom_addr");
    s.discard_logs();
    let port = dicom.rsplit(':').next().unwrap().parse().unwrap();
    (s, port)
}

/// `GET /metrics` of `server`.
pub fn metrics_of(server: &Server) -> String {
    tcp_http(&server.addr, "GET", "/metrics", None, b"").1
}

/// The MLLP listener of the HL7 tests (`tests/hl7/listener.py`: python-hl7 ACKs,
/// hl7apy validates) started on `port`, recording each message to `record`.
pub fn spawn_mllp_listener(port: u16, record: &Path) -> std::process::Child {
    std::process::Command::new(python())
        .arg(root().join("tests/hl7/listener.py"))
        .arg(port.to_string())
        .arg(record)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("python listener.py (scripts/setup.sh --test installs hl7 and hl7apy)")
}

/// dcmtk's storescu: `files` to the node on `port` as `ae` (called AE `CXR`).
pub fn storescu(ae: &str, port: u16, files: &[&Path]) -> std::process::Output {
    let mut args = vec!["-aet".to_string(), ae.into(), "-aec".into(), "CXR".into()];
    args.extend(["127.0.0.1".to_string(), port.to_string()]);
    args.extend(files.iter().map(|f| f.display().to_string()));
    std::process::Command::new(tool("storescu"))
        .args(&args)
        .output()
        .expect("storescu")
}
/// The CPU image's OpenVINO libraries, as the Dockerfile's `openvino-cpu` stage
/// copies them (each `"$libs"/NAME` of its `cp`), linked from the wheel's folder
/// into `dir` with the `libopenvino_c.so` link it makes; the library to load.
pub fn image_openvino_libs(dir: &Path) -> PathBuf {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let stage = dockerfile
        .split(" AS openvino-cpu")
        .nth(1)
        .and_then(|s| s.split("\nFROM ").next())
        .expect("the Dockerfile's openvino-cpu stage");
    let names: Vec<&str> = stage
        .split("\"$libs\"/")
        .skip(1)
        .filter_map(|t| t.split_whitespace().next())
        .collect();
    assert!(names.len() >= 5, "the stage's libraries: {names:?}");
    let wheel = std::fs::canonicalize(
        cxr::inference::openvino::resolve_library()
            .parent()
            .unwrap(),
    )
    .expect("OpenVINO's wheel (scripts/setup.sh)");
    std::fs::create_dir_all(dir).unwrap();
    let mut c_lib = None;
    for e in std::fs::read_dir(&wheel).unwrap().map(Result::unwrap) {
        let file = e.file_name().to_string_lossy().into_owned();
        let wanted = names.iter().any(|n| match n.strip_suffix('*') {
            Some(prefix) => file.starts_with(prefix),
            None => file == *n,
        });
        if wanted && !e.file_type().unwrap().is_symlink() {
            let to = dir.join(&file);
            if std::fs::hard_link(e.path(), &to).is_err() {
                std::fs::copy(e.path(), &to).unwrap();
            }
            if file.starts_with("libopenvino_c.so.") {
                c_lib = Some(file);
            }
        }
    }
    let link = dir.join("libopenvino_c.so");
    std::os::unix::fs::symlink(c_lib.expect("libopenvino_c.so.* in the list"), &link).unwrap();
    link
}

/// The records of the audit file at `path`, one JSON object a line (none while the
/// file does not exist yet, for a test that waits for one).
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}
