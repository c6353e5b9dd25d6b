//! Planning a job: read every input row (streamed), parse its VIN, store it,
//! then dedupe, consult the cache and cut the remaining VINs into batches on
//! the queue. Every step is idempotent, so a planner killed at any point is
//! resumed by submitting the same spec again, and nothing is enqueued twice.

use std::path::PathBuf;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::queue::{self, BatchTask};
use crate::s3::{S3, S3Url};
use crate::source::postgres::PgInput;
use crate::source::{FileFormat, FileSource, InputRow, SourceError};
use crate::spec::{InputFormat, JobSpec, SourceSpec};
use crate::store::StoreError;
use crate::store::{PlannedRow, Store};
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
    S3(#[from] crate::s3::S3Error),
    #[error("{0}")]
    Config(String),
    #[error("job {0} is being planned by another process; wait for it, or stop it and submit again")]
    Busy(i64),
}

/// What `submit` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    pub job_id: i64,
    /// Planning picked up a job whose earlier planner had died.
    pub resumed: bool,
    pub batches: i64,
}

/// A stable hash of the spec, to recognise a re-submission (FNV-1a, 64 bit:
/// stable across Rust versions, unlike `DefaultHasher`).
pub fn spec_hash(spec: &JobSpec) -> String {
    let text = serde_json::to_string(spec).expect("a spec serialises");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Registers (or resumes) the job for `spec` and plans it.
pub async fn submit(store: &Store, schema: &str, spec: &JobSpec) -> Result<Submitted, PlanError> {
    let hash = spec_hash(spec);
    let spec_json = serde_json::to_value(spec).expect("a spec serialises");
    let (job_id, resumed) = match store.resumable_job(&hash).await? {
        Some(id) => (id, true),
        None => (store.create_job(&spec.name, &spec_json, &hash).await?, false),
    };
    let lock = store.lock_planning(job_id).await?.ok_or(PlanError::Busy(job_id))?;
    let planned = async {
        read_inputs(store, job_id, spec).await?;
        Ok::<i64, PlanError>(store.plan_batches(job_id, spec.provider.batch_size as i32, spec.cache.ttl_hours).await?)
    }
    .await;
    store.unlock_planning(lock).await?;
    let batches = planned?;
    enqueue(store, schema, job_id).await?;
    store.mark_running(job_id).await?;
    crate::finish::advance(store, schema, job_id, spec).await?;
    Ok(Submitted { job_id, resumed, batches })
}

/// Pushes a task for every queued batch that has none yet.
pub async fn enqueue(store: &Store, schema: &str, job_id: i64) -> Result<usize, StoreError> {
    let pending = store.unenqueued(job_id).await?;
    for chunk in pending.chunks(500) {
        let tasks: Vec<_> =
            chunk.iter().map(|&(batch_no, generation)| (BatchTask { job_id, batch_no, generation }, None)).collect();
        queue::push_tasks(store, schema, &tasks).await?;
        store.mark_enqueued(job_id, chunk).await?;
    }
    Ok(pending.len())
}

/// One message from a source reader.
enum Read {
    Rows(String, Vec<InputRow>),
    Done(String),
}

async fn read_inputs(store: &Store, job_id: i64, spec: &JobSpec) -> Result<(), PlanError> {
    let carry = spec.carry().to_vec();
    // Two chunks in flight: the reader runs ahead of the inserts by at most that.
    let (tx, mut rx) = mpsc::channel::<Result<Read, PlanError>>(2);
    // Reader and inserter run concurrently in this task (joined, not spawned).
    let reader = async move { read_source(store, job_id, spec, tx).await };
    let inserter = async {
        while let Some(msg) = rx.recv().await {
            match msg? {
                Read::Rows(source, rows) => {
                    let planned: Vec<PlannedRow> = rows.into_iter().map(|r| plan_row(&source, r, &carry)).collect();
                    store.insert_rows(job_id, &source, &planned, false).await?;
                }
                Read::Done(source) => store.insert_rows(job_id, &source, &[], true).await?,
            }
        }
        Ok::<(), PlanError>(())
    };
    let (read, inserted) = tokio::join!(reader, inserter);
    inserted?;
    read
}

fn plan_row(source: &str, row: InputRow, carry: &[String]) -> PlannedRow {
    let carried: Map<String, Value> = carry.iter().cloned().zip(row.carried).collect();
    let parsed = Vin::parse(&row.vin);
    PlannedRow {
        source: source.to_string(),
        row_number: row.row as i64,
        vin: parsed.as_ref().ok().map(Vin::to_string),
        check_digit_valid: parsed.as_ref().ok().map(Vin::check_digit_valid),
        error_code: parsed.as_ref().err().map(|e| e.kind()),
        error_text: parsed.as_ref().err().map(|e| format!("{source} row {}: {e}", row.row)),
        raw_vin: row.vin,
        carried: Value::Object(carried),
    }
}

type Sender = mpsc::Sender<Result<Read, PlanError>>;

async fn read_source(store: &Store, job_id: i64, spec: &JobSpec, tx: Sender) -> Result<(), PlanError> {
    match &spec.source {
        SourceSpec::File { path, format, vin_column, carry } => {
            let files = expand_glob(path)?;
            for file in files {
                let label = file.display().to_string();
                let fmt = file_format(&file, *format, vin_column.as_deref(), carry)?;
                read_file(store, job_id, file, label, fmt, tx.clone()).await?;
            }
        }
        SourceSpec::S3 { url, endpoint, region, format, vin_column, carry } => {
            let s3 = S3::connect(endpoint.as_deref(), region.as_deref()).await;
            for object in s3.list(&S3Url::parse(url)?).await? {
                let label = object.to_string();
                if store.rows_planned(job_id, &label).await?.1 {
                    continue;
                }
                // Objects are read from a local copy: bounded memory, and
                // Parquet needs random access anyway.
                let tmp =
                    tempfile::NamedTempFile::new().map_err(|e| PlanError::Config(format!("temporary file: {e}")))?;
                s3.download(&object, tmp.path()).await?;
                let fmt = file_format(std::path::Path::new(&object.key), *format, vin_column.as_deref(), carry)?;
                let path = tmp.path().to_path_buf();
                read_file(store, job_id, path, label, fmt, tx.clone()).await?;
                drop(tmp);
            }
        }
        SourceSpec::Postgres { url_env, table, column, key, query, carry } => {
            let url = std::env::var(url_env).map_err(|_| {
                PlanError::Config(format!(
                    "{url_env} is not set (source.url_env names the source database URL variable)"
                ))
            })?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(&url)
                .await
                .map_err(|e| PlanError::Config(format!("cannot connect to the source database ({url_env}): {e}")))?;
            let input = match (table, query) {
                (Some(t), _) => PgInput::Table {
                    table: t.clone(),
                    column: column.clone().unwrap_or_else(|| "vin".into()),
                    key: key.clone().unwrap_or_else(|| "id".into()),
                },
                (None, Some(q)) => PgInput::Query { sql: q.clone() },
                (None, None) => unreachable!("validated: a postgres source has a table or a query"),
            };
            let label = input.label();
            let (done_rows, complete) = store.rows_planned(job_id, &label).await?;
            if complete {
                return Ok(());
            }
            let sent = crate::source::postgres::read(&pool, &input, carry, CHUNK_ROWS, async |rows: Vec<InputRow>| {
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

/// Reads a local file on a blocking thread, sending chunks as they fill.
async fn read_file(
    store: &Store,
    job_id: i64,
    path: PathBuf,
    label: String,
    fmt: FileFormat,
    tx: Sender,
) -> Result<(), PlanError> {
    let (done_rows, complete) = store.rows_planned(job_id, &label).await?;
    if complete {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || -> Result<(), PlanError> {
        let mut chunk = Vec::with_capacity(CHUNK_ROWS);
        for row in FileSource::open_named(&path, &label, fmt)? {
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

fn expand_glob(path: &str) -> Result<Vec<PathBuf>, PlanError> {
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

fn file_format(
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
