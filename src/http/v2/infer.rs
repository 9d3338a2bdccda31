//! `POST /v2/models/{name}[/versions/{version}]/infer`.

use crate::http::ApiError;
use crate::http::AppState;
use crate::http::upload::ReservedBody;
use crate::http::v2::HEADER_LENGTH;
use crate::http::v2::InferRequest;
use crate::http::v2::InferResponse;
use crate::http::v2::ModelPath;
use crate::http::v2::RequestInput;
use crate::http::v2::ResponseOutput;
use crate::http::v2::V2Error;
use crate::http::v2::served;
use crate::http::v2::tensors::image_elements;
use crate::http::v2::tensors::input_binary;
use crate::http::v2::tensors::tensor_rows;
use crate::oip;
use crate::oip::AskedOutput;
use crate::oip::Inputs;
use crate::oip::Param;
use crate::oip::Params;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::Valid;
use axum::Json;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use serde_json::Map;
use serde_json::Value;
use std::time::Instant;

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
pub(crate) async fn infer(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
    asker: Asker,
    headers: HeaderMap,
    body: ReservedBody,
) -> Result<Response, ApiError> {
    let header_len = match headers.get(HEADER_LENGTH) {
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
    let started = body.started;
    let body = body.bytes;
    if let Some(t) = &asker.trace {
        t.stage("admission", t.started(), started, &[]);
        t.stage("body", started, Instant::now(), &[]);
    }
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
    let core = state.core();
    // The slot before the JSON is read: parsing is work a flood must not get for free.
    let _slot = core.slot()?;
    // Typed and bounded: a tensor's data stays the request's own text until the
    // model and shape say how much of it to read.
    let request: InferRequest<'_> = serde_json::from_slice(&json)
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request JSON: {e}")))?;
    let job = infer_inner(&state, &p, request, binary, asker, started);
    core.within_timeout(job).await
}

async fn infer_inner(
    state: &AppState,
    p: &ModelPath,
    request: InferRequest<'_>,
    binary: Bytes,
    asker: Asker,
    started: Instant,
) -> Result<Response, ApiError> {
    let core = state.core();
    let model = served(state, p)?.clone();
    let parameters = params(&request.parameters);
    let asked: Option<Vec<AskedOutput>> = request.outputs.as_ref().map(|o| {
        o.0.iter()
            .map(|o| AskedOutput {
                name: o.name.clone(),
                parameters: params(&o.parameters),
            })
            .collect()
    });
    let ask = oip::ask_of(&parameters)?;
    let valid = core.validate_for(asker, model, &ask, started)?;
    let outputs = oip::selected_outputs(&parameters, asked.as_deref())?;
    let inputs = inputs_of(core, &valid, request.inputs.0, &binary)?;
    let answer = oip::infer(core, &valid, &outputs, inputs).await?;
    let answering = Instant::now();
    let mut tail: Vec<u8> = Vec::new();
    let out = answer
        .outputs
        .iter()
        .map(|t| {
            let (parameters, data) = if t.binary {
                let bytes = t.raw();
                let mut m = Map::new();
                m.insert("binary_data_size".into(), bytes.len().into());
                tail.extend_from_slice(&bytes);
                (Some(m), None)
            } else {
                (None, Some(t.json()))
            };
            ResponseOutput {
                name: t.output.name().into(),
                shape: t.shape.clone(),
                datatype: t.datatype().into(),
                parameters,
                data,
            }
        })
        .collect();
    let response = InferResponse {
        model_name: answer.model_name,
        model_version: answer.model_version,
        id: request.id,
        parameters: answer
            .parameters
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect(),
        outputs: out,
    };
    let resp = into_http(&response, tail);
    if let Some(t) = &valid.asker.trace {
        t.stage("answer", answering, Instant::now(), &[]);
    }
    resp
}

/// JSON parameters in the protocol's terms (an array, an object or null is kept
/// as a value no parameter accepts).
fn params(p: &Map<String, Value>) -> Params {
    p.iter()
        .map(|(k, v)| (k.clone(), Param::from_json(v)))
        .collect()
}

/// The request's one input, read: `image` files or the rows of an `input` tensor.
fn inputs_of(
    core: &Core,
    valid: &Valid,
    inputs: Vec<RequestInput<'_>>,
    binary: &Bytes,
) -> Result<Inputs, ApiError> {
    let limits = core.limits();
    let card = &valid.model.card;
    let input = oip::one_input(inputs, card.input_size)?;
    let bin = input_binary(&input, binary)?;
    match input.name.as_str() {
        "image" => Ok(Inputs::Files(image_elements(
            &input,
            bin,
            limits.max_images,
        )?)),
        "input" => Ok(Inputs::Rows(tensor_rows(
            &input,
            bin,
            card.input_size,
            limits.max_images,
        )?)),
        other => Err(oip::unknown_input(other, &card.name).into()),
    }
}

/// The response: JSON, or with binary outputs the JSON then their bytes
/// (`Inference-Header-Content-Length` says where the JSON ends).
fn into_http(response: &InferResponse, tail: Vec<u8>) -> Result<Response, ApiError> {
    if tail.is_empty() {
        return Ok(Json(response).into_response());
    }
    let mut body = serde_json::to_vec(response).map_err(|e| ApiError::internal(e.to_string()))?;
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
pub(crate) async fn infer_version(
    state: State<AppState>,
    p: Path<ModelPath>,
    asker: Asker,
    headers: HeaderMap,
    body: ReservedBody,
) -> Result<Response, ApiError> {
    infer(state, p, asker, headers, body).await
}
