//! The outbox: results waiting to reach their destinations (DICOM objects for a PACS,
//! HL7 v2 messages for a RIS, ...), each row its destination, its kind and its
//! payload's bytes, in a database,
//! so that they survive a restart and are sent once: an embedded SQLite file by
//! default (one replica), PostgreSQL when `--database-url` names one (replicas share
//! it). A row is written (durably) before the C-STORE that caused it is answered; a
//! sender claims due rows for a while (so two replicas never send the same row at
//! once; the claim is renewed before each send), then marks each sent (its payload
//! dropped, its row kept as the record of what was sent), due again after a backoff,
//! or dead: a *dead letter*, set aside with its reason, once a destination refused it
//! `max_attempts` times or it failed for longer than `give_up_after`. Dead letters
//! do not count against the capacity. A result object already in the outbox for a
//! destination (the same SOP Instance UID: results' UIDs are derived from what they
//! are of) is not added again. Sent rows and dead letters are deleted once older
//! than the retention.

use std::path::Path;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use serde::Serialize;
use utoipa::ToSchema;

use crate::params;
use crate::store::Db;
use crate::store::Durability;
use crate::store::Row;
use crate::store::Step;
use crate::store::StoreError;

crate::message_error!(
    /// Why the outbox could not be read or written.
    OutboxError
);

impl From<StoreError> for OutboxError {
    fn from(e: StoreError) -> Self {
        Self(format!("outbox {e}"))
    }
}

/// One result object to send.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its row.
    pub id: i64,
    /// Where it goes (a destination's name).
    pub destination: String,
    /// Its identity at the destination: a DICOM object's SOP Instance UID, an HL7
    /// message's control ID (MSH-10).
    pub sop_instance_uid: String,
    /// What it is: `sr`, `sc` (DICOM objects), `oru` (an HL7 v2 ORU^R01), `fhir`
    /// (a FHIR R4 transaction Bundle).
    pub kind: String,
    /// The Part-10 file.
    pub payload: Vec<u8>,
    /// Sends tried so far (refused or failed).
    pub attempts: u32,
    /// Of them, the ones the destination refused.
    pub refusals: u32,
    /// When it was queued (ms since the epoch).
    pub created_at: i64,
}

/// One item to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its destination's name.
    pub destination: String,
    /// What it is (`sr`, `sc`, `oru`, ...).
    pub kind: String,
    /// Its identity at the destination (a SOP Instance UID, an HL7 message control
    /// ID): one row per destination and uid, ever.
    pub uid: String,
    /// What is sent.
    pub payload: Vec<u8>,
}

/// How a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The destination answered, and refused the object (a C-STORE failure status,
    /// a presentation context it did not accept, a 4xx from STOW-RS): the same bytes
    /// will most likely be refused again, so it is tried at most `max_attempts` times.
    Refused,
    /// No answer (unreachable, timed out, the association broke, a 5xx): tried again
    /// until it has waited `give_up_after`.
    Failed,
}

/// What became of a failed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Due again after this backoff.
    Retry(Duration),
    /// A dead letter: not tried again.
    Dead,
}

/// An object not tried again, as `GET /dicom/outbox/dead-letters` lists it (no
/// patient data: the UIDs, the kind, the destination and why).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeadLetter {
    /// Where it was going.
    pub destination: String,
    /// Its SOP Instance UID.
    pub sop_instance_uid: String,
    /// `sr` (the Structured Report), `sc` (the Secondary Capture), `oru` (an HL7
    /// v2 ORU^R01; its `sop_instance_uid` is then the message control ID, MSH-10) or
    /// `fhir` (a FHIR transaction Bundle; its `sop_instance_uid` is then the
    /// DiagnosticReport's identifier, a `urn:uuid:`).
    pub kind: String,
    /// Sends tried.
    pub attempts: u32,
    /// The last failure.
    pub last_error: String,
    /// When it was queued (RFC 3339).
    pub created_at: String,
    /// When it was set aside (RFC 3339).
    pub dead_at: String,
}

/// How long objects are tried, how many may wait, how long records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Most objects waiting (dead letters not counted); beyond it new results are
    /// refused (the C-STORE fails with "out of resources", so the sender of the
    /// image retries later).
    pub capacity: usize,
    /// Refusals by the destination after which an object is a dead letter.
    pub max_attempts: u32,
    /// How long an object that keeps failing without a refusal (destination down)
    /// is tried before it is a dead letter.
    pub give_up_after: Duration,
    /// How long the records of sent objects and the dead letters are kept (none:
    /// forever).
    pub retention: Option<Duration>,
}

impl Policy {
    /// `capacity` objects waiting, the defaults otherwise.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            max_attempts: crate::defaults::DICOM_MAX_ATTEMPTS,
            give_up_after: Duration::from_secs(crate::defaults::DICOM_GIVE_UP_AFTER_HOURS * 3600),
            retention: Some(Duration::from_secs(
                crate::defaults::RETENTION_DAYS * 86_400,
            )),
        }
    }
}

/// The outbox. Its calls block (a database round trip): make them from blocking
/// threads, never from an async task.
pub struct Outbox {
    db: Db,
    policy: Policy,
}

/// Longest wait between tries of one object.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a claimed row is the claimer's before another sender may take it (a
/// replica that died while sending): longer than one send may take (30 s); the
/// sender renews the claim of every row of its round before each send.
pub const CLAIM: Duration = Duration::from_secs(45);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339(ms: i64) -> String {
    crate::clock::rfc3339(ms.div_euclid(1000), ms.rem_euclid(1000) as u32)
}

/// The outbox's migrations, in order ([`crate::store`]): its first schema, then the
/// columns added since (an outbox made before the versions were kept gained them at
/// open, so they are added only where missing).
const MIGRATIONS: &[Step] = &[
    Step::Each {
        sqlite: "CREATE TABLE IF NOT EXISTS outbox (
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
CREATE INDEX IF NOT EXISTS outbox_source ON outbox (source_key);",
        postgres: "CREATE TABLE IF NOT EXISTS cxr_outbox (
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
CREATE INDEX IF NOT EXISTS cxr_outbox_source ON cxr_outbox (source_key);",
    },
    Step::AddColumn {
        table: "cxr_outbox",
        column: "refusals",
        decl: "INTEGER NOT NULL DEFAULT 0",
    },
    Step::AddColumn {
        table: "cxr_outbox",
        column: "dead_at",
        decl: "BIGINT",
    },
];

const ITEM_COLUMNS: &str =
    "id, destination, sop_instance_uid, payload, attempts, refusals, created_at, kind";

fn item(r: &Row) -> Result<Item, StoreError> {
    Ok(Item {
        id: r.get(0)?,
        destination: r.get(1)?,
        sop_instance_uid: r.get(2)?,
        payload: r.get(3)?,
        attempts: r.get(4)?,
        refusals: r.get(5)?,
        created_at: r.get(6)?,
        kind: r.get(7)?,
    })
}

impl Outbox {
    /// Opens (or creates) the outbox in the SQLite file at `path` (owner-only,
    /// `secure_delete` on: see [`crate::sqlite_file`]).
    pub fn open(path: &Path, policy: Policy) -> Result<Self, OutboxError> {
        // WAL with full sync: a row is on disk before the C-STORE is answered.
        let db = Db::open(path, Durability::Full)?;
        db.migrate("outbox", MIGRATIONS)?;
        // One replica owns an SQLite outbox: what a previous run of it was sending
        // when it stopped is due again now.
        db.execute(
            "UPDATE cxr_outbox SET claimed_until = NULL WHERE claimed_until IS NOT NULL",
            &[],
        )?;
        Self::on(db, policy)
    }

    /// Opens (or creates) the outbox in the PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/db`; TLS is not supported: use a local
    /// connection or a sidecar).
    pub fn connect(url: &str, policy: Policy) -> Result<Self, OutboxError> {
        let db = Db::connect(url)?;
        db.migrate("outbox", MIGRATIONS)?;
        Self::on(db, policy)
    }

    fn on(db: Db, policy: Policy) -> Result<Self, OutboxError> {
        let o = Self { db, policy };
        o.prune()?;
        Ok(o)
    }

    /// Which database holds it.
    pub fn kind(&self) -> &'static str {
        self.db.kind()
    }

    /// How it treats its objects.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether results of `source_key` (a source image analysed by a model file)
    /// were already queued or sent.
    pub fn has_source(&self, source_key: &str) -> Result<bool, OutboxError> {
        Ok(self
            .db
            .query_opt(
                "SELECT 1 FROM cxr_outbox WHERE source_key = ?1 LIMIT 1",
                params![source_key],
            )?
            .is_some())
    }

    /// Adds the result objects of one source for every destination, all or none
    /// (the cross product as [`Outbox::queue`] entries).
    pub fn add(
        &self,
        source_key: &str,
        objects: &[(&str, String, Vec<u8>)],
        destinations: &[String],
    ) -> Result<usize, OutboxError> {
        let entries: Vec<Entry> = destinations
            .iter()
            .flat_map(|d| {
                objects.iter().map(|(kind, uid, payload)| Entry {
                    destination: d.clone(),
                    kind: (*kind).to_string(),
                    uid: uid.clone(),
                    payload: payload.clone(),
                })
            })
            .collect();
        self.queue(source_key, &entries)
    }

    /// Adds the items of one source (a result), all or none; an item already there
    /// for its destination (the same `uid`) is not added again. Refused when the
    /// outbox is full (dead letters do not count). Returns how many rows were added.
    pub fn queue(&self, source_key: &str, entries: &[Entry]) -> Result<usize, OutboxError> {
        let capacity = self.policy.capacity;
        let now = now_ms();
        self.db.transaction(|t| {
            let waiting: i64 = t
                .query("SELECT COUNT(*) FROM cxr_outbox WHERE state = 'pending'", &[])?
                .first()
                .map_or(Ok(0), |r| r.get(0))?;
            if waiting as usize + entries.len() > capacity {
                return Err(OutboxError(format!(
                    "the outbox holds its limit of {capacity} result objects waiting to be sent"
                )));
            }
            let mut added = 0;
            for e in entries {
                added += t.execute(
                    "INSERT INTO cxr_outbox
                     (destination, sop_instance_uid, source_key, kind, payload, state, next_at, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)
                     ON CONFLICT (destination, sop_instance_uid) DO NOTHING",
                    params![&e.destination, &e.uid, source_key, &e.kind, &e.payload, now],
                )?;
            }
            Ok(added)
        })
    }

    /// Claims up to `limit` objects due now, oldest first: they are this sender's
    /// for [`CLAIM`] (another replica's sender skips them; [`Outbox::renew`]
    /// extends it), until marked [`Outbox::sent`], [`Outbox::fail`]ed or
    /// [`Outbox::release`]d.
    pub fn due(&self, limit: usize) -> Result<Vec<Item>, OutboxError> {
        let now = now_ms();
        let until = now + CLAIM.as_millis() as i64;
        Ok(self.db.transaction(|t| {
            let sql = format!(
                "SELECT {ITEM_COLUMNS} FROM cxr_outbox
                 WHERE state = 'pending' AND next_at <= ?1
                   AND (claimed_until IS NULL OR claimed_until <= ?1)
                 ORDER BY next_at, id LIMIT ?2{}",
                t.skip_locked()
            );
            let items = t
                .query(&sql, params![now, limit as i64])?
                .iter()
                .map(item)
                .collect::<Result<Vec<_>, _>>()?;
            for i in &items {
                t.execute(
                    "UPDATE cxr_outbox SET claimed_until = ?2 WHERE id = ?1",
                    params![i.id, until],
                )?;
            }
            Ok::<_, StoreError>(items)
        })?)
    }

    /// Extends the claim on `ids` (still pending and claimed) to [`CLAIM`] from now:
    /// called before each send, so that rows of a round waiting behind slow sends
    /// are not taken (and sent again) by another replica.
    pub fn renew(&self, ids: &[i64]) -> Result<(), OutboxError> {
        let until = now_ms() + CLAIM.as_millis() as i64;
        self.each(
            ids,
            "UPDATE cxr_outbox SET claimed_until = ?2
             WHERE id = ?1 AND state = 'pending' AND claimed_until IS NOT NULL",
            until,
        )
    }

    /// Gives claimed objects back untried (no attempt counted): due again after
    /// `after`.
    pub fn release(&self, ids: &[i64], after: Duration) -> Result<(), OutboxError> {
        let next = now_ms() + after.as_millis() as i64;
        self.each(
            ids,
            "UPDATE cxr_outbox SET claimed_until = NULL,
                 next_at = CASE WHEN next_at > ?2 THEN next_at ELSE ?2 END
             WHERE id = ?1 AND state = 'pending'",
            next,
        )
    }

    /// Runs `sql` (`?1` the row, `?2` the time) for each of `ids`, in one transaction.
    fn each(&self, ids: &[i64], sql: &str, time: i64) -> Result<(), OutboxError> {
        Ok(self.db.transaction(|t| {
            for id in ids {
                t.execute(sql, params![*id, time])?;
            }
            Ok::<_, StoreError>(())
        })?)
    }

    /// When the next pending object falls due (none: nothing waits).
    pub fn next_due_in(&self) -> Result<Option<Duration>, OutboxError> {
        let next: Option<i64> = self
            .db
            .query_opt(
                "SELECT MIN(CASE WHEN claimed_until > next_at THEN claimed_until ELSE next_at END)
                 FROM cxr_outbox WHERE state = 'pending'",
                &[],
            )?
            .map_or(Ok(None), |r| r.get(0))?;
        Ok(next.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64)))
    }

    /// Marks an object sent: its payload is dropped (overwritten in an SQLite file:
    /// `secure_delete`), its row kept as the record until the retention passes.
    pub fn sent(&self, id: i64) -> Result<(), OutboxError> {
        self.db.execute(
            "UPDATE cxr_outbox SET state = 'sent', payload = NULL, sent_at = ?2, last_error = NULL,
                 claimed_until = NULL
             WHERE id = ?1",
            params![id, now_ms()],
        )?;
        Ok(())
    }

    /// Marks a failed send: due again after a backoff that doubles per attempt (1 s
    /// up to 5 min), or a dead letter once the destination refused it
    /// `max_attempts` times, or it failed for `give_up_after` since it was queued.
    /// `error` is kept (the dead letters list it): no patient data in it.
    pub fn fail(&self, item: &Item, how: Failure, error: &str) -> Result<Settled, OutboxError> {
        let now = now_ms();
        let refusals = item.refusals + u32::from(how == Failure::Refused);
        let dead = match how {
            Failure::Refused => refusals >= self.policy.max_attempts,
            Failure::Failed => {
                now - item.created_at >= self.policy.give_up_after.as_millis() as i64
            }
        };
        let backoff = Duration::from_secs(1u64 << item.attempts.min(9)).min(MAX_BACKOFF);
        let next = now + backoff.as_millis() as i64;
        let (state, dead_at) = if dead {
            ("dead", Some(now))
        } else {
            ("pending", None)
        };
        self.db.execute(
            "UPDATE cxr_outbox SET attempts = attempts + 1, refusals = ?2, next_at = ?3,
                 last_error = ?4, claimed_until = NULL, state = ?5, dead_at = ?6
             WHERE id = ?1",
            params![item.id, refusals, next, error, state, dead_at],
        )?;
        Ok(if dead {
            Settled::Dead
        } else {
            Settled::Retry(backoff)
        })
    }

    /// Objects waiting, by destination.
    pub fn depth(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        self.count_by_destination("pending")
    }

    /// Dead letters, by destination.
    pub fn dead_depth(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        self.count_by_destination("dead")
    }

    fn count_by_destination(&self, state: &str) -> Result<Vec<(String, i64)>, OutboxError> {
        let rows = self.db.query(
            "SELECT destination, COUNT(*) FROM cxr_outbox WHERE state = ?1
             GROUP BY destination ORDER BY destination",
            params![state],
        )?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect::<Result<_, StoreError>>()?)
    }

    /// The dead letters, the most recent first, at most `limit`.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        let rows = self.db.query(
            "SELECT destination, sop_instance_uid, kind, attempts, COALESCE(last_error, ''),
                 created_at, dead_at
             FROM cxr_outbox WHERE state = 'dead' ORDER BY dead_at DESC, id DESC LIMIT ?1",
            params![limit as i64],
        )?;
        let letter = |r: &Row| -> Result<DeadLetter, StoreError> {
            let created: i64 = r.get(5)?;
            Ok(DeadLetter {
                destination: r.get(0)?,
                sop_instance_uid: r.get(1)?,
                kind: r.get(2)?,
                attempts: r.get(3)?,
                last_error: r.get(4)?,
                created_at: rfc3339(created),
                dead_at: rfc3339(r.get::<Option<i64>>(6)?.unwrap_or(created)),
            })
        };
        Ok(rows.iter().map(letter).collect::<Result<_, _>>()?)
    }

    /// Deletes the records of sent objects and the dead letters older than the
    /// retention (then empties an SQLite file's log: [`Outbox::compact`]). Returns
    /// how many rows went.
    pub fn prune(&self) -> Result<usize, OutboxError> {
        let Some(retention) = self.policy.retention else {
            return Ok(0);
        };
        let cutoff = now_ms() - retention.as_millis() as i64;
        let n = self.db.execute(
            "DELETE FROM cxr_outbox
             WHERE (state = 'sent' AND sent_at < ?1) OR (state = 'dead' AND dead_at < ?1)",
            params![cutoff],
        )?;
        self.compact()?;
        Ok(n)
    }

    /// Empties an SQLite outbox's write-ahead log into the file (whose dropped
    /// payloads `secure_delete` overwrote), so that no old frame keeps a sent
    /// payload on disk; nothing for PostgreSQL.
    pub fn compact(&self) -> Result<(), OutboxError> {
        Ok(self.db.empty_wal()?)
    }
}

/// The outbox's contract, for the tests of every database (SQLite here,
/// PostgreSQL in `tests/dicom_node`).
#[doc(hidden)]
pub mod contract {
    use std::time::Duration;

    use super::Db;
    use super::Failure;
    use super::MIGRATIONS;
    use super::Outbox;
    use super::Policy;
    use super::Settled;
    use crate::params;

    /// An outbox as the code before versioned migrations left it in `db`: its first
    /// schema (with the columns it added at open when `added`), no version, one row
    /// due.
    pub fn unversioned(db: &Db, added: bool) {
        let forget = || {
            db.version("outbox").unwrap();
            db.execute("DELETE FROM cxr_migrations WHERE store = 'outbox'", &[])
                .unwrap();
        };
        db.execute("DROP TABLE IF EXISTS cxr_outbox", &[]).unwrap();
        forget();
        let steps = if added { MIGRATIONS } else { &MIGRATIONS[..1] };
        db.migrate("outbox", steps).unwrap();
        forget();
        db.execute(
            "INSERT INTO cxr_outbox (destination, sop_instance_uid, source_key, kind, payload,
                 state, next_at, created_at)
             VALUES ('PACS', '1.2.3', 'k', 'sr', ?1, 'pending', 0, 1)",
            params![&vec![1u8, 2]],
        )
        .unwrap();
        assert_eq!(db.version("outbox").unwrap(), 0);
    }

    /// Outboxes made before the versions ([`unversioned`], with and without the
    /// added columns) open migrated, their rows kept: `db` and `open` open the same
    /// database.
    pub fn migrates(db: impl Fn() -> Db, open: impl Fn() -> Outbox) {
        for added in [false, true] {
            unversioned(&db(), added);
            let o = open();
            assert!(o.has_source("k").unwrap());
            let due = o.due(10).unwrap();
            assert_eq!((due.len(), due[0].payload.as_slice()), (1, &[1u8, 2][..]));
            // The added columns are there (a refusal is counted).
            assert_eq!(
                o.fail(&due[0], Failure::Refused, "no").unwrap(),
                Settled::Retry(Duration::from_secs(1))
            );
            drop(o);
            assert_eq!(db().version("outbox").unwrap(), MIGRATIONS.len());
            // Opened again: nothing to migrate, the row still there.
            let o = open();
            assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
            std::thread::sleep(Duration::from_millis(1100));
            assert_eq!(o.due(10).unwrap()[0].refusals, 1);
        }
    }

    /// The policy [`exercise`] expects: `capacity`, 2 refusals, 3 s of failures.
    pub fn policy(capacity: usize) -> Policy {
        Policy {
            capacity,
            max_attempts: 2,
            give_up_after: Duration::from_secs(3),
            retention: Some(Duration::from_secs(3600)),
        }
    }

    /// The outbox's contract, on any database: `reopen` opens the same one again
    /// (opened with [`policy`]`(10)`).
    pub fn exercise(o: Outbox, reopen: impl Fn() -> Outbox) {
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
        // Claimed: not due to another sender meanwhile, renewed or not.
        assert!(o.due(10).unwrap().is_empty());
        o.renew(&[due[0].id, due[1].id]).unwrap();
        assert!(o.due(10).unwrap().is_empty());
        o.sent(due[0].id).unwrap();
        let settled = o.fail(&due[1], Failure::Failed, "down").unwrap();
        assert_eq!(settled, Settled::Retry(Duration::from_secs(1)));
        // Not due until the backoff passes; the sent one never again.
        assert!(o.due(10).unwrap().is_empty());
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        // Reopened (a restart): still there.
        drop(o);
        let o = reopen();
        assert_eq!(o.depth().unwrap(), vec![("PACS".to_string(), 1)]);
        // A row claimed by a run that stopped is due again after a restart (SQLite:
        // one replica owns the file).
        std::thread::sleep(Duration::from_millis(1100));
        let claimed = o.due(10).unwrap();
        assert_eq!(claimed.len(), 1);
        drop(o);
        let o = reopen();
        if o.kind() == "postgresql" {
            // Shared by replicas: a claim outlives a restart of one of them (another
            // may hold it) until it lapses, or is given back.
            assert!(o.due(10).unwrap().is_empty());
            o.release(&[claimed[0].id], Duration::ZERO).unwrap();
        }
        let held = o.due(10).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(o.add("k", &objs, &dests).unwrap(), 0);
        // Full: refused whole.
        let many: Vec<_> = (0..10)
            .map(|i| ("sr", format!("9.{i}"), vec![0u8]))
            .collect();
        assert!(o.add("m", &many, &dests).is_err());
        assert!(!o.has_source("m").unwrap());

        // Refused twice (the policy's max_attempts): a dead letter, with its reason;
        // it no longer counts against the capacity, and is never due again.
        let refused = vec![("sc", "5.1".to_string(), vec![7u8])];
        assert_eq!(o.add("r", &refused, &dests).unwrap(), 1);
        let due = o.due(10).unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        let r = due[0].clone();
        // Given back untried (an association broke before it): no attempt counted.
        o.release(&[r.id], Duration::ZERO).unwrap();
        let again = o.due(10).unwrap();
        assert_eq!((again.len(), again[0].attempts), (1, 0));
        let first = o.fail(&again[0], Failure::Refused, "status A900H").unwrap();
        assert!(matches!(first, Settled::Retry(_)));
        std::thread::sleep(Duration::from_millis(1100));
        let again = o.due(10).unwrap();
        assert_eq!((again.len(), again[0].refusals), (1, 1));
        assert_eq!(
            o.fail(&again[0], Failure::Refused, "status A900H").unwrap(),
            Settled::Dead
        );
        // The one held since the restart (queued over 3 s ago) keeps failing
        // without a refusal: dead too.
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            o.fail(&held[0], Failure::Failed, "unreachable").unwrap(),
            Settled::Dead
        );
        assert!(o.depth().unwrap().is_empty());
        assert_eq!(o.dead_depth().unwrap(), vec![("PACS".to_string(), 2)]);
        let letters = o.dead_letters(10).unwrap();
        assert_eq!(letters.len(), 2);
        let r = letters
            .iter()
            .find(|l| l.sop_instance_uid == "5.1")
            .unwrap();
        assert_eq!(
            (r.kind.as_str(), r.attempts, r.last_error.as_str()),
            ("sc", 2, "status A900H")
        );
        assert!(r.dead_at >= r.created_at && r.dead_at.ends_with('Z'));
        drop(o);
        let o = reopen();
        assert!(o.due(10).unwrap().is_empty());
        assert_eq!(o.dead_letters(10).unwrap().len(), 2);
        // Dead letters do not count: ten objects fit again.
        assert_eq!(o.add("m", &many, &dests).unwrap(), 10);
        // Within the retention nothing is pruned.
        assert_eq!(o.prune().unwrap(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::contract::exercise;
    use super::contract::policy;
    use super::*;

    #[test]
    fn objects_are_queued_once_sent_once_and_retried_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.sqlite"), policy(10)).unwrap();
        exercise(o, || {
            Outbox::open(&dir.path().join("o.sqlite"), policy(10)).unwrap()
        });
    }

    #[test]
    fn outboxes_made_before_the_versions_open_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        contract::migrates(
            || Db::open(&path, Durability::Full).unwrap(),
            || Outbox::open(&path, policy(10)).unwrap(),
        );
    }
}
