//! Uploads: reading the body (raw or multipart) within the buffered-bytes budget,
//! what an upload is (sniffed kind, size, SHA-256), and decoding it to the model's
//! input.

use crate::AppState;
use crate::http::auth;
use crate::http::error::ApiError;
use crate::imaging::Preprocessor;
use crate::imaging::dicom;
use crate::imaging::dicom::DicomInfo;
use crate::imaging::dicom::DicomOptions;
use axum::body::Bytes;
use axum::extract::FromRequest;
use axum::extract::Multipart;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// One uploaded image, as it came (its bytes shared, so a copy is cheap).
#[derive(Debug, Clone)]
pub(super) enum Upload {
    /// JPEG or PNG (sniffed by the decoder).
    Encoded(Bytes),
    /// DICOM Part-10.
    Dicom(Bytes),
}

impl Upload {
    /// Classifies bytes whose declared type does not decide (octet-stream, none).
    pub(super) fn sniff(bytes: Bytes) -> Self {
        if dicom::is_dicom(&bytes) {
            Upload::Dicom(bytes)
        } else {
            Upload::Encoded(bytes)
        }
    }
}

/// An upload turned into a model input.
pub(super) struct Decoded {
    pub(super) input: Vec<f32>,
    pub(super) took: Duration,
    pub(super) dicom: Option<DicomInfo>,
    pub(super) warnings: Vec<String>,
    /// What the audit record says of the upload.
    pub(super) upload: UploadFacts,
    /// What a DICOM Structured Report of the answer needs (DICOM uploads).
    pub(super) sr: Option<crate::imaging::sr::SrSource>,
    /// Its announcement to the model's batcher; it goes into the queue with the input
    /// and is withdrawn when the worker takes the job (or when the request fails).
    pub(super) arrival: Option<crate::inference::Arrival>,
}

/// The audit trail's view of an upload: its hash, kind and size, never its bytes.
#[derive(Debug, Clone)]
pub(super) struct UploadFacts {
    pub(super) sha256: String,
    pub(super) kind: &'static str,
    pub(super) bytes: usize,
}

impl UploadFacts {
    pub(super) fn of(upload: &Upload) -> Self {
        use sha2::Digest;
        let (b, kind) = match upload {
            Upload::Encoded(b) => (
                b,
                match image::guess_format(b) {
                    Ok(image::ImageFormat::Png) => "png",
                    Ok(image::ImageFormat::Jpeg) => "jpeg",
                    _ => "unknown",
                },
            ),
            Upload::Dicom(b) => (b, "dicom"),
        };
        Self {
            sha256: auth::to_hex(&sha2::Sha256::digest(b)),
            kind,
            bytes: b.len(),
        }
    }

    /// A preprocessed tensor row (Open Inference Protocol `input`): the SHA-256 of its
    /// little-endian FP32 bytes.
    pub(super) fn of_tensor(row: &[f32]) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for v in row {
            h.update(v.to_le_bytes());
        }
        Self {
            sha256: auth::to_hex(&h.finalize()),
            kind: "tensor",
            bytes: row.len() * 4,
        }
    }
}

pub(super) fn decode_upload(
    pre: &Preprocessor,
    upload: &Upload,
    max_pixels: u64,
    opts: DicomOptions,
) -> Result<Decoded, ApiError> {
    let t = Instant::now();
    match upload {
        Upload::Encoded(b) => Ok(Decoded {
            input: pre.preprocess_checked(b, max_pixels, &opts.geometry)?,
            took: t.elapsed(),
            dicom: None,
            warnings: Vec::new(),
            upload: UploadFacts::of(upload),
            sr: None,
            arrival: None,
        }),
        Upload::Dicom(b) => {
            let img = dicom::decode_dicom(b, max_pixels, opts)?;
            // Identifiers and technical facts only: never a patient attribute.
            tracing::debug!(
                sop_instance_uid = img.info.sop_instance_uid.as_deref().unwrap_or(""),
                modality = img.info.modality.as_deref().unwrap_or(""),
                transfer_syntax = %img.info.transfer_syntax,
                photometric = %img.info.photometric_interpretation,
                bits_stored = img.info.bits_stored,
                voi = %img.info.voi,
                columns = img.gray.width(),
                rows = img.gray.height(),
                "DICOM decoded"
            );
            Ok(Decoded {
                input: pre.gray_to_tensor(&img.gray),
                took: t.elapsed(),
                dicom: Some(img.info),
                warnings: img.warnings,
                upload: UploadFacts::of(upload),
                sr: Some(img.sr_source),
                arrival: None,
            })
        }
    }
}

/// Sets its flag when dropped (the request's future is gone).
pub(super) struct SetOnDrop(pub(super) Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Bodies up to this size count as small (a JPEG or PNG radiograph).
pub(super) const SMALL_BODY_BYTES: u64 = 4 << 20;
/// Small bodies keep 1/this of `--max-buffered-bytes` for themselves.
pub(super) const SMALL_BODY_SHARE: usize = 8;

/// `n` in units of 1024, rounded up, at least 1, as semaphore permits.
pub(super) fn kilo(n: u64) -> u32 {
    n.div_ceil(1024).clamp(1, u64::from(u32::MAX >> 4)) as u32
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Reads the images of a request: a raw JPEG/PNG/DICOM body or multipart `image`
/// parts. Returns the images and whether the request was multipart.
pub(super) async fn read_images(
    state: &AppState,
    req: Request,
) -> Result<(Vec<Upload>, bool), ApiError> {
    let limit = state.inner.limits.max_body_bytes;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    match ct.as_deref() {
        Some("multipart/form-data") => {
            let mut mp = Multipart::from_request(req, &())
                .await
                .map_err(|e| ApiError::BadRequest(e.body_text()))?;
            let mut images = Vec::new();
            loop {
                let field = match mp.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(multipart_error(&e, limit)),
                };
                let name = field.name().unwrap_or_default().to_string();
                if name != "image" {
                    return Err(ApiError::BadRequest(format!(
                        "unexpected part `{name}`; send images in parts named `image`"
                    )));
                }
                let part_ct = field.content_type().map(|c| {
                    c.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
                let kind = match part_ct.as_deref() {
                    Some(c) => check_image_type(c, true)?,
                    None => Kind::Sniff,
                };
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(&e, limit))?;
                images.push(kind.upload(bytes));
                if images.len() > state.inner.limits.max_images {
                    return Err(ApiError::TooManyImages(
                        images.len(),
                        state.inner.limits.max_images,
                    ));
                }
            }
            Ok((images, true))
        }
        Some(c) => {
            let kind = check_image_type(c, false)?;
            let bytes = axum::body::to_bytes(req.into_body(), limit)
                .await
                .map_err(|_| ApiError::BodyTooLarge(limit))?;
            Ok((vec![kind.upload(bytes)], false))
        }
        None => Err(ApiError::UnsupportedMediaType(
            "missing Content-Type; send image/jpeg, image/png, application/dicom or multipart/form-data".into(),
        )),
    }
}

pub(super) fn multipart_error(
    e: &axum::extract::multipart::MultipartError,
    limit: usize,
) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(limit)
    } else {
        ApiError::BadRequest(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// How a declared content type routes the bytes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Encoded,
    Dicom,
    /// Undeclared or octet-stream: DICOM if it has the `DICM` magic, else JPEG/PNG.
    Sniff,
}

impl Kind {
    pub(super) fn upload(self, bytes: Bytes) -> Upload {
        match self {
            Kind::Encoded => Upload::Encoded(bytes),
            Kind::Dicom => Upload::Dicom(bytes),
            Kind::Sniff => Upload::sniff(bytes),
        }
    }
}

pub(super) fn check_image_type(ct: &str, in_part: bool) -> Result<Kind, ApiError> {
    match ct {
        "image/jpeg" | "image/jpg" | "image/png" => Ok(Kind::Encoded),
        "application/dicom" => Ok(Kind::Dicom),
        // Browsers and curl label files they do not know as octet-stream; the bytes
        // are sniffed.
        "application/octet-stream" if in_part => Ok(Kind::Sniff),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {other} is not supported; send image/jpeg, image/png, application/dicom or multipart/form-data"
        ))),
    }
}
