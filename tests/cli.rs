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
    for cmd in
        ["run", "submit", "worker", "status", "reprocess", "write", "cancel", "serve", "decode", "check", "migrate"]
    {
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
