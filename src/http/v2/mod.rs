//! The Open Inference Protocol (KServe V2) over REST, beside the cxr API: same
//! server, queues, limits, keys and audit trail.
//!
//! - `GET /v2`, `/v2/health/live`, `/v2/health/ready`: server metadata and health
//!   (200 true, 400 false, as the protocol says).
//! - `GET /v2/models/{name}[/versions/{version}]`: model metadata;
//!   `…/ready`: model readiness.
//! - `POST /v2/models/{name}[/versions/{version}]/infer`: one input, either `image`
//!   (`BYTES [N]`: encoded JPEG, PNG or DICOM files, base64 strings in JSON, decoded
//!   and checked exactly as `/predict` does) or `input` (`FP32 [N, 3, S, S]`: an
//!   already preprocessed tensor, fed to the model as is). Outputs `probabilities`
//!   (`FP32 [N, 2]`: NORMAL, PNEUMONIA, calibrated as `/predict` serves them) and
//!   `label` (`BYTES [N]`), and, asked by name from a model with an OOD model,
//!   `ood_score` (`FP64 [N]`). An out-of-distribution image is refused as by
//!   `/predict` (`--ood-action`). Request parameters `threshold` and `operating_point` work
//!   as `/predict`'s query.
//! - Triton's binary tensor data extension, both ways: `Inference-Header-Content-Length`
//!   splits the body into the JSON header and the tensors' bytes (`binary_data_size`
//!   per input); outputs asked with `binary_data` (or `binary_data_output`) come back
//!   as bytes after the JSON. BYTES elements in binary are a 4-byte little-endian
//!   length then the bytes.
//!
//! Errors are `{"error": "..."}` with the same status codes as the cxr API.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

use super::auth::{self, Scope};
use super::{ApiError, AppState};
use crate::inference::ServedModel;

mod infer;
pub(crate) mod repository;
mod tensors;
mod types;

pub(crate) use infer::{__path_infer, __path_infer_version, infer, infer_version};
pub use types::{
    Bounded, InferRequest, InferResponse, Liveness, MAX_LIST, MAX_PARAMETERS, ModelMetadata,
    Params, Readiness, RequestInput, RequestOutput, ResponseOutput, ServerMetadata, TensorMetadata,
    V2Error,
};

/// The header that splits a binary-extension body (JSON length in bytes).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The V2 routes (merged into the app by [`super::build_app`]).
pub fn routes(state: &AppState) -> Router<AppState> {
    let guard =
        |scope: Scope| middleware::from_fn_with_state((state.clone(), scope), auth::require);
    let infer_routes = Router::new()
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route_layer(guard(Scope::Predict));
    let meta_routes = Router::new()
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route_layer(guard(Scope::Models));
    let repository_routes = Router::new()
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{name}/load", post(repository::load))
        .route(
            "/v2/repository/models/{name}/unload",
            post(repository::unload),
        )
        .route_layer(guard(Scope::Admin));
    Router::new()
        .merge(infer_routes)
        .merge(meta_routes)
        .merge(repository_routes)
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .layer(middleware::from_fn(error_shape))
}

/// Rewrites the API's error body `{"error", "error_type"}` into the protocol's
/// `{"error"}` (status and headers kept).
async fn error_shape(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 16).await else {
        return (parts.status, Json(V2Error::new("internal error"))).into_response();
    };
    let error = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
    match error {
        Some(e) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let mut r = Json(V2Error::new(&e)).into_response();
            *r.status_mut() = parts.status;
            for (k, v) in &parts.headers {
                if k != header::CONTENT_TYPE {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            // The refusal the logging middleware reads travels with the response.
            *r.extensions_mut() = parts.extensions;
            r
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// A model's path: `/v2/models/{name}[/versions/{version}]`.
#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

fn served(state: &AppState, p: &ModelPath) -> Result<Arc<ServedModel>, ApiError> {
    Ok(state.core().served(&p.name, p.version.as_deref())?)
}

fn server_metadata_of() -> ServerMetadata {
    let (name, version, extensions) = crate::oip::tensor::server_metadata();
    ServerMetadata {
        name: name.into(),
        version: version.into(),
        extensions: extensions.into_iter().map(str::to_string).collect(),
    }
}

/// `m`'s metadata, listing `versions` (every loaded version of its variant).
fn model_metadata_of(m: &ServedModel, versions: Vec<String>) -> ModelMetadata {
    let (platform, inputs, outputs) = crate::oip::tensor::model_tensors(m);
    let t = |(name, datatype, shape): crate::oip::tensor::TensorSpec| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    ModelMetadata {
        name: m.card.name.clone(),
        versions,
        platform: platform.into(),
        inputs: inputs.into_iter().map(t).collect(),
        outputs: outputs.into_iter().map(t).collect(),
    }
}

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "open inference protocol",
    responses((status = 200, description = "Server metadata", body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(server_metadata_of())
}

/// Server liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "open inference protocol",
    responses((status = 200, description = "Live", body = Liveness)))]
pub async fn live() -> Json<Liveness> {
    Json(Liveness { live: true })
}

/// Server readiness: every model loaded, warmed up and its worker alive.
#[utoipa::path(get, path = "/v2/health/ready", tag = "open inference protocol",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 400, description = "Not ready", body = Readiness)))]
pub async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = state
        .models()
        .is_some_and(|m| m.all().iter().all(|m| m.is_alive()));
    readiness(ready)
}

fn readiness(ready: bool) -> Response {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(Readiness { ready })).into_response()
}

/// Model readiness.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name")),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 400, description = "Not ready", body = Readiness),
        (status = 404, description = "Unknown model or version", body = V2Error)))]
pub async fn model_ready(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    if state.models().is_none() {
        return Ok(readiness(false));
    }
    let m = served(&state, &p)?;
    Ok(readiness(m.is_alive()))
}

/// Model metadata: its inputs (send one of them) and outputs.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Metadata", body = ModelMetadata),
        (status = 404, description = "Unknown model or version", body = V2Error)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let m = served(&state, &p)?;
    let versions = state.models().map_or_else(
        || vec![m.card.version.clone()],
        |set| set.version_names(&m.card.name),
    );
    Ok(Json(model_metadata_of(&m, versions)))
}

// The versioned paths: the same handlers, documented under their own paths (a version
// other than the card's is a 404).

/// Model readiness of one version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name"), ("version" = String, Path, description = "The card's version")),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 400, description = "Not ready", body = Readiness),
        (status = 404, description = "Unknown model or version", body = V2Error)))]
pub async fn model_ready_version(
    state: State<AppState>,
    p: Path<ModelPath>,
) -> Result<Response, ApiError> {
    model_ready(state, p).await
}

/// Model metadata of one version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name"), ("version" = String, Path, description = "The card's version")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Metadata", body = ModelMetadata),
        (status = 404, description = "Unknown model or version", body = V2Error)))]
pub async fn model_metadata_version(
    state: State<AppState>,
    p: Path<ModelPath>,
) -> Result<Json<ModelMetadata>, ApiError> {
    model_metadata(state, p).await
}
