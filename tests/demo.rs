//! The README's first command: `cargo run --release -- run jobs/demo.toml`
//! on a machine with no services. Here the same binary (the test build) runs
//! the same arguments in a fresh directory holding a copy of `jobs/`, with no
//! DATABASE_URL and no API key: SQLite state, the embedded API server, the
//! shipped sample fleet, Parquet under ./out/.

mod common;

use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn line<'a>(summary: &'a str, label: &str) -> &'a str {
    summary.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no {label:?} in {summary}"))
}

fn number(summary: &str, label: &str) -> i64 {
    line(summary, label)[label.len() + 2..].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_demo_runs_end_to_end_with_no_services() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new("jobs"), &dir.path().join("jobs"));
    let out = common::vinetl()
        .args(["run", "jobs/demo.toml"])
        .current_dir(dir.path())
        .env_remove("CARVIN_API_KEY")
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{summary}{stderr}");
    // No terminal: progress is logged every few seconds, and once more at the end.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains("progress job=1")).collect();
    assert!(progress.len() >= 2, "{stderr}");
    assert!(progress.last().unwrap().contains("state=done") && progress[0].contains("calls="), "{stderr}");

    // The summary: rows, decoded, invalid, calls made and saved, recalls found, where the output is.
    assert!(summary.contains("job 1 (demo): done"), "{summary}");
    assert_eq!(number(&summary, "rows read"), 291);
    assert_eq!(number(&summary, "decoded"), 281);
    assert_eq!(number(&summary, "invalid"), 10);
    assert_eq!(number(&summary, "duplicates"), 18);
    let calls = number(&summary, "calls made");
    let recall_calls = number(&summary, "recall calls");
    // 263 distinct valid VINs: 14 batch decodes, and one recall call per make/model/year.
    assert_eq!(calls - recall_calls, 14, "{summary}");
    assert_eq!(recall_calls, number(&summary, "recall lookups"), "{summary}");
    assert!(line(&summary, "recalls found").contains("campaigns"), "{summary}");
    assert!(line(&summary, "state").contains("SQLite file vinetl.db"), "{summary}");
    let output = line(&summary, "output").trim_start_matches(|c: char| !c.is_whitespace()).trim().to_string();
    assert!(output.contains("out/demo/dt="), "{summary}");
    assert!(dir.path().join("vinetl.db").is_file());

    // The Parquet output, read back by DuckDB and pyarrow.
    let read = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers/read_dataset.py"))
        .arg(dir.path().join("out/demo"))
        .args(["--vin", "1HGCM82633A004352", "--vin", "JTDBT923291344240", "--vin", "WVWJF7CD8TW190545"])
        .output()
        .unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(seen["incomplete"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["duckdb"]["rows"], 291, "{seen}");
    assert_eq!(seen["duckdb"]["distinct_rows"], 291);
    let makes = &seen["duckdb"]["makes"];
    assert_eq!(makes["1HGCM82633A004352"], "HONDA", "{makes}");
    assert_eq!(makes["JTDBT923291344240"], "TOYOTA", "{makes}");
    assert_eq!(makes["WVWJF7CD8TW190545"], "VOLKSWAGEN", "{makes}");

    // Run again: every decode and recall comes from the SQLite cache.
    let again = common::vinetl().args(["run", "jobs/demo.toml"]).current_dir(dir.path()).output().unwrap();
    let summary = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{summary}");
    assert_eq!(number(&summary, "calls made"), 0, "{summary}");
    assert_eq!(number(&summary, "cache hits"), 263, "{summary}");
}
