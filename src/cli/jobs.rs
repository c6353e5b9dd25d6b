//! The job commands: `submit`, `worker`, `run` and `status`, as functions a
//! test can call. They share one way to open the state store.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::exit::Usage;
use crate::job::plan::{self, Submitted};
use crate::job::preflight::Checks;
use crate::spec::JobSpec;
use crate::store::{DatabaseUrl, Failures, JobCounts, Redo, Store, StoreError, sqlite};

/// The state file when `DATABASE_URL` is unset: SQLite, in the working
/// directory (the queue goes beside it, in `vinetl-queue.db`).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://vinetl.db";

/// Where state lives, resolved from `DATABASE_URL` and `VINETL_SCHEMA`.
#[derive(Debug, Clone)]
pub struct State {
    pub url: DatabaseUrl,
    pub schema: String,
}

impl State {
    /// `None`: the SQLite default. `VINETL_SCHEMA` applies to Postgres only
    /// (a SQLite file is one install).
    pub fn new(url: Option<&str>, schema: &str) -> anyhow::Result<State> {
        let url = DatabaseUrl::parse(url.filter(|u| !u.trim().is_empty()).unwrap_or(DEFAULT_DATABASE_URL))?;
        if let DatabaseUrl::Postgres(_) = &url {
            crate::store::check_schema(schema)?;
        }
        Ok(State { url, schema: schema.to_string() })
    }

    /// Connects (or creates the SQLite file), migrating vinetl's tables and
    /// then the queue's beside them.
    pub async fn open(&self, connections: u32) -> Result<Store, StoreError> {
        let (store, guard) = Store::open(&self.url, &self.schema, connections).await?;
        let url = match &self.url {
            DatabaseUrl::Postgres(u) | DatabaseUrl::Sqlite(u) => u,
        };
        crate::job::queue::setup(&store, url).await?;
        drop(guard);
        Ok(store)
    }

    /// For commands that only read or change existing state (`status`,
    /// `cancel`, `write`, `reprocess`, `check`): fails with "no vinetl
    /// state at ..." instead of creating a file, a directory or a schema.
    pub async fn open_existing(&self, connections: u32) -> Result<Store, StoreError> {
        if !Store::exists(&self.url, &self.schema).await? {
            return Err(StoreError::NoState(self.describe()));
        }
        self.open(connections).await
    }

    /// Where the state is, for messages (passwords masked).
    pub fn describe(&self) -> String {
        match &self.url {
            DatabaseUrl::Postgres(url) => format!("{} (schema {})", crate::store::redact(url), self.schema),
            DatabaseUrl::Sqlite(url) => format!("SQLite file {}", sqlite::path_of(url)),
        }
    }
}

/// `vinetl submit SPEC`: checks, then plans; workers do the calls, so the
/// key variable need only be set where they run.
/// What `submit` did: planned a job, or registered a schedule.
pub enum Submission {
    Job(Submitted),
    /// A spec with a `schedule`: registered (true when new); the scheduler
    /// starts its runs.
    Scheduled(bool, Box<crate::job::scheduler::ScheduleStatus>),
}

pub async fn submit(state: &State, spec_path: &Path) -> anyhow::Result<Submission> {
    let spec = load_spec(spec_path)?;
    if spec.schedule.is_some() {
        let store = state.open(2).await?;
        let now = chrono::Utc::now();
        let new = crate::job::scheduler::register(&store, &spec, now).await?;
        let status = crate::job::scheduler::status(&store, now).await?;
        let mine = status.into_iter().find(|s| s.name == spec.name).expect("just registered");
        return Ok(Submission::Scheduled(new, Box::new(mine)));
    }
    let (spec, date) = dated(spec, None)?;
    if spec.provider.embedded {
        return Err(Usage(format!(
            "{}: provider.embedded runs the API inside `vinetl run`; use `vinetl run`, or point base_url at a server",
            spec_path.display()
        ))
        .into());
    }
    let store = state.open(4).await?;
    crate::job::preflight::run(&spec, store.pg_pool(), Checks { key: false, api: true }).await?;
    if spec.provider.api_key_file.is_none() && std::env::var(&spec.provider.api_key_env).is_err() {
        eprintln!(
            "vinetl: warning: {} is not set here; the workers that run this job need it",
            spec.provider.api_key_env
        );
    }
    Ok(Submission::Job(plan::submit_dated(&store, &state.schema, &spec, date).await?))
}

/// Reads and checks a spec before anything connects anywhere.
fn load_spec(spec_path: &Path) -> anyhow::Result<JobSpec> {
    Ok(JobSpec::load(spec_path)?)
}

/// A one-off run of a spec with `{date}` templates: filled with `date`, by
/// default today in the schedule's zone (UTC without one).
/// Returns the filled spec and the date it was filled with (none without
/// templates).
fn dated(spec: JobSpec, date: Option<chrono::NaiveDate>) -> anyhow::Result<(JobSpec, Option<chrono::NaiveDate>)> {
    if !spec.has_templates() {
        return Ok((spec, None));
    }
    let now = chrono::Utc::now();
    let date = date.unwrap_or_else(|| spec.calendar().map_or_else(|| now.date_naive(), |c| c.today(now)));
    Ok((spec.for_date(date)?, Some(date)))
}

/// `vinetl scheduler`: registers `specs`, then starts every schedule's
/// runs until SIGTERM/SIGINT (or after one pass with `once`).
pub async fn scheduler(
    state: &State,
    specs: &[std::path::PathBuf],
    once: bool,
) -> anyhow::Result<Option<crate::job::scheduler::Tick>> {
    let loaded: Vec<JobSpec> = specs.iter().map(|p| load_spec(p)).collect::<anyhow::Result<_>>()?;
    for (spec, path) in loaded.iter().zip(specs) {
        if spec.schedule.is_none() {
            return Err(Usage(format!("{}: has no `schedule`; `vinetl submit` runs it once", path.display())).into());
        }
    }
    startup("scheduler", state, 0);
    let store = state.open(4).await?;
    for spec in &loaded {
        crate::job::scheduler::register(&store, spec, chrono::Utc::now()).await?;
    }
    if once {
        return Ok(Some(crate::job::scheduler::tick(&store, &state.schema, chrono::Utc::now(), None).await?));
    }
    crate::job::scheduler::run(store, state.schema.clone(), crate::shutdown_signal()).await;
    Ok(None)
}

/// `vinetl backfill SPEC --from --to`: queues one run per logical date
/// and starts those whose input is there. Returns the runs queued and
/// what starting them did.
pub async fn backfill(
    state: &State,
    spec_path: &Path,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    rerun: bool,
) -> anyhow::Result<(u64, crate::job::scheduler::Tick)> {
    let spec = load_spec(spec_path)?;
    if spec.schedule.is_none() {
        return Err(Usage(format!("{}: has no `schedule` to backfill", spec_path.display())).into());
    }
    let now = chrono::Utc::now();
    if from > to {
        return Err(Usage(format!("--from {from} is after --to {to}")).into());
    }
    let store = state.open(4).await?;
    let queued = crate::job::scheduler::backfill(&store, &spec, from, to, rerun, now).await?;
    let tick = crate::job::scheduler::tick(&store, &state.schema, now, Some(&spec.name)).await?;
    Ok((queued, tick))
}

/// Every schedule's next run, last run and missed nights.
pub async fn schedules(state: &State) -> anyhow::Result<Vec<crate::job::scheduler::ScheduleStatus>> {
    let store = state.open_existing(2).await?;
    Ok(crate::job::scheduler::status(&store, chrono::Utc::now()).await?)
}

/// `vinetl unschedule NAME`: no more runs; earlier runs and jobs stay.
pub async fn unschedule(state: &State, name: &str) -> anyhow::Result<()> {
    let store = state.open_existing(2).await?;
    if !store.unregister_schedule(name).await? {
        return Err(Usage(format!("no schedule is named {name:?} (`vinetl schedules` lists them)")).into());
    }
    Ok(())
}

/// The schedules block of `status`: one line each, then the missed runs.
pub fn describe_schedules(list: &[crate::job::scheduler::ScheduleStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for s in list {
        let next = s
            .next_run
            .as_deref()
            .map_or("-".to_string(), |n| format!("{n} (date {})", s.next_date.as_deref().unwrap_or("-")));
        let last = s.last_run.as_ref().map_or("never".to_string(), |r| {
            format!(
                "{} job {} {}",
                r.logical_date,
                r.job_id.unwrap_or_default(),
                r.job_state.as_deref().unwrap_or(&r.state)
            )
        });
        let _ = writeln!(out, "schedule {}  \"{}\" {}  next {next}  last {last}", s.name, s.schedule, s.timezone);
        if let Some(p) = &s.problem {
            let _ = writeln!(out, "  problem: {p}");
        }
        if s.overdue > 0 {
            let _ = writeln!(
                out,
                "  OVERDUE: {} run{} passed with no scheduler running (`vinetl scheduler`, or `vinetl worker --with-scheduler`)",
                s.overdue,
                if s.overdue == 1 { "" } else { "s" }
            );
        }
        for r in &s.pending {
            let _ = writeln!(out, "  {} {}: {}", r.logical_date, r.state, r.reason.as_deref().unwrap_or("to start"));
        }
        for r in &s.missed {
            let job = r.job_id.map_or(String::new(), |j| format!(" (job {j})"));
            let _ = writeln!(out, "  {} {}{job}: {}", r.logical_date, r.state, r.reason.as_deref().unwrap_or_default());
        }
    }
    out
}

/// `vinetl worker`: until SIGTERM/SIGINT. apalis ends a worker on any
/// database error (a failover, a statement timeout); this restarts it, under
/// a fresh name, with backoff, for as long as the process is wanted. With
/// `metrics_addr`, serves Prometheus metrics there.
pub async fn worker(
    state: &State,
    concurrency: usize,
    metrics_addr: Option<&str>,
    options: WorkerOptions,
) -> anyhow::Result<()> {
    let WorkerOptions { with_scheduler, audit_retention } = options;
    let metrics = crate::prometheus::Listener::bind_if(metrics_addr).await?;
    startup("worker", state, concurrency);
    let store = state.open(concurrency as u32 + 4).await?;
    serve_metrics(metrics, &store);
    if let Some(keep) = audit_retention {
        let store = store.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                match store.prune_audit(keep.as_secs_f64()).await {
                    Ok(n) => tracing::info!(deleted = n, "audit trail pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the audit trail; trying again in an hour"),
                }
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    };
    // Beside the worker in this task, not spawned: planning a run holds
    // futures that are not `Send`.
    let scheduler = async {
        if with_scheduler {
            crate::job::scheduler::run(store.clone(), state.schema.clone(), stopped(&stop_rx)).await;
        }
    };
    let work = async {
        let mut failures = 0u32;
        loop {
            let allow = crate::call::allow::ApiAllow::from_env();
            match crate::job::worker::run(store.clone(), &state.schema, concurrency, None, allow, stopped(&stop_rx))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if *stop_rx.borrow() => return Err(e),
                Err(e) => {
                    failures += 1;
                    let wait = crate::call::client::backoff(failures.min(6));
                    tracing::error!(error = %e, restart_in = ?wait, "worker stopped on an error; restarting");
                    eprintln!("vinetl worker: {e:#}; restarting in {:.1} s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    };
    let ((), worked) = tokio::join!(scheduler, work);
    worked
}

/// What `vinetl worker` runs beside its workers.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerOptions {
    /// Also start scheduled runs (`--with-scheduler`).
    pub with_scheduler: bool,
    /// Delete audited requests older than this, at start and hourly.
    pub audit_retention: Option<Duration>,
}

/// How a job ended, with what its spec allows.
#[derive(Debug, Clone)]
pub struct Ended {
    pub counts: JobCounts,
    pub max_failed_share: f64,
}

/// `vinetl run SPEC`: check, submit, work the job to the end here.
/// The line a long-running command logs first: what runs, against which
/// state (password masked), how wide.
fn startup(command: &str, state: &State, concurrency: usize) {
    let schema = matches!(state.url, DatabaseUrl::Postgres(_)).then_some(state.schema.as_str());
    tracing::info!(version = env!("CARGO_PKG_VERSION"), state = %state.url.shown(), schema, concurrency,
                   "vinetl {command} starting");
}

pub async fn run(
    state: &State,
    spec_path: &Path,
    concurrency: usize,
    progress: bool,
    metrics_addr: Option<&str>,
    date: Option<chrono::NaiveDate>,
) -> anyhow::Result<Ended> {
    let (mut spec, date) = dated(load_spec(spec_path)?, date)?;
    let metrics = crate::prometheus::Listener::bind_if(metrics_addr).await?;
    let embedded = embed(&mut spec).await?;
    // One store for planning and working: migrations and queue setup run once.
    let store = state.open(concurrency as u32 + 4).await?;
    crate::job::preflight::run(&spec, store.pg_pool(), Checks { key: true, api: true }).await?;
    // After the checks: a configuration error stays the first line on stderr.
    startup("run", state, concurrency);
    serve_metrics(metrics, &store);
    let submitted = plan::submit_dated(&store, &state.schema, &spec, date).await?;
    let url = embedded.as_ref().map(crate::serve::RunningServer::url);
    // The spec this process was handed is the user's own choice of API.
    let allow = crate::call::allow::ApiAllow::from_env().with(&spec.provider);
    let counts = work_until_done(&store, &state.schema, submitted.job_id, concurrency, progress, url, allow).await;
    if let Some(server) = embedded {
        let _ = server.stop().await;
    }
    Ok(Ended { counts: counts?, max_failed_share: spec.max_failed_share })
}

/// Serves the metrics endpoint of a runner process, if one was bound: the
/// counters this process records, and the job gauges read from `store`.
fn serve_metrics(metrics: Option<crate::prometheus::Listener>, store: &Store) {
    if let Some(metrics) = metrics {
        tracing::info!(url = %metrics.url(), "serving metrics");
        metrics.serve(Some(crate::prometheus::job_refresh(store.clone())));
    }
}

/// For `provider.embedded`: starts the Car Vin API in this process, limited
/// like the job's account, and points the spec at it.
async fn embed(spec: &mut JobSpec) -> anyhow::Result<Option<crate::serve::RunningServer>> {
    if !spec.provider.embedded {
        return Ok(None);
    }
    let p = &spec.provider;
    let server = crate::serve::spawn_embedded(p.requests_per_second, p.daily_quota).await?;
    tracing::info!(url = %server.url(), "embedded Car Vin API started");
    spec.provider.base_url = server.url();
    Ok(Some(server))
}

/// Works the job here until it ends, then returns its counts. `embedded`
/// is this process's in-process API, for an embedded job.
async fn work_until_done(
    store: &Store,
    schema: &str,
    job_id: i64,
    concurrency: usize,
    progress: bool,
    embedded: Option<String>,
    allow: crate::call::allow::ApiAllow,
) -> anyhow::Result<JobCounts> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The worker and the watcher run side by side in this task; the watcher
    // stops the worker once the job has ended.
    let worker = crate::job::worker::run(store.clone(), schema, concurrency, embedded, allow, async move {
        let _ = stop_rx.await;
    });
    let watcher = async {
        let result = watch(store, job_id, progress).await;
        let _ = stop_tx.send(());
        result
    };
    let (worked, watched) = tokio::join!(worker, watcher);
    let counts = watched?;
    worked?;
    Ok(counts)
}

/// How often the job's progress is logged when there is no terminal.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How long a watcher waits before counting again: `every`, or ten times
/// as long as the count took, whichever is longer, but never more than
/// [`COUNT_AT_LEAST_EVERY`] (or `every`, if longer). A count scans the job's
/// rows (27 ms at 50,000 rows, so some 5 s at 10 M): counted every half
/// second, a large job's progress would keep a database core busy, taking
/// it from the calls. This way watching costs a tenth of one for counts
/// of up to 3 s, and one count each 30 s beyond.
fn poll_pause(every: Duration, count_took: Duration) -> Duration {
    every.max((count_took * 10).min(COUNT_AT_LEAST_EVERY))
}

/// Whether a job in `state` has ended (nothing of it runs any more).
fn ended(state: &str) -> bool {
    matches!(state, "done" | "failed" | "cancelled")
}

/// The longest a watcher goes without counting.
const COUNT_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// How often `run`'s watcher reads the job's state (one row) between
/// counts: the end of a job is seen this soon, however long a count takes.
const STATE_EVERY: Duration = Duration::from_millis(500);

/// Polls the job's counts until it ends: on a terminal a bar for each
/// phase as it comes (planning, decode calls, recall calls, the output
/// write), each with its rate and ETA; otherwise a log line every few
/// seconds (and when it ends). The job's rows are counted only when the
/// count is shown: every half second for the bars, when a log line is due
/// for the log, and with neither (no terminal, and the log quieter than
/// `info`) only once the job has ended. Between counts the watcher reads
/// the job's state alone, one row. (Counting for nothing cost a cold
/// 50,000-VIN run 0.7 s of the database's CPU: 20 counts at 35 ms.)
async fn watch(store: &Store, job_id: i64, progress: bool) -> anyhow::Result<JobCounts> {
    let mut bars = progress.then(PhaseBars::default);
    let every = match (&bars, tracing::enabled!(target: "vinetl::cli::jobs", tracing::Level::INFO)) {
        (Some(_), _) => Some(STATE_EVERY),
        (None, true) => Some(PROGRESS_EVERY),
        (None, false) => None,
    };
    let started = std::time::Instant::now();
    let mut moves = store.moves();
    let counts = loop {
        let asked = std::time::Instant::now();
        let counts = store.counts(job_id).await?.context("the job vanished")?;
        let count_again = every.map(|every| asked + poll_pause(every, asked.elapsed()));
        let over = ended(&counts.state);
        let settled = counts.batches_done + counts.dead_lettered_batches;
        if let Some(bars) = &mut bars {
            bars.show(&counts);
        } else if over || every.is_some() {
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = counts.calls_made as f64 / secs;
            let eta = counts.eta_secs.filter(|_| !over).map(span);
            tracing::info!(job = job_id, state = %counts.state, rows = counts.rows, pending = counts.pending,
                           calls = counts.calls_made, calls_left = counts.calls_left, batches = counts.batches,
                           batches_done = settled, calls_per_sec = format!("{rate:.1}"), eta, "progress");
        }
        if over {
            break counts;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(STATE_EVERY) => {}
                // A job moved on in this process: perhaps this one ended.
                _ = moves.changed() => {}
                () = crate::shutdown_signal() => {
                    anyhow::bail!("interrupted; job {job_id} goes on with any running `vinetl worker`, or `vinetl run` again");
                }
            }
            if count_again.is_some_and(|at| std::time::Instant::now() >= at) {
                break;
            }
            let state = store.job_state(job_id).await?.context("the job vanished")?;
            if ended(&state) {
                break;
            }
        }
    };
    if let Some(bars) = bars {
        bars.finish(&counts);
    }
    Ok(counts)
}

/// The bars `run` and `reprocess` draw on a terminal, one per phase, each
/// added when its phase begins and finished when it ends.
#[derive(Default)]
struct PhaseBars {
    multi: indicatif::MultiProgress,
    planning: Option<indicatif::ProgressBar>,
    decodes: Option<indicatif::ProgressBar>,
    recalls: Option<indicatif::ProgressBar>,
    writing: Option<indicatif::ProgressBar>,
}

/// A bar (or, without a length, a spinner) added below the others.
fn add_bar(multi: &indicatif::MultiProgress, template: &str, len: Option<u64>) -> indicatif::ProgressBar {
    let bar = multi.add(len.map_or_else(indicatif::ProgressBar::new_spinner, indicatif::ProgressBar::new));
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

impl PhaseBars {
    fn show(&mut self, c: &JobCounts) {
        let planning = c.state == "planning";
        let bar = self
            .planning
            .get_or_insert_with(|| add_bar(&self.multi, "{spinner} planning  {pos} rows read ({per_sec}) {msg}", None));
        bar.set_position(c.rows as u64);
        if !planning && !bar.is_finished() {
            bar.finish_with_message(format!(
                "{} to call, {} duplicates, {} cache hits",
                c.pending, c.duplicates, c.cache_hits
            ));
        }
        if planning {
            return;
        }
        let settled = (c.batches_done + c.dead_lettered_batches) as u64;
        let decodes = self.decodes.get_or_insert_with(|| {
            add_bar(&self.multi, "  decodes   [{bar:30}] {pos}/{len} calls ({per_sec}, eta {eta}) {msg}", Some(0))
        });
        decodes.set_length(c.batches as u64);
        decodes.set_position(settled);
        decodes.set_message(c.state_reason.clone().unwrap_or_default());
        let decodes_done = settled >= c.batches as u64;
        if decodes_done && !decodes.is_finished() {
            decodes.finish_with_message(format!("{} decoded, {} failed", c.decoded, c.failed));
        }
        if let Some(r) = c.recalls.as_ref().filter(|r| decodes_done && r.lookups > 0) {
            let to_call = (r.lookups - r.cache_hits).max(0) as u64;
            let recalls = self.recalls.get_or_insert_with(|| {
                add_bar(&self.multi, "  recalls   [{bar:30}] {pos}/{len} lookups ({per_sec}, eta {eta}) {msg}", Some(0))
            });
            recalls.set_length(to_call);
            recalls.set_position(to_call.saturating_sub(c.calls_left as u64));
            if c.calls_left == 0 && !recalls.is_finished() {
                recalls.finish_with_message(format!("{} cached", r.cache_hits));
            }
        }
        if c.state == "writing" && self.writing.is_none() {
            self.writing = Some(add_bar(&self.multi, "{spinner} writing   {elapsed} {msg}", None));
        }
    }

    fn finish(self, c: &JobCounts) {
        if let Some(w) = &self.writing {
            w.finish_with_message(format!("{} outputs", c.outputs.len()));
        }
        for bar in [&self.planning, &self.decodes, &self.recalls].into_iter().flatten() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        let _ = self.multi.clear();
    }
}

/// Whether to draw a progress bar: only on a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// An ended job's spec, refused (with what to do) when its planning
/// failed, or when a later job has taken over its dataset and `force` is
/// not given.
async fn ended_job_spec(store: &Store, job_id: i64, force: bool) -> anyhow::Result<JobSpec> {
    let spec = store.job_spec(job_id).await?.map_err(|e| anyhow::anyhow!(e))?;
    let counts = store.standing(job_id).await?.ok_or(StoreError::NoJob(job_id))?;
    if let Some(at) = &counts.pruned_at {
        return Err(Usage(format!(
            "job {job_id} was pruned at {at} (retention): its rows are gone, so it can be neither redone nor \
             written again; submit its spec again for a new job"
        ))
        .into());
    }
    if let Some(reason) = counts.state_reason.as_deref().filter(|r| r.starts_with("planning failed"))
        && counts.state == "failed"
    {
        return Err(Usage(format!(
            "job {job_id} failed while planning ({reason}); there is nothing to redo: fix the input and submit the spec again"
        ))
        .into());
    }
    if let Some(o) = counts.outputs.iter().find(|o| o.contains("(superseded by job"))
        && !force
    {
        return Err(Usage(format!(
            "job {job_id}'s output {o}: writing it again would replace the later job's; add --force to do that anyway"
        ))
        .into());
    }
    Ok(spec)
}

/// `vinetl reprocess JOB`: puts an ended job back to work (all of it or its
/// failed rows) and, unless `detach`, works it to the end here.
pub async fn reprocess(
    state: &State,
    job_id: i64,
    redo: &Redo,
    detach: bool,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<Ended> {
    let store = state.open_existing(concurrency as u32 + 4).await?;
    let mut spec = ended_job_spec(&store, job_id, redo.replace_newer).await?;
    if spec.provider.embedded && detach {
        return Err(Usage(format!(
            "job {job_id} calls an embedded API, which only this command can host: run it without --detach"
        ))
        .into());
    }
    let embedded = embed(&mut spec).await?;
    if embedded.is_some() {
        store.update_spec(job_id, &serde_json::to_value(&spec)?).await?;
    }
    let batches = store
        .reprocess(job_id, redo, spec.provider.batch_size as i32, spec.cache.ttl_hours, spec.provider.call_lease_secs())
        .await?
        .with_context(|| {
            format!("job {job_id} has not ended, or a call of it is still out: wait for it, or `vinetl cancel {job_id}` first")
        })
        .map_err(|e| Usage(e.to_string()))?;
    tracing::info!(job = job_id, batches, how = %redo.describe(), "reprocessing");
    crate::job::queue::enqueue(&store, &state.schema, crate::job::queue::Lane::of(&spec.provider), job_id).await?;
    crate::job::advance::advance(&store, &state.schema, job_id, &spec).await?;
    let max_failed_share = spec.max_failed_share;
    if detach {
        let counts = store.counts(job_id).await?.ok_or(StoreError::NoJob(job_id))?;
        return Ok(Ended { counts, max_failed_share });
    }
    let url = embedded.as_ref().map(crate::serve::RunningServer::url);
    let allow = crate::call::allow::ApiAllow::from_env();
    let counts = work_until_done(&store, &state.schema, job_id, concurrency, progress, url, allow).await;
    if let Some(server) = embedded {
        let _ = server.stop().await;
    }
    Ok(Ended { counts: counts?, max_failed_share })
}

/// `reprocess --vins FILE`: the VINs listed, one per line (blank lines and
/// a `vin` header skipped), normalised as the planner does. A line that is
/// not a VIN is an error naming the file and line: a typo there would
/// otherwise silently select nothing.
pub fn read_vin_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --vins {}", path.display()))?;
    let mut vins = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.eq_ignore_ascii_case("vin")) {
            continue;
        }
        match crate::vin::Vin::parse(line) {
            Ok(v) => vins.push(v.as_str().to_string()),
            Err(e) => {
                return Err(Usage(format!(
                    "--vins {} line {}: {:?} is not a VIN ({e})",
                    path.display(),
                    i + 1,
                    // Quoted with control characters escaped, and cut: never replayed raw.
                    line.chars().take(40).collect::<String>()
                ))
                .into());
            }
        }
    }
    if vins.is_empty() {
        return Err(Usage(format!("--vins {}: the file lists no VINs", path.display())).into());
    }
    vins.sort();
    vins.dedup();
    Ok(vins)
}

/// `vinetl write JOB`: writes an ended job's outputs again from its stored
/// results, making no API call (a lost file, a dropped table).
pub async fn write(state: &State, job_id: i64, force: bool) -> anyhow::Result<Ended> {
    let store = state.open_existing(4).await?;
    let spec = ended_job_spec(&store, job_id, force).await?;
    if spec.outputs.is_empty() {
        return Err(Usage(format!("job {job_id}'s spec names no [[outputs]]: there is nothing to write")).into());
    }
    if !store.begin_rewrite(job_id, force).await? {
        return Err(Usage(format!(
            "job {job_id} has not ended (or is being written): wait for it, or `vinetl cancel {job_id}` first"
        ))
        .into());
    }
    crate::job::advance::write(&store, &state.schema, job_id, &spec, None).await?;
    let counts = store.counts(job_id).await?.ok_or(StoreError::NoJob(job_id))?;
    Ok(Ended { counts, max_failed_share: spec.max_failed_share })
}

/// `vinetl prune --older-than D`: retention for the whole install (or one
/// job name).
pub async fn prune(
    state: &State,
    older_than: std::time::Duration,
    name: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<crate::job::prune::Pruned> {
    let store = state.open_existing(2).await?;
    let scope = crate::job::prune::Scope { name, except: None, dry_run };
    Ok(crate::job::prune::prune(&store, &state.schema, older_than.as_secs_f64(), scope).await?)
}

/// `vinetl cancel JOB`: the job's state before the cancel.
pub async fn cancel(state: &State, job: i64) -> anyhow::Result<()> {
    let store = state.open_existing(2).await?;
    if store.cancel_job(job).await? {
        return Ok(());
    }
    match store.counts(job).await? {
        None => Err(StoreError::NoJob(job).into()),
        Some(c) => Err(Usage(format!("job {job} has already ended ({}): there is nothing to cancel", c.state)).into()),
    }
}

/// `vinetl pause JOB`.
pub async fn pause(state: &State, job: i64) -> anyhow::Result<()> {
    let store = state.open_existing(2).await?;
    if store.pause_job(job).await? {
        return Ok(());
    }
    match store.counts(job).await? {
        None => Err(StoreError::NoJob(job).into()),
        Some(c) => {
            Err(Usage(format!("job {job} is {}: only a planning, running or waiting job pauses", c.state)).into())
        }
    }
}

/// `vinetl resume JOB`: the job runs again; its queued batches are pushed
/// again under a new generation, and a job whose last calls landed while it
/// was paused moves on (recalls, outputs). Returns the batches queued.
pub async fn resume(state: &State, job: i64) -> anyhow::Result<usize> {
    let store = state.open_existing(2).await?;
    if !store.resume_job(job).await? {
        return match store.counts(job).await? {
            None => Err(StoreError::NoJob(job).into()),
            Some(c) => Err(Usage(format!("job {job} is {}, not paused: there is nothing to resume", c.state)).into()),
        };
    }
    let spec = store.job_spec(job).await?.map_err(anyhow::Error::msg)?;
    let queued =
        crate::job::queue::enqueue(&store, &state.schema, crate::job::queue::Lane::of(&spec.provider), job).await?;
    crate::job::advance::advance(&store, &state.schema, job, &spec).await?;
    Ok(queued)
}

/// The JSON Schema of one job in `status --json` (the list is an array of
/// them). Kept by hand as the documented contract: `tests/cli.rs` checks
/// real output against it, and it refuses fields it does not list.
pub const STATUS_SCHEMA: &str = include_str!("status.schema.json");

/// `vinetl status [JOB]`: the job, or the `limit` most recent.
pub async fn status(state: &State, job: Option<i64>, limit: i64) -> anyhow::Result<Vec<JobCounts>> {
    let store = state.open_existing(2).await?;
    counts_of(&store, job, limit).await
}

async fn counts_of(store: &Store, job: Option<i64>, limit: i64) -> anyhow::Result<Vec<JobCounts>> {
    let ids = match job {
        Some(id) => vec![id],
        None => store.recent_jobs(limit).await?,
    };
    let mut out = Vec::new();
    for id in ids {
        out.push(store.counts(id).await?.ok_or(StoreError::NoJob(id))?);
    }
    Ok(out)
}

/// `vinetl status --watch`: a bar per job over its calls, redrawn every
/// second, until every job shown has ended (or Ctrl-C). Without a terminal,
/// the list is printed again every 5 s instead.
pub async fn watch_status(state: &State, job: Option<i64>, limit: i64) -> anyhow::Result<()> {
    let store = state.open_existing(2).await?;
    let terminal = stderr_is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} calls  {msg}")
        .expect("a valid template");
    let mut bars: std::collections::BTreeMap<i64, indicatif::ProgressBar> = Default::default();
    loop {
        let asked = std::time::Instant::now();
        let jobs = counts_of(&store, job, limit).await?;
        let every = poll_pause(if terminal { Duration::from_secs(1) } else { PROGRESS_EVERY }, asked.elapsed());
        if terminal {
            for c in &jobs {
                let bar = bars.entry(c.job_id).or_insert_with(|| {
                    let bar = multi.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(c.job_id.to_string());
                    bar
                });
                bar.set_length((c.batches_done + c.dead_lettered_batches + c.calls_left).max(c.batches) as u64);
                bar.set_position((c.batches_done + c.dead_lettered_batches) as u64);
                let eta = c.eta_secs.map_or(String::new(), |e| format!(", eta {}", span(e)));
                let why = c.state_reason.as_deref().map_or(String::new(), |r| format!(": {r}"));
                bar.set_message(format!(
                    "{} {}{why} ({} rows, {} calls, {} failed{eta})",
                    c.name, c.state, c.rows, c.calls_made, c.failed
                ));
            }
        } else {
            println!("{LIST_HEADER}");
            for c in &jobs {
                println!("{}", list_line(c));
            }
        }
        if jobs.iter().all(|c| ended(&c.state)) {
            for bar in bars.values() {
                bar.finish();
            }
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = crate::shutdown_signal() => return Ok(()),
        }
    }
}

/// `vinetl failures JOB`: at most `limit` dead-lettered batches and
/// failed rows, with their totals.
pub async fn failures(state: &State, job: i64, limit: i64) -> anyhow::Result<Failures> {
    let store = state.open_existing(2).await?;
    Ok(store.failures(job, limit).await?.ok_or(StoreError::NoJob(job))?)
}

/// The step that retries a job's failures, once there are any: only an
/// ended job can be reprocessed.
pub fn next_step(f: &Failures) -> Option<String> {
    if f.failed_rows_total == 0 && f.dead_batches_total == 0 {
        return None;
    }
    let cmd = format!("vinetl reprocess {} --failed-only", f.job_id);
    Some(match f.state.as_str() {
        "done" | "failed" | "cancelled" => cmd,
        _ => format!("{cmd} (once the job has ended: it is {})", f.state),
    })
}

/// `vinetl failures --json`: the store's [`Failures`] and the next step
/// (null when nothing failed).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailuresOut {
    #[serde(flatten)]
    pub failures: Failures,
    pub next: Option<String>,
}

impl From<Failures> for FailuresOut {
    fn from(failures: Failures) -> FailuresOut {
        FailuresOut { next: next_step(&failures), failures }
    }
}

/// The text `vinetl failures` prints. Input and error texts are quoted
/// with Rust's escapes (as `check` quotes samples), so a control character
/// in a file never reaches the terminal raw.
pub fn describe_failures(f: &Failures) -> String {
    let mut s = format!("job {} ({}): {}", f.job_id, f.name, f.state);
    if let Some(r) = &f.state_reason {
        s.push_str(&format!(": {r}"));
    }
    s.push_str(&format!("\n  {} dead-lettered batches, {} failed rows\n", f.dead_batches_total, f.failed_rows_total));
    for e in &f.job_errors {
        s.push_str(&format!("  job error  {} {}: {:?}\n", e.at.as_deref().unwrap_or("-"), e.code, e.text));
    }
    let shown = |n: usize, total: i64| {
        if (n as i64) < total { format!(" (the first {n} of {total}; --limit N shows more)") } else { String::new() }
    };
    if !f.dead_batches.is_empty() {
        s.push_str(&format!("\ndead-lettered batches{}:\n", shown(f.dead_batches.len(), f.dead_batches_total)));
        s.push_str("  batch  kind    VINs  attempts  given up at                        last error\n");
        for b in &f.dead_batches {
            s.push_str(&format!(
                "  {:>5}  {:<6} {:>5}  {:>8}  {:<33}  {}\n",
                b.batch_no,
                b.kind,
                b.vins,
                b.attempts,
                b.updated_at.as_deref().unwrap_or("-"),
                b.last_error.as_ref().map_or("-".to_string(), |e| format!("{e:?}"))
            ));
        }
    }
    if !f.failed_rows.is_empty() {
        s.push_str(&format!("\nfailed rows{}:\n", shown(f.failed_rows.len(), f.failed_rows_total)));
        for r in &f.failed_rows {
            let batch = r.batch_no.map_or(String::new(), |b| format!(" (batch {b})"));
            s.push_str(&format!(
                "  {}:{}  {:?}  {}{batch}: {}\n",
                r.source,
                r.row,
                r.raw_vin,
                r.error_code.as_deref().unwrap_or("-"),
                r.error_text.as_ref().map_or("-".to_string(), |e| format!("{e:?}"))
            ));
        }
    }
    match next_step(f) {
        Some(step) => {
            s.push_str(&format!("\nnext: {step} retries only these rows (a fresh cached decode costs no call)\n"))
        }
        None => s.push_str("nothing failed: there is nothing to reprocess\n"),
    }
    s
}

/// What `vinetl check SPEC` found: the checks that passed, and with
/// `--dry-run` what planning would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecCheck {
    pub spec: String,
    pub passed: Vec<String>,
    pub plan: Option<plan::Estimate>,
}

/// `vinetl check SPEC [--dry-run]`: the preflight checks `run` makes (the
/// key must be set here), and optionally a plan, without creating a job or
/// any state.
pub async fn check_spec(state: &State, spec_path: &Path, dry_run: bool) -> anyhow::Result<SpecCheck> {
    let (spec, _) = dated(load_spec(spec_path)?, None)?;
    let store = match state.open_existing(2).await {
        Ok(store) => Some(store),
        Err(StoreError::NoState(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let pg = store.as_ref().and_then(Store::pg_pool);
    let passed = crate::job::preflight::run(&spec, pg, Checks { key: true, api: true }).await?;
    let plan = if dry_run { Some(plan::estimate(store.as_ref(), &spec).await?) } else { None };
    Ok(SpecCheck { spec: spec_path.display().to_string(), passed, plan })
}

impl std::fmt::Display for SpecCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: every check passed", self.spec)?;
        for p in &self.passed {
            writeln!(f, "  ok  {p}")?;
        }
        if let Some(e) = &self.plan {
            writeln!(f, "  plan (dry run; nothing stored, nothing called)")?;
            writeln!(f, "    rows              {:>12}", e.rows)?;
            writeln!(f, "    valid             {:>12}", e.valid)?;
            writeln!(f, "    invalid           {:>12}", e.invalid)?;
            writeln!(f, "    distinct VINs     {:>12}", e.distinct)?;
            writeln!(f, "    cache hits        {:>12}", e.cache_hits)?;
            writeln!(f, "    decode calls      {:>12}", e.calls)?;
            let days = e.quota_days.map_or(String::new(), |d| format!(", {d:.1} days of quota"));
            writeln!(f, "    time at the rate  {:>12}{days}", format!("{:.0} s", e.seconds_at_rate))?;
        }
        Ok(())
    }
}

/// The exit code a job's end calls for, and the line that says why: the
/// summary's first line, and on stderr when it is not 0.
pub fn verdict(e: &Ended) -> (u8, String) {
    let c = &e.counts;
    let head = format!("job {} ({})", c.job_id, c.name);
    let reason = c.state_reason.as_deref().map_or(String::new(), |r| format!(": {r}"));
    match c.state.as_str() {
        "done" => {
            let share = if c.rows > 0 { c.failed as f64 / c.rows as f64 } else { 0.0 };
            if c.failed > 0 && share > e.max_failed_share {
                (
                    crate::exit::ROWS_FAILED,
                    format!(
                        "{head}: done, but {} of {} rows failed ({:.1}%, over max_failed_share {:.1}%)",
                        c.failed,
                        c.rows,
                        share * 100.0,
                        e.max_failed_share * 100.0
                    ),
                )
            } else {
                (crate::exit::OK, format!("{head}: done"))
            }
        }
        "failed" | "cancelled" => (crate::exit::JOB_FAILED, format!("{head}: {}{reason}", c.state)),
        other => (crate::exit::ERROR, format!("{head}: {other}{reason}")),
    }
}

/// The run summary: the verdict line, then the counts.
pub fn summary(e: &Ended) -> (u8, String) {
    let (code, line) = verdict(e);
    let body = describe(&e.counts);
    let rest = body.split_once('\n').map_or("", |(_, rest)| rest);
    (code, format!("{line}\n{rest}"))
}

/// The decode calls the job did not make, against a client that sends one
/// single-VIN call per input row, and why each was avoided.
fn avoided(c: &JobCounts, invalid: i64) -> String {
    // Distinct valid VINs the cache did not answer: they were batched, so
    // each batch stands for up to 20 such rows.
    let sent = (c.valid - c.duplicates - c.cache_hits).max(0);
    let batching = (sent - c.batches).max(0);
    let total = invalid + c.duplicates + c.cache_hits + batching;
    format!(
        "  calls avoided    {total:>10} of {} (one per row): {invalid} invalid rows never sent, {} duplicates, \
         {} cache hits, {batching} by batching {sent} VINs into {} calls of up to 20\n",
        c.rows, c.duplicates, c.cache_hits, c.batches
    )
}

/// The header of `status`'s job list.
pub const LIST_HEADER: &str = "  JOB  NAME                  STATE      PROGRESS              ROWS     CALLS   FAILED  STARTED              DURATION  ETA";

/// One job as a line of `status`'s list: state, progress over its calls,
/// rows, calls, failed rows, when its run started, how long it has taken
/// and how long it still needs.
pub fn list_line(c: &JobCounts) -> String {
    let settled = c.batches_done + c.dead_lettered_batches;
    let progress = if c.state == "planning" {
        "planning".to_string()
    } else if c.batches == 0 {
        "-".to_string()
    } else {
        let share = settled as f64 / c.batches as f64;
        let filled = (share * 10.0).floor() as usize;
        format!("[{}{}] {:>3.0}%", "#".repeat(filled), "-".repeat(10 - filled), share * 100.0)
    };
    let started = c.times.started_at.as_deref().map_or("-".to_string(), short_time);
    let duration = c.times.total_secs.or_else(|| since(c.times.started_at.as_deref())).map_or("-".to_string(), span);
    let eta = c.eta_secs.map_or("-".to_string(), span);
    let mut name = c.name.chars().take(20).collect::<String>();
    if name.len() < c.name.len() {
        name.pop();
        name.push('~');
    }
    format!(
        "{:>5}  {name:<20}  {:<9}  {progress:<17}  {:>8}  {:>8}  {:>7}  {started:<19}  {duration:>8}  {eta}",
        c.job_id, c.state, c.rows, c.calls_made, c.failed
    )
}

/// `2026-12-04T02:00:01.5+00:00` as `2026-12-04 02:00:01`.
fn short_time(rfc3339: &str) -> String {
    rfc3339.get(..19).map_or(rfc3339.to_string(), |t| t.replacen('T', " ", 1))
}

/// Seconds since an RFC 3339 time, by this machine's clock.
fn since(rfc3339: Option<&str>) -> Option<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339?).ok()?;
    Some((chrono::Utc::now().timestamp_millis() - at.timestamp_millis()).max(0) as f64 / 1000.0)
}

/// A span of seconds as `1h 2m`, `3m 4s` or `5s`.
fn span(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The text `status JOB` and `run` print.
pub fn describe(c: &JobCounts) -> String {
    let mut s = format!("job {} ({}): {}", c.job_id, c.name, c.state);
    if let Some(r) = &c.state_reason {
        s.push_str(&format!(": {r}"));
    }
    if let Some(at) = &c.resume_at {
        s.push_str(&format!(" (next try {})", short_time(at)));
    }
    if let Some(at) = &c.pruned_at {
        s.push_str(&format!(" (pruned at {at}: its rows are gone; the counts are as they were)"));
    }
    s.push('\n');
    let invalid: i64 = c.invalid.values().sum();
    s.push_str(&format!(
        "  rows read        {:>10}\n  valid            {:>10}\n  invalid          {:>10}",
        c.rows, c.valid, invalid
    ));
    if !c.invalid.is_empty() {
        let kinds: Vec<String> = c.invalid.iter().map(|(k, n)| format!("{k} {n}")).collect();
        s.push_str(&format!("  ({})", kinds.join(", ")));
    }
    s.push_str(&format!(
        "\n  duplicates       {:>10}\n  cache hits       {:>10}\n  decoded          {:>10}\n  failed           {:>10}\n  pending          {:>10}\n",
        c.duplicates, c.cache_hits, c.decoded, c.failed, c.pending
    ));
    let k = &c.calls;
    s.push_str(&format!(
        "  calls made       {:>10} ({} answered, {} 429s, {} 5xx, {} timed out, {} other errors, {} answers lost, {} in flight)\n",
        c.calls_made, k.answered, k.rate_limited, k.server_error, k.timed_out, k.other_error, k.answer_lost, k.in_flight
    ));
    s.push_str(&format!(
        "  calls retried    {:>10}\n  dead-lettered    {:>10} VINs in {} batches\n",
        c.calls_retried, c.dead_lettered_vins, c.dead_lettered_batches
    ));
    if let Some(q) = &c.quota {
        let of = q.daily_quota.map_or_else(|| "no daily quota".to_string(), |n| format!("of {n}"));
        let resets = q.resets_at.as_deref().filter(|_| q.daily_quota.is_some());
        s.push_str(&format!(
            "  quota today      {:>10} {of}, account {}{}\n",
            q.used_today,
            q.account,
            resets.map_or(String::new(), |r| format!(", resets {}", short_time(r)))
        ));
        if let Some(until) = &q.blocked_until {
            s.push_str(&format!("  429 back-off     the API asked for no call before {}\n", short_time(until)));
        }
    }
    if c.calls_left > 0 || c.eta_secs.is_some() {
        let rate = c.quota.as_ref().and_then(|q| q.requests_per_second);
        s.push_str(&format!(
            "  calls left       {:>10}{}{}\n",
            c.calls_left,
            rate.map_or(String::new(), |r| format!(" at {r:.1}/s granted")),
            c.eta_secs.map_or(String::new(), |e| format!(", eta {}", span(e)))
        ));
    }
    s.push_str(&avoided(c, invalid));
    if let Some(r) = &c.recalls {
        s.push_str(&format!(
            "  recall lookups   {:>10} ({} cached, {} failed for good)\n  recall calls     {:>10} ({} avoided against one per decoded row: lookups shared by make, model and year)\n",
            r.lookups, r.cache_hits, r.failed, r.calls, r.calls_saved
        ));
        if let (Some(with), Some(unknown), Some(campaigns)) = (r.rows_with_recalls, r.rows_unknown, r.campaigns) {
            s.push_str(&format!(
                "  recalls found    {:>10} campaigns; {} rows with recalls, {} rows unknown\n",
                campaigns, with, unknown
            ));
        }
    }
    for o in &c.outputs {
        s.push_str(&format!("  output           {o}\n"));
    }
    if c.rows == 0 && c.state == "done" {
        s.push_str("  warning          the input had no rows (source.min_rows = 1 makes that an error)\n");
    }
    let t = &c.times;
    let phases: Vec<String> = [("planning", t.planning_secs), ("calls", t.calls_secs), ("writing", t.writing_secs)]
        .iter()
        .filter_map(|(name, secs)| secs.map(|d| format!("{name} {d:.1} s")))
        .collect();
    if let Some(started) = &t.started_at {
        let total = t.total_secs.map_or(String::new(), |d| format!(", total {d:.1} s"));
        s.push_str(&format!("  started          {started} ({}{total})\n", phases.join(", ")));
    }
    if !c.earlier_runs.is_empty() {
        s.push_str(&format!("  run              {:>10} ({})\n", c.run_no, c.run_how));
        for r in &c.earlier_runs {
            let when = r.started_at.as_deref().map_or(String::new(), |t| format!(" started {}", short_time(t)));
            s.push_str(&format!(
                "  earlier run {:>4} {}: {}{when}; {} rows, {} decoded, {} failed, {} calls made by then\n",
                r.run_no, r.how, r.state, r.rows, r.decoded, r.failed, r.calls_made
            ));
        }
    }
    s
}

/// A VIN given on the command line (`forget`, `audit --vin`), as the state
/// store keeps it: normalised when it is a VIN, else its trimmed upper-case
/// text (a row rejected at planning is stored as it was read).
pub fn normalised_vin(input: &str) -> Result<String, Usage> {
    if let Ok(vin) = crate::vin::Vin::parse(input) {
        return Ok(vin.to_string());
    }
    let raw = input.trim().to_uppercase();
    if raw.is_empty() || raw.chars().count() > 64 || raw.chars().any(char::is_control) {
        return Err(Usage(format!("{}: not a VIN, nor text a VIN column could hold", crate::columns::quoted(input))));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeadBatch, FailedRow};

    #[test]
    fn a_slow_count_is_asked_for_less_often() {
        let half = Duration::from_millis(500);
        assert_eq!(poll_pause(half, Duration::from_millis(27)), half);
        assert_eq!(poll_pause(half, Duration::from_secs(2)), Duration::from_secs(20));
        assert_eq!(poll_pause(half, Duration::from_secs(5)), COUNT_AT_LEAST_EVERY);
        assert_eq!(poll_pause(Duration::from_secs(60), Duration::from_secs(5)), Duration::from_secs(60));
    }

    #[test]
    fn failures_text_escapes_input_and_ends_with_the_next_step() {
        let f = Failures {
            job_id: 7,
            name: "fleet".into(),
            state: "done".into(),
            limit: 1,
            dead_batches_total: 1,
            dead_batches: vec![DeadBatch {
                batch_no: 0,
                kind: "decode".into(),
                vins: 1,
                attempts: 5,
                last_error: Some("HTTP 500\n\u{1b}[2J".into()),
                updated_at: None,
            }],
            failed_rows_total: 2,
            failed_rows: vec![FailedRow {
                source: "a.csv".into(),
                row: 3,
                raw_vin: "1hgcm82633a004352\u{1b}[31m".into(),
                error_code: Some("dead_letter".into()),
                error_text: Some("HTTP 500".into()),
                batch_no: Some(0),
            }],
            ..Failures::default()
        };
        let text = describe_failures(&f);
        assert!(!text.contains('\u{1b}'), "no raw control character: {text:?}");
        assert!(text.contains(r#""1hgcm82633a004352\u{1b}[31m""#), "{text}");
        assert!(text.contains(r#""HTTP 500\n\u{1b}[2J""#), "{text}");
        assert!(text.contains("the first 1 of 2"), "{text}");
        assert!(
            text.ends_with(
                "next: vinetl reprocess 7 --failed-only retries only these rows (a fresh cached decode costs no call)\n"
            ),
            "{text}"
        );
        let running = Failures { state: "running".into(), ..f.clone() };
        assert!(next_step(&running).unwrap().contains("once the job has ended"));
        let none =
            Failures { dead_batches_total: 0, failed_rows_total: 0, dead_batches: vec![], failed_rows: vec![], ..f };
        assert_eq!(next_step(&none), None);
    }
}
