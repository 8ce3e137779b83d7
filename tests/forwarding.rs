//! End to end: the binary against the emulator and real sockets on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mde_forwarder::emulator::{EmulatorOptions, ExpiryFormat, Fault, TenantSpec};
use serde_json::{json, Value};

fn samples_sorted() -> Vec<String> {
    let mut ids = sample_full_ids();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_reach_tcp_syslog_and_file() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("out/detections.jsonl");
    let sinks = tcp_sink_toml("siem", receiver.addr) + &file_sink_toml("archive", &archive);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

    let output = run_once(&config).await;
    assert_success(&output);

    let lines = receiver.wait_for(46, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 46);
    assert!(lines.iter().all(|l| l.contains("CEF:0|Microsoft|Microsoft Defender ATP|2.0|")));
    let mut received: Vec<String> = count_full_ids(&lines).into_keys().collect();
    received.sort();
    assert_eq!(received, samples_sorted());

    let archived = read_json_lines(&archive);
    let mut archived_ids = full_ids(&archived);
    archived_ids.sort();
    assert_eq!(archived_ids, samples_sorted());
}

/// A TCP sink never shortens a message, so a `max_datagram_bytes` other than
/// the default is a warning at start, and every message arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_size_on_tcp_warns() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = tcp_sink_toml("siem", receiver.addr) + "max_datagram_bytes = 480\n";
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);

    let checked = run_cli(&["check-config", "--config", config.to_str().unwrap()]).await;
    assert_success(&checked);
    assert!(stderr(&checked).contains("warning: sink siem: max_datagram_bytes = 480 applies only to protocol"), "{}", stderr(&checked));

    let output = run_once(&config).await;
    assert_success(&output);
    let log = stderr(&output);
    let warning = log.lines().find(|l| l.contains("max_datagram_bytes = 480 applies only")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("sink=siem"), "{warning}");
    let lines = receiver.wait_for(46, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 46);
    assert!(lines.iter().any(|l| l.len() > 480), "no message was shortened");
}

/// `RUST_LOG=warning` would turn every log line of the forwarder off (a
/// filter reads the word as a module name), so it is ignored with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistaken_rust_log_ignored() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "warning")]).await;
    assert_success(&output);
    let log = stderr(&output);
    assert!(log.contains("RUST_LOG is ignored"), "{log}");
    assert!(log.contains("poll complete"), "the config's level applies: {log}");

    // Under JSON logs the notice is a JSON line too.
    let output = run_cli_env(&["--log-format", "json", "run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "warning")]).await;
    assert_success(&output);
    let log = stderr(&output);
    assert!(log.contains("RUST_LOG is ignored"), "{log}");
    for line in log.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }

    // Blanks around a level would make tracing read a module name.
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "info ")]).await;
    assert_success(&output);
    assert!(stderr(&output).contains("mde-forwarder started"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_keeps_every_field_as_received() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let odd = json!({
        "FullId": "odd:1", "AlertId": "odd", "LastProcessedTimeUtc": now_text(),
        "ReportID": 123456789012345678u64, "Severity": null, "NewField": {"nested": [1, "二"]}, "Score": 0.1
    });
    emulator.push_detection(TENANT_ID, odd.clone());
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("detections.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    let archived = read_json_lines(&archive);
    let found = archived.iter().find(|v| v["FullId"] == "odd:1").expect("odd detection archived");
    assert_eq!(found, &odd);
    assert_eq!(archived.len(), 47);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_sends_nothing_new() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));

    assert_success(&run_once(&config).await);
    receiver.wait_for(46, Duration::from_secs(5)).await;
    assert_success(&run_once(&config).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(receiver.lines().len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_checkpoint() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));

    assert_success(&run_once(&config).await);
    let added: Vec<String> = (0..3).map(|_| emulator.new_detection(TENANT_ID)["FullId"].as_str().unwrap().to_string()).collect();
    assert_success(&run_once(&config).await);

    let lines = receiver.wait_for(49, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 49);
    let last_three: Vec<String> = lines[46..].iter().map(|l| cef_full_id(l).unwrap()).collect();
    assert_eq!(last_three.iter().collect::<HashSet<_>>(), added.iter().collect::<HashSet<_>>());
    let second_since = emulator.requests().last().unwrap().query.iter().find(|(k, _)| k == "sinceTimeUtc").unwrap().1.clone();
    let first_since = emulator.requests()[0].query.iter().find(|(k, _)| k == "sinceTimeUtc").unwrap().1.clone();
    assert!(second_since > first_since, "second window {second_since} should start after the first {first_since}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_windows_give_no_duplicates() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The whole sample set stays inside every window.
    let config = write_config(dir.path(), "overlap_secs = 86000", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));

    for _ in 0..3 {
        emulator.new_detection(TENANT_ID);
        assert_success(&run_once(&config).await);
    }

    let lines = receiver.wait_for(49, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = count_full_ids(&receiver.lines());
    assert_eq!(lines.len(), 49);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_pages_backwards_until_window_covered() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "limit = 5", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));

    assert_success(&run_once(&config).await);

    let lines = receiver.wait_for(46, Duration::from_secs(5)).await;
    let mut ids: Vec<String> = count_full_ids(&lines).into_keys().collect();
    ids.sort();
    assert_eq!(ids, samples_sorted());
    let requests = emulator.requests();
    assert!(requests.len() >= 10, "46 detections need at least 10 pages of 5, saw {}", requests.len());
    assert!(requests[1..].iter().all(|r| r.query.iter().any(|(k, _)| k == "untilTimeUtc")));
    assert!(requests.iter().all(|r| r.query.contains(&("limit".to_string(), "5".to_string()))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refreshed_and_request_retried() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    emulator.inject_fault(Fault::Unauthorized);

    let output = run_once(&config).await;

    assert_success(&output);
    assert_eq!(emulator.token_requests(), 2);
    assert_eq!(receiver.wait_for(46, Duration::from_secs(5)).await.len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiring_mid_run_is_refreshed() {
    let options = EmulatorOptions { token_lifetime: Duration::from_secs(2), expiry_format: ExpiryFormat::String };
    let emulator = emulator_with_samples(options).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let mut child = tokio::process::Command::new(binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        emulator.new_detection(TENANT_ID);
    }
    let lines = receiver.wait_for(51, Duration::from_secs(5)).await;
    let _ = child.kill().await;

    assert_eq!(lines.len(), 51);
    assert!(emulator.token_requests() >= 2, "token requests: {}", emulator.token_requests());
    let unauthorized = emulator.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(unauthorized, 0, "an expired token was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_tenant_is_named_with_cause_and_others_continue() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.add_tenant("forbidden-tenant-id", TenantSpec { forbidden: true, ..tenant_spec() });
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tenants = tenant_toml("contoso", TENANT_ID, &emulator) + &tenant_toml("fabrikam", "forbidden-tenant-id", &emulator);
    let config = write_config(dir.path(), "", &tenants, &tcp_sink_toml("siem", receiver.addr));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("tenant fabrikam"), "{err}");
    assert!(err.contains("403"), "{err}");
    assert!(err.contains("not onboarded"), "{err}");
    assert_eq!(receiver.wait_for(46, Duration::from_secs(5)).await.len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_honours_retry_after() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    emulator.inject_fault(Fault::Status { status: 429, retry_after_secs: Some(2), body: String::new() });

    let started = std::time::Instant::now();
    let output = run_once(&config).await;

    assert_success(&output);
    assert!(started.elapsed() >= Duration::from_secs(2), "retried before Retry-After");
    assert!(stderr(&output).contains("429"));
    assert_eq!(receiver.wait_for(46, Duration::from_secs(5)).await.len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_backoff() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    for _ in 0..2 {
        emulator.inject_fault(Fault::Status { status: 500, retry_after_secs: None, body: "Error in the service".into() });
    }

    let output = run_once(&config).await;

    assert_success(&output);
    assert_eq!(emulator.requests().len(), 3);
    assert_eq!(receiver.wait_for(46, Duration::from_secs(5)).await.len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_server_error_fails_once_run() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    for _ in 0..3 {
        emulator.inject_fault(Fault::Status { status: 503, retry_after_secs: None, body: "busy".into() });
    }

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("HTTP 503"), "{}", stderr(&output));
    assert!(receiver.lines().is_empty());
}

/// Each malformed body fails the cycle with what arrived, and the checkpoint
/// does not move: a clean run afterwards still delivers every detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_never_count_as_empty() {
    let cases = [
        (Fault::EmptyOk, "body is empty"),
        (Fault::Html, "text/html"),
        (Fault::Truncated, "truncated"),
        (Fault::NotArray, "expected a JSON array"),
    ];
    for (fault, expected) in cases {
        let emulator = emulator_with_samples(EmulatorOptions::default()).await;
        let receiver = LineReceiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "retry_max_attempts = 1", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
        emulator.inject_fault(fault.clone());

        let failed = run_once(&config).await;
        assert_eq!(failed.status.code(), Some(1), "{fault:?}");
        assert!(stderr(&failed).contains(expected), "{fault:?}: {}", stderr(&failed));
        let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
        assert!(stdout(&state).contains("contoso: none"), "{fault:?} moved the checkpoint: {}", stdout(&state));
        if matches!(fault, Fault::Truncated) {
            // The detections complete before the cut are queued and sent.
            let early = receiver.wait_for(1, Duration::from_secs(5)).await;
            assert!(!early.is_empty(), "nothing before the cut was delivered");
        }

        assert_success(&run_once(&config).await);
        let lines = receiver.wait_for(46, Duration::from_secs(5)).await;
        assert_eq!(count_full_ids(&lines).len(), 46, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_values_never_sink_the_batch() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let now = now_text();
    let odd: Vec<Value> = vec![
        json!({"FullId": "odd:number-title", "LastProcessedTimeUtc": now, "AlertTitle": 42, "Severity": 7}),
        json!({"FullId": "odd:nulls", "LastProcessedTimeUtc": now, "AlertTitle": null, "Category": null, "RemediationIsSuccess": "maybe"}),
        json!({"FullId": "odd:unknown", "LastProcessedTimeUtc": now, "Brand|New=Field": "x", "Nested": {"a": [1, 2]}}),
        json!({"FullId": "odd:bad-times", "LastProcessedTimeUtc": now, "AlertTime": "not a time", "ReportID": "abc"}),
        json!({"FullId": "odd:line-breaks", "LastProcessedTimeUtc": now, "AlertTitle": "a\r\nb|c", "Description": "x\ny=z\\"}),
    ];
    for detection in &odd {
        emulator.push_detection(TENANT_ID, detection.clone());
    }
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));

    assert_success(&run_once(&config).await);

    let lines = receiver.wait_for(51, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 51, "every detection is one line");
    let counts = count_full_ids(&lines);
    for detection in &odd {
        assert_eq!(counts.get(detection["FullId"].as_str().unwrap()), Some(&1), "{detection}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_sink_fails_once_run_and_keeps_detections() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let archive = dir.path().join("archive.jsonl");
    let sinks = tcp_sink_toml("siem", closed) + &file_sink_toml("archive", &archive);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains(&format!("sink siem: connect to {closed} failed")), "{}", stderr(&output));
    assert_eq!(read_json_lines(&archive).len(), 46, "the other sink carries on");

    let receiver = LineReceiver::bind(closed, Default::default()).await;
    assert_success(&run_once(&config).await);
    assert_eq!(receiver.wait_for(46, Duration::from_secs(5)).await.len(), 46);
    assert_eq!(read_json_lines(&archive).len(), 46, "the archive got nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_reach_the_api() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator)
        + "machine_groups = [\"Taipei-Workstations\", \"UK Servers\"]\ndevice_created_machine_tags = \"vip\"\n";
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    let request = &emulator.requests()[0];
    let groups: Vec<&str> = request.query.iter().filter(|(k, _)| k == "machinegroups").map(|(_, v)| v.as_str()).collect();
    assert_eq!(groups, ["Taipei-Workstations", "UK Servers"]);
    assert!(request.query.contains(&("DeviceCreatedMachineTags".into(), "vip".into())));
    let since = &request.query.iter().find(|(k, _)| k == "sinceTimeUtc").unwrap().1;
    assert!(since.ends_with('Z') && since.len() == 28, "sinceTimeUtc {since}");
    let archived = read_json_lines(&archive);
    assert!(!archived.is_empty());
    assert!(archived.iter().all(|d| d["MachineGroup"] == "Taipei-Workstations" && d["DeviceCreatedMachineTags"].as_str().unwrap().contains("vip")));
}
