//! Typed configuration: a TOML file plus `MDE_FORWARDER__*` environment
//! overrides, deserialized with unknown keys rejected, then validated without
//! any I/O beyond reading secret files.
//!
//! Environment overrides address keys by path with `__` between parts, for
//! example `MDE_FORWARDER__POLL__INTERVAL_SECS=30`. Entries of `[[tenant]]` and
//! `[[sink]]` are addressed by index or by name:
//! `MDE_FORWARDER__TENANT__CONTOSO__CLIENT_SECRET=...` sets the secret of the
//! tenant named `contoso` (names match case-insensitively, `_` matching `-`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::ClientCertificate;
use crate::format::{Facility, Framing, HeaderFormat, PayloadFormat};

pub const ENV_PREFIX: &str = "MDE_FORWARDER__";

/// An invalid or unreadable configuration, with the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: config::ConfigError },
    #[error("invalid TOML in config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid config: {}", tidy_path(&.0.to_string()))]
    Parse(config::ConfigError),
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Rejects a `client_secret`, HEC `token` or header value written without
/// quotes. The `config` crate turns a number into text by its value, so
/// `1e3` would be sent as `1000`.
fn check_quoted_secrets(table: &toml::Table) -> Result<(), ConfigError> {
    let tenants = table.get("tenant").and_then(toml::Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (i, tenant) in tenants.iter().enumerate() {
        if tenant.get("client_secret").is_some_and(|secret| !secret.is_str()) {
            return Err(invalid(
                format!("tenant[{i}].client_secret"),
                "is not in quotes: write it as a string, such as client_secret = \"...\", since a number may be read as another value",
            ));
        }
    }
    // A HEC token or a header value is a secret too; the type error for a
    // number would not say that quotes are the fix.
    let sinks = table.get("sink").and_then(toml::Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (i, sink) in sinks.iter().enumerate() {
        // Only a bare scalar: an array or table gets the usual type error.
        let unquoted = |value: &toml::Value| matches!(value, toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) | toml::Value::Datetime(_));
        if sink.get("token").is_some_and(unquoted) {
            return Err(invalid(format!("sink[{i}].token"), "is not in quotes: write it as a string, such as token = \"...\""));
        }
        let headers = sink.get("headers").and_then(toml::Value::as_table);
        if let Some((name, _)) = headers.and_then(|headers| headers.iter().find(|(_, value)| unquoted(value))) {
            return Err(invalid(
                format!("sink[{i}].headers.{name}"),
                "is not in quotes: write the header's value as a string, such as { \"X-Name\" = \"...\" }",
            ));
        }
    }
    Ok(())
}

/// Rejects a number with a fraction (`interval_secs = 1.5`). Every number
/// in the config is whole, and the `config` crate rounds a fraction in
/// some sections without a word.
fn check_whole_numbers(table: &toml::Table) -> Result<(), ConfigError> {
    let mut found = None;
    for (key, value) in table {
        find_fraction(key.clone(), value, &mut found);
    }
    match found {
        Some((key, _)) if type_errors::may_hold_secret(&key) => {
            Err(invalid(key, "is a number with a fraction; write it as a string in quotes if it is a secret or a name"))
        }
        Some((key, value)) => Err(invalid(key, format!("is {value}, a number with a fraction; write a whole number"))),
        None => Ok(()),
    }
}

/// Sets `found` to the first float under `value` at `key`, with its text.
fn find_fraction(key: String, value: &toml::Value, found: &mut Option<(String, String)>) {
    if found.is_some() {
        return;
    }
    match value {
        toml::Value::Float(number) => *found = Some((key, number.to_string())),
        toml::Value::Table(table) => {
            for (name, inner) in table {
                find_fraction(format!("{key}.{name}"), inner, found);
            }
        }
        toml::Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                find_fraction(format!("{key}[{i}]"), inner, found);
            }
        }
        _ => {}
    }
}

/// Returns one spelling of the file `path` names, so two spellings of one
/// file compare equal. The file system resolves the longest part of the
/// path that exists (symbolic links, `.` and `..`, the file itself when it
/// exists). The rest is appended with `.` and `..` resolved as text.
fn file_identity(path: &Path) -> PathBuf {
    let absolute = match std::env::current_dir() {
        Ok(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    };
    let components: Vec<_> = absolute.components().collect();
    for existing in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..existing].iter().collect();
        let Ok(mut identity) = std::fs::canonicalize(&prefix) else { continue };
        for component in &components[existing..] {
            match component {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    identity.pop();
                }
                other => identity.push(other),
            }
        }
        return identity;
    }
    absolute
}

/// Returns the device and inode of an existing file, which two hard links
/// to it share.
fn file_inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|metadata| (metadata.dev(), metadata.ino()))
}

/// Returns the TOML syntax error of the file at `path` with its line and
/// column, which the `config` crate's error leaves out, or `None` when the
/// file cannot be read or parses. The line's text is left out, because it
/// may contain a secret.
fn toml_syntax_error(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let error = toml::from_str::<toml::Table>(&text).err()?;
    // A number too large for TOML is quoted in the message, and may be a
    // secret written without quotes.
    let message = type_errors::without_number_value(error.message().trim_end());
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Some(format!("{message} at line {line}, column {column}"))
        }
        None => Some(message.to_string()),
    }
}

/// The top-level modules of the crate, which a log filter may name. A test
/// compares the list with `src/lib.rs`.
const FORWARDER_MODULES: [&str; 22] = [
    "auth", "cli", "config", "daemon", "demo", "detection", "emulator", "format", "json_stream", "output", "pipeline", "probe",
    "pull", "redact", "retry", "seen", "sink", "source", "spool", "store", "telemetry", "timefmt",
];

/// Rejects a `log_level` that would turn logging off by mistake.
fn check_log_level(filter: &str) -> Result<(), ConfigError> {
    match log_filter_problem(filter) {
        Some(problem) => Err(invalid("service.log_level", problem)),
        None => Ok(()),
    }
}

/// Returns why a tracing filter (`log_level` or `RUST_LOG`) would leave out
/// the forwarder's own log lines by mistake, or `None` when it logs them.
/// A filter reads a bare word that is not a level, such as `warning`, as a
/// module name, and the module is `mde_forwarder`, not `mde-forwarder`.
pub fn log_filter_problem(filter: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let fix = "use error, warn, info, debug or trace, or a tracing filter such as \"info,mde_forwarder=debug\"";
    // Level names, the numbers 0 to 5 that tracing also reads, and an
    // empty level, which tracing reads as trace.
    let is_level = |word: &str| word.is_empty() || LEVELS.iter().any(|known| known.eq_ignore_ascii_case(word)) || matches!(word, "0" | "1" | "2" | "3" | "4" | "5");

    let filter = normalized_log_filter(filter);
    if filter.is_empty() {
        return Some(format!("the filter is empty, so it would log nothing; {fix}"));
    }
    let mut logs_forwarder = false;
    for directive in filter.split(',') {
        // A span filter such as `[{tenant=a}]` may contain `=` itself.
        let after_spans = directive.rfind(']').map_or(0, |end| end + 1);
        let (target, level) = match directive[after_spans..].rfind('=') {
            Some(at) => (&directive[..after_spans + at], &directive[after_spans + at + 1..]),
            None if is_level(directive) => ("", directive),
            None => (directive, "trace"),
        };
        if !is_level(level) {
            return Some(format!("{level:?} in {filter:?} is not a log level; {fix}"));
        }
        if target.contains('-') {
            return Some(format!("{target:?} in {filter:?} is not a module name (module names use _, as in mde_forwarder); {fix}"));
        }
        if let Some(module) = target.strip_prefix("mde_forwarder::") {
            let top = module.split("::").next().unwrap_or(module);
            if !FORWARDER_MODULES.contains(&top) {
                return Some(format!(
                    "{target:?} in {filter:?} names no module of the forwarder, so it would select nothing; its modules are mde_forwarder::{}",
                    FORWARDER_MODULES.join(", mde_forwarder::")
                ));
            }
        }
        // The forwarder opens no spans, so only a plain level or its own
        // module path selects its lines.
        let forwarder = target.is_empty() || target == "mde_forwarder" || target.starts_with("mde_forwarder::");
        // Turning every line off on purpose is allowed.
        logs_forwarder |= forwarder || directive.eq_ignore_ascii_case("off");
    }

    if !logs_forwarder {
        return Some(format!("{filter:?} sets no level for the forwarder's own lines, so it would log nothing; {fix}"));
    }
    if tracing_subscriber::EnvFilter::try_new(&filter).is_err() {
        return Some(format!("{filter:?} is not a valid tracing filter; {fix}"));
    }
    None
}

/// Returns `filter` without blanks around its directives: tracing reads
/// `"info "` as a module named `info ` and then logs nothing.
pub fn normalized_log_filter(filter: &str) -> String {
    filter.split(',').map(str::trim).filter(|directive| !directive.is_empty()).collect::<Vec<_>>().join(",")
}

/// Rejects a number outside `min..=max`; durations far beyond any sensible
/// setting would overflow timers instead of failing clearly.
fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(key, format!("{value} is out of range: use a value from {min} to {max}")))
    }
}

/// Puts the dot the `config` crate leaves out after an index in key paths
/// (`tenant[0]region` becomes `tenant[0].region`).
fn tidy_path(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 4);
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| n.is_ascii_alphanumeric() || *n == '_') {
            out.push('.');
        }
    }
    out
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// A secret value whose Debug and Display never show the text.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub state: StateConfig,
    #[serde(default)]
    pub poll: PollConfig,
    #[serde(default)]
    pub service: ServiceConfig,
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(rename = "sink", default)]
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    pub dir: PathBuf,
    /// Upper bound on the outbox size; polling pauses when it is reached.
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    #[serde(default)]
    pub on_outbox_full: OutboxFullPolicy,
    /// How long a FullId is remembered for deduplication.
    #[serde(default = "default_dedupe_retention_secs")]
    pub dedupe_retention_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxFullPolicy {
    /// Stop polling until the slowest sink catches up. Nothing is dropped.
    #[default]
    Pause,
    /// Delete the oldest undelivered detections to make room (data loss).
    DropOldest,
}

fn default_max_outbox_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_dedupe_retention_secs() -> u64 {
    7 * 24 * 3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    pub interval_secs: u64,
    pub initial_lookback_secs: u64,
    pub overlap_secs: u64,
    /// 0 sends no `limit` parameter.
    pub limit: u32,
    /// Attempts per poll cycle for retryable errors (429, 5xx, network, malformed body).
    pub retry_max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_secs: u64,
    pub connect_timeout_secs: u64,
    /// Maximum wait for the next bytes of a response.
    pub request_timeout_secs: u64,
    /// A response body larger than this is cut off and reported. Counts
    /// decoded bytes, so a small gzip body cannot expand past it.
    pub max_response_bytes: u64,
    /// HTTP proxy for every request to Azure AD and the API, such as
    /// `http://proxy.example:3128` (user and password may be in the URL).
    /// Unset: the `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`
    /// environment variables apply.
    pub proxy_url: Option<Secret>,
    /// Hosts that bypass `proxy_url`, comma-separated, in `NO_PROXY` syntax.
    pub no_proxy: Option<String>,
    /// PEM file of CA certificates trusted in addition to the built-in roots,
    /// for a TLS-inspecting proxy.
    pub ca_file: Option<PathBuf>,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            interval_secs: 60,
            initial_lookback_secs: 7200,
            overlap_secs: 300,
            limit: 0,
            retry_max_attempts: 5,
            retry_initial_ms: 1000,
            retry_max_secs: 60,
            connect_timeout_secs: 10,
            request_timeout_secs: 120,
            max_response_bytes: 4 * 1024 * 1024 * 1024,
            proxy_url: None,
            no_proxy: None,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// How long sinks may keep flushing after SIGTERM or SIGINT.
    pub shutdown_grace_secs: u64,
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `mde_forwarder=debug`; `RUST_LOG` wins.
    pub log_level: String,
    /// Address of the `/health` and `/metrics` listener, such as
    /// `127.0.0.1:9898`; no listener when unset.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self { shutdown_grace_secs: 10, log_format: LogFormat::Text, log_level: "info".into(), listen: None }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Region {
    Eu,
    Us,
    Uk,
    Gcc,
    GccHigh,
    Dod,
}

impl TryFrom<String> for Region {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.trim().to_ascii_lowercase().as_str() {
            "eu" => Ok(Region::Eu),
            "us" => Ok(Region::Us),
            "uk" => Ok(Region::Uk),
            "gcc" => Ok(Region::Gcc),
            "gcc-high" => Ok(Region::GccHigh),
            "dod" => Ok(Region::Dod),
            _ => Err(format!("invalid region {text:?}: use eu, us, uk, gcc, gcc-high or dod, or set api_url and login_url")),
        }
    }
}

impl Region {
    /// Returns the API and login base URLs for this region.
    pub fn endpoints(self) -> (&'static str, &'static str) {
        const LOGIN: &str = "https://login.microsoftonline.com";
        const LOGIN_US_GOV: &str = "https://login.microsoftonline.us";
        match self {
            Region::Eu => ("https://wdatp-alertexporter-eu.windows.com", LOGIN),
            Region::Us => ("https://wdatp-alertexporter-us.windows.com", LOGIN),
            Region::Uk => ("https://wdatp-alertexporter-uk.windows.com", LOGIN),
            Region::Gcc => ("https://wdatp-alertexporter-us.gcc.securitycenter.windows.us", LOGIN),
            Region::GccHigh | Region::Dod => {
                ("https://wdatp-alertexporter-us.securitycenter.windows.us", LOGIN_US_GOV)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenEndpoint {
    /// `/oauth2/token` with `resource`.
    #[default]
    V1,
    /// `/oauth2/v2.0/token` with `scope = {resource}/.default`.
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// A file whose content is the secret; one trailing line break is ignored.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The name of an environment variable that contains the secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// The name of a systemd credential (`LoadCredential=`), read from
    /// `$CREDENTIALS_DIRECTORY/{name}`.
    #[serde(default)]
    pub client_secret_credential: Option<String>,
    /// PEM certificate registered with the app, for certificate credentials.
    #[serde(default)]
    pub client_certificate_file: Option<PathBuf>,
    /// PEM PKCS#8 RSA private key of `client_certificate_file`.
    #[serde(default)]
    pub client_certificate_key_file: Option<PathBuf>,
    #[serde(default)]
    pub region: Option<Region>,
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub login_url: Option<String>,
    #[serde(default = "default_resource")]
    pub resource: String,
    #[serde(default)]
    pub token_endpoint: TokenEndpoint,
    /// Refresh the token this long before it expires.
    #[serde(default = "default_token_refresh_margin_secs")]
    pub token_refresh_margin_secs: u64,
    /// `machinegroups` query parameters: only these device groups.
    #[serde(default)]
    pub machine_groups: Vec<String>,
    #[serde(default)]
    pub device_created_machine_tags: Option<String>,
    #[serde(default)]
    pub cloud_created_machine_tags: Option<String>,
    /// `limit` for this tenant; overrides `[poll] limit`.
    #[serde(default)]
    pub limit: Option<u32>,
}

fn default_resource() -> String {
    "https://graph.windows.net".into()
}
fn default_token_refresh_margin_secs() -> u64 {
    300
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Tls,
}

/// When a syslog TCP or TLS batch counts as delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confirm {
    /// Once the receiver closed its side of the connection after the sink
    /// closed its own, which it does only after reading everything.
    #[default]
    Close,
    /// Once the receiver's TCP stack acknowledged every byte, for a
    /// receiver that keeps connections open after the sender closed its
    /// side. A receiver that stops with data unread loses that data.
    TcpAck,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Syslog(SyslogSinkConfig),
    File(FileSinkConfig),
    Stdout(StdoutSinkConfig),
    Http(HttpSinkConfig),
    SplunkHec(SplunkHecSinkConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSinkConfig {
    pub name: String,
    /// `host:port`.
    pub address: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "default_syslog_format")]
    pub format: PayloadFormat,
    #[serde(default = "default_header")]
    pub header: HeaderFormat,
    /// TCP and TLS only, `newline` when not set (see [`Self::framing`]).
    /// UDP sends one message per datagram, so `octet-counting` is rejected
    /// there and the other values are ignored.
    #[serde(default)]
    pub framing: Option<Framing>,
    #[serde(default = "default_facility")]
    pub facility: Facility,
    /// HOSTNAME in the syslog header; the machine's host name by default.
    #[serde(default)]
    pub hostname: Option<String>,
    /// UDP only: the largest datagram, header included. TCP and TLS ignore
    /// it, with a warning at start for a value other than the default.
    #[serde(default = "default_max_datagram_bytes")]
    pub max_datagram_bytes: usize,
    /// TCP and TLS only: when a batch counts as delivered (see [`Confirm`]).
    #[serde(default)]
    pub confirm: Option<Confirm>,
    #[serde(flatten)]
    pub tls: TlsConfig,
    /// Name checked against the receiver's certificate; the host part of
    /// `address` by default.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// PEM certificate chain presented to the receiver (mutual TLS).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    #[serde(flatten)]
    pub common: SinkCommon,
}

/// Server certificate checks shared by the TLS syslog, HTTP and HEC sinks.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TlsConfig {
    /// PEM bundle of the CAs trusted for the receiver's certificate. HTTP and
    /// HEC sinks use the Mozilla root set without it. Syslog TLS requires it
    /// unless `tls_insecure_skip_verify` is set.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Accept any server certificate. For tests only: it allows interception.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
}

/// The proxy of an HTTP or Splunk HEC sink. Without `proxy_url`, reqwest
/// reads `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` from the
/// environment, as for the API. `[poll] proxy_url` does not apply to sinks.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SinkProxyConfig {
    /// Proxy for this sink's requests, such as `http://proxy.example:3128`
    /// (user and password may be in the URL).
    #[serde(default)]
    pub proxy_url: Option<Secret>,
    /// Hosts that bypass `proxy_url`, comma-separated, in `NO_PROXY` syntax.
    #[serde(default)]
    pub no_proxy: Option<String>,
}

impl SinkProxyConfig {
    /// Returns the parts of `proxy_url` that may be credentials.
    pub fn secrets(&self) -> Vec<String> {
        self.proxy_url.as_ref().map(|url| crate::redact::url_secrets(url.expose())).unwrap_or_default()
    }
}

/// The layout of a batch in one HTTP request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// `[detection,detection,...]`.
    #[default]
    JsonArray,
    /// One detection per line, each line ending in `\n`.
    Ndjson,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    pub name: String,
    /// The URL every batch is POSTed to.
    pub url: String,
    #[serde(default)]
    pub body_format: BodyFormat,
    /// Compress request bodies (`Content-Encoding: gzip`).
    #[serde(default)]
    pub gzip: bool,
    /// Extra request headers with literal values.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Extra request headers whose values are read from files at start.
    #[serde(default)]
    pub headers_from_files: BTreeMap<String, PathBuf>,
    /// Extra request headers whose values are read from environment variables at start.
    #[serde(default)]
    pub headers_from_env: BTreeMap<String, String>,
    /// Upper bound on one request body before compression; a single larger
    /// detection is still sent alone.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Maximum wait for a whole request and its response.
    #[serde(default = "default_http_timeout_secs")]
    pub timeout_secs: u64,
    #[serde(flatten)]
    pub tls: TlsConfig,
    #[serde(flatten)]
    pub proxy: SinkProxyConfig,
    #[serde(flatten)]
    pub common: SinkCommon,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplunkHecSinkConfig {
    pub name: String,
    /// Base URL of the HTTP Event Collector, such as `https://splunk:8088`.
    pub url: String,
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Name of an environment variable that contains the token.
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default = "default_hec_source")]
    pub source: String,
    #[serde(default = "default_hec_sourcetype")]
    pub sourcetype: String,
    #[serde(default)]
    pub index: Option<String>,
    /// Wait for indexer acknowledgement before a batch counts as delivered.
    #[serde(default)]
    pub ack: bool,
    /// How long to poll for an acknowledgement before sending the batch again.
    #[serde(default = "default_ack_timeout_secs")]
    pub ack_timeout_secs: u64,
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    #[serde(default = "default_http_timeout_secs")]
    pub timeout_secs: u64,
    #[serde(flatten)]
    pub tls: TlsConfig,
    #[serde(flatten)]
    pub proxy: SinkProxyConfig,
    #[serde(flatten)]
    pub common: SinkCommon,
}

/// The detection severities in increasing order, for `min_severity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeverityLevel {
    #[default]
    Informational,
    Low,
    Medium,
    High,
}

impl SeverityLevel {
    /// Reads the API's `Severity` text; anything unknown counts as medium.
    /// Case and surrounding spaces are ignored, as in the CEF severity mapping.
    pub fn from_api(text: Option<&str>) -> Self {
        match text.map(|text| text.trim().to_ascii_lowercase()).as_deref() {
            Some("informational") => SeverityLevel::Informational,
            Some("low") => SeverityLevel::Low,
            Some("high") => SeverityLevel::High,
            _ => SeverityLevel::Medium,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "default_file_format")]
    pub format: PayloadFormat,
    #[serde(flatten)]
    pub common: SinkCommon,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    pub name: String,
    #[serde(default = "default_syslog_format")]
    pub format: PayloadFormat,
    #[serde(flatten)]
    pub common: SinkCommon,
}

/// Settings every sink has.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkCommon {
    /// Detections per batch; a batch is acknowledged as one unit.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_sink_retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_sink_retry_max_secs")]
    pub retry_max_secs: u64,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_write_timeout_secs")]
    pub write_timeout_secs: u64,
    #[serde(default = "default_cef_vendor")]
    pub cef_vendor: String,
    #[serde(default = "default_cef_product")]
    pub cef_product: String,
    #[serde(default = "default_cef_version")]
    pub cef_version: String,
    /// Detections below this severity are skipped.
    #[serde(default)]
    pub min_severity: SeverityLevel,
    /// Only these categories (case-insensitive); empty means all.
    #[serde(default)]
    pub include_categories: Vec<String>,
    /// Never these categories (case-insensitive).
    #[serde(default)]
    pub exclude_categories: Vec<String>,
    /// Only detections of these `[[tenant]]` names; empty means all.
    #[serde(default)]
    pub tenants: Vec<String>,
}

impl Default for SinkCommon {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            retry_initial_ms: default_sink_retry_initial_ms(),
            retry_max_secs: default_sink_retry_max_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
            write_timeout_secs: default_write_timeout_secs(),
            cef_vendor: default_cef_vendor(),
            cef_product: default_cef_product(),
            cef_version: default_cef_version(),
            min_severity: SeverityLevel::default(),
            include_categories: Vec::new(),
            exclude_categories: Vec::new(),
            tenants: Vec::new(),
        }
    }
}

fn default_syslog_format() -> PayloadFormat {
    PayloadFormat::Cef
}
fn default_file_format() -> PayloadFormat {
    PayloadFormat::Json
}
fn default_header() -> HeaderFormat {
    HeaderFormat::Rfc5424
}
fn default_facility() -> Facility {
    Facility::LOCAL0
}
pub(crate) fn default_max_datagram_bytes() -> usize {
    2048
}
fn default_max_batch_bytes() -> usize {
    1024 * 1024
}
fn default_http_timeout_secs() -> u64 {
    30
}
fn default_ack_timeout_secs() -> u64 {
    60
}
fn default_hec_source() -> String {
    "mde-forwarder".into()
}
fn default_hec_sourcetype() -> String {
    "wdatp:alerts".into()
}
fn default_batch_size() -> usize {
    500
}
fn default_sink_retry_initial_ms() -> u64 {
    500
}
fn default_sink_retry_max_secs() -> u64 {
    60
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_write_timeout_secs() -> u64 {
    30
}
fn default_cef_vendor() -> String {
    "Microsoft".into()
}
fn default_cef_product() -> String {
    "Microsoft Defender ATP".into()
}
fn default_cef_version() -> String {
    "2.0".into()
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Syslog(s) => &s.name,
            SinkConfig::File(s) => &s.name,
            SinkConfig::Stdout(s) => &s.name,
            SinkConfig::Http(s) => &s.name,
            SinkConfig::SplunkHec(s) => &s.name,
        }
    }

    pub fn common(&self) -> &SinkCommon {
        match self {
            SinkConfig::Syslog(s) => &s.common,
            SinkConfig::File(s) => &s.common,
            SinkConfig::Stdout(s) => &s.common,
            SinkConfig::Http(s) => &s.common,
            SinkConfig::SplunkHec(s) => &s.common,
        }
    }
}

impl SinkConfig {
    /// Checks one sink's keys; `key` is its position, such as `sink[2]`.
    fn validate(&self, key: &str, tenants: &[TenantConfig]) -> Result<(), ConfigError> {
        self.common().validate(key, tenants)?;
        match self {
            SinkConfig::Syslog(s) => s.validate(key),
            SinkConfig::Http(h) => h.validate(key),
            SinkConfig::SplunkHec(h) => h.validate(key),
            SinkConfig::File(_) | SinkConfig::Stdout(_) => Ok(()),
        }
    }
}

impl SinkCommon {
    fn validate(&self, key: &str, tenants: &[TenantConfig]) -> Result<(), ConfigError> {
        check_range(&format!("{key}.retry_initial_ms"), self.retry_initial_ms, 1, 600_000)?;
        check_range(&format!("{key}.retry_max_secs"), self.retry_max_secs, 1, 3600)?;
        check_range(&format!("{key}.connect_timeout_secs"), self.connect_timeout_secs, 1, 3600)?;
        check_range(&format!("{key}.write_timeout_secs"), self.write_timeout_secs, 1, 3600)?;
        check_range(&format!("{key}.batch_size"), self.batch_size as u64, 1, 100_000)?;
        if self.batch_size == 0 {
            return Err(invalid(format!("{key}.batch_size"), "must be at least 1"));
        }
        for name in &self.tenants {
            if !tenants.iter().any(|t| &t.name == name) {
                let known: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
                return Err(invalid(
                    format!("{key}.tenants"),
                    format!("no [[tenant]] is named {name:?}; use one of {known:?}"),
                ));
            }
        }
        for (field, list) in [("include_categories", &self.include_categories), ("exclude_categories", &self.exclude_categories)] {
            if list.iter().any(|c| c.trim().is_empty()) {
                return Err(invalid(format!("{key}.{field}"), "contains an empty category name; remove it"));
            }
        }
        Ok(())
    }

    /// Returns whether routing needs the detection's severity or category.
    /// Sinks without such filters never parse the detection's fields for it.
    pub fn filters_fields(&self) -> bool {
        self.min_severity != SeverityLevel::Informational
            || !self.include_categories.is_empty()
            || !self.exclude_categories.is_empty()
    }

    /// True when a detection of `tenant` with this severity and category
    /// goes to the sink.
    pub fn routes(&self, tenant: &str, severity: Option<&str>, category: Option<&str>) -> bool {
        if !self.tenants.is_empty() && !self.tenants.iter().any(|t| t == tenant) {
            return false;
        }
        if SeverityLevel::from_api(severity) < self.min_severity {
            return false;
        }
        let category = category.unwrap_or("");
        let listed = |list: &[String]| list.iter().any(|c| c.trim().eq_ignore_ascii_case(category));
        if !self.include_categories.is_empty() && !listed(&self.include_categories) {
            return false;
        }
        !listed(&self.exclude_categories)
    }
}

/// The minimum number of bytes a UDP datagram must have left after its syslog and
/// format headers: room for a FullId of about 90 characters with its key.
const MIN_ROOM_FOR_FIELDS: usize = 128;

impl SyslogSinkConfig {
    /// Returns the encoder options of this sink.
    pub fn encoder_options(&self) -> crate::format::EncoderOptions {
        let common = &self.common;
        let cef = crate::format::CefOptions {
            vendor: common.cef_vendor.clone(),
            product: common.cef_product.clone(),
            version: common.cef_version.clone(),
        };
        let leef = crate::format::LeefOptions {
            vendor: common.cef_vendor.clone(),
            product: common.cef_product.clone(),
            version: common.cef_version.clone(),
        };
        crate::format::EncoderOptions {
            payload: self.format,
            header: self.header,
            framing: self.framing(),
            facility: self.facility,
            hostname: self.hostname.clone().unwrap_or_else(crate::pipeline::local_hostname),
            app_name: "mde-forwarder".into(),
            cef,
            leef,
            max_message_bytes: (self.protocol == Protocol::Udp).then_some(self.max_datagram_bytes.min(MAX_DATAGRAM_BYTES)),
        }
    }

    /// Rejects a UDP datagram size that the syslog and format headers alone
    /// nearly fill: every message would lose its FullId.
    fn check_room_for_fields(&self, key: &str) -> Result<(), ConfigError> {
        let options = self.encoder_options();
        let Some(max) = options.max_message_bytes else {
            return Ok(());
        };
        let mut fixed = Vec::new();
        let empty = crate::detection::Detection::from_checked_string("{}".to_string());
        crate::format::Encoder::new(crate::format::EncoderOptions { max_message_bytes: None, ..options }).encode(&empty, chrono::Utc::now(), &mut fixed);
        if fixed.len() + MIN_ROOM_FOR_FIELDS <= max {
            return Ok(());
        }
        Err(invalid(
            format!("{key}.max_datagram_bytes"),
            format!(
                "{max} bytes leave less than {MIN_ROOM_FOR_FIELDS} for a detection's fields after the {} bytes of the syslog and format headers, so every message would lose its FullId; raise max_datagram_bytes or shorten cef_vendor, cef_product, cef_version or hostname",
                fixed.len()
            ),
        ))
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.address.parse::<std::net::SocketAddr>().is_err() && !self.address.contains(':') {
            return Err(invalid(
                format!("{key}.address"),
                format!("{:?} is not host:port, for example \"127.0.0.1:514\"", self.address),
            ));
        }
        if self.protocol == Protocol::Udp {
            check_datagram_size(&format!("{key}.max_datagram_bytes"), self.max_datagram_bytes)?;
            self.check_room_for_fields(key)?;
        }
        match (self.protocol, self.framing) {
            (Protocol::Tcp | Protocol::Tls, Some(Framing::None)) => {
                return Err(invalid(
                    format!("{key}.framing"),
                    "\"none\" would run events together on a TCP stream; use \"newline\" or \"octet-counting\"",
                ))
            }
            // "newline" and "none" on UDP are accepted and ignored, as they
            // were before: the example config once had `framing = "newline"`
            // set, and a config switched to UDP must keep loading.
            (Protocol::Udp, Some(Framing::OctetCounting)) => {
                return Err(invalid(
                    format!("{key}.framing"),
                    "framing applies to tcp and tls; UDP sends one datagram per detection, so remove it",
                ))
            }
            _ => {}
        }
        if self.protocol == Protocol::Udp && self.confirm.is_some() {
            return Err(invalid(format!("{key}.confirm"), "confirm applies to tcp and tls; UDP has no acknowledgement, so remove it"));
        }
        if self.protocol != Protocol::Tls {
            let tls_keys = [
                ("tls_ca_file", self.tls.tls_ca_file.is_some()),
                ("tls_cert_file", self.tls_cert_file.is_some()),
                ("tls_key_file", self.tls_key_file.is_some()),
                ("tls_server_name", self.tls_server_name.is_some()),
                ("tls_insecure_skip_verify", self.tls.tls_insecure_skip_verify),
            ];
            if let Some((field, _)) = tls_keys.iter().find(|(_, set)| *set) {
                return Err(invalid(format!("{key}.{field}"), "applies only to protocol = \"tls\"; set the protocol or remove the key"));
            }
            return Ok(());
        }
        if self.tls.tls_ca_file.is_none() && !self.tls.tls_insecure_skip_verify {
            return Err(invalid(
                format!("{key}.tls_ca_file"),
                "missing: set it to the PEM file of the CA that signed the receiver's certificate",
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => Err(invalid(format!("{key}.tls_key_file"), "missing: tls_cert_file needs the key of that certificate")),
            (None, Some(_)) => Err(invalid(format!("{key}.tls_cert_file"), "missing: tls_key_file needs its certificate")),
            _ => match &self.tls_server_name {
                Some(name) if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() => Err(invalid(
                    format!("{key}.tls_server_name"),
                    format!("{name:?} is not a DNS name or IP address"),
                )),
                _ => Ok(()),
            },
        }
    }

    /// Returns the framing of each message. TCP and TLS use the configured
    /// one, `newline` by default. UDP uses none, because each message is
    /// one datagram.
    pub fn framing(&self) -> Framing {
        match self.protocol {
            Protocol::Udp => Framing::None,
            Protocol::Tcp | Protocol::Tls => self.framing.unwrap_or(Framing::Newline),
        }
    }

    /// Returns the name checked against the receiver's certificate.
    pub fn server_name(&self) -> String {
        if let Some(name) = &self.tls_server_name {
            return name.clone();
        }
        let host = match self.address.rsplit_once(':') {
            Some((host, _)) => host,
            None => self.address.as_str(),
        };
        host.trim_start_matches('[').trim_end_matches(']').to_string()
    }
}

impl HttpSinkConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        checked_sink_url(&format!("{key}.url"), &self.url)?;
        check_http_limits(key, self.max_batch_bytes, self.timeout_secs)?;
        if let Some(proxy) = &self.proxy.proxy_url {
            check_proxy_url(&format!("{key}.proxy_url"), proxy)?;
        }
        let mut seen = HashSet::new();
        let names = self
            .headers
            .keys()
            .map(|n| ("headers", n))
            .chain(self.headers_from_files.keys().map(|n| ("headers_from_files", n)))
            .chain(self.headers_from_env.keys().map(|n| ("headers_from_env", n)));
        for (field, name) in names {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(format!("{key}.{field}"), format!("{name:?} is not a valid HTTP header name")));
            }
            if !seen.insert(name.to_ascii_lowercase()) {
                return Err(invalid(format!("{key}.{field}"), format!("header {name:?} is set more than once; keep one")));
            }
        }
        Ok(())
    }
}

impl SplunkHecSinkConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        checked_base_url(&format!("{key}.url"), &self.url)?;
        check_http_limits(key, self.max_batch_bytes, self.timeout_secs)?;
        if let Some(proxy) = &self.proxy.proxy_url {
            check_proxy_url(&format!("{key}.proxy_url"), proxy)?;
        }
        let sources = [self.token.is_some(), self.token_file.is_some(), self.token_env.is_some()];
        match sources.iter().filter(|set| **set).count() {
            0 => return Err(invalid(format!("{key}.token"), "missing: set token, token_file or token_env")),
            1 => {}
            _ => return Err(invalid(format!("{key}.token"), "set only one of token, token_file and token_env")),
        }
        if self.ack {
            check_range(&format!("{key}.ack_timeout_secs"), self.ack_timeout_secs, 1, 3600)?;
        }
        for (field, value) in [("source", &self.source), ("sourcetype", &self.sourcetype)] {
            if value.trim().is_empty() {
                return Err(invalid(format!("{key}.{field}"), "must not be empty; remove the key for the default"));
            }
        }
        if self.index.as_deref().is_some_and(|index| index.trim().is_empty()) {
            return Err(invalid(format!("{key}.index"), "must not be empty; remove the key for the token's default index"));
        }
        Ok(())
    }

    /// Reads the token from where the config points; fails when it is empty.
    pub fn resolve_token(&self, key: &str) -> Result<Secret, ConfigError> {
        let token = match (&self.token, &self.token_file, &self.token_env) {
            (Some(token), _, _) => token.clone(),
            (None, Some(path), _) => read_secret_file(&format!("{key}.token_file"), path)?,
            (None, None, Some(var)) => Secret::new(std::env::var(var).map_err(|_| {
                invalid(format!("{key}.token_env"), format!("environment variable {var} is not set"))
            })?),
            (None, None, None) => return Err(invalid(format!("{key}.token"), "missing")),
        };
        if token.expose().trim().is_empty() {
            let (field, origin) = match (&self.token, &self.token_file, &self.token_env) {
                (Some(_), _, _) => ("token", String::new()),
                (None, Some(path), _) => ("token_file", format!(": the file {} contains no token", path.display())),
                (None, None, Some(var)) => ("token_env", format!(": the environment variable {var} is empty")),
                (None, None, None) => ("token", String::new()),
            };
            return Err(invalid(format!("{key}.{field}"), format!("is empty{origin}")));
        }
        Ok(token)
    }
}

impl HttpSinkConfig {
    /// Collects the request headers, reading values from files and the environment.
    pub fn resolve_headers(&self, key: &str) -> Result<Vec<(String, Secret)>, ConfigError> {
        let mut headers: Vec<(String, Secret)> = self.headers.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        for (name, path) in &self.headers_from_files {
            headers.push((name.clone(), read_secret_file(&format!("{key}.headers_from_files.{name}"), path)?));
        }
        for (name, var) in &self.headers_from_env {
            let value = std::env::var(var).map_err(|_| {
                invalid(format!("{key}.headers_from_env.{name}"), format!("environment variable {var} is not set"))
            })?;
            headers.push((name.clone(), Secret::new(value)));
        }
        Ok(headers)
    }
}

/// The smallest datagram every syslog receiver must accept (RFC 5426).
const MIN_DATAGRAM_BYTES: usize = 480;

/// The largest UDP payload over IPv4: 65535 bytes of IP packet less 20 of
/// IP header and 8 of UDP header. The kernel rejects a longer datagram
/// with `EMSGSIZE`, so a UDP sink never sends more.
pub const MAX_DATAGRAM_BYTES: usize = 65_507;

fn check_datagram_size(key: &str, bytes: usize) -> Result<(), ConfigError> {
    let range = format!("use a value from {MIN_DATAGRAM_BYTES} to {MAX_DATAGRAM_BYTES}");
    if bytes < MIN_DATAGRAM_BYTES {
        let reason = format!("{bytes} is below {MIN_DATAGRAM_BYTES}, the size every syslog receiver must accept (RFC 5426)");
        return Err(invalid(key, format!("{reason}; {range}")));
    }
    // A larger value loads, as it did in earlier releases, and the sink
    // caps it at MAX_DATAGRAM_BYTES when it is built.
    Ok(())
}

fn check_http_limits(key: &str, max_batch_bytes: usize, timeout_secs: u64) -> Result<(), ConfigError> {
    if max_batch_bytes < 1024 {
        return Err(invalid(format!("{key}.max_batch_bytes"), "must be at least 1024"));
    }
    check_range(&format!("{key}.timeout_secs"), timeout_secs, 1, 3600)
}

/// Validates the URL of an HTTP sink, where a query string is allowed.
fn checked_sink_url(key: &str, text: &str) -> Result<(), ConfigError> {
    let redacted = crate::redact::url(text);
    let url = url::Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("{redacted:?} is not a URL ({e}); write it like https://host[:port]/path")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid(key, scheme_message(text, url.scheme())));
    }
    Ok(())
}

/// The credential the app proves its identity to Azure AD with.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    Secret(Secret),
    Certificate(Arc<ClientCertificate>),
}

/// A tenant with its endpoints and credential resolved.
#[derive(Debug, Clone)]
pub struct ResolvedTenant {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub credential: ClientCredential,
    pub alerts_url: String,
    pub token_url: String,
    pub resource: String,
    pub token_endpoint: TokenEndpoint,
    pub token_refresh_margin_secs: u64,
    pub machine_groups: Vec<String>,
    pub device_created_machine_tags: Option<String>,
    pub cloud_created_machine_tags: Option<String>,
    /// The tenant's `limit`, or `None` to use `[poll] limit`.
    pub limit: Option<u32>,
    /// The proxy of requests to `token_url`, redacted, for errors; `None`
    /// for direct requests.
    pub token_proxy: Option<String>,
    /// The proxy of requests to `alerts_url`, redacted, for errors.
    pub alerts_proxy: Option<String>,
}

impl ResolvedTenant {
    /// Returns the secret, for redacting it from messages, or `None` with a certificate.
    pub fn secret(&self) -> Option<&Secret> {
        match &self.credential {
            ClientCredential::Secret(secret) => Some(secret),
            ClientCredential::Certificate(_) => None,
        }
    }
}

impl Config {
    /// Loads a config file and applies the environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let file = config::File::from(path).format(config::FileFormat::Toml).required(true);
        let base = config::Config::builder().add_source(file).build().map_err(|source| match toml_syntax_error(path) {
            Some(message) => ConfigError::Syntax { path: path.to_path_buf(), message },
            None => ConfigError::Read { path: path.to_path_buf(), source },
        })?;
        // The file as TOML, for the checks the `config` crate cannot make.
        if let Some(table) = std::fs::read_to_string(path).ok().and_then(|text| toml::from_str::<toml::Table>(&text).ok()) {
            check_quoted_secrets(&table)?;
            check_whole_numbers(&table)?;
        }
        let mut builder = config::Config::builder().add_source(base.clone());
        let mut overrides = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let key = override_key(&base, rest)?;
            builder = builder.set_override(&key, typed_override(&key, value)).map_err(ConfigError::Parse)?;
            overrides.push((key, name.clone()));
        }
        let merged = builder.build().map_err(ConfigError::Parse)?;
        let config: Config = merged
            .clone()
            .try_deserialize()
            .map_err(|error| type_errors::keyed_error(&merged, error, &overrides))?;
        config.validate().map_err(|error| match error {
            ConfigError::Invalid { key, message } => match overrides.iter().find(|(overridden, _)| type_errors::key_within(&key, overridden)) {
                Some((_, variable)) => ConfigError::Invalid { key, message: format!("{message} (set by the environment variable {variable})") },
                None => ConfigError::Invalid { key, message },
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Checks what deserialization cannot: presence, uniqueness, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tenants.is_empty() {
            return Err(invalid("tenant", "no [[tenant]] is configured; add at least one"));
        }
        if self.sinks.is_empty() {
            return Err(invalid("sink", "no [[sink]] is configured; add at least one"));
        }
        const DAY: u64 = 86_400;
        let poll = &self.poll;
        check_range("poll.interval_secs", poll.interval_secs, 1, DAY)?;
        check_range("poll.initial_lookback_secs", poll.initial_lookback_secs, 0, 180 * DAY)?;
        check_range("poll.overlap_secs", poll.overlap_secs, 0, 7 * DAY)?;
        check_range("poll.retry_initial_ms", poll.retry_initial_ms, 1, 600_000)?;
        check_range("poll.retry_max_secs", poll.retry_max_secs, 1, 3600)?;
        check_range("poll.connect_timeout_secs", poll.connect_timeout_secs, 1, 3600)?;
        check_range("poll.request_timeout_secs", poll.request_timeout_secs, 1, 3600)?;
        check_range("service.shutdown_grace_secs", self.service.shutdown_grace_secs, 0, 3600)?;
        check_log_level(&self.service.log_level)?;
        check_range("state.dedupe_retention_secs", self.state.dedupe_retention_secs, 1, 400 * DAY)?;
        for (i, tenant) in self.tenants.iter().enumerate() {
            check_range(&format!("tenant[{i}].token_refresh_margin_secs"), tenant.token_refresh_margin_secs, 0, 3600)?;
        }
        if self.poll.retry_max_attempts == 0 {
            return Err(invalid("poll.retry_max_attempts", "must be at least 1"));
        }
        if self.state.dir.to_str().is_some_and(|dir| dir.trim().is_empty()) {
            return Err(invalid("state.dir", "is empty: set the directory for the checkpoints and the outbox, such as /var/lib/mde-forwarder"));
        }
        if self.state.max_outbox_bytes == 0 {
            return Err(invalid(
                "state.max_outbox_bytes",
                "0 would leave no room for any detection: use a size in bytes, for example 1073741824 (1 GiB)",
            ));
        }
        let window = self.poll.overlap_secs.max(self.poll.initial_lookback_secs);
        if self.state.dedupe_retention_secs <= window {
            return Err(invalid(
                "state.dedupe_retention_secs",
                format!(
                    "{} is not longer than the query window ({window} s): detections re-read by the overlap would be forwarded twice; raise it",
                    self.state.dedupe_retention_secs
                ),
            ));
        }
        // Two file sinks on one file would cut each other's lines when one
        // of them undoes a failed write.
        let mut files: Vec<(PathBuf, Option<(u64, u64)>, &str)> = Vec::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            if let SinkConfig::File(f) = sink {
                let path = file_identity(&f.path);
                let inode = file_inode(&f.path);
                if let Some((_, _, other)) = files.iter().find(|(seen, seen_inode, _)| *seen == path || (inode.is_some() && *seen_inode == inode)) {
                    return Err(invalid(
                        format!("sink[{i}].path"),
                        format!("{} is also the path of file sink {other:?}; two sinks writing one file can corrupt it, so give each its own file", f.path.display()),
                    ));
                }
                files.push((path, inode, f.name.as_str()));
            }
        }
        let mut names = HashSet::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            let key = format!("tenant[{i}]");
            check_name(&format!("{key}.name"), &tenant.name)?;
            if !names.insert(tenant.name.clone()) {
                return Err(invalid(format!("{key}.name"), format!("duplicate tenant name {:?}", tenant.name)));
            }
            for (field, value) in [("tenant_id", &tenant.tenant_id), ("client_id", &tenant.client_id)] {
                if value.trim().is_empty() {
                    return Err(invalid(format!("{key}.{field}"), "must not be empty"));
                }
            }
            tenant.endpoints(&key)?;
            tenant.credential_source(&key)?;
        }
        if let Some(proxy) = &self.poll.proxy_url {
            check_proxy_url("poll.proxy_url", proxy)?;
        }
        let mut names = HashSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let key = format!("sink[{i}]");
            check_name(&format!("{key}.name"), sink.name())?;
            if !names.insert(sink.name().to_string()) {
                return Err(invalid(format!("{key}.name"), format!("duplicate sink name {:?}", sink.name())));
            }
            sink.validate(&key, &self.tenants)?;
        }
        Ok(())
    }

    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            dedupe_retention_secs: self.state.dedupe_retention_secs,
            ..crate::store::StoreOptions::default()
        }
    }

    /// Resolves every tenant's URLs and reads its credential from a file,
    /// the environment or a systemd credential.
    pub fn resolve_tenants(&self) -> Result<Vec<ResolvedTenant>, ConfigError> {
        self.resolve_tenants_with(&|name| std::env::var_os(name))
    }

    /// [`Config::resolve_tenants`] with `env` in place of the process
    /// environment for credentials. The proxy environment variables are
    /// still read from the process, as the HTTP client reads them.
    pub fn resolve_tenants_with(&self, env: &dyn Fn(&str) -> Option<OsString>) -> Result<Vec<ResolvedTenant>, ConfigError> {
        self.tenants
            .iter()
            .enumerate()
            .map(|(i, t)| t.resolve(&format!("tenant[{i}]"), &self.poll, env))
            .collect()
    }
}

/// The source of a tenant's credential, exactly one per tenant.
enum CredentialSource<'a> {
    Inline(&'a Secret),
    File(&'a Path),
    Env(&'a str),
    SystemdCredential(&'a str),
    Certificate { cert: &'a Path, key: &'a Path },
}

impl TenantConfig {
    /// Checks that exactly one credential source is set and returns it.
    fn credential_source(&self, key: &str) -> Result<CredentialSource<'_>, ConfigError> {
        let mut sources = Vec::new();
        if let Some(secret) = &self.client_secret {
            sources.push(("client_secret", CredentialSource::Inline(secret)));
        }
        if let Some(path) = &self.client_secret_file {
            sources.push(("client_secret_file", CredentialSource::File(path)));
        }
        if let Some(name) = &self.client_secret_env {
            sources.push(("client_secret_env", CredentialSource::Env(name)));
        }
        if let Some(name) = &self.client_secret_credential {
            sources.push(("client_secret_credential", CredentialSource::SystemdCredential(name)));
        }
        match (&self.client_certificate_file, &self.client_certificate_key_file) {
            (Some(cert), Some(key_file)) => {
                sources.push(("client_certificate_file", CredentialSource::Certificate { cert, key: key_file }))
            }
            (Some(_), None) => {
                return Err(invalid(
                    format!("{key}.client_certificate_key_file"),
                    "missing: client_certificate_file needs the PEM file of its private key",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{key}.client_certificate_file"),
                    "missing: client_certificate_key_file needs the PEM file of its certificate",
                ))
            }
            (None, None) => {}
        }
        if sources.len() > 1 {
            let names: Vec<&str> = sources.iter().map(|(name, _)| *name).collect();
            return Err(invalid(
                format!("{key}.{}", names[1]),
                format!("set only one credential, found {}", names.join(" and ")),
            ));
        }
        match sources.pop() {
            Some((_, source)) => Ok(source),
            None => Err(invalid(
                format!("{key}.client_secret"),
                "missing: set one of client_secret_file, client_secret_env, client_secret_credential, client_certificate_file (with client_certificate_key_file), client_secret, or the environment variable MDE_FORWARDER__TENANT__<NAME>__CLIENT_SECRET",
            )),
        }
    }

    fn resolve_credential(&self, key: &str, env: &dyn Fn(&str) -> Option<OsString>) -> Result<ClientCredential, ConfigError> {
        let source = self.credential_source(key)?;
        // An empty secret is reported under the key that points to it.
        let (field, origin) = match source {
            CredentialSource::Inline(_) => ("client_secret", String::new()),
            CredentialSource::File(path) => ("client_secret_file", format!(": the file {} contains no secret", path.display())),
            CredentialSource::Env(name) => ("client_secret_env", format!(": the environment variable {name} is empty")),
            CredentialSource::SystemdCredential(name) => ("client_secret_credential", format!(": the credential {name} is empty")),
            CredentialSource::Certificate { .. } => ("client_certificate_file", String::new()),
        };
        let secret = match source {
            CredentialSource::Inline(secret) => secret.clone(),
            CredentialSource::File(path) => read_secret_file(&format!("{key}.client_secret_file"), path)?,
            CredentialSource::Env(name) => {
                let field = format!("{key}.client_secret_env");
                let value = env(name).ok_or_else(|| {
                    invalid(&field, format!("the environment variable {name} is not set"))
                })?;
                let text = value
                    .into_string()
                    .map_err(|_| invalid(&field, format!("the environment variable {name} is not valid UTF-8")))?;
                Secret::new(text)
            }
            CredentialSource::SystemdCredential(name) => {
                let field = format!("{key}.client_secret_credential");
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(invalid(&field, format!("{name:?} is not a credential name")));
                }
                let directory = env("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()).ok_or_else(|| {
                    invalid(
                        &field,
                        format!("CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredential={name}:/path/to/secret (or SetCredentialEncrypted=), or use client_secret_file"),
                    )
                })?;
                read_secret_file(&field, &PathBuf::from(directory).join(name))?
            }
            CredentialSource::Certificate { cert, key: key_file } => {
                let certificate = ClientCertificate::load(cert, key_file)
                    .map_err(|message| invalid(format!("{key}.client_certificate_file"), message))?;
                return Ok(ClientCredential::Certificate(Arc::new(certificate)));
            }
        };
        if secret.expose().trim().is_empty() {
            return Err(invalid(format!("{key}.{field}"), format!("is empty{origin}")));
        }
        Ok(ClientCredential::Secret(secret))
    }

    /// Returns the `/api/alerts` URL and the token URL.
    fn endpoints(&self, key: &str) -> Result<(String, String), ConfigError> {
        let preset = self.region.map(Region::endpoints);
        let api = match (&self.api_url, preset) {
            (Some(url), _) => url.clone(),
            (None, Some((api, _))) => api.to_string(),
            (None, None) => {
                return Err(invalid(
                    format!("{key}.region"),
                    "missing: set region (eu, us, uk, gcc, gcc-high, dod) or both api_url and login_url",
                ))
            }
        };
        let login = match (&self.login_url, preset) {
            (Some(url), _) => url.clone(),
            (None, Some((_, login))) => login.to_string(),
            (None, None) => {
                return Err(invalid(
                    format!("{key}.login_url"),
                    "missing: set region (eu, us, uk, gcc, gcc-high, dod) or login_url",
                ))
            }
        };
        let api = checked_base_url(&format!("{key}.api_url"), &api)?;
        let api = api_base(&api);
        let login = checked_base_url(&format!("{key}.login_url"), &login)?;
        let token_path = match self.token_endpoint {
            TokenEndpoint::V1 => "oauth2/token",
            TokenEndpoint::V2 => "oauth2/v2.0/token",
        };
        let tenant_id = self.tenant_id.trim();
        Ok((format!("{api}/api/alerts"), format!("{login}/{tenant_id}/{token_path}")))
    }

    fn resolve(&self, key: &str, poll: &PollConfig, env: &dyn Fn(&str) -> Option<OsString>) -> Result<ResolvedTenant, ConfigError> {
        let (alerts_url, token_url) = self.endpoints(key)?;
        let credential = self.resolve_credential(key, env)?;
        // `[poll] proxy_url` and `no_proxy` work as a sink's do, and without
        // them the proxy environment variables apply, as for sinks.
        let proxy = SinkProxyConfig { proxy_url: poll.proxy_url.clone(), no_proxy: poll.no_proxy.clone() };
        let token_proxy = crate::sink::proxy_for(&token_url, &proxy);
        let alerts_proxy = crate::sink::proxy_for(&alerts_url, &proxy);
        Ok(ResolvedTenant {
            name: self.name.clone(),
            tenant_id: self.tenant_id.trim().to_string(),
            client_id: self.client_id.trim().to_string(),
            credential,
            alerts_url,
            token_url,
            resource: self.resource.clone(),
            token_endpoint: self.token_endpoint,
            token_refresh_margin_secs: self.token_refresh_margin_secs,
            machine_groups: self.machine_groups.clone(),
            device_created_machine_tags: self.device_created_machine_tags.clone(),
            cloud_created_machine_tags: self.cloud_created_machine_tags.clone(),
            limit: self.limit,
            token_proxy,
            alerts_proxy,
        })
    }
}

/// Strips what users paste after the base URL: trailing slashes and a
/// trailing `/api/alerts` or `/api` in any case, so exactly one
/// `/api/alerts` follows.
fn api_base(url: &str) -> &str {
    let mut base = url.trim_end_matches('/');
    for suffix in ["/api/alerts", "/api"] {
        let cut = base.len().saturating_sub(suffix.len());
        if base.is_char_boundary(cut) && base[cut..].eq_ignore_ascii_case(suffix) {
            base = base[..cut].trim_end_matches('/');
        }
    }
    base
}

/// Describes a sink URL whose scheme is not http or https. Without `//`,
/// `user:password@host` reads as scheme `user`, so the scheme is shown only
/// when the text has `://`, and the rest of the URL never.
fn scheme_message(text: &str, scheme: &str) -> String {
    let fix = "it must start with https:// (or http:// for a local test server)";
    if text.contains("://") {
        format!("has scheme {scheme:?}; {fix}")
    } else {
        format!("has no scheme followed by //; {fix}")
    }
}

/// Checks a proxy URL (`[poll]` or a sink's) without echoing it, since it
/// may hold a password. `key` names it in errors.
fn check_proxy_url(key: &str, proxy: &Secret) -> Result<(), ConfigError> {
    let url = url::Url::parse(proxy.expose().trim())
        .map_err(|e| invalid(key, format!("is not a URL ({e}); write it like http://proxy.example:3128")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(key, format!("has scheme {:?}; use http:// or https://", url.scheme())));
    }
    if url.host_str().map_or(true, str::is_empty) {
        return Err(invalid(key, "has no host"));
    }
    Ok(())
}

/// Validates an http(s) URL and returns it without a trailing slash.
fn checked_base_url(key: &str, text: &str) -> Result<String, ConfigError> {
    let redacted = crate::redact::url(text);
    let url = url::Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("{redacted:?} is not a URL ({e}); write it like https://host[:port]")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid(key, scheme_message(text, url.scheme())));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, format!("{redacted:?} must not contain a query string or fragment")));
    }
    Ok(text.trim().trim_end_matches('/').to_string())
}

/// Returns a warning when the config file at `path` contains an inline
/// `client_secret` and users other than its owner may read it.
pub fn inline_secret_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;

    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    if mode & 0o077 == 0 {
        return None;
    }
    let file = config::File::from(path).format(config::FileFormat::Toml).required(true);
    let parsed = config::Config::builder().add_source(file).build().ok()?;
    let tenants = parsed.get_array("tenant").ok()?;
    let inline = tenants
        .into_iter()
        .filter_map(|entry| entry.into_table().ok())
        .any(|table| table.contains_key("client_secret"));
    inline.then(|| {
        format!(
            "config file {} contains a client_secret and is readable by group or others (mode {:o}); run `chmod 600 {}` or move the secret to client_secret_file or client_secret_credential",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "is empty; set the path of the file that contains the secret"));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read secret file {}: {e}", path.display())))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(invalid(key, format!("{name:?} must be 1 to 64 ASCII letters, digits, '-', '_' or '.'")))
    }
}

/// Converts an environment value to the type its key takes. Sink keys are
/// read through a flattened struct, where serde no longer turns the text
/// "100" into a number, so numbers and booleans are typed here by key name.
/// Every other key stays text, because a secret like "12345" must stay text.
fn typed_override(key: &str, value: &str) -> config::Value {
    let name = key.rsplit('.').next().unwrap_or(key);
    let numeric = ["_secs", "_ms", "_bytes", "_attempts"].iter().any(|suffix| name.ends_with(suffix))
        || matches!(name, "batch_size" | "limit");
    let boolean = matches!(name, "gzip" | "ack" | "tls_insecure_skip_verify");
    if numeric {
        if let Ok(number) = value.trim().parse::<i64>() {
            return number.into();
        }
    }
    if boolean {
        match value.trim().to_ascii_lowercase().as_str() {
            "true" => return true.into(),
            "false" => return false.into(),
            _ => {}
        }
    }
    value.into()
}

/// Turns `TENANT__CONTOSO__CLIENT_SECRET` into `tenant[0].client_secret`.
fn override_key(base: &config::Config, rest: &str) -> Result<String, ConfigError> {
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(String::is_empty) {
        return Err(invalid(format!("{ENV_PREFIX}{rest}"), "empty part in environment variable name"));
    }
    let mut key = parts[0].clone();
    let mut rest_parts = &parts[1..];
    if (key == "tenant" || key == "sink") && !rest_parts.is_empty() {
        let selector = &rest_parts[0];
        let index = match selector.parse::<usize>() {
            Ok(index) => {
                let count = base.get_array(&key).map(|a| a.len()).unwrap_or(0);
                if index >= count {
                    return Err(invalid(
                        format!("{ENV_PREFIX}{rest}"),
                        format!("there is no [[{key}]] number {index} (the config has {count}, counted from 0); use an existing index or the entry's name"),
                    ));
                }
                index
            }
            Err(_) => find_entry(base, &key, selector).ok_or_else(|| {
                invalid(
                    format!("{ENV_PREFIX}{rest}"),
                    format!("no [[{key}]] named {selector:?}; use its name or its index from 0"),
                )
            })?,
        };
        key = format!("{key}[{index}]");
        rest_parts = &rest_parts[1..];
    }
    for part in rest_parts {
        key.push('.');
        key.push_str(part);
    }
    Ok(key)
}

fn find_entry(base: &config::Config, array: &str, selector: &str) -> Option<usize> {
    let normalize = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let entries = base.get_array(array).ok()?;
    entries.into_iter().position(|entry| {
        entry
            .into_table()
            .ok()
            .and_then(|table| table.get("name").cloned())
            .and_then(|name| name.into_string().ok())
            .is_some_and(|name| normalize(&name) == normalize(selector))
    })
}

mod type_errors;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sink_tests {
    use super::*;

    const BASE: &str = r#"
[state]
dir = "/tmp/mde-forwarder-config-test"

[[tenant]]
name = "contoso"
tenant_id = "t"
client_id = "c"
client_secret = "s"
region = "eu"

[[tenant]]
name = "fabrikam"
tenant_id = "t2"
client_id = "c2"
client_secret = "s2"
region = "us"
"#;

    fn load(sink: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, format!("{BASE}\n[[sink]]\n{sink}")).unwrap();
        Config::load_with_env(&path, &[])
    }

    fn error_text(sink: &str) -> String {
        load(sink).expect_err("config should be rejected").to_string()
    }

    const SINKS: [&str; 5] = [
        "name = \"s\"\ntype = \"syslog\"\naddress = \"127.0.0.1:514\"\n",
        "name = \"s\"\ntype = \"file\"\npath = \"/tmp/x\"\n",
        "name = \"s\"\ntype = \"stdout\"\n",
        "name = \"s\"\ntype = \"http\"\nurl = \"https://siem.example/ingest\"\n",
        "name = \"s\"\ntype = \"splunk_hec\"\nurl = \"https://splunk.example:8088\"\ntoken = \"t\"\n",
    ];

    #[test]
    fn every_sink_type_accepts_its_minimal_form() {
        for sink in SINKS {
            if let Err(e) = load(sink) {
                panic!("{sink}: {e}");
            }
        }
    }

    #[test]
    fn unknown_key_rejected_on_every_sink_type() {
        for sink in SINKS {
            let text = error_text(&format!("{sink}bogus_key = 1\n"));
            assert!(text.contains("bogus_key"), "{sink}: {text}");
        }
    }

    #[test]
    fn misspelled_common_key_rejected() {
        let text = error_text(&format!("{}min_severty = \"high\"\n", SINKS[0]));
        assert!(text.contains("min_severty"), "{text}");
    }

    #[test]
    fn routing_keys_parse() {
        let config = load(&format!(
            "{}min_severity = \"medium\"\ninclude_categories = [\"Malware\"]\nexclude_categories = [\"exploit\"]\ntenants = [\"fabrikam\"]\n",
            SINKS[3]
        ))
        .unwrap();
        let common = config.sinks[0].common();
        assert_eq!(common.min_severity, SeverityLevel::Medium);
        assert_eq!(common.tenants, vec!["fabrikam".to_string()]);
    }

    #[test]
    fn unknown_tenant_in_sink_rejected() {
        let text = error_text(&format!("{}tenants = [\"contoso\", \"northwind\"]\n", SINKS[0]));
        assert!(text.contains("sink[0].tenants"), "{text}");
        assert!(text.contains("\"northwind\""), "{text}");
    }

    #[test]
    fn invalid_min_severity_rejected() {
        let text = error_text(&format!("{}min_severity = \"critical\"\n", SINKS[0]));
        assert!(text.contains("critical"), "{text}");
    }

    #[test]
    fn tls_keys_need_tls_protocol() {
        let text = error_text(&format!("{}tls_ca_file = \"/ca.pem\"\n", SINKS[0]));
        assert!(text.contains("sink[0].tls_ca_file"), "{text}");
        assert!(text.contains("protocol = \"tls\""), "{text}");
    }

    #[test]
    fn tls_needs_ca_file_or_skip_verify() {
        let text = error_text(&format!("{}protocol = \"tls\"\n", SINKS[0]));
        assert!(text.contains("sink[0].tls_ca_file"), "{text}");
        let config = load(&format!("{}protocol = \"tls\"\ntls_insecure_skip_verify = true\n", SINKS[0]));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn tls_cert_needs_key() {
        let text = error_text(&format!("{}protocol = \"tls\"\ntls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"\n", SINKS[0]));
        assert!(text.contains("sink[0].tls_key_file"), "{text}");
    }

    #[test]
    fn hec_token_sources_exclusive() {
        let text = error_text("name = \"s\"\ntype = \"splunk_hec\"\nurl = \"https://splunk.example:8088\"\n");
        assert!(text.contains("sink[0].token"), "{text}");
        let text = error_text(&format!("{}token_env = \"HEC_TOKEN\"\n", SINKS[4]));
        assert!(text.contains("only one"), "{text}");
    }

    #[test]
    fn http_header_name_checked() {
        let text = error_text(&format!("{}headers = {{ \"Bad Header\" = \"x\" }}\n", SINKS[3]));
        assert!(text.contains("sink[0].headers"), "{text}");
        assert!(text.contains("Bad Header"), "{text}");
    }

    #[test]
    fn http_header_secret_not_in_debug() {
        let config = load(&format!("{}headers = {{ \"Authorization\" = \"Bearer hunter2\" }}\n", SINKS[3])).unwrap();
        let debug = format!("{:?}", config.sinks[0]);
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn routing_filters() {
        let mut common = SinkCommon { min_severity: SeverityLevel::Medium, ..SinkCommon::default() };
        assert!(common.routes("contoso", Some("High"), Some("Malware")));
        assert!(common.routes("contoso", Some("medium"), None));
        assert!(!common.routes("contoso", Some("Low"), Some("Malware")));
        assert!(common.routes("contoso", Some("Unexpected"), None), "unknown severity counts as medium");
        common.include_categories = vec!["malware".into()];
        assert!(common.routes("contoso", Some("High"), Some("Malware")));
        assert!(!common.routes("contoso", Some("High"), Some("Exploit")));
        common.include_categories.clear();
        common.exclude_categories = vec!["EXPLOIT".into()];
        assert!(!common.routes("contoso", Some("High"), Some("Exploit")));
        common.tenants = vec!["fabrikam".into()];
        assert!(!common.routes("contoso", Some("High"), Some("Malware")));
        assert!(common.routes("fabrikam", Some("High"), Some("Malware")));
    }
}
