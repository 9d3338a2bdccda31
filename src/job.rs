//! The folder door, for orchestrators that run AI containers as jobs (mercure sets
//! `MERCURE_IN_DIR`/`MERCURE_OUT_DIR`, MONAI Deploy `MONAI_INPUTPATH` /
//! `MONAI_OUTPUTPATH`): every DICOM, JPEG and PNG file under IN goes through the
//! prediction core, and OUT receives, at the same relative path, `<file>.json` (the
//! answer, or the refusal) and, for DICOM, `<file>.sr.dcm` (TID 1500; for a refused
//! image, the SR that says why) and `<file>.sc.dcm` (the attention map as a Secondary
//! Capture). One line per file says what happened. The job fails (non-zero exit)
//! only on a failure of its own: IN unreadable, OUT unwritable, the models or the
//! audit trail unavailable; a refused image is an answer, not a failure.

use std::io::IsTerminal as _;
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use crate::access::Caller;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::Upload;

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

/// Every file under `dir`, sorted, with its path relative to `dir`.
pub(crate) fn files(dir: &Path) -> Result<Vec<PathBuf>, JobError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| JobError(format!("cannot read {}: {e}", d.display())))?;
        for e in entries {
            let e = e.map_err(|e| JobError(format!("cannot read {}: {e}", d.display())))?;
            let t = e.file_type().map_err(|e| JobError(format!("{}: {e}", e)))?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes a file must start with to be told apart ([`is_image_file`]): a DICOM
/// preamble and its `DICM`.
pub(crate) const SNIFF_BYTES: u64 = 132;

/// Whether a file whose first bytes (at least [`SNIFF_BYTES`] of them, or all) are
/// `head` is a DICOM, JPEG or PNG file.
pub(crate) fn is_image_file(head: &[u8]) -> bool {
    crate::imaging::dicom::is_dicom(head)
        || matches!(
            image::guess_format(head),
            Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png)
        )
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), JobError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| JobError(format!("cannot create {}: {e}", parent.display())))?;
    }
    std::fs::write(path, bytes)
        .map_err(|e| JobError(format!("cannot write {}: {e}", path.display())))
}

/// `out/rel` with `suffix` added to its file name.
fn beside(out: &Path, rel: &Path, suffix: &str) -> PathBuf {
    let mut name = rel.as_os_str().to_os_string();
    name.push(suffix);
    out.join(name)
}

/// Runs the job over `input`, writing under `output`, answered by `model` (none:
/// the default variant).
pub async fn run(
    core: &Core,
    input: &Path,
    output: &Path,
    model: Option<String>,
) -> Result<JobSummary, JobError> {
    let all = files(input)?;
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
    for path in &all {
        let rel = path.strip_prefix(input).unwrap_or(path).to_path_buf();
        if let Some(b) = &bar {
            b.set_message(rel.display().to_string());
        }
        let bytes = std::fs::read(path)
            .map_err(|e| JobError(format!("cannot read {}: {e}", path.display())))?;
        let dicom = crate::imaging::dicom::is_dicom(&bytes);
        if !is_image_file(&bytes) {
            summary.skipped += 1;
            say(format!(
                "skipped   {}: not a DICOM, JPEG or PNG file",
                rel.display()
            ));
            bar.iter().for_each(|b| b.inc(1));
            continue;
        }
        // What the image is: for DICOM its SOP Instance UID and pixels, else its bytes.
        let identity = if dicom {
            crate::imaging::dicom::identify(&bytes).ok()
        } else {
            None
        };
        let seed = match &identity {
            Some((src, pixels)) => format!(
                "{}/{pixels}",
                src.sop_instance_uid.as_deref().unwrap_or_default()
            ),
            None => crate::digest::sha256_hex(&bytes),
        };
        let asker = Asker {
            caller: Caller("job".into()),
            request_id: uuid::Uuid::new_v4().to_string(),
            client_request_id: Some(rel.display().to_string()),
            trace: None,
        };
        let ask = Ask {
            model: model.clone(),
            explain: true,
            ..Ask::default()
        };
        let valid = core
            .validate(asker, &ask, Instant::now())
            .map_err(|e| JobError(e.to_string()))?;
        let upload = if dicom {
            Upload::Dicom(bytes.into())
        } else {
            Upload::Encoded(bytes.into())
        };
        let source = identity.as_ref().map(|(s, _)| s);
        let filed = core
            .within_timeout(core.analyse_for_filing(&valid, upload, source, &seed))
            .await;
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
        write(&beside(output, &rel, ".json"), &json)?;
        for o in &filed.objects {
            write(&beside(output, &rel, &format!(".{}.dcm", o.kind)), &o.bytes)?;
        }
        bar.iter().for_each(|b| b.inc(1));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "done: {} analysed, {} refused, {} skipped, {} failed",
        summary.analysed, summary.refused, summary.skipped, summary.failed
    );
    Ok(summary)
}
