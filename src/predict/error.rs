//! `ApiError`: every refusal of the service, typed where it is made, with its
//! transport-neutral [`ErrorType`]. Each door maps the type to its own status once
//! (`http::error::status`); each variant's type is decided here, explicitly (no
//! catch-all arm).

use crate::access::AuthError;
use crate::imaging::ImageError;
use crate::imaging::dicom::DicomError;
use crate::inference::SelectError;
use crate::predict::error_type::ErrorType;

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
    Auth(AuthError),
    /// The audit record of an answer could not be written; the answer is withheld.
    #[error("the audit record could not be written, so no answer is given; retry shortly")]
    AuditUnavailable,
    /// A server-side failure; details are only logged.
    /// `POST /feedback` for an image nothing answered.
    #[error("{0}")]
    UnknownRequest(String),
    /// `POST /feedback` with a label other than the one already confirmed.
    #[error("{0}")]
    FeedbackConflict(String),
    /// A model repository change refused (a version that does not check out, or a
    /// change that would leave the server unservable); what was serving stays.
    #[error("{0}")]
    RepositoryRefused(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The `error_type`.
    ///
    /// Long by design: one arm per error variant and no catch-all, so that a new
    /// variant does not compile until its type is decided here, in one table.
    pub fn error_type(&self) -> ErrorType {
        match self {
            ApiError::Image(ImageError::Empty) => ErrorType::EmptyImage,
            ApiError::Image(ImageError::Decode(_)) => ErrorType::InvalidImage,
            ApiError::Image(ImageError::UnsupportedFormat(_)) => ErrorType::UnsupportedMediaType,
            ApiError::Image(ImageError::ImplausibleGeometry { .. }) => {
                ErrorType::ImplausibleGeometry
            }
            ApiError::Image(ImageError::TooManyPixels { .. }) => ErrorType::TooManyPixels,
            ApiError::Dicom(DicomError::Malformed(_)) => ErrorType::InvalidDicom,
            ApiError::Dicom(DicomError::UnsupportedTransferSyntax { .. }) => {
                ErrorType::UnsupportedTransferSyntax
            }
            ApiError::Dicom(DicomError::MissingPixelData) => ErrorType::MissingPixelData,
            ApiError::Dicom(DicomError::Unprocessable(_)) => ErrorType::UnsupportedDicom,
            ApiError::Dicom(DicomError::Geometry(_)) => ErrorType::ImplausibleGeometry,
            ApiError::Dicom(DicomError::Content(ImageError::Colour { .. }))
            | ApiError::Image(ImageError::Colour { .. }) => ErrorType::ColourImage,
            ApiError::Dicom(DicomError::Content(_)) | ApiError::Image(ImageError::Blank { .. }) => {
                ErrorType::BlankImage
            }
            ApiError::Dicom(DicomError::WrongBodyPart(_)) => ErrorType::WrongBodyPart,
            ApiError::Dicom(DicomError::Lateral(_)) => ErrorType::LateralView,
            ApiError::Dicom(DicomError::TooManyPixels { .. }) => ErrorType::TooManyPixels,
            ApiError::BadRequest(_) => ErrorType::InvalidRequest,
            ApiError::Select(SelectError::Unknown(_) | SelectError::UnknownVersion { .. }) => {
                ErrorType::ModelNotFound
            }
            ApiError::NoRoute(_) => ErrorType::NotFound,
            ApiError::MethodNotAllowed => ErrorType::MethodNotAllowed,
            ApiError::BodyTooLarge(_) => ErrorType::PayloadTooLarge,
            ApiError::TooManyImages(..) => ErrorType::TooManyImages,
            ApiError::UnsupportedMediaType(_) => ErrorType::UnsupportedMediaType,
            ApiError::InvalidQuery(_) => ErrorType::InvalidQuery,
            ApiError::OperatingPoint(_) => ErrorType::OperatingPointUnreachable,
            ApiError::NotReady | ApiError::WorkerDown(_) => ErrorType::NotReady,
            ApiError::Overloaded(_) | ApiError::BufferFull(_) => ErrorType::Overloaded,
            ApiError::Timeout(_) => ErrorType::Timeout,
            ApiError::BodyTimeout(_) => ErrorType::BodyTimeout,
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => ErrorType::Unauthorized,
            ApiError::Auth(AuthError::Forbidden { .. }) => ErrorType::Forbidden,
            ApiError::AuditUnavailable => ErrorType::AuditUnavailable,
            ApiError::NotAcceptable(_) => ErrorType::NotAcceptable,
            ApiError::SrUnavailable(_) => ErrorType::SrUnavailable,
            ApiError::ExplanationUnavailable(_) => ErrorType::ExplanationUnavailable,
            ApiError::OutOfDistribution { .. } => ErrorType::OutOfDistribution,
            ApiError::UnknownRequest(_) => ErrorType::UnknownRequest,
            ApiError::FeedbackConflict(_) => ErrorType::FeedbackConflict,
            ApiError::RepositoryRefused(_) => ErrorType::RepositoryRefused,
            ApiError::Internal(_) => ErrorType::Internal,
        }
    }

    /// Seconds a client should wait before retrying, for the refusals that are
    /// about the server's state rather than the request.
    pub fn retry_after(&self) -> Option<u32> {
        self.error_type().is_transient().then_some(1)
    }

    /// The facts behind a refusal, where it has some (`out_of_distribution`: the
    /// image's index in the request, its score and the model's threshold).
    pub fn details(&self) -> Option<serde_json::Value> {
        match self {
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
