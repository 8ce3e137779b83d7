//! The commands behind `mde-forwarder`: run, pull, demo, emulate,
//! check-config, state, health.
//!
//! Exit codes:
//! - 0: success, also when the reader closed standard output early.
//! - 1: a run, a probe, the health check or a write to standard output
//!   failed (the reason is on stderr).
//! - 2: invalid command-line arguments.
//! - 3: `run --once` delivered everything else, but detections became dead
//!   letters during the run.
//! - 64: invalid configuration.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Args, Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::pipeline::{self, Mode};
use crate::detection::Detection;
use crate::store::{DeadLetter, Store};
use crate::timefmt;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_DEAD_LETTERS: u8 = 3;
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "mde-forwarder",
    version,
    about = "Forwards Microsoft Defender for Endpoint detections from the SIEM REST API to syslog, file and HTTP sinks",
    after_help = "Exit codes: 0 success, also when the reader closed standard output early (as under | head); 1 a run, probe, health check or write to standard output failed (reason on stderr); 2 invalid arguments; 64 invalid config."
)]
pub struct Cli {
    /// Log format on standard error: text or json (one JSON object per line); overrides [service] log_format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the forwarder with a config file.
    Run(RunArgs),
    /// Write one tenant's detections of a time window to JSON Lines, without touching the state (works while the daemon runs).
    Pull(PullArgs),
    /// Start the built-in API emulator with sample detections and forward them to standard output as CEF.
    Demo(DemoArgs),
    /// Run the Defender API emulator on its own, for testing a SIEM pipeline.
    Emulate(crate::emulator::EmulateArgs),
    /// Validate a config file and show the resolved endpoints; exit 0 valid, 1 a probe failed, 64 invalid.
    CheckConfig(CheckConfigArgs),
    /// Show or change the stored state: checkpoints, outbox, dead letters.
    State(StateArgs),
    /// GET the health endpoint of a running forwarder; exit 0 on HTTP 200, else 1. For container health checks.
    Health(HealthArgs),
}

#[derive(Args, Debug)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also get a token from each tenant and connect to each sink (TCP connect, file open; UDP is only resolved).
    #[arg(long)]
    pub probe: bool,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// URL of the forwarder's health endpoint ([service] listen plus /health).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9898/health")]
    pub url: String,
    /// Seconds to wait for the whole response.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// Path of the TOML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Run one complete poll cycle for every tenant, deliver everything, store the checkpoints and exit (without it: run until SIGTERM or SIGINT; SIGHUP reloads the config).
    #[arg(long)]
    pub once: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("start").required(true).args(["since", "ago"])))]
pub struct PullArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Name of the [[tenant]] to pull.
    #[arg(long)]
    pub tenant: String,
    /// Start of the window on LastProcessedTimeUtc (UTC, ISO 8601), for example 2026-12-01T00:00:00Z.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// End of the window (UTC, ISO 8601); now by default.
    #[arg(long, value_name = "TIME", requires = "since", conflicts_with = "ago")]
    pub until: Option<String>,
    /// The window ending now, as an ISO 8601 duration such as PT4H or P1D.
    #[arg(long, value_name = "DURATION")]
    pub ago: Option<String>,
    /// File to write; standard output by default. An existing file is replaced once the pull has succeeded.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seconds between polls.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub interval_secs: u64,
    /// Seconds between new detections added by the emulator; 0 adds none.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub add_every_secs: u64,
}

#[derive(Args, Debug)]
pub struct StateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(subcommand)]
    pub action: StateAction,
}

#[derive(Subcommand, Debug)]
pub enum StateAction {
    /// Show checkpoints, outbox depth per sink, dedupe entries and dead letters.
    Show,
    /// Set a tenant's checkpoint, to replay from a time (UTC, ISO 8601).
    SetCheckpoint {
        /// Tenant name, as in [[tenant]] name.
        #[arg(long)]
        tenant: String,
        /// UTC time in ISO 8601, for example 2026-12-01T00:00:00Z.
        #[arg(long)]
        time: String,
        /// Also forget which detections of this tenant were already forwarded, so the replay sends them again.
        #[arg(long)]
        resend: bool,
    },
    /// Delete a tenant's checkpoint: the next poll starts initial_lookback_secs back.
    ResetCheckpoint {
        /// Tenant name, as in [[tenant]] name.
        #[arg(long)]
        tenant: String,
    },
    /// List dead letters with their reasons, or write one letter's detection byte for byte (--raw).
    DeadLetters {
        /// Dead letter id from the listing; repeat for several. Without it, all are listed.
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Write the detection of the one letter given by --id to standard output exactly as received, with nothing added: the only exact copy of a letter that is not UTF-8.
        #[arg(long, requires = "ids")]
        raw: bool,
    },
    /// Queue dead letters again for the sink that rejected them (all, or those given by --id).
    Requeue {
        /// Dead letter id from `state dead-letters`; repeat for several.
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
    /// Delete dead letters (all, or those given by --id).
    Purge {
        /// Dead letter id from `state dead-letters`; repeat for several.
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
    /// Drop the detections still queued for a sink that is no longer in the config, and forget the sink.
    DropSink {
        /// Sink name, as `state show` lists it.
        #[arg(long)]
        sink: String,
    },
}

/// Parses the command line, or returns the exit code when the arguments
/// are invalid or only ask for help or the version.
///
/// Clap's own exit ignores a failed write of the help or version text, so
/// this function writes that text itself and handles a failure as for any
/// other output. A closed pipe exits 0 quietly, and any other error is
/// reported and exits 1. Usage errors still go to standard error with exit
/// code 2.
pub fn parse_args() -> Result<Cli, ExitCode> {
    let error = match Cli::try_parse() {
        Ok(cli) => return Ok(cli),
        Err(error) => error,
    };
    if error.use_stderr() {
        error.exit();
    }
    let written = error.print().and_then(|()| std::io::stdout().flush());
    if let Err(e) = written {
        crate::output::record_error(&e);
    }
    if crate::output::write_failed() {
        Err(ExitCode::from(EXIT_FAILURE))
    } else {
        Err(ExitCode::SUCCESS)
    }
}

/// How long the exit waits for blocking tasks still running, such as a
/// write to a stalled standard output.
const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let log_format = cli.log_format;
    let mut code = match cli.command {
        Command::Run(args) => runtime.block_on(run(args, log_format)),
        Command::Pull(args) => runtime.block_on(pull(args, log_format)),
        Command::Demo(args) => runtime.block_on(demo(args, log_format)),
        Command::Emulate(args) => {
            init_logging(log_format.unwrap_or_default(), "info");
            runtime.block_on(async {
                let stop = shutdown_signal();
                let result = crate::emulator::run_cli(args, wait_stop(stop)).await;
                report(result.map_err(|e| e.to_string()))
            })
        }
        Command::CheckConfig(args) => runtime.block_on(check_config(&args.config.config, args.probe)),
        Command::State(args) => runtime.block_on(state(args, log_format)),
        Command::Health(args) => {
            let timeout = std::time::Duration::from_secs(args.timeout_secs);
            match runtime.block_on(crate::telemetry::server::check_health(&args.url, timeout)) {
                Ok(body) => {
                    out!("{}", body.trim_end_matches('\n'));
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    };
    // Dropping the runtime would wait for every blocking task, and a write
    // to a stalled standard output (a full pipe) never ends. The command's
    // own work is done (the store is flushed), so waiting longer gains nothing.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    // A write error other than a closed pipe was reported when it happened.
    if crate::output::write_failed() && code == ExitCode::SUCCESS {
        code = ExitCode::from(EXIT_FAILURE);
    }
    code
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

pub fn init_logging(format: LogFormat, level: &str) {
    // RUST_LOG wins over the config, unless it would leave out every line
    // of the forwarder by mistake (`RUST_LOG=warning`).
    let mut ignored = None;
    let from_env = std::env::var("RUST_LOG").ok().filter(|filter| !filter.trim().is_empty()).filter(|filter| match crate::config::log_filter_problem(filter) {
        Some(problem) => {
            ignored = Some(problem);
            false
        }
        None => true,
    });
    let filter = from_env
        .and_then(|filter| tracing_subscriber::EnvFilter::try_new(crate::config::normalized_log_filter(&filter)).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(crate::config::normalized_log_filter(level)).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Logged once the format is set, so JSON logs stay JSON; at ERROR, so
    // a log_level of error still shows it.
    if let Some(problem) = ignored {
        tracing::error!("RUST_LOG is ignored: {problem}");
    }
}

/// A channel that turns true on SIGTERM or SIGINT. A second signal exits at once.
fn shutdown_signal() -> watch::Receiver<bool> {
    shutdown_signal_removing(None)
}

/// Returns the channel of [`shutdown_signal`]. A second signal also
/// deletes `scratch`, a directory that a normal stop would delete (the
/// demo's state). With `scratch`, SIGHUP stops too: a closed terminal
/// sends it, and its default action would leave the directory behind.
fn shutdown_signal_removing(scratch: Option<PathBuf>) -> watch::Receiver<bool> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (tx, rx) = watch::channel(false);
    let signals = match scratch {
        Some(_) => signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]),
        None => signal_hook::iterator::Signals::new([SIGTERM, SIGINT]),
    };
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                let mut seen = 0;
                for signal in signals.forever() {
                    seen += 1;
                    if seen > 1 {
                        match &scratch {
                            Some(dir) => {
                                eprintln!("second signal {signal}: exiting now and deleting {}", dir.display());
                                let _ = std::fs::remove_dir_all(dir);
                            }
                            None => eprintln!("second signal {signal}: exiting now; queued detections stay in the outbox"),
                        }
                        std::process::exit(EXIT_FAILURE as i32);
                    }
                    tracing::info!(signal, "shutdown requested");
                    tx.send_replace(true);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot install signal handlers"),
    }
    rx
}

async fn wait_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn run(args: RunArgs, log_format: Option<LogFormat>) -> ExitCode {
    let config = match load_config(&args.config.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logging(log_format.unwrap_or(config.service.log_format), &config.service.log_level);
    warn_inline_secret(&args.config.config);
    if args.once {
        match run_config(&config, Mode::Once, shutdown_signal()).await {
            Ok(RunSummary { new_dead_letters: 0 }) => ExitCode::SUCCESS,
            Ok(RunSummary { new_dead_letters }) => {
                eprintln!(
                    "warning: this run stored {} (see the log for why); list them with `mde-forwarder state -c {} dead-letters`",
                    dead_letters_phrase(new_dead_letters),
                    args.config.config.display()
                );
                ExitCode::from(EXIT_DEAD_LETTERS)
            }
            Err(message) => report(Err(message)),
        }
    } else {
        report(crate::daemon::run(config, args.config.config).await)
    }
}

async fn pull(args: PullArgs, log_format: Option<LogFormat>) -> ExitCode {
    let config = match load_config(&args.config.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logging(log_format.unwrap_or(config.service.log_format), &config.service.log_level);
    warn_inline_secret(&args.config.config);
    let window = match pull_window(&args, chrono::Utc::now()) {
        Ok(window) => window,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    report(pull_to_output(&config, &args, window).await)
}

/// Computes the window of a pull from `--since`/`--until` or `--ago`.
fn pull_window(args: &PullArgs, now: chrono::DateTime<chrono::Utc>) -> Result<crate::pull::PullWindow, String> {
    let parse_time = |flag: &str, text: &str| {
        timefmt::parse(text).ok_or_else(|| format!("invalid {flag} {text:?}: write it like 2026-12-01T00:00:00Z"))
    };
    let (since, until) = match (&args.since, &args.ago) {
        (Some(since), _) => (parse_time("--since", since)?, args.until.as_deref().map(|u| parse_time("--until", u)).transpose()?),
        (None, Some(ago)) => {
            let duration = timefmt::parse_iso_duration(ago)
                .ok_or_else(|| format!("invalid --ago {ago:?}: write an ISO 8601 duration like PT4H or P1D"))?;
            (now - duration, None)
        }
        (None, None) => return Err("set --since or --ago".into()),
    };
    if until.is_some_and(|until| until < since) {
        return Err("--until is before --since".into());
    }
    // `untilTimeUtc` has whole ticks, and a bound rounded down would leave
    // out a detection stamped between the tick and `--until`.
    let until = until.map(timefmt::ceil_tick);
    Ok(crate::pull::PullWindow { since, until, limit: 0 })
}

async fn pull_to_output(config: &Config, args: &PullArgs, mut window: crate::pull::PullWindow) -> Result<(), String> {
    let tenant = config
        .resolve_tenants()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|t| t.name == args.tenant)
        .ok_or_else(|| format!("no tenant named {:?} in the config", args.tenant))?;
    window.limit = tenant.limit.unwrap_or(config.poll.limit);
    let http = pipeline::http_client(config).map_err(|e| e.to_string())?;
    let name = tenant.name.clone();
    let max_bytes = config.poll.max_response_bytes;
    let result = match &args.output {
        Some(path) => {
            let mut output = crate::pull::OutputFile::create(path)
                .await
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let unchanged = format!("; {}", output.state_on_failure());
            // A signal stops the pull like a failure, so the partial file goes.
            let stop = shutdown_signal();
            let pulled = tokio::select! {
                pulled = crate::pull::pull(http, tenant, max_bytes, &window, output.writer()) => Some(pulled),
                () = wait_stop(stop) => None,
            };
            let Some(pulled) = pulled else {
                output.discard().await;
                return Err(format!("pull stopped by a signal{unchanged}"));
            };
            match pulled {
                Ok(pulled) => {
                    output.commit().await.map_err(|e| format!("cannot write {}: {e}{unchanged}", path.display()))?;
                    Ok(pulled)
                }
                Err(crate::pull::PullError::Write(e)) => {
                    output.discard().await;
                    Err(format!("cannot write {}: {e}{unchanged}", path.display()))
                }
                Err(e) => {
                    output.discard().await;
                    Err(format!("{e}{unchanged}"))
                }
            }
        }
        None => {
            let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
            match crate::pull::pull(http, tenant, max_bytes, &window, &mut out).await {
                Err(crate::pull::PullError::Write(e)) if crate::output::is_closed_pipe(&e) => {
                    // The reader has all it wants, as under `| head`.
                    tracing::debug!(tenant = %name, "pull stopped: standard output was closed");
                    return Ok(());
                }
                Err(crate::pull::PullError::Write(e)) => Err(format!("cannot write to standard output: {e}")),
                result => result.map_err(|e| e.to_string()),
            }
        }
    };
    let pulled = result?;
    tracing::info!(
        tenant = %name,
        since = %timefmt::format_query(window.since),
        until = %window.until.map(timefmt::format_query).unwrap_or_else(|| "now".into()),
        written = pulled.written,
        repeated = pulled.repeated,
        invalid = pulled.invalid,
        pages = pulled.pages,
        "pull complete"
    );
    if pulled.invalid > 0 {
        tracing::warn!(
            tenant = %name,
            invalid = pulled.invalid,
            "response elements that are not detections were written as [\"utf-8\", TEXT] or [\"base64\", BYTES] lines that contain their exact bytes; see docs/cli.md"
        );
    }
    Ok(())
}

/// Opens the store and runs the pipeline; shared by `run` and `demo`.
/// The outcome of a run that ended without an error.
pub struct RunSummary {
    /// Dead letters stored during the run.
    pub new_dead_letters: usize,
}

pub async fn run_config(config: &Config, mode: Mode, stop: watch::Receiver<bool>) -> Result<RunSummary, String> {
    if let Err(e) = config.resolve_tenants() {
        return Err(e.to_string());
    }
    let store = Store::open_with(&config.state.dir, config.store_options()).map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let letters_before = store.dead_letter_count();
    tracing::info!(
        state = %config.state.dir.display(),
        tenants = config.tenants.len(),
        sinks = config.sinks.len(),
        once = mode == Mode::Once,
        version = env!("CARGO_PKG_VERSION"),
        "mde-forwarder started"
    );
    let result = pipeline::run(config, store.clone(), mode, stop).await.map_err(|e| e.to_string());
    tracing::info!("mde-forwarder stopped");
    // Nothing deletes dead letters during a run, so the difference is
    // what the run added.
    let added = store.dead_letter_count().saturating_sub(letters_before);
    match result {
        Ok(()) => Ok(RunSummary { new_dead_letters: added }),
        Err(message) if added > 0 => Err(format!(
            "{message}; the run also stored {} (list them with `state dead-letters`)",
            dead_letters_phrase(added)
        )),
        Err(message) => Err(message),
    }
}

/// Logs a WARN when the config file contains a secret that others may read.
fn warn_inline_secret(path: &Path) {
    if let Some(warning) = crate::config::inline_secret_warning(path) {
        tracing::warn!(config = %path.display(), "{warning}");
    }
}

async fn check_config(path: &Path, probe: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(warning) = crate::config::inline_secret_warning(path) {
        eprintln!("warning: {warning}");
    }
    if let Err(e) = pipeline::http_client(&config) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let tenants = match config.resolve_tenants() {
        Ok(tenants) => tenants,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for (i, sink) in config.sinks.iter().enumerate() {
        for warning in crate::pipeline::sink_warnings(sink) {
            eprintln!("warning: sink {}: {warning}", sink.name());
        }
        // Reads the TLS, token and header files, which validation alone does not.
        if let Err(e) = crate::pipeline::build_sink(&format!("sink[{i}]"), sink) {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    out!("config {} is valid", path.display());
    out!("state dir: {}", config.state.dir.display());
    for tenant in &tenants {
        let credential = match &tenant.credential {
            crate::config::ClientCredential::Secret(_) => "client secret".to_string(),
            crate::config::ClientCredential::Certificate(c) => format!("certificate x5t {}", c.x5t()),
        };
        out!("tenant {}: alerts {} ; token {} ; {credential}", tenant.name, tenant.alerts_url, tenant.token_url);
    }
    for sink in &config.sinks {
        out!("sink {}: {}", sink.name(), describe_sink(sink));
    }
    if let Some(listen) = config.service.listen {
        out!("health and metrics: http://{listen}/health and http://{listen}/metrics");
    }
    if !probe {
        return ExitCode::SUCCESS;
    }
    let failed = crate::probe::run(&config, tenants).await;
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {failed} probe(s) failed");
        ExitCode::from(EXIT_FAILURE)
    }
}

fn describe_sink(sink: &crate::config::SinkConfig) -> String {
    use crate::config::SinkConfig;
    match sink {
        SinkConfig::Syslog(s) => {
            let framing = match s.protocol {
                crate::config::Protocol::Udp => "one message per datagram".to_string(),
                crate::config::Protocol::Tcp | crate::config::Protocol::Tls => format!("framing {}", config_word(&s.framing(), '-')),
            };
            format!(
                "syslog {} to {} (format {}, header {}, {framing})",
                config_word(&s.protocol, '-'),
                s.address,
                config_word(&s.format, '-'),
                config_word(&s.header, '-'),
            )
        }
        SinkConfig::File(f) => format!("file {} (format {})", f.path.display(), config_word(&f.format, '-')),
        SinkConfig::Stdout(s) => format!("standard output (format {})", config_word(&s.format, '-')),
        SinkConfig::Http(h) => format!(
            "HTTP POST to {} (body_format {}, gzip {}{})",
            crate::redact::url(&h.url),
            config_word(&h.body_format, '_'),
            h.gzip,
            describe_proxy(&h.proxy)
        ),
        SinkConfig::SplunkHec(h) => format!("Splunk HEC at {} (ack {}{})", crate::redact::url(&h.url), h.ack, describe_proxy(&h.proxy)),
    }
}

/// Returns ", proxy URL" for a sink with its own proxy, credentials hidden.
fn describe_proxy(proxy: &crate::config::SinkProxyConfig) -> String {
    match &proxy.proxy_url {
        Some(url) => format!(", proxy {}", crate::redact::url(url.expose())),
        None => String::new(),
    }
}

/// A unit enum value as the config spells it (`OctetCounting` becomes
/// `octet-counting` or `octet_counting`), from its Debug name.
fn config_word(value: &impl std::fmt::Debug, separator: char) -> String {
    let name = format!("{value:?}");
    let mut word = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            word.push(separator);
        }
        word.push(c.to_ascii_lowercase());
    }
    word
}

async fn state(args: StateArgs, log_format: Option<LogFormat>) -> ExitCode {
    let config = match load_config(&args.config.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Warnings only, such as the one-time conversion of an older state directory.
    init_logging(log_format.unwrap_or(config.service.log_format), "warn");
    let store = match Store::open_with(&config.state.dir, config.store_options()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    report(state_action(&config, &store, args.action))
}

fn state_action(config: &Config, store: &Store, action: StateAction) -> Result<(), String> {
    let known_tenant = |name: &str| {
        if config.tenants.iter().any(|t| t.name == name) {
            Ok(())
        } else {
            Err(format!("no tenant named {name:?} in the config"))
        }
    };
    match action {
        StateAction::Show => show_state(config, store).map_err(|e| e.to_string()),
        StateAction::SetCheckpoint { tenant, time, resend } => {
            known_tenant(&tenant)?;
            let parsed = timefmt::parse(&time)
                .ok_or_else(|| format!("invalid time {time:?}: write it like 2026-12-01T00:00:00Z"))?;
            // A checkpoint ahead of the clock would make every poll ask for
            // detections that have not happened yet.
            let now = chrono::Utc::now();
            if parsed > now {
                return Err(format!(
                    "time {time:?} is in the future (now is {}); the poller reads the detections after the checkpoint, so it would forward nothing until then: set a time in the past",
                    timefmt::format_api_time(now)
                ));
            }
            // Forget first: if that fails, the checkpoint has not moved back
            // to a replay that would skip everything still remembered.
            if resend {
                let forgotten = store.forget_seen(&tenant).map_err(|e| e.to_string())?;
                out!("tenant {tenant}: forgot {forgotten} forwarded detections; the replay sends them again");
            }
            store.set_checkpoint(&tenant, Some(parsed)).map_err(|e| e.to_string())?;
            out!("tenant {tenant}: checkpoint set to {}", timefmt::format_api_time(parsed));
            Ok(())
        }
        StateAction::ResetCheckpoint { tenant } => {
            // The checkpoint of a tenant no longer in the config may be
            // deleted too, once it is not needed for a renamed tenant.
            let stored = store.checkpoint(&tenant).map_err(|e| e.to_string())?.is_some();
            if !stored {
                known_tenant(&tenant)?;
            }
            store.set_checkpoint(&tenant, None).map_err(|e| e.to_string())?;
            out!("tenant {tenant}: checkpoint deleted; the next poll looks back initial_lookback_secs");
            Ok(())
        }
        StateAction::DeadLetters { ids, raw } => {
            let letters = store.dead_letters().map_err(|e| e.to_string())?;
            check_letter_ids(&ids, &letters)?;
            let selected: Vec<&DeadLetter> = letters.iter().filter(|l| ids.is_empty() || ids.contains(&l.id)).collect();
            if raw {
                return write_raw_letter(&selected);
            }
            if selected.is_empty() {
                // Standard error, so a script reading the rows gets none.
                eprintln!("no dead letters");
                return Ok(());
            }
            list_dead_letters(&selected);
            Ok(())
        }
        StateAction::Requeue { ids } => {
            // A letter for a sink that is no longer configured would be
            // released unsent: refuse instead of losing it.
            let letters = store.dead_letters().map_err(|e| e.to_string())?;
            check_letter_ids(&ids, &letters)?;
            let orphans: Vec<String> = letters
                .iter()
                .filter(|l| ids.is_empty() || ids.contains(&l.id))
                .filter(|l| ![crate::store::SOURCE_SINK, crate::store::SPOOL_SINK].contains(&l.sink.as_str()))
                .filter(|l| !config.sinks.iter().any(|s| s.name() == l.sink))
                .map(|l| format!("{} (sink {})", l.id, l.sink))
                .collect();
            if !orphans.is_empty() {
                return Err(format!(
                    "dead letters {} belong to sinks that are not configured; add the sink back, or purge them",
                    orphans.join(", ")
                ));
            }
            let count = store.requeue_dead_letters(&ids).map_err(|e| e.to_string())?;
            out!("{} queued again", dead_letters_phrase(count));
            Ok(())
        }
        StateAction::Purge { ids } => {
            check_letter_ids(&ids, &store.dead_letters().map_err(|e| e.to_string())?)?;
            let count = store.purge_dead_letters(&ids).map_err(|e| e.to_string())?;
            out!("{} deleted", dead_letters_phrase(count));
            Ok(())
        }
        StateAction::DropSink { sink } => {
            if config.sinks.iter().any(|s| s.name() == sink) {
                return Err(format!(
                    "sink {sink:?} is in the config, and its detections are delivered when it runs; remove it from the config first to drop them"
                ));
            }
            let dropped = store.drop_sink(&sink).map_err(|e| e.to_string())?;
            // Then sets the cursors as a run would: a configured sink without
            // one starts at the end, so what only the dropped sink held is
            // released now.
            let names: Vec<&str> = config.sinks.iter().map(|s| s.name()).collect();
            store.sync_cursors(&names).map_err(|e| e.to_string())?;
            out!("sink {sink}: dropped; {dropped} detections were pending for it");
            Ok(())
        }
    }
}

/// Prints one row per letter. The `text` column is `not-utf-8` for a
/// detection whose bytes are not UTF-8: `detection` then shows a copy with
/// U+FFFD in place of the invalid bytes, and only `--raw` gives them.
fn list_dead_letters(letters: &[&DeadLetter]) {
    out!("id\ttime\tsink\ttenant\tFullId\treason\ttext");
    for letter in letters {
        let text = if letter.is_utf8() { "utf-8" } else { "not-utf-8" };
        out!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{text}",
            letter.id,
            letter.time,
            table_cell(&letter.sink),
            table_cell(&letter.tenant),
            full_id_cell(letter),
            table_cell(&letter.reason)
        );
    }
}

/// The marker of a FullId that is not a decodable JSON string.
const JSON_MARKER: &str = "json:";

/// Returns a letter's FullId for the listing, `-` when it has none.
///
/// A string FullId is shown as it is. Any other FullId (a number, an
/// object, a string with an invalid escape) is shown as its JSON text
/// after [`JSON_MARKER`], so `42` and `"42"` differ as they do in the
/// dedupe set. A string that itself starts with the marker, or is `-`,
/// gets a leading backslash, which [`table_cell`] never leaves single. An
/// empty string counts as no FullId, as in the dedupe set. For a letter that
/// is not UTF-8, a FullId that contains U+FFFD may not be the one received,
/// so it is shown as `-`.
fn full_id_cell(letter: &DeadLetter) -> String {
    let Ok(detection) = Detection::from_json_text(&letter.detection) else {
        return "-".to_string();
    };
    let Some(full_id) = detection.full_id() else {
        return "-".to_string();
    };
    if !letter.is_utf8() && full_id.contains('\u{fffd}') {
        return "-".to_string();
    }
    // Detection::dedupe_id starts every key but a string FullId's with
    // 0xFF, a byte that never occurs in UTF-8.
    if detection.dedupe_id().first() == Some(&0xff) {
        return format!("{JSON_MARKER}{}", table_cell(&full_id));
    }
    let cell = table_cell(&full_id);
    if cell.starts_with(JSON_MARKER) || cell == "-" {
        return format!("\\{cell}");
    }
    cell
}

/// Writes the detection of the one letter in `letters` to standard output,
/// byte for byte.
fn write_raw_letter(letters: &[&DeadLetter]) -> Result<(), String> {
    use std::io::Write as _;
    let [letter] = letters else {
        return Err(format!("--raw writes one letter, but {} are selected; give one --id", letters.len()));
    };
    let bytes = letter.detection_bytes().map_err(|e| format!("dead letter {}: detection_base64 is not valid base64: {e}", letter.id))?;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
        // Sets the exit code, unless the reader only closed the pipe.
        crate::output::record_error(&e);
    }
    Ok(())
}

/// Rejects ids that name no dead letter, before anything changes, so a
/// mistyped id is not taken for "nothing to do".
fn check_letter_ids(ids: &[u64], letters: &[DeadLetter]) -> Result<(), String> {
    let missing: Vec<String> = ids.iter().filter(|id| !letters.iter().any(|l| l.id == **id)).map(u64::to_string).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!("no dead letter with id {}; list the ids with `state dead-letters`", missing.join(", ")))
}

fn dead_letters_phrase(count: usize) -> String {
    if count == 1 {
        "1 dead letter".to_string()
    } else {
        format!("{count} dead letters")
    }
}

/// Escapes a table cell; see [`crate::output::printable`].
fn table_cell(text: &str) -> String {
    crate::output::printable(text)
}

fn show_state(config: &Config, store: &Store) -> Result<(), crate::store::StoreError> {
    out!("state: {}", store.path().display());
    out!("checkpoints:");
    let checkpoints = store.checkpoints()?;
    for tenant in &config.tenants {
        let stored = checkpoints.iter().find(|(name, _)| *name == tenant.name).map(|(_, text)| text.as_str());
        let value = match stored {
            None => "none (first poll looks back initial_lookback_secs)".to_string(),
            Some(text) => match timefmt::parse(text) {
                Some(time) => timefmt::format_api_time(time),
                None => format!("{} (not a valid time; set it again with set-checkpoint)", table_cell(text)),
            },
        };
        out!("  {}: {value}", tenant.name);
    }
    for (name, text) in &checkpoints {
        if config.tenants.iter().all(|t| t.name != *name) {
            let value = timefmt::parse(text).map_or_else(|| table_cell(text), timefmt::format_api_time);
            out!("  {} (not in the config): {value}; if a tenant was renamed, set-checkpoint its new name to this time, else delete it with reset-checkpoint", table_cell(name));
        }
    }
    out!("outbox: {} bytes", store.outbox_bytes());
    for sink in &config.sinks {
        if store.cursor(sink.name())?.is_none() {
            out!("  sink {}: new; its first run starts it at the end of the outbox", sink.name());
            continue;
        }
        out!("  sink {}: {}", sink.name(), pending_text(store, sink.name())?);
    }
    for (name, _) in store.cursors()? {
        if config.sinks.iter().any(|s| s.name() == name) {
            continue;
        }
        let name_cell = table_cell(&name);
        if store.pending(&name)?.0 == 0 {
            out!("  sink {name_cell} (not in the config): 0 pending; the next run forgets it");
        } else {
            out!(
                "  sink {name_cell} (not in the config): {}; kept until a sink of this name is configured again, or `state drop-sink --sink NAME` drops them",
                pending_text(store, &name)?
            );
        }
    }
    out!("dedupe entries: {}", store.dedupe_len());
    out!("dead letters: {}", store.dead_letters()?.len());
    Ok(())
}

/// Returns "N pending" for `sink` and where its oldest detection is.
fn pending_text(store: &Store, sink: &str) -> Result<String, crate::store::StoreError> {
    let (pending, oldest) = store.pending(sink)?;
    let oldest = oldest
        .map(|position| {
            let (batch, item) = crate::store::split_position(position);
            format!(", the oldest is item {item} of outbox batch {batch}")
        })
        .unwrap_or_default();
    Ok(format!("{pending} pending{oldest}"))
}

async fn demo(args: DemoArgs, log_format: Option<LogFormat>) -> ExitCode {
    init_logging(log_format.unwrap_or_default(), "info");
    let state_dir = match crate::demo::create_state_dir() {
        Ok(dir) => dir,
        Err(e) => return report(Err(e)),
    };
    let stop = shutdown_signal_removing(Some(state_dir.clone()));
    report(crate::demo::run(state_dir, args.interval_secs, args.add_every_secs, stop).await)
}

#[cfg(test)]
mod tests {
    use super::{describe_sink, full_id_cell, table_cell, DeadLetter};

    /// Returns `check-config`'s line for a syslog sink with these extra keys.
    fn describe_syslog(keys: &str) -> String {
        let text = format!(
            "[state]\ndir = \"/tmp/mde-forwarder-test-state\"\n\n[[tenant]]\nname = \"t\"\ntenant_id = \"tid\"\nclient_id = \"cid\"\nclient_secret = \"s\"\nregion = \"eu\"\n\n\
             [[sink]]\nname = \"siem\"\ntype = \"syslog\"\naddress = \"127.0.0.1:514\"\n{keys}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let config = crate::config::Config::load_with_env(&path, &[]).unwrap();
        describe_sink(&config.sinks[0])
    }

    #[test]
    fn udp_sink_description_has_no_framing() {
        let udp = describe_syslog("protocol = \"udp\"");
        assert!(!udp.contains("framing"), "a datagram carries no framing: {udp}");
        assert!(udp.contains("one message per datagram"), "{udp}");
        let tcp = describe_syslog("protocol = \"tcp\"");
        assert!(tcp.contains("framing newline"), "{tcp}");
    }

    fn letter(detection: &str) -> DeadLetter {
        DeadLetter {
            id: 1,
            sink: "s".into(),
            tenant: "t".into(),
            reason: "r".into(),
            time: "2026-01-01T00:00:00Z".into(),
            detection: detection.into(),
            detection_base64: None,
        }
    }

    #[test]
    fn full_id_cells_tell_numbers_from_strings() {
        let cases = [
            (r#"{"FullId":"42"}"#, "42"),
            (r#"{"FullId":42}"#, "json:42"),
            (r#"{"FullId":"json:42"}"#, "\\json:42"),
            (r#"{"FullId":"\\json:42"}"#, "\\\\json:42"),
            (r#"{"FullId":true}"#, "json:true"),
            (r#"{"FullId":{"a":1}}"#, r#"json:{"a":1}"#),
            (r#"{"FullId":"\ud800"}"#, r#"json:"\\ud800""#),
            (r#"{"FullId":"a\tb"}"#, "a\\tb"),
            (r#"{"Title":"no id"}"#, "-"),
            (r#"{"FullId":"-"}"#, "\\-"),
            (r#"{"FullId":"\\-"}"#, "\\\\-"),
            (r#"{"FullId":""}"#, "-"),
            ("[1]", "-"),
        ];
        for (detection, expected) in cases {
            assert_eq!(full_id_cell(&letter(detection)), expected, "{detection}");
        }
    }

    #[test]
    fn replaced_bytes_hide_full_id() {
        let mut lossy = letter("{\"FullId\":\"a\u{fffd}\"}");
        lossy.detection_base64 = Some("eyJGdWxsSWQiOiJh/yJ9".into());
        assert_eq!(full_id_cell(&lossy), "-");
        lossy.detection = "{\"FullId\":\"intact\",\"T\":\"\u{fffd}\"}".into();
        assert_eq!(full_id_cell(&lossy), "intact");
    }

    #[test]
    fn table_cells_stay_on_one_line() {
        assert_eq!(table_cell("a\tb\nc\u{1b}d 名"), "a\\tb\\nc\\u{1b}d 名");
        assert_eq!(table_cell("plain"), "plain");
        // A literal backslash-t differs from an escaped tab.
        assert_eq!(table_cell("a\\tb"), "a\\\\tb");
        assert_eq!(table_cell("id\u{202e}fdp.exe\u{2028}x"), "id\\u{202e}fdp.exe\\u{2028}x");
    }
}
