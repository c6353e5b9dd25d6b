//! Outputs end to end: a real job writes a Parquet dataset (local, and on
//! S3 through s3s-fs) and Postgres tables; DuckDB and pyarrow read the
//! dataset back (tests/readers/read_dataset.py); a reprocess replaces it; a
//! crashed write is recognisable and cleaned up by the next one.

mod common;

use common::{S3Server, cleanup, pool, unique_schema, vinetl_async_env, write_spec};
use serde_json::Value;
use vinetl::serve::faults::Faults;

const KEY: &str = "YOUR_API_KEY";
const KNOWN: &[(&str, &str)] =
    &[("1HGCM82633A004352", "HONDA"), ("JTDBT923291344240", "TOYOTA"), ("WVWJF7CD8TW190545", "VOLKSWAGEN")];

/// Runs the readers on a dataset root and returns what they saw.
fn read_back(root: &str, endpoint: Option<&str>, env: &[(&str, &str)]) -> Value {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("tests/readers/read_dataset.py").arg(root).envs(env.iter().copied());
    if let Some(e) = endpoint {
        cmd.args(["--endpoint", e]);
    }
    for (vin, _) in KNOWN {
        cmd.args(["--vin", vin]);
    }
    let out = cmd.output().expect("python3 runs (scripts/test installs duckdb and pyarrow)");
    assert!(out.status.success(), "read_dataset.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Where a scenario writes.
enum Dest<'a> {
    Local(&'a std::path::Path),
    S3(&'a S3Server),
}

impl Dest<'_> {
    fn root(&self) -> String {
        match self {
            Dest::Local(dir) => dir.join("out/fleet").display().to_string(),
            Dest::S3(_) => "s3://warehouse/vinetl/fleet".to_string(),
        }
    }
    fn output_toml(&self) -> String {
        match self {
            Dest::Local(_) => format!("path = \"{}\"", self.root()),
            Dest::S3(s3) => format!("path = \"{}/\"\nendpoint = \"{}\"", self.root(), s3.endpoint),
        }
    }
    fn endpoint(&self) -> Option<&str> {
        match self {
            Dest::Local(_) => None,
            Dest::S3(s3) => Some(&s3.endpoint),
        }
    }
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Dest::Local(_) => vec![],
            Dest::S3(s3) => s3.env(),
        }
    }
    /// Simulates a writer killed between retiring the marker and writing the
    /// new one: no `_SUCCESS`, and a staging directory left behind.
    async fn crash(&self, partition: &str) {
        let leftover = format!("_temporary/job-1-00000000deadbeef/{partition}/part-00000.parquet");
        match self {
            Dest::Local(dir) => {
                let root = dir.join("out/fleet");
                std::fs::remove_file(root.join(partition).join("_SUCCESS")).unwrap();
                let junk = root.join(&leftover);
                std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
                std::fs::write(junk, b"half a file").unwrap();
            }
            Dest::S3(s3) => {
                let c = s3.client();
                c.delete_object()
                    .bucket("warehouse")
                    .key(format!("vinetl/fleet/{partition}/_SUCCESS"))
                    .send()
                    .await
                    .unwrap();
                c.put_object()
                    .bucket("warehouse")
                    .key(format!("vinetl/fleet/{leftover}"))
                    .body(b"half a file".to_vec().into())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }
    async fn staging_left(&self) -> usize {
        match self {
            Dest::Local(dir) => usize::from(dir.join("out/fleet/_temporary").exists()),
            Dest::S3(s3) => {
                let listed = s3
                    .client()
                    .list_objects_v2()
                    .bucket("warehouse")
                    .prefix("vinetl/fleet/_temporary/")
                    .send()
                    .await
                    .unwrap();
                listed.contents().len()
            }
        }
    }
}

/// Checks one committed dataset of the sample fleet.
fn assert_dataset(seen: &Value, partition: &str) {
    assert_eq!(seen["incomplete"], serde_json::json!([]), "{seen}");
    let part = &seen["partitions"][partition];
    assert_eq!(part["committed"], true, "{seen}");
    assert_eq!(part["manifest_rows"], 291);
    // Every input row, once.
    assert_eq!(seen["pyarrow"]["rows"], 291);
    let duck = &seen["duckdb"];
    assert_eq!(duck["rows"], 291, "{duck}");
    assert_eq!(duck["distinct_rows"], 291, "{duck}");
    assert_eq!(duck["by_status"], serde_json::json!({"decoded": 281, "invalid": 10}));
    // Typed columns, the carried columns, the partition read as a date.
    let pa = &seen["pyarrow"]["schema"];
    for (col, t) in [
        ("job_id", "int64"),
        ("source_row", "int64"),
        ("vin", "string"),
        ("model_year", "int32"),
        ("engine_cylinders", "int32"),
        ("displacement_l", "double"),
        ("decoded_at", "timestamp[us, tz=UTC]"),
        ("check_digit_valid", "bool"),
        ("recall_count", "int32"),
        ("has_recalls", "bool"),
        ("recall_campaigns", "list<item: string>"),
        ("unit_id", "string"),
        ("depot", "string"),
        ("dt", "date32[day]"),
    ] {
        assert_eq!(pa[col], t, "pyarrow type of {col}: {pa}");
    }
    let types = &duck["types"];
    for (col, t) in
        [("model_year", "INTEGER"), ("displacement_l", "DOUBLE"), ("recall_campaigns", "VARCHAR[]"), ("dt", "DATE")]
    {
        assert_eq!(types[col], t, "DuckDB type of {col}: {types}");
    }
    for (vin, make) in KNOWN {
        assert_eq!(duck["makes"][vin], *make, "{vin}: {duck}");
    }
    // Recalls: known for every decoded row with a make, model and year.
    let with = duck["rows_with_recalls"].as_i64().unwrap();
    let without = duck["rows_without_recalls"].as_i64().unwrap();
    let unknown = duck["decoded_rows_recalls_unknown"].as_i64().unwrap();
    assert_eq!(with + without + unknown, 281, "{duck}");
    assert!(with > 0, "the shipped recall sample covers some of the fleet: {duck}");
}

async fn scenario(dest: Dest<'_>, dir: &std::path::Path) {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("out");
    std::fs::copy("jobs/sample-fleet.csv", dir.join("fleet.csv")).unwrap();
    let spec = write_spec(
        dir,
        "kind = \"file\"\npath = \"fleet.csv\"\ncarry = [\"unit_id\", \"depot\", \"acquired_on\"]",
        &server.url(),
        "",
    );
    let extra = format!(
        "[recalls]\nenabled = true\n\n[[outputs]]\nkind = \"parquet\"\n{}\n\n[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"fleet_results\"\nvehicles_table = \"fleet_vehicles\"\n",
        dest.output_toml()
    );
    let text = std::fs::read_to_string(&spec).unwrap() + &extra;
    std::fs::write(&spec, text).unwrap();
    let env = dest.env();

    let out = vinetl_async_env(&schema, KEY, &["run", spec.to_str().unwrap()], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("output") && stdout.contains("dt="), "{stdout}");

    let db = pool(&schema).await;
    let date: String = sqlx::query_scalar("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM jobs")
        .fetch_one(&db)
        .await
        .unwrap();
    let partition = format!("dt={date}");
    assert_dataset(&read_back(&dest.root(), dest.endpoint(), &env), &partition);

    // Postgres: one row per input row; the latest decode per VIN.
    let results = |db: sqlx::PgPool| async move {
        let (rows, distinct, decoded_vins): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (source, source_row)), count(DISTINCT vin) FILTER (WHERE status = 'decoded')
             FROM fleet_results WHERE job_id = 1",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let vehicles: i64 = sqlx::query_scalar("SELECT count(*) FROM fleet_vehicles").fetch_one(&db).await.unwrap();
        (rows, distinct, decoded_vins, vehicles)
    };
    let (rows, distinct, decoded_vins, vehicles) = results(db.clone()).await;
    assert_eq!((rows, distinct), (291, 291));
    assert_eq!(vehicles, decoded_vins);
    let (make, year, campaigns): (String, i32, Option<Vec<String>>) =
        sqlx::query_as("SELECT make, model_year, recall_campaigns FROM fleet_vehicles WHERE vin = '1HGCM82633A004352'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((make.as_str(), year), ("HONDA", 2003));
    assert!(campaigns.is_some(), "recalls were looked up for a decoded Honda");

    // A reprocess replaces the output wholesale: same rows, no duplicates,
    // and (everything cached) no new call.
    let calls_before: i64 = sqlx::query_scalar("SELECT calls_made FROM jobs").fetch_one(&db).await.unwrap();
    let out = vinetl_async_env(&schema, KEY, &["reprocess", "1"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_dataset(&read_back(&dest.root(), dest.endpoint(), &env), &partition);
    assert_eq!(results(db.clone()).await, (rows, distinct, decoded_vins, vehicles));
    let calls_after: i64 = sqlx::query_scalar("SELECT calls_made FROM jobs").fetch_one(&db).await.unwrap();
    assert_eq!(calls_after, calls_before, "a reprocess of a cached job makes no call");

    // A write that died midway: no marker, so readers see it as incomplete...
    dest.crash(&partition).await;
    let seen = read_back(&dest.root(), dest.endpoint(), &env);
    assert_eq!(seen["incomplete"], serde_json::json!([partition]), "{seen}");
    assert!(seen.get("pyarrow").is_none(), "nothing committed is read: {seen}");
    // ...and the next attempt cleans up and commits.
    let out = vinetl_async_env(&schema, KEY, &["reprocess", "1"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_dataset(&read_back(&dest.root(), dest.endpoint(), &env), &partition);
    assert_eq!(dest.staging_left().await, 0, "staging is cleaned up");

    drop(db);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_dataset_reads_back_whole_and_a_reprocess_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    scenario(Dest::Local(dir.path()), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_dataset_reads_back_whole_and_a_reprocess_replaces_it() {
    let s3 = S3Server::start();
    s3.client().create_bucket().bucket("warehouse").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    scenario(Dest::S3(&s3), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_output_fails_the_job_with_the_reason_and_keeps_every_result() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("outfail");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vins.txt"), "1HGCM82633A004352\nJTDBT923291344240\n").unwrap();
    let blocker = dir.path().join("blocked");
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!("[[outputs]]\nkind = \"parquet\"\npath = \"{}/ds\"\n", blocker.display());
    std::fs::write(&spec, text).unwrap();
    // Writable at submit (the preflight checks), then, before the write, the
    // output's parent becomes a file (a disk swapped, a mount gone).
    let out = vinetl_async_env(&schema, KEY, &["submit", spec.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&blocker).unwrap();
    std::fs::write(&blocker, b"").unwrap();
    let worker = common::spawn_worker(&schema, KEY);
    let mut s = common::status(&schema, 1).await;
    for _ in 0..300 {
        if s["state"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s = common::status(&schema, 1).await;
    }
    drop(worker);
    let reason = s["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("writing outputs failed") && reason.contains("blocked/ds"), "{s}");
    assert!(reason.contains("vinetl reprocess 1"), "says how to recover: {s}");
    // The decodes are kept: fixing the path and reprocessing calls nothing.
    std::fs::remove_file(&blocker).unwrap();
    let out = vinetl_async_env(&schema, KEY, &["reprocess", "1"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = common::status(&schema, 1).await;
    assert_eq!(s["state"], "done");
    assert_eq!(s["calls_made"], 1, "{s}");
    let db = pool(&schema).await;
    let date: String = sqlx::query_scalar("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM jobs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(vinetl::io::output::dataset::is_committed(&blocker.join("ds").join(format!("dt={date}"))));
    drop(db);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_file_goes_up_in_parts_and_appears_whole() {
    let s3 = S3Server::start();
    let client = s3.client();
    client.create_bucket().bucket("warehouse").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.parquet");
    // 40 MB: three parts of 16 MB.
    let body: Vec<u8> = (0..40 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&local, &body).unwrap();
    let store = vinetl::io::s3::S3::from_client(client.clone());
    let url = vinetl::io::s3::S3Url::parse("s3://warehouse/ds/part-00000.parquet").unwrap();
    assert_eq!(store.upload_file(&local, &url).await.unwrap(), body.len() as u64);
    let got = client.get_object().bucket("warehouse").key("ds/part-00000.parquet").send().await.unwrap();
    let bytes = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(bytes.len(), body.len());
    assert!(bytes == body, "the object is the file, byte for byte");
    // A multipart upload leaves an ETag of the form "md5-parts".
    let head = client.head_object().bucket("warehouse").key("ds/part-00000.parquet").send().await.unwrap();
    assert!(head.e_tag().unwrap_or_default().contains("-3"), "uploaded in 3 parts: {:?}", head.e_tag());
}

/// The outputs read one stream of the job's rows; if it stops short (the
/// state store went away mid-write), no output commits what it got: the
/// dataset partition and the results table keep the job's earlier, whole
/// output.
#[tokio::test(flavor = "multi_thread")]
async fn rows_that_stop_short_commit_no_output() {
    use futures_util::StreamExt;
    use vinetl::io::output::{Rows, dataset, tables};
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("short");
    let dir = tempfile::tempdir().unwrap();
    let vins: Vec<&str> = KNOWN.iter().map(|(v, _)| *v).collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!(
            "[[outputs]]\nkind = \"parquet\"\npath = \"{}/ds\"\npartition = \"none\"\n\n[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results\"\n",
            dir.path().display()
        );
    std::fs::write(&spec, text).unwrap();
    let out = vinetl_async_env(&schema, KEY, &["run", spec.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let state = vinetl::cli::jobs::State::new(Some(&common::pg_url()), &schema).unwrap();
    let store = state.open(4).await.unwrap();
    let job = vinetl::spec::JobSpec::load(&spec).unwrap();
    let first: Vec<_> = store.output_rows(1, job.recalls.mode()).take(1).map(Result::unwrap).collect().await;
    let short = || {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.try_send(Rows::Chunk(std::sync::Arc::new(first.clone()))).unwrap();
        rx // the sender is dropped: no `End`
    };
    let e = dataset::write(&store, 1, &job, &job.outputs[0], false, short()).await.expect_err("no commit");
    assert!(e.to_string().contains("stopped before the end"), "{e}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ds/_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rows"], 3, "the earlier, whole output stays: {manifest}");
    assert!(dataset::is_committed(&dir.path().join("ds")));

    let e = tables::write(&store, &job.outputs[1], 1, short()).await.expect_err("no commit");
    assert!(e.to_string().contains("stopped before the end"), "{e}");
    let db = pool(&schema).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = 1").fetch_one(&db).await.unwrap();
    assert_eq!(n, 3, "the job's earlier rows stay");
    drop(db);
    server.stop().await.unwrap();
    cleanup(&schema).await;
}
