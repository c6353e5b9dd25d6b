//! Recall lookups end to end: one call per distinct make/model/year (or per
//! VIN), cached for the TTL, counted by the API server itself, and unknown
//! (not zero) where a lookup failed for good.

mod common;

use std::collections::BTreeSet;

use common::{cleanup, pool, requests_seen, status, unique_schema, vinetl_async, write_spec};
use vinetl::local::decoder::Decoder;
use vinetl::serve::faults::Faults;
use vinetl::vin::Vin;

const KEY: &str = "pro-counted-key";
const PER_DAY: u64 = 100_000;

/// A fleet with repeated models: each base VIN with `per_base` serials
/// (check digits recomputed), so many VINs share a make, model and year.
fn fleet(per_base: u32) -> Vec<String> {
    let bases =
        ["1HGCM82633A004352", "JTDBT923291344240", "WVWJF7CD8TW190545", "1FTFW5L86RFB45612", "5FNRL1832YZ485166"];
    let mut vins = Vec::new();
    for base in bases {
        for serial in 0..per_base {
            let mut v = format!("{}{:06}", &base[..11], 200_000 + serial);
            let check = Vin::parse(&v).unwrap().expected_check_digit();
            v.replace_range(8..9, &check.to_string());
            vins.push(v);
        }
    }
    vins
}

/// The distinct make/model/year combinations, computed here from the
/// embedded decoder (independently of the runner's SQL).
fn combinations(vins: &[String]) -> usize {
    let decoder = Decoder::new().unwrap();
    let mut keys = BTreeSet::new();
    for v in vins {
        let d = decoder.decode(&Vin::parse(v).unwrap());
        let (make, model, year) = (d.make.trim().to_uppercase(), d.model.trim().to_uppercase(), d.model_year.trim());
        if !make.is_empty() && !model.is_empty() && year.parse::<i32>().is_ok() {
            keys.insert((make, model, year.to_string()));
        }
    }
    keys.len()
}

fn spec_with_recalls(dir: &std::path::Path, base_url: &str, provider: &str, recalls: &str, schema: &str) -> String {
    let spec = write_spec(dir, "kind = \"file\"\npath = \"vins.txt\"", base_url, provider);
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!(
            "[recalls]\nenabled = true\n{recalls}\n\n[[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"results\"\n"
        );
    std::fs::write(&spec, text).unwrap();
    spec.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_recall_call_per_uncached_combination_and_none_within_the_ttl() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("recalls");
    let dir = tempfile::tempdir().unwrap();
    let vins = fleet(30);
    let combos = combinations(&vins);
    assert!(combos >= 3 && combos < vins.len() / 10, "the fleet repeats models: {combos} of {}", vins.len());
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let spec = spec_with_recalls(dir.path(), &server.url(), "", "", &schema);

    let out = vinetl_async(&schema, KEY, &["run", &spec]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    let decode_calls = vins.len().div_ceil(20) as i64;
    let r = &s["recalls"];
    assert_eq!(r["lookups"], combos as i64, "{s}");
    assert_eq!(r["cache_hits"], 0, "{s}");
    assert_eq!(r["calls"], combos as i64, "one recall call per combination: {s}");
    assert_eq!(r["calls_saved"], vins.len() as i64 - combos as i64, "{s}");
    assert_eq!(s["calls_made"], decode_calls + combos as i64, "{s}");
    // The server counted the same calls.
    assert_eq!(requests_seen(&server.url(), KEY, PER_DAY).await, (decode_calls + combos as i64) as u64);
    assert!(text.contains("recall calls") && text.contains("recalls found"), "{text}");

    // Every decoded row with a make, model and year has known recalls.
    let db = pool(&schema).await;
    let (known, unknown): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE has_recalls IS NOT NULL), count(*) FILTER (WHERE has_recalls IS NULL)
         FROM results WHERE status = 'decoded'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(known + unknown, vins.len() as i64);
    assert_eq!(r["rows_unknown"], unknown, "{s}");
    let linked: i64 = sqlx::query_scalar("SELECT count(*) FROM vehicle_recalls").fetch_one(&db).await.unwrap();
    let with: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE has_recalls").fetch_one(&db).await.unwrap();
    assert_eq!(r["rows_with_recalls"], with, "{s}");
    if with > 0 {
        assert!(linked > 0, "the vehicle/campaign link holds what the rows show");
        let (component, summary): (String, String) =
            sqlx::query_as("SELECT component, summary FROM recalls LIMIT 1").fetch_one(&db).await.unwrap();
        assert!(!component.is_empty() && !summary.is_empty());
    }

    // A second run within the TTL: decodes and recalls come from the cache.
    let out = vinetl_async(&schema, KEY, &["run", &spec]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s2 = status(&schema, 2).await;
    assert_eq!(s2["calls_made"], 0, "{s2}");
    assert_eq!(s2["recalls"]["calls"], 0, "{s2}");
    assert_eq!(s2["recalls"]["cache_hits"], combos as i64, "{s2}");
    assert_eq!(requests_seen(&server.url(), KEY, PER_DAY).await, (decode_calls + combos as i64) as u64 + 1);
    let rows2: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = 2 AND has_recalls IS NOT NULL")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows2, known, "cached recalls flag the same rows");
    drop(db);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_that_fails_for_good_leaves_recalls_unknown_not_zero() {
    // Every recall answer comes back broken (a 200 with truncated JSON);
    // decodes work. (Only 500s would open the circuit: the API is down.)
    let faults = Faults { fault_malformed: 1.0, fault_path: Some("/api/v1/recalls".into()), ..Faults::default() };
    let (server, _keys) = common::serve(faults).await;
    let schema = unique_schema("recallfail");
    let dir = tempfile::tempdir().unwrap();
    let vins = fleet(2);
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let spec = spec_with_recalls(dir.path(), &server.url(), "max_attempts = 2", "", &schema);

    let out = vinetl_async(&schema, KEY, &["run", &spec]).await;
    assert!(out.status.success(), "a recall failure does not fail the job: {}", String::from_utf8_lossy(&out.stdout));
    let s = status(&schema, 1).await;
    assert_eq!(s["decoded"], vins.len() as i64, "{s}");
    let combos = combinations(&vins) as i64;
    assert_eq!(s["recalls"]["failed"], combos, "{s}");
    assert_eq!(s["recalls"]["calls"], 2 * combos, "two attempts each: {s}");
    assert_eq!(s["recalls"]["rows_with_recalls"], 0, "{s}");
    assert_eq!(s["recalls"]["rows_unknown"], vins.len() as i64, "{s}");

    let db = pool(&schema).await;
    let rows: Vec<(Option<bool>, Option<i32>, Option<String>)> =
        sqlx::query_as("SELECT has_recalls, recall_count, recall_error FROM results WHERE status = 'decoded'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(rows.len(), vins.len());
    for (has, count, error) in rows {
        assert_eq!((has, count), (None, None), "unknown, not zero");
        let error = error.unwrap_or_default();
        assert!(error.starts_with("recall lookup failed") && error.contains("malformed"), "{error}");
    }
    drop(db);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_vin_lookups_make_one_call_per_distinct_vin() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("recallvin");
    let dir = tempfile::tempdir().unwrap();
    let mut vins = fleet(3);
    vins.push(vins[0].clone()); // a duplicate row costs nothing more
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let spec = spec_with_recalls(dir.path(), &server.url(), "", "per_vin = true", &schema);
    let out = vinetl_async(&schema, KEY, &["run", &spec]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_eq!(s["recalls"]["calls"], 15, "{s}");
    assert_eq!(s["recalls"]["lookups"], 15, "{s}");
    cleanup(&schema).await;
}
