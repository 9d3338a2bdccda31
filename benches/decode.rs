//! Decoding a gray radiograph saved as RGB (as every JPEG of the Kermany test split
//! is) to the model's input, on one core: the `image` crate's own path (decode, the
//! colourfulness check over an RGB copy, its per-pixel colour conversion to gray)
//! against cxr's (decode, then `neutral_gray`: R = G = B checked and converted by
//! table), both on the same bytes in the same run, each asserted to give the same
//! gray image. Then the whole server-side preprocessing (`preprocess_checked`).
//!
//!   cargo bench --bench decode            (CXR_BENCH_ROUNDS=N, default 2000)
//!
//! Prints a Markdown table; results go to bench/RESULTS.md.

use std::io::Cursor;
use std::time::Instant;

use cxr::imaging::{Geometry, Preprocessing, Preprocessor, colourfulness, neutral_gray};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

/// A radiograph-like gray image of `w × h`, written as an RGB JPEG.
fn gray_rgb_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut r = cxr::model::arch::SplitMix64(1);
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v =
            128.0 + 60.0 * ((x as f64 / 37.0).sin() + (y as f64 / 23.0).cos()) + r.uniform() * 20.0;
        Rgb([v.clamp(0.0, 255.0) as u8; 3])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
        .unwrap();
    out
}

fn decode(b: &[u8]) -> DynamicImage {
    image::load_from_memory_with_format(b, ImageFormat::Jpeg).unwrap()
}

/// Median µs of `n` runs of `f`, after a warm-up.
fn median_us(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[n / 2]
}

fn main() {
    let n: usize = std::env::var("CXR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let pre = Preprocessor::new(224, &Preprocessing::default()).unwrap();
    let geometry = Geometry::default();
    println!(
        "| gray saved as RGB JPEG, one thread, median µs | image crate's path | cxr's path | image crate / cxr | whole preprocessing |"
    );
    println!("|---|---|---|---|---|");
    for (w, h) in [(224u32, 224u32), (1024, 1024), (2000, 1600)] {
        let b = gray_rgb_jpeg(w, h);
        let img = decode(&b);
        let fast = neutral_gray(&img).expect("a gray JPEG decodes to R = G = B");
        assert_eq!(fast.as_raw(), img.to_luma8().as_raw(), "same gray bytes");
        let rounds = (n * 224 * 224 / (w * h) as usize).max(20);
        let crate_path = median_us(rounds, || {
            let img = decode(std::hint::black_box(&b));
            std::hint::black_box(colourfulness(&img));
            std::hint::black_box(img.into_luma8());
        });
        let cxr_path = median_us(rounds, || {
            let img = decode(std::hint::black_box(&b));
            std::hint::black_box(neutral_gray(&img));
        });
        let whole = median_us(rounds, || {
            std::hint::black_box(
                pre.preprocess_checked(
                    std::hint::black_box(&b),
                    u64::MAX,
                    &geometry,
                    &mut cxr::imaging::GateTime::default(),
                )
                .unwrap(),
            );
        });
        println!(
            "| {w} × {h} ({} KB) | {crate_path:.0} | {cxr_path:.0} | {:.2} | {whole:.0} |",
            b.len() / 1024,
            crate_path / cxr_path
        );
    }
}
