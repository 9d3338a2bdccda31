//! DICOM Part-10 uploads → the 8-bit grayscale radiograph the models were trained on.
//!
//! Order of operations (PS3.3 C.11 and C.7.6.3.1.2):
//! 1. sniff the `DICM` magic (after the 128-byte preamble, or at offset 0);
//! 2. read the file meta group; refuse transfer syntaxes we cannot decode (415, named);
//! 3. walk every element header and refuse a declared length longer than what is
//!    left of the body, before dicom-rs allocates anything for it (400);
//! 4. parse the data set; check SamplesPerPixel = 1, the Modality (CR, DX or DR unless
//!    `--allow-any-modality`) and Rows × Columns × NumberOfFrames against
//!    `--max-pixels` (413); check a compressed frame's own header against Rows/Columns;
//! 5. decode the first frame only (a multi-frame object answers with a warning);
//! 6. **Modality LUT**: `v · RescaleSlope + RescaleIntercept` on the stored values
//!    (BitsStored bits, sign-extended when PixelRepresentation = 1);
//! 7. **VOI LUT**: the first WindowCenter/WindowWidth (with VOILUTFunction LINEAR,
//!    LINEAR_EXACT or SIGMOID); else the first item of the VOI LUT Sequence; else
//!    min–max of the frame;
//! 8. **MONOCHROME1** is inverted (so that air is dark, as in MONOCHROME2);
//! 9. rounded to 8-bit grayscale, then the same `Preprocessor` as JPEG/PNG.
//!
//! Nothing here logs, and nothing returned carries a patient attribute: only the
//! study/series/instance UIDs and technical facts leave this module.

use image::GrayImage;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod codestream;
mod decode;
mod guard;
mod source;
mod voi;

#[cfg(test)]
pub(crate) use decode::parses;
pub use decode::{Instance, decode_dicom, decode_dicom_timed, decode_instance};
pub use source::{COPIED_TAGS, SourceIds, SrSource};

/// A text attribute of `obj`, its padding (NUL, spaces) trimmed; `None` when absent
/// or empty. What the decoder and the SR's source read identifiers with.
pub(crate) fn text(obj: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Modalities accepted unless `--allow-any-modality`.
pub const RADIOGRAPHY_MODALITIES: [&str; 3] = ["CR", "DX", "DR"];

/// Policy for DICOM uploads.
#[derive(Debug, Clone, Copy, Default)]
pub struct DicomOptions {
    /// Take any Modality, not only CR/DX/DR.
    pub allow_any_modality: bool,
    /// Rows x Columns a radiograph can have.
    pub geometry: super::Geometry,
    /// Classify lateral views (ViewPosition LL, RL, …) with a warning instead of
    /// refusing them.
    pub allow_lateral: bool,
}

/// What in a valid DICOM object this service does not classify: one variant per
/// condition, each answered as `unsupported_dicom` (422) with its own message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unsupported {
    /// SamplesPerPixel other than 1 (colour).
    #[error("SamplesPerPixel is {0}; only single-sample (grayscale) radiographs are classified")]
    SamplesPerPixel(u32),
    /// A Modality other than CR, DX or DR (without `--allow-any-modality`).
    #[error(
        "Modality {} is not a radiograph (CR, DX or DR); the server takes other modalities only with --allow-any-modality",
        .0.as_deref().unwrap_or("(missing)")
    )]
    Modality(Option<String>),
    /// A PhotometricInterpretation other than MONOCHROME1/2 (missing: empty).
    #[error(
        "PhotometricInterpretation {} is not MONOCHROME1 or MONOCHROME2",
        if .0.is_empty() { "(missing)" } else { .0.as_str() }
    )]
    Photometric(String),
    /// A required attribute is absent: its keyword and tag.
    #[error("{0} {1} is missing")]
    MissingAttribute(&'static str, &'static str),
    /// Zero rows, columns or frames.
    #[error("the image is empty ({columns}x{rows}, {frames} frame(s))")]
    Empty {
        /// Rows.
        rows: u32,
        /// Columns.
        columns: u32,
        /// NumberOfFrames.
        frames: u32,
    },
    /// BitsAllocated other than 8 or 16.
    #[error("BitsAllocated is {0}; 8 or 16 are supported")]
    BitsAllocated(u32),
    /// BitsStored zero or over BitsAllocated.
    #[error("BitsStored {stored} does not fit BitsAllocated {allocated}")]
    BitsStored {
        /// BitsStored.
        stored: u32,
        /// BitsAllocated.
        allocated: u32,
    },
    /// RescaleSlope/RescaleIntercept not finite, or a zero slope.
    #[error("RescaleSlope/RescaleIntercept are not usable numbers")]
    Rescale,
    /// A VOI LUT Sequence item that cannot be applied.
    #[error("VOI LUT Sequence: {0}")]
    VoiLut(String),
}

/// Why a DICOM upload was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DicomError {
    /// Not DICOM, truncated or structurally broken (400).
    #[error("invalid DICOM file: {0}")]
    Malformed(String),
    /// Rows x Columns no radiograph has (422).
    #[error(transparent)]
    Geometry(super::ImageError),
    /// A blank or saturated image (422).
    #[error(transparent)]
    Content(super::ImageError),
    /// BodyPartExamined names another part of the body (422).
    #[error("BodyPartExamined is {0}: the models read chest radiographs only")]
    WrongBodyPart(String),
    /// A lateral view (422, unless `--allow-lateral`).
    #[error(
        "ViewPosition {0} is a lateral view: the models were trained on frontal (AP/PA) radiographs (the server classifies lateral views, with a warning, only with --allow-lateral)"
    )]
    Lateral(String),
    /// A transfer syntax this server cannot decode (415).
    #[error(
        "unsupported DICOM transfer syntax {uid} ({name}); send native (uncompressed), RLE, JPEG baseline/lossless or JPEG 2000"
    )]
    UnsupportedTransferSyntax {
        /// Transfer syntax UID.
        uid: String,
        /// Its name, when known.
        name: String,
    },
    /// No Pixel Data element (422).
    #[error("the DICOM object has no pixel data (7FE0,0010)")]
    MissingPixelData,
    /// Valid DICOM that this service does not classify (422).
    #[error(transparent)]
    Unprocessable(#[from] Unsupported),
    /// Rows × Columns × frames over `--max-pixels` (413).
    #[error(
        "DICOM image of {columns}x{rows} pixels × {frames} frame(s) exceeds the limit of {limit} pixels"
    )]
    TooManyPixels {
        /// Rows.
        rows: u32,
        /// Columns.
        columns: u32,
        /// NumberOfFrames.
        frames: u32,
        /// The configured limit.
        limit: u64,
    },
}

/// What the answer echoes about a DICOM upload: identifiers to file the result and
/// technical facts. Never a patient attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DicomInfo {
    /// StudyInstanceUID (0020,000D).
    pub study_instance_uid: Option<String>,
    /// SeriesInstanceUID (0020,000E).
    pub series_instance_uid: Option<String>,
    /// SOPInstanceUID (0008,0018).
    pub sop_instance_uid: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
    /// Transfer syntax UID of the upload.
    pub transfer_syntax: String,
    /// PhotometricInterpretation (MONOCHROME1 is inverted).
    pub photometric_interpretation: String,
    /// BitsStored.
    pub bits_stored: u16,
    /// The VOI transform used: `window`, `voi_lut_sequence` or `min_max`.
    pub voi: String,
    /// Manufacturer (0008,0070) of the equipment that made the image (input drift
    /// is watched per manufacturer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
}

/// A decoded DICOM radiograph.
#[derive(Debug, Clone)]
pub struct DicomImage {
    /// 8-bit grayscale, ready for [`super::Preprocessor::gray_to_tensor`].
    pub gray: GrayImage,
    /// Identifiers and facts for the answer.
    pub info: DicomInfo,
    /// Things the caller should know (lateral view, multi-frame).
    pub warnings: Vec<String>,
    /// What a Structured Report of the answer needs of this object.
    pub sr_source: SrSource,
}

/// Offset of the `DICM` magic: 128 (standard preamble) or 0 (preamble stripped).
pub fn dicm_offset(bytes: &[u8]) -> Option<usize> {
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        Some(128)
    } else if bytes.starts_with(b"DICM") {
        Some(0)
    } else {
        None
    }
}

/// Whether the bytes look like a DICOM Part-10 file.
pub fn is_dicom(bytes: &[u8]) -> bool {
    dicm_offset(bytes).is_some()
}

/// Deepest nesting of sequences accepted. Radiographs nest a few levels (a code
/// sequence inside a view sequence, say); dicom-rs parses nested sequences
/// recursively, so an upload of 100,000 nested sequences would overflow the stack and
/// abort the process.
pub const MAX_SEQUENCE_DEPTH: usize = 16;

fn malformed(e: impl std::fmt::Display) -> DicomError {
    DicomError::Malformed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_conditions_say_what_and_which_attribute() {
        let say = |u: Unsupported| DicomError::from(u).to_string();
        assert_eq!(
            say(Unsupported::Modality(None)),
            "Modality (missing) is not a radiograph (CR, DX or DR); the server takes other modalities only with --allow-any-modality"
        );
        assert_eq!(
            say(Unsupported::Modality(Some("CT".into()))),
            "Modality CT is not a radiograph (CR, DX or DR); the server takes other modalities only with --allow-any-modality"
        );
        assert_eq!(
            say(Unsupported::Photometric(String::new())),
            "PhotometricInterpretation (missing) is not MONOCHROME1 or MONOCHROME2"
        );
        assert_eq!(
            say(Unsupported::Photometric("RGB".into())),
            "PhotometricInterpretation RGB is not MONOCHROME1 or MONOCHROME2"
        );
        assert_eq!(
            say(Unsupported::MissingAttribute("Rows", "(0028,0010)")),
            "Rows (0028,0010) is missing"
        );
        assert_eq!(
            say(Unsupported::BitsStored {
                stored: 17,
                allocated: 16
            }),
            "BitsStored 17 does not fit BitsAllocated 16"
        );
    }
}
