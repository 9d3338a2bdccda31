//! `GET /dicom/outbox/dead-letters` (scope `admin`): the DICOM node's result
//! objects that were set aside, not sent (a destination refused them
//! `--dicom-max-attempts` times, or they failed for `--dicom-give-up-after-hours`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::middleware;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use crate::delivery::outbox::DeadLetter;
use crate::http::AppState;
use crate::http::auth;
use crate::http::auth::Scope;
use crate::http::error::ApiError;

/// Most dead letters one answer lists (the most recent).
const MAX_LISTED: usize = 1000;

/// The dead letters, the most recent first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetters {
    /// At most 1000, the most recent first (`cxr_dicom_dead_letters` counts them
    /// all).
    pub dead_letters: Vec<DeadLetter>,
}

/// The routes, guarded by the `admin` scope.
pub(super) fn routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/dicom/outbox/dead-letters", get(dead_letters))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), Scope::Admin),
            auth::require,
        ))
}

/// The outbox's dead letters: results not sent and no longer tried (DICOM objects,
/// HL7 messages, FHIR Bundles), with their destination, SOP Instance UID (an HL7
/// message's control ID, a FHIR report's identifier), kind, attempts, last error and
/// times (no patient data). Scope `admin`.
#[utoipa::path(get, path = "/dicom/outbox/dead-letters", tag = "operations",
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The dead letters, the most recent first", body = DeadLetters),
        (status = 401, description = "API keys are required and none or an unknown one was sent", body = crate::http::error::ErrorBody),
        (status = 403, description = "No key with the `admin` scope (without --api-keys-file the route is closed)", body = crate::http::error::ErrorBody),
        (status = 404, description = "This server has no outbox (no --dicom-port, no --hl7-destination, no --fhir-url)", body = crate::http::error::ErrorBody)
    ))]
pub async fn dead_letters(State(state): State<AppState>) -> Result<Json<DeadLetters>, ApiError> {
    let outbox = state.delivery().map(|d| d.outbox().clone()).ok_or_else(|| {
        ApiError::NoRoute(
            "GET /dicom/outbox/dead-letters: this server has no outbox (--dicom-port, --hl7-destination, --fhir-url)".into(),
        )
    })?;
    let letters = tokio::task::spawn_blocking(move || outbox.dead_letters(MAX_LISTED))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.0))?;
    Ok(Json(DeadLetters {
        dead_letters: letters,
    }))
}
