//! The class activation map as a DICOM Secondary Capture image, for the viewers a
//! radiologist reads in (they show SC images, not JSON heatmaps): the overlay over
//! the image as the model saw it, enlarged, with a band of burned-in text that says
//! what it is (model, version, answer, "attention map, not a localisation of
//! disease"). Filed in the source's study, referencing the source image.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use image::{Rgb, RgbImage};

use super::content::{code, seq};
use super::{SourceRefs, SrError, SrSource, UidMaker, now_da_tm, part10, put_patient_and_study};

/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";

/// The font of the burned-in text (DejaVu Sans, its licence in assets/).
const FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");

/// Width of the image drawn (the overlay is enlarged to it).
const WIDTH: u32 = 512;
/// Height of one line of text, and the text's size.
const LINE: u32 = 20;
const TEXT_PX: f32 = 14.0;

/// What the SC shows.
pub struct ScImage<'a> {
    /// The overlay (the answered class's map over the input), RGB.
    pub overlay: &'a RgbImage,
    /// The lines burned in under it.
    pub lines: Vec<String>,
    /// `cxr <variant>` (the equipment's model name).
    pub algorithm: &'a str,
    /// The software and model versions.
    pub versions: String,
}

/// Builds the SC of `image` on `source`, as a Part-10 file.
pub fn build_sc(
    source: &SrSource,
    image: &ScImage<'_>,
    uids: &UidMaker,
) -> Result<Vec<u8>, SrError> {
    let refs = SourceRefs::of(source)?;
    let pixels = draw(image)?;
    let (da, tm) = now_da_tm();
    let software = env!("CARGO_PKG_VERSION");
    let sop_uid = uids.instance("sc");
    let mut o = InMemDicomObject::new_empty();
    put_patient_and_study(&mut o, source, refs.study);
    // SOP Common.
    o.put_str(tags::SOP_CLASS_UID, VR::UI, SECONDARY_CAPTURE);
    o.put_str(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    o.put_str(tags::INSTANCE_CREATION_DATE, VR::DA, &da);
    o.put_str(tags::INSTANCE_CREATION_TIME, VR::TM, &tm);
    // General Series.
    o.put_str(tags::MODALITY, VR::CS, "OT");
    o.put_str(tags::SERIES_INSTANCE_UID, VR::UI, uids.series("sc-series"));
    o.put_str(tags::SERIES_NUMBER, VR::IS, "9902");
    // Type 2C for a paired body part; a chest is not one, an empty value says so.
    o.put(DataElement::new(
        tags::LATERALITY,
        VR::CS,
        PrimitiveValue::Empty,
    ));
    o.put_str(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "cxr AI attention map: not a localisation of disease",
    );
    // General Equipment and SC Equipment.
    o.put_str(tags::MANUFACTURER, VR::LO, "cxr");
    o.put_str(tags::CONVERSION_TYPE, VR::CS, "WSD");
    o.put_str(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER, VR::LO, "cxr");
    o.put_str(
        tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME,
        VR::LO,
        image.algorithm,
    );
    o.put_str(
        tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS,
        VR::LO,
        image.versions.as_str(),
    );
    o.put_str(tags::DATE_OF_SECONDARY_CAPTURE, VR::DA, &da);
    o.put_str(tags::TIME_OF_SECONDARY_CAPTURE, VR::TM, &tm);
    // General Image.
    o.put_str(tags::INSTANCE_NUMBER, VR::IS, "1");
    o.put(DataElement::new(
        tags::PATIENT_ORIENTATION,
        VR::CS,
        PrimitiveValue::Empty,
    ));
    o.put_str(tags::CONTENT_DATE, VR::DA, &da);
    o.put_str(tags::CONTENT_TIME, VR::TM, &tm);
    o.put_str(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY");
    o.put_str(
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        "class activation map of a pneumonia classifier over the image as the model saw it; an attention map, not a localisation of disease",
    );
    o.put_str(tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    o.put_str(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    let mut source_ref = refs.image();
    source_ref.put(seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code(
            "121322",
            "DCM",
            "Source image for image processing operation",
        )],
    ));
    o.put(seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source_ref]));
    // Image Pixel.
    o.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(3_u16),
    ));
    o.put_str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB");
    o.put(DataElement::new(
        tags::PLANAR_CONFIGURATION,
        VR::US,
        PrimitiveValue::from(0_u16),
    ));
    o.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(pixels.height() as u16),
    ));
    o.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(pixels.width() as u16),
    ));
    for (tag, v) in [
        (tags::BITS_ALLOCATED, 8_u16),
        (tags::BITS_STORED, 8),
        (tags::HIGH_BIT, 7),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(pixels.into_raw().into()),
    ));
    part10(o, SECONDARY_CAPTURE, &sop_uid, software)
}

/// The overlay enlarged to [`WIDTH`], with the text in a black band under it.
fn draw(image: &ScImage<'_>) -> Result<RgbImage, SrError> {
    let (w, h) = image.overlay.dimensions();
    if w == 0 || h == 0 {
        return Err(SrError("the attention map is empty".into()));
    }
    let height = (u64::from(h) * u64::from(WIDTH) / u64::from(w)).max(1) as u32;
    let top = image::imageops::resize(
        image.overlay,
        WIDTH,
        height,
        image::imageops::FilterType::Triangle,
    );
    let band = LINE * image.lines.len() as u32 + LINE / 2;
    let mut out = RgbImage::new(WIDTH, height + band);
    image::imageops::replace(&mut out, &top, 0, 0);
    let font = FontRef::try_from_slice(FONT).map_err(|e| SrError(e.to_string()))?;
    let scaled = font.as_scaled(PxScale::from(TEXT_PX));
    for (i, line) in image.lines.iter().enumerate() {
        let baseline = (height + LINE * (i as u32 + 1)) as f32;
        let mut x = 6.0;
        for c in line.chars() {
            let glyph = scaled.scaled_glyph(c);
            let advance = scaled.h_advance(glyph.id);
            let mut glyph = glyph;
            glyph.position = point(x, baseline);
            if let Some(outline) = font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let (px, py) = (
                        b.min.x as i64 + i64::from(gx),
                        b.min.y as i64 + i64::from(gy),
                    );
                    if px >= 0 && py >= 0 && (px as u32) < out.width() && (py as u32) < out.height()
                    {
                        let v = (coverage.clamp(0.0, 1.0) * 255.0) as u8;
                        let p = out.get_pixel_mut(px as u32, py as u32);
                        *p = Rgb([p[0].max(v), p[1].max(v), p[2].max(v)]);
                    }
                });
            }
            x += advance;
        }
    }
    Ok(out)
}
