//! API keys: who may ask, at every door (HTTP, and any other transport). `--api-keys-file` names a TOML or JSON file of callers,
//! each a name, the SHA-256 of its key (never the key) and its scopes. A request to a
//! guarded route presents its key as `Authorization: Bearer <key>` or `x-api-key:
//! <key>`; the key is hashed and compared with every caller's hash in constant time.
//!
//! ```toml
//! [[callers]]
//! name = "ris-gateway"
//! key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! scopes = ["predict", "models"]
//! ```

use std::collections::HashSet;
use std::path::Path;

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /predict`.
    Predict,
    /// `GET /models` and `GET /models/{name}`.
    Models,
    /// `POST /feedback`: confirmed labels of answered images.
    Feedback,
    /// The model repository: `POST /v2/repository/index`, `…/load`, `…/unload`.
    Admin,
}

impl Scope {
    /// The scope's name in the keys file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Predict => "predict",
            Scope::Models => "models",
            Scope::Feedback => "feedback",
            Scope::Admin => "admin",
        }
    }
}

/// The caller a request was authenticated as (a request extension; `anonymous` when
/// no keys file is configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

impl Caller {
    /// The name audit records carry when the service runs open.
    pub fn anonymous() -> Self {
        Caller("anonymous".into())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    callers: Vec<CallerEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    key_sha256: String,
    scopes: Vec<Scope>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    hash: [u8; 32],
    scopes: HashSet<Scope>,
}

/// The callers of a keys file.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    entries: Vec<Entry>,
}

/// Why a request was not let in (each door answers it with its own status: HTTP
/// 401/403, gRPC UNAUTHENTICATED/PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key presented.
    #[error("an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// A key that matches no caller.
    #[error("the API key is not valid")]
    Invalid,
    /// A known caller without the route's scope.
    #[error("caller `{caller}` may not use this route: its key lacks the `{}` scope", scope.as_str())]
    Forbidden { caller: String, scope: Scope },
}

impl AuthError {
    /// Why, as `cxr_auth_refused_total{reason}` and the audit trail name it:
    /// `missing`, `invalid` or `forbidden`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::Forbidden { .. } => "forbidden",
        }
    }

    /// Its `error_type`: `unauthorized` (no key, or an unknown one) or `forbidden`.
    pub fn error_type(&self) -> crate::error_type::ErrorType {
        use crate::error_type::ErrorType;
        match self {
            AuthError::Missing | AuthError::Invalid => ErrorType::Unauthorized,
            AuthError::Forbidden { .. } => ErrorType::Forbidden,
        }
    }
}

/// Why a keys file (or a new key) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("cannot read the API keys file {}: {error}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file's content is wrong (the inner error says how).
    #[error("API keys file {}: {error}", path.display())]
    In {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        error: Box<KeysError>,
    },
    /// Not JSON or TOML of the keys file's layout.
    #[error("{0}")]
    Syntax(String),
    /// An entry breaks a rule (names, hashes, scopes).
    #[error("{0}")]
    Invalid(String),
    /// The OS random source failed.
    #[error("the OS random source failed: {0}")]
    Random(String),
}

impl ApiKeys {
    /// Reads a keys file: JSON when its name ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|error| KeysError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::parse(&text, json).map_err(|e| KeysError::In {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Parses a keys file's text (JSON or TOML) and checks it.
    pub fn parse(text: &str, json: bool) -> Result<Self, KeysError> {
        let file: KeysFile = if json {
            serde_json::from_str(text).map_err(|e| KeysError::Syntax(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| KeysError::Syntax(e.to_string()))?
        };
        if file.callers.is_empty() {
            return Err(KeysError::Invalid(
                "no callers: add at least one [[callers]] entry".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(file.callers.len());
        for c in file.callers {
            let name = c.name.trim().to_string();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(KeysError::Invalid(format!(
                    "caller name `{}` must be 1-128 printable characters",
                    c.name
                )));
            }
            if !names.insert(name.clone()) {
                return Err(KeysError::Invalid(format!(
                    "caller `{name}` is listed twice"
                )));
            }
            let hash = parse_sha256(&c.key_sha256).ok_or_else(|| {
                KeysError::Invalid(format!(
                    "caller `{name}`: key_sha256 must be 64 hexadecimal digits (the SHA-256 of the key; `cxr-serve --new-api-key NAME` prints one)"
                ))
            })?;
            if c.scopes.is_empty() {
                return Err(KeysError::Invalid(format!(
                    "caller `{name}` has no scopes (give any of `predict`, `models`, `feedback`)"
                )));
            }
            entries.push(Entry {
                name,
                hash,
                scopes: c.scopes.into_iter().collect(),
            });
        }
        Ok(Self { entries })
    }

    /// How many callers the file lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file lists no caller (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a presented key belongs to, if it has `scope`. Every caller's hash
    /// is compared, each in constant time, whatever matched before.
    pub fn authorize(&self, key: Option<&str>, scope: Scope) -> Result<Caller, AuthError> {
        let key = key.ok_or(AuthError::Missing)?;
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&presented)) {
                found = Some(e);
            }
        }
        let e = found.ok_or(AuthError::Invalid)?;
        if e.scopes.contains(&scope) {
            Ok(Caller(e.name.clone()))
        } else {
            Err(AuthError::Forbidden {
                caller: e.name.clone(),
                scope,
            })
        }
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub use crate::digest::to_hex;

/// The key a request presents: `Authorization: Bearer <key>` (scheme in any case),
/// else `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some((scheme, rest)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            let key = rest.trim();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A new key (`cxr_` + 64 hex digits: 256 bits from the OS) and its SHA-256.
pub fn new_key() -> Result<(String, String), KeysError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| KeysError::Random(e.to_string()))?;
    let key = format!("cxr_{}", to_hex(&raw));
    let hash = to_hex(&Sha256::digest(key.as_bytes()));
    Ok((key, hash))
}

/// The text `cxr-serve --new-api-key NAME` prints: the key once, and the entry to
/// add to the keys file.
pub fn new_key_text(name: &str) -> Result<String, KeysError> {
    let (key, hash) = new_key()?;
    Ok(format!(
        "# API key for `{name}`: give it to the caller; it is not stored anywhere.\n\
         # key: {key}\n\
         # Add this entry to the --api-keys-file (TOML):\n\
         [[callers]]\n\
         name = \"{name}\"\n\
         key_sha256 = \"{hash}\"\n\
         scopes = [\"predict\", \"models\"]\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let h = |k: &str| to_hex(&Sha256::digest(k.as_bytes()));
        ApiKeys::parse(
            &format!(
                "[[callers]]\nname = \"ris\"\nkey_sha256 = \"{}\"\nscopes = [\"predict\", \"models\"]\n\
                 [[callers]]\nname = \"dash\"\nkey_sha256 = \"{}\"\nscopes = [\"models\"]\n",
                h("k1"),
                h("k2")
            ),
            false,
        )
        .unwrap()
    }

    #[test]
    fn keys_authorize_by_hash_and_scope() {
        let k = keys();
        assert_eq!(
            k.authorize(Some("k1"), Scope::Predict),
            Ok(Caller("ris".into()))
        );
        assert_eq!(
            k.authorize(Some("k2"), Scope::Models),
            Ok(Caller("dash".into()))
        );
        assert_eq!(
            k.authorize(Some("k2"), Scope::Predict),
            Err(AuthError::Forbidden {
                caller: "dash".into(),
                scope: Scope::Predict
            })
        );
        assert_eq!(
            k.authorize(Some("k3"), Scope::Models),
            Err(AuthError::Invalid)
        );
        // The hash itself is not a key.
        let hash = to_hex(&Sha256::digest(b"k1"));
        assert_eq!(
            k.authorize(Some(&hash), Scope::Models),
            Err(AuthError::Invalid)
        );
        assert_eq!(k.authorize(None, Scope::Models), Err(AuthError::Missing));
    }

    #[test]
    fn json_and_bad_files() {
        let h = to_hex(&Sha256::digest(b"x"));
        let ok = format!(
            r#"{{"callers": [{{"name": "a", "key_sha256": "{h}", "scopes": ["predict"]}}]}}"#
        );
        assert_eq!(ApiKeys::parse(&ok, true).unwrap().len(), 1);
        for bad in [
            r#"{"callers": []}"#.to_string(),
            ok.replace(&h, "abc"),
            ok.replace("predict", "root"),
            ok.replace("\"predict\"", ""),
            ok.replace("\"name\": \"a\"", "\"name\": \"\""),
            ok.replace("key_sha256", "key"),
        ] {
            assert!(ApiKeys::parse(&bad, true).is_err(), "{bad}");
        }
        let twice = format!(
            r#"{{"callers": [{{"name": "a", "key_sha256": "{h}", "scopes": ["predict"]}}, {{"name": "a", "key_sha256": "{h}", "scopes": ["models"]}}]}}"#
        );
        assert!(ApiKeys::parse(&twice, true).is_err());
    }

    #[test]
    fn new_keys_are_random_and_hash_to_their_entry() {
        let (k1, h1) = new_key().unwrap();
        let (k2, _) = new_key().unwrap();
        assert_ne!(k1, k2);
        assert_eq!(k1.len(), 4 + 64);
        assert_eq!(h1, to_hex(&Sha256::digest(k1.as_bytes())));
        let text = new_key_text("gw").unwrap();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("# key: "))
            .unwrap();
        let parsed = ApiKeys::parse(&text, false).unwrap();
        assert_eq!(
            parsed.authorize(Some(key), Scope::Predict),
            Ok(Caller("gw".into()))
        );
    }

    #[test]
    fn key_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("abc"));
        h.insert("authorization", "bearer  xyz ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("xyz"));
        h.insert("authorization", "Basic Zm9v".parse().unwrap());
        assert_eq!(presented_key(&h), Some("abc"));
    }
}
