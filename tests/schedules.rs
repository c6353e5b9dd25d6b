//! Schedules (`vinetl scheduler`, `backfill`), on both stores, with an
//! injected clock: the scheduler's functions take the time they run at, so
//! a three-day outage takes no three days. Runs are real: each starts a
//! job that is planned from its dated input file and queued.

mod common;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use common::Backend;
use vinetl::cli::jobs::State;
use vinetl::job::scheduler;
use vinetl::spec::JobSpec;
use vinetl::store::Store;

type Env = common::StoreEnv;

impl Env {
    fn new(backend: Backend) -> Env {
        Env::create(backend, "sched")
    }

    /// A store of its own: another pool, as another process has.
    async fn store(&self) -> Store {
        State::new(Some(&self.url), &self.schema).unwrap().open(4).await.unwrap()
    }

    /// A nightly spec (02:00 in `tz`) over `drop/{date}/vins.txt`.
    fn spec(&self, extra: &str) -> JobSpec {
        let text = format!(
            "name = \"nightly\"\nschedule = \"0 2 * * *\"\n{extra}\n[source]\nkind = \"file\"\npath = \"drop/{{date}}/vins.txt\"\n[provider]\nbase_url = \"http://127.0.0.1:9\"\nrequests_per_second = 10\n[[outputs]]\nkind = \"parquet\"\npath = \"out/dt={{date}}\"\n"
        );
        let path = self.dir.path().join("nightly.toml");
        std::fs::write(&path, text).unwrap();
        JobSpec::load(&path).unwrap()
    }

    /// Drops the day's input file.
    fn drop_input(&self, date: &str) {
        let dir = self.dir.path().join("drop").join(date);
        std::fs::create_dir_all(&dir).unwrap();
        let vins: Vec<&str> = PATTERN.lines().take(30).collect();
        std::fs::write(dir.join("vins.txt"), vins.join("\n")).unwrap();
    }

    /// (logical date, state, job id) of every run, oldest first.
    async fn runs(&self, store: &Store) -> Vec<(String, String, Option<i64>)> {
        let mut runs: Vec<_> = store
            .scheduled_runs("nightly", 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.logical_date, r.state, r.job_id))
            .collect();
        runs.reverse();
        runs
    }

    /// Jobs per logical date, from the jobs table itself.
    async fn jobs_per_date(&self, store: &Store) -> Vec<(String, i64)> {
        let sql = "SELECT logical_date, count(*) FROM jobs GROUP BY logical_date ORDER BY logical_date";
        match (store.pg_pool(), store.sqlite_pools()) {
            (Some(p), _) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
            (None, Some((p, _))) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
            _ => unreachable!(),
        }
    }

    async fn cleanup(self) {
        if self.backend == Backend::Pg {
            common::cleanup(&self.schema).await;
        }
    }
}

const PATTERN: &str = include_str!("fixtures/pattern-vins.txt");

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

/// Two schedulers (two stores, as two processes) tick at once, every
/// minute around five nights' fire times, and at the same instants: each
/// logical date gets one run and one job.
async fn two_schedulers_never_make_two_runs_for_one_date(backend: Backend) {
    let env = Env::new(backend);
    let (a, b) = (env.store().await, env.store().await);
    let spec = env.spec("");
    scheduler::register(&a, &spec, at("2026-12-01T00:00:00Z")).await.unwrap();
    for d in 1..=5 {
        env.drop_input(&format!("2026-12-0{d}"));
        let fire = at(&format!("2026-12-0{d}T02:00:00Z"));
        for minute in [-1, 0, 0, 1, 2] {
            let now = fire + Duration::minutes(minute);
            let (ta, tb) =
                tokio::join!(scheduler::tick(&a, &env.schema, now, None), scheduler::tick(&b, &env.schema, now, None));
            let (ta, tb) = (ta.unwrap(), tb.unwrap());
            assert!(ta.failed.is_empty() && tb.failed.is_empty(), "{ta:?} {tb:?}");
        }
    }
    let runs = env.runs(&a).await;
    let dates: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(dates, ["2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04", "2026-12-05"]);
    assert!(runs.iter().all(|r| r.1 == "submitted" && r.2.is_some()), "{runs:?}");
    let per_date = env.jobs_per_date(&a).await;
    assert_eq!(per_date.len(), 5, "{per_date:?}");
    assert!(per_date.iter().all(|(_, n)| *n == 1), "one job per logical date: {per_date:?}");
    // Each job read its own date's file and holds its rows.
    let job = runs[2].2.unwrap();
    let counts = a.counts(job).await.unwrap().unwrap();
    assert_eq!(counts.rows, 30);
    assert!(
        a.job_spec(job).await.unwrap().unwrap().outputs.iter().any(|o| format!("{o:?}").contains("dt=2026-12-03")),
        "the output path is filled with the logical date"
    );
    env.cleanup().await;
}

/// Three nights pass with no scheduler running; the first tick after
/// makes three runs with `catchup = "all"`, one (the newest) with
/// `latest`, none with `none`; the others are recorded as missed, and
/// `status` shows them (and, before the tick, that runs are overdue).
async fn catchup_after_a_three_day_outage(backend: Backend) {
    for (policy, started, missed) in [("all", 3, 0), ("latest", 1, 2), ("none", 0, 3)] {
        let env = Env::new(backend);
        let store = env.store().await;
        let spec = env.spec(&format!("catchup = \"{policy}\""));
        for d in ["2026-12-01", "2026-12-02", "2026-12-03"] {
            env.drop_input(d);
        }
        // Registered on 30 November at 03:00; down until 3 December at 09:00.
        scheduler::register(&store, &spec, at("2026-11-30T03:00:00Z")).await.unwrap();
        let back = at("2026-12-03T09:00:00Z");
        let before = scheduler::status(&store, back).await.unwrap();
        assert_eq!(before[0].overdue, 3, "{policy}: status tells that no scheduler ran: {before:?}");
        let t = scheduler::tick(&store, &env.schema, back, None).await.unwrap();
        assert_eq!(t.started.len(), started, "{policy}: {t:?}");
        let runs = env.runs(&store).await;
        assert_eq!(runs.iter().filter(|r| r.1 == "submitted").count(), started, "{policy}: {runs:?}");
        assert_eq!(runs.iter().filter(|r| r.1 == "missed").count(), missed, "{policy}: {runs:?}");
        if policy == "latest" {
            assert_eq!(t.started[0].1, "2026-12-03", "latest runs the newest night");
        }
        let after = scheduler::status(&store, back).await.unwrap();
        assert_eq!(after[0].overdue, 0);
        assert_eq!(after[0].missed.len(), missed, "{policy}: status lists the missed nights");
        assert!(after[0].missed.iter().all(|r| r.reason.as_deref().unwrap().contains("no scheduler ran")));
        assert_eq!(after[0].next_date.as_deref(), Some("2026-12-04"));
        if policy == "latest" {
            // The jobs page shows the schedule, its last run and the missed nights.
            let ui = vinetl::ui::spawn(store.clone(), "127.0.0.1:0").await.unwrap();
            let page = reqwest::get(ui.url()).await.unwrap().text().await.unwrap();
            let row = &page[page.find("data-schedule=\"nightly\"").expect("a schedules row")..];
            assert!(row.contains("data-missed=\"2\""), "{row}");
            for shown in ["2026-12-01 missed", "2026-12-02 missed", "no scheduler ran", "0 2 * * *", "job 1"] {
                assert!(row.contains(shown), "{shown:?} in {row}");
            }
            let json: serde_json::Value =
                reqwest::get(format!("{}/api/schedules", ui.url())).await.unwrap().json().await.unwrap();
            assert_eq!(json[0]["last_run"]["logical_date"], "2026-12-03");
            assert!(json[0]["next_run"].is_string());
            ui.stop().await.unwrap();
            // So does `vinetl status`, after the job list.
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
                .arg("status")
                .env("DATABASE_URL", &env.url)
                .env("VINETL_SCHEMA", &env.schema)
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            for shown in ["schedule nightly", "last 2026-12-03 job", "2026-12-01 missed", "2026-12-02 missed"] {
                assert!(text.contains(shown), "{shown:?} in {text}");
            }
        }
        // A second tick (another scheduler after the first) adds nothing.
        let again = scheduler::tick(&store, &env.schema, back + Duration::seconds(5), None).await.unwrap();
        assert_eq!((again.recorded, again.started.len()), (0, 0), "{policy}");
        env.cleanup().await;
    }
}

/// Backfill over 1–5 December where 1, 2, 4 and 5 ran fills only the 3rd;
/// `--rerun` runs a date again with a new job.
async fn backfill_over_a_range_with_a_gap_fills_only_the_gap(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = env.spec("");
    for d in 1..=5 {
        env.drop_input(&format!("2026-12-0{d}"));
    }
    let now = at("2026-12-06T12:00:00Z");
    assert_eq!(scheduler::backfill(&store, &spec, day("2026-12-01"), day("2026-12-02"), false, now).await.unwrap(), 2);
    assert_eq!(scheduler::backfill(&store, &spec, day("2026-12-04"), day("2026-12-05"), false, now).await.unwrap(), 2);
    let t = scheduler::tick(&store, &env.schema, now, Some("nightly")).await.unwrap();
    assert_eq!(t.started.len(), 4, "{t:?}");
    let before = env.runs(&store).await;
    assert_eq!(before.len(), 4);
    assert!(before.iter().all(|r| r.1 == "submitted"), "{before:?}");

    let queued = scheduler::backfill(&store, &spec, day("2026-12-01"), day("2026-12-05"), false, now).await.unwrap();
    assert_eq!(queued, 1, "only the gap");
    let t = scheduler::tick(&store, &env.schema, now, Some("nightly")).await.unwrap();
    assert_eq!(t.started.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(), ["2026-12-03"]);
    let after = env.runs(&store).await;
    assert_eq!(after.len(), 5);
    for old in &before {
        assert!(after.contains(old), "{old:?} was left alone");
    }
    let per_date = env.jobs_per_date(&store).await;
    assert_eq!(per_date.len(), 5, "{per_date:?}");
    assert!(per_date.iter().all(|(_, n)| *n == 1), "{per_date:?}");

    // --rerun: once the date's job has ended, a new job for it.
    let old_job = after[1].2.unwrap();
    let running = scheduler::backfill(&store, &spec, day("2026-12-02"), day("2026-12-02"), true, now).await.unwrap();
    assert_eq!(running, 0, "not while its job is still going");
    store.cancel_job(old_job).await.unwrap();
    let rerun = scheduler::backfill(&store, &spec, day("2026-12-02"), day("2026-12-02"), true, now).await.unwrap();
    assert_eq!(rerun, 1);
    let t = scheduler::tick(&store, &env.schema, now, Some("nightly")).await.unwrap();
    assert_eq!(t.started.len(), 1);
    assert_ne!(t.started[0].2, old_job);
    env.cleanup().await;
}

/// A run whose dated input is not there waits (no job, no failure), starts
/// when the file appears, and fails naming the path when it never does.
async fn a_missing_input_waits_then_fails_naming_the_path(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = env.spec("wait_for_input = \"3h\"");
    scheduler::register(&store, &spec, at("2026-12-01T00:00:00Z")).await.unwrap();
    let fire = at("2026-12-01T02:00:00Z");
    let t = scheduler::tick(&store, &env.schema, fire, None).await.unwrap();
    assert_eq!((t.started.len(), t.waiting), (0, 1), "{t:?}");
    let status = scheduler::status(&store, fire).await.unwrap();
    assert!(status[0].pending[0].reason.as_deref().unwrap().contains("drop/2026-12-01/vins.txt"), "{status:?}");
    // Looked at again a minute later, not before.
    let t = scheduler::tick(&store, &env.schema, fire + Duration::seconds(30), None).await.unwrap();
    assert_eq!(t.waiting, 0, "not looked at again before its next check");
    env.drop_input("2026-12-01");
    let t = scheduler::tick(&store, &env.schema, fire + Duration::minutes(40), None).await.unwrap();
    assert_eq!(t.started.len(), 1, "{t:?}");

    // The next night's file never comes.
    let fire = at("2026-12-02T02:00:00Z");
    scheduler::tick(&store, &env.schema, fire, None).await.unwrap();
    let t = scheduler::tick(&store, &env.schema, fire + Duration::hours(3) + Duration::minutes(1), None).await.unwrap();
    assert_eq!(t.failed.len(), 1, "{t:?}");
    let why = &t.failed[0].2;
    assert!(why.contains("drop/2026-12-02/vins.txt") && why.contains("never came"), "{why}");
    let runs = env.runs(&store).await;
    assert_eq!(runs[1].1, "failed");
    let job = runs[1].2.expect("a failed job tells status");
    let counts = store.counts(job).await.unwrap().unwrap();
    assert_eq!(counts.state, "failed");
    assert!(counts.state_reason.as_deref().unwrap_or_default().contains("drop/2026-12-02/vins.txt"));
    env.cleanup().await;
}

/// A scheduler that claimed a run and died: after its lease, another
/// starts the run, once; the dead one's claim can then neither link a job
/// nor settle the run.
async fn a_dead_schedulers_claim_is_taken_over_once(backend: Backend) {
    let env = Env::new(backend);
    let (dead, alive) = (env.store().await, env.store().await);
    let spec = env.spec("");
    env.drop_input("2026-12-01");
    scheduler::register(&dead, &spec, at("2026-12-01T00:00:00Z")).await.unwrap();
    let fire = at("2026-12-01T02:00:00Z");
    // The dead scheduler's pass: the fire time recorded, the run claimed, then nothing.
    let t0 = fire.timestamp() as f64;
    let due = vinetl::store::NewRun { at: t0, date: "2026-12-01".into(), state: "due", how: "schedule", reason: None };
    assert_eq!(dead.decide_fires("nightly", t0, Box::new(move |_| vec![due])).await.unwrap(), 1);
    let claim = dead.claim_run(t0, 300.0, None).await.unwrap().expect("claimed");
    // Within the lease nobody else takes it.
    let t = scheduler::tick(&alive, &env.schema, fire + Duration::seconds(100), None).await.unwrap();
    assert!(t.started.is_empty(), "{t:?}");
    // After it, another scheduler claims it, and the dead one, back, can
    // neither link a job nor settle the run.
    let live = alive.claim_run(t0 + 301.0, 300.0, None).await.unwrap().expect("taken over after the lease");
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(dead.start_run_job(&claim, &json, "x").await.unwrap(), None, "the lost claim links no job");
    assert!(!dead.settle_run(&claim, "failed", Some("late"), None, t0).await.unwrap());
    let job = alive.start_run_job(&live, &json, "x").await.unwrap();
    assert!(job.is_some(), "the live claim links its job");
    assert!(alive.settle_run(&live, "submitted", None, None, t0 + 302.0).await.unwrap());
    let runs = env.runs(&alive).await;
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].1.as_str(), runs[0].2), ("submitted", job));
    assert_eq!(env.jobs_per_date(&alive).await, vec![("2026-12-01".to_string(), 1)]);
    env.cleanup().await;
}

/// With `ready_marker`, a run waits for the exporter's marker, not for the
/// first file of the drop.
async fn a_ready_marker_holds_the_run_until_the_drop_is_complete(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = env.spec("ready_marker = \"drop/{date}/_SUCCESS\"");
    env.drop_input("2026-12-01");
    scheduler::register(&store, &spec, at("2026-12-01T00:00:00Z")).await.unwrap();
    let fire = at("2026-12-01T02:00:00Z");
    let t = scheduler::tick(&store, &env.schema, fire, None).await.unwrap();
    assert_eq!((t.started.len(), t.waiting), (0, 1), "the input is there, its marker is not: {t:?}");
    let status = scheduler::status(&store, fire).await.unwrap();
    assert!(status[0].pending[0].reason.as_deref().unwrap().contains("drop/2026-12-01/_SUCCESS"), "{status:?}");
    std::fs::write(env.dir.path().join("drop/2026-12-01/_SUCCESS"), "").unwrap();
    let t = scheduler::tick(&store, &env.schema, fire + Duration::minutes(2), None).await.unwrap();
    assert_eq!(t.started.len(), 1, "{t:?}");
    env.cleanup().await;
}

/// A running scheduler starts a spec submitted again as it stands now: its
/// runs after the resubmission plan the new spec, not the one the
/// scheduler read when it started (here, the output path changes).
async fn a_running_scheduler_starts_a_resubmitted_spec_as_it_now_is(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let today = Utc::now().date_naive();
    for d in [today, today + Duration::days(1)] {
        env.drop_input(&d.to_string());
    }
    // Every two seconds (cron with seconds), writing to `out_dir`.
    let spec = |out_dir: &str| {
        let text = format!(
            "name = \"nightly\"\nschedule = \"*/2 * * * * *\"\ncatchup = \"latest\"\n[source]\nkind = \"file\"\npath = \"drop/{{date}}/vins.txt\"\n[provider]\nbase_url = \"http://127.0.0.1:9\"\nrequests_per_second = 10\n[[outputs]]\nkind = \"parquet\"\npath = \"{out_dir}/dt={{date}}\"\n"
        );
        let path = env.dir.path().join("nightly.toml");
        std::fs::write(&path, text).unwrap();
        JobSpec::load(&path).unwrap()
    };
    scheduler::register(&store, &spec("first"), Utc::now()).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Jobs whose stored spec writes to `out_dir`.
    let jobs_to = |out_dir: &'static str| {
        let store = store.clone();
        async move {
            let sql = format!("SELECT count(*) FROM jobs WHERE CAST(spec AS TEXT) LIKE '%/{out_dir}/dt=%'");
            let sql = sqlx::AssertSqlSafe(sql);
            match (store.pg_pool(), store.sqlite_pools()) {
                (Some(p), _) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap(),
                (None, Some((p, _))) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap(),
                _ => unreachable!(),
            }
        }
    };
    let until = |out_dir: &'static str| async move {
        for _ in 0..150 {
            if jobs_to(out_dir).await > 0 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        false
    };
    // The scheduler's loop (as `vinetl scheduler` runs it) beside the checks.
    let checks = async {
        assert!(until("first").await, "the scheduler started a run of the spec as registered");
        scheduler::register(&store, &spec("second"), Utc::now()).await.unwrap();
        assert!(until("second").await, "a run after the resubmission plans the new spec");
        let _ = stop_tx.send(());
    };
    let stop = async {
        let _ = stop_rx.await;
    };
    tokio::join!(scheduler::run(store.clone(), env.schema.clone(), stop), checks);
    env.cleanup().await;
}

common::both_stores!(
    a_running_scheduler_starts_a_resubmitted_spec_as_it_now_is,
    two_schedulers_never_make_two_runs_for_one_date,
    catchup_after_a_three_day_outage,
    backfill_over_a_range_with_a_gap_fills_only_the_gap,
    a_missing_input_waits_then_fails_naming_the_path,
    a_dead_schedulers_claim_is_taken_over_once,
    a_ready_marker_holds_the_run_until_the_drop_is_complete,
);

/// Two real `vinetl scheduler` processes on one Postgres state, a schedule
/// that fires every second, for a few seconds: every fire time has one
/// run and every run one job. Then `status` and `schedules` show it.
#[tokio::test(flavor = "multi_thread")]
async fn two_scheduler_processes_start_each_fire_time_once() {
    let env = Env::new(Backend::Pg);
    env.drop_input("any");
    let path = env.dir.path().join("every-second.toml");
    std::fs::write(
        &path,
        "name = \"nightly\"\nschedule = \"* * * * * *\"\n[source]\nkind = \"file\"\npath = \"drop/any/vins.txt\"\n[provider]\nbase_url = \"http://127.0.0.1:9\"\nrequests_per_second = 10\n",
    )
    .unwrap();
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
            .args(["scheduler", path.to_str().unwrap()])
            .env("DATABASE_URL", &env.url)
            .env("VINETL_SCHEMA", &env.schema)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let (mut one, mut two) = (spawn(), spawn());
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    // Stopped as a service manager stops them: each finishes its pass, so
    // no claim is left to its lease. Fire times recorded but not yet
    // started (the two loops take turns every 5 s) are then started by one
    // pass of a third scheduler.
    for child in [&mut one, &mut two] {
        let pid = child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        child.wait().await.unwrap();
    }
    let once = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["scheduler", "--once"])
        .env("DATABASE_URL", &env.url)
        .env("VINETL_SCHEMA", &env.schema)
        .output()
        .await
        .unwrap();
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    let store = env.store().await;
    let runs = env.runs(&store).await;
    assert!(runs.len() >= 3, "{runs:?}");
    assert!(runs.iter().all(|r| r.1 == "submitted"), "{runs:?}");
    let jobs: Vec<i64> = runs.iter().filter_map(|r| r.2).collect();
    let distinct: std::collections::HashSet<i64> = jobs.iter().copied().collect();
    assert_eq!(jobs.len(), distinct.len(), "no job serves two runs");
    let (total,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs").fetch_one(store.pg_pool().unwrap()).await.unwrap();
    assert_eq!(total as usize, jobs.len(), "one job per run: {runs:?}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["status"])
        .env("DATABASE_URL", &env.url)
        .env("VINETL_SCHEMA", &env.schema)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("schedule nightly") && text.contains("next 20"), "{text}");
    env.cleanup().await;
}

/// The whole path on real processes: `vinetl serve`, a scheduled spec
/// registered by `vinetl submit`, and one `vinetl worker --with-scheduler`
/// that starts the run and works it. The run's job ends done, and its
/// Parquet lands in the partition of its logical date.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_the_scheduler_runs_a_scheduled_spec_to_its_output() {
    let server = common::ServeProcess::start(&[]);
    let env = Env::new(Backend::Pg);
    let today = Utc::now().date_naive();
    // Around midnight UTC the next fire may fall on tomorrow.
    for d in [today, today.succ_opt().unwrap()] {
        env.drop_input(&d.to_string());
    }
    let out_dir = env.dir.path().join("out");
    let path = env.dir.path().join("scheduled.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"nightly\"\nschedule = \"*/3 * * * * *\"\n[source]\nkind = \"file\"\npath = \"drop/{{date}}/vins.txt\"\n\
             [provider]\nbase_url = \"{}\"\nrequests_per_second = 50\n[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n",
            server.url,
            out_dir.display()
        ),
    )
    .unwrap();
    let spec = path.to_str().unwrap();
    let out = common::vinetl_async(&env.schema, "YOUR_API_KEY", &["submit", spec]).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("schedule nightly registered: next run"), "{said}");
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--with-scheduler"])
        .env("DATABASE_URL", &env.url)
        .env("VINETL_SCHEMA", &env.schema)
        .env("CARVIN_API_KEY", "YOUR_API_KEY")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // New runs keep coming every 3 s; the first to end done is the one looked at.
    let store = env.store().await;
    let mut done = None;
    for _ in 0..600 {
        let runs = store.scheduled_runs("nightly", 100).await.unwrap();
        done = runs.into_iter().find(|r| r.job_state.as_deref() == Some("done"));
        if done.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let run = done.expect("a scheduled run ends done");
    let partition = out_dir.join(format!("dt={}", run.logical_date));
    // Later runs of the same date commit into the same partition, each
    // retiring the one before: seen between two of their steps it is empty.
    // Once one of them has committed, it holds its files and `_SUCCESS`.
    let committed = || {
        partition.join("_SUCCESS").is_file()
            && common::files_under(&partition).iter().any(|f| f.extension().is_some_and(|e| e == "parquet"))
    };
    let mut seen = committed();
    for _ in 0..600 {
        if seen {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        seen = committed();
    }
    assert!(seen, "the run wrote {}", partition.display());
    assert_eq!(common::status(&env.schema, run.job_id.unwrap()).await["rows"], 30);
    let out = common::vinetl_async(&env.schema, "unused", &["schedules", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed[0]["next_run"].is_string() && listed[0]["last_run"]["job_id"].is_i64(), "{listed}");
    // The worker (still starting runs every 3 s) stops before the schema is dropped.
    common::stop_worker(&mut worker).await;
    server.stop();
    env.cleanup().await;
}

/// `vinetl run SPEC --date D` of a templated spec (no schedule needed)
/// reads D's input and writes D's partition, whatever today is.
#[tokio::test(flavor = "multi_thread")]
async fn run_with_a_date_reads_and_writes_that_dates_paths() {
    let env = Env::new(Backend::Lite);
    env.drop_input("2026-12-02");
    let out_dir = env.dir.path().join("out");
    let path = env.dir.path().join("dated.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"dated\"\n[source]\nkind = \"file\"\npath = \"drop/{{date}}/vins.txt\"\n[provider]\nembedded = true\n\
             requests_per_second = 50\n[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n",
            out_dir.display()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["run", path.to_str().unwrap(), "--date", "2026-12-02"])
        .env("DATABASE_URL", &env.url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = common::files_under(&out_dir);
    assert!(
        !written.is_empty() && written.iter().all(|f| f.display().to_string().contains("dt=2026-12-02")),
        "{written:?}"
    );
}
