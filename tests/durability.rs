//! Crash, outage and full-disk safety of the outbox, with the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use mde_forwarder::emulator::{Emulator, EmulatorOptions};
use tokio::process::{Child, Command};

fn spawn_daemon(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap() as i32;
    // SAFETY: sends SIGTERM to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("daemon did not stop on SIGTERM").unwrap()
}

fn tcp_sink_with_batch(name: &str, addr: std::net::SocketAddr, batch: usize) -> String {
    tcp_sink_toml(name, addr) + &format!("batch_size = {batch}\n")
}

fn duplicates(counts: &HashMap<String, usize>) -> usize {
    counts.values().map(|n| n - 1).sum()
}

/// 30 SIGKILLs at random moments while 5,000 detections (and more arriving)
/// flow: every FullId arrives. Repeats stay within one batch per kill in
/// the file. Over TCP a kill repeats what the receiver had not confirmed
/// reading, up to 2 s or 8 MiB of batches: more than a run here sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing() {
    const KILLS: usize = 30;
    const BATCH: usize = 100;
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    emulator.generate(TENANT_ID, 5000, 2048);
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let sinks = tcp_sink_with_batch("siem", receiver.addr, BATCH) + &file_sink_toml("archive", &archive) + &format!("batch_size = {BATCH}\n");
    let config = write_config(dir.path(), "limit = 1000", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);
    let log = dir.path().join("daemon.log");
    let mut rng = TestRng::from_env_or_clock();

    for _ in 0..KILLS {
        let mut child = spawn_daemon(&config, &log);
        tokio::time::sleep(Duration::from_millis(50 + rng.below(700))).await;
        for _ in 0..5 {
            emulator.new_detection(TENANT_ID);
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let expected: HashSet<String> = all_full_ids(&emulator, TENANT_ID).await.into_iter().collect();
    assert_eq!(expected.len(), 5000 + 5 * KILLS);

    let mut child = spawn_daemon(&config, &log);
    let delivered = wait_until(Duration::from_secs(120), || {
        let ids: HashSet<String> = receiver.lines().iter().filter_map(|l| cef_full_id(l)).collect();
        expected.is_subset(&ids)
    })
    .await;
    let archive_complete = wait_until(Duration::from_secs(30), || {
        let ids: HashSet<String> = full_ids(&read_json_lines(&archive)).into_iter().collect();
        expected.is_subset(&ids)
    })
    .await;
    assert!(terminate(&mut child).await.success());

    let counts = count_full_ids(&receiver.lines());
    let missing = expected.iter().filter(|id| !counts.contains_key(*id)).count();
    assert!(delivered, "{missing} detections never reached the TCP receiver");
    assert!(archive_complete, "the file sink is missing detections");
    let tcp_repeats = duplicates(&counts);
    let mut file_counts = HashMap::new();
    for id in full_ids(&read_json_lines(&archive)) {
        *file_counts.entry(id).or_insert(0) += 1;
    }
    let file_repeats = duplicates(&file_counts);
    eprintln!("kills={KILLS} detections={} tcp_repeats={tcp_repeats} file_repeats={file_repeats}", expected.len());
    assert!(file_repeats <= KILLS * BATCH, "{file_repeats} repeats in the file");
}

/// A receiver down while detections keep arriving gets all of them, in
/// order and once each, when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_delivers_everything_in_order_once() {
    let outage = Duration::from_secs(std::env::var("MDE_TEST_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5));
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_with_batch("siem", receiver.addr, 20));
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    receiver.wait_for(46, Duration::from_secs(10)).await;
    // The sink's close after a 1 s pause confirms them. A receiver that
    // closes first confirms nothing, so it would get them again.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (addr, lines) = receiver.stop().await;
    let until = tokio::time::Instant::now() + outage;
    while tokio::time::Instant::now() < until {
        emulator.new_detection(TENANT_ID);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let receiver = LineReceiver::bind(addr, lines).await;
    let expected = all_full_ids(&emulator, TENANT_ID).await;
    let lines = receiver.wait_for(expected.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(terminate(&mut child).await.success());

    let lines = receiver.lines().len().max(lines.len());
    let all = receiver.lines();
    let counts = count_full_ids(&all);
    assert_eq!(counts.len(), expected.len(), "missing detections");
    assert_eq!(lines, expected.len(), "duplicates: {}", duplicates(&counts));
    let times: Vec<u64> = all.iter().map(|l| cef_number(l, "deviceCustomDate1")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "out of order");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("delivery failed; retrying"), "the outage was not noticed");
}

fn cef_number(line: &str, key: &str) -> u64 {
    let start = line.find(&format!(" {key}=")).unwrap() + key.len() + 2;
    line[start..].split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_sink_blocks_neither_polling_nor_other_sinks() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let archive = dir.path().join("archive.jsonl");
    let sinks = tcp_sink_toml("siem", closed) + &file_sink_toml("archive", &archive);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);
    let mut child = spawn_daemon(&config, &dir.path().join("daemon.log"));

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        emulator.new_detection(TENANT_ID);
    }
    let complete = wait_until(Duration::from_secs(10), || read_json_lines(&archive).len() == 49).await;
    assert!(terminate(&mut child).await.success());

    assert!(complete, "file sink got {} of 49", read_json_lines(&archive).len());
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&state).contains("sink siem: 49 pending, the oldest is item 0 of outbox batch 1\n"), "{}", stdout(&state));
    assert!(stdout(&state).contains("sink archive: 0 pending\n"), "{}", stdout(&state));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_pauses_polling_and_names_the_sink() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let mut config_text = tenant_toml("contoso", TENANT_ID, &emulator);
    config_text.push('\n');
    let config = write_config(dir.path(), "", &config_text, &tcp_sink_toml("siem", closed));
    let text = std::fs::read_to_string(&config).unwrap().replace("[state]\n", "[state]\nmax_outbox_bytes = 20000\n");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);

    for _ in 0..4 {
        emulator.new_detection(TENANT_ID);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let paused_requests = emulator.requests().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(emulator.requests().len(), paused_requests, "polling went on with a full outbox");
    let receiver = LineReceiver::bind(closed, Default::default()).await;
    let all = receiver.wait_for(50, Duration::from_secs(20)).await;
    assert!(terminate(&mut child).await.success());

    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("outbox is full; polling paused"), "{log_text}");
    assert!(log_text.contains("sink=siem") || log_text.contains("sink: siem"), "the warning must name the sink: {log_text}");
    assert_eq!(count_full_ids(&all).len(), 50, "nothing is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_sinks_and_exits_zero() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let mut child = spawn_daemon(&config, &dir.path().join("daemon.log"));
    receiver.wait_for(46, Duration::from_secs(10)).await;

    let status = terminate(&mut child).await;

    assert!(status.success(), "{status:?}");
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(stdout(&state).contains("sink siem: 0 pending"), "{}\n{log}", stdout(&state));
}

/// A send to a receiver that accepts but never reads is abandoned when the
/// shutdown grace period ends, not when `write_timeout_secs` does, and its
/// batch stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_abandons_send_after_grace() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await.unwrap();
    emulator.add_tenant(TENANT_ID, tenant_spec());
    emulator.generate(TENANT_ID, 60, 100_000);
    // A small receive buffer keeps the receiver's TCP stack from taking
    // (and acknowledging) the whole 6 MB batch.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = accepted.clone();
    let receiver = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            held.lock().unwrap().push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let sink = tcp_sink_toml("siem", addr) + "write_timeout_secs = 60\n";
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);
    let text = std::fs::read_to_string(&config).unwrap().replace("shutdown_grace_secs = 5", "shutdown_grace_secs = 2");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    let connected = wait_until(Duration::from_secs(20), || !accepted.lock().unwrap().is_empty()).await;
    assert!(connected, "the daemon never connected: {}", std::fs::read_to_string(&log).unwrap());
    // The sink connects when it starts, before the poll queues the batch.
    let polled = wait_until(Duration::from_secs(20), || std::fs::read_to_string(&log).unwrap_or_default().contains("poll complete")).await;
    assert!(polled, "the daemon never polled: {}", std::fs::read_to_string(&log).unwrap());
    // Let the write fill the socket buffers.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    let pid = child.id().unwrap() as i32;
    // SAFETY: sends SIGTERM to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let elapsed = started.elapsed();
    receiver.abort();

    let status = status.expect("the daemon did not exit within 30 s of SIGTERM").unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(elapsed < Duration::from_secs(10), "exit took {elapsed:?}, the grace period is 2 s: {log_text}");
    assert!(status.success(), "{status:?}: {log_text}");
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&state).contains("sink siem: 60 pending"), "{}", stdout(&state));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_command_refuses_while_daemon_runs() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let mut child = spawn_daemon(&config, &dir.path().join("daemon.log"));
    receiver.wait_for(46, Duration::from_secs(10)).await;

    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    let second = run_once(&config).await;
    let pid = child.id().unwrap();
    assert!(terminate(&mut child).await.success());

    assert_eq!(state.status.code(), Some(1));
    assert!(stderr(&state).contains(&format!("in use by process {pid}")), "{}", stderr(&state));
    assert!(stderr(&second).contains(&format!("in use by process {pid}")), "{}", stderr(&second));
}

/// A renamed tenant is a new one to the store, so its old checkpoint is
/// shown and warned about, with the command that carries it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_tenant_checkpoint_named() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = tcp_sink_toml("siem", receiver.addr);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);
    assert_success(&run_once(&config).await);

    let config = write_config(dir.path(), "", &tenant_toml("contoso-eu", TENANT_ID, &emulator), &sink);
    let cfg = config.to_str().unwrap();
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(show.contains("  contoso (not in the config): "), "{show}");
    assert!(show.contains("  contoso-eu: none"), "{show}");
    let renamed = run_once(&config).await;
    assert_success(&renamed);
    let log = stderr(&renamed);
    let warning = log.lines().find(|l| l.contains("a tenant no longer in the config has a checkpoint")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("tenant=contoso "), "{warning}");
    assert!(warning.contains("new_tenants=contoso-eu"), "{warning}");
    assert!(warning.contains("state set-checkpoint --tenant NEW_NAME"), "{warning}");

    let reset = run_cli(&["state", "--config", cfg, "reset-checkpoint", "--tenant", "contoso"]).await;
    assert_success(&reset);
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(!show.contains("contoso (not in the config)"), "{show}");
}

/// Forwards the 46 samples of tenant `contoso` once to a TCP sink `siem`,
/// and returns the parts for the test to go on with.
async fn samples_forwarded_once() -> (Emulator, LineReceiver, tempfile::TempDir, std::path::PathBuf) {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    assert_success(&run_once(&config).await);
    receiver.wait_for(46, Duration::from_secs(5)).await;
    (emulator, receiver, dir, config)
}

/// A checkpoint in the future would make every poll read nothing:
/// `set-checkpoint` rejects one, and a poller that finds one (a clock set
/// back) moves it back to now with an ERROR, so new detections still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_checkpoint_never_stops_polling() {
    let (emulator, receiver, dir, config) = samples_forwarded_once().await;
    let cfg = config.to_str().unwrap();

    let future = mde_forwarder::timefmt::format_query(chrono::Utc::now() + chrono::Duration::days(365));
    let set = run_cli(&["state", "--config", cfg, "set-checkpoint", "--tenant", "contoso", "--time", &future]).await;
    assert_eq!(set.status.code(), Some(1));
    assert!(stderr(&set).contains("is in the future"), "{}", stderr(&set));

    let ahead = chrono::Utc::now() + chrono::Duration::days(365);
    open_store(dir.path()).set_checkpoint("contoso", Some(ahead)).unwrap();
    emulator.push_detection(TENANT_ID, serde_json::json!({
        "FullId": "after-clock:1", "AlertId": "after-clock", "Severity": "High",
        "AlertTime": now_text(), "LastProcessedTimeUtc": now_text(),
    }));
    let output = run_once(&config).await;
    assert_success(&output);
    assert!(stderr(&output).contains("the checkpoint was ahead of this machine's clock"), "{}", stderr(&output));
    let lines = receiver.wait_for(47, Duration::from_secs(5)).await;
    assert!(lines.iter().any(|l| l.contains("after-clock:1")), "the new detection arrived");
    let checkpoint = open_store(dir.path()).checkpoint("contoso").unwrap().unwrap();
    assert!(checkpoint <= chrono::Utc::now(), "{checkpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_command_replays_from_a_checkpoint() {
    let (_emulator, receiver, _dir, config) = samples_forwarded_once().await;
    let cfg = config.to_str().unwrap();

    let show = run_cli(&["state", "--config", cfg, "show"]).await;
    assert!(stdout(&show).contains("dedupe entries: 46"), "{}", stdout(&show));
    let since = mde_forwarder::timefmt::format_query(chrono::Utc::now() - chrono::Duration::days(2));
    let set = run_cli(&["state", "--config", cfg, "set-checkpoint", "--tenant", "contoso", "--time", &since, "--resend"]).await;
    assert_success(&set);
    assert_success(&run_once(&config).await);

    let lines = receiver.wait_for(92, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 92, "the replay sends every detection again");
    let unknown = run_cli(&["state", "--config", cfg, "reset-checkpoint", "--tenant", "nobody"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no tenant named \"nobody\""));
}

/// `set-checkpoint`, `show` and the poll log print a checkpoint alike, with
/// the seven fractional digits of the API's timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_output_has_api_precision() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &dir.path().join("a.jsonl")));
    let cfg = config.to_str().unwrap();

    let set = run_cli(&["state", "--config", cfg, "set-checkpoint", "--tenant", "contoso", "--time", "2026-12-01T00:00:00Z"]).await;
    assert_success(&set);
    assert_eq!(stdout(&set), "tenant contoso: checkpoint set to 2026-12-01T00:00:00.0000000Z\n");
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(show.contains("  contoso: 2026-12-01T00:00:00.0000000Z\n"), "{show}");

    let precise = run_cli(&["state", "--config", cfg, "set-checkpoint", "--tenant", "contoso", "--time", "2026-12-01T00:00:00.123456789Z"]).await;
    assert_eq!(stdout(&precise), "tenant contoso: checkpoint set to 2026-12-01T00:00:00.123456789Z\n", "digits between ticks are kept");

    let reset = run_cli(&["state", "--config", cfg, "reset-checkpoint", "--tenant", "contoso"]).await;
    assert_success(&reset);
    let run = run_once(&config).await;
    assert_success(&run);
    let newest = newest_time(&read_json_lines(&dir.path().join("a.jsonl")));
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(show.contains(&format!("  contoso: {newest}\n")), "{newest}: {show}");
    assert!(stderr(&run).contains(&format!("checkpoint={newest}")), "{newest}: {}", stderr(&run));
}

/// Returns the highest `LastProcessedTimeUtc` of `detections`, as written.
fn newest_time(detections: &[serde_json::Value]) -> String {
    let times = detections.iter().filter_map(|d| d["LastProcessedTimeUtc"].as_str());
    times.max_by_key(|text| mde_forwarder::timefmt::parse(text)).unwrap().to_string()
}

/// Mounts a tmpfs of `size` at `path`; tests that need it run as root (as CI does).
fn mount_tmpfs(path: &Path, options: &str) -> bool {
    std::fs::create_dir_all(path).unwrap();
    let status = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(path).status();
    status.is_ok_and(|s| s.success())
}

/// Points a config written by `write_config` in `dir` at another state directory.
fn move_state_dir(config: &Path, dir: &Path, state_dir: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let from = format!("dir = \"{}\"", dir.join("state").display());
    let to = format!("dir = \"{}\"", state_dir.display());
    assert!(text.contains(&from), "no state dir line in {text}");
    std::fs::write(config, text.replace(&from, &to)).unwrap();
}

/// Writes zeros to `file` in blocks of `block` bytes until its file system is full.
fn fill_disk(file: &Path, block: &str) {
    // dd fails when the disk is full, which is the point, so its status is ignored.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("bs={block}")])
        .arg(format!("of={}", file.display()))
        .stderr(Stdio::null())
        .status();
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// With the state on a full file system the checkpoint does not move, the
/// error names the path, and everything is delivered once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_never_moves_the_checkpoint() {
    assert!(is_root(), "this test mounts a small tmpfs and must run as root, as CI does");
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    assert!(mount_tmpfs(&mount, "size=4m"), "mount -t tmpfs failed");
    let _unmount = Unmount(&mount);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &tcp_sink_toml("siem", receiver.addr));
    let state_dir = mount.join("state");
    move_state_dir(&config, dir.path(), &state_dir);
    // Open the store once so the database exists, then fill the disk.
    let show = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert_success(&show);
    let filler = mount.join("filler");
    fill_disk(&filler, "64k");

    let failed = run_once(&config).await;
    assert_eq!(failed.status.code(), Some(1));
    assert!(stderr(&failed).contains(&state_dir.display().to_string()), "{}", stderr(&failed));
    std::fs::remove_file(&filler).unwrap();
    let show = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&show).contains("contoso: none"), "the checkpoint moved: {}", stdout(&show));

    assert_success(&run_once(&config).await);
    let lines = receiver.wait_for(46, Duration::from_secs(5)).await;
    assert_eq!(count_full_ids(&lines).len(), 46);
}

/// A file sink whose disk fills mid-batch keeps valid JSON Lines: the part
/// written before the failure is removed, and once space is back every
/// detection is in the file on a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_file_sink_keeps_json_lines() {
    assert!(is_root(), "this test mounts a small tmpfs and must run as root, as CI does");
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    assert!(mount_tmpfs(&mount, "size=1m"), "mount -t tmpfs failed");
    let _unmount = Unmount(&mount);
    let archive = mount.join("archive.jsonl");
    let sink = file_sink_toml("archive", &archive) + "retry_initial_ms = 50\nretry_max_secs = 1\n";
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);
    // Fill the disk, then free 32 KiB: the samples take about 95 KB as JSON
    // Lines, so the first batch fails part way through.
    let filler = mount.join("filler");
    fill_disk(&filler, "64k");
    let filled = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&filler).unwrap().set_len(filled - 32 * 1024).unwrap();

    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    let failed = wait_until(Duration::from_secs(20), || std::fs::read_to_string(&log).unwrap_or_default().contains("No space left on device")).await;
    std::fs::remove_file(&filler).unwrap();
    let complete = wait_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&archive).unwrap_or_default();
        text.lines().filter(|line| serde_json::from_str::<serde_json::Value>(line).is_ok()).count() >= 46
    })
    .await;
    assert!(terminate(&mut child).await.success());

    assert!(failed, "the file write never failed: {}", std::fs::read_to_string(&log).unwrap());
    assert!(complete, "the file sink never caught up");
    let text = std::fs::read_to_string(&archive).unwrap();
    let bad: Vec<&str> = text.lines().filter(|line| serde_json::from_str::<serde_json::Value>(line).is_err()).collect();
    let excerpts: Vec<String> = bad.iter().map(|line| format!("{}... ({} bytes)", &line[..line.len().min(80)], line.len())).collect();
    assert!(bad.is_empty(), "{} lines are not JSON: {excerpts:?}", bad.len());
    let mut ids = full_ids(&read_json_lines(&archive));
    ids.sort();
    ids.dedup();
    let mut expected = sample_full_ids();
    expected.sort();
    assert_eq!(ids, expected, "every detection is in the file");
}

/// A dedupe write that fails part way on a full disk is cut off again. A
/// torn record left in the middle would garble the records after it, so the
/// FullIds marked as seen once space is back must still be found after a
/// restart.
#[test]
fn full_disk_dedupe_write_keeps_later_records() {
    use mde_forwarder::detection::Detection;
    use mde_forwarder::store::Store;

    assert!(is_root(), "this test mounts a small tmpfs and must run as root, as CI does");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mount = state.join("seen");
    assert!(mount_tmpfs(&mount, "size=64k,mode=0700"), "mount -t tmpfs failed");
    let _unmount = Unmount(&mount);
    let detection = |id: String| {
        Detection::from_json_text(&format!(r#"{{"FullId":"{id}","LastProcessedTimeUtc":"2026-01-01T00:00:00Z"}}"#)).unwrap()
    };
    let now = chrono::Utc::now();
    let later: Vec<Detection> = (0..10).map(|i| detection(format!("later:{i}"))).collect();
    {
        let store = Store::open(&state).unwrap();
        store.sync_cursors(&["siem"]).unwrap();
        store.enqueue_blocking("t", vec![detection("first".into())], None, now).unwrap();

        let filler = mount.join("filler");
        fill_disk(&filler, "4k");
        let many: Vec<Detection> = (0..250).map(|i| detection(format!("many:{i}"))).collect();
        let full = store.enqueue_blocking("t", many.clone(), None, now);
        assert!(full.is_err(), "the dedupe write did not fail on a full disk");
        std::fs::remove_file(&filler).unwrap();

        let queued = store.enqueue_blocking("t", later.clone(), None, now).unwrap();
        assert_eq!(queued.queued, 10);
    }

    let store = Store::open(&state).unwrap();
    let again = store.enqueue_blocking("t", later.clone(), None, now).unwrap();
    assert_eq!(again.duplicates, 10, "FullIds marked as seen after the failure were lost on restart");
    assert_eq!(again.queued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_state_is_a_clear_error() {
    assert!(is_root(), "this test mounts a read-only tmpfs and must run as root, as CI does");
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("ro");
    assert!(mount_tmpfs(&mount, "size=1m,ro"), "mount -t tmpfs failed");
    let _unmount = Unmount(&mount);
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a.jsonl")));
    move_state_dir(&config, dir.path(), &mount.join("state"));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains(&mount.join("state").display().to_string()), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
}

/// Ctrl-C during `run --once` stops retries after the grace period instead
/// of running every attempt; the detections stay queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_once_run_within_grace() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let sink = tcp_sink_toml("siem", closed).replace("retry_initial_ms = 50", "retry_initial_ms = 8000").replace("retry_max_secs = 1", "retry_max_secs = 60");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sink);
    let mut child = Command::new(binary())
        .args(["run", "--once", "--config", config.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    // SAFETY: sends SIGINT to our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("run --once ignored SIGINT").unwrap();

    // The grace period in the test config is 5 s; all retries would take over 30 s.
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(1), "detections were left undelivered");
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&state).contains("sink siem: 46 pending"), "{}", stdout(&state));
}

/// A spool record damaged on disk (a flipped byte, a cut file) moves its
/// batch to dead letters with an ERROR; the sinks deliver everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_spool_records_do_not_block_sinks() {
    use mde_forwarder::detection::Detection;
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));
    {
        let store = open_store(dir.path());
        store.sync_cursors(&["archive"]).unwrap();
        for batch in 0..3 {
            let text = format!(r#"{{"FullId":"spooled:{batch}","LastProcessedTimeUtc":"{}"}}"#, now_text());
            let detection = Detection::from_json_text(&text).unwrap();
            store.enqueue("contoso", vec![detection], None, chrono::Utc::now()).await.unwrap();
        }
    }
    let spool = dir.path().join("state/spool");
    let segment = std::fs::read_dir(&spool).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&segment).unwrap();
    let second = bytes.windows(10).position(|w| w == b"spooled:1\"").unwrap();
    let third = bytes.windows(10).position(|w| w == b"spooled:2\"").unwrap();
    bytes[second] ^= 0x20;
    // The third record loses its last bytes.
    bytes.truncate(third + 4);
    std::fs::write(&segment, &bytes).unwrap();

    let run = run_once(&config).await;
    // The damaged batches became dead letters.
    assert_dead_letters_stored(&run);
    let log = stderr(&run);
    assert!(log.contains("damaged spool record"), "{log}");
    assert!(log.contains(&segment.display().to_string()), "{log}");
    assert!(log.contains("CRC mismatch"), "{log}");
    assert!(log.contains("cut short"), "{log}");

    let forwarded = full_ids(&read_json_lines(&archive));
    assert!(forwarded.contains(&"spooled:0".to_string()), "{forwarded:?}");
    assert!(!forwarded.iter().any(|id| id.starts_with("spooled:1") || id.starts_with("spooled:2")), "{forwarded:?}");
    assert_eq!(forwarded.len(), sample_full_ids().len() + 1, "the samples polled after the damage arrive too");
    assert_eq!(pending(dir.path(), "archive"), 0);

    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l.sink == "(spool)"));
    assert!(letters[0].detection.contains(r#""FullId":"Spooled:1""#), "the bytes as read: {}", letters[0].detection);
    let cut = letters[1].detection_bytes().unwrap();
    assert!(cut.ends_with(b"spoo"), "{:?}", String::from_utf8_lossy(&cut));
}

/// Queues the 46 samples with `run --once` for a TCP sink `siem` whose
/// receiver is down. Returns the config path and the tenant's TOML.
async fn backlog_for_siem(dir: &Path, emulator: &Emulator) -> (std::path::PathBuf, String) {
    let closed = closed_addr();
    let tenant = tenant_toml("contoso", TENANT_ID, emulator);
    let config = write_config(dir, "", &tenant, &tcp_sink_toml("siem", closed));
    let first = run_once(&config).await;
    assert!(!first.status.success(), "the sink is down: {}", stderr(&first));
    assert_eq!(pending(dir, "siem"), 46);
    (config, tenant)
}

/// Renaming a sink while it has a backlog keeps the backlog for the old
/// name with a warning, and the old name configured again delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_sink_keeps_the_old_names_backlog() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let receiver = LineReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, tenant) = backlog_for_siem(dir.path(), &emulator).await;

    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("arcsight", receiver.addr));
    let cfg = config.to_str().unwrap();
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(show.contains("sink arcsight: new; its first run starts it at the end of the outbox\n"), "{show}");
    assert!(show.contains("sink siem (not in the config): 46 pending, the oldest is item 0 of outbox batch 1; kept"), "{show}");

    let renamed = run_once(&config).await;
    assert_success(&renamed);
    let log = stderr(&renamed);
    assert!(log.contains("sink no longer configured, but detections are pending for it"), "{log}");
    assert!(log.contains("pending=46"), "{log}");
    assert_eq!(pending(dir.path(), "siem"), 46, "the backlog is still queued");

    let both = tcp_sink_toml("siem", receiver.addr) + &tcp_sink_toml("arcsight", receiver.addr);
    let config = write_config(dir.path(), "", &tenant, &both);
    assert_success(&run_once(&config).await);
    let counts = count_full_ids(&receiver.wait_for(46, Duration::from_secs(10)).await);
    assert_eq!(counts.len(), 46, "siem delivered its backlog: {counts:?}");

    // Caught up, the old name is forgotten without a word of warning.
    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("arcsight", receiver.addr));
    let removed = run_once(&config).await;
    assert_success(&removed);
    assert!(stderr(&removed).contains("sink no longer configured and nothing was pending for it"), "{}", stderr(&removed));
    let show = stdout(&run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await);
    assert!(!show.contains("sink siem"), "{show}");
}

/// `state drop-sink` drops the backlog of a sink that is no longer
/// configured, and refuses a configured or unknown sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_sink_releases_an_unconfigured_sinks_backlog() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, tenant) = backlog_for_siem(dir.path(), &emulator).await;
    let cfg = config.to_str().unwrap();

    let configured = run_cli(&["state", "--config", cfg, "drop-sink", "--sink", "siem"]).await;
    assert!(!configured.status.success());
    assert!(stderr(&configured).contains("sink \"siem\" is in the config"), "{}", stderr(&configured));
    assert_eq!(pending(dir.path(), "siem"), 46);

    let archive = dir.path().join("archive.jsonl");
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("archive", &archive));
    let cfg = config.to_str().unwrap();
    let unknown = run_cli(&["state", "--config", cfg, "drop-sink", "--sink", "nosuch"]).await;
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("no sink named \"nosuch\""), "{}", stderr(&unknown));

    let dropped = run_cli(&["state", "--config", cfg, "drop-sink", "--sink", "siem"]).await;
    assert_success(&dropped);
    assert_eq!(stdout(&dropped), "sink siem: dropped; 46 detections were pending for it\n");
    let show = stdout(&run_cli(&["state", "--config", cfg, "show"]).await);
    assert!(!show.contains("sink siem"), "{show}");
    assert!(show.contains("outbox: 0 bytes"), "{show}");
}
