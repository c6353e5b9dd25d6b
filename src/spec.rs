//! Job specs: the TOML files in `jobs/` that say what to read, which API to
//! call and how hard, and where results go. Unknown keys are errors that name
//! the key, so a typo never silently changes a nightly job.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::MAX_BATCH;

/// A whole job spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Names the job in `status` and in outputs.
    pub name: String,
    /// The share of rows (0 to 1) that may end `failed` (dead-lettered,
    /// refused by the API, cancelled) before the run's exit code says so
    /// (exit 4). Invalid rows are validly rejected and never count. Default 0.
    #[serde(default)]
    pub max_failed_share: f64,
    pub source: SourceSpec,
    pub provider: ProviderSpec,
    #[serde(default)]
    pub cache: CacheSpec,
    #[serde(default)]
    pub recalls: RecallSpec,
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
    /// How long this job's bookkeeping is kept (`[retention]`); none: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// Run this spec on a schedule: a cron expression, `"0 2 * * *"` (five
    /// fields, or six with seconds first). `vinetl submit` registers it and
    /// `vinetl scheduler` starts one run per fire time; `{date}` in the
    /// source and output paths is the run's logical date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The schedule's IANA time zone, e.g. `Europe/Berlin` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Runs missed while no scheduler ran: `all`, `latest` (default) or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catchup: Option<Catchup>,
    /// How long after its fire time a run waits for its dated input to
    /// appear before it fails naming the path (default `6h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_input: Option<String>,
    /// A file or `s3://` URL (with `{date}` templates) whose presence says
    /// the run's input is complete, such as the exporter's `_SUCCESS`; a
    /// scheduled run waits for it instead of for the input itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_marker: Option<String>,
}

/// Which missed runs a scheduler starts when it finds fire times that
/// passed while none ran (more than [`MISSED_AFTER_SECS`] ago).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Catchup {
    /// Every missed run, oldest first.
    All,
    /// Only the newest; the others are recorded as missed.
    #[default]
    Latest,
    /// None; every missed run is recorded as missed.
    None,
}

/// A fire time this much in the past when a scheduler first sees it was
/// missed (no scheduler ran then); a younger one is on time. A scheduler
/// looks every few seconds, so only downtime makes a run this late.
pub const MISSED_AFTER_SECS: i64 = 600;

/// Retention: when a run of this spec is done, earlier ended jobs of the
/// same name older than `older_than` lose their input rows, batches, errors
/// and queue tasks (`vinetl prune`, for one name). Their counts stay for
/// `status`; their outputs are never touched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// A duration such as "30d" or "12h".
    pub older_than: String,
}

impl RetentionSpec {
    pub fn older_than_secs(&self) -> f64 {
        humantime::parse_duration(&self.older_than).map_or(f64::INFINITY, |d| d.as_secs_f64())
    }
}

/// Where the VINs come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceSpec {
    /// Local files: a path or a glob (`data/*.csv.gz`), relative to the
    /// spec's directory unless absolute.
    File {
        path: String,
        #[serde(default)]
        format: InputFormat,
        /// The VIN column of CSV or Parquet input (default `vin`).
        vin_column: Option<String>,
        /// Input columns copied to every output row, names and values kept.
        #[serde(default)]
        carry: Vec<String>,
        /// Text encoding of lines and CSV: strict UTF-8 by default, or a
        /// WHATWG label such as `latin1` for legacy exports.
        encoding: Option<String>,
        /// Fewer rows than this fail the job (default 0: an empty input
        /// only warns).
        #[serde(default)]
        min_rows: u64,
    },
    /// S3 objects: `s3://bucket/key`, a prefix ending in `/`, or a glob
    /// (`s3://bucket/exports/*.csv.gz`). Credentials come from the standard
    /// AWS chain; `endpoint` points at an S3-compatible store (path-style).
    S3 {
        url: String,
        endpoint: Option<String>,
        region: Option<String>,
        #[serde(default)]
        format: InputFormat,
        vin_column: Option<String>,
        #[serde(default)]
        carry: Vec<String>,
        encoding: Option<String>,
        #[serde(default)]
        min_rows: u64,
    },
    /// A Postgres table and column (read in keyset pages on `key`), or a
    /// SELECT (read through a cursor).
    Postgres {
        /// Name of the environment variable holding the source database URL.
        #[serde(default = "default_source_url_env")]
        url_env: String,
        table: Option<String>,
        /// The VIN column (default `vin`).
        column: Option<String>,
        /// A unique, ordered column for keyset paging (default `id`).
        key: Option<String>,
        /// Instead of table/column: a SELECT with a `vin` column.
        query: Option<String>,
        #[serde(default)]
        carry: Vec<String>,
        #[serde(default)]
        min_rows: u64,
    },
}

impl JobSpec {
    /// The schedule, if the spec has one (validated on load).
    pub fn calendar(&self) -> Option<crate::calendar::Calendar> {
        let cron = self.schedule.as_deref()?;
        crate::calendar::Calendar::new(cron, self.timezone.as_deref()).ok()
    }

    /// `wait_for_input` in seconds (6 hours by default).
    pub fn wait_for_input_secs(&self) -> f64 {
        self.wait_for_input
            .as_deref()
            .and_then(|d| humantime::parse_duration(d).ok())
            .map_or(6.0 * 3600.0, |d| d.as_secs_f64())
    }

    /// Whether a path or query holds a `{date}` template.
    pub fn has_templates(&self) -> bool {
        let mut any = false;
        let mut probe = self.clone();
        let _ = probe.templated(&mut |t| {
            any |= crate::calendar::has_template(t);
            Ok(t.to_string())
        });
        any
    }

    /// The spec of the run for `date`: every `{date}` template filled.
    pub fn for_date(&self, date: chrono::NaiveDate) -> Result<JobSpec, SpecError> {
        let mut spec = self.clone();
        spec.templated(&mut |t| crate::calendar::fill(t, date)).map_err(|(field, message)| SpecError::Invalid {
            path: spec_name(&self.name),
            field: field.to_string(),
            message,
        })?;
        Ok(spec)
    }

    /// Rewrites each text that may hold a template: the source's path, URL
    /// or query, and each Parquet output's path.
    fn templated(&mut self, f: &mut dyn FnMut(&str) -> Result<String, String>) -> Result<(), (&'static str, String)> {
        match &mut self.source {
            SourceSpec::File { path, .. } => *path = f(path).map_err(|e| ("source.path", e))?,
            SourceSpec::S3 { url, .. } => *url = f(url).map_err(|e| ("source.url", e))?,
            SourceSpec::Postgres { query: Some(q), .. } => *q = f(q).map_err(|e| ("source.query", e))?,
            SourceSpec::Postgres { .. } => {}
        }
        for output in &mut self.outputs {
            if let OutputSpec::Parquet { path, .. } = output {
                *path = f(path).map_err(|e| ("outputs.path", e))?;
            }
        }
        if let Some(m) = &mut self.ready_marker {
            *m = f(m).map_err(|e| ("ready_marker", e))?;
        }
        Ok(())
    }
}

fn spec_name(name: &str) -> String {
    format!("spec {name:?}")
}

fn default_source_url_env() -> String {
    "SOURCE_DATABASE_URL".to_string()
}

/// How an input file is laid out; `auto` decides from the name (`.csv`,
/// `.tsv`, `.parquet`, else one VIN per line).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    #[default]
    Auto,
    Lines,
    Csv,
    Parquet,
}

/// The Car Vin API account to call, and how hard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// e.g. `https://www.carvinapi.com` or a local `vinetl serve`.
    #[serde(default)]
    pub base_url: String,
    /// `vinetl run` starts the Car Vin API in-process on a loopback port,
    /// with this provider's rate and daily quota as the account's limits, and
    /// calls it (no key variable needed). For the demo and trials; one machine.
    #[serde(default)]
    pub embedded: bool,
    /// Name of the environment variable that holds the API key (never the
    /// key; default `CARVIN_API_KEY`).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// Instead of the variable: a file holding the API key (a Docker or
    /// Kubernetes secret), relative to the spec's directory unless
    /// absolute. Read again when it changes, so a rotated key needs no
    /// restart; workers read only files `VINETL_API_KEY_FILES` allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// VINs per batch-decode call, 1 to 20.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Sustained requests per second for the whole account, across workers.
    pub requests_per_second: f64,
    /// Requests allowed back to back above the sustained rate (default: one
    /// second's worth).
    pub burst: Option<f64>,
    /// Requests a day for the account (the free tier's is 100).
    pub daily_quota: Option<u64>,
    /// When the daily quota resets, as `HH:MM` UTC (default `00:00`).
    pub quota_reset_utc: Option<String>,
    /// Calls in flight at once, across every worker of the account.
    pub max_in_flight: Option<u32>,
    /// Limiter key shared by every job on the same account (default: the
    /// base URL and key variable).
    pub account: Option<String>,
    /// Per-call timeout.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Attempts per batch before it is dead-lettered (429s do not count).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How long the API may stay unreachable (refused connections, DNS or
    /// TLS failures, a run of 5xx) before the job fails: `6h` (default),
    /// `30m`, `90s`. Until then the job waits and probes; no batch loses an
    /// attempt and no refused call counts against the quota.
    pub give_up_after: Option<String>,
}

fn default_key_env() -> String {
    "CARVIN_API_KEY".to_string()
}

fn parse_hh_mm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn default_batch_size() -> usize {
    MAX_BATCH
}
/// The guide promises single decodes "under 500ms"; 30 s covers a slow
/// 20-VIN batch without letting a hung connection hold a slot for long.
fn default_timeout_secs() -> u64 {
    30
}
/// Five attempts with exponential backoff span about a minute of outage.
fn default_max_attempts() -> u32 {
    5
}

impl ProviderSpec {
    /// How long a call that no answer came back from (a crashed worker)
    /// holds its batch, and its in-flight place, before it is taken over:
    /// two full call timeouts plus slack. (`Store::lost_tasks` reads the
    /// same from each job's stored spec, in SQL.)
    pub fn call_lease_secs(&self) -> f64 {
        2.0 * self.timeout_secs as f64 + 30.0
    }

    /// The limiter key. An embedded API's address changes every run, so
    /// its account does not depend on it.
    pub fn account(&self) -> String {
        if let Some(a) = &self.account {
            return a.clone();
        }
        if self.embedded {
            return "embedded".to_string();
        }
        let key = self.api_key_file.as_deref().unwrap_or(&self.api_key_env);
        format!("{}#{key}", self.base_url.trim_end_matches('/'))
    }

    /// `give_up_after` in seconds (6 hours by default).
    pub fn give_up_after_secs(&self) -> f64 {
        self.give_up_after
            .as_deref()
            .and_then(|d| humantime::parse_duration(d).ok())
            .map_or(6.0 * 3600.0, |d| d.as_secs_f64())
    }

    /// Minutes after UTC midnight at which the quota resets.
    pub fn quota_reset_minutes(&self) -> u32 {
        self.quota_reset_utc.as_deref().and_then(parse_hh_mm).unwrap_or(0)
    }

    pub fn burst(&self) -> f64 {
        self.burst.unwrap_or(self.requests_per_second.max(1.0))
    }
}

/// Decodes younger than the TTL are reused and cost no call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Vehicle specifications rarely change: 30 days by default.
    #[serde(default = "default_cache_ttl_hours")]
    pub ttl_hours: f64,
}

fn default_cache_ttl_hours() -> f64 {
    720.0
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec { ttl_hours: default_cache_ttl_hours() }
    }
}

/// Recall lookups: after decoding, one lookup per distinct make, model and
/// model year (or per VIN with `per_vin`), skipped when cached within the TTL.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecallSpec {
    #[serde(default)]
    pub enabled: bool,
    /// How long a lookup is reused (default 24 h: recalls are published daily).
    pub ttl_hours: Option<f64>,
    #[serde(default)]
    pub per_vin: bool,
}

impl RecallSpec {
    pub fn ttl_hours(&self) -> f64 {
        self.ttl_hours.unwrap_or(24.0)
    }

    /// How rows' recall keys are made: off, by make/model/year, or by VIN.
    pub fn mode(&self) -> crate::columns::RecallMode {
        use crate::columns::RecallMode;
        match (self.enabled, self.per_vin) {
            (false, _) => RecallMode::Off,
            (true, false) => RecallMode::ByModel,
            (true, true) => RecallMode::ByVin,
        }
    }
}

use crate::columns::{VinHash, is_identifier};

/// Where results go besides vinetl's own tables. Every output holds one row
/// per input row; writing a job again replaces its earlier output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OutputSpec {
    /// A Parquet dataset: a local directory or `s3://bucket/prefix/`.
    Parquet {
        path: String,
        /// `dt` (default): one Hive partition per job date, `dt=YYYY-MM-DD/`;
        /// another name uses that key instead of `dt`; `none`: no partition.
        partition: Option<String>,
        /// S3-compatible endpoint (path-style); `AWS_ENDPOINT_URL` works too.
        endpoint: Option<String>,
        region: Option<String>,
        /// Rows per data file (default 2,000,000).
        rows_per_file: Option<u64>,
        /// A keyed hash of the VIN (`vin_hmac`): `beside` the VIN columns,
        /// or `instead` of them (no `vin` and no `raw_vin` in the dataset).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vin_hash: Option<VinHash>,
        /// The variable holding the hash key (default `VINETL_VIN_HASH_KEY`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vin_hash_key_env: Option<String>,
    },
    /// Postgres tables: one row per input row of every job (`results_table`),
    /// and the latest decode per VIN (`vehicles_table`).
    Postgres {
        /// The variable holding the database URL (default: `DATABASE_URL`,
        /// the state database).
        url_env: Option<String>,
        #[serde(default = "default_output_schema")]
        schema: String,
        results_table: String,
        #[serde(default = "default_vehicles_table")]
        vehicles_table: String,
        /// `beside` only: a `vin_hmac` column in both tables, next to `vin`
        /// (the vehicles table is keyed by VIN, so `instead` is refused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vin_hash: Option<VinHash>,
        /// The variable holding the hash key (default `VINETL_VIN_HASH_KEY`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vin_hash_key_env: Option<String>,
    },
}

/// The variable an output's `vin_hash` key is read from unless the output
/// names another (`vin_hash_key_env`).
pub const DEFAULT_VIN_HASH_KEY_ENV: &str = "VINETL_VIN_HASH_KEY";

impl OutputSpec {
    /// The output's `vin_hash`, if it has one.
    pub fn vin_hash(&self) -> Option<VinHash> {
        match self {
            OutputSpec::Parquet { vin_hash, .. } | OutputSpec::Postgres { vin_hash, .. } => *vin_hash,
        }
    }

    /// The variable holding the output's hash key.
    pub fn vin_hash_key_env(&self) -> &str {
        match self {
            OutputSpec::Parquet { vin_hash_key_env, .. } | OutputSpec::Postgres { vin_hash_key_env, .. } => {
                vin_hash_key_env.as_deref().unwrap_or(DEFAULT_VIN_HASH_KEY_ENV)
            }
        }
    }

    fn vin_hash_key_env_set(&self) -> Option<&str> {
        match self {
            OutputSpec::Parquet { vin_hash_key_env, .. } | OutputSpec::Postgres { vin_hash_key_env, .. } => {
                vin_hash_key_env.as_deref()
            }
        }
    }
}

fn default_output_schema() -> String {
    "public".to_string()
}
fn default_vehicles_table() -> String {
    "vehicles".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: cannot read job spec: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid { path: String, field: String, message: String },
}

impl JobSpec {
    /// Reads and checks a spec. Relative file paths are resolved against the
    /// spec's directory, so `vinetl run jobs/demo.toml` works from anywhere.
    pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: shown.clone(), source })?;
        let mut spec = JobSpec::parse(&shown, &text)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let local = spec.ready_marker.as_mut().filter(|m| !m.starts_with("s3://"));
        if let SourceSpec::File { path: p, .. } = &mut spec.source
            && Path::new(p.as_str()).is_relative()
        {
            *p = dir.join(&*p).display().to_string();
        }
        if let Some(m) = local
            && Path::new(m.as_str()).is_relative()
        {
            *m = dir.join(&*m).display().to_string();
        }
        if let Some(f) = &mut spec.provider.api_key_file
            && Path::new(f.as_str()).is_relative()
        {
            *f = dir.join(&*f).display().to_string();
        }
        // Output directories are relative to where the command runs
        // (`vinetl run jobs/demo.toml` writes `./out/...`), fixed at submit.
        for output in &mut spec.outputs {
            if let OutputSpec::Parquet { path: p, .. } = output
                && !p.starts_with("s3://")
                && Path::new(p.as_str()).is_relative()
                && let Ok(cwd) = std::env::current_dir()
            {
                *p = cwd.join(&*p).display().to_string();
            }
        }
        Ok(spec)
    }

    /// Parses spec text; `path` only names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let message = e.to_string();
            if message.contains("unknown field `api_key`") || message.contains("unknown field `key`") {
                return SpecError::Invalid {
                    path: path.to_string(),
                    field: "provider.api_key".to_string(),
                    message: "a spec never holds the API key: put it in an environment variable (named by \
                              provider.api_key_env, default CARVIN_API_KEY) or in a file (provider.api_key_file, \
                              e.g. a Docker or Kubernetes secret)"
                        .into(),
                };
            }
            SpecError::Parse { path: path.to_string(), message }
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// Checks a spec's values; `path` names it in errors. Run on every spec
    /// read back from the database too: what is stored is input.
    pub fn validate(&self, path: &str) -> Result<(), SpecError> {
        let invalid = |field: &str, message: &str| {
            Err(SpecError::Invalid { path: path.to_string(), field: field.to_string(), message: message.into() })
        };
        let p = &self.provider;
        if self.name.trim().is_empty() {
            return invalid("name", "must not be empty");
        }
        if !(1..=MAX_BATCH).contains(&p.batch_size) {
            return invalid("provider.batch_size", "must be 1 to 20 (the API's batch limit)");
        }
        if !(p.requests_per_second.is_finite() && p.requests_per_second > 0.0) {
            return invalid("provider.requests_per_second", "must be a positive number");
        }
        if p.burst.is_some_and(|b| !(b.is_finite() && b >= 1.0)) {
            return invalid("provider.burst", "must be at least 1");
        }
        if !(p.embedded || p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
            return invalid("provider.base_url", "must start with http:// or https:// (or set embedded = true)");
        }
        if p.api_key_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return invalid("provider.api_key_file", "must be a path (or leave it out and use api_key_env)");
        }
        if p.api_key_env.trim().is_empty() || p.api_key_env.contains(char::is_whitespace) {
            return invalid(
                "provider.api_key_env",
                "must name an environment variable (the key itself never goes in a spec)",
            );
        }
        if p.quota_reset_utc.as_deref().is_some_and(|r| parse_hh_mm(r).is_none()) {
            return invalid("provider.quota_reset_utc", "must be HH:MM (UTC), e.g. \"00:00\"");
        }
        if p.max_attempts == 0 {
            return invalid("provider.max_attempts", "must be at least 1");
        }
        if let Some(d) = &p.give_up_after
            && humantime::parse_duration(d).is_err()
        {
            return invalid("provider.give_up_after", "must be a duration such as \"6h\", \"30m\" or \"90s\"");
        }
        if let Some(r) = &self.retention
            && humantime::parse_duration(&r.older_than).is_err()
        {
            return invalid("retention.older_than", "must be a duration such as \"30d\" or \"12h\"");
        }
        match &self.schedule {
            Some(cron) => {
                if let Err(e) = crate::calendar::Calendar::new(cron, self.timezone.as_deref()) {
                    let field = if e.contains("time zone") { "timezone" } else { "schedule" };
                    return invalid(field, &e);
                }
                if self.provider.embedded {
                    return invalid(
                        "schedule",
                        "a scheduled spec runs on workers: point provider.base_url at an API instead of embedded = true",
                    );
                }
            }
            None if self.timezone.is_some()
                || self.catchup.is_some()
                || self.wait_for_input.is_some()
                || self.ready_marker.is_some() =>
            {
                return invalid(
                    "schedule",
                    "timezone, catchup, wait_for_input and ready_marker need a schedule (a cron expression)",
                );
            }
            None => {}
        }
        if let Some(w) = &self.wait_for_input
            && humantime::parse_duration(w).is_err()
        {
            return invalid("wait_for_input", "must be a duration such as \"6h\" or \"30m\"");
        }
        // Templates are checked by filling them with any date.
        if let Err((field, message)) = self
            .clone()
            .templated(&mut |t| crate::calendar::fill(t, chrono::NaiveDate::from_ymd_opt(2000, 1, 1).expect("a date")))
        {
            return Err(SpecError::Invalid { path: path.to_string(), field: field.to_string(), message });
        }
        if !(self.max_failed_share.is_finite() && (0.0..=1.0).contains(&self.max_failed_share)) {
            return invalid("max_failed_share", "must be a share from 0 to 1, e.g. 0.01 for 1 %");
        }
        if let Some(e) = self.source.encoding_label()
            && encoding_rs::Encoding::for_label(e.trim().as_bytes()).is_none()
        {
            return invalid(
                "source.encoding",
                "is not a known encoding: use \"utf-8\" (default), \"latin1\", \"windows-1252\", ...",
            );
        }
        if !(self.cache.ttl_hours.is_finite() && self.cache.ttl_hours >= 0.0) {
            return invalid("cache.ttl_hours", "must be zero or more");
        }
        if let SourceSpec::Postgres { table, query, .. } = &self.source {
            match (table, query) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return invalid("source", "a postgres source needs exactly one of `table` or `query`"),
            }
        }
        if let Some(taken) = self.carry().iter().find(|c| crate::columns::reserved_names().any(|r| r == c.as_str())) {
            return invalid(
                "source.carry",
                &format!(
                    "{taken:?} is an output column of vinetl's own; rename it in the source (a query can alias it)"
                ),
            );
        }
        for (i, output) in self.outputs.iter().enumerate() {
            self.validate_vin_hash(path, i, output)?;
            match output {
                OutputSpec::Parquet { path, partition, rows_per_file, .. } => {
                    if path.trim().is_empty() {
                        return invalid("outputs.path", "must not be empty");
                    }
                    if partition.as_deref().is_some_and(|p| !is_identifier(p)) {
                        return invalid("outputs.partition", "must be `dt`, another column-like name, or `none`");
                    }
                    if *rows_per_file == Some(0) {
                        return invalid("outputs.rows_per_file", "must be at least 1");
                    }
                }
                OutputSpec::Postgres { schema, results_table, vehicles_table, .. } => {
                    if ![schema, results_table, vehicles_table].iter().all(|n| is_identifier(n)) {
                        return invalid(
                            "outputs",
                            "postgres schema and table names must be lowercase letters, digits and _",
                        );
                    }
                    if results_table == vehicles_table {
                        return invalid("outputs.vehicles_table", "must differ from results_table");
                    }
                }
            }
        }
        if self.recalls.ttl_hours.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
            return invalid("recalls.ttl_hours", "must be zero or more");
        }
        if let SourceSpec::S3 { url, .. } = &self.source
            && !url.starts_with("s3://")
        {
            return invalid("source.url", "must start with s3://");
        }
        Ok(())
    }

    /// An output's `vin_hash` and `vin_hash_key_env`.
    fn validate_vin_hash(&self, path: &str, i: usize, output: &OutputSpec) -> Result<(), SpecError> {
        let invalid = |field: &str, message: String| {
            Err(SpecError::Invalid { path: path.to_string(), field: format!("outputs[{i}].{field}"), message })
        };
        if let Some(var) = output.vin_hash_key_env_set() {
            if output.vin_hash().is_none() {
                return invalid("vin_hash_key_env", "is only read with vin_hash = \"beside\" or \"instead\"".into());
            }
            if var.trim().is_empty() || var.contains(char::is_whitespace) || var.contains('=') {
                return invalid(
                    "vin_hash_key_env",
                    "must name an environment variable (the key itself never goes in a spec)".into(),
                );
            }
        }
        if output.vin_hash() != Some(VinHash::Instead) {
            return Ok(());
        }
        if let OutputSpec::Postgres { .. } = output {
            return invalid(
                "vin_hash",
                "\"instead\" is for Parquet outputs: a Postgres output's vehicles table is keyed by VIN; use \
                 vin_hash = \"beside\" here, or write the VIN-free copy to a Parquet output"
                    .into(),
            );
        }
        let vin_column = match &self.source {
            SourceSpec::File { vin_column, .. } | SourceSpec::S3 { vin_column, .. } => vin_column.as_deref(),
            SourceSpec::Postgres { column, .. } => column.as_deref(),
        };
        let vin_column = vin_column.unwrap_or("vin");
        if let Some(c) = self.carry().iter().find(|c| c.eq_ignore_ascii_case(vin_column)) {
            return invalid(
                "vin_hash",
                format!(
                    "\"instead\" keeps VINs out of this output, but source.carry copies the VIN column {c:?} into it"
                ),
            );
        }
        Ok(())
    }

    /// Columns carried from input to output.
    pub fn carry(&self) -> &[String] {
        match &self.source {
            SourceSpec::File { carry, .. } | SourceSpec::S3 { carry, .. } | SourceSpec::Postgres { carry, .. } => carry,
        }
    }
}

impl SourceSpec {
    /// The source's text encoding, as the spec names it (checked at load).
    pub fn encoding_label(&self) -> Option<&str> {
        match self {
            SourceSpec::File { encoding, .. } | SourceSpec::S3 { encoding, .. } => encoding.as_deref(),
            SourceSpec::Postgres { .. } => None,
        }
    }

    /// Fewer input rows than this fail the job.
    pub fn min_rows(&self) -> u64 {
        match self {
            SourceSpec::File { min_rows, .. }
            | SourceSpec::S3 { min_rows, .. }
            | SourceSpec::Postgres { min_rows, .. } => *min_rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[source]
kind = "file"
path = "fleet.csv"
[provider]
base_url = "http://127.0.0.1:8080"
api_key_env = "CARVIN_API_KEY"
requests_per_second = 5
"#;

    #[test]
    fn a_minimal_spec_gets_documented_defaults() {
        let spec = JobSpec::parse("t.toml", MINIMAL).unwrap();
        assert_eq!(spec.provider.batch_size, 20);
        assert_eq!(spec.provider.burst(), 5.0);
        assert_eq!(spec.provider.max_attempts, 5);
        assert_eq!(spec.cache.ttl_hours, 720.0);
        assert_eq!(spec.provider.account(), "http://127.0.0.1:8080#CARVIN_API_KEY");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        for (typo, key) in [
            ("requests_per_secnd = 3", "requests_per_secnd"),
            ("[cache]\nttl = 3", "ttl"),
            ("colour = 'red'", "colour"),
        ] {
            let text = if typo.starts_with('[') {
                format!("{MINIMAL}{typo}\n")
            } else if typo.starts_with("requests") {
                MINIMAL.replace("requests_per_second = 5", &format!("requests_per_second = 5\n{typo}"))
            } else {
                format!("{typo}\n{MINIMAL}")
            };
            let err = JobSpec::parse("t.toml", &text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("t.toml"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = JobSpec::parse(
            "t.toml",
            &MINIMAL.replace("requests_per_second = 5", "requests_per_second = 5\nbatch_size = 21"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("provider.batch_size"), "{err}");
        let err = JobSpec::parse("t.toml", &MINIMAL.replace("CARVIN_API_KEY", "sk live 123")).unwrap_err().to_string();
        assert!(err.contains("provider.api_key_env"), "{err}");
        let err = JobSpec::parse(
            "t.toml",
            &MINIMAL.replace("requests_per_second = 5", "requests_per_second = 5\napi_key = \"sk-live-1\""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("never holds the API key") && err.contains("api_key_file"), "{err}");
        assert!(!err.contains("sk-live-1"), "the key is not echoed: {err}");
    }

    #[test]
    fn schedules_and_templates_are_checked_on_load() {
        let with = |top: &str| MINIMAL.replacen("name = ", &format!("{top}\nname = "), 1);
        let err = |top: &str| JobSpec::parse("t.toml", &with(top)).unwrap_err().to_string();
        assert!(err("schedule = \"0 2 * *\"").contains("schedule: \"0 2 * *\" is not a cron expression"));
        assert!(err("schedule = \"0 2 * * *\"\ntimezone = \"Mars/Base\"").contains("timezone:"));
        assert!(err("catchup = \"all\"").contains("need a schedule"));
        assert!(err("schedule = \"0 2 * * *\"\nwait_for_input = \"soon\"").contains("wait_for_input"));
        let spec = JobSpec::parse("t.toml", &with("schedule = \"0 2 * * *\"\ncatchup = \"none\"")).unwrap();
        assert_eq!(spec.catchup, Some(Catchup::None));
        assert!(spec.calendar().is_some() && !spec.has_templates());
        let templated = MINIMAL.replace("fleet.csv", "drop/{date-1}/vins.txt");
        let spec = JobSpec::parse("t.toml", &templated).unwrap();
        assert!(spec.has_templates());
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let SourceSpec::File { path, .. } = spec.for_date(day).unwrap().source else { panic!() };
        assert_eq!(path, "drop/2026-12-04/vins.txt");
        let bad = MINIMAL.replace("fleet.csv", "drop/{date-x}/vins.txt");
        let err = JobSpec::parse("t.toml", &bad).unwrap_err().to_string();
        assert!(err.contains("source.path") && err.contains("{date-x}"), "{err}");
    }

    #[test]
    fn vin_hash_is_checked_on_load() {
        let with = |outputs: &str| JobSpec::parse("t.toml", &format!("{MINIMAL}{outputs}"));
        let parquet = "[[outputs]]\nkind = \"parquet\"\npath = \"out\"\n";
        let postgres = "[[outputs]]\nkind = \"postgres\"\nresults_table = \"r\"\n";
        let spec = with(&format!("{parquet}vin_hash = \"instead\"\n{postgres}vin_hash = \"beside\"\n")).unwrap();
        assert_eq!(spec.outputs[0].vin_hash(), Some(VinHash::Instead));
        assert_eq!(spec.outputs[1].vin_hash(), Some(VinHash::Beside));
        assert_eq!(spec.outputs[1].vin_hash_key_env(), "VINETL_VIN_HASH_KEY");
        let spec = with(&format!("{parquet}vin_hash = \"beside\"\nvin_hash_key_env = \"K\"\n")).unwrap();
        assert_eq!(spec.outputs[0].vin_hash_key_env(), "K");
        // Stored specs without the option serialise as before.
        let plain = with(parquet).unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("vin_hash"));
        let err = |o: &str| with(o).unwrap_err().to_string();
        let e = err(&format!("{parquet}vin_hash = \"sometimes\"\n"));
        assert!(e.contains("sometimes") && e.contains("beside"), "{e}");
        let e = err(&format!("{parquet}{postgres}vin_hash = \"instead\"\n"));
        assert!(e.contains("outputs[1].vin_hash") && e.contains("keyed by VIN") && e.contains("beside"), "{e}");
        let e = err(&format!("{parquet}vin_hash_key_env = \"K\"\n"));
        assert!(e.contains("outputs[0].vin_hash_key_env"), "{e}");
        let e = err(&format!("{parquet}vin_hash = \"beside\"\nvin_hash_key_env = \"a key\"\n"));
        assert!(e.contains("outputs[0].vin_hash_key_env"), "{e}");
        let carried = MINIMAL
            .replace("path = \"fleet.csv\"", "path = \"fleet.csv\"\nvin_column = \"chassis\"\ncarry = [\"Chassis\"]");
        let e = JobSpec::parse("t.toml", &format!("{carried}{parquet}vin_hash = \"instead\"\n")).unwrap_err();
        assert!(e.to_string().contains("outputs[0].vin_hash") && e.to_string().contains("carry"), "{e}");
    }

    #[test]
    fn the_shipped_specs_parse() {
        for entry in std::fs::read_dir("jobs").unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                JobSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}
