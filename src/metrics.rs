//! Prometheus metrics, one registry per app (so tests never share counters), all
//! prefixed `cxr_`, durations in seconds, labelled by matched route path and model.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::inference::BatchObserver;

/// The service's metrics.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: IntCounterVec,
    /// Request latency by route.
    pub request_duration: HistogramVec,
    /// Decode + preprocess time.
    pub decode_duration: HistogramVec,
    /// Time in the queue, by model.
    pub queue_duration: HistogramVec,
    /// Batch inference time, by model.
    pub inference_duration: HistogramVec,
    /// Batch sizes, by model.
    pub batch_size: HistogramVec,
    /// Queue depth, by model.
    pub queue_depth: IntGaugeVec,
    /// Requests refused because the queue was full, by model.
    pub overloaded: IntCounterVec,
    /// Predictions by model and label.
    pub predictions: IntCounterVec,
    /// Queued jobs skipped because their request had gone.
    pub abandoned: IntCounterVec,
    /// Inference workers restarted after a panic.
    pub worker_restarts: IntCounterVec,
    /// Requests refused by the API keys, by reason (missing, invalid, forbidden).
    pub auth_refused: IntCounterVec,
    /// Audit records that could not be written (their requests failed with 503).
    pub audit_failures: IntCounterVec,
    /// Images above their model's OOD threshold, by model and `--ood-action`.
    pub out_of_distribution: IntCounterVec,
    /// DICOM associations, by outcome (accepted, rejected, busy, timed_out).
    pub dicom_associations: IntCounterVec,
    /// DICOM associations aborted by the node, by reason.
    pub dicom_aborts: IntCounterVec,
    /// DICOM C-STORE requests received, by outcome (analysed, not_analysed,
    /// duplicate, failed, busy).
    pub dicom_stores: IntCounterVec,
    /// Result objects (SR, SC) sent to a destination, by destination and outcome
    /// (sent, retried).
    pub dicom_results: IntCounterVec,
    /// Result objects waiting in the outbox, by destination.
    pub dicom_outbox_depth: IntGaugeVec,
    /// Dead letters in the outbox, by destination.
    pub dicom_dead_letters: IntGaugeVec,
    /// `cxr_urgent_results_total`: positive results at or above `--urgent-at`,
    /// flagged urgent in their reports (passive: nothing is reordered).
    pub urgent_results: prometheus::IntCounter,
    /// `cxr_ood_score{model,manufacturer}`: input drift.
    pub ood_score: HistogramVec,
    /// `cxr_ood_verdicts_total{model,manufacturer,verdict}`: input drift, by verdict.
    pub ood_verdicts: IntCounterVec,
    /// The manufacturers given their own label (the rest are `other`).
    manufacturers: Arc<std::sync::Mutex<Vec<String>>>,
    /// `cxr_live_outcomes{model,figure}`: the live figures of `POST /feedback`.
    pub live_outcomes: prometheus::GaugeVec,
    /// `cxr_live_sensitivity_alarm{model}`: 1 while live sensitivity is below the
    /// card's (or site card's) lower bound.
    pub live_sensitivity_alarm: IntGaugeVec,
    /// gRPC calls, by method and status code.
    pub grpc_requests: IntCounterVec,
    /// `cxr_model_version{model,version,role}`: 1 for each loaded version.
    pub model_versions: IntGaugeVec,
    /// `cxr_model_backend{model,version,backend,decision}`: 1 for each loaded
    /// version, by the backend serving it and where that came from.
    pub model_backends: IntGaugeVec,
    /// `cxr_repository_operations_total{operation,outcome}`.
    pub repository_operations: IntCounterVec,
    /// `cxr_shadow_images_total{model,version,answered_label,agreement}`.
    pub shadow_images: IntCounterVec,
    /// `cxr_shadow_abs_delta_p{model,version,answered_label}`.
    pub shadow_abs_delta_p: HistogramVec,
    /// `cxr_shadow_shed_total{model,version,reason}`.
    pub shadow_shed: IntCounterVec,
    /// `cxr_otlp_spans_dropped_total{reason}`: spans never exported.
    pub otlp_spans_dropped: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Manufacturers that get a label of their own in `cxr_ood_score`.
pub const MANUFACTURER_LABELS: usize = 16;

/// A model's live figures, as plain values (the core computes them).
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveFigures {
    /// Confirmed answers counted.
    pub confirmed: u64,
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// True negatives.
    pub tn: u64,
    /// False negatives.
    pub fn_: u64,
    /// Sensitivity and its 95 % interval (value, low, high).
    pub sensitivity: Option<(f64, f64, f64)>,
    /// Specificity and its 95 % interval.
    pub specificity: Option<(f64, f64, f64)>,
    /// Live sensitivity under its reference.
    pub sensitivity_alarm: bool,
}

/// The equipment an image came from, for the OOD score's drift labels.
#[derive(Debug, Clone, Copy)]
pub enum Equipment<'a> {
    /// Not a DICOM image.
    NotDicom,
    /// A DICOM image without a Manufacturer.
    Unknown,
    /// Its Manufacturer (0008,0070).
    Manufacturer(&'a str),
}

/// One served version, as `cxr_model_version` and `cxr_model_backend` label it.
#[derive(Debug, Clone, Copy)]
pub struct ServedVersion<'a> {
    /// The variant.
    pub name: &'a str,
    /// Its version.
    pub version: &'a str,
    /// `default`, `shadow` or `held`.
    pub role: &'a str,
    /// What runs it (`CPUExecutionProvider`, `OpenVINO`, …).
    pub backend: &'a str,
    /// Where the backend choice came from (`asked`, or the decision's source).
    pub decision: &'a str,
}

impl ServerMetrics {
    /// Registers every metric in a new registry.
    ///
    /// Long by design: one registration per metric, with its name, help and buckets,
    /// read as the list of what `/metrics` exposes; splitting it would scatter that list.
    pub fn new() -> Self {
        let registry = Registry::new();
        let h = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid histogram");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric name");
            m
        };
        let c = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric name");
            m
        };
        let lat = LATENCY_BUCKETS.to_vec();
        let requests = c(
            "cxr_requests_total",
            "HTTP requests by matched route and status code.",
            &["path", "status"],
        );
        let request_duration = h(
            "cxr_request_duration_seconds",
            "HTTP request latency by matched route.",
            &["path"],
            lat.clone(),
        );
        let decode_duration = h(
            "cxr_decode_duration_seconds",
            "Image decode and preprocessing time.",
            &["model"],
            lat.clone(),
        );
        let queue_duration = h(
            "cxr_queue_duration_seconds",
            "Time a request waited in its model's queue.",
            &["model"],
            lat.clone(),
        );
        let inference_duration = h(
            "cxr_inference_duration_seconds",
            "ONNX Runtime time per batch.",
            &["model"],
            lat,
        );
        let batch_size = h(
            "cxr_batch_size",
            "Requests per inference batch.",
            &["model"],
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        );
        let queue_depth = IntGaugeVec::new(
            Opts::new("cxr_queue_depth", "Requests waiting or running, by model."),
            &["model"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric name");
        let overloaded = c(
            "cxr_overloaded_total",
            "Requests refused with 503 because the model's queue was full.",
            &["model"],
        );
        let predictions = c(
            "cxr_predictions_total",
            "Answered images by model and label.",
            &["model", "label"],
        );
        let abandoned = c(
            "cxr_abandoned_total",
            "Queued images skipped, not run: their request had gone (client disconnected or timed out).",
            &["model"],
        );
        let worker_restarts = c(
            "cxr_worker_restarts_total",
            "Inference workers that died (panicked) and were restarted with a fresh session.",
            &["model"],
        );
        let auth_refused = c(
            "cxr_auth_refused_total",
            "Requests refused by the API keys: missing or invalid key (401), key without the scope (403).",
            &["reason"],
        );
        let out_of_distribution = c(
            "cxr_out_of_distribution_total",
            "Images whose out-of-distribution score was above their model's threshold, by model and --ood-action (refuse: answered 422 out_of_distribution; warn: answered with a warning).",
            &["model", "action"],
        );
        let audit_failures = c(
            "cxr_audit_failures_total",
            "Audit records that could not be written to --audit-log (each failed its request with 503).",
            &[],
        );
        let dicom_associations = c(
            "cxr_dicom_associations_total",
            "DICOM associations requested of the DICOM node, by outcome (accepted; rejected: an unknown calling AE title or host, a wrong called AE title, or no A-ASSOCIATE-RQ; busy: refused with a transient A-ASSOCIATE-RJ, --dicom-max-associations or --dicom-max-negotiating (or its host's quarter) reached; timed_out: the A-ASSOCIATE-RQ not whole within --dicom-negotiation-timeout-s, aborted).",
            &["outcome"],
        );
        let dicom_aborts = c(
            "cxr_dicom_aborts_total",
            "DICOM associations the node aborted (A-ABORT), by reason (command_too_large: a command set past 64 KiB; object_too_large: a data set past --max-body-bytes; out_of_order: P-DATA out of protocol; deadline: past --dicom-association-timeout-s).",
            &["reason"],
        );
        let dicom_stores = c(
            "cxr_dicom_stores_total",
            "DICOM C-STORE requests received, by outcome (analysed; not_analysed: refused by a gate or the OOD score, an SR says why; duplicate: already analysed by this model file; failed: answered with a failure status; busy: answered out of resources, A700, --max-inflight or --max-buffered-bytes reached).",
            &["outcome"],
        );
        let dicom_results = c(
            "cxr_dicom_results_total",
            "Result objects (SR, SC) by destination and outcome (sent; retried: a send failed and is retried with backoff; dead_letter: refused --dicom-max-attempts times, or failing for --dicom-give-up-after-hours, and set aside: GET /dicom/outbox/dead-letters).",
            &["destination", "outcome"],
        );
        let dicom_outbox_depth = IntGaugeVec::new(
            Opts::new(
                "cxr_dicom_outbox_depth",
                "Result objects waiting in the outbox to be sent, by destination.",
            ),
            &["destination"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(dicom_outbox_depth.clone()))
            .expect("unique metric name");
        let dicom_dead_letters = IntGaugeVec::new(
            Opts::new(
                "cxr_dicom_dead_letters",
                "Result objects set aside as dead letters (not sent, not retried; kept for --retention-days), by destination.",
            ),
            &["destination"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(dicom_dead_letters.clone()))
            .expect("unique metric name");
        let urgent_results = prometheus::IntCounter::new(
            "cxr_urgent_results_total",
            "Positive results at or above --urgent-at, flagged urgent in their HL7 (OBR-5, OBX-8) and FHIR reports as they were queued (passive: nothing is reordered or hidden).",
        )
        .expect("valid counter");
        registry
            .register(Box::new(urgent_results.clone()))
            .expect("unique metric name");
        let ood_score = h(
            "cxr_ood_score",
            "Out-of-distribution scores of the images scored, by model and by the DICOM Manufacturer (0008,0070) of the equipment: the first 16 seen by name, then `other`; `not_dicom` for JPEG and PNG, `unknown` for DICOM without one. Input drift: compare the distribution over time with the card's `ood.threshold`.",
            &["model", "manufacturer"],
            vec![
                0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 25.0, 50.0,
            ],
        );
        let ood_verdicts = c(
            "cxr_ood_verdicts_total",
            "Images scored, by model, DICOM Manufacturer (as in cxr_ood_score) and verdict: in_distribution, distribution_shift (between the card's two thresholds: answered, flagged) or not_a_radiograph (above the refusal threshold; refused unless --ood-action warn). The share of distribution_shift over time, per manufacturer, is input drift.",
            &["model", "manufacturer", "verdict"],
        );
        let live_outcomes = prometheus::GaugeVec::new(
            Opts::new(
                "cxr_live_outcomes",
                "Live outcomes of each model over its most recent confirmed answers (POST /feedback): figure = confirmed, tp, fp, tn, fn, sensitivity, sensitivity_low, sensitivity_high, specificity, specificity_low, specificity_high (Wilson 95 %).",
            ),
            &["model", "figure"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(live_outcomes.clone()))
            .expect("unique metric name");
        let live_sensitivity_alarm = IntGaugeVec::new(
            Opts::new(
                "cxr_live_sensitivity_alarm",
                "1 while a model's live sensitivity is below what its card (or site card) measured: the upper bound of its 95 % interval under the reference's lower bound.",
            ),
            &["model"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(live_sensitivity_alarm.clone()))
            .expect("unique metric name");
        let grpc_requests = c(
            "cxr_grpc_requests_total",
            "gRPC calls of the Open Inference Protocol, by method and status code.",
            &["method", "code"],
        );
        let model_versions = IntGaugeVec::new(
            Opts::new(
                "cxr_model_version",
                "1 for each loaded version of each variant, by role: default (answers name no version), loaded (answers only `model=NAME@VERSION`), shadow (runs in the default's shadow).",
            ),
            &["model", "version", "role"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(model_versions.clone()))
            .expect("unique metric name");
        let model_backends = IntGaugeVec::new(
            Opts::new(
                "cxr_model_backend",
                "1 for each loaded version, by the backend serving it (execution provider) and its decision: measured (by this replica at load, --backend auto), read (the deployment's decision file, --backend-decision), or asked (--backend ort|openvino, --model-backend, CUDA).",
            ),
            &["model", "version", "backend", "decision"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(model_backends.clone()))
            .expect("unique metric name");
        let repository_operations = c(
            "cxr_repository_operations_total",
            "Model repository changes (operation: load, unload, rescan) by outcome: ok, partly_refused (some version did not check out), refused_invalid (the version asked for did not check out; what was serving stays), refused.",
            &["operation", "outcome"],
        );
        let shadow_images = c(
            "cxr_shadow_images_total",
            "Images a candidate version ran on in the shadow of its variant's default, after the answer was sent, by the label answered and whether the candidate agreed (agree, disagree).",
            &["model", "version", "answered_label", "agreement"],
        );
        let shadow_abs_delta_p = h(
            "cxr_shadow_abs_delta_p",
            "|P(PNEUMONIA) of the shadow candidate - P(PNEUMONIA) answered|, by the label answered.",
            &["model", "version", "answered_label"],
            vec![
                0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0,
            ],
        );
        let shadow_shed = c(
            "cxr_shadow_shed_total",
            "Requests sampled for a shadow candidate but not run, by reason (busy, load, queue_full, failed, preprocessing): under load the shadow is shed first.",
            &["model", "version", "reason"],
        );
        let otlp_spans_dropped = c(
            "cxr_otlp_spans_dropped_total",
            "Request spans not exported to --otlp-endpoint, by reason (queue_full: the export queue was full; export_failed: the collector refused, was unreachable or did not answer within 5 s).",
            &["reason"],
        );
        Self {
            otlp_spans_dropped,
            model_versions,
            model_backends,
            repository_operations,
            shadow_images,
            shadow_abs_delta_p,
            shadow_shed,
            grpc_requests,
            dicom_associations,
            dicom_aborts,
            dicom_stores,
            dicom_results,
            dicom_outbox_depth,
            dicom_dead_letters,
            urgent_results,
            live_outcomes,
            live_sensitivity_alarm,
            ood_score,
            ood_verdicts,
            manufacturers: Arc::new(std::sync::Mutex::new(Vec::new())),
            registry,
            requests,
            request_duration,
            decode_duration,
            queue_duration,
            inference_duration,
            batch_size,
            queue_depth,
            overloaded,
            predictions,
            abandoned,
            worker_restarts,
            auth_refused,
            audit_failures,
            out_of_distribution,
        }
    }

    /// Records an image's OOD score for input drift, under its equipment's
    /// manufacturer (a bounded label set: the first [`MANUFACTURER_LABELS`] seen,
    /// then `other`).
    pub fn observe_ood(&self, model: &str, equipment: Equipment<'_>, score: f64, verdict: &str) {
        let label = match equipment {
            Equipment::NotDicom => "not_dicom".to_string(),
            Equipment::Unknown => "unknown".to_string(),
            Equipment::Manufacturer(m) => {
                let m: String = m
                    .trim()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(64)
                    .collect();
                let mut seen = self
                    .manufacturers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if m.is_empty() {
                    "unknown".to_string()
                } else if seen.contains(&m) {
                    m
                } else if seen.len() < MANUFACTURER_LABELS {
                    seen.push(m.clone());
                    m
                } else {
                    "other".to_string()
                }
            }
        };
        self.ood_score
            .with_label_values(&[model, &label])
            .observe(score);
        self.ood_verdicts
            .with_label_values(&[model, &label, verdict])
            .inc();
    }

    /// Sets a model's live-outcome gauges.
    pub fn set_live(&self, model: &str, l: &LiveFigures) {
        let mut figures = vec![
            ("confirmed", l.confirmed as f64),
            ("tp", l.tp as f64),
            ("fp", l.fp as f64),
            ("tn", l.tn as f64),
            ("fn", l.fn_ as f64),
        ];
        for (names, i) in [
            (
                ["sensitivity", "sensitivity_low", "sensitivity_high"],
                l.sensitivity,
            ),
            (
                ["specificity", "specificity_low", "specificity_high"],
                l.specificity,
            ),
        ] {
            if let Some((value, low, high)) = i {
                figures.extend(names.into_iter().zip([value, low, high]));
            }
        }
        for (figure, v) in figures {
            self.live_outcomes
                .with_label_values(&[model, figure])
                .set(v);
        }
        self.live_sensitivity_alarm
            .with_label_values(&[model])
            .set(i64::from(l.sensitivity_alarm));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Sets `cxr_model_version` and `cxr_model_backend` to the versions served.
    pub fn set_model_versions<'a>(&self, versions: impl IntoIterator<Item = ServedVersion<'a>>) {
        self.model_versions.reset();
        self.model_backends.reset();
        for v in versions {
            self.model_versions
                .with_label_values(&[v.name, v.version, v.role])
                .set(1);
            self.model_backends
                .with_label_values(&[v.name, v.version, v.backend, v.decision])
                .set(1);
        }
    }

    /// A batch observer for one model.
    pub fn observer(self: &Arc<Self>, model: &str) -> Arc<dyn BatchObserver> {
        Arc::new(ModelObserver {
            metrics: self.clone(),
            model: model.to_string(),
        })
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

struct ModelObserver {
    metrics: Arc<ServerMetrics>,
    model: String,
}

impl BatchObserver for ModelObserver {
    fn batch(&self, size: usize, inference: Duration, queued: &[Duration]) {
        let m = &self.metrics;
        m.batch_size
            .with_label_values(&[&self.model])
            .observe(size as f64);
        m.inference_duration
            .with_label_values(&[&self.model])
            .observe(inference.as_secs_f64());
        let q = m.queue_duration.with_label_values(&[&self.model]);
        for d in queued {
            q.observe(d.as_secs_f64());
        }
    }

    fn depth(&self, depth: usize) {
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model])
            .set(depth as i64);
    }

    fn abandoned(&self, n: usize) {
        self.metrics
            .abandoned
            .with_label_values(&[&self.model])
            .inc_by(n as u64);
    }

    fn restarted(&self) {
        self.metrics
            .worker_restarts
            .with_label_values(&[&self.model])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ood_scores_are_labelled_by_a_bounded_set_of_manufacturers() {
        let m = ServerMetrics::new();
        for i in 0..MANUFACTURER_LABELS + 4 {
            m.observe_ood(
                "w",
                Equipment::Manufacturer(&format!("  Vendor {i}\n")),
                1.0,
                "in_distribution",
            );
        }
        m.observe_ood(
            "w",
            Equipment::Manufacturer("Vendor 0"),
            2.0,
            "distribution_shift",
        );
        m.observe_ood("w", Equipment::Unknown, 3.0, "in_distribution");
        m.observe_ood("w", Equipment::NotDicom, 4.0, "in_distribution");
        let text = m.render();
        let count = |label: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("cxr_ood_score_count")
                        && l.contains(&format!("manufacturer=\"{label}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(count("Vendor 0"), Some(2));
        assert_eq!(
            count(&format!("Vendor {}", MANUFACTURER_LABELS - 1)),
            Some(1)
        );
        assert_eq!(count(&format!("Vendor {MANUFACTURER_LABELS}")), None);
        assert_eq!(count("other"), Some(4));
        assert_eq!(count("unknown"), Some(1));
        assert_eq!(count("not_dicom"), Some(1));
        assert!(text.contains(
            r#"cxr_ood_verdicts_total{manufacturer="Vendor 0",model="w",verdict="distribution_shift"} 1"#
        ));
    }
}
