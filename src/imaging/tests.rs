//! Unit tests of `mod.rs`.

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
    let la =
        ImageBuffer::<LumaA<u8>, _>::from_fn(16, 16, |x, y| LumaA([gray.get_pixel(x, y)[0], 200]));
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

#[test]
fn gate_time_starts_at_the_first_gate_and_sums_them() {
    use std::time::{Duration, Instant};
    let mut gates = GateTime::default();
    assert_eq!(gates.span(), None, "no gate has run");
    let before = Instant::now();
    let out = gates.time(|| {
        std::thread::sleep(Duration::from_millis(2));
        7
    });
    assert_eq!(out, 7, "the gate's own result");
    let between = Instant::now();
    gates.time(|| std::thread::sleep(Duration::from_millis(3)));
    let (start, total) = gates.span().expect("two gates ran");
    assert!(
        before <= start && start <= between,
        "the first gate's start, not the last's"
    );
    assert!(total >= Duration::from_millis(5), "the sum: {total:?}");
    assert!(total <= before.elapsed());
}

#[test]
fn checked_preprocessing_times_its_gates_within_the_decode() {
    use std::time::{Duration, Instant};
    let img = GrayImage::from_fn(96, 80, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]));
    let mut gates = GateTime::default();
    let before = Instant::now();
    pre(8)
        .preprocess_checked(&png(&img), 1 << 20, &Geometry::default(), &mut gates)
        .unwrap();
    let window = before.elapsed();
    let (start, total) = gates.span().expect("the gates ran");
    assert!(start >= before && start - before <= window, "{start:?}");
    assert!(total > Duration::ZERO && total <= window, "{total:?}");
    // A gate's refusal is timed too; the unchecked decode runs no gate.
    let blank = png(&GrayImage::from_pixel(96, 80, Luma([128])));
    let mut refused = GateTime::default();
    assert!(matches!(
        pre(8).preprocess_checked(&blank, 1 << 20, &Geometry::default(), &mut refused),
        Err(ImageError::Blank { .. })
    ));
    assert!(refused.total > Duration::ZERO);
    let mut unchecked = GateTime::default();
    decode_gray_with(&png(&img), 1 << 20, None, &mut unchecked).unwrap();
    assert_eq!(unchecked, GateTime::default());
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
