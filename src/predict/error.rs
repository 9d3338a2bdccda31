//! `PredictError`: every refusal of the core, typed where it is made, with its
//! transport-neutral [`ErrorType`]. It names no transport: each door has its own
//! error for what is its own (routes, bodies, keys, content negotiation: the HTTP
//! door's `http::ApiError`, the gRPC door's `grpc::Refusal`), wraps this one, and
//! maps the type to its status once (`http::error::status`, `grpc::code`, the DICOM
//! node's C-STORE statuses); each variant's type is decided here, explicitly (no
//! catch-all arm).

use crate::error_type::ErrorType;
use crate::imaging::ImageError;
use crate::imaging::dicom::DicomError;
use crate::inference::SelectError;

/// Every refusal of the core.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The DICOM upload could not be used.
    #[error(transparent)]
    Dicom(#[from] DicomError),
    /// A request that is malformed (no image, a tensor of the wrong shape, a
    /// parameter of the wrong type).
    #[error("{0}")]
    InvalidRequest(String),
    /// Unknown model name.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// A version of a variant that is not loaded (the Open Inference Protocol's
    /// model path names it).
    #[error("no route for {0}")]
    VersionNotLoaded(String),
    /// More images than `--max-images-per-request`.
    #[error("{0} images in one request; the limit is {1}")]
    TooManyImages(usize, usize),
    /// What the caller asked of the decision does not hold together (`model` and
    /// `prefer`, `threshold` and `operating_point`, a threshold outside (0, 1)).
    #[error("invalid query: {0}")]
    InvalidAsk(String),
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
    /// An explanation was asked of a model without the outputs it needs.
    #[error("{0}")]
    ExplanationUnavailable(String),
    /// A Structured Report cannot be made for this source.
    #[error("{0}")]
    SrUnavailable(String),
    /// The audit record of an answer could not be written; the answer is withheld.
    #[error("the audit record could not be written, so no answer is given; retry shortly")]
    AuditUnavailable,
    /// Feedback given to a server that keeps no outcomes.
    #[error("this server keeps no outcomes (start it with --outcomes FILE or --database-url)")]
    NoOutcomes,
    /// Feedback for an image nothing answered.
    #[error("{0}")]
    UnknownRequest(String),
    /// Feedback with a label other than the one already confirmed.
    #[error("{0}")]
    FeedbackConflict(String),
    /// A model repository change refused (a version that does not check out, or a
    /// change that would leave the server unservable); what was serving stays.
    #[error("{0}")]
    RepositoryRefused(String),
    /// A server-side failure; details are only logged.
    #[error("internal error")]
    Internal(String),
}

impl PredictError {
    /// The `error_type`.
    ///
    /// Long by design: one arm per error variant and no catch-all, so that a new
    /// variant does not compile until its type is decided here, in one table.
    pub fn error_type(&self) -> ErrorType {
        match self {
            PredictError::Image(ImageError::Empty) => ErrorType::EmptyImage,
            PredictError::Image(ImageError::Decode(_)) => ErrorType::InvalidImage,
            PredictError::Image(ImageError::UnsupportedFormat(_)) => {
                ErrorType::UnsupportedMediaType
            }
            PredictError::Image(ImageError::ImplausibleGeometry { .. }) => {
                ErrorType::ImplausibleGeometry
            }
            PredictError::Image(ImageError::TooManyPixels { .. }) => ErrorType::TooManyPixels,
            PredictError::Dicom(DicomError::Malformed(_)) => ErrorType::InvalidDicom,
            PredictError::Dicom(DicomError::UnsupportedTransferSyntax { .. }) => {
                ErrorType::UnsupportedTransferSyntax
            }
            PredictError::Dicom(DicomError::MissingPixelData) => ErrorType::MissingPixelData,
            PredictError::Dicom(DicomError::Unprocessable(_)) => ErrorType::UnsupportedDicom,
            PredictError::Dicom(DicomError::Geometry(_)) => ErrorType::ImplausibleGeometry,
            PredictError::Dicom(DicomError::Content(ImageError::Colour { .. }))
            | PredictError::Image(ImageError::Colour { .. }) => ErrorType::ColourImage,
            PredictError::Dicom(DicomError::Content(_))
            | PredictError::Image(ImageError::Blank { .. }) => ErrorType::BlankImage,
            PredictError::Dicom(DicomError::WrongBodyPart(_)) => ErrorType::WrongBodyPart,
            PredictError::Dicom(DicomError::Lateral(_)) => ErrorType::LateralView,
            PredictError::Dicom(DicomError::TooManyPixels { .. }) => ErrorType::TooManyPixels,
            PredictError::InvalidRequest(_) => ErrorType::InvalidRequest,
            PredictError::Select(
                SelectError::Unknown { .. } | SelectError::UnknownVersion { .. },
            ) => ErrorType::ModelNotFound,
            PredictError::VersionNotLoaded(_) | PredictError::NoOutcomes => ErrorType::NotFound,
            PredictError::TooManyImages(..) => ErrorType::TooManyImages,
            PredictError::InvalidAsk(_) => ErrorType::InvalidQuery,
            PredictError::OperatingPoint(_) => ErrorType::OperatingPointUnreachable,
            PredictError::NotReady | PredictError::WorkerDown(_) => ErrorType::NotReady,
            PredictError::Overloaded(_) | PredictError::BufferFull(_) => ErrorType::Overloaded,
            PredictError::Timeout(_) => ErrorType::Timeout,
            PredictError::AuditUnavailable => ErrorType::AuditUnavailable,
            PredictError::SrUnavailable(_) => ErrorType::SrUnavailable,
            PredictError::ExplanationUnavailable(_) => ErrorType::ExplanationUnavailable,
            PredictError::OutOfDistribution { .. } => ErrorType::OutOfDistribution,
            PredictError::UnknownRequest(_) => ErrorType::UnknownRequest,
            PredictError::FeedbackConflict(_) => ErrorType::FeedbackConflict,
            PredictError::RepositoryRefused(_) => ErrorType::RepositoryRefused,
            PredictError::Internal(_) => ErrorType::Internal,
        }
    }

    /// The facts behind a refusal, where it has some (`out_of_distribution`: the
    /// image's index in the request, its score and the model's threshold).
    pub fn details(&self) -> Option<serde_json::Value> {
        match self {
            PredictError::OutOfDistribution {
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

impl From<crate::inference::InferError> for PredictError {
    fn from(e: crate::inference::InferError) -> Self {
        use crate::inference::InferError;
        match e {
            InferError::Overloaded(model) => PredictError::Overloaded(model),
            InferError::Closed(_) => PredictError::NotReady,
            e @ (InferError::Failed(_) | InferError::Dropped) => {
                PredictError::Internal(e.to_string())
            }
        }
    }
}
