//! The Open Inference Protocol (KServe V2), once for both of its transports: the
//! REST door (`http/v2`) and the gRPC door (`grpc`) each translate their wire
//! format into these types (parameters, the asked outputs, the one input), call
//! [`infer`], and write its [`Answer`] back in their own format. The checks, the
//! parameters accepted and answered, and the output tensors live here only, so the
//! two doors cannot drift apart (issue #44: gRPC had dropped `client_request_id` and
//! answered `threshold` as a string).

pub mod tensor;

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::ood_score::OodAction;
use crate::predict::Answers;
use crate::predict::Ask;
use crate::predict::Core;
use crate::predict::Decoded;
use crate::predict::PredictError;
use crate::predict::Prediction;
use crate::predict::Upload;
use crate::predict::Valid;

/// A request or response parameter, as both transports carry it (gRPC's
/// `InferParameter` choices; a JSON scalar).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// `bool_param`, a JSON boolean.
    Bool(bool),
    /// `int64_param`, a JSON integer.
    Int(i64),
    /// `uint64_param`, a JSON integer above `i64::MAX`.
    Uint(u64),
    /// `double_param`, a JSON number with a fraction.
    Double(f64),
    /// `string_param`, a JSON string.
    Str(String),
}

impl Param {
    /// A JSON scalar as a parameter (`None`: an array, an object or null).
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        use serde_json::Value;
        Some(match v {
            Value::Bool(b) => Param::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Param::Int(i),
                (None, Some(u), _) => Param::Uint(u),
                (None, None, Some(f)) => Param::Double(f),
                _ => return None,
            },
            Value::String(s) => Param::Str(s.clone()),
            Value::Null | Value::Array(_) | Value::Object(_) => return None,
        })
    }

    /// The parameter as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Param::Bool(b) => (*b).into(),
            Param::Int(i) => (*i).into(),
            Param::Uint(u) => (*u).into(),
            Param::Double(f) => (*f).into(),
            Param::Str(s) => s.clone().into(),
        }
    }

    /// A number: any numeric choice, or a string that is one (clients whose
    /// parameter types have no double send it so).
    fn number(&self) -> Option<f64> {
        match self {
            Param::Int(i) => Some(*i as f64),
            Param::Uint(u) => Some(*u as f64),
            Param::Double(f) => Some(*f),
            Param::Str(s) => s.trim().parse().ok(),
            Param::Bool(_) => None,
        }
    }
}

/// A request's parameters by name (`None`: a value the transport could not carry
/// as a scalar, refused where it is read).
pub type Params = BTreeMap<String, Option<Param>>;

/// What the request's `threshold` and `operating_point` parameters ask (as
/// `/predict`'s query does).
pub fn ask_of(parameters: &Params) -> Result<Ask, PredictError> {
    let threshold = match parameters.get("threshold") {
        None => None,
        Some(p) => Some(p.as_ref().and_then(Param::number).ok_or_else(|| {
            PredictError::InvalidRequest("parameter `threshold` must be a number".into())
        })?),
    };
    let operating_point = match parameters.get("operating_point") {
        None => None,
        Some(Some(Param::Str(s))) => Some(s.clone()),
        Some(_) => {
            return Err(PredictError::InvalidRequest(
                "parameter `operating_point` must be a string such as `sensitivity:0.95`".into(),
            ));
        }
    };
    Ok(Ask {
        threshold,
        operating_point,
        ..Ask::default()
    })
}

/// An output a model answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `probabilities`: FP32 `[N, 2]`, P(NORMAL) and P(PNEUMONIA).
    Probabilities,
    /// `label`: BYTES `[N]`, `NORMAL` or `PNEUMONIA`.
    Label,
    /// `ood_score`: FP64 `[N]` (models with an OOD model).
    OodScore,
}

impl Output {
    /// Its name in the protocol.
    pub fn name(self) -> &'static str {
        match self {
            Output::Probabilities => "probabilities",
            Output::Label => "label",
            Output::OodScore => "ood_score",
        }
    }

    fn parse(name: &str) -> Result<Self, PredictError> {
        Ok(match name {
            "probabilities" => Output::Probabilities,
            "label" => Output::Label,
            "ood_score" => Output::OodScore,
            other => {
                return Err(PredictError::InvalidRequest(format!(
                    "unknown output `{other}`; this model has `probabilities`, `label` and (with an OOD model) `ood_score`"
                )));
            }
        })
    }
}

/// An output the request names, with its parameters.
#[derive(Debug, Clone)]
pub struct AskedOutput {
    /// Its name.
    pub name: String,
    /// Its parameters (`binary_data`).
    pub parameters: Params,
}

/// An output to answer, and whether its data goes as binary (REST's
/// `binary_data`; gRPC always answers in `raw_output_contents`).
pub type Selected = (Output, bool);

/// The outputs to answer, in order: those asked, or `probabilities` and `label`.
/// `binary_data_output` (a request parameter) is every output's default.
pub fn selected_outputs(
    parameters: &Params,
    asked: Option<&[AskedOutput]>,
) -> Result<Vec<Selected>, PredictError> {
    let flag = |p: Option<&Option<Param>>, what: &str| match p {
        None => Ok(None),
        Some(Some(Param::Bool(b))) => Ok(Some(*b)),
        Some(_) => Err(PredictError::InvalidRequest(format!(
            "{what} must be a boolean"
        ))),
    };
    let all_binary = flag(
        parameters.get("binary_data_output"),
        "parameter `binary_data_output`",
    )?
    .unwrap_or(false);
    let Some(asked) = asked.filter(|a| !a.is_empty()) else {
        return Ok(vec![
            (Output::Probabilities, all_binary),
            (Output::Label, all_binary),
        ]);
    };
    asked
        .iter()
        .map(|o| {
            let out = Output::parse(&o.name)?;
            let what = format!("output `{}`: parameter `binary_data`", out.name());
            let binary = flag(o.parameters.get("binary_data"), &what)?.unwrap_or(all_binary);
            Ok((out, binary))
        })
        .collect()
}

/// What a request's one input holds, checked against the model's input size and
/// the request limits: the encoded files of `image`, or the rows of `input`.
pub enum Inputs {
    /// `image` (BYTES `[N]`): the encoded files.
    Files(Vec<Bytes>),
    /// `input` (FP32 `[N, 3, S, S]`): the preprocessed rows.
    Rows(Vec<Decoded>),
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inputs::Files(files) => write!(f, "Files({} files)", files.len()),
            Inputs::Rows(rows) => write!(f, "Rows({} rows)", rows.len()),
        }
    }
}

/// The request's one input of `inputs` (`size`: the model's input size, named in the refusal).
pub fn one_input<T>(inputs: Vec<T>, size: u32) -> Result<T, PredictError> {
    <[T; 1]>::try_from(inputs)
        .map(|[one]| one)
        .map_err(|inputs| {
            PredictError::InvalidRequest(format!(
                "{} inputs; send exactly one: `image` (BYTES, encoded files) or `input` (FP32 [N, 3, {size}, {size}])",
                inputs.len(),
            ))
        })
}

/// An input's declared datatype is the one its name takes.
pub fn check_datatype(name: &str, datatype: &str, want: &str) -> Result<(), PredictError> {
    if datatype != want {
        return Err(PredictError::InvalidRequest(format!(
            "input `{name}` must have datatype {want}, not {datatype}"
        )));
    }
    Ok(())
}

/// An input named other than `image` or `input`.
pub fn unknown_input(name: &str, model: &str) -> PredictError {
    PredictError::InvalidRequest(format!(
        "unknown input `{name}`; model `{model}` takes `image` (BYTES) or `input` (FP32)"
    ))
}

/// An output tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// FP32.
    Fp32(Vec<f32>),
    /// FP64.
    Fp64(Vec<f64>),
    /// BYTES (here, text).
    Bytes(Vec<&'static str>),
}

/// One output tensor of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    /// Its output.
    pub output: Output,
    /// Whether its data goes as binary (REST).
    pub binary: bool,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its values.
    pub data: TensorData,
}

impl OutTensor {
    /// Its datatype's name.
    pub fn datatype(&self) -> &'static str {
        match self.data {
            TensorData::Fp32(_) => "FP32",
            TensorData::Fp64(_) => "FP64",
            TensorData::Bytes(_) => "BYTES",
        }
    }

    /// Its values as the protocol's binary data: little-endian, BYTES elements each
    /// a 4-byte little-endian length, then the bytes.
    pub fn raw(&self) -> Vec<u8> {
        match &self.data {
            TensorData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Fp64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bytes(v) => v
                .iter()
                .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
                .collect(),
        }
    }

    /// Its values as JSON (REST's `data`).
    pub fn json(&self) -> serde_json::Value {
        match &self.data {
            TensorData::Fp32(v) => serde_json::json!(v),
            TensorData::Fp64(v) => serde_json::json!(v),
            TensorData::Bytes(v) => serde_json::json!(v),
        }
    }
}

/// What a request is answered with, before a transport writes it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The model's name.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// The response parameters: `threshold`, `threshold_source`, `request_id`,
    /// `client_request_id` (when the caller gave one), `execution_provider`.
    pub parameters: Vec<(&'static str, Param)>,
    /// The asked outputs, in order.
    pub outputs: Vec<OutTensor>,
}

/// The asked outputs of typed answers.
pub fn output_tensors(predictions: &[Prediction], outputs: &[Selected]) -> Vec<OutTensor> {
    let n = predictions.len() as i64;
    outputs
        .iter()
        .map(|&(output, binary)| {
            let (shape, data) = match output {
                Output::Probabilities => (
                    vec![n, 2],
                    TensorData::Fp32(
                        predictions
                            .iter()
                            .flat_map(|p| [p.probabilities.NORMAL, p.probabilities.PNEUMONIA])
                            .collect(),
                    ),
                ),
                // Checked before inference: every answer has a score.
                Output::OodScore => (
                    vec![n],
                    TensorData::Fp64(
                        predictions
                            .iter()
                            .map(|p| p.ood_score.unwrap_or(f64::NAN))
                            .collect(),
                    ),
                ),
                Output::Label => (
                    vec![n],
                    TensorData::Bytes(predictions.iter().map(|p| p.label.as_str()).collect()),
                ),
            };
            OutTensor {
                output,
                binary,
                shape,
                data,
            }
        })
        .collect()
}

/// Answers a validated request's input with the asked outputs: `ood_score` is
/// refused before inference when the model has no score to give.
pub async fn infer(
    core: &Core,
    valid: &Valid,
    outputs: &[Selected],
    inputs: Inputs,
) -> Result<Answer, PredictError> {
    let model = &valid.model;
    if outputs.iter().any(|(o, _)| *o == Output::OodScore)
        && (model.ood.is_none() || core.limits().ood_action == OodAction::Off)
    {
        return Err(PredictError::InvalidRequest(format!(
            "output `ood_score`: model `{}` has no out-of-distribution model, or the server runs with --ood-action off",
            model.card.name
        )));
    }
    let Answers { predictions, .. } = match inputs {
        Inputs::Files(files) => {
            let uploads = files.into_iter().map(Upload::sniff).collect();
            core.answer_files(valid, uploads).await?
        }
        Inputs::Rows(rows) => core.answer_decoded(valid, rows).await?,
    };
    let decision = &valid.decision;
    let mut parameters = vec![
        ("threshold", Param::Double(decision.threshold)),
        (
            "threshold_source",
            Param::Str(decision.source.kind.as_str().into()),
        ),
        ("request_id", Param::Str(valid.asker.request_id.clone())),
    ];
    if let Some(client) = &valid.asker.client_request_id {
        parameters.push(("client_request_id", Param::Str(client.clone())));
    }
    parameters.push((
        "execution_provider",
        Param::Str(model.provider.as_str().into()),
    ));
    Ok(Answer {
        model_name: model.card.name.clone(),
        model_version: model.card.version.clone(),
        parameters,
        outputs: output_tensors(&predictions, outputs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, Param)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Some(v.clone())))
            .collect()
    }

    #[test]
    fn a_threshold_is_a_number_of_any_numeric_kind_or_a_numeric_string() {
        for p in [
            Param::Double(0.25),
            Param::Str("0.25".into()),
            Param::Str(" 0.25 ".into()),
        ] {
            assert_eq!(
                ask_of(&params(&[("threshold", p)])).unwrap().threshold,
                Some(0.25)
            );
        }
        assert_eq!(
            ask_of(&params(&[("threshold", Param::Int(1))]))
                .unwrap()
                .threshold,
            Some(1.0)
        );
        for p in [Param::Bool(true), Param::Str("high".into())] {
            assert!(ask_of(&params(&[("threshold", p)])).is_err());
        }
        let mut none = Params::new();
        none.insert("threshold".into(), None);
        assert!(ask_of(&none).is_err());
        assert!(ask_of(&params(&[("operating_point", Param::Int(3))])).is_err());
    }

    #[test]
    fn outputs_default_to_probabilities_and_label_and_binary_follows_the_flags() {
        let none = Params::new();
        assert_eq!(
            selected_outputs(&none, None).unwrap(),
            vec![(Output::Probabilities, false), (Output::Label, false)]
        );
        let all = params(&[("binary_data_output", Param::Bool(true))]);
        let asked = [
            AskedOutput {
                name: "label".into(),
                parameters: params(&[("binary_data", Param::Bool(false))]),
            },
            AskedOutput {
                name: "ood_score".into(),
                parameters: Params::new(),
            },
        ];
        assert_eq!(
            selected_outputs(&all, Some(&asked)).unwrap(),
            vec![(Output::Label, false), (Output::OodScore, true)]
        );
        let bad = [AskedOutput {
            name: "logits".into(),
            parameters: Params::new(),
        }];
        assert!(selected_outputs(&none, Some(&bad)).is_err());
    }

    #[test]
    fn bytes_tensors_are_length_prefixed_and_numbers_little_endian() {
        let t = OutTensor {
            output: Output::Label,
            binary: true,
            shape: vec![2],
            data: TensorData::Bytes(vec!["NORMAL", "PNEUMONIA"]),
        };
        let mut want = 6u32.to_le_bytes().to_vec();
        want.extend_from_slice(b"NORMAL");
        want.extend_from_slice(&9u32.to_le_bytes());
        want.extend_from_slice(b"PNEUMONIA");
        assert_eq!(t.raw(), want);
        let f = OutTensor {
            output: Output::OodScore,
            binary: false,
            shape: vec![1],
            data: TensorData::Fp64(vec![1.5]),
        };
        assert_eq!(f.raw(), 1.5f64.to_le_bytes().to_vec());
        assert_eq!(f.json(), serde_json::json!([1.5]));
    }
}
