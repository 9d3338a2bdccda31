//! The other routes: the model cards and their plots, health and readiness, metrics,
//! the OpenAPI document, the API docs page and the page for people.

use crate::AppState;
use crate::http::error::ApiError;
use crate::http::error::ErrorBody;
use crate::http::types::LiveFacts;
use crate::http::types::ModelInfo;
use crate::http::types::ModelList;
use crate::http::types::ShadowInfo;
use crate::http::types::Status;
use crate::http::types::VersionInfo;
use crate::inference::ModelSet;
use crate::inference::ServedModel;
use crate::predict::PredictError;
use axum::Json;
use axum::extract::Path;
use axum::extract::State;
use axum::http::header;
use axum::response::Html;
use axum::response::IntoResponse;
use axum::response::Response;

fn live_facts(m: &ServedModel) -> LiveFacts {
    LiveFacts {
        execution_provider: m.provider.as_str().into(),
        cuda_fallback_reason: m.fallback_reason.clone(),
        backend_choice: m.backend_choice.clone(),
        backend_decision: m.backend_decision.clone(),
        signed_by: m.provenance.signed_by().cloned(),
        signature_warning: match &m.provenance {
            crate::signing::Provenance::Signed(_) => None,
            crate::signing::Provenance::Unverified(why) => Some(why.clone()),
        },
        openvino_from_cache: m.openvino_from_cache,
        load_time_ms: m.load_time_ms,
        requests_served: m.served(),
        queue_depth: m.queue_depth(),
        latency: m.latency(),
    }
}

/// `m` (a variant's default version, or one version of it) as `/models` shows it.
pub(super) fn model_info(
    models: &ModelSet,
    m: &ServedModel,
    urgent_at: crate::delivery::UrgentAt,
) -> ModelInfo {
    let name = &m.card.name;
    let shadow = models.shadow_of(name);
    ModelInfo {
        card: m.card.clone(),
        default: models.default_model().card.name == *name,
        urgent_threshold: urgent_at.threshold(&m.card),
        live: live_facts(m),
        plots: m
            .plots
            .iter()
            .map(|(k, _)| format!("/models/{name}/plots/{k}"))
            .collect(),
        site_card: m.site.clone(),
        live_outcomes: None,
        versions: models
            .versions(name)
            .iter()
            .map(|v| VersionInfo {
                version: v.card.version.clone(),
                role: models.role(v).into(),
                card: v.card.clone(),
                live: live_facts(v),
            })
            .collect(),
        shadow: shadow.filter(|_| models.is_default(m)).map(|s| ShadowInfo {
            version: s.model.card.version.clone(),
            share: s.share,
            agreement: s.model.shadow.report(),
        }),
    }
}

/// Every model variant: its card (measured test metrics, confusion matrix, recipe)
/// and live facts.
#[utoipa::path(get, path = "/models", tag = "models",
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The variants", body = ModelList),
        (status = 401, description = "API keys are required and none or an unknown one was sent", body = ErrorBody),
        (status = 403, description = "The key's caller lacks the `models` scope", body = ErrorBody),
        (status = 503, description = "Models still loading", body = ErrorBody)
    ))]
pub(super) async fn list_models(
    State(state): State<AppState>,
) -> Result<Json<ModelList>, ApiError> {
    let models = state
        .models()
        .ok_or(ApiError::Core(PredictError::NotReady))?;
    Ok(Json(ModelList {
        default: models.default_model().card.name.clone(),
        models: models
            .all()
            .iter()
            .map(|m| model_info(&models, m, state.urgent_at()))
            .collect(),
    }))
}

/// One model variant (its default version), or one version of it (`NAME@VERSION`).
#[utoipa::path(get, path = "/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Variant name, or `NAME@VERSION` for one loaded version")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The variant", body = ModelInfo),
        (status = 401, description = "API keys are required and none or an unknown one was sent", body = ErrorBody),
        (status = 403, description = "The key's caller lacks the `models` scope", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 503, description = "Models still loading", body = ErrorBody)
    ))]
pub(super) async fn get_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelInfo>, ApiError> {
    let models = state
        .models()
        .ok_or(ApiError::Core(PredictError::NotReady))?;
    // `NAME` (its default version) or `NAME@VERSION`.
    let m = models.select(Some(&name), None)?;
    let mut info = model_info(&models, m, state.urgent_at());
    if state.core().outcomes().is_some() {
        let (core, m) = (state.core().clone(), m.clone());
        info.live_outcomes = Some(
            tokio::task::spawn_blocking(move || core.live_outcomes(&m))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??,
        );
    }
    Ok(Json(info))
}

/// One of a variant's training plots (PNG): `roc`, `curves` or `confusion`.
#[utoipa::path(get, path = "/models/{name}/plots/{kind}", tag = "models",
    params(("name" = String, Path, description = "Variant name"),
           ("kind" = String, Path, description = "`roc`, `curves` or `confusion`")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The plot", content_type = "image/png", body = Vec<u8>),
        (status = 401, description = "API keys are required and none or an unknown one was sent", body = ErrorBody),
        (status = 404, description = "Unknown model, or no such plot for it", body = ErrorBody)
    ))]
pub(super) async fn get_plot(
    State(state): State<AppState>,
    Path((name, kind)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let models = state
        .models()
        .ok_or(ApiError::Core(PredictError::NotReady))?;
    let m = models.get(&name).ok_or_else(|| models.unknown(&name))?;
    let png = m
        .plots
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, b)| b.clone())
        .ok_or_else(|| {
            ApiError::NoRoute(format!(
                "plot `{kind}` of model `{name}` (it has: {})",
                m.plots
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = Status)))]
pub(super) async fn health() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
        models: vec![],
    })
}

/// Readiness: every model is loaded and warmed up.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Still loading", body = ErrorBody)
    ))]
pub(super) async fn ready(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let models = state
        .models()
        .ok_or(ApiError::Core(PredictError::NotReady))?;
    if let Some(dead) = models.all().iter().find(|m| !m.is_alive()) {
        return Err(PredictError::WorkerDown(dead.card.name.clone()).into());
    }
    Ok(Json(Status {
        status: "ready".into(),
        models: models.all().iter().map(|m| m.card.name.clone()).collect(),
    }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4")))]
pub(super) async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

/// The page for people (`/`, `/ui`): drop X-rays, see every variant's answer and
/// heatmap, read the model cards. One file compiled in; it calls only the public API.
pub(super) async fn ui() -> Response {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )],
        Html(include_str!("ui.html")),
    )
        .into_response()
}

pub(super) async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
