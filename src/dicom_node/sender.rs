//! The DICOM channels of the delivery loop (`delivery::sender`): result objects sent by C-STORE (one
//! association per round and destination) or by STOW-RS (one POST per object). Each
//! object's outcome is its own: stored; refused by the destination (a C-STORE
//! failure status, a presentation context it did not accept, a 4xx or an instance in
//! STOW-RS's FailedSOPSequence), tried again after a backoff up to
//! `--dicom-max-attempts` times, then a dead letter; or failed without an answer
//! (unreachable, timed out, the association broke, a 5xx), tried again for
//! `--dicom-give-up-after-hours`. Objects not tried because their association broke
//! before them are given back without counting an attempt. The claim on a round's
//! objects is renewed before each send, so a slow destination never lets another
//! replica take (and send again) objects this one still holds.

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
use http_body_util::BodyExt as _;
use http_body_util::Full;
use http_body_util::Limited;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::delivery::Channel;
use crate::delivery::Kind;
use crate::delivery::Sending;
use crate::delivery::outbox::Item;
use crate::delivery::sender::Round;
use crate::delivery::sender::SendError;
use crate::delivery::sender::blocking;
use crate::dicom_node::Destination;
use crate::imaging::sr::COMPREHENSIVE_3D_SR;
use crate::imaging::sr::SECONDARY_CAPTURE;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Longest one send may take (shorter than the outbox's claim, renewed before each).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest STOW-RS response body read (its failure and warning lists).
const MAX_STOW_RESPONSE: usize = 1 << 20;

/// One DICOM destination as a delivery channel: C-STORE (one association per
/// round) or STOW-RS (one POST per object).
pub struct DicomChannel {
    /// Where.
    pub destination: Destination,
    /// Our AE title (the calling AE title of our associations).
    pub calling: String,
}

impl Channel for DicomChannel {
    fn name(&self) -> String {
        self.destination.name()
    }

    fn kind(&self) -> Kind {
        Kind::Dicom
    }

    fn send(self: Arc<Self>, round: Arc<Round>, items: Vec<Item>) -> Sending {
        Box::pin(async move {
            let name = self.name();
            match &self.destination {
                Destination::Store { ae_title, address } => {
                    let (calling, called, address) =
                        (self.calling.clone(), ae_title.clone(), address.clone());
                    let r = round.clone();
                    let done = blocking(move || {
                        store_all(&r, &name, &calling, &called, &address, &items);
                    })
                    .await;
                    if done.is_none() {
                        tracing::error!("the C-STORE sender failed");
                    }
                }
                Destination::Stow { url, token } => {
                    for item in items {
                        let r = round.clone();
                        let _ = blocking(move || r.renew()).await;
                        let result = stow(url, token.as_deref(), &item).await;
                        let (r, name) = (round.clone(), name.clone());
                        let _ = blocking(move || r.settle(&name, &item, result)).await;
                    }
                }
            }
        })
    }
}

/// Why one C-STORE did not store its object.
enum StoreError {
    /// The object was refused (or could not be offered); the association is usable.
    Refused(String),
    /// The association is unusable (a transport error, an unexpected answer).
    Broken(String),
}

/// C-STORE of every item over one association, each settled as it goes: a refused
/// object does not stop the others; a broken association gives the untried ones
/// back (no attempt counted).
fn store_all(
    round: &Round,
    name: &str,
    calling: &str,
    called: &str,
    address: &str,
    items: &[Item],
) {
    round.renew();
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
            let e = SendError::failed(format!("association with {called}@{address}: {e}"));
            for item in items {
                round.settle(name, item, Err(e.clone()));
            }
            return;
        }
    };
    for (n, item) in items.iter().enumerate() {
        round.renew();
        match store_one(&mut assoc, item, (n + 1) as u16) {
            Ok(()) => round.settle(name, item, Ok(())),
            Err(StoreError::Refused(e)) => round.settle(name, item, Err(SendError::refused(e))),
            Err(StoreError::Broken(e)) => {
                round.settle(name, item, Err(SendError::failed(e)));
                // The rest wait for the next round, untried.
                round.release(&items[n + 1..], Duration::ZERO);
                let _ = assoc.abort();
                return;
            }
        }
    }
    let _ = assoc.release();
}

fn store_one(
    assoc: &mut dicom_ul::ClientAssociation<std::net::TcpStream>,
    item: &Item,
    message_id: u16,
) -> Result<(), StoreError> {
    // Before anything is sent, a failure is about the object: the association is
    // still usable.
    let refused = |e: &dyn std::fmt::Display| StoreError::Refused(e.to_string());
    let broken = |e: &dyn std::fmt::Display| StoreError::Broken(e.to_string());
    let file = OpenFileOptions::new()
        .from_reader(item.payload.get(128..).unwrap_or_default())
        .map_err(|e| refused(&e))?;
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
            StoreError::Refused(format!(
                "the destination did not accept SOP class {sop_class}"
            ))
        })?;
    let ts_uid = pc.transfer_syntax.trim_end_matches('\0');
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| StoreError::Refused(format!("transfer syntax {ts_uid} unknown")))?;
    let mut data = Vec::with_capacity(item.payload.len());
    file.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| refused(&e))?;
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
        .map_err(|e| refused(&e))?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd_data,
            }],
        })
        .map_err(|e| broken(&e))?;
    {
        let mut w = assoc.send_pdata(pc.id);
        w.write_all(&data).map_err(|e| broken(&e))?;
    }
    match assoc.receive().map_err(|e| broken(&e))? {
        Pdu::PData { data } => {
            let v = data
                .first()
                .ok_or_else(|| StoreError::Broken("an empty response".into()))?;
            let rsp = InMemDicomObject::read_dataset_with_ts(&v.data[..], &implicit)
                .map_err(|e| broken(&e))?;
            let status = rsp
                .element(tags::STATUS)
                .map_err(|e| broken(&e))?
                .to_int::<u16>()
                .map_err(|e| broken(&e))?;
            match status {
                // Success, and the warnings (coercion, elements discarded): stored.
                0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Ok(()),
                // Every other status is a failure (PS3.4 B.2.3: A7xx out of resources,
                // A9xx data set does not match, Cxxx cannot understand, 0122 SOP
                // class not supported, 0124 not authorised, ...): the object is
                // refused, the association goes on.
                s => Err(StoreError::Refused(format!(
                    "C-STORE failed with status {s:04X}H"
                ))),
            }
        }
        other => Err(StoreError::Broken(format!(
            "unexpected answer to a C-STORE: {}",
            other.short_description()
        ))),
    }
}

/// STOW-RS of one object (PS3.18 10.5): `POST {url}/studies`, multipart/related.
/// 200 and 202 are stored (202: with warnings, logged), unless the response's
/// FailedSOPSequence lists the instance; 408 and 429 are failures to retry; any
/// other 4xx (409 among them) is a refusal; 5xx, no answer, a timeout are failures.
async fn stow(url: &str, token: Option<&str>, item: &Item) -> Result<(), SendError> {
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
        .map_err(|e| SendError::refused(e.to_string()))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let no_answer = || {
        SendError::failed(format!(
            "STOW-RS to {url}: no answer within {SEND_TIMEOUT:?}"
        ))
    };
    // Cancel safety: dropping the request future on timeout closes its connection.
    let resp = tokio::time::timeout(SEND_TIMEOUT, client.request(req))
        .await
        .map_err(|_| no_answer())?
        .map_err(|e| SendError::failed(format!("STOW-RS to {url}: {e}")))?;
    let status = resp.status().as_u16();
    // The body says which instances failed and why; an unreadable one says nothing.
    let body = tokio::time::timeout(
        SEND_TIMEOUT,
        Limited::new(resp.into_body(), MAX_STOW_RESPONSE).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|b| b.to_bytes())
    .unwrap_or_default();
    let report = StowReport::parse(&body, &item.sop_instance_uid);
    let failed = |reason: Option<u16>| {
        reason.map_or_else(String::new, |r| {
            format!(", FailedSOPSequence FailureReason {r:04X}H")
        })
    };
    match status {
        200 | 202 => match report.failure {
            Some(reason) => Err(SendError::refused(format!(
                "STOW-RS to {url}: status {status}{}",
                failed(Some(reason))
            ))),
            None => {
                if status == 202 || !report.warnings.is_empty() {
                    let warnings: Vec<String> = report
                        .warnings
                        .iter()
                        .map(|w| format!("{w:04X}H"))
                        .collect();
                    tracing::warn!(destination = %url, sop_instance_uid = %item.sop_instance_uid, status, warning_reasons = ?warnings, "result stored with warnings (STOW-RS 202)");
                }
                Ok(())
            }
        },
        408 | 429 => Err(SendError::failed(format!(
            "STOW-RS to {url}: status {status}"
        ))),
        400..=499 => Err(SendError::refused(format!(
            "STOW-RS to {url}: status {status}{}",
            failed(report.failure)
        ))),
        _ => Err(SendError::failed(format!(
            "STOW-RS to {url}: status {status}"
        ))),
    }
}

/// What a STOW-RS response body (PS3.18 10.5.3, `application/dicom+json`) says of
/// one instance.
#[derive(Debug, Default, PartialEq, Eq)]
struct StowReport {
    /// Its FailureReason (0008,1197) when FailedSOPSequence (0008,1198) lists it
    /// (or lists an item without a UID: one instance is posted at a time); 0 when
    /// listed without a reason.
    failure: Option<u16>,
    /// The WarningReasons (0008,1196) of the response and of its
    /// ReferencedSOPSequence (0008,1199) items.
    warnings: Vec<u16>,
}

impl StowReport {
    fn parse(body: &[u8], sop_instance_uid: &str) -> Self {
        let mut out = Self::default();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return out;
        };
        // A data set, or (some servers) an array of one.
        let ds = match &v {
            serde_json::Value::Array(a) => a.first().unwrap_or(&serde_json::Value::Null),
            other => other,
        };
        let values = |ds: &serde_json::Value, tag: &str| -> Vec<serde_json::Value> {
            ds.get(tag)
                .and_then(|e| e.get("Value"))
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let code = |v: &serde_json::Value| v.as_u64().map(|n| n as u16);
        for item in values(ds, "00081198") {
            let uid = values(&item, "00081155");
            let ours = uid.first().and_then(serde_json::Value::as_str);
            if ours.is_none_or(|u| u.trim_end_matches('\0') == sop_instance_uid) {
                out.failure = Some(
                    values(&item, "00081197")
                        .first()
                        .and_then(code)
                        .unwrap_or(0),
                );
            }
        }
        out.warnings
            .extend(values(ds, "00081196").iter().filter_map(code));
        for item in values(ds, "00081199") {
            out.warnings
                .extend(values(&item, "00081196").iter().filter_map(code));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stow_response_lists_the_instance_as_failed_or_warns() {
        let failed = br#"{"00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3"]},
             "00081197": {"vr": "US", "Value": [272]}}]}}"#;
        assert_eq!(StowReport::parse(failed, "1.2.3").failure, Some(0x0110));
        // Another instance's failure is not this one's.
        assert_eq!(StowReport::parse(failed, "1.2.4").failure, None);
        let warned = br#"[{"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3"]},
             "00081196": {"vr": "US", "Value": [45056]}}]}}]"#;
        assert_eq!(
            StowReport::parse(warned, "1.2.3"),
            StowReport {
                failure: None,
                warnings: vec![0xB000]
            }
        );
        assert_eq!(
            StowReport::parse(b"not json", "1.2.3"),
            StowReport::default()
        );
    }
}
