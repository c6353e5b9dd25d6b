//! Schedules and their runs: the store's part of `vinetl scheduler`. Every
//! time here is bound by the caller (Unix seconds), never the database's
//! clock, so the scheduler's decisions follow one clock that tests inject.
//!
//! Exactly one run per logical time comes from the primary key of
//! `schedule_runs`: a second insert of a key does nothing. Deciding a
//! schedule's fire times happens under its row's lock (Postgres) or the
//! database's write lock (SQLite), so two schedulers that look at once
//! agree on what was missed.

use serde_json::Value;

use super::core::Store;
use super::records::{ClaimedRun, NewRun, ScheduleRow, ScheduledRun, StoreError};
use super::sql::{Row, args};

impl Store {
    /// Registers a schedule, or updates its spec (its decided fire times
    /// stay decided). A new schedule's first run is its first fire time
    /// after `now`. True when it is new.
    pub async fn register_schedule(&self, name: &str, spec: &Value, now: f64) -> Result<bool, StoreError> {
        let row = self
            .one(
                "INSERT INTO schedules (name, spec, registered_at, updated_at, decided_through)
                 VALUES ($1, $2, {ts $3}, {ts $3}, {ts $3})
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at
                 RETURNING {epoch registered_at}",
                args![name, spec, now],
            )
            .await?;
        Ok(row.opt_real(0)? == Some(now))
    }

    /// Removes a schedule; its runs and their jobs stay. False if unknown.
    pub async fn unregister_schedule(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM schedules WHERE name = $1", args![name]).await? > 0)
    }

    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let rows =
            self.rows("SELECT name, spec, {epoch decided_through} FROM schedules ORDER BY name", args![]).await?;
        rows.iter()
            .map(|r| {
                Ok(ScheduleRow { name: r.text(0)?, spec: r.json(1)?, decided_through: r.opt_real(2)?.unwrap_or(0.0) })
            })
            .collect()
    }

    /// Decides the fire times of schedule `name` up to `now`: `decide` gets
    /// the time decided so far and returns the runs to record.
    /// One scheduler at a time decides a schedule; the runs' key makes a
    /// second record of a fire time a no-op. Returns the runs recorded.
    pub async fn decide_fires(
        &self,
        name: &str,
        now: f64,
        decide: Box<dyn FnOnce(f64) -> Vec<NewRun> + Send + '_>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let Some(row) =
            tx.row("SELECT {epoch decided_through} FROM schedules WHERE name = $1 {for update}", args![name]).await?
        else {
            return Ok(0);
        };
        let through = row.opt_real(0)?.unwrap_or(now);
        if through >= now {
            return Ok(0);
        }
        let runs = decide(through);
        let n = insert_runs(&mut tx, name, &runs, now, false, false).await?;
        tx.exec(
            "UPDATE schedules SET decided_through = {ts $2} WHERE name = $1 AND decided_through < {ts $2}",
            args![name, now],
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Backfill: records `runs` as due. A date recorded as missed is filled;
    /// one that ran (or failed) is reset only with `rerun`, and never while
    /// its job is still going. Returns the runs made or reset.
    pub async fn add_runs(&self, name: &str, runs: &[NewRun], now: f64, rerun: bool) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let n = insert_runs(&mut tx, name, runs, now, true, rerun).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Claims the oldest run that is due, or waiting and due for another
    /// look, of schedule `name` (any if none) for `lease_secs`.
    pub async fn claim_run(
        &self,
        now: f64,
        lease_secs: f64,
        name: Option<&str>,
    ) -> Result<Option<ClaimedRun>, StoreError> {
        let token = format!("{:016x}", fastrand::u64(..));
        // The outer conditions repeat the inner ones: of two schedulers that
        // picked the same run, the second finds it claimed and updates nothing.
        let row = self
            .row(
                "UPDATE schedule_runs SET claimed_until = {ts $1 + $2}, claimed_by = $4, updated_at = {ts $1}
                 WHERE (name, logical_at) IN (
                         SELECT name, logical_at FROM schedule_runs
                         WHERE state IN ('due', 'waiting')
                           AND (claimed_until IS NULL OR claimed_until <= {ts $1})
                           AND (next_check_at IS NULL OR next_check_at <= {ts $1})
                           AND (name = $3 OR CAST($3 AS TEXT) IS NULL)
                         ORDER BY logical_at LIMIT 1)
                   AND state IN ('due', 'waiting')
                   AND (claimed_until IS NULL OR claimed_until <= {ts $1})
                 RETURNING name, {epoch logical_at}, logical_date, job_id, {epoch created_at}",
                args![now, lease_secs, name, &token],
            )
            .await?;
        row.map(|r| {
            Ok(ClaimedRun {
                name: r.text(0)?,
                at: r.opt_real(1)?.unwrap_or(0.0),
                date: r.text(2)?,
                job_id: r.opt_int(3)?,
                created: r.opt_real(4)?.unwrap_or(0.0),
                token: token.clone(),
            })
        })
        .transpose()
    }

    /// Makes the job of a claimed run and links it, in one transaction;
    /// none if the claim was lost (its lease ran out and another took it).
    pub async fn start_run_job(
        &self,
        run: &ClaimedRun,
        spec: &Value,
        spec_hash: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.write().await?;
        let job_id = tx
            .one(
                "INSERT INTO jobs (name, spec, spec_hash, started_at, logical_date)
                 VALUES ($1, $2, $3, now(), $4) RETURNING job_id",
                args![&run.name, spec, spec_hash, &run.date],
            )
            .await?
            .int(0)?;
        let linked = tx
            .exec(
                "UPDATE schedule_runs SET job_id = $3
                 WHERE name = $1 AND logical_at = {ts $2} AND job_id IS NULL AND claimed_by = $4",
                args![&run.name, run.at, job_id, &run.token],
            )
            .await?;
        if linked == 0 {
            // Dropped uncommitted: the job row goes with it.
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(job_id))
    }

    /// Settles a claimed run: `submitted`, `failed`, or `waiting` or `due`
    /// until `next_check` (Unix seconds); the claim is released. False if
    /// the claim was lost.
    pub async fn settle_run(
        &self,
        run: &ClaimedRun,
        state: &str,
        reason: Option<&str>,
        next_check: Option<f64>,
        now: f64,
    ) -> Result<bool, StoreError> {
        let n = self
            .exec(
                "UPDATE schedule_runs SET state = $3, reason = $4, next_check_at = {ts $5}, claimed_until = NULL,
                        claimed_by = NULL, updated_at = {ts $6}
                 WHERE name = $1 AND logical_at = {ts $2} AND claimed_by = $7",
                args![&run.name, run.at, state, reason, next_check, now, &run.token],
            )
            .await?;
        Ok(n > 0)
    }

    /// A job's state, if it exists.
    pub async fn job_state(&self, job_id: i64) -> Result<Option<String>, StoreError> {
        self.row("SELECT state FROM jobs WHERE job_id = $1", args![job_id]).await?.map(|r| r.text(0)).transpose()
    }

    /// A schedule's runs, newest first, with their jobs' states.
    pub async fn scheduled_runs(&self, name: &str, limit: i64) -> Result<Vec<ScheduledRun>, StoreError> {
        let rows = self
            .rows(
                "SELECT r.name, {epoch r.logical_at}, r.logical_date, r.state, r.how, r.job_id, j.state, r.reason
                 FROM schedule_runs r LEFT JOIN jobs j ON j.job_id = r.job_id
                 WHERE r.name = $1 ORDER BY r.logical_at DESC LIMIT $2",
                args![name, limit],
            )
            .await?;
        rows.iter().map(scheduled_run).collect()
    }
}

fn scheduled_run(r: &Row) -> Result<ScheduledRun, StoreError> {
    let at = r.opt_real(1)?.unwrap_or(0.0);
    Ok(ScheduledRun {
        name: r.text(0)?,
        logical_at: chrono::DateTime::from_timestamp(at as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        logical_date: r.text(2)?,
        state: r.text(3)?,
        how: r.text(4)?,
        job_id: r.opt_int(5)?,
        job_state: r.opt_text(6)?,
        reason: r.opt_text(7)?,
    })
}

/// Records runs; on a key already recorded: fills a missed run when
/// `fill`, resets an ended one when `rerun` too, and otherwise does nothing.
async fn insert_runs(
    tx: &mut super::core::Tx,
    name: &str,
    runs: &[NewRun],
    now: f64,
    fill: bool,
    rerun: bool,
) -> Result<u64, StoreError> {
    if runs.is_empty() {
        return Ok(0);
    }
    let runs = serde_json::to_value(runs).map_err(|e| StoreError::Decode(e.to_string()))?;
    // `WHERE true`: SQLite reads an upsert after a SELECT only so.
    tx.exec(
        "INSERT INTO schedule_runs (name, logical_at, logical_date, state, how, reason, created_at, updated_at)
         SELECT $1, {ts x.at}, x.date, x.state, x.how, x.reason, {ts $3}, {ts $3}
         FROM {rows $2: at float8, date text, state text, how text, reason text} WHERE true
         ON CONFLICT (name, logical_at) DO UPDATE
           SET state = excluded.state, how = excluded.how, reason = excluded.reason, job_id = NULL,
               claimed_until = NULL, claimed_by = NULL, next_check_at = NULL, updated_at = excluded.updated_at,
               created_at = excluded.created_at
           WHERE $4 AND (schedule_runs.state = 'missed'
                 OR ($5 AND schedule_runs.state IN ('submitted', 'failed')
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = schedule_runs.job_id
                                     AND j.state NOT IN ('done', 'failed', 'cancelled'))))",
        args![name, runs, now, fill, rerun],
    )
    .await
}
