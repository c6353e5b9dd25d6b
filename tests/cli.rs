//! The `vinetl` binary as a user runs it.

mod common;

use std::io::Write;

use common::vinetl;
use serde_json::Value;

fn check_json(args: &[&str]) -> Value {
    let out = vinetl().arg("check").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn check_reports_all_1000_pattern_vins_valid() {
    let r = check_json(&["tests/fixtures/pattern-vins.txt"]);
    assert_eq!(r["rows"], 1000);
    assert_eq!(r["valid"], 1000);
    assert_eq!(r["check_digit_mismatches"], 0);
    assert_eq!(r["duplicates"], 0);
}

#[test]
fn check_counts_the_public_vins_by_kind() {
    let r = check_json(&["tests/fixtures/public-vins.tsv", "--column", "vin"]);
    assert_eq!(r["rows"], 50);
    assert_eq!(r["valid"], 48);
    assert_eq!(r["invalid"]["illegal_letter"], 1);
    assert_eq!(r["invalid"]["wrong_length"], 1);
    assert_eq!(r["serial_not_numeric"], 1);
    // Three published bad check digits, plus real VINs whose makers ignore 565.15.
    assert!(r["check_digit_mismatches"].as_u64().unwrap() >= 4);
    let rows: Vec<u64> = r["examples"].as_array().unwrap().iter().map(|e| e["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, [29, 32], "rejected rows are named by their data row number");
}

#[test]
fn check_reads_gzip_csv_and_counts_duplicates_and_every_rejection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
    writeln!(gz, "unit,vin").unwrap();
    for (i, vin) in
        ["1HGCM82633A004352", "1hgcm82633a004352", "", "1HGCM8263", "1HGCM82633A00435Q", "1HGCM82633A0043_2"]
            .iter()
            .enumerate()
    {
        writeln!(gz, "{i},{vin}").unwrap();
    }
    gz.finish().unwrap();
    let r = check_json(&[path.to_str().unwrap()]);
    assert_eq!(r["rows"], 6);
    assert_eq!(r["valid"], 2);
    assert_eq!(r["duplicates"], 1);
    assert_eq!(r["invalid"]["empty"], 1);
    assert_eq!(r["invalid"]["wrong_length"], 1);
    assert_eq!(r["invalid"]["illegal_letter"], 1);
    assert_eq!(r["invalid"]["invalid_character"], 1);
}

#[test]
fn check_names_the_file_it_cannot_read() {
    let out = vinetl().args(["check", "no/such/file.txt"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/file.txt"), "{err}");
}

#[test]
fn every_subcommand_has_help() {
    for cmd in [
        "run",
        "submit",
        "worker",
        "status",
        "reprocess",
        "write",
        "cancel",
        "serve",
        "decode",
        "check",
        "migrate",
        "version",
    ] {
        let out = vinetl().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: vinetl"), "{cmd}: {text}");
    }
}

#[test]
fn a_reader_that_stops_early_does_not_make_vinetl_panic() {
    // `vinetl ... | head -1`: the pipe closes while vinetl is still writing.
    let mut child = vinetl()
        .arg("decode")
        .args(std::iter::repeat_n("1HGCM82633A004352", 300))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0));
}

/// `vinetl decode --file` with `args`, its stdout and stderr.
fn decode_file(args: &[&str], stdin: Option<&[u8]>) -> (String, String) {
    let mut child = vinetl()
        .args(["decode", "--file"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

#[test]
fn decode_file_writes_one_line_per_row_in_input_order_whatever_the_threads() {
    let (one, summary) = decode_file(&["jobs/sample-fleet.csv", "--threads", "1"], None);
    let (four, _) = decode_file(&["jobs/sample-fleet.csv", "--threads", "4"], None);
    assert_eq!(one, four, "the same lines, in the same order, on any number of threads");
    let lines: Vec<Value> = one.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 291, "one line per data row of the CSV");
    let rows: Vec<u64> = lines.iter().map(|l| l["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, (1..=291).collect::<Vec<_>>());
    let invalid: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(invalid.len(), 10, "the sample's ten invalid rows carry an error, not a decode");
    assert!(invalid.iter().all(|l| l["error"]["code"] == "INVALID_VIN"));
    let honda = lines.iter().find(|l| l["input"] == "1HGCM82633A004352").unwrap();
    assert_eq!((honda["Make"].as_str(), honda["ModelYear"].as_str()), (Some("HONDA"), Some("2003")));
    assert!(summary.contains("291 rows, 281 decoded") && summary.contains("10 invalid"), "{summary}");
}

#[test]
fn decode_file_keeps_input_order_across_many_chunks_and_threads() {
    // 6,500 rows: four chunks, decoded concurrently, written back in order.
    let dir = tempfile::tempdir().unwrap();
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let vins: Vec<&str> = pattern.lines().cycle().take(6_500).collect();
    let path = dir.path().join("vins.txt");
    std::fs::write(&path, vins.join("\n")).unwrap();
    let (out, _) = decode_file(&[path.to_str().unwrap(), "--threads", "3"], None);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6_500);
    for (i, (line, vin)) in lines.iter().zip(&vins).enumerate() {
        assert_eq!(line["row"], i as u64 + 1);
        assert_eq!(line["VIN"], *vin, "row {}", i + 1);
    }
}

#[test]
fn decode_file_reads_stdin_and_writes_csv_with_the_output_columns() {
    let input = b"1HGCM82633A004352\nnot a vin\n5YJSA1DG9DFP14705\n";
    let (csv, _) = decode_file(&["-", "--format", "csv"], Some(input));
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(&header[..4], ["row", "raw_vin", "vin", "status"]);
    assert!(header.contains(&"model_year".to_string()) && header.contains(&"plant_country".to_string()));
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 3);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(&records[0][col("make")], "HONDA");
    assert_eq!(&records[1][col("status")], "invalid");
    assert_eq!(&records[1][col("error_code")], "wrong_length");
    assert_eq!(&records[2][col("model")], "Model S");
}

#[test]
fn decode_file_writes_parquet_with_typed_columns_in_input_order() {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int32Type, Int64Type};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.parquet");
    let input = "1HGCM82633A004352\nnot a vin\nWBAJR31050CE20846\n".repeat(1_500);
    let mut child = vinetl()
        .args(["decode", "--file", "-", "--format", "parquet", "--threads", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&path).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = std::fs::File::open(&path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(batch.num_rows(), 4_500, "one row per input row, across chunks");
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(&names[..4], ["row", "raw_vin", "vin", "status"]);
    let col = |name: &str| batch.column(names.iter().position(|n| n == name).unwrap()).clone();
    let rows = col("row");
    let rows = rows.as_primitive::<Int64Type>();
    assert!((0..4_500).all(|i| rows.value(i) == i as i64 + 1), "input order");
    let (status, make, year) = (col("status"), col("make"), col("model_year"));
    let (status, make, year) = (status.as_string::<i32>(), make.as_string::<i32>(), year.as_primitive::<Int32Type>());
    assert_eq!((status.value(0), make.value(0), year.value(0)), ("decoded", "HONDA", 2003));
    assert_eq!(status.value(1), "invalid");
    assert!(make.is_null(1) && year.is_null(1));
    // A partial decode: the make from the WMI, no year.
    assert_eq!((make.value(2), year.is_null(2)), ("BMW", true));
}

#[test]
fn a_worker_logs_a_startup_line_as_json_with_the_password_masked() {
    let out = vinetl()
        .args(["--log-format", "json", "worker"])
        .env("DATABASE_URL", "postgres://vinetl:hunter2@127.0.0.1:1/test")
        .env_remove("VINETL_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nothing listens on port 1: {stderr}");
    let line: Value = serde_json::from_str(stderr.lines().next().unwrap()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(line["fields"]["message"], "vinetl worker starting", "{line}");
    assert_eq!(line["fields"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(line["fields"]["state"], "postgres://vinetl:***@127.0.0.1:1/test");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // Text logs into a pipe carry no colour codes.
    let text = vinetl()
        .arg("worker")
        .env("DATABASE_URL", "postgres://vinetl@127.0.0.1:1/test")
        .env_remove("VINETL_LOG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stderr);
    assert!(text.contains("vinetl worker starting") && !text.contains('\u{1b}'), "{text}");
}
