//! SQLite files that may hold patient data (the DICOM outbox's payloads, the
//! outcomes store's answers): opened owner-only (0600, the `-wal` and `-shm` too),
//! with `secure_delete` on so that a row deleted or a payload dropped is overwritten
//! in the file rather than left in a freed page, and in WAL mode with a way to empty
//! the log (whose old frames would otherwise keep what the file no longer holds).

use std::path::Path;
use std::path::PathBuf;

/// Opens (or creates) the SQLite file at `path`: created 0600 before SQLite opens
/// it (SQLite gives its `-wal` and `-shm` the main file's mode), an existing one
/// (and its `-wal`/`-shm`) narrowed to 0600; `secure_delete` on, WAL journal.
pub fn open_private(path: &Path) -> Result<rusqlite::Connection, String> {
    let shown = path.display();
    restrict(path, true).map_err(|e| format!("{shown}: {e}"))?;
    let conn = rusqlite::Connection::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        Ok(())
    };
    setup().map_err(|e| format!("{shown}: {e}"))?;
    for side in companions(path) {
        restrict(&side, false).map_err(|e| format!("{}: {e}", side.display()))?;
    }
    Ok(conn)
}

/// Copies the write-ahead log into the file and truncates it to nothing, so that
/// frames holding rows since deleted (or payloads since dropped) leave the disk.
/// A reader still using the log makes it a no-op until the next call.
pub fn empty_wal(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

fn companions(path: &Path) -> [PathBuf; 2] {
    let with = |suffix: &str| {
        let mut s = path.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    [with("-wal"), with("-shm")]
}

/// Makes `path` owner-only: created so when `create` and it is absent, narrowed
/// when it exists.
#[cfg(unix)]
fn restrict(path: &Path, create: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    if create {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
    } else if !path.exists() {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _create: bool) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn files_are_owner_only_even_when_they_existed_wider() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sqlite");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let c = open_private(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        for p in [path.clone()].iter().chain(companions(&path).iter()) {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        drop(c);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _c = open_private(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
