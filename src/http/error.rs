//! `ApiError`: every error the API answers, with its status and `error_type`, in one
//! JSON shape `{"error": "...", "error_type": "..."}`. Each variant's status is
//! decided here, explicitly (no catch-all arm).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::auth::AuthError;
use crate::imaging::ImageError;
use crate::imaging::dicom::DicomError;
use crate::inference::SelectError;

pub use super::error_type::ErrorType;

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "could not decode the image: unexpected end of file", "error_type": "invalid_image"}))]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
    /// Stable machine-readable kind.
    pub error_type: ErrorType,
    /// Facts behind the refusal, where it has some (`out_of_distribution`: the image's
    /// index in the request, its score and the model's threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Every error the API answers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The DICOM upload could not be used.
    #[error(transparent)]
    Dicom(#[from] DicomError),
    /// A request that is malformed (no image, bad multipart, unknown part).
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model name.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// Unknown route.
    #[error("no route for {0}")]
    NoRoute(String),
    /// Wrong method for the route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Body larger than `--max-body-bytes`.
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    /// More images than `--max-images-per-request`.
    #[error("{0} images in one request; the limit is {1}")]
    TooManyImages(usize, usize),
    /// A content type we do not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Bad query string.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The requested operating point cannot be served by this variant.
    #[error("{0}")]
    OperatingPoint(String),
    /// The uploads being buffered already fill `--max-buffered-bytes`.
    #[error("the server is buffering its limit of {0} bytes of uploads; retry shortly")]
    BufferFull(usize),
    /// Models still loading.
    #[error("the models are still loading; retry shortly")]
    NotReady,
    /// A model's inference worker died and is being restarted.
    #[error("the inference worker of model `{0}` is restarting; retry shortly")]
    WorkerDown(String),
    /// The model's queue is full.
    #[error("model `{0}` is at capacity; retry shortly")]
    Overloaded(String),
    /// The body did not arrive within `--body-timeout-s`.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// The request took longer than `--request-timeout-s`.
    #[error("the request did not finish within {0} s")]
    Timeout(f64),
    /// An image unlike the model's training images (above its OOD threshold).
    #[error(
        "image {image} is out of distribution for model `{model}`: score {score:.3} above its threshold {threshold:.3}; it does not resemble the pediatric frontal chest radiographs the model was trained on, so it is not classified"
    )]
    OutOfDistribution {
        /// Variant.
        model: String,
        /// Index of the image in the request (0 for a single image).
        image: usize,
        /// Its score.
        score: f64,
        /// The variant's threshold.
        threshold: f64,
    },
    /// The Accept header asks for what this request cannot be answered in.
    #[error("{0}")]
    NotAcceptable(String),
    /// An explanation was asked of a model without the outputs it needs.
    #[error("{0}")]
    ExplanationUnavailable(String),
    /// A Structured Report cannot be made for this source.
    #[error("{0}")]
    SrUnavailable(String),
    /// No valid key, or a key without the route's scope.
    #[error("{}", auth_message(.0))]
    Auth(crate::http::auth::AuthError),
    /// The audit record of an answer could not be written; the answer is withheld.
    #[error("the audit record could not be written, so no answer is given; retry shortly")]
    AuditUnavailable,
    /// A server-side failure; details are only logged.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and `error_type`.
    ///
    /// Long by design: one arm per error variant and no catch-all, so that a new
    /// variant does not compile until its status is decided here, in one table.
    pub fn status_and_type(&self) -> (StatusCode, ErrorType) {
        match self {
            ApiError::Image(ImageError::Empty) => (StatusCode::BAD_REQUEST, ErrorType::EmptyImage),
            ApiError::Image(ImageError::Decode(_)) => {
                (StatusCode::BAD_REQUEST, ErrorType::InvalidImage)
            }
            ApiError::Image(ImageError::UnsupportedFormat(_)) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorType::UnsupportedMediaType,
            ),
            ApiError::Image(ImageError::ImplausibleGeometry { .. }) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::ImplausibleGeometry,
            ),
            ApiError::Image(ImageError::TooManyPixels { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorType::TooManyPixels)
            }
            ApiError::Dicom(DicomError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, ErrorType::InvalidDicom)
            }
            ApiError::Dicom(DicomError::UnsupportedTransferSyntax { .. }) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorType::UnsupportedTransferSyntax,
            ),
            ApiError::Dicom(DicomError::MissingPixelData) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::MissingPixelData,
            ),
            ApiError::Dicom(DicomError::Unprocessable(_)) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::UnsupportedDicom,
            ),
            ApiError::Dicom(DicomError::Geometry(_)) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::ImplausibleGeometry,
            ),
            ApiError::Dicom(DicomError::Content(ImageError::Colour { .. }))
            | ApiError::Image(ImageError::Colour { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::ColourImage)
            }
            ApiError::Dicom(DicomError::Content(_)) | ApiError::Image(ImageError::Blank { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::BlankImage)
            }
            ApiError::Dicom(DicomError::WrongBodyPart(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::WrongBodyPart)
            }
            ApiError::Dicom(DicomError::Lateral(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::LateralView)
            }
            ApiError::Dicom(DicomError::TooManyPixels { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorType::TooManyPixels)
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorType::InvalidRequest),
            ApiError::Select(SelectError::Unknown(_)) => {
                (StatusCode::NOT_FOUND, ErrorType::ModelNotFound)
            }
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, ErrorType::NotFound),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorType::MethodNotAllowed)
            }
            ApiError::BodyTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorType::PayloadTooLarge)
            }
            ApiError::TooManyImages(..) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorType::TooManyImages)
            }
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorType::UnsupportedMediaType,
            ),
            ApiError::InvalidQuery(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::InvalidQuery)
            }
            ApiError::OperatingPoint(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::OperatingPointUnreachable,
            ),
            ApiError::NotReady | ApiError::WorkerDown(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorType::NotReady)
            }
            ApiError::Overloaded(_) | ApiError::BufferFull(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorType::Overloaded)
            }
            ApiError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorType::Timeout),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, ErrorType::BodyTimeout),
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => {
                (StatusCode::UNAUTHORIZED, ErrorType::Unauthorized)
            }
            ApiError::Auth(AuthError::Forbidden { .. }) => {
                (StatusCode::FORBIDDEN, ErrorType::Forbidden)
            }
            ApiError::AuditUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorType::AuditUnavailable)
            }
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, ErrorType::NotAcceptable),
            ApiError::SrUnavailable(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorType::SrUnavailable)
            }
            ApiError::ExplanationUnavailable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::ExplanationUnavailable,
            ),
            ApiError::OutOfDistribution { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::OutOfDistribution,
            ),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorType::Internal),
        }
    }
}

impl From<crate::inference::InferError> for ApiError {
    fn from(e: crate::inference::InferError) -> Self {
        use crate::inference::InferError;
        match e {
            InferError::Overloaded(model) => ApiError::Overloaded(model),
            InferError::Closed(_) => ApiError::NotReady,
            e @ (InferError::Failed(_) | InferError::Dropped) => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// Seconds a client should wait before retrying (`Retry-After`), for the
    /// refusals that are about the server's state rather than the request.
    pub fn retry_after(&self) -> Option<u32> {
        match self.status_and_type().0 {
            StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }
}

/// What an error response carries (in its extensions) for the logging middleware
/// (`http::track`): handlers and extractors only return errors, one place logs them.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The status answered.
    pub status: StatusCode,
    /// Its kind.
    pub kind: ErrorType,
    /// The message answered.
    pub message: String,
    /// A server-side failure's details (logged, never answered).
    pub internal: Option<String>,
}

impl Refusal {
    /// Logs it: server-side failures at ERROR with their details, refusals at DEBUG.
    pub fn log(&self) {
        match &self.internal {
            Some(detail) => tracing::error!(detail = %detail, "internal error"),
            None => tracing::debug!(
                status = self.status.as_u16(),
                error_type = self.kind.as_str(),
                error = %self.message,
                "request refused"
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_type();
        let refusal = Refusal {
            status,
            kind,
            message: self.to_string(),
            internal: match &self {
                ApiError::Internal(detail) => Some(detail.clone()),
                _ => None,
            },
        };
        let details = match &self {
            ApiError::OutOfDistribution {
                model,
                image,
                score,
                threshold,
            } => Some(serde_json::json!({
                "model": model,
                "image": image,
                "ood_score": score,
                "threshold": threshold,
            })),
            _ => None,
        };
        let body = ErrorBody {
            error: self.to_string(),
            error_type: kind,
            details,
        };
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Auth(e) = &self {
            // RFC 6750 §3: a challenge on 401; `invalid_token` when a key was presented.
            let challenge = match e {
                AuthError::Missing => Some(r#"Bearer realm="cxr""#),
                AuthError::Invalid => Some(
                    r#"Bearer realm="cxr", error="invalid_token", error_description="unknown API key""#,
                ),
                AuthError::Forbidden { .. } => None,
            };
            if let Some(c) = challenge {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
            }
        }
        if let Some(s) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp.extensions_mut().insert(refusal);
        resp
    }
}

fn auth_message(e: &AuthError) -> String {
    match e {
        AuthError::Missing => {
            "an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
                .into()
        }
        AuthError::Invalid => "the API key is not valid".into(),
        AuthError::Forbidden { caller, scope } => format!(
            "caller `{caller}` may not use this route: its key lacks the `{}` scope",
            scope.as_str()
        ),
    }
}

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
