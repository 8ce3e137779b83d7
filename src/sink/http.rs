//! Generic HTTP sink: each batch is one POST of a JSON array or NDJSON body.
//!
//! 2xx acknowledges the batch. 408, 429, 5xx and network errors are retried
//! (honouring `Retry-After`). 413 means the request is too large, not its
//! events bad: the worker sends the batch again in smaller parts (see
//! [`Reply::too_large`]). Any other status means the receiver will never
//! take this batch, so every event of it is rejected with the status and
//! the start of the response body, header values redacted, as the reason.

use std::io::Write;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use hyper_util::client::proxy::matcher::Matcher;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use super::{Batch, Redactor, SendOutcome, SinkError};
use crate::config::{BodyFormat, ConfigError, Secret, SinkProxyConfig, TlsConfig};

/// The part of a response body kept in errors and dead-letter reasons.
const REASON_BODY_BYTES: usize = 1024;

/// The most of a response body read; receivers answer in a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Everything an HTTP sink needs, resolved from its config.
pub struct HttpSettings {
    pub url: String,
    pub body_format: BodyFormat,
    pub gzip: bool,
    pub headers: Vec<(String, Secret)>,
    pub max_batch_bytes: usize,
    /// Credentials of the sink's proxy (see [`crate::redact::url_secrets`]),
    /// which a proxy may echo in its responses.
    pub proxy_secrets: Vec<String>,
    /// The proxy that requests to `url` go through, redacted, for errors
    /// (see [`proxy_for`]).
    pub proxy: Option<String>,
}

pub struct HttpTransport {
    client: reqwest::Client,
    url: String,
    body_format: BodyFormat,
    gzip: bool,
    headers: HeaderMap,
    /// The header values, removed from response text in errors and reasons.
    redactor: Redactor,
    max_batch_bytes: usize,
    /// The proxy that requests go through, redacted, for errors.
    proxy: Option<String>,
}

impl HttpTransport {
    /// `key` is the sink's config position, for errors.
    pub fn new(key: &str, settings: HttpSettings, client: reqwest::Client) -> Result<Self, ConfigError> {
        let headers = header_map(key, &settings.headers)?;
        // Every configured header value counts as a secret, because the
        // config cannot tell an API key from a harmless value. So do the
        // URL's user, password and query, which a receiver may echo.
        let url_secrets = crate::redact::url_secrets(&settings.url);
        let header_values = settings.headers.iter().map(|(_, value)| value.expose());
        let url_parts = url_secrets.iter().chain(&settings.proxy_secrets).map(String::as_str);
        let redactor = Redactor::new(header_values.chain(url_parts));
        Ok(Self {
            client,
            url: settings.url,
            body_format: settings.body_format,
            gzip: settings.gzip,
            headers,
            redactor,
            max_batch_bytes: settings.max_batch_bytes,
            proxy: settings.proxy,
        })
    }

    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    pub async fn send(&mut self, batch: &Batch) -> Result<SendOutcome, SinkError> {
        let (body, content_type) = match self.body_format {
            BodyFormat::JsonArray => (json_array(batch), "application/json"),
            BodyFormat::Ndjson => (ndjson(batch), "application/x-ndjson"),
        };
        let mut request = self.client.post(&self.url).headers(self.headers.clone()).header(CONTENT_TYPE, content_type);
        let body = if self.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
            gzip(&body)
        } else {
            body
        };
        let sent_bytes = body.len();
        request = request.body(body);
        let proxy = self.proxy.as_deref();
        let response = request.send().await.map_err(|source| SinkError::http(&self.url, proxy, source))?;
        let reply = Reply::read(response, &self.url, proxy).await?;
        if reply.status.is_success() {
            return Ok(SendOutcome::Delivered);
        }
        if reply.status == StatusCode::PAYLOAD_TOO_LARGE {
            return reply.too_large(&self.url, &self.redactor, batch.len(), sent_bytes);
        }
        if is_retryable(reply.status) {
            return Err(reply.into_error(&self.url, &self.redactor));
        }
        // 400 and 422 reject the detections sent. Other statuses reject the
        // request (its URL, credentials or format), so the batch stays queued
        // for the operator to fix the sink, instead of every detection
        // moving to dead letters.
        // An HTML page is the error page of a proxy, load balancer or web
        // server in front of the collector, not its verdict on the detections.
        if !matches!(reply.status, StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY) || is_html_page(&reply.body) {
            return Err(reply.request_rejected(&self.url, &self.redactor));
        }
        Ok(SendOutcome::AllRejected { reason: reply.reason(&self.redactor) })
    }
}

/// A response read to the end (up to [`MAX_RESPONSE_BYTES`]).
pub(super) struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    /// The `Location` of a redirect, without credentials and query.
    pub location: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// Reads `response` to `url`. `proxy` is the proxy it came through, for errors.
    pub async fn read(mut response: reqwest::Response, url: &str, proxy: Option<&str>) -> Result<Self, SinkError> {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(crate::redact::url);
        let mut body = Vec::new();
        while body.len() < MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(source) => return Err(SinkError::http(url, proxy, source)),
            }
        }
        Ok(Self { status, retry_after, location, body })
    }

    /// Formats the status and the start of the body, secrets redacted, as a dead-letter reason.
    pub fn reason(&self, redactor: &Redactor) -> String {
        format!("HTTP {}: {}", self.status.as_u16(), self.excerpt(redactor))
    }

    /// Returns the start of the body, secrets redacted, for errors and reasons.
    pub fn excerpt(&self, redactor: &Redactor) -> String {
        redactor.excerpt(&self.body, REASON_BODY_BYTES)
    }

    /// Handles a 413 (payload too large) for a request of `events` messages
    /// and `bytes` bytes of body. With more than one message the batch is
    /// too large, not its events bad, so the returned error makes the worker
    /// send it in smaller parts. A single message the receiver rejects even
    /// alone is rejected for good, with a reason that names its size and the fix.
    pub fn too_large(self, url: &str, redactor: &Redactor, events: usize, bytes: usize) -> Result<SendOutcome, SinkError> {
        if events > 1 {
            return Err(SinkError::PayloadTooLarge { url: crate::redact::url(url), events, bytes, body: self.excerpt(redactor) });
        }
        let reason = format!(
            "{}; the receiver rejects this detection even alone, in a request body of {bytes} bytes, \
             so raise the receiver's request size limit, then requeue it",
            self.reason(redactor)
        );
        Ok(SendOutcome::AllRejected { reason })
    }

    /// Returns the error for a status that rejects the request itself, not
    /// the detections in it, with what to check for that status.
    pub fn request_rejected(&self, url: &str, redactor: &Redactor) -> SinkError {
        if self.status.is_redirection() {
            // Redirects are not followed: a POST turned into a GET, or sent to
            // a host the config does not name, would count as delivered.
            let location = self.location.as_deref().unwrap_or("no Location header");
            return SinkError::Redirected { url: crate::redact::url(url), status: self.status.as_u16(), location: location.to_string() };
        }
        let advice = match self.status.as_u16() {
            401 | 403 => "the receiver rejected the credentials: check the sink's token or headers",
            407 => "the proxy requires credentials: put them in the sink's proxy_url",
            404 | 405 | 410 | 421 => "the receiver has no endpoint for this request: check the sink's url",
            415 => "the receiver does not take this body: check the sink's body_format and gzip",
            _ if is_html_page(&self.body) => "an HTML page answered instead of the collector, so a proxy, load balancer or web server in front of it rejected the request: check the sink's url, proxy and TLS settings (an https collector on an http url, say)",
            _ => "the receiver rejected the request, not a detection in it: check the sink's settings and the receiver's log",
        };
        SinkError::RequestRejected { url: crate::redact::url(url), status: self.status.as_u16(), body: self.excerpt(redactor), advice }
    }

    pub fn into_error(self, url: &str, redactor: &Redactor) -> SinkError {
        SinkError::HttpStatus {
            url: crate::redact::url(url),
            status: self.status.as_u16(),
            body: self.excerpt(redactor),
            retry_after: self.retry_after,
        }
    }
}

/// True when `body` starts as an HTML page does.
fn is_html_page(body: &[u8]) -> bool {
    let start = String::from_utf8_lossy(&body[..body.len().min(256)]).trim_start().to_ascii_lowercase();
    start.starts_with("<!doctype html") || start.starts_with("<html")
}

/// 408, 429 and 5xx may succeed later; other errors will not.
pub(super) fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Builds the client of an HTTP or HEC sink with its TLS settings.
///
/// With `proxy.proxy_url` the client sends every request through that proxy
/// (except to `no_proxy` hosts) and ignores the proxy environment variables.
/// Without it, reqwest reads them.
pub fn build_client(
    key: &str,
    tls: &TlsConfig,
    proxy: &SinkProxyConfig,
    timeout: Duration,
    connect_timeout: Duration,
) -> Result<reqwest::Client, ConfigError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("mde-forwarder/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        // A followed redirect turns a POST into a GET whose 200 would count
        // as delivered, or sends the batch to a host the config does not name.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(proxy_url) = &proxy.proxy_url {
        // reqwest's error text may repeat the URL, and with it a password.
        let all = reqwest::Proxy::all(proxy_url.expose().trim()).map_err(|_| ConfigError::Invalid {
            key: format!("{key}.proxy_url"),
            message: "is not a usable proxy URL".into(),
        })?;
        let no_proxy = proxy.no_proxy.as_deref().and_then(reqwest::NoProxy::from_string);
        builder = builder.proxy(all.no_proxy(no_proxy));
    }
    if tls.tls_ca_file.is_some() || tls.tls_insecure_skip_verify {
        let mut config = (*super::tls::client_config(key, tls, None)?).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        builder = builder.use_preconfigured_tls(config);
    }
    builder.build().map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        message: format!("cannot build the HTTP client: {e}"),
    })
}

/// Returns the proxy that requests to `url` go through, with user, password
/// and query hidden, or `None` for a direct request. With `proxy_url` set,
/// that is `proxy_url` unless `no_proxy` exempts the URL's host. Without it,
/// that is the proxy named by `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
/// `NO_PROXY`. reqwest 0.12.28 decides with the same hyper-util matcher,
/// built from the same values, so the two agree.
pub fn proxy_for(url: &str, proxy: &SinkProxyConfig) -> Option<String> {
    sink_proxy(url, proxy).map(|route| route.redacted_url)
}

/// The proxy that requests to a sink's URL go through.
pub struct SinkProxy {
    /// Its URL with user, password and query hidden, for messages.
    pub redacted_url: String,
    /// Its `host:port`, for the probe's connection.
    pub address: String,
}

/// Returns the proxy that requests to `url` go through, with its address.
/// [`proxy_for`] describes how the proxy is chosen.
pub fn sink_proxy(url: &str, proxy: &SinkProxyConfig) -> Option<SinkProxy> {
    let destination: hyper::Uri = url.trim().parse().ok()?;
    let (intercept, redacted_url) = match &proxy.proxy_url {
        None => {
            let intercept = Matcher::from_system().intercept(&destination)?;
            let redacted_url = crate::redact::url(&intercept.uri().to_string());
            (intercept, redacted_url)
        }
        Some(proxy_url) => {
            let proxy_url = proxy_url.expose().trim();
            let no_proxy = proxy.no_proxy.clone().unwrap_or_default();
            let intercept = Matcher::builder().all(proxy_url.to_string()).no(no_proxy).build().intercept(&destination)?;
            (intercept, crate::redact::url(proxy_url))
        }
    };
    let uri = intercept.uri();
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        Some("socks5" | "socks5h") => 1080,
        _ => 80,
    };
    let address = format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(default_port));
    Some(SinkProxy { redacted_url, address })
}

fn header_map(key: &str, headers: &[(String, Secret)]) -> Result<HeaderMap, ConfigError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| ConfigError::Invalid {
            key: format!("{key}.headers"),
            message: format!("{name:?} is not a valid HTTP header name"),
        })?;
        // The error names the header only: its value may be a credential.
        let mut header_value = HeaderValue::from_str(value.expose()).map_err(|_| ConfigError::Invalid {
            key: format!("{key}.headers"),
            message: format!("the value of header {name:?} contains characters not allowed in HTTP headers"),
        })?;
        header_value.set_sensitive(true);
        map.insert(header_name, header_value);
    }
    Ok(map)
}

fn json_array(batch: &Batch) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch.bytes().len() + batch.len() + 2);
    body.push(b'[');
    for (i, message) in batch.messages().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message);
    }
    body.push(b']');
    body
}

fn ndjson(batch: &Batch) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch.bytes().len() + batch.len());
    for message in batch.messages() {
        body.extend_from_slice(message);
        body.push(b'\n');
    }
    body
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::default());
    // Writing into a Vec cannot fail, so neither can these calls.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(messages: &[&str]) -> Batch {
        let mut batch = Batch::default();
        for message in messages {
            batch.push_message(message.as_bytes());
        }
        batch
    }

    #[test]
    fn json_array_joins_messages() {
        assert_eq!(json_array(&batch(&[r#"{"a":1}"#, r#"{"b":2}"#])), br#"[{"a":1},{"b":2}]"#.to_vec());
    }

    #[test]
    fn ndjson_ends_every_line() {
        assert_eq!(ndjson(&batch(&[r#"{"a":1}"#, r#"{"b":2}"#])), b"{\"a\":1}\n{\"b\":2}\n".to_vec());
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let compressed = gzip(b"hello hello hello");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&compressed[..]).read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello hello hello");
    }

    #[test]
    fn proxy_for_hides_credentials_and_honours_no_proxy() {
        let with_proxy = |no_proxy: Option<&str>| SinkProxyConfig {
            proxy_url: Some(Secret::new("http://user:pass-123@proxy.example:3128")),
            no_proxy: no_proxy.map(String::from),
        };
        let url = "https://collector.example/ingest";

        let proxied = proxy_for(url, &with_proxy(None));
        let exempt = proxy_for(url, &with_proxy(Some("other.example, .collector.example")));
        let other_exempt = proxy_for(url, &with_proxy(Some("other.example")));

        assert_eq!(proxied.as_deref(), Some("http://redacted:redacted@proxy.example:3128/"));
        assert_eq!(exempt, None);
        assert_eq!(other_exempt.as_deref(), Some("http://redacted:redacted@proxy.example:3128/"));
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 413] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
