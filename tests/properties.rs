//! Property tests (proptest) of every parser a client reaches: the DICOM decoder (its
//! length guard, its attribute readers, its text values in any character set), the
//! upload readers (raw and multipart), the Open Inference Protocol's JSON and binary
//! decoders, and the query parameters. Thousands of generated inputs each; none may
//! panic, and through the app none may be answered 5xx.

mod common;

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::dicom::{self as d, Spec};
use dicom_core::VR;
use dicom_dictionary_std::tags;
use proptest::prelude::*;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn app() -> &'static common::TestApp {
    static APP: OnceLock<common::TestApp> = OnceLock::new();
    APP.get_or_init(|| {
        // The app's batch workers live on their own threads; its blocking pool is the
        // runtime's.
        let _g = rt().enter();
        common::test_app()
    })
}

/// The status `req` is answered with (a panic in a handler fails the case).
fn status(req: Request<Body>) -> StatusCode {
    rt().block_on(async { common::http::send(&app().app, req).await.0 })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid CR with text values planted as markers, to be overwritten with any bytes.
fn planted_cr() -> (Vec<u8>, Vec<usize>) {
    static FILE: OnceLock<(Vec<u8>, Vec<usize>)> = OnceLock::new();
    FILE.get_or_init(|| {
        let g = d::test_gray(48, 40, 3);
        let file = d::build(&Spec::new(40, 48, 8, d::stored(&g, |v| v)));
        let markers = [
            (tags::PATIENT_AGE, VR::AS, "01QY"),
            (tags::BODY_PART_EXAMINED, VR::CS, "QQBODYQQ"),
            (tags::INSTITUTION_NAME, VR::LO, "QQINSTQQ"),
            (tags::MANUFACTURER, VR::LO, "QQMANUQQ"),
        ];
        let file = d::with_tags(&file, &markers);
        let at = markers
            .iter()
            .map(|(_, _, m)| {
                file.windows(m.len())
                    .position(|w| w == m.as_bytes())
                    .expect("planted")
            })
            .collect();
        (file, at)
    })
    .clone()
}

/// One change to a file: overwrite bytes, cut it, or insert bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Overwrite(usize, Vec<u8>),
    Cut(usize),
    Insert(usize, Vec<u8>),
    /// A 16- or 32-bit length field somewhere set to an extreme value.
    Length(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(0xFFFF),
                Just(0xFFFF_FFFF),
                any::<u32>()
            ]
        )
            .prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

fn apply(mut file: Vec<u8>, m: &Mutation) -> Vec<u8> {
    // Past the 128-byte preamble and "DICM": the parsers' input.
    let span = |i: usize, len: usize| 132 + i % len.saturating_sub(132).max(1);
    match m {
        Mutation::Overwrite(i, b) => {
            let at = span(*i, file.len());
            for (k, x) in b.iter().enumerate() {
                if let Some(slot) = file.get_mut(at + k) {
                    *slot = *x;
                }
            }
        }
        Mutation::Cut(i) => file.truncate(span(*i, file.len())),
        Mutation::Insert(i, b) => {
            let at = span(*i, file.len()).min(file.len());
            file.splice(at..at, b.iter().copied());
        }
        Mutation::Length(i, v) => {
            let at = span(*i, file.len());
            if at + 4 <= file.len() {
                file[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    file
}

proptest! {
    #![proptest_config(config(3000))]

    /// Any bytes in the text values (another character set, a multi-byte character
    /// split, control bytes): decoded or refused, never a panic.
    #[test]
    fn dicom_text_values_in_any_bytes(values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 4)) {
        let (mut file, at) = planted_cr();
        // Each marker's room (its even length) gets up to that many of the bytes.
        let room = [4usize, 8, 8, 8];
        for ((pos, n), v) in at.iter().zip(room).zip(&values) {
            for k in 0..n {
                file[pos + k] = *v.get(k).unwrap_or(&b' ');
            }
        }
        let _ = cxr::imaging::dicom::decode_dicom(&file, 40_000_000, d::test_opts());
    }

    /// A valid file with up to four mutations (bytes changed, cut, inserted, a
    /// length field set to an extreme): the length guard and the readers refuse or
    /// decode, never panic.
    #[test]
    fn dicom_mutated_files(ms in prop::collection::vec(mutation(), 1..4)) {
        let (file, _) = planted_cr();
        let file = ms.iter().fold(file, apply);
        let _ = cxr::imaging::dicom::decode_dicom(&file, 40_000_000, d::test_opts());
    }

    /// Arbitrary bytes behind a DICOM preamble.
    #[test]
    fn dicom_arbitrary_data_sets(body in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        file.extend_from_slice(&body);
        let _ = cxr::imaging::dicom::decode_dicom(&file, 40_000_000, d::test_opts());
    }
}

/// A JSON value built from the protocol's own words, nested a few levels: the
/// shapes a client (or an attacker) plausibly sends.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let words = prop::sample::select(vec![
        "inputs",
        "outputs",
        "name",
        "shape",
        "datatype",
        "data",
        "parameters",
        "image",
        "input",
        "BYTES",
        "FP32",
        "INT8",
        "binary_data_size",
        "binary_data",
        "b64",
        "threshold",
        "operating_point",
        "binary_data_output",
        "id",
        "probabilities",
        "label",
        "ood_score",
        "sensitivity:0.95",
        "",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(3),
            Just(32),
            Just(1 << 40)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        words.clone().prop_map(Value::from),
        "[A-Za-z0-9+/=]{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((words.clone(), inner), 0..6).prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// An inference request around generated parts: mostly well-formed, so the decoders
/// past the JSON parser are reached.
fn infer_request() -> impl Strategy<Value = serde_json::Value> {
    (
        prop::sample::select(vec!["image", "input", "x"]),
        prop::sample::select(vec!["BYTES", "FP32", "UINT8"]),
        prop::collection::vec(prop_oneof![Just(-1i64), Just(0), Just(1), Just(2), Just(3), Just(32), any::<i64>()], 0..5),
        json_value(),
        json_value(),
        json_value(),
    )
        .prop_map(|(name, datatype, shape, data, parameters, outputs)| {
            serde_json::json!({
                "inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data, "parameters": parameters}],
                "outputs": outputs,
                "parameters": parameters,
            })
        })
}

fn post(uri: &str, headers: &[(&str, String)], body: Vec<u8>) -> Request<Body> {
    let mut r = Request::post(uri);
    for (k, v) in headers {
        r = r.header(*k, v.as_str());
    }
    r.body(Body::from(body)).unwrap()
}

proptest! {
    #![proptest_config(config(1500))]

    /// V2 JSON: any JSON of the protocol's words, and requests shaped like the
    /// protocol's with generated parts: 2xx or 4xx, never 5xx or a panic.
    #[test]
    fn v2_json_bodies(v in prop_oneof![json_value(), infer_request()]) {
        let body = serde_json::to_vec(&v).unwrap();
        let s = status(post("/v2/models/alpha/infer", &[("content-type", "application/json".into())], body));
        prop_assert!(s.as_u16() < 500, "{s} for {v}");
    }

    /// V2 binary: a JSON header of any declared length, then any bytes (length
    /// prefixes of BYTES elements, FP32 values).
    #[test]
    fn v2_binary_bodies(
        header in infer_request(),
        declared in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        tail in prop::collection::vec(any::<u8>(), 0..256),
        size_hint in any::<u8>(),
    ) {
        let mut header = header;
        // The declared size: the tail's, one less or one more.
        let size = (tail.len() as u64 + u64::from(size_hint % 3)).saturating_sub(1);
        header["inputs"][0]["parameters"] = serde_json::json!({"binary_data_size": size});
        let json = serde_json::to_vec(&header).unwrap();
        let len = declared.map_or(json.len() as u64, u64::from);
        let mut body = json;
        body.extend_from_slice(&tail);
        let s = status(post(
            "/v2/models/alpha/infer",
            &[("content-type", "application/octet-stream".into()), ("inference-header-content-length", len.to_string())],
            body,
        ));
        prop_assert!(s.as_u16() < 500, "{s}");
    }

    /// Multipart: generated boundaries, part headers and bodies (images among them).
    #[test]
    fn multipart_bodies(
        boundary in "[A-Za-z0-9'()+_,./:=?-]{1,70}",
        parts in prop::collection::vec((
            prop::sample::select(vec!["image", "file", "", "image\"; x=\""]),
            prop::sample::select(vec!["image/png", "image/jpeg", "application/dicom", "application/octet-stream", "text/plain", ""]),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                Just(common::png_bytes(&common::gray_image(24, 20, 1))),
            ],
            any::<bool>(),
        ), 0..4),
        declared in prop_oneof![Just(None), "[ -~]{0,80}".prop_map(Some)],
        epilogue in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut body = Vec::new();
        for (name, ct, bytes, crlf) in &parts {
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x\"\r\n").as_bytes());
            if !ct.is_empty() {
                body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(bytes);
            if *crlf {
                body.extend_from_slice(b"\r\n");
            }
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body.extend_from_slice(&epilogue);
        let ct = declared.unwrap_or_else(|| format!("multipart/form-data; boundary={boundary}"));
        let s = status(post("/predict", &[("content-type", ct)], body));
        prop_assert!(s.as_u16() < 500, "{s}");
    }

    /// Raw uploads: any bytes under any declared type.
    #[test]
    fn raw_bodies(
        ct in prop_oneof![
            prop::sample::select(vec!["image/png", "image/jpeg", "application/dicom", "application/octet-stream", "multipart/form-data", "text/plain; charset=utf-8"]).prop_map(str::to_string),
            "[ -~]{0,40}",
        ],
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            Just(common::png_bytes(&common::gray_image(24, 20, 2))).prop_flat_map(|png| (Just(png.clone()), 0..png.len()).prop_map(|(p, n)| p[..n].to_vec())),
        ],
    ) {
        let s = status(post("/predict", &[("content-type", ct)], body));
        prop_assert!(s.as_u16() < 500, "{s}");
    }

    /// Query parameters: any (percent-encoded) keys and values, and the real keys
    /// with any values.
    #[test]
    fn query_parameters(
        pairs in prop::collection::vec((
            prop_oneof![
                prop::sample::select(vec!["model", "prefer", "threshold", "operating_point", "explain", "x"]).prop_map(str::to_string),
                "[ -~]{0,12}",
            ],
            prop_oneof![
                "[ -~]{0,24}",
                prop::sample::select(vec!["alpha", "beta", "sensitivity", "specificity", "0.5", "-1", "NaN", "1e309", "sensitivity:0.95", "specificity:2", "true"]).prop_map(str::to_string),
            ],
        ), 0..5),
    ) {
        let enc = |s: &str| -> String {
            s.bytes().map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") }).collect()
        };
        let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
        let uri = format!("/predict?{}", q.join("&"));
        let png = common::png_bytes(&common::gray_image(24, 20, 3));
        let s = status(post(&uri, &[("content-type", "image/png".into())], png));
        prop_assert!(s.as_u16() < 500, "{s} for {uri}");
    }
}
