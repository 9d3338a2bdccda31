//! A candidate version in the shadow of a variant's default: it runs on a share of
//! the requests the default answers, after the answer is given, and what it would
//! have said is compared with what was said.
//!
//! - Sampled exactly (`share` of the requests, spread evenly), copied inputs only:
//!   the answer is computed, recorded and returned as without a shadow.
//! - Shed first: one shadow run waits or runs at a time (another sampled meanwhile
//!   is shed as `busy`); it waits for the server to fall idle (no request in
//!   flight and no image queued for [`IDLE_GAP`]) and is shed as `load` when that does not happen within
//!   [`MAX_WAIT`]; a full candidate queue sheds it as `queue_full`. A shadow run
//!   never takes a request slot, and the candidate has its own queue and worker.
//! - The candidate decides at its own threshold of the same kind as the answer's
//!   (the caller's `threshold`, the same operating point on its own ROC, or its
//!   card's or site's), so a disagreement is one the candidate would have made.
//! - Each image it ran on is an audit record (`decision: shadow`, its own model and
//!   probabilities, and `shadow`: what was answered, agreement, |Δp|), and then
//!   counts in `cxr_shadow_images_total`, `cxr_shadow_abs_delta_p` and the
//!   candidate's tally in `/models/{name}`: the three say the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use crate::audit::{Decision as AuditDecision, ShadowMark};
use crate::eval::served_probabilities;
use crate::inference::ServedModel;
use crate::predict::Core;
use crate::predict::answer::{Audited, Facts, Trail};
use crate::predict::ask::decision;
use crate::predict::ask::{Ask, Asker, Valid};
use crate::predict::upload::Decoded;
use crate::registry::Label;

/// How long the server must have had no request in flight before a shadow runs.
pub const IDLE_GAP: Duration = Duration::from_millis(20);
/// Longest a shadow run waits for that; then it is shed (`load`).
pub const MAX_WAIT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(2);

/// Shadow runs waiting or running at once.
pub const SHADOW_SLOTS: usize = 1;

/// A sampled request's shadow run, before the answer.
pub(super) struct Run {
    candidate: Arc<ServedModel>,
    inputs: Vec<Vec<f32>>,
    _slot: OwnedSemaphorePermit,
}

/// What the default answered for one image (what the shadow is compared with).
pub(super) struct DefaultAnswer {
    pub(super) label: Label,
    pub(super) p_pneumonia: f32,
    pub(super) facts: Facts,
}

/// Whether the server is answering anything: a request holding a slot (HTTP,
/// gRPC), or images in a model's queue (every door, the DICOM node and the folder
/// job included).
fn busy(core: &Core) -> bool {
    core.inflight() > 0
        || core
            .models()
            .is_some_and(|set| set.every_version().any(|m| m.queue_depth() > 0))
}

fn shed(core: &Core, candidate: &ServedModel, reason: &str) {
    candidate.shadow.shed(reason);
    core.metrics()
        .shadow_shed
        .with_label_values(&[&candidate.card.name, &candidate.card.version, reason])
        .inc();
}

/// What the shadow compares of each audited answer.
pub(super) fn answered(audited: &[Audited]) -> Vec<DefaultAnswer> {
    audited
        .iter()
        .map(|(p, _, d)| DefaultAnswer {
            label: p.label,
            p_pneumonia: p.probabilities.PNEUMONIA,
            facts: Facts::of(d, None),
        })
        .collect()
}

/// Whether this request runs `model`'s shadow candidate (the model is its
/// variant's default, has a candidate, and the request is sampled), with a copy of
/// its inputs.
pub(super) fn plan(core: &Core, model: &ServedModel, decoded: &[Decoded]) -> Option<Run> {
    let set = core.models()?;
    if !set.is_default(model) {
        return None;
    }
    let shadow = set.shadow_of(&model.card.name)?;
    let candidate = shadow.model.clone();
    if !candidate.shadow.sample(shadow.share) {
        return None;
    }
    let same_inputs = candidate.card.input_size == model.card.input_size
        && candidate.card.preprocessing == model.card.preprocessing;
    if !same_inputs {
        shed(core, &candidate, "preprocessing");
        return None;
    }
    let Ok(slot) = core.inner.shadow_slots.clone().try_acquire_owned() else {
        shed(core, &candidate, "busy");
        return None;
    };
    Some(Run {
        candidate,
        inputs: decoded.iter().map(|d| d.input.clone()).collect(),
        _slot: slot,
    })
}

impl Run {
    /// Runs the candidate in the background once the server is idle; the answer
    /// is not waited for.
    pub(super) fn spawn(self, core: &Core, valid: &Valid, answered: Vec<DefaultAnswer>) {
        let core = core.clone();
        let asker = valid.asker.clone();
        // The caller's own threshold or operating point, on the candidate's card.
        let ask = Ask {
            threshold: valid.ask.threshold,
            operating_point: valid.ask.operating_point.clone(),
            ..Ask::default()
        };
        let answered_version = valid.model.card.version.clone();
        tokio::spawn(async move {
            self.run(core, asker, ask, answered_version, answered).await;
        });
    }

    async fn run(
        self,
        core: Core,
        asker: Asker,
        ask: Ask,
        answered_version: String,
        answered: Vec<DefaultAnswer>,
    ) {
        let cand = &self.candidate;
        let deadline = Instant::now() + MAX_WAIT;
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if !busy(&core) {
                if now.duration_since(*idle_since.get_or_insert(now)) >= IDLE_GAP {
                    break;
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                shed(&core, cand, "load");
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        let inputs = self.inputs.into_iter().map(|i| (i, None)).collect();
        let outputs = match cand.submit(inputs) {
            Ok(p) => p.outputs().await,
            Err(_) => {
                shed(&core, cand, "queue_full");
                return;
            }
        };
        let Ok(outputs) = outputs else {
            shed(&core, cand, "failed");
            return;
        };
        let decided = decision(cand, &ask)
            .or_else(|_| decision(cand, &Ask::default()))
            .expect("a card's own threshold always decides");
        let trail = Trail::new(&asker, cand, &decided);
        let mut records = Vec::with_capacity(outputs.len());
        let mut marks = Vec::with_capacity(outputs.len());
        for (i, (r, mut a)) in outputs.into_iter().zip(answered).enumerate() {
            let p = served_probabilities(r.logits, r.probabilities, cand.card.temperature());
            let label = Label::at(f64::from(p[1]), decided.threshold);
            let agreed = label == a.label;
            let abs_delta_p = f64::from((p[1] - a.p_pneumonia).abs());
            a.facts.probabilities = Some(p);
            let mut rec = trail.record(i, &a.facts, Ok(label.as_str()), None);
            rec.decision = AuditDecision::Shadow;
            rec.shadow = Some(ShadowMark {
                answered_version: answered_version.clone(),
                answered_label: a.label.to_string(),
                answered_p_pneumonia: a.p_pneumonia,
                agreed,
                abs_delta_p,
            });
            records.push(rec);
            marks.push((a.label, agreed, abs_delta_p));
        }
        // Counted once recorded: the metrics and the tally say what the audit
        // trail says.
        if let Err(e) = core.inner.audit.record_all(&records).await {
            tracing::warn!(error = %e, model = %cand.card.name, version = %cand.card.version, "shadow records not written; the shadow run is not counted");
            shed(&core, cand, "audit");
            return;
        }
        let m = core.metrics();
        for (label, agreed, dp) in marks {
            let (name, version) = (&cand.card.name, &cand.card.version);
            cand.shadow.add(label.as_str(), agreed, dp);
            let agreement = if agreed { "agree" } else { "disagree" };
            m.shadow_images
                .with_label_values(&[name, version, label.as_str(), agreement])
                .inc();
            m.shadow_abs_delta_p
                .with_label_values(&[name, version, label.as_str()])
                .observe(dp);
        }
    }
}
