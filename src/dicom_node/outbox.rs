//! The outbox: result objects waiting to reach their destinations, in a database,
//! so that they survive a restart and are sent once: an embedded SQLite file by
//! default (one replica), PostgreSQL when `--database-url` names one (replicas share
//! it). A row is written (durably) before the C-STORE that caused it is answered; a
//! sender claims due rows for a while (so two replicas never send the same row at
//! once), then marks each sent (its payload dropped, its row kept as the record of
//! what was sent) or due again after a backoff. A result object already in the
//! outbox for a destination (the same SOP Instance UID: results' UIDs are derived
//! from what they are of) is not added again.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use rusqlite::OptionalExtension;

crate::message_error!(
    /// Why the outbox could not be read or written.
    OutboxError
);

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self(format!("outbox (SQLite): {e}"))
    }
}

impl From<postgres::Error> for OutboxError {
    fn from(e: postgres::Error) -> Self {
        Self(format!("outbox (PostgreSQL): {e}"))
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

/// Where the rows are.
enum Store {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Mutex<postgres::Client>),
}

/// The outbox. Its calls block (a database round trip): make them from blocking
/// threads, never from an async task.
pub struct Outbox {
    store: Store,
    /// Most rows waiting; beyond it new results are refused (the C-STORE fails
    /// with "out of resources", so the sender of the image retries later).
    capacity: usize,
}

/// Longest wait between tries of one object.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a claimed row is the claimer's before another sender may take it (a
/// replica that died while sending): longer than one send may take (30 s).
const CLAIM: Duration = Duration::from_secs(45);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    source_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    claimed_until INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    sent_at INTEGER,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE INDEX IF NOT EXISTS outbox_source ON outbox (source_key);";

const SCHEMA_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS cxr_outbox (
    id BIGSERIAL PRIMARY KEY,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    source_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BYTEA,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    claimed_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS cxr_outbox_due ON cxr_outbox (state, next_at);
CREATE INDEX IF NOT EXISTS cxr_outbox_source ON cxr_outbox (source_key);";

impl Outbox {
    /// Opens (or creates) the outbox in the SQLite file at `path`.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, OutboxError> {
        let conn = rusqlite::Connection::open(path)
            .map_err(|e| OutboxError(format!("outbox {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL with full sync: a row is on disk before the C-STORE is answered.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA_SQLITE)?;
        // One replica owns an SQLite outbox: what a previous run of it was sending
        // when it stopped is due again now.
        conn.execute(
            "UPDATE outbox SET claimed_until = NULL WHERE claimed_until IS NOT NULL",
            [],
        )?;
        Ok(Self {
            store: Store::Sqlite(Mutex::new(conn)),
            capacity,
        })
    }

    /// Opens (or creates) the outbox in the PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/db`; TLS is not supported: use a local
    /// connection or a sidecar).
    pub fn connect(url: &str, capacity: usize) -> Result<Self, OutboxError> {
        let mut client = postgres::Client::connect(url, postgres::NoTls)
            .map_err(|e| OutboxError(format!("--database-url: {e}")))?;
        client.batch_execute(SCHEMA_POSTGRES)?;
        Ok(Self {
            store: Store::Postgres(Mutex::new(client)),
            capacity,
        })
    }

    /// Which database holds it.
    pub fn kind(&self) -> &'static str {
        match self.store {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgresql",
        }
    }

    /// Whether results of `source_key` (a source image analysed by a model file)
    /// were already queued or sent.
    pub fn has_source(&self, source_key: &str) -> Result<bool, OutboxError> {
        Ok(match &self.store {
            Store::Sqlite(c) => lock(c)
                .query_row(
                    "SELECT 1 FROM outbox WHERE source_key = ?1 LIMIT 1",
                    [source_key],
                    |_| Ok(()),
                )
                .optional()?
                .is_some(),
            Store::Postgres(c) => lock(c)
                .query_opt(
                    "SELECT 1 FROM cxr_outbox WHERE source_key = $1 LIMIT 1",
                    &[&source_key],
                )?
                .is_some(),
        })
    }

    /// Adds the result objects of one source for every destination, all or none;
    /// an object already there for a destination is not added again. Refused when
    /// the outbox is full. Returns how many rows were added.
    pub fn add(
        &self,
        source_key: &str,
        objects: &[(&str, String, Vec<u8>)],
        destinations: &[String],
    ) -> Result<usize, OutboxError> {
        let full = |waiting: i64| {
            (waiting as usize + objects.len() * destinations.len() > self.capacity).then(|| {
                OutboxError(format!(
                    "the outbox holds its limit of {} result objects waiting to be sent",
                    self.capacity
                ))
            })
        };
        let now = now_ms();
        let mut added = 0;
        match &self.store {
            Store::Sqlite(c) => {
                let mut c = lock(c);
                let tx = c.transaction()?;
                let waiting: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM outbox WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )?;
                if let Some(e) = full(waiting) {
                    return Err(e);
                }
                for d in destinations {
                    for (kind, uid, payload) in objects {
                        added += tx.execute(
                            "INSERT OR IGNORE INTO outbox
                             (destination, sop_instance_uid, source_key, kind, payload, state, next_at, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
                            rusqlite::params![d, uid, source_key, kind, payload, now],
                        )?;
                    }
                }
                tx.commit()?;
            }
            Store::Postgres(c) => {
                let mut c = lock(c);
                let mut tx = c.transaction()?;
                let waiting: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM cxr_outbox WHERE state = 'pending'",
                        &[],
                    )?
                    .get(0);
                if let Some(e) = full(waiting) {
                    return Err(e);
                }
                for d in destinations {
                    for (kind, uid, payload) in objects {
                        added += tx.execute(
                            "INSERT INTO cxr_outbox
                             (destination, sop_instance_uid, source_key, kind, payload, state, next_at, created_at)
                             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)
                             ON CONFLICT (destination, sop_instance_uid) DO NOTHING",
                            &[d, uid, &source_key, kind, payload, &now],
                        )? as usize;
                    }
                }
                tx.commit()?;
            }
        }
        Ok(added)
    }

    /// Claims up to `limit` objects due now, oldest first: they are this sender's
    /// for [`CLAIM`] (another replica's sender skips them), until marked
    /// [`Outbox::sent`] or [`Outbox::retry`].
    pub fn due(&self, limit: usize) -> Result<Vec<Item>, OutboxError> {
        let now = now_ms();
        let until = now + CLAIM.as_millis() as i64;
        match &self.store {
            Store::Sqlite(c) => {
                let mut c = lock(c);
                let tx = c.transaction()?;
                let items = {
                    let mut st = tx.prepare(
                        "SELECT id, destination, sop_instance_uid, payload, attempts FROM outbox
                         WHERE state = 'pending' AND next_at <= ?1
                           AND (claimed_until IS NULL OR claimed_until <= ?1)
                         ORDER BY next_at, id LIMIT ?2",
                    )?;
                    let rows = st.query_map(rusqlite::params![now, limit as i64], |r| {
                        Ok(Item {
                            id: r.get(0)?,
                            destination: r.get(1)?,
                            sop_instance_uid: r.get(2)?,
                            payload: r.get(3)?,
                            attempts: r.get(4)?,
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                for i in &items {
                    tx.execute(
                        "UPDATE outbox SET claimed_until = ?2 WHERE id = ?1",
                        rusqlite::params![i.id, until],
                    )?;
                }
                tx.commit()?;
                Ok(items)
            }
            Store::Postgres(c) => {
                let rows = lock(c).query(
                    "UPDATE cxr_outbox SET claimed_until = $3 WHERE id IN (
                         SELECT id FROM cxr_outbox WHERE state = 'pending' AND next_at <= $1
                           AND (claimed_until IS NULL OR claimed_until <= $1)
                         ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING id, destination, sop_instance_uid, payload, attempts",
                    &[&now, &(limit as i64), &until],
                )?;
                let mut items: Vec<Item> = rows
                    .iter()
                    .map(|r| Item {
                        id: r.get(0),
                        destination: r.get(1),
                        sop_instance_uid: r.get(2),
                        payload: r.get(3),
                        attempts: r.get::<_, i32>(4) as u32,
                    })
                    .collect();
                items.sort_by_key(|i| i.id);
                Ok(items)
            }
        }
    }

    /// When the next pending object falls due (none: nothing waits).
    pub fn next_due_in(&self) -> Result<Option<Duration>, OutboxError> {
        let next: Option<i64> = match &self.store {
            Store::Sqlite(c) => lock(c).query_row(
                "SELECT MIN(MAX(next_at, COALESCE(claimed_until, 0))) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )?,
            Store::Postgres(c) => lock(c)
                .query_one(
                    "SELECT MIN(GREATEST(next_at, COALESCE(claimed_until, 0))) FROM cxr_outbox WHERE state = 'pending'",
                    &[],
                )?
                .get(0),
        };
        Ok(next.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64)))
    }

    /// Marks an object sent: its payload is dropped, its row kept as the record.
    pub fn sent(&self, id: i64) -> Result<(), OutboxError> {
        let now = now_ms();
        match &self.store {
            Store::Sqlite(c) => {
                lock(c).execute(
                    "UPDATE outbox SET state = 'sent', payload = NULL, sent_at = ?2, last_error = NULL, claimed_until = NULL
                     WHERE id = ?1",
                    rusqlite::params![id, now],
                )?;
            }
            Store::Postgres(c) => {
                lock(c).execute(
                    "UPDATE cxr_outbox SET state = 'sent', payload = NULL, sent_at = $2, last_error = NULL, claimed_until = NULL
                     WHERE id = $1",
                    &[&id, &now],
                )?;
            }
        }
        Ok(())
    }

    /// Marks a failed send: due again after a backoff that doubles per attempt (1 s
    /// up to 5 min).
    pub fn retry(&self, item: &Item, error: &str) -> Result<Duration, OutboxError> {
        let backoff = Duration::from_secs(1u64 << item.attempts.min(9)).min(MAX_BACKOFF);
        let next = now_ms() + backoff.as_millis() as i64;
        match &self.store {
            Store::Sqlite(c) => {
                lock(c).execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_at = ?2, last_error = ?3, claimed_until = NULL WHERE id = ?1",
                    rusqlite::params![item.id, next, error],
                )?;
            }
            Store::Postgres(c) => {
                lock(c).execute(
                    "UPDATE cxr_outbox SET attempts = attempts + 1, next_at = $2, last_error = $3, claimed_until = NULL WHERE id = $1",
                    &[&item.id, &next, &error],
                )?;
            }
        }
        Ok(backoff)
    }

    /// Objects waiting, by destination.
    pub fn depth(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        const SQL: &str = "SELECT destination, COUNT(*) FROM {} WHERE state = 'pending' GROUP BY destination ORDER BY destination";
        Ok(match &self.store {
            Store::Sqlite(c) => {
                let c = lock(c);
                let mut st = c.prepare(&SQL.replace("{}", "outbox"))?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => lock(c)
                .query(&SQL.replace("{}", "cxr_outbox"), &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_queued_once_sent_once_and_retried_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.sqlite"), 10).unwrap();
        exercise(o, || {
            Outbox::open(&dir.path().join("o.sqlite"), 10).unwrap()
        });
    }

    /// The outbox's contract, on any database: `reopen` opens the same one again.
    pub(crate) fn exercise(o: Outbox, reopen: impl Fn() -> Outbox) {
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
        // Claimed: not due to another sender meanwhile.
        assert!(o.due(10).unwrap().is_empty());
        o.sent(due[0].id).unwrap();
        let backoff = o.retry(&due[1], "down").unwrap();
        assert_eq!(backoff, Duration::from_secs(1));
        // Not due until the backoff passes; the sent one never again.
        assert!(o.due(10).unwrap().is_empty());
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        // Reopened (a restart): still there.
        drop(o);
        let o = reopen();
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        // A row claimed by a run that stopped is due again after a restart.
        std::thread::sleep(Duration::from_millis(1100));
        let claimed = o.due(10).unwrap();
        assert_eq!(claimed.len(), 1);
        drop(o);
        let o = reopen();
        assert_eq!(o.due(10).unwrap().len(), 1);
        assert_eq!(o.add("k", &objs, &dests).unwrap(), 0);
        // Full: refused whole.
        let many: Vec<_> = (0..10)
            .map(|i| ("sr", format!("9.{i}"), vec![0u8]))
            .collect();
        assert!(o.add("m", &many, &dests).is_err());
        assert!(!o.has_source("m").unwrap());
    }
}
