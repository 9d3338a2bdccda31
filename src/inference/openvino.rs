//! The OpenVINO backend: the same ONNX file run by OpenVINO's CPU plugin (its ONNX
//! front end reads our files directly), behind the same [`Backend`] trait as ONNX
//! Runtime, with the same outputs (`logits`, `probabilities`, `cam`, `embedding`).
//! The library (`libopenvino_c`) is loaded at run time from the `openvino` PyPI
//! wheel that `scripts/setup.sh` installs (`.openvino/lib`), or `OPENVINO_LIB`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use openvino::{Core, DeviceType, ElementType, RwPropertyKey, Shape, Tensor};

use crate::inference::backend::Backend;
use crate::inference::decision::{
    BackendDecision, BackendDecisionSource, BackendFigures, CpuBackend, DecisionStore, Entry, Key,
    Lookup, Recorded, Runtimes, decide,
};
use crate::inference::runtime::{ModelOutput, RunError, model_outputs};
use crate::model::onnx::{LOGITS_NAME, PROBABILITIES_NAME};

crate::message_error!(
    /// Why OpenVINO could not load or compile a model.
    OpenVinoError
);

/// Where `scripts/setup.sh` links the wheel's library.
pub const DEFAULT_LIB: &str = ".openvino/lib/libopenvino_c.so";

/// The library to load: `OPENVINO_LIB`, else [`DEFAULT_LIB`] under the working
/// directory or the executable's.
pub fn resolve_library() -> PathBuf {
    if let Ok(p) = std::env::var("OPENVINO_LIB")
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    crate::inference::runtime::find_beside(DEFAULT_LIB)
}

static LOADED: OnceLock<Result<(), OpenVinoError>> = OnceLock::new();

/// Loads the library once.
fn load() -> Result<(), OpenVinoError> {
    LOADED
        .get_or_init(|| {
            let lib = resolve_library();
            openvino_sys::library::load_from(&lib)
                .map_err(|e| OpenVinoError(format!("OpenVINO library {}: {e}", lib.display())))
        })
        .clone()
}

/// OpenVINO's build number (its library loaded first), as decisions are keyed by.
pub fn runtime_version() -> Result<String, OpenVinoError> {
    load()?;
    Ok(openvino::version().build_number)
}

fn ov(e: impl std::fmt::Display) -> OpenVinoError {
    OpenVinoError(format!("OpenVINO: {e}"))
}

fn run_error(e: impl std::fmt::Display) -> RunError {
    RunError::Runtime(format!("OpenVINO: {e}"))
}

/// A model compiled for OpenVINO's CPU plugin, twice: for latency (one request
/// using every inference thread: what a lone image runs on) and for throughput
/// (OpenVINO's streams, each a request with a share of the threads: a batch is
/// split across them and they run at once). A batch on the latency model makes all
/// threads meet at every layer, so one core taken away for a moment (the server
/// decoding the next request) stalls the other; streams do not wait on each other,
/// and under load the served rate stays near raw OpenVINO's own async rate
/// (bench/RESULTS.md).
pub struct OpenVinoModel {
    // Fields drop in order: requests before their compiled models, those before
    // the core.
    /// The latency model's request, reused batch after batch (the worker runs one
    /// batch at a time): its buffers are kept.
    req: openvino::InferRequest,
    /// One request per stream of the throughput model (none with a single stream).
    streams: Vec<openvino::InferRequest>,
    outputs: Vec<String>,
    /// With a cache: whether both compiled models were loaded from it (`false`: at
    /// least one was compiled here).
    from_cache: Option<bool>,
    _compiled: [openvino::CompiledModel; 2],
    _core: Core,
}

impl OpenVinoModel {
    /// Reads and compiles `onnx` with `threads` inference threads (0: OpenVINO's
    /// choice) and the given precision hint (`f32` keeps an FP32 file in FP32). With
    /// `cache`, OpenVINO's compiled-model cache (`CACHE_DIR`): a model compiled
    /// before with the same settings on this CPU is loaded from there, not compiled.
    pub fn load(
        onnx: &[u8],
        threads: usize,
        precision: Option<&str>,
        cache: Option<&Path>,
    ) -> Result<Self, OpenVinoError> {
        load()?;
        let mut core = Core::new().map_err(ov)?;
        let cpu = DeviceType::CPU;
        if let Some(dir) = cache {
            core.set_property(&cpu, &RwPropertyKey::CacheDir, &dir.to_string_lossy())
                .map_err(ov)?;
        }
        if threads > 0 {
            core.set_property(
                &cpu,
                &RwPropertyKey::InferenceNumThreads,
                &threads.to_string(),
            )
            .map_err(ov)?;
        }
        if let Some(p) = precision {
            core.set_property(&cpu, &RwPropertyKey::HintInferencePrecision, p)
                .map_err(ov)?;
        }
        // OpenVINO writes a cache entry in place and maps the entries it loads: a
        // replica loading an entry another is still writing died of SIGBUS (two
        // replicas racing at their first start, tests/backend_decision.rs). Every
        // process compiles under one lock on the cache; an entry, once written
        // whole, is only ever read.
        let _compiling = cache.and_then(lock_cache);
        let model = core.read_model_from_buffer(onnx, None).map_err(ov)?;
        let mut outputs = Vec::new();
        for i in 0..model.get_outputs_len().map_err(ov)? {
            outputs.push(
                model
                    .get_output_by_index(i)
                    .map_err(ov)?
                    .get_name()
                    .map_err(ov)?,
            );
        }
        for needed in [LOGITS_NAME, PROBABILITIES_NAME] {
            if !outputs.iter().any(|o| o == needed) {
                return Err(OpenVinoError(format!("the model has no `{needed}` output")));
            }
        }
        let mut compile = |hint: &str| -> Result<openvino::CompiledModel, OpenVinoError> {
            core.set_property(&cpu, &RwPropertyKey::HintPerformanceMode, hint)
                .map_err(ov)?;
            core.compile_model(&model, DeviceType::CPU).map_err(ov)
        };
        let mut latency = compile("LATENCY")?;
        let mut throughput = compile("THROUGHPUT")?;
        let from_cache =
            cache.map(|_| loaded_from_cache(&latency) && loaded_from_cache(&throughput));
        let req = latency.create_infer_request().map_err(ov)?;
        let n: usize = throughput
            .get_property(&openvino::PropertyKey::OptimalNumberOfInferRequests)
            .map_err(ov)?
            .trim()
            .parse()
            .map_err(ov)?;
        let streams = if n > 1 {
            (0..n)
                .map(|_| throughput.create_infer_request().map_err(ov))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            req,
            streams,
            outputs,
            from_cache,
            _compiled: [latency, throughput],
            _core: core,
        })
    }

    /// Requests the throughput model runs at once (1: every batch on the latency
    /// model).
    pub fn streams(&self) -> usize {
        self.streams.len().max(1)
    }

    /// With a cache: whether this load took both compiled models from it (`false`:
    /// compiled here, and written there).
    pub fn from_cache(&self) -> Option<bool> {
        self.from_cache
    }
}

/// OpenVINO's `LOADED_FROM_CACHE` of a compiled model (`false` where it cannot say).
fn loaded_from_cache(compiled: &openvino::CompiledModel) -> bool {
    compiled
        .get_property(&openvino::PropertyKey::Other("LOADED_FROM_CACHE".into()))
        .is_ok_and(|v| matches!(v.trim(), "YES" | "true" | "TRUE" | "1"))
}

/// OpenVINO reads a compiled model back from its cache as IR, with its IR front end
/// (`libopenvino_ir_frontend`), which it looks for beside its own library: without
/// it, every entry fails to load and is compiled again (and rewritten) at every
/// start. Whether it is beside `lib` (the library [`resolve_library`] names).
pub fn ir_frontend_beside(lib: &Path) -> bool {
    let dir = lib.parent().unwrap_or(Path::new("."));
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("libopenvino_ir_frontend.so"))
        })
    })
}

/// An exclusive lock on OpenVINO's cache folder (`.cxr-compile.lock` in it), held
/// until dropped; `None` (and compiling unlocked) where the lock file cannot be
/// made.
fn lock_cache(dir: &Path) -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".cxr-compile.lock"))
        .ok()?;
    f.lock().ok()?;
    Some(f)
}

/// Sets `n` images of `[3, s, s]` as `req`'s input.
fn set_input(
    req: &mut openvino::InferRequest,
    batch: &[f32],
    n: usize,
    s: usize,
) -> Result<(), RunError> {
    let shape = Shape::new(&[n as i64, 3, s as i64, s as i64]).map_err(run_error)?;
    let mut input = Tensor::new(ElementType::F32, &shape).map_err(run_error)?;
    input
        .get_data_mut::<f32>()
        .map_err(run_error)?
        .copy_from_slice(batch);
    req.set_input_tensor(&input).map_err(run_error)
}

/// A named output's shape and values.
fn output(req: &openvino::InferRequest, name: &str) -> Result<(Vec<i64>, Vec<f32>), RunError> {
    let t = req.get_tensor(name).map_err(run_error)?;
    let shape = t.get_shape().map_err(run_error)?.get_dimensions().to_vec();
    let data = t.get_data::<f32>().map_err(run_error)?.to_vec();
    Ok((shape, data))
}

impl Backend for OpenVinoModel {
    fn run(&mut self, batch: Vec<f32>, n: usize, s: usize) -> Result<Vec<ModelOutput>, RunError> {
        let per = 3 * s * s;
        // A lone image (or a single stream): the latency model, every thread on it.
        if n == 1 || self.streams.len() < 2 {
            set_input(&mut self.req, &batch, n, s)?;
            self.req.infer().map_err(run_error)?;
            let req = &self.req;
            return model_outputs(n, |name| {
                if !self.outputs.iter().any(|o| o == name) {
                    return Ok(None);
                }
                let (shape, data) = output(req, name)?;
                Ok(Some((shape, Cow::Owned(data))))
            });
        }
        // A batch: split in order across the streams, run at once, joined in order.
        let k = self.streams.len().min(n);
        let sizes: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
        // Each stream's request runs synchronously on a scoped thread of its own
        // (the crate's `wait_for` reports no timeout, so waiting on an async start
        // cannot tell finished from not yet): the scope ends when all have.
        let mut parts = Vec::with_capacity(k);
        let mut at = 0;
        for &m in &sizes {
            parts.push(&batch[at * per..(at + m) * per]);
            at += m;
        }
        let ran: Vec<Result<(), RunError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self.streams[..k]
                .iter_mut()
                .zip(parts.iter().zip(&sizes))
                .map(|(req, (part, &m))| {
                    scope.spawn(move || {
                        set_input(req, part, m, s)?;
                        req.infer().map_err(run_error)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(RunError::Runtime("OpenVINO: a stream panicked".into()))
                    })
                })
                .collect()
        });
        for r in ran {
            r?;
        }
        let streams = &self.streams[..k];
        model_outputs(n, |name| {
            if !self.outputs.iter().any(|o| o == name) {
                return Ok(None);
            }
            let mut shape = Vec::new();
            let mut data = Vec::new();
            for req in streams {
                let (sh, d) = output(req, name)?;
                shape = sh;
                data.extend_from_slice(&d);
            }
            if let Some(first) = shape.first_mut() {
                *first = n as i64;
            }
            Ok(Some((shape, Cow::Owned(data))))
        })
    }
}

/// What `choose` decided, and why.
pub struct Choice {
    /// OpenVINO serves the model.
    pub chose_openvino: bool,
    /// The reason, for the log.
    pub why: String,
    /// With `--backend auto` and a decision file: the decision and where it came
    /// from.
    pub decision: Option<BackendDecision>,
    /// OpenVINO serving with its compiled-model cache: whether this start loaded
    /// its compiled models from there ([`OpenVinoModel::from_cache`]).
    pub from_cache: Option<bool>,
}

/// How [`choose`] chooses: what was asked, what OpenVINO is compiled with, and
/// where the deployment's decision is kept.
pub(super) struct Chooser<'a> {
    /// `--backend` (or `--model-backend`) for this model.
    pub asked: crate::inference::BackendChoice,
    /// Inference threads (0: the runtime's choice).
    pub threads: usize,
    /// The served batch size.
    pub max_batch: usize,
    /// OpenVINO's compiled-model cache.
    pub cache: Option<&'a Path>,
    /// The deployment's decision (`--backend auto`); `None`: measured and not kept.
    pub decisions: Option<&'a DecisionStore>,
}

/// The precision OpenVINO computes a file's floating-point parts in: `f32` always,
/// so that an FP32 file answers as ONNX Runtime does (OpenVINO's default on CPUs
/// with bf16 is bf16, which moves answers and, measured, was slower here).
pub fn precision_hint(_card: &crate::registry::ModelCard) -> Option<&'static str> {
    Some("f32")
}

/// Most |Δ P(PNEUMONIA)| between the backends on the probe: FP32 files must agree
/// to 1e-4; INT8 files run different INT8 kernels, so to 2e-2.
fn tolerance(card: &crate::registry::ModelCard) -> f32 {
    match card.precision {
        crate::model::int8::Precision::Fp32 => 1e-4,
        crate::model::int8::Precision::Int8 => 2e-2,
    }
}

/// Milliseconds `b` takes for one batch of `n`.
fn time_ms(b: &mut dyn Backend, n: usize, s: usize) -> Result<f64, RunError> {
    let input = vec![0.1_f32; n * 3 * s * s];
    let t = std::time::Instant::now();
    b.run(input, n, s)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The fastest of `xs`: load from elsewhere only ever adds time, so the fastest run
/// is the one nearest what the backend itself takes.
fn fastest(xs: Vec<f64>) -> f64 {
    xs.into_iter().fold(f64::INFINITY, f64::min)
}

/// Chooses the CPU backend of one model (`--backend openvino|auto`): OpenVINO must
/// load the file and agree with ONNX Runtime on a fixed probe batch. `auto` with a
/// decision file takes the decision for this file, CPU and runtimes when there is
/// one, else measures both at batch 1 and at `max_batch`, decides ([`decide`], with
/// hysteresis) and writes the decision; without one it measures and decides.
/// Returns the backend to serve with, and the choice or why OpenVINO is not used.
pub(super) fn choose(
    c: &Chooser<'_>,
    card: &crate::registry::ModelCard,
    onnx: &[u8],
    mut ort: Box<dyn Backend>,
    s: usize,
) -> (Box<dyn Backend>, Result<Choice, OpenVinoError>) {
    use crate::inference::runtime::BackendChoice;
    if c.asked == BackendChoice::Auto
        && let Some(store) = c.decisions
    {
        return choose_by_decision(c, store, card, onnx, ort, s);
    }
    let (mut ov, diff, _) = match checked(c, card, onnx, ort.as_mut(), s) {
        Ok(v) => v,
        Err(e) => return (ort, Err(e)),
    };
    match c.asked {
        BackendChoice::Ort => (ort, Err(OpenVinoError("--backend ort".into()))),
        BackendChoice::Openvino => {
            let from_cache = ov.from_cache();
            (
                Box::new(ov),
                Ok(Choice {
                    chose_openvino: true,
                    why: format!("--backend openvino; agrees with ONNX Runtime (|Δp| {diff:.1e})"),
                    decision: None,
                    from_cache,
                }),
            )
        }
        BackendChoice::Auto => match measure(ort.as_mut(), &mut ov, c.max_batch, s, diff) {
            Ok(f) => {
                let why = format!("measured: {}", f.describe());
                serve(decide(&f, CpuBackend::Ort), ort, ov, why, None)
            }
            Err(e) => (ort, Err(OpenVinoError(format!("timing run failed: {e}")))),
        },
    }
}

/// `auto` with a decision file: the decision read, or measured and written.
fn choose_by_decision(
    c: &Chooser<'_>,
    store: &DecisionStore,
    card: &crate::registry::ModelCard,
    onnx: &[u8],
    mut ort: Box<dyn Backend>,
    s: usize,
) -> (Box<dyn Backend>, Result<Choice, OpenVinoError>) {
    let key = match key_for(c, store, card) {
        Ok(k) => k,
        Err(e) => return (ort, Err(e)),
    };
    let path = store.path();
    match store.lookup(&card.name, &key) {
        Lookup::Found(entry) => {
            let facts = BackendDecision::of(&entry, BackendDecisionSource::Read, path, false);
            let why = read_why(path, &entry);
            match entry.backend {
                CpuBackend::Ort => (
                    ort,
                    Ok(Choice {
                        chose_openvino: false,
                        why,
                        decision: Some(facts),
                        from_cache: None,
                    }),
                ),
                // Taken as is, but OpenVINO still has to agree with ONNX Runtime here.
                CpuBackend::Openvino => match checked(c, card, onnx, ort.as_mut(), s) {
                    Ok((ov, _, _)) => {
                        warn_compiled_again(&ov, card, c.cache);
                        serve(CpuBackend::Openvino, ort, ov, why, Some(facts))
                    }
                    Err(e) => (
                        ort,
                        Err(OpenVinoError(format!(
                            "the decision in {} names OpenVINO, but {e}",
                            path.display()
                        ))),
                    ),
                },
            }
        }
        Lookup::Missing { incumbent } => {
            let (mut ov, diff, ort_probe) = match checked(c, card, onnx, ort.as_mut(), s) {
                Ok(v) => v,
                Err(e) => return (ort, Err(e)),
            };
            let f = match measure(ort.as_mut(), &mut ov, c.max_batch, s, diff) {
                Ok(f) => f,
                Err(e) => return (ort, Err(OpenVinoError(format!("timing run failed: {e}")))),
            };
            let incumbent = incumbent.unwrap_or(CpuBackend::Ort);
            let ours = Entry {
                model: card.name.clone(),
                version: card.version.clone(),
                key,
                backend: decide(&f, incumbent),
                figures: f,
                ort_probe: ort_probe.iter().map(|&p| f64::from(p)).collect(),
                incumbent,
                decided_at: crate::clock::now_rfc3339(),
                decided_by: store.host().to_string(),
            };
            let measured = format!("measured: {}", f.describe());
            let (entry, source, written, why) = match store.record(ours.clone()) {
                Ok(Recorded::Written(e)) => (e, BackendDecisionSource::Measured, true, measured),
                Ok(Recorded::Standing(e)) => {
                    let why = format!(
                        "{measured}; but {} wrote its decision to {} meanwhile, and it stands: {}",
                        e.decided_by,
                        path.display(),
                        e.backend.as_str()
                    );
                    (e, BackendDecisionSource::Read, false, why)
                }
                Err(e) => {
                    if store.first_write_failure() {
                        tracing::warn!(error = %e, "the backend decision is not kept: the next start measures again (give --backend-decision a writable path, e.g. a volume)");
                    }
                    (ours, BackendDecisionSource::Measured, false, measured)
                }
            };
            let facts = BackendDecision::of(&entry, source, path, written);
            serve(entry.backend, ort, ov, why, Some(facts))
        }
    }
}

/// The fixed probe batch: `n` images of `[3, s, s]`.
fn probe(n: usize, s: usize) -> Vec<f32> {
    (0..n * 3 * s * s)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// What this replica's decision for `card` is keyed by.
fn key_for(
    c: &Chooser<'_>,
    store: &DecisionStore,
    card: &crate::registry::ModelCard,
) -> Result<Key, OpenVinoError> {
    Ok(Key {
        file_sha256: card.onnx.sha256.to_ascii_lowercase(),
        cpu: store.cpu().clone(),
        runtimes: Runtimes {
            onnxruntime: crate::inference::runtime::ort_build(),
            openvino: runtime_version()?,
        },
        intra_threads: c.threads,
        max_batch: c.max_batch.max(1),
    })
}

/// Why a model serves by a decision read from `path`.
fn read_why(path: &Path, entry: &Entry) -> String {
    format!(
        "read from {}: {} (measured {} by {}: {})",
        path.display(),
        entry.backend.as_str(),
        entry.decided_at,
        entry.decided_by,
        entry.figures.describe()
    )
}

/// `auto` before ONNX Runtime's session is made: OpenVINO, when the decision file
/// has an entry for this file, CPU and runtimes that names it and OpenVINO agrees
/// (within the card's tolerance) with ONNX Runtime's probe answers recorded there,
/// warm at the probe's batch size and at 1. `None` otherwise: the session is made
/// and [`choose`] decides (reading the same entry, checking OpenVINO against ONNX
/// Runtime itself).
pub(super) fn read_openvino(
    c: &Chooser<'_>,
    card: &crate::registry::ModelCard,
    onnx: &[u8],
    s: usize,
) -> Option<(OpenVinoModel, Choice)> {
    let store = c.decisions?;
    let key = key_for(c, store, card).ok()?;
    let Lookup::Found(entry) = store.lookup(&card.name, &key) else {
        return None;
    };
    if entry.backend != CpuBackend::Openvino {
        return None;
    }
    let n = c.max_batch.max(1);
    let mut ov = OpenVinoModel::load(onnx, c.threads, precision_hint(card), c.cache).ok()?;
    warn_compiled_again(&ov, card, c.cache);
    let got = ov.run(probe(n, s), n, s).ok()?;
    ov.run(vec![0.0; 3 * s * s], 1, s).ok()?;
    let diff = got
        .iter()
        .zip(&entry.ort_probe)
        .map(|(o, &r)| (f64::from(o.probabilities[1]) - r).abs())
        .fold(0.0_f64, f64::max);
    if got.len() != entry.ort_probe.len() || diff > f64::from(tolerance(card)) {
        tracing::warn!(model = %card.name, max_abs_dp = diff, "OpenVINO disagrees with the probe answers of the decision it read: ONNX Runtime checks it here");
        return None;
    }
    let path = store.path();
    let from_cache = ov.from_cache();
    Some((
        ov,
        Choice {
            chose_openvino: true,
            why: read_why(path, &entry),
            decision: Some(BackendDecision::of(
                &entry,
                BackendDecisionSource::Read,
                path,
                false,
            )),
            from_cache,
        },
    ))
}

/// A decision naming OpenVINO was read, so a replica on this CPU compiled the model
/// into `cache` before: a model compiled again here means the cache is not being
/// read (every start then pays the compile), which is said, with the cause when it
/// is the known one.
fn warn_compiled_again(
    ov: &OpenVinoModel,
    card: &crate::registry::ModelCard,
    cache: Option<&Path>,
) {
    let (Some(false), Some(dir)) = (ov.from_cache(), cache) else {
        return;
    };
    let lib = resolve_library();
    let reason = if ir_frontend_beside(&lib) {
        "no entry for it there (a new volume, or one the replicas do not share?), or one OpenVINO could not load".to_string()
    } else {
        format!(
            "no libopenvino_ir_frontend beside {}: OpenVINO cannot read its cache without it",
            lib.display()
        )
    };
    tracing::warn!(model = %card.name, cache = %dir.display(), %reason, "OpenVINO compiled the model again: a replica compiled it before, but its compiled-model cache was not used");
}

/// OpenVINO's model, agreeing with ONNX Runtime on the fixed probe batch (the served
/// batch size) and warm at batch 1; with the most |Δp| on the probe and ONNX
/// Runtime's P(PNEUMONIA) for each probe image.
fn checked(
    c: &Chooser<'_>,
    card: &crate::registry::ModelCard,
    onnx: &[u8],
    ort: &mut dyn Backend,
    s: usize,
) -> Result<(OpenVinoModel, f32, Vec<f32>), OpenVinoError> {
    let mut ov = OpenVinoModel::load(onnx, c.threads, precision_hint(card), c.cache)?;
    let n = c.max_batch.max(1);
    let probe = probe(n, s);
    let (a, b) = match (ort.run(probe.clone(), n, s), ov.run(probe, n, s)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return Err(OpenVinoError(format!("probe run failed: {e}")));
        }
    };
    // The probe ran the served batch size; a lone image runs on the latency model,
    // whose first run is slow too: warm it before it answers anyone.
    ov.run(vec![0.0; 3 * s * s], 1, s)
        .map_err(|e| OpenVinoError(format!("warm-up run failed: {e}")))?;
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x.probabilities[1] - y.probabilities[1]).abs())
        .fold(0.0_f32, f32::max);
    if diff > tolerance(card) {
        return Err(OpenVinoError(format!(
            "it disagrees with ONNX Runtime on the probe batch: |Δp| {diff:.2e} > {:.0e}",
            tolerance(card)
        )));
    }
    Ok((ov, diff, a.iter().map(|x| x.probabilities[1]).collect()))
}

/// Both backends timed in four blocks, ONNX Runtime, OpenVINO, OpenVINO, ONNX Runtime
/// (a drift in the load from elsewhere on a shared CPU falls on both alike), each
/// block one warm-up run and 3 timed runs at batch 1, then the same at the served
/// batch size, after a pause that lets the other backend's threads stop spinning
/// (ONNX Runtime's spin after each run: run right after it, OpenVINO measured up to
/// 2× slower); each figure the fastest of its 6 runs.
fn measure(
    ort: &mut dyn Backend,
    ov: &mut OpenVinoModel,
    max_batch: usize,
    s: usize,
    diff: f32,
) -> Result<BackendFigures, RunError> {
    let n = max_batch.max(1);
    // [ort batch 1, ort per image at n, OpenVINO batch 1, OpenVINO per image at n]
    let mut t: [Vec<f64>; 4] = Default::default();
    for use_ov in [false, true, true, false] {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let b: &mut dyn Backend = if use_ov { &mut *ov } else { &mut *ort };
        let at = if use_ov { 2 } else { 0 };
        for (k, size) in [(0, 1), (1, n)] {
            time_ms(b, size, s)?;
            for _ in 0..3 {
                t[at + k].push(time_ms(b, size, s)? / size as f64);
            }
        }
    }
    let [o1, on, v1, vn] = t.map(fastest);
    Ok(BackendFigures {
        batch: n,
        ort_batch1_ms: o1,
        ort_per_image_ms: on,
        openvino_batch1_ms: v1,
        openvino_per_image_ms: vn,
        max_abs_dp: f64::from(diff),
    })
}

/// The backend decided, the other dropped.
fn serve(
    backend: CpuBackend,
    ort: Box<dyn Backend>,
    ov: OpenVinoModel,
    why: String,
    decision: Option<BackendDecision>,
) -> (Box<dyn Backend>, Result<Choice, OpenVinoError>) {
    let chose_openvino = backend == CpuBackend::Openvino;
    let from_cache = ov.from_cache().filter(|_| chose_openvino);
    let b: Box<dyn Backend> = if chose_openvino { Box::new(ov) } else { ort };
    (
        b,
        Ok(Choice {
            chose_openvino,
            why,
            decision,
            from_cache,
        }),
    )
}
