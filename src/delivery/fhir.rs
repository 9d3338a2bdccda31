//! One result as FHIR R4: a transaction Bundle (a DiagnosticReport, the finding's
//! Observation, the model's Device), and its POST to a FHIR server with the answer
//! classified as sent, refused or to be retried.
//!
//! The Bundle is a function of the facts alone: its `fullUrl`s and identifiers are
//! UUIDs derived from `ReportFacts::result_id` (the Device's from the model file's
//! SHA-256), and every entry is a conditional create (`request.ifNoneExist` on that
//! identifier), so a resend (after a lost answer, a restart) is the identical Bundle
//! and the server creates nothing twice. The EHR's patient and order are referred to
//! by identifier (logical references): this service creates no Patient, ServiceRequest
//! or ImagingStudy of its own.
//!
//! Choices (docs/ris-ehr.md, "FHIR R4"):
//! - the finding: `Observation.code` SNOMED CT 233604007 |Pneumonia|, its value
//!   SNOMED CT 52101004 |Present| or 2667000 |Absent|; P(PNEUMONIA), the threshold,
//!   its source and the OOD verdict and score as components; the answer's warnings
//!   and the intended use as notes;
//! - `interpretation`: `A` for a positive finding, `AA` for a positive at or above
//!   the urgency threshold (the passive "suspected finding" flag, also a `meta.tag`
//!   `suspected-finding` on the DiagnosticReport), `N` for a negative one; none on a
//!   refusal;
//! - the HL7 AI Transparency IG's `AIAST` security label on the DiagnosticReport and
//!   the Observation (what the model wrote), not on the Device (which describes it);
//! - the intended use opens every `DiagnosticReport.conclusion`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::Full;
use http_body_util::Limited;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use serde_json::json;

use crate::delivery::Channel;
use crate::delivery::INTENDED_USE;
use crate::delivery::Kind;
use crate::delivery::ModelFacts;
use crate::delivery::Outcome;
use crate::delivery::Patient;
use crate::delivery::Rendered;
use crate::delivery::ReportFacts;
use crate::delivery::SNOMED_PNEUMONIA;
use crate::delivery::Sending;
use crate::delivery::Verdict;
use crate::delivery::outbox::Item;
use crate::delivery::sender::Round;
use crate::delivery::sender::SendError;
use crate::delivery::sender::blocking;

/// The media type of what is posted (FHIR R4, JSON).
pub const FHIR_JSON: &str = "application/fhir+json";
/// Identifiers that are URIs (our `urn:uuid:`s, RFC 3986).
pub const URI_SYSTEM: &str = "urn:ietf:rfc:3986";
/// DICOM UIDs as identifiers (`urn:oid:<uid>`), as FHIR's ImagingStudy does.
pub const DICOM_UID_SYSTEM: &str = "urn:dicom:uid";
/// The codes cxr defines (the component codes, the `suspected-finding` tag):
/// `2.25.` + the first 128 bits of SHA-256("cxr FHIR codes") as a name-based UUID,
/// an OID no one else can mint, so no domain name is needed.
pub const CXR_CODES: &str = "urn:oid:2.25.10174112250797966104583334287940968371";
const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const V2_0074: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const V3_OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
const V3_INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const DICOM_DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const UCUM: &str = "http://unitsofmeasure.org";
/// The longest refusal reason kept (a server's OperationOutcome text).
const MAX_REASON: usize = 1000;

/// A name-based UUID (version 5 layout over SHA-256, as `imaging::sr::uid` derives
/// UIDs): the same `name` gives the same UUID.
fn name_uuid(name: &str) -> uuid::Uuid {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b)
}

/// `urn:uuid:` of what `kind` is for the result (or the model file) `of`.
fn urn(kind: &str, of: &str) -> String {
    format!("urn:uuid:{}", name_uuid(&format!("cxr {kind} {of}")))
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn cxr_code(code: &str, display: &str) -> Value {
    json!({ "coding": [coding(CXR_CODES, code, display)], "text": display })
}

/// The AI Transparency IG's label: asserted by artificial intelligence.
fn ai_asserted() -> Value {
    json!({ "security": [coding(V3_OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")] })
}

/// One resource of the Bundle: the URN that is its identifier, and the (other) URN
/// that is its `fullUrl`. They differ because a server replaces a `fullUrl` wherever
/// it occurs in the Bundle (Medplum even in strings), which would change the
/// identifier a resend is matched on.
struct Named {
    identifier: String,
    full_url: String,
}

impl Named {
    fn new(kind: &str, of: &str) -> Self {
        Self {
            identifier: urn(kind, of),
            full_url: urn(&format!("{kind} entry"), of),
        }
    }

    /// A conditional create of `resource`, skipped by the server when a resource of
    /// its type already has this identifier.
    fn entry(&self, resource: Value) -> Value {
        let kind = resource["resourceType"]
            .as_str()
            .expect("every entry is a resource with its type")
            .to_string();
        json!({
            "fullUrl": self.full_url,
            "resource": resource,
            "request": {
                "method": "POST",
                "url": kind,
                "ifNoneExist": format!("identifier={URI_SYSTEM}|{}", self.identifier),
            },
        })
    }
}

/// A DICOM PN (`Family^Given^Middle^Prefix^Suffix`) as it is read aloud.
fn person_name(pn: &str) -> String {
    let part = |i: usize| pn.split('^').nth(i).unwrap_or("").trim();
    [part(3), part(1), part(2), part(0), part(4)]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The patient, by identifier (the EHR's own Patient is not ours to create).
fn subject(p: &Patient) -> Option<Value> {
    let id = p.id.as_deref().filter(|s| !s.trim().is_empty())?;
    let mut identifier = json!({
        "type": { "coding": [coding(V2_0203, "MR", "Medical record number")] },
        "value": id,
    });
    if let Some(issuer) = p.issuer.as_deref().filter(|s| !s.trim().is_empty()) {
        identifier["assigner"] = json!({ "display": issuer });
    }
    let mut r = json!({ "type": "Patient", "identifier": identifier });
    if let Some(name) = p.name.as_deref().map(person_name).filter(|s| !s.is_empty()) {
        r["display"] = json!(name);
    }
    Some(r)
}

/// The order, by each of its identifiers the image had (accession, placer, filler).
fn based_on(facts: &ReportFacts) -> Vec<Value> {
    let o = &facts.order;
    [
        (&o.accession_number, "ACSN", "Accession ID"),
        (&o.placer_order_number, "PLAC", "Placer Identifier"),
        (&o.filler_order_number, "FILL", "Filler Identifier"),
    ]
    .into_iter()
    .filter_map(|(v, code, display)| {
        let v = v.as_deref().filter(|s| !s.trim().is_empty())?;
        Some(json!({
            "type": "ServiceRequest",
            "identifier": {
                "type": { "coding": [coding(V2_0203, code, display)] },
                "value": v,
            },
        }))
    })
    .collect()
}

/// The imaging study, by its Study Instance UID (the image's UIDs in its display).
fn imaging_study(facts: &ReportFacts) -> Option<Value> {
    let s = &facts.study;
    let uid = s.study_instance_uid.as_deref().filter(|u| !u.is_empty())?;
    let mut display = format!("Study {uid}");
    if let Some(series) = &s.series_instance_uid {
        display.push_str(&format!(", series {series}"));
    }
    if let Some(sop) = &s.sop_instance_uid {
        display.push_str(&format!(", image {sop}"));
    }
    Some(json!({
        "type": "ImagingStudy",
        "identifier": { "system": DICOM_UID_SYSTEM, "value": format!("urn:oid:{uid}") },
        "display": display,
    }))
}

/// The model: one Device per model file (its SHA-256 names it).
fn device(model: &ModelFacts) -> (Named, Value) {
    let named = Named::new("model", &model.sha256);
    let resource = json!({
        "resourceType": "Device",
        "identifier": [
            { "system": URI_SYSTEM, "value": named.identifier },
            { "type": { "text": "SHA-256 of the ONNX model file" }, "value": model.sha256 },
        ],
        "status": "active",
        "deviceName": [{ "name": format!("cxr {}", model.name), "type": "model-name" }],
        "type": { "text": "AI software: pediatric chest X-ray pneumonia classifier" },
        "version": [
            { "type": { "text": "model version" }, "value": model.version },
            { "type": { "text": "SHA-256 of the ONNX model file" }, "value": model.sha256 },
        ],
    });
    (named, resource)
}

/// `x` to 6 decimal places: the model's outputs are `f32`s, whose widening to `f64`
/// would show digits that mean nothing (0.8984099 as 0.898409903049469).
fn decimal(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn probability(value: f64) -> Value {
    json!({ "value": decimal(value), "unit": "probability", "system": UCUM, "code": "1" })
}

fn verdict_text(v: Verdict) -> (&'static str, &'static str) {
    match v {
        Verdict::InDistribution => ("in-distribution", "In distribution"),
        Verdict::Shift => ("distribution-shift", "Distribution shift"),
        Verdict::Outside => (
            "out-of-distribution",
            "Out of distribution (answered: --ood-action warn)",
        ),
        Verdict::NotScored => ("not-scored", "Not scored"),
    }
}

/// The transaction Bundle of one result: the same facts give the same Bundle.
pub fn bundle(facts: &ReportFacts) -> Value {
    let id = &facts.result_id;
    let report = Named::new("report", id);
    let subject = subject(&facts.patient);
    let study = imaging_study(facts);
    let mut entries = Vec::new();

    let mut category = vec![json!({
        "coding": [
            coding(V2_0074, "RAD", "Radiology"),
            coding(LOINC, "LP29684-5", "Radiology"),
        ],
    })];
    if let Some(m) = facts.study.modality.as_deref().filter(|m| !m.is_empty()) {
        category.push(json!({ "coding": [{ "system": DICOM_DCM, "code": m }] }));
    }
    let report_named = report;
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "meta": ai_asserted(),
        "identifier": [
            { "system": URI_SYSTEM, "value": report_named.identifier },
            { "use": "secondary", "type": { "text": "cxr result id" }, "value": id },
        ],
        "status": "preliminary",
        "category": category,
        "code": {
            "coding": [coding(LOINC, "18748-4", "Diagnostic imaging study")],
            "text": "AI analysis of a chest radiograph for pneumonia",
        },
        "issued": facts.observed_at,
    });
    let orders = based_on(facts);
    if !orders.is_empty() {
        report["basedOn"] = json!(orders);
    }
    if let Some(s) = &subject {
        report["subject"] = s.clone();
    }
    if let Some(s) = &study {
        report["imagingStudy"] = json!([s]);
    }

    let conclusion = match &facts.outcome {
        Outcome::NotAnalysed { error_type, reason } => {
            format!("{INTENDED_USE}. Not analysed ({error_type}): {reason}")
        }
        Outcome::Classified {
            pneumonia,
            probability: p,
            threshold,
            threshold_source,
            verdict,
            ood_score,
            warnings,
        } => {
            let (device_named, device) = device(&facts.model);
            let finding = Named::new("finding", id);
            let (value_code, value_display) = if *pneumonia {
                ("52101004", "Present")
            } else {
                ("2667000", "Absent")
            };
            let (verdict_code, verdict_display) = verdict_text(*verdict);
            let mut components = vec![
                json!({
                    "code": cxr_code("probability", "P(PNEUMONIA), calibrated"),
                    "valueQuantity": probability(*p),
                }),
                json!({
                    "code": cxr_code("threshold", "Decision threshold"),
                    "valueQuantity": probability(*threshold),
                }),
                json!({
                    "code": cxr_code("threshold-source", "Source of the decision threshold"),
                    "valueString": threshold_source.as_str(),
                }),
                json!({
                    "code": cxr_code("ood-verdict", "Out-of-distribution verdict"),
                    "valueCodeableConcept": cxr_code(verdict_code, verdict_display),
                }),
            ];
            if let Some(score) = ood_score {
                components.push(json!({
                    "code": cxr_code("ood-score", "Out-of-distribution score"),
                    "valueQuantity": { "value": decimal(*score), "unit": "score", "system": UCUM, "code": "1" },
                }));
            }
            let mut notes = vec![json!({ "text": INTENDED_USE })];
            notes.extend(warnings.iter().map(|w| json!({ "text": w })));
            let interpretation = match (*pneumonia, facts.urgent) {
                (true, true) => coding(V3_INTERPRETATION, "AA", "Critical abnormal"),
                (true, false) => coding(V3_INTERPRETATION, "A", "Abnormal"),
                (false, _) => coding(V3_INTERPRETATION, "N", "Normal"),
            };
            let mut observation = json!({
                "resourceType": "Observation",
                "meta": ai_asserted(),
                "identifier": [{ "system": URI_SYSTEM, "value": finding.identifier }],
                "status": "preliminary",
                "category": [{ "coding": [coding(OBSERVATION_CATEGORY, "imaging", "Imaging")] }],
                "code": {
                    "coding": [coding(SNOMED, SNOMED_PNEUMONIA.0, SNOMED_PNEUMONIA.1)],
                    "text": "Pneumonia",
                },
                "issued": facts.observed_at,
                "valueCodeableConcept": {
                    "coding": [coding(SNOMED, value_code, value_display)],
                    "text": if *pneumonia { "Pneumonia: present" } else { "Pneumonia: absent" },
                },
                "interpretation": [{ "coding": [interpretation] }],
                "note": notes,
                "device": { "reference": device_named.full_url },
                "component": components,
            });
            if let Some(s) = &subject {
                observation["subject"] = s.clone();
            }
            if let Some(s) = &study {
                observation["derivedFrom"] = json!([s]);
            }
            report["result"] = json!([{ "reference": finding.full_url }]);
            if *pneumonia && facts.urgent {
                report["meta"]["tag"] = json!([coding(
                    CXR_CODES,
                    "suspected-finding",
                    "Suspected finding (passive AI flag)"
                )]);
            }
            entries.push(device_named.entry(device));
            entries.push(finding.entry(observation));
            let said = if *pneumonia { "present" } else { "absent" };
            format!(
                "{INTENDED_USE}. Pneumonia {said} (P(PNEUMONIA) {p:.3}, threshold {threshold:.3} from {}).",
                threshold_source.as_str()
            )
        }
    };
    report["conclusion"] = json!(conclusion);
    entries.push(report_named.entry(report));
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

/// How a POST of a Bundle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posted {
    /// Stored (2xx, and every entry of the transaction-response 2xx).
    Sent,
    /// The server refused it (a 4xx other than 408 and 429, or a failed entry): the
    /// same Bundle would be refused again. The reason is the OperationOutcome's text.
    Refused(String),
    /// No answer, a timeout, 408, 429 or a 5xx: to be tried again.
    Transient(String),
}

/// A FHIR server to post to.
#[derive(Debug, Clone)]
pub struct FhirTarget {
    /// The base URL (`http://host:port/fhir/R4`): a transaction is `POST [base]`.
    pub url: String,
    /// A bearer token, when the server wants one (`CXR_FHIR_TOKEN`).
    pub token: Option<String>,
    /// Longest the request and the read of its answer may each take.
    pub timeout: Duration,
}

/// Largest response body read (a transaction-response or an OperationOutcome).
const MAX_RESPONSE: usize = 1 << 20;
/// The default time one POST may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(30);

impl FhirTarget {
    /// A target at `url` (plain HTTP: put TLS in a local proxy, as for STOW-RS).
    pub fn new(url: &str, token: Option<String>) -> Result<Self, String> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
            return Err(format!(
                "--fhir-url `{url}` must be an http:// URL (for https, terminate TLS in a local proxy)"
            ));
        }
        Ok(Self {
            url,
            token: token.filter(|t| !t.is_empty()),
            timeout: POST_TIMEOUT,
        })
    }

    /// POSTs `bundle` (a transaction, as `bundle` makes it) and classifies the answer.
    pub async fn post(&self, bundle: &[u8]) -> Posted {
        let url = &self.url;
        let uri = if url.matches('/').count() < 3 {
            format!("{url}/")
        } else {
            url.clone()
        };
        let mut req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, FHIR_JSON)
            .header(http::header::ACCEPT, FHIR_JSON);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match req.body(Full::new(Bytes::copy_from_slice(bundle))) {
            Ok(r) => r,
            Err(e) => return Posted::Refused(format!("FHIR POST to {url}: {e}")),
        };
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        // Cancel safety: dropping the request future on timeout closes its connection.
        let resp = match tokio::time::timeout(self.timeout, client.request(req)).await {
            Err(_) => {
                return Posted::Transient(format!(
                    "FHIR POST to {url}: no answer within {:?}",
                    self.timeout
                ));
            }
            Ok(Err(e)) => return Posted::Transient(format!("FHIR POST to {url}: {e}")),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(resp.into_body(), MAX_RESPONSE).collect(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        classify(url, status, &body)
    }
}

/// The FHIR channel (`--fhir-url`): each result's Bundle, queued in the outbox and
/// POSTed by the sending loop; sent, refused (counted against
/// `--dicom-max-attempts`, then a dead letter with the server's reason) or failed
/// (retried until `--dicom-give-up-after-hours`).
#[derive(Debug, Clone)]
pub struct FhirChannel {
    target: FhirTarget,
}

impl FhirChannel {
    /// The channel to `target`.
    pub fn new(target: FhirTarget) -> Self {
        Self { target }
    }
}

/// The outbox row's kind of a FHIR Bundle.
pub const ITEM_KIND: &str = "fhir";

impl Channel for FhirChannel {
    fn name(&self) -> String {
        format!("fhir:{}", self.target.url)
    }

    fn kind(&self) -> Kind {
        Kind::Fhir
    }

    fn render(&self, facts: &ReportFacts) -> Option<Rendered> {
        let b = bundle(facts);
        Some(Rendered {
            kind: ITEM_KIND,
            // The report's identifier: one result is one item, never queued twice.
            uid: Named::new("report", &facts.result_id).identifier,
            payload: serde_json::to_vec(&b).expect("a JSON value serialises"),
        })
    }

    fn send(self: Arc<Self>, round: Arc<Round>, items: Vec<Item>) -> Sending {
        Box::pin(async move {
            let name = self.name();
            for item in items {
                let r = round.clone();
                let _ = blocking(move || r.renew()).await;
                let result = match self.target.post(&item.payload).await {
                    Posted::Sent => Ok(()),
                    Posted::Refused(reason) => Err(SendError::refused(reason)),
                    Posted::Transient(reason) => Err(SendError::failed(reason)),
                };
                let (r, name) = (round.clone(), name.clone());
                let _ = blocking(move || r.settle(&name, &item, result)).await;
            }
        })
    }
}

/// The answer's meaning: the status, and for a 2xx the transaction-response's
/// entries (a transaction is all or nothing, but a server that says otherwise is
/// believed on the side of not sent).
fn classify(url: &str, status: u16, body: &[u8]) -> Posted {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let said = || {
        parsed
            .as_ref()
            .and_then(outcome_text)
            .map_or_else(String::new, |t| format!(": {t}"))
    };
    let reason = |what: String| {
        let mut r = format!("FHIR POST to {url}: {what}");
        if r.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !r.is_char_boundary(cut) {
                cut -= 1;
            }
            r.truncate(cut);
        }
        r
    };
    match status {
        200..=299 => {
            let Some(b) = parsed
                .as_ref()
                .filter(|b| b["resourceType"] == "Bundle" && b["type"] == "transaction-response")
            else {
                return Posted::Refused(reason(format!(
                    "status {status} without a transaction-response Bundle"
                )));
            };
            let entries = b["entry"].as_array().map_or(&[][..], Vec::as_slice);
            for (n, e) in entries.iter().enumerate() {
                let s = e["response"]["status"].as_str().unwrap_or("");
                let code: u16 = s
                    .split_whitespace()
                    .next()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                if !(200..300).contains(&code) {
                    let text = e["response"]["outcome"]
                        .as_object()
                        .and_then(|_| outcome_text(&e["response"]["outcome"]))
                        .map_or_else(String::new, |t| format!(": {t}"));
                    let why = reason(format!("entry {n} answered `{s}`{text}"));
                    return if code >= 500 || code == 408 || code == 429 {
                        Posted::Transient(why)
                    } else {
                        Posted::Refused(why)
                    };
                }
            }
            Posted::Sent
        }
        408 | 429 => Posted::Transient(reason(format!("status {status}{}", said()))),
        400..=499 => Posted::Refused(reason(format!("status {status}{}", said()))),
        500..=599 => Posted::Transient(reason(format!("status {status}{}", said()))),
        _ => Posted::Refused(reason(format!("status {status}{}", said()))),
    }
}

/// An OperationOutcome's issues as one line: each issue's details text (or its
/// diagnostics, or its code), with its expression; only the errors when it has any
/// (a refusal's warnings are not its reason).
fn outcome_text(v: &Value) -> Option<String> {
    if v["resourceType"] != "OperationOutcome" {
        return None;
    }
    let all = v["issue"].as_array()?;
    let is_error = |i: &&Value| matches!(i["severity"].as_str(), Some("error" | "fatal"));
    let errors: Vec<&Value> = all.iter().filter(is_error).collect();
    let chosen: Vec<&Value> = if errors.is_empty() {
        all.iter().collect()
    } else {
        errors
    };
    let issues: Vec<String> = chosen
        .into_iter()
        .map(|i| {
            let text = i["details"]["text"]
                .as_str()
                .or_else(|| i["diagnostics"].as_str())
                .or_else(|| i["code"].as_str())
                .unwrap_or("unspecified");
            match i["expression"].as_array().and_then(|e| e.first()) {
                Some(Value::String(at)) => format!("{text} ({at})"),
                _ => text.to_string(),
            }
        })
        .collect();
    (!issues.is_empty()).then(|| issues.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Order;
    use crate::delivery::Study;

    /// The HL7 writer's facts, with an order and a study of their own.
    fn facts(outcome: Outcome, urgent: bool) -> ReportFacts {
        let mut f = crate::delivery::hl7::message_tests::facts(outcome, urgent);
        f.patient.id = Some("P123".into());
        f.patient.name = Some("Doe^Jane^M".into());
        f.order = Order {
            accession_number: Some("ACC1".into()),
            placer_order_number: None,
            filler_order_number: Some("F9".into()),
        };
        f.study = Study {
            study_instance_uid: Some("1.2.3".into()),
            series_instance_uid: Some("1.2.3.4".into()),
            sop_instance_uid: Some("1.2.3.4.5".into()),
            modality: Some("DX".into()),
        };
        f
    }

    fn classified(pneumonia: bool) -> Outcome {
        Outcome::Classified {
            pneumonia,
            probability: if pneumonia { 0.91 } else { 0.12 },
            threshold: 0.5,
            threshold_source: crate::delivery::ThresholdKind::Card,
            verdict: Verdict::InDistribution,
            ood_score: Some(1.5),
            warnings: vec!["lateral view".into()],
        }
    }

    fn resource<'a>(b: &'a Value, kind: &str) -> Option<&'a Value> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .find(|r| r["resourceType"] == kind)
    }

    #[test]
    fn the_codes_system_is_derived_as_documented() {
        let u = name_uuid("cxr FHIR codes");
        assert_eq!(CXR_CODES, format!("urn:oid:2.25.{}", u.as_u128()));
    }

    #[test]
    fn a_resend_is_the_identical_bundle_and_another_result_is_not() {
        let f = facts(classified(true), false);
        assert_eq!(bundle(&f), bundle(&f.clone()));
        let mut g = f.clone();
        g.result_id = "r-2".into();
        let (a, b) = (bundle(&f), bundle(&g));
        assert_ne!(a["entry"][1]["fullUrl"], b["entry"][1]["fullUrl"]);
        // The model's Device is one for both results.
        assert_eq!(a["entry"][0]["fullUrl"], b["entry"][0]["fullUrl"]);
    }

    #[test]
    fn every_entry_is_a_conditional_create_on_its_own_identifier() {
        let b = bundle(&facts(classified(false), false));
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 3);
        for e in entries {
            let full_url = e["fullUrl"].as_str().unwrap();
            assert!(full_url.starts_with("urn:uuid:"));
            assert_eq!(e["request"]["method"], "POST");
            assert_eq!(e["request"]["url"], e["resource"]["resourceType"]);
            let identifier = e["resource"]["identifier"][0]["value"].as_str().unwrap();
            assert!(identifier.starts_with("urn:uuid:"));
            assert_eq!(
                e["request"]["ifNoneExist"],
                format!("identifier=urn:ietf:rfc:3986|{identifier}")
            );
            // No fullUrl is an identifier (a server rewrites every fullUrl it finds).
            for other in entries {
                assert_ne!(other["fullUrl"], identifier);
            }
        }
    }

    #[test]
    fn a_positive_report_carries_the_finding_its_inputs_and_the_intended_use() {
        let b = bundle(&facts(classified(true), false));
        let dr = resource(&b, "DiagnosticReport").unwrap();
        assert_eq!(dr["status"], "preliminary");
        assert_eq!(dr["category"][0]["coding"][0]["code"], "RAD");
        assert_eq!(dr["category"][1]["coding"][0]["code"], "DX");
        assert_eq!(
            dr["imagingStudy"][0]["identifier"],
            json!({ "system": "urn:dicom:uid", "value": "urn:oid:1.2.3" })
        );
        assert_eq!(
            dr["basedOn"][0]["identifier"]["type"]["coding"][0]["code"],
            "ACSN"
        );
        assert_eq!(dr["basedOn"][0]["identifier"]["value"], "ACC1");
        assert_eq!(dr["basedOn"][1]["identifier"]["value"], "F9");
        assert_eq!(dr["subject"]["identifier"]["value"], "P123");
        assert_eq!(dr["subject"]["display"], "Jane M Doe");
        assert!(dr["conclusion"].as_str().unwrap().starts_with(INTENDED_USE));
        assert_eq!(dr["meta"]["security"][0]["code"], "AIAST");
        assert!(dr["meta"].get("tag").is_none());
        let obs = resource(&b, "Observation").unwrap();
        assert_eq!(dr["result"][0]["reference"], b["entry"][1]["fullUrl"]);
        assert_eq!(obs["code"]["coding"][0]["code"], "233604007");
        assert_eq!(obs["valueCodeableConcept"]["coding"][0]["code"], "52101004");
        assert_eq!(obs["interpretation"][0]["coding"][0]["code"], "A");
        assert_eq!(obs["component"][0]["valueQuantity"]["value"], 0.91);
        assert_eq!(obs["component"][1]["valueQuantity"]["value"], 0.5);
        assert_eq!(obs["component"][2]["valueString"], "card");
        assert_eq!(
            obs["component"][3]["valueCodeableConcept"]["coding"][0]["code"],
            "in-distribution"
        );
        assert_eq!(obs["component"][4]["valueQuantity"]["value"], 1.5);
        assert_eq!(obs["note"][0]["text"], INTENDED_USE);
        assert_eq!(obs["note"][1]["text"], "lateral view");
        assert_eq!(obs["derivedFrom"][0]["type"], "ImagingStudy");
        assert_eq!(obs["device"]["reference"], b["entry"][0]["fullUrl"]);
        assert_eq!(obs["meta"]["security"][0]["code"], "AIAST");
        let dev = resource(&b, "Device").unwrap();
        assert_eq!(dev["deviceName"][0]["name"], "cxr weighted");
        assert_eq!(dev["version"][0]["value"], "2.0.0");
        assert_eq!(dev["version"][1]["value"], "ab".repeat(32));
    }

    #[test]
    fn a_negative_report_says_absent_and_is_never_flagged() {
        let b = bundle(&facts(classified(false), true));
        let obs = resource(&b, "Observation").unwrap();
        assert_eq!(obs["valueCodeableConcept"]["coding"][0]["code"], "2667000");
        assert_eq!(obs["interpretation"][0]["coding"][0]["code"], "N");
        assert!(
            resource(&b, "DiagnosticReport").unwrap()["meta"]
                .get("tag")
                .is_none()
        );
    }

    #[test]
    fn an_urgent_positive_is_tagged_and_critical() {
        let b = bundle(&facts(classified(true), true));
        let dr = resource(&b, "DiagnosticReport").unwrap();
        assert_eq!(dr["meta"]["tag"][0]["code"], "suspected-finding");
        let obs = resource(&b, "Observation").unwrap();
        assert_eq!(obs["interpretation"][0]["coding"][0]["code"], "AA");
    }

    #[test]
    fn a_refusal_is_a_report_with_its_reason_and_no_finding() {
        let b = bundle(&facts(
            Outcome::NotAnalysed {
                error_type: "out_of_distribution".into(),
                reason: "not a chest X-ray".into(),
            },
            true,
        ));
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        let dr = &entries[0]["resource"];
        assert_eq!(dr["resourceType"], "DiagnosticReport");
        assert_eq!(dr["status"], "preliminary");
        assert!(dr.get("result").is_none());
        assert!(dr["meta"].get("tag").is_none());
        let c = dr["conclusion"].as_str().unwrap();
        assert!(c.starts_with(INTENDED_USE));
        assert!(c.contains("not a chest X-ray") && c.contains("out_of_distribution"));
    }

    #[test]
    fn missing_identifiers_leave_their_references_out() {
        let mut f = facts(classified(true), false);
        f.patient = Patient::default();
        f.order = Order::default();
        f.study = Study::default();
        let b = bundle(&f);
        let dr = resource(&b, "DiagnosticReport").unwrap();
        for k in ["subject", "basedOn", "imagingStudy"] {
            assert!(dr.get(k).is_none(), "{k}");
        }
        assert!(
            resource(&b, "Observation")
                .unwrap()
                .get("derivedFrom")
                .is_none()
        );
    }

    #[test]
    fn answers_are_classified_by_status_and_entries() {
        let ok = json!({ "resourceType": "Bundle", "type": "transaction-response",
            "entry": [{ "response": { "status": "201 Created" } }, { "response": { "status": "200" } }] });
        let body = serde_json::to_vec(&ok).unwrap();
        assert_eq!(classify("u", 200, &body), Posted::Sent);
        let failed_entry = json!({ "resourceType": "Bundle", "type": "transaction-response",
            "entry": [{ "response": { "status": "412", "outcome": { "resourceType": "OperationOutcome",
                "issue": [{ "severity": "error", "code": "duplicate", "details": { "text": "Multiple matches" } }] } } }] });
        let Posted::Refused(r) = classify("u", 200, &serde_json::to_vec(&failed_entry).unwrap())
        else {
            panic!("a failed entry is a refusal");
        };
        assert!(r.contains("Multiple matches"), "{r}");
        assert!(matches!(classify("u", 200, b"<html>"), Posted::Refused(_)));
        let outcome = json!({ "resourceType": "OperationOutcome", "issue": [
            { "severity": "warning", "code": "structure", "details": { "text": "Unusual" } },
            { "severity": "error", "code": "structure", "details": { "text": "Missing required property" }, "expression": ["Observation.code"] }] });
        let outcome = serde_json::to_vec(&outcome).unwrap();
        assert_eq!(
            classify("u", 400, &outcome),
            Posted::Refused(
                "FHIR POST to u: status 400: Missing required property (Observation.code)".into()
            )
        );
        for s in [408, 429, 500, 503] {
            assert!(
                matches!(classify("u", s, &outcome), Posted::Transient(_)),
                "{s}"
            );
        }
        for s in [401, 403, 404, 409, 412, 422] {
            assert!(matches!(classify("u", s, b""), Posted::Refused(_)), "{s}");
        }
        let long = vec![b'x'; 10_000];
        let Posted::Refused(r) = classify("u", 200, &long) else {
            panic!()
        };
        assert!(r.len() <= MAX_REASON);
    }

    #[test]
    fn only_http_urls_are_targets() {
        assert!(FhirTarget::new("https://ehr/fhir", None).is_err());
        assert!(FhirTarget::new("ehr/fhir", None).is_err());
        let t = FhirTarget::new("http://127.0.0.1:8080/fhir/R4/", Some(String::new())).unwrap();
        assert_eq!(t.url, "http://127.0.0.1:8080/fhir/R4");
        assert_eq!(t.token, None);
    }
}
