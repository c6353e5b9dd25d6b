//! The state-store conformance suite: every test here runs against both
//! implementations of the seam, Postgres and SQLite, and expects the same
//! results: enqueue idempotency, crash recovery, the limiter's guarantees,
//! counts, reprocess.

mod common;

use std::time::Duration;

use common::{Backend, KEYS_TOML};
use vinetl::call::limiter::{Denied, MAX_THROTTLE_BACKOFF, MIN_SCALE, SharedLimiter};
use vinetl::cli::jobs::State;
use vinetl::job::queue::{BatchTask, queue_name};
use vinetl::serve::faults::Faults;
use vinetl::spec::JobSpec;
use vinetl::store::{Answer, Answered, CallTo, Reschedule, Store};

/// Where the tests' claimed batches' requests would go, as a worker claims
/// them (marked in a call, recorded in the audit trail).
const CALL: Option<&CallTo> =
    Some(&CallTo { provider: "http://127.0.0.1:9", decode: "/api/v1/batch-decode", recalls: "/api/v1/recalls" });

type Env = common::StoreEnv;

impl Env {
    fn new(backend: Backend) -> Env {
        Env::create(backend, "conf")
    }

    fn state(&self) -> State {
        State::new(Some(&self.url), &self.schema).unwrap()
    }

    async fn store(&self) -> Store {
        self.state().open(8).await.unwrap()
    }

    /// A spec over `vins` in the test's directory.
    fn spec(&self, vins: &[String], base_url: &str, extra: &str) -> std::path::PathBuf {
        std::fs::write(self.dir.path().join("vins.txt"), vins.join("\n")).unwrap();
        let text = format!(
            "name = \"conformance\"\n[source]\nkind = \"file\"\npath = \"vins.txt\"\n[provider]\nbase_url = \"{base_url}\"\napi_key_env = \"CARVIN_API_KEY\"\nrequests_per_second = 200\n{extra}\n"
        );
        let path = self.dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Tasks on the queue for this install.
    async fn queued_tasks(&self, store: &Store) -> i64 {
        match (store.pg_pool(), store.sqlite_pools()) {
            (Some(pool), _) => sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
                .bind(vinetl::job::queue::queue_name(&self.schema))
                .fetch_one(pool)
                .await
                .unwrap(),
            (None, Some((_, queue))) => {
                sqlx::query_scalar("SELECT count(*) FROM Jobs WHERE job_type = 'vinetl.batches'")
                    .fetch_one(queue)
                    .await
                    .unwrap()
            }
            (None, None) => unreachable!(),
        }
    }

    /// Moves every running batch's last update `secs` into the past (a
    /// worker that died that long ago).
    async fn backdate_running(&self, store: &Store, secs: f64) {
        match (store.pg_pool(), store.sqlite_pools()) {
            (Some(pool), _) => {
                sqlx::query("UPDATE batches SET updated_at = now() - make_interval(secs => $1) WHERE state = 'running'")
                    .bind(secs)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
                    .unwrap()
            }
            (None, Some((pool, _))) => {
                sqlx::query("UPDATE batches SET updated_at = unixepoch('subsec') - ? WHERE state = 'running'")
                    .bind(secs)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
                    .unwrap()
            }
            (None, None) => unreachable!(),
        };
    }

    /// Runs `pg` or `lite` (the same statement in each dialect) on the
    /// state store; rows affected.
    async fn sql(&self, store: &Store, pg: &str, lite: &str) -> u64 {
        self.run_sql(store, pg, lite, false).await
    }

    /// The same on the queue's tables (SQLite keeps them in a file of their own).
    async fn queue_sql(&self, store: &Store, pg: &str, lite: &str) -> u64 {
        self.run_sql(store, pg, lite, true).await
    }

    async fn run_sql(&self, store: &Store, pg: &str, lite: &str, queue: bool) -> u64 {
        match (store.pg_pool(), store.sqlite_pools()) {
            (Some(pool), _) => {
                sqlx::query(sqlx::AssertSqlSafe(pg.to_string())).execute(pool).await.unwrap().rows_affected()
            }
            (None, Some((state, q))) => sqlx::query(sqlx::AssertSqlSafe(lite.to_string()))
                .execute(if queue { q } else { state })
                .await
                .unwrap()
                .rows_affected(),
            (None, None) => unreachable!(),
        }
    }

    /// The `vinetl` binary on this backend.
    async fn vinetl(&self, key: &str, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("VINETL_SCHEMA", &self.schema)
            .env("CARVIN_API_KEY", key)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap()
    }

    /// `vinetl failures JOB --json ARGS`.
    async fn failures(&self, job: i64, args: &[&str]) -> serde_json::Value {
        let job = job.to_string();
        let out = self.vinetl("unused", &[&["failures", job.as_str()], args].concat()).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    async fn status(&self, job: i64) -> serde_json::Value {
        let out = self.vinetl("unused", &["status", &job.to_string(), "--json"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    async fn cleanup(self) {
        if self.backend == Backend::Pg {
            common::cleanup(&self.schema).await;
        }
    }
}

/// The `(source, source_row)` of every row in the Parquet files under `dir`.
fn parquet_rows(dir: &std::path::Path) -> Vec<(String, i64)> {
    use arrow::array::{Array, Int64Array, StringArray};
    let mut rows = Vec::new();
    for batch in common::parquet_batches(dir) {
        let source = batch.column_by_name("source").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let row = batch.column_by_name("source_row").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
        rows.extend((0..batch.num_rows()).map(|i| (source.value(i).to_string(), row.value(i))));
    }
    rows
}

fn pattern_vins(n: usize) -> Vec<String> {
    std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap().lines().take(n).map(str::to_string).collect()
}

/// An answer for `vin` naming only its make.
fn decoded_as(vin: &str, make: &str) -> vinetl::store::DecodedVin {
    vinetl::store::DecodedVin {
        vin: vin.to_string(),
        make: Some(make.into()),
        model: None,
        model_year: None,
        error: None,
        raw: serde_json::value::to_raw_value(&serde_json::json!({})).unwrap(),
    }
}

/// Submitting twice, enqueueing twice and pushing a task twice leave one
/// queue task per batch, and one job.
async fn enqueue_is_idempotent(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = JobSpec::load(&env.spec(&pattern_vins(100), "http://127.0.0.1:9", "")).unwrap();
    let first = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!(first.batches, 5);
    assert_eq!(env.queued_tasks(&store).await, 5);
    // The same spec again: the unfinished job is resumed, nothing is added.
    let again = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!((again.job_id, again.resumed, again.batches), (first.job_id, true, 0));
    assert_eq!(
        vinetl::job::queue::enqueue(&store, &env.schema, vinetl::job::queue::Lane::Shared, first.job_id).await.unwrap(),
        0
    );
    // A task pushed twice (a crash between push and mark) is one task.
    let task = BatchTask { job_id: first.job_id, batch_no: 0, generation: 0 };
    vinetl::job::queue::push_tasks(&store, &env.schema, vinetl::job::queue::Lane::Shared, &[(task, None)])
        .await
        .unwrap();
    assert_eq!(env.queued_tasks(&store).await, 5);
    let counts = store.counts(first.job_id).await.unwrap().unwrap();
    assert_eq!((counts.rows, counts.batches, counts.pending), (100, 5, 100));
    env.cleanup().await;
}

/// An install made again under the same name (a Postgres schema dropped
/// and created again; a SQLite state file deleted beside its queue file)
/// numbers its jobs from 1 while the queue keeps the old install's tasks.
/// Its job's tasks are still pushed: they are not the old ones.
async fn a_recreated_install_queues_its_jobs_again(backend: Backend) {
    let env = Env::new(backend);
    let spec = JobSpec::load(&env.spec(&pattern_vins(40), "http://127.0.0.1:9", "")).unwrap();
    let store = env.store().await;
    let first = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!((first.job_id, first.batches, env.queued_tasks(&store).await), (1, 2, 2));
    // The old install's tasks ended (only this test's queue: others run beside it).
    let done = format!("UPDATE apalis.jobs SET status = 'Done' WHERE job_type = '{}'", queue_name(&env.schema));
    env.queue_sql(&store, &done, "UPDATE Jobs SET status = 'Done'").await;
    let old_install = store.install().to_string();
    // Closed, and waited for, before its files go: a SQLite connection
    // still open on a deleted file made the new store's first read fail
    // with a disk I/O error (once, in a CI run).
    if let Some((state, queue)) = store.sqlite_pools() {
        state.close().await;
        queue.close().await;
    }
    drop(store);
    match backend {
        Backend::Pg => {
            let pool = common::pool("public").await;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", env.schema)))
                .execute(&pool)
                .await
                .unwrap();
        }
        Backend::Lite => {
            for f in ["state.db", "state.db-wal", "state.db-shm"] {
                let _ = std::fs::remove_file(env.dir.path().join(f));
            }
        }
    }
    let store = env.store().await;
    assert_ne!(store.install(), old_install);
    let again = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!((again.job_id, again.resumed, again.batches), (1, false, 2));
    assert_eq!(env.queued_tasks(&store).await, 4, "the new job 1's two tasks beside the old job 1's");
    env.cleanup().await;
}

/// An answer stored without some of its batch's VINs (the client refuses
/// such answers; the store does not rely on it): the missing VINs' rows
/// fail, saying so, and no row is left pending with its batch done.
async fn a_stored_answer_missing_a_vin_fails_that_row(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = JobSpec::load(&env.spec(&pattern_vins(20), "http://127.0.0.1:9", "")).unwrap();
    let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    let claimed = store.claim(job, 0, 0, 60.0, CALL).await.unwrap().expect("the batch is claimed");
    let answered: Vec<vinetl::store::DecodedVin> = claimed.vins[1..].iter().map(|v| decoded_as(v, "MAKE")).collect();
    let answer = vinetl::store::Answer::Decoded { asked: claimed.vins.clone(), decoded: answered };
    store.complete_all(&[vinetl::store::Answered { job_id: job, batch_no: 0, answer }]).await.unwrap();
    let c = store.counts(job).await.unwrap().unwrap();
    assert_eq!((c.decoded, c.failed, c.pending), (19, 1, 0), "{c:?}");
    let f = store.failures(job, 10).await.unwrap().unwrap();
    let row = &f.failed_rows[0];
    assert_eq!(row.raw_vin, claimed.vins[0]);
    assert_eq!(row.error_code.as_deref(), Some("no_answer"));
    assert!(row.error_text.as_deref().unwrap_or_default().contains("without this VIN"), "{row:?}");
    env.cleanup().await;
}

/// Answers of two jobs stored in one group (one process's result writer):
/// each job gets its own rows and call counts, a VIN both jobs asked for is
/// cached once with the later answer, and a VIN one answer left out fails
/// that row only.
async fn a_group_of_answers_of_two_jobs_is_stored_as_each_alone(backend: Backend) {
    use vinetl::store::{Answer, Answered};
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(60);
    let a = JobSpec::load(&env.spec(&vins[..40], "http://127.0.0.1:9", "")).unwrap();
    let a = vinetl::job::plan::submit(&store, &env.schema, &a).await.unwrap().job_id;
    let b = JobSpec::load(&env.spec(&vins[20..], "http://127.0.0.1:9", "timeout_secs = 20")).unwrap();
    let b = vinetl::job::plan::submit(&store, &env.schema, &b).await.unwrap().job_id;
    assert_ne!(a, b);
    let mut answers = Vec::new();
    for (job, make) in [(a, "FIRST"), (b, "SECOND")] {
        for batch_no in 0..2 {
            let claimed = store.claim(job, batch_no, 0, 60.0, CALL).await.unwrap().expect("the batch is claimed");
            // Job a's second batch answers all but its first VIN.
            let skip = usize::from(job == a && batch_no == 1);
            let decoded = claimed.vins[skip..].iter().map(|v| decoded_as(v, make)).collect();
            let answer = Answer::Decoded { asked: claimed.vins, decoded };
            answers.push(Answered { job_id: job, batch_no, answer });
        }
    }
    store.complete_all(&answers).await.unwrap();
    let ca = store.counts(a).await.unwrap().unwrap();
    assert_eq!((ca.decoded, ca.failed, ca.pending, ca.batches_done, ca.calls_made), (39, 1, 0, 2, 2), "{ca:?}");
    assert_eq!(ca.calls.answered, 2);
    let cb = store.counts(b).await.unwrap().unwrap();
    assert_eq!((cb.decoded, cb.failed, cb.pending, cb.batches_done, cb.calls_made), (40, 0, 0, 2, 2), "{cb:?}");
    let failed = store.failures(a, 10).await.unwrap().unwrap().failed_rows;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error_code.as_deref(), Some("no_answer"));
    // Both jobs asked for vins[20..40]: the cache holds the later answer.
    let sql = "SELECT make FROM vin_cache WHERE vin = $1";
    let make: Option<String> = match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => sqlx::query_scalar(sql).bind(&vins[25]).fetch_one(pool).await.unwrap(),
        (None, Some((pool, _))) => sqlx::query_scalar(sql).bind(&vins[25]).fetch_one(pool).await.unwrap(),
        (None, None) => unreachable!(),
    };
    assert_eq!(make.as_deref(), Some("SECOND"));
    env.cleanup().await;
}

/// A worker that stored a job's last answer but lost the database before
/// its `advance` leaves the job running with nothing queued; the queue's
/// retry of its task finds the batch done. The sweep moves such a job on,
/// and leaves alone a job with a batch still queued or one that is paused.
async fn the_sweep_moves_on_a_job_nobody_advanced(backend: Backend) {
    use vinetl::store::{Answer, Answered};
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(60);
    let submit = |vins: &[String], extra: &str| {
        let spec = JobSpec::load(&env.spec(vins, "http://127.0.0.1:9", extra)).unwrap();
        let (store, schema) = (store.clone(), env.schema.clone());
        async move { vinetl::job::plan::submit(&store, &schema, &spec).await.unwrap().job_id }
    };
    let answer = |store: Store, job: i64, batch_no: i32| async move {
        let claimed = store.claim(job, batch_no, 0, 60.0, CALL).await.unwrap().expect("the batch is claimed");
        let decoded = claimed.vins.iter().map(|v| decoded_as(v, "MAKE")).collect();
        let answer = Answer::Decoded { asked: claimed.vins, decoded };
        store.complete_all(&[Answered { job_id: job, batch_no, answer }]).await.unwrap();
    };
    let stalled = submit(&vins[..20], "").await;
    let busy = submit(&vins[20..60], "timeout_secs = 20").await;
    answer(store.clone(), stalled, 0).await;
    answer(store.clone(), busy, 0).await;
    assert_eq!(store.stalled_jobs().await.unwrap(), vec![stalled], "only the job with no batch left");
    store.pause_job(stalled).await.unwrap();
    assert!(store.stalled_jobs().await.unwrap().is_empty(), "a paused job waits for its resume");
    env.sql(&store, "UPDATE jobs SET paused_at = NULL", "UPDATE jobs SET paused_at = NULL").await;
    let mut moves = store.moves();
    vinetl::job::worker::sweep(&store, &env.schema).await.unwrap();
    assert!(moves.has_changed().unwrap(), "the job's end woke the watcher");
    moves.mark_unchanged();
    assert_eq!(store.counts(stalled).await.unwrap().unwrap().state, "done");
    assert_eq!(store.counts(busy).await.unwrap().unwrap().state, "running");
    assert!(store.stalled_jobs().await.unwrap().is_empty());
    env.cleanup().await;
}

/// A batch is called by one worker at a time: a second claim is refused
/// while the first worker's lease runs, a stale generation never claims,
/// and a dead worker's batch is taken over (once) after the lease.
async fn a_dead_workers_batch_is_taken_over_once(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = JobSpec::load(&env.spec(&pattern_vins(40), "http://127.0.0.1:9", "timeout_secs = 1")).unwrap();
    let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    let claimed = store.claim(job, 0, 0, 60.0, CALL).await.unwrap().expect("a queued batch is claimed");
    assert_eq!(claimed.vins.len(), 20);
    assert!(store.claim(job, 0, 0, 60.0, CALL).await.unwrap().is_none(), "no second call while the lease runs");
    // Rescheduled: the old generation's task is stale.
    let generation =
        store.reschedule(job, 0, 0, 0.0, Reschedule::Failed(vinetl::store::CallEnd::ServerError), "503").await.unwrap();
    assert_eq!(generation, Some(1));
    assert!(store.claim(job, 0, 0, 60.0, CALL).await.unwrap().is_none(), "a stale generation never claims");
    let retry = store.claim(job, 0, 1, 60.0, CALL).await.unwrap().expect("the current generation claims");
    assert_eq!(retry.attempts, 1);
    // The worker dies mid-call: after its lease (2 × 1 s + 30 s) the sweep
    // finds the batch and queues it under a new generation, exactly once.
    env.backdate_running(&store, 120.0).await;
    let lost = store.lost_tasks().await.unwrap();
    assert_eq!(lost, vec![(job, 0, 2)]);
    assert!(store.lost_tasks().await.unwrap().is_empty(), "taken over once");
    assert!(store.claim(job, 0, 2, 60.0, CALL).await.unwrap().is_some());
    env.cleanup().await;
}

/// A stopping worker gives back the batches it took but did not call: the
/// batch gets a new generation, so the old task is stale and only the new
/// one claims it; a stale task, or a batch already claimed, has nothing to
/// give back; and a batch given back but never pushed again (a crash in
/// between) is found by the sweep.
async fn a_batch_given_back_is_claimed_once_under_a_new_generation(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let spec = JobSpec::load(&env.spec(&pattern_vins(40), "http://127.0.0.1:9", "")).unwrap();
    let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    assert_eq!(store.give_back(job, 0, 0).await.unwrap(), Some(1));
    assert_eq!(store.give_back(job, 0, 0).await.unwrap(), None, "a stale task gives nothing back");
    assert!(store.claim(job, 0, 0, 60.0, CALL).await.unwrap().is_none(), "the old task is stale");
    let claimed = store.claim(job, 0, 1, 60.0, CALL).await.unwrap().expect("the new generation claims");
    assert_eq!(claimed.attempts, 0, "giving back is not an attempt");
    assert_eq!(store.give_back(job, 0, 1).await.unwrap(), None, "a claimed batch is not given back");
    // Batch 1 given back, and the process dies before pushing its task.
    assert_eq!(store.give_back(job, 1, 0).await.unwrap(), Some(1));
    assert!(store.lost_tasks().await.unwrap().is_empty(), "the sweep leaves a fresh give-back to its worker");
    env.sql(
        &store,
        "UPDATE batches SET updated_at = now() - interval '1 minute' WHERE batch_no = 1",
        "UPDATE batches SET updated_at = unixepoch('subsec') - 60 WHERE batch_no = 1",
    )
    .await;
    assert_eq!(store.lost_tasks().await.unwrap(), vec![(job, 1, 1)]);
    env.cleanup().await;
}

/// A batch whose job was cancelled or paused while its task waited for
/// the limiter makes no call: the claim, which marks the call and records
/// its request, refuses it and changes nothing. The cancel ended the batch
/// cancelled with its rows failed (none left pending); the pause left it
/// queued for the resume, whose new generation turns the old task away. A
/// batch already in a call when the pause came is left to land.
async fn a_batch_whose_job_was_cancelled_or_paused_makes_no_call(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(80);
    let spec = JobSpec::load(&env.spec(&vins[..40], "http://127.0.0.1:9", "")).unwrap();
    let cancelled = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    // A watcher on any clone of the store is woken by the change of state,
    // and only by one that happened.
    let mut moves = store.clone().moves();
    assert!(store.cancel_job(cancelled).await.unwrap());
    assert!(moves.has_changed().unwrap(), "the cancel woke the watcher");
    moves.mark_unchanged();
    assert!(!store.cancel_job(cancelled).await.unwrap());
    assert!(!moves.has_changed().unwrap(), "a cancel that changed nothing wakes nobody");
    assert!(store.claim(cancelled, 0, 0, 60.0, CALL).await.unwrap().is_none(), "a cancelled job's batch takes no call");
    let s = env.status(cancelled).await;
    assert_eq!(
        (s["state"].as_str(), &s["pending"], &s["calls_made"]),
        (Some("cancelled"), &0.into(), &0.into()),
        "{s}"
    );
    assert_eq!(s["failed"], 40, "{s}");
    // Rows affected counts them, in either dialect.
    let count = "UPDATE batches SET state = state WHERE job_id = 1 AND state = 'cancelled'";
    assert_eq!(env.sql(&store, count, count).await, 2, "both batches end cancelled");
    let audited = |job: i64| format!("UPDATE call_audit SET batch_no = batch_no WHERE job_id = {job}");
    let n = audited(cancelled);
    assert_eq!(env.sql(&store, &n, &n).await, 0, "no request recorded");

    let spec = JobSpec::load(&env.spec(&vins[40..], "http://127.0.0.1:9", "")).unwrap();
    let paused = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    let in_call = store.claim(paused, 1, 0, 60.0, CALL).await.unwrap().expect("batch 1's call begins");
    assert!(store.pause_job(paused).await.unwrap());
    assert!(store.claim(paused, 0, 0, 60.0, CALL).await.unwrap().is_none(), "a paused job's batch takes no call");
    assert!(store.resume_job(paused).await.unwrap());
    assert!(store.claim(paused, 0, 0, 60.0, CALL).await.unwrap().is_none(), "resume gave it a newer generation");
    assert!(store.claim(paused, 0, 1, 60.0, CALL).await.unwrap().is_some());
    let n = audited(paused);
    assert_eq!(env.sql(&store, &n, &n).await, 2, "one request recorded per call made");
    // The batch in a call when the pause came lands.
    let answer = Answered {
        job_id: paused,
        batch_no: 1,
        answer: Answer::Decoded { asked: in_call.vins.clone(), decoded: vec![] },
    };
    store.complete_all(&[answer]).await.unwrap();
    let s = env.status(paused).await;
    assert_eq!(s["pending"], 20, "batch 1's rows settled, batch 0's in its call: {s}");
    env.cleanup().await;
}

/// A batch is put back on the queue only by the task that holds it, and
/// only while its job runs. A cancel leaves a batch in a call to land and
/// fails every other pending row: when that call fails instead, the batch
/// ends cancelled and its rows fail the same way (queued again, it would
/// wait forever in an ended job, its rows pending). A failed job's batch
/// stays dead. A stale task reschedules nothing. A call made is counted
/// whichever way.
async fn a_batch_is_requeued_only_by_its_task_while_its_job_runs(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(120);
    let server_error = Reschedule::Failed(vinetl::store::CallEnd::ServerError);
    let submit = |vins: &[String]| {
        let spec = JobSpec::load(&env.spec(vins, "http://127.0.0.1:9", "")).unwrap();
        let store = &store;
        let schema = env.schema.clone();
        async move { vinetl::job::plan::submit(store, &schema, &spec).await.unwrap().job_id }
    };

    let cancelled = submit(&vins[..40]).await;
    store.claim(cancelled, 0, 0, 60.0, CALL).await.unwrap().expect("batch 0's call begins");
    assert!(store.cancel_job(cancelled).await.unwrap());
    assert_eq!(store.reschedule(cancelled, 0, 0, 1.0, server_error, "503").await.unwrap(), None, "nothing to push");
    let s = env.status(cancelled).await;
    assert_eq!((&s["pending"], &s["failed"], &s["calls_made"]), (&0.into(), &40.into(), &1.into()), "{s}");
    let n = "UPDATE batches SET state = state WHERE job_id = 1 AND state = 'cancelled' AND NOT in_call";
    assert_eq!(env.sql(&store, n, n).await, 2, "both batches end cancelled, no call out");

    let failed = submit(&vins[40..80]).await;
    store.claim(failed, 0, 0, 60.0, None).await.unwrap().expect("claimed; the limiter then said not now");
    store.claim(failed, 1, 0, 60.0, CALL).await.unwrap().expect("batch 1's call begins");
    assert!(store.fail_job(failed, "the API refused the key").await.unwrap());
    assert_eq!(store.reschedule(failed, 0, 0, 1.0, Reschedule::NotCalled, "limiter: later").await.unwrap(), None);
    assert_eq!(store.reschedule(failed, 1, 0, 1.0, server_error, "503").await.unwrap(), None);
    let s = env.status(failed).await;
    assert_eq!((&s["pending"], &s["calls_made"]), (&0.into(), &1.into()), "{s}");
    let n = "UPDATE batches SET state = state WHERE job_id = 2 AND state = 'dead' AND NOT in_call";
    assert_eq!(env.sql(&store, n, n).await, 2, "both batches stay dead, the call's outcome stored");

    let running = submit(&vins[80..]).await;
    store.claim(running, 0, 0, 60.0, CALL).await.unwrap().expect("batch 0's call begins");
    assert_eq!(store.reschedule(running, 0, 0, 1.0, server_error, "503").await.unwrap(), Some(1));
    assert_eq!(store.reschedule(running, 0, 0, 1.0, server_error, "503").await.unwrap(), None, "a stale task");
    let retry = store.claim(running, 0, 1, 0.0, CALL).await.unwrap().expect("generation 1 claims, when its time comes");
    assert_eq!(retry.attempts, 1, "the stale task's outcome changed nothing");
    assert_eq!(env.status(running).await["calls_made"], 2, "the first call counted once, the second out");
    assert!(store.lost_tasks().await.unwrap().is_empty(), "nothing lost in the three jobs");
    env.cleanup().await;
}

/// A cancelled job's batch whose worker died mid-call is ended by the
/// sweep after the lease: cancelled, its rows failed, its call counted as
/// lost. Until then the job is not reprocessed (its rows would be cut into
/// a second batch and called twice). A call that a newer claim took over
/// is counted once when its stale task's failure lands late.
async fn a_call_that_never_lands_is_ended_and_counted_once(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(80);
    let submit = |vins: &[String]| {
        let spec = JobSpec::load(&env.spec(vins, "http://127.0.0.1:9", "")).unwrap();
        let store = &store;
        let schema = env.schema.clone();
        async move { vinetl::job::plan::submit(store, &schema, &spec).await.unwrap().job_id }
    };
    let redo = vinetl::store::Redo { failed_only: false, vins: None, refresh: false, replace_newer: false };

    let cancelled = submit(&vins[..40]).await;
    store.claim(cancelled, 0, 0, 60.0, CALL).await.unwrap().expect("batch 0's call begins");
    assert!(store.cancel_job(cancelled).await.unwrap());
    assert_eq!(store.reprocess(cancelled, &redo, 20, 24.0, 90.0).await.unwrap(), None, "a call of it is still out");
    assert!(store.lost_tasks().await.unwrap().is_empty(), "the lease runs");
    assert_eq!(env.status(cancelled).await["pending"], 20);
    env.backdate_running(&store, 120.0).await;
    assert!(store.lost_tasks().await.unwrap().is_empty(), "nothing to push for a cancelled job");
    let s = env.status(cancelled).await;
    let got = (&s["pending"], &s["failed"], &s["calls_made"], &s["calls"]["answer_lost"]);
    assert_eq!(got, (&0.into(), &40.into(), &1.into(), &1.into()), "{s}");

    let running = submit(&vins[40..]).await;
    store.claim(running, 0, 0, 60.0, CALL).await.unwrap().expect("the first call begins");
    env.backdate_running(&store, 120.0).await;
    assert_eq!(store.lost_tasks().await.unwrap(), vec![(running, 0, 1)], "its worker died, it seems");
    store.claim(running, 0, 1, 60.0, CALL).await.unwrap().expect("the second call begins");
    // The first call's failure lands late: its stale task queues nothing
    // and counts nothing more (the claim counted the call as lost).
    let server_error = Reschedule::Failed(vinetl::store::CallEnd::ServerError);
    assert_eq!(store.reschedule(running, 0, 0, 1.0, server_error, "503").await.unwrap(), None);
    let s = env.status(running).await;
    let got = (&s["calls_made"], &s["calls"]["answer_lost"], &s["calls"]["in_flight"]);
    assert_eq!(got, (&2.into(), &1.into(), &1.into()), "{s}");
    // So does its giving up: the batch stays with the second call, its rows
    // pending, and nothing more is counted.
    store
        .dead_letter(running, 0, 0, "gave up after 3 attempts: 503", Some(vinetl::store::CallEnd::ServerError))
        .await
        .unwrap();
    let s = env.status(running).await;
    let got = (&s["pending"], &s["failed"], &s["calls_made"], &s["calls"]["in_flight"]);
    assert_eq!(got, (&40.into(), &0.into(), &2.into(), &1.into()), "{s}");
    assert!(store.stalled_jobs().await.unwrap().is_empty(), "the job does not end under the second call");

    assert_eq!(store.reprocess(cancelled, &redo, 20, 24.0, 90.0).await.unwrap(), Some(2), "no call out any more");
    env.cleanup().await;
}

/// An output place is committed by one writer at a time: a lock held is
/// refused to another holder (of any job) until released by its holder or
/// its lease runs out; other places are free.
async fn an_output_place_is_committed_by_one_writer_at_a_time(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let p = "/data/out/dt=2026-12-07/";
    assert!(store.lock_output(p, "a", 1, 60.0).await.unwrap());
    assert!(!store.lock_output(p, "b", 2, 60.0).await.unwrap(), "held by a");
    assert!(!store.lock_output(p, "a2", 1, 60.0).await.unwrap(), "another writer of the same job waits too");
    assert!(store.lock_output("/data/out/dt=2026-12-08/", "b", 2, 60.0).await.unwrap(), "another place is free");
    store.unlock_output(p, "b").await.unwrap();
    assert!(!store.lock_output(p, "b", 2, 60.0).await.unwrap(), "only its holder releases it");
    store.unlock_output(p, "a").await.unwrap();
    assert!(store.lock_output(p, "b", 2, 60.0).await.unwrap(), "released");
    assert!(store.lock_output("/dead/", "a", 1, 60.0).await.unwrap());
    assert!(!store.lock_output("/dead/", "b", 2, 60.0).await.unwrap());
    assert!(store.renew_output("/dead/", "a", 60.0).await.unwrap(), "its holder renews it");
    assert!(!store.renew_output("/dead/", "b", 60.0).await.unwrap(), "only its holder");
    let lapse = "UPDATE output_locks SET until = until - {}";
    env.sql(&store, &lapse.replace("{}", "interval '120 seconds'"), &lapse.replace("{}", "120")).await;
    assert!(store.lock_output("/dead/", "b", 2, 60.0).await.unwrap(), "a dead holder's lease ran out");
    assert!(!store.renew_output("/dead/", "a", 60.0).await.unwrap(), "the lapsed holder finds it gone");
    env.cleanup().await;
}

/// A failed job whose call is still out (another worker's call got the
/// refusal that failed it) is not reprocessed until that call lands or its
/// lease runs out: its rows would be cut into a second batch and called
/// twice. A job cancelled while paused is reprocessed unpaused.
async fn a_failed_or_paused_job_is_reprocessed_once_its_calls_are_in(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(80);
    // Two specs apart (a reprocessed job runs, and the same spec would resume it).
    let submit = |vins: &[String], extra: &'static str| {
        let spec = JobSpec::load(&env.spec(vins, "http://127.0.0.1:9", extra)).unwrap();
        let store = &store;
        let schema = env.schema.clone();
        async move { vinetl::job::plan::submit(store, &schema, &spec).await.unwrap().job_id }
    };
    let redo = vinetl::store::Redo { failed_only: true, vins: None, refresh: false, replace_newer: false };

    let failed = submit(&vins[..40], "").await;
    store.claim(failed, 0, 0, 60.0, CALL).await.unwrap().expect("batch 0's call begins");
    assert!(store.fail_job(failed, "the API refused the key: revoked").await.unwrap());
    assert_eq!(store.reprocess(failed, &redo, 20, 24.0, 90.0).await.unwrap(), None, "a call of it is still out");
    let backdate = "UPDATE batches SET updated_at = updated_at - {} WHERE state = 'dead'";
    env.sql(&store, &backdate.replace("{}", "interval '50 seconds'"), &backdate.replace("{}", "50")).await;
    assert_eq!(store.reprocess(failed, &redo, 20, 24.0, 90.0).await.unwrap(), None, "within its lease (60 s + 30 s)");
    env.sql(&store, &backdate.replace("{}", "interval '50 seconds'"), &backdate.replace("{}", "50")).await;
    assert_eq!(store.reprocess(failed, &redo, 20, 24.0, 90.0).await.unwrap(), Some(2), "its lease ran out: lost");

    let paused = submit(&vins[40..], "timeout_secs = 20").await;
    assert!(store.pause_job(paused).await.unwrap());
    assert!(store.cancel_job(paused).await.unwrap());
    assert_eq!(store.reprocess(paused, &redo, 20, 24.0, 90.0).await.unwrap(), Some(2));
    let s = env.status(paused).await;
    assert_eq!(s["state"], "running", "not paused: {s}");
    // Its new batches are numbered after the earlier run's.
    let generation =
        |b: i32| format!("UPDATE batches SET generation = generation WHERE job_id = {paused} AND batch_no = {b}");
    assert_eq!(env.sql(&store, &generation(2), &generation(2)).await, 1);
    assert!(store.claim(paused, 2, 0, 60.0, CALL).await.unwrap().is_some(), "its batches are called");
    env.cleanup().await;
}

/// A task of an older generation makes no call and takes nothing from the
/// limiter: neither the day's quota nor its place in the rate. It is turned
/// away before it waits for the limiter; one that got past that in a race
/// is refused by the claim after it, and its grant goes back (a probe
/// through an open circuit given back so lets the next probe go at once:
/// see the limiter's test).
async fn a_stale_task_makes_no_call_and_uses_no_quota(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let nowhere = "http://127.0.0.1:9";
    let mut spec = JobSpec::load(&env.spec(&pattern_vins(40), nowhere, "embedded = true\ndaily_quota = 10")).unwrap();
    // One call per 10 s: a grant taken would hold the next back.
    spec.provider.requests_per_second = 0.1;
    spec.provider.burst = Some(1.0);
    let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
    // Batch 0 waits an hour, as a task the limiter turned away leaves it.
    store.claim(job, 0, 0, 60.0, None).await.unwrap().expect("claimed without a call");
    assert_eq!(store.reschedule(job, 0, 0, 3600.0, Reschedule::NotCalled, "later").await.unwrap(), Some(1));
    // The account exists, as once any worker has used it: its quota is read below.
    let limiter = SharedLimiter::register(&store, &spec.provider).await.unwrap();
    let allow = vinetl::call::allow::ApiAllow::from_env();
    let state = vinetl::job::worker::WorkerState::new(env.store().await, &env.schema, 1, Some(nowhere.into()), allow);
    let state = apalis::prelude::Data::new(state);
    let stale = BatchTask { job_id: job, batch_no: 0, generation: 0 };
    vinetl::job::worker::handle(stale, state.clone()).await.unwrap();
    // A paused job's task is dropped the same way.
    assert!(store.pause_job(job).await.unwrap());
    let paused = BatchTask { job_id: job, batch_no: 1, generation: 0 };
    vinetl::job::worker::handle(paused, state).await.unwrap();
    let status = env.status(job).await;
    assert_eq!(status["calls_made"], 0, "{status}");
    assert_eq!(status["quota"]["used_today"], 0, "no quota used: {status}");
    assert_eq!(status["quota"]["daily_quota"], 10, "{status}");
    let next = limiter.try_reserve(1).await.unwrap();
    assert!(next.is_ok(), "the rate's next place is still free: {next:?}");
    env.cleanup().await;
}

/// Rate and burst hold across several limiters (processes) sharing one
/// account; the daily quota holds exactly and says when it resets; the
/// in-flight cap holds and frees a place when a call ends.
async fn the_limiter_holds_rate_burst_quota_and_in_flight(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let provider = |extra: &str| {
        let path = env.spec(&pattern_vins(1), "http://127.0.0.1:9", extra);
        JobSpec::load(&path).unwrap().provider
    };

    // Rate 20/s, burst 5, four clients for 1.5 s.
    let p = provider("account = \"rate\"\nburst = 5").clone();
    let p = vinetl::spec::ProviderSpec { requests_per_second: 20.0, ..p };
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let limiter = SharedLimiter::register(&store, &p).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut grants = Vec::new();
            while start.elapsed() < Duration::from_millis(1500) {
                match limiter.try_reserve(1).await.unwrap() {
                    Ok(g) => grants.extend(std::iter::repeat_n(start.elapsed().as_secs_f64(), g.n)),
                    Err(Denied::Later { wait, .. }) => tokio::time::sleep(wait.min(Duration::from_millis(20))).await,
                    Err(other) => panic!("{other:?}"),
                }
            }
            grants
        }));
    }
    let mut grants = Vec::new();
    for t in tasks {
        grants.extend(t.await.unwrap());
    }
    grants.sort_by(f64::total_cmp);
    let elapsed = start.elapsed().as_secs_f64();
    assert!(grants.len() >= 20, "the rate is used: {} grants", grants.len());
    assert!(grants.len() as f64 <= 5.0 + 20.0 * elapsed + 1.0, "{} grants in {elapsed:.2} s", grants.len());
    for (i, &t0) in grants.iter().enumerate() {
        // Grant times are seen by the clients; the database's clock decides (2 slots of slack for latency).
        let n = grants[i..].iter().take_while(|&&t| t < t0 + 1.0).count();
        assert!(n <= 25 + 2, "{n} grants within one second");
    }

    // A daily quota of 7: exactly 7 calls, then a wait until the reset.
    let quota = SharedLimiter::register(&store, &provider("account = \"quota\"\ndaily_quota = 7")).await.unwrap();
    let mut granted = 0;
    for _ in 0..12 {
        match quota.try_reserve(1).await.unwrap() {
            Ok(g) => granted += g.n,
            Err(Denied::Quota { wait }) => assert!(wait <= Duration::from_secs(86_400), "{wait:?}"),
            Err(Denied::Later { wait, .. }) => tokio::time::sleep(wait).await,
            Err(Denied::Circuit { .. }) => panic!("no circuit was opened"),
        }
    }
    assert_eq!(granted, 7);

    // Reserved but unused calls go back to the day's quota (a banked slot
    // that expired): 3 reserved, 2 given back, so 3 of 4 remain.
    let refund =
        SharedLimiter::register(&store, &provider("account = \"refund\"\ndaily_quota = 4\nburst = 10")).await.unwrap();
    let g = refund.try_reserve(3).await.unwrap().unwrap();
    assert_eq!(g.n, 3);
    refund.refund(2, g.at).await.unwrap();
    assert_eq!(refund.try_reserve(4).await.unwrap().map(|g| g.n), Ok(3), "two came back");

    // The circuit: an unreachable API stops every caller until a probe is
    // due, lets one probe through, and closes on an answer; the refused call
    // gives its quota unit back.
    let c = SharedLimiter::register(&store, &provider("account = \"circuit\"\ndaily_quota = 10\nburst = 10"))
        .await
        .unwrap();
    let other = SharedLimiter::register(&store, &provider("account = \"circuit\"\ndaily_quota = 10\nburst = 10"))
        .await
        .unwrap();
    assert_eq!(c.try_reserve(1).await.unwrap().map(|g| g.n), Ok(1));
    // Seven calls in flight, granted before the circuit opens.
    let in_flight = c.try_reserve(7).await.unwrap().expect("seven granted");
    assert_eq!(in_flight.n, 7);
    // A call granted before the circuit opens, and not made.
    let unused = c.acquire().await.unwrap().expect("granted");
    c.unreachable("connection refused", unused.granted_at()).await.unwrap();
    let open = c.circuit().await.unwrap().expect("open");
    assert_eq!(open.reason, "connection refused");
    // The seven fail the same way: one outage, seen again. Each gives its
    // unit back, and none moves the probe (eight failures counted would
    // have put it 60 s away).
    for _ in 0..7 {
        c.unreachable("connection refused", in_flight.at).await.unwrap();
    }
    assert_eq!(c.circuit().await.unwrap().expect("open").probe_at, open.probe_at, "one trip for one flight");
    let wait = match other.try_reserve(1).await.unwrap() {
        Err(Denied::Circuit { wait }) => wait,
        got => panic!("another process may not call while it is open: {got:?}"),
    };
    // Given back, it was no probe: the next probe stays where the circuit put it.
    c.give_back(unused).await.unwrap();
    let after = c.circuit().await.unwrap().expect("still open");
    assert_eq!(after.probe_at, open.probe_at, "a call granted before the circuit opened is no probe");
    assert!(wait <= Duration::from_secs(1), "{wait:?}");
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let probe = other.try_reserve(5).await.unwrap().expect("a probe");
    assert_eq!(probe.n, 1, "one probe, alone");
    assert!(matches!(c.try_reserve(1).await.unwrap(), Err(Denied::Circuit { .. })), "while the probe is out");
    // A probe given back unused (a stale task's) lets the next go at once.
    other.refund(1, probe.at).await.unwrap();
    assert_eq!(c.try_reserve(1).await.unwrap().map(|g| g.n), Ok(1), "the probe given back goes to the next caller");
    assert!(matches!(other.try_reserve(1).await.unwrap(), Err(Denied::Circuit { .. })), "while that probe is out");
    c.answered(true).await.unwrap();
    assert!(c.circuit().await.unwrap().is_none(), "an answer closes it");
    // 10 a day: 1 refused and 1 probe given back, 1 probe used: 9 left (the
    // probe given back kept its place in the rate, so they may take a wait).
    let mut left = 0;
    loop {
        match c.try_reserve(10).await.unwrap() {
            Ok(g) => left += g.n,
            Err(Denied::Later { wait, .. }) => tokio::time::sleep(wait).await,
            Err(Denied::Quota { .. }) => break,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(left, 9);
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for _ in 0..vinetl::call::limiter::SERVER_ERRORS_TO_OPEN - 1 {
        assert!(!c.server_error("500", now()).await.unwrap());
    }
    assert!(c.server_error("500", now()).await.unwrap(), "five 5xx in a row open it");

    // Two calls in flight at most, across limiters; a release frees a place.
    let p = provider("account = \"flight\"\nmax_in_flight = 2");
    let a = SharedLimiter::register(&store, &p).await.unwrap();
    let b = SharedLimiter::register(&store, &p).await.unwrap();
    let one = a.acquire().await.unwrap().unwrap();
    let _two = b.acquire().await.unwrap().unwrap();
    match b.try_reserve(1).await.unwrap() {
        Err(Denied::Later { reason, .. }) => assert_eq!(reason, "in_flight"),
        other => panic!("a third call in flight: {other:?}"),
    }
    a.release(one).await;
    assert!(b.try_reserve(1).await.unwrap().is_ok(), "a place came back");
    env.cleanup().await;
}

/// The account's flight rows (places held under an in-flight cap).
async fn flights(store: &Store, account: &str) -> i64 {
    match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => sqlx::query_scalar("SELECT count(*) FROM limiter_flights WHERE account = $1")
            .bind(account)
            .fetch_one(pool)
            .await
            .unwrap(),
        (None, Some((pool, _))) => sqlx::query_scalar("SELECT count(*) FROM limiter_flights WHERE account = ?1")
            .bind(account)
            .fetch_one(pool)
            .await
            .unwrap(),
        (None, None) => unreachable!(),
    }
}

/// One account's row is shared by processes that registered it from
/// different specs, and the last registration wins; a process keeps the
/// batch size it derived from its own. Such a process neither leaks places
/// under a cap another registered (every slot of a many-slot grant carries
/// its flight row, and releasing it frees the place) nor waits forever for
/// more slots than a smaller burst allows (a reservation is cut to the
/// burst). A refused call's quota unit goes back only to the quota day it
/// was granted in, and a reservation whose clock reads earlier than the
/// last (a step back, or a transaction that waited) never moves the quota
/// day back, which would reset the day's count.
async fn the_limiter_holds_across_differing_specs_and_quota_days(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let base = env.spec(&pattern_vins(1), "http://127.0.0.1:9", "");
    let base = JobSpec::load(&base).unwrap().provider;
    let spec = |account: &str, burst: f64, cap: Option<u32>, quota: Option<u64>| vinetl::spec::ProviderSpec {
        requests_per_second: 400.0,
        burst: Some(burst),
        max_in_flight: cap,
        daily_quota: quota,
        account: Some(account.to_string()),
        ..base.clone()
    };

    // A reserves up to 8 slots at once (400/s, burst 16, no cap); B then
    // puts a cap of 8 on the account. Eight callers of A wait together
    // behind a push-back, so one reservation serves them all.
    let a = SharedLimiter::register(&store, &spec("mixed", 16.0, None, None)).await.unwrap();
    let _b = SharedLimiter::register(&store, &spec("mixed", 16.0, Some(8), None)).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    block_until(&store, "mixed", now + 0.3).await;
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.acquire().await.unwrap().expect("granted") })
        })
        .collect();
    let mut slots = Vec::new();
    for c in callers {
        slots.push(c.await.unwrap());
    }
    let before = a.round_trips();
    assert_eq!(flights(&store, "mixed").await, 8, "each call in flight holds its place");
    for slot in slots {
        a.release(slot).await;
    }
    assert_eq!(flights(&store, "mixed").await, 0, "every place came back ({before} round trips)");
    assert!(a.try_reserve(1).await.unwrap().is_ok(), "the cap is free again");

    // C asks for 8 at once; D then cuts the burst to 4: C is granted 4,
    // not refused for as long as it asks.
    let c = SharedLimiter::register(&store, &spec("burst", 16.0, None, None)).await.unwrap();
    let _d = SharedLimiter::register(&store, &spec("burst", 4.0, None, None)).await.unwrap();
    assert_eq!(c.try_reserve(8).await.unwrap().map(|g| g.n), Ok(4), "cut to the burst");

    // Quota days on a synthetic clock (4 a day): a call granted just before
    // midnight and refused by an unreachable API does not give its unit to
    // the next day.
    let q = SharedLimiter::register(&store, &spec("days", 16.0, None, Some(4))).await.unwrap();
    let midnight = 86_400.0 * 20_001.0;
    let late = q.try_reserve_at(1, Some(midnight - 0.5)).await.unwrap().expect("granted");
    assert_eq!(q.try_reserve_at(4, Some(midnight + 1.0)).await.unwrap().map(|g| g.n), Ok(4));
    q.unreachable("connection refused", late.at).await.unwrap();
    q.answered(true).await.unwrap();
    assert!(
        matches!(q.try_reserve_at(1, Some(midnight + 2.0)).await.unwrap(), Err(Denied::Quota { .. })),
        "the refused call's unit went to the day it was granted in"
    );
    // A call of the new day refused the same way gives its unit back.
    q.unreachable("connection refused", midnight + 1.0).await.unwrap();
    q.answered(true).await.unwrap();
    assert_eq!(q.try_reserve_at(1, Some(midnight + 3.0)).await.unwrap().map(|g| g.n), Ok(1));
    // A reservation read at an earlier time counts in the newer day and
    // leaves the day where it was: the next day's count is not reset.
    let r = SharedLimiter::register(&store, &spec("step", 16.0, None, Some(3))).await.unwrap();
    // (A millisecond back: within the burst, so the rate grants it.)
    assert!(r.try_reserve_at(1, Some(midnight + 0.0005)).await.unwrap().is_ok());
    assert!(r.try_reserve_at(1, Some(midnight - 0.0005)).await.unwrap().is_ok());
    let mut after = 0;
    for i in 0..3 {
        if let Ok(g) = r.try_reserve_at(1, Some(midnight + 11.0 + f64::from(i))).await.unwrap() {
            after += g.n;
        }
    }
    assert_eq!(after, 1, "3 a day: 2 counted already in the newer day");
    env.cleanup().await;
}

/// One step of a limiter property case: a reservation of `k` calls, or a
/// 429 push-back of `block_ms`, `gap_ms` after the previous step.
#[derive(Debug, Clone)]
enum Step {
    Reserve { k: usize, gap_ms: u32 },
    Block { block_ms: u32, gap_ms: u32 },
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        9 => (1usize..8, 0u32..300).prop_map(|(k, gap_ms)| Step::Reserve { k, gap_ms }),
        1 => (1u32..3000, 0u32..300).prop_map(|(block_ms, gap_ms)| Step::Block { block_ms, gap_ms }),
    ]
}

/// Sets the account's push-back to `until` (what a 429's Retry-After does,
/// at a synthetic time).
async fn block_until(store: &Store, account: &str, until: f64) {
    match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => sqlx::query(
            "UPDATE limiter SET blocked_until = greatest(blocked_until, to_timestamp($2)) WHERE account = $1",
        )
        .bind(account)
        .bind(until)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        .unwrap(),
        (None, Some((pool, _))) => {
            sqlx::query("UPDATE limiter SET blocked_until = max(blocked_until, ?2) WHERE account = ?1")
                .bind(account)
                .bind(until)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
                .unwrap()
        }
        (None, None) => unreachable!(),
    };
}

/// Lifts the account's push-back (as if it had passed).
async fn unblock(store: &Store, account: &str) {
    match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => sqlx::query("UPDATE limiter SET blocked_until = '-infinity' WHERE account = $1")
            .bind(account)
            .execute(pool)
            .await
            .map(drop)
            .unwrap(),
        (None, Some((pool, _))) => sqlx::query("UPDATE limiter SET blocked_until = 0 WHERE account = ?1")
            .bind(account)
            .execute(pool)
            .await
            .map(drop)
            .unwrap(),
        (None, None) => unreachable!(),
    };
}

/// 429s without `Retry-After`: the calls in flight together when one came
/// back cut the rate once, not once each; each cut in a row with no
/// success between adds a back-off that doubles (1, 3, 7 … s) up to its
/// cap, so an API that ends its day with bare 429s is not asked every few
/// seconds until its reset; a success ends the run.
async fn bare_429s_cut_the_rate_once_per_flight_and_back_off_more_each_time_in_a_row(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let path = env.spec(&pattern_vins(1), "http://127.0.0.1:9", "account = \"bare429\"");
    // One call a second: every interval is seconds long, so the waits
    // read back below are far from their bounds, however slow the machine.
    let p = vinetl::spec::ProviderSpec { requests_per_second: 1.0, ..JobSpec::load(&path).unwrap().provider };
    let limiter = SharedLimiter::register(&store, &p).await.unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    // The push-back at a rate cut to `scale`, with `backoff` seconds.
    let within = |w: Duration, scale: f64, backoff: f64| {
        let w = w.as_secs_f64();
        w > backoff && w <= backoff + 1.0 / scale
    };
    // Eight calls granted together, all refused: one cut (to 0.5/s), one
    // interval of 2 s, no back-off.
    let together = now();
    std::thread::sleep(Duration::from_millis(5));
    for i in 0..8 {
        let w = limiter.push_back(None, together).await.unwrap();
        assert!(within(w, 0.5, 0.0), "call {i}: {w:?}");
    }
    // Calls granted after that cut, refused too: cut again each time, and
    // 1, 3, 7 s more each time. The wait is the store's, read in the
    // statement that set it, so it is exact to well under 0.1 s.
    for (scale, backoff) in [(0.25, 1.0), (0.125, 3.0), (0.0625, 7.0)] {
        let w = limiter.push_back(None, now()).await.unwrap().as_secs_f64();
        let expected = 1.0 / scale + backoff;
        assert!(w > expected - 0.1 && w <= expected, "{w} s after a cut to {scale}: {expected} s expected");
    }
    // Up to the cap, however long the run (the rate at its floor).
    let (cap, floor) = (MAX_THROTTLE_BACKOFF.as_secs_f64(), MIN_SCALE);
    let mut w = Duration::ZERO;
    for _ in 0..20 {
        w = limiter.push_back(None, now()).await.unwrap();
    }
    assert!(within(w, floor, cap), "{w:?}");
    // A success ends the run: once the push-back has passed, the next bare
    // 429 adds no back-off.
    limiter.answered(true).await.unwrap();
    unblock(&store, "bare429").await;
    let w = limiter.push_back(None, now()).await.unwrap();
    assert!(within(w, floor, 0.0), "{w:?}");
    env.cleanup().await;
}

/// Property test of the reservation code that runs (the Postgres function,
/// SQLite's `Bucket` in its transaction), on a synthetic clock: for any
/// interleaving of reservations and push-backs, no one-second window holds
/// more than rate + burst grants, no quota day more than the quota, nothing
/// is granted while pushed back, and a grant is all that was asked for
/// unless the quota had less left or the burst is smaller.
async fn the_limiter_arithmetic_holds_for_any_interleaving(backend: Backend) {
    use proptest::prelude::*;
    let env = Env::new(backend);
    let store = env.store().await;
    let base = env.spec(&pattern_vins(1), "http://127.0.0.1:9", "");
    let base = JobSpec::load(&base).unwrap().provider;
    let cases = std::sync::atomic::AtomicU32::new(0);
    let strategy = (1.0f64..50.0, 1.0f64..20.0, 1i64..300, proptest::collection::vec(step(), 1..250));
    let config = proptest::test_runner::Config { cases: 24, failure_persistence: None, ..Default::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let handle = tokio::runtime::Handle::current();
    let result = runner.run(&strategy, |(rate, burst, quota, steps)| {
        let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = vinetl::spec::ProviderSpec {
            requests_per_second: rate,
            burst: Some(burst),
            daily_quota: Some(quota as u64),
            account: Some(format!("prop-{case}")),
            ..base.clone()
        };
        let account = p.account();
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let limiter = SharedLimiter::register(&store, &p).await.unwrap();
                // Near a UTC midnight, so cases cross into a new quota day.
                let mut t = 86_400.0 * 20_000.0 + 86_000.0;
                let mut blocked_until = f64::NEG_INFINITY;
                let mut grants: Vec<f64> = Vec::new();
                for step in steps {
                    match step {
                        Step::Block { block_ms, gap_ms } => {
                            t += f64::from(gap_ms) / 1000.0;
                            blocked_until = blocked_until.max(t + f64::from(block_ms) / 1000.0);
                            block_until(&store, &account, blocked_until).await;
                        }
                        Step::Reserve { k, gap_ms } => {
                            t += f64::from(gap_ms) / 1000.0;
                            let day = (t / 86_400.0).floor();
                            let used_today = grants.iter().filter(|&&g| (g / 86_400.0).floor() == day).count() as i64;
                            match limiter.try_reserve_at(k, Some(t)).await.unwrap() {
                                Ok(g) => {
                                    // Postgres keeps times in microseconds.
                                    prop_assert!(
                                        t >= blocked_until - 1e-6,
                                        "granted at {t} while blocked until {blocked_until}"
                                    );
                                    prop_assert!(g.n >= 1 && g.n <= k, "{} granted for {k}", g.n);
                                    let left = (quota - used_today) as usize;
                                    // A request is cut to the burst (GCRA grants no more).
                                    let want = k.min((burst.floor() as usize).max(1));
                                    prop_assert_eq!(g.n, want.min(left), "{} asked, {} left, burst {}", k, left, burst);
                                    grants.extend(std::iter::repeat_n(t, g.n));
                                }
                                Err(Denied::Later { reason, .. }) if reason == "blocked" => {
                                    prop_assert!(
                                        t < blocked_until + 1e-6,
                                        "refused as blocked at {t}, until {blocked_until}"
                                    );
                                }
                                Err(Denied::Later { .. }) => {}
                                Err(Denied::Quota { .. }) => {
                                    prop_assert!(
                                        used_today >= quota,
                                        "quota refused with {used_today} used of {quota}"
                                    );
                                }
                                Err(Denied::Circuit { .. }) => prop_assert!(false, "no circuit was opened"),
                            }
                        }
                    }
                }
                for (i, &start) in grants.iter().enumerate() {
                    let in_window = grants[i..].iter().take_while(|&&u| u < start + 1.0).count() as f64;
                    prop_assert!(in_window <= rate + burst, "{in_window} grants in 1 s at rate {rate} burst {burst}");
                }
                let mut per_day = std::collections::BTreeMap::new();
                for g in &grants {
                    *per_day.entry((g / 86_400.0).floor() as i64).or_insert(0i64) += 1;
                }
                prop_assert!(per_day.values().all(|&n| n <= quota), "{per_day:?} over the quota {quota}");
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("{backend:?}: {e}");
    }
    env.cleanup().await;
}

/// A whole job through the binary: every row accounted for, the same
/// counts on either store; `failures` lists every dead-lettered batch and
/// failed row (bounded) and says what to do next; then a reprocess of its
/// failed rows leaves no failure and one output row per input row, and a
/// reprocess of all of it (cached) makes no call.
async fn counts_failures_and_reprocess(backend: Backend) {
    let env = Env::new(backend);
    // A server whose batch decodes all come back broken (a 200 with
    // truncated JSON): every batch is dead-lettered. (All 500s would open the
    // circuit instead: an API that only answers 500 is down.)
    let failing = Faults { fault_malformed: 1.0, fault_path: Some("/api/v1/batch-decode".into()), ..Faults::default() };
    let (server, _keys) = common::serve(failing).await;
    let port = server.addr.port();
    std::fs::copy("jobs/sample-fleet.csv", env.dir.path().join("fleet.csv")).unwrap();
    let out_dir = env.dir.path().join("out");
    let spec = env.spec(
        &[],
        &server.url(),
        &format!(
            "max_attempts = 1\n[recalls]\nenabled = true\n[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\npartition = \"none\"",
            out_dir.display()
        ),
    );
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("path = \"vins.txt\"", "path = \"fleet.csv\"\ncarry = [\"unit_id\"]");
    std::fs::write(&spec, text).unwrap();
    let out = env.vinetl("YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(4), "done, with failed rows: {}", String::from_utf8_lossy(&out.stderr));
    let s = env.status(1).await;
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!((s["rows"].as_i64(), s["valid"].as_i64(), s["duplicates"].as_i64()), (Some(291), Some(281), Some(18)));
    assert_eq!((s["decoded"].as_i64(), s["failed"].as_i64(), s["pending"].as_i64()), (Some(0), Some(281), Some(0)));
    assert_eq!((s["dead_lettered_batches"].as_i64(), s["dead_lettered_vins"].as_i64()), (Some(14), Some(263)));
    assert_eq!(s["calls_made"], 14);
    assert_eq!(s["recalls"]["lookups"], 0, "nothing decoded, nothing to look up");
    let f = env.failures(1, &["--json"]).await;
    assert_eq!((f["dead_batches_total"].as_i64(), f["failed_rows_total"].as_i64()), (Some(14), Some(281)), "{f}");
    assert_eq!(f["dead_batches"].as_array().unwrap().len(), 14);
    let batch = &f["dead_batches"][0];
    assert_eq!(
        (batch["batch_no"].as_i64(), batch["kind"].as_str(), batch["attempts"].as_i64()),
        (Some(0), Some("decode"), Some(1))
    );
    assert_eq!(batch["vins"], 20, "{batch}");
    assert!(batch["last_error"].as_str().is_some_and(|e| !e.is_empty()) && batch["updated_at"].is_string(), "{batch}");
    assert_eq!(f["failed_rows"].as_array().unwrap().len(), 100, "bounded by the default --limit");
    let row = &f["failed_rows"][0];
    assert_eq!((row["error_code"].as_str(), row["row"].as_i64()), (Some("dead_letter"), Some(1)), "{row}");
    assert!(
        row["batch_no"].is_i64() && row["raw_vin"].is_string() && row["error_text"] == batch["last_error"],
        "{row}"
    );
    assert_eq!(f["next"], "vinetl reprocess 1 --failed-only");
    let out = env.vinetl("unused", &["failures", "1", "--limit", "3"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("14 dead-lettered batches, 281 failed rows"), "{text}");
    assert!(text.contains("the first 3 of 281"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("dead_letter")).count(), 3, "{text}");
    assert!(text.trim_end().lines().last().unwrap().starts_with("next: vinetl reprocess 1 --failed-only"), "{text}");

    // The same address now answers: reprocess the failed rows.
    server.stop().await.unwrap();
    let keys = env.dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS_TOML).unwrap();
    let healthy = vinetl::serve::spawn(vinetl::serve::ServeOptions {
        bind: format!("127.0.0.1:{port}"),
        keys: Some(keys),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = env.vinetl("YOUR_API_KEY", &["reprocess", "1", "--failed-only"]).await;
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let s = env.status(1).await;
    assert_eq!((s["decoded"].as_i64(), s["failed"].as_i64(), s["pending"].as_i64()), (Some(281), Some(0), Some(0)));
    let lookups = s["recalls"]["lookups"].as_i64().unwrap();
    assert!(lookups > 0, "{s}");
    let f = env.failures(1, &["--json"]).await;
    assert_eq!((f["dead_batches_total"].as_i64(), f["failed_rows_total"].as_i64()), (Some(0), Some(0)), "{f}");
    // status counts this run's batches too: 14 new ones, all done.
    assert_eq!(
        (s["batches"].as_i64(), s["batches_done"].as_i64(), s["dead_lettered_batches"].as_i64()),
        (Some(14), Some(14), Some(0)),
        "{s}"
    );
    assert!(f["failed_rows"].as_array().unwrap().is_empty() && f["next"].is_null(), "{f}");
    // The reprocess replaced the first run's output: one row per input row.
    let written = parquet_rows(&out_dir);
    let distinct: std::collections::BTreeSet<_> = written.iter().collect();
    assert_eq!((written.len(), distinct.len()), (291, 291), "no input row missing or written twice");
    assert_eq!(s["calls_made"].as_i64().unwrap(), 14 + 14 + lookups, "14 failed calls, 14 decodes, the lookups: {s}");
    // All of it again: every decode and lookup is fresh in the cache.
    let out = env.vinetl("YOUR_API_KEY", &["reprocess", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = env.status(1).await;
    assert_eq!(again["calls_made"], s["calls_made"], "no call: {again}");
    assert_eq!(again["decoded"], 281);
    assert_eq!(again["recalls"]["cache_hits"], lookups);

    // Three VINs (one in lower case) again, bypassing the cache: their
    // rows only, in one call; the other rows keep their decode.
    let fleet = std::fs::read_to_string("jobs/sample-fleet.csv").unwrap();
    let mut three: Vec<String> = fleet
        .lines()
        .skip(1)
        .filter_map(|l| vinetl::vin::Vin::parse(l.split(',').nth(2)?).ok())
        .map(|v| v.as_str().to_string())
        .collect();
    three.dedup();
    three.truncate(3);
    let list = env.dir.path().join("redo.txt");
    std::fs::write(&list, format!("vin\n{}\n{}\n\n{}\n", three[0].to_lowercase(), three[1], three[2])).unwrap();
    let out = env.vinetl("YOUR_API_KEY", &["reprocess", "1", "--vins", list.to_str().unwrap(), "--refresh"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refreshed = env.status(1).await;
    assert_eq!(
        refreshed["calls_made"].as_i64(),
        Some(again["calls_made"].as_i64().unwrap() + 1),
        "one call for the three VINs, the cache bypassed: {refreshed}"
    );
    assert_eq!((refreshed["decoded"].as_i64(), refreshed["failed"].as_i64()), (Some(281), Some(0)));
    assert_eq!(parquet_rows(&out_dir).len(), 291, "the rewritten output still has every row once");
    // Each run is kept: the submission and three reprocesses.
    assert_eq!(
        (refreshed["run_no"].as_i64(), refreshed["run_how"].as_str()),
        (Some(4), Some("reprocess --vins (3 VINs) --refresh"))
    );
    let hows: Vec<&str> =
        refreshed["earlier_runs"].as_array().unwrap().iter().map(|r| r["how"].as_str().unwrap()).collect();
    assert_eq!(hows, ["submit", "reprocess --failed-only", "reprocess"], "{refreshed}");
    let first = &refreshed["earlier_runs"][0];
    assert_eq!(
        (first["state"].as_str(), first["failed"].as_i64(), first["calls_made"].as_i64()),
        (Some("done"), Some(281), Some(14))
    );
    // A line that is not a VIN names the file and line, and changes nothing.
    std::fs::write(&list, format!("{}\nnot-a-vin\n", three[0])).unwrap();
    let out = env.vinetl("YOUR_API_KEY", &["reprocess", "1", "--vins", list.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redo.txt line 2") && err.contains("not-a-vin"), "{err}");
    assert_eq!(env.status(1).await["run_no"], 4, "nothing was started");
    common::assert_status_schema(&[s, again, refreshed]);
    healthy.stop().await.unwrap();
    env.cleanup().await;
}

/// Two `vinetl worker` processes on one store split a job and never call a
/// batch twice (on SQLite: two processes of one machine sharing the file).
async fn two_worker_processes_share_a_job(backend: Backend) {
    let env = Env::new(backend);
    let (server, _keys) = common::serve(Faults::default()).await;
    let spec = env.spec(&pattern_vins(400), &server.url(), "");
    let text = std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 20");
    std::fs::write(&spec, text).unwrap();
    let out = env.vinetl("pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
            .args(["worker", "--concurrency", "2"])
            .env("DATABASE_URL", &env.url)
            .env("VINETL_SCHEMA", &env.schema)
            .env("CARVIN_API_KEY", "pro-counted-key")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let (_a, _b) = (worker(), worker());
    let mut s = env.status(1).await;
    for _ in 0..300 {
        if s["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = env.status(1).await;
    }
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(
        (s["decoded"].as_i64(), s["batches"].as_i64(), s["calls_made"].as_i64()),
        (Some(400), Some(20), Some(20))
    );
    assert_eq!(common::requests_seen(&server.url(), "pro-counted-key", 100_000).await, 20, "one call per batch");
    env.cleanup().await;
}

/// `pause` stops a job's calls while the workers stay up and another job
/// goes on; `resume` picks it up where it stopped. The server counts
/// exactly one call per batch across the pause.
async fn pause_then_resume_calls_each_batch_once(backend: Backend) {
    let env = Env::new(backend);
    let faults = Faults { fault_latency_ms: Some((50, 100)), ..Default::default() };
    let (server, _keys) = common::serve(faults).await;
    let spec = env.spec(&pattern_vins(400), &server.url(), "");
    // 5 calls/s, no burst: 20 batches take about 4 s, so the pause after the
    // third call lands mid-job even on a loaded machine (with the default
    // burst of 10/s, CI once saw all 20 done before the pause landed).
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("requests_per_second = 200", "requests_per_second = 5\nburst = 1");
    std::fs::write(&spec, text).unwrap();
    let out = env.vinetl("pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--concurrency", "2"])
        .env("DATABASE_URL", &env.url)
        .env("VINETL_SCHEMA", &env.schema)
        .env("CARVIN_API_KEY", "pro-counted-key")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let until = async |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        for _ in 0..600 {
            let s = env.status(1).await;
            if ok(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job 1 never {what}: {}", env.status(1).await);
    };
    let running = until("made 3 calls", &|s| s["calls_made"].as_i64() >= Some(3)).await;
    // 20 batches at 5 calls/s granted: the ETA is the calls left at that rate.
    let (left, eta) = (running["calls_left"].as_f64().unwrap(), running["eta_secs"].as_f64());
    assert!(left > 0.0 && eta == Some((left / 5.0).round()), "{running}");
    let out = env.vinetl("unused", &["pause", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paused = until("landed its calls in flight", &|s| s["calls"]["in_flight"] == 0).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(paused["eta_secs"], serde_json::Value::Null, "no ETA while paused: {paused}");
    assert!(paused["batches_done"].as_i64() < Some(20), "paused mid-job: {paused}");
    // Paused: a second job runs on the same worker meanwhile; the first makes no call.
    let other = env.dir.path().join("other.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace("vins.txt", "other.txt");
    std::fs::write(&other, text.replace("name = \"conformance\"", "name = \"other\"")).unwrap();
    std::fs::write(env.dir.path().join("other.txt"), pattern_vins(440)[400..].join("\n")).unwrap();
    let out = env.vinetl("pro-counted-key", &["submit", other.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..600 {
        if env.status(2).await["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.status(2).await["state"], "done", "the other job went on");
    let still = env.status(1).await;
    assert_eq!((still["state"].as_str(), &still["calls_made"]), (Some("paused"), &paused["calls_made"]), "{still}");
    let out = env.vinetl("unused", &["pause", "2"]).await;
    assert_eq!(out.status.code(), Some(2), "a done job does not pause");
    let out = env.vinetl("unused", &["resume", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = until("finished", &|s| s["state"] == "done").await;
    assert_eq!((s["decoded"].as_i64(), s["calls_made"].as_i64()), (Some(400), Some(20)), "{s}");
    common::assert_status_schema(&[running.clone(), paused.clone(), still.clone(), s.clone()]);
    assert_eq!(
        common::requests_seen(&server.url(), "pro-counted-key", 100_000).await,
        20 + 2,
        "one call per batch of each job, across the pause"
    );
    server.stop().await.unwrap();
    env.cleanup().await;
}

/// SQLite has no session locks: a planner's lease must not outlive it for
/// long, or submitting the spec again could not resume its job.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_planners_sqlite_lease_expires_so_the_job_resumes() {
    let env = Env::new(Backend::Lite);
    let store = env.store().await;
    let (lite, _) = store.sqlite_pools().expect("SQLite");
    let spec = JobSpec::load(&env.spec(&pattern_vins(40), "http://127.0.0.1:9", "")).unwrap();
    let job = store
        .create_job("dead", &serde_json::to_value(&spec).unwrap(), &vinetl::job::plan::spec_hash(&spec), None)
        .await
        .unwrap();
    // A planner takes the lease and dies without releasing it.
    assert!(store.lock_planning(job).await.unwrap().is_some());
    assert!(store.lock_planning(job).await.unwrap().is_none(), "one planner at a time");
    let lease: f64 = sqlx::query_scalar("SELECT planning_until - unixepoch('subsec') FROM jobs WHERE job_id = ?")
        .bind(job)
        .fetch_one(lite)
        .await
        .unwrap();
    assert!(lease > 0.0 && lease <= 60.0, "a lease of a minute, not more: {lease} s");
    assert!(matches!(
        vinetl::job::plan::submit(&store, &env.schema, &spec).await,
        Err(vinetl::job::plan::PlanError::Busy(j)) if j == job
    ));
    // A minute later the lease has run out: the same spec resumes the job.
    sqlx::query("UPDATE jobs SET planning_until = unixepoch('subsec') - 1").execute(lite).await.unwrap();
    let resumed = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!((resumed.job_id, resumed.resumed, resumed.batches), (job, true, 2));
}

/// A call's answer (a group of them) and a `forget` lock the batch first,
/// then its rows, as failing a job does: while another session holds the
/// batch, neither has taken any of its rows. (A group that settled its rows
/// first, then waited for its batch, deadlocked with a job's failure
/// holding that batch and waiting for those rows.)
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_or_a_forget_takes_its_batch_before_its_rows() {
    use vinetl::store::{Answer, Answered};
    for writer in ["answer", "forget"] {
        let env = Env::new(Backend::Pg);
        let store = env.store().await;
        let pool = store.pg_pool().expect("Postgres").clone();
        let spec = JobSpec::load(&env.spec(&pattern_vins(20), "http://127.0.0.1:9", "")).unwrap();
        let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
        let claimed = store.claim(job, 0, 0, 60.0, CALL).await.unwrap().expect("the batch is claimed");
        let mut holder = pool.begin().await.unwrap();
        let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *holder).await.unwrap();
        sqlx::query("SELECT 1 FROM batches WHERE job_id = $1 AND batch_no = 0 FOR UPDATE")
            .bind(job)
            .execute(&mut *holder)
            .await
            .unwrap();
        let vins = claimed.vins.clone();
        let writing = tokio::spawn({
            let store = store.clone();
            async move {
                match writer {
                    "answer" => {
                        let decoded = vins.iter().map(|v| decoded_as(v, "MAKE")).collect();
                        let answer = Answer::Decoded { asked: vins.clone(), decoded };
                        store.complete_all(&[Answered { job_id: job, batch_no: 0, answer }]).await.map(drop)
                    }
                    _ => store.forget_vin(&vins[0]).await.map(drop),
                }
            }
        });
        common::blocked_by(&pool, holder_pid, writer).await;
        // The batch's rows are free: the writer is waiting before them.
        let mut other = pool.begin().await.unwrap();
        let taken = sqlx::query("SELECT 1 FROM job_inputs WHERE job_id = $1 AND vin = ANY($2) FOR UPDATE NOWAIT")
            .bind(job)
            .bind(&claimed.vins)
            .execute(&mut *other)
            .await;
        assert!(taken.is_ok(), "{writer}: it took the batch's rows before the batch: {taken:?}");
        other.rollback().await.unwrap();
        holder.commit().await.unwrap();
        writing.await.unwrap().unwrap();
        env.cleanup().await;
    }
}

/// The state store's connections to a Postgres on loopback, whose URL
/// chooses no `sslmode`, go without TLS (`connect_options`); one that
/// asks for `sslmode=prefer` gets it (the test server offers TLS).
#[tokio::test(flavor = "multi_thread")]
async fn a_loopback_state_store_goes_without_tls_unless_asked() {
    const SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let env = Env::new(Backend::Pg);
    let store = env.store().await;
    let pool = store.pg_pool().unwrap();
    if !env.url.contains("@127.0.0.1") || env.url.contains('?') {
        eprintln!("skipped: VINETL_TEST_DATABASE_URL is not a plain loopback URL ({})", env.url);
        return env.cleanup().await;
    }
    let ssl: bool = sqlx::query_scalar(SSL).fetch_one(pool).await.unwrap();
    assert!(!ssl, "a loopback connection with no sslmode is plain");
    let offered: bool = sqlx::query_scalar("SELECT current_setting('ssl') = 'on'").fetch_one(pool).await.unwrap();
    if offered {
        let url = format!("{}?sslmode=prefer", env.url);
        let asked = vinetl::store::postgres::connect(&url, &env.schema, 1).await.unwrap();
        assert!(sqlx::query_scalar::<_, bool>(SSL).fetch_one(&asked).await.unwrap(), "sslmode=prefer is kept");
        asked.close().await;
    }
    env.cleanup().await;
}

/// Once a job with calls to make is planned, Postgres has statistics on
/// the columns its calls' statements filter on: without them it read
/// every row of the job to store each answer (`Store::plan_batches`).
#[tokio::test(flavor = "multi_thread")]
async fn a_planned_job_with_calls_has_postgres_statistics() {
    let columns = ["batches.batch_no", "batches.state", "job_inputs.status", "job_inputs.vin"];
    planning_leaves_statistics_on(&pattern_vins(40), &columns).await;
}

/// Plans a Postgres job over `vins` (no call is made) and checks every one
/// of `columns` (`table.column`) has statistics.
async fn planning_leaves_statistics_on(vins: &[String], columns: &[&str]) {
    let env = Env::new(Backend::Pg);
    let store = env.store().await;
    let spec = JobSpec::load(&env.spec(vins, "http://127.0.0.1:9", "")).unwrap();
    vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    let analyzed: Vec<String> =
        sqlx::query_scalar("SELECT tablename || '.' || attname FROM pg_stats WHERE schemaname = $1 ORDER BY 1")
            .bind(&env.schema)
            .fetch_all(store.pg_pool().unwrap())
            .await
            .unwrap();
    for column in columns {
        assert!(analyzed.iter().any(|c| c == column), "{column} has no statistics: {analyzed:?}");
    }
    env.cleanup().await;
}

/// A job with no call to make (here every row is invalid; a warm nightly,
/// every VIN cached, is the same) gets statistics on its rows too: its
/// outputs are written right after planning, and without them Postgres
/// joined the results table's rows to their VINs by one probe per row.
#[tokio::test(flavor = "multi_thread")]
async fn a_planned_job_without_calls_has_postgres_statistics() {
    let invalid: Vec<String> = (0..40).map(|i| format!("NOT-A-VIN-{i}")).collect();
    planning_leaves_statistics_on(&invalid, &["job_inputs.job_id", "job_inputs.status", "job_inputs.vin"]).await;
}

/// A call's outcome locks its batch, then counts on its job; failing,
/// cancelling or resuming the job must take the same locks in the same order. Here an
/// outcome holds batch 0 while the job fails (a revoked key answered
/// another worker's call): the failure waits for the outcome, and both
/// commit. Taken the other way round, Postgres found a deadlock and
/// aborted one of the two after its deadlock_timeout; an aborted failure
/// left the job calling with a revoked key. (SQLite has one writer.)
#[tokio::test(flavor = "multi_thread")]
async fn ending_or_resuming_a_job_waits_for_an_outcome_in_flight_without_deadlock() {
    // Failing: the outcome holds a batch in a call. Cancelling and
    // resuming change queued batches: the outcome holds one that is queued
    // again (a late answer to a call whose batch the sweep took over and
    // queued after its lease ran out).
    for (ending, state) in [("fail", "failed"), ("cancel", "cancelled"), ("resume", "running")] {
        let env = Env::new(Backend::Pg);
        let store = env.store().await;
        let pool = store.pg_pool().expect("Postgres").clone();
        let spec = JobSpec::load(&env.spec(&pattern_vins(40), "http://127.0.0.1:9", "")).unwrap();
        let job = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap().job_id;
        // Claimed, not yet in its call: the outcome below is what counts it.
        assert!(store.claim(job, 0, 0, 60.0, None).await.unwrap().is_some());
        if ending == "resume" {
            assert!(store.pause_job(job).await.unwrap());
        }
        let mut outcome = pool.begin().await.unwrap();
        let outcome_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *outcome).await.unwrap();
        let batch_state = if ending == "fail" { "running" } else { "queued" };
        let held =
            sqlx::query("UPDATE batches SET in_call = false, updated_at = now() WHERE job_id = $1 AND state = $2")
                .bind(job)
                .bind(batch_state)
                .execute(&mut *outcome)
                .await
                .unwrap();
        assert_eq!(held.rows_affected(), 1, "{ending}: one {batch_state} batch");
        let ended = tokio::spawn({
            let store = store.clone();
            async move {
                match ending {
                    "fail" => store.fail_job(job, "the API refused the key: revoked").await,
                    "cancel" => store.cancel_job(job).await,
                    _ => store.resume_job(job).await,
                }
            }
        });
        // The failure (cancellation, resumption) now waits for the outcome's lock.
        common::blocked_by(&pool, outcome_pid, ending).await;
        let counted = sqlx::query("UPDATE jobs SET calls_made = calls_made + 1 WHERE job_id = $1")
            .bind(job)
            .execute(&mut *outcome)
            .await;
        assert!(counted.is_ok(), "{ending}: the outcome's count was aborted: {counted:?}");
        outcome.commit().await.unwrap();
        let ended = ended.await.unwrap();
        assert!(matches!(ended, Ok(true)), "{ending}: {ended:?}");
        let status = env.status(job).await;
        assert_eq!((status["state"].as_str(), status["calls_made"].as_i64()), (Some(state), Some(1)), "{status}");
        env.cleanup().await;
    }
}

/// The same job on both stores gives the same output rows (the one query
/// each dialect writes its own way), in every recall mode, the same carried
/// types and the same counts: decoded, duplicate, invalid, forgotten and
/// recall-flagged rows, carried columns.
#[tokio::test(flavor = "multi_thread")]
async fn both_stores_give_the_same_output_rows_and_counts() {
    use futures_util::TryStreamExt;
    use vinetl::columns::RecallMode;
    let (server, _keys) = common::serve(Faults::default()).await;
    let mut seen = Vec::new();
    for backend in [Backend::Pg, Backend::Lite] {
        let env = Env::new(backend);
        std::fs::copy("jobs/sample-fleet.csv", env.dir.path().join("fleet.csv")).unwrap();
        let spec = env.spec(&[], &server.url(), "[recalls]\nenabled = true");
        let text = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("path = \"vins.txt\"", "path = \"fleet.csv\"\ncarry = [\"unit_id\", \"odometer_km\"]");
        std::fs::write(&spec, text).unwrap();
        let out = env.vinetl("YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
        assert!(out.status.code().is_some_and(|c| c == 0 || c == 4), "{}", String::from_utf8_lossy(&out.stderr));
        let store = env.store().await;
        // A forgotten VIN's rows stay, decoded and blank: one more kind of row.
        let first: Vec<_> = store.output_rows(1, RecallMode::ByModel).try_collect().await.unwrap();
        let forgotten = first.iter().find(|r| r.status == "decoded").and_then(|r| r.vin.clone()).unwrap();
        let forgot = env.vinetl("YOUR_API_KEY", &["forget", &forgotten]).await;
        assert!(matches!(forgot.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&forgot.stderr));
        let mut rows = Vec::new();
        for mode in [RecallMode::ByModel, RecallMode::ByVin, RecallMode::Off] {
            let read: Vec<_> = store.output_rows(1, mode).try_collect().await.unwrap();
            rows.extend(read.into_iter().map(|r| {
                assert_eq!(r.decoded_at.is_some(), r.status == "decoded", "{r:?}");
                let r = vinetl::columns::OutputRow { decoded_at: None, ..r };
                // Each backend's file lives in a directory of its own.
                format!("{mode:?} {r:?}").replace(&env.dir.path().display().to_string(), "DIR")
            }));
        }
        let carry = ["unit_id".to_string(), "odometer_km".to_string()];
        let types = format!("{:?}", store.carried_types(1, &carry).await.unwrap());
        let mut counts = env.status(1).await;
        counts.as_object_mut().unwrap().remove("times");
        seen.push((rows, types, counts));
        env.cleanup().await;
    }
    let (pg, lite) = (&seen[0], &seen[1]);
    assert_eq!(pg.0.len(), 3 * 291);
    assert!(pg.0.iter().any(|r| r.contains("vin: None, status: \"decoded\"")), "a forgotten VIN's rows");
    assert!(pg.0.iter().any(|r| r.contains("recall_campaigns: Some([\"")), "some rows have recalls");
    assert!(pg.0.iter().any(|r| r.contains("status: \"invalid\"")), "some rows are invalid");
    for (i, (a, b)) in pg.0.iter().zip(&lite.0).enumerate() {
        assert_eq!(a, b, "output row {i}: Postgres, then SQLite");
    }
    assert_eq!(pg.1, lite.1, "carried types");
    assert_eq!(pg.2, lite.2, "counts");
    server.stop().await.unwrap();
}

/// Plans are decided as rows are stored, chunk by chunk: a VIN seen in an
/// earlier chunk (or earlier in the same chunk) is a duplicate, a VIN with a
/// fresh cache entry takes the cached result at once (a cached error too),
/// and only the rest are batched.
async fn plans_are_decided_across_chunks(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(5);
    let (a, b, c, d, e) = (&vins[0], &vins[1], &vins[2], &vins[3], &vins[4]);
    for (vin, age_h, code) in [(c, 1, "NULL"), (d, 1, "'VIN_NOT_FOUND'"), (e, 1000, "NULL")] {
        env.sql(
            &store,
            &format!("INSERT INTO vin_cache (vin, decoded_at, error_code, raw) VALUES ('{vin}', now() - make_interval(hours => {age_h}), {code}, '{{}}')"),
            &format!("INSERT INTO vin_cache (vin, decoded_at, error_code, raw) VALUES ('{vin}', unixepoch('subsec') - {age_h} * 3600, {code}, '{{}}')"),
        )
        .await;
    }
    let spec = JobSpec::load(&env.spec(&vins, "http://127.0.0.1:9", "")).unwrap();
    let job = store.create_job("chunks", &serde_json::to_value(&spec).unwrap(), "h", None).await.unwrap();
    let row = |n: i64, raw: &str| vinetl::store::PlannedRow {
        source: "s".into(),
        row_number: n,
        raw_vin: raw.to_string(),
        vin: vinetl::vin::Vin::parse(raw).ok().map(|v| v.to_string()),
        check_digit_valid: Some(true),
        error_code: vinetl::vin::Vin::parse(raw).err().map(|e| e.kind()),
        error_text: vinetl::vin::Vin::parse(raw).err().map(|e| e.to_string()),
        carried: serde_json::json!({}),
    };
    let first = [row(1, a), row(2, b), row(3, a), row(4, c)];
    let second = [row(5, b), row(6, c), row(7, "NOT-A-VIN"), row(8, d), row(9, e), row(10, e)];
    store.insert_rows(job, "s", &first, false, 720.0).await.unwrap();
    store.insert_rows(job, "s", &second, true, 720.0).await.unwrap();
    // Stored twice (a planner that died after its commit): nothing changes.
    store.insert_rows(job, "s", &second, true, 720.0).await.unwrap();
    assert_eq!(store.plan_batches(job, 20).await.unwrap(), 1, "a, b and the stale e in one batch");
    let n = store.counts(job).await.unwrap().unwrap();
    assert_eq!((n.rows, n.valid, n.duplicates, n.cache_hits), (10, 9, 4, 2), "{n:?}");
    assert_eq!((n.decoded, n.failed, n.pending), (2, 1, 6), "c twice, d's cached error, a a b b e e: {n:?}");
    assert_eq!(n.invalid.values().sum::<i64>(), 1);
    env.cleanup().await;
}

/// A file of many chunks, planned as `submit` plans it (on Postgres with
/// what the planning remembers of each VIN between chunks): a VIN's later
/// rows in any chunk are duplicates, and every row of a VIN the cache
/// holds fresh takes its answer (or its error), however far apart.
async fn a_file_of_many_chunks_is_planned_by_its_vins(backend: Backend) {
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(1000);
    // Fresh, a fresh error, stale: of VINs first met in chunk 1 and of
    // VINs first met in chunk 2.
    let cached = |i: usize| match i % 600 {
        0..50 => Some((1, "NULL")),
        100..105 => Some((1, "'VIN_NOT_FOUND'")),
        110..115 => Some((1000, "NULL")),
        _ => None,
    };
    for (i, vin) in vins.iter().enumerate() {
        let Some((age_h, code)) = cached(i) else { continue };
        env.sql(
            &store,
            &format!("INSERT INTO vin_cache (vin, decoded_at, error_code, raw) VALUES ('{vin}', now() - make_interval(hours => {age_h}), {code}, '{{}}')"),
            &format!("INSERT INTO vin_cache (vin, decoded_at, error_code, raw) VALUES ('{vin}', unixepoch('subsec') - {age_h} * 3600, {code}, '{{}}')"),
        )
        .await;
    }
    // 12,000 rows in three chunks: VINs 0-599 ten times each in rows
    // 1-6,000 (chunks 1 and 2), VINs 600-999 fifteen times each in rows
    // 6,001-12,000 (first met in chunk 2, and again in chunk 3).
    let rows: Vec<String> = (0..12_000)
        .map(|i| if i < 6_000 { vins[(i * 7) % 600].clone() } else { vins[600 + (i * 7) % 400].clone() })
        .collect();
    assert!(rows.len() > 2 * vinetl::job::plan::CHUNK_ROWS);
    let spec = JobSpec::load(&env.spec(&rows, "http://127.0.0.1:9", "")).unwrap();
    let planned = vinetl::job::plan::submit(&store, &env.schema, &spec).await.unwrap();
    assert_eq!((planned.rows, planned.batches), (12_000, 45), "890 VINs to call, 20 a batch");
    let n = store.counts(planned.job_id).await.unwrap().unwrap();
    assert_eq!((n.rows, n.valid, n.duplicates, n.cache_hits), (12_000, 12_000, 11_000, 110), "{n:?}");
    // Decoded: 50 VINs ten times, 50 fifteen times; failed: 5 and 5.
    assert_eq!((n.decoded, n.failed, n.pending), (1_250, 125, 10_625), "{n:?}");
    env.cleanup().await;
}

/// The carried columns' types are recorded as the rows are planned, chunk
/// by chunk, and the output reads them from there: the same types as a scan
/// of every row gives, which is what a source planned before the record was
/// kept still gets (and keeps, once any of its rows went unrecorded).
async fn carried_types_are_recorded_as_rows_are_planned(backend: Backend) {
    use vinetl::columns::CarriedType::{Bool, Float, Int, Text};
    let env = Env::new(backend);
    let store = env.store().await;
    let vins = pattern_vins(4);
    let spec = JobSpec::load(&env.spec(&vins, "http://127.0.0.1:9", "")).unwrap();
    let job = store.create_job("carried", &serde_json::to_value(&spec).unwrap(), "h", None).await.unwrap();
    let row = |n: i64, carried: serde_json::Value| vinetl::store::PlannedRow {
        source: "s".into(),
        row_number: n,
        raw_vin: vins[n as usize % 4].clone(),
        vin: Some(vins[n as usize % 4].clone()),
        check_digit_valid: Some(true),
        error_code: None,
        error_text: None,
        carried,
    };
    use serde_json::json;
    // Column by column: int, then float (float); int (int); bool; text; an
    // integer past 64 bits (float); null, then int (int); one of 19 digits
    // (float: integers of at most 18); the least 64-bit integer (float, and
    // no overflow in a scan); never a value (text); a positive one of 19
    // digits that fits 64 bits (float); the largest and least of 18 (int).
    let first = [row(
        1,
        json!({"a": 1, "i": 7, "b": true, "t": "x", "big": 10_000_000_000_000_000_000_u64, "n": null,
               "d19": -1_000_000_000_000_000_000_i64, "min": i64::MIN, "p19": 1_000_000_000_000_000_000_i64,
               "d18": 999_999_999_999_999_999_i64}),
    )];
    let second = [
        row(
            2,
            json!({"a": 1.5, "i": -8, "b": false, "t": "y", "big": 5, "n": 3, "d19": 1, "min": 0, "p19": 1,
                      "d18": -999_999_999_999_999_999_i64}),
        ),
        row(3, json!({"a": 2, "i": 9, "b": null, "t": "z", "big": 6, "n": null, "d19": 2, "min": 1})),
    ];
    store.insert_rows(job, "s", &first, false, 720.0).await.unwrap();
    store.insert_rows(job, "s", &second, true, 720.0).await.unwrap();
    let carry: Vec<String> =
        ["a", "i", "b", "t", "big", "n", "d19", "min", "never", "p19", "d18"].map(String::from).to_vec();
    let recorded = store.carried_types(job, &carry).await.unwrap();
    let types: Vec<_> = recorded.iter().map(|(_, t)| *t).collect();
    assert_eq!(types, [Float, Int, Bool, Text, Float, Int, Float, Float, Text, Float, Int], "{recorded:?}");
    // A source with no record: every row is read instead, to the same types.
    env.sql(&store, "UPDATE job_sources SET carried_seen = NULL", "UPDATE job_sources SET carried_seen = NULL").await;
    assert_eq!(store.carried_types(job, &carry).await.unwrap(), recorded, "scanned");
    // Its later rows cannot complete a record that missed the earlier ones.
    let third = [row(4, json!({"a": "now text", "i": 1, "b": true, "t": "w", "big": 1, "n": 1}))];
    store.insert_rows(job, "s", &third, true, 720.0).await.unwrap();
    let scanned = store.carried_types(job, &carry).await.unwrap();
    assert_eq!((scanned[0].1, scanned[4].1), (Text, Float), "row 4's text, and row 1's big number: {scanned:?}");
    env.cleanup().await;
}

/// Retention: `vinetl prune` freezes an old ended job's counts and deletes
/// its rows, batches and errors, and old finished queue tasks, leaving newer
/// jobs alone; a dry run deletes nothing; a pruned job cannot be redone; a
/// spec's `[retention]` prunes its earlier jobs after each run, never the
/// run itself.
async fn retention_prunes_old_jobs_only(backend: Backend) {
    let env = Env::new(backend);
    let (server, _keys) = common::serve(Faults::default()).await;
    let spec = env.spec(&pattern_vins(60), &server.url(), "");
    let spec_path = spec.to_str().unwrap();
    for _ in 0..2 {
        let out = env.vinetl("YOUR_API_KEY", &["run", spec_path]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let store = env.store().await;
    let before = env.status(1).await;
    assert_eq!((before["rows"].as_i64(), before["calls_made"].as_i64()), (Some(60), Some(3)), "{before}");
    assert_eq!(env.status(2).await["calls_made"], 0, "the second run is all cache hits");
    // Job 1 ended 40 days ago, and so did the queue's tasks.
    env.sql(
        &store,
        "UPDATE jobs SET finished_at = finished_at - interval '40 days' WHERE job_id = 1",
        "UPDATE jobs SET finished_at = finished_at - 40 * 86400 WHERE job_id = 1",
    )
    .await;
    let queue = vinetl::job::queue::queue_name(&env.schema);
    let tasks = env
        .queue_sql(
            &store,
            &format!(
                "UPDATE apalis.jobs SET done_at = done_at - interval '40 days' WHERE status = 'Done' AND job_type = '{queue}'"
            ),
            "UPDATE Jobs SET done_at = done_at - 40 * 86400 WHERE status = 'Done'",
        )
        .await;
    assert_eq!(tasks, 3, "one finished task per call");
    let rows_of = |job: i64| {
        let store = store.clone();
        async move { store.prunable(0.0, None).await.unwrap().into_iter().find(|j| j.job_id == job).map(|j| j.rows) }
    };

    let dry = env.vinetl("unused", &["prune", "--older-than", "30d", "--dry-run", "--json"]).await;
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["jobs"].as_array().map(Vec::len), Some(1), "{dry}");
    assert_eq!((dry["jobs"][0]["job_id"].as_i64(), dry["jobs"][0]["rows"].as_i64()), (Some(1), Some(60)));
    assert_eq!(rows_of(1).await, Some(60), "a dry run deletes nothing");
    // A job listed as old, then run again (it ended just now), is left alone.
    assert!(!store.prune_job(2, 30.0 * 86400.0).await.unwrap(), "job 2 ended just now");

    let out = env.vinetl("unused", &["prune", "--older-than", "30d", "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pruned: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((pruned["jobs"][0]["job_id"].as_i64(), pruned["queue_tasks"].as_u64()), (Some(1), Some(3)), "{pruned}");
    assert_eq!(rows_of(1).await, None, "job 1 is pruned");
    assert_eq!(rows_of(2).await, Some(60), "job 2 is too young to prune");
    let after = env.status(1).await;
    assert!(after["pruned_at"].is_string(), "{after}");
    for key in ["state", "rows", "valid", "decoded", "calls_made", "batches", "batches_done"] {
        assert_eq!(after[key], before[key], "{key}: status shows the counts as they were");
    }
    for table in ["job_inputs", "job_sources", "batches"] {
        let sql = format!("DELETE FROM {table} WHERE job_id = 1");
        assert_eq!(env.sql(&store, &sql, &sql).await, 0, "job 1's {table} rows are gone");
    }
    let sql = "UPDATE job_inputs SET plan = plan WHERE job_id = 2";
    assert_eq!(env.sql(&store, sql, sql).await, 60, "job 2 keeps its rows");
    let again = env.vinetl("YOUR_API_KEY", &["reprocess", "1"]).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("was pruned"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A spec's retention (here: anything ended) prunes job 2 when job 3 is done.
    let text = std::fs::read_to_string(&spec).unwrap() + "[retention]\nolder_than = \"0s\"\n";
    std::fs::write(&spec, text).unwrap();
    let out = env.vinetl("YOUR_API_KEY", &["run", spec_path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.status(2).await["pruned_at"].is_string(), "job 2 pruned by job 3's retention");
    assert!(env.status(3).await.get("pruned_at").is_none(), "never the run itself");
    server.stop().await.unwrap();
    env.cleanup().await;
}

/// `vinetl write` restarts the writing phase and leaves the calls phase as
/// it ended: `status` does not count the time a job sat written as calling.
async fn a_rewrite_keeps_the_calls_phase(backend: Backend) {
    let env = Env::new(backend);
    let (server, _keys) = common::serve(Faults::default()).await;
    let out_dir = env.dir.path().join("out");
    let spec = env.spec(
        &pattern_vins(60),
        &server.url(),
        &format!("[[outputs]]\nkind = \"parquet\"\npath = \"{}\"", out_dir.display()),
    );
    let out = env.vinetl("YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = env.status(1).await["times"].clone();
    assert!(first["calls_secs"].is_f64() && first["writing_secs"].is_f64(), "{first}");
    // The job sits written for a while, then is written again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = env.vinetl("unused", &["write", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = env.status(1).await["times"].clone();
    assert_eq!(again["calls_secs"], first["calls_secs"], "the calls ended when they did: {first} then {again}");
    assert_ne!(again["write_started_at"], first["write_started_at"], "writing restarted: {again}");
    assert!(again["writing_secs"].as_f64().unwrap() < 1.5, "the rewrite's own time: {again}");
    assert_eq!(again["planning_secs"], first["planning_secs"]);
    server.stop().await.unwrap();
    env.cleanup().await;
}

/// Makes every writing job's writer look silent for two hours.
async fn stall_writers(store: &Store) {
    match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => {
            sqlx::query("UPDATE jobs SET updated_at = now() - interval '2 hours' WHERE state = 'writing'")
                .execute(pool)
                .await
                .map(drop)
                .unwrap()
        }
        (None, Some((pool, _))) => {
            sqlx::query("UPDATE jobs SET updated_at = unixepoch('subsec') - 7200 WHERE state = 'writing'")
                .execute(pool)
                .await
                .map(drop)
                .unwrap()
        }
        (None, None) => unreachable!(),
    }
}

/// A job's write has one writer at a time: a takeover (the writer's lease
/// ran out) gives the write a new token, the old writer's next beat says
/// it is no longer the writer, and it can neither finish nor fail the job
/// the new writer is writing. Takeovers come one job at a time.
async fn a_job_has_one_writer_and_a_replaced_one_ends_nothing(backend: Backend) {
    let env = Env::new(backend);
    let (server, _keys) = common::serve(Faults::default()).await;
    let out_dir = env.dir.path().join("out");
    let spec = env.spec(
        &pattern_vins(20),
        &server.url(),
        &format!("[[outputs]]\nkind = \"parquet\"\npath = \"{}\"", out_dir.display()),
    );
    for _ in 0..2 {
        let out = env.vinetl("YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let store = env.store().await;
    for job in [1, 2] {
        assert!(store.begin_rewrite(job, false).await.unwrap());
    }
    let a = store.take_write(1).await.unwrap().expect("job 1 is writing");
    assert!(store.heartbeat(1, &a).await.unwrap());
    // Both jobs' writers last beat two hours ago: one job is taken over per call.
    stall_writers(&store).await;
    let (first, b) = store.orphaned_write(3600.0).await.unwrap().expect("one taken over");
    assert_eq!(first, 1, "the oldest job first");
    assert_ne!(a, b);
    let (second, c) = store.orphaned_write(3600.0).await.unwrap().expect("then the other");
    assert_eq!(second, 2);
    assert!(store.orphaned_write(3600.0).await.unwrap().is_none(), "a writer that just took a job keeps it");
    // The replaced writer of job 1 is told, and ends nothing.
    assert!(!store.heartbeat(1, &a).await.unwrap(), "the old writer learns it was replaced");
    assert!(store.heartbeat(1, &b).await.unwrap());
    store.finish_writing(1, &["old writer's".to_string()], &a).await.unwrap();
    store.fail_writing(1, "old writer's failure", &a).await.unwrap();
    let s = env.status(1).await;
    assert_eq!(s["state"], "writing", "{s}");
    store.finish_writing(1, &["new writer's".to_string()], &b).await.unwrap();
    let s = env.status(1).await;
    assert_eq!((s["state"].as_str(), s["outputs"][0].as_str()), (Some("done"), Some("new writer's")), "{s}");
    // A writer given the write by the job's state takes it from a takeover
    // that lost it in turn; the takeover's end is then ignored too.
    let d = store.take_write(2).await.unwrap().expect("job 2 is writing");
    store.fail_writing(2, "the takeover's failure", &c).await.unwrap();
    assert_eq!(env.status(2).await["state"], "writing");
    store.fail_writing(2, "the writer's failure", &d).await.unwrap();
    let s = env.status(2).await;
    assert_eq!(
        (s["state"].as_str(), s["state_reason"].as_str()),
        (Some("failed"), Some("the writer's failure")),
        "{s}"
    );
    assert!(store.take_write(2).await.unwrap().is_none(), "a failed job is not writing");
    server.stop().await.unwrap();
    env.cleanup().await;
}

common::both_stores!(
    a_job_has_one_writer_and_a_replaced_one_ends_nothing,
    enqueue_is_idempotent,
    a_recreated_install_queues_its_jobs_again,
    a_dead_workers_batch_is_taken_over_once,
    a_batch_given_back_is_claimed_once_under_a_new_generation,
    a_batch_whose_job_was_cancelled_or_paused_makes_no_call,
    a_batch_is_requeued_only_by_its_task_while_its_job_runs,
    a_call_that_never_lands_is_ended_and_counted_once,
    a_failed_or_paused_job_is_reprocessed_once_its_calls_are_in,
    an_output_place_is_committed_by_one_writer_at_a_time,
    a_stale_task_makes_no_call_and_uses_no_quota,
    the_sweep_moves_on_a_job_nobody_advanced,
    the_limiter_holds_rate_burst_quota_and_in_flight,
    the_limiter_arithmetic_holds_for_any_interleaving,
    the_limiter_holds_across_differing_specs_and_quota_days,
    bare_429s_cut_the_rate_once_per_flight_and_back_off_more_each_time_in_a_row,
    counts_failures_and_reprocess,
    two_worker_processes_share_a_job,
    pause_then_resume_calls_each_batch_once,
    a_stored_answer_missing_a_vin_fails_that_row,
    a_group_of_answers_of_two_jobs_is_stored_as_each_alone,
    plans_are_decided_across_chunks,
    a_file_of_many_chunks_is_planned_by_its_vins,
    carried_types_are_recorded_as_rows_are_planned,
    retention_prunes_old_jobs_only,
    a_rewrite_keeps_the_calls_phase,
);
