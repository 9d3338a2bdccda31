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

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "could not decode the image: unexpected end of file", "error_type": "invalid_image"}))]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
    /// Stable machine-readable kind.
    pub error_type: String,
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
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Image(ImageError::Empty) => (StatusCode::BAD_REQUEST, "empty_image"),
            ApiError::Image(ImageError::Decode(_)) => (StatusCode::BAD_REQUEST, "invalid_image"),
            ApiError::Image(ImageError::UnsupportedFormat(_)) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Image(ImageError::ImplausibleGeometry { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "implausible_geometry")
            }
            ApiError::Image(ImageError::TooManyPixels { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")
            }
            ApiError::Dicom(DicomError::Malformed(_)) => (StatusCode::BAD_REQUEST, "invalid_dicom"),
            ApiError::Dicom(DicomError::UnsupportedTransferSyntax { .. }) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_transfer_syntax",
            ),
            ApiError::Dicom(DicomError::MissingPixelData) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "missing_pixel_data")
            }
            ApiError::Dicom(DicomError::Unprocessable(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_dicom")
            }
            ApiError::Dicom(DicomError::Geometry(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "implausible_geometry")
            }
            ApiError::Dicom(DicomError::Content(ImageError::Colour { .. }))
            | ApiError::Image(ImageError::Colour { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "colour_image")
            }
            ApiError::Dicom(DicomError::Content(_)) | ApiError::Image(ImageError::Blank { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "blank_image")
            }
            ApiError::Dicom(DicomError::WrongBodyPart(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "wrong_body_part")
            }
            ApiError::Dicom(DicomError::Lateral(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "lateral_view")
            }
            ApiError::Dicom(DicomError::TooManyPixels { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Select(SelectError::Unknown(_)) => (StatusCode::NOT_FOUND, "model_not_found"),
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::TooManyImages(..) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_images"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::InvalidQuery(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_query"),
            ApiError::OperatingPoint(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "operating_point_unreachable",
            ),
            ApiError::NotReady | ApiError::WorkerDown(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
            }
            ApiError::Overloaded(_) | ApiError::BufferFull(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            ApiError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            ApiError::Auth(AuthError::Forbidden { .. }) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::AuditUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
            ApiError::SrUnavailable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "sr_unavailable"),
            ApiError::ExplanationUnavailable(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "explanation_unavailable")
            }
            ApiError::OutOfDistribution { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "out_of_distribution")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_type();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(detail = %detail, "internal error");
        } else {
            tracing::debug!(status = status.as_u16(), error_type = kind, error = %self, "request refused");
        }
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
            error_type: kind.into(),
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
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
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
