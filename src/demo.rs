//! The `demo` command: the emulator on 127.0.0.1 with the sample detections,
//! and the forwarder writing them to standard output as CEF, until Ctrl-C.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{
    Config, OutboxFullPolicy, PollConfig, Secret, ServiceConfig, SinkCommon, SinkConfig, StateConfig,
    StdoutSinkConfig, TenantConfig, TokenEndpoint,
};
use crate::emulator::{sample_detections, Emulator, EmulatorOptions, TenantSpec};
use crate::format::PayloadFormat;
use crate::output::Failure;
use crate::pipeline::Mode;

const TENANT_ID: &str = "00000000-0000-0000-0000-000000000000";
const CLIENT_ID: &str = "mde-forwarder-demo";
const CLIENT_SECRET: &str = "demo-secret";

/// Creates the demo's state directory under the temporary directory and
/// returns it. The directory is new: one left behind by a demo that was
/// killed (whose pid this process may have now) is never reused, because its
/// checkpoint and dedupe set would hide the sample detections.
pub fn create_state_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    let pid = std::process::id();
    const ATTEMPTS: u32 = 100;
    for attempt in 0..ATTEMPTS {
        let name = if attempt == 0 { format!("mde-forwarder-demo-{pid}") } else { format!("mde-forwarder-demo-{pid}-{attempt}") };
        let dir = base.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create a state directory in {}: {e}; set TMPDIR to a writable directory", base.display())),
        }
    }
    Err(format!(
        "cannot create a state directory in {}: all {ATTEMPTS} names for this pid exist; delete the old mde-forwarder-demo-* directories there",
        base.display()
    ))
}

pub async fn run(state_dir: PathBuf, interval_secs: u64, add_every_secs: u64, stop: watch::Receiver<bool>) -> Result<(), String> {
    let emulator = Emulator::start(([127, 0, 0, 1], 0).into(), EmulatorOptions::default())
        .await
        .map_err(|e| format!("cannot start the emulator on 127.0.0.1: {e}"))?;
    emulator.add_tenant(
        TENANT_ID,
        TenantSpec { client_id: CLIENT_ID.into(), client_secret: CLIENT_SECRET.into(), forbidden: false },
    );
    emulator.load_detections(TENANT_ID, sample_detections(), true);
    if add_every_secs > 0 {
        emulator.spawn_generator(TENANT_ID, Duration::from_secs(add_every_secs));
    }
    tracing::info!(emulator = %emulator.url(), state = %state_dir.display(), "demo: forwarding the emulator's detections to standard output as CEF; Ctrl-C stops");
    let config = demo_config(&emulator, state_dir.clone(), interval_secs);
    let failure = crate::output::failure_signal();
    let result = crate::cli::run_config(&config, Mode::Daemon, stop_on_output_failure(stop)).await.map(drop);
    emulator.shutdown().await;
    let removed = std::fs::remove_dir_all(&state_dir).is_ok();
    result.map_err(|e| if removed { without_next_run(&e) } else { e })?;
    // A closed pipe ends the demo as a success, as it ends the other commands.
    let failed = failure.borrow().clone();
    match failed {
        Some(Failure::Error(message)) => Err(format!("cannot write to standard output: {message}")),
        Some(Failure::ClosedPipe) | None => Ok(()),
    }
}

/// Rewrites a failure of the demo's pipeline for a state directory that is
/// gone: what a sink had not delivered was deleted with it, so no next run
/// sends it.
fn without_next_run(error: &str) -> String {
    error.replace(crate::pipeline::STOPPED_ADVICE, "; the demo deleted its state directory with them")
}

/// Returns a stop channel that turns true when `stop` does or when a write
/// to standard output fails, as under `demo | head` or `demo > /dev/full`.
/// Without it, the stdout sink would retry a failed write until Ctrl-C.
fn stop_on_output_failure(mut stop: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let mut failure = crate::output::failure_signal();
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            failed = failure.wait_for(Option::is_some) => {
                let closed_pipe = failed.is_ok_and(|f| *f == Some(Failure::ClosedPipe));
                if closed_pipe {
                    tracing::info!("demo: standard output was closed; stopping");
                } else {
                    tracing::info!("demo: cannot write to standard output; stopping");
                }
            }
        }
        sender.send_replace(true);
    });
    receiver
}

fn demo_config(emulator: &Emulator, dir: PathBuf, interval_secs: u64) -> Config {
    Config {
        state: StateConfig {
            dir,
            max_outbox_bytes: 64 * 1024 * 1024,
            on_outbox_full: OutboxFullPolicy::Pause,
            dedupe_retention_secs: 7 * 24 * 3600,
        },
        poll: PollConfig { interval_secs: interval_secs.max(1), initial_lookback_secs: 24 * 3600, ..PollConfig::default() },
        service: ServiceConfig { shutdown_grace_secs: 2, ..ServiceConfig::default() },
        tenants: vec![TenantConfig {
            name: "demo".into(),
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            client_secret: Some(Secret::new(CLIENT_SECRET)),
            client_secret_file: None,
            client_secret_env: None,
            client_secret_credential: None,
            client_certificate_file: None,
            client_certificate_key_file: None,
            region: None,
            api_url: Some(emulator.url()),
            login_url: Some(emulator.url()),
            resource: "https://graph.windows.net".into(),
            token_endpoint: TokenEndpoint::V1,
            token_refresh_margin_secs: 300,
            machine_groups: Vec::new(),
            device_created_machine_tags: None,
            cloud_created_machine_tags: None,
            limit: None,
        }],
        sinks: vec![SinkConfig::Stdout(StdoutSinkConfig {
            name: "stdout".into(),
            format: PayloadFormat::Cef,
            common: SinkCommon::default(),
        })],
    }
}

#[cfg(test)]
mod tests {
    use super::{create_state_dir, without_next_run};
    use crate::pipeline::WorkerError;

    #[test]
    fn stopped_demo_promises_no_next_run() {
        let error = WorkerError::Stopped { sink: "stdout".into(), pending: 3 }.to_string();
        let rewritten = without_next_run(&error);
        assert!(error.contains("next run"), "{error}");
        assert!(!rewritten.contains("next run"), "{rewritten}");
        assert!(rewritten.contains("3 detections still queued"), "{rewritten}");
        assert!(rewritten.contains("the demo deleted its state directory with them"), "{rewritten}");
    }

    #[test]
    fn state_dirs_are_never_reused() {
        let first = create_state_dir().unwrap();
        let second = create_state_dir().unwrap();
        let first_exists = first.is_dir();
        let second_exists = second.is_dir();
        std::fs::remove_dir(&first).unwrap();
        std::fs::remove_dir(&second).unwrap();
        assert_ne!(first, second);
        assert!(first_exists);
        assert!(second_exists);
    }
}
