//! Who may associate with the DICOM node: the calling AE titles (and, for each, the
//! hosts it may call from), from `--dicom-peers-file` — the DICOM counterpart of the
//! API keys. An unknown calling AE title, a known one from another host, or a called
//! AE title that is not the node's own is rejected at association.
//!
//! ```toml
//! [[peers]]
//! ae_title = "PACS_ROUTER"
//! hosts = ["10.0.4.12"]      # optional; absent: any host
//! ```

use std::net::IpAddr;
use std::net::ToSocketAddrs;
use std::path::Path;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::AssociationRJServiceUserReason;
use dicom_ul::pdu::UserIdentity;
use serde::Deserialize;

crate::message_error!(
    /// Why the peers file is unusable.
    PeersError
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    peers: Vec<PeerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    ae_title: String,
    #[serde(default)]
    hosts: Option<Vec<String>>,
}

/// One peer: its AE title and the addresses it may call from (none: any).
#[derive(Debug, Clone)]
pub struct Peer {
    /// Calling AE title.
    pub ae_title: String,
    /// Addresses it may call from.
    pub hosts: Option<Vec<IpAddr>>,
}

/// The peers.
#[derive(Debug, Clone, Default)]
pub struct Peers(pub Vec<Peer>);

impl Peers {
    /// Reads a peers file (TOML); host names are resolved once, here.
    pub fn load(path: &Path) -> Result<Self, PeersError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PeersError(format!("--dicom-peers-file {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| PeersError(format!("--dicom-peers-file {}: {}", path.display(), e.0)))
    }

    /// Parses a peers file's text.
    pub fn parse(text: &str) -> Result<Self, PeersError> {
        let file: PeersFile = toml::from_str(text).map_err(|e| PeersError(e.to_string()))?;
        let mut peers = Vec::with_capacity(file.peers.len());
        for p in file.peers {
            check_ae_title(&p.ae_title)?;
            let hosts = match p.hosts {
                None => None,
                Some(hs) => {
                    let mut ips = Vec::new();
                    for h in hs {
                        match h.parse::<IpAddr>() {
                            Ok(ip) => ips.push(ip),
                            Err(_) => ips.extend(
                                (h.as_str(), 0)
                                    .to_socket_addrs()
                                    .map_err(|e| {
                                        PeersError(format!(
                                            "peer `{}`: host `{h}`: {e}",
                                            p.ae_title
                                        ))
                                    })?
                                    .map(|a| a.ip()),
                            ),
                        }
                    }
                    Some(ips)
                }
            };
            peers.push(Peer {
                ae_title: p.ae_title,
                hosts,
            });
        }
        Ok(Self(peers))
    }

    /// Whether `ae_title` may call from `ip`.
    pub fn allows(&self, ae_title: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|p| {
            p.ae_title == ae_title.trim()
                && p.hosts
                    .as_ref()
                    .is_none_or(|hs| hs.iter().any(|h| canonical(*h) == ip))
        })
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An AE title: 1 to 16 characters of the default repertoire, no backslash or
/// control character, not all spaces (PS3.5 6.2).
pub fn check_ae_title(ae: &str) -> Result<(), PeersError> {
    let ok = !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(PeersError(format!(
            "AE title `{ae}` must be 1 to 16 printable ASCII characters, not all spaces, no backslash"
        )))
    }
}

/// The access rule of one incoming connection: the calling AE title must be a peer
/// allowed from the connection's address, and the called AE title the node's own.
pub struct PeerCheck<'a> {
    /// The peers.
    pub peers: &'a Peers,
    /// The connection's address.
    pub ip: IpAddr,
}

impl AccessControl for PeerCheck<'_> {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self.peers.allows(calling_ae_title, self.ip) {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_matched_by_title_and_host() {
        let p = Peers::parse(
            "[[peers]]\nae_title = \"ROUTER\"\nhosts = [\"10.0.0.5\"]\n[[peers]]\nae_title = \"ANY\"\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p.allows("ROUTER", ip("10.0.0.5")));
        assert!(p.allows("ROUTER", ip("::ffff:10.0.0.5")));
        assert!(!p.allows("ROUTER", ip("10.0.0.6")));
        assert!(p.allows("ANY", ip("192.168.1.1")));
        assert!(!p.allows("OTHER", ip("10.0.0.5")));
        assert!(Peers::parse("[[peers]]\nae_title = \"WAY_TOO_LONG_AE_TITLE\"\n").is_err());
        assert!(Peers::parse("[[peers]]\nae = \"X\"\n").is_err());
        let check = PeerCheck {
            peers: &p,
            ip: ip("10.0.0.5"),
        };
        assert!(check.check_access("CXR", "ROUTER", "CXR", None).is_ok());
        assert_eq!(
            check.check_access("CXR", "ROUTER", "OTHER", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
        assert_eq!(
            check.check_access("CXR", "NOBODY", "CXR", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
    }
}
