//! Model signatures: OpenSSF Model Signing (OMS v1.0) bundles beside each version,
//! verified offline before the version answers anything, and written by `cxr-sign`.
//!
//! A bundle (`<name>.sig` beside the card) is a Sigstore bundle v0.3 holding a DSSE
//! envelope over an in-toto statement (predicate `https://model_signing/signature/v1.0`):
//! its subject digest is the SHA-256 over every listed file's digest in order, its
//! predicate lists each file (`resources`: name, algorithm, digest) and how they were
//! listed (`serialization`: `files`, SHA-256). Verifying a version is: the envelope's
//! ECDSA signature by a key of `--trusted-signers` (keys.rs), the statement's shape
//! and root digest, then every listed file re-hashed and every file of the version
//! listed (a file changed, missing or added is refused, named).
//!
//! What a version's files are (the folder model-signing signs):
//! - versioned layout `models/<name>/<version>/`: every file under the folder (the
//!   bundle itself and the paths the bundle's `ignore_paths` names excepted), as
//!   `model_signing sign key models/<name>/<version>` lists them;
//! - flat layout `models/<name>.*`: the files of `models/` whose name up to its first
//!   dot is `<name>` (`<name>.onnx`, `<name>.json`, `<name>.ood.json`,
//!   `<name>.test-scores.json`, …) and the files the card names; names relative to
//!   `models/`. Other variants' files are not this version's, nor is the shared
//!   `plots/` folder (illustrations for /models, never used in an answer, left out of
//!   the image): `model_signing verify key models --ignore_unsigned_files` verifies
//!   such a bundle.
//!
//! The card, ONNX and OOD files are checked against the digests of the bytes the
//! registry read and checked (no second read between check and use); other files are
//! hashed from disk.

mod bundle;
mod keys;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use bundle::{BUNDLE_MEDIA_TYPE, Bundle, IN_TOTO_PAYLOAD_TYPE, pae};
pub use keys::{PrivateKey, PublicKey, TrustedSigner, TrustedSigners};

use crate::digest::to_hex;

/// The in-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The OMS v1.0 predicate type.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Paths model-signing leaves out of a folder by default (besides the bundle).
pub const GIT_PATHS: [&str; 4] = [".git", ".github", ".gitattributes", ".gitignore"];

/// Why a version's signature is not accepted (each refusal names its reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// No bundle, and `--require-signed-models` is on.
    #[error(
        "{0}: no signature bundle, and --require-signed-models is on (sign it: scripts/sign-models.sh or cxr-sign)"
    )]
    Unsigned(PathBuf),
    /// The bundle cannot be read as an OMS bundle.
    #[error("{path}: malformed signature bundle: {why}")]
    Malformed {
        /// The bundle.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A bundle form cxr does not verify offline.
    #[error("{path}: unsupported signature bundle: {why}")]
    Unsupported {
        /// The bundle.
        path: PathBuf,
        /// Which form.
        why: String,
    },
    /// Signed by a key not in `--trusted-signers`.
    #[error("{path}: signed by an untrusted key (key id {key_id}); trusted: {trusted}")]
    UntrustedKey {
        /// The bundle.
        path: PathBuf,
        /// The key id the bundle names.
        key_id: String,
        /// The trusted signers' names.
        trusted: String,
    },
    /// The signature does not verify with the signer's key.
    #[error("{path}: bad signature: the envelope is not signed by `{signer}`'s key {key_id}")]
    BadSignature {
        /// The bundle.
        path: PathBuf,
        /// The signer named by the bundle's key id.
        signer: String,
        /// The key id.
        key_id: String,
    },
    /// The signer's trust ended.
    #[error(
        "{path}: expired: signer `{signer}` is trusted until {expires} (UTC), today is {today}"
    )]
    Expired {
        /// The bundle.
        path: PathBuf,
        /// The signer.
        signer: String,
        /// Its last day.
        expires: String,
        /// Today.
        today: String,
    },
    /// A signed file's bytes differ from the signed digest.
    #[error("{path}: file digest mismatch: `{file}` is sha256:{actual}, signed sha256:{signed}")]
    DigestMismatch {
        /// The bundle.
        path: PathBuf,
        /// The file, relative to the signed folder.
        file: String,
        /// Its digest now.
        actual: String,
        /// The signed digest.
        signed: String,
    },
    /// A signed file is gone.
    #[error("{path}: file missing: `{file}` is signed but absent")]
    Missing {
        /// The bundle.
        path: PathBuf,
        /// The file.
        file: String,
    },
    /// A file of the version that the bundle does not list.
    #[error("{path}: extra file: `{file}` belongs to the version but is not signed")]
    Extra {
        /// The bundle.
        path: PathBuf,
        /// The file.
        file: String,
    },
    /// The trusted signers file is wrong.
    #[error("--trusted-signers {0}")]
    TrustedSigners(String),
}

/// Who signed a version, once verified; none for an unsigned version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignedBy {
    /// The signer's name in `--trusted-signers`.
    pub signer: String,
    /// The key id (SHA-256 of the public key's PEM, hex).
    pub key_id: String,
    /// The statement's subject digest (SHA-256 over the file digests, hex).
    pub root_digest: String,
}

/// The files of one version, as [`verify`] and [`sign`] see them.
#[derive(Debug, Clone)]
pub struct VersionFiles {
    /// The folder the names are relative to (the card's).
    pub root: PathBuf,
    /// The variant's name (`<name>.sig` is the bundle).
    pub name: String,
    /// `models/<name>.*` (flat) rather than a version folder of its own.
    pub flat: bool,
    /// Files that belong to the version whatever their name (the card and the files
    /// it names), relative to `root`.
    pub named: Vec<String>,
}

impl VersionFiles {
    /// The bundle's path.
    pub fn bundle_path(&self) -> PathBuf {
        self.root.join(format!("{}.sig", self.name))
    }

    fn bundle_name(&self) -> String {
        format!("{}.sig", self.name)
    }

    /// Every file of the version, relative to `root` with `/` separators, sorted.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        if self.flat {
            for e in std::fs::read_dir(&self.root)? {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n.split('.').next() == Some(self.name.as_str())
                    && n != self.bundle_name()
                    && e.file_type()?.is_file()
                {
                    out.push(n);
                }
            }
            for n in &self.named {
                if self.root.join(n).is_file() {
                    out.push(n.clone());
                }
            }
        } else {
            walk(&self.root, "", &mut out)?;
            let bundle = self.bundle_name();
            out.retain(|f| *f != bundle);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Every regular file under `dir` (symbolic links are listed, so that verification
/// refuses them as files it cannot hash safely).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let n = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type()?.is_dir() {
            walk(&e.path(), &format!("{n}/"), out)?;
        } else {
            out.push(n);
        }
    }
    Ok(())
}

/// The in-toto statement OMS signs.
#[derive(Debug, Serialize, Deserialize)]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Debug, Serialize, Deserialize)]
struct Subject {
    name: String,
    digest: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
    #[serde(default)]
    allow_symlinks: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore_paths: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

/// The root digest: SHA-256 over the resources' digests (bytes), in their order.
fn root_digest(resources: &[Resource]) -> Result<String, String> {
    let mut h = Sha256::new();
    for r in resources {
        let d = hex_bytes(&r.digest).ok_or_else(|| format!("`{}`: digest is not hex", r.name))?;
        h.update(&d);
    }
    Ok(to_hex(&h.finalize()))
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (s.len().is_multiple_of(2) && s.bytes().all(|c| c.is_ascii_hexdigit())).then(|| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked hex"))
            .collect()
    })
}

/// A manifest name that stays inside the signed folder.
fn is_inside(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// SHA-256 of a file read from disk, lower-case hex.
fn hash_file(p: &Path) -> std::io::Result<String> {
    let meta = std::fs::symlink_metadata(p)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(to_hex(&h.finalize()))
}

/// What a version's signature check needs beside its files.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keys whose bundles are accepted (none: bundles cannot be verified).
    pub trusted: Option<std::sync::Arc<TrustedSigners>>,
    /// Refuse versions without a verified bundle.
    pub require: bool,
}

/// The outcome for one version: who signed it, or why it loads unsigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Verified.
    Signed(SignedBy),
    /// Not verified, allowed because `--require-signed-models` is off: why.
    Unverified(String),
}

impl Provenance {
    /// Who signed it, if verified.
    pub fn signed_by(&self) -> Option<&SignedBy> {
        match self {
            Self::Signed(s) => Some(s),
            Self::Unverified(_) => None,
        }
    }
}

/// Checks a version against its bundle under `policy`. `known` gives digests of
/// files the caller already read and checked (name relative to the root → hex).
pub fn check(
    files: &VersionFiles,
    known: &BTreeMap<String, String>,
    policy: &Policy,
) -> Result<Provenance, SigningError> {
    let path = files.bundle_path();
    if !path.exists() {
        if policy.require {
            return Err(SigningError::Unsigned(path));
        }
        return Ok(Provenance::Unverified(format!(
            "unsigned: no signature bundle {}",
            path.display()
        )));
    }
    let Some(trusted) = &policy.trusted else {
        if policy.require {
            return Err(SigningError::TrustedSigners(
                "is needed to verify signatures (--require-signed-models is on)".into(),
            ));
        }
        return Ok(Provenance::Unverified(format!(
            "signature not verified: no --trusted-signers ({})",
            path.display()
        )));
    };
    verify(files, known, trusted, &crate::clock::now_rfc3339()[..10]).map(Provenance::Signed)
}

/// Verifies a version's bundle: signature, statement, then its files. `today` is
/// the UTC date (`YYYY-MM-DD`) a signer's `expires` is compared with.
pub fn verify(
    files: &VersionFiles,
    known: &BTreeMap<String, String>,
    trusted: &TrustedSigners,
    today: &str,
) -> Result<SignedBy, SigningError> {
    let path = files.bundle_path();
    let malformed = |why: String| SigningError::Malformed {
        path: path.clone(),
        why,
    };
    let unsupported = |why: &str| SigningError::Unsupported {
        path: path.clone(),
        why: why.into(),
    };
    let text = std::fs::read(&path).map_err(|e| malformed(e.to_string()))?;
    let b: Bundle = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
    if b.media_type != BUNDLE_MEDIA_TYPE {
        return Err(malformed(format!(
            "media type `{}`, expected `{BUNDLE_MEDIA_TYPE}`",
            b.media_type
        )));
    }
    let vm = &b.verification_material;
    if vm.certificate.is_some() || vm.x509_certificate_chain.is_some() {
        return Err(unsupported(
            "a certificate bundle (Sigstore keyless or PKI): its chain and transparency log are not checked offline; sign with a key",
        ));
    }
    let env = match (&b.dsse_envelope, &b.message_signature) {
        (Some(e), _) => e,
        (None, Some(_)) => {
            return Err(unsupported(
                "a messageSignature signs one artifact, not a model manifest (OMS uses dsseEnvelope)",
            ));
        }
        (None, None) => return Err(malformed("no dsseEnvelope".into())),
    };
    if env.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(malformed(format!(
            "payload type `{}`, expected `{IN_TOTO_PAYLOAD_TYPE}`",
            env.payload_type
        )));
    }
    let [sig] = env.signatures.as_slice() else {
        return Err(malformed(format!(
            "{} signatures in the envelope, expected one",
            env.signatures.len()
        )));
    };
    let payload = bundle::b64_decode(&env.payload)
        .ok_or_else(|| malformed("payload is not base64".into()))?;
    let sig_bytes =
        bundle::b64_decode(&sig.sig).ok_or_else(|| malformed("signature is not base64".into()))?;
    // The signer: named by the key's hint (older bundles name none: each key tried).
    let hint = vm.public_key.as_ref().and_then(|k| k.hint.clone());
    let msg = pae(&env.payload_type, &payload);
    let signer = match &hint {
        Some(h) => {
            let s = trusted
                .by_key_id(h)
                .ok_or_else(|| SigningError::UntrustedKey {
                    path: path.clone(),
                    key_id: h.clone(),
                    trusted: trusted_names(trusted),
                })?;
            if !s.key.verifies(&msg, &sig_bytes) {
                return Err(SigningError::BadSignature {
                    path: path.clone(),
                    signer: s.name.clone(),
                    key_id: s.key_id.clone(),
                });
            }
            s
        }
        None => trusted
            .signers
            .iter()
            .find(|s| s.key.verifies(&msg, &sig_bytes))
            .ok_or_else(|| SigningError::UntrustedKey {
                path: path.clone(),
                key_id: "(none named; no trusted key verifies it)".into(),
                trusted: trusted_names(trusted),
            })?,
    };
    if let Some(exp) = &signer.expires
        && today > exp.as_str()
    {
        return Err(SigningError::Expired {
            path,
            signer: signer.name.clone(),
            expires: exp.clone(),
            today: today.into(),
        });
    }
    let st: Statement =
        serde_json::from_slice(&payload).map_err(|e| malformed(format!("statement: {e}")))?;
    if st.kind != STATEMENT_TYPE || st.predicate_type != PREDICATE_TYPE {
        return Err(malformed(format!(
            "statement `{}` with predicate `{}`, expected `{STATEMENT_TYPE}` with `{PREDICATE_TYPE}`",
            st.kind, st.predicate_type
        )));
    }
    let ser = &st.predicate.serialization;
    if ser.method != "files" || ser.hash_type != "sha256" {
        return Err(unsupported(&format!(
            "serialization `{}` with `{}`: cxr verifies `files` with `sha256`",
            ser.method, ser.hash_type
        )));
    }
    let [subject] = st.subject.as_slice() else {
        return Err(malformed(format!(
            "{} subjects, expected one",
            st.subject.len()
        )));
    };
    let root = root_digest(&st.predicate.resources).map_err(malformed)?;
    if subject.digest.get("sha256").map(|d| d.to_ascii_lowercase()) != Some(root.clone()) {
        return Err(malformed(format!(
            "the subject's digest is not the root digest of the resources ({root})"
        )));
    }
    let mut signed: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &st.predicate.resources {
        if r.algorithm != "sha256" || !is_inside(&r.name) {
            return Err(malformed(format!(
                "resource `{}` ({}): expected a sha256 digest of a path inside the folder",
                r.name, r.algorithm
            )));
        }
        if signed.insert(&r.name, &r.digest).is_some() {
            return Err(malformed(format!("resource `{}` listed twice", r.name)));
        }
    }
    // Every signed file as signed: those the card names first (a swapped ONNX file
    // is named as such even when its card was rewritten to match it).
    let order = files
        .named
        .iter()
        .filter_map(|n| signed.get_key_value(n.as_str()))
        .chain(
            signed
                .iter()
                .filter(|(n, _)| !files.named.iter().any(|f| f == *n)),
        );
    for (name, digest) in order {
        let p = files.root.join(name);
        let actual = match known.get(*name) {
            Some(d) => d.clone(),
            None => match hash_file(&p) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SigningError::Missing {
                        path,
                        file: (*name).into(),
                    });
                }
                Err(e) => return Err(malformed(format!("`{name}`: {e}"))),
            },
        };
        if !actual.eq_ignore_ascii_case(digest) {
            return Err(SigningError::DigestMismatch {
                path,
                file: (*name).into(),
                actual,
                signed: (*digest).into(),
            });
        }
    }
    // Every file of the version signed (the card and the files it names always).
    let listed = files
        .list()
        .map_err(|e| malformed(format!("listing {}: {e}", files.root.display())))?;
    let ignored = |f: &str| {
        !files.named.iter().any(|n| n == f)
            && ser
                .ignore_paths
                .iter()
                .any(|i| f == i || f.starts_with(&format!("{i}/")))
    };
    for f in listed.iter().chain(&files.named) {
        if !signed.contains_key(f.as_str()) && !ignored(f) {
            return Err(SigningError::Extra {
                path,
                file: f.clone(),
            });
        }
    }
    Ok(SignedBy {
        signer: signer.name.clone(),
        key_id: signer.key_id.clone(),
        root_digest: root,
    })
}

fn trusted_names(t: &TrustedSigners) -> String {
    t.signers
        .iter()
        .map(|s| format!("{} ({})", s.name, &s.key_id[..16]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Signs a version: lists and hashes its files, writes the OMS bundle
/// (`<root>/<name>.sig`, replaced atomically) and returns its root digest.
pub fn sign(files: &VersionFiles, key: &PrivateKey) -> std::io::Result<String> {
    let mut resources = Vec::new();
    for f in files.list()? {
        let digest = hash_file(&files.root.join(&f))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{f}: {e}")))?;
        resources.push(Resource {
            name: f,
            algorithm: "sha256".into(),
            digest,
        });
    }
    let root = root_digest(&resources).expect("our own digests are hex");
    let model_name = if files.flat {
        files.name.clone()
    } else {
        files
            .root
            .file_name()
            .map_or_else(|| files.name.clone(), |n| n.to_string_lossy().into_owned())
    };
    let statement = Statement {
        kind: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: model_name,
            digest: BTreeMap::from([("sha256".to_string(), root.clone())]),
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate {
            serialization: Serialization {
                method: "files".into(),
                hash_type: "sha256".into(),
                allow_symlinks: false,
                ignore_paths: GIT_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .chain([files.bundle_name()])
                    .collect(),
            },
            resources,
        },
    };
    let payload = serde_json::to_vec_pretty(&statement).expect("a statement serialises");
    let sig = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &payload));
    let b = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material: bundle::VerificationMaterial {
            public_key: Some(bundle::PublicKeyHint {
                hint: Some(key.public().key_id()),
            }),
            ..Default::default()
        },
        dsse_envelope: Some(bundle::Envelope {
            payload: bundle::b64_encode(&payload),
            payload_type: IN_TOTO_PAYLOAD_TYPE.into(),
            signatures: vec![bundle::EnvelopeSignature {
                sig: bundle::b64_encode(&sig),
                keyid: String::new(),
            }],
        }),
        message_signature: None,
    };
    let out = files.bundle_path();
    let tmp = out.with_extension("sig.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&b).expect("a bundle serialises"))?;
    std::fs::rename(&tmp, &out)?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder signed by PyPI `model-signing` 1.1.1 (`model_signing sign key`, an
    /// openssl P-256 key): a writer that is not ours.
    fn fixture() -> (VersionFiles, TrustedSigners) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oms");
        let pem = std::fs::read_to_string(dir.join("model-signing.pub.pem")).unwrap();
        let key = PublicKey::from_pem(&pem).unwrap();
        let trusted = TrustedSigners {
            path: dir.join("signers.toml"),
            signers: vec![TrustedSigner {
                name: "fixture".into(),
                key_id: key.key_id(),
                key,
                expires: Some("2099-12-31".into()),
            }],
        };
        let files = VersionFiles {
            root: dir.join("model"),
            name: "a".into(),
            flat: false,
            named: vec!["a.onnx".into(), "a.json".into()],
        };
        (files, trusted)
    }

    #[test]
    fn a_model_signing_bundle_verifies_with_its_root_digest() {
        let (files, trusted) = fixture();
        // model-signing's hint is the SHA-256 of the PEM file openssl wrote.
        let pem = std::fs::read(files.root.join("../model-signing.pub.pem")).unwrap();
        assert_eq!(trusted.signers[0].key_id, crate::digest::sha256_hex(&pem));
        let s = verify(&files, &BTreeMap::new(), &trusted, "2026-12-08").unwrap();
        assert_eq!(s.signer, "fixture");
        assert_eq!(
            s.root_digest,
            "c61d22da2be5bd4536b7424572d4768dc12cb43545fbd2ab99c9eac5bf3d1ecb"
        );
    }

    #[test]
    fn a_known_digest_is_used_instead_of_the_disk_and_expiry_is_checked() {
        let (files, trusted) = fixture();
        let known = BTreeMap::from([("a.onnx".to_string(), "00".repeat(32))]);
        let e = verify(&files, &known, &trusted, "2026-12-08").unwrap_err();
        assert!(
            matches!(&e, SigningError::DigestMismatch { file, .. } if file == "a.onnx"),
            "{e}"
        );
        let e = verify(&files, &BTreeMap::new(), &trusted, "2100-01-01").unwrap_err();
        assert!(matches!(e, SigningError::Expired { .. }), "{e}");
    }

    #[test]
    fn manifest_names_stay_inside_the_folder() {
        assert!(is_inside("sub/p.png"));
        assert!(!is_inside("../etc/passwd"));
        assert!(!is_inside("/etc/passwd"));
        assert!(!is_inside("a/../../b"));
    }
}
