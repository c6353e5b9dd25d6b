//! What happens when a job's last batch ends: its recall lookups are planned
//! and enqueued (once), then its outputs are written and it is done. Called
//! by whoever ended a batch (a worker) or planned the job (every row cached);
//! the job's row lock makes exactly one caller take each step.

use crate::io::output::{self, OutputError};
use crate::job::queue::{self, Lane};
use crate::spec::JobSpec;
use crate::store::StoreError;
use crate::store::{Next, Store};

/// A writer that has not beaten for this long is presumed dead and replaced.
pub const WRITE_LEASE_SECS: f64 = 120.0;

/// Moves the job on if its calls are all done.
pub async fn advance(store: &Store, schema: &str, job_id: i64, spec: &JobSpec) -> Result<Next, StoreError> {
    let r = &spec.recalls;
    let next = store.advance(job_id, r.mode(), r.ttl_hours(), !spec.outputs.is_empty()).await?;
    match next {
        Next::Enqueue => {
            queue::enqueue(store, schema, Lane::of(&spec.provider), job_id).await?;
        }
        Next::Write => write(store, schema, job_id, spec, None).await?,
        Next::Done => retain(store, schema, job_id, spec).await,
        Next::Nothing => {}
    }
    Ok(next)
}

/// Writes the outputs of a job held in `writing`. A failure of an output
/// (a full disk, a refused bucket) fails the job with the reason; every
/// result is kept, so `vinetl write` writes again without calling the API.
/// A failure of the state store leaves the job in `writing` for another
/// worker to take over when the lease runs out. A partition that a later
/// job has written is replaced only when the run was started with
/// `--force` ([`Store::replaces_newer`]).
///
/// `writer`: the token of a takeover ([`Store::orphaned_write`]); without
/// one, the caller was given the write by the job's state (it moved the
/// job to `writing`) and takes it here ([`Store::take_write`]). A writer
/// that another has replaced stops at its next heartbeat and ends nothing.
pub async fn write(
    store: &Store,
    schema: &str,
    job_id: i64,
    spec: &JobSpec,
    writer: Option<String>,
) -> Result<(), StoreError> {
    let writer = match writer {
        Some(w) => w,
        None => match store.take_write(job_id).await? {
            Some(w) => w,
            None => return Ok(()),
        },
    };
    let replace_newer = store.replaces_newer(job_id).await?;
    let started = std::time::Instant::now();
    let written = output::write_all(store, job_id, spec, replace_newer, &writer).await;
    crate::prometheus::output_written(written.is_ok(), started.elapsed());
    match written {
        Ok(written) => {
            store.finish_writing(job_id, &written.outputs, &writer).await?;
            retain(store, schema, job_id, spec).await;
            Ok(())
        }
        Err(OutputError::Store(e)) => Err(e),
        Err(OutputError::TakenOver(why)) => {
            tracing::warn!(job = job_id, %why, "this writer stops: another writer has the job's write");
            Ok(())
        }
        Err(e) => {
            tracing::error!(job = job_id, error = %e, "writing outputs failed");
            let reason = format!(
                "writing outputs failed: {e}; fix the cause and run `vinetl write {job_id}`, which makes no API call \
                 (`vinetl reprocess {job_id}` works too)"
            );
            store.fail_writing(job_id, &reason, &writer).await?;
            Ok(())
        }
    }
}

/// Takes over jobs whose writer died, one at a time, and writes them.
pub async fn resume_orphaned_writes(store: &Store, schema: &str) -> Result<usize, StoreError> {
    let mut n = 0;
    while let Some((job_id, writer)) = store.orphaned_write(WRITE_LEASE_SECS).await? {
        n += 1;
        match store.job_spec(job_id).await? {
            Ok(spec) => write(store, schema, job_id, &spec, Some(writer)).await?,
            Err(reason) => store.fail_writing(job_id, &reason, &writer).await?,
        }
    }
    Ok(n)
}

/// Once job `job_id` of `spec` is done: the spec's `[retention]`, for the
/// other jobs of its name. A failed prune is logged and tried again after
/// the next run; it never fails the job, whose results are stored.
async fn retain(store: &Store, schema: &str, job_id: i64, spec: &JobSpec) {
    let Some(r) = &spec.retention else { return };
    let scope = super::prune::Scope { name: Some(&spec.name), except: Some(job_id), dry_run: false };
    if let Err(e) = super::prune::prune(store, schema, r.older_than_secs(), scope).await {
        tracing::warn!(job = %spec.name, error = %e, "retention: pruning older jobs failed");
    }
}
