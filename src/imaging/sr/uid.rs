//! DICOM UIDs (PS3.5 9): new ones from UUIDs, under a configured root or `2.25`,
//! and stable ones for named things.

crate::message_error!(
    /// Why a UID root is unusable.
    UidError
);

/// A new UID: `2.25.<UUID as an integer>` (ISO/IEC 9834-8), or under `root` with the
/// UUID's digits that fit in 64 characters.
pub fn new_uid(root: Option<&str>) -> String {
    let n = uuid::Uuid::new_v4().as_u128();
    match root {
        None => format!("2.25.{n}"),
        Some(r) => {
            let digits = n.to_string();
            let room = 64usize.saturating_sub(r.len() + 1).min(digits.len());
            let tail = digits[digits.len() - room..].trim_start_matches('0');
            format!("{r}.{}", if tail.is_empty() { "0" } else { tail })
        }
    }
}

/// Checks a `--uid-root`: numeric components without leading zeros, at most 40
/// characters (so that at least 23 random digits follow).
pub fn check_uid_root(root: &str) -> Result<(), UidError> {
    let ok = !root.is_empty()
        && root.len() <= 40
        && root.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        });
    if ok {
        Ok(())
    } else {
        Err(UidError(format!(
            "--uid-root `{root}` must be a DICOM UID root: digits and dots, no leading zeros, at most 40 characters"
        )))
    }
}

/// `2.25.` + the first 128 bits of SHA-256(`name`): a stable UID for a named thing.
pub(super) fn name_uid(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    // Mark it as a name-based (version 5 style) UUID, as ISO/IEC 9834-8 asks.
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_and_fit() {
        for root in [None, Some("1.2.826.0.1.3680043.10.999"), Some("1.2.3")] {
            let u = new_uid(root);
            assert!(u.len() <= 64, "{u}");
            assert!(check_uid_root(&u).is_ok() || u.len() > 40, "{u}");
            assert!(u.split('.').all(|c| c == "0" || !c.starts_with('0')), "{u}");
            assert_ne!(u, new_uid(root));
            if let Some(r) = root {
                assert!(u.starts_with(&format!("{r}.")));
            } else {
                assert!(u.starts_with("2.25."));
            }
        }
        assert!(check_uid_root("1.2.3").is_ok());
        for bad in ["", "1..2", "1.02", "a.1", &"1.".repeat(30)] {
            assert!(check_uid_root(bad).is_err(), "{bad}");
        }
        assert!(name_uid("x").len() <= 64);
        assert_eq!(name_uid("x"), name_uid("x"));
    }
}
