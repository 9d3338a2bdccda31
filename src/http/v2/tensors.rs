//! An inference request's input tensor: its bytes (JSON or the binary part), its
//! files (`image`, BYTES) or rows (`input`, FP32), within the server's limits.

use super::*;

/// The input's bytes from the binary part, when it declares `binary_data_size` (the
/// only input, so they are the whole binary part).
pub(super) fn input_binary<'a>(
    input: &RequestInput,
    binary: &'a Bytes,
) -> Result<Option<&'a [u8]>, ApiError> {
    match input.parameters.get("binary_data_size") {
        None => {
            if !binary.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "{} bytes follow the JSON but input `{}` declares no binary_data_size",
                    binary.len(),
                    input.name
                )));
            }
            Ok(None)
        }
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                ApiError::BadRequest("binary_data_size must be a byte count".into())
            })? as usize;
            if n != binary.len() {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` declares binary_data_size {n} but {} bytes follow the JSON",
                    input.name,
                    binary.len()
                )));
            }
            if input.data.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "input `{}` has both `data` and binary_data_size",
                    input.name
                )));
            }
            Ok(Some(binary.as_ref()))
        }
    }
}

pub(super) fn check_batch(n: usize, max: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::BadRequest("the input holds no element".into()));
    }
    if n > max {
        return Err(ApiError::TooManyImages(n, max));
    }
    Ok(())
}

pub(super) fn check_datatype(input: &RequestInput, want: &str) -> Result<(), ApiError> {
    if input.datatype != want {
        return Err(ApiError::BadRequest(format!(
            "input `{}` must have datatype {want}, not {}",
            input.name, input.datatype
        )));
    }
    Ok(())
}

/// The files of an `image` input: shape `[N]` (or `[N, 1]`).
pub(super) fn image_elements(
    input: &RequestInput,
    bin: Option<&[u8]>,
) -> Result<Vec<Bytes>, ApiError> {
    check_datatype(input, "BYTES")?;
    let n = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        other => {
            return Err(ApiError::BadRequest(format!(
                "input `image` must have shape [N] (one encoded file per element), not {other:?}"
            )));
        }
    };
    let files: Vec<Bytes> = match bin {
        Some(mut b) => {
            let mut files = Vec::new();
            while !b.is_empty() {
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
            files
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                ApiError::BadRequest("input `image` has neither `data` nor binary_data_size".into())
            })?;
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            leaves
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = match v {
                        Value::String(s) => s.as_str(),
                        Value::Object(o) => o.get("b64").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "element {i} of input `image` must be a base64 string or {{\"b64\": ...}}"
                            ))
                        })?,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "element {i} of input `image` must be a base64 string (an encoded JPEG, PNG or DICOM file)"
                            )));
                        }
                    };
                    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                    base64::engine::general_purpose::STANDARD
                        .decode(clean.as_bytes())
                        .map(Bytes::from)
                        .map_err(|e| {
                            ApiError::BadRequest(format!(
                                "element {i} of input `image` is not base64 ({e})"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if files.len() != n {
        return Err(ApiError::BadRequest(format!(
            "input `image` has shape [{n}] but holds {} elements",
            files.len()
        )));
    }
    Ok(files)
}

pub(super) fn bad_bytes(what: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "input `image` binary data: {what} (each element is a 4-byte little-endian length, then the bytes)"
    ))
}

pub(super) fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

/// The rows of an `input` tensor `[N, 3, S, S]`, as decoded inputs.
pub(super) fn tensor_rows(
    input: &RequestInput,
    bin: Option<&[u8]>,
    size: u32,
    max: usize,
) -> Result<Vec<Decoded>, ApiError> {
    check_datatype(input, "FP32")?;
    let s = i64::from(size);
    let n = match input.shape.as_slice() {
        [n, 3, h, w] if *n >= 0 && *h == s && *w == s => *n as usize,
        other => {
            return Err(ApiError::BadRequest(format!(
                "input `input` must have shape [N, 3, {s}, {s}] for this model, not {other:?}"
            )));
        }
    };
    check_batch(n, max)?;
    let row = 3 * (size as usize) * (size as usize);
    let values: Vec<f32> = match bin {
        Some(b) => {
            if b.len() != n * row * 4 {
                return Err(ApiError::BadRequest(format!(
                    "input `input` has {} bytes of FP32 data; shape {:?} needs {}",
                    b.len(),
                    input.shape,
                    n * row * 4
                )));
            }
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                ApiError::BadRequest("input `input` has neither `data` nor binary_data_size".into())
            })?;
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            leaves
                .into_iter()
                .map(|v| {
                    v.as_f64().map(|x| x as f32).ok_or_else(|| {
                        ApiError::BadRequest("input `input` data must be numbers".into())
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if values.len() != n * row {
        return Err(ApiError::BadRequest(format!(
            "input `input` holds {} values; shape {:?} needs {}",
            values.len(),
            input.shape,
            n * row
        )));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::BadRequest(
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
        })
        .collect())
}
