//! The daemon loop with config reload: each new config stops the running
//! pollers and workers (the shutdown protocol in this module's parent) and
//! starts new ones on the same open store.
//!
//! Nothing in flight is lost across a reload. A poll cycle cut short has not
//! moved its checkpoint, so the new poller reads that window again and the
//! dedupe set drops what was already queued. A batch not acknowledged within
//! the grace period stays in the outbox after the sink's cursor, where the
//! new worker for that sink name picks it up. A new sink's cursor starts at
//! the end of the outbox. A removed sink's cursor is deleted only when
//! nothing is pending for it, so its backlog is never released by a reload.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{start, Mode, PipelineError, Running};
use crate::config::Config;
use crate::store::Store;

/// A validated config to switch to, and where to report the outcome.
pub struct Reload {
    pub config: Config,
    /// Receives Ok once the new config runs, or the error for which the
    /// previous config was started again.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Runs the pipeline until `stop` turns true, switching to each config that
/// arrives on `reloads`.
pub async fn run_reloadable(
    mut config: Config,
    store: Arc<Store>,
    mut stop: watch::Receiver<bool>,
    mut reloads: mpsc::Receiver<Reload>,
) -> Result<(), PipelineError> {
    let (mut generation_stop, receiver) = watch::channel(false);
    let mut running = start(&config, &store, Mode::Daemon, receiver)?;
    loop {
        let reload = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            Some(reload) = reloads.recv() => Some(reload),
        };
        generation_stop.send_replace(true);
        let flushed = stop_running(running, &store, grace(&config)).await;
        let Some(reload) = reload else { return flushed.map_err(PipelineError::from) };
        if *stop.borrow() {
            // A SIGTERM came during the reload's drain. Starting the new
            // config only to drain it again would double the shutdown time.
            // Dropping `reload` ends the SIGHUP handler without a message.
            tracing::info!("shutting down during a reload; the new config is not started");
            return flushed.map_err(PipelineError::from);
        }

        let (sender, receiver) = watch::channel(false);
        generation_stop = sender;
        match start(&reload.config, &store, Mode::Daemon, receiver.clone()) {
            Ok(started) => {
                running = started;
                config = reload.config;
                log_new_config(&config);
                let _ = reload.done.send(Ok(()));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the reloaded config; starting the previous one again");
                running = start(&config, &store, Mode::Daemon, receiver)?;
                let _ = reload.done.send(Err(e.to_string()));
            }
        }
    }
}

fn grace(config: &Config) -> Duration {
    Duration::from_secs(config.service.shutdown_grace_secs)
}

/// The end of a stopped worker's message during a reload, in place of
/// [`super::STOPPED_ADVICE`].
const RELOAD_ADVICE: &str =
    "; if the reloaded config keeps this sink, its new worker sends them now, otherwise the next run with this sink configured does";

/// Stops pollers, drains workers within `grace`, and flushes the store.
async fn stop_running(mut running: Running, store: &Store, grace: Duration) -> Result<(), crate::store::StoreError> {
    for failure in running.join_pollers().await {
        tracing::warn!("{failure}");
    }
    for failure in running.finish_workers(Mode::Daemon, grace, watch::channel(true).1).await {
        // The new workers start right after, so "the next run" would mislead.
        let failure = failure.replace(super::STOPPED_ADVICE, RELOAD_ADVICE);
        tracing::warn!("{failure}");
    }
    let flushed = store.flush().await;
    if let Err(e) = &flushed {
        tracing::error!(error = %e, "cannot flush the state store");
    }
    flushed
}

fn log_new_config(config: &Config) {
    let tenants: Vec<&str> = config.tenants.iter().map(|t| t.name.as_str()).collect();
    let sinks: Vec<&str> = config.sinks.iter().map(|s| s.name()).collect();
    tracing::info!(tenants = %tenants.join(","), sinks = %sinks.join(","), "config reloaded");
}
