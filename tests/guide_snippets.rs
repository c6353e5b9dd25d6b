//! The integration guide's own cURL, Python and JavaScript snippets, run
//! verbatim against `vinetl serve` with only the host changed.

mod common;

use std::process::Command;

use common::ServeProcess;

const GUIDE_HOST: &str = "https://www.carvinapi.com";

/// Runs `tests/guide/FILE` with `program`, the guide's host swapped for `url`.
fn run_snippet(program: &str, file: &str, url: &str) -> String {
    let text = std::fs::read_to_string(format!("tests/guide/{file}")).unwrap();
    assert!(text.contains(GUIDE_HOST), "{file} calls the guide's host");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, text.replace(GUIDE_HOST, url)).unwrap();
    let out = Command::new(program).arg(&path).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{file}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn curl_snippets() {
    let server = ServeProcess::start(&[]);
    let decode = json(&run_snippet("bash", "decode.sh", &server.url));
    assert_eq!(decode["success"], true);
    assert_eq!(decode["data"]["Make"], "HONDA");
    assert_eq!(decode["data"]["ModelYear"], "1991");

    let batch = json(&run_snippet("bash", "batch-decode.sh", &server.url));
    let makes: Vec<&str> = batch["data"].as_array().unwrap().iter().map(|v| v["Make"].as_str().unwrap()).collect();
    assert_eq!(makes, ["HONDA", "TESLA", "BMW"]);

    let by_vin = json(&run_snippet("bash", "recalls-by-vin.sh", &server.url));
    assert_eq!(by_vin, serde_json::json!({"success": true, "recalls": []}), "no model decoded, no recalls");
    let by_vehicle = json(&run_snippet("bash", "recalls-by-vehicle.sh", &server.url));
    assert_eq!(by_vehicle["success"], true);
    assert!(by_vehicle["recalls"].is_array());
}

#[test]
fn python_requests_snippet() {
    let server = ServeProcess::start(&[]);
    let out = run_snippet("python3", "decode.py", &server.url);
    // Make, then the (empty) model vPIC has for the textbook VIN.
    assert_eq!(out, "HONDA\n\n");
}

#[test]
fn javascript_fetch_snippets() {
    let server = ServeProcess::start(&[]);
    let out = run_snippet("node", "decode.mjs", &server.url);
    // Make, the (empty) model, and the guide's `.Year`: vPIC's ModelYear,
    // under the name the example reads.
    assert_eq!(out, "HONDA\n\n1991\n");

    let out = run_snippet("node", "batch-decode.mjs", &server.url);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["HONDA  (1991)", "TESLA Model S (2013)", "BMW 328i (2011)"]);
    assert_eq!(lines[3], "decodeAll: 45");

    let out = run_snippet("node", "recalls.mjs", &server.url);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("⚠️ ") && lines[0].ends_with(" active recall(s) found:"), "{out}");
    let n: usize = lines[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(n >= 1);
    assert!(lines[1..=n].iter().all(|l| l.starts_with(" - ") && l.contains(": ")), "{out}");
    assert!(lines.iter().any(|l| l.contains("EQUIPMENT: Tesla Motors")), "{out}");
    assert_eq!(lines[n + 1], "✅ No active recalls found");
}

#[test]
fn javascript_retry_snippet_backs_off_on_a_429_storm() {
    let server = ServeProcess::start(&["--fault-429", "1"]);
    let out = run_snippet("node", "retry.mjs", &server.url);
    assert_eq!(
        out,
        "valid: true false\nRate limited. Retrying in 1000ms...\nRate limited. Retrying in 2000ms...\n\
         Rate limited. Retrying in 4000ms...\nfinal: gave up\n"
    );
}
