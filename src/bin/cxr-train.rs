//! cxr-train: trains one DenseNet variant and exports it for cxr-serve.
//! See `cxr-train --help` and README.md ("Training").

use clap::Parser;

/// `cxr-train rewrite-onnx CARD...`: rewrites each card's ONNX file with the current
/// writer from the file's own weights (adding the outputs older files lack: `cam`,
/// `embedding`), checks its answers are unchanged, and updates the card's hash.
/// `cxr-train test-scores --data DIR CARD...`: re-measures each card's ONNX file on
/// the test split as the export does, checks it against the card, and writes
/// `<name>.test-scores.json` (every image's served probability and answer).
#[derive(Debug, Parser)]
#[command(name = "cxr-train test-scores")]
struct ScoresArgs {
    /// Model cards (`models/<name>.json`).
    #[arg(required = true)]
    cards: Vec<std::path::PathBuf>,
    /// The data folder (with `test/NORMAL`, `test/PNEUMONIA`).
    #[arg(long, default_value = "../shared/data/chest_xray_224")]
    data: std::path::PathBuf,
    /// Path of libonnxruntime.so.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<std::path::PathBuf>,
}

/// `cxr-train validate --films DIR [--labels CSV|folders] --out DIR`: validates the
/// models on a site's own films (DICOM, JPEG, PNG) through the same core the server
/// answers with, and writes the site report (`site-report.json`, `site-report.md`
/// with SVG plots) and, with `--choose`, the site card for `cxr-serve --site-card`.
#[derive(Debug, Parser)]
#[command(name = "cxr-train validate")]
struct ValidateArgs {
    /// The site's films (searched recursively; other files are skipped).
    #[arg(long)]
    films: std::path::PathBuf,
    /// Labels: a CSV of `file,label` (file relative to --films; NORMAL or
    /// PNEUMONIA), or `folders` (the nearest folder named NORMAL or PNEUMONIA).
    /// Without: an unlabelled folder (distributions only).
    #[arg(long)]
    labels: Option<String>,
    /// Where the report goes.
    #[arg(long)]
    out: std::path::PathBuf,
    /// The site's name (in the report and the site card).
    #[arg(long, default_value = "site")]
    site: String,
    /// The day of the validation (YYYY-MM-DD; default: today, UTC).
    #[arg(long)]
    date: Option<String>,
    /// The models folder.
    #[arg(long, default_value = "models")]
    models_dir: std::path::PathBuf,
    /// Models to validate (default: every one in --models-dir).
    #[arg(long = "model")]
    models: Vec<String>,
    /// The site's operating point on its own films (`sensitivity:0.95`,
    /// `specificity:0.90`): writes `site-card.json`.
    #[arg(long)]
    choose: Option<cxr::eval::Target>,
    /// Fit the OOD threshold to accept this share of the site's films (written to
    /// the site card with --choose).
    #[arg(long)]
    ood_accept: Option<f64>,
    /// Sensitivities to report thresholds for.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.95,0.98")]
    targets: Vec<f64>,
    /// Bootstrap resamples for the AUC and ECE intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    /// Path of libonnxruntime.so.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<std::path::PathBuf>,
}

/// `cxr-train fit-ood --data DIR CARD...`: fits each card's out-of-distribution model
/// on its training split's embeddings, chooses its threshold on the validation split,
/// measures it on the test split, writes `<name>.ood.json` and names it in the card.
#[derive(Debug, Parser)]
#[command(name = "cxr-train fit-ood")]
struct OodArgs {
    /// Model cards (`models/<name>.json`).
    #[arg(required = true)]
    cards: Vec<std::path::PathBuf>,
    /// The data folder (with `train/` and `test/`).
    #[arg(long, default_value = "../shared/data/chest_xray_224")]
    data: std::path::PathBuf,
    /// Where embeddings are cached (by the ONNX file's hash).
    #[arg(long, default_value = "target/ood-cache")]
    cache: std::path::PathBuf,
    /// Share of in-distribution validation images the threshold accepts.
    #[arg(long, default_value_t = 0.99)]
    accept: f64,
    /// The validation fraction the models were trained with (`cxr-train
    /// --val-fraction`): it and the card's seed rebuild the patient split.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Only compute (and cache) the embeddings.
    #[arg(long)]
    embed_only: bool,
    /// Sign each version written (`<name>.sig`, as `cxr-sign` does) with this PEM key
    /// after its last file is written.
    #[arg(long, env = "CXR_SIGN_KEY")]
    sign_key: Option<std::path::PathBuf>,
    /// Path of libonnxruntime.so.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<std::path::PathBuf>,
}

/// `cxr-train quantize --data DIR CARD...`: a static INT8 copy of each FP32 card's
/// model, calibrated on validation images, measured like the FP32 one, written as
/// `<name>-int8.onnx` with its card.
#[derive(Debug, Parser)]
#[command(name = "cxr-train quantize")]
struct QuantizeArgs {
    /// Model cards (`models/<name>.json`) of FP32 variants.
    #[arg(required_unless_present = "models")]
    cards: Vec<std::path::PathBuf>,
    /// Model files (`models/<name>.onnx`) of FP32 variants; the card beside each
    /// (`<name>.json`) says how it is served and is measured against.
    #[arg(long = "model")]
    models: Vec<std::path::PathBuf>,
    /// The data folder (with `train/` and `test/`).
    #[arg(long, default_value = "../shared/data/chest_xray_224")]
    data: std::path::PathBuf,
    /// The validation fraction the models were trained with.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Sign each version written (`<name>.sig`, as `cxr-sign` does) with this PEM key
    /// after its last file is written.
    #[arg(long, env = "CXR_SIGN_KEY")]
    sign_key: Option<std::path::PathBuf>,
    /// Path of libonnxruntime.so.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<std::path::PathBuf>,
}

#[derive(Debug, Parser)]
#[command(name = "cxr-train rewrite-onnx")]
struct RewriteArgs {
    /// Model cards (`models/<name>.json`).
    #[arg(required = true)]
    cards: Vec<std::path::PathBuf>,
    /// Path of libonnxruntime.so.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<std::path::PathBuf>,
}

/// `cxr-train sign --key PEM [--models-dir DIR] [--model NAME[@VERSION]]...`: signs
/// what was exported as OpenSSF Model Signing bundles (`<name>.sig` beside each card,
/// verified by `cxr-serve --trusted-signers` and `model_signing verify key`); the
/// same as `cxr-sign`, which needs no libtorch.
#[derive(Debug, Parser)]
#[command(name = "cxr-train sign")]
struct SignArgs {
    /// The signing key: PEM, ECDSA P-256 or P-384, PKCS#8 or SEC1, unencrypted.
    #[arg(long, env = "CXR_SIGN_KEY")]
    key: std::path::PathBuf,
    /// The models folder.
    #[arg(long, default_value = "models")]
    models_dir: std::path::PathBuf,
    /// Versions to sign, `NAME` or `NAME@VERSION` (default: every one).
    #[arg(long = "model")]
    models: Vec<String>,
}

/// The tools beside training (`rewrite-onnx`, `fit-ood`, `quantize`,
/// `test-scores`, `sign`): `Some` when the first argument named one and it ran.
fn subcommand() -> anyhow::Result<Option<()>> {
    if std::env::args().nth(1).as_deref() == Some("sign") {
        let a = SignArgs::parse_from(std::env::args().skip(1));
        let key = cxr::signing::PrivateKey::read(&a.key).map_err(anyhow::Error::msg)?;
        cxr::registry::sign_dir(&a.models_dir, &key, &a.models)?
            .iter()
            .for_each(print_signed);
        return Ok(Some(()));
    }
    if std::env::args().nth(1).as_deref() == Some("rewrite-onnx") {
        let a = RewriteArgs::parse_from(std::env::args().skip(1));
        let lib = cxr::inference::resolve_library(a.ort_lib.as_deref());
        for card in &a.cards {
            let (old, new) = cxr::train::rewrite_onnx(card, &lib).map_err(anyhow::Error::msg)?;
            println!("{}: {old} -> {new} (answers unchanged)", card.display());
        }
        return Ok(Some(()));
    }
    if std::env::args().nth(1).as_deref() == Some("validate") {
        let a = ValidateArgs::parse_from(std::env::args().skip(1));
        if a.choose.is_some() && a.labels.is_none() {
            anyhow::bail!(
                "--choose needs --labels: an operating point is chosen on labelled films"
            );
        }
        if a.ood_accept.is_some_and(|q| !(q > 0.0 && q <= 1.0)) {
            anyhow::bail!("--ood-accept must lie in (0, 1]");
        }
        let labels = match a.labels.as_deref() {
            None => cxr::validate::Labels::None,
            Some("folders") => cxr::validate::Labels::Folders,
            Some(csv) => cxr::validate::Labels::Csv(csv.into()),
        };
        let cfg = cxr::validate::Config {
            films: a.films,
            labels,
            out: a.out.clone(),
            site: a.site,
            date: a
                .date
                .unwrap_or_else(|| cxr::clock::now_rfc3339()[..10].to_string()),
            models: a.models,
            choose: a.choose,
            ood_accept: a.ood_accept,
            targets: a.targets,
            bootstrap: a.bootstrap,
        };
        let lib = cxr::inference::resolve_library(a.ort_lib.as_deref());
        let w = cxr::validate::validate_dir(&a.models_dir, lib, &cfg)?;
        for m in &w.report.models {
            let l = m.labelled.as_ref();
            println!(
                "{}: {} answered, {} refused; {}",
                m.name,
                m.answered,
                m.refused.values().sum::<u64>(),
                l.map_or("unlabelled".to_string(), |l| format!(
                    "{} labelled: sensitivity {:.3}, specificity {:.3} at the card's threshold",
                    l.n,
                    l.at_card_threshold
                        .sensitivity
                        .map_or(f64::NAN, |i| i.value),
                    l.at_card_threshold
                        .specificity
                        .map_or(f64::NAN, |i| i.value)
                ))
            );
        }
        println!("{}", a.out.join("site-report.md").display());
        if let Some(card) = w.site_card {
            println!("{}", card.display());
        }
        return Ok(Some(()));
    }
    if std::env::args().nth(1).as_deref() == Some("fit-ood") {
        let a = OodArgs::parse_from(std::env::args().skip(1));
        let lib = cxr::inference::resolve_library(a.ort_lib.as_deref());
        let key = read_key(a.sign_key.as_deref())?;
        for card in &a.cards {
            let out = cxr::train::fit_ood::fit_card(
                card,
                &a.data,
                &lib,
                &a.cache,
                a.accept,
                a.val_fraction,
                a.embed_only,
            )?;
            println!("{}: {out}", card.display());
            if !a.embed_only {
                sign_if(key.as_ref(), card)?;
            }
        }
        return Ok(Some(()));
    }
    if std::env::args().nth(1).as_deref() == Some("quantize") {
        let a = QuantizeArgs::parse_from(std::env::args().skip(1));
        let lib = cxr::inference::resolve_library(a.ort_lib.as_deref());
        let key = read_key(a.sign_key.as_deref())?;
        let cards = a
            .cards
            .iter()
            .cloned()
            .chain(a.models.iter().map(|m| m.with_extension("json")));
        for card in cards {
            if !card.is_file() {
                anyhow::bail!(
                    "{}: no model card (the .onnx file's card, beside it)",
                    card.display()
                );
            }
            println!(
                "{}",
                cxr::train::int8_copy::quantize_card(&card, &a.data, &lib, a.val_fraction)?
            );
            let name = card.file_stem().unwrap_or_default().to_string_lossy();
            sign_if(
                key.as_ref(),
                &cxr::train::int8_copy::card_path(&card, &name),
            )?;
        }
        return Ok(Some(()));
    }
    if std::env::args().nth(1).as_deref() == Some("test-scores") {
        let a = ScoresArgs::parse_from(std::env::args().skip(1));
        let lib = cxr::inference::resolve_library(a.ort_lib.as_deref());
        for card in &a.cards {
            let n = cxr::train::write_test_scores(card, &a.data, &lib)?;
            println!(
                "{}: {n} test scores written (metrics equal the card's)",
                card.display()
            );
        }
        return Ok(Some(()));
    }
    Ok(None)
}

/// `--sign-key`'s key, read before any work.
fn read_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<cxr::signing::PrivateKey>> {
    path.map(cxr::signing::PrivateKey::read)
        .transpose()
        .map_err(anyhow::Error::msg)
}

/// Signs the version of `card` when a key was given (after its last file).
fn sign_if(key: Option<&cxr::signing::PrivateKey>, card: &std::path::Path) -> anyhow::Result<()> {
    if let Some(key) = key {
        print_signed(&cxr::registry::sign_card(card, key)?);
    }
    Ok(())
}

fn print_signed(s: &cxr::registry::SignedVersion) {
    println!(
        "{} signed: {} (root sha256:{})",
        s.model,
        s.bundle.display(),
        s.root_digest
    );
}

fn main() -> anyhow::Result<()> {
    // Logs on stderr (stdout carries results), coloured only on a terminal.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ort=warn,cxr::audit=warn".into()),
        )
        .init();
    if let Some(done) = subcommand()? {
        return Ok(done);
    }
    let args = cxr::train::TrainArgs::parse();
    match cxr::train::run(&args)? {
        Some(out) => {
            println!("{}", out.onnx.display());
            out.signed.iter().for_each(print_signed);
        }
        None => eprintln!(
            "cxr-train: stopped early (--stop-after-steps); run again with --resume to continue"
        ),
    }
    Ok(())
}
