//! The HTTP door's errors: [`ApiError`], the core's refusals ([`PredictError`]) and
//! the door's own (routes, bodies, content types, keys, the query string, `Accept`),
//! answered with a status (one per [`ErrorType`], decided here in one table) and one
//! JSON shape `{"error": "...", "error_type": "..."}`, with `WWW-Authenticate` and
//! `Retry-After` where they apply.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::AuthError;
pub use crate::error_type::ErrorType;
pub use crate::predict::PredictError;

/// Every error the HTTP door answers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The core's.
    #[error(transparent)]
    Core(#[from] PredictError),
    /// No valid key, or a key without the route's scope.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Unknown route.
    #[error("no route for {0}")]
    NoRoute(String),
    /// Wrong method for the route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Body larger than `--max-body-bytes`.
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    /// The body did not arrive within `--body-timeout-s`.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// A content type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A query string that cannot be read.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The Accept header asks for what this request cannot be answered in.
    #[error("{0}")]
    NotAcceptable(String),
    /// A body that cannot be read as the route's (bad multipart, unknown part,
    /// invalid JSON).
    #[error("{0}")]
    BadRequest(String),
}

impl From<crate::inference::SelectError> for ApiError {
    fn from(e: crate::inference::SelectError) -> Self {
        ApiError::Core(e.into())
    }
}

impl ApiError {
    /// A server-side failure (the core's `internal`; details only logged).
    pub fn internal(detail: impl ToString) -> Self {
        ApiError::Core(PredictError::Internal(detail.to_string()))
    }

    /// The `error_type`: the core's, or the door's own (one arm per variant).
    pub fn error_type(&self) -> ErrorType {
        match self {
            ApiError::Core(e) => e.error_type(),
            ApiError::Auth(e) => e.error_type(),
            ApiError::NoRoute(_) => ErrorType::NotFound,
            ApiError::MethodNotAllowed => ErrorType::MethodNotAllowed,
            ApiError::BodyTooLarge(_) => ErrorType::PayloadTooLarge,
            ApiError::BodyTimeout(_) => ErrorType::BodyTimeout,
            ApiError::UnsupportedMediaType(_) => ErrorType::UnsupportedMediaType,
            ApiError::InvalidQuery(_) => ErrorType::InvalidQuery,
            ApiError::NotAcceptable(_) => ErrorType::NotAcceptable,
            ApiError::BadRequest(_) => ErrorType::InvalidRequest,
        }
    }

    /// Seconds a client should wait before retrying (`Retry-After`), for the
    /// refusals about the server's state.
    pub fn retry_after(&self) -> Option<u32> {
        self.error_type().retry_after()
    }
}

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
                ApiError::Core(PredictError::Internal(detail)) => Some(detail.clone()),
                _ => None,
            },
        };
        let details = match &self {
            ApiError::Core(e) => e.details(),
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

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
