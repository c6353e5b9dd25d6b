//! The command line. `main.rs` parses [`Cli`] and calls [`Cli::run`]; each
//! subcommand is a library function ([`jobs`]) a test can call too.
//!
//! This is the application layer: it opens the state store and sets the
//! queue up beside it, wires the parts together and prints. It keeps no
//! rules of its own: what a job does is [`crate::job`]'s, what a command
//! returns is [`crate::exit`]'s.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod jobs;

/// `print!` that survives a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(&format!($($arg)*)) };
}

/// `println!` that survives a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(&format!("{}\n", format!($($arg)*))) };
}

use crate::io::source::FileFormat;
use crate::local::check::check_file;

/// Batch VIN enrichment: decode vehicle specs and recall flags through the
/// Car Vin API, for files, S3 objects and Postgres tables, at any scale.
#[derive(Debug, Parser)]
#[command(name = "vinetl", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr: text (no colour unless stderr is a terminal and
    /// NO_COLOR is unset) or one JSON object per line. VINETL_LOG sets the
    /// level (default: vinetl's info, everything else's warnings).
    #[arg(long, global = true, env = "VINETL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the runner keeps its state.
#[derive(Clone, Args)]
pub struct StateArgs {
    /// State store and queue: postgres://USER@HOST:PORT/DB (many machines) or
    /// sqlite://FILE (one machine).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Postgres schema holding vinetl's tables (created if missing).
    #[arg(long, env = "VINETL_SCHEMA", default_value = "vinetl")]
    pub schema: String,
}

/// Shown with the URL's password masked (`{:?}` of the parsed command line
/// must not print it).
impl std::fmt::Debug for StateArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateArgs")
            .field("database_url", &self.database_url.as_deref().map(crate::store::redact))
            .field("schema", &self.schema)
            .finish()
    }
}

/// Serves Prometheus metrics (`GET /metrics`) on ADDR while the command
/// runs, e.g. 127.0.0.1:9464 (the README lists every metric). A taken or
/// invalid address fails the command at once.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

/// `vinetl serve keys ...`: the server's keys file.
#[derive(Debug, Subcommand)]
pub enum ServeAction {
    /// Manage the keys file: add a key (stored as its SHA-256, shown once),
    /// revoke one, list them (prefixes only). A running server reads the
    /// file again when it changes: no restart, no downtime.
    Keys {
        #[command(subcommand)]
        op: KeysOp,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysOp {
    /// Make a new key for an account (a `name`; keys of one name share its
    /// quota and rate) and print it: the only time it is shown.
    Add {
        /// The keys file (created if missing).
        #[arg(long)]
        file: PathBuf,
        /// The account.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = crate::serve::keys::Tier::Pro)]
        tier: crate::serve::keys::Tier,
        /// Requests a day (default: 100 for free, unlimited for pro).
        #[arg(long)]
        per_day: Option<u64>,
        /// Requests a second.
        #[arg(long)]
        per_second: Option<f64>,
    },
    /// Remove the keys whose prefix starts with PREFIX (at least 8 characters).
    Revoke {
        #[arg(long)]
        file: PathBuf,
        prefix: String,
    },
    /// Each key's account, prefix, tier, limits and when it was added.
    List {
        #[arg(long)]
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job spec, work it to completion in this process, and print a summary.
    ///
    /// Equivalent to `submit` followed by `worker` until the job is done,
    /// with a progress bar on a terminal.
    Run {
        /// Job spec (TOML), e.g. jobs/demo.toml.
        spec: PathBuf,
        /// The date `{date}` templates take (YYYY-MM-DD; default today in
        /// the spec's time zone, UTC without a schedule).
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        /// Batch calls in flight at once in this process.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Register a job spec and plan it: parse and deduplicate its VINs, and
    /// enqueue 20-VIN batches for the workers. Idempotent.
    ///
    /// A spec with a `schedule` is registered instead (or updated): the
    /// scheduler starts its runs, the first at its next fire time.
    Submit {
        /// Job spec (TOML).
        spec: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Process queued batches until stopped (SIGTERM drains in-flight calls).
    ///
    /// Run any number of workers, on any number of machines, against one
    /// DATABASE_URL; they share one rate limiter and daily quota.
    Worker {
        /// Batch calls in flight at once in this process.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Also start scheduled runs here (as `vinetl scheduler`); any
        /// number of processes may, each fire time still runs once.
        #[arg(long)]
        with_scheduler: bool,
        /// Keep the runner's audit trail this long ("365d"): older
        /// requests are deleted at start and every hour. Default: kept.
        #[arg(long, value_parser = humantime::parse_duration)]
        audit_retention: Option<std::time::Duration>,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Start the runs of scheduled specs: one run per fire time of each
    /// registered schedule (`vinetl submit SPEC`, or SPEC given here), its
    /// `{date}` templates filled with the run's logical date, planned for
    /// the workers. Missed runs follow the spec's `catchup`.
    ///
    /// Run several for availability: each fire time (a daily cron's
    /// logical date) still gets exactly one run (a unique key in the state
    /// database, not a lock in memory).
    Scheduler {
        /// Scheduled specs to register (or update) first.
        specs: Vec<PathBuf>,
        /// One pass (decide and start what is due), then exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Queue one run of a scheduled spec per logical date from --from to
    /// --to, and start those whose input is there. Dates that already ran
    /// are skipped unless --rerun; dates missed while no scheduler ran are
    /// filled.
    Backfill {
        /// Scheduled spec (TOML); registered or updated as by `submit`.
        spec: PathBuf,
        /// First logical date, YYYY-MM-DD.
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last logical date, YYYY-MM-DD (inclusive; at most today).
        #[arg(long)]
        to: chrono::NaiveDate,
        /// Run dates that already ran again (not while their job is still going).
        #[arg(long)]
        rerun: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the registered schedules: next run, last run, runs waiting for
    /// input, missed and failed nights.
    Schedules {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove a schedule: no more runs. Its earlier runs and jobs stay.
    Unschedule {
        /// The spec's `name`.
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Show a job in detail, or the recent jobs one line each.
    ///
    /// The list has each job's state, progress over its calls, rows, calls,
    /// failed rows, start, duration and ETA (from the account's granted rate
    /// and quota). `status JOB` adds why it waits and until when, calls by
    /// outcome, quota used today and its earlier runs.
    Status {
        /// Job id.
        job: Option<i64>,
        /// Print JSON (the schema: `vinetl status --json-schema`).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Print the JSON Schema of `status --json` (one job; the list is an array of them).
        #[arg(long, conflicts_with_all = ["json", "watch", "job"])]
        json_schema: bool,
        /// Redraw every second with progress bars until the jobs shown
        /// have ended (Ctrl-C stops watching; the jobs go on).
        #[arg(long)]
        watch: bool,
        /// How many recent jobs the list shows.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List what failed in a job: its dead-lettered batches and failed rows,
    /// each with its last error, attempts and times, and the next step
    /// (`vinetl reprocess JOB --failed-only`).
    Failures {
        /// Job id.
        job: i64,
        /// At most this many batches and this many rows (the totals are
        /// always shown).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run an ended job again, all of it or only its failed rows, and rewrite
    /// its outputs (replacing the earlier ones).
    ///
    /// Rows whose VIN has a fresh successful decode in the cache cost no
    /// call; recall lookups within their TTL are reused. Works the job here
    /// to the end unless --detach (then running workers do it).
    Reprocess {
        /// Job id.
        job: i64,
        /// Only rows that did not decode (dead-lettered or errored).
        #[arg(long)]
        failed_only: bool,
        /// Only rows with the VINs listed in FILE (one per line; a `vin`
        /// header line is skipped). Combines with --failed-only.
        #[arg(long, value_name = "FILE")]
        vins: Option<PathBuf>,
        /// Call for the selected rows even where the cache holds a fresh
        /// decode (recall lookups still follow their TTL).
        #[arg(long)]
        refresh: bool,
        /// Queue the work for running workers and return at once.
        #[arg(long)]
        detach: bool,
        /// Calls in flight at once in this process.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Rewrite a dataset partition even though a later job has written it since.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Write an ended job's outputs again from its stored results (no API
    /// call): replaces the dataset partition and the job's table rows.
    Write {
        /// Job id.
        job: i64,
        /// Rewrite a dataset partition even though a later job has written it since.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Delete old bookkeeping: the input rows, batches and errors of jobs
    /// that ended more than --older-than ago, and finished queue tasks as
    /// old. Each job keeps its row and the counts `status` showed (marked
    /// pruned); outputs and the decode and recall caches are never touched.
    /// A pruned job can no longer be reprocessed or written again.
    Prune {
        /// Age of the jobs to prune, since they ended: "30d", "12h", ...
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Only jobs of this name (a spec's `name`).
        #[arg(long)]
        name: Option<String>,
        /// List what would be pruned, deleting nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// The runner's audit trail: one JSON line per API request (newest
    /// first): when, which job and batch, which provider and endpoint,
    /// which VINs. Never a key. With --prune, deletes the older requests
    /// instead.
    Audit {
        /// Only this job's requests.
        #[arg(long)]
        job: Option<i64>,
        /// Only requests that carried this VIN.
        #[arg(long)]
        vin: Option<String>,
        /// Only requests sent within this span: "24h", "7d", ...
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many requests.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// Delete requests older than this ("365d") and print how many.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["job", "vin", "since"])]
        prune: Option<std::time::Duration>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove one VIN from everything vinetl keeps: the decode cache, the
    /// stored input rows, batches, errors and audit trail (blanked where a
    /// row must stay for the counts), and every Postgres output table.
    /// Lists what it could not reach (Parquet files already written, the
    /// inputs); exits 1 when that list is not empty.
    Forget {
        /// The VIN (any case; spaces and dashes are ignored).
        vin: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Pause a job: it takes no new call (calls in flight land and are
    /// stored); workers stay up and other jobs go on.
    Pause {
        /// Job id.
        job: i64,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Resume a paused job where it stopped: no batch is called twice.
    Resume {
        /// Job id.
        job: i64,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Cancel a job: queued batches are dropped, in-flight calls finish.
    Cancel {
        /// Job id.
        job: i64,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Serve a read-only jobs page over the state store: every recent job
    /// with its state, progress and ETA; one job's counts, calls by outcome,
    /// quota used today, failures and outputs. The pages refresh themselves.
    ///
    /// Routes: / and /jobs/ID (HTML), /api/jobs and /api/jobs/ID (JSON). It
    /// never writes to the store.
    Ui {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        bind: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run a Car Vin API-compatible server backed by embedded NHTSA vPIC data.
    ///
    /// Endpoints: POST /api/v1/decode, /api/v1/batch-decode, /api/v1/recalls;
    /// GET /api/v1/openapi.json. Without --keys only anonymous single decodes
    /// (10 a day per client) are possible. Fault injection is off by default.
    Serve {
        #[command(subcommand)]
        action: Option<ServeAction>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: String,
        /// API keys file (TOML `[[keys]]` entries: key, tier = "free"|"pro",
        /// per_day, per_second, name).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Recall data: NHTSA FLAT_RCL.txt or recallsByVehicle JSON (default:
        /// the shipped sample of real records in jobs/recalls/).
        #[arg(long)]
        recalls: Option<PathBuf>,
        /// Append one JSON line per API request to FILE: time, account label
        /// (never the key), endpoint, VIN count, status, milliseconds.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Keep the audit log's lines this long ("90d"): older ones are
        /// deleted at start and hourly. Default: kept.
        #[arg(long, value_parser = humantime::parse_duration, requires = "audit_log")]
        audit_retention: Option<std::time::Duration>,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        limits: crate::serve::ConnLimits,
        #[command(flatten)]
        faults: crate::serve::faults::Faults,
    },
    /// Decode VINs with the embedded vPIC data, offline: VINs given here
    /// (printed as batch-decode's JSON), or a whole file on every core.
    ///
    /// With VINs, exits 1 if any is malformed. With --file, writes one line
    /// per input row in input order (JSON lines, CSV or one Parquet file) to
    /// stdout, and a summary to stderr.
    Decode {
        /// VINs to decode.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        vins: Vec<String>,
        /// A VIN file instead: one VIN per line, CSV or Parquet (by name, as
        /// job sources; gzip and zstd detected from content); `-` reads stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// CSV or Parquet column holding the VIN (implies CSV unless the name
        /// says Parquet; default `vin`).
        #[arg(long, requires = "file")]
        column: Option<String>,
        /// Output format for --file.
        #[arg(long, value_enum, default_value_t = crate::local::decode_file::OutputFormat::Jsonl, requires = "file")]
        format: crate::local::decode_file::OutputFormat,
        /// Decoding threads for --file (default: every core).
        #[arg(long, requires = "file")]
        threads: Option<usize>,
        /// Text encoding of --file (default strict UTF-8), e.g. latin1.
        #[arg(long, requires = "file")]
        encoding: Option<String>,
    },
    /// Count what a VIN file holds (rows, valid, rejections by kind,
    /// check-digit mismatches, duplicates), or check a job spec before it runs.
    ///
    /// With a VIN file it streams the file; memory stays bounded. With a job
    /// spec (a .toml file) it makes the checks `vinetl run` makes before the
    /// first call (key variable, API host, every output writable, the source
    /// readable), and with --dry-run also reads the whole source and prints
    /// the plan: rows, valid, distinct, cache hits, calls needed and the time
    /// they take at the spec's rate. Nothing is stored or called.
    Check {
        /// VIN file (one VIN per line, or CSV; gzip and zstd detected from
        /// content), or a job spec (.toml).
        file: PathBuf,
        /// CSV column holding the VIN (implies CSV; a .csv file defaults to `vin`).
        #[arg(long)]
        column: Option<String>,
        /// Text encoding of the file (default strict UTF-8), e.g. latin1.
        #[arg(long)]
        encoding: Option<String>,
        /// For a job spec: also read the source and print the plan.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print the version and where the vPIC tables are read from.
    Version,
    /// Create or update vinetl's tables in its schema (idempotent; the runner
    /// also does this on start).
    Migrate {
        #[command(flatten)]
        state: StateArgs,
    },
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Check { file, column, encoding, dry_run, json, state } => {
                if file.extension().is_some_and(|e| e == "toml") {
                    let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                    let checked = jobs::check_spec(&state, &file, dry_run).await?;
                    if json {
                        outln!("{}", serde_json::to_string_pretty(&checked)?);
                    } else {
                        out!("{checked}");
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                let encoding = text_encoding(encoding.as_deref())?;
                let format = FileFormat::infer(&file, column.as_deref());
                let report = tokio::task::spawn_blocking(move || check_file(&file, format, encoding)).await??;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    out!("{report}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Migrate { state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                state.open(2).await?;
                outln!("{} is up to date", state.describe());
                Ok(ExitCode::SUCCESS)
            }
            Command::Run { spec, date, concurrency, metrics, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let metrics = metrics.metrics_addr.as_deref();
                let ended = jobs::run(&state, &spec, concurrency, jobs::stderr_is_terminal(), metrics, date).await?;
                Ok(report(&ended, Some(&state)))
            }
            Command::Submit { spec, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let s = match jobs::submit(&state, &spec).await? {
                    jobs::Submission::Job(s) => s,
                    jobs::Submission::Scheduled(new, status) => {
                        outln!(
                            "schedule {} {}: next run {} (logical date {}); `vinetl scheduler` or `vinetl worker --with-scheduler` starts it",
                            status.name,
                            if new { "registered" } else { "updated" },
                            status.next_run.as_deref().unwrap_or("never"),
                            status.next_date.as_deref().unwrap_or("-"),
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                };
                outln!(
                    "job {} {}: {} rows, {} batches queued; run `vinetl worker` to process them",
                    s.job_id,
                    if s.resumed { "resumed" } else { "submitted" },
                    s.rows,
                    s.batches
                );
                if s.rows == 0 {
                    eprintln!(
                        "vinetl: warning: job {}'s input had no rows (source.min_rows = 1 makes that an error)",
                        s.job_id
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Worker { concurrency, with_scheduler, audit_retention, metrics, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let options = jobs::WorkerOptions { with_scheduler, audit_retention };
                jobs::worker(&state, concurrency, metrics.metrics_addr.as_deref(), options).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Scheduler { specs, once, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                if let Some(t) = jobs::scheduler(&state, &specs, once).await? {
                    outln!(
                        "{} runs recorded, {} started, {} waiting for input, {} failed",
                        t.recorded,
                        t.started.len(),
                        t.waiting,
                        t.failed.len()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Backfill { spec, from, to, rerun, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let (queued, tick) = jobs::backfill(&state, &spec, from, to, rerun).await?;
                outln!("{queued} runs queued from {from} to {to}");
                for (name, date, job) in &tick.started {
                    outln!("  {date}: job {job} planned ({name}); workers run it");
                }
                if tick.waiting > 0 {
                    outln!("  {} waiting for their input (`vinetl schedules` shows which)", tick.waiting);
                }
                for (_, date, why) in &tick.failed {
                    outln!("  {date}: failed: {why}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Schedules { json, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let list = jobs::schedules(&state).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&list)?);
                } else if list.is_empty() {
                    outln!("no schedules (`vinetl submit SPEC` registers a spec with a `schedule`)");
                } else {
                    out!("{}", jobs::describe_schedules(&list));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Unschedule { name, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                jobs::unschedule(&state, &name).await?;
                outln!("schedule {name} removed; its earlier runs and jobs stay");
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { json_schema: true, .. } => {
                out!("{}", jobs::STATUS_SCHEMA);
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { job, watch: true, limit, state, .. } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                jobs::watch_status(&state, job, limit).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { job, json, limit, state, .. } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let jobs = jobs::status(&state, job, limit).await?;
                if json {
                    let out = if job.is_some() {
                        serde_json::to_string_pretty(&jobs[0])?
                    } else {
                        serde_json::to_string_pretty(&jobs)?
                    };
                    outln!("{out}");
                } else if jobs.is_empty() {
                    outln!("no jobs yet");
                } else if job.is_some() {
                    out!("{}", jobs::describe(&jobs[0]));
                } else {
                    outln!("{}", jobs::LIST_HEADER);
                    for j in &jobs {
                        outln!("{}", jobs::list_line(j));
                    }
                }
                if !json && job.is_none() {
                    let schedules = jobs::schedules(&state).await?;
                    if !schedules.is_empty() {
                        out!("\n{}", jobs::describe_schedules(&schedules));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Failures { job, limit, json, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let failures = jobs::failures(&state, job, limit).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&jobs::FailuresOut::from(failures))?);
                } else {
                    out!("{}", jobs::describe_failures(&failures));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Reprocess { job, failed_only, vins, refresh, detach, concurrency, force, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let progress = !detach && jobs::stderr_is_terminal();
                let vins = vins.as_deref().map(jobs::read_vin_list).transpose()?;
                let redo = crate::store::Redo { failed_only, vins, refresh, replace_newer: force };
                let ended = jobs::reprocess(&state, job, &redo, detach, concurrency, progress).await?;
                if detach {
                    outln!("job {job} queued again; running workers take it ({} rows pending)", ended.counts.pending);
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(report(&ended, None))
            }
            Command::Write { job, force, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let ended = jobs::write(&state, job, force).await?;
                Ok(report(&ended, None))
            }
            Command::Audit { job, vin, since, limit, prune, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let store = state.open_existing(2).await?;
                if let Some(older) = prune {
                    let n = store.prune_audit(older.as_secs_f64()).await?;
                    let secs = older.as_secs();
                    let age = match secs {
                        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
                        s if s % 3_600 == 0 => format!("{} hours", s / 3_600),
                        s => format!("{s} s"),
                    };
                    outln!("pruned {n} audited request{} older than {age}", if n == 1 { "" } else { "s" });
                    return Ok(ExitCode::SUCCESS);
                }
                let vin = vin.map(|v| jobs::normalised_vin(&v)).transpose()?;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let since = since.map(|d| now.as_secs_f64() - d.as_secs_f64());
                let filter = crate::store::AuditFilter { job_id: job, vin, since, limit };
                for call in store.audit_calls(&filter).await? {
                    outln!("{}", serde_json::to_string(&call)?);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Forget { vin, json, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let store = state.open_existing(2).await?;
                let vin = jobs::normalised_vin(&vin)?;
                let report = crate::job::forget::forget(&store, &vin).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    let f = &report.store;
                    outln!(
                        "forgot {vin}: {} cache entr{}, {} input rows, {} batches, {} errors, {} audited requests",
                        f.cache,
                        if f.cache == 1 { "y" } else { "ies" },
                        f.input_rows,
                        f.batches,
                        f.errors,
                        f.audit_calls
                    );
                    for o in &report.outputs {
                        outln!("  {}: {} rows", o.output, o.rows);
                    }
                    for n in &report.not_reached {
                        outln!("  not reached: {n}");
                    }
                }
                Ok(if report.incomplete() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
            }
            Command::Prune { older_than, name, dry_run, json, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let pruned = jobs::prune(&state, older_than, name.as_deref(), dry_run).await?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&pruned)?);
                } else {
                    let verb = if dry_run { "would prune" } else { "pruned" };
                    for j in &pruned.jobs {
                        outln!(
                            "{verb} job {} ({}): {} rows, {} batches, {} errors",
                            j.job_id,
                            j.name,
                            j.rows,
                            j.batches,
                            j.errors
                        );
                    }
                    outln!(
                        "{verb} {} job{} ({} rows){}",
                        pruned.jobs.len(),
                        if pruned.jobs.len() == 1 { "" } else { "s" },
                        pruned.rows(),
                        if dry_run {
                            String::new()
                        } else {
                            format!(" and {} finished queue tasks", pruned.queue_tasks)
                        }
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Pause { job, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                jobs::pause(&state, job).await?;
                outln!(
                    "job {job} paused: it takes no new call; calls already in flight land and are stored; `vinetl resume {job}` goes on"
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Resume { job, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let queued = jobs::resume(&state, job).await?;
                outln!("job {job} resumed: {queued} batches queued");
                Ok(ExitCode::SUCCESS)
            }
            Command::Cancel { job, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                jobs::cancel(&state, job).await?;
                outln!("job {job} cancelled; calls already in flight finish and are stored");
                Ok(ExitCode::SUCCESS)
            }
            Command::Ui { bind, state } => {
                let state = jobs::State::new(state.database_url.as_deref(), &state.schema)?;
                let store = state.open_existing(4).await?;
                crate::ui::run(store, &bind, &state.describe()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Serve { action: Some(ServeAction::Keys { op }), .. } => keys_command(op),
            Command::Serve {
                action: None,
                bind,
                keys,
                recalls,
                audit_log,
                audit_retention,
                metrics,
                limits,
                faults,
            } => {
                let opts =
                    crate::serve::ServeOptions { bind, keys, recalls, faults, audit_log, audit_retention, limits };
                crate::serve::run(opts, metrics.metrics_addr.as_deref()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Decode { file: Some(file), column, format, threads, encoding, .. } => {
                let encoding = text_encoding(encoding.as_deref())?;
                if format == crate::local::decode_file::OutputFormat::Parquet
                    && std::io::IsTerminal::is_terminal(&std::io::stdout())
                {
                    anyhow::bail!("--format parquet writes a binary file: redirect stdout to one (> vins.parquet)");
                }
                let threads = threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
                let input = FileFormat::infer(&file, column.as_deref());
                let started = std::time::Instant::now();
                let decoded = tokio::task::spawn_blocking(move || {
                    crate::local::decode_file::decode_file(&file, input, encoding, format, threads, std::io::stdout())
                })
                .await?;
                let summary = match decoded {
                    // `vinetl decode --file F | head`: the reader is done; so are we.
                    Err(crate::local::decode_file::DecodeFileError::Write(e))
                        if e.kind() == std::io::ErrorKind::BrokenPipe =>
                    {
                        return Ok(ExitCode::SUCCESS);
                    }
                    other => other?,
                };
                eprintln!("{}", crate::local::decode_file::describe(&summary, threads, started));
                Ok(ExitCode::SUCCESS)
            }
            Command::Decode { vins, .. } => decode_command(vins).await,
            Command::Version => {
                let (dir, why) = crate::local::decoder::tables_in_use();
                let dir =
                    dir.map_or("none".to_string(), |d| std::fs::canonicalize(&d).unwrap_or(d).display().to_string());
                outln!("vinetl {}\nvPIC tables: {dir} ({why})", env!("CARGO_PKG_VERSION"));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn keys_command(op: KeysOp) -> anyhow::Result<ExitCode> {
    use crate::serve::keys;
    match op {
        KeysOp::Add { file, name, tier, per_day, per_second } => {
            let (key, prefix) = keys::add_key(&file, &name, tier, per_day, per_second)?;
            outln!("{key}");
            eprintln!(
                "vinetl: key {prefix}… added to {} for account {name}; shown once: the file holds only its SHA-256. \
                 A running server takes it at once.",
                file.display()
            );
        }
        KeysOp::Revoke { file, prefix } => {
            for k in keys::revoke_key(&file, &prefix)? {
                outln!("revoked {}… of account {}", k.prefix, k.name);
            }
        }
        KeysOp::List { file, json } => {
            let listed = keys::list_keys(&file)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                outln!(
                    "{:<20} {:<14} {:<5} {:>10} {:>8}  {:<22} stored",
                    "ACCOUNT",
                    "PREFIX",
                    "TIER",
                    "PER DAY",
                    "PER S",
                    "ADDED"
                );
                for k in listed {
                    outln!(
                        "{:<20} {:<14} {:<5} {:>10} {:>8}  {:<22} {}",
                        k.name,
                        format!("{}…", k.prefix),
                        format!("{:?}", k.tier).to_lowercase(),
                        k.per_day.map_or("-".into(), |n| n.to_string()),
                        k.per_second.map_or("-".into(), |r| r.to_string()),
                        k.added.as_deref().unwrap_or("-"),
                        if k.hashed { "sha256" } else { "PLAIN TEXT" }
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--encoding`: strict UTF-8 when absent.
fn text_encoding(label: Option<&str>) -> anyhow::Result<crate::io::source::TextEncoding> {
    match label {
        None => Ok(crate::io::source::TextEncoding::UTF8),
        Some(l) => crate::io::source::TextEncoding::from_label(l).ok_or_else(|| {
            crate::exit::Usage(format!("--encoding {l:?} is not a known encoding (try utf-8, latin1, windows-1252)"))
                .into()
        }),
    }
}

/// Prints a job's summary (its first line the verdict, also on stderr
/// when the job did not simply succeed) and returns its exit code.
fn report(ended: &jobs::Ended, state: Option<&jobs::State>) -> ExitCode {
    let (code, text) = jobs::summary(ended);
    out!("{text}");
    if let Some(state) = state {
        outln!("  state            {}", state.describe());
    }
    if code != crate::exit::OK {
        eprintln!("vinetl: {}", text.lines().next().unwrap_or_default());
    }
    ExitCode::from(code)
}

async fn decode_command(vins: Vec<String>) -> anyhow::Result<ExitCode> {
    use crate::api::{ApiError, BatchEntry, code};
    use crate::vin::Vin;
    let entries = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<BatchEntry>> {
        let decoder = crate::local::decoder::Decoder::new()?;
        Ok(vins
            .iter()
            .map(|raw| match Vin::parse(raw) {
                Ok(vin) => BatchEntry::Decoded(Box::new(decoder.decode(&vin))),
                Err(e) => BatchEntry::Failed {
                    vin: raw.clone(),
                    error: ApiError { code: code::INVALID_VIN.into(), message: format!("invalid VIN {raw:?}: {e}") },
                },
            })
            .collect())
    })
    .await??;
    outln!("{}", serde_json::to_string_pretty(&entries)?);
    let any_bad = entries.iter().any(|e| matches!(e, BatchEntry::Failed { .. }));
    Ok(if any_bad { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Writes command output to stdout. A closed pipe (`vinetl status | head`)
/// ends the process quietly instead of panicking, as Unix tools do.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("vinetl: cannot write output: {e}");
        std::process::exit(1);
    }
}
