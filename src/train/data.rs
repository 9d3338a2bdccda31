//! The data: scanning `<root>/{train,test}/{NORMAL,PNEUMONIA}`, patient ids and the
//! patient-level validation split, class weights, the `augmented` top-up, and the
//! training-time augmentation. Every image goes through [`crate::imaging`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use image::GrayImage;

use crate::imaging::{Preprocessor, decode_gray};
use crate::model::arch::SplitMix64;
use crate::train::error::TrainError;

/// Class folder names, in label order (0 = NORMAL, 1 = PNEUMONIA).
pub const CLASSES: [&str; 2] = ["NORMAL", "PNEUMONIA"];

/// Largest image the trainer decodes: what the server accepts (the originals are
/// ~2000 px a side).
pub const MAX_PIXELS: u64 = crate::defaults::MAX_PIXELS;

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// File path.
    pub path: PathBuf,
    /// 0 = NORMAL, 1 = PNEUMONIA.
    pub label: u8,
    /// Patient (child) id derived from the file name.
    pub patient: String,
}

/// The patient a Kermany file name belongs to: `person1234_bacteria_5.jpeg` →
/// `person1234`; `IM-0115-0001.jpeg` → `IM-0115`; `NORMAL2-IM-1427-0001.jpeg` →
/// `NORMAL2-IM-1427`. Other names are their own patient (their stem).
pub fn patient_id(file_name: &str) -> String {
    let stem = file_name.rsplit_once('.').map_or(file_name, |(s, _)| s);
    if let Some(rest) = stem.strip_prefix("person") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            return format!("person{digits}");
        }
    }
    if let Some(pos) = stem.find("IM-") {
        let after = &stem[pos + 3..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            return format!("{}IM-{digits}", &stem[..pos]);
        }
    }
    stem.to_string()
}

/// Lists `<root>/<split>/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}`, sorted. Fails with the
/// folder's name when a class folder is missing or empty.
pub fn scan(root: &Path, split: &str) -> Result<Vec<Sample>, super::TrainError> {
    scan_folders(root, split)
}

fn scan_folders(root: &Path, split: &str) -> Result<Vec<Sample>, TrainError> {
    let mut out = Vec::new();
    for (label, class) in CLASSES.iter().enumerate() {
        let dir = root.join(split).join(class);
        let rd = std::fs::read_dir(&dir).map_err(|e| {
            TrainError::Data({
                format!(
                    "cannot read {}: {e} (expected <data>/{{train,test}}/{{NORMAL,PNEUMONIA}})",
                    dir.display()
                )
            })
        })?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "jpeg" | "jpg" | "png")
                })
            })
            .collect();
        if files.is_empty() {
            return Err(TrainError::Data(format!(
                "{} holds no .jpeg/.jpg/.png images: the class {class} is empty",
                dir.display()
            )));
        }
        files.sort();
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            out.push(Sample {
                patient: patient_id(&name),
                path,
                label: label as u8,
            });
        }
    }
    Ok(out)
}

/// Splits `samples` into (train, validation) by patient: every image of a patient
/// lands on the same side. Per class, patients are shuffled with `seed` and moved to
/// validation until it holds `fraction` of that class's images.
pub fn split_by_patient(
    samples: &[Sample],
    fraction: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut by_patient: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_patient.entry(s.patient.as_str()).or_default().push(s);
    }
    let mut val_patients = BTreeSet::new();
    let mut rng = SplitMix64(seed ^ 0x5EED_5A17);
    for label in 0..CLASSES.len() as u8 {
        // A patient belongs to the class of their first image.
        let mut patients: Vec<&str> = by_patient
            .iter()
            .filter(|(_, v)| v[0].label == label)
            .map(|(k, _)| *k)
            .collect();
        shuffle(&mut patients, &mut rng);
        let total = samples.iter().filter(|s| s.label == label).count();
        let target = (total as f64 * fraction).round() as usize;
        let mut taken = 0;
        for p in patients {
            if taken >= target {
                break;
            }
            taken += by_patient[p].len();
            val_patients.insert(p);
        }
    }
    samples
        .iter()
        .cloned()
        .partition(|s| !val_patients.contains(s.patient.as_str()))
}

/// Fisher–Yates with our generator.
pub fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// Images per class.
pub fn class_counts(samples: &[Sample]) -> [usize; 2] {
    let mut c = [0; 2];
    for s in samples {
        c[s.label as usize] += 1;
    }
    c
}

/// The `weighted` strategy's loss weights: 1 − n_class / n_total.
pub fn class_weights(counts: [usize; 2]) -> [f64; 2] {
    let n = (counts[0] + counts[1]) as f64;
    [1.0 - counts[0] as f64 / n, 1.0 - counts[1] as f64 / n]
}

/// Random transform parameters.
#[derive(Debug, Clone, Copy)]
pub struct AugmentSpec {
    /// Max rotation, degrees.
    pub rotate_deg: f64,
    /// Zoom range (scale factors).
    pub zoom: (f64, f64),
    /// Max shift as a fraction of the size.
    pub shift: f64,
    /// Brightness factor range.
    pub brightness: (f64, f64),
    /// Contrast factor range.
    pub contrast: (f64, f64),
}

impl AugmentSpec {
    /// Training-time augmentation.
    pub const TRAIN: Self = Self {
        rotate_deg: 10.0,
        zoom: (0.9, 1.15),
        shift: 0.08,
        brightness: (0.8, 1.2),
        contrast: (0.8, 1.2),
    };
    /// The stronger transform that makes the `augmented` strategy's extra NORMAL images.
    pub const TOP_UP: Self = Self {
        rotate_deg: 15.0,
        zoom: (0.85, 1.25),
        shift: 0.1,
        brightness: (0.75, 1.25),
        contrast: (0.75, 1.25),
    };
}

fn range(rng: &mut SplitMix64, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

/// Applies a random affine warp (rotation, zoom, shift; bilinear, black outside)
/// then brightness and contrast to an 8-bit grayscale image.
pub fn augment(img: &GrayImage, spec: &AugmentSpec, rng: &mut SplitMix64) -> GrayImage {
    let (w, h) = img.dimensions();
    let angle = (rng.uniform() * 2.0 - 1.0) * spec.rotate_deg.to_radians();
    let zoom = range(rng, spec.zoom);
    let tx = (rng.uniform() * 2.0 - 1.0) * spec.shift * f64::from(w);
    let ty = (rng.uniform() * 2.0 - 1.0) * spec.shift * f64::from(h);
    let brightness = range(rng, spec.brightness);
    let contrast = range(rng, spec.contrast);
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let (sin, cos) = angle.sin_cos();
    let src = img.as_raw();
    let mean = src.iter().map(|&v| f64::from(v)).sum::<f64>() / src.len().max(1) as f64;
    let sample = |x: f64, y: f64| -> f64 {
        if x < 0.0 || y < 0.0 || x > f64::from(w - 1) || y > f64::from(h - 1) {
            return 0.0;
        }
        let (x0, y0) = (x.floor() as u32, y.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - f64::from(x0), y - f64::from(y0));
        let p = |xx: u32, yy: u32| f64::from(src[(yy * w + xx) as usize]);
        (p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx) * (1.0 - fy)
            + (p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx) * fy
    };
    GrayImage::from_fn(w, h, |x, y| {
        // Inverse map: output pixel → source pixel.
        let dx = (f64::from(x) + 0.5 - cx - tx) / zoom;
        let dy = (f64::from(y) + 0.5 - cy - ty) / zoom;
        let sx = cos * dx + sin * dy + cx - 0.5;
        let sy = -sin * dx + cos * dy + cy - 0.5;
        let v = sample(sx, sy);
        let v = ((v - mean) * contrast + mean) * brightness;
        image::Luma([v.round().clamp(0.0, 255.0) as u8])
    })
}

/// Decodes and resizes every sample through the shared preprocessing (up to the
/// resize); returns the images and the samples that could not be read.
pub fn load_resized(
    samples: &[Sample],
    pre: &Preprocessor,
) -> (Vec<GrayImage>, Vec<(PathBuf, String)>) {
    let mut images = Vec::with_capacity(samples.len());
    let mut bad = Vec::new();
    for s in samples {
        match std::fs::read(&s.path)
            .map_err(|e| e.to_string())
            .and_then(|b| decode_gray(&b, MAX_PIXELS).map_err(|e| e.to_string()))
        {
            Ok(g) => images.push(pre.resize(&g)),
            Err(e) => {
                bad.push((s.path.clone(), e));
                images.push(GrayImage::new(pre.size(), pre.size()));
            }
        }
    }
    (images, bad)
}

/// The `augmented` strategy's top-up: writes `count` transformed copies of randomly
/// chosen NORMAL `sources` as PNG files into `dir` and returns them as samples
/// (label NORMAL, patient of their source, so they stay on the training side).
/// Deterministic for a seed; files already there from an earlier run are reused.
pub fn top_up(
    sources: &[Sample],
    count: usize,
    dir: &Path,
    seed: u64,
) -> Result<Vec<Sample>, TrainError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| TrainError::Data(format!("cannot create {}: {e}", dir.display())))?;
    let normals: Vec<&Sample> = sources.iter().filter(|s| s.label == 0).collect();
    if normals.is_empty() && count > 0 {
        return Err(TrainError::Data(
            "no NORMAL training images to top up from".into(),
        ));
    }
    let mut rng = SplitMix64(seed ^ 0x70_9D_0F);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let src = normals[rng.below(normals.len())];
        let mut local = SplitMix64(rng.next_u64());
        let stem = src
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("img");
        let path = dir.join(format!("gen{i:05}_{stem}.png"));
        if !path.exists() {
            let bytes = std::fs::read(&src.path)
                .map_err(|e| TrainError::Data(format!("{}: {e}", src.path.display())))?;
            let g = decode_gray(&bytes, MAX_PIXELS)
                .map_err(|e| TrainError::Data(format!("{}: {e}", src.path.display())))?;
            let aug = augment(&g, &AugmentSpec::TOP_UP, &mut local);
            let tmp = path.with_extension("png.tmp");
            aug.save_with_format(&tmp, image::ImageFormat::Png)
                .map_err(|e| TrainError::Data(format!("{}: {e}", tmp.display())))?;
            std::fs::rename(&tmp, &path)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        }
        out.push(Sample {
            path,
            label: 0,
            patient: src.patient.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, label: u8) -> Sample {
        Sample {
            path: PathBuf::from(name),
            label,
            patient: patient_id(name),
        }
    }

    #[test]
    fn patient_ids_follow_kermany_names() {
        assert_eq!(patient_id("person1234_bacteria_5.jpeg"), "person1234");
        assert_eq!(patient_id("person7_virus_10.jpeg"), "person7");
        assert_eq!(patient_id("IM-0115-0001.jpeg"), "IM-0115");
        assert_eq!(patient_id("NORMAL2-IM-1427-0001.jpeg"), "NORMAL2-IM-1427");
        assert_eq!(patient_id("scan.png"), "scan");
    }

    #[test]
    fn no_patient_on_both_sides_of_the_split() {
        let mut all = Vec::new();
        for p in 0..60 {
            for k in 0..(1 + p % 4) {
                all.push(s(&format!("person{p}_bacteria_{k}.jpeg"), 1));
            }
        }
        for p in 0..40 {
            for k in 0..(1 + p % 2) {
                all.push(s(&format!("IM-{p:04}-000{k}.jpeg"), 0));
            }
        }
        let (train, val) = split_by_patient(&all, 0.2, 42);
        assert_eq!(train.len() + val.len(), all.len());
        let tp: BTreeSet<_> = train.iter().map(|s| &s.patient).collect();
        assert!(val.iter().all(|s| !tp.contains(&s.patient)));
        let vc = class_counts(&val);
        assert!(vc[0] > 0 && vc[1] > 0, "both classes in validation: {vc:?}");
        // Same seed, same split.
        assert_eq!(split_by_patient(&all, 0.2, 42).1, val);
    }

    #[test]
    fn class_weights_are_exact() {
        let w = class_weights([1341, 3875]);
        assert_eq!(w[0], 1.0 - 1341.0 / 5216.0);
        assert_eq!(w[1], 1.0 - 3875.0 / 5216.0);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn augment_keeps_size_and_varies() {
        let img = GrayImage::from_fn(40, 30, |x, y| image::Luma([(x * 5 + y) as u8]));
        let mut r = SplitMix64(1);
        let a = augment(&img, &AugmentSpec::TRAIN, &mut r);
        let b = augment(&img, &AugmentSpec::TRAIN, &mut r);
        assert_eq!(a.dimensions(), (40, 30));
        assert_ne!(a.as_raw(), b.as_raw());
    }
}
