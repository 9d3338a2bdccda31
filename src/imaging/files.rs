//! The image files under a folder, for the doors and tools that read folders (the
//! folder job, site validation): every entry found, the files to read and what is
//! not read (and why), and whether a file's first bytes are a DICOM, JPEG or PNG.

use std::path::Path;
use std::path::PathBuf;

crate::message_error!(
    /// A folder that could not be read.
    FilesError
);

/// One entry found under a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file, or a symbolic link to one (followed: read as the file).
    File(PathBuf),
    /// Something not read, and why: a FIFO, socket or device (opening a FIFO
    /// would wait for a writer forever), a link to a folder (not followed: it could
    /// loop or leave IN), a broken link.
    Skipped(PathBuf, &'static str),
}

/// Every entry under `dir`, sorted by path: the files to read and what is not
/// read, with why (never dropped silently).
pub fn walk(dir: &Path) -> Result<Vec<Entry>, FilesError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| FilesError(format!("cannot read {}: {e}", d.display())))?;
        for e in entries {
            let e = e.map_err(|e| FilesError(format!("cannot read {}: {e}", d.display())))?;
            let path = e.path();
            // The entry itself (a link is not followed here).
            let t = e
                .file_type()
                .map_err(|err| FilesError(format!("{}: {err}", path.display())))?;
            if t.is_dir() {
                stack.push(path);
            } else if t.is_file() {
                out.push(Entry::File(path));
            } else if t.is_symlink() {
                out.push(match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => Entry::File(path),
                    Ok(m) if m.is_dir() => Entry::Skipped(
                        path,
                        "a link to a folder (links to folders are not followed)",
                    ),
                    Ok(_) => Entry::Skipped(path, "a link to a FIFO, socket or device"),
                    Err(_) => Entry::Skipped(path, "a broken link"),
                });
            } else {
                out.push(Entry::Skipped(path, "a FIFO, socket or device, not a file"));
            }
        }
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(out)
}

impl Entry {
    /// The entry's path.
    pub fn path(&self) -> &Path {
        match self {
            Entry::File(p) | Entry::Skipped(p, _) => p,
        }
    }
}

/// Every file under `dir` (and link to one), sorted, with its path relative to
/// `dir`; what is not a file is left out ([`walk`] says what and why).
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, FilesError> {
    Ok(walk(dir)?
        .into_iter()
        .filter_map(|e| match e {
            Entry::File(p) => Some(p),
            Entry::Skipped(..) => None,
        })
        .collect())
}

/// Bytes a file must start with to be told apart ([`is_image_file`]): a DICOM
/// preamble and its `DICM`.
pub const SNIFF_BYTES: u64 = 132;

/// Whether a file whose first bytes (at least [`SNIFF_BYTES`] of them, or all) are
/// `head` is a DICOM, JPEG or PNG file.
pub fn is_image_file(head: &[u8]) -> bool {
    super::dicom::is_dicom(head)
        || matches!(
            image::guess_format(head),
            Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png)
        )
}
