//! What a radiograph's pixels must look like to be classified: gray, not blank.

use std::time::{Duration, Instant};

use image::{DynamicImage, GrayImage};

use super::ImageError;

/// The time a decode spent in its gates (geometry, colour, blank): when the first
/// began and their sum. The decoder fills the caller's; the server's trace shows it
/// as the `gates` span inside `decode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateTime {
    /// When the first gate began; none until one has run.
    pub first_start: Option<Instant>,
    /// All the gates' time together.
    pub total: Duration,
}

impl GateTime {
    /// Runs one gate and adds its time.
    pub fn time<T>(&mut self, gate: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = gate();
        self.total += t.elapsed();
        self.first_start.get_or_insert(t);
        out
    }

    /// When the first gate began and how long the gates took, once one has run.
    pub fn span(&self) -> Option<(Instant, Duration)> {
        self.first_start.map(|t| (t, self.total))
    }
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
    match img {
        // 8-bit colour, as decoders give it: read in place (no RGB copy).
        DynamicImage::ImageRgb8(b) => colourfulness_of(b.as_raw(), 3),
        DynamicImage::ImageRgba8(b) => colourfulness_of(b.as_raw(), 4),
        other => colourfulness_of(other.to_rgb8().as_raw(), 3),
    }
}

/// [`colourfulness`] of interleaved 8-bit pixels of `channels` samples, R, G, B
/// first. The sums are kept in integers (2·yb for yb): they are exact, as the f64
/// sums they replace were, so the score is the same to the last bit.
fn colourfulness_of(raw: &[u8], channels: usize) -> f64 {
    let n = (raw.len() / channels) as u64;
    let step = ((n / 250_000) as usize).max(1);
    let (mut s_rg, mut s_yb2, mut q_rg, mut q_yb2) = (0i64, 0i64, 0u64, 0u64);
    let mut k = 0u64;
    for p in raw.chunks_exact(channels).step_by(step) {
        let (r, g, b) = (i64::from(p[0]), i64::from(p[1]), i64::from(p[2]));
        let rg = r - g;
        let yb2 = r + g - 2 * b;
        s_rg += rg;
        s_yb2 += yb2;
        q_rg += (rg * rg) as u64;
        q_yb2 += (yb2 * yb2) as u64;
        k += 1;
    }
    let k = k as f64;
    let (m_rg, m_yb) = (s_rg as f64 / k, 0.5 * s_yb2 as f64 / k);
    let v_rg = (q_rg as f64 / k - m_rg * m_rg).max(0.0);
    let v_yb = (0.25 * q_yb2 as f64 / k - m_yb * m_yb).max(0.0);
    (v_rg + v_yb).sqrt() + 0.3 * (m_rg * m_rg + m_yb * m_yb).sqrt()
}

/// `img` as 8-bit gray when it is 8-bit RGB with R = G = B in every pixel (a
/// radiograph saved in colour, as every image of the Kermany test split is): the
/// same bytes as [`DynamicImage::into_luma8`], several times faster (that crate
/// converts each pixel through f32 colour-space arithmetic). `None` for anything
/// else, which the caller converts the slow way.
pub fn neutral_gray(img: &DynamicImage) -> Option<GrayImage> {
    let DynamicImage::ImageRgb8(rgb) = img else {
        return None;
    };
    let raw = rgb.as_raw();
    if !raw.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]) {
        return None;
    }
    let table = neutral_table();
    let gray = raw
        .iter()
        .step_by(3)
        .map(|&v| table[usize::from(v)])
        .collect();
    Some(GrayImage::from_raw(rgb.width(), rgb.height(), gray).expect("one byte per pixel"))
}

/// What the `image` crate makes of gray level (v, v, v), for every v: asked of the
/// crate itself once, so the fast path cannot drift from it.
fn neutral_table() -> &'static [u8; 256] {
    static TABLE: std::sync::OnceLock<[u8; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let ramp = image::RgbImage::from_fn(256, 1, |x, _| image::Rgb([x as u8; 3]));
        let gray = DynamicImage::ImageRgb8(ramp).into_luma8();
        let mut t = [0u8; 256];
        t.copy_from_slice(gray.as_raw());
        t
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    /// The f64 colourfulness this module had: the reference.
    fn colourfulness_f64(img: &DynamicImage) -> f64 {
        let rgb = img.to_rgb8();
        let n = u64::from(rgb.width()) * u64::from(rgb.height());
        let step = ((n / 250_000) as usize).max(1);
        let (mut s_rg, mut s_yb, mut q_rg, mut q_yb, mut k) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
        for p in rgb.pixels().step_by(step) {
            let [r, g, b] = p.0.map(f64::from);
            let (rg, yb) = (r - g, 0.5 * (r + g) - b);
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

    fn noise(seed: u64) -> impl FnMut() -> u8 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        }
    }

    #[test]
    fn neutral_gray_is_the_image_crates_luma() {
        let mut r = noise(7);
        let gray = |w, h, r: &mut dyn FnMut() -> u8| {
            ImageBuffer::<Rgb<u8>, _>::from_fn(w, h, |_, _| Rgb([r(); 3]))
        };
        // Every level, then random ones.
        let ramp = ImageBuffer::<Rgb<u8>, _>::from_fn(256, 3, |x, _| Rgb([x as u8; 3]));
        for rgb in [ramp, gray(224, 224, &mut r), gray(1, 1, &mut r)] {
            let img = DynamicImage::ImageRgb8(rgb);
            let fast = neutral_gray(&img).expect("R = G = B");
            assert!(
                fast == img.clone().into_luma8(),
                "differs from the image crate"
            );
        }
        // One coloured pixel, last: not neutral.
        let mut rgb = gray(30, 20, &mut r);
        rgb.put_pixel(29, 19, Rgb([10, 11, 10]));
        assert!(neutral_gray(&DynamicImage::ImageRgb8(rgb)).is_none());
        let luma = DynamicImage::ImageLuma8(ImageBuffer::from_fn(4, 4, |x, _| Luma([x as u8])));
        assert!(neutral_gray(&luma).is_none());
        let rgba =
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(4, 4, |_, _| Rgba([9, 9, 9, 255])));
        assert!(neutral_gray(&rgba).is_none());
    }

    #[test]
    fn colourfulness_in_integers_is_the_f64_one_to_the_bit() {
        let mut r = noise(11);
        // 1200 × 600 pixels: sampled every 2nd pixel; 300 × 200: all of them.
        for (w, h) in [(1200u32, 600u32), (300, 200), (1, 1)] {
            let tint: Vec<u8> = (0..3).map(|_| r() / 4).collect();
            let rgb = ImageBuffer::<Rgb<u8>, _>::from_fn(w, h, |_, _| {
                let v = r() / 2;
                Rgb([v + tint[0], v + tint[1], r() / 2 + tint[2]])
            });
            let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).to_rgba8());
            for img in [DynamicImage::ImageRgb8(rgb), rgba] {
                let (fast, reference) = (colourfulness(&img), colourfulness_f64(&img));
                assert!(reference > 1.0 || w == 1, "a colour image");
                assert_eq!(
                    fast.to_bits(),
                    reference.to_bits(),
                    "{w}x{h}: {fast} vs {reference}"
                );
            }
        }
        let gray = DynamicImage::ImageLuma8(ImageBuffer::from_fn(40, 30, |x, _| Luma([x as u8])));
        assert_eq!(colourfulness(&gray), 0.0);
    }
}
