//! Wiring: one poller task per tenant and one worker task per sink, meeting
//! only in the store.
//!
//! # Shutdown protocol
//! 1. `stop` turns true: pollers return at their next await point. A cycle cut
//!    short has not moved its checkpoint, so nothing is lost.
//! 2. Workers get [`WorkerMode::Drain`]: they deliver what is queued and exit.
//! 3. After the grace period, workers get [`WorkerMode::Stop`]: an
//!    unacknowledged batch stays in the outbox for the next start.
//!
//! A config reload (see [`run_reloadable`]) runs the same three steps, then
//! starts pollers and workers for the new config on the same open store.

mod poller;
mod reload;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError, Confirm, Protocol, SinkConfig, SyslogSinkConfig};
use crate::format::{CefOptions, Encoder, EncoderOptions, Framing, HecOptions, HeaderFormat, LeefOptions, PayloadFormat};
use crate::sink::tls::{client_config_watching, ClientIdentity};
use crate::sink::{
    FileTransport, HecSettings, HecTransport, HttpSettings, HttpTransport, StreamTransport, TlsSettings, Transport,
    UdpTransport,
};
use crate::source::AlertsClient;
use crate::store::{Store, StoreError};

pub use poller::{CycleError, CycleReport, Poller};
pub use reload::{run_reloadable, Reload};
pub use worker::{EventEncoder, SinkWorker, WorkerError, WorkerMode, STOPPED_ADVICE};

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

/// How long a connection to the API or the token endpoint stays open unused.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

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
        .read_timeout(Duration::from_secs(poll.request_timeout_secs))
        // Pages of one poll reuse a connection. Between polls an idle
        // connection would only hold buffers, so it is closed.
        .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT);
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

/// Builds a sink's transport and encoder from its config. `key` is the
/// sink's config position, such as `sink[0]`, for errors. Reads TLS and
/// secret files, so a missing file fails here, before anything is sent.
pub fn build_sink(key: &str, sink: &SinkConfig) -> Result<(Transport, EventEncoder), ConfigError> {
    for warning in sink_warnings(sink) {
        tracing::warn!(sink = %sink.name(), "{warning}");
    }
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
    let plain = |payload, framing| {
        EventEncoder::Wire(Encoder::new(EncoderOptions {
            payload,
            header: HeaderFormat::None,
            framing,
            facility: crate::format::Facility::LOCAL0,
            hostname: String::new(),
            app_name: "mde-forwarder".into(),
            cef: cef.clone(),
            leef: leef.clone(),
            max_message_bytes: None,
        }))
    };
    let built = match sink {
        SinkConfig::Syslog(s) => {
            let options = s.encoder_options();
            let stream = |tls| {
                let transport = StreamTransport::new(s.address.clone(), tls, connect, write);
                match s.confirm.unwrap_or_default() {
                    Confirm::Close => transport,
                    Confirm::TcpAck => transport.confirming_by_tcp_ack(),
                }
            };
            let transport = match s.protocol {
                Protocol::Udp => Transport::Udp(UdpTransport::new(s.address.clone())),
                Protocol::Tcp => Transport::Stream(stream(None)),
                Protocol::Tls => Transport::Stream(stream(Some(syslog_tls(key, s)?))),
            };
            (transport, EventEncoder::Wire(Encoder::new(options)))
        }
        SinkConfig::File(f) => (Transport::File(FileTransport::new(f.path.clone())), plain(f.format, Framing::Newline)),
        SinkConfig::Stdout(s) => (Transport::Stdout, plain(s.format, Framing::Newline)),
        SinkConfig::Http(h) => {
            let client = crate::sink::build_http_client(key, &h.tls, &h.proxy, Duration::from_secs(h.timeout_secs), connect)?;
            let settings = HttpSettings {
                proxy: crate::sink::proxy_for(&h.url, &h.proxy),
                url: h.url.trim().to_string(),
                body_format: h.body_format,
                gzip: h.gzip,
                headers: h.resolve_headers(key)?,
                max_batch_bytes: h.max_batch_bytes,
                proxy_secrets: h.proxy.secrets(),
            };
            (Transport::Http(HttpTransport::new(key, settings, client)?), plain(PayloadFormat::Json, Framing::None))
        }
        SinkConfig::SplunkHec(h) => {
            let client = crate::sink::build_http_client(key, &h.tls, &h.proxy, Duration::from_secs(h.timeout_secs), connect)?;
            let settings = HecSettings {
                proxy: crate::sink::proxy_for(&h.url, &h.proxy),
                url: h.url.trim().trim_end_matches('/').to_string(),
                token: h.resolve_token(key)?,
                ack: h.ack,
                ack_timeout: Duration::from_secs(h.ack_timeout_secs),
                max_batch_bytes: h.max_batch_bytes,
                proxy_secrets: h.proxy.secrets(),
            };
            let options = HecOptions { source: h.source.clone(), sourcetype: h.sourcetype.clone(), index: h.index.clone() };
            (Transport::Hec(HecTransport::new(key, settings, client)?), EventEncoder::Hec(options))
        }
    };
    Ok(built)
}

fn syslog_tls(key: &str, s: &SyslogSinkConfig) -> Result<TlsSettings, ConfigError> {
    let identity = match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(cert_file), Some(key_file)) => Some(ClientIdentity { cert_file, key_file }),
        _ => None,
    };
    let (config, certificate) = client_config_watching(key, &s.tls, identity)?;
    let name = s.server_name();
    let server_name = rustls_pki_types::ServerName::try_from(name.clone()).map_err(|_| ConfigError::Invalid {
        key: format!("{key}.tls_server_name"),
        message: format!("{name:?} is not a DNS name or IP address; set tls_server_name to the name in the receiver's certificate"),
    })?;
    Ok(TlsSettings::new(config, server_name).watching(certificate))
}

/// Warns about checkpoints of tenants that are not in the config. A tenant
/// renamed in the config is a new tenant to the store: without its old
/// checkpoint it would look back only `initial_lookback_secs`, skipping
/// what the API published between the old checkpoint and that window.
fn warn_about_unconfigured_checkpoints(config: &Config, store: &Store) -> Result<(), PipelineError> {
    let checkpoints = store.checkpoints()?;
    let new_tenants: Vec<&str> =
        config.tenants.iter().map(|t| t.name.as_str()).filter(|name| checkpoints.iter().all(|(stored, _)| stored != name)).collect();
    for (name, time) in &checkpoints {
        if config.tenants.iter().any(|t| t.name == *name) {
            continue;
        }
        if new_tenants.is_empty() {
            tracing::warn!(tenant = %name, checkpoint = %time, "a tenant no longer in the config still has a checkpoint; delete it with `state reset-checkpoint --tenant NAME` once it is not needed");
        } else {
            tracing::warn!(
                tenant = %name,
                checkpoint = %time,
                new_tenants = %new_tenants.join(","),
                "a tenant no longer in the config has a checkpoint while a tenant without one starts initial_lookback_secs back; if one was renamed to the other, stop and run `state set-checkpoint --tenant NEW_NAME --time CHECKPOINT`, or detections between the two are never read"
            );
        }
    }
    Ok(())
}

/// Returns the warnings about settings of `sink` that load but weaken or
/// do nothing. `check-config` prints them, and a sink logs them when built.
pub fn sink_warnings(sink: &SinkConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let insecure = match sink {
        SinkConfig::Syslog(s) => s.protocol == Protocol::Tls && s.tls.tls_insecure_skip_verify,
        SinkConfig::Http(h) => h.tls.tls_insecure_skip_verify,
        SinkConfig::SplunkHec(h) => h.tls.tls_insecure_skip_verify,
        _ => false,
    };
    if insecure {
        warnings.push("tls_insecure_skip_verify is set: the receiver's certificate is not checked, so anyone on the path can read and change what this sink sends".to_string());
    }
    // Configs of earlier releases set the default on TCP sinks, as the
    // example config did, so only another value is worth a warning.
    if let SinkConfig::Syslog(s) = sink {
        if s.protocol != Protocol::Udp && s.max_datagram_bytes != crate::config::default_max_datagram_bytes() {
            warnings.push(format!(
                "max_datagram_bytes = {} applies only to protocol = \"udp\" and is ignored: TCP and TLS never shorten a message; remove the key",
                s.max_datagram_bytes
            ));
        }
    }
    warnings
}

/// Returns the machine's host name, for syslog headers.
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
    let mut running = start(config, &store, mode, stop.clone())?;
    let mut failures = running.join_pollers().await;
    let grace = Duration::from_secs(config.service.shutdown_grace_secs);
    let sink_failures = running.finish_workers(mode, grace, stop).await;
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

/// The tasks of one config: a poller per tenant, a worker per sink, and the
/// dedupe maintenance. A reload stops them and starts new ones.
struct Running {
    pollers: JoinSet<Result<(), CycleError>>,
    workers: JoinSet<Result<(), WorkerError>>,
    mode_tx: watch::Sender<WorkerMode>,
    maintenance: tokio::task::JoinHandle<()>,
}

/// Spawns the tasks for `config`. Pollers return when `stop` turns true.
fn start(config: &Config, store: &Arc<Store>, mode: Mode, stop: watch::Receiver<bool>) -> Result<Running, PipelineError> {
    let tenants = config.resolve_tenants()?;
    let http = http_client(config)?;
    warn_about_unconfigured_checkpoints(config, store)?;
    let sink_names: Vec<&str> = config.sinks.iter().map(|s| s.name()).collect();
    let unconfigured = store.sync_cursors(&sink_names)?;
    for removed in unconfigured.released {
        tracing::info!(sink = %removed, "sink no longer configured and nothing was pending for it; its cursor is deleted");
    }
    for (sink, pending) in unconfigured.pending {
        tracing::warn!(
            sink = %sink,
            pending,
            "sink no longer configured, but detections are pending for it; they stay queued, with every detection queued after them, and count towards max_outbox_bytes until a sink of this name is configured again or `state drop-sink --sink NAME` drops them. To rename a sink, let it catch up first"
        );
    }
    crate::telemetry::global().configure(config);
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let wake_tx = Arc::new(wake_tx);
    let (mode_tx, mode_rx) = watch::channel(if mode == Mode::Once { WorkerMode::Drain } else { WorkerMode::Run });
    if mode == Mode::Once {
        // Workers must not exit on an empty outbox before the pollers ran.
        mode_tx.send_replace(WorkerMode::Run);
    }

    let mut built = Vec::with_capacity(config.sinks.len());
    for (i, sink) in config.sinks.iter().enumerate() {
        built.push(build_sink(&format!("sink[{i}]"), sink)?);
    }

    // When some sink reads fields, the pollers build each detection's field
    // table while they split the response, instead of a sink scanning the
    // text again.
    let field_tables = config.sinks.iter().zip(&built).any(|(sink, (_, encoder))| encoder.needs_fields() || sink.common().filters_fields());
    let mut workers = JoinSet::new();
    for (sink, (transport, encoder)) in config.sinks.iter().zip(built) {
        let common = sink.common();
        let worker = SinkWorker {
            name: sink.name().to_string(),
            store: store.clone(),
            transport,
            encoder,
            routing: common.clone(),
            shortened: 0,
            unreported_shortened: [0; 2],
            receiver_max_batch_bytes: None,
            rejected_alone: 0,
            sent: Default::default(),
            rewinds: 0,
            close_backoff: crate::retry::Backoff::new(Duration::from_millis(common.retry_initial_ms), Duration::from_secs(common.retry_max_secs)),
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
        let client = AlertsClient::new(http.clone(), Arc::new(tenant), config.poll.max_response_bytes).with_field_tables(field_tables);
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
    let maintenance = tokio::spawn(maintain(store.clone(), stop));
    Ok(Running { pollers, workers, mode_tx, maintenance })
}

impl Running {
    /// Waits for every poller: in daemon mode they return once `stop` turned
    /// true. Returns the failures.
    async fn join_pollers(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        while let Some(result) = self.pollers.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("poller task failed: {e}")),
            }
        }
        self.maintenance.abort();
        failures
    }

    /// Lets the workers deliver what is queued, then stops them, and returns
    /// the sink failures. Daemon mode allows `grace` for this. `--once` waits
    /// until the queue is empty, unless `stop` turns true (Ctrl-C): then it
    /// also allows `grace`, and what is left stays queued.
    async fn finish_workers(mut self, mode: Mode, grace: Duration, mut stop: watch::Receiver<bool>) -> Vec<String> {
        self.mode_tx.send_replace(WorkerMode::Drain);
        let workers = &mut self.workers;
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
        tokio::pin!(drain);
        if mode == Mode::Once {
            tokio::select! {
                errors = &mut drain => return errors,
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        match tokio::time::timeout(grace, &mut drain).await {
            Ok(errors) => errors,
            Err(_) => {
                tracing::warn!(grace_secs = grace.as_secs(), "shutdown grace period over; undelivered detections stay queued");
                self.mode_tx.send_replace(WorkerMode::Stop);
                drain.await
            }
        }
    }
}

/// Forgets old FullIds now and every ten minutes.
async fn maintain(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    loop {
        match store.prune_dedupe(chrono::Utc::now()) {
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

/// Hands memory freed after a large poll or delivery back to the operating
/// system, so an idle daemon stays small (glibc keeps freed pages otherwise).
#[cfg(target_env = "gnu")]
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only releases free heap pages; it touches no live data.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
pub(crate) fn release_free_memory() {}

/// Caps glibc at two malloc arenas. By default each thread that allocates
/// may get its own arena (up to eight per core), and freed memory left
/// scattered over them stays resident. After a poll of 10,000 detections
/// (`scripts/bench-e2e.sh`, 2 cores), an idle daemon kept 17 MB with the
/// default and 11 MB with two arenas, at the same throughput. The
/// `MALLOC_ARENA_MAX` environment variable, when set, still wins.
#[cfg(target_env = "gnu")]
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator settings, and runs before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(target_env = "gnu"))]
pub fn limit_malloc_arenas() {}
