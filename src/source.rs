//! The SIEM REST API client: builds `/api/alerts` queries, authenticates,
//! classifies errors and streams the response array element by element.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use crate::auth::{proxy_advice, through_proxy, AuthError, TokenSource};
use crate::config::{ResolvedTenant, Secret};
use crate::detection::Detection;
use crate::json_stream::{preview, ArrayError, ArraySplitter, RawElement};
use crate::timefmt;

/// One `/api/alerts` request. Empty fields send no parameter.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// An ISO 8601 duration such as `PT4H`.
    pub ago: Option<String>,
    pub limit: u32,
    pub machine_groups: Vec<String>,
    pub device_created_machine_tags: Option<String>,
    pub cloud_created_machine_tags: Option<String>,
}

impl Query {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(since) = self.since {
            pairs.push(("sinceTimeUtc", timefmt::format_query(since)));
        }
        if let Some(until) = self.until {
            pairs.push(("untilTimeUtc", timefmt::format_query(until)));
        }
        if let Some(ago) = &self.ago {
            pairs.push(("ago", ago.clone()));
        }
        if self.limit > 0 {
            pairs.push(("limit", self.limit.to_string()));
        }
        for group in &self.machine_groups {
            pairs.push(("machinegroups", group.clone()));
        }
        if let Some(tag) = &self.device_created_machine_tags {
            pairs.push(("DeviceCreatedMachineTags", tag.clone()));
        }
        if let Some(tag) = &self.cloud_created_machine_tags {
            pairs.push(("CloudCreatedMachineTags", tag.clone()));
        }
        pairs
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("tenant {tenant}: the API returned 401 Unauthorized even with a fresh token ({body}); check that the app has the Defender SIEM API permission (Alert.Read.All on WindowsDefenderATP) and that resource is right")]
    Unauthorized { tenant: String, body: String },
    #[error("tenant {tenant}: the API returned 403 Forbidden ({body}); the app permission may not be granted (admin consent), SIEM integration may be off, or the tenant is not onboarded to Defender for Endpoint")]
    Forbidden { tenant: String, body: String },
    #[error("tenant {tenant}: the API is throttling requests (HTTP 429){}", retry_note(*retry_after))]
    Throttled { tenant: String, retry_after: Option<Duration> },
    #[error("tenant {tenant}: the API failed with HTTP {status}: {body}{}", retry_note(*retry_after))]
    Server { tenant: String, status: u16, body: String, retry_after: Option<Duration> },
    #[error("tenant {tenant}: the API rejected the request {url} with HTTP {status}: {body}")]
    Rejected { tenant: String, status: u16, url: String, body: String },
    /// `proxy` is the proxy the request went through, redacted.
    #[error("tenant {tenant}: request to {url}{} failed: {}{}", through_proxy(proxy.as_deref()), crate::redact::error_chain(source), proxy_advice(proxy.as_deref(), source))]
    Network { tenant: String, url: String, proxy: Option<String>, source: reqwest::Error },
    #[error("tenant {tenant}: malformed response (HTTP {status}, content-type {content_type}): {detail}; nothing from it moves the checkpoint")]
    Malformed { tenant: String, status: u16, content_type: String, detail: ArrayError },
    #[error("tenant {tenant}: response is larger than {limit} bytes ([poll] max_response_bytes); it was cut off")]
    TooLarge { tenant: String, limit: u64 },
    /// The task reading the body ended without reaching its end or an
    /// error, which only a bug or a runtime shutdown causes.
    #[error("tenant {tenant}: reading the response body stopped before its end; nothing after that point moves the checkpoint, and the cycle is retried")]
    BodyStopped { tenant: String },
}

fn retry_note(retry_after: Option<Duration>) -> String {
    retry_after.map(|d| format!(", Retry-After {} s", d.as_secs())).unwrap_or_default()
}

impl SourceError {
    /// Returns whether trying again soon can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Auth(e) => e.is_retryable(),
            SourceError::Throttled { .. }
            | SourceError::Server { .. }
            | SourceError::Network { .. }
            | SourceError::Malformed { .. }
            | SourceError::BodyStopped { .. } => true,
            SourceError::Unauthorized { .. }
            | SourceError::Forbidden { .. }
            | SourceError::Rejected { .. }
            | SourceError::TooLarge { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Auth(e) => e.retry_after(),
            SourceError::Throttled { retry_after, .. } | SourceError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Returns the HTTP status for metrics, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            SourceError::Unauthorized { .. } => Some(401),
            SourceError::Forbidden { .. } => Some(403),
            SourceError::Throttled { .. } => Some(429),
            SourceError::Server { status, .. } | SourceError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One element of a response: a detection, or something that is not one.
#[derive(Debug)]
pub enum Element {
    Detection(Detection),
    /// `raw` is the element's bytes exactly as received, which need not be
    /// UTF-8.
    Invalid { raw: Vec<u8>, reason: String },
}

pub struct AlertsClient {
    http: reqwest::Client,
    tenant: Arc<ResolvedTenant>,
    tokens: TokenSource,
    max_response_bytes: u64,
    /// Detections come with their field tables (see [`AlertsClient::with_field_tables`]).
    field_tables: bool,
}

impl AlertsClient {
    pub fn new(http: reqwest::Client, tenant: Arc<ResolvedTenant>, max_response_bytes: u64) -> Self {
        let tokens = TokenSource::new(http.clone(), tenant.clone());
        Self { http, tenant, tokens, max_response_bytes, field_tables: false }
    }

    /// Builds each detection's field table while the response is split,
    /// which costs less than a second scan in the sink that needs it. Only
    /// worth it when some sink reads fields: CEF, LEEF, or routing by field.
    pub fn with_field_tables(self, field_tables: bool) -> Self {
        Self { field_tables, ..self }
    }

    pub fn tenant(&self) -> &ResolvedTenant {
        &self.tenant
    }

    /// Sends a query and returns the response body as a stream of elements.
    /// A 401 refreshes the token and retries once.
    pub async fn open(&self, query: &Query) -> Result<Page, SourceError> {
        let token = self.tokens.token().await?;
        let response = self.send(query, &token).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            tracing::info!(tenant = %self.tenant.name, "API returned 401; refreshing the token and retrying once");
            self.tokens.invalidate(&token).await;
            let token = self.tokens.token().await?;
            let response = self.send(query, &token).await?;
            return self.check_status(response, token).await;
        }
        self.check_status(response, token).await
    }

    async fn send(&self, query: &Query, token: &Secret) -> Result<reqwest::Response, SourceError> {
        self.http
            .get(&self.tenant.alerts_url)
            .query(&query.pairs())
            .bearer_auth(token.expose())
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|source| self.network(source))
    }

    fn network(&self, source: reqwest::Error) -> SourceError {
        SourceError::Network {
            tenant: self.tenant.name.clone(),
            url: self.tenant.alerts_url.clone(),
            proxy: self.tenant.alerts_proxy.clone(),
            source: source.without_url(),
        }
    }

    /// `token` is removed from any body text shown in errors: a proxy or a
    /// server may echo the request.
    async fn check_status(&self, response: reqwest::Response, token: Secret) -> Result<Page, SourceError> {
        let status = response.status();
        let tenant = self.tenant.name.clone();
        if status.is_success() {
            let content_type = header_text(response.headers(), CONTENT_TYPE.as_str());
            return Ok(Page {
                body: BodyReader::start(response),
                splitter: ArraySplitter::with_secrets(vec![token.expose().to_string()]).with_field_tables(self.field_tables),
                ready: std::collections::VecDeque::new(),
                finished: false,
                failed: None,
                received: 0,
                limit: self.max_response_bytes,
                tenant,
                proxy: self.tenant.alerts_proxy.clone(),
                status: status.as_u16(),
                content_type,
            });
        }
        let retry_after = retry_after(response.headers());
        let url = response.url().to_string();
        let body = error_body(response, &[token.expose()]).await;
        Err(match status.as_u16() {
            401 => SourceError::Unauthorized { tenant, body },
            403 => SourceError::Forbidden { tenant, body },
            429 => SourceError::Throttled { tenant, retry_after },
            408 | 500..=599 => SourceError::Server { tenant, status: status.as_u16(), body, retry_after },
            code => SourceError::Rejected { tenant, status: code, url, body },
        })
    }
}

/// Decompressed chunks of a response body, read by a task of their own so
/// that inflating a gzip body overlaps with splitting it into detections.
/// The task sends `Ok(None)` at the end of the body, so a complete body is
/// distinguished from a task that ended early.
struct BodyReader {
    chunks: tokio::sync::mpsc::Receiver<Result<Option<bytes::Bytes>, reqwest::Error>>,
    task: tokio::task::JoinHandle<()>,
}

/// Chunks read ahead of the splitter, at most.
const BODY_CHUNKS_AHEAD: usize = 4;

/// Bytes gathered into one chunk for the splitter. The decoder yields 4 KiB
/// at a time, and handing each to the poller's task on its own cost more
/// than copying them.
const BODY_CHUNK_BYTES: usize = 64 * 1024;

impl BodyReader {
    fn start(mut response: reqwest::Response) -> Self {
        let (sender, chunks) = tokio::sync::mpsc::channel(BODY_CHUNKS_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                // One allocation of the final size: growing by doubling
                // left freed blocks of every size behind.
                let mut gathered = bytes::BytesMut::with_capacity(BODY_CHUNK_BYTES);
                let end = loop {
                    match response.chunk().await {
                        Ok(Some(chunk)) => {
                            gathered.extend_from_slice(&chunk);
                            if gathered.len() >= BODY_CHUNK_BYTES {
                                break None;
                            }
                        }
                        Ok(None) => break Some(Ok(())),
                        Err(e) => break Some(Err(e)),
                    }
                };
                // A send fails only when the page was dropped.
                if !gathered.is_empty() && sender.send(Ok(Some(gathered.freeze()))).await.is_err() {
                    return;
                }
                if let Some(last) = end {
                    // The end of the body, or its error.
                    let _ = sender.send(last.map(|()| None)).await;
                    return;
                }
            }
        });
        Self { chunks, task }
    }

    /// Receives the next chunk, `Ok(None)` at the end of the body, or `None`
    /// when the reading task ended before either.
    async fn chunk(&mut self) -> Option<Result<Option<bytes::Bytes>, reqwest::Error>> {
        self.chunks.recv().await
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response body being read element by element.
pub struct Page {
    body: BodyReader,
    splitter: ArraySplitter,
    ready: std::collections::VecDeque<RawElement>,
    finished: bool,
    /// An error in the body, reported once the elements before it are taken.
    failed: Option<SourceError>,
    received: u64,
    limit: u64,
    tenant: String,
    /// The proxy the response came through, redacted, for errors.
    proxy: Option<String>,
    status: u16,
    content_type: String,
}

impl Page {
    /// Reads the next up to `max` elements, or `None` at the end of a complete array.
    /// Elements complete before an error in the body are returned first; the
    /// error comes with the call after them.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Element>>, SourceError> {
        while self.ready.len() < max && !self.finished && self.failed.is_none() {
            let mut out = Vec::new();
            let read = self.read_chunk(&mut out).await;
            self.ready.extend(out);
            if let Err(e) = read {
                self.failed = Some(e);
            }
        }
        if self.ready.is_empty() {
            return match self.failed.take() {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let take = self.ready.len().min(max);
        Ok(Some(self.ready.drain(..take).map(to_element).collect()))
    }

    /// Reads one chunk of the body into the splitter. On an error, `out`
    /// still gets the elements that were complete before it.
    async fn read_chunk(&mut self, out: &mut Vec<RawElement>) -> Result<(), SourceError> {
        let chunk = match self.body.chunk().await {
            Some(Ok(chunk)) => chunk,
            None => {
                let _ = self.splitter.flush(out);
                return Err(SourceError::BodyStopped { tenant: self.tenant.clone() });
            }
            Some(Err(source)) => {
                // The body's error is the one to report.
                let _ = self.splitter.flush(out);
                return Err(SourceError::Network {
                    tenant: self.tenant.clone(),
                    url: "response body".into(),
                    proxy: self.proxy.clone(),
                    source: source.without_url(),
                });
            }
        };
        match chunk {
            Some(bytes) => {
                self.received += bytes.len() as u64;
                if self.received > self.limit {
                    let _ = self.splitter.flush(out);
                    return Err(SourceError::TooLarge { tenant: self.tenant.clone(), limit: self.limit });
                }
                self.splitter.push(&bytes, out).map_err(|e| self.malformed(e))
            }
            None => {
                self.finished = true;
                self.splitter.finish(out).map_err(|e| self.malformed(e))
            }
        }
    }

    /// Elements found so far.
    pub fn elements(&self) -> usize {
        self.splitter.elements()
    }

    fn malformed(&self, detail: ArrayError) -> SourceError {

        SourceError::Malformed {
            tenant: self.tenant.clone(),
            status: self.status,
            content_type: if self.content_type.is_empty() { "(none)".into() } else { self.content_type.clone() },
            detail,
        }
    }
}

fn to_element(element: RawElement) -> Element {
    let text = match String::from_utf8(element.bytes) {
        Ok(text) => text,
        Err(e) => {
            let reason = format!("not valid UTF-8 (first invalid byte at offset {})", e.utf8_error().valid_up_to());
            return Element::Invalid { raw: e.into_bytes(), reason };
        }
    };
    if let Some(keys) = element.keys {
        return Element::Detection(Detection::from_scanned(text, keys));
    }
    match Detection::from_string(text) {
        Ok(detection) => Element::Detection(detection),
        Err((raw, e)) => Element::Invalid { raw: raw.into_bytes(), reason: e.to_string() },
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = DateTime::parse_from_rfc2822(text).ok()?;
    let wait = date.with_timezone(&Utc) - Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// Reads the start of an error body on one line, for messages. `secrets` are
/// removed before it is cut short, so no part of one can remain.
async fn error_body(response: reqwest::Response, secrets: &[&str]) -> String {
    match response.bytes().await {
        Ok(bytes) if bytes.is_empty() => "empty body".into(),
        Ok(bytes) => preview(crate::redact::redact(&String::from_utf8_lossy(&bytes), secrets).as_bytes()),
        Err(e) => format!("body unreadable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn query_pairs_repeat_machine_groups() {
        let query = Query {
            since: timefmt::parse("2026-01-01T00:00:00.1234567Z"),
            limit: 20,
            machine_groups: vec!["UK".into(), "France".into()],
            ..Query::default()
        };
        let pairs = query.pairs();
        assert_eq!(pairs[0], ("sinceTimeUtc", "2026-01-01T00:00:00.1234567Z".to_string()));
        assert_eq!(pairs[1], ("limit", "20".to_string()));
        assert_eq!(pairs[2], ("machinegroups", "UK".to_string()));
        assert_eq!(pairs[3], ("machinegroups", "France".to_string()));
    }

    #[test]
    fn query_encodes_spaces_and_non_ascii() {
        let query = Query {
            limit: 5,
            machine_groups: vec!["UK Servers".into(), "Zürich&Genève=1".into()],
            device_created_machine_tags: Some("vip +tag".into()),
            cloud_created_machine_tags: Some("財務".into()),
            ..Query::default()
        };
        let request = reqwest::Client::new()
            .get("http://127.0.0.1:9/api/alerts")
            .query(&query.pairs())
            .build()
            .unwrap();
        assert_eq!(
            request.url().query(),
            Some("limit=5&machinegroups=UK+Servers&machinegroups=Z%C3%BCrich%26Gen%C3%A8ve%3D1&DeviceCreatedMachineTags=vip+%2Btag&CloudCreatedMachineTags=%E8%B2%A1%E5%8B%99")
        );
    }

    #[test]
    fn invalid_utf8_element_keeps_exact_bytes() {
        let bytes = b"{\"FullId\":\"a\xff\xfeb\"}".to_vec();
        let element = to_element(RawElement { bytes: bytes.clone(), keys: None });
        let Element::Invalid { raw, reason } = element else { panic!("{element:?}") };
        assert_eq!(raw, bytes);
        assert!(reason.contains("not valid UTF-8"), "{reason}");
        assert!(reason.contains("offset 12"), "{reason}");
    }

    #[test]
    fn empty_query_sends_no_parameters() {
        assert!(Query::default().pairs().is_empty());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
