//! S3 input against a real S3-protocol server (s3s-fs) on loopback.

mod common;

use std::io::Write;

use aws_sdk_s3::primitives::ByteStream;
use common::{S3Server, cleanup, status, unique_schema, vinetl_async_env, write_spec};
use vinetl::serve::faults::Faults;

#[tokio::test(flavor = "multi_thread")]
async fn objects_matching_a_glob_are_read_whole_gzip_and_all() {
    let s3 = S3Server::start();
    let client = s3.client();
    client.create_bucket().bucket("fleet").send().await.unwrap();
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let lines: Vec<&str> = vins.lines().collect();
    // Two CSV objects, one gzip-compressed, and one object the glob skips.
    let csv = |part: &[&str]| {
        format!(
            "unit,vin\n{}\n",
            part.iter().enumerate().map(|(i, v)| format!("{i},{v}")).collect::<Vec<_>>().join("\n")
        )
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(csv(&lines[..30]).as_bytes()).unwrap();
    let objects = [
        ("exports/part-1.csv.gz", gz.finish().unwrap()),
        ("exports/part-2.csv", csv(&lines[30..55]).into_bytes()),
        ("exports/readme.txt", b"not input".to_vec()),
    ];
    for (key, body) in objects {
        client.put_object().bucket("fleet").key(key).body(ByteStream::from(body)).send().await.unwrap();
    }

    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("s3");
    let dir = tempfile::tempdir().unwrap();
    let source = format!(
        "kind = \"s3\"\nurl = \"s3://fleet/exports/part-*.csv*\"\nendpoint = \"{}\"\ncarry = [\"unit\"]",
        s3.endpoint
    );
    let spec = write_spec(dir.path(), &source, &server.url(), "");
    let out = vinetl_async_env(&schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()], &s3.env()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_eq!((s["rows"].as_i64(), s["decoded"].as_i64(), s["calls_made"].as_i64()), (Some(55), Some(55), Some(3)));
    let db = common::pool(&schema).await;
    let sources: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT source FROM job_inputs ORDER BY 1").fetch_all(&db).await.unwrap();
    assert_eq!(sources, ["s3://fleet/exports/part-1.csv.gz", "s3://fleet/exports/part-2.csv"]);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_object_fails_fast_naming_it() {
    let s3 = S3Server::start();
    s3.client().create_bucket().bucket("fleet").send().await.unwrap();
    let schema = unique_schema("s3missing");
    let dir = tempfile::tempdir().unwrap();
    let source = format!("kind = \"s3\"\nurl = \"s3://fleet/nope.csv\"\nendpoint = \"{}\"", s3.endpoint);
    let spec = write_spec(dir.path(), &source, "http://127.0.0.1:9", "");
    let out = vinetl_async_env(&schema, "k", &["submit", spec.to_str().unwrap()], &s3.env()).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://fleet/nope.csv"), "{err}");
    cleanup(&schema).await;
}
