//! Sends the outbox's result objects to their destinations: by C-STORE (one
//! association per round and destination) or by STOW-RS (one POST per object). A
//! failed send is due again after a backoff; nothing is dropped.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_object::OpenFileOptions;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::Pdu;
use dicom_ul::pdu::PDataValue;
use dicom_ul::pdu::PDataValueType;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::dicom_node::Destination;
use crate::dicom_node::Node;
use crate::dicom_node::NodeError;
use crate::dicom_node::outbox::Item;
use crate::imaging::sr::COMPREHENSIVE_3D_SR;
use crate::imaging::sr::SECONDARY_CAPTURE;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Longest one send may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The sender's loop: due objects, sent by destination; then a wait until the next
/// is due, or until new results are queued.
pub(super) async fn run(node: Arc<Node>) {
    loop {
        let outbox = node.outbox.clone();
        let due = tokio::task::spawn_blocking(move || outbox.due(32)).await;
        let items = match due {
            Ok(Ok(items)) => items,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "outbox not readable");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if items.is_empty() {
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || update_depth(&n)).await;
            let outbox = node.outbox.clone();
            let next = tokio::task::spawn_blocking(move || outbox.next_due_in())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                () = node.wake.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
            continue;
        }
        let mut by_destination: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for i in items {
            by_destination
                .entry(i.destination.clone())
                .or_default()
                .push(i);
        }
        for (name, items) in by_destination {
            let Some(dest) = node.destinations.iter().find(|d| d.name() == name).cloned() else {
                // A destination no longer configured here (another replica's): its
                // objects wait for a sender that has it.
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for i in &items {
                        let _ = n
                            .outbox
                            .retry(i, "destination not configured on this replica");
                    }
                })
                .await;
                continue;
            };
            let results = match &dest {
                Destination::Store { ae_title, address } => {
                    let (calling, called, address) =
                        (node.ae_title.clone(), ae_title.clone(), address.clone());
                    let sent = items.clone();
                    tokio::task::spawn_blocking(move || {
                        store_all(&calling, &called, &address, &sent)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        vec![Err(NodeError("the sender failed".into())); items.len()]
                    })
                }
                Destination::Stow { url, token } => {
                    let mut r = Vec::with_capacity(items.len());
                    for i in &items {
                        r.push(stow(url, token.as_deref(), i).await);
                    }
                    r
                }
            };
            let marker = node.clone();
            let marked =
                tokio::task::spawn_blocking(move || mark(&marker, &name, &items, results)).await;
            if marked.is_err() {
                tracing::error!("the outbox marker failed");
            }
        }
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || update_depth(&n)).await;
    }
}

/// Marks each item sent or due again, and counts it.
fn mark(node: &Node, name: &str, items: &[Item], results: Vec<Result<(), NodeError>>) {
    let metrics = node.core.metrics();
    for (item, result) in items.iter().zip(results) {
        let marked = match &result {
            Ok(()) => {
                metrics
                    .dicom_results
                    .with_label_values(&[name, "sent"])
                    .inc();
                tracing::info!(destination = %name, sop_instance_uid = %item.sop_instance_uid, "result sent");
                node.outbox.sent(item.id).map(|()| Duration::ZERO)
            }
            Err(e) => {
                metrics
                    .dicom_results
                    .with_label_values(&[name, "retried"])
                    .inc();
                let r = node.outbox.retry(item, &e.0);
                if let Ok(after) = &r {
                    tracing::warn!(destination = %name, sop_instance_uid = %item.sop_instance_uid, attempt = item.attempts + 1, retry_in_s = after.as_secs(), error = %e, "result not sent; will retry");
                }
                r
            }
        };
        if let Err(e) = marked {
            tracing::error!(error = %e, "outbox not writable");
        }
    }
}

fn update_depth(node: &Node) {
    let gauge = &node.core.metrics().dicom_outbox_depth;
    let depth = node.outbox.depth().unwrap_or_default();
    for name in &node.destination_names {
        let n = depth.iter().find(|(d, _)| d == name).map_or(0, |(_, n)| *n);
        gauge.with_label_values(&[name]).set(n);
    }
}

/// C-STORE of every item over one association; each item's outcome.
fn store_all(
    calling: &str,
    called: &str,
    address: &str,
    items: &[Item],
) -> Vec<Result<(), NodeError>> {
    let opts = ClientAssociationOptions::new()
        .calling_ae_title(calling)
        .called_ae_title(called)
        .connection_timeout(Duration::from_secs(5))
        .read_timeout(SEND_TIMEOUT)
        .write_timeout(SEND_TIMEOUT)
        .with_presentation_context(COMPREHENSIVE_3D_SR, vec![EXPLICIT_VR_LE, IMPLICIT_VR_LE])
        .with_presentation_context(SECONDARY_CAPTURE, vec![EXPLICIT_VR_LE, IMPLICIT_VR_LE]);
    let mut assoc = match opts.establish(address) {
        Ok(a) => a,
        Err(e) => {
            let e = NodeError(format!("association with {called}@{address}: {e}"));
            return vec![Err(e); items.len()];
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let r = store_one(&mut assoc, item, (n + 1) as u16);
        let broken = r.is_err();
        out.push(r);
        if broken {
            // The association may be unusable: the rest wait for the next round.
            let e = NodeError("not tried: an earlier send on the association failed".into());
            out.extend((n + 1..items.len()).map(|_| Err(e.clone())));
            let _ = assoc.abort();
            return out;
        }
    }
    let _ = assoc.release();
    out
}

fn store_one(
    assoc: &mut dicom_ul::ClientAssociation<std::net::TcpStream>,
    item: &Item,
    message_id: u16,
) -> Result<(), NodeError> {
    let err = |e: &dyn std::fmt::Display| NodeError(e.to_string());
    let file = OpenFileOptions::new()
        .from_reader(&item.payload[128..])
        .map_err(|e| err(&e))?;
    let sop_class = file
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0')
        .to_string();
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax.trim_end_matches('\0') == sop_class)
        .cloned()
        .ok_or_else(|| {
            NodeError(format!(
                "the destination did not accept SOP class {sop_class}"
            ))
        })?;
    let ts_uid = pc.transfer_syntax.trim_end_matches('\0');
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| NodeError(format!("transfer syntax {ts_uid} unknown")))?;
    let mut data = Vec::with_capacity(item.payload.len());
    file.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| err(&e))?;
    let cmd = InMemDicomObject::command_from_element_iter([
        dicom_core::DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            dicom_core::VR::UI,
            dicom_core::PrimitiveValue::from(sop_class.as_str()),
        ),
        dicom_core::DataElement::new(
            tags::COMMAND_FIELD,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0x0001_u16),
        ),
        dicom_core::DataElement::new(
            tags::MESSAGE_ID,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(message_id),
        ),
        dicom_core::DataElement::new(
            tags::PRIORITY,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0_u16),
        ),
        dicom_core::DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0x0000_u16),
        ),
        dicom_core::DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            dicom_core::VR::UI,
            dicom_core::PrimitiveValue::from(item.sop_instance_uid.as_str()),
        ),
    ]);
    let implicit = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut cmd_data = Vec::new();
    cmd.write_dataset_with_ts(&mut cmd_data, &implicit)
        .map_err(|e| err(&e))?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd_data,
            }],
        })
        .map_err(|e| err(&e))?;
    {
        let mut w = assoc.send_pdata(pc.id);
        w.write_all(&data).map_err(|e| err(&e))?;
    }
    match assoc.receive().map_err(|e| err(&e))? {
        Pdu::PData { data } => {
            let v = data
                .first()
                .ok_or_else(|| NodeError("an empty response".into()))?;
            let rsp = InMemDicomObject::read_dataset_with_ts(&v.data[..], &implicit)
                .map_err(|e| err(&e))?;
            let status = rsp
                .element(tags::STATUS)
                .map_err(|e| err(&e))?
                .to_int::<u16>()
                .map_err(|e| err(&e))?;
            match status {
                // Success, and the warnings (coercion, elements discarded): stored.
                0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Ok(()),
                s => Err(NodeError(format!("C-STORE failed with status {s:04X}H"))),
            }
        }
        other => Err(NodeError(format!(
            "unexpected answer to a C-STORE: {}",
            other.short_description()
        ))),
    }
}

/// STOW-RS of one object (PS3.18 10.5): `POST {url}/studies`, multipart/related.
async fn stow(url: &str, token: Option<&str>, item: &Item) -> Result<(), NodeError> {
    let boundary = format!("cxr-stow-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::with_capacity(item.payload.len() + 256);
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&item.payload);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut req = http::Request::post(format!("{url}/studies"))
        .header(
            http::header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(http::header::ACCEPT, "application/dicom+json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| NodeError(e.to_string()))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(SEND_TIMEOUT, client.request(req))
        .await
        .map_err(|_| {
            NodeError(format!(
                "STOW-RS to {url}: no answer within {SEND_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| NodeError(format!("STOW-RS to {url}: {e}")))?;
    match resp.status().as_u16() {
        200 => Ok(()),
        s => Err(NodeError(format!("STOW-RS to {url}: status {s}"))),
    }
}
