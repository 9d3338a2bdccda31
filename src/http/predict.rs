//! `POST /predict`: a thin door onto the prediction core. The extractors read who
//! asked ([`Asker`]), the query and the uploads (raw or multipart, within the body
//! budget); the core validates, decodes, classifies, scores, decides and records;
//! this file turns the answers into JSON, a heatmap PNG or DICOM Structured Reports.

use crate::AppState;
use crate::delivery::Kind;
use crate::http::error::ApiError;
use crate::http::error::ErrorBody;
use crate::http::types::OrderIds;
use crate::http::types::PredictQuery;
use crate::http::types::Prediction;
use crate::http::upload::Uploads;
use crate::inference::ServedModel;
use crate::predict::Answers;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::FilingOrder;
use crate::predict::Identity;
use crate::predict::Upload;
use axum::Json;
use axum::extract::FromRequestParts;
use axum::extract::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::response::Response;

/// Multipart upload of one or more images.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PredictUpload {
    /// One or more X-ray images (JPEG, PNG or DICOM), each in a part named `image`.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
    /// The order's accession number (as the query parameter: the answer is
    /// delivered to the RIS and the EHR with `patient_id`).
    accession_number: Option<String>,
    /// The patient's identifier (as the query parameter).
    patient_id: Option<String>,
    /// The study's instance UID (as the query parameter).
    study_instance_uid: Option<String>,
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
            example = json!({"error": "unknown model `x` (served: augmented, weighted)", "error_type": "model_not_found"})),
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
    asker: Asker,
    headers: HeaderMap,
    q: PredictQuery,
    uploads: Uploads,
) -> Result<Response, ApiError> {
    let core = state.core();
    let trace = asker.trace.clone();
    let body_read = std::time::Instant::now();
    let _slot = core.slot()?;
    let started = uploads.started;
    if let Some(t) = &trace {
        // Admission: from arrival to the body (keys, the body budget), and the
        // processing slot after it; then the body.
        t.stage("admission", t.started(), started, &[]);
        t.stage("body", started, body_read, &[]);
    }
    let q = q.with_fields(&uploads.fields)?;
    let order = q.order_ids()?;
    let answer = core.within_timeout(async {
        let accept = accept_header(&headers);
        let wants_sr = accepts(accept.as_deref(), "application/dicom");
        let wants_png = accepts(accept.as_deref(), "image/png");
        let ask = Ask {
            explain: q.explain.is_some() || wants_png,
            ..q.into_ask()
        };
        let valid = core.validate(asker, &ask, started)?;
        let Uploads {
            images, multipart, ..
        } = uploads;
        if wants_sr && images.iter().any(|u| !u.is_dicom()) {
            return Err(ApiError::NotAcceptable(
                "a DICOM Structured Report (Accept: application/dicom) answers DICOM uploads only; send application/dicom or accept application/json".into(),
            ));
        }
        if wants_png && (multipart && images.len() > 1) {
            return Err(ApiError::NotAcceptable(
                "Accept: image/png answers one image with its heatmap overlay; send one image or accept application/json".into(),
            ));
        }
        let filing = match (&order, state.delivery()) {
            (Some(order), Some(d)) if d.has(Kind::Hl7) || d.has(Kind::Fhir) => {
                Some(Filing::new(core, d, order, &images).await?)
            }
            _ => None,
        };
        let answered = core.answer_files(&valid, images).await;
        if let Some(f) = filing {
            let outcome = match &answered {
                Ok(a) => Some(Ok(&a.predictions[0])),
                Err(e) if e.error_type().is_image_refusal() => Some(Err(e)),
                Err(_) => None,
            };
            if let Some(outcome) = outcome {
                f.file(core, &valid, outcome).await;
            }
        }
        let answered = answered?;
        let answering = std::time::Instant::now();
        let model = &valid.model;
        if wants_png {
            // Core::validate refused a model without `cam` before classifying.
            let Some(h) = answered.predictions.first().and_then(|p| p.heatmap.as_ref()) else {
                return Err(ApiError::internal("an explained answer without its heatmap"));
            };
            let png = crate::predict::explain::png(&h.overlay);
            return Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response());
        }
        if wants_sr {
            return structured_reports(core, model, &answered, multipart);
        }
        let predictions = answered.predictions;
        let resp = if multipart && predictions.len() > 1 {
            Json(predictions).into_response()
        } else {
            Json(predictions.into_iter().next().expect("at least one image")).into_response()
        };
        if let Some(t) = &trace {
            t.stage("answer", answering, std::time::Instant::now(), &[]);
        }
        Ok(resp)
    });
    answer.await
}

/// One `/predict` answer to deliver: the order's identifiers, the image's filing
/// identity (made by the core; with its DICOM source), the outbox.
struct Filing {
    delivery: std::sync::Arc<crate::delivery::Delivery>,
    order: OrderIds,
    identity: Identity,
}

impl Filing {
    async fn new(
        core: &Core,
        delivery: std::sync::Arc<crate::delivery::Delivery>,
        order: &OrderIds,
        images: &[Upload],
    ) -> Result<Self, ApiError> {
        let [image] = images else {
            return Err(ApiError::InvalidQuery(
                "accession_number and patient_id deliver the answer of one image; send one image per request".into(),
            ));
        };
        let filing_order = FilingOrder {
            accession_number: &order.accession_number,
            patient_id: &order.patient_id,
            study_instance_uid: order.study_instance_uid.as_deref(),
        };
        let identity = core.identify(image, Some(&filing_order)).await?;
        Ok(Self {
            delivery,
            order: order.clone(),
            identity,
        })
    }

    /// Queues the result for the report channels (a failure is logged: the
    /// caller's answer stands).
    async fn file(
        self,
        core: &Core,
        valid: &crate::predict::Valid,
        outcome: Result<&Prediction, &crate::predict::PredictError>,
    ) {
        let key = core.filing_key(valid, &self.identity);
        let mut facts = crate::delivery::report_facts(
            valid,
            outcome,
            self.identity.source(),
            &key,
            self.delivery.urgent_at(),
        );
        // The caller's patient: the upload's demographics only when they are of
        // the same patient ID (never one patient's name under another's ID).
        if facts.patient.id.as_deref() != Some(self.order.patient_id.as_str()) {
            facts.patient = crate::delivery::Patient {
                id: Some(self.order.patient_id.clone()),
                ..crate::delivery::Patient::default()
            };
        }
        facts.order.accession_number = Some(self.order.accession_number.clone());
        if let Some(uid) = &self.order.study_instance_uid {
            facts.study.study_instance_uid = Some(uid.clone());
        }
        let d = self.delivery;
        let queued = tokio::task::spawn_blocking(move || d.file(&key, &[], Some(&facts))).await;
        match queued {
            Ok(Ok(n)) => tracing::info!(queued = n, "answer queued for delivery"),
            Ok(Err(e)) => tracing::error!(error = %e, "answer not queued for delivery"),
            Err(e) => tracing::error!(error = %e, "answer not queued for delivery"),
        }
    }
}

/// The query of `/predict`, read from the URI (422 `invalid_query` when malformed).
impl<S: Send + Sync> FromRequestParts<S> for PredictQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.uri.query() {
            None => Ok(PredictQuery::default()),
            Some(_) => Ok(Query::<PredictQuery>::try_from_uri(&parts.uri)
                .map_err(|e| ApiError::InvalidQuery(e.body_text()))?
                .0),
        }
    }
}

impl PredictQuery {
    /// The order's identifiers given as multipart text parts, added to the query's
    /// (the same identifier in both: 422).
    pub(super) fn with_fields(mut self, fields: &[(String, String)]) -> Result<Self, ApiError> {
        for (name, value) in fields {
            let slot = match name.as_str() {
                "accession_number" => &mut self.accession_number,
                "patient_id" => &mut self.patient_id,
                _ => &mut self.study_instance_uid,
            };
            if slot.is_some() {
                return Err(ApiError::InvalidQuery(format!(
                    "`{name}` given both in the query and as a multipart part"
                )));
            }
            *slot = Some(value.clone());
        }
        Ok(self)
    }

    /// The order's identifiers, when the caller gave them (`accession_number` and
    /// `patient_id` both, or neither; `study_instance_uid` optional): each 1 to 64
    /// printable characters (a UID: digits and dots).
    pub(super) fn order_ids(&self) -> Result<Option<OrderIds>, ApiError> {
        let check = |name: &str, v: &str| {
            if v.is_empty() || v.chars().count() > 64 || v.chars().any(char::is_control) {
                return Err(ApiError::InvalidQuery(format!(
                    "{name} must be 1 to 64 printable characters"
                )));
            }
            Ok(v.to_string())
        };
        match (&self.accession_number, &self.patient_id) {
            (None, None) if self.study_instance_uid.is_none() => Ok(None),
            (Some(a), Some(p)) => {
                let study = match &self.study_instance_uid {
                    Some(u) if u.is_empty() || u.len() > 64 || !u.chars().all(|c| c.is_ascii_digit() || c == '.') => {
                        return Err(ApiError::InvalidQuery(
                            "study_instance_uid must be a DICOM UID (digits and dots, at most 64)".into(),
                        ));
                    }
                    other => other.clone(),
                };
                Ok(Some(OrderIds {
                    accession_number: check("accession_number", a)?,
                    patient_id: check("patient_id", p)?,
                    study_instance_uid: study,
                }))
            }
            _ => Err(ApiError::InvalidQuery(
                "give accession_number and patient_id together (and study_instance_uid if known) for the answer to be delivered".into(),
            )),
        }
    }

    /// What the query asks of the core.
    pub(super) fn into_ask(self) -> Ask {
        Ask {
            model: self.model,
            prefer: self.prefer,
            threshold: self.threshold,
            operating_point: self.operating_point,
            explain: self.explain.is_some(),
        }
    }
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
    core: &Core,
    model: &ServedModel,
    answered: &Answers,
    multipart: bool,
) -> Result<Response, ApiError> {
    let mut files = Vec::with_capacity(answered.predictions.len());
    for (src, p) in answered.sources.iter().zip(&answered.predictions) {
        files.push(core.structured_report(model, src, p)?);
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
