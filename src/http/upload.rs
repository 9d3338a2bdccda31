//! Reading uploads from HTTP: the [`Uploads`] and [`ReservedBody`] extractors read
//! a body within the buffered-bytes budget and the body timeout (a raw JPEG, PNG or
//! DICOM body, or multipart `image` parts, dispatched on Content-Type).

use crate::AppState;
use crate::http::admission::BodyReservation;
use crate::http::admission::reserve_body;
use crate::http::error::ApiError;
use crate::predict::PredictError;
use crate::predict::Upload;
use axum::body::Bytes;
use axum::extract::FromRequest;
use axum::extract::Multipart;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header;
use std::time::Instant;

/// The images of a `/predict` request: a raw body or multipart `image` parts, read
/// after reserving their bytes and within `--body-timeout-s`.
pub(crate) struct Uploads {
    /// The images, in order.
    pub(super) images: Vec<Upload>,
    /// Whether they came as multipart (several answer an array).
    pub(super) multipart: bool,
    /// The multipart text fields that name the order (`accession_number`,
    /// `patient_id`, `study_instance_uid`), as the query's parameters do.
    pub(super) fields: Vec<(String, String)>,
    /// When the body's reservation was granted (the answer's total time counts from
    /// here).
    pub(super) started: Instant,
    /// The body's bytes in the buffered-body budget, held until the answer.
    pub(super) _reserved: BodyReservation,
}

impl FromRequest<AppState> for Uploads {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (read, started, reserved) = reserved_read(state, req, read_images).await?;
        let (images, multipart, fields) = read?;
        Ok(Self {
            images,
            multipart,
            fields,
            started,
            _reserved: reserved,
        })
    }
}

/// Reserves a body's bytes, then reads it with `read` within `--body-timeout-s`
/// (408 after): what was read, when the reservation was granted, and the
/// reservation. A slow client holds only its bytes' reservation, not a processing
/// slot.
async fn reserved_read<'s, T, F>(
    state: &'s AppState,
    req: Request,
    read: impl FnOnce(&'s AppState, Request) -> F,
) -> Result<(T, Instant, BodyReservation), ApiError>
where
    F: std::future::Future<Output = T>,
{
    let reserved = reserve_body(state, &req)?;
    let started = Instant::now();
    let timeout = state.body_limits().body_timeout;
    let read = tokio::time::timeout(timeout, read(state, req))
        .await
        .map_err(|_| ApiError::BodyTimeout(timeout.as_secs()))?;
    Ok((read, started, reserved))
}

/// A whole body as bytes (the Open Inference Protocol's JSON and tensors), read
/// after reserving its bytes and within `--body-timeout-s`.
pub(crate) struct ReservedBody {
    /// The bytes.
    pub(super) bytes: Bytes,
    /// When the reservation was granted.
    pub(super) started: Instant,
    /// The body's bytes in the buffered-body budget, held until the answer.
    pub(super) _reserved: BodyReservation,
}

impl FromRequest<AppState> for ReservedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let max = state.body_limits().max_body_bytes;
        let (read, started, reserved) = reserved_read(state, req, |_, req: Request| {
            axum::body::to_bytes(req.into_body(), max)
        })
        .await?;
        Ok(Self {
            bytes: read.map_err(|_| ApiError::BodyTooLarge(max))?,
            started,
            _reserved: reserved,
        })
    }
}

/// The multipart text parts taken beside the images: the order's identifiers.
pub(super) const ORDER_FIELDS: [&str; 3] = ["accession_number", "patient_id", "study_instance_uid"];
/// Longest such part.
const MAX_FIELD_BYTES: usize = 256;

/// Reads the images of a request: a raw JPEG/PNG/DICOM body or multipart `image`
/// parts (and the order's identifiers as text parts). Returns the images, whether
/// the request was multipart, and the text parts.
#[allow(clippy::type_complexity)]
pub(super) async fn read_images(
    state: &AppState,
    req: Request,
) -> Result<(Vec<Upload>, bool, Vec<(String, String)>), ApiError> {
    let limit = state.body_limits().max_body_bytes;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    match ct.as_deref() {
        Some("multipart/form-data") => {
            let mut mp = Multipart::from_request(req, &())
                .await
                .map_err(|e| ApiError::BadRequest(e.body_text()))?;
            let mut images = Vec::new();
            let mut fields = Vec::new();
            loop {
                let field = match mp.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(multipart_error(&e, limit)),
                };
                let name = field.name().unwrap_or_default().to_string();
                if ORDER_FIELDS.contains(&name.as_str()) {
                    let bytes = field
                        .bytes()
                        .await
                        .map_err(|e| multipart_error(&e, limit))?;
                    if bytes.len() > MAX_FIELD_BYTES || fields.iter().any(|(n, _)| *n == name) {
                        return Err(ApiError::BadRequest(format!(
                            "part `{name}` must be given once, at most {MAX_FIELD_BYTES} bytes"
                        )));
                    }
                    let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                        ApiError::BadRequest(format!("part `{name}` must be UTF-8 text"))
                    })?;
                    fields.push((name, text));
                    continue;
                }
                if name != "image" {
                    return Err(ApiError::BadRequest(format!(
                        "unexpected part `{name}`; send images in parts named `image`"
                    )));
                }
                let part_ct = field.content_type().map(|c| {
                    c.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
                let kind = match part_ct.as_deref() {
                    Some(c) => check_image_type(c, true)?,
                    None => Kind::Sniff,
                };
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(&e, limit))?;
                images.push(kind.upload(bytes));
                if images.len() > state.limits().max_images {
                    return Err(PredictError::TooManyImages(
                        images.len(),
                        state.limits().max_images,
                    )
                    .into());
                }
            }
            Ok((images, true, fields))
        }
        Some(c) => {
            let kind = check_image_type(c, false)?;
            let bytes = axum::body::to_bytes(req.into_body(), limit)
                .await
                .map_err(|_| ApiError::BodyTooLarge(limit))?;
            Ok((vec![kind.upload(bytes)], false, Vec::new()))
        }
        None => Err(ApiError::UnsupportedMediaType(
            "missing Content-Type; send image/jpeg, image/png, application/dicom or multipart/form-data".into(),
        )),
    }
}

pub(super) fn multipart_error(
    e: &axum::extract::multipart::MultipartError,
    limit: usize,
) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(limit)
    } else {
        ApiError::BadRequest(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// How a declared content type routes the bytes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Encoded,
    Dicom,
    /// Undeclared or octet-stream: DICOM if it has the `DICM` magic, else JPEG/PNG.
    Sniff,
}

impl Kind {
    pub(super) fn upload(self, bytes: Bytes) -> Upload {
        match self {
            Kind::Encoded => Upload::encoded(bytes),
            Kind::Dicom => Upload::dicom(bytes),
            Kind::Sniff => Upload::sniff(bytes),
        }
    }
}

pub(super) fn check_image_type(ct: &str, in_part: bool) -> Result<Kind, ApiError> {
    match ct {
        "image/jpeg" | "image/jpg" | "image/png" => Ok(Kind::Encoded),
        "application/dicom" => Ok(Kind::Dicom),
        // Browsers and curl label files they do not know as octet-stream; the bytes
        // are sniffed.
        "application/octet-stream" if in_part => Ok(Kind::Sniff),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {other} is not supported; send image/jpeg, image/png, application/dicom or multipart/form-data"
        ))),
    }
}
