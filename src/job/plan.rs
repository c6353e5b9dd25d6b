//! Planning a job: read every input row (streamed), parse its VIN, store it,
//! then dedupe, consult the cache and cut the remaining VINs into batches on
//! the queue. Every step is idempotent, so a planner killed at any point is
//! resumed by submitting the same spec again, and nothing is enqueued twice.

use std::path::PathBuf;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::io::s3::{S3, S3Url};
use crate::io::source::postgres::PgInput;
use crate::io::source::{FileFormat, FileSource, InputRow, SourceError, TextEncoding};
use crate::job::queue::{self, Lane};
use crate::spec::{InputFormat, JobSpec, SourceSpec};
use crate::store::StoreError;
use crate::store::{PlannedChunk, PlannedRow, Store};
use crate::vin::Vin;

/// Rows stored per transaction: big enough that inserts are cheap per row,
/// small enough that a crash repeats little and memory stays flat.
pub const CHUNK_ROWS: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    S3(#[from] crate::io::s3::S3Error),
    #[error("{0}")]
    Config(String),
    #[error("job {0} is being planned by another process; wait for it, or stop it and submit again")]
    Busy(i64),
    /// Planning hit a problem with the input; the job is failed with it.
    #[error("job {job_id} failed while planning: {reason}")]
    Failed { job_id: i64, reason: String },
}

impl PlanError {
    /// Input problems fail the job; a lost database leaves it for a
    /// resubmission to resume.
    fn fails_the_job(&self) -> bool {
        matches!(self, PlanError::Source(_) | PlanError::S3(_) | PlanError::Config(_))
    }
}

/// What `submit` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    pub job_id: i64,
    /// Planning picked up a job whose earlier planner had died.
    pub resumed: bool,
    pub batches: i64,
    /// Input rows read.
    pub rows: i64,
}

/// A stable hash of the spec, to recognise a re-submission (FNV-1a, 64 bit:
/// stable across Rust versions, unlike `DefaultHasher`). An embedded API's
/// address changes every run and is not part of the job's identity.
pub fn spec_hash(spec: &JobSpec) -> String {
    let mut spec = spec.clone();
    if spec.provider.embedded {
        spec.provider.base_url.clear();
    }
    let text = serde_json::to_string(&spec).expect("a spec serialises");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Registers (or resumes) the job for `spec` and plans it. A job whose
/// planner died is resumed; one whose planning failed (a missing file, a
/// missing column, a truncated gzip) is failed with the reason, so submitting
/// the fixed spec again starts a new job.
pub async fn submit(store: &Store, schema: &str, spec: &JobSpec) -> Result<Submitted, PlanError> {
    submit_dated(store, schema, spec, None).await
}

/// [`submit`] for a spec whose `{date}` templates were filled with
/// `logical_date`: the job's `dt=` partition is that date, not today.
pub async fn submit_dated(
    store: &Store,
    schema: &str,
    spec: &JobSpec,
    logical_date: Option<chrono::NaiveDate>,
) -> Result<Submitted, PlanError> {
    let hash = spec_hash(spec);
    let spec_json = serde_json::to_value(spec).expect("a spec serialises");
    let (job_id, resumed) = match store.resumable_job(&hash).await? {
        Some(id) => {
            // An embedded job's stored address is the last run's; this run's server answers now.
            store.update_spec(id, &spec_json).await?;
            (id, true)
        }
        None => {
            let date = logical_date.map(|d| d.to_string());
            (store.create_job(&spec.name, &spec_json, &hash, date.as_deref()).await?, false)
        }
    };
    plan_job(store, schema, job_id, spec, resumed).await
}

/// Plans job `job_id` (made for `spec`, or resumed): reads its input,
/// cuts its batches and queues them. A scheduled run's job comes here
/// straight from its schedule.
pub async fn plan_job(
    store: &Store,
    schema: &str,
    job_id: i64,
    spec: &JobSpec,
    resumed: bool,
) -> Result<Submitted, PlanError> {
    let lock = store.lock_planning(job_id).await?.ok_or(PlanError::Busy(job_id))?;
    let planned = async {
        read_inputs(store, job_id, spec).await?;
        let rows = store.total_rows(job_id).await?;
        let min = spec.source.min_rows();
        if (rows as u64) < min {
            return Err(PlanError::Config(format!(
                "the input has {rows} row{}, fewer than source.min_rows = {min}",
                if rows == 1 { "" } else { "s" }
            )));
        }
        let batches = store.plan_batches(job_id, spec.provider.batch_size as i32).await?;
        Ok::<(i64, i64), PlanError>((batches, rows))
    }
    .await;
    store.unlock_planning(lock).await?;
    let (batches, rows) = match planned {
        Ok(p) => p,
        Err(e) if e.fails_the_job() => {
            let reason = e.to_string();
            tracing::error!(job = job_id, %reason, "planning failed");
            store
                .fail_job(
                    job_id,
                    &format!("planning failed: {reason}; fix it and submit the spec again (a new job starts)"),
                )
                .await?;
            return Err(PlanError::Failed { job_id, reason });
        }
        Err(e) => return Err(e),
    };
    if rows == 0 {
        tracing::warn!(job = job_id, "the input had no rows");
    }
    queue::enqueue(store, schema, Lane::of(&spec.provider), job_id).await?;
    store.mark_running(job_id).await?;
    crate::job::advance::advance(store, schema, job_id, spec).await?;
    Ok(Submitted { job_id, resumed, batches, rows })
}

/// What planning a spec would do, without doing it: `vinetl check SPEC --dry-run`.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Estimate {
    pub rows: u64,
    pub valid: u64,
    pub invalid: u64,
    pub distinct: u64,
    /// Distinct VINs decoded within the cache TTL (none without state).
    pub cache_hits: u64,
    /// Batch-decode calls needed (recall lookups come on top).
    pub calls: u64,
    /// At the spec's rate and burst.
    pub seconds_at_rate: f64,
    /// Quota days the calls take, when the spec has a daily quota.
    pub quota_days: Option<f64>,
}

/// Reads the whole source as planning would, counting rows, VINs and
/// cache hits (from `store`, if there is state), storing nothing.
pub async fn estimate(store: Option<&Store>, spec: &JobSpec) -> Result<Estimate, PlanError> {
    let (tx, mut rx) = mpsc::channel::<Result<Read, PlanError>>(2);
    let reader = async move { read_source(None, 0, spec, tx).await };
    let counter = async {
        let mut est = Estimate::default();
        let mut distinct = crate::local::distinct::DistinctVins::default();
        while let Some(msg) = rx.recv().await {
            let Read::Rows(_, rows) = msg? else { continue };
            for row in rows {
                est.rows += 1;
                match Vin::parse(&row.vin).ok().filter(|_| row.problem.is_none()) {
                    Some(vin) => {
                        est.valid += 1;
                        distinct.insert(&vin).map_err(|e| PlanError::Config(format!("temporary storage: {e}")))?;
                    }
                    None => est.invalid += 1,
                }
            }
        }
        Ok::<_, PlanError>((est, distinct))
    };
    let (read, counted) = tokio::join!(reader, counter);
    read?;
    let (mut est, distinct) = counted?;
    // Cache hits, a chunk of distinct VINs at a time.
    let ttl = spec.cache.ttl_hours;
    let store = store.cloned();
    let handle = tokio::runtime::Handle::current();
    let (n, hits) = tokio::task::spawn_blocking(move || -> Result<(u64, u64), PlanError> {
        let mut chunk = Vec::with_capacity(CHUNK_ROWS);
        let mut hits = 0u64;
        let mut failed = None;
        let mut flush = |chunk: &mut Vec<String>| {
            if let Some(s) = &store
                && failed.is_none()
            {
                match handle.block_on(s.cached_count(chunk, ttl)) {
                    Ok(n) => hits += n as u64,
                    Err(e) => failed = Some(e),
                }
            }
            chunk.clear();
        };
        let n = distinct
            .finish_with(|vin| {
                chunk.push(vin.to_string());
                if chunk.len() == CHUNK_ROWS {
                    flush(&mut chunk);
                }
            })
            .map_err(|e| PlanError::Config(format!("temporary storage: {e}")))?;
        flush(&mut chunk);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok((n, hits)),
        }
    })
    .await
    .map_err(|e| PlanError::Config(format!("counting failed: {e}")))??;
    est.distinct = n;
    est.cache_hits = hits;
    let p = &spec.provider;
    est.calls = (n - hits).div_ceil(p.batch_size as u64);
    est.seconds_at_rate = ((est.calls as f64 - p.burst()).max(0.0)) / p.requests_per_second;
    est.quota_days = p.daily_quota.map(|q| est.calls as f64 / q.max(1) as f64);
    Ok(est)
}

/// One message from a source reader.
enum Read {
    Rows(String, Vec<InputRow>),
    Done(String),
}

async fn read_inputs(store: &Store, job_id: i64, spec: &JobSpec) -> Result<(), PlanError> {
    let carry = spec.carry().to_vec();
    let ttl = spec.cache.ttl_hours;
    // Two chunks in flight: the reader runs ahead of the inserts by at most that.
    let (tx, mut rx) = mpsc::channel::<Result<Read, PlanError>>(2);
    // Reader and inserter run concurrently in this task (joined, not spawned).
    let reader = async move { read_source(Some(store), job_id, spec, tx).await };
    // Rows are planned (VIN rules, carried columns, the insert's JSON) one
    // chunk ahead of the insert: while the store inserts a chunk, the next
    // is built (12 of 85 ms a 5,000-row chunk when the two took turns).
    let (planned_tx, mut planned_rx) = mpsc::channel::<(String, Option<PlannedChunk>)>(1);
    let planner = async move {
        while let Some(msg) = rx.recv().await {
            let next = match msg? {
                Read::Rows(source, rows) => {
                    let planned: Vec<PlannedRow> = rows.into_iter().map(|r| plan_row(&source, r, &carry)).collect();
                    (source, Some(store.chunk(&planned)))
                }
                Read::Done(source) => (source, None),
            };
            if planned_tx.send(next).await.is_err() {
                break; // the inserter failed; its error is the one to report
            }
        }
        Ok::<(), PlanError>(())
    };
    let inserter = async {
        let mut memo = store.plan_memo(job_id).await?;
        while let Some((source, chunk)) = planned_rx.recv().await {
            match chunk {
                Some(chunk) => store.insert_chunk(job_id, &source, chunk, false, ttl, &mut memo).await?,
                None => store.insert_rows(job_id, &source, &[], true, ttl).await?,
            }
        }
        Ok::<(), PlanError>(())
    };
    let (read, planned, inserted) = tokio::join!(reader, planner, inserter);
    inserted?;
    planned?;
    read
}

fn plan_row(source: &str, row: InputRow, carry: &[String]) -> PlannedRow {
    let carried: Map<String, Value> = carry.iter().cloned().zip(row.carried).collect();
    let (error_code, error_text, vin) = match (&row.problem, Vin::parse(&row.vin)) {
        (Some(problem), _) => (Some(MALFORMED_ROW), Some(format!("{source} row {}: {problem}", row.row)), None),
        (None, Err(e)) => (Some(e.kind()), Some(format!("{source} row {}: {e}", row.row)), None),
        (None, Ok(vin)) => (None, None, Some(vin)),
    };
    PlannedRow {
        source: source.to_string(),
        row_number: row.row as i64,
        vin: vin.as_ref().map(Vin::to_string),
        check_digit_valid: vin.as_ref().map(Vin::check_digit_valid),
        error_code,
        error_text,
        raw_vin: row.vin,
        carried: Value::Object(carried),
    }
}

/// The error code of a row that is broken whatever its VIN (see
/// [`InputRow::problem`]).
pub const MALFORMED_ROW: &str = "malformed_row";

type Sender = mpsc::Sender<Result<Read, PlanError>>;

/// Where a source stands: rows already stored for `label`, and whether it
/// is complete. Without a store (a dry run), nothing is.
async fn progress(store: Option<&Store>, job_id: i64, label: &str) -> Result<(i64, bool), PlanError> {
    match store {
        Some(s) => Ok(s.rows_planned(job_id, label).await?),
        None => Ok((0, false)),
    }
}

/// Sends every row of the spec's source, in chunks, resuming after the
/// rows `store` already holds for the job.
async fn read_source(store: Option<&Store>, job_id: i64, spec: &JobSpec, tx: Sender) -> Result<(), PlanError> {
    match &spec.source {
        SourceSpec::File { path, format, vin_column, carry, .. } => {
            let files = expand_glob(path)?;
            for file in files {
                let label = file.display().to_string();
                let fmt = file_format(&file, *format, vin_column.as_deref(), carry)?;
                read_file(store, job_id, file, label, fmt, TextEncoding::of(spec.source.encoding_label()), tx.clone())
                    .await?;
            }
        }
        SourceSpec::S3 { url, endpoint, region, format, vin_column, carry, .. } => {
            let s3 = S3::connect(endpoint.as_deref(), region.as_deref()).await;
            for object in s3.list(&S3Url::parse(url)?).await? {
                let label = object.to_string();
                if progress(store, job_id, &label).await?.1 {
                    continue;
                }
                // Objects are read from a local copy: bounded memory, and
                // Parquet needs random access anyway.
                let tmp =
                    tempfile::NamedTempFile::new().map_err(|e| PlanError::Config(format!("temporary file: {e}")))?;
                s3.download(&object, tmp.path()).await?;
                let fmt = file_format(std::path::Path::new(&object.key), *format, vin_column.as_deref(), carry)?;
                let path = tmp.path().to_path_buf();
                read_file(store, job_id, path, label, fmt, TextEncoding::of(spec.source.encoding_label()), tx.clone())
                    .await?;
                drop(tmp);
            }
        }
        SourceSpec::Postgres { url_env, carry, .. } => {
            let pool = source_pool(url_env).await?;
            let input = pg_input(&spec.source)?;
            let label = input.label();
            let (done_rows, complete) = progress(store, job_id, &label).await?;
            if complete {
                return Ok(());
            }
            let sent =
                crate::io::source::postgres::read(&pool, &input, carry, CHUNK_ROWS, async |rows: Vec<InputRow>| {
                    let rows: Vec<InputRow> = rows.into_iter().filter(|r| r.row as i64 > done_rows).collect();
                    rows.is_empty() || tx.send(Ok(Read::Rows(label.clone(), rows))).await.is_ok()
                })
                .await;
            sent?;
            let _ = tx.send(Ok(Read::Done(label))).await;
        }
    }
    Ok(())
}

/// The source database, from the variable `url_env` names.
pub(crate) async fn source_pool(url_env: &str) -> Result<sqlx::PgPool, PlanError> {
    let url = std::env::var(url_env).map_err(|_| {
        PlanError::Config(format!("{url_env} is not set (source.url_env names the source database URL variable)"))
    })?;
    let cannot = |e| PlanError::Config(format!("cannot connect to the source database ({url_env}): {e}"));
    let options = crate::store::postgres::connect_options(&url).map_err(cannot)?;
    crate::store::postgres::pool_options(&options)
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(cannot)
}

/// What a Postgres source reads.
pub(crate) fn pg_input(source: &SourceSpec) -> Result<PgInput, PlanError> {
    let SourceSpec::Postgres { table, column, key, query, .. } = source else {
        return Err(PlanError::Config("not a postgres source".into()));
    };
    Ok(match (table, query) {
        (Some(t), _) => PgInput::Table {
            table: t.clone(),
            column: column.clone().unwrap_or_else(|| "vin".into()),
            key: key.clone().unwrap_or_else(|| "id".into()),
        },
        (None, Some(q)) => PgInput::Query { sql: q.clone() },
        (None, None) => return Err(PlanError::Config("a postgres source needs a table or a query".into())),
    })
}

/// Reads a local file on a blocking thread, sending chunks as they fill.
async fn read_file(
    store: Option<&Store>,
    job_id: i64,
    path: PathBuf,
    label: String,
    fmt: FileFormat,
    encoding: TextEncoding,
    tx: Sender,
) -> Result<(), PlanError> {
    let (done_rows, complete) = progress(store, job_id, &label).await?;
    if complete {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || -> Result<(), PlanError> {
        let mut chunk = Vec::with_capacity(CHUNK_ROWS);
        for row in FileSource::open_encoded(&path, &label, fmt, encoding)? {
            let row = row?;
            if (row.row as i64) <= done_rows {
                continue;
            }
            chunk.push(row);
            if chunk.len() >= CHUNK_ROWS
                && tx.blocking_send(Ok(Read::Rows(label.clone(), std::mem::take(&mut chunk)))).is_err()
            {
                return Ok(());
            }
        }
        if !chunk.is_empty() && tx.blocking_send(Ok(Read::Rows(label.clone(), chunk))).is_err() {
            return Ok(());
        }
        let _ = tx.blocking_send(Ok(Read::Done(label)));
        Ok(())
    })
    .await
    .map_err(|e| PlanError::Config(format!("file reader failed: {e}")))?
}

pub(crate) fn expand_glob(path: &str) -> Result<Vec<PathBuf>, PlanError> {
    if !path.contains(['*', '?', '[']) {
        return Ok(vec![PathBuf::from(path)]);
    }
    let mut files: Vec<PathBuf> = glob::glob(path)
        .map_err(|e| PlanError::Config(format!("source.path {path:?} is not a valid glob: {e}")))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PlanError::Config(format!("source.path {path:?} matches no files")));
    }
    Ok(files)
}

pub(crate) fn file_format(
    name: &std::path::Path,
    format: InputFormat,
    column: Option<&str>,
    carry: &[String],
) -> Result<FileFormat, PlanError> {
    let col = || column.unwrap_or("vin").to_string();
    let fmt = match format {
        InputFormat::Auto => FileFormat::infer(name, column),
        InputFormat::Lines => FileFormat::Lines,
        InputFormat::Csv => FileFormat::Csv { column: col(), carry: Vec::new() },
        InputFormat::Parquet => FileFormat::Parquet { column: col(), carry: Vec::new() },
    };
    if fmt == FileFormat::Lines && !carry.is_empty() {
        return Err(SourceError::NoColumns { path: name.display().to_string(), columns: carry.join(", ") }.into());
    }
    Ok(fmt.carrying(carry))
}
