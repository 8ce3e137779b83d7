//! Tests against the real server on 127.0.0.1 with reqwest.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::{json, Value};

use super::*;
use crate::timefmt;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_ID: &str = "test-client";
const CLIENT_SECRET: &str = "test-secret";
const RESOURCE: &str = "https://api.securitycenter.windows.com";

fn spec(forbidden: bool) -> TenantSpec {
    TenantSpec { client_id: CLIENT_ID.to_string(), client_secret: CLIENT_SECRET.to_string(), forbidden }
}

async fn start_with(options: EmulatorOptions) -> Emulator {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    emulator.add_tenant(TENANT, spec(false));
    emulator
}

async fn start() -> Emulator {
    start_with(EmulatorOptions::default()).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn request_token(emulator: &Emulator, tenant: &str, form: &[(&str, &str)]) -> reqwest::Response {
    client().post(format!("{}/{tenant}/oauth2/token", emulator.url())).form(form).send().await.unwrap()
}

fn valid_form() -> Vec<(&'static str, &'static str)> {
    vec![
        ("resource", RESOURCE),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("grant_type", "client_credentials"),
    ]
}

async fn json_body(response: reqwest::Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("body is not JSON ({error}): {text}"))
}

async fn token_for(emulator: &Emulator, tenant: &str) -> String {
    let response = request_token(emulator, tenant, &valid_form()).await;
    assert_eq!(response.status(), 200);
    let body = json_body(response).await;
    body["access_token"].as_str().unwrap().to_string()
}

async fn token(emulator: &Emulator) -> String {
    token_for(emulator, TENANT).await
}

async fn get_alerts(emulator: &Emulator, token: &str, query: &str) -> reqwest::Response {
    client().get(format!("{}/api/alerts{query}", emulator.url())).bearer_auth(token).send().await.unwrap()
}

/// Fetches `/api/alerts{query}` with a fresh token and expects 200 with an array.
async fn alerts(emulator: &Emulator, query: &str) -> Vec<Value> {
    let token = token(emulator).await;
    let response = get_alerts(emulator, &token, query).await;
    assert_eq!(response.status(), 200, "GET /api/alerts{query}");
    match json_body(response).await {
        Value::Array(items) => items,
        other => panic!("expected an array, got {other}"),
    }
}

fn detection(full_id: &str, last_processed: &str) -> Value {
    json!({
        "AlertTime": last_processed,
        "AlertId": full_id,
        "FullId": full_id,
        "LastProcessedTimeUtc": last_processed,
        "MachineGroup": "",
        "DeviceCreatedMachineTags": "",
        "CloudCreatedMachineTags": "",
    })
}

fn full_ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|item| item["FullId"].as_str().unwrap_or_default().to_string()).collect()
}

/// Formats the time `minutes` before now as the API writes it.
fn minutes_ago(minutes: i64) -> String {
    timefmt::format_query(Utc::now() - TimeDelta::minutes(minutes))
}

fn fractional_digits(text: &str) -> usize {
    text.split_once('.').map_or(0, |(_, fraction)| fraction.bytes().take_while(u8::is_ascii_digit).count())
}

// Token endpoint

#[tokio::test]
async fn token_response_has_numeric_expiry_by_default() {
    let emulator = start().await;
    let body = json_body(request_token(&emulator, TENANT, &valid_form()).await).await;

    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert_eq!(body["resource"], RESOURCE);
    let now = Utc::now().timestamp();
    let expires_on = body["expires_on"].as_i64().unwrap();
    assert!((now + 3599 - expires_on).abs() <= 2, "expires_on {expires_on}, now {now}");
    let not_before = body["not_before"].as_i64().unwrap();
    assert!((now - not_before).abs() <= 2, "not_before {not_before}, now {now}");
    assert!(body["access_token"].as_str().unwrap().len() >= 32);
    assert_eq!(emulator.token_requests(), 1);
}

#[tokio::test]
async fn token_response_writes_expiry_as_strings() {
    let options = EmulatorOptions { expiry_format: ExpiryFormat::String, ..EmulatorOptions::default() };
    let emulator = start_with(options).await;
    let body = json_body(request_token(&emulator, TENANT, &valid_form()).await).await;

    assert_eq!(body["expires_in"], "3599");
    assert_eq!(body["ext_expires_in"], "3599");
    assert!(body["expires_on"].as_str().unwrap().parse::<i64>().is_ok());
    assert!(body["not_before"].as_str().unwrap().parse::<i64>().is_ok());
}

#[tokio::test]
async fn token_response_can_omit_expiry() {
    let options = EmulatorOptions { expiry_format: ExpiryFormat::Missing, ..EmulatorOptions::default() };
    let emulator = start_with(options).await;
    let body = json_body(request_token(&emulator, TENANT, &valid_form()).await).await;

    for field in ["expires_in", "ext_expires_in", "expires_on", "not_before"] {
        assert!(body.get(field).is_none(), "{field} present in {body}");
    }
    assert!(body["access_token"].is_string());
}

#[tokio::test]
async fn token_keys_keep_documented_order() {
    let emulator = start().await;
    let body = json_body(request_token(&emulator, TENANT, &valid_form()).await).await;

    let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    let expected =
        ["token_type", "expires_in", "ext_expires_in", "expires_on", "not_before", "resource", "access_token"];
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn v2_token_endpoint_accepts_scope() {
    let emulator = start().await;
    let form = [
        ("scope", "https://api.securitycenter.windows.com/.default"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("grant_type", "client_credentials"),
    ];
    let response =
        client().post(format!("{}/{TENANT}/oauth2/v2.0/token", emulator.url())).form(&form).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body = json_body(response).await;
    assert_eq!(body["expires_in"], 3599);
    assert!(body.get("resource").is_none());

    let token = body["access_token"].as_str().unwrap();
    let alerts = get_alerts(&emulator, token, "").await;
    assert_eq!(alerts.status(), 200);
}

#[tokio::test]
async fn v1_token_request_without_resource_is_rejected() {
    let emulator = start().await;
    let form: Vec<_> = valid_form().into_iter().filter(|(name, _)| *name != "resource").collect();
    let response = request_token(&emulator, TENANT, &form).await;

    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(body["error_codes"], json!([900144]));
}

#[tokio::test]
async fn wrong_secret_gets_aadsts_error_body() {
    let emulator = start().await;
    let mut form = valid_form();
    form[2] = ("client_secret", "wrong");
    let response = request_token(&emulator, TENANT, &form).await;

    assert_eq!(response.status(), 401);
    let body = json_body(response).await;
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    let description = body["error_description"].as_str().unwrap();
    assert!(description.starts_with("AADSTS7000215: Invalid client secret provided."), "{description}");
    let trace_id = body["trace_id"].as_str().unwrap();
    assert!(description.contains(&format!("\r\nTrace ID: {trace_id}\r\n")), "{description}");
    let correlation_id = body["correlation_id"].as_str().unwrap();
    assert!(description.contains(&format!("\r\nCorrelation ID: {correlation_id}\r\n")), "{description}");
    let timestamp = body["timestamp"].as_str().unwrap();
    assert!(description.ends_with(&format!("\r\nTimestamp: {timestamp}")), "{description}");
}

#[tokio::test]
async fn missing_secret_gets_invalid_client() {
    let emulator = start().await;
    let form: Vec<_> = valid_form().into_iter().filter(|(name, _)| *name != "client_secret").collect();
    let response = request_token(&emulator, TENANT, &form).await;

    assert_eq!(response.status(), 401);
    let body = json_body(response).await;
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000218]));
}

#[tokio::test]
async fn unknown_client_id_gets_unauthorized_client() {
    let emulator = start().await;
    let mut form = valid_form();
    form[1] = ("client_id", "someone-else");
    let response = request_token(&emulator, TENANT, &form).await;

    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_eq!(body["error"], "unauthorized_client");
    assert_eq!(body["error_codes"], json!([700016]));
}

#[tokio::test]
async fn unknown_tenant_gets_aadsts90002() {
    let emulator = start().await;
    let response = request_token(&emulator, "99999999-0000-0000-0000-000000000000", &valid_form()).await;

    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(body["error_codes"], json!([90002]));
    assert!(body["error_description"].as_str().unwrap().starts_with("AADSTS90002: Tenant"));
}

#[tokio::test]
async fn wrong_grant_type_is_unsupported() {
    let emulator = start().await;
    let mut form = valid_form();
    form[3] = ("grant_type", "password");
    let response = request_token(&emulator, TENANT, &form).await;

    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_eq!(body["error"], "unsupported_grant_type");
    assert_eq!(body["error_codes"], json!([70003]));
}

#[tokio::test]
async fn token_expires_after_lifetime() {
    let options = EmulatorOptions { token_lifetime: Duration::from_millis(700), ..EmulatorOptions::default() };
    let emulator = start_with(options).await;
    let token = token(&emulator).await;

    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let expired = get_alerts(&emulator, &token, "").await;
    assert_eq!(expired.status(), 401);
    let body = json_body(expired).await;
    assert_eq!(body["error"]["code"], "Unauthorized");
}

#[tokio::test]
async fn set_token_lifetime_applies_to_new_tokens() {
    let emulator = start().await;
    emulator.set_token_lifetime(Duration::from_secs(60));
    let body = json_body(request_token(&emulator, TENANT, &valid_form()).await).await;

    assert_eq!(body["expires_in"], 60);
}

#[tokio::test]
async fn revoked_token_is_rejected() {
    let emulator = start().await;
    let token = token(&emulator).await;
    emulator.revoke_tokens();

    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 401);
}

// Authorization of /api/alerts

#[tokio::test]
async fn alerts_without_token_is_unauthorized() {
    let emulator = start().await;
    let response = client().get(format!("{}/api/alerts", emulator.url())).send().await.unwrap();

    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "Unauthorized");
    assert!(body["error"]["message"].as_str().unwrap().contains("missing"));
}

#[tokio::test]
async fn alerts_with_unknown_token_is_unauthorized() {
    let emulator = start().await;
    let response = get_alerts(&emulator, "not-a-token-we-issued", "").await;

    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn forbidden_tenant_gets_403() {
    let emulator = start().await;
    emulator.add_tenant("forbidden-tenant", spec(true));
    let token = token_for(&emulator, "forbidden-tenant").await;
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 403);
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "Forbidden");
}

#[tokio::test]
async fn token_sees_only_its_tenants_detections() {
    let emulator = start().await;
    emulator.add_tenant("other-tenant", spec(false));
    emulator.push_detection(TENANT, detection("mine", &minutes_ago(1)));
    emulator.push_detection("other-tenant", detection("theirs", &minutes_ago(1)));
    let token = token_for(&emulator, "other-tenant").await;
    let items = json_body(get_alerts(&emulator, &token, "").await).await;

    assert_eq!(full_ids(items.as_array().unwrap()), ["theirs"]);
}

#[tokio::test]
async fn trailing_slash_path_is_accepted() {
    let emulator = start().await;
    let token = token(&emulator).await;
    let response = client().get(format!("{}/api/alerts/", emulator.url())).bearer_auth(&token).send().await.unwrap();

    assert_eq!(response.status(), 200);
}

// Query parameters

fn load_tick_detections(emulator: &Emulator) {
    for tick in 1..=4 {
        let time = format!("2026-11-30T08:00:00.000000{tick}Z");
        emulator.push_detection(TENANT, detection(&format!("tick-{tick}"), &time));
    }
}

#[tokio::test]
async fn since_and_until_are_inclusive_to_the_tick() {
    let emulator = start().await;
    load_tick_detections(&emulator);
    let items =
        alerts(&emulator, "?sinceTimeUtc=2026-11-30T08:00:00.0000002Z&untilTimeUtc=2026-11-30T08:00:00.0000003Z").await;

    assert_eq!(full_ids(&items), ["tick-2", "tick-3"]);
}

#[tokio::test]
async fn since_accepts_missing_zone_and_fewer_digits() {
    let emulator = start().await;
    load_tick_detections(&emulator);

    let without_zone =
        alerts(&emulator, "?sinceTimeUtc=2026-11-30T08:00:00.0000004&untilTimeUtc=2026-12-01T00:00:00").await;
    assert_eq!(full_ids(&without_zone), ["tick-4"]);
    let three_digits =
        alerts(&emulator, "?sinceTimeUtc=2026-11-30T08:00:00.000&untilTimeUtc=2026-12-01T00:00:00Z").await;
    assert_eq!(three_digits.len(), 4);
}

#[tokio::test]
async fn parameter_names_ignore_case() {
    let emulator = start().await;
    load_tick_detections(&emulator);
    let items =
        alerts(&emulator, "?SINCETIMEUTC=2026-11-30T08:00:00.0000003Z&untiltimeutc=2026-11-30T08:00:00.0000003Z").await;

    assert_eq!(full_ids(&items), ["tick-3"]);
}

#[tokio::test]
async fn unparsable_since_is_bad_request() {
    let emulator = start().await;
    let token = token(&emulator).await;
    let response = get_alerts(&emulator, &token, "?sinceTimeUtc=yesterday").await;

    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("sinceTimeUtc"), "{body}");
}

#[tokio::test]
async fn results_ascend_by_last_processed_time() {
    let emulator = start().await;
    for (id, minutes) in [("b", 20), ("c", 10), ("a", 30)] {
        emulator.push_detection(TENANT, detection(id, &minutes_ago(minutes)));
    }
    let items = alerts(&emulator, "").await;

    assert_eq!(full_ids(&items), ["a", "b", "c"]);
}

/// A response larger than one streamed chunk arrives whole and in order,
/// compressed and plain.
#[tokio::test]
async fn large_response_is_streamed_whole() {
    let emulator = start().await;
    let padding = "x".repeat(1000);
    let expected: Vec<String> = (0..700).map(|i| format!("big{i:04}")).collect();
    for (i, id) in expected.iter().enumerate() {
        let mut item = detection(id, &minutes_ago(90 - i as i64 / 10));
        item["CommandLine"] = json!(padding);
        emulator.push_detection(TENANT, item);
    }
    let token = token(&emulator).await;
    for gzip in [true, false] {
        let client = reqwest::Client::builder().no_proxy().gzip(gzip).build().unwrap();
        let response = client.get(format!("{}/api/alerts", emulator.url())).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let items: Vec<Value> = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(full_ids(&items), expected, "gzip {gzip}");
        assert_eq!(emulator.requests().last().map(|r| r.gzip), Some(gzip));
    }
}

/// Generated detections are compressed ahead of time in runs. A gzip body
/// that splices whole runs, cuts a run at a page's start, or mixes runs with
/// detections compressed while served inflates to the plain body, byte for
/// byte, and passes gzip's own length and CRC check.
#[tokio::test]
async fn precompressed_runs_inflate_to_plain_body() {
    use std::io::Read;
    let emulator = start().await;
    emulator.generate(TENANT, 300, 2048);
    for i in 0..5 {
        emulator.push_detection(TENANT, detection(&format!("pushed{i}"), &minutes_ago(10 * i)));
    }
    let token = token(&emulator).await;
    let plain = reqwest::Client::builder().no_proxy().gzip(false).build().unwrap();
    for query in ["", "?limit=150", "?limit=37", "?limit=1"] {
        let url = format!("{}/api/alerts{query}", emulator.url());
        let expected = plain.get(&url).bearer_auth(&token).send().await.unwrap().bytes().await.unwrap();
        let response =
            plain.get(&url).bearer_auth(&token).header("Accept-Encoding", "gzip").send().await.unwrap();
        assert_eq!(response.headers()["content-encoding"], "gzip", "{query}");
        let compressed = response.bytes().await.unwrap();
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..]).read_to_end(&mut inflated).unwrap();
        assert_eq!(inflated, expected, "{query}");
        let items: Vec<Value> = serde_json::from_slice(&inflated).unwrap();
        let count = if query.is_empty() { 305 } else { query[7..].parse().unwrap() };
        assert_eq!(items.len(), count, "{query}");
    }
}

/// Clients that stop reading a large response hold no blocking thread, so
/// the next request is still served with only two of them.
#[test]
fn stalled_clients_do_not_block_other_requests() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let emulator = start().await;
        let padding = "x".repeat(1000);
        for i in 0..20_000 {
            let mut item = detection(&format!("s{i}"), &minutes_ago(30));
            item["CommandLine"] = json!(padding);
            emulator.push_detection(TENANT, item);
        }
        let token = token(&emulator).await;
        let address = emulator.url().trim_start_matches("http://").to_string();
        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let request = format!("GET /api/alerts HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut start = [0u8; 100];
            stream.read_exact(&mut start).await.unwrap();
            stalled.push(stream);
        }
        let served = tokio::time::timeout(Duration::from_secs(20), async {
            get_alerts(&emulator, &token, "?limit=1").await.text().await.unwrap()
        })
        .await;
        let body: Vec<Value> = serde_json::from_str(&served.expect("the request was served")).unwrap();
        assert_eq!(body.len(), 1);
    });
}

#[tokio::test]
async fn limit_returns_most_recent_in_ascending_order() {
    let emulator = start().await;
    for minutes in [50, 10, 40, 20, 30] {
        emulator.push_detection(TENANT, detection(&format!("m{minutes}"), &minutes_ago(minutes)));
    }
    let items = alerts(&emulator, "?limit=2").await;

    assert_eq!(full_ids(&items), ["m20", "m10"]);
}

#[tokio::test]
async fn invalid_limit_is_bad_request() {
    let emulator = start().await;
    let token = token(&emulator).await;
    for value in ["-1", "ten", "2147483648"] {
        let response = get_alerts(&emulator, &token, &format!("?limit={value}")).await;
        assert_eq!(response.status(), 400, "limit={value}");
    }
}

#[tokio::test]
async fn ago_selects_recent_window() {
    let emulator = start().await;
    emulator.push_detection(TENANT, detection("five", &minutes_ago(5)));
    emulator.push_detection(TENANT, detection("fifteen", &minutes_ago(15)));

    assert_eq!(full_ids(&alerts(&emulator, "?ago=PT10M").await), ["five"]);
    assert_eq!(full_ids(&alerts(&emulator, "?ago=P1DT2H30M5.5S").await), ["fifteen", "five"]);
}

#[tokio::test]
async fn invalid_ago_is_bad_request() {
    let emulator = start().await;
    let token = token(&emulator).await;
    let response = get_alerts(&emulator, &token, "?ago=10minutes").await;

    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn no_time_parameters_mean_last_two_hours() {
    let emulator = start().await;
    emulator.push_detection(TENANT, detection("one-hour", &minutes_ago(60)));
    emulator.push_detection(TENANT, detection("three-hours", &minutes_ago(180)));
    let future = timefmt::format_query(Utc::now() + TimeDelta::minutes(10));
    emulator.push_detection(TENANT, detection("future", &future));

    assert_eq!(full_ids(&alerts(&emulator, "").await), ["one-hour"]);
}

#[tokio::test]
async fn detection_without_time_is_never_returned() {
    let emulator = start().await;
    emulator.push_detection(TENANT, json!({"FullId": "no-time"}));
    emulator.push_detection(TENANT, json!({"FullId": "bad-time", "LastProcessedTimeUtc": "soon"}));
    emulator.push_detection(TENANT, json!({"FullId": "number-time", "LastProcessedTimeUtc": 5}));
    emulator.push_detection(TENANT, detection("good", &minutes_ago(1)));

    assert_eq!(full_ids(&alerts(&emulator, "?sinceTimeUtc=2000-01-01T00:00:00Z").await), ["good"]);
}

fn load_grouped_detections(emulator: &Emulator) {
    let rows = [
        ("taipei", "Taipei-Workstations", "finance,vip", ""),
        ("kaohsiung", "Kaohsiung Servers", "finance", "pci,tier0"),
        ("ungrouped", "", "", "pci"),
    ];
    for (id, group, device_tags, cloud_tags) in rows {
        let mut item = detection(id, &minutes_ago(5));
        item["MachineGroup"] = json!(group);
        item["DeviceCreatedMachineTags"] = json!(device_tags);
        item["CloudCreatedMachineTags"] = json!(cloud_tags);
        emulator.push_detection(TENANT, item);
    }
}

#[tokio::test]
async fn machinegroups_repeat_and_ignore_case() {
    let emulator = start().await;
    load_grouped_detections(&emulator);
    let items = alerts(&emulator, "?machinegroups=taipei-workstations&machinegroups=Kaohsiung%20Servers").await;

    assert_eq!(full_ids(&items), ["taipei", "kaohsiung"]);
}

#[tokio::test]
async fn device_tag_matches_one_list_entry() {
    let emulator = start().await;
    load_grouped_detections(&emulator);

    assert_eq!(full_ids(&alerts(&emulator, "?DeviceCreatedMachineTags=VIP").await), ["taipei"]);
    assert_eq!(full_ids(&alerts(&emulator, "?DeviceCreatedMachineTags=fin").await), Vec::<String>::new());
}

#[tokio::test]
async fn cloud_tag_matches_one_list_entry() {
    let emulator = start().await;
    load_grouped_detections(&emulator);
    let items = alerts(&emulator, "?cloudcreatedmachinetags=pci").await;

    assert_eq!(full_ids(&items), ["kaohsiung", "ungrouped"]);
}

#[tokio::test]
async fn response_keeps_stored_json_text() {
    let emulator = start().await;
    let mut sample = sample_detections().remove(0);
    sample["LastProcessedTimeUtc"] = json!(minutes_ago(1));
    emulator.push_detection(TENANT, sample.clone());
    let token = token(&emulator).await;
    let text = get_alerts(&emulator, &token, "").await.text().await.unwrap();

    assert_eq!(text, format!("[{sample}]"));
}

// Faults

async fn start_with_one_detection() -> (Emulator, String) {
    let emulator = start().await;
    emulator.push_detection(TENANT, detection("only", &minutes_ago(1)));
    let token = token(&emulator).await;
    (emulator, token)
}

#[tokio::test]
async fn status_fault_sends_status_retry_after_and_body() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::Status {
        status: 429,
        retry_after_secs: Some(7),
        body: r#"{"error":"throttled"}"#.to_string(),
    });
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.text().await.unwrap(), r#"{"error":"throttled"}"#);
}

#[tokio::test]
async fn faults_apply_once_in_fifo_order() {
    let (emulator, token) = start_with_one_detection().await;
    for status in [503, 500] {
        emulator.inject_fault(Fault::Status { status, retry_after_secs: None, body: String::new() });
    }

    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 503);
    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 500);
    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 200);
}

#[tokio::test]
async fn empty_ok_fault_sends_empty_body() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::EmptyOk);
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "");
}

#[tokio::test]
async fn html_fault_sends_html_page() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::Html);
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(response.text().await.unwrap().starts_with("<!DOCTYPE html>"));
}

#[tokio::test]
async fn truncated_fault_cuts_the_array() {
    let (emulator, token) = start_with_one_detection().await;
    let full = get_alerts(&emulator, &token, "").await.text().await.unwrap();
    emulator.inject_fault(Fault::Truncated);
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 200);
    let cut = response.text().await.unwrap();
    assert_eq!(cut.len(), full.len() / 2);
    assert!(full.starts_with(&cut));
    assert!(serde_json::from_str::<Value>(&cut).is_err());
}

#[tokio::test]
async fn not_array_fault_sends_object() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::NotArray);
    let response = get_alerts(&emulator, &token, "").await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"value":[]}"#);
}

#[tokio::test]
async fn slow_fault_delays_normal_response() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    let response = get_alerts(&emulator, &token, "").await;

    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unauthorized_fault_rejects_valid_token() {
    let (emulator, token) = start_with_one_detection().await;
    emulator.inject_fault(Fault::Unauthorized);

    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 401);
    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 200);
}

#[tokio::test]
async fn requests_are_recorded_with_status_and_tenant() {
    let (emulator, token) = start_with_one_detection().await;
    get_alerts(&emulator, &token, "?limit=5&machinegroups=a%20b").await;
    get_alerts(&emulator, "bad-token", "").await;
    let requests = emulator.requests();

    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].path, "/api/alerts");
    assert_eq!(
        requests[0].query,
        [("limit".to_string(), "5".to_string()), ("machinegroups".to_string(), "a b".to_string())]
    );
    assert_eq!(requests[0].status, 200);
    assert_eq!(requests[0].tenant_id.as_deref(), Some(TENANT));
    assert_eq!(requests[1].status, 401);
    assert_eq!(requests[1].tenant_id, None);
}

// Detections: shifting, synthesis

#[test]
fn shift_text_keeps_shape() {
    let cases = [
        ("2026-11-30T08:10:24.0041414Z", 90, "2026-11-30T08:11:54.0041414Z"),
        ("2026-11-30T08:06:34.43960Z", 86_400, "2026-12-01T08:06:34.43960Z"),
        ("2026-11-30T23:59:59", 1, "2026-12-01T00:00:00"),
        ("2026-11-30 08:00:00.5+02:00", -60, "2026-11-30 07:59:00.5+02:00"),
    ];
    for (text, secs, expected) in cases {
        assert_eq!(data::shift_text(text, secs).as_deref(), Some(expected), "{text}");
    }
    assert_eq!(data::shift_text("soon", 5), None);
    assert_eq!(data::shift_text("2026-11-30X08:00:00Z", 5), None);
}

#[test]
fn shift_moves_newest_to_now_by_whole_seconds() {
    let mut detections = sample_detections();
    let original = detections.clone();
    let now = timefmt::parse("2026-12-04T21:00:00.5Z").unwrap();
    data::shift_to_now(&mut detections, now);

    let newest =
        detections.iter().filter_map(|item| timefmt::parse(item["LastProcessedTimeUtc"].as_str()?)).max().unwrap();
    assert!(newest <= now, "newest {newest} after now");
    assert!(now - newest < TimeDelta::seconds(1), "newest {newest} more than a second before now");

    let first_offset = timefmt::parse(detections[0]["AlertTime"].as_str().unwrap()).unwrap()
        - timefmt::parse(original[0]["AlertTime"].as_str().unwrap()).unwrap();
    assert_eq!(first_offset.subsec_nanos(), 0, "offset {first_offset} is not whole seconds");
    for (before, after) in original.iter().zip(&detections) {
        for field in ["AlertTime", "LastProcessedTimeUtc"] {
            let before = before[field].as_str().unwrap();
            let after = after[field].as_str().unwrap();
            assert_eq!(fractional_digits(after), fractional_digits(before), "{field} {before} -> {after}");
            assert_eq!(after.len(), before.len(), "{field} {before} -> {after}");
            assert_eq!(&after[19..], &before[19..], "{field} {before} -> {after}");
            let offset = timefmt::parse(after).unwrap() - timefmt::parse(before).unwrap();
            assert_eq!(offset, first_offset, "{field} {before} -> {after}");
        }
    }
}

#[test]
fn shift_skips_values_it_cannot_parse() {
    let mut detections = vec![
        detection("a", "2026-11-30T08:00:00.0000001Z"),
        json!({"FullId": "b", "AlertTime": "unknown", "LastProcessedTimeUtc": null}),
    ];
    data::shift_to_now(&mut detections, timefmt::parse("2026-11-30T09:00:00Z").unwrap());

    // 59:59.9999999 to go rounds down to whole seconds, so the value stays
    // just before `now`.
    assert_eq!(detections[0]["LastProcessedTimeUtc"], "2026-11-30T08:59:59.0000001Z");
    assert_eq!(detections[1]["AlertTime"], "unknown");
}

#[tokio::test]
async fn loaded_samples_are_served_after_shift() {
    let emulator = start().await;
    emulator.load_detections(TENANT, sample_detections(), true);

    assert_eq!(emulator.detection_count(TENANT), 46);
    assert_eq!(alerts(&emulator, "?sinceTimeUtc=2000-01-01T00:00:00Z").await.len(), 46);
    assert!(!alerts(&emulator, "?ago=PT1M").await.is_empty());
}

#[test]
fn sample_detections_parse_as_objects() {
    let samples = sample_detections();

    assert_eq!(samples.len(), 46);
    assert!(samples.iter().all(Value::is_object));
}

#[tokio::test]
async fn new_detection_has_fresh_ids_and_current_times() {
    let emulator = start().await;
    emulator.load_detections(TENANT, sample_detections(), false);
    let known: HashSet<String> = full_ids(&sample_detections()).into_iter().collect();
    let before = Utc::now();
    let created = emulator.new_detection(TENANT);

    let full_id = created["FullId"].as_str().unwrap();
    assert!(!known.contains(full_id), "{full_id} reused");
    let alert_id = created["AlertId"].as_str().unwrap();
    assert!(alert_id.starts_with("da"), "{alert_id}");
    assert_eq!(full_id, format!("{alert_id}:{}", created["IocUniqueId"].as_str().unwrap()));
    assert!(created["LinkToWDATP"].as_str().unwrap().ends_with(alert_id));
    for field in ["AlertTime", "LastProcessedTimeUtc"] {
        let text = created[field].as_str().unwrap();
        assert_eq!(fractional_digits(text), 7, "{field} {text}");
        let time = timefmt::parse(text).unwrap();
        assert!(time >= before - TimeDelta::microseconds(1), "{field} {text}");
    }
    assert_eq!(emulator.detection_count(TENANT), 47);
    assert_eq!(full_ids(&alerts(&emulator, "?ago=PT1M").await), [full_id]);
}

#[tokio::test]
async fn new_detection_for_empty_tenant_uses_samples() {
    let emulator = start().await;
    let created = emulator.new_detection("fresh-tenant");

    assert!(created["ComputerDnsName"].is_string());
    assert_eq!(emulator.detection_count("fresh-tenant"), 1);
}

#[tokio::test]
async fn generate_makes_unique_detections_of_requested_size() {
    let emulator = start().await;
    // Taken before generating: detections are spread over the hour before that.
    let hour_ago = Utc::now() - TimeDelta::hours(1);
    emulator.generate(TENANT, 200, 2048);
    emulator.generate(TENANT, 20, 8192);
    let items = alerts(&emulator, "").await;

    assert_eq!(items.len(), 220);
    let unique: HashSet<String> = full_ids(&items).into_iter().collect();
    assert_eq!(unique.len(), 220);
    for item in &items {
        let size = item.to_string().len();
        let target = if size > 4096 { 8192 } else { 2048 };
        assert!(size.abs_diff(target) <= target / 10, "size {size} far from {target}");
        let time = timefmt::parse(item["LastProcessedTimeUtc"].as_str().unwrap()).unwrap();
        assert!(time >= hour_ago, "{time} older than an hour");
    }
}

#[tokio::test]
async fn generate_shrinks_toward_small_target() {
    let emulator = start().await;
    emulator.generate(TENANT, 50, 1800);

    for item in alerts(&emulator, "").await {
        let size = item.to_string().len();
        assert!(size.abs_diff(1800) <= 180, "size {size}");
    }
}

#[tokio::test]
async fn generator_adds_detections_periodically() {
    let emulator = start().await;
    emulator.spawn_generator(TENANT, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(400)).await;

    let count = emulator.detection_count(TENANT);
    assert!(count >= 3, "only {count} detections");
}

// Control API

#[tokio::test]
async fn control_api_queues_fault() {
    let (emulator, token) = start_with_one_detection().await;
    let response = client()
        .post(format!("{}/_emulator/faults", emulator.url()))
        .body(r#"{"status":429,"retry_after_secs":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await["queued"], 1);

    let alerts = get_alerts(&emulator, &token, "").await;
    assert_eq!(alerts.status(), 429);
    assert_eq!(alerts.headers()["retry-after"], "2");
}

#[test]
fn control_fault_kinds_parse() {
    let cases = [
        (json!({"kind": "empty"}), Fault::EmptyOk),
        (json!({"kind": "html"}), Fault::Html),
        (json!({"kind": "truncated"}), Fault::Truncated),
        (json!({"kind": "not_array"}), Fault::NotArray),
        (json!({"kind": "unauthorized"}), Fault::Unauthorized),
        (json!({"kind": "slow", "secs": 3}), Fault::Slow(Duration::from_secs(3))),
        (json!({"kind": "slow", "secs": 0.25}), Fault::Slow(Duration::from_millis(250))),
        (
            json!({"kind": "status", "status": 503, "body": "down"}),
            Fault::Status { status: 503, retry_after_secs: None, body: "down".to_string() },
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(control::parse_fault(request.as_object().unwrap()), Ok(expected), "{request}");
    }
}

#[test]
fn control_rejects_invalid_faults() {
    let cases = [
        json!({}),
        json!({"kind": "teapot"}),
        json!({"kind": "slow"}),
        json!({"kind": "slow", "secs": -1}),
        json!({"status": 42}),
        json!({"status": "429"}),
    ];
    for request in cases {
        assert!(control::parse_fault(request.as_object().unwrap()).is_err(), "{request}");
    }
}

#[tokio::test]
async fn control_api_adds_detections_and_reports_stats() {
    let emulator = start().await;
    let url = emulator.url();
    let added = client().post(format!("{url}/_emulator/detections?tenant={TENANT}&count=3")).send().await.unwrap();
    assert_eq!(added.status(), 200);
    assert_eq!(json_body(added).await.as_array().unwrap().len(), 3);
    assert_eq!(emulator.detection_count(TENANT), 3);

    let pushed = client()
        .post(format!("{url}/_emulator/detections"))
        .body(json!([detection("pushed", &minutes_ago(1))]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    assert_eq!(emulator.detection_count(TENANT), 4);

    alerts(&emulator, "").await;
    let stats = json_body(client().get(format!("{url}/_emulator/stats")).send().await.unwrap()).await;
    assert_eq!(stats["tenants"][TENANT]["detections"], 4);
    assert_eq!(stats["alerts_requests"], 1);
    assert_eq!(stats["token_requests"], 1);
    assert_eq!(stats["faults_queued"], 0);
}

#[tokio::test]
async fn control_api_rejects_bad_count() {
    let emulator = start().await;
    let response = client()
        .post(format!("{}/_emulator/detections?tenant={TENANT}&count=many", emulator.url()))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn control_api_revokes_tokens() {
    let (emulator, token) = start_with_one_detection().await;
    let response = client().post(format!("{}/_emulator/tokens/revoke", emulator.url())).send().await.unwrap();
    assert_eq!(response.status(), 200);

    assert_eq!(get_alerts(&emulator, &token, "").await.status(), 401);
}

// Server lifecycle

#[tokio::test]
async fn shutdown_finishes_request_in_flight() {
    let (emulator, token) = start_with_one_detection().await;
    let url = emulator.url();
    emulator.inject_fault(Fault::Slow(Duration::from_millis(300)));
    let in_flight = {
        let emulator = emulator.clone();
        tokio::spawn(async move { get_alerts(&emulator, &token, "").await.status() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    emulator.shutdown().await;

    assert_eq!(in_flight.await.unwrap(), 200);
    assert!(client().get(format!("{url}/api/alerts")).send().await.is_err());
}

#[tokio::test]
async fn unknown_path_is_not_found() {
    let emulator = start().await;
    let response = client().get(format!("{}/api/machines", emulator.url())).send().await.unwrap();

    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn url_has_no_trailing_slash() {
    let emulator = start().await;

    assert_eq!(emulator.url(), format!("http://{}", emulator.addr()));
    assert!(emulator.addr().ip().is_loopback());
    assert_ne!(emulator.addr().port(), 0);
}

#[tokio::test]
async fn run_cli_serves_until_shutdown() {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulateArgs,
    }
    let cli = Cli::try_parse_from(["emulate", "--listen", "127.0.0.1:0", "--generate", "5"]).unwrap();
    assert_eq!(cli.args.client_id, "mde-forwarder-demo");
    assert_eq!(cli.args.token_lifetime_secs, 3599);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(run_cli(cli.args, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());

    let result = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn run_cli_reports_unreadable_file() {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulateArgs,
    }
    let cli =
        Cli::try_parse_from(["emulate", "--listen", "127.0.0.1:0", "--detections", "/nonexistent/detections.json"])
            .unwrap();
    let error = run_cli(cli.args, async {}).await.unwrap_err();

    assert!(error.to_string().contains("/nonexistent/detections.json"), "{error}");
}

/// Detections posted to the control API are served byte for byte: escapes,
/// number spelling, whitespace and lone surrogates are not changed.
#[tokio::test]
async fn control_api_serves_posted_detections_exactly() {
    let emulator = start().await;
    let time = minutes_ago(1);
    let texts = [
        format!(r#"{{"FullId":"exact:1","LastProcessedTimeUtc":"{time}","Score":1E400,"Name":"caf\u00e9"}}"#),
        format!(r#"{{ "FullId" : "exact:2" , "LastProcessedTimeUtc" : "{time}", "Bad\ud800" : "x\udc00" }}"#),
        format!(r#"{{"FullId":"exact:3","LastProcessedTimeUtc":"{time}","Dup":1,"Dup":2}}"#),
    ];
    let body = format!("[{}]", texts.join(" ,\n "));
    let pushed = client().post(format!("{}/_emulator/detections", emulator.url())).body(body).send().await.unwrap();
    assert_eq!(pushed.status(), 200);
    assert_eq!(pushed.text().await.unwrap(), format!("[{}]", texts.join(",")));

    let token = token(&emulator).await;
    let response = client().get(format!("{}/api/alerts", emulator.url())).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let served = response.text().await.unwrap();
    for text in &texts {
        assert!(served.contains(text.as_str()), "{text} not in {served}");
    }
}

/// `--detections FILE --keep-times` serves the file's elements as written,
/// and an element that is not an object does not stop the file loading.
#[tokio::test]
async fn run_cli_keeps_file_texts_with_keep_times() {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulateArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detections.json");
    let time = minutes_ago(1);
    let exact = format!(r#"{{"FullId":"file:1","LastProcessedTimeUtc":"{time}","N":-0.50E+3,"S":"\u0041\ud800"}}"#);
    std::fs::write(&path, format!("[\n  {exact},\n  [1]\n]\n")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let cli = Cli::try_parse_from([
        "emulate",
        "--listen",
        &address.to_string(),
        "--detections",
        path.to_str().unwrap(),
        "--keep-times",
        "--tenant-id",
        TENANT,
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(run_cli(cli.args, async {
        let _ = stopped.await;
    }));
    let url = format!("http://{address}");
    let mut token = None;
    for _ in 0..50 {
        let form = [
            ("resource", RESOURCE),
            ("grant_type", "client_credentials"),
            ("client_id", "mde-forwarder-demo"),
            ("client_secret", "demo-secret"),
        ];
        if let Ok(response) = client().post(format!("{url}/{TENANT}/oauth2/token")).form(&form).send().await {
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            token = body["access_token"].as_str().map(String::from);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = token.expect("the emulator issues a token");
    let served = client().get(format!("{url}/api/alerts")).bearer_auth(&token).send().await.unwrap().text().await.unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();

    assert!(served.contains(&exact), "{exact} not in {served}");
}
