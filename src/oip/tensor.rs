//! The Open Inference Protocol's two inputs, checked the same at every door that
//! speaks it (REST `/v2`, gRPC): `image` (`BYTES [N]`, encoded files) and `input`
//! (`FP32 [N, 3, S, S]`, preprocessed rows).

use bytes::Bytes;

use crate::inference::ServedModel;
use crate::predict::Decoded;
use crate::predict::PredictError;
use crate::predict::UploadFacts;

/// A batch of `n` elements: at least one, at most `max`.
pub fn check_batch(n: usize, max: usize) -> Result<(), PredictError> {
    if n == 0 {
        return Err(PredictError::InvalidRequest(
            "the input holds no element".into(),
        ));
    }
    if n > max {
        return Err(PredictError::TooManyImages(n, max));
    }
    Ok(())
}

/// The batch size of an `image` input of shape `[N]` (or `[N, 1]`).
pub fn image_batch(shape: &[i64], max: usize) -> Result<usize, PredictError> {
    let n = match shape {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        other => {
            return Err(PredictError::InvalidRequest(format!(
                "input `image` must have shape [N] (one encoded file per element), not {other:?}"
            )));
        }
    };
    check_batch(n, max)?;
    Ok(n)
}

/// Why the bytes of an `image` input are malformed.
pub fn bad_bytes(what: &str) -> PredictError {
    PredictError::InvalidRequest(format!(
        "input `image` binary data: {what} (each element is a 4-byte little-endian length, then the bytes)"
    ))
}

/// The `n` elements of an `image` input in binary: each a 4-byte little-endian
/// length, then its bytes.
pub fn length_prefixed(mut b: &[u8], n: usize) -> Result<Vec<Bytes>, PredictError> {
    let mut files = Vec::new();
    while !b.is_empty() {
        if files.len() == n {
            return Err(PredictError::InvalidRequest(format!(
                "input `image` has shape [{n}] but holds more elements"
            )));
        }
        let (len, rest) = b
            .split_first_chunk::<4>()
            .ok_or_else(|| bad_bytes("a length prefix is cut short"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad_bytes("an element is longer than the bytes left"));
        }
        files.push(Bytes::copy_from_slice(&rest[..len]));
        b = &rest[len..];
    }
    check_count(files.len(), n)?;
    Ok(files)
}

/// An `image` input holds as many elements as its shape says.
pub fn check_count(got: usize, n: usize) -> Result<(), PredictError> {
    if got != n {
        return Err(PredictError::InvalidRequest(format!(
            "input `image` has shape [{n}] but holds {got} elements"
        )));
    }
    Ok(())
}

/// The batch size of an `input` tensor of shape `[N, 3, S, S]` for a model of
/// input size `size`.
pub fn tensor_batch(shape: &[i64], size: u32, max: usize) -> Result<usize, PredictError> {
    let s = i64::from(size);
    let n = match shape {
        [n, 3, h, w] if *n >= 0 && *h == s && *w == s => *n as usize,
        other => {
            return Err(PredictError::InvalidRequest(format!(
                "input `input` must have shape [N, 3, {s}, {s}] for this model, not {other:?}"
            )));
        }
    };
    check_batch(n, max)?;
    Ok(n)
}

/// FP32 values from little-endian bytes: exactly `needed` of them.
pub fn le_f32(b: &[u8], needed: usize, shape: &[i64]) -> Result<Vec<f32>, PredictError> {
    if b.len() != needed * 4 {
        return Err(PredictError::InvalidRequest(format!(
            "input `input` has {} bytes of FP32 data; shape {shape:?} needs {}",
            b.len(),
            needed * 4
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The rows of an `input` tensor (`row` values each, every one finite) as decoded
/// inputs.
pub fn rows(
    values: &[f32],
    n: usize,
    row: usize,
    shape: &[i64],
) -> Result<Vec<Decoded>, PredictError> {
    if values.len() != n * row {
        return Err(PredictError::InvalidRequest(format!(
            "input `input` holds {} values; shape {shape:?} needs {}",
            values.len(),
            n * row
        )));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::InvalidRequest(
            "input `input` holds a value that is not finite (NaN or infinity)".into(),
        ));
    }
    Ok(values
        .chunks_exact(row)
        .map(|r| Decoded {
            input: r.to_vec(),
            took: std::time::Duration::ZERO,
            dicom: None,
            warnings: Vec::new(),
            upload: UploadFacts::of_tensor(r),
            sr: None,
            arrival: None,
            gates: None,
        })
        .collect())
}

/// A tensor's name, datatype and shape (-1: any size).
pub type TensorSpec = (&'static str, &'static str, Vec<i64>);

/// The server's name, version and protocol extensions.
pub fn server_metadata() -> (&'static str, &'static str, Vec<&'static str>) {
    ("cxr", env!("CARGO_PKG_VERSION"), vec!["binary_tensor_data"])
}

/// A model's platform, inputs (send one of them) and outputs.
pub fn model_tensors(m: &ServedModel) -> (&'static str, Vec<TensorSpec>, Vec<TensorSpec>) {
    let s = i64::from(m.card.input_size);
    let mut outputs = vec![
        ("probabilities", "FP32", vec![-1, 2]),
        ("label", "BYTES", vec![-1]),
    ];
    if m.ood.is_some() {
        outputs.push(("ood_score", "FP64", vec![-1]));
    }
    (
        "onnxruntime_onnx",
        vec![
            ("image", "BYTES", vec![-1]),
            ("input", "FP32", vec![-1, 3, s, s]),
        ],
        outputs,
    )
}
