//! cxr-sign: signs model versions as OpenSSF Model Signing (OMS v1.0) bundles
//! (`<name>.sig` beside each card) that `cxr-serve --trusted-signers` and PyPI
//! `model_signing verify key` verify; or verifies them as cxr-serve does. No
//! libtorch: run it after a `cxr-train` export (`scripts/sign-models.sh` signs the
//! shipped models).

use anyhow::Context;
use clap::Parser;

/// Signs (`--key`) or verifies (`--verify-with`) every version of the models folder,
/// or those named.
#[derive(Debug, Parser)]
#[command(name = "cxr-sign", version)]
struct SignArgs {
    /// The signing key: PEM, ECDSA P-256 or P-384, PKCS#8 or SEC1, unencrypted.
    #[arg(long, env = "CXR_SIGN_KEY", required_unless_present = "verify_with")]
    key: Option<std::path::PathBuf>,
    /// Verify instead, against this trusted signers file (as cxr-serve's
    /// --trusted-signers); exits 1 if any version is refused.
    #[arg(long, conflicts_with = "key")]
    verify_with: Option<std::path::PathBuf>,
    /// The models folder.
    #[arg(long, env = "CXR_MODELS_DIR", default_value = "models")]
    models_dir: std::path::PathBuf,
    /// Versions, `NAME` or `NAME@VERSION` (default: every one).
    #[arg(long = "model")]
    models: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = SignArgs::parse();
    if let Some(trusted) = &args.verify_with {
        let trusted = cxr::signing::TrustedSigners::load(trusted)?;
        let mut refused = 0;
        for (model, r) in cxr::registry::verify_dir(&args.models_dir, &trusted, &args.models)? {
            match r {
                Ok(s) => println!(
                    "{model} verified: signed by `{}` (key id {}, root sha256:{})",
                    s.signer, s.key_id, s.root_digest
                ),
                Err(e) => {
                    refused += 1;
                    println!("{model} REFUSED: {e}");
                }
            }
        }
        anyhow::ensure!(refused == 0, "{refused} version(s) refused");
        return Ok(());
    }
    let key_path = args
        .key
        .as_ref()
        .expect("clap requires --key without --verify-with");
    let key = cxr::signing::PrivateKey::read(key_path).map_err(anyhow::Error::msg)?;
    let signed = cxr::registry::sign_dir(&args.models_dir, &key, &args.models)
        .context("signing the models")?;
    anyhow::ensure!(
        !signed.is_empty(),
        "no version matched {:?} in {}",
        args.models,
        args.models_dir.display()
    );
    let key_id = key.public().key_id();
    for s in signed {
        println!(
            "{} signed: {} (root sha256:{}, key id {key_id})",
            s.model,
            s.bundle.display(),
            s.root_digest
        );
    }
    Ok(())
}
