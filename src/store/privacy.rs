//! VINs as personal data, in the state store: the runner's audit trail
//! (which VINs went to which provider, and when), its retention, and
//! `vinetl forget`'s part here (the decode cache, stored input rows,
//! batches, errors and the audit trail).
//!
//! A forgotten VIN is replaced by [`FORGOTTEN`] where a row must stay for
//! the books to balance (an input row keeps its job's row count, an audited
//! request its place in the trail), and deleted where nothing depends on it
//! (the cache). A VIN forgotten while its job runs is not called: its row
//! still pending ends `failed` (`forgotten`), and a queued batch left with
//! no VIN is cancelled. A forget is refused while a job is planning.

use super::core::Store;
use super::records::{AuditFilter, AuditedCall, Forgotten, StoreError};
use super::sql::{Row, args};

/// What a forgotten VIN becomes where its row stays.
pub const FORGOTTEN: &str = "(forgotten)";

impl Store {
    /// Audited requests, newest first, filtered.
    pub async fn audit_calls(&self, f: &AuditFilter) -> Result<Vec<AuditedCall>, StoreError> {
        let rows = self
            .rows(
                "SELECT call_id, {epoch sent_at}, job_id, batch_no, provider, endpoint, vins, lookup
                 FROM call_audit
                 WHERE (job_id = $1 OR CAST($1 AS BIGINT) IS NULL)
                   AND (CAST($2 AS TEXT) IS NULL OR $2 {in vins})
                   AND (sent_at >= {ts $3} OR CAST($3 AS DOUBLE PRECISION) IS NULL)
                 ORDER BY call_id DESC
                 LIMIT $4",
                args![f.job_id, f.vin.as_deref(), f.since, f.limit],
            )
            .await?;
        rows.iter().map(audited_call).collect()
    }

    /// Deletes audited requests sent more than `older_than_secs` ago.
    pub async fn prune_audit(&self, older_than_secs: f64) -> Result<u64, StoreError> {
        self.exec("DELETE FROM call_audit WHERE sent_at < now() - {secs $1}", args![older_than_secs]).await
    }

    /// Takes `vin` (normalised) out of the state store, in one transaction.
    /// Stored input rows are matched by their normalised VIN and by their
    /// raw text, so a row rejected at planning (lower case, a dash) goes too
    /// when its text is the VIN.
    ///
    /// Refused while any job is planning: its planner remembers the VINs
    /// of the rows it has stored, so a later row of this VIN would be
    /// planned as a duplicate of a row blanked here, and would end with
    /// no vehicle columns. (The check is in the forget's transaction; a
    /// job whose planning starts after it commits plans the VIN afresh, as
    /// a job submitted later would.)
    pub async fn forget_vin(&self, vin: &str) -> Result<Forgotten, StoreError> {
        let mut tx = self.write().await?;
        if let Some(r) =
            tx.rows("SELECT job_id FROM jobs WHERE state = 'planning' ORDER BY job_id LIMIT 1", args![]).await?.first()
        {
            return Err(StoreError::Planning(r.int(0)?));
        }
        let mut jobs: Vec<i64> = tx
            .rows(
                "SELECT DISTINCT job_id FROM job_inputs WHERE vin = $1 OR upper(trim(raw_vin)) = $1
                 UNION SELECT DISTINCT job_id FROM call_audit WHERE $1 {in vins}",
                args![vin],
            )
            .await?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        jobs.sort_unstable();
        let cache = tx.exec("DELETE FROM vin_cache WHERE vin = $1", args![vin]).await?;
        // The batches holding the VIN are locked before its rows, in the
        // order every writer of both takes (see `Store::complete_all`): a
        // call's answer storing the VIN holds its batch, then its rows.
        let holding = tx
            .rows(
                "SELECT job_id, batch_no, vins FROM batches WHERE $1 {in vins} ORDER BY job_id, batch_no {for update}",
                args![vin],
            )
            .await?;
        let input_rows = tx
            .exec(
                "UPDATE job_inputs SET raw_vin = $2, vin = NULL, carried = $3,
                     status = CASE WHEN status = 'pending' THEN 'failed' ELSE status END,
                     error_code = 'forgotten', error_text = 'the VIN was removed by vinetl forget'
                 WHERE vin = $1 OR upper(trim(raw_vin)) = $1",
                args![vin, FORGOTTEN, serde_json::json!({})],
            )
            .await?;
        let errors = tx
            .exec(
                "UPDATE errors SET vin = NULL, error_text = replace(error_text, $1, $2)
                 WHERE vin = $1 OR error_text LIKE '%' || $1 || '%'",
                args![vin, FORGOTTEN],
            )
            .await?;
        // Arrays are rewritten here rather than in SQL: Postgres has
        // `array_replace` and SQLite has none, and a forget is rare.
        let mut batches = 0;
        for r in holding {
            let vins = replaced(r.texts(2)?, vin);
            // A batch still to be called that is left with no VIN is never
            // called: nothing in it can be asked for any more.
            let nothing_left = vins.iter().all(|v| v == FORGOTTEN);
            tx.exec(
                "UPDATE batches SET vins = $3, last_error = replace(last_error, $4, $5),
                     state = CASE WHEN $6 AND state = 'queued' THEN 'cancelled' ELSE state END
                 WHERE job_id = $1 AND batch_no = $2",
                args![r.int(0)?, r.int32(1)?, vins, vin, FORGOTTEN, nothing_left],
            )
            .await?;
            batches += 1;
        }
        let mut audit_calls = 0;
        for r in tx.rows("SELECT call_id, vins FROM call_audit WHERE $1 {in vins}", args![vin]).await? {
            let vins = replaced(r.texts(1)?, vin);
            tx.exec("UPDATE call_audit SET vins = $2 WHERE call_id = $1", args![r.int(0)?, vins]).await?;
            audit_calls += 1;
        }
        tx.commit().await?;
        Ok(Forgotten { cache, input_rows, batches, errors, audit_calls, jobs })
    }

    /// Every job's stored spec (ended or not, pruned or not), for the
    /// outputs `forget` must visit: `(job_id, spec JSON)`.
    pub async fn all_specs(&self) -> Result<Vec<(i64, serde_json::Value)>, StoreError> {
        let rows = self.rows("SELECT job_id, spec FROM jobs ORDER BY job_id", args![]).await?;
        rows.iter().map(|r| Ok((r.int(0)?, r.json(1)?))).collect()
    }
}

fn replaced(vins: Vec<String>, vin: &str) -> Vec<String> {
    vins.into_iter().map(|v| if v == vin { FORGOTTEN.to_string() } else { v }).collect()
}

fn audited_call(r: &Row) -> Result<AuditedCall, StoreError> {
    let at = r.opt_real(1)?.unwrap_or(0.0);
    Ok(AuditedCall {
        call_id: r.int(0)?,
        sent_at: chrono::DateTime::from_timestamp_micros((at * 1e6).round() as i64)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        job_id: r.int(2)?,
        batch_no: r.int32(3)?,
        provider: r.text(4)?,
        endpoint: r.text(5)?,
        vins: r.texts(6)?,
        lookup: r.opt_text(7)?,
    })
}
