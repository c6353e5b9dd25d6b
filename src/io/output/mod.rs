//! Outputs: every input row of a job, decoded or carrying its error, written
//! as a Parquet dataset ([`dataset`]) and to Postgres tables ([`tables`]).
//!
//! Both read the same rows ([`OutputRow`], streamed in source order by the
//! state store) and share one column list, documented in the README.

pub mod dataset;
pub mod tables;
pub mod vin_hash;

pub use crate::columns::{CarriedType, OutputRow, RecallMode, VEHICLE_COLUMNS};
use crate::spec::{JobSpec, OutputSpec};

/// What a job writes, and where, for `status` and the run summary.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub outputs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{output}: {message}")]
    Write { output: String, message: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another writer took this job's write over (this one outlived its
    /// lease): this one stops, committing nothing, and leaves the job to it.
    #[error("{0}")]
    TakenOver(String),
}

impl OutputError {
    pub fn write(output: impl std::fmt::Display, message: impl std::fmt::Display) -> OutputError {
        OutputError::Write { output: output.to_string(), message: message.to_string() }
    }
}

/// Rows read from the state store per chunk handed to the outputs.
const CHUNK_ROWS: usize = 8192;

/// A writer's heartbeat while rows stream (a writer silent for
/// `WRITE_LEASE_SECS` is presumed dead and replaced).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a writer receives: chunks of the job's rows in source order, then
/// `End`. A channel that closes without `End` means reading the rows
/// failed, and the writer must commit nothing.
pub enum Rows {
    Chunk(std::sync::Arc<Vec<OutputRow>>),
    End,
}

pub type RowsRx = tokio::sync::mpsc::Receiver<Rows>;

/// The next chunk, `None` at the end; an error if the rows stopped short.
pub async fn next_chunk(rx: &mut RowsRx) -> Result<Option<std::sync::Arc<Vec<OutputRow>>>, String> {
    match rx.recv().await {
        Some(Rows::Chunk(c)) => Ok(Some(c)),
        Some(Rows::End) => Ok(None),
        None => Err("reading the job's rows stopped before the end".to_string()),
    }
}

/// Writes every output the spec names from one pass over the job's rows:
/// one query streams them, and every output takes each chunk as it comes
/// (all outputs write at once). Each replaces this job's earlier output
/// wholesale; a dataset partition another, earlier job wrote is replaced
/// too, and that job's status says so.
pub async fn write_all(
    store: &crate::store::Store,
    job_id: i64,
    spec: &JobSpec,
    replace_newer: bool,
    writer: &str,
) -> Result<Written, OutputError> {
    use futures_util::StreamExt;
    if spec.outputs.is_empty() {
        return Ok(Written::default());
    }
    // Every output's `vin_hash` key first: a missing one fails the write
    // before any output is touched.
    let hashers = spec
        .outputs
        .iter()
        .enumerate()
        .map(|(i, output)| vin_hash::VinHasher::for_output(output, &vin_hash::shown(i, output)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut senders = Vec::new();
    let mut writers = Vec::new();
    // A job whose one output is a table in the state store's database has
    // it filled on the server; otherwise every output takes the one stream.
    let on_server = tables::on_server(store, &spec.outputs, &hashers);
    for (output, hasher) in spec.outputs.iter().zip(hashers) {
        let feed = if on_server {
            None
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel::<Rows>(2);
            senders.push(tx);
            Some(rx)
        };
        writers.push(async move {
            match (output, feed) {
                (OutputSpec::Parquet { .. }, Some(rx)) => {
                    let done = dataset::write_hashed(store, job_id, spec, output, replace_newer, hasher, rx).await?;
                    Ok::<_, OutputError>((done.rows, done.place, done.replaced))
                }
                (OutputSpec::Postgres { .. }, feed) => {
                    let feed = feed.map_or(tables::Feed::OnServer(spec.recalls.mode()), tables::Feed::Rows);
                    let (rows, place) = tables::write_hashed(store, output, job_id, hasher, feed).await?;
                    Ok((rows, place, None))
                }
                (OutputSpec::Parquet { .. }, None) => unreachable!("a dataset takes streamed rows"),
            }
        });
    }
    let producer = async move {
        if senders.is_empty() {
            return Ok(());
        }
        let mut rows = store.output_rows(job_id, spec.recalls.mode()).chunks(CHUNK_ROWS);
        while let Some(chunk) = rows.next().await {
            let chunk = std::sync::Arc::new(chunk.into_iter().collect::<Result<Vec<_>, _>>()?);
            for tx in &senders {
                if tx.send(Rows::Chunk(std::sync::Arc::clone(&chunk))).await.is_err() {
                    // A writer failed: stop, so no other commits a part.
                    return Ok(());
                }
            }
        }
        for tx in &senders {
            let _ = tx.send(Rows::End).await;
        }
        Ok::<(), OutputError>(())
    };
    // The writer's heartbeat while rows stream or the server writes them;
    // a beat that fails stops the write (the job is written again later),
    // as a writer that cannot say it is alive may be replaced. A beat that
    // finds another writer holding the job stops it too: that one writes.
    let beat = async {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            match store.heartbeat(job_id, writer).await {
                Ok(true) => {}
                Ok(false) => {
                    return OutputError::TakenOver(format!(
                        "job {job_id}'s write is no longer this writer's: another took it over after this one \
                         went {} s without a beat, or the job left `writing`",
                        crate::job::advance::WRITE_LEASE_SECS
                    ));
                }
                Err(e) => return OutputError::Store(e),
            }
        }
    };
    let work = async { tokio::join!(producer, futures_util::future::join_all(writers)) };
    let (produced, results) = tokio::select! {
        done = work => done,
        stopped = beat => return Err(stopped),
    };
    // The store's error first: it leaves the job to be written again, where
    // the writers' own "rows stopped short" would fail it.
    produced?;
    let mut written = Written::default();
    for result in results {
        let (rows, place, replaced) = result?;
        if let Some(earlier) = replaced {
            mark_superseded(store, earlier, &place, job_id).await?;
        }
        written.rows = rows;
        written.outputs.push(place);
    }
    Ok(written)
}

/// The note an output line carries once a later job has replaced it.
const SUPERSEDED: &str = " (superseded by job ";

/// Marks `place` in job `earlier`'s outputs as replaced by job `by`.
async fn mark_superseded(store: &crate::store::Store, earlier: i64, place: &str, by: i64) -> Result<(), OutputError> {
    let Some(outputs) = store.job_outputs(earlier).await? else { return Ok(()) };
    let marked: Vec<String> =
        outputs.into_iter().map(|o| if o == place { format!("{o}{SUPERSEDED}{by})") } else { o }).collect();
    store.set_outputs(earlier, &marked).await?;
    Ok(())
}

/// Checks that an output can be written, before any call is paid for.
pub async fn probe(store_pool: Option<&sqlx::PgPool>, output: &OutputSpec) -> Result<(), OutputError> {
    match output {
        OutputSpec::Parquet { .. } => dataset::probe(output).await,
        OutputSpec::Postgres { .. } => tables::probe(store_pool, output).await,
    }
}
