//! Retention: an ended job's bookkeeping (its input rows, batches, errors
//! and queue tasks) is deleted once it is old enough, by `vinetl prune
//! --older-than 30d` or, after each run of a spec with `[retention]`, for
//! that spec's name. Each job goes in a transaction of its own, so workers
//! on other jobs wait at most one job's deletion. The job's row stays with
//! the counts `status` showed; its outputs are never touched.

use crate::store::{Prunable, Store, StoreError};

/// What a prune did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub jobs: Vec<Prunable>,
    /// Finished queue tasks deleted (none in a dry run).
    pub queue_tasks: u64,
}

impl Pruned {
    pub fn rows(&self) -> i64 {
        self.jobs.iter().map(|j| j.rows).sum()
    }
}

/// Which jobs a prune takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    /// Only jobs of this name.
    pub name: Option<&'a str>,
    /// Never this job (the run whose retention this is).
    pub except: Option<i64>,
    /// List, delete nothing.
    pub dry_run: bool,
}

/// Prunes every ended job in `scope` that finished more than
/// `older_than_secs` ago, and the install's finished queue tasks as old.
pub async fn prune(store: &Store, schema: &str, older_than_secs: f64, scope: Scope<'_>) -> Result<Pruned, StoreError> {
    let Scope { name, except, dry_run } = scope;
    let mut pruned = Pruned::default();
    for job in store.prunable(older_than_secs, name).await?.into_iter().filter(|j| Some(j.job_id) != except) {
        // A job reprocessed since it was listed (running, or ended again
        // since) is left alone.
        if dry_run || store.prune_job(job.job_id, older_than_secs).await? {
            tracing::info!(job = job.job_id, rows = job.rows, batches = job.batches, dry_run, "pruned");
            pruned.jobs.push(job);
        }
    }
    if !dry_run {
        pruned.queue_tasks = super::queue::prune(store, schema, older_than_secs).await?;
    }
    Ok(pruned)
}
