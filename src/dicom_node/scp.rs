//! One association with a peer (a modality, a PACS router): C-ECHO answered, C-STORE
//! of radiographs analysed through the prediction core and their results queued in
//! the outbox before the store is answered. Runs on a blocking thread (dicom-ul's
//! synchronous associations); the core is reached through the runtime's handle.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;
use dicom_ul::Pdu;
use dicom_ul::ServerAssociationOptions;
use dicom_ul::association::Association as _;
use dicom_ul::pdu::PDataValue;
use dicom_ul::pdu::PDataValueType;

use crate::access::Caller;
use crate::dicom_node::Node;
use crate::dicom_node::NodeError;
use crate::dicom_node::peers::PeerCheck;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::ErrorType;
use crate::predict::Upload;

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
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

/// C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (the node is loading, full, or its outbox is).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
}

/// A C-STORE under way: its command's facts, then its data set's fragments.
struct Store {
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    context: u8,
    data: Vec<u8>,
}

/// Serves one connection until the peer releases or aborts, or it idles out.
pub(super) fn serve(node: &Node, socket: TcpStream, rt: &tokio::runtime::Handle) {
    let ip = match socket.peer_addr() {
        Ok(a) => a.ip(),
        Err(_) => return,
    };
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
    let contexts: Vec<(u8, String)> = assoc
        .presentation_contexts()
        .iter()
        .map(|pc| (pc.id, pc.transfer_syntax.trim_end_matches('\0').to_string()))
        .collect();
    let mut command: Vec<u8> = Vec::new();
    let mut store: Option<Store> = None;
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(calling_ae = %calling, error = %e, "DICOM association ended");
                return;
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for v in data {
                    let reply = match v.value_type {
                        PDataValueType::Command => {
                            command.extend_from_slice(&v.data);
                            if !v.is_last {
                                continue;
                            }
                            let cmd = std::mem::take(&mut command);
                            on_command(&cmd, v.presentation_context_id, &mut store)
                        }
                        PDataValueType::Data => {
                            let Some(s) = store.as_mut() else {
                                tracing::warn!(calling_ae = %calling, "data set without a C-STORE command; aborting");
                                let _ = assoc.abort();
                                return;
                            };
                            if s.data.len() + v.data.len() > node.max_object_bytes {
                                tracing::warn!(calling_ae = %calling, limit = node.max_object_bytes, "data set over the size limit; aborting");
                                metrics.dicom_stores.with_label_values(&["failed"]).inc();
                                let _ = assoc.abort();
                                return;
                            }
                            s.data.extend_from_slice(&v.data);
                            if !v.is_last {
                                continue;
                            }
                            let s = store.take().expect("a store under way");
                            let ts = contexts
                                .iter()
                                .find(|(id, _)| *id == s.context)
                                .map(|(_, ts)| ts.clone())
                                .unwrap_or_default();
                            let code = on_store(node, rt, &calling, &ts, &s);
                            Some((s.context, store_response(&s, code)))
                        }
                    };
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

/// A command: a C-ECHO is answered at once; a C-STORE's facts are kept for its data
/// set. Returns the response to send, if any.
fn on_command(bytes: &[u8], context: u8, store: &mut Option<Store>) -> Option<(u8, Vec<u8>)> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &ts).ok()?;
    let field = obj
        .element(tags::COMMAND_FIELD)
        .ok()?
        .to_int::<u16>()
        .ok()?;
    let message_id = obj
        .element(tags::MESSAGE_ID)
        .ok()
        .and_then(|e| e.to_int::<u16>().ok())
        .unwrap_or(0);
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    match field {
        // C-ECHO-RQ.
        0x0030 => Some((
            context,
            command(&[
                (
                    tags::AFFECTED_SOP_CLASS_UID,
                    Field::Uid(VERIFICATION.into()),
                ),
                (tags::COMMAND_FIELD, Field::Us(0x8030)),
                (tags::MESSAGE_ID_BEING_RESPONDED_TO, Field::Us(message_id)),
                (tags::COMMAND_DATA_SET_TYPE, Field::Us(0x0101)),
                (tags::STATUS, Field::Us(status::SUCCESS)),
            ]),
        )),
        // C-STORE-RQ: its data set follows.
        0x0001 => {
            *store = Some(Store {
                message_id,
                sop_class: text(tags::AFFECTED_SOP_CLASS_UID),
                sop_instance: text(tags::AFFECTED_SOP_INSTANCE_UID),
                context,
                data: Vec::new(),
            });
            None
        }
        other => {
            tracing::info!(
                command_field = other,
                "DICOM command not supported; ignored"
            );
            None
        }
    }
}

/// A command field's value.
enum Field {
    Uid(String),
    Us(u16),
}

/// A command set (implicit VR little endian, with its group length).
fn command(fields: &[(dicom_core::Tag, Field)]) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(fields.iter().map(|(tag, f)| match f {
        Field::Uid(u) => {
            dicom_core::DataElement::new(*tag, VR::UI, dicom_core::PrimitiveValue::from(u.as_str()))
        }
        Field::Us(v) => {
            dicom_core::DataElement::new(*tag, VR::US, dicom_core::PrimitiveValue::from(*v))
        }
    }));
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts)
        .expect("a command set can be written");
    out
}

fn store_response(s: &Store, code: u16) -> Vec<u8> {
    command(&[
        (
            tags::AFFECTED_SOP_CLASS_UID,
            Field::Uid(s.sop_class.clone()),
        ),
        (tags::COMMAND_FIELD, Field::Us(0x8001)),
        (tags::MESSAGE_ID_BEING_RESPONDED_TO, Field::Us(s.message_id)),
        (tags::COMMAND_DATA_SET_TYPE, Field::Us(0x0101)),
        (tags::STATUS, Field::Us(code)),
        (
            tags::AFFECTED_SOP_INSTANCE_UID,
            Field::Uid(s.sop_instance.clone()),
        ),
    ])
}

/// One stored instance: identified, analysed through the core (unless this model
/// file already analysed it), its results queued for every destination; the status
/// to answer.
fn on_store(node: &Node, rt: &tokio::runtime::Handle, calling: &str, ts: &str, s: &Store) -> u16 {
    let metrics = node.core.metrics();
    let outcome = |o: &str| metrics.dicom_stores.with_label_values(&[o]).inc();
    let started = Instant::now();
    let file = match part10(ts, s) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(calling_ae = %calling, error = %e, "DICOM instance not readable");
            outcome("failed");
            return status::CANNOT_UNDERSTAND;
        }
    };
    let (source, pixels) = match crate::imaging::dicom::identify(&file) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(calling_ae = %calling, error = %e, "DICOM instance not readable");
            outcome("failed");
            return status::CANNOT_UNDERSTAND;
        }
    };
    if source.sop_instance_uid.as_deref() != Some(s.sop_instance.as_str())
        || source.sop_class_uid.as_deref() != Some(s.sop_class.as_str())
    {
        outcome("failed");
        return status::DATASET_MISMATCH;
    }
    let asker = Asker {
        caller: Caller(calling.to_string()),
        request_id: uuid::Uuid::new_v4().to_string(),
        client_request_id: None,
        trace: None,
    };
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
    // What the image is: the same instance and pixels, analysed by the same model
    // file, gets the same results (and is not analysed twice).
    let seed = format!("{}/{pixels}", s.sop_instance);
    let key = core.filing_key(&valid, &seed);
    match node.outbox.has_source(&key) {
        Ok(true) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.sop_instance, "already analysed by this model file; not again");
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
    let upload = Upload::Dicom(file.into());
    let filed = rt.block_on(core.within_timeout(core.analyse_for_filing(
        &valid,
        upload,
        Some(&source),
        &seed,
    )));
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
    let objects: Vec<(&str, String, Vec<u8>)> = filed
        .objects
        .into_iter()
        .map(|o| (o.kind, o.sop_instance_uid, o.bytes))
        .collect();
    if let Err(e) = node.outbox.add(&key, &objects, &node.destination_names) {
        tracing::error!(error = %e, "results not queued; the store is refused");
        outcome("failed");
        return status::OUT_OF_RESOURCES;
    }
    node.wake.notify_one();
    match &filed.outcome {
        Ok(p) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.sop_instance, label = %p.label, request_id = %p.request_id, "DICOM instance analysed");
            outcome("analysed");
        }
        Err(e) => {
            tracing::info!(calling_ae = %calling, sop_instance_uid = %s.sop_instance, error_type = e.error_type().as_str(), "DICOM instance not analysed: an SR says why");
            outcome("not_analysed");
        }
    }
    status::SUCCESS
}

/// The received data set as a Part-10 file: preamble, `DICM`, the meta group (its
/// transfer syntax the negotiated one), then the data set as it came.
fn part10(ts: &str, s: &Store) -> Result<Vec<u8>, NodeError> {
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(if ts.is_empty() { IMPLICIT_VR_LE } else { ts })
        .media_storage_sop_class_uid(s.sop_class.as_str())
        .media_storage_sop_instance_uid(s.sop_instance.as_str())
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
