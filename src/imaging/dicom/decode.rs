//! Decoding, in the order the module docs give: the transfer syntax and the length
//! guard, then the one parse of a file ([`Instance`]: what a result object needs of
//! it, the hash of its pixel data that files it); the attributes the radiograph
//! needs, the first frame through the Modality and VOI LUTs, and the warnings
//! (multi-frame, lateral, adult), from that parse ([`decode_instance`]).

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::GrayImage;
use std::sync::OnceLock;

use super::codestream::check_codestream;
use super::guard::{check_lengths, check_meta_group};
use super::voi::{apply_voi_lut, apply_window, min_max, stored_values, voi_lut};
use crate::imaging::GateTime;
use crate::imaging::dicom::DicomError;
use crate::imaging::dicom::DicomImage;
use crate::imaging::dicom::DicomInfo;
use crate::imaging::dicom::DicomOptions;
use crate::imaging::dicom::RADIOGRAPHY_MODALITIES;
use crate::imaging::dicom::SrSource;
use crate::imaging::dicom::Unsupported;
use crate::imaging::dicom::dicm_offset;
use crate::imaging::dicom::malformed;
use crate::imaging::dicom::text;

/// Decodes a DICOM Part-10 file to 8-bit grayscale (see the module docs for the
/// order): [`Instance::read`], then [`decode_instance`]. For callers that have only
/// the bytes; the core reads an upload's instance once and decodes that.
pub fn decode_dicom(
    bytes: &[u8],
    max_pixels: u64,
    opts: DicomOptions,
) -> Result<DicomImage, DicomError> {
    decode_dicom_timed(bytes, max_pixels, opts, &mut GateTime::default())
}

/// [`decode_dicom`], the time of its content gate (blank) added to `gates`.
pub fn decode_dicom_timed(
    bytes: &[u8],
    max_pixels: u64,
    opts: DicomOptions,
    gates: &mut GateTime,
) -> Result<DicomImage, DicomError> {
    decode_instance(&Instance::read(bytes)?, max_pixels, opts, gates)
}

/// Decodes an instance already read (steps 4–9 of the module docs) to 8-bit
/// grayscale: it is not parsed again. The time of its content gate (blank) is added
/// to `gates`.
pub fn decode_instance(
    parsed: &Instance,
    max_pixels: u64,
    opts: DicomOptions,
    gates: &mut GateTime,
) -> Result<DicomImage, DicomError> {
    let obj = &parsed.obj;
    let a = Attributes::read(obj, opts, max_pixels)?;
    if parsed.encapsulated {
        check_codestream(
            obj,
            &parsed.ts_uid,
            a.rows,
            a.columns,
            a.frames,
            a.bits_allocated,
        )?;
    }
    let (gray, voi) = render(obj, &a)?;
    let warnings = warnings(obj, a.frames, opts)?;
    gates
        .time(|| crate::imaging::check_not_blank(&gray))
        .map_err(DicomError::Content)?;
    Ok(DicomImage {
        gray,
        info: DicomInfo {
            study_instance_uid: text(obj, tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(obj, tags::SERIES_INSTANCE_UID),
            sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
            modality: a.modality,
            transfer_syntax: parsed.ts_uid.clone(),
            photometric_interpretation: a.photometric.as_str().to_string(),
            bits_stored: a.bits_stored as u16,
            voi: voi.into(),
            manufacturer: text(obj, tags::MANUFACTURER),
        },
        warnings,
        sr_source: parsed.source.clone(),
    })
}

/// One DICOM Part-10 instance, read once: the guarded parse (steps 1–4 of the
/// module docs up to the data set), what a result object needs of it, and the
/// SHA-256 of its pixel data when asked. Its `Debug` shows no patient attribute.
pub struct Instance {
    obj: DefaultDicomObject,
    ts_uid: String,
    /// Compressed pixel data (its codestream header is checked against the rows and
    /// columns before decoding).
    encapsulated: bool,
    source: SrSource,
    pixels_sha256: OnceLock<String>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("transfer_syntax", &self.ts_uid)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Reads a Part-10 file: magic, meta group, transfer syntax, the length guard,
    /// then dicom-rs's parse (the only parse of an upload's bytes).
    pub fn read(bytes: &[u8]) -> Result<Self, DicomError> {
        parse(bytes)
    }

    /// What a result object (an SR, a Secondary Capture) needs of this instance.
    pub fn source(&self) -> &SrSource {
        &self.source
    }

    /// The SHA-256 of its pixel data as encoded (native values, or the encapsulated
    /// fragments in order), hex; computed on the first call.
    pub fn pixels_sha256(&self) -> &str {
        self.pixels_sha256.get_or_init(|| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            if let Ok(e) = self.obj.element(tags::PIXEL_DATA) {
                match e.value().fragments() {
                    Some(fragments) => {
                        for f in fragments {
                            h.update(f);
                        }
                    }
                    None => {
                        if let Ok(b) = e.value().to_bytes() {
                            h.update(&b);
                        }
                    }
                }
            }
            crate::digest::to_hex(&h.finalize())
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Parses on this thread (tests count them: an upload is parsed once).
    static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many DICOM parses this thread has run (a test hook).
#[cfg(test)]
pub(crate) fn parses() -> usize {
    PARSES.with(std::cell::Cell::get)
}

fn parse(bytes: &[u8]) -> Result<Instance, DicomError> {
    #[cfg(test)]
    PARSES.with(|n| n.set(n.get() + 1));
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
    let source = SrSource::from_object(&obj, Some(meta.media_storage_sop_class_uid()));
    Ok(Instance {
        encapsulated: ts.is_encapsulated_pixel_data(),
        obj,
        ts_uid,
        source,
        pixels_sha256: OnceLock::new(),
    })
}

/// An unsigned integer attribute; `None` when absent, an error when not a number.
fn int(
    obj: &DefaultDicomObject,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<Option<u32>, DicomError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) => e
            .to_int::<u32>()
            .map(Some)
            .map_err(|_| malformed(format!("{name} is not an unsigned integer"))),
        _ => Ok(None),
    }
}

/// The attributes a classifiable radiograph needs, checked (step 4).
struct Attributes {
    modality: Option<String>,
    photometric: PhotometricInterpretation,
    rows: u32,
    columns: u32,
    frames: u32,
    bits_allocated: u32,
    bits_stored: u32,
}

impl Attributes {
    fn read(
        obj: &DefaultDicomObject,
        opts: DicomOptions,
        max_pixels: u64,
    ) -> Result<Self, DicomError> {
        let samples = int(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
        if samples != 1 {
            return Err(Unsupported::SamplesPerPixel(samples).into());
        }
        if let Some(part) = text(obj, tags::BODY_PART_EXAMINED)
            && !matches!(
                part.to_ascii_uppercase().as_str(),
                "CHEST" | "THORAX" | "LUNG"
            )
        {
            return Err(DicomError::WrongBodyPart(part));
        }
        let modality = text(obj, tags::MODALITY);
        if !opts.allow_any_modality {
            match modality.as_deref() {
                Some(m) if RADIOGRAPHY_MODALITIES.contains(&m) => {}
                other => {
                    return Err(Unsupported::Modality(other.map(str::to_string)).into());
                }
            }
        }
        let photometric = PhotometricInterpretation::from(
            text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default(),
        );
        if !matches!(
            photometric,
            PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2
        ) {
            return Err(Unsupported::Photometric(photometric.as_str().to_string()).into());
        }
        if !matches!(obj.element_opt(tags::PIXEL_DATA), Ok(Some(_))) {
            return Err(DicomError::MissingPixelData);
        }
        let (rows, columns, frames) = frame_shape(obj, opts, max_pixels)?;
        let bits_allocated = int(obj, tags::BITS_ALLOCATED, "BitsAllocated")?.unwrap_or(0);
        if bits_allocated != 8 && bits_allocated != 16 {
            return Err(Unsupported::BitsAllocated(bits_allocated).into());
        }
        let bits_stored = int(obj, tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
        if bits_stored == 0 || bits_stored > bits_allocated {
            return Err(Unsupported::BitsStored {
                stored: bits_stored,
                allocated: bits_allocated,
            }
            .into());
        }
        Ok(Self {
            modality,
            photometric,
            rows,
            columns,
            frames,
            bits_allocated,
            bits_stored,
        })
    }
}

/// Rows, Columns and NumberOfFrames, within the geometry and `--max-pixels`.
fn frame_shape(
    obj: &DefaultDicomObject,
    opts: DicomOptions,
    max_pixels: u64,
) -> Result<(u32, u32, u32), DicomError> {
    let rows = int(obj, tags::ROWS, "Rows")?
        .ok_or(Unsupported::MissingAttribute("Rows", "(0028,0010)"))?;
    let columns = int(obj, tags::COLUMNS, "Columns")?
        .ok_or(Unsupported::MissingAttribute("Columns", "(0028,0011)"))?;
    let frames = match text(obj, tags::NUMBER_OF_FRAMES) {
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
    Ok((rows, columns, frames))
}

/// Steps 5–9: the first frame, decoded, through the Modality LUT and the VOI
/// transform, inverted when MONOCHROME1, as 8-bit grayscale; with the name of the VOI
/// transform used.
fn render(
    obj: &DefaultDicomObject,
    a: &Attributes,
) -> Result<(GrayImage, &'static str), DicomError> {
    // The codecs index into corrupt compressed data without checking everywhere
    // (dicom-rs 0.10's RLE reader, for one): a panic there is a corrupt upload (400),
    // not a server failure. Requires `panic = "unwind"` (the default; see Cargo.toml).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        obj.decode_pixel_data_frame(0)
    }))
    .map_err(|_| malformed("the compressed pixel data is corrupt"))?
    .map_err(|e| malformed(format!("could not decode the pixel data: {e}")))?;
    let data = decoded.frame_data(0).map_err(malformed)?;
    let n = a.rows as usize * a.columns as usize;
    let signed = int(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0) == 1;
    // One buffer carries the frame through every step: stored → modality → VOI.
    let mut values = stored_values(data, n, a.bits_allocated, a.bits_stored, signed)?;

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
    let voi_seq = voi_lut(obj, signed)?;
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
    if a.photometric == PhotometricInterpretation::Monochrome1 {
        for v in &mut values {
            *v = 255.0 - *v;
        }
    }
    let pixels: Vec<u8> = values
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    let gray = GrayImage::from_raw(a.columns, a.rows, pixels)
        .expect("one byte per pixel of rows × columns");
    Ok((gray, voi))
}

/// Multi-frame, lateral view (refused unless `--allow-lateral`) and adult age.
fn warnings(
    obj: &DefaultDicomObject,
    frames: u32,
    opts: DicomOptions,
) -> Result<Vec<String>, DicomError> {
    let mut warnings = Vec::new();
    if frames > 1 {
        warnings.push(format!(
            "multi-frame object ({frames} frames): only the first frame was classified"
        ));
    }
    if let Some(view) = text(obj, tags::VIEW_POSITION)
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
    if let Some(age) = text(obj, tags::PATIENT_AGE)
        && age_over_18(&age)
    {
        warnings.push(
            "PatientAge is over 18 years: the models were trained on pediatric radiographs (ages 1 to 5) and are not validated for adults".into(),
        );
    }
    Ok(warnings)
}

/// Whether a DICOM Age String (`nnnD`, `nnnW`, `nnnM`, `nnnY`) is over 18 years.
fn age_over_18(age: &str) -> bool {
    // Characters, never byte offsets: a value from another character set (an
    // ISO-8859-1 byte read as text) may end in a multi-byte character.
    let mut chars = age.trim().chars();
    let Some(unit) = chars.next_back() else {
        return false;
    };
    let Ok(n) = chars.as_str().parse::<u32>() else {
        return false;
    };
    match unit {
        'Y' | 'y' => n > 18,
        'M' | 'm' => n > 18 * 12,
        'W' | 'w' => n > 18 * 52 + 1,
        'D' | 'd' => n > 18 * 365 + 4,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("01é", false),
            ("é", false),
            ("0é1Y", false),
            ("\u{FFFD}", false),
        ] {
            assert_eq!(age_over_18(a), want, "{a}");
        }
    }
}
