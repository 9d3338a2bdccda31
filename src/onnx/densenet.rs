//! The DenseNet graph emitter: torchvision's `DenseNet.forward` in ONNX operators
//! (Conv, BatchNormalization, Relu, MaxPool, AveragePool, Concat, GlobalAveragePool,
//! Flatten, Gemm, Softmax), with torchvision's parameter names on the initializers.

use half::f16;

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_type, data_type,
    tensor_shape_proto, type_proto,
};
use super::{CAM_NAME, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME};
use crate::arch::{BN_EPS, DenseNetConfig, Weights};

/// ONNX opset the graphs target (supported by every ONNX Runtime since 1.13).
const OPSET: i64 = 17;
/// IR version matching opset 17.
const IR_VERSION: i64 = 8;

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

/// Builds the ONNX model for `config` with `weights`; encode it with
/// `prost::Message::encode_to_vec`. Fails when the weights do not match the config.
pub fn write_densenet(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
) -> Result<ModelProto, String> {
    write_densenet_quant(config, weights, opts, &Quant::None)
}

/// [`write_densenet`], with the convolutions and classifier written as `quant` says.
/// Tensor names do not depend on `quant`, so ranges measured on the
/// [`Quant::Calibrate`] graph name the tensors of the [`Quant::Int8`] one.
pub fn write_densenet_quant(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
    quant: &Quant,
) -> Result<ModelProto, String> {
    config.validate()?;
    config.check_weights(weights)?;
    let mut g = Graph {
        nodes: Vec::new(),
        inits: Vec::new(),
        weights,
        storage: opts.storage,
        next: 0,
        quant,
        exposed: Vec::new(),
        missing: Vec::new(),
    };

    let mut x = g.conv_bn_relu("features.conv0", "features.norm0", INPUT_NAME, 2, 3);
    x = g.node(
        "MaxPool",
        &[&x],
        vec![
            ints("kernel_shape", &[3, 3]),
            ints("strides", &[2, 2]),
            ints("pads", &[1, 1, 1, 1]),
        ],
    );
    for (b, &layers) in config.block_config.iter().enumerate() {
        let mut feats = vec![x.clone()];
        for l in 0..layers {
            let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
            let refs: Vec<&str> = feats.iter().map(String::as_str).collect();
            let cat = if refs.len() == 1 {
                refs[0].to_string()
            } else {
                g.node("Concat", &refs, vec![int("axis", 1)])
            };
            let mut y = g.bn(&format!("{p}.norm1"), &cat);
            y = g.relu(&y);
            y = g.conv_bn_relu(&format!("{p}.conv1"), &format!("{p}.norm2"), &y, 1, 0);
            y = g.conv(&format!("{p}.conv2"), &y, 1, 1);
            feats.push(y);
        }
        let refs: Vec<&str> = feats.iter().map(String::as_str).collect();
        x = g.node("Concat", &refs, vec![int("axis", 1)]);
        if b + 1 != config.block_config.len() {
            let p = format!("features.transition{}", b + 1);
            x = g.bn(&format!("{p}.norm"), &x);
            x = g.relu(&x);
            x = g.conv(&format!("{p}.conv"), &x, 1, 0);
            x = g.node(
                "AveragePool",
                &[&x],
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
            );
        }
    }
    x = g.bn(
        &format!("features.norm{}", config.block_config.len() + 1),
        &x,
    );
    let features = g.relu(&x);
    let pooled = g.node("GlobalAveragePool", &[&features], vec![]);
    g.nodes.push(node(
        "Flatten",
        &[&pooled],
        EMBEDDING_NAME,
        vec![int("axis", 1)],
    ));
    let w = g.init("classifier.weight");
    let bias = g.init("classifier.bias");
    let (head_in, head_w) = match quant {
        Quant::None => (EMBEDDING_NAME.to_string(), w.clone()),
        Quant::Calibrate => {
            g.exposed.push(EMBEDDING_NAME.into());
            (EMBEDDING_NAME.to_string(), w.clone())
        }
        Quant::Int8(_) => (g.qdq(EMBEDDING_NAME), g.init_int8("classifier.weight")),
    };
    g.nodes.push(node(
        "Gemm",
        &[&head_in, &head_w, &bias],
        LOGITS_NAME,
        vec![int("transB", 1)],
    ));
    // Class activation maps: the classifier's rows as a 1x1 convolution over the
    // final (ReLU'd) features, without the bias. The head is average-pool + linear,
    // so mean_hw(cam[:, c]) + bias[c] = logits[:, c].
    let channels = weights["classifier.weight"].shape[1] as i64;
    let classes_i = config.num_classes as i64;
    // The target shape as a Constant node (initializers are only parameters).
    let shape_name = g.node(
        "Constant",
        &[],
        vec![ints("value_ints", &[classes_i, channels, 1, 1])],
    );
    let kernel = g.node("Reshape", &[&w, &shape_name], vec![]);
    g.nodes.push(node(
        "Conv",
        &[&features, &kernel],
        CAM_NAME,
        vec![ints("kernel_shape", &[1, 1])],
    ));
    g.nodes.push(node(
        "Softmax",
        &[LOGITS_NAME],
        PROBABILITIES_NAME,
        vec![int("axis", 1)],
    ));

    let s = i64::from(opts.input_size);
    let classes = config.num_classes as i64;
    let graph = GraphProto {
        node: g.nodes,
        name: "densenet".into(),
        initializer: g.inits,
        doc_string: format!("DenseNet {config:?}"),
        input: vec![value_info(INPUT_NAME, &[Err("batch"), Ok(3), Ok(s), Ok(s)])],
        output: vec![
            value_info(LOGITS_NAME, &[Err("batch"), Ok(classes)]),
            value_info(PROBABILITIES_NAME, &[Err("batch"), Ok(classes)]),
            value_info(
                CAM_NAME,
                &[
                    Err("batch"),
                    Ok(classes),
                    Err("cam_height"),
                    Err("cam_width"),
                ],
            ),
            value_info(EMBEDDING_NAME, &[Err("batch"), Ok(channels)]),
        ],
        value_info: vec![],
    };
    let mut graph = graph;
    for t in &g.exposed {
        // The graph input is no output (its range is the calibration batch's own);
        // the embedding is one already.
        if t != EMBEDDING_NAME && t != INPUT_NAME {
            graph.output.push(untyped_shape(t));
        }
    }
    if !g.missing.is_empty() {
        return Err(format!(
            "no calibrated range for {} tensors (e.g. `{}`): calibrate on the same network",
            g.missing.len(),
            g.missing[0]
        ));
    }
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "cxr".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string: "Pediatric chest X-ray classifier (NORMAL, PNEUMONIA). Input `image` [N,3,S,S] float32, \
                     grayscale replicated to 3 channels, ImageNet mean/std normalised. Outputs `logits` and \
                     `probabilities` [N,2], `cam` [N,2,h,w] (class activation maps of the last block) and \
                     `embedding` [N,C] (the pooled features)."
            .into(),
        graph: Some(graph),
        metadata_props: opts
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() })
            .collect(),
    })
}

struct Graph<'w> {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    weights: &'w Weights,
    storage: WeightStorage,
    next: usize,
    quant: &'w Quant,
    /// Tensors exposed as outputs (calibration).
    exposed: Vec<String>,
    /// Tensors the INT8 graph needed a range for and had none.
    missing: Vec<String>,
}

impl Graph<'_> {
    fn fresh(&mut self, op: &str) -> String {
        self.next += 1;
        format!("{}_{}", op.to_lowercase(), self.next)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(node(op, inputs, &out, attrs));
        out
    }

    /// Adds the initializer `name` and returns the name its float32 value has in the
    /// graph (a Cast output when stored as FP16).
    fn init(&mut self, name: &str) -> String {
        let t = &self.weights[name];
        let dims = t.shape.iter().map(|&d| d as i64).collect();
        match self.storage {
            WeightStorage::Fp32 => {
                let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.inits.push(TensorProto {
                    dims,
                    data_type: data_type::FLOAT,
                    name: name.into(),
                    raw_data: raw,
                    ..Default::default()
                });
                name.to_string()
            }
            WeightStorage::Fp16 => {
                let raw = t
                    .data
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect();
                self.inits.push(TensorProto {
                    dims,
                    data_type: data_type::FLOAT16,
                    name: name.into(),
                    raw_data: raw,
                    ..Default::default()
                });
                let out = format!("{name}::f32");
                self.nodes.push(node(
                    "Cast",
                    &[name],
                    &out,
                    vec![int("to", i64::from(data_type::FLOAT))],
                ));
                out
            }
        }
    }

    fn conv(&mut self, p: &str, x: &str, stride: i64, pad: i64) -> String {
        let name = format!("{p}.weight");
        let k = self.weights[&name].shape[2] as i64;
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad, pad, pad, pad]),
        ];
        match self.quant {
            Quant::None => {
                let w = self.init(&name);
                self.node("Conv", &[x, &w], attrs)
            }
            Quant::Calibrate => {
                let w = self.init(&name);
                let y = self.node("Conv", &[x, &w], attrs);
                self.exposed.push(x.to_string());
                self.exposed.push(y.clone());
                y
            }
            Quant::Int8(_) => {
                let xq = self.qdq(x);
                let w = self.init_int8(&name);
                let y = self.node("Conv", &[&xq, &w], attrs);
                self.qdq(&y)
            }
        }
    }

    /// Conv `p` → BatchNormalization `bn` → ReLU. Float graphs write the three nodes
    /// (ONNX Runtime fuses the first two itself). Quantised graphs fold the batch norm
    /// into the convolution (weights `w·γ/√(σ²+ε)`, bias `β − μ·γ/√(σ²+ε)`) and
    /// quantise after the ReLU: the tensor that feeds the next convolution is then one
    /// uint8 tensor with zero point 0, so ONNX Runtime runs conv, ReLU and requantisation
    /// as one QLinearConv and nothing runs in float between two convolutions. The
    /// stored INT8 weights are the folded ones (`<p>.weight::int8`), the bias is INT32
    /// at the input scale × weight scale (`<bn>::folded_bias::int32`).
    fn conv_bn_relu(&mut self, p: &str, bn: &str, x: &str, stride: i64, pad: i64) -> String {
        if matches!(self.quant, Quant::None) {
            let y = self.conv(p, x, stride, pad);
            let y = self.bn(bn, &y);
            return self.relu(&y);
        }
        let name = format!("{p}.weight");
        let shape = self.weights[&name].shape.clone();
        let k = shape[2] as i64;
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad, pad, pad, pad]),
        ];
        let (w, b) = fold_bn(self.weights, &name, bn);
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let c = shape[0] as i64;
        if matches!(self.quant, Quant::Calibrate) {
            let (wn, bname) = (format!("{name}::folded"), format!("{bn}::folded_bias"));
            self.inits.push(float_tensor(&wn, dims, &w));
            self.inits.push(float_tensor(&bname, vec![c], &b));
            let y = self.node("Conv", &[x, &wn, &bname], attrs);
            let r = self.relu(&y);
            self.exposed.push(x.to_string());
            self.exposed.push(r.clone());
            return r;
        }
        let x_scale = match self.quant {
            Quant::Int8(ranges) => ranges.get(x).map(|r| r.0),
            _ => None,
        };
        let xq = self.qdq(x);
        let (q, wscales) = quantize_per_channel(&w, shape[0]);
        let wname = self.push_int8(&name, dims, &q, &wscales);
        // The bias at scale x_scale·w_scale[c], as QLinearConv wants it.
        let x_scale = x_scale.unwrap_or(1.0);
        let bscales: Vec<f32> = wscales.iter().map(|s| s * x_scale).collect();
        let bq: Vec<i32> = b
            .iter()
            .zip(&bscales)
            .map(|(v, s)| (f64::from(*v) / f64::from(*s)).round().clamp(-2e9, 2e9) as i32)
            .collect();
        let (bn_q, bn_s, bn_z, bn_f) = (
            format!("{bn}::folded_bias::int32"),
            format!("{bn}::folded_bias::scale"),
            format!("{bn}::folded_bias::zp"),
            format!("{bn}::folded_bias"),
        );
        self.inits.push(TensorProto {
            dims: vec![c],
            data_type: data_type::INT32,
            name: bn_q.clone(),
            raw_data: bq.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        self.inits.push(float_tensor(&bn_s, vec![c], &bscales));
        self.inits.push(TensorProto {
            dims: vec![c],
            data_type: data_type::INT32,
            name: bn_z.clone(),
            raw_data: vec![0; 4 * c as usize],
            ..Default::default()
        });
        self.nodes.push(node(
            "DequantizeLinear",
            &[&bn_q, &bn_s, &bn_z],
            &bn_f,
            vec![int("axis", 0)],
        ));
        let y = self.node("Conv", &[&xq, &wname, &bn_f], attrs);
        let r = self.relu(&y);
        self.qdq(&r)
    }

    /// `x` through QuantizeLinear → DequantizeLinear (uint8) with its calibrated range;
    /// names derived from `x`, so the fresh-name counter is untouched.
    fn qdq(&mut self, x: &str) -> String {
        let Quant::Int8(ranges) = self.quant else {
            return x.to_string();
        };
        if x.ends_with("::dq") {
            // Quantised already (a folded conv's ReLU output feeding the next conv).
            return x.to_string();
        }
        let Some(&(scale, zp)) = ranges.get(x) else {
            self.missing.push(x.to_string());
            return x.to_string();
        };
        let (s, z) = (format!("{x}::scale"), format!("{x}::zp"));
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: data_type::FLOAT,
            name: s.clone(),
            raw_data: scale.to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: data_type::UINT8,
            name: z.clone(),
            raw_data: vec![zp],
            ..Default::default()
        });
        let (q, dq) = (format!("{x}::q"), format!("{x}::dq"));
        self.nodes
            .push(node("QuantizeLinear", &[x, &s, &z], &q, vec![]));
        self.nodes
            .push(node("DequantizeLinear", &[&q, &s, &z], &dq, vec![]));
        dq
    }

    /// The weight `name` as per-output-channel symmetric INT8 (`<name>::int8`, scales
    /// `<name>::wscale`, zero points `<name>::wzp`), dequantised along axis 0; returns
    /// the float tensor's name.
    fn init_int8(&mut self, name: &str) -> String {
        let t = &self.weights[name];
        let (q, scales) = quantize_per_channel(&t.data, t.shape[0]);
        let dims = t.shape.iter().map(|&d| d as i64).collect();
        self.push_int8(name, dims, &q, &scales)
    }

    /// Stores `q` (INT8, shape `dims`) with per-row `scales` as `<name>::int8`,
    /// `<name>::wscale`, `<name>::wzp` and dequantises it along axis 0; returns the
    /// float tensor's name.
    fn push_int8(&mut self, name: &str, dims: Vec<i64>, q: &[i8], scales: &[f32]) -> String {
        let c = dims[0];
        let (qn, sn, zn) = (
            format!("{name}::int8"),
            format!("{name}::wscale"),
            format!("{name}::wzp"),
        );
        self.inits.push(TensorProto {
            dims,
            data_type: data_type::INT8,
            name: qn.clone(),
            raw_data: q.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        });
        self.inits.push(float_tensor(&sn, vec![c], scales));
        self.inits.push(TensorProto {
            dims: vec![c],
            data_type: data_type::INT8,
            name: zn.clone(),
            raw_data: vec![0; c as usize],
            ..Default::default()
        });
        let out = format!("{name}::w");
        self.nodes.push(node(
            "DequantizeLinear",
            &[&qn, &sn, &zn],
            &out,
            vec![int("axis", 0)],
        ));
        out
    }

    fn bn(&mut self, p: &str, x: &str) -> String {
        let s = self.init(&format!("{p}.weight"));
        let b = self.init(&format!("{p}.bias"));
        let m = self.init(&format!("{p}.running_mean"));
        let v = self.init(&format!("{p}.running_var"));
        self.node(
            "BatchNormalization",
            &[x, &s, &b, &m, &v],
            vec![float("epsilon", BN_EPS)],
        )
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }
}

/// Conv weight `conv` (shape `[c, ...]`, no bias) with batch norm `bn` (prefix of its
/// weight, bias, running mean and variance) folded in: per output channel `k`,
/// `w·γ/√(σ²+ε)` and bias `β − μ·γ/√(σ²+ε)`.
pub fn fold_bn(weights: &Weights, conv: &str, bn: &str) -> (Vec<f32>, Vec<f32>) {
    let w = &weights[conv];
    let get = |s: &str| &weights[&format!("{bn}.{s}")].data;
    let (gamma, beta, mean, var) = (
        get("weight"),
        get("bias"),
        get("running_mean"),
        get("running_var"),
    );
    let c = w.shape[0];
    let per = w.data.len() / c.max(1);
    let mut folded = Vec::with_capacity(w.data.len());
    let mut bias = Vec::with_capacity(c);
    for k in 0..c {
        let f = f64::from(gamma[k]) / (f64::from(var[k]) + f64::from(BN_EPS)).sqrt();
        folded.extend(
            w.data[k * per..(k + 1) * per]
                .iter()
                .map(|&v| (f64::from(v) * f) as f32),
        );
        bias.push((f64::from(beta[k]) - f64::from(mean[k]) * f) as f32);
    }
    (folded, bias)
}

/// A float32 initializer.
fn float_tensor(name: &str, dims: Vec<i64>, data: &[f32]) -> TensorProto {
    TensorProto {
        dims,
        data_type: data_type::FLOAT,
        name: name.into(),
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Per-output-channel symmetric INT8 of a weight whose first axis has `channels`
/// rows: each row's scale is max|w| / 127 (a zero row gets scale 1), values rounded
/// to the nearest step and kept in [-127, 127]. Returns the values and the scales.
pub fn quantize_per_channel(data: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per = data.len() / channels.max(1);
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(channels);
    for row in data.chunks(per.max(1)) {
        let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        scales.push(s);
        q.extend(
            row.iter()
                .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

/// The uint8 asymmetric (scale, zero point) of a range; the range is widened to hold
/// 0 (so that zero, ReLU's floor and the padding, is exact).
pub fn activation_qparams(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    if hi - lo <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// A float32 graph output with no declared shape (calibration's exposed tensors).
fn untyped_shape(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: data_type::FLOAT,
                shape: None,
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f,
        ..Default::default()
    }
}

/// A float32 tensor value-info; `Err(name)` is a dynamic axis.
fn value_info(name: &str, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Ok(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Err(p) => tensor_shape_proto::dimension::Value::DimParam((*p).into()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}
