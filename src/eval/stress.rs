//! The stress validation: the validation images again, each under a fixed, seeded
//! acquisition perturbation (another exposure, another processing), so that the epoch
//! and the operating point are chosen where they hold when films are made
//! differently, not only on films like the training ones.
//!
//! Per image (its own generator, seeded from the set's seed and its index, so any
//! image's perturbation is reproducible alone), on intensities in [0, 1]:
//! gamma `exp(U(-0.72, 0.72))`; contrast `U(0.52, 1.48)` about the mean and brightness
//! `U(0.68, 1.32)`; with probability 0.3 each: Gaussian blur (σ `U(0.3, 1.8)`), unsharp
//! masking (σ 1, amount `U(0.3, 1.56)`), local contrast (31-px box mean, amount
//! `U(0.2, 1.1)`); with probability 0.45 Gaussian noise (sd `U(0, 0.048)`). These are
//! the training augmentation's photometric transforms at 1.6× their strength.

use image::GrayImage;

use crate::model::arch::SplitMix64;

/// The seed of the stress set every card reports.
pub const STRESS_SEED: u64 = 20_261_126;

/// A one-line description for model cards.
pub const DESCRIPTION: &str = "validation images under fixed seeded acquisition perturbations \
(gamma exp(U(-0.72,0.72)); contrast U(0.52,1.48), brightness U(0.68,1.32); p 0.3 each: Gaussian \
blur sigma U(0.3,1.8), unsharp mask U(0.3,1.56), 31-px local contrast U(0.2,1.1); p 0.45 Gaussian \
noise sd U(0,0.048)); seed 20261126";

fn u(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

/// The perturbed copy of image number `index` of a set seeded with `seed`.
pub fn perturb(img: &GrayImage, seed: u64, index: u64) -> GrayImage {
    let mut rng = SplitMix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (w, h) = img.dimensions();
    let mut x: Vec<f64> = img.as_raw().iter().map(|&v| f64::from(v) / 255.0).collect();
    let gamma = u(&mut rng, -0.72, 0.72).exp();
    for v in &mut x {
        *v = v.max(1e-4).powf(gamma);
    }
    let c = u(&mut rng, 0.52, 1.48);
    let b = u(&mut rng, 0.68, 1.32);
    let mean = x.iter().sum::<f64>() / x.len().max(1) as f64;
    for v in &mut x {
        *v = ((*v - mean) * c + mean) * b;
    }
    if rng.uniform() < 0.3 {
        let s = u(&mut rng, 0.3, 1.8);
        x = gaussian_blur(&x, w as usize, h as usize, s);
    }
    if rng.uniform() < 0.3 {
        let a = u(&mut rng, 0.3, 1.56);
        let bl = gaussian_blur(&x, w as usize, h as usize, 1.0);
        for (v, m) in x.iter_mut().zip(bl) {
            *v += a * (*v - m);
        }
    }
    if rng.uniform() < 0.3 {
        let a = u(&mut rng, 0.2, 1.1);
        let m = box_mean(&x, w as usize, h as usize, 15);
        for (v, m) in x.iter_mut().zip(m) {
            *v += a * (*v - m);
        }
    }
    if rng.uniform() < 0.45 {
        let sd = u(&mut rng, 0.0, 0.048);
        for v in &mut x {
            *v += sd * rng.normal();
        }
    }
    GrayImage::from_raw(
        w,
        h,
        x.iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect(),
    )
    .expect("same dimensions")
}

/// Separable Gaussian blur (radius 4), edges clamped.
fn gaussian_blur(x: &[f64], w: usize, h: usize, sigma: f64) -> Vec<f64> {
    let r = 4i64;
    let k: Vec<f64> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = k.iter().sum();
    let k: Vec<f64> = k.iter().map(|v| v / sum).collect();
    let clamp = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
    let mut tmp = vec![0.0; x.len()];
    for y in 0..h {
        for xx in 0..w {
            tmp[y * w + xx] = (-r..=r)
                .map(|i| k[(i + r) as usize] * x[y * w + clamp(xx as i64 + i, w)])
                .sum();
        }
    }
    let mut out = vec![0.0; x.len()];
    for y in 0..h {
        for xx in 0..w {
            out[y * w + xx] = (-r..=r)
                .map(|i| k[(i + r) as usize] * tmp[clamp(y as i64 + i, h) * w + xx])
                .sum();
        }
    }
    out
}

/// Mean over the (2r+1)² box around each pixel, the box cut at the edges (summed
/// area table).
fn box_mean(x: &[f64], w: usize, h: usize, r: usize) -> Vec<f64> {
    let mut sat = vec![0.0; (w + 1) * (h + 1)];
    for y in 0..h {
        let mut row = 0.0;
        for xx in 0..w {
            row += x[y * w + xx];
            sat[(y + 1) * (w + 1) + xx + 1] = sat[y * (w + 1) + xx + 1] + row;
        }
    }
    let mut out = vec![0.0; x.len()];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
        for xx in 0..w {
            let (x0, x1) = (xx.saturating_sub(r), (xx + r + 1).min(w));
            let s = sat[y1 * (w + 1) + x1] - sat[y0 * (w + 1) + x1] - sat[y1 * (w + 1) + x0]
                + sat[y0 * (w + 1) + x0];
            out[y * w + xx] = s / ((y1 - y0) * (x1 - x0)) as f64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> GrayImage {
        GrayImage::from_fn(48, 40, |x, y| image::Luma([(x * 4 + y * 2) as u8]))
    }

    #[test]
    fn perturbation_is_fixed_per_seed_and_index_and_differs_between_images() {
        let a = perturb(&img(), STRESS_SEED, 3);
        assert_eq!(a, perturb(&img(), STRESS_SEED, 3));
        assert_eq!(a.dimensions(), (48, 40));
        assert_ne!(a, perturb(&img(), STRESS_SEED, 4));
        assert_ne!(a, img());
    }

    #[test]
    fn box_mean_and_blur_by_hand() {
        // A constant image stays constant under both.
        let x = vec![0.5; 20];
        assert!(
            box_mean(&x, 5, 4, 2)
                .iter()
                .all(|v| (v - 0.5).abs() < 1e-12)
        );
        assert!(
            gaussian_blur(&x, 5, 4, 1.0)
                .iter()
                .all(|v| (v - 0.5).abs() < 1e-12)
        );
        // 3x1 row [0, 3, 6] with r = 1: means [1.5, 3, 4.5].
        let m = box_mean(&[0.0, 3.0, 6.0], 3, 1, 1);
        assert_eq!(m, vec![1.5, 3.0, 4.5]);
    }
}
