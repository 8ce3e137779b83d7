//! Per-sink routing end to end: severity, categories and tenants, with
//! file sinks so that what each sink took is easy to read back.

mod common;

use std::path::Path;

use common::*;
use mde_forwarder::emulator::{sample_detections, EmulatorOptions};
use serde_json::Value;

const OTHER_TENANT_ID: &str = "99999999-8888-7777-6666-555555555555";

fn routed_sink_toml(name: &str, path: &Path, routing: &str) -> String {
    format!("{}{routing}\n", file_sink_toml(name, path))
}

/// Sample FullIds whose detection passes `keep`, sorted.
fn sample_ids_where(keep: impl Fn(&Value) -> bool) -> Vec<String> {
    let mut ids: Vec<String> = sample_detections().iter().filter(|d| keep(d)).map(full_id_of).collect();
    ids.sort();
    ids
}

fn sorted_ids(path: &Path) -> Vec<String> {
    let mut ids = full_ids(&read_json_lines(path));
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_severity_skips_lower_detections() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let high = dir.path().join("high.jsonl");
    let medium = dir.path().join("medium.jsonl");
    let sinks = routed_sink_toml("high", &high, "min_severity = \"high\"")
        + &routed_sink_toml("medium", &medium, "min_severity = \"medium\"");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

    assert_success(&run_once(&config).await);

    let expected_high = sample_ids_where(|d| d["Severity"] == "High");
    let expected_medium = sample_ids_where(|d| d["Severity"] == "High" || d["Severity"] == "Medium");
    assert!(!expected_high.is_empty());
    assert_eq!(sorted_ids(&high), expected_high);
    assert_eq!(sorted_ids(&medium), expected_medium);
    assert_eq!(pending(dir.path(), "high"), 0, "filtered detections move the cursor too");
    assert_eq!(pending(dir.path(), "medium"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn categories_include_and_exclude() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let included = dir.path().join("included.jsonl");
    let excluded = dir.path().join("excluded.jsonl");
    let sinks = routed_sink_toml("included", &included, "include_categories = [\"malware\", \"EXPLOIT\"]")
        + &routed_sink_toml("excluded", &excluded, "exclude_categories = [\"Execution\", \"exfiltration\"]");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

    assert_success(&run_once(&config).await);

    let expected_included = sample_ids_where(|d| d["Category"] == "Malware" || d["Category"] == "Exploit");
    let expected_excluded = sample_ids_where(|d| d["Category"] != "Execution" && d["Category"] != "Exfiltration");
    assert!(!expected_included.is_empty());
    assert_eq!(sorted_ids(&included), expected_included);
    assert_eq!(sorted_ids(&excluded), expected_excluded);
    assert_eq!(pending(dir.path(), "included"), 0);
    assert_eq!(pending(dir.path(), "excluded"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_limit_a_sink() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.add_tenant(OTHER_TENANT_ID, tenant_spec());
    let mut other_ids: Vec<String> = (0..3).map(|_| full_id_of(&emulator.new_detection(OTHER_TENANT_ID))).collect();
    other_ids.sort();
    let dir = tempfile::tempdir().unwrap();
    let fabrikam = dir.path().join("fabrikam.jsonl");
    let everything = dir.path().join("everything.jsonl");
    let sinks = routed_sink_toml("fabrikam-only", &fabrikam, "tenants = [\"fabrikam\"]") + &file_sink_toml("everything", &everything);
    let tenants = tenant_toml("contoso", TENANT_ID, &emulator) + &tenant_toml("fabrikam", OTHER_TENANT_ID, &emulator);
    let config = write_config(dir.path(), "", &tenants, &sinks);

    assert_success(&run_once(&config).await);

    assert_eq!(sorted_ids(&fabrikam), other_ids);
    assert_eq!(read_json_lines(&everything).len(), 46 + 3);
    assert_eq!(pending(dir.path(), "fabrikam-only"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenant_in_sink_fails_config() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = routed_sink_toml("archive", &dir.path().join("a.jsonl"), "tenants = [\"northwind\"]");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);

    let output = run_once(&config).await;

    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("sink[0].tenants"), "{log}");
    assert!(log.contains("northwind"), "{log}");
}
