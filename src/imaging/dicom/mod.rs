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

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{FileMetaTable, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::GrayImage;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod guard;
mod voi;

use guard::{check_codestream, check_lengths, check_meta_group};
use voi::{apply_voi_lut, apply_window, min_max, voi_lut};

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
#[derive(Debug, thiserror::Error)]
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
    pub sr_source: super::sr::SrSource,
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

/// Decodes a DICOM Part-10 file to 8-bit grayscale (see the module docs for the order).
pub fn decode_dicom(
    bytes: &[u8],
    max_pixels: u64,
    opts: DicomOptions,
) -> Result<DicomImage, DicomError> {
    let Some(off) = dicm_offset(bytes) else {
        return Err(malformed(
            "no DICM magic at offset 128 or 0 (not a DICOM Part-10 file)",
        ));
    };
    // The meta group's lengths are checked before dicom-rs reads it (it zero-fills a
    // declared length before reading), and its group length must match its elements.
    let dataset_start = check_meta_group(bytes, off + 4)?;
    let meta = FileMetaTable::from_reader(&bytes[off..]).map_err(malformed)?;
    let ts_uid = meta.transfer_syntax().to_string();
    let unsupported = |name: &str| DicomError::UnsupportedTransferSyntax {
        uid: ts_uid.clone(),
        name: name.to_string(),
    };
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| unsupported("unknown"))?;
    let big_endian = matches!(ts.endianness(), dicom_encoding::Endianness::Big);
    // Deflated data sets are refused: a small body could inflate without bound.
    let dataset_codec = !ts.is_codec_free() && !ts.is_encapsulated_pixel_data();
    if big_endian || dataset_codec || !ts.can_decode_all() {
        return Err(unsupported(ts.name()));
    }
    check_lengths(
        bytes,
        dataset_start,
        ts_uid != uids::IMPLICIT_VR_LITTLE_ENDIAN,
    )?;

    let obj = OpenFileOptions::new()
        .read_preamble(if off == 128 {
            ReadPreamble::Always
        } else {
            ReadPreamble::Never
        })
        .from_reader(bytes)
        .map_err(malformed)?;

    let text = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let int = |tag, name: &str| -> Result<Option<u32>, DicomError> {
        match obj.element_opt(tag) {
            Ok(Some(e)) => e
                .to_int::<u32>()
                .map(Some)
                .map_err(|_| malformed(format!("{name} is not an unsigned integer"))),
            _ => Ok(None),
        }
    };

    let samples = int(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
    if samples != 1 {
        return Err(Unsupported::SamplesPerPixel(samples).into());
    }
    if let Some(part) = text(tags::BODY_PART_EXAMINED)
        && !matches!(
            part.to_ascii_uppercase().as_str(),
            "CHEST" | "THORAX" | "LUNG"
        )
    {
        return Err(DicomError::WrongBodyPart(part));
    }
    let modality = text(tags::MODALITY);
    if !opts.allow_any_modality {
        match modality.as_deref() {
            Some(m) if RADIOGRAPHY_MODALITIES.contains(&m) => {}
            other => {
                return Err(Unsupported::Modality(other.map(str::to_string)).into());
            }
        }
    }
    let photometric =
        PhotometricInterpretation::from(text(tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default());
    let inverted = match photometric {
        PhotometricInterpretation::Monochrome1 => true,
        PhotometricInterpretation::Monochrome2 => false,
        other => return Err(Unsupported::Photometric(other.as_str().to_string()).into()),
    };
    if !matches!(obj.element_opt(tags::PIXEL_DATA), Ok(Some(_))) {
        return Err(DicomError::MissingPixelData);
    }
    let rows =
        int(tags::ROWS, "Rows")?.ok_or(Unsupported::MissingAttribute("Rows", "(0028,0010)"))?;
    let columns = int(tags::COLUMNS, "Columns")?
        .ok_or(Unsupported::MissingAttribute("Columns", "(0028,0011)"))?;
    let frames = match text(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| malformed("NumberOfFrames is not an integer"))?,
    };
    if rows == 0 || columns == 0 || frames == 0 {
        return Err(Unsupported::Empty {
            rows,
            columns,
            frames,
        }
        .into());
    }
    opts.geometry
        .check(columns, rows)
        .map_err(DicomError::Geometry)?;
    let total = u64::from(rows) * u64::from(columns) * u64::from(frames);
    if total > max_pixels {
        return Err(DicomError::TooManyPixels {
            rows,
            columns,
            frames,
            limit: max_pixels,
        });
    }
    let bits_allocated = int(tags::BITS_ALLOCATED, "BitsAllocated")?.unwrap_or(0);
    if bits_allocated != 8 && bits_allocated != 16 {
        return Err(Unsupported::BitsAllocated(bits_allocated).into());
    }
    let bits_stored = int(tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(Unsupported::BitsStored {
            stored: bits_stored,
            allocated: bits_allocated,
        }
        .into());
    }
    if ts.is_encapsulated_pixel_data() {
        check_codestream(&obj, &ts_uid, rows, columns, frames, bits_allocated)?;
    }

    // The codecs index into corrupt compressed data without checking everywhere
    // (dicom-rs 0.10's RLE reader, for one): a panic there is a corrupt upload (400),
    // not a server failure. Requires `panic = "unwind"` (the default; see Cargo.toml).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        obj.decode_pixel_data_frame(0)
    }))
    .map_err(|_| malformed("the compressed pixel data is corrupt"))?
    .map_err(|e| malformed(format!("could not decode the pixel data: {e}")))?;
    let data = decoded.frame_data(0).map_err(malformed)?;
    let n = rows as usize * columns as usize;
    let signed = int(tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0) == 1;
    // One buffer carries the frame through every step: stored → modality → VOI.
    let mut values = stored_values(data, n, bits_allocated, bits_stored, signed)?;

    let rescale = decoded.rescale().map_err(malformed)?.first().copied();
    let (slope, intercept) = rescale.map_or((1.0, 0.0), |r| (r.slope, r.intercept));
    if !(slope.is_finite() && intercept.is_finite()) || slope == 0.0 {
        return Err(Unsupported::Rescale.into());
    }
    for v in &mut values {
        *v = *v * slope + intercept;
    }

    let window = decoded
        .window()
        .map_err(malformed)?
        .and_then(|w| w.first().copied())
        .filter(|w| w.width.is_finite() && w.center.is_finite() && w.width >= 1.0);
    let function = decoded
        .voi_lut_function()
        .map_err(malformed)?
        .and_then(|f| f.first().copied())
        .unwrap_or_default();
    let voi_seq = voi_lut(&obj, signed)?;
    let voi = if let Some(w) = window {
        apply_window(&mut values, w, function);
        "window"
    } else if let Some(l) = voi_seq {
        apply_voi_lut(&mut values, l.first, l.bits, &l.table);
        "voi_lut_sequence"
    } else {
        min_max(&mut values);
        "min_max"
    };
    if inverted {
        for v in &mut values {
            *v = 255.0 - *v;
        }
    }
    let pixels: Vec<u8> = values
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    let gray =
        GrayImage::from_raw(columns, rows, pixels).expect("one byte per pixel of rows × columns");

    let mut warnings = Vec::new();
    if frames > 1 {
        warnings.push(format!(
            "multi-frame object ({frames} frames): only the first frame was classified"
        ));
    }
    if let Some(view) = text(tags::VIEW_POSITION)
        && matches!(
            view.to_ascii_uppercase().as_str(),
            "LL" | "RL" | "LAT" | "LATERAL"
        )
    {
        if !opts.allow_lateral {
            return Err(DicomError::Lateral(view));
        }
        warnings.push(format!(
            "ViewPosition {view} is a lateral view; the models were trained on frontal (AP/PA) radiographs"
        ));
    }
    // Read for this check only: never echoed, logged or kept.
    if let Some(age) = text(tags::PATIENT_AGE)
        && age_over_18(&age)
    {
        warnings.push(
            "PatientAge is over 18 years: the models were trained on pediatric radiographs (ages 1 to 5) and are not validated for adults".into(),
        );
    }
    super::check_not_blank(&gray).map_err(DicomError::Content)?;
    Ok(DicomImage {
        gray,
        info: DicomInfo {
            study_instance_uid: text(tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(tags::SERIES_INSTANCE_UID),
            sop_instance_uid: text(tags::SOP_INSTANCE_UID),
            modality,
            transfer_syntax: ts_uid.clone(),
            photometric_interpretation: photometric.as_str().to_string(),
            bits_stored: bits_stored as u16,
            voi: voi.into(),
        },
        warnings,
        sr_source: super::sr::SrSource::from_object(&obj, Some(meta.media_storage_sop_class_uid())),
    })
}

/// Stored sample values of one frame: `BitsStored` low bits, sign-extended if signed.
fn stored_values(
    data: &[u8],
    n: usize,
    bits_allocated: u32,
    bits_stored: u32,
    signed: bool,
) -> Result<Vec<f64>, DicomError> {
    let bytes_per = (bits_allocated / 8) as usize;
    if data.len() < n * bytes_per {
        return Err(malformed(format!(
            "the pixel data holds {} bytes; the frame needs {}",
            data.len(),
            n * bytes_per
        )));
    }
    let mask: u32 = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1 << bits_stored) - 1
    };
    let sign_bit = 1u32 << (bits_stored - 1);
    let value = |raw: u32| -> f64 {
        let v = raw & mask;
        if signed && v & sign_bit != 0 {
            f64::from(v) - f64::from(mask) - 1.0
        } else {
            f64::from(v)
        }
    };
    Ok(if bytes_per == 1 {
        data[..n].iter().map(|&b| value(u32::from(b))).collect()
    } else {
        data[..2 * n]
            .chunks_exact(2)
            .map(|c| value(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect()
    })
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

    #[test]
    fn stored_values_mask_and_sign_extend() {
        // 12-bit signed in 16-bit words: 0x0FFF = −1, 0x0800 = −2048, 0x07FF = 2047;
        // bits above BitsStored (0xF000) are ignored.
        let words: Vec<u8> = [0x0FFFu16, 0x0800, 0x07FF, 0xF001]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(
            stored_values(&words, 4, 16, 12, true).unwrap(),
            vec![-1.0, -2048.0, 2047.0, 1.0]
        );
        assert_eq!(
            stored_values(&words, 4, 16, 12, false).unwrap(),
            vec![4095.0, 2048.0, 2047.0, 1.0]
        );
        assert!(stored_values(&words, 5, 16, 12, false).is_err());
    }
}

/// Whether a DICOM Age String (`nnnD`, `nnnW`, `nnnM`, `nnnY`) is over 18 years.
fn age_over_18(age: &str) -> bool {
    let age = age.trim();
    let (num, unit) = age.split_at(age.len().saturating_sub(1));
    let Ok(n) = num.parse::<u32>() else {
        return false;
    };
    match unit {
        "Y" | "y" => n > 18,
        "M" | "m" => n > 18 * 12,
        "W" | "w" => n > 18 * 52 + 1,
        "D" | "d" => n > 18 * 365 + 4,
        _ => false,
    }
}

#[cfg(test)]
mod age_tests {
    #[test]
    fn ages_over_18() {
        for (a, want) in [
            ("019Y", true),
            ("018Y", false),
            ("005Y", false),
            ("217M", true),
            ("216M", false),
            ("030W", false),
            ("999W", true),
            ("400D", false),
            ("", false),
            ("Y", false),
            ("abcY", false),
        ] {
            assert_eq!(super::age_over_18(a), want, "{a}");
        }
    }
}
