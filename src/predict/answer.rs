//! From decoded inputs to answers: the decision threshold, the model's outputs
//! through [`ServedModel::submit`], out-of-distribution scores, audit records, and
//! each [`Prediction`] with its warnings, heatmap and timings.

use crate::audit::{AuditRecord, Decision as AuditDecision};
use crate::error_type::ErrorType;
use crate::eval::served_probabilities;
use crate::inference::InferError;
use crate::inference::JobOutput;
use crate::inference::ServedModel;
use crate::ood_score::OodAction;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::ask::Asker;
use crate::predict::ask::Decision;
use crate::predict::ask::Valid;
use crate::predict::explain;
use crate::predict::types::ModelRef;
use crate::predict::types::Prediction;
use crate::predict::types::Probabilities;
use crate::predict::types::ThresholdKind;
use crate::predict::types::Timings;
use crate::predict::types::Verdict;
use crate::predict::upload::Decoded;
use crate::predict::upload::Upload;
use crate::predict::upload::UploadFacts;
use crate::predict::upload::ms;
use crate::registry::Label;
use std::time::Duration;
use std::time::Instant;

/// One image answered and audited, before its timings and heatmap are added
/// ([`complete_all`]).
pub(super) type Audited = (Prediction, JobOutput, Decoded);

/// Runs decoded inputs through the request's model (queued together, so they
/// batch), writes their audit records (a record that cannot be written fails the
/// whole request), and returns the answers in order ([`complete_all`] finishes
/// them; the caller may first hand a shadow candidate its copy).
pub(super) async fn classify(
    core: &Core,
    valid: &Valid,
    decoded: Vec<Decoded>,
) -> Result<Vec<Audited>, PredictError> {
    let (model, decision, asker) = (&*valid.model, &valid.decision, &valid.asker);
    let explain = valid.explain;
    // Stage spans only when they are kept: their attributes cost allocations.
    let trace = asker.trace.as_deref().filter(|t| t.recording());
    let name = model.card.name.clone();
    // An explanation draws on the input, so it keeps a copy.
    let mut decoded = decoded;
    let inputs = decoded
        .iter_mut()
        .map(|d| {
            let input = if explain {
                d.input.clone()
            } else {
                std::mem::take(&mut d.input)
            };
            // The announcement goes with the input: the worker withdraws it when it
            // takes the job.
            (input, d.arrival.take())
        })
        .collect();
    let overloaded = |e: InferError| {
        if let InferError::Overloaded(_) = e {
            core.metrics().overloaded.with_label_values(&[&name]).inc();
        }
        PredictError::from(e)
    };
    let outputs = model
        .submit(inputs)
        .map_err(overloaded)?
        .outputs()
        .await
        .map_err(overloaded)?;
    if let Some(t) = trace {
        // The worker measured them; the last answer arrived just now.
        let now = Instant::now();
        for (i, r) in outputs.iter().enumerate() {
            let at = [
                ("cxr.image_index", i.to_string()),
                ("cxr.model", model.card.name.clone()),
                ("cxr.model_version", model.card.version.clone()),
                (
                    "cxr.model_signer",
                    model
                        .provenance
                        .signed_by()
                        .map_or_else(|| "unsigned".into(), |s| s.signer.clone()),
                ),
                (
                    "cxr.model_signer_key_id",
                    model
                        .provenance
                        .signed_by()
                        .map_or_else(String::new, |s| s.key_id.clone()),
                ),
                ("cxr.batch_size", r.batch_size.to_string()),
            ];
            let ran = now.checked_sub(r.inference).unwrap_or(now);
            t.stage_took("queue", r.queued, ran, &at);
            t.stage("inference", ran, now, &at);
        }
    }
    let out: Vec<(JobOutput, Decoded)> = outputs.into_iter().zip(decoded).collect();
    let ood_start = Instant::now();
    let ood = ood_scores(core, model, &out);
    if let (Some(t), Some(_)) = (trace, &model.ood) {
        t.stage("ood", ood_start, Instant::now(), &[]);
    }
    let ood = match ood {
        Ok(o) => o,
        Err(e) => {
            // A refusal by the OOD score is a decision about the image: recorded.
            let temperature = model.card.temperature();
            let facts: Vec<Facts> = out
                .iter()
                .map(|(r, d)| {
                    Facts::of(
                        d,
                        Some(served_probabilities(r.logits, r.probabilities, temperature)),
                    )
                })
                .collect();
            let scores = match &e {
                PredictError::OutOfDistribution { image, score, .. } => Some((*image, *score)),
                _ => None,
            };
            return Err(refused(core, model, decision, &facts, asker, e, scores).await);
        }
    };
    let answers: Vec<(Prediction, JobOutput, Decoded)> = out
        .into_iter()
        .zip(ood)
        .map(|((r, d), (score, inside))| {
            let p = Prediction {
                ood_score: score,
                in_distribution: inside,
                ..prediction(model, &r, decision, asker)
            };
            (p, r, d)
        })
        .collect();
    let audit_start = Instant::now();
    write_audit(core, model, decision, &answers, asker).await?;
    if let Some(t) = trace {
        t.stage("audit", audit_start, Instant::now(), &[]);
    }
    Ok(answers)
}

/// The audited answers finished: timings (the request's total so far) and, when
/// asked, heatmaps.
pub(super) fn complete_all(core: &Core, valid: &Valid, answers: Vec<Audited>) -> Vec<Prediction> {
    let total = valid.started.elapsed();
    answers
        .into_iter()
        .map(|(p, r, d)| complete(core, &valid.model, p, r, d, total, valid.explain))
        .collect()
}

/// What the audit trail keeps of one image: its upload's facts, its DICOM SOP
/// Instance UID, and the model's probabilities when it ran.
pub(super) struct Facts {
    upload: UploadFacts,
    sop_instance_uid: Option<String>,
    pub(super) probabilities: Option<[f32; 2]>,
}

impl Facts {
    pub(super) fn of(d: &Decoded, probabilities: Option<[f32; 2]>) -> Self {
        Self {
            upload: d.upload.clone(),
            sop_instance_uid: d.dicom.as_ref().and_then(|i| i.sop_instance_uid.clone()),
            probabilities,
        }
    }

    /// An upload that was not decoded (refused by a gate or the decoder).
    pub(super) fn of_upload(u: &Upload) -> Self {
        Self {
            upload: UploadFacts::of(u),
            sop_instance_uid: None,
            probabilities: None,
        }
    }
}

/// What every audit record of one request shares: when, who asked, which model
/// decided and at which threshold.
pub(super) struct Trail<'a> {
    time: String,
    asker: &'a Asker,
    model: &'a ServedModel,
    decision: &'a Decision,
}

impl<'a> Trail<'a> {
    pub(super) fn new(asker: &'a Asker, model: &'a ServedModel, decision: &'a Decision) -> Self {
        Self {
            time: crate::audit::now_rfc3339(),
            asker,
            model,
            decision,
        }
    }

    /// The record of image `image_index`: answered with `label`, or refused with
    /// `error_type`.
    pub(super) fn record(
        &self,
        image_index: usize,
        facts: &Facts,
        outcome: Result<&str, ErrorType>,
        ood_score: Option<f64>,
    ) -> AuditRecord {
        let (decision, label, error_type) = match outcome {
            Ok(label) => (AuditDecision::Answered, Some(label.to_string()), None),
            Err(t) => (AuditDecision::Refused, None, Some(t.as_str().to_string())),
        };
        let card = &self.model.card;
        AuditRecord {
            time: self.time.clone(),
            request_id: self.asker.request_id.clone(),
            client_request_id: self.asker.client_request_id.clone(),
            image_index,
            caller: self.asker.caller.0.clone(),
            decision,
            error_type,
            model: card.name.clone(),
            model_version: card.version.clone(),
            model_sha256: card.onnx.sha256.clone(),
            model_signer: self.model.provenance.signed_by().map(audit_signer),
            threshold: self.decision.threshold,
            threshold_source: self.decision.source.kind.as_str().to_string(),
            site_card: (self.decision.source.kind == ThresholdKind::Site)
                .then(|| self.model.site.as_ref().map(|s| s.audit_name()))
                .flatten(),
            p_normal: facts.probabilities.map(|p| p[0]),
            p_pneumonia: facts.probabilities.map(|p| p[1]),
            label,
            ood_score,
            input_sha256: facts.upload.sha256.clone(),
            input_kind: facts.upload.kind.into(),
            input_bytes: facts.upload.bytes,
            sop_instance_uid: facts.sop_instance_uid.clone(),
            shadow: None,
            trace_id: self.asker.trace.as_ref().map(|t| t.trace_id()),
        }
    }
}

/// A signer as the audit trail names it: `name (key id)`.
fn audit_signer(s: &crate::signing::SignedBy) -> String {
    format!("{} (key {})", s.signer, s.key_id)
}

/// Records the refusal of a request's images (every image of the request: a request
/// is answered or refused whole) and returns the error to answer: `error` itself, or
/// 503 `audit_unavailable` when the records cannot be written. Errors that are not
/// decisions about an image (overload, timeouts) are returned unrecorded.
pub(super) async fn refused(
    core: &Core,
    model: &ServedModel,
    decision: &Decision,
    facts: &[Facts],
    asker: &Asker,
    error: PredictError,
    ood: Option<(usize, f64)>,
) -> PredictError {
    let error_type = error.error_type();
    if !error_type.is_image_refusal() {
        return error;
    }
    let trail = Trail::new(asker, model, decision);
    let records: Vec<AuditRecord> = facts
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let score = ood.filter(|(at, _)| *at == i).map(|(_, s)| s);
            trail.record(i, f, Err(error_type), score)
        })
        .collect();
    match record(core, &records).await {
        Ok(()) => error,
        Err(e) => e,
    }
}

/// Writes `records` (all or none), counting a failure.
async fn record(core: &Core, records: &[AuditRecord]) -> Result<(), PredictError> {
    let failed = |what: &str, e: String| {
        core.metrics()
            .audit_failures
            .with_label_values(&[] as &[&str])
            .inc();
        tracing::error!(error = %e, "{what} not written; the request fails");
        PredictError::AuditUnavailable
    };
    core.inner
        .audit
        .record_all(records)
        .await
        .map_err(|e| failed("audit records", e.to_string()))?;
    // Beside the audit trail, what was answered, for live outcomes: recorded before
    // the answer is sent, so that a confirmation of it always finds it.
    if let Some(o) = core.outcomes().cloned() {
        let rows = records.to_vec();
        tokio::task::spawn_blocking(move || o.record_answers(&rows))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.0))
            .map_err(|e| failed("answers in the outcomes store", e))?;
    }
    Ok(())
}

/// Every answer's audit record, written before any answer is given: an answer
/// without its record is a 503, never a success.
async fn write_audit(
    core: &Core,
    model: &ServedModel,
    decision: &Decision,
    answers: &[(Prediction, JobOutput, Decoded)],
    asker: &Asker,
) -> Result<(), PredictError> {
    let trail = Trail::new(asker, model, decision);
    let records: Vec<AuditRecord> = answers
        .iter()
        .enumerate()
        .map(|(i, (p, _, d))| {
            let served = [p.probabilities.NORMAL, p.probabilities.PNEUMONIA];
            trail.record(
                i,
                &Facts::of(d, Some(served)),
                Ok(p.label.as_str()),
                p.ood_score,
            )
        })
        .collect();
    record(core, &records).await
}

/// How an answer's warning about a model without a verified signature begins.
pub const UNVERIFIED_MODEL: &str = "model not signature-verified";

/// One answer as given: counted, its latency recorded, with its warnings (the
/// request's, out of distribution, no explanation), its heatmap when asked, and its
/// timings.
fn complete(
    core: &Core,
    model: &ServedModel,
    p: Prediction,
    r: JobOutput,
    d: Decoded,
    total: Duration,
    explain: bool,
) -> Prediction {
    core.metrics()
        .predictions
        .with_label_values(&[&model.card.name, p.label.as_str()])
        .inc();
    model.record(total.as_secs_f64() * 1e3);
    let mut warnings = d.warnings;
    let (mut verdict, mut caution) = match p.in_distribution {
        None => (Verdict::NotScored, None),
        Some(true) => (Verdict::InDistribution, None),
        Some(false) => (Verdict::Outside, None),
    };
    if let (Some(false), Some(t)) = (p.in_distribution, model.ood_threshold()) {
        let score = p.ood_score.unwrap_or(f64::NAN);
        match model.ood_refuse_threshold() {
            Some(r) if score <= r => {
                let c = format!(
                    "{DISTRIBUTION_SHIFT}: score {score:.3} above the training distribution's threshold {t:.3} (refused only above {r:.3}): a radiograph unlike the pediatric films the model was trained on (other equipment or technique, an older patient); its answer is less certain than the model card's figures say"
                );
                warnings.push(c.clone());
                (verdict, caution) = (Verdict::Shift, Some(c));
            }
            _ => warnings.push(format!(
                "out of distribution: score {score:.3} above the model's threshold {t:.3}; this image does not resemble the pediatric frontal chest radiographs the model was trained on, so its label should not be relied on",
            )),
        }
    }
    let heatmap = match (explain, &r.cam) {
        (false, _) => None,
        (true, None) => {
            warnings.push(format!(
                "explanation unavailable: model `{}` {} has no `cam` output",
                model.card.name, model.card.version
            ));
            None
        }
        (true, Some(cam)) => Some(explain::heatmap(
            cam,
            p.label.index(),
            p.label.as_str(),
            &d.input,
            model.card.input_size,
            &model.card.preprocessing,
        )),
    };
    // Last, so that the image's own warnings come first.
    if let crate::signing::Provenance::Unverified(why) = &model.provenance {
        warnings.push(format!(
            "{UNVERIFIED_MODEL}: `{}` {} ({why}); its files are not known to be the ones its publisher released",
            model.card.name, model.card.version
        ));
    }
    Prediction {
        timings_ms: Timings {
            decode: ms(d.took),
            queue: ms(r.queued),
            inference: ms(r.inference),
            total: ms(total),
        },
        dicom: d.dicom,
        warnings,
        verdict,
        caution,
        heatmap,
        ..p
    }
}

/// The equipment an image came from, for the OOD score's drift labels.
fn equipment(d: &Decoded) -> crate::metrics::Equipment<'_> {
    use crate::metrics::Equipment;
    match &d.dicom {
        None => Equipment::NotDicom,
        Some(i) => i
            .manufacturer
            .as_deref()
            .map_or(Equipment::Unknown, Equipment::Manufacturer),
    }
}

/// The first word of the warning on an answer whose image lies between the OOD
/// score's two thresholds.
pub const DISTRIBUTION_SHIFT: &str = "distribution_shift";

/// An image's out-of-distribution score and whether it is within the threshold.
pub(super) type OodVerdict = (Option<f64>, Option<bool>);

/// Each reply's out-of-distribution score and verdict (none without an OOD model or
/// with `--ood-action off`); with `refuse`, the first image out of distribution
/// refuses the request.
pub(super) fn ood_scores(
    core: &Core,
    model: &ServedModel,
    out: &[(JobOutput, Decoded)],
) -> Result<Vec<OodVerdict>, PredictError> {
    let action = core.inner.limits.ood_action;
    let (Some(ood), false) = (&model.ood, action == OodAction::Off) else {
        return Ok(vec![(None, None); out.len()]);
    };
    let mut v = Vec::with_capacity(out.len());
    for (i, (r, d)) in out.iter().enumerate() {
        let e = r.embedding.as_deref().ok_or_else(|| {
            PredictError::Internal("the model has an OOD model but returned no embedding".into())
        })?;
        let score = ood.score(e);
        let threshold = model.ood_threshold().unwrap_or(ood.threshold);
        let inside = score <= threshold;
        // Two verdicts when the card has a second threshold: up to it, a radiograph
        // unlike the training films (answered, flagged); above it (or above the only
        // threshold), not one the model can answer for.
        let refuse_at = model.ood_refuse_threshold().unwrap_or(threshold);
        let shift = !inside && score <= refuse_at;
        let verdict = if inside {
            "in_distribution"
        } else if shift {
            "distribution_shift"
        } else {
            "not_a_radiograph"
        };
        core.metrics()
            .observe_ood(&model.card.name, equipment(d), score, verdict);
        if !inside {
            let counted = if shift && action == OodAction::Refuse {
                "shift"
            } else {
                action.as_str()
            };
            core.metrics()
                .out_of_distribution
                .with_label_values(&[&model.card.name, counted])
                .inc();
            if action == OodAction::Refuse && !shift {
                return Err(PredictError::OutOfDistribution {
                    model: model.card.name.clone(),
                    image: i,
                    score,
                    threshold: refuse_at,
                });
            }
        }
        v.push((Some(score), Some(inside)));
    }
    Ok(v)
}

pub(super) fn prediction(
    model: &ServedModel,
    r: &JobOutput,
    d: &Decision,
    asker: &Asker,
) -> Prediction {
    let p = served_probabilities(r.logits, r.probabilities, model.card.temperature());
    let label = Label::at(f64::from(p[1]), d.threshold);
    Prediction {
        label,
        confidence: p[label.index()],
        probabilities: Probabilities {
            NORMAL: p[0],
            PNEUMONIA: p[1],
        },
        threshold: d.threshold,
        threshold_source: d.source.clone(),
        model: ModelRef {
            name: model.card.name.clone(),
            version: model.card.version.clone(),
            strategy: model.card.training.strategy,
            sha256: model.card.onnx.sha256.clone(),
            precision: model.card.precision,
            signed_by: model.provenance.signed_by().cloned(),
        },
        execution_provider: model.provider.as_str().into(),
        timings_ms: Timings {
            decode: 0.0,
            queue: 0.0,
            inference: 0.0,
            total: 0.0,
        },
        request_id: asker.request_id.clone(),
        client_request_id: asker.client_request_id.clone(),
        dicom: None,
        warnings: Vec::new(),
        ood_score: None,
        in_distribution: None,
        verdict: Verdict::NotScored,
        caution: None,
        heatmap: None,
    }
}
