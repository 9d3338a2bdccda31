//! Explanations: the class activation map of an answer, as a normalised grid and as a
//! PNG overlay on the input as the model saw it. A CAM says where the model's evidence
//! for a class lies in the film (an attention map); it is not a localisation of
//! disease and must not be read as one.

use image::{ImageFormat, Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::imaging::Preprocessing;
use crate::inference::ClassMaps;

/// What every heatmap says of itself.
pub const CAM_NOTE: &str = "A class activation map (CAM) shows where in the image the model's evidence for a class lies: an attention map of the model, not a localisation of disease. Do not read it as the site of a finding.";

/// The class activation maps of one answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Heatmap {
    /// `cam`.
    pub method: String,
    /// What a CAM is, and is not.
    pub note: String,
    /// The class the map of `answered` is for (the answered label).
    pub class: String,
    /// Grid rows (the last dense block's resolution: 7 for a 224 px input).
    pub grid_height: usize,
    /// Grid columns.
    pub grid_width: usize,
    /// The answered class's map, row-major, min-max normalised to 0..1.
    pub answered: Vec<f32>,
    /// The other class's map, likewise normalised.
    pub other: Vec<f32>,
    /// PNG (base64) of the answered class's map, upsampled bilinearly, over the
    /// input as the model saw it (its own size, grayscale, jet colour map at 40 %).
    // An image until a door encodes it (JSON: here; the PNG door and the DICOM
    // Secondary Capture take the image itself).
    #[serde(rename = "overlay_png", with = "png_base64")]
    #[schema(value_type = String)]
    pub overlay: RgbImage,
    /// PNG (base64) of the input as the model saw it (its own size, grayscale), the
    /// overlay's background: a viewer can show it alone or under the overlay.
    #[serde(rename = "input_png", with = "png_base64")]
    #[schema(value_type = String)]
    pub input: image::GrayImage,
}

/// An image as PNG bytes.
pub fn png<P, C>(img: &image::ImageBuffer<P, C>) -> Vec<u8>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .expect("PNG encoding to memory does not fail");
    out.into_inner()
}

/// An image in JSON: PNG in base64 (encoded when the answer is written).
mod png_base64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<P, C, S>(img: &image::ImageBuffer<P, C>, s: S) -> Result<S::Ok, S::Error>
    where
        P: image::PixelWithColorType,
        [P::Subpixel]: image::EncodableLayout,
        C: std::ops::Deref<Target = [P::Subpixel]>,
        S: Serializer,
    {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(super::png(img)))
    }

    pub fn deserialize<'de, I: FromPng, D: Deserializer<'de>>(d: D) -> Result<I, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(serde::de::Error::custom)?;
        Ok(I::from_png(img))
    }

    /// The image types a heatmap holds.
    pub trait FromPng {
        fn from_png(img: image::DynamicImage) -> Self;
    }

    impl FromPng for image::RgbImage {
        fn from_png(img: image::DynamicImage) -> Self {
            img.to_rgb8()
        }
    }

    impl FromPng for image::GrayImage {
        fn from_png(img: image::DynamicImage) -> Self {
            img.to_luma8()
        }
    }
}

/// Min-max normalised to 0..1 (a constant map is all zeros).
pub fn normalise(v: &[f32]) -> Vec<f32> {
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let span = hi - lo;
    v.iter()
        .map(|&x| if span > 0.0 { (x - lo) / span } else { 0.0 })
        .collect()
}

/// The heatmap of `answered` (0 NORMAL, 1 PNEUMONIA) over the model input `input`
/// (`[3, s, s]`, normalised with `pre`).
pub fn heatmap(
    cam: &ClassMaps,
    answered: usize,
    label: &str,
    input: &[f32],
    size: u32,
    pre: &Preprocessing,
) -> Heatmap {
    let a = normalise(cam.class(answered));
    let o = normalise(cam.class(1 - answered));
    let overlay = overlay(&a, cam.height, cam.width, input, size, pre);
    Heatmap {
        method: "cam".into(),
        note: CAM_NOTE.into(),
        class: label.into(),
        grid_height: cam.height,
        grid_width: cam.width,
        answered: a,
        other: o,
        overlay,
        input: input_gray(input, size, pre),
    }
}

/// The input's first channel, un-normalised back to 8-bit gray.
pub fn input_gray(input: &[f32], size: u32, pre: &Preprocessing) -> image::GrayImage {
    let s = size as usize;
    image::GrayImage::from_fn(size, size, |x, y| {
        let v = input[y as usize * s + x as usize] * pre.std[0] + pre.mean[0];
        image::Luma([(v * 255.0).round().clamp(0.0, 255.0) as u8])
    })
}

/// The grid (0..1, `h × w`) upsampled to `size`, in a jet colour map at 40 % over the
/// input's first channel (un-normalised back to gray).
pub fn overlay(
    grid: &[f32],
    h: usize,
    w: usize,
    input: &[f32],
    size: u32,
    pre: &Preprocessing,
) -> RgbImage {
    let s = size as usize;
    RgbImage::from_fn(size, size, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let gray = (input[y * s + x] * pre.std[0] + pre.mean[0]).clamp(0.0, 1.0);
        let t = bilinear(
            grid,
            h,
            w,
            (x as f32 + 0.5) * w as f32 / s as f32 - 0.5,
            (y as f32 + 0.5) * h as f32 / s as f32 - 0.5,
        );
        let c = jet(t);
        let mix = |k: usize| {
            ((0.6 * gray + 0.4 * c[k]) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        Rgb([mix(0), mix(1), mix(2)])
    })
}

/// Bilinear sample of a row-major grid at (fx, fy) in grid cells (edges clamped).
fn bilinear(g: &[f32], h: usize, w: usize, fx: f32, fy: f32) -> f32 {
    let cx = fx.clamp(0.0, (w - 1) as f32);
    let cy = fy.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (cx.floor() as usize, cy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (tx, ty) = (cx - x0 as f32, cy - y0 as f32);
    let top = g[y0 * w + x0] * (1.0 - tx) + g[y0 * w + x1] * tx;
    let bottom = g[y1 * w + x0] * (1.0 - tx) + g[y1 * w + x1] * tx;
    top * (1.0 - ty) + bottom * ty
}

/// The jet colour map: blue (0) → cyan → yellow → red (1).
fn jet(t: f32) -> [f32; 3] {
    let f = |d: f32| (1.5 - (4.0 * t - d).abs()).clamp(0.0, 1.0);
    [f(3.0), f(2.0), f(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_and_bilinear_by_hand() {
        assert_eq!(normalise(&[2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(normalise(&[5.0, 5.0]), vec![0.0, 0.0]);
        let g = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(bilinear(&g, 2, 2, 0.5, 0.5), 1.5);
        assert_eq!(bilinear(&g, 2, 2, -3.0, 0.0), 0.0);
        assert_eq!(bilinear(&g, 2, 2, 1.0, 1.0), 3.0);
        assert_eq!(jet(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(jet(1.0), [0.5, 0.0, 0.0]);
    }
}
