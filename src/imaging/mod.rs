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
mod content;
pub mod dicom;
pub mod files;
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

pub use content::{
    GateTime, MAX_COLOURFULNESS, MIN_GRAY_RANGE, check_not_blank, colourfulness, neutral_gray,
};

crate::message_error!(
    /// Why a card's preprocessing cannot be applied.
    PreprocessingError
);

/// ImageNet channel means, the normalisation torchvision's pretrained weights expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Why an image could not be turned into a tensor.
#[derive(Debug, Clone, thiserror::Error)]
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
            min_side: crate::defaults::MIN_IMAGE_SIDE,
            max_aspect: crate::defaults::MAX_ASPECT_RATIO,
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
    pub fn new(size: u32, p: &Preprocessing) -> Result<Self, PreprocessingError> {
        if !(8..=4096).contains(&size) {
            return Err(PreprocessingError(format!(
                "input size {size} is outside 8..=4096"
            )));
        }
        if p.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || p.mean.iter().any(|m| !m.is_finite())
        {
            return Err(PreprocessingError(format!(
                "preprocessing mean {:?} / std {:?} must be finite with std > 0",
                p.mean, p.std
            )));
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
    /// radiograph has, then colour and blank images (the server's path); the gates'
    /// time is added to `gates`.
    pub fn preprocess_checked(
        &self,
        bytes: &[u8],
        max_pixels: u64,
        geometry: &Geometry,
        gates: &mut GateTime,
    ) -> Result<Vec<f32>, ImageError> {
        let gray = decode_gray_with(bytes, max_pixels, Some(geometry), gates)?;
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
    decode_gray_with(bytes, max_pixels, None, &mut GateTime::default())
}

/// [`decode_gray`], with the header's geometry checked against `geometry` (when
/// given) before decoding, and colour and blank images refused after it (the gates,
/// whose time is added to `gates`). A JPEG or PNG whose data ends before its end
/// marker (a cut upload) is refused rather than decoded with its missing rows filled
/// in.
pub fn decode_gray_with(
    bytes: &[u8],
    max_pixels: u64,
    geometry: Option<&Geometry>,
    gates: &mut GateTime,
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
        gates.time(|| g.check(width, height))?;
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
        complete::jpeg(bytes).map_err(|e| ImageError::Decode(e.0))?;
    } else {
        complete::png(bytes).map_err(|e| ImageError::Decode(e.0))?;
    }
    let mut limits = Limits::default();
    // Worst case: 16-bit RGBA output plus the decoder's own working buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8 * 2).max(1 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
    let gray = match neutral_gray(&img) {
        // R = G = B everywhere: gray, no colour to measure.
        Some(gray) => gray,
        None => {
            if geometry.is_some() && img.color().has_color() {
                let c = gates.time(|| colourfulness(&img));
                if c > MAX_COLOURFULNESS {
                    return Err(ImageError::Colour {
                        colourfulness: c,
                        limit: MAX_COLOURFULNESS,
                    });
                }
            }
            img.into_luma8()
        }
    };
    if geometry.is_some() {
        gates.time(|| check_not_blank(&gray))?;
    }
    Ok(gray)
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
#[path = "tests.rs"]
mod tests;
