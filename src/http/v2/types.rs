//! The protocol's JSON objects.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The protocol's error object.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct V2Error {
    /// What went wrong.
    pub error: String,
}

impl V2Error {
    pub(super) fn new(e: &str) -> Self {
        Self { error: e.into() }
    }
}

/// Server metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerMetadata {
    /// `cxr`.
    pub name: String,
    /// The server's version.
    pub version: String,
    /// Protocol extensions supported.
    pub extensions: Vec<String>,
}

/// A tensor's name, datatype and shape (`-1`: any size).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// `BYTES` or `FP32`.
    pub datatype: String,
    /// Shape; `-1` for the batch.
    pub shape: Vec<i64>,
}

/// Model metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelMetadata {
    /// Variant name.
    pub name: String,
    /// Versions served (the card's).
    pub versions: Vec<String>,
    /// `onnxruntime_onnx`.
    pub platform: String,
    /// Inputs: send exactly one of them per request.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// Readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// Whether the server or model can answer inference requests.
    pub ready: bool,
}

/// Liveness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always true when the server answers.
    pub live: bool,
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestInput {
    /// `image` (BYTES) or `input` (FP32).
    pub name: String,
    /// `[N]` for `image`, `[N, 3, S, S]` for `input`.
    pub shape: Vec<i64>,
    /// `BYTES` or `FP32`.
    pub datatype: String,
    /// `binary_data_size` when the tensor's bytes follow the JSON.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Row-major data: base64 strings (or `{"b64": ...}`) for `image`, numbers for
    /// `input`; nested arrays are flattened.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Value>,
}

/// An output asked for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestOutput {
    /// `probabilities` or `label`.
    pub name: String,
    /// `binary_data: true` to get the output as bytes after the JSON.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `threshold` (number in (0, 1)), `operating_point` (`sensitivity:0.95`),
    /// `binary_data_output` (bool).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Exactly one input.
    pub inputs: Vec<RequestInput>,
    /// Outputs to return (default: all).
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One output tensor of a response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResponseOutput {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// `FP32` or `BYTES`.
    pub datatype: String,
    /// `binary_data_size` when the data follows the JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// Row-major data (absent when sent as binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Value>,
}

/// An inference response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InferResponse {
    /// Variant that answered.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// The request's `id`, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `threshold` applied, `request_id`, `execution_provider`.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// The outputs.
    pub outputs: Vec<ResponseOutput>,
}
