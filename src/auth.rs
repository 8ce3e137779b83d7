//! OAuth2 client-credentials tokens for one tenant, refreshed ahead of expiry.
//!
//! Expiry is computed from `expires_in` against the local time the response
//! arrived, so a skewed clock cannot make an expired token look valid. Only
//! one refresh runs at a time: callers wait on the same mutex.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{ClientCredential, ResolvedTenant, Secret, TokenEndpoint};

mod assertion;

pub use assertion::{rsa_public_key, thumbprint, ClientCertificate, ASSERTION_TYPE};

/// Lifetime assumed when the token response gives neither `expires_in` nor
/// `expires_on`; a 401 from the API still forces an early refresh.
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Azure AD rejected the credentials or the request.
    #[error("token request for tenant {tenant} rejected with HTTP {status}: {summary}. {hint}")]
    Rejected { tenant: String, status: u16, summary: String, hint: &'static str },
    #[error("token request for tenant {tenant} failed with HTTP {status}: {summary}")]
    Unavailable { tenant: String, status: u16, summary: String, retry_after: Option<Duration> },
    /// `proxy` is the proxy the request went through, redacted.
    #[error("token request for tenant {tenant} to {url}{} failed: {}{}", through_proxy(proxy.as_deref()), crate::redact::error_chain(source), proxy_advice(proxy.as_deref(), source))]
    Network { tenant: String, url: String, proxy: Option<String>, source: reqwest::Error },
    #[error("token response for tenant {tenant} is invalid: {detail}")]
    Malformed { tenant: String, detail: String },
    #[error("tenant {tenant}: cannot build the client assertion: {source}")]
    Assertion { tenant: String, source: assertion::AssertionError },
}

/// Returns " through proxy URL" for a request that went through a proxy,
/// so that a proxy that is down is not taken for the server being down.
pub(crate) fn through_proxy(proxy: Option<&str>) -> String {
    proxy.map(|proxy| format!(" through proxy {proxy}")).unwrap_or_default()
}

/// Returns the advice for a token or API request that failed through a
/// proxy (see [`crate::sink::proxy_advice`]), or nothing without a proxy.
pub(crate) fn proxy_advice(proxy: Option<&str>, source: &reqwest::Error) -> String {
    match proxy {
        Some(_) => crate::sink::proxy_advice(source, "server", "host of the URL"),
        None => String::new(),
    }
}

impl AuthError {
    /// Returns whether trying again soon can help (server trouble, not bad credentials).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, AuthError::Rejected { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Clone)]
struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

pub struct TokenSource {
    http: reqwest::Client,
    tenant: Arc<ResolvedTenant>,
    cached: Mutex<Option<CachedToken>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<Secret>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    expires_on: Option<Value>,
}

/// Azure AD's error body.
#[derive(Deserialize, Default)]
struct AadError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Option<Vec<Value>>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

impl TokenSource {
    pub fn new(http: reqwest::Client, tenant: Arc<ResolvedTenant>) -> Self {
        Self { http, tenant, cached: Mutex::new(None) }
    }

    /// Returns a valid token, fetching a new one when the cached one is due for refresh.
    pub async fn token(&self) -> Result<Secret, AuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.value.clone());
            }
        }
        let fresh = self.fetch().await;
        crate::telemetry::global().token_fetched(&self.tenant.name, fresh.is_ok());
        let fresh = fresh?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops `rejected` from the cache after the API returned 401 for it.
    pub async fn invalidate(&self, rejected: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| &t.value == rejected) {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<CachedToken, AuthError> {
        let tenant = &self.tenant;
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", tenant.client_id.clone()),
        ];
        match &tenant.credential {
            ClientCredential::Secret(secret) => form.push(("client_secret", secret.expose().to_string())),
            ClientCredential::Certificate(certificate) => {
                let now = chrono::Utc::now().timestamp();
                let jwt = certificate
                    .assertion(&tenant.client_id, &tenant.token_url, now)
                    .map_err(|source| AuthError::Assertion { tenant: tenant.name.clone(), source })?;
                form.push(("client_assertion_type", ASSERTION_TYPE.to_string()));
                form.push(("client_assertion", jwt));
            }
        }
        match tenant.token_endpoint {
            TokenEndpoint::V1 => form.push(("resource", tenant.resource.clone())),
            TokenEndpoint::V2 => {
                form.push(("scope", format!("{}/.default", tenant.resource.trim_end_matches('/'))))
            }
        }
        let network = |source: reqwest::Error| AuthError::Network {
            tenant: tenant.name.clone(),
            url: tenant.token_url.clone(),
            proxy: tenant.token_proxy.clone(),
            source: source.without_url(),
        };
        let response = self.http.post(&tenant.token_url).form(&form).send().await.map_err(network)?;
        let received = Instant::now();
        let status = response.status();
        let retry_after = crate::source::retry_after(response.headers());
        let body = response.bytes().await.map_err(network)?;
        if !status.is_success() {
            return Err(self.classify_failure(status.as_u16(), &body, retry_after));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| AuthError::Malformed {
            tenant: tenant.name.clone(),
            // The body is not shown: it may hold a token.
            detail: format!("not a JSON token object ({e}); {} bytes received", body.len()),
        })?;
        let value = parsed.access_token.filter(|t| !t.expose().is_empty()).ok_or_else(|| AuthError::Malformed {
            tenant: tenant.name.clone(),
            detail: "no access_token in the response".into(),
        })?;
        let lifetime = lifetime(parsed.expires_in.as_ref(), parsed.expires_on.as_ref());
        let margin = Duration::from_secs(tenant.token_refresh_margin_secs).min(lifetime / 2);
        tracing::debug!(tenant = %tenant.name, lifetime_secs = lifetime.as_secs(), "access token refreshed");
        Ok(CachedToken { value, refresh_at: received + lifetime - margin })
    }

    fn classify_failure(&self, status: u16, body: &[u8], retry_after: Option<Duration>) -> AuthError {
        let aad: AadError = serde_json::from_slice(body).unwrap_or_default();
        let secret = self.tenant.secret().map(Secret::expose).unwrap_or("");
        let summary = summarize_aad(&aad, body, secret);
        let tenant = self.tenant.name.clone();
        if status == 429 || status >= 500 || status == 408 {
            return AuthError::Unavailable { tenant, status, summary, retry_after };
        }
        let hint = match aad.error.as_deref() {
            Some("invalid_client") if self.tenant.secret().is_none() => "Check that client_certificate_file is uploaded to the app registration (Certificates & secrets) and not expired, and that the clocks are right",
            Some("invalid_client") => "Check client_secret: it may be wrong or expired; create a new secret in the app registration",
            Some("unauthorized_client") => "Check client_id and that the app registration exists in this tenant",
            Some("invalid_request") if summary.contains("90002") => "Check tenant_id: Azure AD does not know this tenant",
            Some("invalid_resource") => "Check resource: it must be the API the app has permission for",
            Some("unsupported_grant_type") => "The token endpoint did not accept client credentials; check login_url",
            _ => "Check tenant_id, client_id, the secret, and that admin consent was granted",
        };
        AuthError::Rejected { tenant, status, summary, hint }
    }
}

/// Describes an Azure AD error on one line, without the secret.
fn summarize_aad(aad: &AadError, body: &[u8], secret: &str) -> String {
    let mut parts = Vec::new();
    if let Some(error) = &aad.error {
        parts.push(error.clone());
    }
    if let Some(description) = &aad.error_description {
        let first = description.split(['\r', '\n']).find(|l| !l.trim().is_empty()).unwrap_or("");
        parts.push(first.trim().to_string());
    }
    if let Some(codes) = &aad.error_codes {
        let codes: Vec<String> = codes.iter().map(|c| format!("AADSTS{c}")).collect();
        parts.push(format!("codes {}", codes.join(",")));
    }
    if let Some(trace) = &aad.trace_id {
        parts.push(format!("trace_id {trace}"));
    }
    if let Some(correlation) = &aad.correlation_id {
        parts.push(format!("correlation_id {correlation}"));
    }
    // A body that is not an Azure AD error (a proxy page, an echo of the
    // request) is not shown: it may hold the secret in some encoding.
    let text = if parts.is_empty() {
        format!("a body of {} bytes that is not an Azure AD error; check login_url and any proxy in between", body.len())
    } else {
        parts.join("; ")
    };
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    crate::redact::redact(&one_line, &[secret])
}

/// Returns the token lifetime from `expires_in` (seconds, number or string) or
/// `expires_on` (Unix time, number or string).
fn lifetime(expires_in: Option<&Value>, expires_on: Option<&Value>) -> Duration {
    let as_u64 = |v: &Value| match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    // A lifetime beyond a day is not believed (and would overflow timers).
    const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
    if let Some(secs) = expires_in.and_then(as_u64) {
        return Duration::from_secs(secs).min(MAX_LIFETIME);
    }
    if let Some(epoch) = expires_on.and_then(as_u64) {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        return Duration::from_secs(epoch.saturating_sub(now)).min(MAX_LIFETIME);
    }
    UNKNOWN_LIFETIME
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lifetime_reads_numbers_and_strings() {
        assert_eq!(lifetime(Some(&json!(3599)), None), Duration::from_secs(3599));
        assert_eq!(lifetime(Some(&json!("3599")), None), Duration::from_secs(3599));
        assert_eq!(lifetime(None, None), UNKNOWN_LIFETIME);
        let in_an_hour = chrono::Utc::now().timestamp() + 3600;
        let from_epoch = lifetime(None, Some(&json!(in_an_hour.to_string())));
        assert!(from_epoch > Duration::from_secs(3590), "{from_epoch:?}");
        assert!(from_epoch <= Duration::from_secs(3600), "{from_epoch:?}");
    }

    #[test]
    fn aad_summary_is_one_line_without_the_secret() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret s3cr3t-value provided.\r\nTrace ID: x\r\n","error_codes":[7000215],"trace_id":"t-1","correlation_id":"c-1"}"#;
        let aad: AadError = serde_json::from_slice(body).unwrap();
        let summary = summarize_aad(&aad, body, "s3cr3t-value");
        assert!(!summary.contains('\n'));
        assert!(!summary.contains("s3cr3t-value"));
        assert!(summary.contains("AADSTS7000215"), "{summary}");
        assert!(summary.contains("trace_id t-1"), "{summary}");
    }
}
