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

/// Builds the ONNX model for `config` with `weights`; encode it with
/// `prost::Message::encode_to_vec`. Fails when the weights do not match the config.
pub fn write_densenet(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
) -> Result<ModelProto, String> {
    config.validate()?;
    config.check_weights(weights)?;
    let mut g = Graph {
        nodes: Vec::new(),
        inits: Vec::new(),
        weights,
        storage: opts.storage,
        next: 0,
    };

    let mut x = g.conv("features.conv0", INPUT_NAME, 2, 3);
    x = g.bn("features.norm0", &x);
    x = g.relu(&x);
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
            y = g.conv(&format!("{p}.conv1"), &y, 1, 0);
            y = g.bn(&format!("{p}.norm2"), &y);
            y = g.relu(&y);
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
    g.nodes.push(node(
        "Gemm",
        &[EMBEDDING_NAME, &w, &bias],
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
        let w = self.init(&format!("{p}.weight"));
        let k = self.weights[&format!("{p}.weight")].shape[2] as i64;
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad, pad, pad, pad]),
        ];
        self.node("Conv", &[x, &w], attrs)
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
