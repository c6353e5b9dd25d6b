//! `vinetl serve` over real HTTP on loopback: the guide's contract, status
//! code by status code.

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};
use vinetl::serve::faults::Faults;

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(url: String) -> Api {
        Api { base: url, http: reqwest::Client::new() }
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.raw(path, key, body.to_string()).await
    }

    async fn raw(
        &self,
        path: &str,
        key: Option<&str>,
        body: String,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req =
            self.http.post(format!("{}{path}", self.base)).header("Content-Type", "application/json").body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body: Value = resp.json().await.unwrap();
        (status, headers, body)
    }
}

const KEY: Option<&str> = Some("YOUR_API_KEY");

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn decode_answers_what_the_data_says() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let (status, _, body) = api.post("/api/v1/decode", KEY, json!({"vin": "5YJSA1DG9DFP14705"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["success"], true);
    let d = &body["data"];
    assert_eq!(
        (d["Make"].as_str(), d["Model"].as_str(), d["ModelYear"].as_str()),
        (Some("TESLA"), Some("Model S"), Some("2013"))
    );
    assert_eq!(d["PlantCity"], "FREMONT");
    assert_eq!(d["ErrorCode"], "0");
    // `Year` too, as the guide's example reads it: the model year again.
    assert_eq!(d["Year"], "2013");
    // The guide's textbook VIN: vPIC knows Honda and 1991, and no model.
    let (_, _, body) = api.post("/api/v1/decode", KEY, json!({"vin": "1HGBH41JXMN109186"})).await;
    assert_eq!((body["data"]["Make"].as_str(), body["data"]["ModelYear"].as_str()), (Some("HONDA"), Some("1991")));
    assert_eq!(body["data"]["Model"], "");
    // Its BMW fails the check digit: decoded, and flagged with vPIC's code 1.
    let (_, _, body) = api.post("/api/v1/decode", KEY, json!({"vin": "WBAPH5C55BA218692"})).await;
    assert_eq!(body["data"]["Model"], "328i");
    assert!(body["data"]["ErrorCode"].as_str().unwrap().starts_with('1'));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_are_400s_with_a_code() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let (s, _, b) = api.post("/api/v1/decode", KEY, json!({"vin": "1HGBH41JXMN10918I"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "INVALID_VIN");
    assert!(b["error"]["message"].as_str().unwrap().contains("position 17"));
    let (s, _, b) = api.raw("/api/v1/decode", KEY, "{\"vin\": ".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "INVALID_JSON");
    let (s, _, b) = api.post("/api/v1/decode", KEY, json!({"vim": "1HGBH41JXMN109186"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "INVALID_REQUEST");
    let (s, _, b) = api.post("/api/v1/recalls", KEY, json!({"make": "Honda"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "INVALID_REQUEST");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batches_hold_one_to_twenty_vins_and_each_stands_alone() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let pattern: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(21)
        .map(String::from)
        .collect();
    let (s, _, b) = api.post("/api/v1/batch-decode", KEY, json!({"vins": &pattern[..20]})).await;
    assert_eq!(s, StatusCode::OK);
    let data = b["data"].as_array().unwrap();
    assert_eq!(data.len(), 20);
    for (entry, vin) in data.iter().zip(&pattern) {
        assert_eq!(entry["VIN"], vin.as_str(), "request order is kept");
    }
    let (s, _, b) = api.post("/api/v1/batch-decode", KEY, json!({"vins": pattern})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "BATCH_TOO_LARGE");
    let (s, _, b) = api.post("/api/v1/batch-decode", KEY, json!({"vins": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "INVALID_REQUEST");
    // An invalid VIN gets its own error; the others decode.
    let vins = json!({"vins": ["1HGCM82633A004352", "JM3KE4BY6G06", "5YJSA1DG9DFP14705"]});
    let (s, _, b) = api.post("/api/v1/batch-decode", KEY, vins).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["data"][0]["Model"], "Accord");
    assert_eq!(b["data"][1]["VIN"], "JM3KE4BY6G06");
    assert_eq!(b["data"][1]["error"]["code"], "INVALID_VIN");
    assert_eq!(b["data"][2]["Make"], "TESLA");
    // So does an entry that is not a string: it comes back as sent, with
    // its error.
    let vins = json!({"vins": [null, "1HGCM82633A004352", 17, {"vin": "5YJSA1DG9DFP14705"}]});
    let (s, _, b) = api.post("/api/v1/batch-decode", KEY, vins).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let data = b["data"].as_array().unwrap();
    assert_eq!(data.len(), 4);
    assert_eq!((&data[0]["VIN"], &data[0]["error"]["code"]), (&Value::Null, &json!("INVALID_VIN")));
    assert_eq!(data[0]["error"]["message"], "entry 1 of vins is null, not a string");
    assert_eq!((data[1]["Model"].as_str(), data[1]["Year"].as_str()), (Some("Accord"), Some("2003")));
    assert_eq!((&data[2]["VIN"], &data[2]["error"]["code"]), (&json!(17), &json!("INVALID_VIN")));
    assert_eq!(data[3]["VIN"], json!({"vin": "5YJSA1DG9DFP14705"}));
    assert_eq!(data[3]["error"]["code"], "INVALID_VIN");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn keys_are_checked_and_anonymous_callers_may_only_decode_single_vins() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let one = json!({"vins": ["1HGCM82633A004352"]});
    let (s, h, b) = api.post("/api/v1/batch-decode", None, one.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&b, "UNAUTHORIZED");
    assert_eq!(h["www-authenticate"], "Bearer");
    let (s, _, b) = api.post("/api/v1/recalls", None, json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&b, "UNAUTHORIZED");
    let (s, _, b) = api.post("/api/v1/batch-decode", Some("not-a-key"), one.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&b, "UNAUTHORIZED");
    // A wrong key is refused even where anonymous access is allowed.
    let (s, _, _) = api.post("/api/v1/decode", Some("not-a-key"), json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Anonymous single decode: ten a day, then 429 with the headers.
    for i in 0..10 {
        let (s, h, _) = api.post("/api/v1/decode", None, json!({"vin": "1HGCM82633A004352"})).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], (9 - i).to_string().as_str());
    }
    let (s, h, b) = api.post("/api/v1/decode", None, json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&b, "RATE_LIMITED");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert_eq!(h["x-ratelimit-remaining"], "0");
    let reset: u64 = h["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert_eq!(reset % 86_400, 0, "the quota resets at midnight UTC");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_free_key_gets_a_hundred_requests_a_day_and_a_batch_counts_as_one() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let twenty: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(20)
        .map(String::from)
        .collect();
    for i in 0..100 {
        let (s, h, _) = api.post("/api/v1/batch-decode", Some("free-tier-key"), json!({"vins": twenty})).await;
        assert_eq!(s, StatusCode::OK, "request {i}");
        assert_eq!(h["x-ratelimit-remaining"], (99 - i).to_string().as_str());
    }
    let (s, h, _) = api.post("/api/v1/recalls", Some("free-tier-key"), json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "recalls share the quota");
    assert_eq!(h["x-ratelimit-limit"], "100");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_per_second_limit_answers_429_with_a_short_retry_after() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let mut limited = None;
    for _ in 0..20 {
        let (s, h, _) = api.post("/api/v1/decode", Some("pro-5-per-second"), json!({"vin": "1HGCM82633A004352"})).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(h);
            break;
        }
    }
    let h = limited.expect("more than 5 + burst requests in a burst are refused");
    assert_eq!(h["retry-after"], "1");
    // The rate headers still tell the day's quota, with calls left: this
    // 429 is the per-second limit's, not the day's.
    assert_eq!(h["x-ratelimit-limit"], "1000");
    let remaining: u64 = h["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap();
    assert!((990..1000).contains(&remaining), "{remaining}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn recalls_by_vin_and_by_make_model_year_agree() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let (s, _, by_vin) = api.post("/api/v1/recalls", KEY, json!({"vin": "5YJSA1DG9DFP14705"})).await;
    assert_eq!(s, StatusCode::OK);
    let recalls = by_vin["recalls"].as_array().unwrap();
    assert!(!recalls.is_empty(), "the sample has 2013 Model S recalls");
    for r in recalls {
        for field in [
            "NHTSACampaignNumber",
            "Component",
            "Summary",
            "Consequence",
            "Remedy",
            "ReportReceivedDate",
            "Manufacturer",
            "ModelYear",
            "Make",
            "Model",
        ] {
            assert!(r[field].is_string(), "{field} in {r}");
        }
        assert!(r["parkIt"].is_boolean() && r["parkOutSide"].is_boolean());
    }
    let (_, _, by_mmy) =
        api.post("/api/v1/recalls", KEY, json!({"make": "tesla", "model": "MODEL S", "year": 2013})).await;
    assert_eq!(by_vin["recalls"], by_mmy["recalls"]);
    // No model decoded, no recalls invented.
    let (_, _, none) = api.post("/api/v1/recalls", KEY, json!({"vin": "1HGBH41JXMN109186"})).await;
    assert_eq!(none["recalls"], json!([]));
    // A VIN is read as decode reads it (the guide's pattern, nothing
    // trimmed), and a lower-case one as its upper case.
    let (s, _, b) = api.post("/api/v1/recalls", KEY, json!({"vin": " 5YJSA1DG9DFP14705"})).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_VIN")), "{b}");
    let (s, _, lower) = api.post("/api/v1/recalls", KEY, json!({"vin": "5yjsa1dg9dfp14705"})).await;
    assert_eq!((s, &lower["recalls"]), (StatusCode::OK, &by_vin["recalls"]));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_oversized_bodies_get_json_errors() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let api = Api::new(server.url());
    let (s, _, b) = api.post("/api/v2/decode", KEY, json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&b, "NOT_FOUND");
    let resp = api.http.get(format!("{}/api/v1/decode", api.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&resp.json().await.unwrap(), "METHOD_NOT_ALLOWED");
    let huge = format!("{{\"vin\": \"{}\"}}", " ".repeat(100_000));
    let (s, _, b) = api.raw("/api/v1/decode", KEY, huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&b, "PAYLOAD_TOO_LARGE");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn injected_faults_look_like_real_failures() {
    let all_500 = Faults { fault_500: 1.0, ..Faults::default() };
    let (server, _dir) = common::serve(all_500).await;
    let api = Api::new(server.url());
    let (s, _, b) = api.post("/api/v1/decode", KEY, json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_error(&b, "INTERNAL_ERROR");
    server.stop().await.unwrap();

    let storm = Faults { fault_429: 1.0, fault_429_retry_after: 0, ..Faults::default() };
    let (server, _dir) = common::serve(storm).await;
    let api = Api::new(server.url());
    let (s, h, _) = api.post("/api/v1/decode", KEY, json!({"vin": "1HGCM82633A004352"})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.get("retry-after").is_none(), "a storm without Retry-After, for the limiter's AIMD");
    server.stop().await.unwrap();

    let malformed = Faults { fault_malformed: 1.0, ..Faults::default() };
    let (server, _dir) = common::serve(malformed).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/batch-decode", server.url()))
        .bearer_auth("YOUR_API_KEY")
        .json(&json!({"vins": ["1HGCM82633A004352"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.json::<Value>().await.is_err(), "the body is not JSON");
    server.stop().await.unwrap();

    let dropped = Faults { fault_drop: 1.0, ..Faults::default() };
    let (server, _dir) = common::serve(dropped).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/decode", server.url()))
        .bearer_auth("YOUR_API_KEY")
        .json(&json!({"vin": "1HGCM82633A004352"}))
        .send()
        .await
        .unwrap();
    assert!(resp.bytes().await.is_err(), "the connection is cut mid-body");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_openapi_document_is_served_and_names_every_endpoint() {
    let (server, _dir) = common::serve(Faults::default()).await;
    let doc: Value = reqwest::get(format!("{}/api/v1/openapi.json", server.url())).await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in ["/api/v1/decode", "/api/v1/batch-decode", "/api/v1/recalls"] {
        for status in ["200", "400", "401", "413", "429", "500"] {
            assert!(doc["paths"][path]["post"]["responses"][status].is_object(), "{path} {status}");
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_audit_log_has_a_line_per_request_naming_the_account_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let server = common::ServeProcess::start(&["--audit-log", log.to_str().unwrap()]);
    let api = Api::new(server.url.clone());
    let vins = json!({"vins": ["1HGCM82633A004352", "5YJSA1DG9DFP14705", "WBAPH5C55BA218692"]});
    assert_eq!(api.post("/api/v1/decode", KEY, json!({"vin": "1HGCM82633A004352"})).await.0, StatusCode::OK);
    assert_eq!(api.post("/api/v1/batch-decode", KEY, vins.clone()).await.0, StatusCode::OK);
    assert_eq!(api.post("/api/v1/batch-decode", Some("not-a-key"), vins).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.post("/api/v1/decode", None, json!({"vin": "1HGCM82633A004352"})).await.0, StatusCode::OK);
    let mut lines = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect();
        if lines.len() == 4 {
            assert!(!text.contains("YOUR_API_KEY") && !text.contains("not-a-key"), "keys never reach the log: {text}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let got: Vec<(String, String, u64, u64)> = lines
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap().to_string();
            (s("account"), s("path"), l["status"].as_u64().unwrap(), l["vins"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        got,
        [
            ("guide".into(), "/api/v1/decode".into(), 200, 1),
            ("guide".into(), "/api/v1/batch-decode".into(), 200, 3),
            ("(invalid key)".into(), "/api/v1/batch-decode".into(), 401, 0),
            ("anonymous 127.0.0.1".into(), "/api/v1/decode".into(), 200, 1),
        ]
    );
    assert!(lines.windows(2).all(|w| w[0]["ts"].as_f64() <= w[1]["ts"].as_f64()), "in time order");
}
