//! `vinetl forget VIN`: one VIN taken out of everything vinetl keeps, and a
//! list of what it could not reach.
//!
//! Reached: the state store (decode cache, stored input rows, batches,
//! errors, the audit trail; see `store::privacy`) and every Postgres output
//! any job ever wrote to. Not reached, and said so: files already written
//! (Parquet datasets, which `vinetl write JOB` rewrites from the blanked
//! rows while the job is not pruned) and the inputs themselves, which
//! vinetl never changes. The API's own records are the provider's.

use serde::Serialize;

use crate::spec::{JobSpec, OutputSpec, SourceSpec};
use crate::store::{Forgotten, Store};

/// One Postgres output visited.
#[derive(Debug, Clone, Serialize)]
pub struct OutputForgotten {
    pub output: String,
    /// Results rows blanked and vehicles rows deleted.
    pub rows: u64,
}

/// What `forget` did, and what it could not do.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub vin: String,
    pub store: Forgotten,
    pub outputs: Vec<OutputForgotten>,
    /// Places that may still hold the VIN, each with what to do about it.
    pub not_reached: Vec<String>,
}

impl ForgetReport {
    /// True when something could not be reached.
    pub fn incomplete(&self) -> bool {
        !self.not_reached.is_empty()
    }
}

/// Forgets `vin` (already normalised).
pub async fn forget(store: &Store, vin: &str) -> Result<ForgetReport, crate::store::StoreError> {
    let forgotten = store.forget_vin(vin).await?;
    let mut outputs = Vec::new();
    let mut not_reached = Vec::new();
    let mut visited: Vec<OutputSpec> = Vec::new();
    for (job_id, raw) in store.all_specs().await? {
        let spec: JobSpec = match serde_json::from_value(raw) {
            Ok(s) => s,
            Err(e) => {
                not_reached
                    .push(format!("job {job_id}: its stored spec does not read ({e}); its outputs were not visited"));
                continue;
            }
        };
        let held = forgotten.jobs.contains(&job_id);
        for output in &spec.outputs {
            match output {
                OutputSpec::Postgres { .. } => {
                    if visited.iter().any(|o| same_tables(o, output)) {
                        continue;
                    }
                    visited.push(output.clone());
                    let shown = described(output);
                    match crate::io::output::tables::forget(store.pg_pool(), output, vin).await {
                        Ok(rows) => outputs.push(OutputForgotten { output: shown, rows }),
                        Err(e) => not_reached.push(format!("{shown}: {e}")),
                    }
                }
                OutputSpec::Parquet { path, .. } if held => not_reached.push(format!(
                    "job {job_id}: the Parquet dataset {path} was written with the VIN; `vinetl write {job_id}` \
                     rewrites it without (unless the job was pruned), or delete its files"
                )),
                OutputSpec::Parquet { .. } => {}
            }
        }
        if held {
            not_reached
                .push(format!("job {job_id}: its input {} (vinetl never changes its inputs)", source(&spec.source)));
        }
    }
    Ok(ForgetReport { vin: vin.to_string(), store: forgotten, outputs, not_reached })
}

fn same_tables(a: &OutputSpec, b: &OutputSpec) -> bool {
    match (a, b) {
        (
            OutputSpec::Postgres { url_env: u1, schema: s1, results_table: r1, vehicles_table: v1, .. },
            OutputSpec::Postgres { url_env: u2, schema: s2, results_table: r2, vehicles_table: v2, .. },
        ) => (u1, s1, r1, v1) == (u2, s2, r2, v2),
        _ => false,
    }
}

fn described(output: &OutputSpec) -> String {
    match output {
        OutputSpec::Postgres { url_env, schema, results_table, vehicles_table, .. } => {
            let db = url_env.as_deref().map_or("the state database".to_string(), |v| format!("${v}"));
            format!("postgres {schema}.{results_table} and {schema}.{vehicles_table} in {db}")
        }
        OutputSpec::Parquet { path, .. } => format!("parquet {path}"),
    }
}

fn source(source: &SourceSpec) -> String {
    match source {
        SourceSpec::File { path, .. } => format!("file {path}"),
        SourceSpec::S3 { url, .. } => url.clone(),
        SourceSpec::Postgres { url_env, table, query, .. } => match (table, query) {
            (Some(t), _) => format!("table {t} in ${url_env}"),
            _ => format!("a query in ${url_env}"),
        },
    }
}
