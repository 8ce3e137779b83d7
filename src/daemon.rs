//! `mde-forwarder run` as a long-running service: signals, config reload,
//! the systemd notify protocol with its watchdog, and the optional
//! `/health` and `/metrics` listener.
//!
//! Start-up order: the config is loaded and validated by the caller, then
//! the state store is opened and the listener bound. Only then does systemd
//! get READY=1, so a unit that is "active" has its state open.
//!
//! Signals: SIGTERM and SIGINT start the graceful shutdown (a second one
//! exits at once); SIGHUP reloads the config file. A reloaded config that is
//! invalid is rejected with the error logged, and the running one stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::pipeline::{self, Reload};
use crate::store::Store;
use crate::telemetry::{self, notify::Notifier};

/// How often STATUS= is refreshed when systemd set no watchdog.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT. `path` is read again on SIGHUP.
pub async fn run(config: Config, path: PathBuf) -> Result<(), String> {
    let notifier = Arc::new(Notifier::from_env());
    let (stop_tx, stop) = watch::channel(false);
    let (hangup_tx, hangups) = mpsc::channel(1);
    install_signal_handlers(stop_tx, hangup_tx);

    config.resolve_tenants().map_err(|e| e.to_string())?;
    let store = Arc::new(Store::open_with(&config.state.dir, config.store_options()).map_err(|e| e.to_string())?);
    let listener = match config.service.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} ([service] listen): {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(address = %bound, "serving /health and /metrics");
            Some(tokio::spawn(telemetry::server::serve(listener, store.clone(), stop.clone())))
        }
        None => None,
    };
    tracing::info!(
        state = %config.state.dir.display(),
        tenants = config.tenants.len(),
        sinks = config.sinks.len(),
        version = env!("CARGO_PKG_VERSION"),
        "mde-forwarder started"
    );
    telemetry::global().configure(&config);
    notifier.send("READY=1\nSTATUS=started, first poll running");

    let (reload_tx, reloads) = mpsc::channel(1);
    let reloader = tokio::spawn(handle_hangups(hangups, path, config.clone(), reload_tx, notifier.clone()));
    let keepalive = tokio::spawn(notify_loop(notifier.clone(), stop.clone()));
    let stopping = {
        let notifier = notifier.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                notifier.send("STOPPING=1\nSTATUS=stopping: delivering queued detections");
            }
        })
    };

    let result = pipeline::run_reloadable(config, store, stop, reloads).await.map_err(|e| e.to_string());
    reloader.abort();
    keepalive.abort();
    stopping.abort();
    if let Some(listener) = listener {
        listener.abort();
    }
    tracing::info!("mde-forwarder stopped");
    result
}

/// Routes SIGTERM and SIGINT to `stop` and SIGHUP to `hangups`, from a
/// thread that signal-hook wakes.
fn install_signal_handlers(stop: watch::Sender<bool>, hangups: mpsc::Sender<()>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install signal handlers; SIGTERM stops the process without draining");
            return;
        }
    };
    std::thread::spawn(move || {
        let mut shutdown_requests = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                // A reload already queued covers this one too.
                let _ = hangups.try_send(());
                continue;
            }
            shutdown_requests += 1;
            if shutdown_requests > 1 {
                eprintln!("second signal {signal}: exiting now; queued detections stay in the outbox");
                std::process::exit(crate::cli::EXIT_FAILURE as i32);
            }
            tracing::info!(signal, "shutdown requested");
            stop.send_replace(true);
        }
    });
}

/// Reloads the config on each SIGHUP. An invalid file is rejected and the
/// running config stays.
async fn handle_hangups(
    mut hangups: mpsc::Receiver<()>,
    path: PathBuf,
    mut current: Config,
    reloads: mpsc::Sender<Reload>,
    notifier: Arc<Notifier>,
) {
    while hangups.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
        notifier.send("RELOADING=1\nSTATUS=reloading the config");
        let outcome = match load_for_reload(&path, &current) {
            Ok(config) => {
                let (done, result) = oneshot::channel();
                if reloads.send(Reload { config: config.clone(), done }).await.is_err() {
                    return;
                }
                match result.await {
                    Ok(Ok(())) => {
                        current = config;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => return,
                }
            }
            Err(e) => Err(e),
        };
        let label = match &outcome {
            Ok(()) => "ok",
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "config reload rejected; the previous config keeps running");
                "rejected"
            }
        };
        telemetry::global().metrics.add(&telemetry::RELOADS, &[("result", label)], 1.0);
        notifier.send("READY=1");
    }
}

/// Loads and checks a new config. Settings bound at start-up (the state
/// directory, the listener, logging) keep their running values.
fn load_for_reload(path: &std::path::Path, current: &Config) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    config.resolve_tenants().map_err(|e| e.to_string())?;
    if config.state.dir != current.state.dir {
        return Err(format!(
            "[state] dir changed from {} to {}; moving the state needs a restart",
            current.state.dir.display(),
            config.state.dir.display()
        ));
    }
    if config.service.listen != current.service.listen
        || config.service.log_format != current.service.log_format
        || config.service.log_level != current.service.log_level
    {
        tracing::warn!("[service] listen, log_format and log_level take effect at the next restart, not on reload");
    }
    Ok(config)
}

/// Sends STATUS= with the last poll result per tenant, and WATCHDOG=1 while
/// every poller makes progress.
async fn notify_loop(notifier: Arc<Notifier>, mut stop: watch::Receiver<bool>) {
    if !notifier.is_enabled() {
        return;
    }
    let watchdog = telemetry::notify::watchdog_timeout();
    // systemd recommends a keep-alive every half of the timeout.
    let period = watchdog.map_or(STATUS_PERIOD, |timeout| (timeout / 2).max(Duration::from_millis(10)));
    if let Some(timeout) = watchdog {
        tracing::info!(timeout_ms = timeout.as_millis() as u64, "systemd watchdog enabled");
    }
    let mut last_status = String::new();
    loop {
        let telemetry = telemetry::global();
        let status = telemetry::notify::status_text(&telemetry.tenants.status_line());
        if status != last_status {
            notifier.send(&format!("STATUS={status}"));
            last_status = status;
        }
        if watchdog.is_some() {
            let stalled = telemetry.tenants.stalled(Instant::now());
            if stalled.is_empty() {
                notifier.send("WATCHDOG=1");
            } else if let Some(suppressed) = telemetry::should_log(&format!("watchdog {}", stalled.join(","))) {
                tracing::error!(
                    tenants = %stalled.join(","),
                    suppressed,
                    "poller made no progress within its deadline; withholding the watchdog keep-alive so systemd restarts the service"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
