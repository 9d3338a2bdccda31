//! The folder door, for orchestrators that run AI containers as jobs (mercure sets
//! `MERCURE_IN_DIR`/`MERCURE_OUT_DIR`, MONAI Deploy `MONAI_INPUTPATH` /
//! `MONAI_OUTPUTPATH`): every DICOM, JPEG and PNG file under IN goes through the
//! prediction core, and OUT receives, at the same relative path, `<file>.json` (the
//! answer, or the refusal) and, for DICOM, `<file>.sr.dcm` (TID 1500; for a refused
//! image, the SR that says why) and `<file>.sc.dcm` (the attention map as a Secondary
//! Capture). One line per file says what happened, a file not read included (a
//! FIFO, socket or device, a link to a folder, a broken link; a link to a file is
//! read as the file). A file over `--max-body-bytes` is refused by its size before
//! it is read, as the HTTP door refuses such a body. Results are never written
//! through a link already in OUT (a new file is renamed over the name). The job fails (non-zero exit)
//! only on a failure of its own: IN unreadable, OUT unwritable, the models or the
//! audit trail unavailable; a refused image is an answer, not a failure.

use std::io::IsTerminal as _;
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use crate::access::Caller;
use crate::delivery::Delivery;
use crate::imaging::files::Entry;
use crate::imaging::files::walk;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::Upload;
use crate::predict::UploadKind;

/// How long the job waits, at its end, for the results it queued to be delivered.
const SEND_WAIT: Duration = Duration::from_secs(30);

crate::message_error!(
    /// A failure of the job's own.
    JobError
);

/// What a job did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// Images answered.
    pub analysed: usize,
    /// Images refused (a gate, the OOD score, undecodable).
    pub refused: usize,
    /// Files that are not images.
    pub skipped: usize,
    /// Images the job failed on (its own failure).
    pub failed: usize,
}

/// Reads a file of at most `max` bytes: refused by its size before anything is
/// read, and read through a bound (a file that grows meanwhile is cut at `max` + 1
/// and refused). `Ok(None)`: too large.
fn read_bounded(path: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max as u64 {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max as u64 + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() <= max).then_some(bytes))
}

/// Writes `bytes` at `out/rel`, never through a link: each folder between OUT and
/// the file must be a real folder (one that is a link is refused), and the file is
/// written to a new temporary file beside it, then renamed over the name (a link
/// already at that name is replaced, not followed).
fn write(out: &Path, rel: &Path, bytes: &[u8]) -> Result<(), JobError> {
    use std::io::Write as _;
    let path = out.join(rel);
    let mut dir = out.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(JobError(format!(
                        "cannot write {}: {} is a link (results are never written through links)",
                        path.display(),
                        dir.display()
                    )));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(JobError(format!(
                        "cannot write {}: {} is not a folder",
                        path.display(),
                        dir.display()
                    )));
                }
                Err(_) => std::fs::create_dir(&dir)
                    .or_else(|e| {
                        // Made meanwhile by someone else: fine if it is a folder.
                        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| JobError(format!("cannot create {}: {e}", dir.display())))?,
            }
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| JobError(format!("cannot write {}: no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let cannot = |e: std::io::Error| JobError(format!("cannot write {}: {e}", path.display()));
    // A new file only (O_CREAT|O_EXCL): never an existing one, and never through a
    // link, which O_EXCL refuses wherever it points.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    let written = opts
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(cannot(e));
    }
    Ok(())
}

/// `rel` with `suffix` added to its file name.
fn beside(rel: &Path, suffix: &str) -> PathBuf {
    let mut name = rel.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs the job over `input`, writing under `output`, answered by `model` (none:
/// the default variant); a file over `max_file_bytes` (`--max-body-bytes`) is
/// refused by its size.
pub async fn run(
    core: &Core,
    input: &Path,
    output: &Path,
    model: Option<String>,
    max_file_bytes: usize,
    delivery: Option<Arc<Delivery>>,
) -> Result<JobSummary, JobError> {
    let all = walk(input).map_err(|e| JobError(e.0))?;
    std::fs::create_dir_all(output)
        .map_err(|e| JobError(format!("cannot create {}: {e}", output.display())))?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(all.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    let mut summary = JobSummary::default();
    let max = max_file_bytes;
    for entry in &all {
        let path = match entry {
            Entry::File(p) => p,
            Entry::Skipped(p, why) => {
                summary.skipped += 1;
                let rel = p.strip_prefix(input).unwrap_or(p);
                say(format!("skipped   {}: {why}", rel.display()));
                bar.iter().for_each(|b| b.inc(1));
                continue;
            }
        };
        let rel = path.strip_prefix(input).unwrap_or(path).to_path_buf();
        if let Some(b) = &bar {
            b.set_message(rel.display().to_string());
        }
        let bytes = read_bounded(path, max)
            .map_err(|e| JobError(format!("cannot read {}: {e}", path.display())))?;
        let Some(bytes) = bytes else {
            // As the HTTP door refuses such a body (413): an answer, not a failure.
            let kind = crate::error_type::ErrorType::PayloadTooLarge;
            let e = format!("the file exceeds the limit of {max} bytes (--max-body-bytes)");
            summary.refused += 1;
            say(format!("refused   {}: {kind}: {e}", rel.display()));
            let json = serde_json::to_vec_pretty(&serde_json::json!({
                "error": e,
                "error_type": kind,
            }))
            .map_err(|e| JobError(e.to_string()))?;
            write(output, &beside(&rel, ".json"), &json)?;
            bar.iter().for_each(|b| b.inc(1));
            continue;
        };
        // Its kind sniffed once: what is not DICOM, JPEG or PNG is skipped.
        let upload = Upload::sniff(bytes.into());
        if upload.kind() == UploadKind::Unknown {
            summary.skipped += 1;
            say(format!(
                "skipped   {}: not a DICOM, JPEG or PNG file",
                rel.display()
            ));
            bar.iter().for_each(|b| b.inc(1));
            continue;
        }
        // What the image is (the core's identity: for DICOM its SOP Instance UID
        // and pixels, else its bytes); the decoder uses the same parse.
        let identity = core
            .identify(&upload, None)
            .await
            .map_err(|e| JobError(e.to_string()))?;
        let asker = Asker::new(Caller("job".into()), Some(rel.display().to_string()));
        let ask = Ask {
            model: model.clone(),
            explain: true,
            ..Ask::default()
        };
        let valid = core
            .validate(asker, &ask, Instant::now())
            .map_err(|e| JobError(e.to_string()))?;
        // One of the core's in-flight slots, as every door takes (the job runs
        // alone, one file at a time, so one is always free).
        let slot = core.slot().map_err(|e| JobError(e.to_string()))?;
        let key = core.filing_key(&valid, &identity);
        let filed = core
            .within_timeout(core.analyse_for_filing(&valid, upload, &key))
            .await;
        drop(slot);
        let filed = match filed {
            Ok(f) => f,
            Err(e) => {
                summary.failed += 1;
                say(format!("failed    {}: {e}", rel.display()));
                bar.iter().for_each(|b| b.inc(1));
                continue;
            }
        };
        let json = match &filed.outcome {
            Ok(p) => {
                summary.analysed += 1;
                say(format!(
                    "analysed  {}: {} (P(pneumonia) {:.3}, threshold {:.3})",
                    rel.display(),
                    p.label,
                    p.probabilities.PNEUMONIA,
                    p.threshold
                ));
                serde_json::to_vec_pretty(p)
            }
            Err(e) => {
                summary.refused += 1;
                say(format!(
                    "refused   {}: {}: {e}",
                    rel.display(),
                    e.error_type()
                ));
                serde_json::to_vec_pretty(&serde_json::json!({
                    "error": e.to_string(),
                    "error_type": e.error_type(),
                    "details": e.details(),
                }))
            }
        }
        .map_err(|e| JobError(e.to_string()))?;
        write(output, &beside(&rel, ".json"), &json)?;
        for o in &filed.objects {
            write(output, &beside(&rel, &format!(".{}.dcm", o.kind)), &o.bytes)?;
        }
        // A DICOM instance's result goes to the RIS too (--hl7-destination).
        if let (Some(d), Some(src)) = (&delivery, identity.source()) {
            let facts = crate::delivery::report_facts(
                &valid,
                filed.outcome.as_ref(),
                Some(src),
                &key,
                d.urgent_at(),
            );
            let d = d.clone();
            tokio::task::spawn_blocking(move || d.file(&key, &[], Some(&facts)))
                .await
                .map_err(|e| JobError(e.to_string()))?
                .map_err(|e| JobError(format!("results not queued: {e}")))?;
        }
        bar.iter().for_each(|b| b.inc(1));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(d) = &delivery {
        // What was queued is sent before the job ends, as far as the destinations
        // answer in time; the rest stays in the outbox for the next run.
        let waiting = d.settle_within(SEND_WAIT).await;
        if waiting > 0 {
            println!(
                "{waiting} result message(s) not yet delivered: kept in the outbox for the next run"
            );
        }
    }
    println!(
        "done: {} analysed, {} refused, {} skipped, {} failed",
        summary.analysed, summary.refused, summary.skipped, summary.failed
    );
    Ok(summary)
}
