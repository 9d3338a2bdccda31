//! The `error_type` of every refusal, at every door: stable, machine-readable names
//! (a leaf: the core's errors and each door's own refusals map to them).

use serde::Serialize;
use utoipa::ToSchema;

/// Every `error_type` the API answers with (listed in `openapi.yaml`): stable,
/// machine-readable, one per kind of refusal; each door decides its status for each
/// once (HTTP: `http::error::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// `empty_image`.
    EmptyImage,
    /// `invalid_image`.
    InvalidImage,
    /// `unsupported_media_type`.
    UnsupportedMediaType,
    /// `implausible_geometry`.
    ImplausibleGeometry,
    /// `too_many_pixels`.
    TooManyPixels,
    /// `invalid_dicom`.
    InvalidDicom,
    /// `missing_pixel_data`.
    MissingPixelData,
    /// `unsupported_dicom`.
    UnsupportedDicom,
    /// `unsupported_transfer_syntax`.
    UnsupportedTransferSyntax,
    /// `operating_point_unreachable`.
    OperatingPointUnreachable,
    /// `colour_image`.
    ColourImage,
    /// `blank_image`.
    BlankImage,
    /// `wrong_body_part`.
    WrongBodyPart,
    /// `lateral_view`.
    LateralView,
    /// `invalid_request`.
    InvalidRequest,
    /// `model_not_found`.
    ModelNotFound,
    /// `not_found`.
    NotFound,
    /// `method_not_allowed`.
    MethodNotAllowed,
    /// `payload_too_large`.
    PayloadTooLarge,
    /// `too_many_images`.
    TooManyImages,
    /// `invalid_query`.
    InvalidQuery,
    /// `not_ready`.
    NotReady,
    /// `overloaded`.
    Overloaded,
    /// `timeout`.
    Timeout,
    /// `body_timeout`.
    BodyTimeout,
    /// `unauthorized`.
    Unauthorized,
    /// `forbidden`.
    Forbidden,
    /// `audit_unavailable`.
    AuditUnavailable,
    /// `unknown_request`: `POST /feedback` names no answered image.
    UnknownRequest,
    /// `feedback_conflict`: another label was already confirmed for the image.
    FeedbackConflict,
    /// `repository_refused`: a model repository load or unload refused; what was
    /// serving stays.
    RepositoryRefused,
    /// `not_acceptable`.
    NotAcceptable,
    /// `sr_unavailable`.
    SrUnavailable,
    /// `explanation_unavailable`.
    ExplanationUnavailable,
    /// `out_of_distribution`.
    OutOfDistribution,
    /// `internal`.
    Internal,
}

impl ErrorType {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorType; 36] = [
        ErrorType::EmptyImage,
        ErrorType::InvalidImage,
        ErrorType::UnsupportedMediaType,
        ErrorType::ImplausibleGeometry,
        ErrorType::TooManyPixels,
        ErrorType::InvalidDicom,
        ErrorType::MissingPixelData,
        ErrorType::UnsupportedDicom,
        ErrorType::UnsupportedTransferSyntax,
        ErrorType::OperatingPointUnreachable,
        ErrorType::ColourImage,
        ErrorType::BlankImage,
        ErrorType::WrongBodyPart,
        ErrorType::LateralView,
        ErrorType::InvalidRequest,
        ErrorType::ModelNotFound,
        ErrorType::NotFound,
        ErrorType::MethodNotAllowed,
        ErrorType::PayloadTooLarge,
        ErrorType::TooManyImages,
        ErrorType::InvalidQuery,
        ErrorType::NotReady,
        ErrorType::Overloaded,
        ErrorType::Timeout,
        ErrorType::BodyTimeout,
        ErrorType::Unauthorized,
        ErrorType::Forbidden,
        ErrorType::AuditUnavailable,
        ErrorType::UnknownRequest,
        ErrorType::FeedbackConflict,
        ErrorType::RepositoryRefused,
        ErrorType::NotAcceptable,
        ErrorType::SrUnavailable,
        ErrorType::ExplanationUnavailable,
        ErrorType::OutOfDistribution,
        ErrorType::Internal,
    ];

    /// Whether this is a decision about an image's content (it is not a radiograph
    /// the service classifies, or not one it can read), which the audit trail
    /// records, as opposed to a refusal of the request itself (limits, keys, load).
    pub fn is_image_refusal(self) -> bool {
        matches!(
            self,
            ErrorType::EmptyImage
                | ErrorType::InvalidImage
                | ErrorType::UnsupportedMediaType
                | ErrorType::ImplausibleGeometry
                | ErrorType::TooManyPixels
                | ErrorType::InvalidDicom
                | ErrorType::MissingPixelData
                | ErrorType::UnsupportedDicom
                | ErrorType::UnsupportedTransferSyntax
                | ErrorType::ColourImage
                | ErrorType::BlankImage
                | ErrorType::WrongBodyPart
                | ErrorType::LateralView
                | ErrorType::OutOfDistribution
        )
    }

    /// Whether the refusal is about the server's state (loading, full, slow, its
    /// audit trail), not the request: the caller should retry shortly.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorType::NotReady
                | ErrorType::Overloaded
                | ErrorType::Timeout
                | ErrorType::AuditUnavailable
        )
    }

    /// Seconds a client should wait before retrying (HTTP `Retry-After`, gRPC
    /// `RetryInfo` and `retry-after`): a transient refusal's, none otherwise.
    pub fn retry_after(self) -> Option<u32> {
        self.is_transient().then_some(1)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::EmptyImage => "empty_image",
            ErrorType::InvalidImage => "invalid_image",
            ErrorType::UnsupportedMediaType => "unsupported_media_type",
            ErrorType::ImplausibleGeometry => "implausible_geometry",
            ErrorType::TooManyPixels => "too_many_pixels",
            ErrorType::InvalidDicom => "invalid_dicom",
            ErrorType::MissingPixelData => "missing_pixel_data",
            ErrorType::UnsupportedDicom => "unsupported_dicom",
            ErrorType::UnsupportedTransferSyntax => "unsupported_transfer_syntax",
            ErrorType::OperatingPointUnreachable => "operating_point_unreachable",
            ErrorType::ColourImage => "colour_image",
            ErrorType::BlankImage => "blank_image",
            ErrorType::WrongBodyPart => "wrong_body_part",
            ErrorType::LateralView => "lateral_view",
            ErrorType::InvalidRequest => "invalid_request",
            ErrorType::ModelNotFound => "model_not_found",
            ErrorType::NotFound => "not_found",
            ErrorType::MethodNotAllowed => "method_not_allowed",
            ErrorType::PayloadTooLarge => "payload_too_large",
            ErrorType::TooManyImages => "too_many_images",
            ErrorType::InvalidQuery => "invalid_query",
            ErrorType::NotReady => "not_ready",
            ErrorType::Overloaded => "overloaded",
            ErrorType::Timeout => "timeout",
            ErrorType::BodyTimeout => "body_timeout",
            ErrorType::Unauthorized => "unauthorized",
            ErrorType::Forbidden => "forbidden",
            ErrorType::AuditUnavailable => "audit_unavailable",
            ErrorType::UnknownRequest => "unknown_request",
            ErrorType::FeedbackConflict => "feedback_conflict",
            ErrorType::RepositoryRefused => "repository_refused",
            ErrorType::NotAcceptable => "not_acceptable",
            ErrorType::SrUnavailable => "sr_unavailable",
            ErrorType::ExplanationUnavailable => "explanation_unavailable",
            ErrorType::OutOfDistribution => "out_of_distribution",
            ErrorType::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
