//! Site validation (`cxr-train validate`): a site's own films (DICOM, JPEG, PNG),
//! labelled or not, go through the same prediction core the server answers with
//! (decoding, gates, the model, calibration, the OOD score), and the site gets, per
//! model: sensitivity, specificity and accuracy at the card's threshold with Wilson
//! 95 % intervals, AUC and ECE with stratified percentile-bootstrap 95 % intervals,
//! the ROC and reliability curves, the distributions of P(PNEUMONIA) and of the OOD
//! score with the share the OOD gate would refuse, and the thresholds that reach
//! target sensitivities on these films. Written as `site-report.json` beside
//! `site-report.md` (with SVG plots, for a clinician), and, when the site chooses an
//! operating point (`--choose`), `site-card.json` for `cxr-serve --site-card`.

mod page;
pub mod svg;

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::access::Caller;
use crate::eval::site::{Interval, ReliabilityBin, auc_interval, ece_interval, quantile_sorted};
use crate::eval::site::{reliability, wilson};
use crate::eval::{Confusion, OperatingCurve, RocPoint, Target, roc_curve};
use crate::predict::{Ask, Asker, Core, Upload};
use crate::registry::site::{SiteCard, SiteModel};

crate::message_error!(
    /// Why a validation could not run or be written.
    ValidateError
);

/// Where a film's label comes from.
#[derive(Debug, Clone)]
pub enum Labels {
    /// Unlabelled: distributions only.
    None,
    /// A CSV of `file,label` (file relative to the films folder; label NORMAL or
    /// PNEUMONIA; a header line is allowed).
    Csv(PathBuf),
    /// The nearest folder named NORMAL or PNEUMONIA on a film's path.
    Folders,
}

/// What to validate, and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The site's films.
    pub films: PathBuf,
    /// Their labels.
    pub labels: Labels,
    /// Where the report goes.
    pub out: PathBuf,
    /// The site's name.
    pub site: String,
    /// The day (YYYY-MM-DD).
    pub date: String,
    /// Models to validate (empty: every served one).
    pub models: Vec<String>,
    /// The operating point the site chooses (writes the site card).
    pub choose: Option<Target>,
    /// Fit the OOD threshold to accept this share of the site's films.
    pub ood_accept: Option<f64>,
    /// Sensitivities to report thresholds for.
    pub targets: Vec<f64>,
    /// Bootstrap resamples.
    pub bootstrap: usize,
}

/// One film's outcome with one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilmRow {
    /// Path relative to the films folder.
    pub file: String,
    /// Its label (1 = PNEUMONIA), when labelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
    /// P(PNEUMONIA) as served (calibrated), when it was answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_pneumonia: Option<f64>,
    /// Its OOD score, when computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_score: Option<f64>,
    /// Why it was refused before the model (a gate's `error_type`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Quantiles of a distribution.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Quantiles {
    /// Smallest.
    pub min: f64,
    /// 5th percentile.
    pub p05: f64,
    /// Lower quartile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// Upper quartile.
    pub p75: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Largest.
    pub max: f64,
}

impl Quantiles {
    fn of(v: &[f64]) -> Option<Self> {
        let mut v = v.to_vec();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p| quantile_sorted(&v, p);
        Some(Self {
            min: v[0],
            p05: q(0.05),
            p25: q(0.25),
            p50: q(0.5),
            p75: q(0.75),
            p95: q(0.95),
            max: v[v.len() - 1],
        })
    }
}

/// The OOD score on the site's films.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OodReport {
    /// The model card's threshold.
    pub card_threshold: f64,
    /// The card's second threshold (above it: refused; between the two: answered
    /// as a distribution shift), when the card has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_refuse_threshold: Option<f64>,
    /// The threshold fitted on these films (`--ood-accept`, capped at the card's
    /// second threshold), if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_threshold: Option<f64>,
    /// The share of films the card's thresholds refuse, with its Wilson interval.
    pub refused_at_card: Interval,
    /// The share the card's thresholds answer as a distribution shift (between its
    /// two thresholds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shift_at_card: Option<Interval>,
    /// The share refused at the site's threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_at_site: Option<Interval>,
    /// The scores' quantiles.
    pub quantiles: Quantiles,
}

/// Sensitivity, specificity and accuracy at one threshold, with intervals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AtThreshold {
    /// The threshold on P(PNEUMONIA).
    pub threshold: f64,
    /// How it was chosen.
    pub rule: String,
    /// Recall of PNEUMONIA.
    pub sensitivity: Option<Interval>,
    /// Recall of NORMAL.
    pub specificity: Option<Interval>,
    /// Share correct.
    pub accuracy: Option<Interval>,
    /// The counts.
    pub confusion: Confusion,
}

impl AtThreshold {
    fn of(scores: &[f64], labels: &[u8], threshold: f64, rule: String) -> Self {
        let c = Confusion::at_threshold(scores, labels, threshold);
        Self {
            threshold,
            rule,
            sensitivity: wilson(c.tp, c.tp + c.fn_),
            specificity: wilson(c.tn, c.tn + c.fp),
            accuracy: wilson(c.tp + c.tn, c.n()),
            confusion: c,
        }
    }
}

/// What the labelled films say.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelledReport {
    /// Labelled films the model answered (and the OOD gate let through).
    pub n: u64,
    /// Of them, PNEUMONIA.
    pub pneumonia: u64,
    /// Of them, NORMAL.
    pub normal: u64,
    /// At the model card's threshold.
    pub at_card_threshold: AtThreshold,
    /// AUC with its bootstrap interval.
    pub auc: Option<Interval>,
    /// ECE (10 bins, at the card's threshold) with its bootstrap interval.
    pub ece: Option<Interval>,
    /// The card's own test-split figures, for comparison.
    pub card_test: CardFigures,
    /// The thresholds that reach the target sensitivities on these films.
    pub targets: Vec<AtThreshold>,
    /// The site's operating point (`--choose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<AtThreshold>,
    /// The ROC curve on these films.
    pub roc: Vec<RocPoint>,
    /// The reliability curve (10 bins).
    pub reliability: Vec<ReliabilityBin>,
}

/// A card's test-split figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CardFigures {
    /// Sensitivity.
    pub sensitivity: Option<f64>,
    /// Specificity.
    pub specificity: Option<f64>,
    /// AUC.
    pub auc: Option<f64>,
}

/// One model on the site's films.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// SHA-256 of its ONNX file.
    pub onnx_sha256: String,
    /// What ran it.
    pub execution_provider: String,
    /// The card's decision threshold.
    pub card_threshold: f64,
    /// Films answered by the model.
    pub answered: u64,
    /// Films refused before the model, by reason.
    pub refused: BTreeMap<String, u64>,
    /// P(PNEUMONIA) over every answered film.
    pub p_pneumonia: Option<Quantiles>,
    /// The OOD score (none when the model has no OOD model).
    pub ood: Option<OodReport>,
    /// Labelled metrics (none for an unlabelled folder).
    pub labelled: Option<LabelledReport>,
    /// The plots, beside the report.
    pub plots: Vec<String>,
    /// Every film.
    pub films: Vec<FilmRow>,
}

/// The site report (`site-report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteReport {
    /// The site.
    pub site: String,
    /// The day.
    pub date: String,
    /// What wrote it.
    pub generated_by: String,
    /// The films folder.
    pub films: String,
    /// Where labels came from.
    pub labels: String,
    /// Image files found.
    pub images: u64,
    /// Files that were not DICOM, JPEG or PNG.
    pub skipped: u64,
    /// How intervals are computed.
    pub intervals: String,
    /// Per model.
    pub models: Vec<ModelReport>,
}

/// What a run wrote.
pub struct Written {
    /// The report.
    pub report: SiteReport,
    /// The site card, when an operating point was chosen.
    pub site_card: Option<PathBuf>,
}

fn rel_string(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

fn parse_label(s: &str) -> Option<u8> {
    match s.trim().to_ascii_uppercase().as_str() {
        "PNEUMONIA" | "1" => Some(1),
        "NORMAL" | "0" => Some(0),
        _ => None,
    }
}

/// The labels of the films, by relative path.
fn read_labels(cfg: &Config, files: &[PathBuf]) -> Result<HashMap<String, u8>, ValidateError> {
    let mut out = HashMap::new();
    match &cfg.labels {
        Labels::None => {}
        Labels::Folders => {
            for f in files {
                let label = f
                    .parent()
                    .into_iter()
                    .flat_map(Path::ancestors)
                    .filter_map(|a| a.file_name())
                    .find_map(
                        |n| match n.to_string_lossy().to_ascii_uppercase().as_str() {
                            "PNEUMONIA" => Some(1),
                            "NORMAL" => Some(0),
                            _ => None,
                        },
                    );
                if let Some(l) = label {
                    out.insert(rel_string(f), l);
                }
            }
        }
        Labels::Csv(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ValidateError(format!("labels {}: {e}", path.display())))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (file, label) = line.rsplit_once(',').ok_or_else(|| {
                    ValidateError(format!(
                        "labels {} line {}: expected `file,label`",
                        path.display(),
                        i + 1
                    ))
                })?;
                let file = file.trim().trim_matches('"');
                match parse_label(label.trim().trim_matches('"')) {
                    Some(l) => {
                        out.insert(file.replace('\\', "/"), l);
                    }
                    None if i == 0 => {} // a header
                    None => {
                        return Err(ValidateError(format!(
                            "labels {} line {}: label `{}` is not NORMAL or PNEUMONIA",
                            path.display(),
                            i + 1,
                            label.trim()
                        )));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// One film through the core, as the server would answer it.
async fn answer(core: &Core, model: &str, bytes: Vec<u8>, rel: &str) -> FilmRow {
    let asker = Asker::new(Caller("validate".into()), Some(rel.to_string()));
    let ask = Ask {
        model: Some(model.to_string()),
        ..Ask::default()
    };
    let mut row = FilmRow {
        file: rel.to_string(),
        label: None,
        p_pneumonia: None,
        ood_score: None,
        refused: None,
    };
    let valid = match core.validate(asker, &ask, Instant::now()) {
        Ok(v) => v,
        Err(e) => {
            row.refused = Some(e.error_type().as_str().into());
            return row;
        }
    };
    let upload = Upload::sniff(bytes.into());
    match core
        .within_timeout(core.answer_files(&valid, vec![upload]))
        .await
    {
        Ok(a) => {
            if let Some(p) = a.predictions.first() {
                row.p_pneumonia = Some(f64::from(p.probabilities.PNEUMONIA));
                row.ood_score = p.ood_score;
            }
        }
        Err(e) => row.refused = Some(e.error_type().as_str().into()),
    }
    row
}

/// Runs the validation on `core` (its OOD action must be `warn`, so that every
/// film is scored and none refused for its score) and writes the report.
pub async fn run(core: &Core, cfg: &Config) -> Result<Written, ValidateError> {
    let models = core
        .models()
        .ok_or_else(|| ValidateError("the models are not loaded".into()))?;
    let names: Vec<String> = if cfg.models.is_empty() {
        models.all().iter().map(|m| m.card.name.clone()).collect()
    } else {
        cfg.models.clone()
    };
    let all = crate::imaging::files::files(&cfg.films).map_err(|e| ValidateError(e.0))?;
    let mut images = Vec::new();
    let mut skipped = 0;
    for path in &all {
        // Its first bytes tell what it is; the whole file is read when it is answered.
        let mut head = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                f.take(crate::imaging::files::SNIFF_BYTES)
                    .read_to_end(&mut head)
            })
            .map_err(|e| ValidateError(format!("cannot read {}: {e}", path.display())))?;
        if crate::imaging::files::is_image_file(&head) {
            images.push(path.strip_prefix(&cfg.films).unwrap_or(path).to_path_buf());
        } else {
            skipped += 1;
        }
    }
    let labels = read_labels(cfg, &images)?;
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| ValidateError(format!("cannot create {}: {e}", cfg.out.display())))?;
    let mut reports = Vec::new();
    for name in &names {
        let m = models
            .get(name)
            .ok_or_else(|| ValidateError(format!("model `{name}` is not served")))?
            .clone();
        let mut rows = Vec::with_capacity(images.len());
        // A few films at once, so that they batch as the server's traffic does.
        for chunk in images.chunks(4) {
            let mut set = tokio::task::JoinSet::new();
            for (i, rel) in chunk.iter().enumerate() {
                let bytes = std::fs::read(cfg.films.join(rel)).map_err(|e| {
                    ValidateError(format!(
                        "cannot read {}: {e}",
                        cfg.films.join(rel).display()
                    ))
                })?;
                let (core, name, key) = (core.clone(), name.clone(), rel_string(rel));
                set.spawn(async move { (i, answer(&core, &name, bytes, &key).await) });
            }
            let mut got = set.join_all().await;
            got.sort_by_key(|(i, _)| *i);
            for (_, mut row) in got {
                row.label = labels.get(&row.file).copied();
                rows.push(row);
            }
        }
        eprintln!("validate: {name}: {} films", rows.len());
        reports.push(model_report(&m, rows, cfg)?);
    }
    let report = SiteReport {
        site: cfg.site.clone(),
        date: cfg.date.clone(),
        generated_by: format!("cxr-train validate {}", env!("CARGO_PKG_VERSION")),
        films: cfg.films.display().to_string(),
        labels: match &cfg.labels {
            Labels::None => "none (unlabelled)".into(),
            Labels::Csv(p) => format!("CSV {}", p.display()),
            Labels::Folders => "the nearest folder named NORMAL or PNEUMONIA".into(),
        },
        images: images.len() as u64,
        skipped,
        intervals: format!(
            "95 %: Wilson score intervals for sensitivity, specificity, accuracy and shares; percentile bootstrap ({} resamples, stratified by class, seeded) for AUC and ECE",
            cfg.bootstrap
        ),
        models: reports,
    };
    for m in &report.models {
        for (file, svg) in page::plots(m) {
            write(&cfg.out.join(file), svg.as_bytes())?;
        }
    }
    let json = serde_json::to_vec_pretty(&report).map_err(|e| ValidateError(e.to_string()))?;
    write(&cfg.out.join("site-report.json"), &json)?;
    write(
        &cfg.out.join("site-report.md"),
        page::markdown(&report).as_bytes(),
    )?;
    let site_card = match cfg.choose {
        Some(_) => {
            let card = site_card(&report, crate::digest::sha256_hex(&json));
            let path = cfg.out.join("site-card.json");
            let bytes =
                serde_json::to_vec_pretty(&card).map_err(|e| ValidateError(e.to_string()))?;
            write(&path, &bytes)?;
            Some(path)
        }
        None => None,
    };
    Ok(Written { report, site_card })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ValidateError> {
    std::fs::write(path, bytes)
        .map_err(|e| ValidateError(format!("cannot write {}: {e}", path.display())))
}

/// The site card of a report: each model's chosen operating point.
fn site_card(report: &SiteReport, report_sha256: String) -> SiteCard {
    SiteCard {
        site: report.site.clone(),
        date: report.date.clone(),
        report_sha256,
        generated_by: report.generated_by.clone(),
        models: report
            .models
            .iter()
            .filter_map(|m| {
                let l = m.labelled.as_ref()?;
                let c = l.chosen.as_ref()?;
                Some(SiteModel {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    onnx_sha256: m.onnx_sha256.clone(),
                    n: l.n,
                    threshold: c.threshold,
                    rule: c.rule.clone(),
                    sensitivity: c.sensitivity,
                    specificity: c.specificity,
                    ood_threshold: m.ood.as_ref().and_then(|o| o.site_threshold),
                    ood_acceptance: m
                        .ood
                        .as_ref()
                        .and_then(|o| o.refused_at_site.map(|r| 1.0 - r.value)),
                })
            })
            .collect(),
    }
}

fn model_report(
    m: &crate::inference::ServedModel,
    films: Vec<FilmRow>,
    cfg: &Config,
) -> Result<ModelReport, ValidateError> {
    let card = &m.card;
    let mut refused = BTreeMap::new();
    for f in &films {
        if let Some(r) = &f.refused {
            *refused.entry(r.clone()).or_insert(0) += 1;
        }
    }
    let answered: Vec<&FilmRow> = films.iter().filter(|f| f.p_pneumonia.is_some()).collect();
    let ps: Vec<f64> = answered.iter().filter_map(|f| f.p_pneumonia).collect();
    let scores: Vec<f64> = answered.iter().filter_map(|f| f.ood_score).collect();
    let ood = match (&m.ood, scores.is_empty()) {
        (Some(o), false) => {
            let mut sorted = scores.clone();
            sorted.sort_by(f64::total_cmp);
            let outer = card.ood.as_ref().and_then(|c| c.refuse_threshold);
            // A site may move the first threshold, never past the card's second.
            let site = cfg
                .ood_accept
                .map(|q| quantile_sorted(&sorted, q))
                .map(|s| outer.map_or(s, |o| s.min(o)));
            let n = scores.len() as u64;
            let count = |f: &dyn Fn(f64) -> bool| scores.iter().filter(|&&s| f(s)).count() as u64;
            let refused_above = |inner: f64| {
                let at = outer.map_or(inner, |o| o.max(inner));
                wilson(count(&|s| s > at), n)
            };
            Some(OodReport {
                card_threshold: o.threshold,
                card_refuse_threshold: outer,
                site_threshold: site,
                refused_at_card: refused_above(o.threshold).expect("scores are not empty"),
                shift_at_card: outer.and_then(|r| wilson(count(&|s| s > o.threshold && s <= r), n)),
                refused_at_site: site.and_then(refused_above),
                quantiles: Quantiles::of(&scores).expect("scores are not empty"),
            })
        }
        _ => None,
    };
    // What production would answer: the films the OOD gate lets through (at the
    // site's threshold when fitted, else the card's).
    let gate = ood.as_ref().map(|o| {
        let inner = o.site_threshold.unwrap_or(o.card_threshold);
        o.card_refuse_threshold.map_or(inner, |r| r.max(inner))
    });
    let (mut s, mut l) = (Vec::new(), Vec::new());
    for f in &answered {
        let through = match (gate, f.ood_score) {
            (Some(t), Some(x)) => x <= t,
            _ => true,
        };
        if let (true, Some(label), Some(p)) = (through, f.label, f.p_pneumonia) {
            s.push(p);
            l.push(label);
        }
    }
    let labelled = (!s.is_empty()).then(|| {
        let n = s.len() as u64;
        let roc = roc_curve(&s, &l);
        let curve = OperatingCurve::from_roc("site", n, &roc);
        let at = |t: Target| {
            curve
                .threshold_for(t)
                .map(|p| AtThreshold::of(&s, &l, p.threshold, format!("{t} on {n} site films")))
        };
        let test = card.metrics.test.as_ref();
        LabelledReport {
            n,
            pneumonia: l.iter().filter(|&&x| x == 1).count() as u64,
            normal: l.iter().filter(|&&x| x != 1).count() as u64,
            at_card_threshold: AtThreshold::of(&s, &l, card.threshold, "the model card's".into()),
            auc: auc_interval(&s, &l, cfg.bootstrap, 1),
            ece: ece_interval(&s, &l, card.threshold, cfg.bootstrap, 2),
            card_test: CardFigures {
                sensitivity: test.map(|t| t.sensitivity),
                specificity: test.map(|t| t.specificity),
                auc: test.and_then(|t| t.auc),
            },
            targets: cfg
                .targets
                .iter()
                .filter_map(|&t| at(Target::Sensitivity(t)))
                .collect(),
            chosen: cfg.choose.and_then(at),
            roc: thin(&roc, 200),
            reliability: reliability(&s, &l, 10),
        }
    });
    if let (Some(t), Some(l)) = (cfg.choose, &labelled)
        && l.chosen.is_none()
    {
        return Err(ValidateError(format!(
            "model `{}`: no threshold reaches {t} on these {} films",
            card.name, l.n
        )));
    }
    let mut report = ModelReport {
        name: card.name.clone(),
        version: card.version.clone(),
        onnx_sha256: card.onnx.sha256.clone(),
        execution_provider: m.provider.as_str().into(),
        card_threshold: card.threshold,
        answered: answered.len() as u64,
        refused,
        p_pneumonia: Quantiles::of(&ps),
        ood,
        labelled,
        plots: Vec::new(),
        films,
    };
    report.plots = page::plots(&report).into_iter().map(|(f, _)| f).collect();
    Ok(report)
}

/// At most about `max` points of a ROC curve, both ends kept (the first point's
/// threshold, +infinity, written as 1: nothing is called PNEUMONIA above it either).
fn thin(roc: &[RocPoint], max: usize) -> Vec<RocPoint> {
    let step = roc.len().div_ceil(max.max(1)).max(1);
    let mut v: Vec<RocPoint> = roc.iter().step_by(step).copied().collect();
    if let Some(last) = roc.last()
        && v.last() != Some(last)
    {
        v.push(*last);
    }
    for p in &mut v {
        if !p.threshold.is_finite() {
            p.threshold = 1.0;
        }
    }
    v
}

/// Loads the models of `models_dir` as the server does (ONNX Runtime on the CPU,
/// the OOD score computed for every film and nothing refused for it), runs the
/// validation, and stops the models.
pub fn validate_dir(
    models_dir: &Path,
    ort_lib: PathBuf,
    cfg: &Config,
) -> Result<Written, ValidateError> {
    use crate::inference::{BatchConfig, LoadConfig, load_models};
    let metrics = std::sync::Arc::new(crate::metrics::ServerMetrics::new());
    let limits = crate::predict::Limits {
        ood_action: crate::ood_score::OodAction::Warn,
        // One film at a time per request; a whole site folder may take a while.
        request_timeout: std::time::Duration::from_secs(600),
        ..crate::predict::Limits::default()
    };
    let load = LoadConfig {
        models_dir: models_dir.to_path_buf(),
        default_model: None,
        door_models: Vec::new(),
        ort_lib,
        device: crate::inference::Device::Cpu,
        intra_threads: 0,
        cpu_mem_arena: false,
        intra_spinning: false,
        shared_pool: true,
        cuda_max_batch: 4,
        backend: crate::inference::BackendChoice::Ort,
        model_backends: Default::default(),
        decision: Default::default(),
        site_card: None,
        trusted_signers: None,
        require_signed: false,
        batch: BatchConfig {
            max_batch: 4,
            batch_wait: std::time::Duration::ZERO,
            arrival_wait: std::time::Duration::from_millis(20),
            capacity: 64,
        },
    };
    let (set, workers) = load_models(&load, |name| metrics.observer(name))
        .map_err(|e| ValidateError(format!("cannot load the models: {e}")))?;
    let core = Core::new(limits, metrics.clone());
    core.set_models(set);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ValidateError(e.to_string()))?;
    let out = rt.block_on(run(&core, cfg));
    drop(core);
    drop(rt);
    for w in workers {
        let _ = w.join();
    }
    out
}
