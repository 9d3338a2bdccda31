//! Live outcomes: every answered image (what the audit trail records of it) and the
//! label a radiologist later confirmed for it (`POST /feedback`), in a database, so
//! that they outlive the process and every replica sees them: an SQLite file
//! (`--outcomes FILE`) or PostgreSQL (`--database-url`, shared with the DICOM
//! outbox). From them, per model file, the live confusion matrix over the most recent
//! confirmed answers, its sensitivity and specificity with Wilson intervals, and an
//! alarm when live sensitivity is below what the card (or the site card) measured.
//! Answers and confirmations older than `--retention-days` are deleted (at open and
//! at most hourly as answers are recorded); the SQLite file is owner-only with
//! `secure_delete` on ([`crate::sqlite_file`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{AuditRecord, Decision};
use crate::eval::Confusion;
use crate::eval::site::{Interval, wilson};
use crate::params;
use crate::registry::Label;
use crate::store::{Db, Durability, Row, Step, StoreError};

crate::message_error!(
    /// Why the outcomes store could not be read or written.
    OutcomesError
);

impl From<crate::store::StoreError> for OutcomesError {
    fn from(e: crate::store::StoreError) -> Self {
        Self(format!("outcomes {e}"))
    }
}

/// The answered image a confirmation is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Answered {
    /// The server's request id.
    pub request_id: String,
    /// The image's position in its request.
    pub image_index: i64,
    /// The model that answered.
    pub model: String,
    /// Its version.
    pub model_version: String,
    /// SHA-256 of its file.
    pub model_sha256: String,
    /// The label it answered.
    pub label: String,
    /// P(PNEUMONIA) as served.
    pub p_pneumonia: f64,
    /// The DICOM SOP Instance UID of the image, when it was DICOM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sop_instance_uid: Option<String>,
}

/// What recording a confirmation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Newly recorded.
    New,
    /// The same label was already recorded for this image: nothing changed.
    Again,
}

/// Why a confirmation was not recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackRefusal {
    /// A different label was already confirmed for this image.
    Conflict(String),
    /// The store failed.
    Store(OutcomesError),
}

impl From<OutcomesError> for FeedbackRefusal {
    fn from(e: OutcomesError) -> Self {
        Self::Store(e)
    }
}

/// The live confusion matrix of one model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveOutcomes {
    /// Confirmed answers it covers (the most recent, at most the window).
    pub n: u64,
    /// The window: the most recent confirmed answers counted.
    pub window: u64,
    /// Answered label against confirmed label (positive = PNEUMONIA).
    pub confusion: Confusion,
    /// Live sensitivity with its Wilson 95 % interval (null without confirmed
    /// PNEUMONIA).
    pub sensitivity: Option<Interval>,
    /// Live specificity with its Wilson 95 % interval.
    pub specificity: Option<Interval>,
    /// The lower 95 % bound of the sensitivity the live one is held to: the site
    /// card's when one applies, else the card's test split (Wilson, from its counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_sensitivity_low: Option<f64>,
    /// Where the reference comes from (`site` or `card`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// True when live sensitivity is below the reference: the upper bound of its
    /// interval under the reference's lower bound (the two intervals do not meet).
    pub sensitivity_alarm: bool,
}

impl LiveOutcomes {
    /// The figures of `confusion` against the reference lower bound.
    pub fn of(confusion: Confusion, window: u64, reference: Option<(&str, f64)>) -> Self {
        let sensitivity = wilson(confusion.tp, confusion.tp + confusion.fn_);
        let specificity = wilson(confusion.tn, confusion.tn + confusion.fp);
        let alarm = match (sensitivity, reference) {
            (Some(s), Some((_, low))) => s.high < low,
            _ => false,
        };
        Self {
            n: confusion.n(),
            window,
            confusion,
            sensitivity,
            specificity,
            reference_sensitivity_low: reference.map(|r| r.1),
            reference: reference.map(|r| r.0.to_string()),
            sensitivity_alarm: alarm,
        }
    }
}

/// The outcomes store. Its calls block (a database round trip): make them from
/// blocking threads.
pub struct Outcomes {
    db: Db,
    window: u64,
    /// How long rows are kept (none: forever).
    retention: Option<Duration>,
    /// When they were last pruned (ms since the epoch).
    pruned_ms: std::sync::atomic::AtomicI64,
}

/// How often answers are pruned while they are recorded.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why a confirmation by SOP Instance UID names no single answer.
#[derive(Debug, Clone, PartialEq)]
pub enum FindRefusal {
    /// Several models answered the image, and the request named none of them.
    Ambiguous(Vec<String>),
    /// The store failed.
    Store(OutcomesError),
}

impl From<OutcomesError> for FindRefusal {
    fn from(e: OutcomesError) -> Self {
        Self::Store(e)
    }
}

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcomes")
            .field("kind", &self.kind())
            .field("window", &self.window)
            .finish()
    }
}

/// The outcomes' migrations, in order ([`crate::store`]); the first is the schema
/// the outcomes had before the versions were kept.
const MIGRATIONS: &[Step] = &[Step::Each {
    sqlite: "CREATE TABLE IF NOT EXISTS answers (
    request_id TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    time TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,
    threshold_source TEXT NOT NULL,
    label TEXT NOT NULL,
    p_pneumonia REAL NOT NULL,
    ood_score REAL,
    sop_instance_uid TEXT,
    PRIMARY KEY (request_id, image_index)
);
CREATE INDEX IF NOT EXISTS answers_sop ON answers (sop_instance_uid);
CREATE INDEX IF NOT EXISTS answers_model ON answers (model_sha256);
CREATE INDEX IF NOT EXISTS answers_time ON answers (time);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    label TEXT NOT NULL,
    caller TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (request_id, image_index)
);",
    postgres: "CREATE TABLE IF NOT EXISTS cxr_answers (
    request_id TEXT NOT NULL,
    image_index BIGINT NOT NULL,
    time TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    threshold_source TEXT NOT NULL,
    label TEXT NOT NULL,
    p_pneumonia DOUBLE PRECISION NOT NULL,
    ood_score DOUBLE PRECISION,
    sop_instance_uid TEXT,
    PRIMARY KEY (request_id, image_index)
);
CREATE INDEX IF NOT EXISTS cxr_answers_sop ON cxr_answers (sop_instance_uid);
CREATE INDEX IF NOT EXISTS cxr_answers_model ON cxr_answers (model_sha256);
CREATE INDEX IF NOT EXISTS cxr_answers_time ON cxr_answers (time);
CREATE TABLE IF NOT EXISTS cxr_feedback (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    image_index BIGINT NOT NULL,
    label TEXT NOT NULL,
    caller TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    UNIQUE (request_id, image_index)
);",
}];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const ANSWERED_COLUMNS: &str = "request_id, image_index, model, model_version, model_sha256, label, p_pneumonia, sop_instance_uid";

/// An [`Answered`] from a row of [`ANSWERED_COLUMNS`].
fn answered(r: &Row) -> Result<Answered, StoreError> {
    Ok(Answered {
        request_id: r.get(0)?,
        image_index: r.get(1)?,
        model: r.get(2)?,
        model_version: r.get(3)?,
        model_sha256: r.get(4)?,
        label: r.get(5)?,
        p_pneumonia: r.get(6)?,
        sop_instance_uid: r.get(7)?,
    })
}

impl Outcomes {
    /// Opens (or creates) the store in the SQLite file at `path`; the live figures
    /// count the `window` most recent confirmed answers of a model file.
    pub fn open(path: &std::path::Path, window: u64) -> Result<Self, OutcomesError> {
        // Durable across a crash of the process (WAL); an answer is recorded before
        // it is sent.
        Self::on(Db::open(path, Durability::Normal)?, window)
    }

    /// Opens (or creates) the store in PostgreSQL (`postgres://…`; no TLS).
    pub fn connect(url: &str, window: u64) -> Result<Self, OutcomesError> {
        Self::on(Db::connect(url)?, window)
    }

    fn on(db: Db, window: u64) -> Result<Self, OutcomesError> {
        db.migrate("outcomes", MIGRATIONS)?;
        Ok(Self {
            db,
            window: window.max(1),
            retention: None,
            pruned_ms: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// Keeps answers and confirmations for `retention` (none: forever); those
    /// older are deleted now, and at most hourly as answers are recorded.
    pub fn with_retention(mut self, retention: Option<Duration>) -> Result<Self, OutcomesError> {
        self.retention = retention;
        self.prune()?;
        Ok(self)
    }

    /// Deletes the answers and confirmations older than the retention; how many
    /// rows went.
    pub fn prune(&self) -> Result<usize, OutcomesError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let now = now_ms();
        self.pruned_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let cutoff_ms = now - retention.as_millis() as i64;
        let cutoff = crate::clock::rfc3339(cutoff_ms.div_euclid(1000), 0);
        let n = self.db.transaction(|t| {
            Ok::<_, StoreError>(
                t.execute(
                    "DELETE FROM cxr_feedback WHERE received_ms < ?1",
                    params![cutoff_ms],
                )? + t.execute("DELETE FROM cxr_answers WHERE time < ?1", params![&cutoff])?,
            )
        })?;
        self.db.empty_wal()?;
        Ok(n)
    }

    /// Which database holds it.
    pub fn kind(&self) -> &'static str {
        self.db.kind()
    }

    /// Records the answered images of one request (refusals are not outcomes).
    pub fn record_answers(&self, records: &[AuditRecord]) -> Result<(), OutcomesError> {
        let rows: Vec<&AuditRecord> = records
            .iter()
            .filter(|r| r.decision == Decision::Answered)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let since = now_ms() - self.pruned_ms.load(std::sync::atomic::Ordering::Relaxed);
        if self.retention.is_some() && since >= PRUNE_EVERY.as_millis() as i64 {
            self.prune()?;
        }
        self.db.transaction(|t| {
            for r in rows {
                t.execute(
                    "INSERT INTO cxr_answers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT DO NOTHING",
                    params![
                        &r.request_id,
                        r.image_index as i64,
                        &r.time,
                        &r.model,
                        &r.model_version,
                        &r.model_sha256,
                        r.threshold,
                        &r.threshold_source,
                        r.label.clone().unwrap_or_default(),
                        r.p_pneumonia.map_or(f64::NAN, f64::from),
                        r.ood_score,
                        r.sop_instance_uid.as_deref(),
                    ],
                )?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(())
    }

    /// The answer a confirmation by SOP Instance UID is for: the most recent answer
    /// to the image by `model` when given, else by the one model that answered it;
    /// several models answered it and none was named: [`FindRefusal::Ambiguous`]
    /// (the models), since a label confirmed for one model's answer would count
    /// against another's figures.
    pub fn find_instance(
        &self,
        sop_instance_uid: &str,
        model: Option<&str>,
    ) -> Result<Option<Answered>, FindRefusal> {
        let all: Vec<Answered> = self
            .db
            .query(
                &format!(
                    "SELECT {ANSWERED_COLUMNS} FROM cxr_answers WHERE sop_instance_uid = ?1
                     ORDER BY time DESC LIMIT 1000"
                ),
                params![sop_instance_uid],
            )
            .and_then(|rows| rows.iter().map(answered).collect())
            .map_err(OutcomesError::from)?;
        let mut of_model: Vec<Answered> = all
            .into_iter()
            .filter(|a| model.is_none_or(|m| a.model == m))
            .collect();
        let mut models: Vec<String> = of_model.iter().map(|a| a.model.clone()).collect();
        models.sort();
        models.dedup();
        if models.len() > 1 {
            return Err(FindRefusal::Ambiguous(models));
        }
        Ok((!of_model.is_empty()).then(|| of_model.swap_remove(0)))
    }

    /// The answered image with this request id and index, or (when `request_id`
    /// is none) the most recent answered image with this SOP Instance UID (of any
    /// model: [`Outcomes::find_instance`] picks one unambiguously).
    pub fn find(
        &self,
        request_id: Option<&str>,
        image_index: i64,
        sop_instance_uid: Option<&str>,
    ) -> Result<Option<Answered>, OutcomesError> {
        let (filter, key) = match (request_id, sop_instance_uid) {
            (Some(id), _) => ("request_id = ?1 AND image_index = ?2", id),
            (None, Some(uid)) => (
                "sop_instance_uid = ?1 AND ?2 >= 0 ORDER BY time DESC LIMIT 1",
                uid,
            ),
            (None, None) => return Ok(None),
        };
        let row = self.db.query_opt(
            &format!("SELECT {ANSWERED_COLUMNS} FROM cxr_answers WHERE {filter}"),
            params![key, image_index],
        )?;
        Ok(row.as_ref().map(answered).transpose()?)
    }

    /// Records the confirmed `label` of an answered image: once; the same label
    /// again changes nothing; another label is a conflict (the first confirmation
    /// stands).
    pub fn confirm(
        &self,
        answered: &Answered,
        label: &str,
        caller: &str,
    ) -> Result<Recorded, FeedbackRefusal> {
        let (id, idx) = (&answered.request_id, answered.image_index);
        // None: newly recorded; else the label recorded before (if any).
        let before = self
            .db
            .with(|t| -> Result<Option<Option<String>>, StoreError> {
                let inserted = t.execute(
                    "INSERT INTO cxr_feedback (request_id, image_index, label, caller, received_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                    params![id, idx, label, caller, now_ms()],
                )?;
                if inserted == 1 {
                    return Ok(None);
                }
                let row = t.query_opt(
                    "SELECT label FROM cxr_feedback WHERE request_id = ?1 AND image_index = ?2",
                    params![id, idx],
                )?;
                Ok(Some(row.map(|r| r.get(0)).transpose()?))
            })
            .map_err(OutcomesError::from)?;
        let Some(existing) = before else {
            return Ok(Recorded::New);
        };
        match existing {
            Some(l) if l == label => Ok(Recorded::Again),
            Some(l) => Err(FeedbackRefusal::Conflict(l)),
            None => Err(FeedbackRefusal::Store(OutcomesError(
                "the confirmation was neither recorded nor found".into(),
            ))),
        }
    }

    /// The live confusion matrix of the model file `sha256`: its `window` most
    /// recent confirmed answers, answered label against confirmed label.
    pub fn confusion(&self, sha256: &str) -> Result<Confusion, OutcomesError> {
        let window = self.window as i64;
        let rows = self.db.query(
            "SELECT a.label, f.label FROM cxr_feedback f JOIN cxr_answers a \
             ON a.request_id = f.request_id AND a.image_index = f.image_index \
             WHERE a.model_sha256 = ?1 ORDER BY f.id DESC LIMIT ?2",
            params![sha256, window],
        )?;
        let mut c = Confusion::default();
        for r in rows {
            let (answered, confirmed): (String, String) = (r.get(0)?, r.get(1)?);
            let positive = |label: &str| label.parse() == Ok(Label::Pneumonia);
            c.add(positive(&confirmed), positive(&answered));
        }
        Ok(c)
    }

    /// The window of the live figures.
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, index: usize, label: &str, sha: &str) -> AuditRecord {
        AuditRecord {
            time: crate::clock::now_rfc3339(),
            request_id: id.into(),
            client_request_id: None,
            image_index: index,
            caller: "t".into(),
            decision: Decision::Answered,
            error_type: None,
            model: "m".into(),
            model_version: "1".into(),
            model_sha256: sha.into(),
            model_signer: None,
            threshold: 0.5,
            threshold_source: "card".into(),
            site_card: None,
            p_normal: Some(0.3),
            p_pneumonia: Some(0.7),
            label: Some(label.into()),
            ood_score: None,
            input_sha256: "x".into(),
            input_kind: "png".into(),
            input_bytes: 1,
            sop_instance_uid: (index == 1).then(|| "1.2.3".to_string()),
            shadow: None,
            trace_id: None,
        }
    }

    #[test]
    fn confirmations_join_answers_once_and_count_in_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let o = Outcomes::open(&path, 3).unwrap();
        let mut refused = record("r1", 2, "NORMAL", "aa");
        refused.decision = Decision::Refused;
        o.record_answers(&[
            record("r1", 0, "PNEUMONIA", "aa"),
            record("r1", 1, "NORMAL", "aa"),
            refused,
        ])
        .unwrap();
        o.record_answers(&[
            record("r2", 0, "PNEUMONIA", "aa"),
            record("r3", 0, "NORMAL", "bb"),
        ])
        .unwrap();
        // A refused image is not an outcome; an unknown one is not found.
        assert!(o.find(Some("r1"), 2, None).unwrap().is_none());
        assert!(o.find(Some("nope"), 0, None).unwrap().is_none());
        let a = o.find(Some("r1"), 0, None).unwrap().unwrap();
        assert_eq!((a.label.as_str(), a.p_pneumonia as f32), ("PNEUMONIA", 0.7));
        assert_eq!(o.confirm(&a, "PNEUMONIA", "rad").unwrap(), Recorded::New);
        assert_eq!(o.confirm(&a, "PNEUMONIA", "rad").unwrap(), Recorded::Again);
        assert_eq!(
            o.confirm(&a, "NORMAL", "rad"),
            Err(FeedbackRefusal::Conflict("PNEUMONIA".into()))
        );
        // By SOP Instance UID.
        let b = o.find(None, 0, Some("1.2.3")).unwrap().unwrap();
        assert_eq!((b.request_id.as_str(), b.image_index), ("r1", 1));
        o.confirm(&b, "PNEUMONIA", "rad").unwrap();
        let c = o.find(Some("r2"), 0, None).unwrap().unwrap();
        o.confirm(&c, "NORMAL", "rad").unwrap();
        // Another file's confirmation does not count for this one.
        let d = o.find(Some("r3"), 0, None).unwrap().unwrap();
        o.confirm(&d, "NORMAL", "rad").unwrap();
        let conf = o.confusion("aa").unwrap();
        assert_eq!((conf.tp, conf.fn_, conf.fp, conf.tn), (1, 1, 1, 0));
        assert_eq!(o.confusion("bb").unwrap().tn, 1);
        // Reopened: still there. The window keeps the most recent 3 of file aa.
        drop(o);
        let o = Outcomes::open(&path, 2).unwrap();
        let conf = o.confusion("aa").unwrap();
        // The two most recent of aa: r1/1 (answered NORMAL, confirmed PNEUMONIA) and
        // r2 (answered PNEUMONIA, confirmed NORMAL).
        assert_eq!((conf.tp, conf.fn_, conf.fp, conf.tn), (0, 1, 1, 0));
    }

    #[test]
    fn the_alarm_fires_only_when_the_intervals_part() {
        let c = Confusion {
            tp: 10,
            fn_: 10,
            fp: 0,
            tn: 5,
        };
        // Live sensitivity 0.5 (Wilson 0.30-0.70).
        let l = LiveOutcomes::of(c, 500, Some(("card", 0.9)));
        assert!(l.sensitivity_alarm);
        assert!(l.sensitivity.unwrap().high < 0.9);
        assert!(!LiveOutcomes::of(c, 500, Some(("card", 0.6))).sensitivity_alarm);
        assert!(!LiveOutcomes::of(c, 500, None).sensitivity_alarm);
        assert!(
            !LiveOutcomes::of(Confusion::default(), 500, Some(("card", 0.9))).sensitivity_alarm
        );
    }

    #[test]
    fn stores_made_before_the_versions_open_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        // The outcomes as the code before versioned migrations made them.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE answers (
                request_id TEXT NOT NULL, image_index INTEGER NOT NULL, time TEXT NOT NULL,
                model TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
                threshold REAL NOT NULL, threshold_source TEXT NOT NULL, label TEXT NOT NULL,
                p_pneumonia REAL NOT NULL, ood_score REAL, sop_instance_uid TEXT,
                PRIMARY KEY (request_id, image_index));
            CREATE INDEX answers_sop ON answers (sop_instance_uid);
            CREATE INDEX answers_model ON answers (model_sha256);
            CREATE INDEX answers_time ON answers (time);
            CREATE TABLE feedback (
                id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, image_index INTEGER NOT NULL,
                label TEXT NOT NULL, caller TEXT NOT NULL, received_ms INTEGER NOT NULL,
                UNIQUE (request_id, image_index));
            INSERT INTO answers VALUES ('r1', 0, '2026-01-01T00:00:00Z', 'm', '1', 'aa', 0.5,
                'card', 'PNEUMONIA', 0.75, NULL, '1.2.3');
            INSERT INTO feedback (request_id, image_index, label, caller, received_ms)
                VALUES ('r1', 0, 'NORMAL', 'rad', 1);",
        )
        .unwrap();
        drop(c);
        let o = Outcomes::open(&path, 10).unwrap();
        let a = o.find(None, 0, Some("1.2.3")).unwrap().unwrap();
        assert_eq!((a.request_id.as_str(), a.p_pneumonia), ("r1", 0.75));
        assert_eq!(
            o.confirm(&a, "PNEUMONIA", "rad"),
            Err(FeedbackRefusal::Conflict("NORMAL".into()))
        );
        assert_eq!(o.confusion("aa").unwrap().fp, 1);
        drop(o);
        let db = Db::open(&path, Durability::Normal).unwrap();
        assert_eq!(db.version("outcomes").unwrap(), MIGRATIONS.len());
    }
}
