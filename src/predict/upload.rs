//! Uploads: what an upload is, learnt once (its kind sniffed when it is made; the
//! SHA-256 of its bytes and, for DICOM, the parsed instance on first use, kept for
//! every copy), and decoding it to the model's input.

use crate::digest::to_hex;
use crate::imaging::GateTime;
use crate::imaging::Preprocessor;
use crate::imaging::dicom;
use crate::imaging::dicom::DicomError;
use crate::imaging::dicom::DicomInfo;
use crate::imaging::dicom::DicomOptions;
use crate::imaging::dicom::Instance;
use crate::imaging::dicom::SrSource;
use crate::predict::PredictError;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;
use std::time::Instant;

/// What an upload is, sniffed once when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// JPEG (the image decoder).
    Jpeg,
    /// PNG (the image decoder).
    Png,
    /// Declared JPEG/PNG, or undeclared and not DICOM, but neither: the image
    /// decoder says why not.
    Unknown,
    /// DICOM Part-10 (the DICOM decoder).
    Dicom,
}

impl UploadKind {
    /// Its name in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadKind::Jpeg => "jpeg",
            UploadKind::Png => "png",
            UploadKind::Unknown => "unknown",
            UploadKind::Dicom => "dicom",
        }
    }
}

/// One image as a door received it: its bytes (shared, so a copy is cheap), its
/// kind, and what is learnt of it once for all its copies (the SHA-256 of its
/// bytes; a DICOM upload's parsed [`Instance`], which the decoder renders without
/// parsing again). The first use of either is CPU work, for a blocking thread
/// where the upload is large (the decoder's; `Core::identify`'s).
#[derive(Clone)]
pub struct Upload {
    bytes: Bytes,
    kind: UploadKind,
    learnt: Arc<Learnt>,
}

/// What an upload's copies share, computed on first use.
#[derive(Default)]
struct Learnt {
    sha256: OnceLock<String>,
    instance: OnceLock<Result<Instance, DicomError>>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("kind", &self.kind)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl Upload {
    fn new(bytes: Bytes, kind: UploadKind) -> Self {
        Self {
            bytes,
            kind,
            learnt: Arc::default(),
        }
    }

    /// Bytes declared JPEG or PNG (decoded as an image whatever they hold).
    pub fn encoded(bytes: Bytes) -> Self {
        let kind = match image::guess_format(&bytes) {
            Ok(image::ImageFormat::Png) => UploadKind::Png,
            Ok(image::ImageFormat::Jpeg) => UploadKind::Jpeg,
            _ => UploadKind::Unknown,
        };
        Self::new(bytes, kind)
    }

    /// Bytes declared DICOM Part-10.
    pub fn dicom(bytes: Bytes) -> Self {
        Self::new(bytes, UploadKind::Dicom)
    }

    /// Classifies bytes whose declared type does not decide (octet-stream, none).
    pub fn sniff(bytes: Bytes) -> Self {
        if dicom::is_dicom(&bytes) {
            Self::dicom(bytes)
        } else {
            Self::encoded(bytes)
        }
    }

    /// Its kind, as sniffed when it was made.
    pub fn kind(&self) -> UploadKind {
        self.kind
    }

    /// Whether it goes to the DICOM decoder.
    pub fn is_dicom(&self) -> bool {
        self.kind == UploadKind::Dicom
    }

    /// Its bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The SHA-256 of its bytes, hex (computed once for all copies).
    pub fn sha256(&self) -> &str {
        self.learnt
            .sha256
            .get_or_init(|| crate::digest::sha256_hex(&self.bytes))
    }

    /// A DICOM upload's instance, parsed once for all copies (with the guard
    /// first), or why it could not be read; `None` for other kinds.
    pub fn instance(&self) -> Option<Result<&Instance, &DicomError>> {
        self.is_dicom().then(|| {
            self.learnt
                .instance
                .get_or_init(|| Instance::read(&self.bytes))
                .as_ref()
        })
    }

    /// What a result object needs of a readable DICOM upload; `None` otherwise.
    pub fn source(&self) -> Option<&SrSource> {
        self.instance()?.ok().map(Instance::source)
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
    /// An upload's facts: its hash computed once (shared with its filing
    /// identity), its kind as sniffed when it was made.
    pub fn of(upload: &Upload) -> Self {
        Self {
            sha256: upload.sha256().to_string(),
            kind: upload.kind().as_str(),
            bytes: upload.bytes().len(),
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
    match upload.instance() {
        None => Ok(Decoded {
            input: pre.preprocess_checked(upload.bytes(), max_pixels, &opts.geometry, gates)?,
            took: t.elapsed(),
            dicom: None,
            warnings: Vec::new(),
            upload: UploadFacts::of(upload),
            sr: None,
            arrival: None,
            gates: None,
        }),
        Some(Err(e)) => Err(e.clone().into()),
        Some(Ok(instance)) => {
            // The instance the upload was identified by: not parsed again.
            let img = dicom::decode_instance(instance, max_pixels, opts, gates)?;
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
            &Upload::encoded(png.into()),
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
