//! How the HTTP doors answer an [`ApiError`]: its status (one per
//! [`ErrorType`], decided here in one table) and one JSON shape `{"error": "...",
//! "error_type": "..."}`, with `WWW-Authenticate` and `Retry-After` where they apply.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::AuthError;
pub use crate::predict::ApiError;
pub use crate::predict::ErrorType;

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

/// The HTTP status of each error type.
///
/// One arm per type and no catch-all: a new type does not compile until its status
/// is decided here.
pub fn status(kind: ErrorType) -> StatusCode {
    match kind {
        ErrorType::EmptyImage
        | ErrorType::InvalidImage
        | ErrorType::InvalidDicom
        | ErrorType::InvalidRequest
        | ErrorType::RepositoryRefused => StatusCode::BAD_REQUEST,
        ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorType::Forbidden => StatusCode::FORBIDDEN,
        ErrorType::ModelNotFound | ErrorType::NotFound | ErrorType::UnknownRequest => {
            StatusCode::NOT_FOUND
        }
        ErrorType::FeedbackConflict => StatusCode::CONFLICT,
        ErrorType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorType::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
        ErrorType::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorType::TooManyPixels | ErrorType::PayloadTooLarge | ErrorType::TooManyImages => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        ErrorType::UnsupportedMediaType | ErrorType::UnsupportedTransferSyntax => {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        ErrorType::ImplausibleGeometry
        | ErrorType::MissingPixelData
        | ErrorType::UnsupportedDicom
        | ErrorType::OperatingPointUnreachable
        | ErrorType::ColourImage
        | ErrorType::BlankImage
        | ErrorType::WrongBodyPart
        | ErrorType::LateralView
        | ErrorType::InvalidQuery
        | ErrorType::SrUnavailable
        | ErrorType::ExplanationUnavailable
        | ErrorType::OutOfDistribution => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorType::NotReady
        | ErrorType::Overloaded
        | ErrorType::Timeout
        | ErrorType::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorType::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error's HTTP status and type.
pub fn status_and_type(e: &ApiError) -> (StatusCode, ErrorType) {
    let kind = e.error_type();
    (status(kind), kind)
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
        let (status, kind) = status_and_type(&self);
        let refusal = Refusal {
            status,
            kind,
            message: self.to_string(),
            internal: match &self {
                ApiError::Internal(detail) => Some(detail.clone()),
                _ => None,
            },
        };
        let details = self.details();
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

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
