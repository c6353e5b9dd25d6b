//! The bad-input corpus (`tests/fixtures/bad/`, plus a few made here: a
//! 10 MB line, S3 and Postgres sources that fail): every case runs as a
//! user would run it (`vinetl run SPEC` against a real API server), and its
//! outcome is one of three, in one table:
//!
//! - refused before anything is stored (exit 2), on one line naming the
//!   file, setting or key;
//! - the job fails while planning (exit 3), naming the file (and row);
//! - the job ends, every input row one output row, per-row problems as
//!   error rows naming their file and row.
//!
//! In every case no call is made for a row that was not a valid VIN, and a
//! job that fails or is refused writes no output at all.

mod common;

use std::path::Path;

use common::{S3Server, ServeProcess, audit_lines, cleanup, pg_url, unique_schema, vinetl_async_env, write_spec};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad");

/// What a case must end as.
#[derive(Debug)]
enum Expect {
    /// Exit 2 before any job is stored: the error names all of these.
    Refused(&'static [&'static str]),
    /// Exit 3: the job failed while planning; the error line names all of these.
    FailedPlan(&'static [&'static str]),
    /// The job ended with `rows` output rows, `decoded` of them decoded;
    /// the rest are error rows whose error text is one of `errors`.
    Done { rows: usize, decoded: usize, errors: &'static [&'static str] },
}

struct Case {
    name: &'static str,
    /// The spec's `[source]` body; `{dir}` is the case's directory.
    source: String,
    /// Extra provider settings (or a whole broken line).
    extra: &'static str,
    expect: Expect,
}

fn file(path: &str, extra_source: &str) -> String {
    format!("kind = \"file\"\npath = \"{path}\"\n{extra_source}")
}

/// Output rows of a local dataset: (source_row, status, error_text).
fn output_rows(dir: &Path) -> Vec<(i64, String, Option<String>)> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    let mut out = Vec::new();
    for batch in common::parquet_batches(dir) {
        let col = |n: &str| batch.column(batch.schema().index_of(n).unwrap()).clone();
        let (row, status, error) = (col("source_row"), col("status"), col("error_text"));
        let (row, status, error) =
            (row.as_primitive::<Int64Type>(), status.as_string::<i32>(), error.as_string::<i32>());
        for i in 0..batch.num_rows() {
            let e = (!error.is_null(i)).then(|| error.value(i).to_string());
            out.push((row.value(i), status.value(i).to_string(), e));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_is_refused_failed_or_an_error_row_and_costs_no_call() {
    let s3 = S3Server::start();
    let client = s3.client();
    client.create_bucket().bucket("fleet").send().await.unwrap();
    client
        .put_object()
        .bucket("fleet")
        .key("ok.txt")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"1HGCM82633A004352\n"))
        .send()
        .await
        .unwrap();
    let endpoint = s3.endpoint.clone();
    let s3_source =
        |url: &str| format!("kind = \"s3\"\nurl = \"{url}\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"");
    // A role that may connect but read nothing, for the permission case.
    let schema = unique_schema("bad");
    let admin = common::pool("public").await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {schema}.fleet (id int PRIMARY KEY, vin text)")))
        .execute(&admin)
        .await
        .unwrap();
    let role = format!("{schema}_reader");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN"))).execute(&admin).await.unwrap();
    let no_rights = pg_url().replacen("postgres@", &format!("{role}@"), 1);

    let ten_mb = "X".repeat(10 * 1024 * 1024);
    let cases = vec![
        Case {
            name: "empty file",
            source: file("empty.txt", ""),
            extra: "",
            expect: Expect::Done { rows: 0, decoded: 0, errors: &[] },
        },
        Case {
            name: "empty file under min_rows",
            source: file("empty.txt", "min_rows = 1"),
            extra: "",
            expect: Expect::FailedPlan(&["min_rows"]),
        },
        Case {
            name: "header-only CSV",
            source: file("header-only.csv", ""),
            extra: "",
            expect: Expect::Done { rows: 0, decoded: 0, errors: &[] },
        },
        Case {
            name: "rows with too few or too many fields",
            source: file("ragged-rows.csv", "carry = [\"unit\", \"depot\"]"),
            extra: "",
            expect: Expect::Done { rows: 4, decoded: 2, errors: &["where the header has 3"] },
        },
        Case {
            name: "a 10 MB line",
            source: file("ten-mb-line.txt", ""),
            extra: "",
            expect: Expect::Done { rows: 3, decoded: 2, errors: &["wrong_length", "characters"] },
        },
        Case {
            name: "a line too long and one too short",
            source: file("long-and-short.txt", ""),
            extra: "",
            expect: Expect::Done { rows: 2, decoded: 1, errors: &["characters"] },
        },
        Case {
            name: "bytes that are not UTF-8",
            source: file("not-utf8.txt", ""),
            extra: "",
            expect: Expect::FailedPlan(&["not-utf8.txt", "row 2", "UTF-8"]),
        },
        Case {
            name: "binary garbage",
            source: file("garbage.txt", ""),
            extra: "",
            expect: Expect::Refused(&["source", "garbage.txt row 1", "UTF-8"]),
        },
        Case {
            name: "truncated gzip",
            source: file("truncated.txt.gz", ""),
            extra: "",
            expect: Expect::FailedPlan(&["truncated.txt.gz"]),
        },
        Case {
            name: "truncated zstd",
            source: file("truncated.txt.zst", ""),
            extra: "",
            expect: Expect::Refused(&["source", "truncated.txt.zst", "incomplete frame"]),
        },
        Case {
            name: "a Parquet VIN column of integers",
            source: file("integer-vin.parquet", ""),
            extra: "",
            expect: Expect::Refused(&["source", "integer-vin.parquet", "vin"]),
        },
        Case {
            name: "a wrong vin_column",
            source: file("no-vin-column.csv", ""),
            extra: "",
            expect: Expect::Refused(&["source", "no column \"vin\""]),
        },
        Case {
            name: "a CSV header holding terminal escape sequences, quoted and never replayed",
            source: file("escape-header.csv", ""),
            extra: "",
            expect: Expect::Refused(&["source", "no column \"vin\"", "\"unit\"", "\\u{1b}]0;pwned\\u{7}"]),
        },
        Case {
            name: "a CSV separated by semicolons (the delimiter is sniffed)",
            source: file("semicolons.csv", ""),
            extra: "",
            expect: Expect::Done { rows: 1, decoded: 1, errors: &[] },
        },
        Case {
            name: "an unclosed quote",
            source: file("unclosed-quote.csv", ""),
            extra: "",
            expect: Expect::Done { rows: 1, decoded: 0, errors: &["is a quote left open?"] },
        },
        Case {
            name: "a glob that matches nothing",
            source: file("nothing-*.csv", ""),
            extra: "",
            expect: Expect::Refused(&["source", "matches no files"]),
        },
        Case {
            name: "a missing file",
            source: file("missing.txt", ""),
            extra: "",
            expect: Expect::Refused(&["source", "missing.txt"]),
        },
        Case {
            name: "a missing S3 object",
            source: s3_source("s3://fleet/missing.txt"),
            extra: "",
            expect: Expect::Refused(&["source", "s3://fleet/missing.txt"]),
        },
        Case {
            name: "a missing S3 bucket",
            source: s3_source("s3://no-such-bucket/vins.txt"),
            extra: "",
            expect: Expect::Refused(&["source", "no-such-bucket"]),
        },
        Case {
            name: "wrong S3 credentials",
            source: s3_source("s3://fleet/ok.txt"),
            extra: "#wrong-credentials",
            expect: Expect::Refused(&["source", "s3://fleet/ok.txt"]),
        },
        Case {
            name: "a Postgres query with a syntax error",
            source: "kind = \"postgres\"\nurl_env = \"SOURCE_DATABASE_URL\"\nquery = \"SELEC vin FROM fleet\"".into(),
            extra: "",
            expect: Expect::Refused(&["source", "syntax error"]),
        },
        Case {
            name: "a Postgres table with no permission",
            source: format!(
                "kind = \"postgres\"\nurl_env = \"NO_RIGHTS_URL\"\ntable = \"{schema}.fleet\"\ncolumn = \"vin\"\nkey = \"id\""
            ),
            extra: "",
            expect: Expect::Refused(&["source", "permission denied"]),
        },
        Case {
            name: "a spec key of the wrong type",
            source: file("long-and-short.txt", ""),
            extra: "max_attempts = \"five\"",
            expect: Expect::Refused(&["max_attempts"]),
        },
        Case {
            name: "an unknown spec key",
            source: file("long-and-short.txt", ""),
            extra: "retries = 3",
            expect: Expect::Refused(&["retries"]),
        },
    ];
    assert!(cases.len() >= 20);

    for (i, case) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(FIXTURES).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        std::fs::write(dir.path().join("ten-mb-line.txt"), format!("1HGCM82633A004352\n{ten_mb}\n5FNRL1832YZ485166\n"))
            .unwrap();
        let log = dir.path().join("audit.jsonl");
        let server = ServeProcess::start(&["--audit-log", log.to_str().unwrap()]);
        let extra = case.extra.trim_start_matches("#wrong-credentials");
        let spec = write_spec(dir.path(), &case.source, &server.url, extra);
        let out_dir = dir.path().join("out");
        let text = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(&spec, format!("{text}[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n", out_dir.display()))
            .unwrap();
        let case_schema = format!("{schema}_{i}");
        let secret = if case.extra == "#wrong-credentials" { "not-the-secret" } else { common::S3_SECRET_KEY };
        let envs = [
            ("AWS_ACCESS_KEY_ID", common::S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_REGION", "us-east-1"),
            ("NO_RIGHTS_URL", no_rights.as_str()),
        ];
        let out = vinetl_async_env(&case_schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()], &envs).await;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let calls = audit_lines(&log).iter().filter(|l| l["path"] != "/api/v1/openapi.json").count();
        let written = output_rows(&out_dir);
        let what = format!("case {:?}: exit {:?}\nstdout: {stdout}\nstderr: {stderr}", case.name, out.status.code());
        // Nothing here is worth a call but the valid VINs of the Done cases.
        match &case.expect {
            Expect::Refused(names) => {
                assert_eq!(out.status.code(), Some(2), "{what}");
                // The error (a TOML error quotes the line below its first).
                let error = &stderr[stderr.find("vinetl: error:").unwrap_or(0)..];
                assert!(names.iter().all(|n| error.contains(n)), "{what}");
                assert_eq!((calls, written.len()), (0, 0), "no call, no output: {what}");
                // Input is quoted, never replayed to the terminal.
                let raw = stderr.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t'));
                assert_eq!(raw, None, "a raw control character on stderr: {what:?}");
            }
            Expect::FailedPlan(names) => {
                assert_eq!(out.status.code(), Some(3), "{what}");
                let verdict = stderr.lines().find(|l| l.starts_with("vinetl: error:")).unwrap_or_default();
                assert!(
                    verdict.contains("failed while planning") && names.iter().all(|n| verdict.contains(n)),
                    "{what}"
                );
                assert_eq!((calls, written.len()), (0, 0), "no call, no output: {what}");
            }
            Expect::Done { rows, decoded, errors } => {
                assert!(matches!(out.status.code(), Some(0) | Some(4)), "{what}");
                assert_eq!(written.len(), *rows, "one output row per input row: {what}\n{written:?}");
                let rows_seen: Vec<i64> = written.iter().map(|r| r.0).collect();
                assert_eq!(rows_seen, (1..=*rows as i64).collect::<Vec<_>>(), "each row once: {what}");
                assert_eq!(written.iter().filter(|r| r.1 == "decoded").count(), *decoded, "{what}\n{written:?}");
                for (row, status, error) in written.iter().filter(|r| r.1 != "decoded") {
                    let error = error.as_deref().unwrap_or_default();
                    assert!(
                        errors.iter().any(|e| error.contains(e)) && error.len() < 500,
                        "row {row} ({status}) says what is wrong, briefly: {error:?}\n{what}"
                    );
                }
                assert!(calls <= 1, "valid VINs only, in one batch: {calls} calls: {what}");
            }
        }
        let outcome = match &case.expect {
            Expect::Refused(_) => "refused (exit 2)".to_string(),
            Expect::FailedPlan(_) => "plan failed (exit 3)".to_string(),
            Expect::Done { rows, decoded, .. } => format!("done: {rows} rows, {} error rows", rows - decoded),
        };
        println!("RELIABILITY bad-input {}: {outcome}; calls {calls}; output rows {}", case.name, written.len());
        cleanup(&case_schema).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}"))).execute(&admin).await.unwrap();
}
