//! Scheduled specs: `vinetl scheduler` (or `worker --with-scheduler`)
//! starts one run per fire time of every registered schedule.
//!
//! A tick, at a time the caller gives (tests inject it):
//! 1. **decide**: for each schedule, the fire times since it was last
//!    decided become runs, `due` or `missed` by its catch-up policy. Under
//!    the schedule's row lock, so two schedulers agree; and each run's key
//!    (schedule, fire time) exists once, so none is recorded twice.
//! 2. **start**: claim a due run (a lease), fill the spec's `{date}`
//!    templates with its logical date, and if its dated input is there,
//!    make its job and plan it for the workers. An absent input is looked
//!    for again until `wait_for_input` after the fire time, then the run
//!    fails naming the path. A scheduler killed while starting a run leaves
//!    a lease that runs out; the next one resumes the same job.
//!
//! This module decides and starts; the queue and the workers do the rest,
//! as for a submitted job.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::calendar::Calendar;
use crate::io::s3::{S3, S3Error, S3Url};
use crate::job::plan::{self, PlanError};
use crate::spec::{Catchup, JobSpec, MISSED_AFTER_SECS, SourceSpec};
use crate::store::{ClaimedRun, NewRun, ScheduledRun, Store, StoreError};

/// How long a scheduler holds a run it is starting before another may.
const LEASE_SECS: f64 = 300.0;
/// How often an absent input is looked for again.
const INPUT_POLL_SECS: f64 = 60.0;
/// How often a scheduler looks for due runs.
pub const TICK: std::time::Duration = std::time::Duration::from_secs(5);

/// What one tick did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tick {
    /// Runs recorded (due or missed) from fire times.
    pub recorded: u64,
    /// Jobs planned: (schedule, logical date, job id).
    pub started: Vec<(String, String, i64)>,
    /// Runs whose input is not there yet.
    pub waiting: u64,
    /// Runs failed: (schedule, logical date, why).
    pub failed: Vec<(String, String, String)>,
}

/// A registered schedule's spec and calendar.
struct Registered {
    spec: JobSpec,
    calendar: Calendar,
    decided_through: f64,
}

/// Reads a stored schedule; what is stored is input, checked again.
fn registered(name: &str, spec: &serde_json::Value, through: f64) -> Result<Registered, String> {
    let spec: JobSpec = serde_json::from_value(spec.clone()).map_err(|e| format!("schedule {name:?}: {e}"))?;
    spec.validate(&format!("schedule {name:?}")).map_err(|e| e.to_string())?;
    let calendar = spec.calendar().ok_or_else(|| format!("schedule {name:?} has no cron expression"))?;
    Ok(Registered { spec, calendar, decided_through: through })
}

fn secs(t: DateTime<Utc>) -> f64 {
    t.timestamp() as f64
}

fn time(secs: f64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs as i64, 0).unwrap_or_default()
}

/// Registers `spec`'s schedule (or updates it). Its first run is its first
/// fire time after `now`; earlier dates are for `backfill`.
pub async fn register(store: &Store, spec: &JobSpec, now: DateTime<Utc>) -> Result<bool, StoreError> {
    let json = serde_json::to_value(spec).expect("a spec serialises");
    store.register_schedule(&spec.name, &json, secs(now)).await
}

type Specs = std::collections::HashMap<String, Registered>;

/// One pass at `now`: decide every schedule (or only `only`), then start
/// every run that is due.
pub async fn tick(store: &Store, schema: &str, now: DateTime<Utc>, only: Option<&str>) -> Result<Tick, StoreError> {
    let mut out = Tick::default();
    decide_all(store, now, only, &mut out).await?;
    start_due(store, schema, now, only, &mut out).await?;
    Ok(out)
}

/// The registered schedules (or only `only`) whose stored spec reads back.
async fn schedules(store: &Store, only: Option<&str>) -> Result<Specs, StoreError> {
    let mut specs = Specs::new();
    for row in store.schedules().await? {
        if only.is_some_and(|n| n != row.name) {
            continue;
        }
        match registered(&row.name, &row.spec, row.decided_through) {
            Ok(r) => {
                specs.insert(row.name, r);
            }
            Err(e) => tracing::error!(schedule = %row.name, error = %e, "schedule skipped: its stored spec is invalid"),
        }
    }
    Ok(specs)
}

/// Records every schedule's fire times up to `now`.
async fn decide_all(store: &Store, now: DateTime<Utc>, only: Option<&str>, out: &mut Tick) -> Result<(), StoreError> {
    for (name, r) in &schedules(store, only).await? {
        out.recorded += decide(store, name, r, now).await?;
    }
    Ok(())
}

/// Starts every due run, oldest first. Each claim's lease is taken at the
/// time it is claimed (`now` plus the time this pass has taken), so a long
/// planning does not leave later claims with leases already run out. The
/// schedules' specs are read when the pass claims its first run, never
/// kept from an earlier pass: a spec submitted again (or unscheduled) since
/// is started as it stands now.
async fn start_due(
    store: &Store,
    schema: &str,
    now: DateTime<Utc>,
    only: Option<&str>,
    out: &mut Tick,
) -> Result<(), StoreError> {
    let began = std::time::Instant::now();
    let mut specs: Option<Specs> = None;
    loop {
        let at = now + chrono::Duration::from_std(began.elapsed()).unwrap_or_default();
        let Some(run) = store.claim_run(at.timestamp() as f64, LEASE_SECS, only).await? else {
            return Ok(());
        };
        let read = match &mut specs {
            // Registered since this pass read the schedules (a backfill).
            Some(s) if !s.contains_key(&run.name) => {
                *s = schedules(store, only).await?;
                s
            }
            Some(s) => s,
            None => specs.insert(schedules(store, only).await?),
        };
        start(store, schema, &run, read.get(&run.name), at, out).await?;
    }
}

/// Records the fire times of one schedule in `(decided, now]`.
async fn decide(store: &Store, name: &str, r: &Registered, now: DateTime<Utc>) -> Result<u64, StoreError> {
    // Nothing fired since the last decision: no write.
    if r.calendar.next_after(time(r.decided_through)).is_none_or(|next| next > now) {
        return Ok(0);
    }
    let policy = r.spec.catchup.unwrap_or_default();
    store
        .decide_fires(
            name,
            secs(now),
            Box::new(move |through| {
                let (fires, left_out) = r.calendar.fires_between(time(through), now);
                if left_out > 0 {
                    tracing::warn!(
                        schedule = name,
                        left_out,
                        "more fire times passed than are kept; the oldest are not listed"
                    );
                }
                runs_for(&r.calendar, &fires, now, policy)
            }),
        )
        .await
}

/// The runs for fire times found at `now`: on-time ones are due; missed
/// ones (more than [`MISSED_AFTER_SECS`] ago) follow the catch-up policy.
pub fn runs_for(calendar: &Calendar, fires: &[DateTime<Utc>], now: DateTime<Utc>, policy: Catchup) -> Vec<NewRun> {
    let newest = fires.last().copied();
    fires
        .iter()
        .map(|&at| {
            let missed = (now - at).num_seconds() > MISSED_AFTER_SECS;
            let runs = !missed
                || match policy {
                    Catchup::All => true,
                    Catchup::Latest => Some(at) == newest,
                    Catchup::None => false,
                };
            let date = calendar.logical_date(at).to_string();
            let policy_name = match policy {
                Catchup::All => "all",
                Catchup::Latest => "latest",
                Catchup::None => "none",
            };
            NewRun {
                at: secs(at),
                date,
                state: if runs { "due" } else { "missed" },
                how: if missed { "catch-up" } else { "schedule" },
                reason: (!runs).then(|| {
                    format!(
                        "missed: no scheduler ran at {}; catchup = \"{policy_name}\" left it (`vinetl backfill` runs it)",
                        at.format("%Y-%m-%d %H:%M UTC")
                    )
                }),
            }
        })
        .collect()
}

/// Starts a claimed run: waits for its input, makes its job, plans it.
async fn start(
    store: &Store,
    schema: &str,
    run: &ClaimedRun,
    registered: Option<&Registered>,
    now: DateTime<Utc>,
    out: &mut Tick,
) -> Result<(), StoreError> {
    let Some(r) = registered else {
        return fail(
            store,
            run,
            now,
            format!("schedule {:?} is not registered (removed, or its spec is invalid)", run.name),
            out,
        )
        .await;
    };
    let date: NaiveDate = run.date.parse().map_err(|_| StoreError::Decode(format!("logical date {:?}", run.date)))?;
    let spec = match r.spec.for_date(date) {
        Ok(s) => s,
        Err(e) => return fail(store, run, now, e.to_string(), out).await,
    };
    let json = serde_json::to_value(&spec).expect("a spec serialises");
    let job_id = match run.job_id {
        // Planned already, by a scheduler that died before it settled the
        // run: planning it again would only do that work twice.
        Some(id) if store.job_state(id).await?.is_none_or(|s| s != "planning") => {
            store.settle_run(run, "submitted", None, None, secs(now)).await?;
            return Ok(());
        }
        Some(id) => id,
        None => {
            // From the fire time, or from when a backfill asked for an old night.
            let since = run.at.max(run.created);
            let deadline = since + r.spec.wait_for_input_secs();
            if let Some(absent) = input_absent(&spec).await {
                if secs(now) < deadline {
                    let reason = format!("waiting for its input: {absent} (until {})", fmt(deadline));
                    out.waiting += 1;
                    let next = (secs(now) + INPUT_POLL_SECS).min(deadline);
                    store.settle_run(run, "waiting", Some(&reason), Some(next), secs(now)).await?;
                    return Ok(());
                }
                let why = format!(
                    "its input never came: {absent}; waited from {} until {} (wait_for_input = {})",
                    fmt(since),
                    fmt(deadline),
                    r.spec.wait_for_input.as_deref().unwrap_or("6h"),
                );
                // A failed job too, so `status` and the exit of a watcher tell.
                let Some(job) = store.start_run_job(run, &json, &plan::spec_hash(&spec)).await? else {
                    lost(run);
                    return Ok(());
                };
                store.fail_job(job, &why).await?;
                return fail(store, run, now, why, out).await;
            }
            match store.start_run_job(run, &json, &plan::spec_hash(&spec)).await? {
                Some(job) => job,
                None => {
                    lost(run);
                    return Ok(());
                }
            }
        }
    };
    match plan::plan_job(store, schema, job_id, &spec, run.job_id.is_some()).await {
        Ok(_) => {
            tracing::info!(schedule = %run.name, date = %run.date, job = job_id, "scheduled run started");
            out.started.push((run.name.clone(), run.date.clone(), job_id));
            store.settle_run(run, "submitted", None, None, secs(now)).await?;
            Ok(())
        }
        Err(PlanError::Failed { reason, .. }) => fail(store, run, now, format!("job {job_id}: {reason}"), out).await,
        // Another process plans it, or the database went away: look again later.
        Err(e) => {
            tracing::warn!(schedule = %run.name, date = %run.date, job = job_id, error = %e, "scheduled run not started; retrying");
            let why = format!("job {job_id}: {e}");
            store.settle_run(run, "due", Some(&why), Some(secs(now) + INPUT_POLL_SECS), secs(now)).await?;
            Ok(())
        }
    }
}

/// A claim whose lease ran out while this scheduler worked on it: another
/// has the run now, and this one leaves it alone.
fn lost(run: &ClaimedRun) {
    tracing::warn!(schedule = %run.name, date = %run.date, "scheduled run taken over by another scheduler; leaving it");
}

fn fmt(secs: f64) -> String {
    time(secs).format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Fails a claimed run with `why`.
async fn fail(
    store: &Store,
    run: &ClaimedRun,
    now: DateTime<Utc>,
    why: String,
    out: &mut Tick,
) -> Result<(), StoreError> {
    tracing::error!(schedule = %run.name, date = %run.date, reason = %why, "scheduled run failed");
    out.failed.push((run.name.clone(), run.date.clone(), why.clone()));
    store.settle_run(run, "failed", Some(&why), None, secs(now)).await?;
    Ok(())
}

/// Where the run's input should be and is not yet, if so. Only files and
/// S3 objects are dated inputs; a Postgres source is always there (a wrong
/// table fails in planning). Any other trouble reading (a refused
/// connection) is waited out the same way, and named.
pub async fn input_absent(spec: &JobSpec) -> Option<String> {
    if let Some(marker) = &spec.ready_marker {
        let Some(url) = marker.strip_prefix("s3://").map(|_| marker) else {
            return (!std::path::Path::new(marker).is_file()).then(|| marker.clone());
        };
        let (endpoint, region) = match &spec.source {
            SourceSpec::S3 { endpoint, region, .. } => (endpoint.as_deref(), region.as_deref()),
            _ => (None, None),
        };
        return s3_absent(url, endpoint, region).await;
    }
    match &spec.source {
        SourceSpec::File { path, .. } => match plan::expand_glob(path) {
            Ok(files) if files.iter().all(|f| f.is_file()) => None,
            _ => Some(path.clone()),
        },
        SourceSpec::S3 { url, endpoint, region, .. } => s3_absent(url, endpoint.as_deref(), region.as_deref()).await,
        SourceSpec::Postgres { .. } => None,
    }
}

async fn s3_absent(url: &str, endpoint: Option<&str>, region: Option<&str>) -> Option<String> {
    let parsed = match S3Url::parse(url) {
        Ok(p) => p,
        Err(e) => return Some(e.to_string()),
    };
    match S3::connect(endpoint, region).await.list(&parsed).await {
        Ok(_) => None,
        Err(S3Error::Empty { .. }) => Some(url.to_string()),
        Err(e) => Some(format!("{url} ({e})")),
    }
}

/// `vinetl backfill`: one run per fire time whose logical date is in
/// `from..=to`, each due now. Dates that ran are left alone unless
/// `rerun`; missed ones are filled. Returns the runs queued.
pub async fn backfill(
    store: &Store,
    spec: &JobSpec,
    from: NaiveDate,
    to: NaiveDate,
    rerun: bool,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let calendar = spec.calendar().expect("a scheduled spec");
    let how = if rerun { "rerun" } else { "backfill" };
    let runs: Vec<NewRun> = calendar
        .fires_on_dates(from, to)
        .into_iter()
        .filter(|&at| at <= now)
        .map(|at| NewRun { at: secs(at), date: calendar.logical_date(at).to_string(), state: "due", how, reason: None })
        .collect();
    register(store, spec, now).await?;
    store.add_runs(&spec.name, &runs, secs(now), rerun).await
}

/// A schedule as `status` and the jobs page show it.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleStatus {
    pub name: String,
    pub schedule: String,
    pub timezone: String,
    pub catchup: Catchup,
    /// The next fire time (RFC 3339) and its logical date.
    pub next_run: Option<String>,
    pub next_date: Option<String>,
    /// The newest run that has a job.
    pub last_run: Option<ScheduledRun>,
    /// Fire times that passed over [`MISSED_AFTER_SECS`] ago with no
    /// scheduler to decide them: no scheduler is running.
    pub overdue: u64,
    /// Recent runs that did not run: missed by the catch-up policy, or failed.
    pub missed: Vec<ScheduledRun>,
    /// Runs waiting for their input or due to start.
    pub pending: Vec<ScheduledRun>,
    /// The schedule's spec could not be read back (it is skipped).
    pub problem: Option<String>,
}

/// Every registered schedule's next run, last run and missed nights.
pub async fn status(store: &Store, now: DateTime<Utc>) -> Result<Vec<ScheduleStatus>, StoreError> {
    let mut out = Vec::new();
    for row in store.schedules().await? {
        let runs = store.scheduled_runs(&row.name, 60).await?;
        let last_run = runs.iter().find(|r| r.job_id.is_some()).cloned();
        let pick = |states: &[&str]| runs.iter().filter(|r| states.contains(&r.state.as_str())).cloned().collect();
        let (missed, pending) = (pick(&["missed", "failed"]), pick(&["due", "waiting"]));
        let cron = row.spec.get("schedule").and_then(|s| s.as_str()).unwrap_or_default().to_string();
        let mut s = ScheduleStatus {
            name: row.name.clone(),
            schedule: cron,
            timezone: "UTC".into(),
            catchup: Catchup::default(),
            next_run: None,
            next_date: None,
            last_run,
            overdue: 0,
            missed,
            pending,
            problem: None,
        };
        match registered(&row.name, &row.spec, row.decided_through) {
            Ok(r) => {
                s.timezone = r.calendar.zone().to_string();
                s.catchup = r.spec.catchup.unwrap_or_default();
                if let Some(next) = r.calendar.next_after(now) {
                    s.next_run = Some(next.to_rfc3339());
                    s.next_date = Some(r.calendar.logical_date(next).to_string());
                }
                let late = now - chrono::Duration::seconds(MISSED_AFTER_SECS);
                if time(r.decided_through) < late {
                    let (fires, left_out) = r.calendar.fires_between(time(r.decided_through), late);
                    s.overdue = fires.len() as u64 + left_out;
                }
            }
            Err(e) => s.problem = Some(e),
        }
        out.push(s);
    }
    Ok(out)
}

/// Decides and starts runs every [`TICK`] until `stop` resolves: two
/// loops in this task, so a long planning never keeps fire times from
/// being recorded on time (a night is missed only when no scheduler runs).
/// A failed pass (the database away) is logged and tried again; leases
/// keep half-started runs.
pub async fn run(store: Store, schema: String, stop: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;
    let stop = stop.shared();
    let decide_loop = async {
        loop {
            let mut out = Tick::default();
            match decide_all(&store, Utc::now(), None, &mut out).await {
                Ok(_) if out.recorded > 0 => tracing::info!(recorded = out.recorded, "scheduled runs recorded"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "recording scheduled runs failed; trying again"),
            }
            tokio::select! {
                () = stop.clone() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    };
    let start_loop = async {
        loop {
            let mut out = Tick::default();
            match start_due(&store, &schema, Utc::now(), None, &mut out).await {
                Ok(()) if !out.started.is_empty() || !out.failed.is_empty() => {
                    tracing::info!(started = out.started.len(), failed = out.failed.len(), "scheduled runs started");
                }
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "starting scheduled runs failed; trying again"),
            }
            tokio::select! {
                () = stop.clone() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    };
    tokio::join!(decide_loop, start_loop);
}
