//! What a written file holds besides the weights: their storage, the input size and
//! metadata, and how the convolutions are written (float, calibration, INT8). Shared
//! by the model builder (`densenet.rs`) and the graph's nodes (`graph.rs`).

/// How the initializers are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightStorage {
    /// float32 initializers.
    Fp32,
    /// float16 initializers, each followed by a `Cast` to float32: half the file size,
    /// and ONNX Runtime folds the casts at load, so the CPU computes in float32.
    Fp16,
}

/// What to write besides the weights.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Height and width of the square input.
    pub input_size: u32,
    /// Initializer storage.
    pub storage: WeightStorage,
    /// Key/value pairs stored as model metadata (name, version, ...).
    pub metadata: Vec<(String, String)>,
}

/// How the convolutions and the classifier are written.
#[derive(Debug, Clone, Default)]
pub enum Quant {
    /// Float (FP32 compute; weights stored as [`WriteOptions::storage`]).
    #[default]
    None,
    /// Float, with every quantised tensor (each convolution's input and output, the
    /// classifier's input) also a graph output: what calibration runs.
    Calibrate,
    /// QDQ INT8: per-output-channel symmetric INT8 weights (`<name>::int8`, scales
    /// `<name>::wscale`) dequantised into each Conv and the classifier, and each
    /// quantised tensor through QuantizeLinear/DequantizeLinear (uint8, asymmetric)
    /// with the range given here (tensor name → (scale, zero point)), so ONNX Runtime
    /// runs the convolutions in INT8.
    Int8(std::collections::BTreeMap<String, (f32, u8)>),
}
