//! One association with a peer (a modality, a PACS router): C-ECHO answered, C-STORE
//! of radiographs analysed through the prediction core (holding one of its in-flight
//! slots, the data set held in its buffered-bytes budget) and their results queued in
//! the outbox before the store is answered; any other operation refused at once. Runs on a blocking thread (dicom-ul's
//! synchronous associations); the core is reached through the runtime's handle.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use dicom_object::FileMetaTableBuilder;
use dicom_ul::Pdu;
use dicom_ul::ServerAssociation;
use dicom_ul::ServerAssociationOptions;
use dicom_ul::association::Association as _;
use dicom_ul::pdu::PDataValue;
use dicom_ul::pdu::PDataValueType;
use dicom_ul::pdu::PresentationContextResultReason;

use crate::access::Caller;
use crate::dicom_node::Node;
use crate::dicom_node::NodeError;
use crate::dicom_node::dimse;
use crate::dicom_node::dimse::AbortReason;
use crate::dicom_node::dimse::Context;
use crate::dicom_node::dimse::Event;
use crate::dicom_node::dimse::Messages;
use crate::dicom_node::dimse::Store;
use crate::dicom_node::dimse::VERIFICATION;
use crate::dicom_node::dimse::status;
use crate::dicom_node::peers::PeerCheck;
use crate::error_type::ErrorType;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Identity;
use crate::predict::Upload;

/// The storage SOP classes taken: Computed Radiography, Digital X-Ray for
/// presentation and for processing.
pub const RADIOGRAPH_STORAGE: [&str; 3] = [
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
];
/// The transfer syntaxes the decoder reads (native little endian, JPEG baseline,
/// extended and lossless, JPEG 2000, RLE); others are not accepted at negotiation.
pub const TRANSFER_SYNTAXES: [&str; 9] = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
];

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// Serves one connection (its A-ASSOCIATE-RQ already whole in the socket's buffer,
/// from a listed peer) until the peer releases or aborts, it idles out, it breaks the
/// protocol, or its deadline (`--dicom-association-timeout-s`) passes.
pub(super) fn serve(node: &Node, socket: TcpStream, rt: &tokio::runtime::Handle) {
    let ip = match socket.peer_addr() {
        Ok(a) => a.ip(),
        Err(_) => return,
    };
    // The deadline: dicom-ul's association blocks in reads, so a watchdog shuts the
    // socket's read side when it passes; the next read ends and the association is
    // aborted. Dropping `_done` (this function returning) stops the watchdog.
    let expired = Arc::new(AtomicBool::new(false));
    let (_done, done) = tokio::sync::oneshot::channel::<()>();
    // Kept to close the socket gently after an A-ABORT (see `linger`).
    let after_abort = socket.try_clone().ok();
    if let Ok(clone) = socket.try_clone() {
        let (expired, deadline) = (expired.clone(), node.association_timeout);
        rt.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(deadline) => {
                    expired.store(true, Ordering::SeqCst);
                    let _ = clone.shutdown(std::net::Shutdown::Read);
                }
                _ = done => {}
            }
        });
    }
    let mut opts = ServerAssociationOptions::new()
        .ae_access_control(PeerCheck {
            peers: &node.peers,
            ip,
        })
        .ae_title(node.ae_title.as_str())
        .max_pdu_length(node.max_pdu)
        .read_timeout(node.idle_timeout)
        .write_timeout(node.idle_timeout)
        .with_abstract_syntax(VERIFICATION);
    for c in RADIOGRAPH_STORAGE {
        opts = opts.with_abstract_syntax(c);
    }
    for ts in TRANSFER_SYNTAXES {
        opts = opts.with_transfer_syntax(ts);
    }
    let metrics = node.core.metrics();
    let mut assoc = match opts.establish(socket) {
        Ok(a) => a,
        Err(e) => {
            metrics
                .dicom_associations
                .with_label_values(&["rejected"])
                .inc();
            tracing::info!(peer = %ip, error = %e, "DICOM association refused");
            return;
        }
    };
    metrics
        .dicom_associations
        .with_label_values(&["accepted"])
        .inc();
    let calling = assoc.peer_ae_title().trim().to_string();
    tracing::info!(peer = %ip, calling_ae = %calling, "DICOM association accepted");
    let contexts: Vec<Context> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| Context {
            id: pc.id,
            abstract_syntax: pc.abstract_syntax.trim_end_matches('\0').to_string(),
            transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
        })
        .collect();
    let mut messages = Messages::new(contexts, node.max_object_bytes);
    // The data set being gathered, in the buffered-bytes budget every door shares.
    let mut buffered = node.core.reserve_growing();
    let abort = |assoc: ServerAssociation<TcpStream>, reason: &str| {
        metrics.dicom_aborts.with_label_values(&[reason]).inc();
        let _ = assoc.abort();
        if let Some(s) = &after_abort {
            linger(s);
        }
    };
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => {
                if expired.load(Ordering::SeqCst) {
                    tracing::warn!(calling_ae = %calling, timeout_s = node.association_timeout.as_secs_f64(), "DICOM association past its deadline; aborted");
                    abort(assoc, "deadline");
                } else {
                    tracing::info!(calling_ae = %calling, error = %e, "DICOM association ended");
                }
                return;
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for v in data {
                    let event = messages.push(v, &mut |n| buffered.grow(n));
                    let reply = match event {
                        None => None,
                        Some(Event::Abort(reason)) => {
                            tracing::warn!(calling_ae = %calling, reason = reason.as_str(), "DICOM message refused; association aborted");
                            if reason == AbortReason::ObjectTooLarge {
                                metrics.dicom_stores.with_label_values(&["failed"]).inc();
                            }
                            abort(assoc, reason.as_str());
                            return;
                        }
                        Some(Event::Respond {
                            context,
                            command,
                            outcome,
                        }) => {
                            if let Some(o) = outcome {
                                metrics.dicom_stores.with_label_values(&[o]).inc();
                            }
                            Some((context, command))
                        }
                        Some(Event::Store(s)) => {
                            let code = on_store(node, rt, &calling, &s);
                            Some((s.context.id, dimse::response(&s.command, code)))
                        }
                    };
                    if messages.buffered() == 0 {
                        buffered = node.core.reserve_growing();
                    }
                    if let Some((context, rsp)) = reply {
                        let pdu = Pdu::PData {
                            data: vec![PDataValue {
                                presentation_context_id: context,
                                value_type: PDataValueType::Command,
                                is_last: true,
                                data: rsp,
                            }],
                        };
                        if let Err(e) = assoc.send(&pdu) {
                            tracing::info!(calling_ae = %calling, error = %e, "DICOM response not sent");
                            return;
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP);
                tracing::info!(calling_ae = %calling, "DICOM association released");
                return;
            }
            Pdu::AbortRQ { .. } => {
                tracing::info!(calling_ae = %calling, "DICOM association aborted by the peer");
                return;
            }
            _ => {}
        }
    }
}

/// After an A-ABORT: the write side closed, and what the peer still sends read and
/// dropped for a moment (at most [`LINGER`]), so that closing with its bytes unread
/// does not reset the connection before the peer reads the abort.
fn linger(socket: &TcpStream) {
    use std::io::Read as _;
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + LINGER;
    let mut scratch = [0u8; 16 * 1024];
    let mut s = socket;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Longest an aborted association's socket is drained before it is closed.
const LINGER: Duration = Duration::from_secs(2);

/// One stored instance: identified, analysed through the core (unless this model
/// file already analysed it), its results queued for every destination; the status
/// to answer.
fn on_store(node: &Node, rt: &tokio::runtime::Handle, calling: &str, s: &Store) -> u16 {
    let metrics = node.core.metrics();
    let outcome = |o: &str| metrics.dicom_stores.with_label_values(&[o]).inc();
    let started = Instant::now();
    // One of the core's in-flight slots, as every door takes: busy, the modality is
    // told to retry.
    let Ok(_slot) = node.core.slot() else {
        tracing::warn!(calling_ae = %calling, "DICOM instance not analysed: --max-inflight reached");
        outcome("busy");
        return status::OUT_OF_RESOURCES;
    };
    let file = match part10(s) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(calling_ae = %calling, error = %e, "DICOM instance not readable");
            outcome("failed");
            return status::CANNOT_UNDERSTAND;
        }
    };
    // Read once: the filing identity and the decoder use this parse.
    let upload = Upload::dicom(file.into());
    let source = match upload.instance() {
        Some(Ok(instance)) => instance.source(),
        Some(Err(e)) => {
            tracing::warn!(calling_ae = %calling, error = %e, "DICOM instance not readable");
            outcome("failed");
            return status::CANNOT_UNDERSTAND;
        }
        None => unreachable!("an upload made as DICOM is read as DICOM"),
    };
    if source.sop_instance_uid.as_deref() != Some(s.command.sop_instance.as_str())
        || source.sop_class_uid.as_deref() != Some(s.command.sop_class.as_str())
    {
        outcome("failed");
        return status::DATASET_MISMATCH;
    }
    let asker = Asker::new(Caller(calling.to_string()), None);
    let ask = Ask {
        model: node.model.clone(),
        explain: true,
        ..Ask::default()
    };
    let core = &node.core;
    let valid = match core.validate(asker, &ask, started) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "DICOM instance not analysed");
            outcome("failed");
            return status::OUT_OF_RESOURCES;
        }
    };
    // What the image is (the core's identity: its SOP Instance UID and pixels):
    // the same, analysed by the same model file, gets the same results (and is not
    // analysed twice).
    let identity = Identity::of(&upload);
    let key = core.filing_key(&valid, &identity);
    match node.delivery.outbox().has_source(&key) {
        Ok(true) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.command.sop_instance, "already analysed by this model file with these settings; not again");
            outcome("duplicate");
            return status::SUCCESS;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "outbox not readable");
            outcome("failed");
            return status::OUT_OF_RESOURCES;
        }
    }
    let filed = rt.block_on(core.within_timeout(core.analyse_for_filing(&valid, upload, &key)));
    let filed = match filed {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(calling_ae = %calling, error = %e, "DICOM instance not analysed");
            outcome("failed");
            return match e.error_type() {
                t if t.is_transient() => status::OUT_OF_RESOURCES,
                ErrorType::Internal => status::PROCESSING_FAILURE,
                _ => status::CANNOT_UNDERSTAND,
            };
        }
    };
    let facts = crate::delivery::report_facts(
        &valid,
        filed.outcome.as_ref(),
        identity.source(),
        &key,
        node.delivery.urgent_at(),
    );
    if let Err(e) = node.delivery.file(&key, &filed.objects, Some(&facts)) {
        tracing::error!(error = %e, "results not queued; the store is refused");
        outcome("failed");
        return status::OUT_OF_RESOURCES;
    }
    match &filed.outcome {
        Ok(p) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.command.sop_instance, label = %p.label, request_id = %p.request_id, "DICOM instance analysed");
            outcome("analysed");
        }
        Err(e) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.command.sop_instance, error_type = e.error_type().as_str(), "DICOM instance not analysed: an SR says why");
            outcome("not_analysed");
        }
    }
    status::SUCCESS
}

/// The received data set as a Part-10 file: preamble, `DICM`, the meta group (its
/// transfer syntax the negotiated one), then the data set as it came.
fn part10(s: &Store) -> Result<Vec<u8>, NodeError> {
    let ts = s.context.transfer_syntax.as_str();
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(if ts.is_empty() { IMPLICIT_VR_LE } else { ts })
        .media_storage_sop_class_uid(s.command.sop_class.as_str())
        .media_storage_sop_instance_uid(s.command.sop_instance.as_str())
        .implementation_class_uid("2.25.215536178186338154513012399960186455557")
        .build()
        .map_err(|e| NodeError(e.to_string()))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).map_err(|e| NodeError(e.to_string()))?;
    out.write_all(&s.data)
        .map_err(|e| NodeError(e.to_string()))?;
    Ok(out)
}

/// How long an association may idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
