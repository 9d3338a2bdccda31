//! The DenseNet graph emitter: torchvision's `DenseNet.forward` in ONNX operators
//! (Conv, BatchNormalization, Relu, MaxPool, AveragePool, Concat, GlobalAveragePool,
//! Flatten, Gemm, Softmax), with torchvision's parameter names on the initializers.

use super::graph::{Graph, int, ints, node, untyped_shape, value_info};
use super::options::{Quant, WriteOptions};
use super::proto::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};
use super::{CAM_NAME, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME};
use crate::model::arch::{DenseNetConfig, Weights};

/// ONNX opset the graphs target (supported by every ONNX Runtime since 1.13).
const OPSET: i64 = 17;
/// IR version matching opset 17.
const IR_VERSION: i64 = 8;

/// Builds the ONNX model for `config` with `weights`; encode it with
/// `prost::Message::encode_to_vec`. Fails when the weights do not match the config.
pub fn write_densenet(
    config: &DenseNetConfig,
    weights: &Weights,
    opts: &WriteOptions,
) -> Result<ModelProto, super::OnnxError> {
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
) -> Result<ModelProto, super::OnnxError> {
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

    let features = features(&mut g, config);
    let channels = head(&mut g, &features, config);

    let mut graph = graph_proto(config, opts, channels);
    for t in &g.exposed {
        // The graph input is no output (its range is the calibration batch's own);
        // the embedding is one already.
        if t != EMBEDDING_NAME && t != INPUT_NAME {
            graph.output.push(untyped_shape(t));
        }
    }
    if !g.missing.is_empty() {
        return Err(super::OnnxError::Uncalibrated {
            count: g.missing.len(),
            first: g.missing[0].clone(),
        });
    }
    graph.node = g.nodes;
    graph.initializer = g.inits;
    Ok(model_proto(graph, opts))
}

/// torchvision's `features`: the stem, the dense blocks with their transitions, and
/// the final batch norm and ReLU; returns the features' tensor name.
fn features(g: &mut Graph<'_>, config: &DenseNetConfig) -> String {
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
    g.relu(&x)
}

/// The head: pooled embedding, classifier (QDQ in INT8), class activation maps and
/// softmax; returns the embedding's width.
fn head(g: &mut Graph<'_>, features: &str, config: &DenseNetConfig) -> i64 {
    let pooled = g.node("GlobalAveragePool", &[features], vec![]);
    g.nodes.push(node(
        "Flatten",
        &[&pooled],
        EMBEDDING_NAME,
        vec![int("axis", 1)],
    ));
    let w = g.init("classifier.weight");
    let bias = g.init("classifier.bias");
    let (head_in, head_w) = match g.quant {
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
    let channels = g.weights["classifier.weight"].shape[1] as i64;
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
        &[features, &kernel],
        CAM_NAME,
        vec![ints("kernel_shape", &[1, 1])],
    ));
    g.nodes.push(node(
        "Softmax",
        &[LOGITS_NAME],
        PROBABILITIES_NAME,
        vec![int("axis", 1)],
    ));

    channels
}

/// The graph's name, input and outputs (nodes and initializers are added after).
fn graph_proto(config: &DenseNetConfig, opts: &WriteOptions, channels: i64) -> GraphProto {
    let s = i64::from(opts.input_size);
    let classes = config.num_classes as i64;
    GraphProto {
        node: vec![],
        name: "densenet".into(),
        initializer: vec![],
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
    }
}

/// The model around `graph`: opset, producer, description and metadata.
fn model_proto(graph: GraphProto, opts: &WriteOptions) -> ModelProto {
    ModelProto {
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
    }
}
