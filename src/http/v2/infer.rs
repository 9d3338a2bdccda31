//! `POST /v2/models/{name}[/versions/{version}]/infer`.

use crate::http::ApiError;
use crate::http::AppState;
use crate::http::Prediction;
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
use crate::predict::Answered;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::Upload;
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
    let valid = core.validate_for(asker, model, &ask_of(&request.parameters)?, started)?;
    let model = &valid.model;
    let outputs = selected_outputs(&request)?;
    if outputs.iter().any(|(n, _)| *n == "ood_score")
        && (model.ood.is_none() || core.limits().ood_action == crate::ood_score::OodAction::Off)
    {
        return Err(ApiError::BadRequest(format!(
            "output `ood_score`: model `{}` has no out-of-distribution model, or the server runs with --ood-action off",
            model.card.name
        )));
    }

    let answered = answer_input(core, &valid, request.inputs.0, &binary).await?;
    let answering = Instant::now();

    let (out, tail) = response_outputs(&answered.predictions, outputs);
    let mut parameters = Map::new();
    let decision = &valid.decision;
    parameters.insert("threshold".into(), decision.threshold.into());
    parameters.insert(
        "threshold_source".into(),
        decision.source.kind.clone().into(),
    );
    parameters.insert("request_id".into(), valid.asker.request_id.clone().into());
    if let Some(client) = &valid.asker.client_request_id {
        parameters.insert("client_request_id".into(), client.clone().into());
    }
    parameters.insert("execution_provider".into(), model.provider.as_str().into());
    let response = InferResponse {
        model_name: model.card.name.clone(),
        model_version: model.card.version.clone(),
        id: request.id,
        parameters,
        outputs: out,
    };
    let resp = into_http(&response, tail);
    if let Some(t) = &valid.asker.trace {
        t.stage("answer", answering, Instant::now(), &[]);
    }
    resp
}

/// What the request's `threshold` and `operating_point` parameters ask (as
/// `/predict`'s query).
fn ask_of(parameters: &Map<String, Value>) -> Result<Ask, ApiError> {
    Ok(Ask {
        threshold: match parameters.get("threshold") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                ApiError::BadRequest("parameter `threshold` must be a number".into())
            })?),
        },
        operating_point: match parameters.get("operating_point") {
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
        ..Ask::default()
    })
}

/// The request's one input, answered: `image` files as `/predict` answers them, or
/// the rows of an `input` tensor.
async fn answer_input(
    core: &Core,
    valid: &Valid,
    inputs: Vec<RequestInput<'_>>,
    binary: &Bytes,
) -> Result<Answered, ApiError> {
    let limits = core.limits();
    let model = &valid.model;
    let [input] = <[RequestInput<'_>; 1]>::try_from(inputs).map_err(|inputs| {
        ApiError::BadRequest(format!(
            "{} inputs; send exactly one: `image` (BYTES, encoded files) or `input` (FP32 [N, 3, {s}, {s}])",
            inputs.len(),
            s = model.card.input_size
        ))
    })?;
    let bin = input_binary(&input, binary)?;
    match input.name.as_str() {
        "image" => {
            let files = image_elements(&input, bin, limits.max_images)?;
            let uploads: Vec<Upload> = files.into_iter().map(Upload::sniff).collect();
            core.answer_files(valid, uploads).await
        }
        "input" => {
            let rows = tensor_rows(&input, bin, model.card.input_size, limits.max_images)?;
            core.answer_decoded(valid, rows).await
        }
        other => Err(ApiError::BadRequest(format!(
            "unknown input `{other}`; model `{}` takes `image` (BYTES) or `input` (FP32)",
            model.card.name
        ))),
    }
}

/// The asked outputs of `predictions`, and the bytes of those asked as binary (in
/// order, after the JSON).
fn response_outputs(
    predictions: &[Prediction],
    outputs: Vec<(&'static str, bool)>,
) -> (Vec<ResponseOutput>, Vec<u8>) {
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
    (out, tail)
}

/// The response: JSON, or with binary outputs the JSON then their bytes
/// (`Inference-Header-Content-Length` says where the JSON ends).
fn into_http(response: &InferResponse, tail: Vec<u8>) -> Result<Response, ApiError> {
    if tail.is_empty() {
        return Ok(Json(response).into_response());
    }
    let mut body = serde_json::to_vec(response).map_err(|e| ApiError::Internal(e.to_string()))?;
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
fn selected_outputs(r: &InferRequest<'_>) -> Result<Vec<(&'static str, bool)>, ApiError> {
    let all_binary = match r.parameters.get("binary_data_output") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            ApiError::BadRequest("parameter `binary_data_output` must be a boolean".into())
        })?,
    };
    let Some(asked) = &r.outputs else {
        return Ok(vec![("probabilities", all_binary), ("label", all_binary)]);
    };
    let mut out = Vec::with_capacity(asked.0.len());
    for o in &asked.0 {
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
