//! What a radiograph's pixels must look like to be classified: gray, not blank.

use image::{DynamicImage, GrayImage};

use super::ImageError;

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
