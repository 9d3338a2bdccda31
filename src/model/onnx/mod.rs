//! ONNX files: our own writer for DenseNet graphs and a small reader of their
//! signature, on hand-derived protobuf messages ([`proto`]).
//!
//! The file contract every cxr model follows (the server relies on it):
//! - input `image`: float32 `[N, 3, S, S]`, `N` dynamic (`batch`), `S` the card's
//!   input size, already normalised by [`crate::imaging::preprocess`];
//! - output `logits`: float32 `[N, C]`; output `probabilities`: softmax of the logits;
//! - optional outputs `cam` `[N, C, h, w]` (class activation maps: the classifier's
//!   rows over the final features) and `embedding` `[N, channels]` (the pooled
//!   features); files written before they existed still load and serve.

mod densenet;
mod graph;
mod options;
pub mod proto;
mod quant;

pub use densenet::{write_densenet, write_densenet_quant};
pub use options::{Quant, WeightStorage, WriteOptions};
use prost::Message;
pub use quant::{activation_qparams, fold_bn, quantize_per_channel};

/// Name of the graph input.
pub const INPUT_NAME: &str = "image";
/// Name of the logits output.
pub const LOGITS_NAME: &str = "logits";
/// Name of the probabilities output.
pub const PROBABILITIES_NAME: &str = "probabilities";
/// Name of the class activation maps output `[N, C, h, w]` (optional in a model file).
pub const CAM_NAME: &str = "cam";
/// Name of the pooled-features output `[N, channels]` (optional in a model file).
pub const EMBEDDING_NAME: &str = "embedding";

/// A problem reading an ONNX file's signature.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The bytes are not an ONNX ModelProto.
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The model lacks a graph, or the graph lacks a tensor it must have.
    #[error("{0}")]
    Contract(String),
    /// The network cannot be written: its configuration or weights.
    #[error(transparent)]
    Arch(#[from] crate::model::arch::ArchError),
    /// An INT8 graph lacks a calibrated range for a quantised tensor.
    #[error(
        "no calibrated range for {count} tensors (e.g. `{first}`): calibrate on the same network"
    )]
    Uncalibrated {
        /// Tensors without a range.
        count: usize,
        /// The first of them.
        first: String,
    },
    /// Calibration found nothing to calibrate, or its runner failed.
    #[error("calibration: {0}")]
    Calibration(String),
}

/// A dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named dynamic axis.
    Dynamic(String),
}

/// The input and output tensors of a graph, as declared in the file.
#[derive(Debug, Clone)]
pub struct Signature {
    /// (name, element type, dims) of each graph input.
    pub inputs: Vec<(String, i32, Vec<Dim>)>,
    /// (name, element type, dims) of each graph output.
    pub outputs: Vec<(String, i32, Vec<Dim>)>,
    /// Number of parameters stored as initializers, and their bytes.
    pub initializer_values: usize,
}

impl Signature {
    /// The declared width of the `embedding` output (`[batch, C]`), when there is one
    /// with a fixed width.
    pub fn embedding_width(&self) -> Option<usize> {
        self.outputs
            .iter()
            .find(|(n, _, _)| n == EMBEDDING_NAME)
            .and_then(|(_, _, dims)| match dims.as_slice() {
                [_, Dim::Fixed(c)] if *c > 0 => Some(*c as usize),
                _ => None,
            })
    }
}

/// Reads the declared inputs and outputs of an ONNX model.
pub fn signature(bytes: &[u8]) -> Result<Signature, OnnxError> {
    let model = proto::ModelProto::decode(bytes)?;
    let graph = model
        .graph
        .ok_or_else(|| OnnxError::Contract("the model has no graph".into()))?;
    let io = |v: &[proto::ValueInfoProto]| {
        v.iter()
            .map(|vi| {
                let (elem, dims) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                    Some(proto::type_proto::Value::TensorType(t)) => (
                        t.elem_type,
                        t.shape
                            .as_ref()
                            .map(|s| {
                                s.dim
                                    .iter()
                                    .map(|d| match &d.value {
                                        Some(
                                            proto::tensor_shape_proto::dimension::Value::DimValue(
                                                v,
                                            ),
                                        ) => Dim::Fixed(*v),
                                        Some(
                                            proto::tensor_shape_proto::dimension::Value::DimParam(
                                                p,
                                            ),
                                        ) => Dim::Dynamic(p.clone()),
                                        None => Dim::Dynamic(String::new()),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    ),
                    None => (0, Vec::new()),
                };
                (vi.name.clone(), elem, dims)
            })
            .collect::<Vec<_>>()
    };
    let initializer_values = graph
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>() as usize)
        .sum();
    Ok(Signature {
        inputs: io(&graph.input),
        outputs: io(&graph.output),
        initializer_values,
    })
}

/// Reads every initializer of an ONNX model written by [`write_densenet`] back as
/// float32 [`crate::model::arch::Weights`], keyed by initializer name (which is the training
/// variable's name). float16 storage is widened; other element types are refused.
pub fn read_weights(bytes: &[u8]) -> Result<crate::model::arch::Weights, OnnxError> {
    let model = proto::ModelProto::decode(bytes)?;
    let graph = model
        .graph
        .ok_or_else(|| OnnxError::Contract("the model has no graph".into()))?;
    let mut out = crate::model::arch::Weights::new();
    for t in graph.initializer {
        let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match t.data_type {
            proto::data_type::FLOAT if t.raw_data.len() == 4 * n => t
                .raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            proto::data_type::FLOAT if t.raw_data.is_empty() && t.float_data.len() == n => {
                t.float_data
            }
            proto::data_type::FLOAT16 if t.raw_data.len() == 2 * n => t
                .raw_data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(OnnxError::Contract(format!(
                    "initializer `{}` has element type {other} or a length that does not match {shape:?}",
                    t.name
                )));
            }
        };
        out.insert(t.name, crate::model::arch::Tensor::new(shape, data));
    }
    Ok(out)
}

impl Signature {
    /// Checks the cxr file contract for a square input of `input_size` and
    /// `num_classes` outputs; says what differs otherwise.
    pub fn check_contract(&self, input_size: u32, num_classes: usize) -> Result<(), OnnxError> {
        let bad = |m: String| Err(OnnxError::Contract(m));
        let Some((_, elem, dims)) = self.inputs.iter().find(|(n, _, _)| n == INPUT_NAME) else {
            return bad(format!("no input named `{INPUT_NAME}`"));
        };
        if *elem != proto::data_type::FLOAT {
            return bad(format!("input `{INPUT_NAME}` must be float32"));
        }
        let s = i64::from(input_size);
        let ok = dims.len() == 4
            && matches!(dims[0], Dim::Dynamic(_))
            && dims[1] == Dim::Fixed(3)
            && dims[2] == Dim::Fixed(s)
            && dims[3] == Dim::Fixed(s);
        if !ok {
            return bad(format!(
                "input `{INPUT_NAME}` has shape {dims:?}; expected [batch, 3, {s}, {s}]"
            ));
        }
        for name in [LOGITS_NAME, PROBABILITIES_NAME] {
            let Some((_, _, dims)) = self.outputs.iter().find(|(n, _, _)| n == name) else {
                return bad(format!("no output named `{name}`"));
            };
            if dims.len() != 2 || dims[1] != Dim::Fixed(num_classes as i64) {
                return bad(format!(
                    "output `{name}` has shape {dims:?}; expected [batch, {num_classes}]"
                ));
            }
        }
        Ok(())
    }
}
