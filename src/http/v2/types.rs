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

/// Most parameters in one `parameters` object.
pub const MAX_PARAMETERS: usize = 64;
/// Most inputs, outputs and shape dimensions read from a request (one input is
/// served; more are refused by name, not parsed).
pub const MAX_LIST: usize = 16;

/// A `parameters` object: at most [`MAX_PARAMETERS`] entries, each a string, a
/// number or a boolean (the protocol's `$parameter`). Parsed as it is read, so a
/// parameter cannot make the server hold more than a few bytes per byte sent.
#[derive(Debug, Default)]
pub struct Params(pub Map<String, Value>);

impl std::ops::Deref for Params {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Params;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an object of at most {MAX_PARAMETERS} parameters")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Params, A::Error> {
                let mut out = Map::new();
                while let Some(key) = m.next_key::<String>()? {
                    if out.len() == MAX_PARAMETERS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_PARAMETERS} parameters"
                        )));
                    }
                    let Scalar(v) = m.next_value()?;
                    out.insert(key, v);
                }
                Ok(Params(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A parameter's value: a string, a number or a boolean.
struct Scalar(Value);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a parameter value: a string, a number or a boolean")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar(Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON array of at most `N` elements, refused as soon as one more begins.
#[derive(Debug)]
pub struct Bounded<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for V<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of at most {N} elements")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = s.next_element()? {
                    if out.len() == N {
                        return Err(serde::de::Error::custom(format!(
                            "an array of more than {N} elements"
                        )));
                    }
                    out.push(x);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
    }
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestInput<'a> {
    /// `image` (BYTES) or `input` (FP32).
    pub name: String,
    /// `[N]` for `image`, `[N, 3, S, S]` for `input`.
    #[schema(value_type = Vec<i64>)]
    pub shape: Bounded<i64, MAX_LIST>,
    /// `BYTES` or `FP32`.
    pub datatype: String,
    /// `binary_data_size` when the tensor's bytes follow the JSON.
    #[serde(default)]
    #[schema(value_type = serde_json::Map<String, serde_json::Value>)]
    pub parameters: Params,
    /// Row-major data: base64 strings (or `{"b64": ...}`) for `image`, numbers for
    /// `input`; nested arrays are flattened.
    // Kept as the request's own text until the model and shape are known, then read
    // up to what the shape needs.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<&'a serde_json::value::RawValue>,
}

/// An output asked for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestOutput {
    /// `probabilities` or `label`.
    pub name: String,
    /// `binary_data: true` to get the output as bytes after the JSON.
    #[serde(default)]
    #[schema(value_type = serde_json::Map<String, serde_json::Value>)]
    pub parameters: Params,
}

/// An inference request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InferRequest<'a> {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `threshold` (number in (0, 1)), `operating_point` (`sensitivity:0.95`),
    /// `binary_data_output` (bool).
    #[serde(default)]
    #[schema(value_type = serde_json::Map<String, serde_json::Value>)]
    pub parameters: Params,
    /// Exactly one input.
    #[serde(borrow)]
    #[schema(value_type = Vec<RequestInput>)]
    pub inputs: Bounded<RequestInput<'a>, MAX_LIST>,
    /// Outputs to return (default: all).
    #[serde(default)]
    #[schema(value_type = Option<Vec<RequestOutput>>)]
    pub outputs: Option<Bounded<RequestOutput, MAX_LIST>>,
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
