//! The served OpenAPI document matches the server: schemathesis (from PyPI)
//! generates requests from it and checks every answer against it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::ServeProcess;

/// schemathesis from `$VINETL_SCHEMATHESIS`, or PATH (scripts/test puts
/// its pinned venv first on PATH).
fn schemathesis() -> PathBuf {
    if let Ok(p) = std::env::var("VINETL_SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    match Command::new("schemathesis").arg("--version").output() {
        Ok(o) if o.status.success() => PathBuf::from("schemathesis"),
        _ => panic!("schemathesis is not on PATH: run the tests with scripts/test, which installs it (pinned)"),
    }
}

#[test]
fn schemathesis_finds_no_difference_between_the_document_and_the_server() {
    let server = ServeProcess::start(&[]);
    let out = Command::new(schemathesis())
        .args(["run", &format!("{}/api/v1/openapi.json", server.url)])
        .args(["--header", "Authorization: Bearer YOUR_API_KEY"])
        // Every check, including negative data rejection, positive data
        // acceptance and ignored auth; a fixed seed keeps runs reproducible.
        .args(["--checks", "all", "--max-examples", "100", "--seed", "1", "--generation-database", "none"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found differences:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("No issues found"), "{text}");
}
