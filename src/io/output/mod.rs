//! Outputs: every input row of a job, decoded or carrying its error, written
//! as a Parquet dataset ([`dataset`]) and to Postgres tables ([`tables`]).
//!
//! Both read the same rows ([`OutputRow`], streamed in source order by the
//! state store) and share one column list, documented in the README.

pub mod dataset;
pub mod tables;

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
}

impl OutputError {
    pub fn write(output: impl std::fmt::Display, message: impl std::fmt::Display) -> OutputError {
        OutputError::Write { output: output.to_string(), message: message.to_string() }
    }
}

/// Writes every output the spec names, one after the other. Each replaces
/// this job's earlier output wholesale; a dataset partition another, earlier
/// job wrote is replaced too, and that job's status says so.
pub async fn write_all(
    store: &crate::store::Store,
    job_id: i64,
    spec: &JobSpec,
    replace_newer: bool,
) -> Result<Written, OutputError> {
    let mut written = Written::default();
    for output in &spec.outputs {
        let (rows, place) = match output {
            OutputSpec::Parquet { .. } => {
                let done = dataset::write(store, job_id, spec, output, replace_newer).await?;
                if let Some(earlier) = done.replaced {
                    mark_superseded(store, earlier, &done.place, job_id).await?;
                }
                (done.rows, done.place)
            }
            OutputSpec::Postgres { .. } => tables::write(store, job_id, spec, output).await?,
        };
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
