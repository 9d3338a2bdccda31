//! An inference request's input tensor: its bytes (JSON or the binary part), its
//! files (`image`, BYTES) or rows (`input`, FP32), within the server's limits.

use crate::http::ApiError;
use crate::http::v2::RequestInput;
use crate::oip::tensor::check_count;
use crate::oip::tensor::image_batch;
use crate::oip::tensor::le_f32;
use crate::oip::tensor::length_prefixed;
use crate::oip::tensor::rows;
use crate::oip::tensor::tensor_batch;
use crate::predict::Decoded;
use axum::body::Bytes;
use base64::Engine;

/// The input's bytes from the binary part, when it declares `binary_data_size` (the
/// only input, so they are the whole binary part).
pub(super) fn input_binary<'a>(
    input: &RequestInput<'_>,
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

fn check_datatype(input: &RequestInput<'_>, want: &str) -> Result<(), ApiError> {
    Ok(crate::oip::check_datatype(
        &input.name,
        &input.datatype,
        want,
    )?)
}

/// The files of an `image` input: shape `[N]` (or `[N, 1]`), `N` at most `max`.
/// Refused as soon as the data holds more elements than the shape declares.
pub(super) fn image_elements(
    input: &RequestInput<'_>,
    bin: Option<&[u8]>,
    max: usize,
) -> Result<Vec<Bytes>, ApiError> {
    check_datatype(input, "BYTES")?;
    let n = image_batch(&input.shape.0, max)?;
    let files: Vec<Bytes> = match bin {
        Some(b) => length_prefixed(b, n)?,
        None => {
            let data = input.data.ok_or_else(|| {
                ApiError::BadRequest("input `image` has neither `data` nor binary_data_size".into())
            })?;
            read_data(data, Flat::<Bytes>::at_most(n)).map_err(|e| match e {
                DataError::TooMany => ApiError::BadRequest(format!(
                    "input `image` has shape [{n}] but holds more elements"
                )),
                DataError::Invalid(m) => ApiError::BadRequest(m),
            })?
        }
    };
    check_count(files.len(), n)?;
    Ok(files)
}

/// Why a tensor's JSON data was refused.
pub(super) enum DataError {
    /// More elements than the shape declares.
    TooMany,
    /// Not the elements the input takes.
    Invalid(String),
}

/// Reads a tensor's JSON `data` (its text, kept from the request) with `seed`.
pub(super) fn read_data<T>(
    data: &serde_json::value::RawValue,
    seed: impl for<'de> serde::de::DeserializeSeed<'de, Value = T>,
) -> Result<T, DataError> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    let out = seed.deserialize(&mut de).map_err(|e| {
        let text = e.to_string();
        if text.starts_with(TOO_MANY) {
            DataError::TooMany
        } else {
            DataError::Invalid(text)
        }
    })?;
    de.end().map_err(|e| DataError::Invalid(e.to_string()))?;
    Ok(out)
}

/// The error text that marks "more elements than the shape declares".
const TOO_MANY: &str = "more elements than the shape declares";

/// A leaf of a tensor's JSON data.
pub(super) enum Leaf<'a> {
    /// A number.
    Number(f64),
    /// A string, or an object's `b64` string.
    Str(&'a str),
}

crate::message_error!(
    /// Why a leaf of a tensor's JSON data is not an element.
    ElementError
);

/// What one element of a tensor's JSON data is read as.
pub(super) trait Element: Sized {
    /// Whether the elements are strings (and `{"b64": "..."}` objects), else numbers.
    const STRINGS: bool;
    /// What the data must hold, for element `i`.
    fn expecting(i: usize) -> String;
    /// Element `i` from a leaf of the kind [`Element::STRINGS`] says.
    fn make(leaf: Leaf<'_>, i: usize) -> Result<Self, ElementError>;
}

/// FP32 tensors: numbers.
impl Element for f32 {
    const STRINGS: bool = false;
    fn expecting(_i: usize) -> String {
        "input `input` data must be numbers".into()
    }
    fn make(leaf: Leaf<'_>, _i: usize) -> Result<Self, ElementError> {
        match leaf {
            Leaf::Number(v) => Ok(v as f32),
            Leaf::Str(_) => Err(ElementError(Self::expecting(0))),
        }
    }
}

/// BYTES `image` tensors: files, each a base64 string or `{"b64": "..."}`, decoded
/// as they are read.
impl Element for Bytes {
    const STRINGS: bool = true;
    fn expecting(i: usize) -> String {
        format!(
            "element {i} of input `image` to be a base64 string (an encoded JPEG, PNG or DICOM file) or {{\"b64\": ...}}"
        )
    }
    fn make(leaf: Leaf<'_>, i: usize) -> Result<Self, ElementError> {
        let Leaf::Str(b64) = leaf else {
            return Err(ElementError(Self::expecting(i)));
        };
        let clean: Vec<u8> = b64.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(&clean)
            .map(Bytes::from)
            .map_err(|e| ElementError(format!("element {i} of input `image` is not base64 ({e})")))
    }
}

/// A tensor's JSON data, nested arrays flattened, at most `max` elements: refused
/// as soon as one more begins.
pub(super) struct Flat<T> {
    pub max: usize,
    pub element: std::marker::PhantomData<T>,
}

impl<T> Flat<T> {
    pub(super) fn at_most(max: usize) -> Self {
        Self {
            max,
            element: std::marker::PhantomData,
        }
    }
}

impl<'de, T: Element> serde::de::DeserializeSeed<'de> for Flat<T> {
    type Value = Vec<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        let mut out = Vec::new();
        d.deserialize_any(FlatVisitor {
            out: &mut out,
            max: self.max,
        })?;
        Ok(out)
    }
}

/// Reads one value of the data (an element, or an array of them) into `out`.
struct FlatVisitor<'o, T> {
    out: &'o mut Vec<T>,
    max: usize,
}

impl<T: Element> FlatVisitor<'_, T> {
    /// `leaf` as element `out.len()`, once its kind and the bound are checked.
    fn push<E: serde::de::Error>(
        self,
        leaf: Leaf<'_>,
        unexpected: serde::de::Unexpected<'_>,
    ) -> Result<(), E> {
        if matches!(leaf, Leaf::Str(_)) != T::STRINGS {
            return Err(E::invalid_type(unexpected, &self));
        }
        let i = self.out.len();
        if i == self.max {
            return Err(E::custom(TOO_MANY));
        }
        self.out.push(T::make(leaf, i).map_err(E::custom)?);
        Ok(())
    }
}

impl<'de, T: Element> serde::de::Visitor<'de> for FlatVisitor<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&T::expecting(self.out.len()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Leaf::Number(v), serde::de::Unexpected::Float(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Leaf::Number(v as f64), serde::de::Unexpected::Signed(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Leaf::Number(v as f64), serde::de::Unexpected::Unsigned(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Leaf::Str(v), serde::de::Unexpected::Str(v))
    }
    /// `{"b64": "..."}`: its string, where strings are elements.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let i = self.out.len();
        if !T::STRINGS {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Map,
                &self,
            ));
        }
        let mut b64: Option<String> = None;
        while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "b64" && b64.is_none() {
                b64 = Some(m.next_value()?);
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        let b64 = b64.ok_or_else(|| {
            serde::de::Error::custom(format!(
                "element {i} of input `image` must be a base64 string or {{\"b64\": ...}}"
            ))
        })?;
        self.push(Leaf::Str(&b64), serde::de::Unexpected::Str(&b64))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let (out, max) = (self.out, self.max);
        while s
            .next_element_seed(Nested {
                out: &mut *out,
                max,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// An element of an array: read into the same `out`.
struct Nested<'o, T> {
    out: &'o mut Vec<T>,
    max: usize,
}

impl<'de, T: Element> serde::de::DeserializeSeed<'de> for Nested<'_, T> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(FlatVisitor {
            out: self.out,
            max: self.max,
        })
    }
}

/// The rows of an `input` tensor `[N, 3, S, S]`, as decoded inputs.
pub(super) fn tensor_rows(
    input: &RequestInput<'_>,
    bin: Option<&[u8]>,
    size: u32,
    max: usize,
) -> Result<Vec<Decoded>, ApiError> {
    check_datatype(input, "FP32")?;
    let shape = &input.shape.0;
    let n = tensor_batch(shape, size, max)?;
    let row = 3 * (size as usize) * (size as usize);
    let needed = n * row;
    let values: Vec<f32> = match bin {
        Some(b) => le_f32(b, needed, shape)?,
        None => {
            let data = input.data.ok_or_else(|| {
                ApiError::BadRequest("input `input` has neither `data` nor binary_data_size".into())
            })?;
            read_data(data, Flat::<f32>::at_most(needed)).map_err(|e| match e {
                DataError::TooMany => ApiError::BadRequest(format!(
                    "input `input` holds more than the {needed} values its shape {shape:?} needs"
                )),
                DataError::Invalid(_) => {
                    ApiError::BadRequest("input `input` data must be numbers".into())
                }
            })?
        }
    };
    Ok(rows(&values, n, row, shape)?)
}
