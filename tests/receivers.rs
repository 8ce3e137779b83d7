//! The syslog sink against a real rsyslogd: UDP, TCP and TLS, both
//! framings, both header formats, and CEF parsed back into fields by
//! mmnormalize (liblognorm) and compared with the detections.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::rsyslog::{ClientAuth, Rsyslog, TestCerts};
use common::*;
use mde_forwarder::emulator::{Emulator, EmulatorOptions};
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A detection built to break encoders: pipes, backslashes, equals signs,
/// CR and LF, Traditional Chinese, a key that is not plain ASCII.
fn hostile_detection() -> Value {
    json!({
        "AlertTime": now_text(),
        "LastProcessedTimeUtc": now_text(),
        "ComputerDnsName": "ws-中文.corp.example.com",
        "AlertTitle": "Title | with \\ pipe\r\nand break",
        "Category": "Malware",
        "Severity": "High",
        "AlertId": "hostile-1",
        "FullId": "hostile-1:a=b|c\\d",
        "ThreatName": "Trojan:Win32/測試|x=y",
        "CommandLine": "cmd.exe /c \"a=b\" | findstr \\\\share\\x\r\nsecond line\rthird\nfourth",
        "Description": "行一\n行二 = 三 | 四 \\ 五",
        "UserName": "使用者",
        "IpAddress": "not-an-ip",
        "RemediationIsSuccess": true,
        "WasExecutingWhileDetected": false,
        "ReportID": 1234567,
        "MachineGroup": "台北-Workstations=1|2",
        "Weird-Key": "dropped from CEF",
        "Nested": {"a": [1, "二"]}
    })
}

async fn emulator_with_hostile() -> Emulator {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.push_detection(TENANT_ID, hostile_detection());
    emulator
}

fn syslog_sink(address: SocketAddr, protocol: &str, extra: &str) -> String {
    format!(
        r#"
[[sink]]
name = "rsyslog"
type = "syslog"
address = "{address}"
protocol = "{protocol}"
hostname = "forwarder-host"
facility = "local4"
retry_initial_ms = 50
retry_max_secs = 1
{extra}
"#
    )
}

fn tls_keys(certs: &TestCerts) -> String {
    format!("tls_ca_file = \"{}\"\ntls_server_name = \"localhost\"", certs.ca.display())
}

/// Runs the binary once with `sink` and a file sink beside it, whose JSON
/// lines are the detections exactly as the emulator served them.
async fn run_to(dir: &Path, emulator: &Emulator, sink: &str) -> std::process::Output {
    let sinks = format!("{sink}\n{}", file_sink_toml("archive", &archive_path(dir)));
    let config = write_config(dir, "", &tenant_toml("contoso", TENANT_ID, emulator), &sinks);
    run_once(&config).await
}

fn archive_path(dir: &Path) -> std::path::PathBuf {
    dir.join("archive.jsonl")
}

/// The text value of a detection field as the CEF spec defines it: strings
/// as they are, numbers and booleans as JSON text, nested values as compact
/// JSON; empty strings and nulls count as absent.
fn field_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Header escaping undone the way a CEF parser does: a line break was
/// turned into one space.
fn header_text(text: &str) -> String {
    text.replace("\r\n", " ").replace(['\r', '\n'], " ")
}

/// The extension pairs the CEF mapping promises for a detection.
fn expected_extension(d: &Map<String, Value>) -> BTreeMap<String, String> {
    enum Conv {
        Text,
        Address,
        Flag,
        Millis,
        Integer,
    }
    let rows: &[(&str, &str, Option<&str>, Conv)] = &[
        ("Category", "cat", None, Conv::Text),
        ("Source", "sourceServiceName", None, Conv::Text),
        ("MachineName", "shost", None, Conv::Text),
        ("FileName", "fname", None, Conv::Text),
        ("FilePath", "filePath", None, Conv::Text),
        ("UserDomain", "sntdom", None, Conv::Text),
        ("UserName", "suser", None, Conv::Text),
        ("Sha1", "fileHash", None, Conv::Text),
        ("Sha256", "cs6", Some("cs6Label"), Conv::Text),
        ("Md5", "cs5", Some("cs5Label"), Conv::Text),
        ("ThreatName", "cs1", Some("cs1Label"), Conv::Text),
        ("Actor", "cs4", Some("cs4Label"), Conv::Text),
        ("IpAddress", "src", None, Conv::Address),
        ("Url", "request", None, Conv::Text),
        ("RemediationIsSuccess", "cn2", Some("cn2Label"), Conv::Flag),
        ("WasExecutingWhileDetected", "cn1", Some("cn1Label"), Conv::Flag),
        ("AlertId", "externalId", None, Conv::Text),
        ("LinkToWDATP", "flexString1", Some("flexString1Label"), Conv::Text),
        ("AlertTime", "rt", None, Conv::Millis),
        ("MachineDomain", "sourceDnsDomain", None, Conv::Text),
        ("LogOnUsers", "suid", None, Conv::Text),
        ("CommandLine", "cs2", Some("cs2Label"), Conv::Text),
        ("FullId", "cs3", Some("cs3Label"), Conv::Text),
        ("ReportID", "cn3", Some("cn3Label"), Conv::Integer),
        ("LinkToMTP", "flexString2", Some("flexString2Label"), Conv::Text),
        ("LastProcessedTimeUtc", "deviceCustomDate1", Some("deviceCustomDate1Label"), Conv::Millis),
        ("ComputerDnsName", "dvchost", None, Conv::Text),
        ("DeviceID", "deviceExternalId", None, Conv::Text),
        ("Description", "msg", None, Conv::Text),
        ("RemediationAction", "act", None, Conv::Text),
        ("Severity", "Severity", None, Conv::Text),
    ];
    let mut expected = BTreeMap::new();
    for (field, key, label, conv) in rows {
        let Some(text) = d.get(*field).and_then(field_text) else { continue };
        let converted = match conv {
            Conv::Text => Some(text.clone()),
            Conv::Address => text.parse::<IpAddr>().is_ok().then(|| text.clone()),
            Conv::Flag => match d[*field] {
                Value::Bool(b) => Some(if b { "1" } else { "0" }.to_string()),
                _ => None,
            },
            Conv::Millis => mde_forwarder::timefmt::parse(&text).map(|t| t.timestamp_millis().to_string()),
            Conv::Integer => text.parse::<i64>().ok().map(|n| n.to_string()),
        };
        match converted {
            Some(value) => {
                expected.insert(key.to_string(), value);
                if let Some(label) = label {
                    expected.insert(label.to_string(), field.to_string());
                }
            }
            // A value the key cannot hold travels under the field's name.
            None => {
                expected.insert(field.to_string(), text);
            }
        }
    }
    // The header fields appear in the extension too when the header would
    // change them (a line break becomes a space).
    for field in ["IoaDefinitionId", "AlertTitle"] {
        if let Some(text) = d.get(field).and_then(field_text).filter(|text| text.contains(['\r', '\n'])) {
            expected.insert(field.to_string(), text);
        }
    }
    let mapped: Vec<&str> = rows.iter().map(|r| r.0).chain(["AlertTitle", "IoaDefinitionId"]).collect();
    for (name, value) in d {
        if mapped.contains(&name.as_str()) || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        if let Some(text) = field_text(value) {
            expected.insert(name.clone(), text);
        }
    }
    expected
}

/// The extension as liblognorm parsed it. liblognorm 2.0.6 drops the first
/// character of the first key (fixed in 2.0.7), so that key is matched
/// against the expected keys with their first character removed.
fn parsed_extension(parsed: &Map<String, Value>, expected: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (i, (key, value)) in parsed.iter().enumerate() {
        let mut key = key.clone();
        if i == 0 && !expected.contains_key(&key) {
            if let Some(full) = expected.keys().find(|k| k.len() > 1 && k[1..] == key) {
                key = full.clone();
            }
        }
        out.insert(key, value.as_str().unwrap_or_default().to_string());
    }
    out
}

fn numeric_severity(d: &Map<String, Value>) -> &'static str {
    match d.get("Severity").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
        Some("informational") => "1",
        Some("low") => "3",
        Some("high") => "8",
        _ => "5",
    }
}

fn syslog_severity(d: &Map<String, Value>) -> &'static str {
    match d.get("Severity").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
        Some("high") => "2",
        Some("low") => "5",
        Some("informational") => "6",
        _ => "4",
    }
}

/// The received messages by FullId, read from the parsed CEF.
fn by_full_id(received: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for message in received {
        let extensions = &message["$!"]["cef"]["Extensions"];
        let id = extensions["cs3"].as_str().unwrap_or_else(|| panic!("no cs3 parsed from {message}")).to_string();
        assert!(map.insert(id.clone(), message.clone()).is_none(), "{id} received twice");
    }
    map
}

/// Checks that every detection of the run in `dir` arrived once, with the
/// syslog header fields rsyslog parsed and every CEF field back as it was.
fn assert_received_all(dir: &Path, received: &[Value], app_name_field: &str) {
    let detections = read_json_lines(&archive_path(dir));
    assert_eq!(detections.len(), 47, "the samples and the hostile detection");
    assert_eq!(received.len(), detections.len());
    let messages = by_full_id(received);
    for detection in &detections {
        let d = detection.as_object().unwrap();
        let id = d["FullId"].as_str().unwrap();
        let message = messages.get(id).unwrap_or_else(|| panic!("{id} not received"));
        assert_eq!(message["hostname"], "forwarder-host", "{id}");
        assert_eq!(message[app_name_field], "mde-forwarder", "{id}");
        assert_eq!(message["syslogfacility"], "20", "local4 for {id}");
        assert_eq!(message["syslogseverity"], syslog_severity(d), "{id}");

        let cef = &message["$!"]["cef"];
        assert_eq!(cef["DeviceVendor"], "Microsoft", "{id}");
        assert_eq!(cef["DeviceProduct"], "Microsoft Defender ATP", "{id}");
        assert_eq!(cef["DeviceVersion"], "2.0", "{id}");
        let class_id = ["IoaDefinitionId", "ThreatName", "Category"].iter().find_map(|f| d.get(*f).and_then(field_text)).unwrap_or_default();
        assert_eq!(cef["SignatureID"], header_text(&class_id), "{id}");
        assert_eq!(cef["Name"], header_text(&d.get("AlertTitle").and_then(field_text).unwrap_or_default()), "{id}");
        assert_eq!(cef["Severity"], numeric_severity(d), "{id}");

        let expected = expected_extension(d);
        // rsyslog 8.2302 matches `$!` names without regard to case, so of two
        // keys that differ only in case (`externalId` and the field
        // `ExternalId`) it kept one. The lognormalizer CLI below runs the
        // same liblognorm without rsyslog and checks those keys too.
        let twins: Vec<&String> = expected
            .keys()
            .filter(|k| expected.keys().filter(|o| o.eq_ignore_ascii_case(k)).count() > 1)
            .collect();
        let parsed = parsed_extension(cef["Extensions"].as_object().unwrap(), &expected);
        for (key, value) in expected.iter().filter(|(k, _)| !twins.contains(k)) {
            assert_eq!(parsed.get(key), Some(value), "{id}: key {key}");
        }
        let extra: Vec<&String> = parsed.keys().filter(|k| !expected.keys().any(|e| e.eq_ignore_ascii_case(k))).collect();
        assert!(extra.is_empty(), "{id}: unexpected keys {extra:?}");

        let text = message["msg"].as_str().unwrap();
        let direct = lognormalize(text);
        let direct = parsed_extension(direct["cef"]["Extensions"].as_object().unwrap_or_else(|| panic!("lognormalizer: {direct}")), &expected);
        assert_eq!(direct, expected, "{id}: lognormalizer");
    }
}

/// Parses one message with the `lognormalizer` CLI and the CEF rulebase.
fn lognormalize(message: &str) -> Value {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let rulebase = dir.path().join("cef.rulebase");
    std::fs::write(&rulebase, "version=2\nrule=:%cef:cef%\nrule=: %cef:cef%\n").unwrap();
    let mut child = std::process::Command::new("lognormalizer")
        .arg("-r")
        .arg(&rulebase)
        .args(["-e", "json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("lognormalizer (liblognorm-utils) is installed");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(message.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("lognormalizer output {:?}: {e}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_rfc5424_parsed_by_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_hostile().await;
    // Large enough that no sample is shortened, so every field comes back.
    let sink = syslog_sink(rsyslog.udp, "udp", "header = \"rfc5424\"\nmax_datagram_bytes = 8192");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(47, WAIT);
    assert!(received.iter().all(|m| m["inputname"] == "imudp"));
    assert_received_all(dir.path(), &received, "app-name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_newline_rfc3164_parsed_by_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_hostile().await;
    let sink = syslog_sink(rsyslog.tcp, "tcp", "header = \"rfc3164\"\nframing = \"newline\"");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(47, WAIT);
    assert!(received.iter().all(|m| m["protocol-version"] == "0"), "RFC 3164 header");
    assert_received_all(dir.path(), &received, "programname");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_octet_counting_rfc5424_parsed_by_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_hostile().await;
    let sink = syslog_sink(rsyslog.tcp, "tcp", "header = \"rfc5424\"\nframing = \"octet-counting\"");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(47, WAIT);
    assert!(received.iter().all(|m| m["protocol-version"] == "1"), "RFC 5424 header");
    assert_received_all(dir.path(), &received, "app-name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_octet_counting_rfc5424_parsed_by_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::None)));
    let emulator = emulator_with_hostile().await;
    let extra = format!("header = \"rfc5424\"\nframing = \"octet-counting\"\n{}", tls_keys(&certs));
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    assert_received_all(dir.path(), &rsyslog.wait_for(47, WAIT), "app-name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_newline_rfc3164_parsed_by_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::None)));
    let emulator = emulator_with_hostile().await;
    let extra = format!("header = \"rfc3164\"\nframing = \"newline\"\n{}", tls_keys(&certs));
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    assert_received_all(dir.path(), &rsyslog.wait_for(47, WAIT), "programname");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mutual_auth_with_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::Required)));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let extra = format!(
        "framing = \"octet-counting\"\n{}\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        tls_keys(&certs),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    // rsyslog in x509/certvalid mode drops sessions without a valid client
    // certificate, so every message arriving shows the certificate was sent.
    assert_eq!(rsyslog.wait_for(46, WAIT).len(), 46);
}

/// rsyslog requires a client certificate and the sink has none: the run
/// fails and every detection stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_missing_client_certificate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::Required)));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let extra = format!("framing = \"octet-counting\"\n{}", tls_keys(&certs));
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    let output = run_to(dir.path(), &emulator, &sink).await;

    let log = stderr(&output);
    assert!(!output.status.success(), "{log}");
    // TLS 1.3 rejects the session only after the handshake, so the sink
    // waits for that verdict instead of writing a batch the receiver discards.
    assert!(log.contains("requires a client certificate (mutual TLS)"), "{log}");
    assert!(log.contains("set tls_cert_file and tls_key_file"), "{log}");
    assert!(!log.contains("delivery recovered"), "{log}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rsyslog.received().is_empty());
    assert_eq!(pending(dir.path(), "rsyslog"), 46, "nothing counted as delivered");
}

/// Starts a TCP receiver that closes its first `rejected` connections 20 ms
/// after accepting them, without reading, as syslog-ng does at its
/// `max-connections`. It reads the connections after those to the end.
async fn rejecting_receiver(rejected: usize) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    closing_receiver(rejected, Duration::from_millis(20)).await
}

/// Counts each sample's FullId among the lines `received`, and checks
/// that every one is there.
fn every_sample_received(received: &std::sync::Mutex<Vec<u8>>) -> std::collections::HashMap<String, usize> {
    let expected: std::collections::HashSet<String> = sample_full_ids().into_iter().collect();
    let text = String::from_utf8(received.lock().unwrap().clone()).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let counts = count_full_ids(&lines);
    assert_eq!(counts.keys().cloned().collect::<std::collections::HashSet<_>>(), expected);
    counts
}

/// A receiver that never reads and closes each connection 1.5 s after
/// accepting it gets every batch acknowledged by TCP, and reads none. No
/// detection may count as delivered: the run fails and all stay queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_unread_closes_keep_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let (address, received) = closing_receiver(usize::MAX, Duration::from_millis(1500)).await;
    let sink = syslog_sink(address, "tcp", "batch_size = 5");

    let output = run_to(dir.path(), &emulator, &sink).await;

    assert!(!output.status.success(), "{}", stderr(&output));
    assert!(received.lock().unwrap().is_empty());
    assert_eq!(pending(dir.path(), "rsyslog"), 46, "nothing counted as delivered: {}", stderr(&output));
}

/// A receiver that reads everything and resets each connection when the
/// sink closes it (SO_LINGER 0) never confirms a batch: the run fails with
/// advice to count TCP's acknowledgement, and everything stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_on_close_keep_everything_queued() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(1..) = stream.read(&mut buf).await {}
                // A zero linger makes the drop a reset at once; it does not block.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let sink = syslog_sink(address, "tcp", "");

    let output = run_to(dir.path(), &emulator, &sink).await;

    let log = stderr(&output);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("confirm = \"tcp-ack\""), "{log}");
    assert_eq!(pending(dir.path(), "rsyslog"), 46, "nothing counted as delivered");
}

/// A receiver that closes its first three connections unread 300 ms after
/// accepting them, then reads: every detection arrives, and none stays
/// queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_unread_closes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let (address, received) = closing_receiver(3, Duration::from_millis(300)).await;
    let sink = syslog_sink(address, "tcp", "batch_size = 5");

    let output = run_to(dir.path(), &emulator, &sink).await;

    assert_success(&output);
    every_sample_received(&received);
    assert_eq!(pending(dir.path(), "rsyslog"), 0);
}

/// Each rejected connection had been acknowledged by TCP; none of its
/// batches may count as delivered, so every detection arrives once the
/// receiver reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_unread_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let (address, received) = rejecting_receiver(3).await;
    let sink = syslog_sink(address, "tcp", "");

    let output = run_to(dir.path(), &emulator, &sink).await;

    assert_success(&output);
    assert!(stderr(&output).contains("closed it without reading"), "{}", stderr(&output));
    let counts = every_sample_received(&received);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
}

/// rsyslog requires a client certificate and does not trust the one the
/// sink sends (signed by another CA). With TLS 1.3 the rejection comes after
/// the sink's handshake: the run fails and every detection stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_untrusted_client_certificate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let other = TestCerts::create(&dir.path().join("other-ca"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::Required)));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let extra = format!(
        "framing = \"octet-counting\"\n{}\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        tls_keys(&certs),
        other.client_cert.display(),
        other.client_key.display()
    );
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    let output = run_to(dir.path(), &emulator, &sink).await;

    let log = stderr(&output);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("rejected this sink's client certificate"), "{log}");
    assert!(!log.contains("delivery recovered"), "{log}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rsyslog.received().is_empty());
    assert_eq!(pending(dir.path(), "rsyslog"), 46, "nothing counted as delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_untrusted_server_certificate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let other = TestCerts::create(&dir.path().join("other-ca"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::None)));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let extra = format!("tls_ca_file = \"{}\"", other.ca.display());
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", &extra);
    let output = run_to(dir.path(), &emulator, &sink).await;

    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("TLS handshake with"), "{log}");
    assert!(log.contains("certificate"), "{log}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rsyslog.received().is_empty());
    assert_eq!(pending(dir.path(), "rsyslog"), 46, "nothing counted as delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_skip_verify_connects_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(&dir.path().join("certs"));
    let rsyslog = Rsyslog::start(dir.path(), Some((&certs, ClientAuth::None)));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let sink = syslog_sink(rsyslog.tls.unwrap(), "tls", "tls_insecure_skip_verify = true");
    let output = run_to(dir.path(), &emulator, &sink).await;
    assert_success(&output);

    let log = stderr(&output);
    let warning = log.lines().find(|l| l.contains("tls_insecure_skip_verify")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert_eq!(rsyslog.wait_for(46, WAIT).len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_messages_fit_max_datagram_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_hostile().await;
    let sink = syslog_sink(rsyslog.udp, "udp", "max_datagram_bytes = 600");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(47, WAIT);
    assert_eq!(received.len(), 47);
    for message in &received {
        let raw = message["rawmsg"].as_str().unwrap();
        assert!(raw.len() <= 600, "{} bytes: {raw}", raw.len());
        // Shortening keeps the header and the identifying fields, so the
        // receiver still parses the event and can tell which one it is.
        assert!(message["$!"]["cef"]["Extensions"]["cs3"].is_string(), "{message}");
    }
    let ids = by_full_id(&received);
    assert!(ids.contains_key("hostile-1:a=b|c\\d"));
}

/// A title or class ID longer than the datagram is cut in the CEF header,
/// so the FullId still arrives whole. A FullId that cannot fit is a WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_shortening_keeps_full_id_whole() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let mut long_title = hostile_detection();
    long_title["FullId"] = json!("long-title:1");
    long_title["AlertTitle"] = json!("T|".repeat(5000));
    let mut long_class = hostile_detection();
    long_class["FullId"] = json!("long-class:1");
    long_class["IoaDefinitionId"] = json!("\\=".repeat(5000));
    let mut long_id = hostile_detection();
    let huge_id = format!("long-id:{}", "9".repeat(600));
    long_id["FullId"] = json!(huge_id);
    for detection in [long_title, long_class, long_id] {
        emulator.push_detection(TENANT_ID, detection);
    }
    let sink = syslog_sink(rsyslog.udp, "udp", "max_datagram_bytes = 480");
    let output = run_to(dir.path(), &emulator, &sink).await;
    assert_success(&output);

    let received = rsyslog.wait_for(49, WAIT);
    assert_eq!(received.len(), 49);
    // Read from the message text: rsyslog's CEF parser loses the first
    // character of the first extension key, which is `cs3` when the FullId
    // fills the datagram alone.
    let ids: Vec<String> = received
        .iter()
        .map(|message| {
            let text = message["msg"].as_str().unwrap();
            let start = text.find("cs3=").unwrap_or_else(|| panic!("no cs3 in {text}")) + "cs3=".len();
            let end = text[start..].find(" cs3Label=FullId").unwrap_or_else(|| panic!("no cs3Label in {text}"));
            text[start..start + end].replace("\\=", "=").replace("\\\\", "\\")
        })
        .collect();
    let mut expected = sample_full_ids();
    expected.extend(["long-title:1".to_string(), "long-class:1".to_string()]);
    for id in &expected {
        assert!(ids.contains(id), "{id} not received whole: {ids:?}");
    }
    assert!(!ids.contains(&huge_id), "a FullId longer than the datagram arrived whole");
    assert!(ids.iter().any(|id| id.len() > 200 && huge_id.starts_with(id.as_str())), "the start of the long FullId arrived");
    let log = stderr(&output);
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("lost its FullId")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains(&format!("{}... ({} bytes)", &huge_id[..256], huge_id.len())), "{}", warnings[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leef_over_tcp_reaches_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let sink = syslog_sink(rsyslog.tcp, "tcp", "format = \"leef\"\nframing = \"octet-counting\"");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(46, WAIT);
    assert_eq!(received.len(), 46);
    let mut ids = Vec::new();
    for message in &received {
        let text = message["msg"].as_str().unwrap();
        assert!(text.starts_with("LEEF:2.0|Microsoft|Microsoft Defender ATP|2.0|"), "{text}");
        // rsyslog writes the LEEF tab delimiter as its control character escape.
        let attributes: HashMap<&str, &str> = text.split("#011").filter_map(|pair| pair.split_once('=')).collect();
        ids.push(attributes.get("FullId").unwrap_or_else(|| panic!("no FullId in {text}")).to_string());
    }
    ids.sort();
    let mut expected = sample_full_ids();
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_tcp_reaches_rsyslog() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(dir.path(), None);
    let emulator = emulator_with_hostile().await;
    let sink = syslog_sink(rsyslog.tcp, "tcp", "format = \"json\"");
    assert_success(&run_to(dir.path(), &emulator, &sink).await);

    let received = rsyslog.wait_for(47, WAIT);
    assert_eq!(received.len(), 47);
    let hostile = received
        .iter()
        .map(|m| serde_json::from_str::<Value>(m["msg"].as_str().unwrap()).unwrap())
        .find(|v| v["FullId"] == "hostile-1:a=b|c\\d")
        .expect("hostile detection received");
    let mut expected = hostile_detection();
    expected["AlertTime"] = hostile["AlertTime"].clone();
    expected["LastProcessedTimeUtc"] = hostile["LastProcessedTimeUtc"].clone();
    assert_eq!(hostile, expected);
}
