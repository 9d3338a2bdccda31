//! The DICOM node: a door of the prediction core for hospitals that move images by
//! DICOM networking. Peers (modalities, PACS routers) listed in the peers file
//! associate and send radiographs by C-STORE; each goes through the same gates,
//! model, OOD score, decision and audit trail as `/predict` (the caller is the
//! calling AE title), and its results — the TID 1500 SR, and the Secondary Capture
//! of its attention map (or, for an image refused, an SR that says why) — are queued
//! in the outbox and sent back into the same study: by C-STORE to configured AEs
//! and/or by DICOMweb STOW-RS.
//!
//! - `negotiation.rs`: the door before an association (the A-ASSOCIATE-RQ in time,
//!   from a listed peer, a free slot; else refused out loud).
//! - `scp.rs`: associations in (C-ECHO, C-STORE), each within its deadline.
//! - `dimse.rs`: DIMSE messages out of P-DATA, bounded, and the answers to them.
//! - `peers.rs`: who may associate.
//! - `sender.rs`: the DICOM channels of the delivery loop (C-STORE SCU, STOW-RS).
//!
//! The outbox, its loop and the HL7/FHIR reports are `delivery`'s: the node files
//! each result through [`crate::delivery::Delivery::file`].

mod dimse;
mod negotiation;
pub mod peers;
mod scp;
mod sender;

pub use sender::DicomChannel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::delivery::Delivery;
use crate::dicom_node::negotiation::Admitted;
use crate::dicom_node::negotiation::Pools;
use crate::dicom_node::peers::Peers;
use crate::dicom_node::peers::check_ae_title;
use crate::predict::Core;

pub use dimse::MAX_COMMAND_BYTES;
pub use negotiation::MAX_REQUEST_BYTES;
pub use scp::RADIOGRAPH_STORAGE;
pub use scp::TRANSFER_SYNTAXES;

crate::message_error!(
    /// Why the DICOM node could not start or do its work.
    NodeError
);

/// Where results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// C-STORE to an AE (`AE@host:port`).
    Store {
        /// Its AE title.
        ae_title: String,
        /// Its host and port.
        address: String,
    },
    /// DICOMweb STOW-RS (`http://host:port/dicom-web`), with an optional bearer token.
    Stow {
        /// The service's base URL (its `/studies` is posted to).
        url: String,
        /// A bearer token.
        token: Option<String>,
    },
}

impl Destination {
    /// Parses `AE@host:port`.
    pub fn parse_store(s: &str) -> Result<Self, NodeError> {
        let bad = || {
            NodeError(format!(
                "--dicom-destination `{s}` must be AE@host:port (an AE title of 1 to 16 characters)"
            ))
        };
        let (ae, address) = s.split_once('@').ok_or_else(bad)?;
        check_ae_title(ae).map_err(|_| bad())?;
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(Self::Store {
            ae_title: ae.to_string(),
            address: address.to_string(),
        })
    }

    /// A STOW-RS service at `url` (plain HTTP; put TLS in front with a sidecar).
    pub fn stow(url: &str, token: Option<String>) -> Result<Self, NodeError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| NodeError(format!("--stow-url `{url}`: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(NodeError(format!(
                "--stow-url `{url}` must be an http:// URL (for https, terminate TLS in a local proxy)"
            )));
        }
        Ok(Self::Stow {
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Its name in the outbox and the metrics.
    pub fn name(&self) -> String {
        match self {
            Self::Store { ae_title, address } => format!("{ae_title}@{address}"),
            Self::Stow { url, .. } => url.clone(),
        }
    }
}

/// How the node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where it listens.
    pub bind: SocketAddr,
    /// Its own AE title (the called AE title peers must use).
    pub ae_title: String,
    /// Who may associate.
    pub peers: Peers,
    /// Where results go (at least one): the delivery's DICOM channels.
    pub destinations: Vec<Destination>,
    /// The variant that answers (none: the default).
    pub model: Option<String>,
    /// Largest data set taken, bytes.
    pub max_object_bytes: usize,
    /// Most associations at once (listed peers, once accepted).
    pub max_associations: usize,
    /// Most connections still negotiating (before their A-ASSOCIATE-RQ is in).
    pub max_negotiating: usize,
    /// Longest the A-ASSOCIATE-RQ may take to arrive whole.
    pub negotiation_timeout: Duration,
    /// Longest an association may last.
    pub association_timeout: Duration,
}

/// What the association threads and the sender share.
pub(crate) struct Node {
    core: Core,
    ae_title: String,
    peers: Peers,
    delivery: Arc<Delivery>,
    model: Option<String>,
    max_object_bytes: usize,
    max_pdu: u32,
    idle_timeout: Duration,
    negotiation_timeout: Duration,
    association_timeout: Duration,
}

/// A running node.
pub struct NodeHandle {
    /// Where it listens.
    pub addr: SocketAddr,
}

/// The delivery channels of `cfg`'s destinations (our AE title calling).
pub fn channels(cfg: &NodeConfig) -> Vec<Arc<dyn crate::delivery::Channel>> {
    cfg.destinations
        .iter()
        .map(|d| {
            Arc::new(DicomChannel {
                destination: d.clone(),
                calling: cfg.ae_title.clone(),
            }) as Arc<dyn crate::delivery::Channel>
        })
        .collect()
}

/// Starts the node: the listener (connections negotiating on tasks, at most
/// `max_negotiating` at once; associations on blocking threads, at most
/// `max_associations` at once). Its results are filed through `delivery`, whose
/// loop sends them (its DICOM channels: [`channels`]).
pub async fn start(
    core: Core,
    cfg: NodeConfig,
    delivery: Arc<Delivery>,
) -> Result<NodeHandle, NodeError> {
    if cfg.destinations.is_empty() || !delivery.has(crate::delivery::Kind::Dicom) {
        return Err(NodeError(
            "the DICOM node needs a destination for its results: --dicom-destination AE@host:port and/or --stow-url".into(),
        ));
    }
    check_ae_title(&cfg.ae_title).map_err(|e| NodeError(e.0))?;
    let listener = TcpListener::bind(cfg.bind)
        .await
        .map_err(|e| NodeError(format!("--dicom-port: cannot listen on {}: {e}", cfg.bind)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError(e.to_string()))?;
    let node = Arc::new(Node {
        core,
        ae_title: cfg.ae_title,
        peers: cfg.peers,
        delivery,
        model: cfg.model,
        max_object_bytes: cfg.max_object_bytes,
        max_pdu: 65_536,
        idle_timeout: scp::IDLE_TIMEOUT,
        negotiation_timeout: cfg.negotiation_timeout,
        association_timeout: cfg.association_timeout,
    });
    let pools = Arc::new(Pools::new(cfg.max_negotiating, cfg.max_associations));
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DICOM accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Connections not yet associated wait in their own pool: they never hold
            // an association slot, so they cannot starve the listed peers.
            let Some(negotiating) = pools.negotiate(peer.ip()) else {
                tracing::warn!(peer = %peer, "DICOM connection refused: --dicom-max-negotiating (or its host's quarter of it) reached");
                node.core
                    .metrics()
                    .dicom_associations
                    .with_label_values(&["busy"])
                    .inc();
                negotiation::refuse_later(&pools, socket, negotiation::busy());
                continue;
            };
            let (node, pools) = (node.clone(), pools.clone());
            tokio::spawn(async move {
                let admitted = negotiation::admit(&node, &pools, socket, peer.ip()).await;
                drop(negotiating);
                let Admitted::Associate(socket, slot) = admitted else {
                    return;
                };
                let socket = match socket.into_std().and_then(|s| {
                    s.set_nonblocking(false)?;
                    Ok(s)
                }) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "DICOM socket unusable");
                        return;
                    }
                };
                let rt = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    scp::serve(&node, socket, &rt);
                    drop(slot);
                });
            });
        }
    });
    tracing::info!(dicom_addr = %addr, "DICOM node listening");
    Ok(NodeHandle { addr })
}
