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

/// A Postgres output in the state store's own database is written on the
/// server (`Store::results_into`: the rows never reach the runner); it must
/// hold exactly what the streamed path writes from the same job: every
/// column of every row, the vehicles table too, for decoded, duplicate and
/// invalid rows, recall answers, carried columns that need COPY escapes,
/// and cached values that only the outputs' own reading of a value turns
/// into numbers (" 2003 ", "4.0", "abc", "1e3").
#[tokio::test(flavor = "multi_thread")]
async fn a_table_written_on_the_server_holds_what_the_streamed_rows_write() {
    use futures_util::StreamExt;
    use vinetl::io::output::{Rows, tables};
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("on_server");
    let dir = tempfile::tempdir().unwrap();
    let migrated = vinetl_async_env(&schema, KEY, &["migrate"], &[]).await;
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    let db = pool(&schema).await;
    // A cached decode with values that only the outputs' reading types.
    let raw = serde_json::json!({
        "VIN": "1HGCM82633A004352", "Make": "HONDA", "Model": "Accord", "ModelYear": " 2003 ", "Doors": "4.0",
        "EngineCylinders": "abc", "DisplacementL": "1e3", "Series": "back\\slash\ttab\nline", "Trim": "   ",
        "ErrorCode": "0"
    });
    sqlx::query("INSERT INTO vin_cache (vin, make, model, model_year, raw) VALUES ($1, 'HONDA', 'Accord', 2003, $2)")
        .bind("1HGCM82633A004352")
        .bind(&raw)
        .execute(&db)
        .await
        .unwrap();
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let mut csv = String::from("vin,unit,odo\n1HGCM82633A004352,U1,100\n1hgcm82633a004352,\"U\t2\",200.5\n");
    csv += "NOTAVIN,U3,\nJTDBT923291344240,\"back\\slash\",300\nWVWJF7CD8TW190545,\"quote\"\"d\",-1\n";
    for (i, vin) in pattern.lines().take(30).enumerate() {
        csv += &format!("{vin},P{i},{}\n", i * 1000);
    }
    csv += &format!("{},again,1\n", pattern.lines().next().unwrap());
    std::fs::write(dir.path().join("fleet.csv"), &csv).unwrap();
    let source = "kind = \"file\"\npath = \"fleet.csv\"\ncarry = [\"unit\", \"odo\"]";
    let spec = write_spec(dir.path(), source, &server.url(), "");
    let body = std::fs::read_to_string(&spec).unwrap();
    let output = |table: &str| {
        format!(
            "[recalls]\nenabled = true\n\n[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\n\
             results_table = \"results_{table}\"\nvehicles_table = \"vehicles_{table}\"\n"
        )
    };
    std::fs::write(&spec, format!("{body}{}", output("server"))).unwrap();
    let out = vinetl_async_env(&schema, KEY, &["run", spec.to_str().unwrap()], &[]).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("on the server"), "the run loaded its one table on the server: {log}");
    // Its pool had connections free: two sessions loaded a share each.
    assert!(log.contains("loading in 2 sessions"), "{log}");

    // The same job's rows, streamed, into tables of their own.
    let state = vinetl::cli::jobs::State::new(Some(&common::pg_url()), &schema).unwrap();
    let store = state.open(4).await.unwrap();
    let job = vinetl::spec::JobSpec::load(&spec).unwrap();
    assert!(tables::on_server(&store, &job.outputs, &[None]));
    let mut two = job.outputs.clone();
    two.push(two[0].clone());
    assert!(!tables::on_server(&store, &two, &[None, None]), "two outputs share one stream");
    let streamed_spec = dir.path().join("streamed.toml");
    std::fs::write(&streamed_spec, format!("{body}{}", output("streamed"))).unwrap();
    let streamed = vinetl::spec::JobSpec::load(&streamed_spec).unwrap();
    let rows: Vec<_> = store.output_rows(1, job.recalls.mode()).map(Result::unwrap).collect().await;
    assert_eq!(rows.len(), csv.lines().count() - 1, "one row per input row");
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let feed = tokio::spawn(async move {
        tx.send(Rows::Chunk(std::sync::Arc::new(rows))).await.unwrap();
        tx.send(Rows::End).await.unwrap();
    });
    let (n, _) = tables::write(&store, &streamed.outputs[0], 1, rx).await.unwrap();
    feed.await.unwrap();
    assert_eq!(n as usize, csv.lines().count() - 1);

    let differ = |a: &str, b: &str, cols: &str| {
        format!("SELECT count(*) FROM (SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b}) d")
    };
    let results_cols = "job_id, source, source_row, raw_vin, vin, status, error_code, error_text, decoded_at, \
        check_digit_valid, make, model, model_year, manufacturer, series, trim, vehicle_type, body_class, doors, \
        drive_type, fuel_type_primary, engine_configuration, engine_cylinders, displacement_l, transmission_style, \
        gvwr, plant_city, plant_state, plant_country, vpic_error_code, recall_count, has_recalls, \
        recall_campaigns, recall_error, carried";
    let vehicles_cols = "vin, decoded_at, make, model, model_year, manufacturer, series, trim, vehicle_type, \
        body_class, doors, drive_type, fuel_type_primary, engine_configuration, engine_cylinders, displacement_l, \
        transmission_style, gvwr, plant_city, plant_state, plant_country, vpic_error_code, recall_count, \
        has_recalls, recall_campaigns, recall_error, job_id";
    for (a, b, cols) in [
        ("results_server", "results_streamed", results_cols),
        ("results_streamed", "results_server", results_cols),
        ("vehicles_server", "vehicles_streamed", vehicles_cols),
        ("vehicles_streamed", "vehicles_server", vehicles_cols),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(differ(a, b, cols))).fetch_one(&db).await.unwrap();
        assert_eq!(n, 0, "{n} rows of {a} are not in {b}");
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM results_server").fetch_one(&db).await.unwrap();
    assert_eq!(total as usize, csv.lines().count() - 1);
    // `vin` compares bytes in both tables (its index builds faster), and
    // still joins a table of the database's own collation, by hash or merge.
    let collations: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, collation_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND column_name = 'vin'
           AND table_name IN ('results_server', 'vehicles_server') ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let c = Some("C".to_string());
    assert_eq!(collations, [("results_server".into(), c.clone()), ("vehicles_server".into(), c)]);
    for join in ["enable_mergejoin = off", "enable_hashjoin = off"] {
        let mut tx = db.begin().await.unwrap();
        for sql in ["SET LOCAL enable_nestloop = off".to_string(), format!("SET LOCAL {join}")] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
        }
        let joined: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM results_server r JOIN (SELECT DISTINCT upper(raw_vin) AS vin FROM job_inputs) f
             ON f.vin = r.vin",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let decoded: i64 = sqlx::query_scalar("SELECT count(*) FROM results_server WHERE vin IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(joined, decoded, "{join}");
    }

    // A results table made before partitioning (a plain table): written on
    // the server twice, then from streamed rows, it holds the job's rows
    // once, the same rows, and no load table stays behind.
    sqlx::query("CREATE TABLE results_plain (LIKE results_server INCLUDING DEFAULTS)").execute(&db).await.unwrap();
    sqlx::query("ALTER TABLE results_plain ADD PRIMARY KEY (job_id, source, source_row)").execute(&db).await.unwrap();
    let plain_spec = dir.path().join("plain.toml");
    std::fs::write(&plain_spec, format!("{body}{}", output("plain"))).unwrap();
    let plain = vinetl::spec::JobSpec::load(&plain_spec).unwrap();
    for feed in ["server", "server", "streamed"] {
        let written = if feed == "server" {
            tables::write_hashed(&store, &plain.outputs[0], 1, None, tables::Feed::OnServer(job.recalls.mode())).await
        } else {
            let rows: Vec<_> = store.output_rows(1, job.recalls.mode()).map(Result::unwrap).collect().await;
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Rows::Chunk(std::sync::Arc::new(rows))).await.unwrap();
            tx.send(Rows::End).await.unwrap();
            tables::write(&store, &plain.outputs[0], 1, rx).await
        };
        assert_eq!(written.unwrap().0, total as u64, "{feed}");
        for (a, b) in [("results_plain", "results_server"), ("results_server", "results_plain")] {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(differ(a, b, results_cols))).fetch_one(&db).await.unwrap();
            assert_eq!(n, 0, "{feed}: {n} rows of {a} are not in {b}");
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'results_plain_j%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(left, 0, "{feed}: a load table stayed");
    }
    // The cached oddities, as the outputs read them.
    let odd = sqlx::query(
        "SELECT model_year, doors, engine_cylinders, displacement_l, series, trim FROM results_server
         WHERE source_row = 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    use sqlx::Row as _;
    let int = |c: &str| odd.get::<Option<i32>, _>(c);
    let (series, trim): (Option<String>, Option<String>) = (odd.get("series"), odd.get("trim"));
    assert_eq!(
        (int("model_year"), int("doors"), int("engine_cylinders"), odd.get::<Option<f64>, _>("displacement_l")),
        (Some(2003), Some(4), None, Some(1000.0))
    );
    assert_eq!((series.as_deref(), trim), (Some("back\\slash\ttab\nline"), None));
    let kinds: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status || coalesce('/' || recall_error, '') || '/' || (recall_count IS NOT NULL)::text, count(*)
         FROM results_server GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(kinds.iter().any(|(k, _)| k.starts_with("invalid")), "{kinds:?}");
    assert!(kinds.iter().any(|(k, _)| k == "decoded/true"), "recall answers: {kinds:?}");

    // The rows the job above has none of: a VIN forgotten after the run (its
    // rows blanked), a decoded VIN whose cache row is gone, and recall
    // lookups that failed; written both ways in every recall mode.
    use vinetl::columns::RecallMode;
    store.forget_vin("JTDBT923291344240").await.unwrap();
    let uncached = pattern.lines().nth(3).unwrap();
    sqlx::query("DELETE FROM vin_cache WHERE vin = $1").bind(uncached).execute(&db).await.unwrap();
    let failed = sqlx::query(
        "UPDATE recall_lookups SET failed_at = now(), error_text = 'HTTP 503'
         WHERE lookup_key IN (SELECT lookup_key FROM recall_lookups ORDER BY lookup_key LIMIT 3)",
    )
    .execute(&db)
    .await
    .unwrap();
    assert!(failed.rows_affected() > 0);
    let output_of = |table: &str| {
        let path = dir.path().join(format!("{table}.toml"));
        std::fs::write(&path, format!("{body}{}", output(table))).unwrap();
        vinetl::spec::JobSpec::load(&path).unwrap().outputs.remove(0)
    };
    for mode in [RecallMode::ByModel, RecallMode::ByVin, RecallMode::Off] {
        let (on, off) = (format!("{}_server", mode.as_str()), format!("{}_streamed", mode.as_str()));
        let written = tables::write_hashed(&store, &output_of(&on), 1, None, tables::Feed::OnServer(mode)).await;
        assert_eq!(written.unwrap().0, total as u64, "{mode:?}");
        let rows: Vec<_> = store.output_rows(1, mode).map(Result::unwrap).collect().await;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(Rows::Chunk(std::sync::Arc::new(rows))).await.unwrap();
        tx.send(Rows::End).await.unwrap();
        tables::write(&store, &output_of(&off), 1, rx).await.unwrap();
        for (table, cols) in [("results", results_cols), ("vehicles", vehicles_cols)] {
            let (a, b) = (format!("{table}_{on}"), format!("{table}_{off}"));
            for (a, b) in [(&a, &b), (&b, &a)] {
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(differ(a, b, cols))).fetch_one(&db).await.unwrap();
                assert_eq!(n, 0, "{mode:?}: {n} rows of {a} are not in {b}");
            }
        }
        let kinds: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT coalesce(error_code, '-') || '/' || coalesce(split_part(recall_error, ':', 1), '-') || '/'
                    || (make IS NULL)::text
             FROM results_{on} WHERE status = 'decoded' ORDER BY 1"
        )))
        .fetch_all(&db)
        .await
        .unwrap();
        let expected: &[&str] = match mode {
            RecallMode::ByModel => &[
                "forgotten/no make, model and model year to look recalls up by/true",
                "-/recall lookup failed/false",
                "-/no make, model and model year to look recalls up by/true",
            ],
            RecallMode::ByVin => &[
                "forgotten/no make, model and model year to look recalls up by/true",
                "-/recalls were not looked up/false",
            ],
            RecallMode::Off => &["forgotten/-/true", "-/-/true", "-/-/false"],
        };
        for k in expected {
            assert!(kinds.iter().any(|have| have == k), "{mode:?}: no decoded row {k} in {kinds:?}");
        }
    }
    drop(db);
    server.stop().await.unwrap();
    cleanup(&schema).await;
}

/// A load on the server that the database refuses for the table's own sake
/// (here a results table given a NOT NULL column by hand) fails the job with
/// the database's reason, as a refused COPY does: it is not mistaken for a
/// store that went away, which would leave the job waiting to be written
/// again, forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_the_database_refuses_fails_the_server_load_with_the_reason() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("refused");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vins.txt"), "1HGCM82633A004352\nJTDBT923291344240\n").unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!("[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results\"\n");
    std::fs::write(&spec, text).unwrap();
    let first = vinetl_async_env(&schema, KEY, &["run", spec.to_str().unwrap()], &[]).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // Someone adds a column the load cannot fill.
    let db = pool(&schema).await;
    for sql in ["TRUNCATE results", "ALTER TABLE results ADD COLUMN audited_by TEXT NOT NULL"] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    let out = vinetl_async_env(&schema, KEY, &["run", spec.to_str().unwrap()], &[]).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("on the server"), "{log}");
    let s = common::status(&schema, 2).await;
    let reason = s["state_reason"].as_str().unwrap_or_default();
    assert_eq!(s["state"], "failed", "{s}");
    assert!(reason.contains("writing outputs failed") && reason.contains("audited_by"), "{s}");
    drop(db);
    server.stop().await.unwrap();
    cleanup(&schema).await;
}

/// The vehicles table holds each VIN's latest decode: of a job's rows the
/// one decoded last (wherever it sits), never a row with no decode time or
/// not decoded, and a later job's older decode never overwrites it. Written
/// through a partitioned results table and through a plain one (made before
/// partitioning), whose rows load through a temporary table.
#[tokio::test(flavor = "multi_thread")]
async fn the_vehicles_table_keeps_each_vins_latest_decode() {
    use sqlx::types::chrono::{TimeZone, Utc};
    use vinetl::io::output::{Rows, tables};
    let schema = unique_schema("latest");
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = common::migrated_store(&schema).await;
    let at = |day: u32| Some(Utc.with_ymd_and_hms(2026, 11, day, 12, 0, 0).unwrap());
    let row = |n: i64, vin: &str, status: &str, decoded_at, model: &str| {
        let mut row = common::decoded_row(n, vin, decoded_at, "HONDA", model);
        row.status = status.into();
        row.vehicle[2..].fill(None);
        row
    };
    let (a, b, c, d) = ("1HGCM82633A004352", "JTDBT923291344240", "WVWJF7CD8TW190545", "1FTFW1ET5DFC10312");
    let first = vec![
        row(1, a, "decoded", at(2), "Old"),
        row(2, a, "decoded", at(3), "New"),
        row(3, a, "decoded", at(1), "Oldest"),
        row(4, b, "decoded", None, "Untimed"),
        row(5, c, "failed", at(3), "Failed"),
        row(6, d, "decoded", at(2), "Kept"),
    ];
    let second = vec![row(1, a, "decoded", at(1), "Older"), row(2, d, "decoded", at(4), "Newer")];
    for layout in ["parted", "plain"] {
        let path = dir.path().join(format!("{layout}.toml"));
        let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"fleet.csv\"", "http://127.0.0.1:9", "");
        let body = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(
            &path,
            format!(
                "{body}[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results_{layout}\"\n\
                 vehicles_table = \"vehicles_{layout}\"\n"
            ),
        )
        .unwrap();
        if layout == "plain" {
            // Like the partitioned table, made just before, with `vin` in
            // the database's collation, as an earlier vinetl made it.
            for sql in [
                "CREATE TABLE results_plain (LIKE results_parted INCLUDING DEFAULTS)",
                "ALTER TABLE results_plain ALTER COLUMN vin TYPE text COLLATE \"default\"",
                "ALTER TABLE results_plain ADD PRIMARY KEY (job_id, source, source_row)",
            ] {
                sqlx::query(sql).execute(&db).await.unwrap();
            }
        }
        let output = vinetl::spec::JobSpec::load(&path).unwrap().outputs.remove(0);
        for (job, rows) in [(1, &first), (2, &second), (2, &second)] {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Rows::Chunk(std::sync::Arc::new(rows.clone()))).await.unwrap();
            tx.send(Rows::End).await.unwrap();
            tables::write(&store, &output, job, rx).await.unwrap();
        }
        let vehicles: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT vin, model, job_id FROM vehicles_{layout} ORDER BY vin"
        )))
        .fetch_all(&db)
        .await
        .unwrap();
        let mut expected = vec![(a.to_string(), "New".to_string(), 1), (d.to_string(), "Newer".to_string(), 2)];
        expected.sort();
        assert_eq!(vehicles, expected, "{layout}");
    }
    drop(db);
    cleanup(&schema).await;
}

/// Rewriting a job's partition keeps the results table readable while the
/// vehicles upsert runs: the upsert comes before the swap, whose lock on
/// the results table (a detach) is held only until the commit. A session
/// holds one of the job's vehicles so the rewrite's upsert waits on it;
/// meanwhile a reader with a short lock timeout still reads the job's old
/// rows.
#[tokio::test(flavor = "multi_thread")]
async fn the_results_table_stays_readable_while_a_rewrite_upserts_vehicles() {
    use sqlx::types::chrono::{TimeZone, Utc};
    use vinetl::io::output::{Rows, tables};
    let schema = unique_schema("readable");
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = common::migrated_store(&schema).await;
    let output = results_output(dir.path(), &schema);
    let vins = ["1HGCM82633A004352", "JTDBT923291344240", "WVWJF7CD8TW190545"];
    let at = Some(Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).unwrap());
    let rows: Vec<_> = (0..3).map(|i| common::decoded_row(i as i64 + 1, vins[i], at, "HONDA", "HONDA")).collect();
    let write = |store: vinetl::store::Store| {
        let (output, rows) = (output.clone(), rows.clone());
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Rows::Chunk(std::sync::Arc::new(rows))).await.unwrap();
            tx.send(Rows::End).await.unwrap();
            tables::write(&store, &output, 1, rx).await
        })
    };
    write(store.clone()).await.unwrap().unwrap();

    let mut holder = db.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *holder).await.unwrap();
    sqlx::query("SELECT 1 FROM vehicles WHERE vin = $1 FOR UPDATE").bind(vins[0]).execute(&mut *holder).await.unwrap();
    let rewrite = write(store.clone());
    common::blocked_by(&db, holder_pid, "the rewrite's vehicles upsert").await;
    let mut reader = db.acquire().await.unwrap();
    sqlx::query("SET lock_timeout = '1s'").execute(&mut *reader).await.unwrap();
    let read =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results WHERE job_id = 1").fetch_one(&mut *reader).await;
    holder.rollback().await.unwrap();
    assert_eq!(read.expect("the results table is readable while the vehicles are upserted"), 3);
    assert_eq!(rewrite.await.unwrap().unwrap().0, 3);
    drop((reader, db));
    cleanup(&schema).await;
}

/// Two writers of one job's tables (one whose lease ran out while it was
/// stalled, and the one that took the job over) never load at once: the
/// second waits for the first's session lock on the job's load, else it
/// would drop the first's load table as a leftover, or its new partition.
#[tokio::test]
async fn a_second_writer_of_a_jobs_tables_waits_for_the_first() {
    use sqlx::types::chrono::{TimeZone, Utc};
    use vinetl::io::output::{Rows, tables};
    let schema = unique_schema("onewriter");
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = common::migrated_store(&schema).await;
    let output = results_output(dir.path(), &schema);
    let at = Some(Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).unwrap());
    let rows = vec![common::decoded_row(1, "1HGCM82633A004352", at, "HONDA", "HONDA")];
    // The first writer, stalled mid-load: a session holding the lock.
    let mut first = db.acquire().await.unwrap();
    let first_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *first).await.unwrap();
    let mark = format!("vinetl load of {schema}.results for job 1");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))").bind(&mark).execute(&mut *first).await.unwrap();
    let second = tokio::spawn({
        let store = store.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Rows::Chunk(std::sync::Arc::new(rows))).await.unwrap();
            tx.send(Rows::End).await.unwrap();
            tables::write(&store, &output, 1, rx).await
        }
    });
    common::blocked_by(&db, first_pid, "the second writer's load").await;
    // The first ends (or dies): the second loads.
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))").bind(&mark).execute(&mut *first).await.unwrap();
    assert_eq!(second.await.unwrap().unwrap().0, 1);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = 1").fetch_one(&db).await.unwrap();
    assert_eq!(n, 1);
    drop((first, db));
    cleanup(&schema).await;
}

/// A Postgres output of a results table `results` in `schema`, from a spec
/// written in `dir`.
fn results_output(dir: &std::path::Path, schema: &str) -> vinetl::spec::OutputSpec {
    let spec = write_spec(dir, "kind = \"file\"\npath = \"fleet.csv\"", "http://127.0.0.1:9", "");
    let body = std::fs::read_to_string(&spec).unwrap();
    let out = format!("{body}[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results\"\n");
    std::fs::write(&spec, out).unwrap();
    vinetl::spec::JobSpec::load(&spec).unwrap().outputs.remove(0)
}
