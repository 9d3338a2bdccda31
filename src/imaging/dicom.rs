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

use dicom_dictionary_std::{StandardDataDictionary, tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{FileMetaTable, OpenFileOptions};
use dicom_pixeldata::{PixelDecoder, VoiLutFunction, WindowLevel};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::GrayImage;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
    #[error("{0}")]
    Unprocessable(String),
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
        return Err(DicomError::Unprocessable(format!(
            "SamplesPerPixel is {samples}; only single-sample (grayscale) radiographs are classified"
        )));
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
                return Err(DicomError::Unprocessable(format!(
                    "Modality {} is not a radiograph (CR, DX or DR); the server takes other modalities only with --allow-any-modality",
                    other.unwrap_or("(missing)")
                )));
            }
        }
    }
    let photometric = text(tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    let inverted = match photometric.as_str() {
        "MONOCHROME1" => true,
        "MONOCHROME2" => false,
        other => {
            return Err(DicomError::Unprocessable(format!(
                "PhotometricInterpretation {} is not MONOCHROME1 or MONOCHROME2",
                if other.is_empty() { "(missing)" } else { other }
            )));
        }
    };
    if !matches!(obj.element_opt(tags::PIXEL_DATA), Ok(Some(_))) {
        return Err(DicomError::MissingPixelData);
    }
    let rows = int(tags::ROWS, "Rows")?
        .ok_or_else(|| DicomError::Unprocessable("Rows (0028,0010) is missing".into()))?;
    let columns = int(tags::COLUMNS, "Columns")?
        .ok_or_else(|| DicomError::Unprocessable("Columns (0028,0011) is missing".into()))?;
    let frames = match text(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| malformed("NumberOfFrames is not an integer"))?,
    };
    if rows == 0 || columns == 0 || frames == 0 {
        return Err(DicomError::Unprocessable(format!(
            "the image is empty ({columns}x{rows}, {frames} frame(s))"
        )));
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
        return Err(DicomError::Unprocessable(format!(
            "BitsAllocated is {bits_allocated}; 8 or 16 are supported"
        )));
    }
    let bits_stored = int(tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(DicomError::Unprocessable(format!(
            "BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}"
        )));
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
        return Err(DicomError::Unprocessable(
            "RescaleSlope/RescaleIntercept are not usable numbers".into(),
        ));
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
            photometric_interpretation: photometric,
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

/// PS3.3 C.11.2.1.2: window center/width to [0, 255], in place.
fn apply_window(values: &mut [f64], w: WindowLevel, function: VoiLutFunction) {
    let (c, wd) = (w.center, w.width);
    for v in values {
        let x = *v;
        *v = match function {
            VoiLutFunction::Linear => {
                let lo = c - 0.5 - (wd - 1.0) / 2.0;
                let hi = c - 0.5 + (wd - 1.0) / 2.0;
                if x <= lo {
                    0.0
                } else if x > hi || wd <= 1.0 {
                    255.0
                } else {
                    ((x - (c - 0.5)) / (wd - 1.0) + 0.5) * 255.0
                }
            }
            VoiLutFunction::LinearExact => {
                if x <= c - wd / 2.0 {
                    0.0
                } else if x > c + wd / 2.0 {
                    255.0
                } else {
                    ((x - c) / wd + 0.5) * 255.0
                }
            }
            VoiLutFunction::Sigmoid => 255.0 / (1.0 + (-4.0 * (x - c) / wd).exp()),
        };
    }
}

/// The first item of a VOI LUT Sequence (PS3.3 C.11.2.1.1).
#[derive(Debug, Clone, PartialEq)]
struct VoiTable {
    /// The first stored value mapped (LUT Descriptor's second value).
    first: i32,
    /// Bits per entry (its third value).
    bits: u8,
    /// One value per entry.
    table: Vec<u16>,
}

/// Reads the first VOI LUT Sequence item, as writers store it: the entry count 0
/// meaning 2^16; the first mapped value signed when the pixels are; 8-bit entries
/// either one per 16-bit value or packed two per 16-bit word (OW, low byte first: the
/// LUT Data then holds half as many words as entries, as dcmtk reads it). Any other
/// length is refused, never guessed at.
fn voi_lut(
    obj: &dicom_object::InMemDicomObject,
    signed: bool,
) -> Result<Option<VoiTable>, DicomError> {
    use dicom_core::value::PrimitiveValue;
    let Some(seq) = obj.element_opt(tags::VOILUT_SEQUENCE).ok().flatten() else {
        return Ok(None);
    };
    let Some(item) = seq.items().and_then(|i| i.first()) else {
        return Ok(None);
    };
    let unusable = |why: String| DicomError::Unprocessable(format!("VOI LUT Sequence: {why}"));
    let desc = item
        .element_opt(tags::LUT_DESCRIPTOR)
        .ok()
        .flatten()
        .ok_or_else(|| unusable("its item has no LUT Descriptor".into()))?
        .to_multi_int::<i32>()
        .map_err(|_| unusable("the LUT Descriptor is not three integers".into()))?;
    let [count, first, bits] = desc[..] else {
        return Err(unusable(format!(
            "the LUT Descriptor has {} values, not 3",
            desc.len()
        )));
    };
    // US or SS: read back as the 16-bit pattern it was written with.
    let entries = match count as u16 {
        0 => 65_536,
        n => usize::from(n),
    };
    let first = if signed {
        i32::from(first as u16 as i16)
    } else {
        i32::from(first as u16)
    };
    if !(1..=16).contains(&bits) {
        return Err(unusable(format!("{bits} bits per entry")));
    }
    let data = item
        .element_opt(tags::LUT_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| unusable("its item has no LUT Data".into()))?;
    let words: Vec<u16> = match data.value().primitive() {
        Some(PrimitiveValue::U16(v)) => v.to_vec(),
        Some(PrimitiveValue::U8(b)) => b
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
            .collect(),
        _ => return Err(unusable("the LUT Data is not 16-bit values".into())),
    };
    let table: Vec<u16> = if words.len() == entries {
        words
    } else if bits <= 8 && words.len() == entries.div_ceil(2) {
        words
            .iter()
            .flat_map(|w| [w & 0xff, w >> 8])
            .take(entries)
            .collect()
    } else {
        return Err(unusable(format!(
            "the LUT Data holds {} 16-bit values for {entries} entries of {bits} bits",
            words.len()
        )));
    };
    Ok(Some(VoiTable {
        first,
        bits: bits as u8,
        table,
    }))
}

/// PS3.3 C.11.2.1.1: a VOI LUT table (first mapped value, entries, bits) to [0, 255],
/// in place. `table` must not be empty.
fn apply_voi_lut(values: &mut [f64], first: i32, bits: u8, table: &[u16]) {
    let last = table.len() - 1;
    let max_out = ((1u64 << bits.clamp(1, 16)) - 1) as f64;
    let first = f64::from(first);
    for v in values {
        let i = (v.round() - first).clamp(0.0, last as f64) as usize;
        *v = (f64::from(table[i]) / max_out * 255.0).clamp(0.0, 255.0);
    }
}

/// No VOI given: stretch the frame's own range to [0, 255], in place.
fn min_max(values: &mut [f64]) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for v in values {
        *v = if hi <= lo {
            0.0
        } else {
            (*v - lo) / (hi - lo) * 255.0
        };
    }
}

/// The file meta group (explicit VR little endian, group 0002) from `start`: every
/// declared length fits, and (0002,0000) FileMetaInformationGroupLength, when present,
/// ends exactly where the group's elements end. Returns where the data set starts.
fn check_meta_group(bytes: &[u8], start: usize) -> Result<usize, DicomError> {
    let mut pos = start;
    let mut declared_end = None;
    while bytes.len() - pos >= 8 && bytes[pos..pos + 2] == [0x02, 0x00] {
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let (len, header) = explicit_header(bytes, pos)?;
        if len as usize > bytes.len() - pos - header {
            return Err(malformed(format!(
                "meta element (0002,{element:04X}) declares {len} bytes; {} are left",
                bytes.len() - pos - header
            )));
        }
        if element == 0x0000 && len == 4 {
            let v = &bytes[pos + 8..pos + 12];
            let group_len = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize;
            declared_end = Some(pos + 12 + group_len);
        }
        pos += header + len as usize;
    }
    if pos == start {
        return Err(malformed("no file meta group after the DICM magic"));
    }
    if declared_end.is_some_and(|end| end != pos) {
        return Err(malformed(
            "the file meta group length does not match its elements",
        ));
    }
    Ok(pos)
}

/// VRs whose explicit header has a 4-byte length (after 2 reserved bytes).
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];
/// VRs whose explicit header has a 2-byte length.
const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];

/// An explicit VR element header at `pos`: (value length, header length). Unknown VR
/// codes are refused, so this walk and the parser's never disagree on the layout.
fn explicit_header(bytes: &[u8], pos: usize) -> Result<(u32, usize), DicomError> {
    let vr = [bytes[pos + 4], bytes[pos + 5]];
    if LONG_VRS.contains(&&vr) {
        if bytes.len() - pos < 12 {
            return Err(malformed(format!("truncated element header at byte {pos}")));
        }
        let l = &bytes[pos + 8..pos + 12];
        Ok((u32::from_le_bytes([l[0], l[1], l[2], l[3]]), 12))
    } else if SHORT_VRS.contains(&&vr) {
        Ok((
            u32::from(u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]])),
            8,
        ))
    } else {
        Err(malformed(format!(
            "unknown value representation {:?} at byte {pos}",
            String::from_utf8_lossy(&vr)
        )))
    }
}

/// Walks every element header of the data set (from `start`, in its transfer
/// syntax's VR encoding) and refuses a declared length longer than the bytes left:
/// the parser allocates a value's declared length before reading it, so a 1 kB body
/// could otherwise claim gigabytes. Sequences and items are entered, not skipped, so
/// nested lengths are checked too.
fn check_lengths(bytes: &[u8], start: usize, explicit: bool) -> Result<(), DicomError> {
    const UNDEFINED: u32 = 0xFFFF_FFFF;
    let dict = StandardDataDictionary;
    let mut pos = start;
    let mut in_pixel_sequence = false;
    // Open sequences and items: (is a sequence, end offset when the length is defined).
    // dicom-rs parses nested sequences recursively, so their depth is capped here
    // (this walk itself is a loop and needs no stack).
    let mut open: Vec<(bool, Option<usize>)> = Vec::new();
    let u16_at = |p: usize| u16::from_le_bytes([bytes[p], bytes[p + 1]]);
    let u32_at =
        |p: usize| u32::from_le_bytes([bytes[p], bytes[p + 1], bytes[p + 2], bytes[p + 3]]);
    let enter = |open: &mut Vec<(bool, Option<usize>)>,
                 sequence: bool,
                 end: Option<usize>,
                 at: usize|
     -> Result<(), DicomError> {
        open.push((sequence, end));
        let depth = open.iter().filter(|(sq, _)| *sq).count();
        if depth > MAX_SEQUENCE_DEPTH {
            return Err(malformed(format!(
                "sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels at byte {at}"
            )));
        }
        Ok(())
    };
    while pos < bytes.len() {
        // Leave every defined-length container that ends here.
        while open
            .last()
            .is_some_and(|(_, end)| end.is_some_and(|e| pos >= e))
        {
            open.pop();
        }
        if bytes.len() - pos < 8 {
            return Err(malformed(format!("truncated element header at byte {pos}")));
        }
        let group = u16_at(pos);
        let element = u16_at(pos + 2);
        let tag = dicom_core::Tag(group, element);
        if group == 0xFFFE {
            // Item (E000): enter it (nested elements or a pixel fragment);
            // delimiters (E00D, E0DD) have no value.
            let len = u32_at(pos + 4);
            let at = pos;
            pos += 8;
            if element == 0xE000 && len != UNDEFINED && len as usize > bytes.len() - pos {
                return Err(malformed(format!(
                    "item at byte {at} declares {len} bytes; {} are left",
                    bytes.len() - pos
                )));
            }
            if in_pixel_sequence {
                match element {
                    // A compressed fragment: raw bytes, skipped.
                    0xE000 if len != UNDEFINED => pos += len as usize,
                    0xE0DD => in_pixel_sequence = false,
                    _ => return Err(malformed(format!("bad pixel fragment at byte {at}"))),
                }
                continue;
            }
            match element {
                0xE000 => {
                    let end = (len != UNDEFINED).then_some(pos + len as usize);
                    enter(&mut open, false, end, at)?;
                }
                // Item delimiter: close the innermost undefined-length item.
                0xE00D => {
                    if let Some(i) = open.iter().rposition(|(sq, end)| !sq && end.is_none()) {
                        open.truncate(i);
                    }
                }
                // Sequence delimiter: close the innermost undefined-length sequence.
                0xE0DD => {
                    if let Some(i) = open.iter().rposition(|(sq, end)| *sq && end.is_none()) {
                        open.truncate(i);
                    }
                }
                _ => {}
            }
            continue;
        }
        let (is_container, len, header) = if explicit {
            let (len, header) = explicit_header(bytes, pos)?;
            (&bytes[pos + 4..pos + 6] == b"SQ", len, header)
        } else {
            use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
            let sq = dict
                .by_tag(tag)
                .is_some_and(|e| matches!(e.vr().relaxed(), dicom_core::VR::SQ));
            (sq, u32_at(pos + 4), 8)
        };
        let at = pos;
        pos += header;
        if tag == tags::PIXEL_DATA && len == UNDEFINED {
            in_pixel_sequence = true;
            continue;
        }
        if len != UNDEFINED && len as usize > bytes.len() - pos {
            return Err(malformed(format!(
                "element ({group:04X},{element:04X}) at byte {at} declares {len} bytes; {} are left",
                bytes.len() - pos
            )));
        }
        if is_container || len == UNDEFINED {
            // Enter the sequence (an undefined-length value is parsed as one): its
            // items follow.
            let end = (len != UNDEFINED).then_some(pos + len as usize);
            enter(&mut open, true, end, at)?;
            continue;
        }
        pos += len as usize;
    }
    Ok(())
}

/// The frame's own codestream header (JPEG SOF, JPEG 2000 SIZ) must agree with
/// Rows/Columns: decoders allocate what the codestream declares.
fn check_codestream(
    obj: &dicom_object::DefaultDicomObject,
    ts_uid: &str,
    rows: u32,
    columns: u32,
    frames: u32,
    bits_allocated: u32,
) -> Result<(), DicomError> {
    let Ok(Some(pixel)) = obj.element_opt(tags::PIXEL_DATA) else {
        return Err(DicomError::MissingPixelData);
    };
    let Some(first) = pixel.fragments().and_then(|f| f.first()) else {
        return Err(malformed("encapsulated pixel data has no fragment"));
    };
    if ts_uid == uids::RLE_LOSSLESS {
        check_rle_header(first, bits_allocated / 8)?;
        return check_rle_segments(first, bits_allocated / 8, rows as usize * columns as usize);
    }
    // The first frame's codestream, all of it: a single-frame object's fragments
    // together, else the first fragment (one fragment per frame).
    let frame: std::borrow::Cow<'_, [u8]> = match pixel.fragments() {
        Some(f) if frames == 1 && f.len() > 1 => f.concat().into(),
        _ => first.as_slice().into(),
    };
    // JPEG 2000 (.90–.93) and High-Throughput JPEG 2000 (.201–.203) carry a SIZ
    // marker; the other .4.x syntaxes are JPEG (SOF).
    let j2k =
        ts_uid.starts_with("1.2.840.10008.1.2.4.9") || ts_uid.starts_with("1.2.840.10008.1.2.4.20");
    let dims = if j2k {
        // A cut JPEG 2000 codestream still decodes (at a lower quality, by design):
        // refuse one without its end-of-codestream marker (fragments are padded to an
        // even length with zeros).
        let end = frame.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !frame[..end].ends_with(&[0xFF, 0xD9]) {
            return Err(malformed(
                "the JPEG 2000 codestream ends before its end-of-codestream marker (truncated?)",
            ));
        }
        j2k_dims(first)
    } else if ts_uid.starts_with("1.2.840.10008.1.2.4.") {
        crate::imaging::complete::jpeg(&frame).map_err(malformed)?;
        jpeg_dims(first)
    } else {
        // RLE and encapsulated-uncompressed: the decoder writes Rows × Columns.
        return Ok(());
    };
    match dims {
        Some((w, h)) if w == columns && h == rows => Ok(()),
        Some((w, h)) => Err(malformed(format!(
            "the compressed frame is {w}x{h} but Rows/Columns say {columns}x{rows}"
        ))),
        None => Err(malformed(
            "no frame header found in the compressed pixel data",
        )),
    }
}

/// Word `i` of an RLE fragment's 64-byte header (0: segment count, 1..=15: offsets).
fn rle_header_word(fragment: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([
        fragment[4 * i],
        fragment[4 * i + 1],
        fragment[4 * i + 2],
        fragment[4 * i + 3],
    ])
}

/// PS3.5 G.5: 64-byte header, one segment per byte of the sample, offsets inside the
/// fragment and increasing. (dicom-rs allocates the declared segment count unchecked.)
fn check_rle_header(fragment: &[u8], segments: u32) -> Result<(), DicomError> {
    if fragment.len() < 64 {
        return Err(malformed("RLE fragment shorter than its 64-byte header"));
    }
    let word = |i| rle_header_word(fragment, i);
    let n = word(0);
    if n != segments {
        return Err(malformed(format!(
            "RLE header declares {n} segments; a {}-bit grayscale frame has {segments}",
            segments * 8
        )));
    }
    let mut previous = 63;
    for i in 1..=n as usize {
        let offset = word(i);
        if offset <= previous || offset as usize >= fragment.len() {
            return Err(malformed(
                "RLE segment offsets are out of order or out of range",
            ));
        }
        previous = offset;
    }
    Ok(())
}

/// Each RLE segment (PS3.5 G.3, PackBits) must decode to at least one byte per pixel:
/// the decoder fills a short segment's missing rows instead of failing. The header
/// was checked by [`check_rle_header`].
fn check_rle_segments(fragment: &[u8], segments: u32, pixels: usize) -> Result<(), DicomError> {
    let word = |i| rle_header_word(fragment, i) as usize;
    for i in 1..=segments as usize {
        let end = if i < segments as usize {
            word(i + 1)
        } else {
            fragment.len()
        };
        let seg = &fragment[word(i)..end];
        let (mut pos, mut out) = (0usize, 0usize);
        while pos < seg.len() && out < pixels {
            let n = seg[pos] as i8;
            pos += 1;
            if n >= 0 {
                // n + 1 literal bytes.
                let k = n as usize + 1;
                pos += k;
                out += k;
            } else if n != -128 {
                // One byte repeated 1 - n times.
                pos += 1;
                out += (1 - i32::from(n)) as usize;
            }
        }
        if out < pixels || pos > seg.len() {
            return Err(malformed(format!(
                "RLE segment {i} decodes to fewer than the frame's {pixels} bytes (truncated?)"
            )));
        }
    }
    Ok(())
}

/// Width and height from a JPEG SOF marker.
fn jpeg_dims(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    if b.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        let is_sof = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let s = b.get(i + 5..i + 9)?;
            let h = u32::from(u16::from_be_bytes([s[0], s[1]]));
            let w = u32::from(u16::from_be_bytes([s[2], s[3]]));
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

/// Width and height from a JPEG 2000 SIZ marker (raw codestream or JP2 wrapper).
fn j2k_dims(b: &[u8]) -> Option<(u32, u32)> {
    let at = b.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let s = b.get(at + 8..at + 24)?;
    let be = |o: usize| u32::from_be_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
    let (xsiz, ysiz, xo, yo) = (be(0), be(4), be(8), be(12));
    Some((xsiz.checked_sub(xo)?, ysiz.checked_sub(yo)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_functions_follow_ps3_3() {
        let w = WindowLevel {
            center: 100.0,
            width: 51.0,
        };
        // LINEAR: x <= c - 0.5 - (w-1)/2 = 74.5 → 0; x > c - 0.5 + (w-1)/2 = 124.5 → 255.
        let applied = |xs: &[f64], f| {
            let mut y = xs.to_vec();
            apply_window(&mut y, w, f);
            y
        };
        let y = applied(&[74.5, 75.0, 99.5, 124.5, 125.0], VoiLutFunction::Linear);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 0.5 / 50.0 * 255.0).abs() < 1e-9);
        assert!((y[2] - 127.5).abs() < 1e-9);
        assert!((y[3] - 255.0).abs() < 1e-9);
        assert_eq!(y[4], 255.0);
        // LINEAR_EXACT: c ± w/2.
        let y = applied(&[74.5, 100.0, 125.5], VoiLutFunction::LinearExact);
        assert_eq!(y, vec![0.0, 127.5, 255.0]);
        // SIGMOID: half-way at the center, monotone.
        let y = applied(&[0.0, 100.0, 200.0], VoiLutFunction::Sigmoid);
        assert!((y[1] - 127.5).abs() < 1e-9 && y[0] < 1.0 && y[2] > 254.0);
    }

    #[test]
    fn voi_lut_table_and_min_max() {
        // Table of 3 entries, 8-bit output, first mapped value 10: below → first entry,
        // above → last.
        let mut y = vec![0.0, 10.0, 11.0, 12.0, 99.0];
        apply_voi_lut(&mut y, 10, 8, &[0, 51, 255]);
        assert_eq!(y, vec![0.0, 0.0, 51.0, 255.0, 255.0]);
        let mut y = vec![11.0];
        apply_voi_lut(&mut y, 10, 16, &[0, 65535]);
        assert_eq!(y, vec![255.0]);
        let mut y = vec![5.0, 5.0];
        min_max(&mut y);
        assert_eq!(y, vec![0.0, 0.0]);
        let mut y = vec![-10.0, 0.0, 10.0];
        min_max(&mut y);
        assert_eq!(y, vec![0.0, 127.5, 255.0]);
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

    #[test]
    fn codestream_headers() {
        // JPEG: SOI, APP0 (len 4), SOF0 with height 30, width 40.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00,
            0x1E, 0x00, 0x28, 0x01,
        ];
        assert_eq!(jpeg_dims(&jpeg), Some((40, 30)));
        assert_eq!(jpeg_dims(&jpeg[2..]), None);
        // JPEG 2000: SOC, SIZ (Lsiz, Rsiz, Xsiz 50, Ysiz 20, XOsiz 10, YOsiz 0).
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [50u32, 20, 10, 0] {
            j2k.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(j2k_dims(&j2k), Some((40, 20)));
        // RLE: 2 segments at 64 and 70 in a 80-byte fragment.
        let mut rle = vec![0u8; 80];
        rle[..4].copy_from_slice(&2u32.to_le_bytes());
        rle[4..8].copy_from_slice(&64u32.to_le_bytes());
        rle[8..12].copy_from_slice(&70u32.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_ok());
        assert!(check_rle_header(&rle, 1).is_err());
        rle[8..12].copy_from_slice(&700u32.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_err());
        rle[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_err());
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
