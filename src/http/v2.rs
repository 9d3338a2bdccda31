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

use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::auth::{self, Caller, Scope};
use super::types::PredictQuery;
use super::{
    ApiError, AppState, Decoded, Upload, UploadFacts, caller_of, classify, decision, decode_all,
    inflight_slot, request_id, reserve_body, within_request_timeout,
};
use crate::inference::{SelectError, ServedModel};

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
    Router::new()
        .merge(infer_routes)
        .merge(meta_routes)
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

/// The protocol's error object.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct V2Error {
    /// What went wrong.
    pub error: String,
}

impl V2Error {
    fn new(e: &str) -> Self {
        Self { error: e.into() }
    }
}

/// Server metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerMetadata {
    /// `cxr`.
    pub name: String,
    /// The server's version.
    pub version: String,
    /// Protocol extensions supported.
    pub extensions: Vec<String>,
}

/// A tensor's name, datatype and shape (`-1`: any size).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// `BYTES` or `FP32`.
    pub datatype: String,
    /// Shape; `-1` for the batch.
    pub shape: Vec<i64>,
}

/// Model metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelMetadata {
    /// Variant name.
    pub name: String,
    /// Versions served (the card's).
    pub versions: Vec<String>,
    /// `onnxruntime_onnx`.
    pub platform: String,
    /// Inputs: send exactly one of them per request.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// Readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// Whether the server or model can answer inference requests.
    pub ready: bool,
}

/// Liveness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always true when the server answers.
    pub live: bool,
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestInput {
    /// `image` (BYTES) or `input` (FP32).
    pub name: String,
    /// `[N]` for `image`, `[N, 3, S, S]` for `input`.
    pub shape: Vec<i64>,
    /// `BYTES` or `FP32`.
    pub datatype: String,
    /// `binary_data_size` when the tensor's bytes follow the JSON.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Row-major data: base64 strings (or `{"b64": ...}`) for `image`, numbers for
    /// `input`; nested arrays are flattened.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Value>,
}

/// An output asked for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestOutput {
    /// `probabilities` or `label`.
    pub name: String,
    /// `binary_data: true` to get the output as bytes after the JSON.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `threshold` (number in (0, 1)), `operating_point` (`sensitivity:0.95`),
    /// `binary_data_output` (bool).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Exactly one input.
    pub inputs: Vec<RequestInput>,
    /// Outputs to return (default: all).
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One output tensor of a response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResponseOutput {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// `FP32` or `BYTES`.
    pub datatype: String,
    /// `binary_data_size` when the data follows the JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// Row-major data (absent when sent as binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Value>,
}

/// An inference response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InferResponse {
    /// Variant that answered.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// The request's `id`, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `threshold` applied, `request_id`, `execution_provider`.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// The outputs.
    pub outputs: Vec<ResponseOutput>,
}

/// A model's path: `/v2/models/{name}[/versions/{version}]`.
#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

fn served<'a>(state: &'a AppState, p: &ModelPath) -> Result<&'a ServedModel, ApiError> {
    let models = state.models().ok_or(ApiError::NotReady)?;
    let m = models
        .get(&p.name)
        .ok_or_else(|| SelectError::Unknown(p.name.clone()))?;
    if let Some(v) = &p.version
        && v != &m.card.version
    {
        return Err(ApiError::NoRoute(format!(
            "model `{}` version `{v}` (this server has version `{}`)",
            p.name, m.card.version
        )));
    }
    Ok(m)
}

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "open inference protocol",
    responses((status = 200, description = "Server metadata", body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "cxr".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["binary_tensor_data".into()],
    })
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
        .is_some_and(|m| m.all().iter().all(|m| m.batcher.is_alive()));
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
    Ok(readiness(m.batcher.is_alive()))
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
    let s = i64::from(m.card.input_size);
    let t = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    Ok(Json(ModelMetadata {
        name: m.card.name.clone(),
        versions: vec![m.card.version.clone()],
        platform: "onnxruntime_onnx".into(),
        inputs: vec![
            t("image", "BYTES", vec![-1]),
            t("input", "FP32", vec![-1, 3, s, s]),
        ],
        outputs: {
            let mut o = vec![
                t("probabilities", "FP32", vec![-1, 2]),
                t("label", "BYTES", vec![-1]),
            ];
            if m.ood.is_some() {
                o.push(t("ood_score", "FP64", vec![-1]));
            }
            o
        },
    }))
}

/// Inference: classify `image` files or a preprocessed `input` tensor.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name")),
    security((), ("bearer" = []), ("api_key" = [])),
    request_body(description = "The inference request (JSON; with Inference-Header-Content-Length, the JSON then the tensors' bytes)",
        content((InferRequest = "application/json"), ("application/octet-stream"))),
    responses(
        (status = 200, description = "The outputs (with Inference-Header-Content-Length when some are binary)", body = InferResponse),
        (status = 400, description = "Malformed request: JSON, input name, datatype, shape, data, binary sizes", body = V2Error),
        (status = 404, description = "Unknown model or version", body = V2Error),
        (status = 413, description = "Body, pixels or batch over the limits", body = V2Error),
        (status = 415, description = "An image format or DICOM transfer syntax not supported", body = V2Error),
        (status = 422, description = "An image that is not a classifiable radiograph, or an unreachable operating point", body = V2Error),
        (status = 503, description = "Not ready, overloaded, timed out, or audit record not written", body = V2Error)))]
pub async fn infer(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
    req: Request,
) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let _reserved = reserve_body(&state, &req)?;
    let started = Instant::now();
    let rid = request_id(req.headers());
    let caller = caller_of(&req);
    let header_len = match req.headers().get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Inference-Header-Content-Length must be a byte count".into(),
                    )
                })?,
        ),
    };
    let max = limits.max_body_bytes;
    let body = tokio::time::timeout(
        limits.body_timeout,
        axum::body::to_bytes(req.into_body(), max),
    )
    .await
    .map_err(|_| ApiError::BodyTimeout(limits.body_timeout.as_secs()))?
    .map_err(|_| ApiError::BodyTooLarge(max))?;
    let (json, binary) = match header_len {
        None => (body.clone(), Bytes::new()),
        Some(n) if n <= body.len() => (body.slice(..n), body.slice(n..)),
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
                body.len()
            )));
        }
    };
    let request: InferRequest = serde_json::from_slice(&json)
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request JSON: {e}")))?;
    let _permit = inflight_slot(&state)?;
    let job = infer_inner(&state, &p, request, binary, caller, rid, started);
    within_request_timeout(&state, job).await
}

async fn infer_inner(
    state: &AppState,
    p: &ModelPath,
    request: InferRequest,
    binary: Bytes,
    caller: Caller,
    rid: String,
    started: Instant,
) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let model = served(state, p)?;
    let q = PredictQuery {
        threshold: match request.parameters.get("threshold") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                ApiError::BadRequest("parameter `threshold` must be a number".into())
            })?),
        },
        operating_point: match request.parameters.get("operating_point") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        ApiError::BadRequest(
                            "parameter `operating_point` must be a string such as `sensitivity:0.95`"
                                .into(),
                        )
                    })?
                    .to_string(),
            ),
        },
        ..PredictQuery::default()
    };
    let decision = decision(model, &q)?;
    let outputs = selected_outputs(&request)?;
    if outputs.iter().any(|(n, _)| *n == "ood_score")
        && (model.ood.is_none() || limits.ood_action == crate::ood::OodAction::Off)
    {
        return Err(ApiError::BadRequest(format!(
            "output `ood_score`: model `{}` has no out-of-distribution model, or the server runs with --ood-action off",
            model.card.name
        )));
    }

    let [input] = <[RequestInput; 1]>::try_from(request.inputs).map_err(|inputs| {
        ApiError::BadRequest(format!(
            "{} inputs; send exactly one: `image` (BYTES, encoded files) or `input` (FP32 [N, 3, {s}, {s}])",
            inputs.len(),
            s = model.card.input_size
        ))
    })?;
    let bin = input_binary(&input, &binary)?;
    let decoded = match input.name.as_str() {
        "image" => {
            let files = image_elements(&input, bin)?;
            check_batch(files.len(), limits.max_images)?;
            let uploads = files.into_iter().map(Upload::sniff).collect();
            decode_all(state, model, uploads).await?
        }
        "input" => tensor_rows(&input, bin, model.card.input_size, limits.max_images)?,
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown input `{other}`; model `{}` takes `image` (BYTES) or `input` (FP32)",
                model.card.name
            )));
        }
    };
    let predictions = classify(
        state, model, &decision, decoded, &caller, &rid, started, false,
    )
    .await?;

    let n = predictions.len() as i64;
    let mut tail: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for (name, binary_out) in outputs {
        let (datatype, shape, data, bytes): (&str, Vec<i64>, Value, Vec<u8>) = match name {
            "probabilities" => {
                let flat: Vec<f32> = predictions
                    .iter()
                    .flat_map(|p| [p.probabilities.NORMAL, p.probabilities.PNEUMONIA])
                    .collect();
                let bytes = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
                ("FP32", vec![n, 2], serde_json::json!(flat), bytes)
            }
            "ood_score" => {
                // Checked before inference: every answer has a score.
                let scores: Vec<f64> = predictions
                    .iter()
                    .map(|p| p.ood_score.unwrap_or(f64::NAN))
                    .collect();
                let bytes = scores.iter().flat_map(|v| v.to_le_bytes()).collect();
                ("FP64", vec![n], serde_json::json!(scores), bytes)
            }
            _ => {
                let labels: Vec<&str> = predictions.iter().map(|p| p.label.as_str()).collect();
                let mut bytes = Vec::new();
                for l in &labels {
                    bytes.extend_from_slice(&(l.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(l.as_bytes());
                }
                ("BYTES", vec![n], serde_json::json!(labels), bytes)
            }
        };
        let (parameters, data) = if binary_out {
            let mut m = Map::new();
            m.insert("binary_data_size".into(), bytes.len().into());
            tail.extend_from_slice(&bytes);
            (Some(m), None)
        } else {
            (None, Some(data))
        };
        out.push(ResponseOutput {
            name: name.into(),
            shape,
            datatype: datatype.into(),
            parameters,
            data,
        });
    }
    let mut parameters = Map::new();
    parameters.insert("threshold".into(), decision.threshold.into());
    parameters.insert(
        "threshold_source".into(),
        decision.source.kind.clone().into(),
    );
    parameters.insert("request_id".into(), rid.into());
    parameters.insert("execution_provider".into(), model.provider.as_str().into());
    let response = InferResponse {
        model_name: model.card.name.clone(),
        model_version: model.card.version.clone(),
        id: request.id,
        parameters,
        outputs: out,
    };
    if tail.is_empty() {
        return Ok(Json(response).into_response());
    }
    let mut body = serde_json::to_vec(&response).map_err(|e| ApiError::Internal(e.to_string()))?;
    let json_len = body.len();
    body.extend_from_slice(&tail);
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_LENGTH, HeaderValue::from(json_len));
    Ok(resp)
}

/// The outputs to return, in order, each with whether it goes as binary.
fn selected_outputs(r: &InferRequest) -> Result<Vec<(&'static str, bool)>, ApiError> {
    let all_binary = match r.parameters.get("binary_data_output") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            ApiError::BadRequest("parameter `binary_data_output` must be a boolean".into())
        })?,
    };
    let Some(asked) = &r.outputs else {
        return Ok(vec![("probabilities", all_binary), ("label", all_binary)]);
    };
    let mut out = Vec::with_capacity(asked.len());
    for o in asked {
        let name = match o.name.as_str() {
            "probabilities" => "probabilities",
            "label" => "label",
            "ood_score" => "ood_score",
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown output `{other}`; this model has `probabilities`, `label` and (with an OOD model) `ood_score`"
                )));
            }
        };
        let binary = match o.parameters.get("binary_data") {
            None => all_binary,
            Some(v) => v.as_bool().ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "output `{name}`: parameter `binary_data` must be a boolean"
                ))
            })?,
        };
        out.push((name, binary));
    }
    Ok(out)
}

/// The input's bytes from the binary part, when it declares `binary_data_size` (the
/// only input, so they are the whole binary part).
fn input_binary<'a>(input: &RequestInput, binary: &'a Bytes) -> Result<Option<&'a [u8]>, ApiError> {
    match input.parameters.get("binary_data_size") {
        None => {
            if !binary.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "{} bytes follow the JSON but input `{}` declares no binary_data_size",
                    binary.len(),
                    input.name
                )));
            }
            Ok(None)
        }
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                ApiError::BadRequest("binary_data_size must be a byte count".into())
            })? as usize;
            if n != binary.len() {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` declares binary_data_size {n} but {} bytes follow the JSON",
                    input.name,
                    binary.len()
                )));
            }
            if input.data.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` has both `data` and binary_data_size",
                    input.name
                )));
            }
            Ok(Some(binary.as_ref()))
        }
    }
}

fn check_batch(n: usize, max: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::BadRequest("the input holds no element".into()));
    }
    if n > max {
        return Err(ApiError::TooManyImages(n, max));
    }
    Ok(())
}

fn check_datatype(input: &RequestInput, want: &str) -> Result<(), ApiError> {
    if input.datatype != want {
        return Err(ApiError::BadRequest(format!(
            "input `{}` must have datatype {want}, not {}",
            input.name, input.datatype
        )));
    }
    Ok(())
}

/// The files of an `image` input: shape `[N]` (or `[N, 1]`).
fn image_elements(input: &RequestInput, bin: Option<&[u8]>) -> Result<Vec<Bytes>, ApiError> {
    check_datatype(input, "BYTES")?;
    let n = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        other => {
            return Err(ApiError::BadRequest(format!(
                "input `image` must have shape [N] (one encoded file per element), not {other:?}"
            )));
        }
    };
    let files: Vec<Bytes> = match bin {
        Some(mut b) => {
            let mut files = Vec::new();
            while !b.is_empty() {
                let (len, rest) = b
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad_bytes("a length prefix is cut short"))?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > rest.len() {
                    return Err(bad_bytes("an element is longer than the bytes left"));
                }
                files.push(Bytes::copy_from_slice(&rest[..len]));
                b = &rest[len..];
            }
            files
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                ApiError::BadRequest("input `image` has neither `data` nor binary_data_size".into())
            })?;
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            leaves
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = match v {
                        Value::String(s) => s.as_str(),
                        Value::Object(o) => o.get("b64").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "element {i} of input `image` must be a base64 string or {{\"b64\": ...}}"
                            ))
                        })?,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "element {i} of input `image` must be a base64 string (an encoded JPEG, PNG or DICOM file)"
                            )));
                        }
                    };
                    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                    base64::engine::general_purpose::STANDARD
                        .decode(clean.as_bytes())
                        .map(Bytes::from)
                        .map_err(|e| {
                            ApiError::BadRequest(format!(
                                "element {i} of input `image` is not base64 ({e})"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if files.len() != n {
        return Err(ApiError::BadRequest(format!(
            "input `image` has shape [{n}] but holds {} elements",
            files.len()
        )));
    }
    Ok(files)
}

fn bad_bytes(what: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "input `image` binary data: {what} (each element is a 4-byte little-endian length, then the bytes)"
    ))
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

/// The rows of an `input` tensor `[N, 3, S, S]`, as decoded inputs.
fn tensor_rows(
    input: &RequestInput,
    bin: Option<&[u8]>,
    size: u32,
    max: usize,
) -> Result<Vec<Decoded>, ApiError> {
    check_datatype(input, "FP32")?;
    let s = i64::from(size);
    let n = match input.shape.as_slice() {
        [n, 3, h, w] if *n >= 0 && *h == s && *w == s => *n as usize,
        other => {
            return Err(ApiError::BadRequest(format!(
                "input `input` must have shape [N, 3, {s}, {s}] for this model, not {other:?}"
            )));
        }
    };
    check_batch(n, max)?;
    let row = 3 * (size as usize) * (size as usize);
    let values: Vec<f32> = match bin {
        Some(b) => {
            if b.len() != n * row * 4 {
                return Err(ApiError::BadRequest(format!(
                    "input `input` has {} bytes of FP32 data; shape {:?} needs {}",
                    b.len(),
                    input.shape,
                    n * row * 4
                )));
            }
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                ApiError::BadRequest("input `input` has neither `data` nor binary_data_size".into())
            })?;
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            leaves
                .into_iter()
                .map(|v| {
                    v.as_f64().map(|x| x as f32).ok_or_else(|| {
                        ApiError::BadRequest("input `input` data must be numbers".into())
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if values.len() != n * row {
        return Err(ApiError::BadRequest(format!(
            "input `input` holds {} values; shape {:?} needs {}",
            values.len(),
            input.shape,
            n * row
        )));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::BadRequest(
            "input `input` holds a value that is not finite (NaN or infinity)".into(),
        ));
    }
    Ok(values
        .chunks_exact(row)
        .map(|r| Decoded {
            input: r.to_vec(),
            took: std::time::Duration::ZERO,
            dicom: None,
            warnings: Vec::new(),
            upload: UploadFacts::of_tensor(r),
            sr: None,
        })
        .collect())
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

/// Inference on one version.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "open inference protocol",
    params(("name" = String, Path, description = "Variant name"), ("version" = String, Path, description = "The card's version")),
    security((), ("bearer" = []), ("api_key" = [])),
    request_body(description = "As for /v2/models/{name}/infer",
        content((InferRequest = "application/json"), ("application/octet-stream"))),
    responses(
        (status = 200, description = "The outputs", body = InferResponse),
        (status = 400, description = "Malformed request", body = V2Error),
        (status = 404, description = "Unknown model or version", body = V2Error)))]
pub async fn infer_version(
    state: State<AppState>,
    p: Path<ModelPath>,
    req: Request,
) -> Result<Response, ApiError> {
    infer(state, p, req).await
}
