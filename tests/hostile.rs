//! Hostile detections and servers: nothing is lost, changed or leaked.

mod common;

use std::time::Duration;

use common::*;
use mde_forwarder::emulator::{Emulator, EmulatorOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn file_and_cef_sinks(dir: &std::path::Path, receiver: std::net::SocketAddr) -> String {
    tcp_sink_toml("siem", receiver) + &file_sink_toml("archive", &dir.join("archive.jsonl"))
}

/// Builds `{"E": [[[ ... 1 ... ]]]}` nested `depth` levels, beyond what a
/// parser with a recursion limit reads.
fn deeply_nested(full_id: &str, depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    json!({"FullId": full_id, "LastProcessedTimeUtc": now_text(), "E": value})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_fields_become_dead_letters() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let deep = deeply_nested("deep:1", 200);
    emulator.push_detection(TENANT_ID, deep.clone());
    let big: Value = serde_json::from_str(&format!(
        r#"{{"FullId":"big:1","LastProcessedTimeUtc":"{}","ReportID":123456789012345678901234567890,"Score":1e400}}"#,
        now_text()
    ))
    .unwrap();
    emulator.push_detection(TENANT_ID, big);
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_and_cef_sinks(dir.path(), receiver.addr));
    let list_args = ["state", "--config", config.to_str().unwrap(), "dead-letters"];
    let empty = run_cli(&list_args).await;
    assert_success(&empty);
    assert_eq!(stdout(&empty), "");
    assert!(stderr(&empty).contains("no dead letters"), "{}", stderr(&empty));

    assert_dead_letters_stored(&run_once(&config).await);

    let listing = run_cli(&list_args).await;
    assert_success(&listing);
    let rows: Vec<Vec<String>> = stdout(&listing).lines().map(|l| l.split('\t').map(String::from).collect()).collect();
    assert_eq!(rows[0], ["id", "time", "sink", "tenant", "FullId", "reason", "text"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][2..5], ["siem", "contoso", "deep:1"]);
    let lines = receiver.wait_for(47, Duration::from_secs(5)).await;
    let big_line = lines.iter().find(|l| l.contains("cs3=big:1")).expect("big numbers reach CEF");
    // Too large for cn3 (a 64-bit number in ArcSight), so it keeps its own name.
    assert!(big_line.contains("ReportID=123456789012345678901234567890"), "{big_line}");
    assert!(!lines.iter().any(|l| l.contains("deep:1")), "no CEF event without its fields");
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sink, "siem");
    assert!(letters[0].reason.contains("cannot be parsed"), "{}", letters[0].reason);
    // The test's own JSON reader has a depth limit too, so compare text.
    let archived = std::fs::read_to_string(dir.path().join("archive.jsonl")).unwrap();
    let expected = serde_json::to_string(&deep).unwrap();
    assert!(archived.lines().any(|l| l == expected), "the JSON sink forwards it unchanged");

    // A mistyped id is an error and changes nothing. A real one is purged.
    let cfg = config.to_str().unwrap();
    let missing = run_cli(&["state", "--config", cfg, "purge", "--id", "999"]).await;
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no dead letter with id 999"), "{}", stderr(&missing));
    assert_eq!(dead_letters(dir.path()).len(), 1);
    let id = letters[0].id.to_string();
    let purged = run_cli(&["state", "--config", cfg, "purge", "--id", &id]).await;
    assert_success(&purged);
    assert_eq!(stdout(&purged), "1 dead letter deleted\n");
    assert!(dead_letters(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_and_string_full_ids_are_both_forwarded() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.push_detection(TENANT_ID, json!({"FullId": 42, "LastProcessedTimeUtc": now_text(), "AlertTitle": "number"}));
    emulator.push_detection(TENANT_ID, json!({"FullId": "42", "LastProcessedTimeUtc": now_text(), "AlertTitle": "string"}));
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    let titles: Vec<Value> = read_json_lines(&archive).into_iter().map(|d| d["AlertTitle"].clone()).collect();
    assert!(titles.contains(&json!("number")));
    assert!(titles.contains(&json!("string")));
}

/// Starts an emulator with five detections. With `limit = 3` the first
/// page ends at `x`, inside the 100 ns tick that also contains `b`.
async fn emulator_with_detections_in_one_tick() -> Emulator {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    let base = chrono::Utc::now() - chrono::Duration::minutes(5);
    let at = |offset_ns: i64| (base + chrono::Duration::nanoseconds(offset_ns)).format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
    let rows = [("c1", 2_000_000_000), ("c2", 1_000_000_000), ("x", 123_456_789), ("b", 123_456_750), ("d", -3_600_000_000_000)];
    for (id, offset) in rows {
        emulator.push_detection(TENANT_ID, json!({"FullId": id, "LastProcessedTimeUtc": at(offset)}));
    }
    emulator
}

/// Timestamps finer than the API's 100 ns ticks must not fall between pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_keeps_detections_between_ticks() {
    let emulator = emulator_with_detections_in_one_tick().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "limit = 3", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    let mut ids = full_ids(&read_json_lines(&archive));
    ids.sort();
    assert_eq!(ids, ["b", "c1", "c2", "d", "x"]);
}

/// `pull` pages like the poller: a detection stamped between two 100 ns
/// ticks, next to the oldest of a full page, is in the next page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_keeps_detections_between_ticks() {
    let emulator = emulator_with_detections_in_one_tick().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "limit = 3", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &dir.path().join("a.jsonl")));
    let out = dir.path().join("pulled.jsonl");
    let args = ["pull", "--config", config.to_str().unwrap(), "--tenant", "contoso", "--ago", "P1D", "--output", out.to_str().unwrap()];

    let output = tokio::time::timeout(Duration::from_secs(20), run_cli(&args)).await.expect("pull ends");

    assert_success(&output);
    let mut ids = full_ids(&read_json_lines(&out));
    ids.sort();
    assert_eq!(ids, ["b", "c1", "c2", "d", "x"]);
}

/// `pull --until` with more digits than the API's 100 ns ticks still
/// includes a detection stamped at that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_until_keeps_its_own_tick() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    let at = chrono::Timelike::with_nanosecond(&(chrono::Utc::now() - chrono::Duration::minutes(5)), 123_456_789).unwrap();
    let until = at.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
    emulator.push_detection(TENANT_ID, json!({"FullId": "at-until", "LastProcessedTimeUtc": until}));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &dir.path().join("a.jsonl")));
    let out = dir.path().join("pulled.jsonl");
    let since = mde_forwarder::timefmt::format_query(at - chrono::Duration::hours(1));
    let args = ["pull", "--config", config.to_str().unwrap(), "--tenant", "contoso", "--since", &since, "--until", &until, "--output", out.to_str().unwrap()];

    let output = run_cli(&args).await;

    assert_success(&output);
    assert_eq!(full_ids(&read_json_lines(&out)), ["at-until"]);
}

/// A number `FullId` and the same digits as a string are two detections,
/// and one without a `FullId` is one, also when they come back in two pages
/// of `pull`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_pages_by_dedupe_key() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    let minutes_ago = |m: i64| mde_forwarder::timefmt::format_query(chrono::Utc::now() - chrono::Duration::minutes(m));
    for (m, id) in [(1, "new:1"), (2, "new:2"), (3, "new:3"), (20, "old:1")] {
        emulator.push_detection(TENANT_ID, json!({"FullId": id, "LastProcessedTimeUtc": minutes_ago(m), "Kind": id}));
    }
    // With limit 4 the first page ends inside this group, and the second
    // page returns the whole group again.
    let boundary = minutes_ago(10);
    emulator.push_detection(TENANT_ID, json!({"FullId": 42, "LastProcessedTimeUtc": boundary, "Kind": "number"}));
    emulator.push_detection(TENANT_ID, json!({"FullId": "42", "LastProcessedTimeUtc": boundary, "Kind": "string"}));
    emulator.push_detection(TENANT_ID, json!({"LastProcessedTimeUtc": boundary, "Kind": "no id"}));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "limit = 4", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &dir.path().join("a.jsonl")));
    let out = dir.path().join("pulled.jsonl");
    let args = ["pull", "--config", config.to_str().unwrap(), "--tenant", "contoso", "--ago", "P1D", "--output", out.to_str().unwrap()];

    let output = tokio::time::timeout(Duration::from_secs(20), run_cli(&args)).await.expect("pull ends");

    assert_success(&output);
    let pulled = read_json_lines(&out);
    let mut kinds: Vec<&str> = pulled.iter().filter_map(|d| d["Kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["new:1", "new:2", "new:3", "no id", "number", "old:1", "string"]);
    assert!(emulator.requests().len() >= 2, "the test needs a page boundary");
}

/// Starts a server that replies to every request with `status` and a body
/// that repeats the whole request, as a misbehaving proxy might.
async fn echo_server(status: u16) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 16 * 1024];
                let n = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut request)).await.ok().and_then(Result::ok).unwrap_or(0);
                let body = format!("<html>echo {}</html>", String::from_utf8_lossy(&request[..n]));
                let reply = format!("HTTP/1.1 {status} Oops\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_token_never_reaches_the_log() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    for status in [403, 400, 503, 200] {
        let echo = echo_server(status).await;
        let tenant = tenant_toml("contoso", TENANT_ID, &emulator).replace(&format!("api_url = \"{}\"", emulator.url()), &format!("api_url = \"http://{echo}\""));
        let config = write_config(dir.path(), "retry_max_attempts = 1", &tenant, &file_sink_toml("archive", &dir.path().join("a.jsonl")));

        let output = run_cli(&["--log-format", "json", "run", "--once", "--config", config.to_str().unwrap()]).await;

        assert_eq!(output.status.code(), Some(1), "status {status}");
        let text = stderr(&output) + &stdout(&output);
        let tokens = emulator.issued_tokens();
        assert!(!tokens.is_empty());
        for token in tokens {
            assert!(!text.contains(&token), "status {status}: token in output: {text}");
        }
        assert!(text.contains("[redacted]"), "status {status}: the echo is still reported: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_client_secret_not_logged() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let echo = echo_server(400).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "Ab+c/d=e f&g-Secret";
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator)
        .replace(&format!("login_url = \"{}\"", emulator.url()), &format!("login_url = \"http://{echo}\""))
        .replace(CLIENT_SECRET, secret);
    let config = write_config(dir.path(), "retry_max_attempts = 1", &tenant, &file_sink_toml("archive", &dir.path().join("a.jsonl")));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains(&encoded), "{text}");
    assert!(!text.contains("g-Secret"), "{text}");
    assert!(text.contains("not an Azure AD error"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_config_errors() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a.jsonl")));
    let path = config.to_str().unwrap();

    let output = run_cli_env(&["check-config", "--config", path], &[("MDE_FORWARDER__POLL__INTERVAL_SECS", "18446744073709551615")]).await;

    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("poll.interval_secs"), "{}", stderr(&output));
}

/// A lone UTF-16 surrogate is valid JSON in a value and in a field name, but
/// it cannot be decoded. The JSON sink gets such detections byte for byte,
/// and the CEF sink keeps them as its dead letters. Served by a plain HTTP
/// server, because the emulator stores detections as parsed values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogates_reach_json_sinks_unchanged() {
    let time = now_text();
    let detections = [
        format!(r#"{{"FullId":"value:1","LastProcessedTimeUtc":"{time}","Title":"a\ud800b"}}"#),
        format!(r#"{{"FullId":"name:1","LastProcessedTimeUtc":"{time}","Tit\udc00le":"x"}}"#),
        format!(r#"{{"FullId":"plain:1","LastProcessedTimeUtc":"{time}","Title":"fine"}}"#),
    ];
    let body = format!("[{}]", detections.join(","));
    let (_api, tenant) = api_answering(body).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant, &file_and_cef_sinks(dir.path(), receiver.addr));
    assert_dead_letters_stored(&run_once(&config).await);

    let archived = std::fs::read_to_string(dir.path().join("archive.jsonl")).unwrap();
    assert_eq!(archived.lines().collect::<Vec<_>>(), detections.iter().map(String::as_str).collect::<Vec<_>>());
    let lines = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("plain:1"), "{}", lines[0]);
    let mut letters: Vec<(String, String)> = dead_letters(dir.path()).into_iter().map(|l| (l.sink, l.detection)).collect();
    letters.sort();
    let mut expected: Vec<(String, String)> = detections[..2].iter().map(|d| ("siem".to_string(), d.clone())).collect();
    expected.sort();
    assert_eq!(letters, expected);
}

/// A response element that is not UTF-8 keeps its exact bytes. The listing
/// marks it `not-utf-8`, `--raw` writes the bytes back, and a requeue is
/// rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_dead_letter_keeps_exact_bytes() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));
    let element: &[u8] = b"{\"FullId\":\"da63\xff\xfe\",\"Title\":\"caf\xe9\"}";
    {
        let store = open_store(dir.path());
        assert!(store.keep_invalid("contoso", element, "response element is not a detection: not valid UTF-8", chrono::Utc::now()).unwrap());
        store.dead_letter("archive", "contoso", r#"{"FullId":42}"#, "HTTP 400").unwrap();
        store.dead_letter("archive", "contoso", r#"{"FullId":"42"}"#, "HTTP 400").unwrap();
    }
    let cfg = config.to_str().unwrap();

    let listing = run_cli(&["state", "--config", cfg, "dead-letters"]).await;
    assert_success(&listing);
    let rows: Vec<Vec<String>> = stdout(&listing).lines().map(|l| l.split('\t').map(String::from).collect()).collect();
    assert_eq!(rows[0], ["id", "time", "sink", "tenant", "FullId", "reason", "text"]);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[1][2..5], ["(source)", "contoso", "-"], "a FullId with replaced bytes is not shown");
    assert_eq!(rows[1][6], "not-utf-8");
    assert_eq!(rows[2][4..], ["json:42", "HTTP 400", "utf-8"]);
    assert_eq!(rows[3][4..], ["42", "HTTP 400", "utf-8"]);

    let id = rows[1][0].clone();
    let raw = run_cli(&["state", "--config", cfg, "dead-letters", "--id", &id, "--raw"]).await;
    assert_success(&raw);
    assert_eq!(raw.stdout, element, "byte for byte, nothing added");

    let two = run_cli(&["state", "--config", cfg, "dead-letters", "--id", &id, "--id", &rows[2][0], "--raw"]).await;
    assert!(!two.status.success());
    assert!(stderr(&two).contains("give one --id"), "{}", stderr(&two));

    let requeue = run_cli(&["state", "--config", cfg, "requeue"]).await;
    assert!(!requeue.status.success());
    let message = stderr(&requeue);
    assert!(message.contains(&format!("dead letter {id} is not valid UTF-8")), "{message}");
    assert!(message.contains(&format!("--id {id} --raw")), "{message}");
    assert_eq!(dead_letters(dir.path()).len(), 3, "a refused requeue changes nothing");
}
