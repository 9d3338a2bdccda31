//! DICOM UIDs (PS3.5 9): new ones from UUIDs, under a configured root or `2.25`,
//! and stable ones for named things.

crate::message_error!(
    /// Why a UID root is unusable.
    UidError
);

/// A new UID: `2.25.<UUID as an integer>` (ISO/IEC 9834-8), or under `root` with the
/// UUID's digits that fit in 64 characters.
pub fn new_uid(root: Option<&str>) -> String {
    uid_of(uuid::Uuid::new_v4().as_u128(), root)
}

/// A UID from 128 bits: `2.25.<n>`, or under `root` with the digits that fit.
fn uid_of(n: u128, root: Option<&str>) -> String {
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
    format!("2.25.{}", name_bits(name))
}

/// The first 128 bits of SHA-256(`name`), marked as a name-based (version 5 style)
/// UUID, as ISO/IEC 9834-8 asks.
fn name_bits(name: &str) -> u128 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    u128::from_be_bytes(b)
}

/// How a result object's new UIDs are made: at random, or derived from what the
/// result is of (the same source analysed by the same model file gets the same
/// UIDs, so a PACS that receives it again replaces it instead of adding a copy).
#[derive(Debug, Clone)]
pub struct UidMaker {
    root: Option<String>,
    /// Seeds of the instance's UIDs and of its series' (none: random).
    seeds: Option<(String, String)>,
}

impl UidMaker {
    /// Random UIDs under `root` (or `2.25`).
    pub fn random(root: Option<&str>) -> Self {
        Self {
            root: root.map(str::to_string),
            seeds: None,
        }
    }

    /// UIDs derived from `instance` (what the object is of) and `series` (what its
    /// series gathers), under `root` (or `2.25`).
    pub fn derived(root: Option<&str>, instance: String, series: String) -> Self {
        Self {
            root: root.map(str::to_string),
            seeds: Some((instance, series)),
        }
    }

    /// The instance's UID for `what` (`sop`, `tracking`, …).
    pub fn instance(&self, what: &str) -> String {
        match &self.seeds {
            None => new_uid(self.root.as_deref()),
            Some((i, _)) => uid_of(name_bits(&format!("{i}/{what}")), self.root.as_deref()),
        }
    }

    /// Its series' UID for `what`.
    pub fn series(&self, what: &str) -> String {
        match &self.seeds {
            None => new_uid(self.root.as_deref()),
            Some((_, s)) => uid_of(name_bits(&format!("{s}/{what}")), self.root.as_deref()),
        }
    }
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
        let d = UidMaker::derived(Some("1.2.3"), "a".into(), "s".into());
        assert_eq!(d.instance("sop"), d.instance("sop"));
        assert_ne!(d.instance("sop"), d.instance("tracking"));
        assert_ne!(
            d.instance("sop"),
            UidMaker::derived(Some("1.2.3"), "b".into(), "s".into()).instance("sop")
        );
        assert_eq!(
            d.series("sr"),
            UidMaker::derived(Some("1.2.3"), "b".into(), "s".into()).series("sr")
        );
        assert!(d.instance("sop").starts_with("1.2.3.") && d.instance("sop").len() <= 64);
        let r = UidMaker::random(None);
        assert_ne!(r.instance("sop"), r.instance("sop"));
    }
}
