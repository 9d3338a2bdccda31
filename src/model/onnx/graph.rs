//! The graph under construction: initializers in the file's storage (FP32, FP16,
//! INT8 per channel), nodes with fresh names, and the calibration or QDQ wrapping of
//! each convolution; plus the protobuf helpers the writer uses.

use half::f16;

use super::options::{Quant, WeightStorage};
use super::proto::{
    AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_type, data_type, tensor_shape_proto, type_proto,
};

use crate::model::arch::{BN_EPS, Weights};
use crate::model::onnx::quant::fold_bn;
use crate::model::onnx::quant::quantize_per_channel;

pub(super) struct Graph<'w> {
    pub(super) nodes: Vec<NodeProto>,
    pub(super) inits: Vec<TensorProto>,
    pub(super) weights: &'w Weights,
    pub(super) storage: WeightStorage,
    pub(super) next: usize,
    pub(super) quant: &'w Quant,
    /// Tensors exposed as outputs (calibration).
    pub(super) exposed: Vec<String>,
    /// Tensors the INT8 graph needed a range for and had none.
    pub(super) missing: Vec<String>,
}

impl Graph<'_> {
    pub(super) fn fresh(&mut self, op: &str) -> String {
        self.next += 1;
        format!("{}_{}", op.to_lowercase(), self.next)
    }

    pub(super) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(node(op, inputs, &out, attrs));
        out
    }

    /// Adds the initializer `name` and returns the name its float32 value has in the
    /// graph (a Cast output when stored as FP16).
    pub(super) fn init(&mut self, name: &str) -> String {
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

    /// A square convolution's attributes, its kernel from the weight `name`'s shape.
    fn conv_attrs(&self, name: &str, stride: i64, pad: i64) -> Vec<AttributeProto> {
        let k = self.weights[name].shape[2] as i64;
        vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad, pad, pad, pad]),
        ]
    }

    pub(super) fn conv(&mut self, p: &str, x: &str, stride: i64, pad: i64) -> String {
        let name = format!("{p}.weight");
        let attrs = self.conv_attrs(&name, stride, pad);
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
    pub(super) fn conv_bn_relu(
        &mut self,
        p: &str,
        bn: &str,
        x: &str,
        stride: i64,
        pad: i64,
    ) -> String {
        if matches!(self.quant, Quant::None) {
            let y = self.conv(p, x, stride, pad);
            let y = self.bn(bn, &y);
            return self.relu(&y);
        }
        let name = format!("{p}.weight");
        let shape = self.weights[&name].shape.clone();
        let attrs = self.conv_attrs(&name, stride, pad);
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
    pub(super) fn qdq(&mut self, x: &str) -> String {
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
    pub(super) fn init_int8(&mut self, name: &str) -> String {
        let t = &self.weights[name];
        let (q, scales) = quantize_per_channel(&t.data, t.shape[0]);
        let dims = t.shape.iter().map(|&d| d as i64).collect();
        self.push_int8(name, dims, &q, &scales)
    }

    /// Stores `q` (INT8, shape `dims`) with per-row `scales` as `<name>::int8`,
    /// `<name>::wscale`, `<name>::wzp` and dequantises it along axis 0; returns the
    /// float tensor's name.
    pub(super) fn push_int8(
        &mut self,
        name: &str,
        dims: Vec<i64>,
        q: &[i8],
        scales: &[f32],
    ) -> String {
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

    pub(super) fn bn(&mut self, p: &str, x: &str) -> String {
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

    pub(super) fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }
}

/// A float32 initializer.
pub(super) fn float_tensor(name: &str, dims: Vec<i64>, data: &[f32]) -> TensorProto {
    TensorProto {
        dims,
        data_type: data_type::FLOAT,
        name: name.into(),
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// A float32 graph output with no declared shape (calibration's exposed tensors).
pub(super) fn untyped_shape(name: &str) -> ValueInfoProto {
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

pub(super) fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

pub(super) fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i,
        ..Default::default()
    }
}

pub(super) fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub(super) fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f,
        ..Default::default()
    }
}

/// A float32 tensor value-info; `Err(name)` is a dynamic axis.
pub(super) fn value_info(name: &str, dims: &[Result<i64, &str>]) -> ValueInfoProto {
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
