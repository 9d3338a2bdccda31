//! Property tests (proptest) of the gRPC door's translation of a `ModelInferRequest`
//! ([`cxr::grpc::translate`]: parameters, outputs, and the one input's shape,
//! datatype, `contents` or `raw_input_contents`, BYTES length prefixes) and of its
//! message framing ([`cxr::grpc::Framing`]). Thousands of generated requests: none
//! may panic, and what is accepted is bounded by the declared limits and by the
//! bytes sent, never by what a shape or a length prefix claims. (Issue #43.)

use cxr::grpc::Inputs;
use cxr::grpc::pb;
use cxr::grpc::pb::infer_parameter::ParameterChoice;
use cxr::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use proptest::prelude::*;

/// The most images a request may hold here (`--max-images-per-request`).
const MAX: usize = 16;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Shape dimensions: small ones that fit, and the extremes a hostile client sends.
fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..20,
        1 => Just(3i64),
        1 => Just(1i64 << 40),
        1 => Just(i64::MAX),
        1 => Just(-1i64),
        1 => any::<i64>(),
    ]
}

/// BYTES elements in binary: each a 4-byte length (true, or any) and its bytes.
fn length_prefixed() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..40),
            prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)],
        ),
        0..20,
    )
    .prop_map(|elements| {
        let mut out = Vec::new();
        for (bytes, lie) in elements {
            let len = lie.unwrap_or(bytes.len() as u32);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    })
}

fn parameter() -> impl Strategy<Value = pb::InferParameter> {
    prop_oneof![
        any::<bool>().prop_map(ParameterChoice::BoolParam),
        any::<i64>().prop_map(ParameterChoice::Int64Param),
        prop_oneof![
            Just("0.5".to_string()),
            Just("sensitivity:0.95".to_string()),
            ".{0,12}"
        ]
        .prop_map(ParameterChoice::StringParam),
    ]
    .prop_map(|c| pb::InferParameter {
        parameter_choice: Some(c),
    })
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        prop_oneof![
            Just("image".to_string()),
            Just("input".to_string()),
            ".{0,6}"
        ],
        prop_oneof![
            Just("BYTES".to_string()),
            Just("FP32".to_string()),
            ".{0,6}"
        ],
        prop::collection::vec(dim(), 0..6),
        prop::option::of((
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..20),
            prop::collection::vec(any::<f32>(), 0..200),
        )),
    )
        .prop_map(|(name, datatype, shape, contents)| InferInputTensor {
            name,
            datatype,
            shape,
            parameters: Default::default(),
            contents: contents.map(|(bytes, fp32)| pb::InferTensorContents {
                bytes_contents: bytes,
                fp32_contents: fp32,
                ..Default::default()
            }),
        })
}

fn request() -> impl Strategy<Value = pb::ModelInferRequest> {
    (
        prop::collection::vec(input(), 0..3),
        prop::collection::vec(
            prop_oneof![
                length_prefixed(),
                prop::collection::vec(any::<u8>(), 0..800),
                // Whole FP32 rows of a [1, 3, 4, 4] or [2, 3, 4, 4] input.
                prop::sample::select(vec![1usize, 2]).prop_map(|n| vec![0u8; n * 3 * 4 * 4 * 4]),
            ],
            0..3,
        ),
        prop::collection::hash_map(
            prop_oneof![
                Just("threshold".to_string()),
                Just("operating_point".to_string()),
                ".{0,8}"
            ],
            parameter(),
            0..3,
        ),
        prop::collection::vec(
            prop_oneof![
                Just("probabilities".to_string()),
                Just("label".to_string()),
                Just("ood_score".to_string()),
                ".{0,8}"
            ],
            0..4,
        ),
    )
        .prop_map(|(inputs, raw, parameters, outputs)| pb::ModelInferRequest {
            model_name: "alpha".into(),
            inputs,
            raw_input_contents: raw,
            parameters,
            outputs: outputs
                .into_iter()
                .map(|name| InferRequestedOutputTensor {
                    name,
                    parameters: Default::default(),
                })
                .collect(),
            ..Default::default()
        })
}

/// The bytes a request sends in its input's payloads.
fn sent_bytes(r: &pb::ModelInferRequest) -> usize {
    let raw: usize = r.raw_input_contents.iter().map(Vec::len).sum();
    let contents: usize = r
        .inputs
        .iter()
        .filter_map(|i| i.contents.as_ref())
        .map(|c| c.bytes_contents.iter().map(Vec::len).sum::<usize>() + 4 * c.fp32_contents.len())
        .sum();
    raw + contents
}

proptest! {
    #![proptest_config(config(4000))]

    /// Any request: refused or translated, never a panic; what is translated holds
    /// at most MAX images, no more bytes than were sent, and whole rows of the
    /// model's input size.
    #[test]
    fn any_infer_request_translates_within_its_limits(r in request()) {
        let size = 4u32;
        if let Ok((_, outputs, inputs)) = cxr::grpc::translate(&r, "alpha", size, MAX) {
            prop_assert!(!outputs.is_empty());
            match inputs {
                Inputs::Files(files) => {
                    prop_assert!(!files.is_empty() && files.len() <= MAX);
                    let total: usize = files.iter().map(|f| f.len()).sum();
                    prop_assert!(total <= sent_bytes(&r));
                }
                Inputs::Rows(rows) => {
                    prop_assert!(!rows.is_empty() && rows.len() <= MAX);
                    for row in &rows {
                        prop_assert_eq!(row.input.len(), 3 * 4 * 4);
                        prop_assert!(row.input.iter().all(|v| v.is_finite()));
                    }
                    prop_assert!(rows.len() * 3 * 4 * 4 * 4 <= sent_bytes(&r));
                }
            }
        }
    }

    /// gRPC's message framing, split anywhere: the same declared lengths, in order.
    #[test]
    fn message_prefixes_are_read_however_the_frames_split(
        lens in prop::collection::vec(0u32..3000, 1..6),
        cuts in prop::collection::vec(1usize..700, 1..40),
    ) {
        let mut wire = Vec::new();
        for len in &lens {
            wire.push(0);
            wire.extend_from_slice(&len.to_be_bytes());
            wire.resize(wire.len() + *len as usize, 1);
        }
        let (mut framing, mut got, mut at) = (cxr::grpc::Framing::default(), Vec::new(), 0);
        for cut in cuts.iter().cycle() {
            if at >= wire.len() {
                break;
            }
            let end = (at + cut).min(wire.len());
            framing
                .feed(&wire[at..end], |n| {
                    got.push(n);
                    Ok::<_, ()>(())
                })
                .unwrap();
            at = end;
        }
        prop_assert_eq!(got, lens);
    }
}

/// Shapes and length prefixes that claim more than was sent are refused before
/// anything is allocated for them (an allocation of what they claim, 2^40 elements
/// or 4 GiB, would abort this test).
#[test]
fn huge_claims_are_refused_before_allocating() {
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: Default::default(),
        contents: None,
    };
    let cases = [
        (tensor("image", "BYTES", vec![1 << 40]), vec![]),
        (tensor("image", "BYTES", vec![i64::MAX, 1]), vec![]),
        (tensor("image", "BYTES", vec![-1]), vec![]),
        (
            tensor("input", "FP32", vec![1 << 40, 3, 4, 4]),
            vec![0u8; 192],
        ),
        (
            tensor("input", "FP32", vec![1, 3, 1 << 20, 1 << 20]),
            vec![0u8; 192],
        ),
        // One element claiming 4 GiB in 8 bytes.
        (
            tensor("image", "BYTES", vec![1]),
            [u32::MAX.to_le_bytes(), [0; 4]].concat(),
        ),
        // Two elements declared, one million claimed by the prefixes.
        (tensor("image", "BYTES", vec![2]), [0u8; 4 * 1000].to_vec()),
    ];
    for (input, raw) in cases {
        let r = pb::ModelInferRequest {
            model_name: "alpha".into(),
            inputs: vec![input.clone()],
            raw_input_contents: if raw.is_empty() { vec![] } else { vec![raw] },
            ..Default::default()
        };
        let e = cxr::grpc::translate(&r, "alpha", 4, MAX).expect_err("refused");
        let code = cxr::grpc::status(&e).code();
        assert!(
            matches!(
                code,
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            ),
            "{input:?}: {code:?} {e}"
        );
    }
}
