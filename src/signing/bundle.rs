//! The Sigstore bundle (v0.3, JSON) as OpenSSF Model Signing writes it for a key: a
//! DSSE envelope (`dsseEnvelope`) whose payload is an in-toto statement, and the
//! signing key's hint (`verificationMaterial.publicKey.hint`: the SHA-256 of its PEM).
//! Only what a key bundle holds is read; a certificate or a transparency-log entry is
//! refused as unsupported offline (`SigningError::Unsupported`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The bundle's media type (Sigstore bundle v0.3).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// A Sigstore bundle, the fields a key bundle uses.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// `application/vnd.dev.sigstore.bundle.v0.3+json`.
    pub media_type: String,
    /// The key's hint (or a certificate, unsupported).
    pub verification_material: VerificationMaterial,
    /// The signed envelope (OMS); absent when the bundle holds a `messageSignature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsse_envelope: Option<Envelope>,
    /// A signature over one artifact's digest (not a model manifest): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_signature: Option<serde_json::Value>,
}

/// What identifies the signer.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// A public key named by its hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyHint>,
    /// A certificate chain (Sigstore keyless or a PKI): not verified offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_certificate_chain: Option<serde_json::Value>,
    /// A leaf certificate (bundle v0.3): not verified offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<serde_json::Value>,
    /// Transparency-log entries (none in a key bundle; never looked up).
    #[serde(default)]
    pub tlog_entries: Vec<serde_json::Value>,
}

/// The key's hint: lower-case hex SHA-256 of its PEM (SubjectPublicKeyInfo, LF).
#[derive(Debug, Serialize, Deserialize)]
pub struct PublicKeyHint {
    /// The hint (`null` in bundles of model-signing before 1.0).
    #[serde(default)]
    pub hint: Option<String>,
}

/// A DSSE envelope.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The statement, base64.
    pub payload: String,
    /// Its type (`application/vnd.in-toto+json`).
    pub payload_type: String,
    /// The signatures (OMS writes one).
    pub signatures: Vec<EnvelopeSignature>,
}

/// One DSSE signature.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// The ECDSA signature (ASN.1 DER), base64.
    pub sig: String,
    /// The key id (empty in OMS key bundles: the hint names the key).
    #[serde(default)]
    pub keyid: String,
}

/// DSSE's pre-authentication encoding: `DSSEv1 <len> <type> <len> <payload>`, what
/// the signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Base64 (standard alphabet, padded), as protobuf JSON writes bytes; the URL-safe
/// alphabet is accepted too.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(s)
        .ok()
        .or_else(|| base64::engine::general_purpose::URL_SAFE.decode(s).ok())
}

/// Base64 (standard alphabet, padded).
pub fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        // The DSSE specification's example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
