//! The forwarder as a service: the systemd unit, the notify protocol,
//! signals and reload, the health and metrics listener, logs and the
//! check-config exit codes. Every test runs the real binary against the
//! emulator and sockets on 127.0.0.1.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mde_forwarder::emulator::{EmulatorOptions, Fault};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

const WAIT: Duration = Duration::from_secs(10);

/// A daemon started with `run --config`, its stderr collected line by line.
struct Daemon {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(binary())
            .args(["run", "--config", config.to_str().unwrap()])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, stderr }
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) on the pid of a child this test started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    async fn wait_for_log(&self, text: &str) -> bool {
        wait_until(WAIT, || self.stderr.lock().unwrap().iter().any(|l| l.contains(text))).await
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and returns the exit code.
    async fn terminate(mut self) -> (Option<i32>, String) {
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(WAIT, self.child.wait()).await.expect("daemon exits after SIGTERM").unwrap();
        // Lets the reader task take the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status.code(), self.log())
    }
}

/// Returns a free port on 127.0.0.1. Another process could take it before the
/// daemon binds it, which would fail the test loudly, not silently.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `[service]` lines for `write_config`, which places its tenant text right
/// after its `[service]` table.
fn listen_line(port: u16) -> String {
    format!("listen = \"127.0.0.1:{port}\"\n")
}

async fn http_get(url: &str) -> (u16, String) {
    let reply = reqwest::get(url).await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.text().await.unwrap())
}

#[test]
fn systemd_unit_passes_verify() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/mde-forwarder.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mde-forwarder run"), "the unit runs the installed binary");
    // verify checks that ExecStart= is executable, so the copy points at the
    // binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mde-forwarder.service");
    std::fs::write(&path, unit.replace("/usr/bin/mde-forwarder", binary())).unwrap();

    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze runs; install the Debian package systemd (.ci/run does)");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify failed: {stderr}");
    // verify exits 0 for unknown keys and unparsable values, printing them.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify warned: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_gets_ready_status_watchdog_stopping() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "interval_secs = 60", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let collected = messages.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = text.contains("STOPPING=1");
                collected.lock().unwrap().push(text);
                if done {
                    return;
                }
            }
        }
    });
    let has = |text: &str| messages.lock().unwrap().iter().any(|m| m.lines().any(|l| l.starts_with(text)));

    let daemon = Daemon::start(&config, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "1000000")]);
    assert!(wait_until(WAIT, || has("READY=1")).await, "no READY=1: {:?}", messages.lock().unwrap());
    assert!(wait_until(WAIT, || has("STATUS=contoso: ok at")).await, "no poll STATUS: {:?}", messages.lock().unwrap());
    assert!(wait_until(WAIT, || has("WATCHDOG=1")).await, "no WATCHDOG=1: {:?}", messages.lock().unwrap());
    let (code, log) = daemon.terminate().await;
    reader.join().unwrap();

    assert_eq!(code, Some(0), "{log}");
    assert!(has("STOPPING=1"), "no STOPPING=1: {:?}", messages.lock().unwrap());
    let status = messages.lock().unwrap().iter().find(|m| m.contains("STATUS=contoso: ok")).cloned().unwrap();
    assert!(status.contains("46 fetched"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_with_cursors_stored() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "interval_secs = 60", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));
    let daemon = Daemon::start(&config, &[]);
    assert!(wait_until(WAIT, || read_json_lines(&archive).len() == 46).await);

    let (code, log) = daemon.terminate().await;

    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("mde-forwarder stopped"), "{log}");
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&state).contains("sink archive: 0 pending"), "{}", stdout(&state));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_sink_that_gets_new_detections() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator);
    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("siem", receiver.addr));
    let daemon = Daemon::start(&config, &[]);
    assert_eq!(receiver.wait_for(46, WAIT).await.len(), 46);

    let archive = dir.path().join("added.jsonl");
    write_config(dir.path(), "", &tenant, &(tcp_sink_toml("siem", receiver.addr) + &file_sink_toml("added", &archive)));
    daemon.signal(libc::SIGHUP);
    assert!(daemon.wait_for_log("config reloaded").await, "{}", daemon.log());
    let added = emulator.new_detection(TENANT_ID)["FullId"].as_str().unwrap().to_string();

    assert!(wait_until(WAIT, || !read_json_lines(&archive).is_empty()).await, "{}", daemon.log());
    let archived = full_ids(&read_json_lines(&archive));
    assert_eq!(archived.len(), 1, "the new sink starts at the end of the outbox: {archived:?}");
    assert_eq!(archived[0], added);
    let lines = receiver.wait_for(47, WAIT).await;
    assert_eq!(cef_full_id(&lines[46]).as_deref(), Some(added.as_str()));
    let counts = count_full_ids(&receiver.lines());
    assert!(counts.values().all(|&n| n == 1), "the reload sent something twice: {counts:?}");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A SIGTERM while a reload waits for a stuck sink ends the daemon after
/// that one drain: the new config is not started only to be drained again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_reload_skips_the_new_config() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator);
    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("siem", closed));
    let daemon = Daemon::start(&config, &[]);
    assert!(daemon.wait_for_log("poll complete").await, "{}", daemon.log());

    // The sink cannot deliver, so the reload's drain lasts the whole grace period.
    daemon.signal(libc::SIGHUP);
    assert!(daemon.wait_for_log("SIGHUP: reloading the config").await, "{}", daemon.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, log) = daemon.terminate().await;

    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("shutting down during a reload; the new config is not started"), "{log}");
    assert!(!log.contains("config reloaded"), "{log}");
    assert!(!log.contains("config reload rejected"), "{log}");
}

/// A reload that stops a worker with detections still queued logs that the
/// new worker sends them, not that the next run does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_new_worker_for_queue() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator);
    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("siem", closed_addr()));
    let daemon = Daemon::start(&config, &[]);
    assert!(daemon.wait_for_log("poll complete").await, "{}", daemon.log());

    // The sink cannot deliver, so its worker stops at the end of the grace period.
    daemon.signal(libc::SIGHUP);
    assert!(daemon.wait_for_log("config reloaded").await, "{}", daemon.log());
    let (code, log) = daemon.terminate().await;

    assert_eq!(code, Some(0), "{log}");
    let reload = &log[..log.find("config reloaded").unwrap()];
    assert!(reload.contains("sink siem: stopped with 46 detections still queued"), "{reload}");
    assert!(reload.contains("its new worker sends them now"), "{reload}");
    assert!(!reload.contains("the next run with this sink configured sends them"), "{reload}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_invalid_config_keeps_old_pipeline() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_toml("contoso", TENANT_ID, &emulator);
    let sink = tcp_sink_toml("siem", receiver.addr);
    let config = write_config(dir.path(), "", &tenant, &sink);
    let daemon = Daemon::start(&config, &[]);
    assert_eq!(receiver.wait_for(46, WAIT).await.len(), 46);

    write_config(dir.path(), "interval_secs = 0", &tenant, &sink);
    daemon.signal(libc::SIGHUP);
    assert!(daemon.wait_for_log("config reload rejected").await, "{}", daemon.log());
    let added = emulator.new_detection(TENANT_ID)["FullId"].as_str().unwrap().to_string();

    let lines = receiver.wait_for(47, WAIT).await;
    assert_eq!(lines.len(), 47, "{}", daemon.log());
    assert_eq!(cef_full_id(&lines[46]).as_deref(), Some(added.as_str()));
    let log = daemon.log();
    let rejected = log.lines().find(|l| l.contains("config reload rejected")).unwrap();
    assert!(rejected.contains("poll.interval_secs"), "the error names the key: {rejected}");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_report_polls_and_sinks() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tenants = listen_line(port) + &tenant_toml("contoso", TENANT_ID, &emulator);
    let config = write_config(dir.path(), "interval_secs = 60", &tenants, &tcp_sink_toml("siem", receiver.addr));
    let daemon = Daemon::start(&config, &[]);
    assert_eq!(receiver.wait_for(46, WAIT).await.len(), 46);
    let base = format!("http://127.0.0.1:{port}");

    let (status, body) = http_get(&format!("{base}/health")).await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["tenants"]["contoso"]["healthy"], true);

    // The worker may still be storing its cursor for the last batch.
    let mut metrics = String::new();
    wait_until(WAIT, || {
        metrics = std::thread::scope(|s| s.spawn(|| blocking_get(&format!("{base}/metrics"))).join().unwrap());
        metrics.contains("mde_forwarder_outbox_pending{sink=\"siem\"} 0\n")
    })
    .await;
    for expected in [
        "# TYPE mde_forwarder_detections_fetched_total counter\n",
        "mde_forwarder_detections_fetched_total{tenant=\"contoso\"} 46\n",
        "mde_forwarder_detections_queued_total{tenant=\"contoso\"} 46\n",
        "mde_forwarder_detections_deduplicated_total{tenant=\"contoso\"} 0\n",
        "mde_forwarder_detections_forwarded_total{sink=\"siem\"} 46\n",
        "mde_forwarder_polls_total{tenant=\"contoso\",result=\"ok\"} 1\n",
        "mde_forwarder_token_refreshes_total{tenant=\"contoso\"} 1\n",
        "mde_forwarder_outbox_pending{sink=\"siem\"} 0\n",
        "mde_forwarder_outbox_oldest_detection_age_seconds{sink=\"siem\"} 0\n",
        "mde_forwarder_dead_letters 0\n",
        "mde_forwarder_checkpoint_lag_seconds{tenant=\"contoso\"} ",
        "mde_forwarder_poll_duration_seconds_sum{tenant=\"contoso\"} ",
    ] {
        assert!(metrics.contains(expected), "missing {expected:?} in\n{metrics}");
    }
    let (status, _) = http_get(&format!("{base}/nothing")).await;
    assert_eq!(status, 404);

    let probe = run_cli(&["health", "--url", &format!("{base}/health")]).await;
    assert_success(&probe);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let closed = run_cli(&["health", "--url", &format!("{base}/health"), "--timeout-secs", "2"]).await;
    assert_eq!(closed.status.code(), Some(1), "health of a stopped forwarder fails");
}

/// A receiver that closes its first connection unread gets the batch
/// again; the forwarded metric counts each detection once, when the
/// receiver confirmed reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_detections_counted_once() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    // The first batch goes out well before the close, and the close comes
    // before the sink's own close after a 1 s pause.
    let (address, received) = closing_receiver(1, Duration::from_millis(800)).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tenants = listen_line(port) + &tenant_toml("contoso", TENANT_ID, &emulator);
    let config = write_config(dir.path(), "interval_secs = 60", &tenants, &tcp_sink_toml("siem", address));
    let daemon = Daemon::start(&config, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let arrived = wait_until(WAIT, || received.lock().unwrap().iter().filter(|&&b| b == b'\n').count() >= 46).await;
    assert!(arrived, "{}", daemon.log());

    let mut metrics = String::new();
    let settled = wait_until(WAIT, || {
        metrics = std::thread::scope(|s| s.spawn(|| blocking_get(&format!("{base}/metrics"))).join().unwrap());
        metrics.contains("mde_forwarder_outbox_pending{sink=\"siem\"} 0\n")
    })
    .await;
    assert!(settled, "{}", daemon.log());
    let lines = String::from_utf8(received.lock().unwrap().clone()).unwrap();
    assert_eq!(lines.lines().count(), 46, "the second connection got each detection once");
    assert!(metrics.contains("mde_forwarder_detections_forwarded_total{sink=\"siem\"} 46\n"), "{metrics}");
    let log = daemon.log();
    assert!(log.contains("sending them again from the outbox"), "{log}");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

fn blocking_get(url: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async { http_get(url).await.1 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_with_reason_for_failing_tenant() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.add_tenant("forbidden-tenant-id", mde_forwarder::emulator::TenantSpec { forbidden: true, ..tenant_spec() });
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tenants = listen_line(port) + &tenant_toml("contoso", TENANT_ID, &emulator) + &tenant_toml("fabrikam", "forbidden-tenant-id", &emulator);
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "interval_secs = 60", &tenants, &file_sink_toml("archive", &archive));
    let daemon = Daemon::start(&config, &[]);
    assert!(daemon.wait_for_log("poll failed").await, "{}", daemon.log());
    assert!(wait_until(WAIT, || read_json_lines(&archive).len() == 46).await);

    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/health")).await;

    assert_eq!(status, 503, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["tenants"]["contoso"]["healthy"], true);
    assert_eq!(health["tenants"]["fabrikam"]["healthy"], false);
    assert!(health["tenants"]["fabrikam"]["reason"].as_str().unwrap().contains("no successful poll"), "{body}");
    assert!(health["tenants"]["fabrikam"]["last_error"].as_str().unwrap().contains("403"), "{body}");
    let probe = run_cli(&["health", "--url", &format!("http://127.0.0.1:{port}/health")]).await;
    assert_eq!(probe.status.code(), Some(1));
    assert!(stderr(&probe).contains("HTTP 503"), "{}", stderr(&probe));
    let (metrics_status, metrics) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(metrics_status, 200);
    assert!(metrics.contains("mde_forwarder_api_errors_total{tenant=\"fabrikam\",status=\"403\"} 1\n"), "{metrics}");
    daemon.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sink_errors_are_logged_once_per_window() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", closed));
    let daemon = Daemon::start(&config, &[]);
    // retry_initial_ms = 50 and retry_max_secs = 1: about ten attempts in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (_, log) = daemon.terminate().await;

    let failures: Vec<&str> = log.lines().filter(|l| l.contains("delivery failed; retrying")).collect();
    assert_eq!(failures.len(), 1, "{log}");
    assert!(failures[0].contains("sink=siem"), "{}", failures[0]);
    assert!(failures[0].contains(&format!("connect to {closed} failed")), "{}", failures[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));

    let output = run_cli(&["--log-format", "json", "run", "--once", "--config", config.to_str().unwrap()]).await;

    assert_success(&output);
    let lines: Vec<Value> = stderr(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let poll = lines.iter().find(|l| l["message"] == "poll complete").expect("a poll line");
    assert_eq!(poll["tenant"], "contoso");
    assert_eq!(poll["fetched"], 46);
    assert_eq!(poll["level"], "INFO");
}

/// Runs error paths (a wrong client secret rejected with an AADSTS error,
/// 401s, a dead sink) in text and JSON logs at debug level and checks that
/// neither secret nor any issued access token appears in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_logged() {
    const WRONG_SECRET: &str = "Wr0ng-Secret-Value-Never-Logged";
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let archive = dir.path().join("a.jsonl");
    let sinks = tcp_sink_toml("siem", closed) + &file_sink_toml("archive", &archive);
    let good = tenant_toml("contoso", TENANT_ID, &emulator);
    let wrong = good.replace(CLIENT_SECRET, WRONG_SECRET).replace("\"contoso\"", "\"wrong\"");
    let config = write_config(dir.path(), "retry_max_attempts = 2", &(good + &wrong), &sinks);
    let mut output = String::new();

    for format in ["text", "json"] {
        emulator.inject_fault(Fault::Unauthorized);
        emulator.inject_fault(Fault::Unauthorized);
        let once = run_cli_env(&["--log-format", format, "run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "debug")]).await;
        assert_eq!(once.status.code(), Some(1), "the wrong secret and the dead sink fail the run");
        output += &stdout(&once);
        output += &stderr(&once);
        let probe = run_cli(&["--log-format", format, "check-config", "--probe", "--config", config.to_str().unwrap()]).await;
        output += &stdout(&probe);
        output += &stderr(&probe);
    }

    assert!(output.contains("AADSTS"), "the wrong secret's error is shown: {output}");
    assert!(output.contains("401"), "{output}");
    assert!(output.contains(&format!("connect to {closed} failed")), "{output}");
    let tokens = emulator.issued_tokens();
    assert!(tokens.len() >= 4, "the runs got tokens: {}", tokens.len());
    for secret in tokens.iter().map(String::as_str).chain([CLIENT_SECRET, WRONG_SECRET]) {
        assert!(!output.contains(secret), "secret {secret} in output:\n{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_exit_codes() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let path = good.to_str().unwrap();

    let valid = run_cli(&["check-config", "--config", path]).await;
    assert_success(&valid);
    assert!(stdout(&valid).contains(&format!("tenant contoso: alerts {}/api/alerts", emulator.url())), "{}", stdout(&valid));

    let probed = run_cli(&["check-config", "--probe", "--config", path]).await;
    assert_success(&probed);
    assert!(stdout(&probed).contains("tenant contoso: token ok"), "{}", stdout(&probed));
    assert!(stdout(&probed).contains(&format!("sink siem: connected to {}", receiver.addr)), "{}", stdout(&probed));

    let closed = closed_addr();
    let dead_sink_dir = tempfile::tempdir().unwrap();
    let dead_sink = write_config(dead_sink_dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", closed));
    let failed = run_cli(&["check-config", "--probe", "--config", dead_sink.to_str().unwrap()]).await;
    assert_eq!(failed.status.code(), Some(1), "{}", stdout(&failed));
    assert!(stdout(&failed).contains("sink siem: FAILED: connect to"), "{}", stdout(&failed));

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong_tenant = tenant_toml("contoso", TENANT_ID, &emulator).replace(CLIENT_SECRET, "wrong");
    let wrong = write_config(wrong_dir.path(), "", &wrong_tenant, &tcp_sink_toml("siem", receiver.addr));
    let rejected = run_cli(&["check-config", "--probe", "--config", wrong.to_str().unwrap()]).await;
    assert_eq!(rejected.status.code(), Some(1));
    assert!(stdout(&rejected).contains("tenant contoso: FAILED: token request for tenant contoso rejected"), "{}", stdout(&rejected));

    let invalid_dir = tempfile::tempdir().unwrap();
    let invalid = write_config(invalid_dir.path(), "interval_secs = 0", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let bad = run_cli(&["check-config", "--probe", "--config", invalid.to_str().unwrap()]).await;
    assert_eq!(bad.status.code(), Some(64));
    assert!(stderr(&bad).contains("poll.interval_secs"), "{}", stderr(&bad));

    let missing = run_cli(&["check-config", "--config", "/nonexistent/mde-forwarder.toml"]).await;
    assert_eq!(missing.status.code(), Some(64));
}

/// Returns the write end of a pipe whose read end is already closed, so
/// every write to it fails with EPIPE, as behind `| head` once it exits.
fn closed_pipe() -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};

    let mut fds = [0; 2];
    // SAFETY: pipe fills the two descriptors it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: each descriptor is owned once, and the read end is closed here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    write_end
}

/// Runs `mde-forwarder ARGS` with standard output sent to `stdout`.
async fn run_with_stdout(args: &[&str], stdout: Stdio) -> std::process::Output {
    // Not `output()`: tokio's replaces the standard output with a new pipe.
    let child = tokio::process::Command::new(binary())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().await.unwrap()
}

/// Writes a config for the output tests, with the emulator's tenant and a
/// file sink, stores two dead letters and returns the config path.
async fn config_with_dead_letters(dir: &Path, emulator: &mde_forwarder::emulator::Emulator) -> String {
    let config = write_config(dir, "", &tenant_toml("contoso", TENANT_ID, emulator), &file_sink_toml("archive", &dir.join("a.jsonl")));
    let store = open_store(dir);
    store.dead_letter("archive", "contoso", r#"{"FullId":"dead:1"}"#, "HTTP 400").unwrap();
    store.dead_letter("archive", "contoso", r#"{"FullId":"dead:2"}"#, "HTTP 400").unwrap();
    drop(store);
    config.to_str().unwrap().to_string()
}

/// Returns each command that writes to standard output, with its arguments.
/// The help and version text take a path apart from the commands (see `cli::parse_args`).
fn output_commands(config: &str) -> Vec<Vec<&str>> {
    vec![
        vec!["--help"],
        vec!["--version"],
        vec!["help", "run"],
        vec!["state", "--help"],
        vec!["check-config", "--config", config],
        vec!["state", "--config", config, "show"],
        vec!["state", "--config", config, "dead-letters"],
        vec!["state", "--config", config, "dead-letters", "--id", "1", "--raw"],
        vec!["pull", "--config", config, "--tenant", "contoso", "--ago", "P1D"],
    ]
}

/// Output cut short by a closed pipe, as under `| head -1`, ends a command
/// quietly with exit code 0, as Unix tools do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pipe_ends_output_quietly() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_dead_letters(dir.path(), &emulator).await;

    for args in output_commands(&config) {
        let output = run_with_stdout(&args, Stdio::from(closed_pipe())).await;

        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A closed pipe stops the output but not the work: a `state` command that
/// prints a line before its last change still makes that change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pipe_still_sets_checkpoint() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_dead_letters(dir.path(), &emulator).await;
    let args = ["state", "--config", &config, "set-checkpoint", "--tenant", "contoso", "--time", "2026-01-02T03:04:05Z", "--resend"];

    let output = run_with_stdout(&args, Stdio::from(closed_pipe())).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let checkpoint = open_store(dir.path()).checkpoint("contoso").unwrap();
    assert_eq!(checkpoint, mde_forwarder::timefmt::parse("2026-01-02T03:04:05Z"));
}

/// Any other write error, such as a full disk under `> FILE`, is still an
/// error: exit code 1 and a message on standard error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_output_is_an_error() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_dead_letters(dir.path(), &emulator).await;

    for args in output_commands(&config) {
        // Every write to /dev/full fails with ENOSPC.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let output = run_with_stdout(&args, Stdio::from(full)).await;

        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot write to standard output"), "{args:?}: {stderr}");
        assert!(stderr.contains("No space left on device"), "{args:?}: {stderr}");
        assert_eq!(stderr.matches("cannot write").count(), 1, "{args:?}: reported once: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `pull --output FILE` names the file when writing it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_names_output_file_on_error() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_dead_letters(dir.path(), &emulator).await;

    let output = run_cli(&["pull", "--config", &config, "--tenant", "contoso", "--ago", "P1D", "--output", "/dev/full"]).await;

    let stderr = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write /dev/full"), "{stderr}");
}

/// Standard output of a demo, kept open but not read any further.
type DemoOutput = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Starts `demo` with its temporary directory in `scratch` and waits for its
/// first CEF event. Returns the child, its pid and its standard output, which
/// the caller keeps open so the demo blocks once the pipe is full.
async fn start_demo(scratch: &Path) -> (Child, i32, DemoOutput) {
    let mut child = tokio::process::Command::new(binary())
        .args(["demo", "--interval-secs", "1", "--add-every-secs", "0"])
        .env("TMPDIR", scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as i32;
    let mut events = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, events.next_line()).await.expect("the demo prints an event").unwrap();
    assert!(first.is_some_and(|line| line.contains("CEF:0|")));
    (child, pid, events)
}

/// Sends SIGTERM to a child this test started.
fn terminate_pid(pid: i32) {
    signal_pid(pid, libc::SIGTERM);
}

/// Sends `signal` to a child this test started.
fn signal_pid(pid: i32, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Returns the demo's temporary state directory, checking that it exists.
fn demo_state(scratch: &Path, pid: i32) -> std::path::PathBuf {
    let state = scratch.join(format!("mde-forwarder-demo-{pid}"));
    assert!(state.is_dir(), "{} missing while the demo runs", state.display());
    state
}

/// Closing the demo's terminal sends SIGHUP: the demo stops as on SIGTERM
/// and deletes its temporary state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stops_cleanly_on_hangup() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut child, pid, _output) = start_demo(scratch.path()).await;
    let state = demo_state(scratch.path(), pid);

    signal_pid(pid, libc::SIGHUP);
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the demo exits after SIGHUP").unwrap();
    assert!(status.code().is_some(), "ended by the signal itself: {status}");
    assert!(!state.exists(), "{} left behind", state.display());
}

/// The demo deletes its temporary state directory however it is stopped,
/// also when a second signal cuts the graceful stop short. Standard output
/// is not read after the first event, so the demo blocks writing to it, as
/// behind a stalled pipe, and the graceful stop may not finish before the
/// second signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_deletes_its_state_after_two_signals() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut child, pid, _output) = start_demo(scratch.path()).await;
    let state = demo_state(scratch.path(), pid);

    for _ in 0..2 {
        terminate_pid(pid);
        // Two signals sent at once may arrive as one.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::timeout(WAIT, child.wait()).await.expect("the demo exits").unwrap();
    assert!(!state.exists(), "{} left behind", state.display());
}

/// Runs `demo` with standard output sent to `stdout` and its temporary
/// directory in `scratch` until it stops by itself, for at most [`WAIT`].
async fn run_demo_with_stdout(scratch: &Path, stdout: Stdio) -> std::process::Output {
    let child = tokio::process::Command::new(binary())
        .args(["demo", "--interval-secs", "1", "--add-every-secs", "0"])
        .env("TMPDIR", scratch)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("the demo stops by itself").unwrap()
}

/// A demo whose standard output is closed, as under `demo | head -1`, stops
/// by itself, deletes its state and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stops_when_output_is_closed() {
    let scratch = tempfile::tempdir().unwrap();

    let output = run_demo_with_stdout(scratch.path(), Stdio::from(closed_pipe())).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("standard output was closed"), "{}", stderr(&output));
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A demo whose standard output fails for another reason, such as a full
/// disk under `demo > FILE`, stops by itself, deletes its state, names the
/// error and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stops_when_output_fails() {
    let scratch = tempfile::tempdir().unwrap();
    // Every write to /dev/full fails with ENOSPC.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();

    let output = run_demo_with_stdout(scratch.path(), Stdio::from(full)).await;

    let stderr = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: cannot write to standard output"), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// One SIGTERM ends the demo even while it is blocked writing to a full
/// pipe on standard output: the exit does not wait for that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exits_on_one_signal_with_stalled_output() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut child, pid, _output) = start_demo(scratch.path()).await;
    // Lets the demo fill the pipe and block on it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    terminate_pid(pid);
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the demo exits after one signal").unwrap();
    assert!(status.code().is_some(), "{status}");
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
