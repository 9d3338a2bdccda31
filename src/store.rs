//! One store layer under the outbox and the outcomes: a connection to an SQLite file
//! ([`crate::sqlite_file`]: owner-only, `secure_delete`, its log emptied) or to
//! PostgreSQL, that runs the SQL each store writes once, and their versioned
//! migrations.
//!
//! The SQL is written one way and translated here, by two rules only:
//! - placeholders are written `?1`, `?2`, ... (SQLite's); PostgreSQL gets `$1`, `$2`;
//! - tables are named `cxr_…` (PostgreSQL's database is shared with other
//!   applications); in an SQLite file (cxr's own) the `cxr_` goes: `cxr_outbox` is
//!   `outbox` there, as it always was.
//!
//! Everything else is SQL both speak (`INSERT … ON CONFLICT … DO NOTHING`, `CASE`,
//! `COALESCE`, `LIMIT ?n`); what really differs lives here: the tables' first
//! definitions (row ids, column types: [`Step::Each`]), a column added to a table
//! made before the versions were kept ([`Step::AddColumn`]), the row lock a claim
//! takes ([`Tx::skip_locked`]), and SQLite's `PRAGMA`s. Values are a small typed
//! [`Value`]; rows are read through [`Row::get`]. The calls block (a database round
//! trip): make them from blocking threads.
//!
//! Migrations: each store lists its steps in order; the table `cxr_migrations`
//! (`migrations` in SQLite) holds, per store, how many were applied, and opening
//! applies the rest in one transaction. Databases made before it existed (version 0)
//! went through the same first steps, which are written to find them done.

use std::path::Path;
use std::sync::Mutex;

use postgres::types::IsNull;
use postgres::types::Type;

crate::message_error!(
    /// Why the database could not be read or written.
    StoreError
);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self(format!("(SQLite): {e}"))
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        Self(format!("(PostgreSQL): {e}"))
    }
}

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (bound to PostgreSQL as the column's width: `INTEGER` or `BIGINT`).
    Int(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

macro_rules! value_from {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from($v: $t) -> Self {
                $e
            }
        }
    )*};
}

value_from! {
    i64 => |v| Value::Int(v),
    i32 => |v| Value::Int(v.into()),
    u32 => |v| Value::Int(v.into()),
    f64 => |v| Value::Real(v),
    f32 => |v| Value::Real(v.into()),
    String => |v| Value::Text(v),
    &String => |v| Value::Text(v.clone()),
    &str => |v| Value::Text(v.to_string()),
    &[u8] => |v| Value::Blob(v.to_vec()),
    &Vec<u8> => |v| Value::Blob(v.clone()),
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The values of a statement's placeholders, in order: `params![a, b]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::Value::from($v)),*][..]
    };
}

/// A Rust value read from a column.
pub trait FromValue: Sized {
    /// The column's value as `Self`; none when its type does not fit.
    fn from_value(v: Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }
}

impl FromValue for i32 {
    fn from_value(v: Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| i.try_into().ok())
    }
}

impl FromValue for u32 {
    fn from_value(v: Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| i.try_into().ok())
    }
}

impl FromValue for f64 {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Real(f) => Some(f),
            Value::Int(i) => Some(i as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| StoreError(format!("no column {i}")))?;
        T::from_value(v.clone()).ok_or_else(|| {
            StoreError(format!(
                "column {i} ({v:?}) is not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // PostgreSQL types each placeholder from its use: an integer goes out at the
        // width the column has.
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql_checked(ty, out),
            Value::Int(i) if *ty == Type::INT2 => i16::try_from(*i)?.to_sql_checked(ty, out),
            Value::Int(i) if *ty == Type::FLOAT8 => (*i as f64).to_sql_checked(ty, out),
            Value::Int(i) => i.to_sql_checked(ty, out),
            Value::Real(f) => f.to_sql_checked(ty, out),
            Value::Text(s) => s.as_str().to_sql_checked(ty, out),
            Value::Blob(b) => b.as_slice().to_sql_checked(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A PostgreSQL row's column `i` as a [`Value`].
fn pg_value(r: &postgres::Row, i: usize) -> Result<Value, StoreError> {
    let ty = r.columns()[i].type_().clone();
    let v = match ty {
        Type::INT2 => r
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::INT4 => r
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::FLOAT4 => r
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Real(v.into())),
        Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
        Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        }
        other => return Err(StoreError(format!("column {i}: type {other} not read"))),
    };
    Ok(v.unwrap_or(Value::Null))
}

/// The PostgreSQL calls of a client or of a transaction.
trait PgExec {
    fn exec(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, postgres::Error>;
    fn rows(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error>;
    fn batch(&mut self, sql: &str) -> Result<(), postgres::Error>;
}

impl<C: postgres::GenericClient> PgExec for C {
    fn exec(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        self.execute(sql, p)
    }
    fn rows(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        self.query(sql, p)
    }
    fn batch(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.batch_execute(sql)
    }
}

/// The statements of one call: inside a transaction ([`Db::transaction`]) or not
/// ([`Db::with`]).
pub struct Tx<'a>(Handle<'a>);

enum Handle<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(&'a mut dyn PgExec),
}

/// `sql` as the backend reads it (the two rules of the module's doc).
fn translate(sql: &str, postgres: bool) -> String {
    if !postgres {
        return sql.replace("cxr_", "");
    }
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

impl Tx<'_> {
    /// Runs a statement; how many rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        Ok(match &mut self.0 {
            Handle::Sqlite(c) => c.execute(
                &translate(sql, false),
                rusqlite::params_from_iter(params.iter()),
            )?,
            Handle::Postgres(c) => c.exec(&translate(sql, true), &pg_params(params))? as usize,
        })
    }

    /// Runs a query; its rows.
    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match &mut self.0 {
            Handle::Sqlite(c) => {
                let mut st = c.prepare(&translate(sql, false))?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        row.push(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                            rusqlite::types::ValueRef::Real(v) => Value::Real(v),
                            rusqlite::types::ValueRef::Text(v) => {
                                Value::Text(String::from_utf8_lossy(v).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(v) => Value::Blob(v.to_vec()),
                        });
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Handle::Postgres(c) => c
                .rows(&translate(sql, true), &pg_params(params))?
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| pg_value(r, i))
                        .collect::<Result<_, _>>()
                        .map(Row)
                })
                .collect(),
        }
    }

    /// Runs a query of at most one row.
    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The clause that makes a `SELECT` claiming rows lock them, skipping those
    /// another transaction holds: PostgreSQL's `FOR UPDATE SKIP LOCKED` (replicas
    /// share it); nothing in SQLite (one writer at a time, the file is one
    /// replica's).
    pub fn skip_locked(&self) -> &'static str {
        match self.0 {
            Handle::Sqlite(_) => "",
            Handle::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Adds a column to a table unless it has it: PostgreSQL says `IF NOT EXISTS`,
    /// SQLite does not (its table's columns are read first).
    fn add_column(&mut self, table: &str, column: &str, decl: &str) -> Result<(), StoreError> {
        if let Handle::Postgres(_) = self.0 {
            return self.batch(&format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {decl}"
            ));
        }
        let missing = self
            .query(
                "SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2",
                params![translate(table, false), column],
            )?
            .is_empty();
        if missing {
            self.batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
        Ok(())
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match &mut self.0 {
            Handle::Sqlite(c) => c.execute_batch(&translate(sql, false))?,
            Handle::Postgres(c) => c.batch(&translate(sql, true))?,
        }
        Ok(())
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// How many of the migrations of `store` were applied (the table that says so
/// made when missing).
fn version(t: &mut Tx<'_>, store: &str) -> Result<usize, StoreError> {
    t.batch(
        "CREATE TABLE IF NOT EXISTS cxr_migrations (
            store TEXT PRIMARY KEY,
            version BIGINT NOT NULL
        )",
    )?;
    let at = t.query_opt(
        "SELECT version FROM cxr_migrations WHERE store = ?1",
        params![store],
    )?;
    Ok(at.map(|r| r.get::<i64>(0)).transpose()?.unwrap_or(0).max(0) as usize)
}

/// One migration of a store: applied once, in its order.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// The same SQL on both (the module's two rules applied).
    Both(&'static str),
    /// DDL that differs (a row id is `INTEGER PRIMARY KEY` in SQLite, `BIGSERIAL`
    /// in PostgreSQL; `BLOB`/`BYTEA`, `REAL`/`DOUBLE PRECISION`).
    Each {
        /// For SQLite.
        sqlite: &'static str,
        /// For PostgreSQL.
        postgres: &'static str,
    },
    /// A column added to a table, unless the table has it (a database made before
    /// the versions were kept gained it at open).
    AddColumn {
        /// The table (`cxr_…`).
        table: &'static str,
        /// The column.
        column: &'static str,
        /// Its type and constraints.
        decl: &'static str,
    },
}

/// How hard an SQLite file syncs a commit (`PRAGMA synchronous`; the log is WAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk at the next checkpoint: survives a crash of the process.
    Normal,
    /// On disk before the commit returns: survives a crash of the machine.
    Full,
}

enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

/// A database: an SQLite file or PostgreSQL.
pub struct Db {
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("kind", &self.kind()).finish()
    }
}

impl Db {
    /// Opens (or creates) the SQLite file at `path` ([`crate::sqlite_file`]:
    /// owner-only, `secure_delete`, WAL), syncing as `sync` says.
    pub fn open(path: &Path, sync: Durability) -> Result<Self, StoreError> {
        let conn = crate::sqlite_file::open_private(path).map_err(StoreError)?;
        let level = match sync {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", level)?;
        Ok(Self {
            conn: Mutex::new(Conn::Sqlite(conn)),
        })
    }

    /// Connects to PostgreSQL (`postgres://user:password@host:port/db`; no TLS).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let client = postgres::Client::connect(url, postgres::NoTls)
            .map_err(|e| StoreError(format!("--database-url: {e}")))?;
        Ok(Self {
            conn: Mutex::new(Conn::Postgres(client)),
        })
    }

    /// Which database it is: `sqlite` or `postgresql`.
    pub fn kind(&self) -> &'static str {
        match *self.lock() {
            Conn::Sqlite(_) => "sqlite",
            Conn::Postgres(_) => "postgresql",
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f`'s statements, each on its own.
    pub fn with<T, E>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        let mut conn = self.lock();
        match &mut *conn {
            Conn::Sqlite(c) => f(&mut Tx(Handle::Sqlite(c))),
            Conn::Postgres(c) => f(&mut Tx(Handle::Postgres(c))),
        }
    }

    /// Runs `f`'s statements in one transaction: committed when it returns `Ok`,
    /// rolled back otherwise.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        match &mut *conn {
            Conn::Sqlite(c) => {
                let tx = c.transaction().map_err(StoreError::from)?;
                let v = f(&mut Tx(Handle::Sqlite(&tx)))?;
                tx.commit().map_err(StoreError::from)?;
                Ok(v)
            }
            Conn::Postgres(c) => {
                let mut tx = c.transaction().map_err(StoreError::from)?;
                let v = f(&mut Tx(Handle::Postgres(&mut tx)))?;
                tx.commit().map_err(StoreError::from)?;
                Ok(v)
            }
        }
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        self.with(|t| t.execute(sql, params))
    }

    /// Runs one query; its rows.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        self.with(|t| t.query(sql, params))
    }

    /// Runs one query of at most one row.
    pub fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        self.with(|t| t.query_opt(sql, params))
    }

    /// Empties an SQLite file's write-ahead log ([`crate::sqlite_file::empty_wal`]);
    /// nothing for PostgreSQL.
    pub fn empty_wal(&self) -> Result<(), StoreError> {
        if let Conn::Sqlite(c) = &*self.lock() {
            crate::sqlite_file::empty_wal(c)?;
        }
        Ok(())
    }

    /// How many of the migrations of `store` were applied (0: none, or a database
    /// made before the versions were kept).
    pub fn version(&self, store: &str) -> Result<usize, StoreError> {
        self.with(|t| version(t, store))
    }

    /// Brings the tables of `store` to its last version: applies the `steps` not
    /// applied yet, in order, in one transaction. Returns the version it is at.
    pub fn migrate(&self, store: &str, steps: &[Step]) -> Result<usize, StoreError> {
        self.transaction(|t| {
            if let Handle::Postgres(_) = t.0 {
                // Replicas starting together: one migrates, the others wait for it.
                t.execute("SELECT pg_advisory_xact_lock(7432001)", &[])?;
            }
            let at = version(t, store)?;
            if at > steps.len() {
                return Err(StoreError(format!(
                    "the {store} tables are at version {at}, newer than this cxr knows ({})",
                    steps.len()
                )));
            }
            let postgres = matches!(t.0, Handle::Postgres(_));
            for step in &steps[at..] {
                match *step {
                    Step::Both(sql) => t.batch(sql)?,
                    Step::Each {
                        sqlite,
                        postgres: pg,
                    } => {
                        t.batch(if postgres { pg } else { sqlite })?;
                    }
                    Step::AddColumn {
                        table,
                        column,
                        decl,
                    } => t.add_column(table, column, decl)?,
                }
            }
            t.execute(
                "INSERT INTO cxr_migrations (store, version) VALUES (?1, ?2)
                 ON CONFLICT (store) DO UPDATE SET version = excluded.version",
                params![store, steps.len() as i64],
            )?;
            Ok(steps.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_table_names_are_translated_once() {
        assert_eq!(
            translate(
                "SELECT a FROM cxr_t WHERE x = ?1 AND y = ?12 AND z = '?'",
                true
            ),
            "SELECT a FROM cxr_t WHERE x = $1 AND y = $12 AND z = '?'"
        );
        assert_eq!(
            translate("SELECT a FROM cxr_t WHERE x = ?1", false),
            "SELECT a FROM t WHERE x = ?1"
        );
    }

    #[test]
    fn migrations_apply_once_in_order_and_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let steps = [
            Step::Each {
                sqlite: "CREATE TABLE IF NOT EXISTS cxr_t (id INTEGER PRIMARY KEY, name TEXT)",
                postgres: "CREATE TABLE IF NOT EXISTS cxr_t (id BIGSERIAL PRIMARY KEY, name TEXT)",
            },
            Step::AddColumn {
                table: "cxr_t",
                column: "body",
                decl: "BLOB",
            },
        ];
        let db = Db::open(&path, Durability::Normal).unwrap();
        assert_eq!(db.migrate("t", &steps[..1]).unwrap(), 1);
        db.execute("INSERT INTO cxr_t (name) VALUES (?1)", params!["a"])
            .unwrap();
        // The next version: only the new step runs (the first, a CREATE without
        // IF NOT EXISTS, would fail if run again).
        let again = [
            Step::Both("CREATE TABLE cxr_u (x INTEGER)"),
            steps[1],
            Step::Both("INSERT INTO cxr_u VALUES (1)"),
        ];
        assert_eq!(db.migrate("u", &again).unwrap(), 3);
        assert_eq!(db.migrate("u", &again).unwrap(), 3);
        let n = db
            .query_opt("SELECT COUNT(*) FROM cxr_u", &[])
            .unwrap()
            .unwrap();
        assert_eq!(n.get::<i64>(0).unwrap(), 1);
        // A store's version newer than the code: refused.
        assert!(db.migrate("u", &again[..1]).is_err());
        db.execute(
            "UPDATE cxr_t SET body = ?2 WHERE name = ?1",
            params!["a", &vec![1u8, 2]],
        )
        .unwrap();
        let r = db
            .query_opt("SELECT id, name, body, NULL, 0.5 FROM cxr_t", &[])
            .unwrap()
            .unwrap();
        assert_eq!(r.get::<i64>(0).unwrap(), 1);
        assert_eq!(r.get::<String>(1).unwrap(), "a");
        assert_eq!(r.get::<Vec<u8>>(2).unwrap(), vec![1, 2]);
        assert_eq!(r.get::<Option<i64>>(3).unwrap(), None);
        assert_eq!(r.get::<f64>(4).unwrap(), 0.5);
        assert!(r.get::<String>(0).is_err());
        // A failed transaction leaves nothing.
        let failed: Result<(), StoreError> = db.transaction(|t| {
            t.execute("INSERT INTO cxr_t (name) VALUES (?1)", params!["b"])?;
            Err(StoreError("no".into()))
        });
        assert!(failed.is_err());
        assert_eq!(db.query("SELECT name FROM cxr_t", &[]).unwrap().len(), 1);
    }
}
