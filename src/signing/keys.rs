//! Keys: the trusted signers (`--trusted-signers FILE`) and a signing key (PEM), ECDSA
//! P-256 with SHA-256 or P-384 with SHA-384, as model-signing pairs curve and hash.
//! A key's id is the SHA-256 of its public key's PEM (SubjectPublicKeyInfo, LF line
//! ends): the `hint` model-signing writes into a bundle.
//!
//! The trusted signers file (TOML):
//!
//! ```toml
//! [[signer]]
//! name = "cxr model release"          # who signed: shown in /models and answers
//! public_key_file = "cxr-models.pub.pem"   # beside this file (or `public_key` = PEM)
//! expires = "2028-12-31"              # optional: refused after this UTC day
//! ```

use std::path::{Path, PathBuf};

use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use serde::Deserialize;

use crate::digest::sha256_hex;

use super::SigningError;

/// A public key that verifies DSSE signatures.
#[derive(Debug, Clone)]
pub enum PublicKey {
    /// ECDSA P-256, SHA-256.
    P256(p256::ecdsa::VerifyingKey),
    /// ECDSA P-384, SHA-384.
    P384(p384::ecdsa::VerifyingKey),
}

impl PublicKey {
    /// Reads a PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(Self::P256(k));
        }
        p384::ecdsa::VerifyingKey::from_public_key_pem(pem)
            .map(Self::P384)
            .map_err(|_| {
                "not an ECDSA P-256 or P-384 public key in PEM (SubjectPublicKeyInfo)".into()
            })
    }

    /// The PEM as model-signing hashes it for the hint.
    pub fn to_pem(&self) -> String {
        match self {
            Self::P256(k) => k.to_public_key_pem(LineEnding::LF),
            Self::P384(k) => k.to_public_key_pem(LineEnding::LF),
        }
        .expect("an in-memory EC public key encodes to PEM")
    }

    /// The key id: SHA-256 of the PEM, lower-case hex.
    pub fn key_id(&self) -> String {
        sha256_hex(self.to_pem().as_bytes())
    }

    /// Whether `sig` (ASN.1 DER) signs `msg`.
    pub fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        match self {
            Self::P256(k) => {
                p256::ecdsa::DerSignature::from_bytes(sig).is_ok_and(|s| k.verify(msg, &s).is_ok())
            }
            Self::P384(k) => {
                p384::ecdsa::DerSignature::from_bytes(sig).is_ok_and(|s| k.verify(msg, &s).is_ok())
            }
        }
    }
}

/// A private key that signs (`cxr-sign --key`).
pub enum PrivateKey {
    /// ECDSA P-256, SHA-256.
    P256(p256::ecdsa::SigningKey),
    /// ECDSA P-384, SHA-384.
    P384(p384::ecdsa::SigningKey),
}

impl PrivateKey {
    /// Reads a PEM private key: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC
    /// PRIVATE KEY`, what `openssl ecparam -genkey` writes), unencrypted.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        if let Ok(k) =
            p256::SecretKey::from_pkcs8_pem(pem).or_else(|_| p256::SecretKey::from_sec1_pem(pem))
        {
            return Ok(Self::P256(k.into()));
        }
        p384::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p384::SecretKey::from_sec1_pem(pem))
            .map(|k| Self::P384(k.into()))
            .map_err(|_| {
                "not an unencrypted ECDSA P-256 or P-384 private key in PEM (PKCS#8 or SEC1)".into()
            })
    }

    /// Reads [`PrivateKey::from_pem`] from a file; the error names the file.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| Self::from_pem(&pem))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        match self {
            Self::P256(k) => PublicKey::P256(*k.verifying_key()),
            Self::P384(k) => PublicKey::P384(*k.verifying_key()),
        }
    }

    /// The ASN.1 DER signature of `msg` (deterministic, RFC 6979).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        match self {
            Self::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            Self::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
        }
    }
}

/// One trusted signer.
#[derive(Debug, Clone)]
pub struct TrustedSigner {
    /// Who it is (shown in /models, answers, the audit trail and the SR).
    pub name: String,
    /// Its key.
    pub key: PublicKey,
    /// Its key id ([`PublicKey::key_id`]).
    pub key_id: String,
    /// The last UTC day its signatures are accepted (`YYYY-MM-DD`).
    pub expires: Option<String>,
}

/// The signers whose bundles are accepted.
#[derive(Debug, Clone)]
pub struct TrustedSigners {
    /// The file they were read from.
    pub path: PathBuf,
    /// The signers.
    pub signers: Vec<TrustedSigner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignersFile {
    #[serde(default)]
    signer: Vec<SignerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignerEntry {
    name: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    public_key_file: Option<PathBuf>,
    #[serde(default)]
    expires: Option<String>,
    /// A certificate identity (Sigstore keyless): not verifiable offline.
    #[serde(default)]
    certificate_identity: Option<String>,
}

impl TrustedSigners {
    /// Reads the trusted signers file.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let bad = |why: String| SigningError::TrustedSigners(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: SignersFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.signer.is_empty() {
            return Err(bad("no [[signer]] entry".into()));
        }
        let mut signers = Vec::new();
        for e in file.signer {
            let who = &e.name;
            if e.certificate_identity.is_some() {
                return Err(bad(format!(
                    "signer `{who}`: certificate identities need a CA chain and a transparency log, which cxr does not consult offline; give the signer's public key"
                )));
            }
            let pem = match (&e.public_key, &e.public_key_file) {
                (Some(pem), None) => pem.clone(),
                (None, Some(f)) => {
                    let f = path.parent().unwrap_or(Path::new(".")).join(f);
                    std::fs::read_to_string(&f)
                        .map_err(|err| bad(format!("signer `{who}`: {}: {err}", f.display())))?
                }
                _ => {
                    return Err(bad(format!(
                        "signer `{who}`: give one of public_key (PEM) or public_key_file"
                    )));
                }
            };
            let key =
                PublicKey::from_pem(&pem).map_err(|why| bad(format!("signer `{who}`: {why}")))?;
            if let Some(d) = &e.expires
                && !is_date(d)
            {
                return Err(bad(format!(
                    "signer `{who}`: expires `{d}` is not YYYY-MM-DD"
                )));
            }
            signers.push(TrustedSigner {
                name: e.name,
                key_id: key.key_id(),
                key,
                expires: e.expires,
            });
        }
        Ok(Self {
            path: path.into(),
            signers,
        })
    }

    /// The signer whose key id is `id`.
    pub fn by_key_id(&self, id: &str) -> Option<&TrustedSigner> {
        self.signers
            .iter()
            .find(|s| s.key_id.eq_ignore_ascii_case(id))
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}
