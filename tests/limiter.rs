//! The shared limiter in Postgres: many clients, one limit, the database's clock.

mod common;

use std::time::Duration;

use common::{cleanup, pg_url, status, unique_schema, vinetl_async, write_spec};
use vinetl::serve::faults::Faults;

/// A job spec whose `[provider]` section ends with `provider` (TOML lines).
fn spec_with_provider(provider: &str) -> vinetl::spec::JobSpec {
    let text = format!(
        "name = \"t\"\n[source]\nkind = \"file\"\npath = \"x\"\n[provider]\nbase_url = \"http://x\"\napi_key_env = \"K\"\n{provider}"
    );
    vinetl::spec::JobSpec::parse("t.toml", &text).unwrap()
}

/// A Postgres store for the test's schema, and its pool.
struct Pg {
    store: vinetl::store::Store,
    pool: sqlx::PgPool,
}

async fn store(schema: &str) -> Pg {
    let url = vinetl::store::DatabaseUrl::parse(&pg_url()).unwrap();
    let (store, _) = vinetl::store::Store::open(&url, schema, 10).await.unwrap();
    let pool = store.pg_pool().expect("Postgres").clone();
    Pg { store, pool }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reservations_never_exceed_rate_plus_burst_in_any_second() {
    let schema = unique_schema("gcra");
    let s = store(&schema).await;
    sqlx::query("INSERT INTO limiter (account, rate, burst) VALUES ('acct', 20, 5)").execute(&s.pool).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = s.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            while tokio::time::Instant::now() < deadline {
                // Clients ask for one to three slots at a time.
                let k = 1 + granted.len() % 3;
                let (n, at): (i32, f64) =
                    sqlx::query_as("SELECT granted, extract(epoch FROM at)::float8 FROM limiter_reserve('acct', $1)")
                        .bind(k as i32)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                assert!(n as usize <= k);
                granted.extend(std::iter::repeat_n(at, n as usize));
            }
            granted
        }));
    }
    let mut grants: Vec<f64> = Vec::new();
    for t in tasks {
        grants.extend(t.await.unwrap());
    }
    grants.sort_by(f64::total_cmp);
    assert!(grants.len() > 5, "{} grants", grants.len());
    for (i, &start) in grants.iter().enumerate() {
        let in_window = grants[i..].iter().take_while(|&&u| u < start + 1.0).count();
        assert!(in_window <= 25, "{in_window} grants within one second");
    }
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daily_quota_holds_across_clients_and_says_when_it_resets() {
    let schema = unique_schema("quota");
    let s = store(&schema).await;
    sqlx::query("INSERT INTO limiter (account, rate, burst, daily_quota) VALUES ('acct', 1000, 1000, 30)")
        .execute(&s.pool)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = s.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..20 {
                // Asking for two at a time near the end gets the one that is left.
                let (granted,): (i32,) =
                    sqlx::query_as("SELECT granted FROM limiter_reserve('acct', 2)").fetch_one(&pool).await.unwrap();
                n += granted;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 30);
    let (granted, wait, reason): (i32, f64, String) =
        sqlx::query_as("SELECT granted, wait_secs, reason FROM limiter_reserve('acct', 1)")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(granted, 0);
    assert_eq!(reason, "quota");
    assert!(wait > 0.0 && wait <= 86_400.0, "waits until the next UTC midnight: {wait}");
    cleanup(&schema).await;
}

/// `vinetl worker` processes on one job, `n` of them.
async fn run_with_workers(schema: &str, key: &str, spec: &std::path::Path, n: usize) -> serde_json::Value {
    let out = vinetl_async(schema, key, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let workers: Vec<_> = (0..n).map(|_| common::spawn_worker(schema, key)).collect();
    for _ in 0..1200 {
        let s = status(schema, 1).await;
        if s["state"] == "done" {
            drop(workers);
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job never finished: {}", status(schema, 1).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_under_the_configured_rate_get_no_429s() {
    // The key allows 5 requests a second; the spec asks for 4 (burst 1) and a daily quota.
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("threeworkers");
    let dir = tempfile::tempdir().unwrap();
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    std::fs::write(dir.path().join("vins.txt"), vins.lines().take(240).collect::<Vec<_>>().join("\n")).unwrap();
    let spec =
        write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "burst = 1\ndaily_quota = 1000")
            .to_path_buf();
    let text = std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 4");
    std::fs::write(&spec, text).unwrap();
    let s = run_with_workers(&schema, "pro-5-per-second", &spec, 3).await;
    assert_eq!(s["decoded"], 240);
    assert_eq!(s["rate_limited"], 0, "{s}");
    assert_eq!(s["calls_made"], 12);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_configured_twice_too_high_still_completes_every_row() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("twicetoohigh");
    let dir = tempfile::tempdir().unwrap();
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    std::fs::write(dir.path().join("vins.txt"), vins.lines().take(400).collect::<Vec<_>>().join("\n")).unwrap();
    let spec =
        write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "burst = 2\nmax_attempts = 2");
    let text = std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 10");
    std::fs::write(&spec, text).unwrap();
    let s = run_with_workers(&schema, "pro-5-per-second", &spec, 3).await;
    assert_eq!(s["decoded"], 400, "{s}");
    assert_eq!((s["failed"].as_i64(), s["dead_lettered_batches"].as_i64()), (Some(0), Some(0)));
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_up_quota_makes_the_job_wait_in_words_instead_of_failing() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("waiting");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "daily_quota = 3");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let worker = common::spawn_worker(&schema, "YOUR_API_KEY");
    let mut s = status(&schema, 1).await;
    // Waiting, with the calls already in flight when the quota ran out stored.
    for _ in 0..300 {
        if s["state"] == "waiting" && s["pending"] == 940 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&schema, 1).await;
    }
    drop(worker);
    assert_eq!(s["state"], "waiting", "{s}");
    assert!(s["state_reason"].as_str().unwrap().contains("daily quota"), "{s}");
    assert_eq!(s["calls_made"], 3, "the quota holds");
    assert_eq!(
        (s["failed"].as_i64(), s["dead_lettered_batches"].as_i64()),
        (Some(0), Some(0)),
        "waiting is not failing"
    );
    assert_eq!(s["decoded"], 60);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_without_retry_after_halves_the_shared_rate_which_recovers_slowly() {
    let schema = unique_schema("aimd");
    let s = store(&schema).await;
    let spec = spec_with_provider("requests_per_second = 10\n");
    let limiter = vinetl::call::limiter::SharedLimiter::register(&s.store, &spec.provider).await.unwrap();
    let scale =
        || async { sqlx::query_scalar::<_, f64>("SELECT scale FROM limiter").fetch_one(&s.pool).await.unwrap() };
    // Two calls, each granted after the cut the one before caused.
    limiter.push_back(None, db_now(&s.pool).await).await.unwrap();
    limiter.push_back(None, db_now(&s.pool).await).await.unwrap();
    assert!((scale().await - 0.25).abs() < 1e-9);
    // Everyone is pushed back by one interval at the reduced rate (0.4 s),
    // and 1 s for the second bare 429 in a row.
    let blocked: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM blocked_until - clock_timestamp())::float8 FROM limiter")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert!(blocked > 1.0 && blocked <= 1.4, "{blocked}");
    for _ in 0..10 {
        limiter.answered(true).await.unwrap();
    }
    assert!((scale().await - 0.35).abs() < 1e-9, "1 % back per success");
    // A group of stored answers tells the limiter once, for all of them.
    limiter.succeeded(5).await.unwrap();
    assert!((scale().await - 0.40).abs() < 1e-9, "5 successes told at once recover as 5 told one by one");
    // A Retry-After only ever moves the push-back later.
    limiter.push_back(Some(Duration::from_secs(30)), db_now(&s.pool).await).await.unwrap();
    limiter.push_back(Some(Duration::from_secs(1)), db_now(&s.pool).await).await.unwrap();
    let blocked: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM blocked_until - clock_timestamp())::float8 FROM limiter")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert!(blocked > 25.0, "{blocked}");
    match limiter.try_reserve(1).await.unwrap() {
        Err(vinetl::call::limiter::Denied::Later { reason, .. }) => assert_eq!(reason, "blocked"),
        other => panic!("{other:?}"),
    }
    cleanup(&schema).await;
}

/// The database's clock, as Unix seconds (what a slot's `granted_at` holds).
async fn db_now(pool: &sqlx::PgPool) -> f64 {
    sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8").fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn many_waiting_calls_share_reservation_round_trips() {
    let schema = unique_schema("batchres");
    let s = store(&schema).await;
    let spec = spec_with_provider("requests_per_second = 400\nburst = 16\n");
    let limiter = vinetl::call::limiter::SharedLimiter::register(&s.store, &spec.provider).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let l = limiter.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let slot = l.acquire().await.unwrap().unwrap();
                l.release(slot).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let used: i64 = sqlx::query_scalar("SELECT day_used FROM limiter").fetch_one(&s.pool).await.unwrap();
    // Every slot taken from the quota was used by exactly one call: none
    // lost, none made up (slots banked but never used go back).
    assert_eq!(used, 400, "{used} slots taken from the quota for 400 calls");
    // ...and 16 concurrent callers needed far fewer round trips than calls.
    assert!(limiter.round_trips() < 200, "{} round trips for 400 calls", limiter.round_trips());
    eprintln!("400 calls, {} reservation round trips, {used} slots granted", limiter.round_trips());
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_flight_cap_holds_across_processes_and_a_dead_workers_place_comes_back() {
    let schema = unique_schema("inflight");
    let s = store(&schema).await;
    let spec = spec_with_provider("requests_per_second = 1000\nburst = 50\nmax_in_flight = 3\n");
    // Three limiters stand for three worker processes: only the database is shared.
    let mut limiters = Vec::new();
    for _ in 0..3 {
        limiters.push(vinetl::call::limiter::SharedLimiter::register(&s.store, &spec.provider).await.unwrap());
    }
    let now_in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for l in &limiters {
        for _ in 0..3 {
            let (l, now_in_flight, most) = (l.clone(), now_in_flight.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..8 {
                    let slot = l.acquire().await.unwrap().unwrap();
                    let n = now_in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    now_in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    l.release(slot).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=3).contains(&most), "at most 3 calls in flight across processes, saw {most}");
    // Workers that died holding every place: while their leases last, no call
    // may start; once they expire, the places come back.
    let fill = |ago: &'static str| {
        let pool = s.pool.clone();
        async move {
            sqlx::query("DELETE FROM limiter_flights").execute(&pool).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO limiter_flights (account, expires_at)
                 SELECT account, now() + interval '{ago}' FROM limiter, generate_series(1, 3)"
            )))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    fill("1 minute").await;
    match limiters[0].try_reserve(1).await.unwrap() {
        Err(vinetl::call::limiter::Denied::Later { reason, .. }) => assert_eq!(reason, "in_flight"),
        other => panic!("a fourth call in flight: {other:?}"),
    }
    fill("-1 second").await;
    let slot = tokio::time::timeout(Duration::from_secs(5), limiters[0].acquire())
        .await
        .expect("three expired leases give their places back")
        .unwrap()
        .unwrap();
    limiters[0].release(slot).await;
    cleanup(&schema).await;
}
