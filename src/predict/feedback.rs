//! Confirmed labels and the live figures: a radiologist's label joined to what was
//! answered (once; another label later is a conflict), and each model file's live
//! sensitivity and specificity against the reference it is held to. The doors only
//! translate (`POST /feedback` reads its JSON into a [`Confirmation`]).

use crate::access::Caller;
use crate::inference::ServedModel;
use crate::metrics::LiveFigures;
use crate::outcomes::{Answered, FeedbackRefusal, FindRefusal, LiveOutcomes, Outcomes, Recorded};
use crate::predict::Core;
use crate::predict::PredictError;
use crate::registry::Label;

/// Which answered image a label confirms, and the label.
#[derive(Debug, Clone)]
pub struct Confirmation {
    /// The answer's request id (with `image_index`)...
    pub request_id: Option<String>,
    /// ...and the image's position in it.
    pub image_index: i64,
    /// Or the image's DICOM SOP Instance UID (with `model` when several answered it).
    pub sop_instance_uid: Option<String>,
    /// The model whose answer is confirmed (by SOP Instance UID).
    pub model: Option<String>,
    /// The confirmed label.
    pub label: Label,
}

/// What a confirmation recorded.
#[derive(Debug, Clone)]
pub struct Confirmed {
    /// New, or the same label again (nothing changed).
    pub recorded: Recorded,
    /// The answer it confirms.
    pub answered: Answered,
    /// Whether the answer agreed with the label.
    pub agreed: bool,
    /// The model's live figures now.
    pub live: LiveOutcomes,
}

/// The lower 95 % bound of the sensitivity `m` is held to: its site card's, else
/// its card's test split (Wilson, from the counts).
fn reference(m: &ServedModel) -> Option<(&'static str, f64)> {
    if let Some(s) = m.site.as_ref().and_then(|s| s.model.sensitivity) {
        return Some(("site", s.low));
    }
    let c = m.card.metrics.test.as_ref()?.confusion;
    crate::eval::site::wilson(c.tp, c.tp + c.fn_).map(|i| ("card", i.low))
}

/// The gauges' plain values of live figures.
fn figures(l: &LiveOutcomes) -> LiveFigures {
    let c = &l.confusion;
    let interval = |i: Option<crate::eval::site::Interval>| i.map(|i| (i.value, i.low, i.high));
    LiveFigures {
        confirmed: l.n,
        tp: c.tp,
        fp: c.fp,
        tn: c.tn,
        fn_: c.fn_,
        sensitivity: interval(l.sensitivity),
        specificity: interval(l.specificity),
        sensitivity_alarm: l.sensitivity_alarm,
    }
}

impl Core {
    /// The outcomes store, or why feedback has nothing to record in.
    fn store(&self) -> Result<std::sync::Arc<Outcomes>, PredictError> {
        self.outcomes().cloned().ok_or(PredictError::NoOutcomes)
    }

    /// Model `m`'s live figures (a database query: call it off the async threads),
    /// its gauges set.
    pub fn live_outcomes(&self, m: &ServedModel) -> Result<LiveOutcomes, PredictError> {
        let store = self.store()?;
        let c = store
            .confusion(&m.card.onnx.sha256)
            .map_err(|e| PredictError::Internal(e.0))?;
        let l = LiveOutcomes::of(c, store.window(), reference(m));
        self.metrics().set_live(&m.card.name, &figures(&l));
        Ok(l)
    }

    /// Records `c` by `caller`: joined to the stored answer, once (the same label
    /// again changes nothing; another label is a conflict). Blocking (the store).
    pub fn confirm(&self, caller: &Caller, c: &Confirmation) -> Result<Confirmed, PredictError> {
        let store = self.store()?;
        if self.models().is_none() {
            return Err(PredictError::NotReady);
        }
        let index = c.image_index;
        let found = match (&c.request_id, &c.sop_instance_uid) {
            (None, Some(uid)) => match store.find_instance(uid, c.model.as_deref()) {
                Ok(a) => a,
                Err(FindRefusal::Ambiguous(models)) => {
                    return Err(PredictError::FeedbackConflict(format!(
                        "the image with SOP Instance UID `{uid}` was answered by several models ({}): name the one confirmed in `model`",
                        models.join(", ")
                    )));
                }
                Err(FindRefusal::Store(e)) => return Err(PredictError::Internal(e.0)),
            },
            _ => store
                .find(c.request_id.as_deref(), index, None)
                .map_err(|e| PredictError::Internal(e.0))?,
        };
        let answered = found.ok_or_else(|| {
            PredictError::UnknownRequest(match (&c.request_id, &c.sop_instance_uid) {
                (Some(id), _) => format!("no answered image {index} of request `{id}`"),
                (None, Some(uid)) => format!("no answered image with SOP Instance UID `{uid}`"),
                (None, None) => "no id".into(),
            })
        })?;
        let recorded = match store.confirm(&answered, c.label.as_str(), &caller.0) {
            Ok(r) => r,
            Err(FeedbackRefusal::Conflict(was)) => {
                return Err(PredictError::FeedbackConflict(format!(
                    "image {} of request `{}` was already confirmed as {was}; the first confirmation stands",
                    answered.image_index, answered.request_id
                )));
            }
            Err(FeedbackRefusal::Store(e)) => return Err(PredictError::Internal(e.0)),
        };
        let live = match self
            .models()
            .and_then(|ms| ms.get(&answered.model).cloned())
        {
            Some(m) if m.card.onnx.sha256 == answered.model_sha256 => self.live_outcomes(&m)?,
            // A model file no longer served: its figures, without a reference.
            _ => LiveOutcomes::of(
                store
                    .confusion(&answered.model_sha256)
                    .map_err(|e| PredictError::Internal(e.0))?,
                store.window(),
                None,
            ),
        };
        Ok(Confirmed {
            recorded,
            agreed: answered.label == c.label.as_str(),
            answered,
            live,
        })
    }
}
