//! The served model variants: loading from the models folder (cards checked by the
//! registry), one session and batching worker each, warm-up, live statistics, and
//! the choice of a variant for a request (`model=`, `prefer=`, or the default).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Deserialize;
use utoipa::ToSchema;

use super::batcher::{
    Arrival, BatchConfig, BatchObserver, Batcher, JobOutput, SessionFactory, SubmitError,
};
use super::runtime::{
    Device, Provider, SessionOptions, SharedPool, create_session, environment_with,
};
use crate::imaging::Preprocessor;
use crate::registry::{ModelCard, RegistryError, load_dir};

/// What matters most to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// Miss the fewest pneumonias (highest measured sensitivity).
    Sensitivity,
    /// Raise the fewest false alarms (highest measured specificity).
    Specificity,
}

/// Why a variant could not be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// No variant of that name.
    #[error("unknown model `{name}` (served: {served})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The variants served.
        served: String,
    },
    /// The variant is served but not at that version.
    #[error("model `{name}` has no version `{version}` loaded (loaded: {loaded})")]
    UnknownVersion {
        /// The variant.
        name: String,
        /// The version asked for.
        version: String,
        /// The versions loaded.
        loaded: String,
    },
}

/// Largest batch on the CPU unless `--max-batch` says otherwise: the intra-op threads
/// fill the cores at batch 2 already, and larger batches outgrow the caches (served
/// at saturation 7-14 % faster than with 8 here, bench/RESULTS.md).
pub const CPU_MAX_BATCH: usize = 2;

/// Largest batch on CUDA unless `--max-batch` says otherwise.
pub const CUDA_MAX_BATCH: usize = 8;

/// Number of recent latencies kept per model for its summary.
const LATENCY_WINDOW: usize = 1024;

/// One loaded variant.
pub struct ServedModel {
    /// Its card.
    pub card: ModelCard,
    /// Where its card is.
    pub card_path: PathBuf,
    /// The provider its session runs on.
    pub provider: Provider,
    /// Why CUDA was not used, when `--device auto` fell back.
    pub fallback_reason: Option<String>,
    /// With `--backend openvino|auto`: why this CPU backend serves.
    pub backend_choice: Option<String>,
    /// With `--backend auto`: the deployment's decision it serves by, and whether it
    /// was measured now or read.
    pub backend_decision: Option<super::decision::BackendDecision>,
    /// OpenVINO serving with its compiled-model cache (`--openvino-cache-dir`):
    /// whether this start loaded its compiled models from there (`false`: compiled).
    pub openvino_from_cache: Option<bool>,
    /// Milliseconds to create the session and warm it up.
    pub load_time_ms: f64,
    /// Its preprocessing.
    pub preprocessor: Preprocessor,
    /// Its queue (behind the facade: [`ServedModel::announce`], [`ServedModel::submit`],
    /// [`ServedModel::queue_depth`], [`ServedModel::is_alive`]).
    batcher: Batcher,
    /// Its out-of-distribution model, when the card names one.
    pub ood: Option<Arc<crate::ood_score::OodModel>>,
    /// Whether its file has a `cam` output (heatmaps can be drawn).
    pub has_cam: bool,
    /// Its training plots (kind, PNG bytes).
    pub plots: Vec<(&'static str, Vec<u8>)>,
    /// What the site chose for it (`--site-card`): the threshold answers default to,
    /// and the out-of-distribution threshold when the site fitted one.
    pub site: Option<crate::registry::site::AppliedSite>,
    /// Who signed its files (verified before it loaded), or why it loaded unsigned.
    pub provenance: crate::signing::Provenance,
    served: AtomicU64,
    latencies_ms: Mutex<VecDeque<f64>>,
    /// Its agreement with the answers it shadowed (when run as a candidate).
    pub shadow: super::shadow::ShadowTally,
}

impl Drop for ServedModel {
    /// The last request that held it is done: its queue closes, and its worker ends
    /// once it has answered what was queued.
    fn drop(&mut self) {
        tracing::info!(model = %self.card.name, version = %self.card.version, "model version unloaded");
    }
}

/// Why a model gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// Its queue is full.
    #[error("model `{0}` is at capacity")]
    Overloaded(String),
    /// Its worker is not taking jobs (shutting down, or dead and restarting).
    #[error("the inference worker of model `{0}` is not taking requests")]
    Closed(String),
    /// The worker dropped the request without an answer.
    #[error("the inference worker dropped a request")]
    Dropped,
    /// The run failed (the runtime's error, or the worker died running the batch).
    #[error("inference failed: {0}")]
    Failed(#[from] super::RunError),
}

impl ServedModel {
    /// Queues `inputs` (each one preprocessed `[3, s, s]` image, with its
    /// [`Arrival`] when it was announced) now, all of them before any is awaited, so
    /// the images of one request batch together; [`Pending::outputs`] awaits their
    /// answers in order. The queue and the replies stay in here.
    pub fn submit(&self, inputs: Vec<(Vec<f32>, Option<Arrival>)>) -> Result<Pending, InferError> {
        submit_on(&self.batcher, &self.card.name, inputs)
    }
}

/// [`ServedModel::submit`] and [`Pending::outputs`] on a bare batcher (tests run it on
/// a fake backend).
pub async fn classify_on(
    batcher: &Batcher,
    name: &str,
    inputs: Vec<Vec<f32>>,
) -> Result<Vec<JobOutput>, InferError> {
    let inputs = inputs.into_iter().map(|t| (t, None)).collect();
    submit_on(batcher, name, inputs)?.outputs().await
}

/// Queues every input (the first refusal ends it); [`Pending::outputs`] waits for
/// their answers.
fn submit_on(
    batcher: &Batcher,
    name: &str,
    inputs: Vec<(Vec<f32>, Option<Arrival>)>,
) -> Result<Pending, InferError> {
    let mut replies = Vec::with_capacity(inputs.len());
    // The first refusal ends it: the announcements not yet queued go with `inputs`.
    for (input, arrival) in inputs {
        replies.push(
            batcher
                .submit_announced(input, arrival)
                .map_err(|e| match e {
                    SubmitError::Full => InferError::Overloaded(name.to_string()),
                    SubmitError::Closed => InferError::Closed(name.to_string()),
                })?,
        );
    }
    Ok(Pending(replies))
}

/// Queued inputs whose answers are awaited.
pub struct Pending(Vec<tokio::sync::oneshot::Receiver<Result<JobOutput, super::RunError>>>);

impl Pending {
    /// Their outputs, in order.
    pub async fn outputs(self) -> Result<Vec<JobOutput>, InferError> {
        let mut out = Vec::with_capacity(self.0.len());
        for rx in self.0 {
            out.push(rx.await.map_err(|_| InferError::Dropped)??);
        }
        Ok(out)
    }
}

impl ServedModel {
    /// The out-of-distribution threshold in force: the site's, when its card fitted
    /// one (at most the card's second threshold), else the model card's (none
    /// without an OOD model).
    pub fn ood_threshold(&self) -> Option<f64> {
        let ood = self.ood.as_ref()?;
        let site = self.site.as_ref().and_then(|s| s.model.ood_threshold);
        let outer = self.card.ood.as_ref().and_then(|o| o.refuse_threshold);
        Some(match (site, outer) {
            // A site may move the first threshold, never past the card's second:
            // what the OOD set shows is not a radiograph stays refused.
            (Some(s), Some(o)) => s.min(o),
            (Some(s), None) => s,
            (None, _) => ood.threshold,
        })
    }

    /// The second threshold of the OOD score, when the card has one: above it an
    /// image is refused as not a chest radiograph; between [`Self::ood_threshold`]
    /// and it, answered as a radiograph unlike the training films. Never below the
    /// first.
    pub fn ood_refuse_threshold(&self) -> Option<f64> {
        let inner = self.ood_threshold()?;
        let outer = self.card.ood.as_ref()?.refuse_threshold?;
        Some(outer.max(inner))
    }
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.card.name)
            .field("provider", &self.provider)
            .finish()
    }
}

/// p50/p90/p99 and count of recent request latencies.
#[derive(Debug, Clone, serde::Serialize, ToSchema)]
pub struct LatencySummary {
    /// Requests in the window.
    pub window: usize,
    /// Median total latency, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
}

impl ServedModel {
    /// Announces an input on its way (being decoded) for this model: a batch that is
    /// not full waits for it (`--arrival-wait-us`); the announcement travels with the
    /// input into [`ServedModel::submit`], or is withdrawn when dropped.
    pub fn announce(&self) -> Arrival {
        self.batcher.announce()
    }

    /// Jobs waiting in its queue.
    pub fn queue_depth(&self) -> usize {
        self.batcher.depth()
    }

    /// Whether its worker is taking jobs.
    pub fn is_alive(&self) -> bool {
        self.batcher.is_alive()
    }

    /// Makes its worker panic on the next batch (tests of the restart).
    #[doc(hidden)]
    pub fn inject_worker_panic(&self) {
        self.batcher.inject_panic();
    }

    /// Records one answered request.
    pub fn record(&self, total_ms: f64) {
        self.served.fetch_add(1, Ordering::Relaxed);
        let mut l = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(total_ms);
    }

    /// Requests answered since start.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Latency percentiles over the last requests.
    pub fn latency(&self) -> LatencySummary {
        let mut v: Vec<f64> = self
            .latencies_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize]);
        LatencySummary {
            window: v.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
        }
    }

    /// The measured value `prefer` ranks by (test metrics, else validation).
    fn measured(&self, prefer: Prefer) -> f64 {
        let m = self
            .card
            .metrics
            .test
            .as_ref()
            .or(self.card.metrics.validation.as_ref());
        m.map_or(f64::NEG_INFINITY, |m| match prefer {
            Prefer::Sensitivity => m.sensitivity,
            Prefer::Specificity => m.specificity,
        })
    }
}

/// A candidate version run in the shadow of a variant's default.
#[derive(Debug, Clone)]
pub struct Shadow {
    /// The candidate.
    pub model: Arc<ServedModel>,
    /// The share of the variant's requests it runs on, in (0, 1].
    pub share: f64,
}

/// All loaded variants, every version of each: what requests are answered from. A
/// set is never changed; a load, swap or unload installs a new one.
#[derive(Debug)]
pub struct ModelSet {
    /// The default version of each variant, sorted by name.
    models: Vec<Arc<ServedModel>>,
    /// Every loaded version of each variant (same order), ascending.
    versions: Vec<Vec<Arc<ServedModel>>>,
    /// The candidate in each variant's shadow (same order).
    shadows: Vec<Option<Shadow>>,
    default: usize,
}

impl ModelSet {
    /// The set of `versions` (each name's, any order): each name's default is the
    /// version `defaults` names when it is loaded, else the highest that is neither
    /// `held` (loaded beside the default by a call) nor its variant's shadow, else the
    /// highest; the server's default variant is `cfg.default_model`, else
    /// `weighted`, else the first by name. `shadows` names a candidate version (and
    /// share) for a variant.
    pub fn build(
        versions: BTreeMap<String, Vec<Arc<ServedModel>>>,
        defaults: &BTreeMap<String, String>,
        cfg: &LoadConfig,
        shadows: &BTreeMap<String, (String, f64)>,
        held: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<Self, LoadError> {
        let mut set = ModelSet {
            models: Vec::new(),
            versions: Vec::new(),
            shadows: Vec::new(),
            default: 0,
        };
        for (name, mut vs) in versions {
            if vs.is_empty() {
                continue;
            }
            vs.sort_by(|a, b| crate::registry::version_cmp(&a.card.version, &b.card.version));
            let eligible = |m: &&Arc<ServedModel>| {
                !held.contains(&(name.clone(), m.card.version.clone()))
                    && shadows.get(&name).is_none_or(|(v, _)| *v != m.card.version)
            };
            let chosen = defaults
                .get(&name)
                .and_then(|d| vs.iter().find(|m| m.card.version == *d))
                .or_else(|| vs.iter().rev().find(eligible))
                .unwrap_or_else(|| vs.last().expect("not empty"))
                .clone();
            let shadow = shadows.get(&name).and_then(|(v, share)| {
                vs.iter()
                    .find(|m| m.card.version == *v && !Arc::ptr_eq(m, &chosen))
                    .map(|m| Shadow {
                        model: m.clone(),
                        share: *share,
                    })
            });
            set.models.push(chosen);
            set.versions.push(vs);
            set.shadows.push(shadow);
        }
        if set.models.is_empty() {
            return Err(LoadError::Registry(RegistryError::Empty(
                cfg.models_dir.clone(),
            )));
        }
        let names: Vec<&str> = set.models.iter().map(|m| m.card.name.as_str()).collect();
        set.default = match &cfg.default_model {
            Some(d) => names.iter().position(|n| n == d).ok_or_else(|| {
                LoadError::Default(d.clone(), cfg.models_dir.clone(), names.join(", "))
            })?,
            None => names.iter().position(|n| *n == "weighted").unwrap_or(0),
        };
        Ok(set)
    }

    /// The default version of every variant, sorted by name.
    pub fn all(&self) -> &[Arc<ServedModel>] {
        &self.models
    }

    /// Every loaded version of every variant.
    pub fn every_version(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.versions.iter().flatten()
    }

    /// The default variant.
    pub fn default_model(&self) -> &Arc<ServedModel> {
        &self.models[self.default]
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.card.name == name)
    }

    /// A variant (its default version) by name.
    pub fn get(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.index(name).map(|i| &self.models[i])
    }

    /// Every loaded version of a variant, ascending (empty for an unknown name).
    pub fn versions(&self, name: &str) -> &[Arc<ServedModel>] {
        self.index(name).map_or(&[], |i| &self.versions[i])
    }

    /// One version of a variant.
    pub fn get_version(&self, name: &str, version: &str) -> Option<&Arc<ServedModel>> {
        self.versions(name)
            .iter()
            .find(|m| m.card.version == version)
    }

    /// The candidate running in the shadow of variant `name`.
    pub fn shadow_of(&self, name: &str) -> Option<&Shadow> {
        self.index(name).and_then(|i| self.shadows[i].as_ref())
    }

    /// Whether `m` is its variant's default version.
    pub fn is_default(&self, m: &ServedModel) -> bool {
        self.get(&m.card.name)
            .is_some_and(|d| std::ptr::eq(Arc::as_ptr(d), m))
    }

    /// Whether `m` runs in the shadow of its variant's default.
    pub fn is_shadow(&self, m: &ServedModel) -> bool {
        self.shadow_of(&m.card.name)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s.model), m))
    }

    /// What a loaded version is to its variant: `default` (answers that name no
    /// version), `shadow` (runs in the default's shadow), or `loaded` (answers only
    /// when named).
    pub fn role(&self, m: &ServedModel) -> &'static str {
        if self.is_default(m) {
            "default"
        } else if self.is_shadow(m) {
            "shadow"
        } else {
            "loaded"
        }
    }

    /// The loaded versions of a variant, ascending.
    pub fn version_names(&self, name: &str) -> Vec<String> {
        self.versions(name)
            .iter()
            .map(|m| m.card.version.clone())
            .collect()
    }

    /// The refusal of a variant `name` this set does not serve (naming those it does).
    pub fn unknown(&self, name: &str) -> SelectError {
        SelectError::Unknown {
            name: name.to_string(),
            served: self
                .models
                .iter()
                .map(|m| m.card.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Chooses by name (`weighted`, or `weighted@2.0.0` for one version), else by
    /// preference (best measured value among the default versions; ties go to the
    /// default, then to name order), else the default.
    pub fn select(
        &self,
        model: Option<&str>,
        prefer: Option<Prefer>,
    ) -> Result<&Arc<ServedModel>, SelectError> {
        if let Some(asked) = model {
            return match asked.split_once('@') {
                Some((name, version)) => self.get_version(name, version).ok_or_else(|| match self
                    .get(name)
                {
                    Some(_) => SelectError::UnknownVersion {
                        name: name.to_string(),
                        version: version.to_string(),
                        loaded: self.version_names(name).join(", "),
                    },
                    None => self.unknown(name),
                }),
                None => self.get(asked).ok_or_else(|| self.unknown(asked)),
            };
        }
        let Some(p) = prefer else {
            return Ok(self.default_model());
        };
        // Among the variants of the default's precision: an INT8 copy is its source's
        // trade-off at another speed, chosen by name (`model=weighted-int8`), never
        // swapped in by a metric's third decimal.
        let mut best = self.default_model();
        let precision = best.card.precision;
        for m in self.models.iter().filter(|m| m.card.precision == precision) {
            if m.measured(p) > best.measured(p) {
                best = m;
            }
        }
        Ok(best)
    }
}

/// What loading needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Folder of cards and ONNX files.
    pub models_dir: PathBuf,
    /// Default variant (else `weighted` if present, else the first by name).
    pub default_model: Option<String>,
    /// Models a door is set to answer with (`--dicom-model` of the DICOM node:
    /// `NAME` or `NAME@VERSION`): never unloaded by a call, as `default_model`.
    pub door_models: Vec<String>,
    /// ONNX Runtime library.
    pub ort_lib: PathBuf,
    /// Device.
    pub device: Device,
    /// Intra-op threads per session (0 = ONNX Runtime's default).
    pub intra_threads: usize,
    /// ONNX Runtime's CPU memory arena (`--cpu-mem-arena`).
    pub cpu_mem_arena: bool,
    /// One intra-op thread pool shared by every model's session (`--shared-pool`);
    /// `intra_threads` and `intra_spinning` then configure it.
    pub shared_pool: bool,
    /// Intra-op threads spin while idle (`--intra-op-spinning`).
    pub intra_spinning: bool,
    /// Batching (its `max_batch` on the CPU).
    pub batch: BatchConfig,
    /// Largest batch of a model whose session runs on CUDA.
    pub cuda_max_batch: usize,
    /// The CPU backend (`--backend`).
    pub backend: super::runtime::BackendChoice,
    /// The site card (`--site-card`).
    pub site_card: Option<PathBuf>,
    /// Per-model CPU backends over `backend` (`--model-backend NAME=BACKEND`).
    pub model_backends: std::collections::BTreeMap<String, super::runtime::BackendChoice>,
    /// Where `auto`'s decision and OpenVINO's compiled models are kept
    /// (`--backend-decision`, `--openvino-cache-dir`).
    pub decision: super::decision::DecisionConfig,
    /// The signers whose bundles are accepted (`--trusted-signers`).
    pub trusted_signers: Option<PathBuf>,
    /// Refuse a version without a verified signature (`--require-signed-models`).
    pub require_signed: bool,
}

impl LoadConfig {
    /// The CPU backend asked for model `name`.
    pub fn backend_of(&self, name: &str) -> super::runtime::BackendChoice {
        self.model_backends
            .get(name)
            .copied()
            .unwrap_or(self.backend)
    }
}

/// Why the models could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A card or file is wrong.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// ONNX Runtime or a session failed.
    #[error(transparent)]
    Runtime(#[from] super::RuntimeError),
    /// The configured default is not among the models.
    #[error("--default-model `{0}` is not in {1} (found: {2})")]
    Default(String, PathBuf, String),
    /// Warm-up inference failed.
    #[error("warm-up of model `{0}` failed: {1}")]
    Warmup(String, String),
    /// The site card cannot be read or does not fit the served files.
    #[error(transparent)]
    SiteCard(#[from] crate::registry::site::SiteCardError),
    /// The version's signature is missing, wrong or untrusted.
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
}

/// Loads every variant in `cfg.models_dir` (every version of each), warms each up,
/// and starts its worker. Returns the set and the worker threads (they end once the
/// set is dropped and their queues are drained).
pub fn load_models(
    cfg: &LoadConfig,
    observer: impl Fn(&str) -> Arc<dyn BatchObserver>,
) -> Result<(ModelSet, Vec<JoinHandle<()>>), LoadError> {
    let loaded = load_dir(&cfg.models_dir)?;
    let ctx = LoadContext::new(cfg)?;
    let mut versions: BTreeMap<String, Vec<Arc<ServedModel>>> = BTreeMap::new();
    let mut handles = Vec::new();
    for m in loaded {
        let obs = observer(&m.card.name);
        let (served, handle) = ctx.load(m, obs)?;
        handles.push(handle);
        versions
            .entry(served.card.name.clone())
            .or_default()
            .push(served);
    }
    ctx.warn_unused_site_entries(versions.keys());
    let defaults = versions
        .keys()
        .filter_map(|n| {
            crate::registry::default_version(&cfg.models_dir, n).map(|v| (n.clone(), v))
        })
        .collect();
    let set = ModelSet::build(
        versions,
        &defaults,
        cfg,
        &BTreeMap::new(),
        &std::collections::BTreeSet::new(),
    )?;
    Ok((set, handles))
}

/// What loading a version needs beside its files: the configuration, the ONNX
/// Runtime environment and the site card.
pub struct LoadContext<'a> {
    cfg: &'a LoadConfig,
    env: &'static ort::environment::Environment,
    site_card: Option<crate::registry::site::SiteCard>,
    /// The trusted signers (read again with each context: a rescan sees a rotation).
    signing: crate::signing::Policy,
    /// The decision file, read when a model first needs it (`auto`).
    decisions: std::sync::OnceLock<Option<super::decision::DecisionStore>>,
    /// OpenVINO's compiled-model cache, checked writable when first needed.
    openvino_cache: std::sync::OnceLock<Option<PathBuf>>,
}

/// A version's backend as [`LoadContext::choose_backend`] chose it.
struct Chosen {
    /// What runs its batches (warmed).
    backend: Box<dyn super::batcher::Backend>,
    /// Where.
    provider: Provider,
    /// Why CUDA was not used, when `--device auto` fell back.
    fallback_reason: Option<String>,
    /// OpenVINO serves (a restarted worker gets OpenVINO too).
    openvino: bool,
    /// OpenVINO's compiled-model cache.
    cache: Option<PathBuf>,
    /// Why this CPU backend (`--backend openvino|auto`).
    choice: Option<String>,
    /// The deployment's decision it serves by (`auto`).
    decision: Option<super::decision::BackendDecision>,
    /// OpenVINO serving with its cache: whether its compiled models came from there.
    from_cache: Option<bool>,
}

impl<'a> LoadContext<'a> {
    /// Loads ONNX Runtime (once per process) and the site card.
    pub fn new(cfg: &'a LoadConfig) -> Result<Self, LoadError> {
        let site_card = cfg
            .site_card
            .as_deref()
            .map(crate::registry::site::SiteCard::load)
            .transpose()?;
        let pool = cfg.shared_pool.then_some(SharedPool {
            threads: cfg.intra_threads,
            spinning: cfg.intra_spinning,
        });
        let trusted = cfg
            .trusted_signers
            .as_deref()
            .map(crate::signing::TrustedSigners::load)
            .transpose()?
            .map(Arc::new);
        if cfg.require_signed && trusted.is_none() {
            return Err(crate::signing::SigningError::TrustedSigners(
                "is needed with --require-signed-models (the keys signatures are checked against)"
                    .into(),
            )
            .into());
        }
        let env = environment_with(&cfg.ort_lib, pool)?;
        Ok(Self {
            cfg,
            env,
            site_card,
            signing: crate::signing::Policy {
                trusted,
                require: cfg.require_signed,
            },
            decisions: std::sync::OnceLock::new(),
            openvino_cache: std::sync::OnceLock::new(),
        })
    }

    /// The decision file, read once per context (a rescan reads it again).
    fn decisions(&self) -> Option<&super::decision::DecisionStore> {
        self.decisions
            .get_or_init(|| {
                self.cfg
                    .decision
                    .file
                    .as_deref()
                    .map(super::decision::DecisionStore::open)
            })
            .as_ref()
    }

    /// OpenVINO's compiled-model cache, if it can be written.
    fn openvino_cache(&self) -> Option<PathBuf> {
        self.openvino_cache
            .get_or_init(|| self.cfg.decision.usable_cache())
            .clone()
    }

    /// Warns of site card entries for models not served.
    pub fn warn_unused_site_entries<'n>(&self, names: impl Iterator<Item = &'n String>) {
        let names: Vec<&String> = names.collect();
        for m in self.site_card.iter().flat_map(|sc| &sc.models) {
            if !names.contains(&&m.name) {
                tracing::warn!(model = %m.name, "the site card names a model that is not served");
            }
        }
    }

    /// The backend a version serves on: OpenVINO at once when `auto` reads a decision
    /// naming it on a CPU-only device (ONNX Runtime's session is then never made);
    /// else ONNX Runtime's session (CUDA or the CPU), replaced by OpenVINO's compiled
    /// model when asked for, read or measured faster and it agrees with ONNX Runtime.
    /// Warmed at batch 1 and the largest batch.
    fn choose_backend(
        &self,
        m: &crate::registry::LoadedModel,
        opts: SessionOptions,
        s: usize,
    ) -> Result<Chosen, LoadError> {
        use super::runtime::BackendChoice;
        let cfg = self.cfg;
        let name = &m.card.name;
        let asked = cfg.backend_of(name);
        let cache = (cfg.device != Device::Cuda && asked != BackendChoice::Ort)
            .then(|| self.openvino_cache())
            .flatten();
        let chooser = super::openvino::Chooser {
            asked,
            threads: cfg.intra_threads,
            max_batch: cfg.batch.max_batch,
            cache: cache.as_deref(),
            decisions: if asked == BackendChoice::Auto {
                self.decisions()
            } else {
                None
            },
        };
        if cfg.device == Device::Cpu
            && let Some((ov, note)) =
                super::openvino::read_openvino(&chooser, &m.card, &m.onnx_bytes, s)
        {
            tracing::info!(model = %name, backend = Provider::OpenVinoCpu.as_str(), decision = "read", why = %note.why, "CPU backend chosen");
            return Ok(Chosen {
                backend: Box::new(ov),
                provider: Provider::OpenVinoCpu,
                fallback_reason: None,
                openvino: true,
                cache,
                choice: Some(note.why),
                decision: note.decision,
                from_cache: note.from_cache,
            });
        }
        let (session, mut provider, fallback_reason) =
            create_session(self.env, &m.onnx_bytes, opts)?;
        if let Some(why) = &fallback_reason {
            tracing::warn!(model = %name, reason = %why, "CUDA unavailable, running on the CPU");
        }
        let mut backend: Box<dyn super::batcher::Backend> = Box::new(session);
        let (mut openvino, mut choice, mut decision, mut from_cache) = (false, None, None, None);
        if provider == Provider::Cpu && asked != BackendChoice::Ort {
            match super::openvino::choose(&chooser, &m.card, &m.onnx_bytes, backend, s) {
                (b, Ok(note)) => {
                    backend = b;
                    openvino = note.chose_openvino;
                    if openvino {
                        provider = Provider::OpenVinoCpu;
                    }
                    let source = note.decision.as_ref().map_or("none", |d| d.source.as_str());
                    tracing::info!(model = %name, backend = provider.as_str(), decision = source, why = %note.why, "CPU backend chosen");
                    choice = Some(note.why);
                    decision = note.decision;
                    from_cache = note.from_cache;
                }
                (b, Err(why)) => {
                    backend = b;
                    tracing::warn!(model = %name, reason = %why, "OpenVINO not used: ONNX Runtime serves this model");
                    choice = Some(format!("OpenVINO not used: {why}"));
                }
            }
        }
        // ONNX Runtime warmed only where it serves: OpenVINO ran the probe batch and a
        // lone image already.
        if !openvino {
            let largest = match provider {
                Provider::Cuda => cfg.cuda_max_batch,
                Provider::Cpu | Provider::OpenVinoCpu => cfg.batch.max_batch,
            };
            for n in [1, largest.max(1)] {
                backend
                    .run(vec![0.0; n * 3 * s * s], n, s)
                    .map_err(|e| LoadError::Warmup(name.clone(), e.to_string()))?;
            }
        }
        Ok(Chosen {
            backend,
            provider,
            fallback_reason,
            openvino,
            cache,
            choice,
            decision,
            from_cache,
        })
    }

    /// Makes a verified card and file a served version: its session (or OpenVINO's
    /// compiled model), warmed at batch 1 and the largest batch, and its worker.
    pub fn load(
        &self,
        m: crate::registry::LoadedModel,
        observer: Arc<dyn BatchObserver>,
    ) -> Result<(Arc<ServedModel>, JoinHandle<()>), LoadError> {
        let (cfg, env) = (self.cfg, self.env);
        let t = Instant::now();
        // Before a session is made: a version whose signature fails never answers.
        let provenance =
            crate::signing::check(&m.signed_files(), &m.known_digests(), &self.signing)?;
        let verify_ms = t.elapsed().as_secs_f64() * 1e3;
        match &provenance {
            crate::signing::Provenance::Signed(s) => {
                tracing::info!(model = %m.card.name, version = %m.card.version, signer = %s.signer, key_id = %s.key_id, root_digest = %s.root_digest, verify_ms, "signature verified")
            }
            crate::signing::Provenance::Unverified(why) => {
                tracing::warn!(model = %m.card.name, version = %m.card.version, reason = %why, "model loads without a verified signature (--require-signed-models is off)")
            }
        }
        let opts = SessionOptions {
            device: cfg.device,
            intra_threads: cfg.intra_threads,
            cpu_arena: cfg.cpu_mem_arena,
            intra_spinning: cfg.intra_spinning,
        };
        let s = m.card.input_size as usize;
        let Chosen {
            backend,
            provider,
            fallback_reason,
            openvino,
            cache,
            choice: backend_choice,
            decision: backend_decision,
            from_cache: openvino_from_cache,
        } = self.choose_backend(&m, opts, s)?;
        let batch = BatchConfig {
            max_batch: match provider {
                Provider::Cuda => cfg.cuda_max_batch,
                Provider::Cpu | Provider::OpenVinoCpu => cfg.batch.max_batch,
            },
            ..cfg.batch
        };
        let preprocessor = Preprocessor::new(m.card.input_size, &m.card.preprocessing)
            .expect("the registry checked the preprocessing");
        // A worker that dies gets a fresh backend from the same verified bytes.
        let bytes = Arc::new(m.onnx_bytes.clone());
        let (threads, precision) = (cfg.intra_threads, super::openvino::precision_hint(&m.card));
        let restart: SessionFactory = Arc::new(move || {
            let mut b: Box<dyn super::batcher::Backend> = if openvino {
                Box::new(
                    super::openvino::OpenVinoModel::load(
                        &bytes,
                        threads,
                        precision,
                        cache.as_deref(),
                    )
                    .map_err(|e| {
                        super::RestartError::Warmup(super::runtime::RunError::Runtime(e.0))
                    })?,
                )
            } else {
                Box::new(create_session(env, &bytes, opts)?.0)
            };
            b.run(vec![0.0; 3 * s * s], 1, s)?;
            Ok(b)
        });
        let (batcher, handle) =
            Batcher::spawn_restarting(&m.card.name, backend, Some(restart), s, batch, observer);
        if m.ood.is_none() {
            tracing::warn!(model = %m.card.name, "no out-of-distribution model in the card: its answers carry null ood_score and nothing is refused as out of distribution (cxr-train fit-ood fits one)");
        }
        let load_time_ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::info!(model = %m.card.name, version = %m.card.version, provider = provider.as_str(), max_batch = batch.max_batch, load_time_ms, path = %m.onnx_path.display(), "model ready");
        let site = match &self.site_card {
            Some(sc) => sc.entry_for(&m.card.name, &m.card.onnx.sha256)?,
            None => None,
        };
        if let (Some(sc), None) = (&self.site_card, &site) {
            tracing::warn!(model = %m.card.name, site = %sc.site, "the site card has no entry for this model: its card's threshold applies");
        }
        if let Some(s) = &site {
            tracing::info!(model = %m.card.name, site = %s.provenance.site, threshold = s.model.threshold, ood_threshold = ?s.model.ood_threshold, rule = %s.model.rule, "site card applied");
        }
        let served = Arc::new(ServedModel {
            card: m.card,
            card_path: m.card_path,
            provider,
            fallback_reason,
            backend_choice,
            backend_decision,
            openvino_from_cache,
            load_time_ms,
            preprocessor,
            batcher,
            ood: m.ood,
            has_cam: m.has_cam,
            plots: m.plots,
            site,
            provenance,
            served: AtomicU64::new(0),
            latencies_ms: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            shadow: super::shadow::ShadowTally::default(),
        });
        Ok((served, handle))
    }
}
