//! The audit trail: one record per image the service decided about (answered or
//! refused), at INFO in the log (target `cxr::audit`) and, with `--audit-log PATH`,
//! as a JSON line appended to a file.
//!
//! A record says who asked (the caller's name), which model decided (name, version,
//! sha256, threshold), what it decided (`answered` with both probabilities and the
//! label, or `refused` with the error type) and what it was asked about (the SHA-256
//! of the uploaded bytes, their kind and size, and for DICOM the SOP Instance UID: an
//! identifier of the image, not of the patient). Its `request_id` is the server's
//! own; a caller's `x-request-id` is kept, bounded and sanitised, as
//! `client_request_id`. It never holds a patient attribute, image bytes or a key.
//!
//! The file is written by one dedicated thread, never on the async workers (a
//! stalled disk or NFS mount holds the requests waiting for their records, not the
//! runtime), fed by a bounded queue: a full queue fails the request at once. A
//! request's records go as one batch, written with one `write` and made durable
//! (`fdatasync`, once for all the batches written together) before the request is
//! answered: an answer without its record is never given (503), and a multi-image
//! request is all or nothing in the trail. A batch whose write fails is cut off the
//! file again, and a file found not to end with a newline (a crash mid-write) is cut
//! back to its last whole line before anything is appended: no line is ever torn.
//! When the file would grow past `--audit-log-max-bytes`, it is renamed `PATH.N` (N
//! = 1, 2, … in order; rotated files are never deleted: retention is the operator's)
//! and a new one started.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use serde::Serialize;

/// Batches waiting for the writer thread; one more fails its request at once.
pub const QUEUE_CAPACITY: usize = 256;

/// One audit record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    /// Server time, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The server's own id of the request (a UUID).
    pub request_id: String,
    /// The caller's `x-request-id`, bounded and sanitised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// Position of the image in its request (0 for a single image).
    pub image_index: usize,
    /// The caller's name from the keys file, or `anonymous`.
    pub caller: String,
    /// `answered` or `refused`.
    pub decision: Decision,
    /// Why the image was refused (the answer's `error_type`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// Model variant name.
    pub model: String,
    /// Model version.
    pub model_version: String,
    /// SHA-256 of the model file.
    pub model_sha256: String,
    /// Who signed the model's files, `name (key KEY_ID)` (none: loaded unsigned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_signer: Option<String>,
    /// The threshold the label was (or would have been) decided at.
    pub threshold: f64,
    /// Where the threshold came from (`card`, `site`, `query`, `operating_point`).
    pub threshold_source: String,
    /// The site card the threshold came from (`site`): site, date, report SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_card: Option<String>,
    /// P(NORMAL), when the model ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_normal: Option<f32>,
    /// P(PNEUMONIA), when the model ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_pneumonia: Option<f32>,
    /// The label answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The out-of-distribution score, when it was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_score: Option<f64>,
    /// SHA-256 of the uploaded bytes of this image.
    pub input_sha256: String,
    /// `jpeg`, `png`, `dicom` or `tensor`.
    pub input_kind: String,
    /// Size of the uploaded image, bytes.
    pub input_bytes: usize,
    /// DICOM SOP Instance UID (DICOM uploads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sop_instance_uid: Option<String>,
    /// A shadow record (`decision: shadow`): what the answer given was, beside what
    /// the candidate (this record's model) said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowMark>,
    /// The W3C trace id of the request (`traceparent`), when it was traced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// What a shadow record compares the candidate with: the answer that was given.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShadowMark {
    /// The version that answered.
    pub answered_version: String,
    /// The label answered.
    pub answered_label: String,
    /// P(PNEUMONIA) answered.
    pub answered_p_pneumonia: f32,
    /// Whether the candidate's label (this record's `label`) is the one answered.
    pub agreed: bool,
    /// |P(PNEUMONIA) of the candidate − P(PNEUMONIA) answered|.
    pub abs_delta_p: f64,
}

/// A record of what was done or refused that is not a decision about an image: a
/// change of the models, a confirmed label (feedback), a caller refused. One JSON
/// line in the same file as the image records, told apart by its `event` field.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    /// Server time, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// What happened.
    pub event: EventKind,
    /// The server's own id of the request.
    pub request_id: String,
    /// The caller's name from the keys file, `anonymous` without keys, or
    /// `unknown` for a key that is missing or not in the file.
    pub caller: String,
    /// The door: `http` or `grpc`.
    pub door: &'static str,
    /// The route (its template, never the raw path) or the RPC.
    pub route: String,
    /// `ok`, or the refusal's `error_type`.
    pub outcome: String,
    /// What the call was about: `NAME` or `NAME@VERSION` for a repository call,
    /// the answer's request id (or SOP Instance UID) for feedback, the scope asked
    /// for by a refused caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Facts of the outcome: what a repository call changed, the label confirmed,
    /// why a caller was refused (`missing`, `invalid`, `forbidden`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// Refusals of callers not written since the last one that was (at most
    /// [`REFUSALS_PER_SECOND`] are written a second, so a flood of them cannot fill
    /// the disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl AuditEvent {
    /// The event of a caller refused at `door` (`http`, `grpc`) on `route` (its
    /// template, or the RPC), for `scope`.
    pub fn auth_refused(
        door: &'static str,
        route: String,
        request_id: String,
        scope: crate::access::Scope,
        e: &crate::access::AuthError,
    ) -> Self {
        use crate::access::AuthError;
        let caller = match e {
            AuthError::Missing => "anonymous".to_string(),
            AuthError::Invalid => "unknown".to_string(),
            AuthError::Forbidden { caller, .. } => caller.clone(),
        };
        Self {
            time: now_rfc3339(),
            event: EventKind::AuthRefused,
            request_id,
            caller,
            door,
            route,
            outcome: match e {
                AuthError::Forbidden { .. } => "forbidden",
                _ => "unauthorized",
            }
            .into(),
            target: Some(scope.as_str().into()),
            detail: Some(serde_json::json!({ "reason": e.reason() })),
            suppressed: None,
        }
    }
}

/// What an [`AuditEvent`] records.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A repository `load` (or swap, or shadow) call.
    RepositoryLoad,
    /// A repository `unload` call.
    RepositoryUnload,
    /// A `SIGHUP` rescan of the models folder.
    RepositoryRescan,
    /// A label confirmed for an answered image (`POST /feedback`).
    Feedback,
    /// A caller refused: no key, an unknown key, or a key without the scope.
    AuthRefused,
}

/// Most caller refusals written to the audit trail in one second; the rest are
/// counted and the count written with the next one.
pub const REFUSALS_PER_SECOND: u64 = 20;

/// What was decided about an image.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Classified and answered.
    Answered,
    /// Refused (not a radiograph, out of distribution, a gate).
    Refused,
    /// Not an answer: a candidate version run in the shadow of the answer given
    /// (the record's `shadow` says what was answered).
    Shadow,
}

/// Why records could not be written: the request must not be answered as decided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The writer's queue is full (the disk is slower than the requests).
    #[error("the audit writer's queue is full")]
    Busy,
    /// The writer thread is gone.
    #[error("the audit writer stopped")]
    Stopped,
    /// The file could not be written.
    #[error("audit log {path}: {error}")]
    Write {
        /// The audit file.
        path: String,
        /// What the OS said.
        error: String,
    },
}

/// Where records go: always the log; with a path, also the file (through its
/// writer thread).
#[derive(Debug, Default)]
pub struct Audit {
    writer: Option<Writer>,
    refusals: std::sync::Mutex<RefusalWindow>,
}

/// The caller refusals of the current second, and those not written.
#[derive(Debug, Default)]
struct RefusalWindow {
    second: u64,
    written: u64,
    suppressed: u64,
}

#[derive(Debug)]
struct Writer {
    path: PathBuf,
    tx: SyncSender<Batch>,
}

/// One request's records, as JSON lines, and where to say how it went.
struct Batch {
    lines: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<(), AuditError>>,
}

/// What the writer thread writes to: a file, or (in tests) one that fails.
pub trait Sink: Write + Send {
    /// Its length, bytes.
    fn size(&mut self) -> std::io::Result<u64>;
    /// Cuts it to `len` bytes.
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    /// Makes what was written durable.
    fn sync(&mut self) -> std::io::Result<()>;
    /// The last `n` bytes before `end` (for finding the last newline).
    fn read_at(&mut self, end: u64, n: usize) -> std::io::Result<Vec<u8>>;
}

impl Sink for File {
    fn size(&mut self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
    fn read_at(&mut self, end: u64, n: usize) -> std::io::Result<Vec<u8>> {
        let start = end.saturating_sub(n as u64);
        let mut buf = vec![0u8; (end - start) as usize];
        self.seek(SeekFrom::Start(start))?;
        self.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// Opens the audit file (its sink), for appending.
pub type Opener = Box<dyn FnMut(&Path) -> std::io::Result<Box<dyn Sink>> + Send>;

fn open_file(path: &Path) -> std::io::Result<Box<dyn Sink>> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    Ok(Box::new(f))
}

struct AuditFile {
    path: PathBuf,
    max_bytes: u64,
    opener: Opener,
    /// Open sink and its size; `None` after a failure (re-opened on the next batch).
    open: Option<(Box<dyn Sink>, u64)>,
    /// Index the next rotated file gets.
    next_index: u64,
}

impl Audit {
    /// Records to the log only.
    pub fn log_only() -> Self {
        Self::default()
    }

    /// Records to the log and appended to `path` (created if absent), rotated past
    /// `max_bytes` (0: never). The file is opened now, so a path that cannot be
    /// written is reported at start; the service still starts, and each request
    /// fails with 503 until the file can be written.
    pub fn with_file(path: &Path, max_bytes: u64) -> (Self, Option<String>) {
        Self::with_sink(path, max_bytes, Box::new(open_file))
    }

    /// [`Audit::with_file`] through `opener` (tests: a sink that fails).
    pub fn with_sink(path: &Path, max_bytes: u64, opener: Opener) -> (Self, Option<String>) {
        let mut f = AuditFile {
            path: path.to_path_buf(),
            max_bytes,
            opener,
            open: None,
            next_index: next_rotation_index(path),
        };
        let problem = f.ensure_open().err().map(|e| e.to_string());
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let spawned = std::thread::Builder::new()
            .name("cxr-audit".into())
            .spawn(move || f.run(rx));
        let problem = match spawned {
            Ok(_) => problem,
            Err(e) => Some(format!("cannot start the audit writer: {e}")),
        };
        (
            Self {
                writer: Some(Writer {
                    path: path.to_path_buf(),
                    tx,
                }),
                refusals: std::sync::Mutex::default(),
            },
            problem,
        )
    }

    /// The file records are appended to, if any.
    pub fn path(&self) -> Option<PathBuf> {
        self.writer.as_ref().map(|w| w.path.clone())
    }

    /// Writes one request's records, all or none: the file lines (durable before
    /// this returns), then the log lines. An error means none is in the file and the
    /// request must not be answered as decided.
    pub async fn record_all(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        if let Some(w) = &self.writer {
            let mut lines = Vec::new();
            for r in records {
                serde_json::to_writer(&mut lines, r).map_err(|e| AuditError::Write {
                    path: w.path.display().to_string(),
                    error: e.to_string(),
                })?;
                lines.push(b'\n');
            }
            let (done, result) = tokio::sync::oneshot::channel();
            match w.tx.try_send(Batch { lines, done }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(AuditError::Busy),
                Err(TrySendError::Disconnected(_)) => return Err(AuditError::Stopped),
            }
            result.await.map_err(|_| AuditError::Stopped)??;
        }
        for r in records {
            log(r);
        }
        Ok(())
    }
}

impl Audit {
    /// Writes one event (a change of the models, a confirmation): durable in the
    /// file before this returns, then logged. An error means it is not in the file.
    pub async fn record_event(&self, event: &AuditEvent) -> Result<(), AuditError> {
        if let Some(w) = &self.writer {
            let mut line = serde_json::to_vec(event).map_err(|e| AuditError::Write {
                path: w.path.display().to_string(),
                error: e.to_string(),
            })?;
            line.push(b'\n');
            let (done, result) = tokio::sync::oneshot::channel();
            match w.tx.try_send(Batch { lines: line, done }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(AuditError::Busy),
                Err(TrySendError::Disconnected(_)) => return Err(AuditError::Stopped),
            }
            result.await.map_err(|_| AuditError::Stopped)??;
        }
        log_event(event);
        Ok(())
    }

    /// Notes a refused caller without waiting (the refusal is answered at once,
    /// whatever the disk does): at most [`REFUSALS_PER_SECOND`] a second are
    /// written, the rest counted into the next one's `suppressed`. Returns whether
    /// it was written (queued).
    pub fn note_refusal(&self, mut event: AuditEvent) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        {
            let mut w = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if w.second != now {
                w.second = now;
                w.written = 0;
            }
            if w.written >= REFUSALS_PER_SECOND {
                w.suppressed += 1;
                return false;
            }
            w.written += 1;
            if w.suppressed > 0 {
                event.suppressed = Some(std::mem::take(&mut w.suppressed));
            }
        }
        log_event(&event);
        let Some(w) = &self.writer else {
            return true;
        };
        let Ok(mut line) = serde_json::to_vec(&event) else {
            return false;
        };
        line.push(b'\n');
        // Nobody waits for it: the answer is already a refusal.
        let (done, _) = tokio::sync::oneshot::channel();
        w.tx.try_send(Batch { lines: line, done }).is_ok()
    }
}

/// An event's log line.
fn log_event(e: &AuditEvent) {
    tracing::info!(
        target: "cxr::audit",
        time = %e.time,
        event = ?e.event,
        request_id = %e.request_id,
        caller = %e.caller,
        door = e.door,
        route = %e.route,
        outcome = %e.outcome,
        target_of = e.target.as_deref().unwrap_or(""),
        detail = %e.detail.as_ref().map(ToString::to_string).unwrap_or_default(),
        suppressed = e.suppressed.unwrap_or(0),
        "audit event"
    );
}

/// The record's log line.
fn log(r: &AuditRecord) {
    tracing::info!(
        target: "cxr::audit",
        time = %r.time,
        request_id = %r.request_id,
        client_request_id = r.client_request_id.as_deref().unwrap_or(""),
        image_index = r.image_index,
        caller = %r.caller,
        decision = ?r.decision,
        error_type = r.error_type.as_deref().unwrap_or(""),
        model = %r.model,
        model_version = %r.model_version,
        model_sha256 = %r.model_sha256,
        model_signer = r.model_signer.as_deref().unwrap_or(""),
        threshold = r.threshold,
        threshold_source = %r.threshold_source,
        p_normal = r.p_normal.map_or(f64::NAN, f64::from),
        p_pneumonia = r.p_pneumonia.map_or(f64::NAN, f64::from),
        label = r.label.as_deref().unwrap_or(""),
        input_sha256 = %r.input_sha256,
        input_kind = %r.input_kind,
        input_bytes = r.input_bytes,
        sop_instance_uid = r.sop_instance_uid.as_deref().unwrap_or(""),
        trace_id = r.trace_id.as_deref().unwrap_or(""),
        shadow = %r
            .shadow
            .as_ref()
            .and_then(|s| serde_json::to_string(s).ok())
            .unwrap_or_default(),
        "audit"
    );
}

/// Most batches written before one `fdatasync`.
const GROUP: usize = 64;

impl AuditFile {
    /// The writer thread: takes the batches waiting (up to [`GROUP`]), writes each,
    /// makes them durable at once, then answers each.
    fn run(mut self, rx: Receiver<Batch>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < GROUP {
                match rx.try_recv() {
                    Ok(b) => group.push(b),
                    Err(_) => break,
                }
            }
            let mut results: Vec<Result<(), AuditError>> = group
                .iter()
                .map(|b| self.append(&b.lines).map_err(|e| self.error(&e)))
                .collect();
            if results.iter().any(Result::is_ok)
                && let Err(e) = self.sync()
            {
                let err = self.error(&e);
                for r in &mut results {
                    if r.is_ok() {
                        *r = Err(err.clone());
                    }
                }
            }
            for (b, r) in group.into_iter().zip(results) {
                let _ = b.done.send(r);
            }
        }
    }

    fn error(&self, e: &std::io::Error) -> AuditError {
        // Logged once, by the request that fails (with its request id).
        AuditError::Write {
            path: self.path.display().to_string(),
            error: e.to_string(),
        }
    }

    fn ensure_open(&mut self) -> std::io::Result<()> {
        if self.open.is_none() {
            let mut sink = (self.opener)(&self.path)?;
            let size = sink.size()?;
            let size = cut_to_last_line(&mut *sink, size)?;
            self.open = Some((sink, size));
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self.open.as_mut() {
            Some((sink, _)) => sink.sync().inspect_err(|_| self.open = None),
            None => Err(std::io::Error::other("audit file not open")),
        }
    }

    /// Appends one batch with one write; a failed write is cut off again.
    fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        self.ensure_open()?;
        let size = self.open.as_ref().map_or(0, |(_, s)| *s);
        if self.max_bytes > 0 && size > 0 && size + lines.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let Some((sink, size)) = self.open.as_mut() else {
            return Err(std::io::Error::other("audit file not open"));
        };
        match sink.write_all(lines).and_then(|()| sink.flush()) {
            Ok(()) => {
                *size += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the batch may be in the file: cut it off. If even that
                // fails, the next open cuts the file back to its last whole line.
                let before = *size;
                if sink.truncate(before).is_err() {
                    tracing::error!(path = %self.path.display(), "cannot cut a failed audit write off the file; it is cut back to its last whole line when re-opened");
                }
                // Re-open on the next batch (the disk may have been freed meanwhile).
                self.open = None;
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.open = None;
        let to = rotated_path(&self.path, self.next_index);
        std::fs::rename(&self.path, &to)?;
        self.next_index += 1;
        tracing::info!(target: "cxr::audit", rotated_to = %to.display(), "audit log rotated");
        self.ensure_open()
    }
}

/// Cuts a file that does not end with a newline back to its last whole line (a
/// write cut short by a crash or a full disk); returns its size.
fn cut_to_last_line(sink: &mut dyn Sink, size: u64) -> std::io::Result<u64> {
    if size == 0 || sink.read_at(size, 1)? == b"\n" {
        return Ok(size);
    }
    let mut end = size;
    while end > 0 {
        let chunk = sink.read_at(end, 64 << 10)?;
        let start = end - chunk.len() as u64;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            sink.truncate(keep)?;
            tracing::warn!(target: "cxr::audit", cut_bytes = size - keep, "the audit file ended in a partial line; cut back to its last whole record");
            return Ok(keep);
        }
        end = start;
    }
    sink.truncate(0)?;
    Ok(0)
}

fn rotated_path(path: &Path, n: u64) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// One past the highest `PATH.N` already there (so a restart never overwrites).
fn next_rotation_index(path: &Path) -> u64 {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return 1;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix(&prefix)?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .map_or(1, |m| m + 1)
        })
        .unwrap_or(1)
}

pub use crate::clock::{now_rfc3339, rfc3339};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        // Independent references: `date -u -d @SECS +%FT%TZ`.
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_712_000, 999), "2026-11-26T16:53:20.999Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
    }

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            time: now_rfc3339(),
            request_id: format!("r{i}"),
            client_request_id: None,
            image_index: 0,
            caller: "anonymous".into(),
            decision: Decision::Answered,
            error_type: None,
            model: "m".into(),
            model_version: "1".into(),
            model_sha256: "00".into(),
            model_signer: None,
            threshold: 0.5,
            threshold_source: "card".into(),
            site_card: None,
            p_normal: Some(0.25),
            p_pneumonia: Some(0.75),
            label: Some("PNEUMONIA".into()),
            ood_score: None,
            input_sha256: "ab".into(),
            input_kind: "png".into(),
            input_bytes: 10,
            sop_instance_uid: None,
            shadow: None,
            trace_id: None,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A file that accepts `budget` more bytes, then fails a write after taking
    /// part of it (a disk that fills mid-write).
    struct FailsHalfway {
        file: File,
        budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Write for FailsHalfway {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            use std::sync::atomic::Ordering;
            let left = self.budget.load(Ordering::SeqCst);
            if left == 0 {
                return Err(std::io::Error::other("disk full"));
            }
            let n = buf.len().min(left);
            let n = self.file.write(&buf[..n])?;
            self.budget.fetch_sub(n, Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl Sink for FailsHalfway {
        fn size(&mut self) -> std::io::Result<u64> {
            Sink::size(&mut self.file)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            Sink::truncate(&mut self.file, len)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Sink::sync(&mut self.file)
        }
        fn read_at(&mut self, end: u64, n: usize) -> std::io::Result<Vec<u8>> {
            self.file.read_at(end, n)
        }
    }

    #[test]
    fn a_write_that_fails_halfway_leaves_only_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = serde_json::to_vec(&record(0)).unwrap().len() + 1;
        // Room for two records and half of the third.
        let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(2 * line + line / 2));
        let b = budget.clone();
        let opener: Opener = Box::new(move |p: &Path| {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(p)?;
            Ok(Box::new(FailsHalfway {
                file,
                budget: b.clone(),
            }) as Box<dyn Sink>)
        });
        let (audit, problem) = Audit::with_sink(&path, 0, opener);
        assert!(problem.is_none());
        block_on(async {
            audit.record_all(&[record(0)]).await.unwrap();
            audit.record_all(&[record(1)]).await.unwrap();
            // A two-record batch: half a line fits, then the disk is full.
            assert!(audit.record_all(&[record(2), record(3)]).await.is_err());
            assert!(audit.record_all(&[record(4)]).await.is_err());
            // Space again: records continue on a whole line.
            budget.store(usize::MAX / 2, std::sync::atomic::Ordering::SeqCst);
            audit.record_all(&[record(5)]).await.unwrap();
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                v["request_id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(ids, ["r0", "r1", "r5"]);
    }

    #[test]
    fn a_torn_last_line_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let whole = serde_json::to_string(&record(0)).unwrap();
        std::fs::write(&path, format!("{whole}\n{}", &whole[..whole.len() / 2])).unwrap();
        let (audit, _) = Audit::with_file(&path, 0);
        block_on(audit.record_all(&[record(1)])).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids, ["r0", "r1"]);
    }

    #[test]
    fn rotation_keeps_every_record_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        let (audit, problem) = Audit::with_file(&path, 3 * line + 10);
        assert!(problem.is_none());
        for i in 0..10 {
            block_on(audit.record_all(&[record(i)])).unwrap();
        }
        drop(audit);
        // A restart continues the numbering instead of overwriting PATH.1.
        let (audit, _) = Audit::with_file(&path, 3 * line + 10);
        for i in 10..17 {
            block_on(audit.record_all(&[record(i)])).unwrap();
        }
        let mut ids = Vec::new();
        let mut files = 0;
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            files += 1;
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                ids.push(v["request_id"].as_str().unwrap().to_string());
            }
            assert!(text.len() as u64 <= 3 * line + 10);
        }
        ids.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
        let want: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
        assert_eq!(ids, want);
        assert!(files >= 6, "{files} files");
    }

    #[test]
    fn a_failed_write_is_an_error() {
        // /dev/full accepts the open and fails every write (ENOSPC), even for root.
        let (audit, problem) = Audit::with_file(Path::new("/dev/full"), 0);
        assert!(problem.is_none());
        assert!(block_on(audit.record_all(&[record(0)])).is_err());
        // A directory cannot be opened for appending: reported at start, and each
        // record fails.
        let dir = tempfile::tempdir().unwrap();
        let (audit, problem) = Audit::with_file(dir.path(), 0);
        assert!(problem.is_some());
        assert!(block_on(audit.record_all(&[record(0)])).is_err());
    }
}
