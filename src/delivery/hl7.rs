//! HL7 v2.5.1 ORU^R01 from one result's [`ReportFacts`], and the MLLP channel that
//! sends it (`--hl7-destination host:port`).
//!
//! The message: MSH (MSH-10 derived from the result's id, so a resend is the same
//! message; MSH-18 `UNICODE UTF-8`), PID (the source's patient module; the DICOM PN
//! `Family^Given^Middle^Prefix^Suffix` as XPN `Family^Given^Middle^Suffix^Prefix`),
//! ORC and OBR (placer and filler order numbers, the accession number in OBR-18,
//! result status P, OBR-5 the configured priority when the result is urgent), the
//! intended use as an NTE, then OBX: the finding (SNOMED CT 233604007, present or
//! absent; OBX-8 `A` when present), P(PNEUMONIA), the threshold and its source, the
//! model, its SHA-256, the OOD verdict and each warning, the study instance UID;
//! (a required PID-3 or PID-5 the source has no value for is HL7's null, `""`);
//! for an image not analysed, the refusal in place of the finding. Text is escaped
//! (`\F\ \S\ \T\ \R\ \E\`).
//!
//! MLLP: each message framed `0x0B … 0x1C 0x0D` on its own connection; the ACK read
//! within a bound and a timeout. MSA-1 `AA` (or `CA`): sent; `AE`/`AR` (`CE`/`CR`):
//! refused, with MSA-3 and ERR's text as the reason (a dead letter after the
//! policy's attempts); no connection, no ACK in time, an unreadable ACK: failed,
//! retried.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::io::AsyncWriteExt as _;

use crate::delivery::Channel;
use crate::delivery::INTENDED_USE;
use crate::delivery::Kind;
use crate::delivery::Outcome;
use crate::delivery::Rendered;
use crate::delivery::ReportFacts;
use crate::delivery::SNOMED_PNEUMONIA;
use crate::delivery::Sending;
use crate::delivery::Verdict;
use crate::delivery::outbox::Item;
use crate::delivery::sender::Round;
use crate::delivery::sender::SendError;
use crate::delivery::sender::blocking;

/// The HL7 version written (MSH-12).
pub const VERSION: &str = "2.5.1";
/// MSH-18: the character set of every message.
pub const CHARSET: &str = "UNICODE UTF-8";
/// The local coding system of the observations that have no standard code.
const LOCAL: &str = "99CXR";
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the ACK (shorter than the outbox's claim).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest ACK read.
const MAX_ACK: usize = 64 * 1024;

/// `OBR-5` for an urgent result, by default (`--hl7-urgent-priority`): stat.
pub const DEFAULT_URGENT_PRIORITY: &str = "S";

/// The message control ID (MSH-10, ST of at most 20 characters) of a result: a
/// hash prefix of its id.
pub fn control_id(result_id: &str) -> String {
    format!(
        "CXR{}",
        &crate::digest::sha256_hex(result_id.as_bytes())[..17]
    )
}

/// Escapes a text value (HL7 v2 2.7: `\` `|` `^` `&` `~`; line breaks as `\.br\`).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\\.br\\");
            }
            '\n' => out.push_str("\\.br\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A DICOM PN's alphabetic group (`Family^Given^Middle^Prefix^Suffix`) as an HL7
/// XPN (`Family^Given^Middle^Suffix^Prefix`), each component escaped.
pub fn xpn(pn: &str) -> String {
    let c: Vec<&str> = pn.split('^').map(str::trim).collect();
    let at = |i: usize| c.get(i).map_or_else(String::new, |s| escape(s));
    let parts = [at(0), at(1), at(2), at(4), at(3)];
    let n = parts
        .iter()
        .rposition(|p| !p.is_empty())
        .map_or(0, |i| i + 1);
    parts[..n].join("^")
}

/// `YYYYMMDDHHMMSS` of an RFC 3339 UTC time (`2026-12-08T00:10:00.123Z`), with
/// `+0000`.
fn dtm(rfc3339: &str) -> String {
    let digits: String = rfc3339
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    format!("{digits}+0000")
}

/// One ORU^R01 for `facts`, segments ended by CR. `urgent_priority` is OBR-5 of an
/// urgent result.
pub fn oru(facts: &ReportFacts, urgent_priority: &str) -> String {
    let e = |v: &Option<String>| v.as_deref().map(escape).unwrap_or_default();
    let now = dtm(&facts.observed_at);
    let mut segs: Vec<String> = Vec::new();
    segs.push(format!(
        "MSH|^~\\&|CXR|CXR|||{now}||ORU^R01^ORU_R01|{}|P|{VERSION}||||||{CHARSET}",
        control_id(&facts.result_id)
    ));
    let p = &facts.patient;
    let pid3 = match (&p.id, &p.issuer) {
        (Some(id), Some(issuer)) => format!("{}^^^{}", escape(id), escape(issuer)),
        (Some(id), None) => escape(id),
        // Required fields: HL7's explicit null when the source has no value.
        (None, _) => "\"\"".to_string(),
    };
    let sex = match p.sex.as_deref() {
        Some(s @ ("M" | "F" | "O")) => s,
        Some(_) => "U",
        None => "",
    };
    segs.push(format!(
        "PID|1||{pid3}||{}||{}|{sex}",
        p.name
            .as_deref()
            .map(xpn)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "\"\"".to_string()),
        e(&p.birth_date)
    ));
    let o = &facts.order;
    let (placer, filler) = (e(&o.placer_order_number), e(&o.filler_order_number));
    segs.push(format!("ORC|RE|{placer}|{filler}||CM"));
    let priority = if facts.urgent { urgent_priority } else { "" };
    let service = format!("cxr-pneumonia^Chest radiograph AI analysis (pneumonia)^{LOCAL}");
    // OBR-18 (placer field 1): the accession number, as IHE radiology carries it.
    segs.push(format!(
        "OBR|1|{placer}|{filler}|{service}|{priority}||{now}|||||||||||{}|||||||P",
        e(&o.accession_number)
    ));
    segs.push(format!("NTE|1|L|{}", escape(INTENDED_USE)));
    let mut obx: Vec<(&str, String, String, &str)> = Vec::new();
    let code = |id: &str, text: &str| format!("{id}^{}^{LOCAL}", escape(text));
    match &facts.outcome {
        Outcome::Classified {
            pneumonia,
            probability,
            threshold,
            threshold_source,
            verdict,
            ood_score,
            warnings,
        } => {
            let (snomed, name) = SNOMED_PNEUMONIA;
            let value = if *pneumonia {
                "52101004^Present^SCT"
            } else {
                "2667000^Absent^SCT"
            };
            obx.push((
                "CWE",
                format!("{snomed}^{name}^SCT"),
                value.into(),
                if *pneumonia { "A" } else { "N" },
            ));
            obx.push((
                "NM",
                code("cxr-probability", "P(PNEUMONIA)"),
                format!("{probability:.6}"),
                "",
            ));
            obx.push((
                "NM",
                code("cxr-threshold", "Decision threshold"),
                format!("{threshold:.6}"),
                "",
            ));
            obx.push((
                "ST",
                code("cxr-threshold-source", "Threshold source"),
                escape(threshold_source.as_str()),
                "",
            ));
            let verdict = match verdict {
                Verdict::InDistribution => "in distribution",
                Verdict::Shift => "distribution shift",
                Verdict::Outside => "out of distribution (answered: --ood-action warn)",
                Verdict::NotScored => "not scored",
            };
            let verdict = match ood_score {
                Some(s) => format!("{verdict} (score {s:.3})"),
                None => verdict.to_string(),
            };
            obx.push((
                "ST",
                code("cxr-ood", "Out-of-distribution verdict"),
                verdict,
                "",
            ));
            for w in warnings {
                obx.push(("TX", code("cxr-warning", "Warning"), escape(w), ""));
            }
        }
        Outcome::NotAnalysed { error_type, reason } => {
            obx.push((
                "TX",
                code("cxr-not-analysed", "Not analysed"),
                escape(&format!("{error_type}: {reason}")),
                "",
            ));
        }
    }
    let m = &facts.model;
    obx.push((
        "ST",
        code("cxr-model", "Model"),
        escape(&format!("{} {}", m.name, m.version)),
        "",
    ));
    obx.push((
        "ST",
        code("cxr-model-sha256", "Model SHA-256"),
        escape(&m.sha256),
        "",
    ));
    if let Some(uid) = &facts.study.study_instance_uid {
        obx.push((
            "ST",
            "110180^Study Instance UID^DCM".into(),
            escape(uid),
            "",
        ));
    }
    for (n, (ty, id, value, flag)) in obx.iter().enumerate() {
        segs.push(format!(
            "OBX|{}|{ty}|{id}||{value}|||{flag}|||P|||{now}",
            n + 1
        ));
    }
    let mut out = segs.join("\r");
    out.push('\r');
    out
}

/// An MLLP destination.
#[derive(Debug, Clone)]
pub struct Hl7Channel {
    /// `host:port`.
    pub address: String,
    /// OBR-5 of an urgent result.
    pub urgent_priority: String,
}

impl Hl7Channel {
    /// Parses `host:port` (`--hl7-destination`).
    pub fn parse(s: &str, urgent_priority: &str) -> Result<Self, String> {
        let bad = || format!("--hl7-destination `{s}` must be host:port");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(Self {
            address: s.to_string(),
            urgent_priority: urgent_priority.to_string(),
        })
    }
}

impl Channel for Hl7Channel {
    fn name(&self) -> String {
        format!("hl7:{}", self.address)
    }

    fn kind(&self) -> Kind {
        Kind::Hl7
    }

    fn render(&self, facts: &ReportFacts) -> Option<Rendered> {
        Some(Rendered {
            kind: "oru",
            uid: control_id(&facts.result_id),
            payload: oru(facts, &self.urgent_priority).into_bytes(),
        })
    }

    fn send(self: Arc<Self>, round: Arc<Round>, items: Vec<Item>) -> Sending {
        Box::pin(async move {
            let name = self.name();
            for item in items {
                let r = round.clone();
                let _ = blocking(move || r.renew()).await;
                let result = send_one(&self.address, &item).await;
                let (r, name) = (round.clone(), name.clone());
                let _ = blocking(move || r.settle(&name, &item, result)).await;
            }
        })
    }
}

/// What an ACK said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// MSA-1.
    pub code: String,
    /// MSA-2.
    pub control_id: String,
    /// MSA-3 and each ERR's message (ERR-8, ERR-7) or code (ERR-3), joined.
    pub text: String,
}

/// Parses an ACK's MSA (and ERR) segments.
pub fn parse_ack(msg: &str) -> Option<Ack> {
    let segs: Vec<&str> = msg.split(['\r', '\n']).filter(|s| !s.is_empty()).collect();
    let msh = segs.iter().find(|s| s.starts_with("MSH"))?;
    let sep = msh.chars().nth(3)?;
    let comp = msh.chars().nth(4).unwrap_or('^');
    let msa: Vec<&str> = segs
        .iter()
        .find(|s| s.starts_with("MSA"))?
        .split(sep)
        .collect();
    let mut text: Vec<String> = Vec::new();
    if let Some(t) = msa.get(3).filter(|t| !t.is_empty()) {
        text.push((*t).to_string());
    }
    for err in segs.iter().filter(|s| s.starts_with("ERR")) {
        let f: Vec<&str> = err.split(sep).collect();
        // ERR-8 (user message), ERR-7 (diagnostic information), ERR-3 (the
        // code), ERR-1 (v2.4's location and code).
        let t = [8, 7, 3, 1]
            .iter()
            .find_map(|i| f.get(*i).filter(|t| !t.is_empty()));
        if let Some(t) = t {
            text.push(t.replace(comp, " "));
        }
    }
    Some(Ack {
        code: msa.get(1)?.to_string(),
        control_id: msa.get(2).copied().unwrap_or_default().to_string(),
        text: text.join("; "),
    })
}

/// Sends one message over MLLP and reads its ACK.
async fn send_one(address: &str, item: &Item) -> Result<(), SendError> {
    let failed = |what: String| SendError::failed(format!("HL7 to {address}: {what}"));
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| failed(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| failed(format!("connection: {e}")))?;
    let mut frame = Vec::with_capacity(item.payload.len() + 3);
    frame.push(0x0B);
    frame.extend_from_slice(&item.payload);
    frame.extend_from_slice(&[0x1C, 0x0D]);
    let exchange = async {
        stream.write_all(&frame).await?;
        stream.flush().await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the ACK",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(2).position(|w| w == [0x1C, 0x0D]) {
                buf.truncate(end);
                return Ok(buf);
            }
            if buf.len() > MAX_ACK {
                return Err(std::io::Error::other("an ACK over 64 KiB"));
            }
        }
    };
    let ack = tokio::time::timeout(ACK_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no ACK within {ACK_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let start = ack.iter().position(|b| *b == 0x0B).map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&ack[start..]);
    let ack = parse_ack(&text).ok_or_else(|| failed("an ACK without MSA".into()))?;
    if ack.control_id != item.sop_instance_uid {
        return Err(failed(format!(
            "the ACK acknowledges `{}`, not `{}`",
            ack.control_id, item.sop_instance_uid
        )));
    }
    match ack.code.as_str() {
        "AA" | "CA" => Ok(()),
        code @ ("AE" | "AR" | "CE" | "CR") => Err(SendError::refused(format!(
            "HL7 to {address}: MSA-1 {code}{}",
            if ack.text.is_empty() {
                String::new()
            } else {
                format!(": {}", ack.text)
            }
        ))),
        other => Err(failed(format!("MSA-1 `{other}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_names_reordered() {
        assert_eq!(escape(r"a|b^c&d~e\f"), r"a\F\b\S\c\T\d\R\e\E\f");
        assert_eq!(escape("one\r\ntwo"), r"one\.br\two");
        assert_eq!(xpn("Doe^Jane^Q^Dr^Jr"), "Doe^Jane^Q^Jr^Dr");
        assert_eq!(xpn("Doe^Jane"), "Doe^Jane");
        assert_eq!(xpn("O&Brien^Mary|Ann"), r"O\T\Brien^Mary\F\Ann");
        assert_eq!(xpn("Doe^^^Mr"), "Doe^^^^Mr");
    }

    #[test]
    fn acks_are_read_with_their_reasons() {
        let ack = "MSH|^~\\&|R|R|CXR|CXR|20261208||ACK^R01|9|P|2.5.1\rMSA|AR|CXR1|unknown patient\rERR||||E|||bad PID^x\r";
        assert_eq!(
            parse_ack(ack),
            Some(Ack {
                code: "AR".into(),
                control_id: "CXR1".into(),
                text: "unknown patient; bad PID x".into()
            })
        );
        assert_eq!(parse_ack("MSH|^~\\&|x\r"), None);
    }

    #[test]
    fn the_control_id_is_the_results_and_fits_msh_10() {
        let a = control_id("sha/digest/1.2.3/abc");
        assert_eq!(a, control_id("sha/digest/1.2.3/abc"));
        assert_ne!(a, control_id("sha/digest/1.2.3/abd"));
        assert_eq!(a.len(), 20);
    }
}

#[cfg(test)]
pub(crate) mod message_tests {
    use super::*;
    use crate::delivery::ModelFacts;
    use crate::delivery::Order;
    use crate::delivery::Patient;
    use crate::delivery::Study;

    pub(crate) fn facts(outcome: Outcome, urgent: bool) -> ReportFacts {
        ReportFacts {
            result_id: "sha/digest/1.2.3/px".into(),
            observed_at: "2026-12-08T00:10:05.123Z".into(),
            patient: Patient {
                id: Some("CXR-0001".into()),
                issuer: Some("HOSP".into()),
                name: Some("Müller&Co^Zoë^Q^Dr^Jr".into()),
                birth_date: Some("20200101".into()),
                sex: Some("F".into()),
            },
            order: Order {
                accession_number: Some("ACC|123".into()),
                placer_order_number: Some("PL1".into()),
                filler_order_number: None,
            },
            study: Study {
                study_instance_uid: Some("1.2.3.4".into()),
                ..Study::default()
            },
            model: ModelFacts {
                name: "weighted".into(),
                version: "2.0.0".into(),
                sha256: "ab".repeat(32),
            },
            outcome,
            urgent,
        }
    }

    #[test]
    fn an_oru_carries_the_facts_escaped() {
        let f = facts(
            Outcome::Classified {
                pneumonia: true,
                probability: 0.91,
                threshold: 0.5,
                threshold_source: crate::delivery::ThresholdKind::Card,
                verdict: Verdict::Shift,
                ood_score: Some(3.2),
                warnings: vec!["distribution shift: a caution".into()],
            },
            true,
        );
        let m = oru(&f, "S");
        println!("{}", m.replace('\r', "\n"));
        let segs: Vec<&str> = m.split('\r').collect();
        assert!(
            segs[0].ends_with("|P|2.5.1||||||UNICODE UTF-8"),
            "{}",
            segs[0]
        );
        assert!(segs[1].contains("|CXR-0001^^^HOSP||Müller\\T\\Co^Zoë^Q^Jr^Dr||20200101|F"));
        assert!(segs[3].starts_with("OBR|1|PL1||cxr-pneumonia^"));
        assert!(segs[3].contains("|S||20261208001005+0000|"));
        assert!(segs[3].contains("|ACC\\F\\123|"));
        assert!(m.contains("OBX|1|CWE|233604007^Pneumonia^SCT||52101004^Present^SCT|||A|||P|||"));
        // Not urgent: no priority.
        let calm = oru(&facts(f.outcome.clone(), false), "S");
        assert!(
            calm.split('\r')
                .nth(3)
                .unwrap()
                .contains("^99CXR|||20261208")
        );
    }
}
