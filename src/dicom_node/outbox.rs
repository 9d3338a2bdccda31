//! The outbox: result objects waiting to reach their destinations, in SQLite, so
//! that they survive a restart and are sent once. A row is written (durably) before
//! the C-STORE that caused it is answered; the sender takes due rows, and marks each
//! sent (its payload dropped, its row kept as the record of what was sent) or due
//! again after a backoff. A result object already in the outbox for a destination
//! (the same SOP Instance UID: results' UIDs are derived from what they are of) is
//! not added again.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use rusqlite::Connection;
use rusqlite::OptionalExtension;
use rusqlite::params;

crate::message_error!(
    /// Why the outbox could not be read or written.
    OutboxError
);

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self(format!("outbox: {e}"))
    }
}

/// One result object to send.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its row.
    pub id: i64,
    /// Where it goes (a destination's name).
    pub destination: String,
    /// Its SOP Instance UID.
    pub sop_instance_uid: String,
    /// The Part-10 file.
    pub payload: Vec<u8>,
    /// Sends tried so far.
    pub attempts: u32,
}

/// The outbox.
pub struct Outbox {
    conn: Mutex<Connection>,
    /// Most rows waiting; beyond it new results are refused (the C-STORE fails
    /// with "out of resources", so the sender of the image retries later).
    capacity: usize,
}

/// Longest wait between tries of one object.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, OutboxError> {
        let conn = Connection::open(path)
            .map_err(|e| OutboxError(format!("outbox {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL with full sync: a row is on disk before the C-STORE is answered.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY,
                destination TEXT NOT NULL,
                sop_instance_uid TEXT NOT NULL,
                source_key TEXT NOT NULL,
                kind TEXT NOT NULL,
                payload BLOB,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_at INTEGER NOT NULL,
                last_error TEXT,
                created_at INTEGER NOT NULL,
                sent_at INTEGER,
                UNIQUE (destination, sop_instance_uid)
            );
            CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
            CREATE INDEX IF NOT EXISTS outbox_source ON outbox (source_key);",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            capacity,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether results of `source_key` (a source image analysed by a model file)
    /// were already queued or sent.
    pub fn has_source(&self, source_key: &str) -> Result<bool, OutboxError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM outbox WHERE source_key = ?1 LIMIT 1",
                params![source_key],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Adds the result objects of one source for every destination, all or none;
    /// an object already there for a destination is not added again. Refused when
    /// the outbox is full.
    pub fn add(
        &self,
        source_key: &str,
        objects: &[(&str, String, Vec<u8>)],
        destinations: &[String],
    ) -> Result<usize, OutboxError> {
        let mut conn = self.conn();
        let waiting: i64 = conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        if waiting as usize + objects.len() * destinations.len() > self.capacity {
            return Err(OutboxError(format!(
                "the outbox holds its limit of {} result objects waiting to be sent",
                self.capacity
            )));
        }
        let tx = conn.transaction()?;
        let mut added = 0;
        let now = now_ms();
        for d in destinations {
            for (kind, uid, payload) in objects {
                added += tx.execute(
                    "INSERT OR IGNORE INTO outbox
                     (destination, sop_instance_uid, source_key, kind, payload, state, next_at, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
                    params![d, uid, source_key, kind, payload, now],
                )?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// Up to `limit` objects due now, oldest first.
    pub fn due(&self, limit: usize) -> Result<Vec<Item>, OutboxError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, destination, sop_instance_uid, payload, attempts FROM outbox
             WHERE state = 'pending' AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms(), limit as i64], |r| {
            Ok(Item {
                id: r.get(0)?,
                destination: r.get(1)?,
                sop_instance_uid: r.get(2)?,
                payload: r.get(3)?,
                attempts: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next pending object falls due (none: nothing waits).
    pub fn next_due_in(&self) -> Result<Option<Duration>, OutboxError> {
        let next: Option<i64> = self.conn().query_row(
            "SELECT MIN(next_at) FROM outbox WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        Ok(next.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64)))
    }

    /// Marks an object sent: its payload is dropped, its row kept as the record.
    pub fn sent(&self, id: i64) -> Result<(), OutboxError> {
        self.conn().execute(
            "UPDATE outbox SET state = 'sent', payload = NULL, sent_at = ?2, last_error = NULL
             WHERE id = ?1",
            params![id, now_ms()],
        )?;
        Ok(())
    }

    /// Marks a failed send: due again after a backoff that doubles per attempt (1 s
    /// up to 5 min).
    pub fn retry(&self, item: &Item, error: &str) -> Result<Duration, OutboxError> {
        let backoff = Duration::from_secs(1u64 << item.attempts.min(9)).min(MAX_BACKOFF);
        self.conn().execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at = ?2, last_error = ?3 WHERE id = ?1",
            params![item.id, now_ms() + backoff.as_millis() as i64, error],
        )?;
        Ok(backoff)
    }

    /// Objects waiting, by destination.
    pub fn depth(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT destination, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY destination",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_queued_once_sent_once_and_retried_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.sqlite"), 10).unwrap();
        let objs = vec![
            ("sr", "1.2.3".to_string(), vec![1u8, 2]),
            ("sc", "1.2.4".to_string(), vec![3u8]),
        ];
        let dests = vec!["PACS".to_string()];
        assert!(!o.has_source("k").unwrap());
        assert_eq!(o.add("k", &objs, &dests).unwrap(), 2);
        assert!(o.has_source("k").unwrap());
        // The same objects again: nothing added.
        assert_eq!(o.add("k", &objs, &dests).unwrap(), 0);
        let due = o.due(10).unwrap();
        assert_eq!(due.len(), 2);
        o.sent(due[0].id).unwrap();
        let backoff = o.retry(&due[1], "down").unwrap();
        assert_eq!(backoff, Duration::from_secs(1));
        // Not due until the backoff passes; the sent one never again.
        assert!(o.due(10).unwrap().is_empty());
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        // Reopened (a restart): still there.
        drop(o);
        let o = Outbox::open(&dir.path().join("o.sqlite"), 10).unwrap();
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        assert_eq!(o.add("k", &objs, &dests).unwrap(), 0);
        // Full: refused whole.
        let many: Vec<_> = (0..10)
            .map(|i| ("sr", format!("9.{i}"), vec![0u8]))
            .collect();
        assert!(o.add("m", &many, &dests).is_err());
        assert!(!o.has_source("m").unwrap());
    }
}
