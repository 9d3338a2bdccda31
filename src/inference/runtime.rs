//! The ONNX Runtime library and its sessions.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`) from the official PyPI
//! wheel that `scripts/setup.sh` installs: nothing is downloaded at build time. A
//! missing or incompatible library is a clear error naming the path and the fix.
//! Sessions are created on the requested device; with [`Device::Auto`] a CUDA
//! registration *or session creation* failure falls back to a CPU session, since
//! `ort` itself never falls back once a provider was registered.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where the setup script links the library, relative to the repository root.
pub const DEFAULT_LIB: &str = ".ort/lib/libonnxruntime.so";

/// Which CPU backend runs a model (`--backend`): ONNX Runtime, OpenVINO, or the
/// faster of the two on this machine, measured at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// ONNX Runtime (the default).
    Ort,
    /// OpenVINO (falls back to ONNX Runtime, logged, when it cannot load the file
    /// or disagrees with ONNX Runtime on the probe).
    Openvino,
    /// The deployment's decision for the file and CPU (`--backend-decision`): read,
    /// or both measured at load on the batch sizes served, the faster kept (by a
    /// margin) and the decision written.
    Auto,
}

/// Which execution provider to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when it registers and a session can be created on it, else the CPU.
    Auto,
    /// The CPU only.
    Cpu,
    /// CUDA or fail.
    Cuda,
}

/// The execution provider a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Provider {
    /// `CPUExecutionProvider`.
    #[serde(rename = "CPUExecutionProvider")]
    Cpu,
    /// `CUDAExecutionProvider`.
    #[serde(rename = "CUDAExecutionProvider")]
    Cuda,
    /// OpenVINO's CPU plugin (`--backend openvino|auto`).
    #[serde(rename = "OpenVINO:CPU")]
    OpenVinoCpu,
}

impl Provider {
    /// ONNX Runtime's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::OpenVinoCpu => "OpenVINO:CPU",
        }
    }
}

/// ONNX Runtime could not be loaded or a session could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The library file does not exist.
    #[error(
        "ONNX Runtime library not found at {0}: run `bash scripts/setup.sh` (installs the onnxruntime 1.32.0 wheel and links it at {DEFAULT_LIB}), or pass --ort-lib / set ORT_DYLIB_PATH to libonnxruntime.so"
    )]
    Missing(PathBuf),
    /// The file exists but is not a usable ONNX Runtime.
    #[error(
        "cannot load ONNX Runtime from {path}: {reason}; install onnxruntime 1.32.0 with `bash scripts/setup.sh`"
    )]
    Load {
        /// The library path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A different library was loaded earlier in this process.
    #[error(
        "ONNX Runtime was already loaded from {loaded}; cannot switch to {requested} in the same process"
    )]
    AlreadyLoaded {
        /// The one in use.
        loaded: PathBuf,
        /// The one asked for.
        requested: PathBuf,
    },
    /// Session creation failed.
    #[error("cannot create an ONNX Runtime session on {device:?}: {reason}")]
    Session {
        /// Requested device.
        device: Device,
        /// Why.
        reason: String,
    },
}

/// The loaded library's build (`git-branch=rel-…, git-commit-id=…`, without its
/// compiler flags), as backend decisions are keyed by. Call after [`environment`].
pub fn ort_build() -> String {
    let info = ort::info();
    let info = info.strip_prefix("ORT Build Info: ").unwrap_or(info);
    info.split(", cmake")
        .next()
        .unwrap_or(info)
        .trim()
        .to_string()
}

/// Finds the library: `explicit` (flag or `ORT_DYLIB_PATH`) if given, else
/// [`DEFAULT_LIB`] under the working directory or any folder above the executable.
pub fn resolve_library(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH")
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    find_beside(DEFAULT_LIB)
}

/// `rel` under the working directory or any folder above the executable, the first
/// that exists (else `rel` itself): where `scripts/setup.sh` links the runtimes'
/// libraries.
pub(crate) fn find_beside(rel: &str) -> PathBuf {
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots
        .iter()
        .map(|r| r.join(rel))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(rel))
}

static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads ONNX Runtime once per process and returns its environment (each session
/// with its own thread pool).
pub fn environment(library: &Path) -> Result<&'static Environment, RuntimeError> {
    environment_with(library, None)
}

/// One intra-op thread pool for every session of the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedPool {
    /// Threads, the caller's included (0 = one per core).
    pub threads: usize,
    /// Whether they spin while waiting for work.
    pub spinning: bool,
}

/// [`environment`], with every session's intra-op work on one shared pool when
/// `pool` is given: a server with several models then has one set of threads for
/// the cores, and one model's threads cannot spin on the cores another model's run
/// needs. The first call in a process decides; later calls get that environment.
pub fn environment_with(
    library: &Path,
    pool: Option<SharedPool>,
) -> Result<&'static Environment, RuntimeError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        let same = loaded == library || loaded.canonicalize().ok() == library.canonicalize().ok();
        return if same {
            Ok(env)
        } else {
            Err(RuntimeError::AlreadyLoaded {
                loaded: loaded.clone(),
                requested: library.into(),
            })
        };
    }
    if !library.exists() {
        return Err(RuntimeError::Missing(library.into()));
    }
    let load = |reason: String| RuntimeError::Load {
        path: library.into(),
        reason,
    };
    let mut builder = ort::init_from(library)
        .map_err(|e| load(e.to_string()))?
        .with_name("cxr")
        .with_telemetry(false);
    if let Some(p) = pool {
        let opts = ort::environment::GlobalThreadPoolOptions::default()
            .with_intra_threads(p.threads)
            .and_then(|o| o.with_spin_control(p.spinning))
            .map_err(|e| load(e.to_string()))?;
        builder = builder.with_global_thread_pool(opts);
    }
    let env = builder.build().map_err(|e| load(e.to_string()))?;
    let (_, env) = ENVIRONMENT.get_or_init(|| (library.to_path_buf(), env));
    Ok(env)
}

/// Session settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Requested device.
    pub device: Device,
    /// Intra-op threads for the CPU provider (0 = ONNX Runtime's default: one per core).
    pub intra_threads: usize,
    /// ONNX Runtime's CPU memory arena (faster allocation; it keeps what it grew to).
    pub cpu_arena: bool,
    /// Whether intra-op threads spin while waiting for work (ONNX Runtime's default):
    /// lower latency alone on a machine, but a spinning thread takes a core from
    /// request decoding and from other models' sessions.
    pub intra_spinning: bool,
}

/// Creates a session for `model` (ONNX bytes) and says which provider it runs on.
pub fn create_session(
    env: &Environment,
    model: &[u8],
    opts: SessionOptions,
) -> Result<(Session, Provider, Option<String>), RuntimeError> {
    create_session_via(env, model, opts, cuda_session)
}

/// [`create_session`] with the CUDA attempt given: what the fallback does when the
/// CUDA provider registers but the session cannot be created on it (or any step of
/// the attempt fails) is tested through this, without a GPU.
pub fn create_session_via(
    env: &Environment,
    model: &[u8],
    opts: SessionOptions,
    cuda_session: impl FnOnce(&Environment, &[u8]) -> Result<Session, CudaError>,
) -> Result<(Session, Provider, Option<String>), RuntimeError> {
    let fail = |device, e: &dyn std::fmt::Display| RuntimeError::Session {
        device,
        reason: e.to_string(),
    };
    let mut cuda_error = None;
    if matches!(opts.device, Device::Auto | Device::Cuda) {
        match cuda_session(env, model) {
            Ok(s) => return Ok((s, Provider::Cuda, None)),
            Err(e) if opts.device == Device::Cuda => return Err(fail(Device::Cuda, &e)),
            Err(e) => cuda_error = Some(e.to_string()),
        }
    }
    let mut b = Session::builder(env).map_err(|e| fail(Device::Cpu, &e))?;
    b = b
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail(Device::Cpu, &e))?;
    if opts.intra_threads > 0 {
        b = b
            .with_intra_threads(opts.intra_threads)
            .map_err(|e| fail(Device::Cpu, &e))?;
    }
    b = b
        .with_intra_op_spinning(opts.intra_spinning)
        .map_err(|e| fail(Device::Cpu, &e))?;
    let mut b = b
        .with_execution_providers([ort::ep::CPU::default()
            .with_arena_allocator(opts.cpu_arena)
            .build()])
        .map_err(|e| fail(Device::Cpu, &e))?;
    let session = b
        .commit_from_memory(model)
        .map_err(|e| fail(Device::Cpu, &e))?;
    Ok((session, Provider::Cpu, cuda_error))
}

/// Why the CUDA execution provider gave no session.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CudaError {
    /// This build has no CUDA execution provider.
    #[error("this build of cxr has no CUDA support (built without feature `cuda`)")]
    NotBuilt,
    /// ONNX Runtime refused a step: the provider, the builder or the session.
    #[error("{0}")]
    Session(String),
}

#[cfg(feature = "cuda")]
fn cuda_session(env: &Environment, model: &[u8]) -> Result<Session, CudaError> {
    let fail = |e: &dyn std::fmt::Display| CudaError::Session(e.to_string());
    let ep = ort::ep::CUDA::default().build().error_on_failure();
    let b = Session::builder(env).map_err(|e| fail(&e))?;
    let b = b
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail(&e))?;
    let mut b = b.with_execution_providers([ep]).map_err(|e| fail(&e))?;
    b.commit_from_memory(model).map_err(|e| fail(&e))
}

#[cfg(not(feature = "cuda"))]
fn cuda_session(_env: &Environment, _model: &[u8]) -> Result<Session, CudaError> {
    Err(CudaError::NotBuilt)
}

/// One image's two model outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutput {
    /// The `logits` row.
    pub logits: [f32; 2],
    /// The `probabilities` row (softmax of the logits, computed in the graph).
    pub probabilities: [f32; 2],
    /// The class activation maps, when the model file has a `cam` output.
    pub cam: Option<ClassMaps>,
    /// The globally pooled features, when the model file has an `embedding` output.
    pub embedding: Option<Vec<f32>>,
}

/// A row's class activation maps: one `height × width` grid per class (NORMAL,
/// PNEUMONIA), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMaps {
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// `2 × height × width` values.
    pub data: Vec<f32>,
}

impl ClassMaps {
    /// The grid of class `c`.
    pub fn class(&self, c: usize) -> &[f32] {
        let hw = self.height * self.width;
        &self.data[c * hw..(c + 1) * hw]
    }
}

/// Why a run gave no outputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// ONNX Runtime refused or failed the run (its message).
    #[error("{0}")]
    Runtime(String),
    /// An output has another shape than the model contract says.
    #[error("model returned {output} of shape {shape:?} for a batch of {n}")]
    Shape {
        /// Output name.
        output: &'static str,
        /// Its shape.
        shape: Vec<i64>,
        /// The batch.
        n: usize,
    },
    /// The worker running the batch died (a panic); it is being restarted.
    #[error("the inference worker died running this batch; it is restarting")]
    WorkerDied,
}

pub(super) fn ort_error(e: ort::Error) -> RunError {
    RunError::Runtime(e.to_string())
}

/// Runs `session` on a `[n, 3, s, s]` batch fed to the model's input; every output.
pub(super) fn run_batch(
    session: &mut Session,
    batch: Vec<f32>,
    n: usize,
    s: usize,
) -> Result<ort::session::SessionOutputs<'_>, RunError> {
    debug_assert_eq!(batch.len(), n * 3 * s * s, "batch length matches its shape");
    let input = ort::value::Tensor::from_array(([n, 3, s, s], batch.into_boxed_slice()))
        .map_err(ort_error)?;
    session
        .run(ort::inputs![crate::model::onnx::INPUT_NAME => input])
        .map_err(ort_error)
}

/// Runs `session` on a `[n, 3, s, s]` batch and returns the `probabilities` rows.
pub fn run_probabilities(
    session: &mut Session,
    batch: Vec<f32>,
    n: usize,
    s: usize,
) -> Result<Vec<[f32; 2]>, RunError> {
    Ok(run_outputs(session, batch, n, s)?
        .into_iter()
        .map(|o| o.probabilities)
        .collect())
}

/// Runs `session` on a `[n, 3, s, s]` batch: each input's logits and probabilities,
/// and its class maps and embedding when the model has those outputs.
pub fn run_outputs(
    session: &mut Session,
    batch: Vec<f32>,
    n: usize,
    s: usize,
) -> Result<Vec<ModelOutput>, RunError> {
    let outputs = run_batch(session, batch, n, s)?;
    model_outputs(n, |name| match outputs.get(name) {
        None => Ok(None),
        Some(v) => {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_error)?;
            Ok(Some((shape.to_vec(), std::borrow::Cow::Borrowed(data))))
        }
    })
}

/// A named output's shape and values, as a backend gives them (`None`: the model has
/// no such output).
pub(crate) type NamedOutput<'a> = Option<(Vec<i64>, std::borrow::Cow<'a, [f32]>)>;

/// A batch of `n` inputs' [`ModelOutput`]s from a backend's named outputs, each
/// checked against the model contract: `logits` and `probabilities` `[n, 2]`
/// (required), `cam` `[n, 2, h, w]` and `embedding` `[n, c]` (when present). Every
/// backend answers through this one reading.
pub(crate) fn model_outputs<'a>(
    n: usize,
    mut output: impl FnMut(&'static str) -> Result<NamedOutput<'a>, RunError>,
) -> Result<Vec<ModelOutput>, RunError> {
    use crate::model::onnx::{CAM_NAME, EMBEDDING_NAME, LOGITS_NAME, PROBABILITIES_NAME};
    let mut rows = |name: &'static str| -> Result<Vec<[f32; 2]>, RunError> {
        let (shape, data) = output(name)?
            .ok_or_else(|| RunError::Runtime(format!("the model has no `{name}` output")))?;
        if shape.len() != 2 || shape[0] as usize != n || shape[1] != 2 {
            return Err(RunError::Shape {
                output: name,
                shape,
                n,
            });
        }
        Ok(data.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    };
    let logits = rows(LOGITS_NAME)?;
    let probs = rows(PROBABILITIES_NAME)?;
    let mut maps: Vec<Option<ClassMaps>> = vec![None; n];
    if let Some((shape, data)) = output(CAM_NAME)? {
        if shape.len() != 4 || shape[0] as usize != n || shape[1] != 2 {
            return Err(RunError::Shape {
                output: CAM_NAME,
                shape,
                n,
            });
        }
        let (h, w) = (shape[2] as usize, shape[3] as usize);
        for (i, m) in maps.iter_mut().enumerate() {
            *m = Some(ClassMaps {
                height: h,
                width: w,
                data: data[i * 2 * h * w..(i + 1) * 2 * h * w].to_vec(),
            });
        }
    }
    let mut embeddings: Vec<Option<Vec<f32>>> = vec![None; n];
    if let Some((shape, data)) = output(EMBEDDING_NAME)? {
        if shape.len() != 2 || shape[0] as usize != n || shape[1] < 1 {
            return Err(RunError::Shape {
                output: EMBEDDING_NAME,
                shape,
                n,
            });
        }
        let c = shape[1] as usize;
        for (e, row) in embeddings.iter_mut().zip(data.chunks_exact(c)) {
            *e = Some(row.to_vec());
        }
    }
    Ok(logits
        .into_iter()
        .zip(probs)
        .zip(maps)
        .zip(embeddings)
        .map(|(((logits, probabilities), cam), embedding)| ModelOutput {
            logits,
            probabilities,
            cam,
            embedding,
        })
        .collect())
}
