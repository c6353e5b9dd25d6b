//! Checks made before the first API call is paid for: that the key is
//! there (and each output's `vin_hash` key), the API host answers, every
//! output can be written, and the source can be read. Each failure names the
//! spec setting to fix; `submit`, `run` and `check SPEC` run the same
//! checks, and nothing is planned or called when one fails (exit code 2).

use std::time::Duration;

use crate::io::source::{FileSource, SourceError, TextEncoding};
use crate::spec::{JobSpec, SourceSpec};

/// A check that failed: the setting to fix and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct PreflightError {
    pub setting: String,
    pub message: String,
}

fn fail(setting: impl Into<String>, message: impl Into<String>) -> PreflightError {
    PreflightError { setting: setting.into(), message: message.into() }
}

/// How long the API host has to answer the reachability check.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// What to check.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// This process will call the API and write the outputs, so the key
    /// variable (and each `vin_hash` key variable) must be set here
    /// (`run`); `submit` leaves both to workers, which need them.
    pub key: bool,
    /// The API host must answer (skipped for an embedded API, which this
    /// process starts itself).
    pub api: bool,
}

/// Runs every check: the key, the outputs and the source (what the spec
/// says), then the API host (what the world says). Returns what passed, for
/// `check SPEC`.
pub async fn run(
    spec: &JobSpec,
    state_pool: Option<&sqlx::PgPool>,
    checks: Checks,
) -> Result<Vec<String>, PreflightError> {
    let mut passed = Vec::new();
    let p = &spec.provider;
    if checks.key
        && !p.embedded
        && let Some(file) = &p.api_key_file
    {
        match std::fs::read_to_string(file) {
            Ok(k) if !k.trim().is_empty() => passed.push(format!("API key file {file} is readable")),
            Ok(_) => return Err(fail("provider.api_key_file", format!("the key file {file} is empty"))),
            Err(e) => return Err(fail("provider.api_key_file", format!("the key file {file} cannot be read: {e}"))),
        }
    } else if checks.key && !p.embedded {
        if std::env::var(&p.api_key_env).map_or(true, |k| k.trim().is_empty()) {
            return Err(fail(
                "provider.api_key_env",
                format!(
                    "the variable {} is not set: export the API key in it (the key itself never goes in a spec)",
                    p.api_key_env
                ),
            ));
        }
        passed.push(format!("API key variable {} is set", p.api_key_env));
    }
    if checks.key {
        for (i, output) in spec.outputs.iter().enumerate().filter(|(_, o)| o.vin_hash().is_some()) {
            let described = crate::io::output::vin_hash::described(output);
            crate::io::output::vin_hash::VinHasher::for_output(output, &described)
                .map_err(|e| fail(format!("outputs[{i}].vin_hash_key_env"), format!("{e}; nothing was called")))?;
            passed.push(format!("output {}'s VIN hash key variable {} is set", i + 1, output.vin_hash_key_env()));
        }
    }
    for (i, output) in spec.outputs.iter().enumerate() {
        crate::io::output::probe(state_pool, output)
            .await
            .map_err(|e| fail(format!("outputs[{i}]"), format!("cannot be written: {e}; nothing was called")))?;
        passed.push(format!("output {} can be written", i + 1));
    }
    source_reads(spec).await?;
    passed.push("the source can be read".to_string());
    if checks.api && !p.embedded {
        api_answers(&p.base_url).await?;
        passed.push(format!("the API host answers at {}", p.base_url));
    }
    Ok(passed)
}

/// Any HTTP answer proves the host is there; a refused connection, a DNS or
/// TLS failure or silence does not. The request costs no quota.
async fn api_answers(base_url: &str) -> Result<(), PreflightError> {
    let http = reqwest::Client::builder()
        .timeout(API_TIMEOUT)
        .build()
        .map_err(|e| fail("provider.base_url", format!("cannot build an HTTP client: {e}")))?;
    let url = format!("{}{}", base_url.trim_end_matches('/'), crate::api::OPENAPI_PATH);
    match http.get(&url).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = if e.is_timeout() {
                format!("no answer within {} s", API_TIMEOUT.as_secs())
            } else if e.is_connect() {
                "the connection failed (refused, unknown host or TLS)".to_string()
            } else {
                e.to_string()
            };
            Err(fail(
                "provider.base_url",
                format!("nothing answers at {base_url}: {why}: is the API up, and is base_url right?"),
            ))
        }
    }
}

/// The source's first row can be read: files exist and open (header, VIN
/// column, compression, encoding), objects can be listed, the database
/// connects and the table or query runs.
async fn source_reads(spec: &JobSpec) -> Result<(), PreflightError> {
    let src = |e: &dyn std::fmt::Display| fail("source", e.to_string());
    match &spec.source {
        SourceSpec::File { path, format, vin_column, carry, .. } => {
            let files = crate::job::plan::expand_glob(path).map_err(|e| src(&e))?;
            for file in files {
                let fmt =
                    crate::job::plan::file_format(&file, *format, vin_column.as_deref(), carry).map_err(|e| src(&e))?;
                let shown = file.display().to_string();
                let encoding = TextEncoding::of(spec.source.encoding_label());
                let first = tokio::task::spawn_blocking(move || -> Result<(), SourceError> {
                    let mut rows = FileSource::open_encoded(&file, &shown, fmt, encoding)?;
                    rows.next().transpose().map(drop)
                })
                .await
                .map_err(|e| src(&e))?;
                first.map_err(|e| src(&e))?;
            }
        }
        SourceSpec::S3 { url, endpoint, region, .. } => {
            let s3 = crate::io::s3::S3::connect(endpoint.as_deref(), region.as_deref()).await;
            let url = crate::io::s3::S3Url::parse(url).map_err(|e| src(&e))?;
            s3.list(&url).await.map_err(|e| src(&e))?;
        }
        SourceSpec::Postgres { url_env, .. } => {
            let input = crate::job::plan::pg_input(&spec.source).map_err(|e| src(&e))?;
            let pool = crate::job::plan::source_pool(url_env).await.map_err(|e| src(&e))?;
            crate::io::source::postgres::probe(&pool, &input, spec.carry()).await.map_err(|e| src(&e))?;
            pool.close().await;
        }
    }
    Ok(())
}
