//! A request to the core, typed: who asks ([`Asker`]), what they ask of the model
//! ([`Ask`]), and the request validated ([`Valid`]: the variant and the
//! [`Decision`] it answers at), as text-generation-inference's `validation.rs`
//! makes one typed request for every door. Below `request` (which answers it) and
//! `answer`, `shadow` (which use it).

use std::sync::Arc;
use std::time::Instant;

use crate::access::Caller;
use crate::eval::Target;
use crate::imaging::sr::SrSource;
use crate::inference::Prefer;
use crate::inference::ServedModel;
use crate::predict::PredictError;
use crate::predict::types::Prediction;
use crate::predict::types::ThresholdKind;
use crate::predict::types::ThresholdSource;

/// Longest `x-request-id` kept from a caller.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;

/// The header (HTTP) or metadata key (gRPC) of a caller's own request id, and of
/// the id an answer echoes.
pub const X_REQUEST_ID: &str = "x-request-id";

/// A caller's `x-request-id` as kept: at most [`MAX_CLIENT_REQUEST_ID`] characters
/// of `A-Z a-z 0-9 - _ . : / + = @`, others dropped; `None` if nothing is left.
pub fn sanitize_client_request_id(raw: &[u8]) -> Option<String> {
    let kept: String = raw
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
        .take(MAX_CLIENT_REQUEST_ID)
        .map(|&b| char::from(b))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// Who asked, and the request's ids: what answers and audit records name.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The caller (an API key's name, a DICOM calling AE title, or anonymous).
    pub caller: Caller,
    /// The server's request id.
    pub request_id: String,
    /// The caller's own id, sanitised.
    pub client_request_id: Option<String>,
    /// The request's trace (its stages become spans), when the door traces.
    pub trace: Option<Arc<crate::trace::RequestTrace>>,
}

impl Asker {
    /// One request of `caller`: a new server request id, the caller's own id (a
    /// door sanitises one it was sent: [`sanitize_client_request_id`]), and no
    /// trace yet.
    pub fn new(caller: Caller, client_request_id: Option<String>) -> Self {
        Self {
            caller,
            request_id: uuid::Uuid::new_v4().to_string(),
            client_request_id,
            trace: None,
        }
    }

    /// The request traced by `trace` (its spans carry the request id).
    #[must_use]
    pub fn traced(mut self, trace: Arc<crate::trace::RequestTrace>) -> Self {
        trace.set_request_id(&self.request_id);
        self.trace = Some(trace);
        self
    }

    /// One request of `caller` as every door reads it from its headers (HTTP's,
    /// or gRPC's metadata), `header` looking a value up by its lower-case name, so
    /// that no transport type enters the core: a new server request id; the
    /// caller's `x-request-id`, sanitised ([`sanitize_client_request_id`]); and the
    /// caller's W3C trace context (`traceparent`, `tracestate`). The request is
    /// traced when that context is valid, or with a trace of its own when `when`
    /// says so; its spans are recorded when `exporting` (and the trace is sampled).
    pub fn from_headers<'a>(
        caller: Caller,
        header: impl Fn(&str) -> Option<&'a [u8]>,
        exporting: bool,
        when: Traced,
    ) -> Self {
        use crate::trace::{RequestTrace, TraceContext};
        let client = header(X_REQUEST_ID).and_then(sanitize_client_request_id);
        let asker = Self::new(caller, client);
        let ctx = match (TraceContext::from_headers(&header), when) {
            (Some(ctx), _) => ctx,
            (None, Traced::Always) => TraceContext::root(),
            (None, Traced::WhenSent) => return asker,
        };
        asker.traced(RequestTrace::start(ctx, exporting))
    }

    /// The `x-request-id` an answer carries: the caller's own, else the server's.
    pub fn echoed_request_id(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }
}

/// Which requests [`Asker::from_headers`] traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traced {
    /// Every one: the caller's trace, or a new one (inference requests).
    Always,
    /// Only those whose caller sent a valid `traceparent`.
    WhenSent,
}

/// What a caller asks of the model: which variant, at which threshold, and whether
/// to explain.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// A variant by name.
    pub model: Option<String>,
    /// The variant with the best measured sensitivity or specificity.
    pub prefer: Option<Prefer>,
    /// A threshold on P(PNEUMONIA), in (0, 1).
    pub threshold: Option<f64>,
    /// An operating point on the card's validation ROC (`sensitivity:0.95`).
    pub operating_point: Option<String>,
    /// Add the class activation maps to each answer.
    pub explain: bool,
}

/// A validated request: the variant that will answer and the decision it will
/// answer at (the role of text-generation-inference's `ValidGenerateRequest`).
pub struct Valid {
    /// Who asked.
    pub asker: Asker,
    /// The variant.
    pub model: Arc<ServedModel>,
    /// What the caller asked (a shadow candidate is asked the same).
    pub ask: Ask,
    /// The threshold, and where it came from.
    pub decision: Decision,
    /// Whether answers carry their heatmaps.
    pub explain: bool,
    /// When the door admitted the request (answers' `timings_ms.total`).
    pub started: Instant,
}

/// A request's answers, one per image in order, with what a Structured Report of
/// each needs (empty for an image that was not DICOM).
pub struct Answers {
    /// The answers.
    pub predictions: Vec<Prediction>,
    /// Their sources' DICOM facts.
    pub sources: Vec<SrSource>,
}

/// The threshold a request is answered at, and where it came from.
#[derive(Debug, Clone)]
pub struct Decision {
    /// On P(PNEUMONIA).
    pub threshold: f64,
    /// Where it came from.
    pub source: ThresholdSource,
}

/// The card's threshold, or the caller's `threshold=`, or the one that reached the
/// caller's `operating_point=` on the card's validation ROC.
pub(crate) fn decision(model: &ServedModel, q: &Ask) -> Result<Decision, PredictError> {
    let card = &model.card;
    match (q.threshold, q.operating_point.as_deref()) {
        (Some(_), Some(_)) => Err(PredictError::InvalidAsk(
            "give `threshold` or `operating_point`, not both".into(),
        )),
        (Some(t), None) => {
            if !(t > 0.0 && t < 1.0) {
                return Err(PredictError::InvalidAsk(format!(
                    "threshold {t} must lie in (0, 1)"
                )));
            }
            Ok(Decision {
                threshold: t,
                source: ThresholdSource {
                    kind: ThresholdKind::Query,
                    rule: None,
                    target: None,
                    validation_sensitivity: None,
                    validation_specificity: None,
                    site: None,
                },
            })
        }
        (None, Some(op)) => {
            let target: Target = op
                .parse()
                .map_err(|e: crate::eval::ParseError| PredictError::InvalidAsk(e.0))?;
            let curve = card.operating_curve.as_ref().ok_or_else(|| {
                PredictError::OperatingPoint(format!(
                    "model `{}` {} has no validation ROC in its card, so no operating point can be chosen; use `threshold`",
                    card.name, card.version
                ))
            })?;
            let p = curve.threshold_for(target).ok_or_else(|| {
                PredictError::OperatingPoint(format!(
                    "no threshold of model `{}` reached {target} on its validation ROC ({})",
                    card.name, curve.source
                ))
            })?;
            Ok(Decision {
                threshold: p.threshold,
                source: ThresholdSource {
                    kind: ThresholdKind::OperatingPoint,
                    rule: None,
                    target: Some(target.to_string()),
                    validation_sensitivity: Some(p.tpr),
                    validation_specificity: Some(1.0 - p.fpr),
                    site: None,
                },
            })
        }
        (None, None) => Ok(match &model.site {
            // The site's own choice, on its own films, for this very file.
            Some(site) => Decision {
                threshold: site.model.threshold,
                source: ThresholdSource {
                    kind: ThresholdKind::Site,
                    rule: Some(site.model.rule.clone()),
                    target: None,
                    validation_sensitivity: site.model.sensitivity.map(|i| i.value),
                    validation_specificity: site.model.specificity.map(|i| i.value),
                    site: Some(site.provenance.clone()),
                },
            },
            None => Decision {
                threshold: card.threshold,
                source: ThresholdSource {
                    kind: ThresholdKind::Card,
                    rule: card.threshold_rule.clone(),
                    target: None,
                    validation_sensitivity: None,
                    validation_specificity: None,
                    site: None,
                },
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// A door's header lookup over `(name, value)` pairs.
    fn asker(headers: &[(&str, &str)], exporting: bool, when: Traced) -> Asker {
        Asker::from_headers(
            Caller::anonymous(),
            |n| {
                headers
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.as_bytes())
            },
            exporting,
            when,
        )
    }

    #[test]
    fn the_callers_request_id_is_kept_sanitised_and_echoed() {
        let a = asker(
            &[("x-request-id", "abc<script>-1")],
            false,
            Traced::WhenSent,
        );
        assert_eq!(a.client_request_id.as_deref(), Some("abcscript-1"));
        assert_eq!(a.echoed_request_id(), "abcscript-1");
        assert_ne!(a.request_id, "abcscript-1");
        // None sent: the server's own id is echoed.
        let a = asker(&[], false, Traced::WhenSent);
        assert_eq!(a.client_request_id, None);
        assert_eq!(a.echoed_request_id(), a.request_id);
        assert_eq!(a.request_id.len(), 36, "a UUID");
    }

    #[test]
    fn a_valid_traceparent_is_continued_and_a_trace_starts_only_when_asked() {
        let a = asker(
            &[("traceparent", PARENT), ("tracestate", "k=v")],
            true,
            Traced::WhenSent,
        );
        let t = a.trace.expect("the caller's trace");
        assert_eq!(t.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.context().tracestate.as_deref(), Some("k=v"));
        assert!(t.recording());
        assert!(
            t.traceparent()
                .starts_with("00-0af7651916cd43dd8448eb211c80319c-")
        );
        // Not exporting: traced, not recorded.
        let a = asker(&[("traceparent", PARENT)], false, Traced::WhenSent);
        assert!(!a.trace.expect("traced").recording());
        // None sent (or an invalid one): a trace of its own only when asked.
        assert!(asker(&[], true, Traced::WhenSent).trace.is_none());
        assert!(
            asker(&[("traceparent", "00-zz")], true, Traced::WhenSent)
                .trace
                .is_none()
        );
        let a = asker(&[("traceparent", "00-zz")], true, Traced::Always);
        let t = a.trace.expect("a new trace");
        assert_ne!(t.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert!(t.context().parent_span_id.is_none());
    }
}
