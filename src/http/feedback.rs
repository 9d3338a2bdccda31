//! `POST /feedback`: the label a radiologist confirmed for an answered image,
//! joined to what was answered, and the model's live figures.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::http::error::ApiError;
use crate::outcomes::{Answered, LiveOutcomes, Recorded};
use crate::predict::feedback::Confirmation;
use crate::predict::{Asker, Core, PredictError};
use crate::registry::Label;

/// A confirmed label.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The `request_id` of the answer (its `x-request-id`).
    #[serde(default)]
    pub request_id: Option<String>,
    /// The image's position in that request (default 0).
    #[serde(default)]
    pub image_index: Option<i64>,
    /// Or the DICOM SOP Instance UID of the image (its most recent answer by
    /// `model`, or by the one model that answered it).
    #[serde(default)]
    pub sop_instance_uid: Option<String>,
    /// With `sop_instance_uid`: the model whose answer is confirmed; required when
    /// several models answered the image (else 409).
    #[serde(default)]
    pub model: Option<String>,
    /// The confirmed label: `NORMAL` or `PNEUMONIA`.
    pub label: String,
}

/// What was recorded.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedbackAnswer {
    /// `recorded`, or `already_recorded` (the same label again: nothing changed).
    pub status: String,
    /// The answer it confirms.
    pub answered: Answered,
    /// The confirmed label.
    pub label: String,
    /// Whether the answer agreed with it.
    pub agreed: bool,
    /// The model's live figures now (its file's most recent confirmed answers).
    pub live: LiveOutcomes,
}

/// Records the label a radiologist confirmed for an answered image (scope
/// `feedback`): joined to the stored answer (by `request_id` and `image_index`, or
/// by DICOM `sop_instance_uid`, with `model` when several models answered it),
/// once; the same label again changes nothing, another label is a 409. Answers with the model's live figures.
#[utoipa::path(post, path = "/feedback", tag = "feedback",
    request_body(content = FeedbackRequest, content_type = "application/json"),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Recorded (or already recorded with the same label)", body = FeedbackAnswer),
        (status = 400, description = "Not a confirmation: bad JSON, no id, a label other than NORMAL or PNEUMONIA", body = crate::http::error::ErrorBody),
        (status = 401, description = "API keys are required and none or an unknown one was sent", body = crate::http::error::ErrorBody),
        (status = 403, description = "The key's caller lacks the `feedback` scope", body = crate::http::error::ErrorBody),
        (status = 404, description = "No answered image has this id (`unknown_request`), or the server keeps no outcomes (`not_found`)", body = crate::http::error::ErrorBody),
        (status = 409, description = "Another label was already confirmed for this image, or (by `sop_instance_uid` without `model`) several models answered it", body = crate::http::error::ErrorBody),
        (status = 503, description = "Models still loading", body = crate::http::error::ErrorBody)
    ))]
pub(super) async fn feedback(
    State(state): State<AppState>,
    asker: Asker,
    body: Bytes,
) -> Result<Json<FeedbackAnswer>, ApiError> {
    let (request_id, caller) = (asker.request_id.clone(), asker.caller.0.clone());
    let asked: Option<FeedbackRequest> = serde_json::from_slice(&body).ok();
    let r = confirm(&state, asker, &body).await;
    // Every confirmation, and every refused one, is in the audit trail with who
    // gave it.
    let (outcome, detail) = match &r {
        Ok(Json(a)) => (
            "ok".to_string(),
            serde_json::json!({
                "status": a.status,
                "label": a.label,
                "agreed": a.agreed,
                "answered_request_id": a.answered.request_id,
                "image_index": a.answered.image_index,
                "model": a.answered.model,
                "model_sha256": a.answered.model_sha256,
            }),
        ),
        Err(e) => (
            e.error_type().as_str().to_string(),
            serde_json::json!({ "error": e.to_string() }),
        ),
    };
    // Bounded: the id is the caller's text.
    let target = asked
        .and_then(|a| a.request_id.or(a.sop_instance_uid))
        .map(|t| t.chars().take(128).collect());
    state
        .core()
        .audit_event(crate::audit::AuditEvent {
            time: crate::audit::now_rfc3339(),
            event: crate::audit::EventKind::Feedback,
            request_id,
            caller,
            door: "http",
            route: "POST /feedback".into(),
            outcome,
            target,
            detail: Some(detail),
            suppressed: None,
        })
        .await;
    r
}

/// The confirmation itself ([`feedback`] records it in the audit trail): the JSON
/// read into the core's [`Confirmation`], answered by [`Core::confirm`].
async fn confirm(
    state: &AppState,
    asker: Asker,
    body: &[u8],
) -> Result<Json<FeedbackAnswer>, ApiError> {
    let req: FeedbackRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "a feedback body is JSON with `request_id` (or `sop_instance_uid`) and `label`: {e}"
        ))
    })?;
    let label: Label = req.label.parse().map_err(|_| {
        ApiError::BadRequest(format!("label `{}` is not NORMAL or PNEUMONIA", req.label))
    })?;
    if req.request_id.is_none() && req.sop_instance_uid.is_none() {
        return Err(ApiError::BadRequest(
            "give the answer's `request_id` (and `image_index`) or the image's `sop_instance_uid`"
                .into(),
        ));
    }
    let c = Confirmation {
        request_id: req.request_id,
        image_index: req.image_index.unwrap_or(0),
        sop_instance_uid: req.sop_instance_uid,
        model: req.model,
        label,
    };
    let core: Core = state.core().clone();
    let done = tokio::task::spawn_blocking(move || core.confirm(&asker.caller, &c))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            // No store: this server has no such route.
            PredictError::NoOutcomes => ApiError::NoRoute(format!("POST /feedback: {e}")),
            e => e.into(),
        })?;
    Ok(Json(FeedbackAnswer {
        status: match done.recorded {
            Recorded::New => "recorded",
            Recorded::Again => "already_recorded",
        }
        .into(),
        agreed: done.agreed,
        answered: done.answered,
        label: label.to_string(),
        live: done.live,
    }))
}
