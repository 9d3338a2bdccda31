//! Uploads: what an upload is (sniffed kind, size, SHA-256), and decoding it to the
//! model's input.

use crate::digest::to_hex;
use crate::imaging::GateTime;
use crate::imaging::Preprocessor;
use crate::imaging::dicom;
use crate::imaging::dicom::DicomInfo;
use crate::imaging::dicom::DicomOptions;
use crate::predict::PredictError;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// One image as a door received it (its bytes shared, so a copy is cheap).
#[derive(Debug, Clone)]
pub enum Upload {
    /// JPEG or PNG (sniffed by the decoder).
    Encoded(Bytes),
    /// DICOM Part-10.
    Dicom(Bytes),
}

impl Upload {
    /// Classifies bytes whose declared type does not decide (octet-stream, none).
    pub fn sniff(bytes: Bytes) -> Self {
        if dicom::is_dicom(&bytes) {
            Upload::Dicom(bytes)
        } else {
            Upload::Encoded(bytes)
        }
    }
}

/// An upload turned into a model input.
pub struct Decoded {
    pub input: Vec<f32>,
    pub took: Duration,
    pub dicom: Option<DicomInfo>,
    pub warnings: Vec<String>,
    /// What the audit record says of the upload.
    pub upload: UploadFacts,
    /// What a DICOM Structured Report of the answer needs (DICOM uploads).
    pub sr: Option<crate::imaging::sr::SrSource>,
    /// Its announcement to the model's batcher; it goes into the queue with the input
    /// and is withdrawn when the worker takes the job (or when the request fails).
    pub arrival: Option<crate::inference::Arrival>,
    /// When its content gates started and how long they took (its trace's `gates`).
    pub gates: Option<(std::time::Instant, Duration)>,
}

/// The audit trail's view of an upload: its hash, kind and size, never its bytes.
#[derive(Debug, Clone)]
pub struct UploadFacts {
    pub sha256: String,
    pub kind: &'static str,
    pub bytes: usize,
}

impl UploadFacts {
    pub fn of(upload: &Upload) -> Self {
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
            sha256: to_hex(&sha2::Sha256::digest(b)),
            kind,
            bytes: b.len(),
        }
    }

    /// A preprocessed tensor row (Open Inference Protocol `input`): the SHA-256 of its
    /// little-endian FP32 bytes.
    pub fn of_tensor(row: &[f32]) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for v in row {
            h.update(v.to_le_bytes());
        }
        Self {
            sha256: to_hex(&h.finalize()),
            kind: "tensor",
            bytes: row.len() * 4,
        }
    }
}

pub fn decode_upload(
    pre: &Preprocessor,
    upload: &Upload,
    max_pixels: u64,
    opts: DicomOptions,
) -> Result<Decoded, PredictError> {
    let t = Instant::now();
    let mut gates = GateTime::default();
    let mut d = decode_timed(pre, upload, max_pixels, opts, t, &mut gates)?;
    d.gates = gates.span();
    Ok(d)
}

fn decode_timed(
    pre: &Preprocessor,
    upload: &Upload,
    max_pixels: u64,
    opts: DicomOptions,
    t: Instant,
    gates: &mut GateTime,
) -> Result<Decoded, PredictError> {
    match upload {
        Upload::Encoded(b) => Ok(Decoded {
            input: pre.preprocess_checked(b, max_pixels, &opts.geometry, gates)?,
            took: t.elapsed(),
            dicom: None,
            warnings: Vec::new(),
            upload: UploadFacts::of(upload),
            sr: None,
            arrival: None,
            gates: None,
        }),
        Upload::Dicom(b) => {
            let img = dicom::decode_dicom_timed(b, max_pixels, opts, gates)?;
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
                gates: None,
            })
        }
    }
}

/// Sets its flag when dropped (the request's future is gone).
pub struct SetOnDrop(pub Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `n` in units of 1024, rounded up, at least 1, as semaphore permits.
pub fn kilo(n: u64) -> u32 {
    n.div_ceil(1024).clamp(1, u64::from(u32::MAX >> 4)) as u32
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::Preprocessing;

    #[test]
    fn a_decoded_upload_carries_its_gates_within_its_decode() {
        let img =
            image::GrayImage::from_fn(96, 80, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode png");
        let pre = Preprocessor::new(8, &Preprocessing::default()).unwrap();
        let before = Instant::now();
        let d = decode_upload(
            &pre,
            &Upload::Encoded(png.into()),
            1 << 20,
            DicomOptions::default(),
        )
        .unwrap();
        let after = Instant::now();
        let (start, total) = d.gates.expect("the `gates` span of its trace");
        assert!(
            before <= start && start <= after,
            "started within the decode"
        );
        assert!(total > Duration::ZERO, "the gates' time");
        assert!(start + total <= after, "ended within the decode");
    }
}
