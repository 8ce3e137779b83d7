//! `check-config --probe`: gets a token for each tenant and connects to each
//! sink, so that credentials and network paths are checked before a start.
//! Nothing is polled and nothing is sent.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::TokenSource;
use crate::config::{Config, Protocol, ResolvedTenant, SinkConfig};

/// Probes every tenant and sink, printing one line each. Returns how many
/// probes failed.
pub async fn run(config: &Config, tenants: Vec<ResolvedTenant>) -> usize {
    let http = match crate::pipeline::http_client(config) {
        Ok(http) => http,
        Err(e) => {
            out!("probe: {e}");
            return 1;
        }
    };
    let mut failed = 0;
    for tenant in tenants {
        let name = tenant.name.clone();
        match TokenSource::new(http.clone(), Arc::new(tenant)).token().await {
            Ok(_) => out!("tenant {name}: token ok"),
            Err(e) => {
                out!("tenant {name}: FAILED: {e}");
                failed += 1;
            }
        }
    }
    for sink in &config.sinks {
        match probe_sink(sink).await {
            Ok(detail) => out!("sink {}: {detail}", sink.name()),
            Err(e) => {
                out!("sink {}: FAILED: {e}", sink.name());
                failed += 1;
            }
        }
    }
    failed
}

async fn probe_sink(sink: &SinkConfig) -> Result<String, String> {
    let connect_timeout = Duration::from_secs(sink.common().connect_timeout_secs);
    match sink {
        SinkConfig::Syslog(s) if s.protocol != Protocol::Udp => {
            connect_tcp(&s.address, connect_timeout).await?;
            if s.protocol == Protocol::Tls {
                Ok(format!("connected to {} (TCP only; the TLS handshake is not part of the probe)", s.address))
            } else {
                Ok(format!("connected to {}", s.address))
            }
        }
        SinkConfig::Syslog(s) => {
            // UDP has no handshake: resolving the address is all that can be checked.
            let target = tokio::net::lookup_host(&s.address)
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", s.address))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", s.address))?;
            Ok(format!("UDP address {} resolves to {target} (UDP has no handshake to test)", s.address))
        }
        SinkConfig::File(f) => {
            if let Some(parent) = f.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            use std::os::unix::fs::OpenOptionsExt;
            // The same mode as the file sink uses when it creates the file.
            std::fs::OpenOptions::new()
                .mode(0o640)
                .create(true)
                .append(true)
                .open(&f.path)
                .map_err(|e| format!("cannot open {} for appending: {e}", f.path.display()))?;
            Ok(format!("{} is writable", f.path.display()))
        }
        SinkConfig::Stdout(_) => Ok("standard output".into()),
        SinkConfig::Http(h) => probe_http(&h.url, &h.proxy, connect_timeout).await,
        SinkConfig::SplunkHec(h) => probe_http(&h.url, &h.proxy, connect_timeout).await,
    }
}

async fn connect_tcp(address: &str, limit: Duration) -> Result<(), String> {
    tokio::time::timeout(limit, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect to {address} timed out after {} s", limit.as_secs()))?
        .map_err(|e| format!("connect to {address} failed: {e}"))?;
    Ok(())
}

/// Opens a TCP connection to the proxy that requests to `url` go through,
/// or else to the URL's host and port.
async fn probe_http(url: &str, proxy: &crate::config::SinkProxyConfig, limit: Duration) -> Result<String, String> {
    let Some(route) = crate::sink::sink_proxy(url, proxy) else {
        return probe_url(url, limit).await;
    };
    connect_tcp(&route.address, limit).await.map_err(|e| format!("proxy {}: {e}", route.redacted_url))?;
    Ok(format!(
        "TCP connection to proxy {} opened; {} is not reached through it (no request is sent)",
        route.redacted_url,
        crate::redact::url(url)
    ))
}

/// Opens a TCP connection to the host and port of an HTTP(S) URL.
async fn probe_url(url: &str, limit: Duration) -> Result<String, String> {
    let redacted = crate::redact::url(url);
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {redacted}: {e}"))?;
    let host = parsed.host_str().ok_or_else(|| format!("URL {redacted} has no host"))?;
    let port = parsed.port_or_known_default().ok_or_else(|| format!("URL {redacted} has no port"))?;
    let address = format!("{host}:{port}");
    connect_tcp(&address, limit).await?;
    Ok(format!("TCP connection to {address} opened (no request is sent)"))
}
