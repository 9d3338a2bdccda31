//! The deployment's backend decision (`--backend auto`): which CPU backend serves
//! each model file on a given CPU, measured once and kept in a file every replica
//! reads (`--backend-decision`), so that replicas agree (one backend, the same
//! probabilities for the same film) and start without measuring.
//!
//! An entry is keyed by what the measurement depends on: the model file's SHA-256,
//! the CPU (model name, flags, cores), both runtimes' versions, the intra-op threads
//! and the served batch size. A replica takes a matching entry as is; one that finds
//! none measures, decides (with hysteresis: [`decide`]), and adds its entry, written
//! atomically (a temporary file renamed over the old one, under a lock file). A file
//! that is not ours, or not whole, is ignored with a warning, never trusted; so is an
//! entry whose figures could not have produced its backend.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The `format` of a decision file this build reads and writes.
pub const FORMAT: &str = "cxr-backend-decision/1";

/// The decision file's name when `--backend-decision` is not given (beside the
/// models; the further dot keeps the registry from reading it as a card).
pub const DEFAULT_FILE: &str = "backend.decision.json";

/// OpenVINO's compiled-model cache, beside the decision file unless
/// `--openvino-cache-dir` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "openvino-cache";

/// The hysteresis: the backend in place (the model's previous entry, else ONNX
/// Runtime) stays unless the other is faster per image at the served batch size by
/// more than this share. The two runtimes are at parity on FP32 files (within 7 %,
/// docs/performance.md): a margin above that noise keeps such a model where it is.
pub const FLIP_MARGIN: f64 = 0.10;

/// ... and not slower than this share at batch 1 (a lone image).
pub const BATCH1_SLACK: f64 = 0.05;

/// A file larger than this is not a decision file (a few hundred bytes an entry).
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Entries kept, newest last (old CPUs and files fall off).
const MAX_ENTRIES: usize = 256;

/// A CPU backend a decision names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CpuBackend {
    /// ONNX Runtime's CPU execution provider.
    Ort,
    /// OpenVINO's CPU plugin.
    Openvino,
}

impl CpuBackend {
    /// Its name in the file and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuBackend::Ort => "ort",
            CpuBackend::Openvino => "openvino",
        }
    }
}

/// The CPU a decision was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFacts {
    /// `model name` in `/proc/cpuinfo`.
    pub model: String,
    /// Its `flags`, sorted.
    pub flags: BTreeSet<String>,
    /// Cores this process may use.
    pub cores: usize,
}

impl CpuFacts {
    /// This machine's (Linux's `/proc/cpuinfo`; elsewhere `unknown`, no flags).
    pub fn this_machine() -> Self {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(&info)
    }

    /// The first processor's model name and flags in `cpuinfo`'s text.
    pub fn from_cpuinfo(info: &str) -> Self {
        let field = |name: &str| {
            info.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        Self {
            model: field("model name").unwrap_or_else(|| "unknown".into()),
            flags: field("flags")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The runtimes a decision was measured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtimes {
    /// ONNX Runtime's build (`git-branch=rel-…, git-commit-id=…`).
    pub onnxruntime: String,
    /// OpenVINO's build number.
    pub openvino: String,
}

/// What a measurement depends on: an entry serves a replica whose key is equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    /// The model file's SHA-256 (lower-case hex).
    pub file_sha256: String,
    /// The CPU.
    pub cpu: CpuFacts,
    /// The runtimes.
    pub runtimes: Runtimes,
    /// `--intra-threads` (0: the runtimes' own choice).
    pub intra_threads: usize,
    /// The served batch size (`--max-batch` on the CPU).
    pub max_batch: usize,
}

/// The measurement: milliseconds per image at batch 1 and at the served batch size
/// on each backend (the fastest of 6 runs in two blocks per backend, ABBA), and
/// their agreement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendFigures {
    /// The served batch size measured.
    pub batch: usize,
    /// ONNX Runtime, one image.
    pub ort_batch1_ms: f64,
    /// ONNX Runtime, per image of a batch.
    pub ort_per_image_ms: f64,
    /// OpenVINO, one image.
    pub openvino_batch1_ms: f64,
    /// OpenVINO, per image of a batch.
    pub openvino_per_image_ms: f64,
    /// Most |Δ P(PNEUMONIA)| between the two on the probe batch.
    pub max_abs_dp: f64,
}

impl BackendFigures {
    /// For the log and `/models`.
    pub fn describe(&self) -> String {
        format!(
            "ONNX Runtime {:.1} ms at batch 1, {:.1} ms per image at batch {}; OpenVINO {:.1} ms, {:.1} ms (|Δp| {:.1e})",
            self.ort_batch1_ms,
            self.ort_per_image_ms,
            self.batch,
            self.openvino_batch1_ms,
            self.openvino_per_image_ms,
            self.max_abs_dp
        )
    }
}

/// One decision: a model file's backend on one CPU with one pair of runtimes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The variant (for people: the key holds the file's hash).
    pub model: String,
    /// Its version.
    pub version: String,
    /// What the measurement depends on.
    pub key: Key,
    /// The backend chosen.
    pub backend: CpuBackend,
    /// The measurement it was chosen by.
    pub figures: BackendFigures,
    /// ONNX Runtime's P(PNEUMONIA) for each image of the fixed probe batch: a replica
    /// that reads a decision naming OpenVINO checks OpenVINO against these (within
    /// the card's tolerance) instead of making ONNX Runtime's session.
    pub ort_probe: Vec<f64>,
    /// The backend in place when it was measured (hysteresis: [`decide`]).
    pub incumbent: CpuBackend,
    /// When (RFC 3339 UTC).
    pub decided_at: String,
    /// By which replica (its host name).
    pub decided_by: String,
}

/// The file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DecisionFile {
    format: String,
    entries: Vec<serde_json::Value>,
}

/// The backend the figures choose when `incumbent` serves now: the other one only if
/// it is faster per image at the served batch size by more than [`FLIP_MARGIN`] and
/// not slower at batch 1 by more than [`BATCH1_SLACK`].
pub fn decide(f: &BackendFigures, incumbent: CpuBackend) -> CpuBackend {
    let (keep_n, keep_1, other_n, other_1, other) = match incumbent {
        CpuBackend::Ort => (
            f.ort_per_image_ms,
            f.ort_batch1_ms,
            f.openvino_per_image_ms,
            f.openvino_batch1_ms,
            CpuBackend::Openvino,
        ),
        CpuBackend::Openvino => (
            f.openvino_per_image_ms,
            f.openvino_batch1_ms,
            f.ort_per_image_ms,
            f.ort_batch1_ms,
            CpuBackend::Ort,
        ),
    };
    if other_n < keep_n * (1.0 - FLIP_MARGIN) && other_1 <= keep_1 * (1.0 + BATCH1_SLACK) {
        other
    } else {
        incumbent
    }
}

/// Why an entry is not trusted.
fn check_entry(e: &Entry) -> Result<(), String> {
    let f = &e.figures;
    let sha = &e.key.file_sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("file_sha256 is not a SHA-256 in lower-case hex".into());
    }
    let times = [
        f.ort_batch1_ms,
        f.ort_per_image_ms,
        f.openvino_batch1_ms,
        f.openvino_per_image_ms,
    ];
    let dp_ok = f.max_abs_dp.is_finite() && f.max_abs_dp >= 0.0;
    if !times.iter().all(|t| t.is_finite() && *t > 0.0) || !dp_ok {
        return Err("its figures are not positive, finite times".into());
    }
    if e.ort_probe.len() != f.batch || !e.ort_probe.iter().all(|p| (0.0..=1.0).contains(p)) {
        return Err("its probe answers are not one probability per probe image".into());
    }
    if f.batch != e.key.max_batch.max(1) {
        return Err(format!(
            "its figures are at batch {}, its key at {}",
            f.batch, e.key.max_batch
        ));
    }
    if decide(f, e.incumbent) != e.backend {
        return Err(format!(
            "its figures choose {} over the incumbent {}, not the {} it names",
            decide(f, e.incumbent).as_str(),
            e.incumbent.as_str(),
            e.backend.as_str()
        ));
    }
    Ok(())
}

/// What a file held.
#[derive(Debug)]
enum Read {
    /// No file.
    Missing,
    /// Not a decision file of this format, or not whole: why.
    Rejected(String),
    /// The entries to trust, and why each other one is not.
    Parsed {
        entries: Vec<Entry>,
        dropped: Vec<String>,
    },
}

fn read(path: &Path) -> Read {
    let bytes = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Missing,
        Err(e) => return Read::Rejected(format!("cannot read it: {e}")),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Read::Rejected(format!("{} bytes: too large", m.len()));
        }
        Ok(_) => match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Missing,
            Err(e) => return Read::Rejected(format!("cannot read it: {e}")),
        },
    };
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Read {
    let file: DecisionFile = match serde_json::from_slice(bytes) {
        Ok(f) => f,
        Err(e) => return Read::Rejected(format!("not a decision file ({e})")),
    };
    if file.format != FORMAT {
        return Read::Rejected(format!(
            "its format is {:?}, not {FORMAT:?}",
            file.format.chars().take(64).collect::<String>()
        ));
    }
    let mut entries = Vec::new();
    let mut dropped = Vec::new();
    for (i, v) in file.entries.into_iter().enumerate() {
        match serde_json::from_value::<Entry>(v) {
            Ok(e) => match check_entry(&e) {
                Ok(()) => entries.push(e),
                Err(why) => dropped.push(format!("entry {i} ({}): {why}", e.model)),
            },
            Err(err) => dropped.push(format!("entry {i}: {err}")),
        }
    }
    Read::Parsed { entries, dropped }
}

/// Why a decision could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the backend decision to {path}: {source}")]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// An entry with this key: take it as is.
    Found(Box<Entry>),
    /// None: measure. The backend in place for the model (its latest entry on this
    /// CPU, else on any), if it has one.
    Missing {
        /// The incumbent for [`decide`].
        incumbent: Option<CpuBackend>,
    },
}

/// What [`DecisionStore::record`] left in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Ours was written.
    Written(Entry),
    /// Another replica wrote an entry with the same key first: it stands.
    Standing(Entry),
}

/// Where the decision lives: the file, read once when opened (each later lookup
/// answers from that reading and the entries recorded since; [`DecisionStore::record`]
/// reads the file again under the lock).
#[derive(Debug)]
pub struct DecisionStore {
    path: PathBuf,
    cpu: CpuFacts,
    host: String,
    entries: std::sync::Mutex<Vec<Entry>>,
    /// A write has failed (warned once, not per model).
    write_failed: std::sync::atomic::AtomicBool,
}

impl DecisionStore {
    /// Reads `path` (missing: no entries). A file that is not a decision file of
    /// this format, and each entry that cannot be trusted, is ignored with a warning.
    pub fn open(path: &Path) -> Self {
        let entries = match read(path) {
            Read::Missing => {
                tracing::info!(path = %path.display(), "no backend decision yet: each model is measured and its decision written there");
                Vec::new()
            }
            Read::Rejected(why) => {
                tracing::warn!(path = %path.display(), reason = %why, "backend decision file ignored: every model is measured anew and the file replaced");
                Vec::new()
            }
            Read::Parsed { entries, dropped } => {
                for why in dropped {
                    tracing::warn!(path = %path.display(), reason = %why, "backend decision entry ignored");
                }
                entries
            }
        };
        Self {
            path: path.to_path_buf(),
            cpu: CpuFacts::this_machine(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            entries: std::sync::Mutex::new(entries),
            write_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Notes that a write failed: `true` the first time (the caller warns then).
    pub fn first_write_failure(&self) -> bool {
        !self
            .write_failed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This machine's CPU, as keys name it.
    pub fn cpu(&self) -> &CpuFacts {
        &self.cpu
    }

    /// This replica's name in the entries it writes.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The entry for `key`, else the backend in place for `model`.
    pub fn lookup(&self, model: &str, key: &Key) -> Lookup {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.iter().rev().find(|e| e.key == *key) {
            return Lookup::Found(Box::new(e.clone()));
        }
        let latest = |same_cpu: bool| {
            entries
                .iter()
                .rev()
                .find(|e| e.model == model && (!same_cpu || e.key.cpu == key.cpu))
        };
        Lookup::Missing {
            incumbent: latest(true).or_else(|| latest(false)).map(|e| e.backend),
        }
    }

    /// Adds `entry` to the file, unless a replica racing this one wrote an entry with
    /// the same key first (that one then stands, and this replica takes it). Under an
    /// exclusive lock on `FILE.lock`; the file is replaced by renaming a complete
    /// temporary file over it, so a reader sees the old file or the new, never part.
    /// A file that is not a decision file is kept as `FILE.rejected`.
    pub fn record(&self, entry: Entry) -> Result<Recorded, WriteError> {
        let err = |source| WriteError {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with_suffix(&self.path, ".lock"))
            .map_err(err)?;
        lock.lock().map_err(err)?;
        let mut entries = match read(&self.path) {
            Read::Missing => Vec::new(),
            Read::Rejected(why) => {
                let aside = with_suffix(&self.path, ".rejected");
                tracing::warn!(path = %self.path.display(), kept_as = %aside.display(), reason = %why, "backend decision file replaced");
                let _ = std::fs::rename(&self.path, &aside);
                Vec::new()
            }
            Read::Parsed { entries, .. } => entries,
        };
        if let Some(first) = entries.iter().find(|e| e.key == entry.key) {
            self.remember(first);
            return Ok(Recorded::Standing(first.clone()));
        }
        entries.push(entry.clone());
        let skip = entries.len().saturating_sub(MAX_ENTRIES);
        let file = DecisionFile {
            format: FORMAT.into(),
            entries: entries
                .into_iter()
                .skip(skip)
                .map(|e| serde_json::to_value(e).expect("an entry serialises"))
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("the file serialises");
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(err)?;
        drop(lock);
        self.remember(&entry);
        Ok(Recorded::Written(entry))
    }

    /// `entry` answers this store's later lookups (a second version with the same
    /// file, in the same start).
    fn remember(&self, entry: &Entry) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry.clone());
    }
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk, and renames
/// it over `path` (then flushes the folder, where the platform allows).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique among replicas whose lock did not hold (a file system without locks).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Where a served model's backend decision came from (`/models`: `live.backend_decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendDecisionSource {
    /// Measured by this replica as it started (and written to the file, if
    /// `written`).
    Measured,
    /// Read from the file, made by another start (`decided_by`, `decided_at`).
    Read,
}

impl BackendDecisionSource {
    /// Its name in `/models`, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendDecisionSource::Measured => "measured",
            BackendDecisionSource::Read => "read",
        }
    }
}

/// A served model's backend decision, as `/models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BackendDecision {
    /// `measured` now, or `read` from the file.
    pub source: BackendDecisionSource,
    /// The decision file (`--backend-decision`).
    pub file: String,
    /// Whether this replica wrote its measurement to the file (with `measured`).
    pub written: bool,
    /// The backend decided.
    pub backend: CpuBackend,
    /// The measurement behind it.
    pub figures: BackendFigures,
    /// When it was made (RFC 3339 UTC).
    pub decided_at: String,
    /// By which replica (host name).
    pub decided_by: String,
}

impl BackendDecision {
    /// `entry` as it came to be used.
    pub fn of(entry: &Entry, source: BackendDecisionSource, file: &Path, written: bool) -> Self {
        Self {
            source,
            file: file.display().to_string(),
            written,
            backend: entry.backend,
            figures: entry.figures,
            decided_at: entry.decided_at.clone(),
            decided_by: entry.decided_by.clone(),
        }
    }
}

/// Where the decision and OpenVINO's compiled models are kept (`--backend-decision`,
/// `--openvino-cache-dir`); `None`: not kept (each start measures and compiles).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecisionConfig {
    /// The decision file.
    pub file: Option<PathBuf>,
    /// OpenVINO's compiled-model cache (its `CACHE_DIR`).
    pub openvino_cache: Option<PathBuf>,
}

impl DecisionConfig {
    /// The cache folder if it exists or can be made, and can be written; else
    /// `None`, with a warning (OpenVINO then compiles at every start).
    pub fn usable_cache(&self) -> Option<PathBuf> {
        let dir = self.openvino_cache.as_ref()?;
        let probe = dir.join(format!(".cxr-write-check.{}", std::process::id()));
        let ok = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&probe, b""))
            .and_then(|()| std::fs::remove_file(&probe));
        match ok {
            Ok(()) => Some(dir.clone()),
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "OpenVINO's compiled-model cache cannot be written: OpenVINO compiles each model at every start (give --openvino-cache-dir a writable folder, e.g. a volume)");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(ort: f64, ov: f64) -> BackendFigures {
        BackendFigures {
            batch: 2,
            ort_batch1_ms: ort,
            ort_per_image_ms: ort,
            openvino_batch1_ms: ov,
            openvino_per_image_ms: ov,
            max_abs_dp: 1e-6,
        }
    }

    fn entry(model: &str, sha: char, backend: CpuBackend, f: BackendFigures) -> Entry {
        Entry {
            model: model.into(),
            version: "1".into(),
            key: Key {
                file_sha256: sha.to_string().repeat(64),
                cpu: CpuFacts::from_cpuinfo("model name\t: Test CPU\nflags\t\t: avx2 fma\n"),
                runtimes: Runtimes {
                    onnxruntime: "rel-1.0".into(),
                    openvino: "2025.0".into(),
                },
                intra_threads: 1,
                max_batch: 2,
            },
            backend,
            figures: f,
            ort_probe: vec![0.25, 0.75],
            incumbent: CpuBackend::Ort,
            decided_at: "2026-12-07T00:00:00.000Z".into(),
            decided_by: "test".into(),
        }
    }

    #[test]
    fn near_equal_backends_keep_the_incumbent() {
        use CpuBackend::{Openvino, Ort};
        // 7 % faster (FP32 parity, measured): no flip either way.
        assert_eq!(decide(&figures(100.0, 93.0), Ort), Ort);
        assert_eq!(decide(&figures(93.0, 100.0), Openvino), Openvino);
        // More than the margin: the faster wins from either side.
        assert_eq!(decide(&figures(100.0, 55.0), Ort), Openvino);
        assert_eq!(decide(&figures(55.0, 100.0), Openvino), Ort);
        assert_eq!(decide(&figures(100.0, 89.0), Ort), Openvino);
        // Faster in batches but slower alone: kept.
        let mut f = figures(100.0, 50.0);
        f.openvino_batch1_ms = 110.0;
        assert_eq!(decide(&f, Ort), Ort);
    }

    #[test]
    fn cpu_facts_come_from_the_first_processor() {
        let c = CpuFacts::from_cpuinfo(
            "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: other\n",
        );
        assert_eq!(c.model, "AMD EPYC 9R14");
        assert!(c.flags.contains("avx512f") && c.flags.len() == 3);
        assert_eq!(CpuFacts::from_cpuinfo("").model, "unknown");
    }

    #[test]
    fn foreign_corrupt_and_implausible_files_are_not_trusted() {
        assert!(matches!(
            parse(b"{\"format\": \"cxr-backend-decision/1\", \"entr"),
            Read::Rejected(_)
        ));
        assert!(
            matches!(parse(b"{\"format\": \"other/1\", \"entries\": []}"), Read::Rejected(w) if w.contains("other/1"))
        );
        let good = entry("a", 'a', CpuBackend::Openvino, figures(100.0, 50.0));
        // OpenVINO named where ONNX Runtime is twice as fast.
        let lying = entry("b", 'b', CpuBackend::Openvino, figures(50.0, 100.0));
        let mut bad_sha = good.clone();
        bad_sha.key.file_sha256 = "xyz".into();
        let file =
            serde_json::json!({"format": FORMAT, "entries": [good, lying, bad_sha, {"model": 3}]});
        match parse(&serde_json::to_vec(&file).unwrap()) {
            Read::Parsed { entries, dropped } => {
                assert_eq!(entries, vec![good]);
                assert_eq!(dropped.len(), 3, "{dropped:?}");
                assert!(dropped[0].contains("not the openvino"), "{dropped:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lookup_matches_the_whole_key_and_names_the_incumbent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        let store = DecisionStore::open(&path);
        let e = entry("a", 'a', CpuBackend::Openvino, figures(100.0, 50.0));
        assert_eq!(
            store.record(e.clone()).unwrap(),
            Recorded::Written(e.clone())
        );
        // The store that wrote it finds it (another version of the same file).
        assert_eq!(
            store.lookup("a2", &e.key),
            Lookup::Found(Box::new(e.clone()))
        );
        let store = DecisionStore::open(&path);
        assert_eq!(
            store.lookup("a", &e.key),
            Lookup::Found(Box::new(e.clone()))
        );
        let mut other_cpu = e.key.clone();
        other_cpu.cpu.flags.remove("avx2");
        let mut other_file = e.key.clone();
        other_file.file_sha256 = "b".repeat(64);
        let mut other_runtime = e.key.clone();
        other_runtime.runtimes.openvino = "2026.0".into();
        for k in [other_cpu, other_file, other_runtime] {
            let want = Lookup::Missing {
                incumbent: Some(CpuBackend::Openvino),
            };
            assert_eq!(store.lookup("a", &k), want);
        }
        assert_eq!(
            store.lookup("z", &{
                let mut k = e.key.clone();
                k.file_sha256 = "c".repeat(64);
                k
            }),
            Lookup::Missing { incumbent: None }
        );
    }

    #[test]
    fn racing_writers_keep_every_entry_and_the_first_of_a_key_stands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        let shas = ['1', '2', '3', '4', '5', '6', '7', '8'];
        std::thread::scope(|s| {
            for &c in &shas {
                let path = &path;
                s.spawn(move || {
                    let e = entry(&format!("m{c}"), c, CpuBackend::Ort, figures(50.0, 100.0));
                    DecisionStore::open(path).record(e).unwrap();
                });
            }
        });
        let Read::Parsed { entries, dropped } = read(&path) else {
            panic!("the file parses")
        };
        assert!(dropped.is_empty());
        assert_eq!(entries.len(), shas.len());
        // A second measurement of a key already written: the first stands.
        let first = entries[0].clone();
        let mut late = first.clone();
        late.decided_by = "late".into();
        assert_eq!(
            DecisionStore::open(&path).record(late).unwrap(),
            Recorded::Standing(first)
        );
        // A corrupt file is set aside, not trusted, and replaced.
        std::fs::write(&path, b"\x00garbage").unwrap();
        let e = entry("x", 'e', CpuBackend::Ort, figures(50.0, 100.0));
        assert_eq!(
            DecisionStore::open(&path).record(e.clone()).unwrap(),
            Recorded::Written(e)
        );
        assert_eq!(
            std::fs::read(with_suffix(&path, ".rejected")).unwrap(),
            b"\x00garbage"
        );
        assert!(matches!(read(&path), Read::Parsed { entries, .. } if entries.len() == 1));
    }
}
