//! The resize against an independent implementation: Pillow's BILINEAR (what the model
//! cards name), on a fixture it made (tests/fixtures/make_resize_fixture.py): shrinking
//! 97 x 83 to 32 x 32 (antialiased) and enlarging to 224 x 224. Every pixel within one
//! gray level (rounding), and on average far closer.

use cxr::imaging::{ResizeFilter, resize_gray};

fn load(name: &str) -> image::GrayImage {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_luma8()
}

#[test]
fn bilinear_resize_matches_pillow() {
    let src = load("resize_src.png");
    assert_eq!(src.dimensions(), (97, 83));
    for s in [32u32, 224] {
        let pil = load(&format!("resize_pil_{s}.png"));
        let ours = resize_gray(&src, s, s, ResizeFilter::Bilinear);
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        assert!(max <= 1, "{s} px: max difference {max} gray levels");
        assert!(mean < 0.25, "{s} px: mean difference {mean}");
    }
}
