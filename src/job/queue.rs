//! The work queue: apalis-postgres (or apalis-sqlite for a SQLite state
//! store), holding one task per batch call. All queue access lives here.
//!
//! vinetl's `batches` table is the authority on a batch (its VINs, attempts,
//! next run time, state); a queue task only says "call batch N of job J, at
//! generation G". Every reschedule bumps the generation, so a task delivered
//! twice (a crash between push and ack, an orphan recovered after missed
//! heartbeats) finds its generation stale and does nothing.
//!
//! apalis 1.0's own retries have no backoff, so vinetl never uses them: a
//! failed call pushes a new task with `run_at` set to the backoff time.

use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::SqlitePool;

use crate::store::{Store, StoreError};

/// The queue task: which batch, at which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTask {
    pub job_id: i64,
    pub batch_no: i32,
    pub generation: i32,
}

impl BatchTask {
    /// Unique per (install, job, batch, generation): pushing the same task
    /// twice is refused by the queue instead of running twice. The install
    /// ([`Store::install`]) keeps a job numbered like one of an earlier
    /// install of the same schema from being refused as its duplicate.
    pub fn idempotency_key(&self, install: &str) -> String {
        format!("{install}:{}:{}:{}", self.job_id, self.batch_no, self.generation)
    }
}

/// How often an idle worker looks for due tasks. Rescheduled tasks wait for
/// their `run_at`; a quarter second keeps the wait after it short without
/// loading Postgres (each poll is one indexed query).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Workers report every 5 s; a worker silent for 3 beats (15 s) is dead and
/// its tasks go back to the queue. apalis recovers orphans only after
/// `missed_heartbeats`, so both are set here explicitly.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
pub const MISSED_HEARTBEATS: usize = 3;

/// The queue name: one per vinetl schema, so installs (and tests) sharing
/// a database never take each other's tasks.
pub fn queue_name(schema: &str) -> String {
    format!("vinetl.batches.{schema}")
}

/// Which workers may take a job's tasks. A job on an embedded API (the
/// demo's in-process server) can only be called by a `vinetl run` that
/// hosts one, so its tasks live on a queue of their own that `vinetl
/// worker` never reads: a worker can never call a dead in-process port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Shared,
    Embedded,
}

impl Lane {
    pub fn of(provider: &crate::spec::ProviderSpec) -> Lane {
        if provider.embedded { Lane::Embedded } else { Lane::Shared }
    }

    fn suffix(self) -> &'static str {
        match self {
            Lane::Shared => "",
            Lane::Embedded => ".embedded",
        }
    }

    /// The Postgres queue of this lane in `schema`.
    pub fn queue(self, schema: &str) -> String {
        format!("{}{}", queue_name(schema), self.suffix())
    }

    /// The SQLite queue of this lane (one install per file).
    fn sqlite_queue(self) -> String {
        format!("vinetl.batches{}", self.suffix())
    }
}

/// Creates apalis's tables (schema `apalis`; its migrations also create the
/// hstore and pgcrypto extensions, which needs a role allowed to).
async fn setup_pg(pool: &PgPool) -> Result<(), StoreError> {
    PostgresStorage::setup(pool)
        .await
        .map_err(|e| StoreError::Queue(format!("creating the apalis queue tables failed: {e}")))
}

/// The queue for pushing tasks.
pub fn storage(pool: &PgPool, schema: &str, lane: Lane) -> PostgresStorage<BatchTask> {
    worker_storage(pool, schema, lane, 4)
}

/// The queue for a worker running `tasks` tasks at once: a fetch claims at
/// most that many, so work stays spread across workers and little is
/// claimed but not started (apalis counts those as attempts at shutdown).
/// It must be at least the worker's task count: apalis sizes the channel of
/// its task events (a lock and an acknowledgement per task) at four times
/// this, and a stopping worker stops draining it, so a smaller channel
/// filled by running tasks would leave the stop waiting on them forever.
pub fn worker_storage(pool: &PgPool, schema: &str, lane: Lane, tasks: usize) -> PostgresStorage<BatchTask> {
    let config = Config::default()
        .queue(lane.queue(schema))
        .heartbeat_interval(HEARTBEAT)
        .missed_heartbeats(MISSED_HEARTBEATS)
        .batch_size(tasks.max(1));
    PostgresStorage::new(pool).with_config(config)
}

/// Creates apalis-sqlite's tables in the queue's own file, when any of its
/// migrations is missing (a new file, a new apalis). Otherwise nothing is
/// written: sqlx's SQLite migrator reads, then writes, in a deferred
/// transaction, and a worker writing the queue meanwhile would make that
/// upgrade fail at once with SQLITE_BUSY (busy_timeout does not apply to a
/// lock upgrade). A new file is set up under the state's open lock
/// ([`crate::store::Store::open`]), so processes take turns.
async fn setup_sqlite(pool: &SqlitePool) -> Result<(), StoreError> {
    let migrator = apalis_sqlite::SqliteStorage::<()>::migrations();
    // No table yet reads as nothing applied.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    if migrator.iter().all(|m| m.migration_type.is_down_migration() || applied.contains(&m.version)) {
        return Ok(());
    }
    apalis_sqlite::SqliteStorage::setup(pool)
        .await
        .map_err(|e| StoreError::Queue(format!("creating the apalis queue tables failed: {e}")))
}

/// The SQLite queue (one file per install, so one queue name per lane).
pub fn sqlite_storage(pool: &SqlitePool, lane: Lane, tasks: usize) -> apalis_sqlite::SqliteStorage<BatchTask> {
    let config = apalis_sqlite::Config::default()
        .queue(lane.sqlite_queue())
        .heartbeat_interval(HEARTBEAT)
        .missed_heartbeats(MISSED_HEARTBEATS)
        .batch_size(tasks.max(1));
    apalis_sqlite::SqliteStorage::new(pool).with_config(config)
}

/// A queue task for `t`, due after `delay` (apalis's task types differ per
/// backend; the building does not).
macro_rules! task {
    ($t:expr, $delay:expr, $install:expr) => {{
        let mut b = TaskBuilder::new($t).idempotency_key($t.idempotency_key($install));
        if let Some(d) = $delay {
            b = b.run_after(d);
        }
        b.build()
    }};
}

/// Pushes tasks onto the store's queue.
pub async fn push_tasks(
    store: &Store,
    schema: &str,
    lane: Lane,
    tasks: &[(BatchTask, Option<Duration>)],
) -> Result<(), StoreError> {
    match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => push(&mut storage(pool, schema, lane), store.install(), tasks).await,
        (None, Some((_, queue))) => {
            // apalis-sqlite skips a duplicate idempotency key (ON CONFLICT DO NOTHING).
            let all: Vec<_> = tasks.iter().map(|(t, delay)| task!(*t, *delay, store.install())).collect();
            sqlite_storage(queue, lane, 4)
                .push_all(futures_util::stream::iter(all))
                .await
                .map_err(|e| StoreError::Queue(format!("pushing {} tasks: {e}", tasks.len())))
        }
        (None, None) => unreachable!("a store is Postgres or SQLite"),
    }
}

/// Pushes a task for every queued batch of the job that has none yet.
pub async fn enqueue(store: &Store, schema: &str, lane: Lane, job_id: i64) -> Result<usize, StoreError> {
    let pending = store.unenqueued(job_id).await?;
    // 500 tasks a push: one statement of a few hundred kilobytes at most.
    for chunk in pending.chunks(500) {
        let tasks: Vec<_> =
            chunk.iter().map(|&(batch_no, generation)| (BatchTask { job_id, batch_no, generation }, None)).collect();
        push_tasks(store, schema, lane, &tasks).await?;
        store.mark_enqueued(job_id, chunk).await?;
    }
    Ok(pending.len())
}

/// Deletes this install's finished queue tasks (done, killed, or failed
/// for good) that ended more than `older_than_secs` ago; returns how many.
/// Our own statement, not apalis's `Vacuum`: apalis-postgres 1.0 has none,
/// and apalis-sqlite's `vacuum_before` compares its integer `run_at` with
/// datetime text (so every finished task counts as old) and then VACUUMs
/// the whole file under the workers' feet.
pub async fn prune(store: &Store, schema: &str, older_than_secs: f64) -> Result<u64, StoreError> {
    let deleted = match store.sqlite_pools() {
        Some((_, queue)) => sqlx::query(
            "DELETE FROM Jobs
             WHERE (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
               AND coalesce(done_at, run_at) < unixepoch('now') - ?1",
        )
        .bind(older_than_secs)
        .execute(queue)
        .await?
        .rows_affected(),
        None => {
            let pool = store.pg_pool().expect("a store is Postgres or SQLite");
            let queues: Vec<String> = [Lane::Shared, Lane::Embedded].iter().map(|l| l.queue(schema)).collect();
            sqlx::query(
                "DELETE FROM apalis.jobs
                 WHERE job_type = ANY($1)
                   AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
                   AND coalesce(done_at, run_at) < now() - make_interval(secs => $2)",
            )
            .bind(queues)
            .bind(older_than_secs)
            .execute(pool)
            .await?
            .rows_affected()
        }
    };
    Ok(deleted)
}

/// Creates the queue's tables beside the store's: apalis-postgres's in the
/// schema `apalis` (its migrations also install the hstore and pgcrypto
/// extensions, so they run with the default search path, where every vinetl
/// schema finds them), or apalis-sqlite's in the queue file.
pub async fn setup(store: &Store, database_url: &str) -> Result<(), StoreError> {
    match store.sqlite_pools() {
        Some((_, queue)) => setup_sqlite(queue).await,
        None => {
            let connect_err = |error| StoreError::Connect { url: crate::store::redact(database_url), error };
            let options = crate::store::postgres::connect_options(database_url).map_err(connect_err)?;
            let plain = crate::store::postgres::pool_options(&options)
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            let done = setup_pg(&plain).await;
            plain.close().await;
            done
        }
    }
}

/// Pushes tasks. A duplicate idempotency key fails a whole `push_all` in
/// apalis 1.0, so on failure each task is pushed alone and duplicates (tasks
/// already queued by an earlier, interrupted attempt) are skipped.
pub async fn push(
    storage: &mut PostgresStorage<BatchTask>,
    install: &str,
    tasks: &[(BatchTask, Option<Duration>)],
) -> Result<(), StoreError> {
    let all: Vec<_> = tasks.iter().map(|(t, delay)| task!(*t, *delay, install)).collect();
    if storage.push_all(futures_util::stream::iter(all)).await.is_ok() {
        return Ok(());
    }
    for (t, delay) in tasks {
        if let Err(e) = storage.push_task(task!(*t, *delay, install)).await
            && !is_duplicate(&e)
        {
            return Err(StoreError::Queue(format!("pushing batch {} of job {}: {e}", t.batch_no, t.job_id)));
        }
    }
    Ok(())
}

fn is_duplicate(e: &TaskSinkError<apalis_postgres::Error>) -> bool {
    matches!(e, TaskSinkError::PushError(apalis_postgres::Error::Database(sqlx::Error::Database(db))) if db.is_unique_violation())
}

/// Polls for due tasks every `period`. apalis 1.0's `poll_with_interval`
/// can lose its wake-up when a fetch completes within the same poll, leaving
/// the worker idle until the next heartbeat; this strategy re-arms its timer
/// before returning, so a waker is always registered.
pub struct SteadyInterval {
    period: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl SteadyInterval {
    pub fn new(period: Duration) -> SteadyInterval {
        SteadyInterval { period, sleep: Box::pin(tokio::time::sleep(period)) }
    }
}

impl PollStrategy for SteadyInterval {
    fn poll_drive(&mut self, cx: &mut std::task::Context<'_>, _: &PollSnapshot) -> std::task::Poll<Option<()>> {
        use std::future::Future;
        if self.sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        self.sleep.as_mut().reset(tokio::time::Instant::now() + self.period);
        // Register the waker for the next tick now.
        let _ = self.sleep.as_mut().poll(cx);
        std::task::Poll::Ready(Some(()))
    }
}

/// A worker name unique across machines and restarts: host, pid and a
/// random suffix (apalis refuses a name that is still registered).
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("vinetl@{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_are_unique_per_generation_and_process() {
        let t = BatchTask { job_id: 7, batch_no: 3, generation: 2 };
        assert_eq!(t.idempotency_key("a1b2"), "a1b2:7:3:2");
        assert_ne!(worker_name(), worker_name());
        assert_eq!(queue_name("vinetl"), "vinetl.batches.vinetl");
    }
}
