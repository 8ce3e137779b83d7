//! Wiring: one poller task per tenant and one worker task per sink, meeting
//! only in the store.
//!
//! # Shutdown protocol
//! 1. `stop` turns true: pollers return at their next await point. A cycle cut
//!    short has not moved its checkpoint, so nothing is lost.
//! 2. Workers get [`WorkerMode::Drain`]: they deliver what is queued and exit.
//! 3. After the grace period, workers get [`WorkerMode::Stop`]: an
//!    unacknowledged batch stays in the outbox for the next start.

mod poller;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError, SinkConfig};
use crate::format::{CefOptions, Encoder, EncoderOptions, Framing, HeaderFormat, LeefOptions};
use crate::sink::{FileTransport, TcpTransport, Transport, UdpTransport};
use crate::source::AlertsClient;
use crate::store::{Store, StoreError};

pub use poller::{CycleError, CycleReport, Poller};
pub use worker::{SinkWorker, WorkerError, WorkerMode};

/// Attempts per batch for a sink in `--once` mode before the run fails.
const ONCE_SINK_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Http(reqwest::Error),
    #[error("{}", .0.join("; "))]
    Failed(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Daemon,
    Once,
}

/// The `User-Agent` of every request: product name and version.
pub const USER_AGENT: &str = concat!("mde-forwarder/", env!("CARGO_PKG_VERSION"));

/// Builds the one HTTP client shared by every tenant: timeouts, proxy,
/// extra CA certificates, gzip decoding (on by the reqwest feature).
///
/// Without `[poll] proxy_url`, reqwest reads `HTTPS_PROXY`, `HTTP_PROXY`,
/// `ALL_PROXY` and `NO_PROXY` (and their lower-case forms) from the environment.
pub fn http_client(config: &Config) -> Result<reqwest::Client, PipelineError> {
    let poll = &config.poll;
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(poll.connect_timeout_secs))
        .read_timeout(Duration::from_secs(poll.request_timeout_secs));
    if let Some(proxy_url) = &poll.proxy_url {
        // reqwest's error text may repeat the URL, and with it a password.
        let proxy = reqwest::Proxy::all(proxy_url.expose().trim()).map_err(|_| {
            ConfigError::Invalid { key: "poll.proxy_url".into(), message: "is not a usable proxy URL".into() }
        })?;
        let no_proxy = poll.no_proxy.as_deref().and_then(reqwest::NoProxy::from_string);
        builder = builder.proxy(proxy.no_proxy(no_proxy));
    }
    if let Some(path) = &poll.ca_file {
        for certificate in read_ca_file(path)? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(PipelineError::Http)
}

/// Reads every certificate of a PEM bundle.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "poll.ca_file".into(), message };
    let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| invalid(format!("{} is not a PEM certificate bundle: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(invalid(format!("{} contains no -----BEGIN CERTIFICATE----- block", path.display())));
    }
    Ok(certificates)
}

/// Builds a sink's transport and encoder from its config.
pub fn build_sink(sink: &SinkConfig) -> (Transport, Encoder) {
    let common = sink.common();
    let cef = CefOptions {
        vendor: common.cef_vendor.clone(),
        product: common.cef_product.clone(),
        version: common.cef_version.clone(),
    };
    let leef = LeefOptions {
        vendor: common.cef_vendor.clone(),
        product: common.cef_product.clone(),
        version: common.cef_version.clone(),
    };
    let connect = Duration::from_secs(common.connect_timeout_secs);
    let write = Duration::from_secs(common.write_timeout_secs);
    let plain = |payload| EncoderOptions {
        payload,
        header: HeaderFormat::None,
        framing: Framing::Newline,
        facility: crate::format::Facility::LOCAL0,
        hostname: String::new(),
        app_name: "mde-forwarder".into(),
        cef: cef.clone(),
        leef: leef.clone(),
        max_message_bytes: None,
    };
    match sink {
        SinkConfig::Syslog(s) => {
            let udp = s.protocol == crate::config::Protocol::Udp;
            let options = EncoderOptions {
                payload: s.format,
                header: s.header,
                framing: if udp { Framing::None } else { s.framing },
                facility: s.facility,
                hostname: s.hostname.clone().unwrap_or_else(local_hostname),
                app_name: "mde-forwarder".into(),
                cef,
                leef,
                max_message_bytes: udp.then_some(s.max_datagram_bytes),
            };
            let transport = if udp {
                Transport::Udp(UdpTransport::new(s.address.clone()))
            } else {
                Transport::Tcp(TcpTransport::new(s.address.clone(), connect, write))
            };
            (transport, Encoder::new(options))
        }
        SinkConfig::File(f) => (Transport::File(FileTransport::new(f.path.clone())), Encoder::new(plain(f.format))),
        SinkConfig::Stdout(s) => (Transport::Stdout, Encoder::new(plain(s.format))),
    }
}

/// The machine's host name, for syslog headers.
pub fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "-".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs the pipeline until `stop` (daemon) or until one cycle per tenant is
/// delivered (`--once`).
pub async fn run(config: &Config, store: Arc<Store>, mode: Mode, stop: watch::Receiver<bool>) -> Result<(), PipelineError> {
    let tenants = config.resolve_tenants()?;
    let http = http_client(config)?;
    let sink_names: Vec<&str> = config.sinks.iter().map(|s| s.name()).collect();
    for removed in store.sync_cursors(&sink_names)? {
        tracing::info!(sink = %removed, "sink no longer configured; released what only it held");
    }
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let wake_tx = Arc::new(wake_tx);
    let (mode_tx, mode_rx) = watch::channel(if mode == Mode::Once { WorkerMode::Drain } else { WorkerMode::Run });
    if mode == Mode::Once {
        // Workers must not exit on an empty outbox before the pollers ran.
        mode_tx.send_replace(WorkerMode::Run);
    }

    let mut workers = JoinSet::new();
    for sink in &config.sinks {
        let (transport, encoder) = build_sink(sink);
        let common = sink.common();
        let worker = SinkWorker {
            name: sink.name().to_string(),
            store: store.clone(),
            transport,
            encoder,
            batch_size: common.batch_size,
            retry_initial: Duration::from_millis(common.retry_initial_ms),
            retry_max: Duration::from_secs(common.retry_max_secs),
            max_attempts: (mode == Mode::Once).then_some(ONCE_SINK_ATTEMPTS),
            wake: wake_rx.clone(),
            mode: mode_rx.clone(),
        };
        workers.spawn(worker.run());
    }

    let mut pollers = JoinSet::new();
    for tenant in tenants {
        let client = AlertsClient::new(http.clone(), Arc::new(tenant), config.poll.max_response_bytes);
        let poller = Poller {
            client,
            store: store.clone(),
            poll: config.poll.clone(),
            state: config.state.clone(),
            wake_sinks: wake_tx.clone(),
        };
        let stop = stop.clone();
        match mode {
            Mode::Daemon => {
                pollers.spawn(async move {
                    poller.run(stop).await;
                    Ok(())
                });
            }
            Mode::Once => {
                pollers.spawn(async move { poller.run_with_retries(&mut stop.clone()).await.map(|_| ()) });
            }
        }
    }
    let maintenance = tokio::spawn(maintain(store.clone(), config.state.dedupe_retention_secs, stop.clone()));

    let mut failures = Vec::new();
    while let Some(result) = pollers.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(format!("poller task failed: {e}")),
        }
    }
    maintenance.abort();

    // Pollers are done: in daemon mode because `stop` turned true.
    mode_tx.send_replace(WorkerMode::Drain);
    let drain = async {
        let mut errors = Vec::new();
        while let Some(result) = workers.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(format!("sink task failed: {e}")),
            }
        }
        errors
    };
    let sink_failures = match mode {
        Mode::Once => drain.await,
        Mode::Daemon => {
            let grace = Duration::from_secs(config.service.shutdown_grace_secs);
            tokio::pin!(drain);
            match tokio::time::timeout(grace, &mut drain).await {
                Ok(errors) => errors,
                Err(_) => {
                    tracing::warn!(grace_secs = grace.as_secs(), "shutdown grace period over; undelivered detections stay queued");
                    mode_tx.send_replace(WorkerMode::Stop);
                    drain.await
                }
            }
        }
    };
    if let Err(e) = store.flush().await {
        failures.push(e.to_string());
    }
    match mode {
        Mode::Once => failures.extend(sink_failures),
        Mode::Daemon => {
            for failure in sink_failures {
                tracing::warn!("{failure}");
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::Failed(failures))
    }
}

/// Forgets old FullIds now and every ten minutes.
async fn maintain(store: Arc<Store>, retention_secs: u64, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = chrono::Utc::now() - chrono::Duration::seconds(retention_secs as i64);
        match store.prune_dedupe(cutoff) {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "dedupe entries pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune the dedupe set"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
