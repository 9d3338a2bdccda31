//! Writes each JPEG/PNG film under IN, perturbed as the stress validation perturbs
//! its films (`cxr::eval::stress::perturb`: acquisition changes of exposure,
//! contrast, blur, noise, small rotations and crops; seeded), as PNG at the same
//! relative path under OUT: radiographs made differently, what the OOD score's
//! second threshold is fitted to answer rather than refuse (bench/RESULTS.md).
//!
//!   cargo run --release --example stress_films -- ../shared/data/chest_xray_224/test target/stressed-test

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (input, out) = match (args.get(1), args.get(2)) {
        (Some(i), Some(o)) => (std::path::PathBuf::from(i), std::path::PathBuf::from(o)),
        _ => {
            eprintln!("usage: stress_films IN OUT");
            std::process::exit(2);
        }
    };
    let mut files = Vec::new();
    let mut stack = vec![input.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readable folder").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| {
                ["jpeg", "jpg", "png"].contains(&x.to_string_lossy().to_lowercase().as_str())
            }) {
                files.push(p);
            }
        }
    }
    files.sort();
    for (i, p) in files.iter().enumerate() {
        let img = image::open(p).expect("an image").to_luma8();
        let stressed = cxr::eval::stress::perturb(&img, cxr::eval::stress::STRESS_SEED, i as u64);
        let rel = p.strip_prefix(&input).expect("under IN");
        let dest = out.join(rel).with_extension("png");
        std::fs::create_dir_all(dest.parent().expect("a parent")).expect("writable OUT");
        stressed.save(&dest).expect("written");
    }
    println!("{} films written under {}", files.len(), out.display());
}
