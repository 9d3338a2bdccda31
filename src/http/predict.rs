//! `POST /predict`: read the uploads (raw or multipart, within the body budget),
//! decode them (bounded blocking decodes), classify them through the model's
//! [`ServedModel::submit`], score their distance from the training images, write
//! the audit records, and answer in JSON, a heatmap PNG or DICOM Structured Reports.

use crate::AppState;
use crate::http::Asker;
use crate::http::admission::inflight_slot;
use crate::http::admission::reserve_body;
use crate::http::admission::within_request_timeout;
use crate::http::answer::Facts;
use crate::http::answer::classify;
use crate::http::answer::decision;
use crate::http::answer::refused;
use crate::http::error::ApiError;
use crate::http::error::ErrorBody;
use crate::http::types::PredictQuery;
use crate::http::types::Prediction;
use crate::http::upload::Decoded;
use crate::http::upload::SetOnDrop;
use crate::http::upload::Upload;
use crate::http::upload::decode_upload;
use crate::http::upload::kilo;
use crate::http::upload::read_images;
use crate::imaging::Preprocessor;
use crate::imaging::dicom::DicomOptions;
use crate::inference::ServedModel;
use axum::Json;
use axum::extract::Query;
use axum::extract::Request;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;

/// Multipart upload of one or more images.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PredictUpload {
    /// One or more X-ray images (JPEG, PNG or DICOM), each in a part named `image`.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
}

/// Classify one or more chest X-rays.
///
/// Send a raw body (`Content-Type: image/jpeg`, `image/png` or `application/dicom`) or
/// `multipart/form-data` with one or more parts named `image` (parts typed
/// `application/octet-stream` are sniffed: DICOM by its `DICM` magic). One image
/// answers one object; several multipart images answer an array in the same order.
/// A DICOM answer echoes the study, series and instance UIDs (never a patient
/// attribute) and may carry `warnings` (lateral view, multi-frame).
#[utoipa::path(
    post,
    path = "/predict",
    tag = "inference",
    params(PredictQuery),
    security((), ("bearer" = []), ("api_key" = [])),
    request_body(
        description = "The X-ray(s)",
        content(
            ("image/jpeg"),
            ("image/png"),
            ("application/dicom"),
            (PredictUpload = "multipart/form-data")
        )
    ),
    responses(
        (status = 200, description = "The prediction (an array for several multipart images); with `Accept: application/dicom` and DICOM uploads, a DICOM Comprehensive 3D SR (TID 1500) per image: one application/dicom body, or multipart/related; type=\"application/dicom\" for several",
            content((Prediction = "application/json"), ("application/dicom"), ("multipart/related"))),
        (status = 406, description = "Accept: application/dicom (a Structured Report) for an upload that is not DICOM", body = ErrorBody,
            example = json!({"error": "a DICOM Structured Report (Accept: application/dicom) answers DICOM uploads only; send application/dicom or accept application/json", "error_type": "not_acceptable"})),
        (status = 400, description = "Empty, undecodable, cut short or malformed upload (JPEG, PNG or DICOM)", body = ErrorBody,
            example = json!({"error": "could not decode the image: unexpected end of file", "error_type": "invalid_image"})),
        (status = 401, description = "API keys are required (--api-keys-file) and none or an unknown one was sent (with WWW-Authenticate)", body = ErrorBody,
            example = json!({"error": "the API key is not valid", "error_type": "unauthorized"})),
        (status = 403, description = "The key's caller lacks the `predict` scope", body = ErrorBody,
            example = json!({"error": "caller `dashboard` may not use this route: its key lacks the `predict` scope", "error_type": "forbidden"})),
        (status = 408, description = "The body did not arrive within --body-timeout-s", body = ErrorBody,
            example = json!({"error": "the request body did not arrive within 30 s", "error_type": "body_timeout"})),
        (status = 404, description = "Unknown model", body = ErrorBody,
            example = json!({"error": "unknown model `x`; GET /models lists the variants", "error_type": "model_not_found"})),
        (status = 413, description = "Body, pixel count or image count over the limit", body = ErrorBody,
            example = json!({"error": "image of 60000x60000 pixels exceeds the limit of 40000000 pixels", "error_type": "too_many_pixels"})),
        (status = 415, description = "Unsupported content type, image format or DICOM transfer syntax", body = ErrorBody,
            example = json!({"error": "Content-Type text/plain is not supported; send image/jpeg, image/png or multipart/form-data", "error_type": "unsupported_media_type"})),
        (status = 422, description = "Invalid query; an operating point no threshold reached on validation (operating_point_unreachable); an input that is not a chest radiograph: a geometry no radiograph has (implausible_geometry), blank or saturated (blank_image), a colour photo (colour_image), a DICOM of another body part (wrong_body_part) or a lateral view (lateral_view), or an image whose out-of-distribution score is above the model's threshold (out_of_distribution, with details); a DICOM object that is not a classifiable radiograph (modality, samples per pixel, missing pixel data); a heatmap asked of a model without cam (explanation_unavailable)", body = ErrorBody,
            example = json!({"error": "invalid query: unknown variant `speed`, expected `sensitivity` or `specificity`", "error_type": "invalid_query"})),
        (status = 503, description = "Not ready, overloaded, timed out, or the audit record could not be written (audit_unavailable); with Retry-After", body = ErrorBody,
            example = json!({"error": "model `weighted` is at capacity; retry shortly", "error_type": "overloaded"}))
    )
)]
pub(super) async fn predict(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let _reserved = reserve_body(&state, &req)?;
    let started = Instant::now();
    let asker = Asker::of(&req);
    let accept = accept_header(req.headers());
    let q: PredictQuery = match req.uri().query() {
        None => PredictQuery::default(),
        Some(_) => {
            Query::<PredictQuery>::try_from_uri(req.uri())
                .map_err(|e| ApiError::InvalidQuery(e.body_text()))?
                .0
        }
    };
    // The body first, under its own deadline: a slow client holds only its bytes'
    // reservation, not a processing slot.
    let (images, multipart) = tokio::time::timeout(limits.body_timeout, read_images(&state, req))
        .await
        .map_err(|_| ApiError::BodyTimeout(limits.body_timeout.as_secs()))??;
    let _permit = inflight_slot(&state)?;
    let input = Input {
        started,
        asker,
        accept,
        q,
        images,
        multipart,
    };
    within_request_timeout(&state, predict_inner(&state, input)).await
}

/// A `/predict` request whose body has been read.
pub(super) struct Input {
    pub(super) started: Instant,
    pub(super) asker: Asker,
    /// The Accept header (`application/dicom`: answer Structured Reports;
    /// `image/png`: answer the heatmap overlay).
    pub(super) accept: Option<String>,
    pub(super) q: PredictQuery,
    pub(super) images: Vec<Upload>,
    pub(super) multipart: bool,
}

pub(super) async fn predict_inner(state: &AppState, input: Input) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let Input {
        started,
        asker,
        accept,
        q,
        images,
        multipart,
    } = input;
    let wants_sr = accepts(accept.as_deref(), "application/dicom");
    let wants_png = accepts(accept.as_deref(), "image/png");
    if q.model.is_some() && q.prefer.is_some() {
        return Err(ApiError::InvalidQuery(
            "give `model` or `prefer`, not both".into(),
        ));
    }
    let models = state.models().ok_or(ApiError::NotReady)?;
    let model = models.select(q.model.as_deref(), q.prefer)?.clone();
    let decision = decision(&model, &q)?;
    if images.is_empty() {
        return Err(ApiError::BadRequest(
            "no image: send a JPEG/PNG body or multipart parts named `image`".into(),
        ));
    }
    if images.len() > limits.max_images {
        return Err(ApiError::TooManyImages(images.len(), limits.max_images));
    }

    if wants_sr && images.iter().any(|u| !matches!(u, Upload::Dicom(_))) {
        return Err(ApiError::NotAcceptable(
            "a DICOM Structured Report (Accept: application/dicom) answers DICOM uploads only; send application/dicom or accept application/json".into(),
        ));
    }
    // Kept (shared bytes) for the audit record of a refusal.
    let uploads = images.clone();
    let mut decoded = match decode_all(state, &model, images).await {
        Ok(d) => d,
        Err(e) => {
            let facts: Vec<Facts> = uploads.iter().map(Facts::of_upload).collect();
            return Err(refused(state, &model, &decision, &facts, &asker, e, None).await);
        }
    };
    drop(uploads);
    let sources: Vec<_> = decoded
        .iter_mut()
        .map(|d| d.sr.take().unwrap_or_default())
        .collect();
    let explain = q.explain.is_some() || wants_png;
    if wants_png && (multipart && decoded.len() > 1) {
        return Err(ApiError::NotAcceptable(
            "Accept: image/png answers one image with its heatmap overlay; send one image or accept application/json".into(),
        ));
    }
    let predictions = classify(state, &model, &decision, decoded, &asker, started, explain).await?;
    if wants_png {
        let Some(h) = predictions.first().and_then(|p| p.heatmap.as_ref()) else {
            return Err(ApiError::ExplanationUnavailable(format!(
                "model `{}` {} has no `cam` output, so no heatmap can be drawn",
                model.card.name, model.card.version
            )));
        };
        let png =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &h.overlay_png)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response());
    }
    if wants_sr {
        return structured_reports(state, &model, &sources, &predictions, multipart);
    }
    Ok(if multipart && predictions.len() > 1 {
        Json(predictions).into_response()
    } else {
        Json(predictions.into_iter().next().expect("at least one image")).into_response()
    })
}

/// Decodes uploads on the blocking pool: a bounded number of requests decode at once,
/// each reserving its images' declared pixels first.
pub(super) async fn decode_all(
    state: &AppState,
    model: &ServedModel,
    images: Vec<Upload>,
) -> Result<Vec<Decoded>, ApiError> {
    let limits = &state.inner.limits;
    // Decode on the blocking pool, a bounded number at a time.
    let permit = state
        .inner
        .decode_permits
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // Reserve the pixels to decode (from the headers), bounded like the bodies.
    let pixels: u64 = images
        .iter()
        .map(|u| match u {
            Upload::Encoded(b) => crate::imaging::declared_pixels(b)
                .unwrap_or(0)
                .min(limits.max_pixels),
            Upload::Dicom(_) => limits.max_pixels,
        })
        .sum();
    // Decodes wait for their pixels (within the request's timeout): the body is
    // already in, and a burst of large images is slowed, not refused.
    let _pixels = state
        .inner
        .pixel_budget
        .acquire_many(kilo(pixels.min(limits.max_decode_pixels)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let pre: Preprocessor = model.preprocessor.clone();
    let max_pixels = limits.max_pixels;
    let dicom_opts = DicomOptions {
        geometry: limits.geometry,
        ..limits.dicom
    };
    // If this request goes (client gone, timed out), the images not yet decoded are
    // not decoded.
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _on_drop = SetOnDrop(gone.clone());
    // On their way to the model's queue: a batch that is not full waits for them.
    let arrivals: Vec<_> = images.iter().map(|_| model.announce()).collect();
    let mut decoded = tokio::task::spawn_blocking(move || {
        images
            .iter()
            .map(|u| {
                if gone.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ApiError::Timeout(0.0));
                }
                decode_upload(&pre, u, max_pixels, dicom_opts)
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    // A panic's message may quote the upload's content (a DICOM value): never pass
    // it on; the panic hook logged where it happened.
    .map_err(|_| ApiError::Internal("the image decoder failed".into()))??;
    drop(permit);
    for (d, a) in decoded.iter_mut().zip(arrivals) {
        d.arrival = Some(a);
    }
    let name = &model.card.name;
    for d in &decoded {
        state
            .metrics()
            .decode_duration
            .with_label_values(&[name])
            .observe(d.took.as_secs_f64());
    }
    Ok(decoded)
}

/// The Accept header's values, joined.
pub(super) fn accept_header(headers: &HeaderMap) -> Option<String> {
    let v: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!v.is_empty()).then(|| v.join(","))
}

/// Whether an Accept value names `media` exactly (not by a wildcard) with a non-zero q.
pub(super) fn accepts(accept: Option<&str>, media: &str) -> bool {
    accept.into_iter().flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';');
        let m = parts.next().unwrap_or("").trim();
        let q_zero = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        m.eq_ignore_ascii_case(media) && !q_zero
    })
}

/// The answers as DICOM Structured Reports: one `application/dicom` body, or a
/// `multipart/related; type="application/dicom"` body of one SR per image.
pub(super) fn structured_reports(
    state: &AppState,
    model: &ServedModel,
    sources: &[crate::imaging::sr::SrSource],
    predictions: &[Prediction],
    multipart: bool,
) -> Result<Response, ApiError> {
    use crate::imaging::sr::{SrResult, build_sr};
    let card = &model.card;
    let mut files = Vec::with_capacity(predictions.len());
    for (src, p) in sources.iter().zip(predictions) {
        let result = SrResult {
            variant: &card.name,
            version: &card.version,
            model_sha256: &card.onnx.sha256,
            probability: f64::from(p.probabilities.PNEUMONIA),
            threshold: p.threshold,
            pneumonia: p.label == "PNEUMONIA",
        };
        files.push(
            build_sr(src, &result, state.inner.uid_root.as_deref())
                .map_err(|e| ApiError::SrUnavailable(e.to_string()))?,
        );
    }
    if !(multipart && files.len() > 1) {
        let body = files.pop().expect("at least one image");
        return Ok(([(header::CONTENT_TYPE, "application/dicom")], body).into_response());
    }
    let boundary = format!("cxr-sr-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for f in &files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    Ok(([(header::CONTENT_TYPE, ct)], body).into_response())
}
