//! The Open Inference Protocol's model repository extension (as Triton serves it):
//! `POST /v2/repository/index`, `POST /v2/repository/models/{name}/load` and
//! `…/unload`, for callers whose key has the `admin` scope. The work is the
//! repository's ([`crate::repository`]); this file reads the protocol's bodies and
//! maps its refusals; its bodies are its own types (`LoadParams`, `IndexEntry`,
//! `Change`: the schemas in openapi.yaml), converted to and from the repository's.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::{ApiError, AppState};
use crate::audit::{AuditEvent, EventKind};
use crate::predict::Asker;
use crate::predict::PredictError;
use crate::repository::{self, Availability, RepoError, Repository};

/// A `load` call's parameters (the repository extension's `parameters`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    /// Load only this version (else every version of the variant on disk).
    #[serde(default)]
    pub version: Option<String>,
    /// Make `version` the variant's default once it is loaded and warmed (the
    /// swap). Kept across rescans while that version is on disk.
    #[serde(default)]
    pub default: Option<bool>,
    /// Run `version` in the shadow of the variant's default (`true`), or stop the
    /// variant's shadow (`false`).
    #[serde(default)]
    pub shadow: Option<bool>,
    /// The share of requests the shadow runs on, in (0, 1] (default: `--shadow-share`).
    #[serde(default)]
    pub shadow_share: Option<f64>,
}

/// One version in the repository index.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IndexEntry {
    /// Variant name.
    pub name: String,
    /// Version (the card's).
    pub version: String,
    /// `READY` (loaded), or `UNAVAILABLE` (unloaded, or refused: see `reason`).
    pub state: String,
    /// Why it is not loaded; empty when ready.
    pub reason: String,
    /// Whether it is its variant's default version.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// Whether it runs in the shadow of its variant's default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// What a change did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Change {
    /// Versions loaded and warmed (`name@version`).
    pub loaded: Vec<String>,
    /// Versions taken out of the set (unloaded once their requests are done).
    pub unloaded: Vec<String>,
    /// Versions refused, with why (what was serving stays).
    pub refused: Vec<String>,
    /// Each variant's default version after the change.
    pub defaults: BTreeMap<String, String>,
}

impl From<LoadParams> for repository::LoadParams {
    fn from(p: LoadParams) -> Self {
        Self {
            version: p.version,
            default: p.default,
            shadow: p.shadow,
            shadow_share: p.shadow_share,
        }
    }
}

impl From<repository::IndexEntry> for IndexEntry {
    fn from(e: repository::IndexEntry) -> Self {
        Self {
            name: e.name,
            version: e.version,
            state: match e.state {
                Availability::Ready => "READY",
                Availability::Unavailable => "UNAVAILABLE",
            }
            .into(),
            reason: e.reason,
            default: e.default,
            shadow: e.shadow,
        }
    }
}

impl From<repository::Change> for Change {
    fn from(c: repository::Change) -> Self {
        Self {
            loaded: c.loaded,
            unloaded: c.unloaded,
            refused: c.refused,
            defaults: c.defaults,
        }
    }
}

/// `POST /v2/repository/index`'s body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct IndexRequest {
    /// Only the versions ready to answer.
    #[serde(default)]
    pub ready: bool,
}

/// `…/load`'s body: `{"parameters": {...}}` (or none).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// What to load, and what to make of it.
    #[serde(default)]
    pub parameters: LoadParams,
}

/// `…/unload`'s parameters.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnloadParams {
    /// Unload only this version (else every version of the model).
    #[serde(default)]
    pub version: Option<String>,
    /// Triton's flag for ensembles; cxr has none, so it changes nothing.
    #[serde(default)]
    pub unload_dependents: Option<bool>,
}

/// `…/unload`'s body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    /// What to unload.
    #[serde(default)]
    pub parameters: UnloadParams,
}

fn body<T: Default + for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid repository request: {e}")))
}

fn repository(state: &AppState) -> Result<std::sync::Arc<Repository>, ApiError> {
    state
        .core()
        .repository()
        .cloned()
        .ok_or(ApiError::Core(PredictError::NotReady))
}

fn refusal(e: RepoError) -> ApiError {
    match e {
        RepoError::NotFound(m) => ApiError::NoRoute(m),
        RepoError::Refused(m) | RepoError::Invalid(m) => PredictError::RepositoryRefused(m).into(),
        RepoError::Load(e) => PredictError::RepositoryRefused(e.to_string()).into(),
    }
}

/// Runs a repository change on the blocking pool (loading a version reads and
/// warms it; answers go on meanwhile).
async fn change(
    state: &AppState,
    f: impl FnOnce(&Repository) -> Result<repository::Change, RepoError> + Send + 'static,
) -> Result<Json<Change>, ApiError> {
    let repo = repository(state)?;
    tokio::task::spawn_blocking(move || f(&repo))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(|c| Json(c.into()))
        .map_err(refusal)
}

/// Every version in the models folder or loaded, with its state.
#[utoipa::path(post, path = "/v2/repository/index", tag = "model repository",
    request_body(content = Option<IndexRequest>, description = "`{\"ready\": true}` lists only the versions that are loaded"),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The versions: READY (loaded) or UNAVAILABLE with why", body = Vec<IndexEntry>),
        (status = 403, description = "No key with the `admin` scope (without --api-keys-file the repository API is closed)", body = super::V2Error)))]
pub async fn index(
    State(state): State<AppState>,
    bytes: Bytes,
) -> Result<Json<Vec<IndexEntry>>, ApiError> {
    let req: IndexRequest = body(&bytes)?;
    let repo = repository(&state)?;
    let mut entries = tokio::task::spawn_blocking(move || repo.index())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if req.ready {
        entries.retain(|e| e.state == Availability::Ready);
    }
    Ok(Json(entries.into_iter().map(IndexEntry::from).collect()))
}

/// Loads a model's versions from the models folder (or one, with
/// `parameters.version`): each is verified and warmed before it can answer; then
/// the set is swapped at once. `default: true` makes that version the default
/// (the swap); `shadow: true` runs it in the default's shadow. A version that does
/// not check out is refused (400) and what was serving stays.
#[utoipa::path(post, path = "/v2/repository/models/{name}/load", tag = "model repository",
    params(("name" = String, Path, description = "Variant name")),
    request_body(content = Option<LoadRequest>, description = "`{\"parameters\": {\"version\": \"2.1.0\", \"default\": true}}`; none loads every version on disk"),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Loaded: what changed", body = Change),
        (status = 400, description = "Refused: the version does not check out (card, SHA-256, OOD model), or the request is malformed; what was serving stays", body = super::V2Error),
        (status = 403, description = "No key with the `admin` scope", body = super::V2Error),
        (status = 404, description = "No such model or version in the models folder", body = super::V2Error)))]
pub async fn load(
    State(state): State<AppState>,
    Path(name): Path<String>,
    asker: Asker,
    bytes: Bytes,
) -> Result<Json<Change>, ApiError> {
    let req: LoadRequest = body(&bytes)?;
    let target = match &req.parameters.version {
        Some(v) => format!("{name}@{v}"),
        None => name.clone(),
    };
    let asked = serde_json::to_value(&req.parameters).ok();
    let params = req.parameters.into();
    let r = change(&state, move |r| r.load(&name, &params)).await;
    audit(
        &state,
        EventKind::RepositoryLoad,
        "load",
        asker,
        target,
        asked,
        &r,
    )
    .await;
    r
}

/// The audit event of a repository call: who, what was asked, what changed (or why
/// it was refused).
async fn audit(
    state: &AppState,
    event: EventKind,
    op: &str,
    asker: Asker,
    target: String,
    asked: Option<serde_json::Value>,
    r: &Result<Json<Change>, ApiError>,
) {
    let (outcome, result) = match r {
        Ok(Json(c)) => ("ok".to_string(), serde_json::to_value(c).ok()),
        Err(e) => (
            e.error_type().as_str().to_string(),
            Some(serde_json::Value::String(e.to_string())),
        ),
    };
    state
        .core()
        .audit_event(AuditEvent {
            time: crate::audit::now_rfc3339(),
            event,
            request_id: asker.request_id,
            caller: asker.caller.0,
            door: "http",
            route: format!("POST /v2/repository/models/{{name}}/{op}"),
            outcome,
            target: Some(target),
            detail: Some(serde_json::json!({ "parameters": asked, "result": result })),
            suppressed: None,
        })
        .await;
}

/// Unloads a model (every version), or one version with `parameters.version`: it
/// leaves the set at once, answers what it has in flight, then is unloaded. The
/// last model, the `--default-model`, and a model's only version cannot be
/// unloaded.
#[utoipa::path(post, path = "/v2/repository/models/{name}/unload", tag = "model repository",
    params(("name" = String, Path, description = "Variant name")),
    request_body(content = Option<UnloadRequest>, description = "`{\"parameters\": {\"version\": \"2.0.0\"}}`; none unloads every version"),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Unloaded: what changed", body = Change),
        (status = 400, description = "Refused: the server would be left without it", body = super::V2Error),
        (status = 403, description = "No key with the `admin` scope", body = super::V2Error),
        (status = 404, description = "Not loaded", body = super::V2Error)))]
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    asker: Asker,
    bytes: Bytes,
) -> Result<Json<Change>, ApiError> {
    let req: UnloadRequest = body(&bytes)?;
    if req.parameters.unload_dependents == Some(true) {
        tracing::debug!(model = %name, "unload_dependents: cxr has no ensembles; nothing more to unload");
    }
    let version = req.parameters.version;
    let target = match &version {
        Some(v) => format!("{name}@{v}"),
        None => name.clone(),
    };
    let asked = serde_json::json!({ "version": version });
    let r = change(&state, move |r| r.unload(&name, version.as_deref())).await;
    audit(
        &state,
        EventKind::RepositoryUnload,
        "unload",
        asker,
        target,
        Some(asked),
        &r,
    )
    .await;
    r
}
