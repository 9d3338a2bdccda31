//! The node's door before an association exists: each connection waits, in a small
//! pool of its own (`--dicom-max-negotiating`), for its A-ASSOCIATE-RQ to arrive
//! whole within `--dicom-negotiation-timeout-s`; the calling AE title is checked;
//! only a listed peer takes one of the `--dicom-max-associations` slots. Every
//! refusal is said to the peer at once — an A-ASSOCIATE-RJ, or an A-ABORT for a
//! request that never came whole — never a silent close.
//!
//! The request is peeked, not read: once it is whole in the socket's buffer the
//! connection goes to dicom-ul's (blocking) `establish`, which reads it at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::association::server::AccessControl as _;
use dicom_ul::pdu::AbortRQServiceProviderReason;
use dicom_ul::pdu::AbortRQSource;
use dicom_ul::pdu::AssociationRJ;
use dicom_ul::pdu::AssociationRJResult;
use dicom_ul::pdu::AssociationRJServiceProviderPresentationReason;
use dicom_ul::pdu::AssociationRJSource;
use dicom_ul::pdu::AssociationRQ;
use tokio::io::AsyncReadExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;

use crate::dicom_node::Node;
use crate::dicom_node::peers::PeerCheck;

/// Largest A-ASSOCIATE-RQ taken, bytes (header included). One proposing every
/// storage SOP class dcmtk knows, three transfer syntaxes each, is about 14 KiB; this
/// also stays within the socket's receive buffer, where the request is peeked.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How often a request still arriving is peeked again.
const PEEK_EVERY: Duration = Duration::from_millis(20);

/// Longest a refusal waits for the peer to read it and close, before the socket is
/// dropped (closing with unread input would reset the connection, and the peer could
/// lose the refusal).
const LINGER: Duration = Duration::from_secs(2);

/// Where the door's connections are.
pub(super) struct Pools {
    /// Connections still negotiating.
    pub negotiating: Arc<Semaphore>,
    /// Connections still negotiating, by host: at most [`Pools::per_host`] each, so
    /// that one host cannot fill the negotiating pool (a listed peer's negotiation
    /// takes milliseconds; only a stalling one stays). Never more entries than
    /// negotiating connections.
    hosts: Mutex<HashMap<IpAddr, usize>>,
    per_host: usize,
    /// Associations (listed peers only).
    pub associations: Arc<Semaphore>,
    /// Refusals still lingering (past it, a refused socket is dropped at once).
    pub closing: Arc<Semaphore>,
}

impl Pools {
    /// `max_negotiating` connections negotiating (a quarter of them from one host),
    /// `max_associations` associations.
    pub fn new(max_negotiating: usize, max_associations: usize) -> Self {
        let max_negotiating = max_negotiating.max(1);
        Self {
            negotiating: Arc::new(Semaphore::new(max_negotiating)),
            hosts: Mutex::new(HashMap::new()),
            per_host: (max_negotiating / 4).max(1),
            associations: Arc::new(Semaphore::new(max_associations.max(1))),
            closing: Arc::new(Semaphore::new(max_negotiating)),
        }
    }

    /// A negotiating place for a connection from `ip`, or `None` when the pool or
    /// the host's share of it is full.
    pub fn negotiate(self: &Arc<Self>, ip: IpAddr) -> Option<Negotiating> {
        let permit = self.negotiating.clone().try_acquire_owned().ok()?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let n = hosts.entry(ip).or_insert(0);
        if *n >= self.per_host {
            return None;
        }
        *n += 1;
        Some(Negotiating {
            pools: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// A connection's place in the negotiating pool, and in its host's share.
pub(super) struct Negotiating {
    pools: Arc<Pools>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Negotiating {
    fn drop(&mut self) {
        let mut hosts = self.pools.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = hosts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                hosts.remove(&self.ip);
            }
        }
    }
}

/// What became of a connection's negotiation.
pub(super) enum Admitted {
    /// A listed peer's request, whole in the socket's buffer, with its slot.
    Associate(TcpStream, OwnedSemaphorePermit),
    /// Refused (and told so).
    Refused,
}

/// An A-ASSOCIATE-RJ for a full node: transient, service provider (presentation),
/// local limit exceeded (PS3.8 9.3.4): the peer may retry later.
pub(super) fn busy() -> Pdu {
    Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    })
}

fn abort(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

/// Refuses `socket` with `pdu` on a task of its own, when the closing pool has room
/// (else it is dropped: the node is flooded).
pub(super) fn refuse_later(pools: &Pools, socket: TcpStream, pdu: Pdu) {
    if let Ok(permit) = pools.closing.clone().try_acquire_owned() {
        tokio::spawn(async move {
            refuse(socket, &pdu, 0).await;
            drop(permit);
        });
    }
}

/// Sends `pdu` (after reading the `pending` bytes the peer sent, so that closing
/// does not reset the connection), closes the write side, and waits a moment for the
/// peer to read it and close.
async fn refuse(mut socket: TcpStream, pdu: &Pdu, pending: usize) {
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, pdu).expect("a reject or abort PDU can be written");
    let _ = tokio::time::timeout(LINGER, async {
        let mut scratch = vec![0u8; 4096];
        let mut left = pending;
        while left > 0 {
            let n = socket.read(&mut scratch[..left.min(4096)]).await?;
            if n == 0 {
                break;
            }
            left -= n;
        }
        socket.write_all(&bytes).await?;
        socket.shutdown().await?;
        while socket.read(&mut scratch).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The A-ASSOCIATE-RQ's length (header included), once its header is in.
fn request_length(header: &[u8; 6]) -> Result<usize, AbortRQServiceProviderReason> {
    if header[0] != 0x01 {
        return Err(AbortRQServiceProviderReason::UnexpectedPdu);
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len + 6 > MAX_REQUEST_BYTES {
        return Err(AbortRQServiceProviderReason::InvalidPduParameter);
    }
    Ok(len + 6)
}

/// The A-ASSOCIATE-RQ in `bytes` (a whole PDU, at most [`MAX_REQUEST_BYTES`]);
/// `None` for anything else.
fn parse_request(bytes: &[u8]) -> Option<AssociationRQ> {
    match dicom_ul::read_pdu(bytes, MAX_REQUEST_BYTES as u32, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => Some(rq),
        _ => None,
    }
}

/// Why no request came.
enum NoRequest {
    /// The peer closed.
    Closed,
    /// Something else than an acceptable A-ASSOCIATE-RQ: the abort to answer with.
    Bad(AbortRQServiceProviderReason),
}

/// Peeks until the whole A-ASSOCIATE-RQ is in the socket's buffer; returns it,
/// still unread. Cancel safe: it only peeks.
async fn peek_request(socket: &TcpStream) -> Result<Vec<u8>, NoRequest> {
    let mut header = [0u8; 6];
    let mut want = header.len();
    let mut buf = Vec::new();
    loop {
        let n = if buf.is_empty() {
            socket.peek(&mut header).await
        } else {
            socket.peek(&mut buf).await
        }
        .map_err(|_| NoRequest::Closed)?;
        if n == 0 {
            return Err(NoRequest::Closed);
        }
        if buf.is_empty() && n == header.len() {
            want = request_length(&header).map_err(NoRequest::Bad)?;
            buf = vec![0u8; want];
            continue;
        }
        if !buf.is_empty() && n == want {
            return Ok(buf);
        }
        // Part of it: readiness stays set while bytes wait unread, so wait a moment
        // rather than peek again at once.
        tokio::time::sleep(PEEK_EVERY).await;
    }
}

/// Negotiates `socket` (holding one of the negotiating slots): its request whole
/// within the timeout, from a listed peer, and a free association slot; else
/// refused.
pub(super) async fn admit(node: &Node, pools: &Pools, socket: TcpStream, ip: IpAddr) -> Admitted {
    let metrics = node.core.metrics();
    let count = |outcome: &str| {
        metrics
            .dicom_associations
            .with_label_values(&[outcome])
            .inc();
    };
    let request = match tokio::time::timeout(node.negotiation_timeout, peek_request(&socket)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(NoRequest::Closed)) => return Admitted::Refused,
        Ok(Err(NoRequest::Bad(reason))) => {
            tracing::info!(peer = %ip, "DICOM connection sent no A-ASSOCIATE-RQ; aborted");
            count("rejected");
            refuse(socket, &abort(reason), 0).await;
            return Admitted::Refused;
        }
        Err(_) => {
            tracing::info!(peer = %ip, timeout_s = node.negotiation_timeout.as_secs_f64(), "DICOM association request not received in time; aborted");
            count("timed_out");
            // What arrived of it is read first (without waiting for more: a silent
            // peer has sent nothing), so the abort is not lost in a reset.
            let mut scratch = vec![0u8; 4096];
            while matches!(socket.try_read(&mut scratch), Ok(n) if n > 0) {}
            refuse(
                socket,
                &abort(AbortRQServiceProviderReason::ReasonNotSpecified),
                0,
            )
            .await;
            return Admitted::Refused;
        }
    };
    let rq = match parse_request(&request) {
        Some(rq) => rq,
        None => {
            tracing::info!(peer = %ip, "DICOM association request not readable; aborted");
            count("rejected");
            refuse(
                socket,
                &abort(AbortRQServiceProviderReason::InvalidPduParameter),
                request.len(),
            )
            .await;
            return Admitted::Refused;
        }
    };
    let check = PeerCheck {
        peers: &node.peers,
        ip,
    };
    if let Err(reason) = check.check_access(
        &node.ae_title,
        &rq.calling_ae_title,
        &rq.called_ae_title,
        None,
    ) {
        tracing::info!(peer = %ip, %reason, "DICOM association rejected");
        count("rejected");
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceUser(reason),
        });
        refuse(socket, &rj, request.len()).await;
        return Admitted::Refused;
    }
    match pools.associations.clone().try_acquire_owned() {
        Ok(slot) => Admitted::Associate(socket, slot),
        Err(_) => {
            tracing::warn!(peer = %ip, "DICOM association refused: --dicom-max-associations reached");
            count("busy");
            refuse(socket, &busy(), request.len()).await;
            Admitted::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real A-ASSOCIATE-RQ (dicom-ul's own writer), to mutate.
    fn request() -> Vec<u8> {
        let rq = Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "MODALITY".into(),
            called_ae_title: "CXR".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![dicom_ul::pdu::PresentationContextProposed {
                id: 1,
                abstract_syntax: "1.2.840.10008.1.1".into(),
                transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
            }],
            user_variables: vec![dicom_ul::pdu::UserVariableItem::MaxLength(16384)],
        });
        let mut out = Vec::new();
        dicom_ul::write_pdu(&mut out, &rq).unwrap();
        out
    }

    #[test]
    fn a_request_is_read_and_its_length_known_from_its_header() {
        let bytes = request();
        let header: [u8; 6] = bytes[..6].try_into().unwrap();
        assert_eq!(request_length(&header), Ok(bytes.len()));
        assert_eq!(parse_request(&bytes).unwrap().calling_ae_title, "MODALITY");
        // Not an A-ASSOCIATE-RQ; one past the cap.
        assert!(request_length(&[0x04, 0, 0, 0, 0, 10]).is_err());
        assert!(request_length(&[0x01, 0, 0, 1, 0, 0]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any header: a length within the cap or a refusal, never a panic.
        #[test]
        fn any_header_is_bounded(header in any::<[u8; 6]>()) {
            if let Ok(n) = request_length(&header) {
                prop_assert!(n <= MAX_REQUEST_BYTES);
            }
        }

        /// A real request with bytes changed, cut or added: read or refused, never a
        /// panic.
        #[test]
        fn any_mangled_request_is_read_or_refused(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            tail in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = request();
            for (i, b) in edits {
                let at = i.index(bytes.len());
                bytes[at] = b;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend(tail);
            let _ = parse_request(&bytes);
        }

        /// Arbitrary bytes after an A-ASSOCIATE-RQ header of their own length.
        #[test]
        fn any_request_body_is_read_or_refused(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = vec![0x01, 0x00];
            bytes.extend((body.len() as u32).to_be_bytes());
            bytes.extend(body);
            let _ = parse_request(&bytes);
        }
    }
}
