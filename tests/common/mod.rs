//! Test harness: the emulator in-process, real TCP receivers on 127.0.0.1,
//! and the `mde-forwarder` binary run as a user would run it.
#![allow(dead_code)]

pub mod http_server;
pub mod rsyslog;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mde_forwarder::emulator::{sample_detections, Emulator, EmulatorOptions, TenantSpec};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const TENANT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "Sup3r-S3cret-Value-For-Tests";

/// Returns a loopback address where nothing listens, for a receiver or
/// proxy that is down. It is on 127.0.0.2, where no test listens: a port
/// just freed on 127.0.0.1 could be taken by a server of a test running
/// beside this one, which would then reply in its place.
pub fn closed_addr() -> std::net::SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    std::net::SocketAddr::from(([127, 0, 0, 2], port))
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mde-forwarder")
}

pub fn tenant_spec() -> TenantSpec {
    TenantSpec { client_id: CLIENT_ID.into(), client_secret: CLIENT_SECRET.into(), forbidden: false }
}

/// An emulator with one tenant loaded with the samples, shifted to now.
pub async fn emulator_with_samples(options: EmulatorOptions) -> Emulator {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    emulator.load_detections(TENANT_ID, sample_detections(), true);
    emulator
}

/// The `[[tenant]]` table for a tenant of `emulator`.
pub fn tenant_toml(name: &str, tenant_id: &str, emulator: &Emulator) -> String {
    format!(
        r#"
[[tenant]]
name = "{name}"
tenant_id = "{tenant_id}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
api_url = "{url}"
login_url = "{url}"
"#,
        url = emulator.url()
    )
}

/// Writes a config file with fast retries and returns its path.
/// `poll_extra` contains `[poll]` lines that replace the test defaults.
/// Starts an API on 127.0.0.1 that responds to every alerts request with
/// `body` as it is, for bodies the emulator cannot serve (it stores parsed
/// detections). Returns it with a `[[tenant]]` table named `contoso` that
/// points at it.
pub async fn api_answering(body: String) -> (http_server::HttpReceiver, String) {
    let api = http_server::HttpReceiver::start(move |request| {
        if request.path.contains("/token") {
            http_server::Answer::new(200, r#"{"token_type":"Bearer","expires_in":3599,"access_token":"opaque"}"#)
        } else {
            http_server::Answer::new(200, body.clone()).with_header("content-type", "application/json")
        }
    })
    .await;
    let tenant = format!(
        "[[tenant]]\nname = \"contoso\"\ntenant_id = \"{TENANT_ID}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\napi_url = \"{url}\"\nlogin_url = \"{url}\"\n",
        url = api.url()
    );
    (api, tenant)
}

pub fn write_config(dir: &Path, poll_extra: &str, tenants: &str, sinks: &str) -> PathBuf {
    let state = dir.join("state");
    let defaults = [
        "interval_secs = 1",
        "initial_lookback_secs = 86400",
        "overlap_secs = 300",
        "retry_initial_ms = 50",
        "retry_max_secs = 1",
        "retry_max_attempts = 3",
    ];
    let overridden = |line: &&str| {
        let key = line.split('=').next().unwrap_or("").trim();
        poll_extra.lines().any(|l| l.split('=').next().unwrap_or("").trim() == key)
    };
    let poll: Vec<&str> = defaults.iter().filter(|l| !overridden(l)).copied().collect();
    let poll = poll.join("\n");
    let text = format!(
        r#"
[state]
dir = "{state}"

[poll]
{poll}
{poll_extra}

[service]
shutdown_grace_secs = 5
{tenants}
{sinks}
"#,
        state = state.display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn tcp_sink_toml(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"
[[sink]]
name = "{name}"
type = "syslog"
address = "{addr}"
protocol = "tcp"
format = "cef"
retry_initial_ms = 50
retry_max_secs = 1
"#
    )
}

pub fn file_sink_toml(name: &str, path: &Path) -> String {
    format!(
        r#"
[[sink]]
name = "{name}"
type = "file"
path = "{}"
format = "json"
"#,
        path.display()
    )
}

/// Runs `mde-forwarder ARGS` to completion.
pub async fn run_cli(args: &[&str]) -> Output {
    run_cli_env(args, &[]).await
}

pub async fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .output()
        .await
        .unwrap()
}

pub async fn run_once(config: &Path) -> Output {
    run_cli(&["run", "--once", "--config", config.to_str().unwrap()]).await
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn assert_success(output: &Output) {
    assert!(output.status.success(), "exit {:?}\nstderr:\n{}", output.status, stderr(output));
}

/// Checks that `run --once` finished with exit code 3, which reports dead
/// letters stored during the run.
pub fn assert_dead_letters_stored(output: &Output) {
    assert_eq!(output.status.code(), Some(3), "stderr:\n{}", stderr(output));
    assert!(stderr(output).contains("warning: this run stored "), "{}", stderr(output));
    assert!(stderr(output).contains("dead-letters`"), "{}", stderr(output));
    assert!(!stderr(output).contains("-c FILE"), "the hint names the config path: {}", stderr(output));
}

/// A TCP syslog receiver that keeps every newline-terminated line.
pub struct LineReceiver {
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl LineReceiver {
    pub async fn start() -> Self {
        Self::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Mutex::new(Vec::new()))).await
    }

    /// Listens on `addr`, appending to `lines` (which may hold earlier lines).
    pub async fn bind(addr: SocketAddr, lines: Arc<Mutex<Vec<String>>>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = lines.clone();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let tasks = connections.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let sink = sink.clone();
                let mut stop = stop_rx.clone();
                let handle = tokio::spawn(async move {
                    let mut reader = tokio::io::BufReader::new(stream).lines();
                    loop {
                        tokio::select! {
                            line = reader.next_line() => match line {
                                Ok(Some(line)) => sink.lock().unwrap().push(line),
                                _ => return,
                            },
                            _ = stop.changed() => break,
                        }
                    }
                    // Going down: process what is already buffered, then close.
                    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(200), reader.next_line()).await {
                        sink.lock().unwrap().push(line);
                    }
                });
                tasks.lock().unwrap().push(handle);
            }
        });
        Self { addr, lines, task, connections, stop: stop_tx }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Stops listening and closes every open connection after processing
    /// what was already received, as a receiver that shuts down would.
    /// Returns the address and the lines so far.
    pub async fn stop(self) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        self.task.abort();
        let _ = self.task.await;
        self.stop.send_replace(true);
        let handles: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for handle in handles {
            let _ = handle.await;
        }
        (self.addr, self.lines)
    }

    pub async fn wait_for(&self, count: usize, limit: Duration) -> Vec<String> {
        wait_until(limit, || self.lines.lock().unwrap().len() >= count).await;
        self.lines()
    }
}

/// Starts a TCP receiver that closes its first `closed` connections
/// `after` accepting them, without reading, and reads the ones after to
/// the end.
pub async fn closing_receiver(closed: usize, after: Duration) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted += 1;
            let store = store.clone();
            if accepted <= closed {
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    drop(stream);
                });
                continue;
            }
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    store.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (address, received)
}

pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// The FullId in a CEF line (`cs3=...`), with CEF escaping undone.
pub fn cef_full_id(line: &str) -> Option<String> {
    let start = line.find(" cs3=").or_else(|| line.find("|cs3="))? + 5;
    let rest = &line[start..];
    let end = rest.find(" cs3Label=").unwrap_or(rest.len());
    Some(rest[..end].replace("\\=", "=").replace("\\\\", "\\"))
}

/// FullIds of the CEF lines, counted.
pub fn count_full_ids(lines: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in lines {
        let id = cef_full_id(line).unwrap_or_else(|| panic!("no FullId in {line}"));
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// JSON Lines of a file sink.
/// Only lines that end in a newline count: the sink may be writing the last one.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}"))).collect()
}

pub fn full_ids(values: &[Value]) -> Vec<String> {
    values.iter().map(|v| v["FullId"].as_str().unwrap_or_default().to_string()).collect()
}

/// The FullIds of the samples, as the emulator serves them.
/// A LastProcessedTimeUtc of now, as the API writes it.
pub fn now_text() -> String {
    mde_forwarder::timefmt::format_query(chrono::Utc::now())
}

pub fn sample_full_ids() -> Vec<String> {
    full_ids(&sample_detections())
}

/// Every FullId the emulator holds for `tenant_id`, read through its API.
pub async fn all_full_ids(emulator: &Emulator, tenant_id: &str) -> Vec<String> {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let token: Value = http
        .post(format!("{}/{tenant_id}/oauth2/token", emulator.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("resource", "https://graph.windows.net"),
        ])
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    let detections: Vec<Value> = http
        .get(format!("{}/api/alerts", emulator.url()))
        .query(&[("sinceTimeUtc", "2000-01-01T00:00:00Z")])
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    full_ids(&detections)
}

/// A small xorshift generator, seeded from the clock and printed so a failing
/// run can be repeated with `MDE_TEST_SEED`.
pub struct TestRng(u64);

impl TestRng {
    pub fn from_env_or_clock() -> Self {
        let seed = std::env::var("MDE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("MDE_TEST_SEED={seed}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Dead letters in a run's state directory (the binary must have exited).
pub fn dead_letters(dir: &Path) -> Vec<mde_forwarder::store::DeadLetter> {
    let store = open_store(dir);
    store.dead_letters().unwrap()
}

/// Entries still queued for `sink` in a run's state directory.
pub fn pending(dir: &Path, sink: &str) -> usize {
    let store = open_store(dir);
    store.pending(sink).unwrap().0
}

/// FullId of a detection JSON value.
pub fn full_id_of(value: &Value) -> String {
    value["FullId"].as_str().unwrap_or_default().to_string()
}

/// Opens a run's store. sled's background threads of a store this process
/// just dropped can hold the database a moment longer, so this waits for up
/// to five seconds.
pub fn open_store(dir: &Path) -> mde_forwarder::store::Store {
    let mut last_error = None;
    for _ in 0..50 {
        match mde_forwarder::store::Store::open(&dir.join("state")) {
            Ok(store) => return store,
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot open the store: {}", last_error.map(|e| e.to_string()).unwrap_or_default());
}
