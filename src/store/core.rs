//! The store core: every operation on the runner's state, written once.
//! The transaction flow, the SQL both dialects run (with the marks of
//! [`super::sql`]), the binds and the row mapping live here; a dialect
//! ([`super::postgres`], [`super::sqlite`]) supplies only what differs:
//! connecting, binding and reading values, beginning a write, the planning
//! lock, the limiter's reservation, and the few statements whose shape
//! differs (batch cutting, recall planning, carried types, the output
//! query).

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use sqlx::types::chrono::{DateTime, NaiveDate};

use super::records::{
    Answer, Answered, CallCounts, CallEnd, CallTo, ChunkForm, ClaimedBatch, DeadBatch, DecodedVin, FailedRow, Failures,
    JobCounts, JobError, JobTimes, Lookup, Next, PlanMemo, PlannedChunk, PlannedRow, Prunable, QuotaToday,
    RecallCounts, Redo, Reschedule, RunSummary, Standing, StoreError, distinct_campaigns, rfc3339,
};
use super::sql::{Arg, Dialect, Row, args};
use super::{postgres, sqlite};
use crate::columns::{CarriedSeen, CarriedType, OutputRow, RecallMode, VEHICLE_COLUMNS};
use crate::spec::ProviderSpec;

/// The state store: one core over two dialects. Postgres is for
/// production and many machines; SQLite (one file) for one machine and the
/// demo. Both pass the same conformance tests (tests/conformance.rs).
#[derive(Clone, Debug)]
pub struct Store {
    pub(super) db: Db,
    /// This install's random name (migration `install_id`): see [`Store::install`].
    install: std::sync::Arc<str>,
    /// Counts the job state changes this store has committed: see [`Store::moves`].
    moves: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Clone, Debug)]
pub(super) enum Db {
    Pg(sqlx::PgPool),
    /// The state file's pool, and the queue file's (apalis-sqlite keeps
    /// its own migrations, so its tables live in a file of their own).
    Lite {
        pool: sqlx::SqlitePool,
        queue: sqlx::SqlitePool,
        /// This process's turn to write: see [`Store::write`].
        writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    },
}

/// Where one statement runs: a pool, or an open transaction.
pub(super) enum Conn<'a> {
    Pg(&'a sqlx::PgPool),
    PgTx(&'a mut sqlx::PgConnection),
    /// The pool, and this process's turn to write.
    Lite(&'a sqlx::SqlitePool, &'a tokio::sync::Mutex<()>),
    LiteTx(&'a mut sqlx::SqliteConnection),
}

impl Conn<'_> {
    async fn exec(self, sql: &'static str, args: &[Arg]) -> Result<u64, StoreError> {
        match self {
            Conn::Pg(p) => postgres::exec(p, Dialect::Postgres.sql(sql), args).await,
            Conn::PgTx(c) => postgres::exec(c, Dialect::Postgres.sql(sql), args).await,
            Conn::Lite(p, writer) => {
                let _turn = writer.lock().await;
                sqlite::exec(p, Dialect::Sqlite.sql(sql), args).await
            }
            Conn::LiteTx(c) => sqlite::exec(c, Dialect::Sqlite.sql(sql), args).await,
        }
    }

    async fn rows(self, sql: &'static str, args: &[Arg]) -> Result<Vec<Row>, StoreError> {
        match self {
            Conn::Pg(p) => postgres::rows(p, Dialect::Postgres.sql(sql), args).await,
            Conn::PgTx(c) => postgres::rows(c, Dialect::Postgres.sql(sql), args).await,
            Conn::Lite(p, writer) => {
                // A statement that may write (an `UPDATE … RETURNING`)
                // takes the process's turn, as `exec` does.
                let _turn = if reads(sql) { None } else { Some(writer.lock().await) };
                sqlite::rows(p, Dialect::Sqlite.sql(sql), args).await
            }
            Conn::LiteTx(c) => sqlite::rows(c, Dialect::Sqlite.sql(sql), args).await,
        }
    }

    fn dialect(&self) -> Dialect {
        match self {
            Conn::Pg(_) | Conn::PgTx(_) => Dialect::Postgres,
            Conn::Lite(..) | Conn::LiteTx(_) => Dialect::Sqlite,
        }
    }
}

/// Whether a statement only reads (it starts with `SELECT`).
fn reads(sql: &str) -> bool {
    sql.trim_start().get(..6).is_some_and(|w| w.eq_ignore_ascii_case("SELECT"))
}

/// A statement's runners, through `self.conn()`, for the store (`&self`)
/// and a transaction (`&mut self`): `exec` (rows affected), `rows`, `row`
/// (the first, if any), `one` (exactly one); `pick` takes the statement of
/// this dialect where the two differ.
macro_rules! runners_via_conn {
    ($($mut:ident)?) => {
        pub(super) async fn exec(&$($mut)? self, sql: &'static str, args: &[Arg]) -> Result<u64, StoreError> {
            self.conn().exec(sql, args).await
        }

        pub(super) async fn rows(&$($mut)? self, sql: &'static str, args: &[Arg]) -> Result<Vec<Row>, StoreError> {
            self.conn().rows(sql, args).await
        }

        pub(super) async fn row(&$($mut)? self, sql: &'static str, args: &[Arg]) -> Result<Option<Row>, StoreError> {
            Ok(self.rows(sql, args).await?.into_iter().next())
        }

        pub(super) async fn one(&$($mut)? self, sql: &'static str, args: &[Arg]) -> Result<Row, StoreError> {
            self.row(sql, args).await?.ok_or(StoreError::Sql(sqlx::Error::RowNotFound))
        }

        fn pick(&$($mut)? self, pg: &'static str, lite: &'static str) -> &'static str {
            match self.conn().dialect() {
                Dialect::Postgres => pg,
                Dialect::Sqlite => lite,
            }
        }
    };
}

/// An open transaction of either dialect.
pub(super) enum Tx {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    /// The transaction, then this process's turn to write (dropped after
    /// the transaction ends).
    Lite(sqlx::Transaction<'static, sqlx::Sqlite>, Option<tokio::sync::OwnedMutexGuard<()>>),
}

impl Tx {
    fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Pg(t) => Conn::PgTx(t),
            Tx::Lite(t, _) => Conn::LiteTx(t),
        }
    }

    runners_via_conn!(mut);

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(t) => t.commit().await?,
            Tx::Lite(t, _turn) => t.commit().await?,
        }
        Ok(())
    }
}

/// Held while planning a job, so two planners never plan it at once.
pub enum PlanLock {
    /// A session advisory lock, held by this connection.
    Pg(sqlx::pool::PoolConnection<sqlx::Postgres>),
    /// A lease on the job's row.
    Lite(i64),
}

/// Which batch a queue task may take: batch `$2` of job `$1`, only for
/// the task of its current generation (`$3`), only when it is queued, or
/// running but abandoned for longer than `$4` seconds (its worker died
/// mid-call), and only while its job is planned, running or waiting, and
/// not paused. A macro, so that [`CLAIMABLE`] and [`CLAIM`] share its text.
macro_rules! claimable {
    () => {
        "job_id = $1 AND batch_no = $2 AND generation = $3
       AND (state = 'queued' OR (state = 'running' AND updated_at < now() - {secs $4}))
       AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = batches.job_id AND j.batches_planned
                     AND j.state IN ('planning', 'running', 'waiting') AND j.paused_at IS NULL)"
    };
}

/// Whether the task may take its batch ([`claimable!`]): a read, before
/// the task waits for the limiter, so that the tasks of a paused or
/// cancelled job, or stale ones, take no grant (a grant given back returns
/// its quota unit, not its place in the rate).
const CLAIMABLE: &str = concat!("SELECT EXISTS (SELECT 1 FROM batches WHERE ", claimable!(), ")");

/// Takes the batch ([`claimable!`]) for one call. A mark still set on a
/// batch taken again is a call whose answer was lost, counted here. With
/// `$5` the request goes out now and the batch is marked in a call, unless
/// it is a recall lookup whose key is not registered (it takes no call).
pub(super) const CLAIM: &str = concat!(
    "UPDATE batches SET state = 'running',
         calls_lost = calls_lost + CASE WHEN in_call THEN 1 ELSE 0 END,
         in_call = $5 AND (lookup_key IS NULL
                           OR EXISTS (SELECT 1 FROM recall_lookups l WHERE l.lookup_key = batches.lookup_key)),
         updated_at = now()
     WHERE ",
    claimable!(),
    " RETURNING vins, attempts, lookup_key, in_call"
);

/// Fails the pending rows of VINs `$2` of cancelled job `$1`, as the
/// cancel failed its other rows: those of a batch whose call was out then.
const CANCEL_ROWS: &str = "UPDATE job_inputs SET status = 'failed', error_code = 'cancelled',
         error_text = 'the job was cancelled'
     WHERE job_id = $1 AND vin {in $2} AND status = 'pending'";

/// A recall lookup's request: make, model, year and VIN of key `$1`.
const LOOKUP: &str = "SELECT make, model, model_year, vin FROM recall_lookups WHERE lookup_key = $1";

/// Records the request of batch `$2` of job `$1` in the audit trail.
pub(super) const AUDIT_CALL: &str =
    "INSERT INTO call_audit (job_id, batch_no, provider, endpoint, vins, lookup) VALUES ($1, $2, $3, $4, $5, $6)";

/// Whether any of the job's batches is queued or running.
const BUSY: &str = "SELECT EXISTS (SELECT 1 FROM batches WHERE job_id = $1 AND state IN ('queued', 'running'))";

impl Store {
    /// The store over `db`, migrated, with its install's name read.
    pub(super) async fn with_install(db: Db) -> Result<Store, StoreError> {
        let mut store = Store { db, install: "".into(), moves: Default::default() };
        store.install = store.one("SELECT id FROM install", args![]).await?.text(0)?.into();
        Ok(store)
    }

    /// A random name made when this install's tables were created. It sets
    /// this install's queue tasks apart from those of an earlier install of
    /// the same name (a schema dropped and created again, a state file
    /// deleted), whose job numbers it reuses while the queue keeps its tasks.
    pub fn install(&self) -> &str {
        &self.install
    }

    /// Changes each time this store (or a clone of it) commits a change of
    /// a job's state: moved on ([`Store::advance`]), done or failed writing,
    /// failed, cancelled. `vinetl run`'s watcher wakes on it to read its job
    /// then, instead of at its next poll up to half a second later (a cold
    /// 50,000-VIN job took 9.6 to 10.5 s; 0.3 s of it went by between its
    /// end and the poll that saw it). Another process's changes are still
    /// seen by polling.
    pub fn moves(&self) -> tokio::sync::watch::Receiver<u64> {
        self.moves.subscribe()
    }

    /// Called after a job's state change has committed.
    fn moved(&self) {
        self.moves.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn conn(&self) -> Conn<'_> {
        match &self.db {
            Db::Pg(p) => Conn::Pg(p),
            Db::Lite { pool, writer, .. } => Conn::Lite(pool, writer),
        }
    }

    runners_via_conn!();

    /// A write transaction: SQLite takes its write lock at the start
    /// (`BEGIN IMMEDIATE`), so concurrent writers queue instead of failing
    /// to upgrade a read lock. On SQLite a process's writers first take
    /// their turn here, in the order they came: SQLite has one writer at a
    /// time anyway, and a writer that finds the file locked sleeps in
    /// SQLite's busy handler (1 ms, then 2, 5, 10 … up to 100 ms) however
    /// soon the lock is free. Written by hand, not a crate: it is one async
    /// mutex. Other processes on the file still meet the busy handler.
    pub(super) async fn write(&self) -> Result<Tx, StoreError> {
        Ok(match &self.db {
            Db::Pg(p) => Tx::Pg(p.begin().await?),
            Db::Lite { pool, writer, .. } => {
                let turn = std::sync::Arc::clone(writer).lock_owned().await;
                Tx::Lite(pool.begin_with("BEGIN IMMEDIATE").await?, Some(turn))
            }
        })
    }

    /// A read transaction that sees one snapshot.
    async fn snapshot(&self) -> Result<Tx, StoreError> {
        Ok(match &self.db {
            Db::Pg(p) => {
                let mut t = p.begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *t).await?;
                Tx::Pg(t)
            }
            // A WAL read transaction is a snapshot already.
            Db::Lite { pool, .. } => Tx::Lite(pool.begin().await?, None),
        })
    }

    /// The Postgres pool, where the state lives in Postgres.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.db {
            Db::Pg(p) => Some(p),
            Db::Lite { .. } => None,
        }
    }

    /// The SQLite state file's pool and the queue file's, on SQLite.
    pub fn sqlite_pools(&self) -> Option<(&sqlx::SqlitePool, &sqlx::SqlitePool)> {
        match &self.db {
            Db::Pg(_) => None,
            Db::Lite { pool, queue, .. } => Some((pool, queue)),
        }
    }

    // ------------------------------------------------------------ jobs

    /// An unfinished job with this spec (its planner died, or it is still
    /// running), to resume instead of starting a copy that would pay for the
    /// same calls again.
    pub async fn resumable_job(&self, spec_hash: &str) -> Result<Option<i64>, StoreError> {
        let row = self
            .row(
                "SELECT job_id FROM jobs WHERE spec_hash = $1 AND state IN ('planning', 'running', 'waiting')
                 ORDER BY job_id DESC LIMIT 1",
                args![spec_hash],
            )
            .await?;
        row.map(|r| r.int(0)).transpose()
    }

    /// A new job; `logical_date` (YYYY-MM-DD) for a spec whose templates
    /// were filled with a date: its output partition.
    pub async fn create_job(
        &self,
        name: &str,
        spec: &Value,
        spec_hash: &str,
        logical_date: Option<&str>,
    ) -> Result<i64, StoreError> {
        self.one(
            "INSERT INTO jobs (name, spec, spec_hash, started_at, logical_date) VALUES ($1, $2, $3, now(), $4)
             RETURNING job_id",
            args![name, spec, spec_hash, logical_date],
        )
        .await?
        .int(0)
    }

    pub async fn lock_planning(&self, job_id: i64) -> Result<Option<PlanLock>, StoreError> {
        match &self.db {
            Db::Pg(p) => Ok(postgres::lock_planning(p, job_id).await?.map(PlanLock::Pg)),
            Db::Lite { .. } => {
                let n = self
                    .exec(
                        "UPDATE jobs SET planning_until = now() + {secs 60}
                         WHERE job_id = $1 AND (planning_until IS NULL OR planning_until < now())",
                        args![job_id],
                    )
                    .await?;
                Ok((n > 0).then_some(PlanLock::Lite(job_id)))
            }
        }
    }

    pub async fn unlock_planning(&self, lock: PlanLock) -> Result<(), StoreError> {
        match lock {
            PlanLock::Pg(conn) => postgres::unlock_planning(conn).await,
            PlanLock::Lite(job_id) => {
                self.exec("UPDATE jobs SET planning_until = NULL WHERE job_id = $1", args![job_id]).await?;
                Ok(())
            }
        }
    }

    /// Rows of `source` already stored for the job (planning resumes after
    /// them), and whether the source is complete.
    pub async fn rows_planned(&self, job_id: i64, source: &str) -> Result<(i64, bool), StoreError> {
        let row = self
            .row(
                "SELECT rows_planned, complete FROM job_sources WHERE job_id = $1 AND source = $2",
                args![job_id, source],
            )
            .await?;
        row.map_or(Ok((0, false)), |r| Ok((r.int(0)?, r.bool(1)?)))
    }

    pub async fn total_rows(&self, job_id: i64) -> Result<i64, StoreError> {
        self.one(
            "SELECT CAST(coalesce(sum(rows_planned), 0) AS BIGINT) FROM job_sources WHERE job_id = $1",
            args![job_id],
        )
        .await?
        .int(0)
    }

    /// How many of `vins` the cache holds a decode for younger than the TTL.
    pub async fn cached_count(&self, vins: &[String], cache_ttl_hours: f64) -> Result<i64, StoreError> {
        self.one(
            "SELECT count(*) FROM vin_cache WHERE vin {in $1} AND decoded_at > now() - {secs $2 * 3600}",
            args![vins, cache_ttl_hours],
        )
        .await?
        .int(0)
    }

    /// Stores a chunk of input rows and the source's progress in one
    /// transaction, deciding each row's plan as it goes in: invalid, a
    /// duplicate (an earlier row of the job, or of this chunk, has the VIN),
    /// a cache hit (decoded within `cache_ttl_hours`: the row takes the
    /// cached result at once) or a call. A warm job so never rewrites its
    /// rows. SQLite decides set-based, in one `INSERT ... SELECT`; Postgres
    /// looks the chunk's distinct VINs up in one statement and copies the
    /// rows in ([`postgres::insert_chunk`]). Re-inserting rows after a crash
    /// is a no-op; a SQLite planner's lease is renewed with every chunk.
    pub async fn insert_rows(
        &self,
        job_id: i64,
        source: &str,
        rows: &[PlannedRow],
        complete: bool,
        cache_ttl_hours: f64,
    ) -> Result<(), StoreError> {
        let mut memo = PlanMemo::default();
        self.insert_chunk(job_id, source, self.chunk(rows), complete, cache_ttl_hours, &mut memo).await
    }

    /// A memo for planning job `job_id` from here on (see [`PlanMemo`]).
    pub async fn plan_memo(&self, job_id: i64) -> Result<PlanMemo, StoreError> {
        let any = self.one("SELECT EXISTS (SELECT 1 FROM job_inputs WHERE job_id = $1)", args![job_id]).await?;
        Ok(PlanMemo { fresh: !any.bool(0)?, ..PlanMemo::default() })
    }

    /// `rows` in the form this store inserts them ([`Store::insert_chunk`]).
    pub fn chunk(&self, rows: &[PlannedRow]) -> PlannedChunk {
        match self.db {
            Db::Pg(_) => postgres::chunk(rows),
            Db::Lite { .. } => PlannedChunk::json(rows),
        }
    }

    /// [`Store::insert_rows`] for a chunk built beforehand, with what this
    /// planning has learnt of the job's VINs so far (`memo`: Postgres).
    pub async fn insert_chunk(
        &self,
        job_id: i64,
        source: &str,
        chunk: PlannedChunk,
        complete: bool,
        cache_ttl_hours: f64,
        memo: &mut PlanMemo,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let stored = tx
            .row(
                "SELECT rows_planned, carried_seen FROM job_sources WHERE job_id = $1 AND source = $2",
                args![job_id, source],
            )
            .await?;
        let done = stored.as_ref().map(|r| r.int(0)).transpose()?.unwrap_or(0);
        // What the source's carried columns hold, this chunk's rows added;
        // unknown (JSON null) once any stored row went uncounted (a source
        // planned in part before the record was kept).
        let seen = match &stored {
            Some(r) if r.is_null(1) && done > 0 => None,
            Some(r) if !r.is_null(1) => serde_json::from_value::<Option<CarriedSeen>>(r.json(1)?)
                .map_err(|e| StoreError::Decode(format!("job {job_id}'s carried_seen: {e}")))?,
            _ => Some(CarriedSeen::default()),
        }
        .map(|mut seen| {
            seen.merge(&chunk.seen);
            seen
        });
        match (chunk.form, &mut tx) {
            (ChunkForm::Copy(rows), Tx::Pg(t)) => {
                postgres::insert_chunk(t, job_id, (source, done), &rows, cache_ttl_hours, memo).await?
            }
            (ChunkForm::Copy(_), Tx::Lite(..)) => {
                return Err(StoreError::Decode("a chunk built for Postgres given to SQLite".into()));
            }
            (ChunkForm::Json(_), _) if chunk.len == 0 => {}
            (ChunkForm::Json(rows), tx) => {
                // `OFFSET 0` keeps the earlier-row check a per-row index probe:
                // without it Postgres may hash the whole job's rows once per
                // chunk (an EXISTS inside CASE), which made planning quadratic
                // (46 of 100 ms per 5,000-row chunk at 150,000 rows, EXPLAIN ANALYZE).
                tx.exec(
                    "INSERT INTO job_inputs (job_id, source, row_number, raw_vin, vin, check_digit_valid, error_code,
                                         error_text, carried, plan, status, decoded_at)
                 SELECT $1, $2, r.n, r.raw, r.vin, r.cdv,
                        CASE WHEN c.vin IS NULL THEN r.code ELSE c.error_code END,
                        CASE WHEN c.vin IS NULL THEN r.text ELSE c.error_text END,
                        r.carried,
                        CASE WHEN r.vin IS NULL THEN 'invalid'
                             WHEN r.nth > 1 OR EXISTS (SELECT 1 FROM job_inputs e WHERE e.job_id = $1 AND e.vin = r.vin
                                                        LIMIT 1 OFFSET 0)
                                 THEN 'duplicate'
                             WHEN c.vin IS NOT NULL THEN 'cache_hit'
                             ELSE 'call' END,
                        CASE WHEN r.vin IS NULL THEN 'invalid'
                             WHEN c.vin IS NULL THEN 'pending'
                             WHEN c.error_code IS NULL THEN 'decoded'
                             ELSE 'failed' END,
                        c.decoded_at
                 FROM (SELECT x.*, row_number() OVER (PARTITION BY x.vin ORDER BY x.n) AS nth
                       FROM {rows $3: n bigint, raw text, vin text, cdv boolean, code text, text text, carried jsonb}) r
                 LEFT JOIN vin_cache c ON c.vin = r.vin AND c.decoded_at > now() - {secs $4 * 3600}
                 WHERE true
                 ON CONFLICT (job_id, source, row_number) DO NOTHING",
                    args![job_id, source, rows, cache_ttl_hours],
                )
                .await?;
            }
        }
        if matches!(self.db, Db::Lite { .. }) {
            tx.exec(
                "UPDATE jobs SET planning_until = now() + {secs 60} WHERE job_id = $1 AND planning_until IS NOT NULL",
                args![job_id],
            )
            .await?;
        }
        tx.exec(
            "INSERT INTO job_sources (job_id, source, rows_planned, complete, carried_seen) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (job_id, source) DO UPDATE
                 SET rows_planned = greatest(job_sources.rows_planned, excluded.rows_planned),
                     complete = excluded.complete, carried_seen = excluded.carried_seen",
            args![job_id, source, chunk.last_row, complete, json!(seen)],
        )
        .await?;
        tx.commit().await
    }

    /// Creates the job's batches from its pending rows (their plans were
    /// decided as they were stored), once per job. Batch membership is a
    /// pure function of the job's VINs (sorted, then cut every
    /// `batch_size`), so it never depends on timing.
    pub async fn plan_batches(&self, job_id: i64, batch_size: i32) -> Result<i64, StoreError> {
        let mut tx = self.write().await?;
        let planned = tx.one("SELECT batches_planned FROM jobs WHERE job_id = $1 {for update}", args![job_id]).await?;
        if planned.bool(0)? {
            return Ok(0);
        }
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        tx.exec("UPDATE jobs SET batches_planned = true, updated_at = now() WHERE job_id = $1", args![job_id]).await?;
        tx.commit().await?;
        self.analyze_planned(batches > 0).await;
        Ok(batches)
    }

    /// Postgres' statistics on the job's rows, and with `calls`, on its
    /// batches, taken once the job is planned. Without them (new tables, or
    /// a job whose rows autovacuum has not yet analyzed, which it does a
    /// minute or more later) the planner guessed a job had ~100 rows:
    /// - storing an answer read every row of the job by its key instead of
    ///   the 20 by VIN (8.3 ms against 1.6 ms for 60 VINs of a 50,000-row
    ///   job), and marking batches done read all the job's batches (2.3 ms
    ///   against 0.16 ms);
    /// - a job with no call to make (a warm nightly) had its rows joined to
    ///   their VINs' columns for the results table by one index probe per
    ///   row: 17.9 s for one load session's 5,000,000 rows, against 3.5 s
    ///   hashed once the rows were analyzed.
    ///
    /// (EXPLAIN ANALYZE, BENCHMARKS.md.) Only the columns those statements
    /// filter on are sampled (30,000 rows of each table, whatever its size,
    /// once per job: 0.3 s at 10,000,000 rows); `SKIP_LOCKED` leaves a table
    /// that autovacuum is analyzing to it, and Postgres skips a table this
    /// role does not own with a warning of its own. An error costs only
    /// speed, so it is logged. SQLite's planner takes the indexes without
    /// statistics (`EXPLAIN QUERY PLAN`).
    async fn analyze_planned(&self, calls: bool) {
        if let Db::Pg(_) = self.db {
            let sql = if calls {
                "ANALYZE (SKIP_LOCKED) job_inputs (job_id, vin, plan, status), batches (job_id, batch_no, state)"
            } else {
                "ANALYZE (SKIP_LOCKED) job_inputs (job_id, vin, plan, status)"
            };
            if let Err(e) = self.exec(sql, args![]).await {
                tracing::warn!(error = %e, "could not analyze the job's tables; its calls may be stored slower");
            }
        }
    }

    /// Batches whose current generation has no queue task yet.
    pub async fn unenqueued(&self, job_id: i64) -> Result<Vec<(i32, i32)>, StoreError> {
        let rows = self
            .rows(
                "SELECT batch_no, generation FROM batches WHERE job_id = $1 AND state = 'queued' AND NOT enqueued
                 ORDER BY batch_no",
                args![job_id],
            )
            .await?;
        rows.iter().map(|r| Ok((r.int32(0)?, r.int32(1)?))).collect()
    }

    pub async fn mark_enqueued(&self, job_id: i64, batch_generations: &[(i32, i32)]) -> Result<(), StoreError> {
        let pairs: Vec<Value> = batch_generations.iter().map(|(b, g)| json!({"b": b, "g": g})).collect();
        // A row-value IN, not UPDATE ... FROM: SQLite would scan the batches
        // once per pair, holding the write lock a hundred times longer.
        self.exec(
            "UPDATE batches SET enqueued = true
             WHERE job_id = $1 AND (batch_no, generation) IN (SELECT x.b, x.g FROM {rows $2: b integer, g integer})",
            args![job_id, Value::Array(pairs)],
        )
        .await?;
        Ok(())
    }

    /// Whether the task of `generation` may take its batch now: a read,
    /// for the worker to ask before it waits for the limiter. The claim
    /// after the wait decides.
    pub async fn claimable(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        lease_secs: f64,
    ) -> Result<bool, StoreError> {
        self.one(CLAIMABLE, args![job_id, batch_no, generation, lease_secs]).await?.bool(0)
    }

    /// Takes a batch for one call ([`CLAIM`]). With `call`, its request goes
    /// out now: the batch is marked in a call and the request is recorded in
    /// the audit trail, in the claim's own transaction, so whatever goes out
    /// is on record, answered or not. Without, the caller only reschedules
    /// it (the limiter said not now). `None` if the task is stale, the batch
    /// finished, or its job was paused, cancelled or ended.
    pub async fn claim(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        lease_secs: f64,
        call: Option<&CallTo<'_>>,
    ) -> Result<Option<ClaimedBatch>, StoreError> {
        let to = call.copied().unwrap_or_default();
        let args = args![job_id, batch_no, generation, lease_secs, call.is_some(), to.provider, to.decode, to.recalls];
        if let Db::Pg(_) = self.db {
            // One statement: one round trip and one commit before the request.
            let row = self.row(&postgres::CLAIM_CALL, args).await?;
            return row.map(|r| claimed(&r, r.bool(4)?.then_some((&r, 5)))).transpose();
        }
        // SQLite allows no UPDATE in a WITH: the same in one transaction.
        let mut tx = self.write().await?;
        let Some(r) = tx.row(CLAIM, &args[..5]).await? else {
            return Ok(None);
        };
        let key = r.opt_text(2)?;
        let lookup = match &key {
            Some(key) => tx.row(LOOKUP, args![key.as_str()]).await?,
            None => None,
        };
        if r.bool(3)? {
            let (endpoint, vins) = if key.is_some() { (to.recalls, vec![]) } else { (to.decode, r.texts(0)?) };
            tx.exec(AUDIT_CALL, args![job_id, batch_no, to.provider, endpoint, vins, key.as_deref()]).await?;
        }
        tx.commit().await?;
        claimed(&r, lookup.as_ref().map(|l| (l, 0))).map(Some)
    }

    /// A queued batch whose task a stopping worker took but will not call:
    /// a new generation, so the old task is stale and a new one (the
    /// caller pushes it) takes the batch. `None` when the task was already
    /// stale or the batch is no longer queued: then there is nothing to
    /// give back. Left unpushed (a crash), the sweep finds it.
    pub async fn give_back(&self, job_id: i64, batch_no: i32, generation: i32) -> Result<Option<i32>, StoreError> {
        let row = self
            .row(
                "UPDATE batches SET enqueued = false, generation = generation + 1, updated_at = now()
                 WHERE job_id = $1 AND batch_no = $2 AND generation = $3 AND state = 'queued'
                 RETURNING generation",
                args![job_id, batch_no, generation],
            )
            .await?;
        row.map(|r| r.int32(0)).transpose()
    }

    /// The request never reached the API (refused connection, DNS, TLS):
    /// its mark is cleared and nothing is counted.
    pub async fn call_not_sent(&self, job_id: i64, batch_no: i32) -> Result<(), StoreError> {
        self.exec("UPDATE batches SET in_call = false WHERE job_id = $1 AND batch_no = $2", args![job_id, batch_no])
            .await?;
        Ok(())
    }

    /// Counts a call whose outcome no other statement stores (a refused
    /// key, which then fails the job).
    pub async fn call_ended(&self, job_id: i64, batch_no: i32, end: CallEnd) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let recall = tx
            .one(
                "UPDATE batches SET in_call = false, updated_at = now() WHERE job_id = $1 AND batch_no = $2
                 RETURNING kind = 'recall'",
                args![job_id, batch_no],
            )
            .await?
            .bool(0)?;
        count_calls(&mut tx, job_id, 1, recall, end, false).await?;
        tx.commit().await
    }

    /// Stores call answers (of either kind, of one job or several) in one
    /// transaction, each as if stored alone: for a batch decode, the cache
    /// (latest decode per VIN), every input row of those VINs in its job
    /// (duplicates included) and the rows its answer left out; for a recall
    /// lookup, the campaigns and the lookup's list of them; then each batch
    /// and its job's call counts. A process's calls share one commit and one
    /// update of each job's counters (the worker's result writer). Locks are taken in one
    /// order (cache rows by VIN, campaigns by number, lookups by key, then
    /// batches by job and number, then input rows, then jobs by id), so two
    /// processes' groups cannot deadlock, nor a group and a job's failure,
    /// cancellation or resumption, nor a `forget` (see [`lock_batches`]).
    pub async fn complete_all(&self, answers: &[Answered]) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let decodes = decodes_of(answers);
        cache_decodes(&mut tx, &decodes).await?;
        store_recalls(&mut tx, answers).await?;
        let mut jobs: std::collections::BTreeMap<i64, (Vec<Value>, i64, i64)> = Default::default();
        for a in answers {
            let (batches, decodes, recalls) = jobs.entry(a.job_id).or_default();
            batches.push(json!({"b": a.batch_no}));
            match a.answer {
                Answer::Decoded { .. } => *decodes += 1,
                Answer::Recalls { .. } => *recalls += 1,
            }
        }
        // The group's batches are done before any of their rows is settled,
        // and locked in order by number: failing a job locks its batches,
        // then its row, then its pending rows, so a group that settled rows
        // first and waited for a batch could deadlock with it.
        for (job_id, (batches, _, _)) in &jobs {
            tx.exec(
                "UPDATE batches SET state = 'done', in_call = false, updated_at = now()
                     WHERE job_id = $1 AND batch_no IN (
                         SELECT b.batch_no FROM batches b
                         WHERE b.job_id = $1 AND b.batch_no IN (SELECT x.b FROM {rows $2: b integer})
                         ORDER BY b.batch_no {for update})",
                args![*job_id, Value::Array(batches.clone())],
            )
            .await?;
        }
        settle_decodes(&mut tx, &decodes).await?;
        for (job_id, (_, decodes, recalls)) in jobs {
            for (n, recall) in [(decodes, false), (recalls, true)] {
                if n > 0 {
                    count_calls(&mut tx, job_id, n, recall, CallEnd::Answered, false).await?;
                }
            }
        }
        tx.commit().await
    }

    /// The quota is used up (or the API unreachable): the job waits,
    /// saying until when, in words.
    pub async fn set_waiting(&self, job_id: i64, resume_in_secs: f64, reason: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE jobs SET state = 'waiting', state_reason = $3, resume_at = now() + {secs $2}, updated_at = now()
                 WHERE job_id = $1 AND state IN ('running', 'waiting')",
            args![job_id, resume_in_secs, reason],
        )
        .await?;
        Ok(())
    }

    /// Schedules a batch again that this task holds (claimed under
    /// `generation`): a new generation (so a duplicate task of the old one
    /// is stale), the delay, and what happened counted. Returns the new
    /// generation, for the caller to push.
    ///
    /// `None`, with nothing rescheduled (a call made is still counted, once),
    /// when the task no longer holds the batch, or its job was cancelled
    /// meanwhile. A failed job made its batches dead and a newer task may
    /// have taken it over: either way it is not this task's to queue. A
    /// cancel leaves a batch in a call to land, and fails every other
    /// pending row: this one did not land, so it ends cancelled and its
    /// rows fail as the cancel failed the others. Queued again instead, it
    /// would wait forever in an ended job, its rows pending.
    pub async fn reschedule(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        delay_secs: f64,
        kind: Reschedule,
        error: &str,
    ) -> Result<Option<i32>, StoreError> {
        let attempt = matches!(kind, Reschedule::Failed(_));
        let end = match kind {
            Reschedule::Failed(end) => Some(end),
            Reschedule::RateLimited => Some(CallEnd::RateLimited),
            Reschedule::NotCalled => None,
        };
        let mut tx = self.write().await?;
        let held = tx
            .row(
                "SELECT kind = 'recall', vins FROM batches
                 WHERE job_id = $1 AND batch_no = $2 AND generation = $3 AND state = 'running' {for update}",
                args![job_id, batch_no, generation],
            )
            .await?;
        let mut next = None;
        if let Some(held) = &held {
            // The job's row after the batch, in the lock order; locked, so a
            // cancel committing meanwhile is seen.
            let state =
                tx.one("SELECT state FROM jobs WHERE job_id = $1 {for update}", args![job_id]).await?.text(0)?;
            if state == "cancelled" {
                tx.exec(
                    "UPDATE batches SET state = 'cancelled', in_call = false, attempts = attempts + $3, last_error = $4,
                         updated_at = now()
                     WHERE job_id = $1 AND batch_no = $2",
                    args![job_id, batch_no, i64::from(attempt), error],
                )
                .await?;
                // This batch's rows, after the job's row. No other writer
                // takes them and then waits for this job's row: a group
                // settles only the rows of batches it holds (this one is
                // held here, and `reprocess` cuts no batch while one runs),
                // and failing or cancelling the job takes its batches first.
                tx.exec(CANCEL_ROWS, args![job_id, held.texts(1)?]).await?;
            } else {
                let row = tx
                    .one(
                        "UPDATE batches SET state = 'queued', enqueued = false, generation = generation + 1, in_call = false,
                             attempts = attempts + $3, next_run_at = now() + {secs $4}, last_error = $5, updated_at = now()
                         WHERE job_id = $1 AND batch_no = $2 RETURNING generation",
                        args![job_id, batch_no, i64::from(attempt), delay_secs, error],
                    )
                    .await?;
                next = Some(row.int32(0)?);
            }
        }
        if let Some(end) = end {
            let recall = match &held {
                Some(held) => Some(held.bool(0)?),
                None => unmark_stale_call(&mut tx, job_id, batch_no).await?,
            };
            if let Some(recall) = recall {
                count_calls(&mut tx, job_id, 1, recall, end, attempt).await?;
            }
        }
        tx.commit().await?;
        Ok(next)
    }

    /// Gives up on a batch: a decode's rows end `failed` with the last
    /// error; a recall lookup is marked failed, so its rows show recalls as
    /// unknown. The error is kept in `errors`.
    /// `called`: how the last call ended (`None`: no call was made); a
    /// failed last call counts as one of the batch's attempts.
    pub async fn dead_letter(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        error: &str,
        called: Option<CallEnd>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        // Only the task that holds the batch gives up on it. A task whose
        // batch the sweep took over (its call outlived the lease) would
        // otherwise fail the rows of a batch whose next call is out, and
        // let the job end under it; its call is counted as a stale one.
        let attempt = i64::from(called.is_some_and(|e| e != CallEnd::RateLimited));
        let row = tx
            .row(
                "UPDATE batches SET state = 'dead', in_call = false, last_error = $3, attempts = attempts + $4,
                     updated_at = now()
                 WHERE job_id = $1 AND batch_no = $2 AND generation = $5 AND state = 'running'
                 RETURNING vins, lookup_key",
                args![job_id, batch_no, error, attempt, generation],
            )
            .await?;
        let Some(row) = row else {
            if let Some(end) = called
                && let Some(recall) = unmark_stale_call(&mut tx, job_id, batch_no).await?
            {
                count_calls(&mut tx, job_id, 1, recall, end, false).await?;
            }
            return tx.commit().await;
        };
        let lookup_key = row.opt_text(1)?;
        match &lookup_key {
            Some(key) => {
                tx.exec(
                    "UPDATE recall_lookups SET error_text = $2, failed_at = now() WHERE lookup_key = $1",
                    args![key, error],
                )
                .await?
            }
            None => {
                tx.exec(
                    "UPDATE job_inputs SET status = 'failed', error_code = 'dead_letter', error_text = $3
                         WHERE job_id = $1 AND vin {in $2} AND status = 'pending'",
                    args![job_id, row.texts(0)?, error],
                )
                .await?
            }
        };
        tx.exec(
            "INSERT INTO errors (job_id, batch_no, error_code, error_text) VALUES ($1, $2, 'dead_letter', $3)",
            args![job_id, batch_no, error],
        )
        .await?;
        if let Some(end) = called {
            count_calls(&mut tx, job_id, 1, lookup_key.is_some(), end, false).await?;
        }
        tx.commit().await
    }

    /// Stops a job for good (a rejected key, a failed plan): no batch of it
    /// runs again, and its pending rows end `failed` with the reason. True
    /// if this call failed it; false if it had ended already (another
    /// worker's call got the same answer): nothing is recorded twice.
    pub async fn fail_job(&self, job_id: i64, reason: &str) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        lock_batches(&mut tx, job_id, &["queued", "running"]).await?;
        let failed = tx
            .exec(
                "UPDATE jobs SET state = 'failed', state_reason = $2, finished_at = now(), updated_at = now()
                 WHERE job_id = $1 AND state NOT IN ('done', 'failed', 'cancelled')",
                args![job_id, reason],
            )
            .await?;
        if failed == 0 {
            return Ok(false);
        }
        for sql in [
            "UPDATE batches SET state = 'dead', last_error = $2, updated_at = now()
             WHERE job_id = $1 AND state IN ('queued', 'running')",
            "UPDATE job_inputs SET status = 'failed', error_code = 'job_failed', error_text = $2
             WHERE job_id = $1 AND status = 'pending'",
            "INSERT INTO errors (job_id, error_code, error_text) VALUES ($1, 'job_failed', $2)",
        ] {
            tx.exec(sql, args![job_id, reason]).await?;
        }
        tx.commit().await?;
        self.moved();
        Ok(true)
    }

    /// Planning is over: the job runs.
    pub async fn mark_running(&self, job_id: i64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE jobs SET state = 'running', planned_at = now(), updated_at = now()
                 WHERE job_id = $1 AND state = 'planning'",
            args![job_id],
        )
        .await?;
        Ok(())
    }

    /// Stops a job: queued batches are dropped, calls in flight finish and
    /// are stored, pending rows (but those in flight) end `failed`.
    pub async fn cancel_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        lock_batches(&mut tx, job_id, &["queued"]).await?;
        let changed = tx
            .exec(
                "UPDATE jobs SET state = 'cancelled', state_reason = 'cancelled by an operator', finished_at = now(),
                     updated_at = now()
                 WHERE job_id = $1 AND state IN ('planning', 'running', 'waiting')",
                args![job_id],
            )
            .await?;
        if changed == 0 {
            return Ok(false);
        }
        for sql in [
            "UPDATE batches SET state = 'cancelled', updated_at = now() WHERE job_id = $1 AND state = 'queued'",
            "UPDATE job_inputs SET status = 'failed', error_code = 'cancelled', error_text = 'the job was cancelled'
             WHERE job_id = $1 AND status = 'pending'
               AND vin NOT IN (SELECT e.value FROM batches b, {each b.vins} WHERE b.job_id = $1 AND b.state = 'running')",
        ] {
            tx.exec(sql, args![job_id]).await?;
        }
        tx.commit().await?;
        self.moved();
        Ok(true)
    }

    /// Pauses a job: no batch of it is claimed from now on (its tasks are
    /// dropped when delivered), calls in flight land and are stored, and
    /// other jobs go on. Its state (planning, running, waiting) is kept
    /// under the pause, which `status` shows as `paused`. False if the job
    /// is not in one of those states, or already paused.
    pub async fn pause_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let changed = self
            .exec(
                "UPDATE jobs SET paused_at = now(), updated_at = now()
                 WHERE job_id = $1 AND state IN ('planning', 'running', 'waiting') AND paused_at IS NULL",
                args![job_id],
            )
            .await?;
        Ok(changed > 0)
    }

    /// Resumes a paused job. Its queued batches get a new generation, so
    /// the tasks dropped while it was paused are pushed again (by the
    /// caller, with `crate::job::queue::enqueue`) and any still on the
    /// queue are stale. Nothing is called twice: a batch done stays done.
    /// False if the job is not paused.
    pub async fn resume_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        lock_batches(&mut tx, job_id, &["queued"]).await?;
        let changed = tx
            .exec(
                "UPDATE jobs SET paused_at = NULL, updated_at = now()
                 WHERE job_id = $1 AND paused_at IS NOT NULL AND state IN ('planning', 'running', 'waiting')",
                args![job_id],
            )
            .await?;
        if changed == 0 {
            return Ok(false);
        }
        tx.exec(
            "UPDATE batches SET enqueued = false, generation = generation + 1, updated_at = now()
             WHERE job_id = $1 AND state = 'queued'",
            args![job_id],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn recent_jobs(&self, limit: i64) -> Result<Vec<i64>, StoreError> {
        let rows = self.rows("SELECT job_id FROM jobs ORDER BY job_id DESC LIMIT $1", args![limit]).await?;
        rows.iter().map(|r| r.int(0)).collect()
    }

    /// Jobs that have not ended (planning, running, waiting, writing; a
    /// paused one too), oldest first.
    pub async fn unended_jobs(&self) -> Result<Vec<i64>, StoreError> {
        let rows = self
            .rows("SELECT job_id FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled') ORDER BY job_id", args![])
            .await?;
        rows.iter().map(|r| r.int(0)).collect()
    }

    /// Running jobs with every batch ended that nobody moved on: the worker
    /// that stored the last answer lost the database (or died) before its
    /// `advance`. The sweep advances them; `advance` takes the job's lock, so
    /// a worker advancing at the same moment is harmless.
    pub async fn stalled_jobs(&self) -> Result<Vec<i64>, StoreError> {
        let sql = "SELECT job_id FROM jobs j
                   WHERE state IN ('running', 'waiting') AND batches_planned AND paused_at IS NULL
                     AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.job_id = j.job_id AND b.state IN ('queued', 'running'))
                   ORDER BY job_id";
        let rows = self.rows(sql, args![]).await?;
        rows.iter().map(|r| r.int(0)).collect()
    }

    /// Every count `status` shows, from one snapshot.
    pub async fn counts(&self, job_id: i64) -> Result<Option<JobCounts>, StoreError> {
        let mut tx = self.snapshot().await?;
        let counts = job_counts(&mut tx, job_id).await?;
        tx.commit().await?;
        Ok(counts)
    }

    /// What failed in a job: its dead-lettered batches and failed rows, at
    /// most `limit` of each (with their totals, so a million failed rows
    /// never flood a terminal or a page), and the errors that stopped the
    /// job itself; `None` if there is no such job. One snapshot.
    ///
    /// Only the current run's batches count (those given up on since the
    /// job's latest start): a reprocess leaves the batches it replaced dead,
    /// as history, but their rows are retried.
    pub async fn failures(&self, job_id: i64, limit: i64) -> Result<Option<Failures>, StoreError> {
        let limit = limit.max(0);
        let mut tx = self.snapshot().await?;
        let Some(job) = tx
            .row(
                "SELECT name, CASE WHEN paused_at IS NOT NULL AND state IN ('planning', 'running', 'waiting')
                                   THEN 'paused' ELSE state END, state_reason,
                        (SELECT count(*) FROM batches b WHERE b.job_id = $1 AND b.state = 'dead'
                           AND b.updated_at >= jobs.started_at),
                        (SELECT count(*) FROM job_inputs WHERE job_id = $1 AND status = 'failed')
                 FROM jobs WHERE job_id = $1",
                args![job_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let batches = tx
            .rows(
                "SELECT batch_no, kind, {len vins}, attempts, last_error, {epoch updated_at}
                 FROM batches WHERE job_id = $1 AND state = 'dead'
                   AND updated_at >= (SELECT started_at FROM jobs WHERE job_id = $1)
                 ORDER BY batch_no LIMIT $2",
                args![job_id, limit],
            )
            .await?;
        // A dead-lettered row's batch is found by its VIN among the job's
        // dead batches: one probe per row shown, never a join of every row.
        let rows = tx
            .rows(
                "SELECT i.source, i.row_number, i.raw_vin, i.error_code, i.error_text,
                        (SELECT b.batch_no FROM batches b
                         WHERE b.job_id = $1 AND b.state = 'dead' AND b.kind = 'decode' AND i.vin {in b.vins}
                         ORDER BY b.batch_no DESC LIMIT 1)
                 FROM job_inputs i WHERE i.job_id = $1 AND i.status = 'failed'
                 ORDER BY i.source, i.row_number LIMIT $2",
                args![job_id, limit],
            )
            .await?;
        // The job's own errors (no batch, no VIN): a refused key, a failed
        // write. Workers that hit the same refusal at once each record it:
        // one line per distinct error, at its latest.
        let errors = tx
            .rows(
                "SELECT error_code, error_text, {epoch max(at)} FROM errors
                 WHERE job_id = $1 AND batch_no IS NULL AND vin IS NULL
                 GROUP BY error_code, error_text ORDER BY max(at) DESC LIMIT 10",
                args![job_id],
            )
            .await?;
        tx.commit().await?;
        let at = rfc3339;
        Ok(Some(Failures {
            job_id,
            name: job.text(0)?,
            state: job.text(1)?,
            state_reason: job.opt_text(2)?,
            limit,
            dead_batches_total: job.int(3)?,
            dead_batches: batches
                .iter()
                .map(|r| {
                    Ok(DeadBatch {
                        batch_no: r.int32(0)?,
                        kind: r.text(1)?,
                        vins: r.int(2)?,
                        attempts: r.int(3)?,
                        last_error: r.opt_text(4)?,
                        updated_at: at(r.opt_real(5)?),
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            failed_rows_total: job.int(4)?,
            failed_rows: rows
                .iter()
                .map(|r| {
                    Ok(FailedRow {
                        source: r.text(0)?,
                        row: r.int(1)?,
                        raw_vin: r.text(2)?,
                        error_code: r.opt_text(3)?,
                        error_text: r.opt_text(4)?,
                        batch_no: r.opt_int(5)?.map(|b| b as i32),
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            job_errors: errors
                .iter()
                .map(|r| Ok(JobError { code: r.text(0)?, text: r.text(1)?, at: at(r.opt_real(2)?) }))
                .collect::<Result<_, StoreError>>()?,
        }))
    }

    /// Ended jobs that finished more than `older_than_secs` ago and still
    /// hold their rows (only those named `name`, if given), oldest first.
    pub async fn prunable(&self, older_than_secs: f64, name: Option<&str>) -> Result<Vec<Prunable>, StoreError> {
        let rows = self
            .rows(
                "SELECT j.job_id, j.name,
                        (SELECT count(*) FROM job_inputs WHERE job_id = j.job_id),
                        (SELECT count(*) FROM batches WHERE job_id = j.job_id),
                        (SELECT count(*) FROM errors WHERE job_id = j.job_id)
                 FROM jobs j
                 WHERE j.pruned_at IS NULL AND j.state IN ('done', 'failed', 'cancelled')
                   AND coalesce(j.finished_at, j.updated_at) < now() - {secs $1}
                   AND (j.name = $2 OR CAST($2 AS TEXT) IS NULL)
                 ORDER BY j.job_id",
                args![older_than_secs, name],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Prunable {
                    job_id: r.int(0)?,
                    name: r.text(1)?,
                    rows: r.int(2)?,
                    batches: r.int(3)?,
                    errors: r.int(4)?,
                })
            })
            .collect()
    }

    /// Prunes ended job `job_id` in one transaction: its counts are frozen
    /// into its row, then its input rows, sources, batches and errors are
    /// deleted. False if it has not ended more than `older_than_secs` ago
    /// (checked again under its lock: a job listed by [`Store::prunable`]
    /// may have been reprocessed, and ended again, since), or was pruned
    /// already.
    pub async fn prune_job(&self, job_id: i64, older_than_secs: f64) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        // Batches first, in the lock order: a cancelled job's call may still
        // be landing.
        lock_batches(&mut tx, job_id, &["queued", "running"]).await?;
        let ended = tx
            .row(
                "SELECT 1 FROM jobs WHERE job_id = $1 AND pruned_at IS NULL AND state IN ('done', 'failed', 'cancelled')
                   AND coalesce(finished_at, updated_at) < now() - {secs $2}
                 {for update}",
                args![job_id, older_than_secs],
            )
            .await?;
        if ended.is_none() {
            return Ok(false);
        }
        let Some(counts) = job_counts(&mut tx, job_id).await? else { return Ok(false) };
        let frozen = serde_json::to_value(&counts).map_err(|e| StoreError::Decode(e.to_string()))?;
        tx.exec("UPDATE jobs SET pruned_at = now(), summary = $2 WHERE job_id = $1", args![job_id, frozen]).await?;
        for sql in [
            "DELETE FROM job_inputs WHERE job_id = $1",
            "DELETE FROM job_sources WHERE job_id = $1",
            "DELETE FROM batches WHERE job_id = $1",
            "DELETE FROM errors WHERE job_id = $1",
        ] {
            tx.exec(sql, args![job_id]).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Every output row of a job, in source order, streamed.
    pub fn output_rows(&self, job_id: i64, mode: RecallMode) -> BoxStream<'_, Result<OutputRow, StoreError>> {
        let rows = match &self.db {
            Db::Pg(p) => postgres::output_rows(p, job_id, mode.as_str()),
            Db::Lite { pool, .. } => sqlite::stream(pool, sqlite::OUTPUT_SQL.as_str(), args![job_id, mode.as_str()]),
        };
        rows.map(|r| output_row(r?)).boxed()
    }

    /// Writes every output row of a job into `into`, a table of the state
    /// store's own Postgres database (`table (columns)`, the columns in the
    /// order `postgres::RESULTS_INSERT` gives), on the server: the rows never
    /// reach this process. `conn` is a connection of this store's pool (the
    /// output's own); up to `sessions` less one free connections of the
    /// pool load a share of the rows beside it from the same snapshot, each
    /// share committing on its own (so with more than one, `into` must be a
    /// table that other sessions can see and readers do not see yet). With
    /// a second table (like the results table), each decoded VIN's latest
    /// decode goes there too, one row per VIN, for the vehicles upsert.
    /// Returns the rows written; `None` on SQLite.
    pub async fn results_into(
        &self,
        conn: &mut sqlx::PgConnection,
        (job_id, mode): (i64, RecallMode),
        into: (&str, Option<&str>),
        sessions: usize,
    ) -> Result<Option<u64>, StoreError> {
        match &self.db {
            Db::Pg(pool) => {
                Ok(Some(postgres::results_into(pool, conn, (job_id, mode.as_str()), into, sessions).await?))
            }
            Db::Lite { .. } => Ok(None),
        }
    }

    /// The Parquet type of each carried column, from the values the job
    /// holds: as its planning recorded them, or, for a source planned
    /// before that record was kept, from every row.
    pub async fn carried_types(&self, job_id: i64, carry: &[String]) -> Result<Vec<(String, CarriedType)>, StoreError> {
        let recorded = self.rows("SELECT carried_seen FROM job_sources WHERE job_id = $1", args![job_id]).await?;
        let mut all = CarriedSeen::default();
        for r in &recorded {
            let seen = if r.is_null(0) {
                None
            } else {
                serde_json::from_value::<Option<CarriedSeen>>(r.json(0)?).ok().flatten()
            };
            match seen {
                Some(seen) => all.merge(&seen),
                None => return self.carried_types_scanned(job_id, carry).await,
            }
        }
        if recorded.is_empty() {
            return self.carried_types_scanned(job_id, carry).await;
        }
        Ok(carry.iter().map(|name| (name.clone(), all.infer(name))).collect())
    }

    /// [`Store::carried_types`] from every row's carried values.
    async fn carried_types_scanned(
        &self,
        job_id: i64,
        carry: &[String],
    ) -> Result<Vec<(String, CarriedType)>, StoreError> {
        let seen = self
            .rows(self.pick(postgres::CARRIED_TYPES.as_str(), sqlite::CARRIED_TYPES.as_str()), args![job_id])
            .await?;
        carry
            .iter()
            .map(|name| {
                let Some(r) = seen.iter().find(|r| r.text(0).is_ok_and(|k| &k == name)) else {
                    return Ok((name.clone(), CarriedType::Text));
                };
                Ok((name.clone(), CarriedType::infer(&r.texts(1)?, r.bool(2)?)))
            })
            .collect()
    }

    /// The `dt` partition of the job's output: a scheduled run's logical
    /// date, else the job's creation date (UTC).
    pub async fn job_date(&self, job_id: i64) -> Result<NaiveDate, StoreError> {
        let r = self.one("SELECT {epoch created_at}, logical_date FROM jobs WHERE job_id = $1", args![job_id]).await?;
        if let Some(d) = r.opt_text(1)?.and_then(|d| d.parse().ok()) {
            return Ok(d);
        }
        let secs = r.opt_real(0)?.unwrap_or_default();
        Ok(DateTime::from_timestamp(secs as i64, 0).unwrap_or_default().date_naive())
    }

    /// Makes this process the writer of job `job_id`, which is `writing`:
    /// returns the new writer's token, which its heartbeats and its end
    /// must show (`None`: the job is not writing). Only for a writer that
    /// the job's state gave the write alone (the step to `writing`, or a
    /// rewrite an operator started); a takeover is [`Store::orphaned_write`].
    pub async fn take_write(&self, job_id: i64) -> Result<Option<String>, StoreError> {
        let writer = format!("writer-{job_id}-{:016x}", fastrand::u64(..));
        let n = self
            .exec(
                "UPDATE jobs SET writer = $2, updated_at = now() WHERE job_id = $1 AND state = 'writing'",
                args![job_id, &writer],
            )
            .await?;
        Ok((n > 0).then_some(writer))
    }

    /// The output writer `writer` is alive: keeps another worker from
    /// taking over. False if it is no longer the job's writer (its lease
    /// ran out and another took the job over, or the job left `writing`):
    /// it must stop.
    pub async fn heartbeat(&self, job_id: i64, writer: &str) -> Result<bool, StoreError> {
        let n = self
            .exec(
                "UPDATE jobs SET updated_at = now() WHERE job_id = $1 AND state = 'writing' AND writer = $2",
                args![job_id, writer],
            )
            .await?;
        Ok(n > 0)
    }

    /// Takes the commit lock of output place `place` (a dataset partition)
    /// for `lease_secs`, as `holder` (a random name for this holding), if no
    /// other holding's lease runs: true if taken. Released by
    /// [`Store::unlock_output`]; a writer that died frees it when its lease
    /// runs out.
    pub async fn lock_output(
        &self,
        place: &str,
        holder: &str,
        job_id: i64,
        lease_secs: f64,
    ) -> Result<bool, StoreError> {
        let taken = self
            .row(
                "INSERT INTO output_locks (place, holder, job_id, until) VALUES ($1, $2, $3, now() + {secs $4})
                 ON CONFLICT (place) DO UPDATE SET holder = excluded.holder, job_id = excluded.job_id,
                     until = excluded.until
                 WHERE output_locks.until < now()
                 RETURNING holder",
                args![place, holder, job_id, lease_secs],
            )
            .await?;
        Ok(taken.is_some())
    }

    /// Extends `holder`'s commit lock of `place` by `lease_secs` from now:
    /// false if it no longer holds it (its lease ran out and another took it).
    pub async fn renew_output(&self, place: &str, holder: &str, lease_secs: f64) -> Result<bool, StoreError> {
        let n = self
            .exec(
                "UPDATE output_locks SET until = now() + {secs $3} WHERE place = $1 AND holder = $2",
                args![place, holder, lease_secs],
            )
            .await?;
        Ok(n > 0)
    }

    /// Releases `holder`'s commit lock of `place` (if it still holds it).
    pub async fn unlock_output(&self, place: &str, holder: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM output_locks WHERE place = $1 AND holder = $2", args![place, holder]).await?;
        Ok(())
    }

    /// Whether any of the job's batches is queued or running.
    pub async fn busy(&self, job_id: i64) -> Result<bool, StoreError> {
        self.one(BUSY, args![job_id]).await?.bool(0)
    }

    /// Moves a job on when its last batch has ended: plans its recall
    /// lookups (once, in `mode`, reusing those younger than `recall_ttl_hours`),
    /// then hands it to an output writer (`has_outputs`) or marks it done.
    /// The job's row lock (SQLite: the write lock) makes exactly one caller
    /// see each step.
    pub async fn advance(
        &self,
        job_id: i64,
        mode: RecallMode,
        recall_ttl_hours: f64,
        has_outputs: bool,
    ) -> Result<Next, StoreError> {
        // Called after every batch: while others remain (nearly always),
        // say so without taking the lock.
        if self.busy(job_id).await? {
            return Ok(Next::Nothing);
        }
        let mut tx = self.write().await?;
        let Some(job) = tx
            .row(
                "SELECT state, batches_planned, recalls_planned, paused_at IS NOT NULL FROM jobs WHERE job_id = $1
                 {for update}",
                args![job_id],
            )
            .await?
        else {
            return Ok(Next::Nothing);
        };
        // A paused job moves on when it is resumed (`vinetl resume` advances it).
        if !matches!(job.text(0)?.as_str(), "running" | "waiting") || !job.bool(1)? || job.bool(3)? {
            return Ok(Next::Nothing);
        }
        // Again under the lock: another process may have ended the last batch meanwhile.
        if tx.one(BUSY, args![job_id]).await?.bool(0)? {
            return Ok(Next::Nothing);
        }
        if mode != RecallMode::Off && !job.bool(2)? {
            let (keys, made) = match &mut tx {
                Tx::Pg(_) => {
                    let r = tx.one(&postgres::PLAN_RECALLS, args![job_id, mode.as_str(), recall_ttl_hours]).await?;
                    (r.int(0)?, r.int(1)?)
                }
                Tx::Lite(t, _) => sqlite::plan_recalls(t, job_id, mode, recall_ttl_hours).await?,
            };
            tx.exec(
                "UPDATE jobs SET recalls_planned = true, recall_lookups = $2, recall_cache_hits = $3,
                         updated_at = now()
                     WHERE job_id = $1",
                args![job_id, keys, keys - made],
            )
            .await?;
            if made > 0 {
                tx.commit().await?;
                self.moved();
                return Ok(Next::Enqueue);
            }
        }
        if mode != RecallMode::Off {
            let sql = tx.pick(&postgres::SUMMARISE_RECALLS, &sqlite::SUMMARISE_RECALLS);
            tx.exec(sql, args![job_id, mode.as_str()]).await?;
        }
        let (next, state) = if has_outputs { (Next::Write, "writing") } else { (Next::Done, "done") };
        tx.exec(
            "UPDATE jobs SET state = $2, updated_at = now(), state_reason = NULL, resume_at = NULL,
                     finished_at = CASE WHEN $2 = 'done' THEN now() ELSE finished_at END,
                     write_started_at = CASE WHEN $2 = 'writing' THEN now() ELSE write_started_at END,
                     calls_ended_at = now()
                 WHERE job_id = $1",
            args![job_id, state],
        )
        .await?;
        tx.commit().await?;
        self.moved();
        Ok(next)
    }

    /// The spec a job was submitted with, or why it cannot be read.
    pub async fn job_spec(&self, job_id: i64) -> Result<Result<crate::spec::JobSpec, String>, StoreError> {
        let row = self
            .row("SELECT spec FROM jobs WHERE job_id = $1", args![job_id])
            .await?
            .ok_or(StoreError::NoJob(job_id))?;
        // What is stored is input: checked again as a spec file is (names
        // that reach DDL, URLs, key variables), whoever wrote the row.
        let spec: crate::spec::JobSpec = match serde_json::from_value(row.json(0)?) {
            Ok(spec) => spec,
            Err(e) => return Ok(Err(format!("stored spec of job {job_id} is unreadable: {e}"))),
        };
        Ok(spec.validate(&format!("stored spec of job {job_id}")).map(|()| spec).map_err(|e| e.to_string()))
    }

    /// Replaces a job's stored spec (an embedded server's new address).
    pub async fn update_spec(&self, job_id: i64, spec: &Value) -> Result<(), StoreError> {
        self.exec("UPDATE jobs SET spec = $2 WHERE job_id = $1", args![job_id, spec]).await?;
        Ok(())
    }

    /// Puts an ended job into `writing` to write its outputs again from the
    /// stored results; when its calls ended is kept (for a job that failed or
    /// was cancelled, or ran before vinetl recorded it: when it last started
    /// writing, or ended). False if it has not ended (or has no calls planned).
    /// `replace_newer`: see [`Store::replaces_newer`].
    pub async fn begin_rewrite(&self, job_id: i64, replace_newer: bool) -> Result<bool, StoreError> {
        let n = self
            .exec(
                "UPDATE jobs SET state = 'writing', write_started_at = now(), state_reason = NULL, updated_at = now(),
                     replace_newer = $2,
                     calls_ended_at = coalesce(calls_ended_at, write_started_at, finished_at)
                 WHERE job_id = $1 AND state IN ('done', 'failed', 'cancelled') AND batches_planned
                   AND pruned_at IS NULL AND NOT EXISTS (SELECT 1 FROM batches WHERE job_id = $1 AND state IN ('queued', 'running'))",
                args![job_id, replace_newer],
            )
            .await?;
        Ok(n > 0)
    }

    /// Whether the job's current run may replace a dataset partition that a
    /// later job has written since: its operator said `--force` to the
    /// `vinetl write` or `vinetl reprocess` that started it. Kept on the job,
    /// so that whichever process writes its outputs does as asked.
    pub async fn replaces_newer(&self, job_id: i64) -> Result<bool, StoreError> {
        let row = self.row("SELECT replace_newer FROM jobs WHERE job_id = $1", args![job_id]).await?;
        Ok(row.map(|r| r.bool(0)).transpose()?.unwrap_or(false))
    }

    /// Takes over one job left in `writing` by a writer that stopped
    /// beating: its id and the new writer's token. One at a time, so that
    /// a job waits in no process's list while its lease runs out again.
    pub async fn orphaned_write(&self, lease_secs: f64) -> Result<Option<(i64, String)>, StoreError> {
        let writer = format!("writer-{:016x}", fastrand::u64(..));
        let row = self
            .row(
                "UPDATE jobs SET updated_at = now(), writer = $2
                 WHERE job_id = (SELECT job_id FROM jobs
                                 WHERE state = 'writing' AND updated_at < now() - {secs $1}
                                 ORDER BY job_id LIMIT 1)
                   AND state = 'writing' AND updated_at < now() - {secs $1}
                 RETURNING job_id",
                args![lease_secs, &writer],
            )
            .await?;
        row.map(|r| Ok((r.int(0)?, writer))).transpose()
    }

    /// The outputs are written by `writer`: the job is done (unless
    /// another writer has taken the job over; that one ends it).
    pub async fn finish_writing(&self, job_id: i64, outputs: &[String], writer: &str) -> Result<(), StoreError> {
        let done = self
            .exec(
                "UPDATE jobs SET state = 'done', outputs_written = $2, finished_at = now(), updated_at = now(),
                     state_reason = NULL, writer = NULL
                 WHERE job_id = $1 AND state = 'writing' AND writer = $3",
                args![job_id, outputs, writer],
            )
            .await?;
        if done > 0 {
            self.moved();
        }
        Ok(())
    }

    /// A job's state, reason, pruning and outputs, from its row alone: what
    /// `write` and `reprocess` check before they start, without the counts'
    /// read of every row of the job (5.6 s at 10,000,000 rows).
    pub async fn standing(&self, job_id: i64) -> Result<Option<Standing>, StoreError> {
        let row = self
            .row(
                "SELECT state, state_reason, {epoch pruned_at}, outputs_written FROM jobs WHERE job_id = $1",
                args![job_id],
            )
            .await?;
        row.map(|r| {
            Ok(Standing {
                state: r.text(0)?,
                state_reason: r.opt_text(1)?,
                pruned_at: rfc3339(r.opt_real(2)?),
                outputs: r.texts(3)?,
            })
        })
        .transpose()
    }

    /// Where a job's outputs went (`None`: no such job).
    pub async fn job_outputs(&self, job_id: i64) -> Result<Option<Vec<String>>, StoreError> {
        let row = self.row("SELECT outputs_written FROM jobs WHERE job_id = $1", args![job_id]).await?;
        row.map(|r| r.texts(0)).transpose()
    }

    /// Rewrites that list (an output superseded by a later job).
    pub async fn set_outputs(&self, job_id: i64, outputs: &[String]) -> Result<(), StoreError> {
        self.exec("UPDATE jobs SET outputs_written = $2 WHERE job_id = $1", args![job_id, outputs]).await?;
        Ok(())
    }

    /// Writing by `writer` failed: the job fails with the reason (unless
    /// another writer has taken it over: that one ends it); every call's
    /// result is kept, so `vinetl reprocess` writes again without calling.
    pub async fn fail_writing(&self, job_id: i64, reason: &str, writer: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let failed = tx
            .exec(
                "UPDATE jobs SET state = 'failed', state_reason = $2, finished_at = now(), updated_at = now(),
                     writer = NULL
                 WHERE job_id = $1 AND state = 'writing' AND writer = $3",
                args![job_id, reason, writer],
            )
            .await?;
        if failed > 0 {
            tx.exec(
                "INSERT INTO errors (job_id, error_code, error_text) VALUES ($1, 'output_failed', $2)",
                args![job_id, reason],
            )
            .await?;
        }
        tx.commit().await?;
        if failed > 0 {
            self.moved();
        }
        Ok(())
    }

    /// Puts an ended job back to work as its next run (the run that ended
    /// is kept in `job_runs`): the rows `redo` selects (every valid row, its
    /// failed rows, those of some VINs) go back to pending; rows whose VIN
    /// has a fresh, successful decode in the cache take it at no cost
    /// (unless `redo.refresh`); the rest get new batches. Recall lookups are planned again (the cache answers fresh
    /// ones) and the outputs are rewritten. Returns the new batch count, or
    /// `None` if the job is still running, a call of it is still out, or it
    /// does not exist.
    pub async fn reprocess(
        &self,
        job_id: i64,
        redo: &Redo,
        batch_size: i32,
        cache_ttl_hours: f64,
        call_lease_secs: f64,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.write().await?;
        // A cancelled job's call still out lands (or fails) on its own
        // batch: its rows are not cut into a second batch and called twice.
        // The batches are locked first, in the lock order.
        if lock_batches(&mut tx, job_id, &["running"]).await? > 0 {
            return Ok(None);
        }
        // So does a failed job's: failing a job ends its batches `dead`, a
        // call out keeping its mark until it lands. Within `call_lease_secs`
        // it may still land; after that it is counted as lost. Locked, so an
        // answer landing meanwhile waits for this decision and is seen by
        // the next one.
        let out = tx
            .one(
                "SELECT count(*) FROM (SELECT 1 FROM batches
                     WHERE job_id = $1 AND state = 'dead' AND in_call AND updated_at > now() - {secs $2}
                     ORDER BY batch_no {for update}) l",
                args![job_id, call_lease_secs],
            )
            .await?
            .int(0)?;
        if out > 0 {
            return Ok(None);
        }
        let ended = tx
            .row(
                "SELECT state IN ('done', 'failed', 'cancelled') AND pruned_at IS NULL FROM jobs WHERE job_id = $1
                 {for update}",
                args![job_id],
            )
            .await?;
        if !ended.map(|r| r.bool(0)).transpose()?.unwrap_or(false) {
            return Ok(None);
        }
        // The run that ended joins the job's history before this one begins.
        let Some(prev) = job_counts(&mut tx, job_id).await? else { return Ok(None) };
        let outcome = json!({
            "state_reason": prev.state_reason, "rows": prev.rows, "decoded": prev.decoded,
            "failed": prev.failed, "calls_made": prev.calls_made,
        });
        tx.exec(
            "INSERT INTO job_runs (job_id, run_no, how, state, started_at, finished_at, summary)
             SELECT job_id, run_no, run_how, state, started_at, finished_at, $2 FROM jobs WHERE job_id = $1",
            args![job_id, outcome],
        )
        .await?;
        let vins = redo.vins.clone().unwrap_or_default();
        tx.exec(
            "UPDATE job_inputs SET status = 'pending', error_code = NULL, error_text = NULL, decoded_at = NULL
                 WHERE job_id = $1 AND status <> 'invalid' AND (NOT $2 OR status = 'failed')
                   AND (NOT $3 OR vin {in $4})",
            args![job_id, redo.failed_only, redo.vins.is_some(), vins],
        )
        .await?;
        if !redo.refresh {
            tx.exec(
                "UPDATE job_inputs SET status = 'decoded', decoded_at = c.decoded_at
                     FROM vin_cache c
                     WHERE job_inputs.job_id = $1 AND job_inputs.status = 'pending' AND c.vin = job_inputs.vin
                       AND c.error_code IS NULL AND c.decoded_at > now() - {secs $2 * 3600}",
                args![job_id, cache_ttl_hours],
            )
            .await?;
        }
        // The new run starts before its batches are cut, so every batch of
        // it is stamped at or after `started_at` (SQLite's clock moves
        // within a transaction), which is how `failures` tells them apart.
        tx.exec(
            "UPDATE jobs SET state = 'running', state_reason = NULL, resume_at = NULL, finished_at = NULL,
                     paused_at = NULL,
                     started_at = now(), planned_at = now(), write_started_at = NULL, calls_ended_at = NULL,
                     recalls_planned = false,
                     outputs_written = NULL, rows_with_recalls = NULL, rows_recalls_unknown = NULL,
                     campaigns_found = NULL, run_no = run_no + 1, run_how = $2, replace_newer = $3,
                     updated_at = now()
                 WHERE job_id = $1",
            args![job_id, redo.describe(), redo.replace_newer],
        )
        .await?;
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        tx.commit().await?;
        Ok(Some(batches))
    }

    /// Batches whose queue task was lost: claimed by a worker that died
    /// mid-call (taken back after the lease), or rescheduled but never pushed.
    /// A cancelled job's batch whose worker died mid-call ends here too,
    /// after the lease: cancelled, its rows failed as the cancel failed the
    /// others (its call stays counted as lost).
    pub async fn lost_tasks(&self) -> Result<Vec<(i64, i32, i32)>, StoreError> {
        let mut tx = self.write().await?;
        // One pass over the running batches of the jobs that can have them,
        // found from the jobs (few) through `(job_id, state)`: a cancelled
        // job's batch ends cancelled, another's is queued again.
        let taken = tx
            .rows(
                "UPDATE batches SET state = CASE WHEN j.state = 'cancelled' THEN 'cancelled' ELSE 'queued' END,
                     enqueued = CASE WHEN j.state = 'cancelled' THEN batches.enqueued ELSE false END,
                     generation = CASE WHEN j.state = 'cancelled' THEN batches.generation ELSE batches.generation + 1 END,
                     updated_at = now()
                 FROM jobs j
                 WHERE j.job_id = batches.job_id AND j.state IN ('running', 'waiting', 'cancelled')
                   AND batches.state = 'running'
                   AND batches.updated_at < now() - {secs 2 * {jsonf j.spec provider.timeout_secs} + 30}
                 RETURNING batches.job_id, batches.batch_no, batches.generation, batches.state, batches.vins",
                args![],
            )
            .await?;
        let mut lost = Vec::with_capacity(taken.len());
        for b in taken {
            if b.text(3)? == "cancelled" {
                tx.exec(CANCEL_ROWS, args![b.int(0)?, b.texts(4)?]).await?;
            } else {
                lost.push(b);
            }
        }
        lost.extend(
            tx.rows(
                "SELECT b.job_id, b.batch_no, b.generation FROM batches b JOIN jobs j ON j.job_id = b.job_id
                     WHERE j.state IN ('running', 'waiting') AND b.state = 'queued' AND NOT b.enqueued
                       AND b.updated_at < now() - {secs 10}",
                args![],
            )
            .await?,
        );
        tx.commit().await?;
        lost.iter().map(|r| Ok((r.int(0)?, r.int32(1)?, r.int32(2)?))).collect()
    }

    // ------------------------------------------------------------ limiter

    /// Creates or updates the account's limiter row (a changed rate or
    /// quota applies from the next reservation on).
    pub async fn limiter_register(&self, p: &ProviderSpec) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO limiter (account, rate, burst, daily_quota, quota_reset, max_in_flight)
                 VALUES ($1, $2, $3, $4, {secs $5}, $6)
                 ON CONFLICT (account) DO UPDATE SET rate = excluded.rate, burst = excluded.burst,
                     daily_quota = excluded.daily_quota, quota_reset = excluded.quota_reset,
                     max_in_flight = excluded.max_in_flight, updated_at = now()",
            args![
                p.account(),
                p.requests_per_second,
                p.burst(),
                p.daily_quota.map(|q| q as i64),
                f64::from(p.quota_reset_minutes()) * 60.0,
                p.max_in_flight.map(|n| i64::from(n.max(1)))
            ],
        )
        .await?;
        Ok(())
    }

    /// Reserves `k` calls for `account` at `now` (Unix seconds; `None`: the
    /// store's clock): how many were granted, else how long to wait and why;
    /// the time of the decision; and the flight rows under an in-flight cap.
    pub async fn limiter_reserve(
        &self,
        account: &str,
        k: i64,
        lease_secs: f64,
        now: Option<f64>,
    ) -> Result<(i64, f64, Option<String>, f64, Vec<i64>), StoreError> {
        let Db::Lite { .. } = &self.db else {
            let r = self.one(postgres::LIMITER_RESERVE, args![account, k, lease_secs, now]).await?;
            let flights = serde_json::from_value(r.json(4)?).map_err(|e| StoreError::Decode(e.to_string()))?;
            return Ok((
                r.int(0)?,
                r.opt_real(1)?.unwrap_or(0.0),
                r.opt_text(2)?,
                r.opt_real(3)?.unwrap_or(0.0),
                flights,
            ));
        };
        let mut tx = self.write().await?;
        let Tx::Lite(t, _) = &mut tx else { unreachable!("a SQLite store's transactions are SQLite's") };
        let reserved = sqlite::limiter_reserve(t, account, k, lease_secs, now).await?;
        tx.commit().await?;
        Ok(reserved)
    }

    /// Gives `n` reserved but unused calls back to the quota day they were
    /// granted in (never to an ended day). A grant made while the circuit
    /// was open (strictly after it opened: a probe is due a second later at
    /// the soonest) was its probe: given back unused, the next probe may go
    /// at once instead of a lease later.
    pub async fn limiter_refund(&self, account: &str, n: i64, granted_at: f64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE limiter SET
                 day_used = CASE WHEN quota_day_start <= {ts $3} THEN greatest(0, day_used - $2) ELSE day_used END,
                 circuit_probe_at = CASE WHEN circuit_since < {ts $3} AND circuit_probe_at > {ts $3} THEN {ts $3}
                                         ELSE circuit_probe_at END
             WHERE account = $1",
            args![account, n, granted_at],
        )
        .await?;
        Ok(())
    }

    pub async fn limiter_release(&self, flight: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM limiter_flights WHERE flight_id = $1", args![flight]).await?;
        Ok(())
    }

    /// A 429: no caller before `retry_after` seconds (only ever moved
    /// later); without one the rate halves (to `min_scale` at least) and
    /// everyone waits one new interval.
    ///
    /// Without `Retry-After`, a 429 to a call granted (`granted_at`, Unix
    /// seconds) after the rate was last halved halves it again and counts
    /// one more throttle in a row; the push-back is one new interval plus
    /// 0, 1, 3, 7 … seconds by that count, at most `max_backoff`. A 429 to
    /// a call granted before then (or in its millisecond) changes nothing:
    /// it answers a call sent before the cut. Returns the seconds until calls may start again.
    pub async fn limiter_push_back(
        &self,
        account: &str,
        retry_after: Option<f64>,
        (min_scale, max_backoff): (f64, f64),
        granted_at: f64,
    ) -> Result<f64, StoreError> {
        let row = match retry_after {
            Some(secs) => {
                self.row(
                    "UPDATE limiter SET blocked_until = greatest(blocked_until, clock_timestamp() + {secs $2}),
                             updated_at = now()
                         WHERE account = $1
                         RETURNING {epoch blocked_until} - {epoch clock_timestamp()}",
                    args![account, secs],
                )
                .await?
            }
            None => {
                self.row(
                    "UPDATE limiter SET
                             scale = CASE WHEN scaled_at IS NULL OR scaled_at < {ts $3}
                                 THEN greatest($2, scale / 2) ELSE scale END,
                             throttles = CASE WHEN scaled_at IS NULL OR scaled_at < {ts $3}
                                 THEN throttles + 1 ELSE throttles END,
                             scaled_at = CASE WHEN scaled_at IS NULL OR scaled_at < {ts $3}
                                 THEN clock_timestamp() ELSE scaled_at END,
                             blocked_until = CASE WHEN scaled_at IS NULL OR scaled_at < {ts $3}
                                 THEN greatest(blocked_until, clock_timestamp()
                                     + {secs 1.0 / (rate * greatest($2, scale / 2))
                                             + least($4, (1 << least(throttles, 20)) - 1)})
                                 ELSE blocked_until END,
                             updated_at = now()
                         WHERE account = $1
                         RETURNING {epoch blocked_until} - {epoch clock_timestamp()}",
                    args![account, min_scale, granted_at, max_backoff],
                )
                .await?
            }
        };
        Ok(row.map(|r| r.opt_real(0)).transpose()?.flatten().unwrap_or(0.0).max(0.0))
    }

    /// The API answered (a success recovers `step` of a reduced rate): the
    /// circuit closes. No write at all in the usual case.
    pub async fn limiter_answered(&self, account: &str, success: bool, step: f64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE limiter SET scale = CASE WHEN $2 THEN least(1, scale + $3) ELSE scale END,
                     throttles = CASE WHEN $2 THEN 0 ELSE throttles END,
                     circuit_since = NULL, circuit_failures = 0, circuit_reason = NULL, server_errors = 0
                 WHERE account = $1
                   AND (($2 AND (scale < 1 OR throttles > 0)) OR circuit_since IS NOT NULL OR server_errors > 0)",
            args![account, success, step],
        )
        .await?;
        Ok(())
    }

    /// One more 5xx (or timeout) in a row; returns the run's length.
    pub async fn limiter_server_error(&self, account: &str) -> Result<i64, StoreError> {
        self.one(
            "UPDATE limiter SET server_errors = server_errors + 1 WHERE account = $1
                 RETURNING CAST(server_errors AS BIGINT)",
            args![account],
        )
        .await?
        .int(0)
    }

    /// Opens (or keeps open) the account's circuit: the next probe backs
    /// off 1, 2, 4 … `max_gap` seconds; `refund` quota units, granted at
    /// `granted_at` (Unix seconds), come back to that quota day if it is
    /// still the row's (as [`limiter_refund`](Self::limiter_refund)). A
    /// call granted before the circuit's last trip (or in its millisecond:
    /// SQLite's clock reads milliseconds) was in flight with the call that
    /// tripped it: its failure moves neither the probe nor the count of
    /// failures.
    pub async fn limiter_trip(
        &self,
        account: &str,
        reason: &str,
        max_gap: i64,
        refund: i64,
        granted_at: f64,
    ) -> Result<(), StoreError> {
        self.exec(
            "UPDATE limiter SET circuit_since = coalesce(circuit_since, clock_timestamp()),
                     circuit_probe_at = CASE
                         WHEN circuit_since IS NULL OR circuit_tripped_at IS NULL OR circuit_tripped_at < {ts $5}
                         THEN clock_timestamp() + {secs least($3, 1 << least(circuit_failures, 10))}
                         ELSE circuit_probe_at END,
                     circuit_failures = CASE
                         WHEN circuit_since IS NULL OR circuit_tripped_at IS NULL OR circuit_tripped_at < {ts $5}
                         THEN circuit_failures + 1 ELSE circuit_failures END,
                     circuit_tripped_at = CASE
                         WHEN circuit_since IS NULL OR circuit_tripped_at IS NULL OR circuit_tripped_at < {ts $5}
                         THEN clock_timestamp() ELSE circuit_tripped_at END,
                     circuit_reason = $2, server_errors = 0,
                     day_used = CASE WHEN quota_day_start <= {ts $5} THEN greatest(0, day_used - $4) ELSE day_used END
                 WHERE account = $1",
            args![account, reason, max_gap, refund, granted_at],
        )
        .await?;
        Ok(())
    }

    /// The account's circuit: open since (Unix seconds; `None`: closed),
    /// next probe, last failure.
    pub async fn limiter_circuit(&self, account: &str) -> Result<Option<(f64, f64, String)>, StoreError> {
        let row = self.row(
                "SELECT {epoch circuit_since}, {epoch circuit_probe_at}, circuit_reason FROM limiter WHERE account = $1",
                args![account],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(r.opt_real(0)?.map(|since| {
            (since, r.opt_real(1).ok().flatten().unwrap_or(since), r.opt_text(2).ok().flatten().unwrap_or_default())
        }))
    }
}

/// The counts `status` shows, read in `tx`. A pruned job's are the ones
/// frozen when it was pruned.
async fn job_counts(tx: &mut Tx, job_id: i64) -> Result<Option<JobCounts>, StoreError> {
    // The job's own row, once: state, call counters, recall figures, times.
    let Some(job) = tx
        .row(
            "SELECT name, state, state_reason, calls_made, calls_retried, rate_limited,
                    {json spec recalls.enabled}, outputs_written,
                    recall_lookups, recall_cache_hits, recall_calls, rows_with_recalls, rows_recalls_unknown,
                    campaigns_found,
                    (SELECT count(*) FROM batches WHERE job_id = $1 AND kind = 'recall' AND state = 'dead'),
                    {epoch created_at}, {epoch started_at}, {epoch planned_at}, {epoch write_started_at},
                    {epoch finished_at}, {epoch pruned_at}, summary,
                    calls_answered, calls_server_error, calls_timed_out, spec, {epoch paused_at}, run_no, run_how,
                    {epoch resume_at}, {epoch calls_ended_at}
             FROM jobs WHERE job_id = $1",
            args![job_id],
        )
        .await?
    else {
        return Ok(None);
    };
    if !job.is_null(21) {
        let mut frozen: JobCounts = serde_json::from_value(job.json(21)?)
            .map_err(|e| StoreError::Decode(format!("job {job_id}'s frozen counts: {e}")))?;
        frozen.pruned_at = rfc3339(job.opt_real(20)?);
        return Ok(Some(frozen));
    }
    let rows = tx
        .one(
            "SELECT count(*), count(vin), count(*) FILTER (WHERE plan = 'duplicate'),
                    count(*) FILTER (WHERE plan = 'cache_hit'), count(*) FILTER (WHERE status = 'decoded'),
                    count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'pending')
             FROM job_inputs WHERE job_id = $1",
            args![job_id],
        )
        .await?;
    let invalid = tx
        .rows(
            "SELECT error_code, count(*) FROM job_inputs WHERE job_id = $1 AND status = 'invalid'
             GROUP BY error_code ORDER BY error_code",
            args![job_id],
        )
        .await?;
    let batches = tx
        .one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'dead'),
                    CAST(coalesce(sum({len vins}) FILTER (WHERE state = 'dead'), 0) AS BIGINT)
             FROM batches WHERE job_id = $1 AND kind = 'decode'
               -- The current run's: an earlier run's batches were last touched before it started.
               AND updated_at >= (SELECT started_at FROM jobs WHERE job_id = $1)",
            args![job_id],
        )
        .await?;
    // Calls sent whose outcome no statement stored: lost (the batch moved
    // on without it, or its next call began), or still in flight.
    let unstored = tx
        .one(
            "SELECT CAST(coalesce(sum(calls_lost), 0) AS BIGINT)
                        + count(*) FILTER (WHERE in_call AND state <> 'running'),
                    count(*) FILTER (WHERE in_call AND state = 'running'),
                    count(*) FILTER (WHERE state IN ('queued', 'running'))
             FROM batches WHERE job_id = $1",
            args![job_id],
        )
        .await?;
    let (answer_lost, in_flight, calls_left) = (unstored.int(0)?, unstored.int(1)?, unstored.int(2)?);
    let stored = job.int(3)?;
    let rate_limited = job.int(5)?;
    let calls = CallCounts {
        answered: job.int(22)?,
        rate_limited,
        server_error: job.int(23)?,
        timed_out: job.int(24)?,
        other_error: (stored - job.int(22)? - rate_limited - job.int(23)? - job.int(24)?).max(0),
        answer_lost,
        in_flight,
    };
    let account = serde_json::from_value::<ProviderSpec>(job.json(25)?["provider"].clone()).ok().map(|p| p.account());
    let quota = match account {
        Some(account) => quota_today(tx, &account).await?,
        None => None,
    };
    let decoded = rows.int(4)?;
    let recall_calls = job.int(10)?;
    let recalls = job.bool(6)?.then(|| -> Result<RecallCounts, StoreError> {
        Ok(RecallCounts {
            lookups: job.int(8)?,
            cache_hits: job.int(9)?,
            calls: recall_calls,
            failed: job.int(14)?,
            rows_with_recalls: job.opt_int(11)?,
            rows_unknown: job.opt_int(12)?,
            campaigns: job.opt_int(13)?,
            calls_saved: (decoded - recall_calls).max(0),
        })
    });
    let earlier_runs = earlier_runs(tx, job_id).await?;
    let (mut state, mut state_reason) = (job.text(1)?, job.opt_text(2)?);
    let resume_at = rfc3339(job.opt_real(29)?).filter(|_| state == "waiting");
    let active = matches!(state.as_str(), "running" | "waiting") && job.is_null(26);
    let eta_secs = eta_secs(calls_left, quota.as_ref()).filter(|_| active).map(|s| s.round());
    let paused_at = job.opt_real(26)?.and_then(|s| DateTime::from_timestamp(s as i64, 0));
    if let Some(at) = paused_at.filter(|_| matches!(state.as_str(), "planning" | "running" | "waiting")) {
        let at = at.format("%Y-%m-%d %H:%M:%S UTC");
        state_reason = Some(format!(
            "paused by an operator at {at} (was {state}); `vinetl resume {job_id}` goes on where it stopped"
        ));
        state = "paused".to_string();
    }
    Ok(Some(JobCounts {
        job_id,
        name: job.text(0)?,
        state,
        state_reason,
        run_no: job.int(27)?,
        run_how: job.text(28)?,
        earlier_runs,
        resume_at,
        calls_left,
        eta_secs,
        rows: rows.int(0)?,
        valid: rows.int(1)?,
        invalid: invalid.iter().map(|r| Ok((r.text(0)?, r.int(1)?))).collect::<Result<_, StoreError>>()?,
        duplicates: rows.int(2)?,
        cache_hits: rows.int(3)?,
        decoded,
        failed: rows.int(5)?,
        pending: rows.int(6)?,
        batches: batches.int(0)?,
        batches_done: batches.int(1)?,
        dead_lettered_batches: batches.int(2)?,
        dead_lettered_vins: batches.int(3)?,
        calls_made: stored + answer_lost + in_flight,
        calls_retried: job.int(4)?,
        rate_limited,
        calls,
        quota,
        recalls: recalls.transpose()?,
        outputs: job.texts(7)?,
        pruned_at: None,
        times: JobTimes::from_epochs([
            job.opt_real(15)?,
            job.opt_real(16)?,
            job.opt_real(17)?,
            job.opt_real(18)?,
            job.opt_real(19)?,
            job.opt_real(30)?,
        ]),
    }))
}

/// A job's ended runs before the current one, oldest first.
async fn earlier_runs(tx: &mut Tx, job_id: i64) -> Result<Vec<RunSummary>, StoreError> {
    let runs = tx
        .rows(
            "SELECT run_no, how, state, {epoch started_at}, {epoch finished_at}, summary
             FROM job_runs WHERE job_id = $1 ORDER BY run_no",
            args![job_id],
        )
        .await?;
    runs.iter()
        .map(|r| {
            let (started_at, finished_at) = (rfc3339(r.opt_real(3)?), rfc3339(r.opt_real(4)?));
            let outcome = r.json(5)?;
            let n = |k: &str| outcome[k].as_i64().unwrap_or(0);
            Ok(RunSummary {
                run_no: r.int(0)?,
                how: r.text(1)?,
                state: r.text(2)?,
                state_reason: outcome["state_reason"].as_str().map(str::to_string),
                started_at,
                finished_at,
                rows: n("rows"),
                decoded: n("decoded"),
                failed: n("failed"),
                calls_made: n("calls_made"),
            })
        })
        .collect()
}

/// The quota units `account` used today, when its quota day ends, the rate
/// the shared limiter grants it now, and any 429 push-back in force.
async fn quota_today(tx: &mut Tx, account: &str) -> Result<Option<QuotaToday>, StoreError> {
    let sql = tx.pick(
        "SELECT day_used, daily_quota, {epoch quota_day_start}, {epoch quota_reset}, {epoch now()}, rate * scale,
                {epoch blocked_until}
         FROM limiter WHERE account = $1",
        "SELECT day_used, daily_quota, quota_day_start, quota_reset, unixepoch('subsec'), rate * scale, blocked_until
         FROM limiter WHERE account = $1",
    );
    let Some(r) = tx.row(sql, args![account]).await? else { return Ok(None) };
    let (reset, t) = (r.opt_real(3)?.unwrap_or(0.0), r.opt_real(4)?.unwrap_or(0.0));
    // The same quota day as the limiter's (store/bucket.rs).
    let day_start = ((t - reset) / 86_400.0).floor() * 86_400.0 + reset;
    let used = if r.opt_real(2)?.unwrap_or(f64::NEG_INFINITY) < day_start { 0 } else { r.int(0)? };
    let at = |secs: f64| rfc3339(Some(secs));
    Ok(Some(QuotaToday {
        account: account.to_string(),
        used_today: used,
        daily_quota: r.opt_int(1)?,
        resets_at: at(day_start + 86_400.0),
        requests_per_second: r.opt_real(5)?,
        blocked_until: r.opt_real(6)?.filter(|&b| b > t).and_then(at),
        now: t,
    }))
}

/// Seconds until a job's `left` calls are made at the account's granted
/// rate, waiting for the quota to reset as often as it must (other jobs of
/// the account are not counted). `None` without a rate to go by.
fn eta_secs(left: i64, quota: Option<&QuotaToday>) -> Option<f64> {
    if left == 0 {
        return Some(0.0);
    }
    let q = quota?;
    let rate = q.requests_per_second.filter(|r| *r > 0.0)?;
    let left = left as f64;
    let Some(daily) = q.daily_quota.filter(|d| *d > 0).map(|d| d as f64) else { return Some(left / rate) };
    let room = (daily - q.used_today as f64).max(0.0);
    if left <= room {
        return Some(left / rate);
    }
    // Past today's room: whole quota days, then the rest at the rate.
    let reset_in = q
        .resets_at
        .as_deref()
        .and_then(|r| DateTime::parse_from_rfc3339(r).ok())
        .map_or(0.0, |r| (r.timestamp_micros() as f64 / 1e6 - q.now).max(0.0));
    let over = left - room;
    let full_days = ((over / daily).ceil() - 1.0).max(0.0);
    Some(reset_in + full_days * 86_400.0 + (over - full_days * daily) / rate)
}

/// Cuts the job's pending VINs, distinct and sorted, into batches of
/// `batch_size`, numbered after any the job already has.
async fn batch_pending(tx: &mut Tx, job_id: i64, batch_size: i32) -> Result<i64, StoreError> {
    if let Tx::Pg(t) = tx {
        // Its two sorts of the job's VINs spilled to disk with the default
        // 4 MB at 50,000 VINs (161 ms; auto_explain, 2026-12-07); this
        // transaction's other statement reads one row.
        sqlx::query("SET LOCAL work_mem = '64MB'").execute(&mut **t).await?;
    }
    let sql = tx.pick(postgres::BATCH_PENDING, sqlite::BATCH_PENDING);
    Ok(tx.exec(sql, args![job_id, batch_size]).await? as i64)
}

/// A group's batch decodes: `(job, batch, VINs asked, answer)`.
type Decodes<'a> = Vec<(i64, i32, &'a [String], &'a [DecodedVin])>;

/// The batch decodes among a group's answers.
fn decodes_of(answers: &[Answered]) -> Decodes<'_> {
    answers
        .iter()
        .filter_map(|a| match &a.answer {
            Answer::Decoded { asked, decoded } => Some((a.job_id, a.batch_no, &asked[..], &decoded[..])),
            Answer::Recalls { .. } => None,
        })
        .collect()
}

/// The cache rows of a group's batch decodes (the latest decode per VIN).
async fn cache_decodes(tx: &mut Tx, decodes: &Decodes<'_>) -> Result<(), StoreError> {
    if decodes.is_empty() {
        return Ok(());
    }
    // Sorted, and one row per VIN: Postgres refuses to upsert a row twice
    // in one statement.
    let latest: std::collections::BTreeMap<&str, &DecodedVin> =
        decodes.iter().flat_map(|d| d.3).map(|d| (d.vin.as_str(), d)).collect();
    // Written as JSON text straight from each decode's `raw` text: a
    // `Value` tree of the group would copy every document twice more.
    // Bound as text, the dialects read it as they read JSON.
    #[derive(serde::Serialize)]
    struct CacheRow<'a> {
        vin: &'a str,
        make: Option<&'a str>,
        model: Option<&'a str>,
        year: Option<i32>,
        code: Option<&'a str>,
        text: Option<&'a str>,
        raw: &'a serde_json::value::RawValue,
    }
    let rows: Vec<CacheRow> = latest
        .values()
        .map(|d| CacheRow {
            vin: &d.vin,
            make: d.make.as_deref(),
            model: d.model.as_deref(),
            year: d.model_year,
            code: d.error.as_ref().map(|e| e.0.as_str()),
            text: d.error.as_ref().map(|e| e.1.as_str()),
            raw: &d.raw,
        })
        .collect();
    let json = serde_json::to_string(&rows).expect("strings and JSON text serialize");
    tx.exec(
        "INSERT INTO vin_cache (vin, decoded_at, make, model, model_year, error_code, error_text, raw)
             SELECT x.vin, now(), x.make, x.model, x.year, x.code, x.text, x.raw
             FROM {rows $1: vin text, make text, model text, year integer, code text, text text, raw jsonb}
             WHERE true
             ON CONFLICT (vin) DO UPDATE SET decoded_at = excluded.decoded_at, make = excluded.make,
                 model = excluded.model, model_year = excluded.model_year, error_code = excluded.error_code,
                 error_text = excluded.error_text, raw = excluded.raw",
        args![json],
    )
    .await?;
    Ok(())
}

/// Settles the input rows of a group's batch decodes from the cache: every
/// row of the answered VINs in its job (duplicates included), and the rows
/// an answer left out.
async fn settle_decodes(tx: &mut Tx, decodes: &Decodes<'_>) -> Result<(), StoreError> {
    let mut jobs: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
    for (job_id, _, _, decoded) in decodes {
        jobs.entry(*job_id).or_default().extend(decoded.iter().map(|d| d.vin.clone()));
    }
    for (job_id, vins) in jobs {
        tx.exec(
            "UPDATE job_inputs SET status = CASE WHEN c.error_code IS NULL THEN 'decoded' ELSE 'failed' END,
                     error_code = c.error_code, error_text = c.error_text, decoded_at = c.decoded_at
                 FROM vin_cache c
                 WHERE job_inputs.job_id = $1 AND job_inputs.vin {in $2} AND c.vin = job_inputs.vin
                   AND job_inputs.status = 'pending'",
            args![job_id, vins],
        )
        .await?;
    }
    for &(job_id, batch_no, asked, decoded) in decodes {
        // The client refuses an answer that leaves a VIN out, but the store
        // does not rely on it: a row of this batch still pending would never
        // be settled (its batch is done), so it fails, saying why. The
        // difference is taken here, not in SQL: nearly always empty, it then
        // costs no statement, and never a scan of the job's pending rows.
        let answered: std::collections::HashSet<&str> = decoded.iter().map(|d| d.vin.as_str()).collect();
        let missing: Vec<String> = asked.iter().filter(|v| !answered.contains(v.as_str())).cloned().collect();
        if !missing.is_empty() {
            tx.exec(
                "UPDATE job_inputs SET status = 'failed', error_code = 'no_answer',
                         error_text = 'the API answered batch ' || CAST($2 AS TEXT) || ' without this VIN'
                     WHERE job_id = $1 AND vin {in $3} AND status = 'pending'",
                args![job_id, batch_no, missing],
            )
            .await?;
        }
    }
    Ok(())
}

/// The recall answers of a group: the campaigns (the latest text of
/// each), each lookup's list of them (the latest answer per key) and its
/// time and count.
async fn store_recalls(tx: &mut Tx, answers: &[Answered]) -> Result<(), StoreError> {
    let lookups: std::collections::BTreeMap<&str, std::collections::BTreeMap<String, &crate::api::Recall>> = answers
        .iter()
        .filter_map(|a| match &a.answer {
            Answer::Recalls { key, recalls } => Some((key.as_str(), distinct_campaigns(recalls))),
            Answer::Decoded { .. } => None,
        })
        .collect();
    if lookups.is_empty() {
        return Ok(());
    }
    let campaigns: std::collections::BTreeMap<&str, &crate::api::Recall> =
        lookups.values().flat_map(|seen| seen.iter().map(|(n, r)| (n.as_str(), *r))).collect();
    let json: Vec<Value> = campaigns
        .iter()
        .map(|(n, r)| {
            json!({"n": n, "m": r.manufacturer, "c": r.component, "s": r.summary, "q": r.consequence,
                   "r": r.remedy, "o": r.notes.clone().filter(|o| !o.is_empty()),
                   "d": iso_date(&r.report_received_date), "p": r.park_it, "po": r.park_outside,
                   "ota": r.over_the_air_update})
        })
        .collect();
    tx.exec(
        "INSERT INTO recalls (campaign_number, manufacturer, component, summary, consequence, remedy, notes,
                                  report_received_date, park_it, park_outside, over_the_air_update, updated_at)
             SELECT x.n, x.m, x.c, x.s, x.q, x.r, x.o, {date x.d}, x.p, x.po, x.ota, now()
             FROM {rows $1: n text, m text, c text, s text, q text, r text, o text, d text, p boolean,
                            po boolean, ota boolean}
             WHERE true
             ON CONFLICT (campaign_number) DO UPDATE SET manufacturer = excluded.manufacturer,
                 component = excluded.component, summary = excluded.summary, consequence = excluded.consequence,
                 remedy = excluded.remedy, notes = excluded.notes,
                 report_received_date = excluded.report_received_date, park_it = excluded.park_it,
                 park_outside = excluded.park_outside, over_the_air_update = excluded.over_the_air_update,
                 updated_at = excluded.updated_at",
        args![Value::Array(json)],
    )
    .await?;
    let keys: Vec<String> = lookups.keys().map(|k| k.to_string()).collect();
    tx.exec("DELETE FROM recall_lookup_campaigns WHERE lookup_key {in $1}", args![keys]).await?;
    let pairs: Vec<Value> =
        lookups.iter().flat_map(|(k, seen)| seen.keys().map(move |n| json!({"k": k, "n": n}))).collect();
    tx.exec(
        "INSERT INTO recall_lookup_campaigns (lookup_key, campaign_number) SELECT x.k, x.n FROM {rows $1: k text, n text}",
        args![Value::Array(pairs)],
    )
    .await?;
    let counts: Vec<Value> = lookups.iter().map(|(k, seen)| json!({"k": k, "n": seen.len()})).collect();
    tx.exec(
        "UPDATE recall_lookups SET looked_up_at = now(), campaigns = x.n, error_text = NULL, failed_at = NULL
             FROM {rows $1: k text, n integer} WHERE recall_lookups.lookup_key = x.k",
        args![Value::Array(counts)],
    )
    .await?;
    Ok(())
}

/// A call whose task no longer holds its batch ended: it is counted only
/// while the batch still bears its mark (a failed job's dead batch, or one
/// the sweep queued again), which is cleared; a claim since then counted it
/// as lost already. Whether it was a recall lookup, if it is to be counted.
async fn unmark_stale_call(tx: &mut Tx, job_id: i64, batch_no: i32) -> Result<Option<bool>, StoreError> {
    tx.row(
        "UPDATE batches SET in_call = false
         WHERE job_id = $1 AND batch_no = $2 AND in_call AND state <> 'running'
         RETURNING kind = 'recall'",
        args![job_id, batch_no],
    )
    .await?
    .map(|r| r.bool(0))
    .transpose()
}

/// Locks job `job_id`'s batches that `sql` selects, by number, before the
/// caller touches the job's row or its input rows. Every transaction that
/// writes a batch and its job or rows takes the batch first: a call's
/// outcome (stored, rescheduled, dead-lettered, refused) locks its batch,
/// then settles its rows and counts on its job. One that updated the job
/// first and its batches next (failing, cancelling or resuming the job)
/// could meet an outcome holding a batch it needs while that outcome waits
/// for the job's row or rows: Postgres then aborts one of the two, and an
/// aborted fail_job lets the job go on calling with a revoked key. (SQLite
/// takes its one write lock at BEGIN, so the order is moot there and
/// `{for update}` renders as nothing.)
/// Only the count comes back (how many it locked), so a large job's batch
/// numbers stay on the server.
async fn lock_batches(tx: &mut Tx, job_id: i64, states: &[&str]) -> Result<i64, StoreError> {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    tx.one(
        "SELECT count(*) FROM (SELECT 1 FROM batches WHERE job_id = $1 AND state {in $2}
             ORDER BY batch_no {for update}) l",
        args![job_id, states],
    )
    .await?
    .int(0)
}

/// Counts `n` calls that reached the API and ended alike (`attempt`: each
/// used one of its batch's attempts). An answered call also ends a wait
/// (quota, outage): the job runs again.
async fn count_calls(
    tx: &mut Tx,
    job_id: i64,
    n: i64,
    recall: bool,
    end: CallEnd,
    attempt: bool,
) -> Result<(), StoreError> {
    let is = |e: CallEnd| n * i64::from(end == e);
    tx.exec(
        "UPDATE jobs SET calls_made = calls_made + $8, recall_calls = recall_calls + $2, calls_retried = calls_retried + $3,
                 calls_answered = calls_answered + $4, rate_limited = rate_limited + $5,
                 calls_server_error = calls_server_error + $6, calls_timed_out = calls_timed_out + $7,
                 state_reason = CASE WHEN $4 > 0 AND state = 'waiting' THEN NULL ELSE state_reason END,
                 resume_at = CASE WHEN $4 > 0 AND state = 'waiting' THEN NULL ELSE resume_at END,
                 state = CASE WHEN $4 > 0 AND state = 'waiting' THEN 'running' ELSE state END,
                 updated_at = now()
             WHERE job_id = $1",
        args![
            job_id,
            n * i64::from(recall),
            n * i64::from(attempt),
            is(CallEnd::Answered),
            is(CallEnd::RateLimited),
            is(CallEnd::ServerError),
            is(CallEnd::TimedOut),
            n
        ],
    )
    .await?;
    Ok(())
}

/// A claimed batch from [`CLAIM`]'s row, with its recall lookup from the
/// columns of `lookup` that start at the given one.
fn claimed(r: &Row, lookup: Option<(&Row, usize)>) -> Result<ClaimedBatch, StoreError> {
    let lookup_key = r.opt_text(2)?;
    let lookup = match (lookup, &lookup_key) {
        (Some((l, at)), Some(key)) => Some(Lookup {
            key: key.clone(),
            make: l.opt_text(at)?,
            model: l.opt_text(at + 1)?,
            model_year: l.opt_int(at + 2)?.map(|y| y as i32),
            vin: l.opt_text(at + 3)?,
        }),
        _ => None,
    };
    Ok(ClaimedBatch { vins: r.texts(0)?, attempts: r.int32(1)?, lookup_key, lookup })
}

/// One row of the output query (both dialects' columns, in one order).
fn output_row(mut r: Row) -> Result<OutputRow, StoreError> {
    let carried = match r.take_json(9)? {
        Value::Object(m) => m,
        _ => Default::default(),
    };
    let vehicle = (0..VEHICLE_COLUMNS.len()).map(|i| r.take_text(12 + i)).collect::<Result<_, _>>()?;
    Ok(OutputRow {
        source: r.take_string(0)?,
        source_row: r.int(1)?,
        raw_vin: r.take_string(2)?,
        vin: r.take_text(3)?,
        status: r.take_string(4)?,
        error_code: r.take_text(5)?,
        error_text: r.take_text(6)?,
        decoded_at: r.opt_real(7)?.and_then(|s| DateTime::from_timestamp_micros((s * 1e6).round() as i64)),
        check_digit_valid: r.opt_bool(8)?,
        recall_campaigns: if r.is_null(10) { None } else { Some(r.texts(10)?) },
        recall_error: r.take_text(11)?,
        vehicle,
        carried,
    })
}

/// NHTSA's `DD/MM/YYYY` as `YYYY-MM-DD` (anything else: none).
fn iso_date(d: &str) -> Option<String> {
    let p: Vec<&str> = d.trim().split('/').collect();
    match p.as_slice() {
        [dd, mm, yyyy] if dd.len() == 2 && mm.len() == 2 && yyyy.len() == 4 => Some(format!("{yyyy}-{mm}-{dd}")),
        _ => None,
    }
}
