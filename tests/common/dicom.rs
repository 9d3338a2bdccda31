//! DICOM Part-10 files built in code with dicom-rs (no sample files needed).

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use image::GrayImage;

/// Patient attributes planted in every test file; none may ever leave the server.
pub const PATIENT_NAME: &str = "SECRETNAME^JANE";
pub const PATIENT_ID: &str = "PID-SECRET-90210";
pub const PATIENT_BIRTH_DATE: &str = "19990101";
pub const ISSUER_OF_PATIENT_ID: &str = "OTHERPID-SECRET-7";
/// Every planted patient value (and a fragment of the name).
pub const PATIENT_SECRETS: [&str; 5] = [
    PATIENT_NAME,
    "SECRETNAME",
    PATIENT_ID,
    PATIENT_BIRTH_DATE,
    ISSUER_OF_PATIENT_ID,
];
pub const STUDY_UID: &str = "1.2.826.0.1.3680043.10.1.1";
pub const SERIES_UID: &str = "1.2.826.0.1.3680043.10.1.2";
pub const SOP_UID: &str = "1.2.826.0.1.3680043.10.1.3";

/// How the pixel data is encoded in the file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    ExplicitLe,
    ImplicitLe,
    /// RLE Lossless (encapsulated, compressed).
    Rle,
    /// JPEG baseline: each frame's fragment is this JPEG file (8-bit).
    JpegBaseline(&'static [u8]),
}

/// One test file.
#[derive(Debug, Clone)]
pub struct Spec {
    pub encoding: Encoding,
    pub photometric: &'static str,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub rescale: Option<(f64, f64)>,
    pub window: Option<(f64, f64)>,
    pub modality: Option<&'static str>,
    pub view_position: Option<&'static str>,
    pub samples_per_pixel: u16,
    pub rows: u16,
    pub columns: u16,
    /// Stored values of each frame (rows × columns each).
    pub frames: Vec<Vec<u16>>,
    pub pixel_data: bool,
    pub transfer_syntax_override: Option<&'static str>,
}

impl Spec {
    /// A MONOCHROME2 CR of `frame` (stored values) with the given geometry.
    pub fn new(rows: u16, columns: u16, bits_stored: u16, frame: Vec<u16>) -> Self {
        Self {
            encoding: Encoding::ExplicitLe,
            photometric: "MONOCHROME2",
            bits_allocated: if bits_stored > 8 { 16 } else { 8 },
            bits_stored,
            signed: false,
            rescale: None,
            window: None,
            modality: Some("CR"),
            view_position: Some("PA"),
            samples_per_pixel: 1,
            rows,
            columns,
            frames: vec![frame],
            pixel_data: true,
            transfer_syntax_override: None,
        }
    }
}

fn s(v: &str) -> PrimitiveValue {
    PrimitiveValue::from(v)
}

/// Encodes `spec` as a DICOM Part-10 file (preamble, meta group, data set).
pub fn build(spec: &Spec) -> Vec<u8> {
    let mut o = InMemDicomObject::new_empty();
    let mut put = |tag: Tag, vr: VR, v: PrimitiveValue| {
        o.put(DataElement::new(tag, vr, v));
    };
    put(tags::SOP_CLASS_UID, VR::UI, s("1.2.840.10008.5.1.4.1.1.1"));
    put(tags::SOP_INSTANCE_UID, VR::UI, s(SOP_UID));
    put(tags::STUDY_INSTANCE_UID, VR::UI, s(STUDY_UID));
    put(tags::SERIES_INSTANCE_UID, VR::UI, s(SERIES_UID));
    put(tags::PATIENT_NAME, VR::PN, s(PATIENT_NAME));
    put(tags::PATIENT_ID, VR::LO, s(PATIENT_ID));
    put(tags::PATIENT_BIRTH_DATE, VR::DA, s(PATIENT_BIRTH_DATE));
    put(tags::ISSUER_OF_PATIENT_ID, VR::LO, s(ISSUER_OF_PATIENT_ID));
    put(tags::PATIENT_SEX, VR::CS, s("F"));
    if let Some(m) = spec.modality {
        put(tags::MODALITY, VR::CS, s(m));
    }
    if let Some(v) = spec.view_position {
        put(tags::VIEW_POSITION, VR::CS, s(v));
    }
    put(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(spec.samples_per_pixel),
    );
    put(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        s(spec.photometric),
    );
    put(tags::ROWS, VR::US, PrimitiveValue::from(spec.rows));
    put(tags::COLUMNS, VR::US, PrimitiveValue::from(spec.columns));
    put(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(spec.bits_allocated),
    );
    put(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(spec.bits_stored),
    );
    put(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(spec.bits_stored - 1),
    );
    put(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(u16::from(spec.signed)),
    );
    if spec.frames.len() > 1 {
        put(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            s(&spec.frames.len().to_string()),
        );
    }
    if let Some((slope, intercept)) = spec.rescale {
        put(tags::RESCALE_SLOPE, VR::DS, s(&slope.to_string()));
        put(tags::RESCALE_INTERCEPT, VR::DS, s(&intercept.to_string()));
    }
    if let Some((center, width)) = spec.window {
        put(tags::WINDOW_CENTER, VR::DS, s(&center.to_string()));
        put(tags::WINDOW_WIDTH, VR::DS, s(&width.to_string()));
    }
    let ts = match spec.encoding {
        Encoding::ExplicitLe => uids::EXPLICIT_VR_LITTLE_ENDIAN,
        Encoding::ImplicitLe => uids::IMPLICIT_VR_LITTLE_ENDIAN,
        Encoding::Rle => uids::RLE_LOSSLESS,
        Encoding::JpegBaseline(_) => uids::JPEG_BASELINE8_BIT,
    };
    if spec.pixel_data {
        match spec.encoding {
            Encoding::Rle | Encoding::JpegBaseline(_) => {
                let fragments: Vec<Vec<u8>> = spec
                    .frames
                    .iter()
                    .map(|f| match spec.encoding {
                        Encoding::JpegBaseline(jpeg) => jpeg.to_vec(),
                        _ => rle_frame(f, spec.bits_allocated),
                    })
                    .collect();
                o.put(DataElement::new(
                    tags::PIXEL_DATA,
                    VR::OB,
                    Value::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
                ));
            }
            _ => {
                let all: Vec<u16> = spec.frames.concat();
                let v = if spec.bits_allocated == 8 {
                    let mut b: Vec<u8> = all.iter().map(|&x| x as u8).collect();
                    if b.len() % 2 == 1 {
                        b.push(0);
                    }
                    (VR::OB, PrimitiveValue::U8(b.into()))
                } else {
                    (VR::OW, PrimitiveValue::U16(all.into()))
                };
                o.put(DataElement::new(tags::PIXEL_DATA, v.0, v.1));
            }
        }
    }
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(spec.transfer_syntax_override.unwrap_or(ts))
        .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
        .media_storage_sop_instance_uid(SOP_UID);
    let mut out = Vec::new();
    if spec.transfer_syntax_override.is_some() {
        // dicom-rs refuses to write a data set in a transfer syntax it cannot encode:
        // write the meta group by hand and the data set as explicit VR little endian.
        out.extend_from_slice(&[0u8; 128]);
        out.extend_from_slice(b"DICM");
        meta.build()
            .expect("meta")
            .write(&mut out)
            .expect("write meta");
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .expect("explicit VR LE");
        o.write_dataset_with_ts(&mut out, ts)
            .expect("write data set");
    } else {
        let file = o.with_meta(meta).expect("meta");
        file.write_all(&mut out).expect("write dicom");
    }
    out
}

/// RLE Lossless frame (PS3.5 G): one segment per byte of the sample, most
/// significant first, each PackBits-encoded (here as literal runs).
fn rle_frame(values: &[u16], bits_allocated: u16) -> Vec<u8> {
    let planes: Vec<Vec<u8>> = if bits_allocated == 8 {
        vec![values.iter().map(|&v| v as u8).collect()]
    } else {
        vec![
            values.iter().map(|&v| (v >> 8) as u8).collect(),
            values.iter().map(|&v| v as u8).collect(),
        ]
    };
    let mut segments = Vec::new();
    for plane in &planes {
        let mut seg = Vec::new();
        for chunk in plane.chunks(128) {
            seg.push((chunk.len() - 1) as u8);
            seg.extend_from_slice(chunk);
        }
        if seg.len() % 2 == 1 {
            seg.push(0);
        }
        segments.push(seg);
    }
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
    let mut offset = 64u32;
    for (i, seg) in segments.iter().enumerate() {
        header[4 + 4 * i..8 + 4 * i].copy_from_slice(&offset.to_le_bytes());
        offset += seg.len() as u32;
    }
    let mut out = header;
    for seg in segments {
        out.extend_from_slice(&seg);
    }
    out
}

/// A test radiograph with both extremes present (so min–max maps exactly).
pub fn test_gray(w: u32, h: u32, seed: u32) -> GrayImage {
    let mut g = super::gray_image(w, h, seed);
    g.put_pixel(0, 0, image::Luma([0]));
    g.put_pixel(1, 0, image::Luma([255]));
    g
}

/// `f(g)` for every pixel, row-major.
pub fn stored(g: &GrayImage, f: impl Fn(u16) -> u16) -> Vec<u16> {
    g.as_raw().iter().map(|&v| f(u16::from(v))).collect()
}

/// DICOM options for the tests' small frames (40 x 30): the geometry bounds of a real
/// radiograph (64 px sides) are tested on their own.
pub fn test_opts() -> cxr::imaging::dicom::DicomOptions {
    cxr::imaging::dicom::DicomOptions {
        geometry: super::test_geometry(),
        ..Default::default()
    }
}

/// `bytes` (a Part-10 file) with `extra` attributes put into its data set.
pub fn with_tags(bytes: &[u8], extra: &[(Tag, VR, &str)]) -> Vec<u8> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(bytes)
        .expect("a file built by build()");
    for (tag, vr, v) in extra {
        obj.put(DataElement::new(*tag, *vr, PrimitiveValue::from(*v)));
    }
    let mut out = Vec::new();
    obj.write_all(&mut out).expect("write dicom");
    out
}
