//! `vin_hash` end to end: a real job writes a Parquet dataset with
//! `vin_hash = "instead"` (no VIN anywhere in its files, a `vin_hmac` column
//! in its place) and Postgres tables with `vin_hash = "beside"` (`vin` and
//! a matching `vin_hmac`); the hashes are checked against HMAC-SHA-256
//! computed here, independently; without the key, `run` stops before
//! anything is called and a worker's write fails naming the variable.

mod common;

use arrow::array::{Array, AsArray};
use common::{cleanup, pool, unique_schema, write_spec};
use hmac::{Hmac, Mac};
use vinetl::serve::faults::Faults;

const KEY: &str = "YOUR_API_KEY";
const HASH_VAR: &str = "VINETL_VIN_HASH_KEY";
const HASH_KEY: &str = "test-only VIN hash key, 32 bytes";

fn hmac_hex(vin: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HASH_KEY.as_bytes()).unwrap();
    mac.update(vin.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The `vinetl` binary on `schema`, with the hash key only when given (never
/// inherited from the test's own environment).
fn vinetl(schema: &str, args: &[&str], hash_key: Option<&str>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    cmd.args(args)
        .env("DATABASE_URL", common::pg_url())
        .env("VINETL_SCHEMA", schema)
        .env("CARVIN_API_KEY", KEY)
        .env_remove(HASH_VAR)
        .kill_on_drop(true);
    if let Some(k) = hash_key {
        cmd.env(HASH_VAR, k);
    }
    cmd
}

/// Every VIN cell of the sample fleet long enough to be recognisable in a
/// file's bytes, as read and upper-cased.
fn input_vins() -> Vec<String> {
    let mut reader = csv::Reader::from_path("jobs/sample-fleet.csv").unwrap();
    let at = reader.headers().unwrap().iter().position(|h| h == "vin").unwrap();
    let mut vins: Vec<String> = reader
        .records()
        .map(|r| r.unwrap()[at].trim().to_string())
        .filter(|v| v.len() >= 10)
        .flat_map(|v| [v.to_uppercase(), v])
        .collect();
    vins.sort();
    vins.dedup();
    vins
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hashed_dataset_holds_no_vin_and_postgres_keeps_the_vin_beside_its_hash() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("vinhash");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("jobs/sample-fleet.csv", dir.path().join("fleet.csv")).unwrap();
    let spec =
        write_spec(dir.path(), "kind = \"file\"\npath = \"fleet.csv\"\ncarry = [\"unit_id\"]", &server.url(), "");
    let ds = dir.path().join("ds");
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!(
            "[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\npartition = \"none\"\nvin_hash = \"instead\"\n\n\
             [[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results\"\n\
             vehicles_table = \"vehicles\"\nvin_hash = \"beside\"\n",
            ds.display()
        );
    std::fs::write(&spec, text).unwrap();
    let spec = spec.to_str().unwrap();

    let out = vinetl(&schema, &["run", spec], Some(HASH_KEY)).output().await.unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(HASH_KEY), "the key is never printed");

    // Postgres: every row keeps its VIN, with the hash of it beside.
    let db = pool(&schema).await;
    let results: Vec<(i64, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT source_row, vin, vin_hmac FROM results WHERE job_id = 1 ORDER BY source_row")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(results.len(), 291);
    for (row, vin, vin_hmac) in &results {
        assert_eq!(*vin_hmac, vin.as_deref().map(hmac_hex), "row {row}");
    }
    assert_eq!(results.iter().filter(|r| r.2.is_some()).count(), 281, "every valid row is hashed, no invalid one");
    let vehicles: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT vin, vin_hmac FROM vehicles").fetch_all(&db).await.unwrap();
    assert!(!vehicles.is_empty());
    for (vin, vin_hmac) in &vehicles {
        assert_eq!(vin_hmac.as_deref(), Some(hmac_hex(vin).as_str()), "{vin}");
    }

    // Parquet: `vin_hmac` where `raw_vin` and `vin` were, and the same
    // hashes, row for row.
    let batches = common::parquet_batches(&ds);
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(&names[..5], ["job_id", "source", "source_row", "vin_hmac", "status"], "{names:?}");
    assert!(!names.iter().any(|n| n == "vin" || n == "raw_vin"), "{names:?}");
    assert_eq!(batch.num_rows(), 291);
    let rows = batch.column_by_name("source_row").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
    let hashes = batch.column_by_name("vin_hmac").unwrap().as_string::<i32>();
    for i in 0..batch.num_rows() {
        let (row, _, want) = results.iter().find(|r| r.0 == rows.value(i)).unwrap();
        let got = hashes.is_valid(i).then(|| hashes.value(i).to_string());
        assert_eq!(&got, want, "row {row}");
    }
    // No VIN of the input anywhere: not in any text of any column...
    let vins = input_vins();
    assert!(vins.len() > 250, "{}", vins.len());
    for (f, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let column = match column.as_list_opt::<i32>() {
            Some(list) => list.values().clone(),
            None => column.clone(),
        };
        let Some(strings) = column.as_string_opt::<i32>() else { continue }; // numbers, times, booleans
        for value in strings.iter().flatten() {
            assert!(!vins.iter().any(|v| value.contains(v.as_str())), "a VIN in column {}: {value}", f.name());
        }
    }
    // ...nor in the bytes of any file (statistics, dictionaries, manifest).
    let files = common::files_under(&ds);
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "parquet")), "{files:?}");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        for vin in &vins {
            assert!(!bytes.windows(vin.len()).any(|w| w == vin.as_bytes()), "{vin} in {}", file.display());
        }
    }

    // Without the key: `run` stops before anything is called...
    let out = vinetl(&schema, &["run", spec], None).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(HASH_VAR) && stderr.contains("outputs[0]"), "{stderr}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&db).await.unwrap();
    assert_eq!(jobs, 1, "no job was made");
    // ...and a worker without it fails the write, naming the variable and
    // the output, and leaves every output as it was.
    let out = vinetl(&schema, &["submit", spec], None).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let worker = vinetl(&schema, &["worker", "--concurrency", "2"], None).spawn().unwrap();
    let s = common::wait_for_state(&schema, 2, "failed").await;
    drop(worker);
    let reason = s["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(HASH_VAR) && reason.contains("outputs[0] (parquet"), "{s}");
    assert!(reason.contains("vinetl write 2"), "says how to recover: {s}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["job_id"], 1, "job 1's dataset stays: {manifest}");
    assert!(vinetl::io::output::dataset::is_committed(&ds));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = 2").fetch_one(&db).await.unwrap();
    assert_eq!(n, 0);

    drop(db);
    server.stop().await.unwrap();
    cleanup(&schema).await;
}
