//! What the state store takes and gives: the records of jobs, rows,
//! batches and counts, its errors, and where it lives. Both dialects and
//! the core speak these; they import nothing of the store's own.

use crate::api::Recall;
use crate::columns::CarriedSeen;

/// One input row as the planner stores it.
#[derive(Debug, Clone)]
pub struct PlannedRow {
    pub source: String,
    pub row_number: i64,
    pub raw_vin: String,
    pub vin: Option<String>,
    pub check_digit_valid: Option<bool>,
    pub error_code: Option<&'static str>,
    pub error_text: Option<String>,
    pub carried: serde_json::Value,
}

/// A chunk of planned rows as the store takes them, in the store's own form
/// ([`super::Store::chunk`]): built apart from the insert, so the planner
/// can build the next chunk while the store inserts this one.
#[derive(Debug, Clone)]
pub struct PlannedChunk {
    pub(super) form: ChunkForm,
    pub(super) len: usize,
    /// The source's row number of the last row (0 without rows).
    pub(super) last_row: i64,
    /// What the rows' carried columns hold.
    pub(super) seen: CarriedSeen,
}

#[derive(Debug, Clone)]
pub(super) enum ChunkForm {
    /// The JSON array SQLite's `INSERT … SELECT` reads the rows from.
    Json(serde_json::Value),
    /// Postgres: each row's COPY text as far as the planner knows it; the
    /// insert adds the plan.
    Copy(Vec<CopyRow>),
}

/// A planned row for Postgres' COPY (see [`ChunkForm::Copy`]).
#[derive(Debug, Clone)]
pub(super) struct CopyRow {
    pub row_number: i64,
    /// `row_number`, `raw_vin`, `vin`, `check_digit_valid` and `carried` in
    /// COPY text, each with its tab.
    pub head: String,
    pub vin: Option<String>,
    pub error_code: Option<&'static str>,
    pub error_text: Option<String>,
}

impl PlannedChunk {
    /// `rows` in `form`.
    pub(super) fn new(form: ChunkForm, rows: &[PlannedRow]) -> PlannedChunk {
        let mut seen = CarriedSeen::default();
        for r in rows {
            seen.add(&r.carried);
        }
        PlannedChunk { form, len: rows.len(), last_row: rows.last().map_or(0, |r| r.row_number), seen }
    }

    /// The rows as JSON ([`ChunkForm::Json`]).
    pub(super) fn json(rows: &[PlannedRow]) -> PlannedChunk {
        let json = rows
            .iter()
            .map(|r| {
                serde_json::json!({"n": r.row_number, "raw": r.raw_vin, "vin": r.vin, "cdv": r.check_digit_valid,
                                   "code": r.error_code, "text": r.error_text, "carried": r.carried})
            })
            .collect();
        PlannedChunk::new(ChunkForm::Json(serde_json::Value::Array(json)), rows)
    }
}

/// What one planning of a job has learnt of its VINs, kept between its
/// chunks so that a VIN seen before needs no lookup ([`super::Store::plan_memo`]):
/// each VIN's fresh cached decode, or none. Bounded: past
/// [`PlanMemo::MAX_VINS`] VINs it stops learning, and VINs it does not
/// hold are looked up as before.
#[derive(Debug, Default)]
pub struct PlanMemo {
    /// The job had no rows when this planning began: a VIN this memo has
    /// not seen is the job's first of it, as long as the memo is not full.
    pub(super) fresh: bool,
    pub(super) vins: std::collections::HashMap<[u8; 17], Option<CachedDecode>>,
}

impl PlanMemo {
    /// About 100 bytes a VIN: 25 MB at most.
    pub(super) const MAX_VINS: usize = 250_000;

    /// Whether every VIN the job holds is here (a VIN not here is new).
    pub(super) fn complete(&self) -> bool {
        self.fresh && self.vins.len() < Self::MAX_VINS
    }

    pub(super) fn holds(&self, vin: &str) -> bool {
        self.get(vin).is_some()
    }

    /// A VIN's cached decode (or none), if the job has had the VIN before.
    pub(super) fn get(&self, vin: &str) -> Option<&Option<CachedDecode>> {
        self.vins.get(<&[u8; 17]>::try_from(vin.as_bytes()).ok()?)
    }

    /// Remembers a VIN the job has now had, and its cached decode, while
    /// there is room.
    pub(super) fn learn(&mut self, vin: &str, decode: &Option<CachedDecode>) {
        if let (Ok(key), true) = (<[u8; 17]>::try_from(vin.as_bytes()), self.vins.len() < Self::MAX_VINS) {
            self.vins.insert(key, decode.clone());
        }
    }
}

/// A VIN's decode as the cache held it at planning: its error, and its
/// decode time as Postgres writes a `timestamptz`.
#[derive(Debug, Clone)]
pub(super) struct CachedDecode {
    pub error_code: Option<Box<str>>,
    pub error_text: Option<Box<str>>,
    pub decoded_at: Box<str>,
}

/// A batch claimed by a worker.
#[derive(Debug, Clone)]
pub struct ClaimedBatch {
    pub vins: Vec<String>,
    pub attempts: i32,
    /// Set for a recall lookup; `None` for a batch decode.
    pub lookup_key: Option<String>,
    /// A recall lookup's request; `None` for a batch decode, or for a key
    /// that is not registered (then no call was marked).
    pub lookup: Option<Lookup>,
}

/// How a call that reached the API ended, as each job counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// A 200 with a complete answer.
    Answered,
    /// A 429.
    RateLimited,
    /// A 5xx or a 408.
    ServerError,
    /// Sent, but no answer within the timeout.
    TimedOut,
    /// Anything else: a refused key, another 4xx, a malformed or cut-short
    /// answer.
    OtherError,
}

/// Why a batch goes back on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reschedule {
    /// The call failed in a retryable way (how, counted): one attempt used.
    Failed(CallEnd),
    /// The call got a 429: no attempt used.
    RateLimited,
    /// No call was made (the limiter said wait).
    NotCalled,
}

/// Which rows of an ended job `vinetl reprocess` runs again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redo {
    /// Only rows that did not decode.
    pub failed_only: bool,
    /// Only rows with these VINs (normalised: upper case, checked).
    pub vins: Option<Vec<String>>,
    /// Call for them even where the cache holds a fresh decode.
    pub refresh: bool,
    /// Rewrite the job's dataset partition even where a later job has
    /// written it since (`--force`).
    pub replace_newer: bool,
}

impl Redo {
    /// How this run was started, as `status` shows it.
    pub fn describe(&self) -> String {
        let mut how = "reprocess".to_string();
        if self.failed_only {
            how.push_str(" --failed-only");
        }
        if let Some(v) = &self.vins {
            how.push_str(&format!(" --vins ({} VINs)", v.len()));
        }
        if self.refresh {
            how.push_str(" --refresh");
        }
        if self.replace_newer {
            how.push_str(" --force");
        }
        how
    }
}

/// An earlier run of a job: how it was started and how it ended.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunSummary {
    pub run_no: i64,
    /// `submit`, or `reprocess` with its options.
    pub how: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub rows: i64,
    pub decoded: i64,
    pub failed: i64,
    /// The job's calls up to the end of this run (every run's together).
    pub calls_made: i64,
}

/// One call's 200 answer, to store, with its job and batch.
#[derive(Debug, Clone)]
pub struct Answered {
    pub job_id: i64,
    pub batch_no: i32,
    pub answer: Answer,
}

/// What a call answered.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A batch decode: the batch's VINs as claimed, and what the API said of each.
    Decoded { asked: Vec<String>, decoded: Vec<DecodedVin> },
    /// A recall lookup: its key, and the campaigns the API listed.
    Recalls { key: String, recalls: Vec<Recall> },
}

/// One decoded VIN to store.
#[derive(Debug, Clone)]
pub struct DecodedVin {
    pub vin: String,
    pub make: Option<String>,
    pub model: Option<String>,
    pub model_year: Option<i32>,
    /// A per-VIN error inside a 200 answer.
    pub error: Option<(String, String)>,
    /// The VIN's answer as JSON text (the vehicle as read, written out
    /// again; or the failure's VIN and error): it goes to the cache as it
    /// is, without a tree of values built and copied on the way.
    pub raw: Box<serde_json::value::RawValue>,
}

/// What `write` and `reprocess` check of an ended job before touching it,
/// read from its row alone ([`crate::store::Store::standing`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub state: String,
    pub state_reason: Option<String>,
    /// When retention pruned it (RFC 3339), if it did.
    pub pruned_at: Option<String>,
    /// Where its outputs went, each marked if a later job has taken it over.
    pub outputs: Vec<String>,
}

/// The counts `status` shows (and, frozen as JSON, a pruned job keeps).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct JobCounts {
    pub job_id: i64,
    pub name: String,
    pub state: String,
    pub state_reason: Option<String>,
    /// The current run: 1 for the submission, one more per `reprocess`.
    #[serde(default = "first_run")]
    pub run_no: i64,
    /// How the current run was started (`submit`, or `reprocess` and its options).
    #[serde(default)]
    pub run_how: String,
    /// The job's earlier runs, oldest first.
    #[serde(default)]
    pub earlier_runs: Vec<RunSummary>,
    /// A waiting job's next try (RFC 3339, UTC); `state_reason` says why.
    #[serde(default)]
    pub resume_at: Option<String>,
    /// Calls still to make: decode batches and recall lookups queued or
    /// in flight (recall lookups are planned once the decodes are done).
    #[serde(default)]
    pub calls_left: i64,
    /// Seconds until those calls are made at the account's granted rate
    /// and quota; `None` once the job has ended, while it is paused or
    /// planning, or before its account has a limiter row.
    #[serde(default)]
    pub eta_secs: Option<f64>,
    pub rows: i64,
    pub valid: i64,
    pub invalid: std::collections::BTreeMap<String, i64>,
    pub duplicates: i64,
    pub cache_hits: i64,
    pub decoded: i64,
    pub failed: i64,
    pub pending: i64,
    pub batches: i64,
    pub batches_done: i64,
    pub dead_lettered_batches: i64,
    pub dead_lettered_vins: i64,
    /// Every request that reached the API: those whose outcome was stored,
    /// those whose answer was lost, and those in flight (`calls` has each).
    pub calls_made: i64,
    pub calls_retried: i64,
    pub rate_limited: i64,
    /// Calls by outcome (absent from counts frozen before it existed).
    #[serde(default)]
    pub calls: CallCounts,
    /// The quota units the job's account used today, across every job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaToday>,
    /// Recall lookups on (`None`) or off.
    pub recalls: Option<RecallCounts>,
    /// Where the outputs went, once written.
    pub outputs: Vec<String>,
    /// When the job started and each phase ended.
    pub times: JobTimes,
    /// When retention deleted the job's rows (RFC 3339, UTC): these counts
    /// are the ones it had then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_at: Option<String>,
}

fn first_run() -> i64 {
    1
}

/// A job's calls by outcome; they add up to `calls_made`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CallCounts {
    /// 200s with a complete answer.
    pub answered: i64,
    pub rate_limited: i64,
    /// 5xx and 408 answers.
    pub server_error: i64,
    /// Sent, and no answer within the timeout.
    pub timed_out: i64,
    /// A refused key, another 4xx, a malformed or cut-short answer.
    pub other_error: i64,
    /// Sent by a worker that died (or lost its connection to the store)
    /// before storing the answer: it used quota all the same.
    pub answer_lost: i64,
    /// Sent, and not answered yet. A dead worker's call stays here until
    /// its lease runs out and another worker takes the batch over.
    pub in_flight: i64,
}

/// An account's daily quota, as the shared limiter has used it today.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct QuotaToday {
    pub account: String,
    /// Calls granted today (the quota day starts at `quota_reset`).
    pub used_today: i64,
    /// `None`: no daily quota is configured.
    pub daily_quota: Option<i64>,
    /// When the quota day ends (RFC 3339, UTC).
    pub resets_at: Option<String>,
    /// Calls per second the shared limiter grants the account now (its
    /// configured rate, lowered while 429s push back).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// A 429's Retry-After in force: no call before then (RFC 3339, UTC).
    #[serde(default)]
    pub blocked_until: Option<String>,
    /// The database's clock when read (Unix seconds), for the ETA.
    #[serde(skip)]
    pub now: f64,
}

/// What failed in a job, for `vinetl failures` and the jobs page: its
/// dead-lettered batches and its failed rows (each list at most `limit`
/// long, beside its total), and the errors that stopped the job itself.
/// Serialised as-is by `vinetl failures --json` (README.md documents it).
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Failures {
    pub job_id: i64,
    pub name: String,
    /// As `status` shows it (`paused` included).
    pub state: String,
    pub state_reason: Option<String>,
    /// The most either list holds.
    pub limit: i64,
    pub dead_batches_total: i64,
    /// In batch order.
    pub dead_batches: Vec<DeadBatch>,
    pub failed_rows_total: i64,
    /// In source and row order.
    pub failed_rows: Vec<FailedRow>,
    /// Errors of the job as a whole (a refused key, a failed write), newest first.
    pub job_errors: Vec<JobError>,
}

/// A batch given up on: a batch decode (`kind` `decode`: its rows ended
/// `failed`) or a recall lookup (`recall`: its rows' recalls are unknown).
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct DeadBatch {
    pub batch_no: i32,
    pub kind: String,
    pub vins: i64,
    /// Failed attempts (429s do not count).
    pub attempts: i64,
    pub last_error: Option<String>,
    /// When it was given up on (RFC 3339, UTC).
    pub updated_at: Option<String>,
}

/// An input row that ended `failed`.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct FailedRow {
    pub source: String,
    pub row: i64,
    /// The VIN as the input held it.
    pub raw_vin: String,
    /// `dead_letter` (its batch was given up on), `job_failed`, `cancelled`,
    /// or the API's per-VIN code.
    pub error_code: Option<String>,
    pub error_text: Option<String>,
    /// The dead-lettered batch that held its VIN, if any.
    pub batch_no: Option<i32>,
}

/// An error that stopped a job, from the `errors` table.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct JobError {
    pub code: String,
    pub text: String,
    pub at: Option<String>,
}

/// Where a claimed batch's request goes, for the audit trail: the API's
/// origin (scheme, host and port; never a key or a path) and the path of
/// each kind of call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallTo<'a> {
    pub provider: &'a str,
    pub decode: &'a str,
    pub recalls: &'a str,
}

/// One request from the audit trail.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditedCall {
    pub call_id: i64,
    /// RFC 3339, UTC.
    pub sent_at: String,
    pub job_id: i64,
    pub batch_no: i32,
    pub provider: String,
    pub endpoint: String,
    pub vins: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup: Option<String>,
}

/// Which requests `vinetl audit` shows.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub job_id: Option<i64>,
    pub vin: Option<String>,
    /// Only requests sent at or after this (Unix seconds).
    pub since: Option<f64>,
    pub limit: i64,
}

/// What `vinetl forget` did in the state store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Forgotten {
    /// Decode-cache entries deleted.
    pub cache: u64,
    /// Stored input rows whose VIN, raw text and carried columns were
    /// blanked (the row stays, so every job keeps its row count).
    pub input_rows: u64,
    /// Batches whose VIN list held it.
    pub batches: u64,
    /// Error records that named it.
    pub errors: u64,
    /// Audit-trail requests that carried it (the request stays, without it).
    pub audit_calls: u64,
    /// The jobs that held it in their input rows or audit trail.
    pub jobs: Vec<i64>,
}

/// An ended job retention may prune, with what it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Prunable {
    pub job_id: i64,
    pub name: String,
    pub rows: i64,
    pub batches: i64,
    pub errors: i64,
}

/// When a job was created, when its current run started (the submission,
/// or the latest `reprocess`), when each phase ended (RFC 3339, UTC), and how
/// long each took in seconds: planning (read, parse, dedupe, batch), calls
/// (decodes and recall lookups), writing (the outputs). A phase not reached
/// yet is null; `vinetl write` restarts writing, and leaves the calls as they ended.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct JobTimes {
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub planned_at: Option<String>,
    pub write_started_at: Option<String>,
    pub finished_at: Option<String>,
    pub planning_secs: Option<f64>,
    pub calls_secs: Option<f64>,
    pub writing_secs: Option<f64>,
    pub total_secs: Option<f64>,
}

/// Unix seconds as RFC 3339 (UTC), to the microsecond.
pub(crate) fn rfc3339(secs: Option<f64>) -> Option<String> {
    secs.and_then(|s| sqlx::types::chrono::DateTime::from_timestamp_micros((s * 1e6).round() as i64))
        .map(|d| d.to_rfc3339())
}

impl JobTimes {
    /// From Unix seconds: created, started, planned, writing started,
    /// finished, and calls ended (the job left its calls for its outputs or
    /// its end; null for a job run before vinetl recorded it).
    pub(crate) fn from_epochs(t: [Option<f64>; 6]) -> JobTimes {
        let span = |a: Option<f64>, b: Option<f64>| Some(((b? - a?) * 1000.0).round() / 1000.0).filter(|d| *d >= 0.0);
        let [created, started, planned, writing, finished, calls_ended] = t;
        // Without that record, the calls end when writing starts (which a
        // `vinetl write` moves on), or with no outputs, when the job does.
        let calls_end = calls_ended.or(writing).or(finished);
        JobTimes {
            created_at: rfc3339(created),
            started_at: rfc3339(started),
            planned_at: rfc3339(planned),
            write_started_at: rfc3339(writing),
            finished_at: rfc3339(finished),
            planning_secs: span(started, planned),
            calls_secs: span(planned, calls_end),
            writing_secs: span(writing, finished),
            total_secs: span(started, finished),
        }
    }
}

/// A recall answer's campaigns by number (the first record of a number
/// wins; records without one are dropped).
pub(crate) fn distinct_campaigns(recalls: &[Recall]) -> std::collections::BTreeMap<String, &Recall> {
    let mut seen = std::collections::BTreeMap::new();
    for r in recalls.iter().filter(|r| !r.campaign_number.trim().is_empty()) {
        seen.entry(r.campaign_number.trim().to_string()).or_insert(r);
    }
    seen
}

/// A job's recall accounting.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RecallCounts {
    /// Distinct lookups the job needed (make/model/year, or VINs).
    pub lookups: i64,
    /// Of those, answered by the cache.
    pub cache_hits: i64,
    /// Recall calls made (retries included).
    pub calls: i64,
    /// Lookups that failed for good: their rows' recalls are unknown.
    pub failed: i64,
    /// Once the job's calls are done: rows with at least one recall, rows
    /// whose recalls are unknown, distinct campaigns.
    pub rows_with_recalls: Option<i64>,
    pub rows_unknown: Option<i64>,
    pub campaigns: Option<i64>,
    /// Calls a one-lookup-per-row client would make, less the calls made.
    pub calls_saved: i64,
}

/// What a job needs next, once a batch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Batches are still queued or running (or the job has ended).
    Nothing,
    /// Recall lookups were planned: enqueue them.
    Enqueue,
    /// Every call is done and the job has outputs: write them (this caller
    /// holds the job in `writing`).
    Write,
    /// The job is done.
    Done,
}

/// A recall lookup to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub key: String,
    pub make: Option<String>,
    pub model: Option<String>,
    pub model_year: Option<i32>,
    pub vin: Option<String>,
}

/// Where the state lives, from `DATABASE_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(String),
    Sqlite(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL must start with postgres:// or sqlite://, got {0:?}")]
    UnknownScheme(String),
    #[error(
        "schema name {0:?} is not allowed: use lowercase letters, digits and _, starting with a letter or _ (at most 63)"
    )]
    BadSchema(String),
    #[error("cannot connect to Postgres at {url}: {}", connect_hint(error))]
    Connect { url: String, error: sqlx::Error },
    #[error("cannot open the SQLite state file {path}: {error}: is the directory writable?")]
    SqliteOpen { path: String, error: sqlx::Error },
    /// A read-only command found no state where it looked.
    #[error("no vinetl state at {0}: run `vinetl submit` or `vinetl run` there first, or point DATABASE_URL elsewhere")]
    NoState(String),
    #[error("no job {0}: `vinetl status` lists the jobs")]
    NoJob(i64),
    /// `forget` met a job still planning its rows: the VIN could come back
    /// in rows planned after it, as duplicates of a row it had blanked.
    #[error(
        "job {0} is still planning its input rows, which may hold the VIN again after it is forgotten: run \
         `vinetl forget` once the job has planned (`vinetl status {0}`), or cancel it (`vinetl cancel {0}`)"
    )]
    Planning(i64),
    #[error("migrating schema {schema} failed: {source}")]
    Migrate { schema: String, source: sqlx::migrate::MigrateError },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("queue: {0}")]
    Queue(String),
    /// The process's result writer is gone (it only stops with the process).
    #[error("the result writer stopped before storing this answer")]
    WriterGone,
    /// A value that is not what the statement promised (a bug, or a
    /// schema changed under a running process).
    #[error("unexpected value from the database: {0}")]
    Decode(String),
}

/// What went wrong connecting, and what to do about it.
fn connect_hint(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("3D000") => format!("{}: create it, or fix the database name in DATABASE_URL", db.message()),
            Some("28P01" | "28000") => format!("{}: check the user and password in DATABASE_URL", db.message()),
            _ => db.message().to_string(),
        },
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
            "nothing answered within 5 s: is Postgres running there, and does DATABASE_URL point at it?".to_string()
        }
        other => other.to_string(),
    }
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, StoreError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_string()))
        } else if url.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(url.to_string()))
        } else {
            Err(StoreError::UnknownScheme(redact(url)))
        }
    }

    /// The URL for logs: a Postgres password masked.
    pub fn shown(&self) -> String {
        match self {
            DatabaseUrl::Postgres(url) | DatabaseUrl::Sqlite(url) => redact(url),
        }
    }
}

/// A schema name is spliced into DDL (identifiers cannot be bound), so it is
/// checked against a strict pattern first.
pub fn check_schema(schema: &str) -> Result<&str, StoreError> {
    if crate::columns::is_identifier(schema) { Ok(schema) } else { Err(StoreError::BadSchema(schema.to_string())) }
}

/// The URL with any password replaced, fit for messages and logs: the
/// password of its user-info, and every query parameter that can carry a
/// secret (`password`, `sslpassword`, anything naming a secret, token or
/// key). Parsed with the `url` crate, as sqlx parses it, so a password
/// holding `@` or `:` is masked whole. A URL that does not parse is not
/// shown at all: no guess at where its secret ends is safe.
pub fn redact(raw: &str) -> String {
    const MASK: &str = "***";
    let secret_param = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["password", "secret", "token", "key"].iter().any(|w| name.contains(w))
    };
    let Ok(mut url) = url::Url::parse(raw.trim()) else {
        return match raw.split_once("://") {
            Some((scheme, _)) if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) => {
                format!("{scheme}://(a URL that does not parse; not shown)")
            }
            _ => "(a URL that does not parse; not shown)".to_string(),
        };
    };
    if url.password().is_some() {
        // Cannot fail: the URL has a password, so it has a host.
        let _ = url.set_password(Some(MASK));
    }
    let pairs: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    if pairs.iter().any(|(k, _)| secret_param(k)) {
        let masked = pairs.into_iter().map(|(k, v)| if secret_param(&k) { (k, MASK.to_string()) } else { (k, v) });
        url.query_pairs_mut().clear().extend_pairs(masked);
    }
    url.to_string()
}

/// Shown with its password masked: `{:?}` of a state, an error or the CLI's
/// arguments never prints it.
impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Postgres(_) => f.debug_tuple("Postgres").field(&self.shown()).finish(),
            DatabaseUrl::Sqlite(_) => f.debug_tuple("Sqlite").field(&self.shown()).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        // A password holding `@` and `:` is masked whole, as sqlx reads it.
        let shown = redact("postgres://u:se@cr:et@h:5432/db");
        assert_eq!(shown, "postgres://u:***@h:5432/db");
        // Secrets in query parameters, which sqlx accepts too; others stay.
        let shown = redact("postgres://u@h/db?password=secret&sslmode=require&sslpassword=secret2&api_token=t0k");
        assert!(!shown.contains("secret") && !shown.contains("t0k"), "{shown}");
        assert!(shown.contains("sslmode=require") && shown.contains("password=***"), "{shown}");
        // Percent-encoded passwords are masked, not decoded into view.
        assert_eq!(redact("postgres://u:s%40cret@h/db"), "postgres://u:***@h/db");
        // What does not parse is not shown.
        let shown = redact("postgres://u:secret@[bad/db");
        assert!(!shown.contains("secret"), "{shown}");
        // Debug of a state URL masks too.
        let debug = format!("{:?}", DatabaseUrl::parse("postgres://u:secret@h/db?password=secret").unwrap());
        assert!(!debug.contains("secret"), "{debug}");
        let err = DatabaseUrl::parse("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn schema_names_are_checked_before_they_reach_sql() {
        assert!(check_schema("vinetl").is_ok());
        assert!(check_schema("t_123").is_ok());
        for bad in ["", "1abc", "a-b", "A", "x; drop table jobs", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }
}

/// A registered schedule: its spec (templates unfilled) and the time up to
/// which its fire times are decided (Unix seconds).
#[derive(Debug, Clone)]
pub struct ScheduleRow {
    pub name: String,
    pub spec: serde_json::Value,
    pub decided_through: f64,
}

/// A run to record: its fire time (Unix seconds), logical date, state
/// (`due` or `missed`), how it came (`schedule`, `catch-up`, `backfill`,
/// `rerun`) and why, for a missed one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewRun {
    pub at: f64,
    pub date: String,
    pub state: &'static str,
    pub how: &'static str,
    pub reason: Option<String>,
}

/// One run of a schedule, with its job's state once it has a job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduledRun {
    pub name: String,
    /// The fire time, RFC 3339 UTC.
    pub logical_at: String,
    pub logical_date: String,
    /// due, waiting, submitted, missed or failed.
    pub state: String,
    pub how: String,
    pub job_id: Option<i64>,
    pub job_state: Option<String>,
    pub reason: Option<String>,
}

/// A run a scheduler has claimed to start: the lease is its until it
/// settles the run (or the lease runs out and another takes it).
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub name: String,
    pub at: f64,
    pub date: String,
    pub job_id: Option<i64>,
    /// When the run was recorded (Unix seconds): a backfilled night waits
    /// for its input from then, not from its fire time long ago.
    pub created: f64,
    /// This claim's own token: a scheduler whose lease ran out (and was
    /// taken over) can no longer link a job to the run or settle it.
    pub token: String,
}
