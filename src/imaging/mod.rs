//! Images in, model input tensors out: the one transform shared by training and
//! serving.
//!
//! `decode` (JPEG/PNG, any bit depth or colour type, pixel count capped before any
//! pixel buffer is allocated) → grayscale 8-bit → `resize` to the model's square input
//! (antialiased convolution, aspect ratio not kept, as the training images were made)
//! → replicate to 3 channels → mean/std normalisation through a per-channel lookup
//! table. The trainer and the server both call [`Preprocessor`], so a model never sees
//! at serving time an image prepared differently from training.

pub mod complete;
pub mod dicom;
pub mod sr;

use std::cell::RefCell;
use std::io::Cursor;

use fast_image_resize::{
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image as FirImage,
    images::ImageRef,
};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// ImageNet channel means, the normalisation torchvision's pretrained weights expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Why an image could not be turned into a tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Zero bytes.
    #[error("the image is empty")]
    Empty,
    /// A format we recognise but do not take.
    #[error("unsupported image format {0}; send JPEG or PNG")]
    UnsupportedFormat(String),
    /// The header claims more pixels than allowed; refused before decoding.
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The configured limit.
        limit: u64,
    },
    /// Not decodable (truncated, corrupt, not an image).
    #[error("could not decode the image: {0}")]
    Decode(String),
    /// A near-constant image (blank, saturated): nothing to classify.
    #[error(
        "the image is blank or saturated: its 1st to 99th percentile gray levels span {range} of 255 (a radiograph spans far more)"
    )]
    Blank {
        /// p99 − p1 of the 8-bit gray levels.
        range: u8,
    },
    /// A strongly coloured image: a radiograph is gray.
    #[error(
        "the image is in colour (colourfulness {colourfulness:.1}, a radiograph is near 0; refused above {limit}): send a radiograph, not a photo"
    )]
    Colour {
        /// Hasler–Süsstrunk colourfulness of the image.
        colourfulness: f64,
        /// The limit.
        limit: f64,
    },
    /// The header's geometry is not that of a radiograph; refused before decoding.
    #[error("an image of {width}x{height} pixels is not a radiograph: {reason}")]
    ImplausibleGeometry {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Which bound it breaks.
        reason: String,
    },
}

/// The shapes a radiograph can have, checked from the header before any pixel is
/// decoded (`--min-image-side`, `--max-aspect-ratio`): a 4,000,000 x 1 strip is no
/// chest film, and resizing one would cost memory in proportion to its long side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Shortest side accepted, pixels.
    pub min_side: u32,
    /// Largest long side / short side.
    pub max_aspect: f64,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            min_side: crate::config::defaults::MIN_IMAGE_SIDE,
            max_aspect: crate::config::defaults::MAX_ASPECT_RATIO,
        }
    }
}

impl Geometry {
    /// Refuses a `width x height` image outside the bounds.
    pub fn check(&self, width: u32, height: u32) -> Result<(), ImageError> {
        let refuse = |reason: String| ImageError::ImplausibleGeometry {
            width,
            height,
            reason,
        };
        if width.min(height) < self.min_side {
            return Err(refuse(format!(
                "a side is shorter than {} pixels",
                self.min_side
            )));
        }
        let aspect = f64::from(width.max(height)) / f64::from(width.min(height));
        if aspect > self.max_aspect {
            return Err(refuse(format!(
                "its aspect ratio {aspect:.2}:1 is outside 1:{0} .. {0}:1",
                self.max_aspect
            )));
        }
        Ok(())
    }
}

/// The preprocessing pipelines a model card may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Pipeline {
    /// Grayscale → resize → replicate to 3 channels → normalise (this module).
    #[serde(rename = "gray-resize-replicate-normalize")]
    GrayResizeReplicateNormalize,
}

/// Resampling filters a model card may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// Antialiased bilinear convolution (PIL's `BILINEAR`).
    Bilinear,
}

/// Preprocessing parameters, as recorded in a model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Preprocessing {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// The resampling filter.
    pub resize_filter: ResizeFilter,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Default for Preprocessing {
    fn default() -> Self {
        Self {
            pipeline: Pipeline::GrayResizeReplicateNormalize,
            resize_filter: ResizeFilter::Bilinear,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// A ready-to-run preprocessing for one input size (lookup tables built once).
#[derive(Debug, Clone)]
pub struct Preprocessor {
    size: u32,
    filter: ResizeFilter,
    lut: Box<[[f32; 256]; 3]>,
}

impl Preprocessor {
    /// Builds the transform for a square input of `size` pixels.
    pub fn new(size: u32, p: &Preprocessing) -> Result<Self, String> {
        if !(8..=4096).contains(&size) {
            return Err(format!("input size {size} is outside 8..=4096"));
        }
        if p.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || p.mean.iter().any(|m| !m.is_finite())
        {
            return Err(format!(
                "preprocessing mean {:?} / std {:?} must be finite with std > 0",
                p.mean, p.std
            ));
        }
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - p.mean[c]) / p.std[c];
            }
        }
        Ok(Self {
            size,
            filter: p.resize_filter,
            lut,
        })
    }

    /// Input height and width.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Encoded image bytes → `[3, S, S]` tensor (row-major, channel planes).
    pub fn preprocess(&self, bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, ImageError> {
        let gray = decode_gray(bytes, max_pixels)?;
        Ok(self.gray_to_tensor(&gray))
    }

    /// [`Preprocessor::preprocess`], refusing first, from the header, a geometry no
    /// radiograph has (the server's path).
    pub fn preprocess_checked(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        geometry: &Geometry,
    ) -> Result<Vec<f32>, ImageError> {
        let gray = decode_gray_with(bytes, max_pixels, Some(geometry))?;
        Ok(self.gray_to_tensor(&gray))
    }

    /// Grayscale image of any size → `[3, S, S]` tensor.
    pub fn gray_to_tensor(&self, gray: &GrayImage) -> Vec<f32> {
        let resized = self.resize(gray);
        self.normalize(&resized)
    }

    /// Resizes to `S × S` (a copy when already that size).
    pub fn resize(&self, gray: &GrayImage) -> GrayImage {
        resize_gray(gray, self.size, self.size, self.filter)
    }

    /// `S × S` grayscale → `[3, S, S]` normalised tensor.
    ///
    /// # Panics
    /// If `gray` is not `S × S` (a caller bug: use [`Preprocessor::resize`] first).
    pub fn normalize(&self, gray: &GrayImage) -> Vec<f32> {
        assert_eq!(
            gray.dimensions(),
            (self.size, self.size),
            "normalize needs an image resized to the model input"
        );
        let plane = gray.as_raw();
        let mut out = Vec::with_capacity(plane.len() * 3);
        for table in self.lut.iter() {
            out.extend(plane.iter().map(|&v| table[v as usize]));
        }
        out
    }
}

/// Width x height a JPEG or PNG header declares (nothing decoded); `None` when the
/// header cannot be read.
pub fn declared_pixels(bytes: &[u8]) -> Option<u64> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let (w, h) = reader.into_dimensions().ok()?;
    Some(u64::from(w) * u64::from(h))
}

/// `imaging::preprocess`: encoded bytes → model input, the function training and
/// serving share.
pub fn preprocess(p: &Preprocessor, bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, ImageError> {
    p.preprocess(bytes, max_pixels)
}

/// Decodes JPEG or PNG bytes to 8-bit grayscale. The header is read first and the
/// declared pixel count checked against `max_pixels` before any pixel buffer exists.
/// Colour is converted with Rec. 709 luma weights (exact for R = G = B); alpha is
/// ignored; 16-bit samples are scaled to 8 bits.
pub fn decode_gray(bytes: &[u8], max_pixels: u64) -> Result<GrayImage, ImageError> {
    decode_gray_with(bytes, max_pixels, None)
}

/// [`decode_gray`], with the header's geometry checked against `geometry` (when
/// given) before decoding. A JPEG or PNG whose data ends before its end marker
/// (a cut upload) is refused rather than decoded with its missing rows filled in.
pub fn decode_gray_with(
    bytes: &[u8],
    max_pixels: u64,
    geometry: Option<&Geometry>,
) -> Result<GrayImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let format = reader.format();
    match format {
        Some(ImageFormat::Jpeg | ImageFormat::Png) => {}
        Some(other) => return Err(ImageError::UnsupportedFormat(format!("{other:?}"))),
        None => return Err(ImageError::Decode("not a JPEG or PNG image".into())),
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Decode("the image has no pixels".into()));
    }
    if let Some(g) = geometry {
        g.check(width, height)?;
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    // The whole stream must be there (header first: its size errors say more).
    if format == Some(ImageFormat::Jpeg) {
        complete::jpeg(bytes).map_err(ImageError::Decode)?;
    } else {
        complete::png(bytes).map_err(ImageError::Decode)?;
    }
    let mut limits = Limits::default();
    // Worst case: 16-bit RGBA output plus the decoder's own working buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8 * 2).max(1 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
    if geometry.is_some() && img.color().has_color() {
        let c = colourfulness(&img);
        if c > MAX_COLOURFULNESS {
            return Err(ImageError::Colour {
                colourfulness: c,
                limit: MAX_COLOURFULNESS,
            });
        }
    }
    let gray = img.into_luma8();
    if geometry.is_some() {
        check_not_blank(&gray)?;
    }
    Ok(gray)
}

/// Colourfulness above which an upload is refused as a colour image. Hasler and
/// Süsstrunk (2003) rate 0 "not colourful", 15 "slightly", 33 "moderately": a
/// grayscale radiograph saved as RGB scores 0, a tinted scan a few units, a photo
/// 30 to 100.
pub const MAX_COLOURFULNESS: f64 = 20.0;

/// Least gray-level span (p99 − p1, of 255) of an image worth classifying.
pub const MIN_GRAY_RANGE: u8 = 8;

/// Hasler–Süsstrunk colourfulness, `sqrt(σ_rg² + σ_yb²) + 0.3 sqrt(μ_rg² + μ_yb²)` with
/// rg = R − G and yb = (R + G)/2 − B, on at most about 250,000 sampled pixels.
pub fn colourfulness(img: &DynamicImage) -> f64 {
    let rgb = img.to_rgb8();
    let n = u64::from(rgb.width()) * u64::from(rgb.height());
    let step = ((n / 250_000) as usize).max(1);
    let (mut s_rg, mut s_yb, mut q_rg, mut q_yb, mut k) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for p in rgb.pixels().step_by(step) {
        let [r, g, b] = p.0.map(f64::from);
        let rg = r - g;
        let yb = 0.5 * (r + g) - b;
        s_rg += rg;
        s_yb += yb;
        q_rg += rg * rg;
        q_yb += yb * yb;
        k += 1.0;
    }
    let (m_rg, m_yb) = (s_rg / k, s_yb / k);
    let v_rg = (q_rg / k - m_rg * m_rg).max(0.0);
    let v_yb = (q_yb / k - m_yb * m_yb).max(0.0);
    (v_rg + v_yb).sqrt() + 0.3 * (m_rg * m_rg + m_yb * m_yb).sqrt()
}

/// Refuses a near-constant image: its 1st to 99th percentile gray levels span less
/// than [`MIN_GRAY_RANGE`].
pub fn check_not_blank(gray: &GrayImage) -> Result<(), ImageError> {
    let mut hist = [0u64; 256];
    for v in gray.as_raw() {
        hist[*v as usize] += 1;
    }
    let n: u64 = hist.iter().sum();
    let pct = |q: f64| {
        let target = (q * n as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (v, c) in hist.iter().enumerate() {
            acc += c;
            if acc >= target {
                return v as u8;
            }
        }
        255
    };
    let range = pct(0.99).saturating_sub(pct(0.01));
    if range < MIN_GRAY_RANGE {
        return Err(ImageError::Blank { range });
    }
    Ok(())
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Resizes a grayscale image with an antialiased convolution filter.
pub fn resize_gray(src: &GrayImage, width: u32, height: u32, filter: ResizeFilter) -> GrayImage {
    if src.dimensions() == (width, height) {
        return src.clone();
    }
    let src_ref = ImageRef::new(src.width(), src.height(), src.as_raw(), PixelType::U8)
        .expect("a GrayImage buffer holds width*height bytes");
    let mut dst = FirImage::new(width, height, PixelType::U8);
    let alg = match filter {
        ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
    };
    RESIZER.with(|r| {
        r.borrow_mut()
            .resize(&src_ref, &mut dst, &ResizeOptions::new().resize_alg(alg))
            .expect("U8 to U8 resize of non-empty images cannot fail");
    });
    GrayImage::from_raw(width, height, dst.into_vec())
        .expect("the resizer fills width*height bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn png<P: image::PixelWithColorType>(img: &ImageBuffer<P, Vec<P::Subpixel>>) -> Vec<u8>
    where
        [P::Subpixel]: image::EncodableLayout,
    {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn pre(size: u32) -> Preprocessor {
        Preprocessor::new(size, &Preprocessing::default()).unwrap()
    }

    fn expected(v: u8, c: usize) -> f32 {
        (v as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    }

    #[test]
    fn gray_png_gives_imagenet_normalised_planes() {
        let img = GrayImage::from_fn(8, 8, |x, y| Luma([(x * 8 + y) as u8 * 3]));
        let t = pre(8).preprocess(&png(&img), 1 << 20).unwrap();
        assert_eq!(t.len(), 3 * 64);
        for c in 0..3 {
            for (i, p) in img.as_raw().iter().enumerate() {
                assert_eq!(t[c * 64 + i], expected(*p, c));
            }
        }
    }

    #[test]
    fn rgb_with_equal_channels_equals_gray() {
        let gray = GrayImage::from_fn(16, 16, |x, y| Luma([(x * 13 + y * 7) as u8]));
        let rgb = ImageBuffer::<Rgb<u8>, _>::from_fn(16, 16, |x, y| {
            let v = gray.get_pixel(x, y)[0];
            Rgb([v, v, v])
        });
        let rgba = ImageBuffer::<Rgba<u8>, _>::from_fn(16, 16, |x, y| {
            let v = gray.get_pixel(x, y)[0];
            Rgba([v, v, v, 17])
        });
        let la = ImageBuffer::<LumaA<u8>, _>::from_fn(16, 16, |x, y| {
            LumaA([gray.get_pixel(x, y)[0], 200])
        });
        let p = pre(16);
        let g = p.preprocess(&png(&gray), 1 << 20).unwrap();
        assert_eq!(p.preprocess(&png(&rgb), 1 << 20).unwrap(), g);
        assert_eq!(p.preprocess(&png(&rgba), 1 << 20).unwrap(), g);
        assert_eq!(p.preprocess(&png(&la), 1 << 20).unwrap(), g);
    }

    #[test]
    fn sixteen_bit_png_scales_to_eight_bits() {
        let img = ImageBuffer::<Luma<u16>, _>::from_fn(4, 1, |x, _| {
            Luma([[0u16, 257 * 128, 65535, 257][x as usize]])
        });
        let t = pre(8).preprocess(&png(&img), 1 << 20).unwrap();
        assert_eq!(t.len(), 3 * 64);
        let g = decode_gray(&png(&img), 1 << 20).unwrap();
        assert_eq!(g.as_raw(), &vec![0u8, 128, 255, 1]);
    }

    #[test]
    fn palette_png_decodes_to_its_colours() {
        // A 2x1 indexed PNG whose palette holds gray 10 and gray 250.
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 2, 1);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![10, 10, 10, 250, 250, 250]);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[1, 0]).unwrap();
        }
        let g = decode_gray(&out, 1 << 20).unwrap();
        assert_eq!(g.as_raw(), &vec![250u8, 10]);
    }

    #[test]
    fn jpeg_decodes_and_resizes() {
        let img = GrayImage::from_fn(64, 48, |x, _| Luma([(x * 4) as u8]));
        let mut jpg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpg), ImageFormat::Jpeg)
            .unwrap();
        let t = pre(32).preprocess(&jpg, 1 << 20).unwrap();
        assert_eq!(t.len(), 3 * 32 * 32);
        // A horizontal ramp stays a ramp after resizing.
        assert!(t[31] > t[0]);
    }

    #[test]
    fn huge_declared_size_is_refused_before_decoding() {
        // A valid PNG signature and IHDR that claim 60000 x 60000, and nothing else.
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&60000u32.to_be_bytes());
        ihdr.extend_from_slice(&60000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        let crc = crc32(&ihdr);
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend_from_slice(&13u32.to_be_bytes());
        bytes.extend_from_slice(&ihdr);
        bytes.extend_from_slice(&crc.to_be_bytes());
        // The start of an IDAT chunk (a zlib header): the header ends there.
        let idat = b"IDAT\x78\x9c";
        bytes.extend_from_slice(&2u32.to_be_bytes());
        bytes.extend_from_slice(idat);
        bytes.extend_from_slice(&crc32(idat).to_be_bytes());
        match decode_gray(&bytes, 40_000_000) {
            Err(ImageError::TooManyPixels {
                width: 60000,
                height: 60000,
                ..
            }) => {}
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn garbage_empty_and_other_formats_are_refused() {
        assert!(matches!(decode_gray(b"", 100), Err(ImageError::Empty)));
        assert!(matches!(
            decode_gray(b"hello world, not an image", 100),
            Err(ImageError::Decode(_))
        ));
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(matches!(
            decode_gray(gif, 100),
            Err(ImageError::UnsupportedFormat(_))
        ));
        // A truncated PNG.
        let img = GrayImage::from_fn(32, 32, |x, y| Luma([(x ^ y) as u8]));
        let bytes = png(&img);
        assert!(matches!(
            decode_gray(&bytes[..bytes.len() / 2], 1 << 20),
            Err(ImageError::Decode(_))
        ));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
