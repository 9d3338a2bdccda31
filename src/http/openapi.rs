//! The OpenAPI document: utoipa's derives are the source of truth, `openapi.yaml` is
//! generated from it (`cxr-serve --print-openapi`).

use crate::http::error;
use crate::http::error::ErrorBody;
use crate::http::feedback::__path_feedback;
use crate::http::predict::__path_predict;
use crate::http::predict::PredictUpload;
use crate::http::routes::__path_get_model;
use crate::http::routes::__path_get_plot;
use crate::http::routes::__path_health;
use crate::http::routes::__path_list_models;
use crate::http::routes::__path_metrics_text;
use crate::http::routes::__path_ready;
use crate::http::types::ModelInfo;
use crate::http::types::ModelList;
use crate::http::types::Prediction;
use crate::http::types::Status;
use crate::http::types::ThresholdSource;
use crate::http::v2;
use crate::imaging::dicom::DicomInfo;
use utoipa::OpenApi;

/// The OpenAPI document (utoipa derives are the source of truth; `openapi.yaml` is
/// generated from it by `cxr-serve --print-openapi`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cxr",
        description = "Pediatric chest X-ray pneumonia classifier. POST an X-ray, get NORMAL or PNEUMONIA, a confidence and the model variant that answered.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(predict, list_models, get_model, get_plot, health, ready, metrics_text, feedback,
        v2::server_metadata, v2::live, v2::server_ready, v2::model_metadata, v2::model_ready, v2::infer,
        v2::model_metadata_version, v2::model_ready_version, v2::infer_version,
        v2::repository::index, v2::repository::load, v2::repository::unload,
        crate::http::outbox::dead_letters),
    modifiers(&SecuritySchemes),
    components(schemas(super::feedback::FeedbackRequest, super::feedback::FeedbackAnswer, crate::outcomes::Answered, crate::outcomes::LiveOutcomes, crate::http::outbox::DeadLetters, crate::delivery::outbox::DeadLetter, Prediction, ThresholdSource, DicomInfo, ErrorBody, error::ErrorType, ModelList, ModelInfo, Status, PredictUpload,
        v2::V2Error, v2::ServerMetadata, v2::TensorMetadata, v2::ModelMetadata, v2::Readiness, v2::Liveness,
        v2::InferRequest, v2::RequestInput, v2::RequestOutput, v2::InferResponse, v2::ResponseOutput,
        v2::repository::IndexRequest, v2::repository::LoadRequest, v2::repository::UnloadRequest, v2::repository::UnloadParams,
        v2::repository::LoadParams, v2::repository::IndexEntry, v2::repository::Change,
        crate::http::types::VersionInfo, crate::http::types::ShadowInfo, crate::inference::shadow::ShadowReport, crate::inference::shadow::ClassAgreement)),
    tags((name = "inference", description = "Classify X-rays"), (name = "models", description = "Model cards and live facts"), (name = "feedback", description = "Confirmed labels of answered images, and the live figures they give"), (name = "operations", description = "Health, readiness, metrics"), (name = "open inference protocol", description = "The Open Inference Protocol (KServe V2) REST API, with Triton's binary tensor data extension; also at /v2/models/{name}/versions/{version}[/infer|/ready]"), (name = "model repository", description = "The Open Inference Protocol's model repository extension: list, load (and swap, and shadow) and unload model versions live; callers with the `admin` scope"))
)]
pub struct ApiDoc;

/// Declares the API key schemes (`Authorization: Bearer` and `x-api-key`) that
/// `/predict` and `/models*` require when the server runs with `--api-keys-file`.
pub(super) struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from the --api-keys-file (required only when the server runs with one).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "The same API key in the x-api-key header.",
            ))),
        );
    }
}

/// The OpenAPI document as YAML.
pub fn openapi_yaml() -> String {
    ApiDoc::openapi()
        .to_yaml()
        .expect("the OpenAPI document serialises to YAML")
}

/// `GET /openapi.json`: the document as JSON.
pub(super) async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
