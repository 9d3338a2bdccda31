//! The audit trail: one record per classified image, at INFO in the log (target
//! `cxr::audit`) and, with `--audit-log PATH`, as a JSON line appended to a file.
//!
//! A record says who asked (the caller's name), which model answered (name, version,
//! sha256, threshold), what it answered (both probabilities, the label) and what it
//! was asked about (the SHA-256 of the uploaded bytes, their kind and size, and for
//! DICOM the SOP Instance UID: an identifier of the image, not of the patient). It
//! never holds a patient attribute, image bytes or a key.
//!
//! Each record is written with one `write` call on a file opened in append mode
//! (nothing buffered in the process). A record that cannot be written fails its
//! request (503): an answer without its record is never given. When the file would
//! grow past `--audit-log-max-bytes`, it is renamed `PATH.N` (N = 1, 2, … in order;
//! rotated files are never deleted: retention is the operator's) and a new one
//! started.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One audit record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    /// Server time, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The request's `x-request-id`.
    pub request_id: String,
    /// Position of the image in its request (0 for a single image).
    pub image_index: usize,
    /// The caller's name from the keys file, or `anonymous`.
    pub caller: String,
    /// Model variant name.
    pub model: String,
    /// Model version.
    pub model_version: String,
    /// SHA-256 of the model file.
    pub model_sha256: String,
    /// The threshold the label was decided at.
    pub threshold: f64,
    /// Where the threshold came from (`card`, `query`, `operating_point`).
    pub threshold_source: String,
    /// P(NORMAL).
    pub p_normal: f32,
    /// P(PNEUMONIA).
    pub p_pneumonia: f32,
    /// The label answered.
    pub label: String,
    /// SHA-256 of the uploaded bytes of this image.
    pub input_sha256: String,
    /// `jpeg`, `png` or `dicom`.
    pub input_kind: String,
    /// Size of the uploaded image, bytes.
    pub input_bytes: usize,
    /// DICOM SOP Instance UID (DICOM uploads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sop_instance_uid: Option<String>,
}

/// Where records go: always the log; with a path, also the file.
#[derive(Debug, Default)]
pub struct Audit {
    file: Option<Mutex<AuditFile>>,
}

#[derive(Debug)]
struct AuditFile {
    path: PathBuf,
    max_bytes: u64,
    /// Open handle and its size; `None` after a failure (re-opened on the next record).
    open: Option<(File, u64)>,
    /// Index the next rotated file gets.
    next_index: u64,
}

impl Audit {
    /// Records to the log only.
    pub fn log_only() -> Self {
        Self { file: None }
    }

    /// Records to the log and appended to `path` (created if absent), rotated past
    /// `max_bytes` (0: never). The file is opened now, so a path that cannot be
    /// written is reported at start; the service still starts, and each request
    /// fails with 503 until the file can be written.
    pub fn with_file(path: &Path, max_bytes: u64) -> (Self, Option<String>) {
        let mut f = AuditFile {
            path: path.to_path_buf(),
            max_bytes,
            open: None,
            next_index: next_rotation_index(path),
        };
        let problem = f.ensure_open().err().map(|e| e.to_string());
        (
            Self {
                file: Some(Mutex::new(f)),
            },
            problem,
        )
    }

    /// The file records are appended to, if any.
    pub fn path(&self) -> Option<PathBuf> {
        self.file.as_ref().map(|f| {
            f.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .path
                .clone()
        })
    }

    /// Writes one record: the log line, then the file line. An error means the record
    /// is not in the file and the request must not be answered as a success.
    pub fn record(&self, r: &AuditRecord) -> Result<(), String> {
        tracing::info!(
            target: "cxr::audit",
            time = %r.time,
            request_id = %r.request_id,
            image_index = r.image_index,
            caller = %r.caller,
            model = %r.model,
            model_version = %r.model_version,
            model_sha256 = %r.model_sha256,
            threshold = r.threshold,
            threshold_source = %r.threshold_source,
            p_normal = r.p_normal,
            p_pneumonia = r.p_pneumonia,
            label = %r.label,
            input_sha256 = %r.input_sha256,
            input_kind = %r.input_kind,
            input_bytes = r.input_bytes,
            sop_instance_uid = r.sop_instance_uid.as_deref().unwrap_or(""),
            "audit"
        );
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut f = file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.append(&line).map_err(|e| {
            tracing::error!(path = %f.path.display(), error = %e, "cannot write the audit record; the request fails");
            format!("audit log {}: {e}", f.path.display())
        })
    }
}

impl AuditFile {
    fn ensure_open(&mut self) -> std::io::Result<()> {
        if self.open.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let size = file.metadata()?.len();
            self.open = Some((file, size));
        }
        Ok(())
    }

    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.ensure_open()?;
        let size = self.open.as_ref().map_or(0, |(_, s)| *s);
        if self.max_bytes > 0 && size > 0 && size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let Some((file, size)) = self.open.as_mut() else {
            return Err(std::io::Error::other("audit file not open"));
        };
        match file.write_all(line) {
            Ok(()) => {
                *size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Re-open on the next record (the disk may have been freed meanwhile).
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

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-26T16:52:54.123Z`).
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, H. Hinnant).
pub fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

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
            image_index: 0,
            caller: "anonymous".into(),
            model: "m".into(),
            model_version: "1".into(),
            model_sha256: "00".into(),
            threshold: 0.5,
            threshold_source: "card".into(),
            p_normal: 0.25,
            p_pneumonia: 0.75,
            label: "PNEUMONIA".into(),
            input_sha256: "ab".into(),
            input_kind: "png".into(),
            input_bytes: 10,
            sop_instance_uid: None,
        }
    }

    #[test]
    fn rotation_keeps_every_record_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        let (audit, problem) = Audit::with_file(&path, 3 * line + 10);
        assert!(problem.is_none());
        for i in 0..10 {
            audit.record(&record(i)).unwrap();
        }
        drop(audit);
        // A restart continues the numbering instead of overwriting PATH.1.
        let (audit, _) = Audit::with_file(&path, 3 * line + 10);
        for i in 10..17 {
            audit.record(&record(i)).unwrap();
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
        assert!(audit.record(&record(0)).is_err());
        // A directory cannot be opened for appending: reported at start, and each
        // record fails.
        let dir = tempfile::tempdir().unwrap();
        let (audit, problem) = Audit::with_file(dir.path(), 0);
        assert!(problem.is_some());
        assert!(audit.record(&record(0)).is_err());
    }
}
