//! `GET /api/alerts`: bearer token check, injected faults, query and the
//! JSON array response.

use std::sync::Arc;

use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use super::query::{self, AlertQuery};
use super::server::{json_response, method_not_allowed, text_response, HttpResponse};
use super::state::{Shared, State};
use super::{Fault, RecordedRequest};

/// The page an intercepting proxy sends in place of the API's response.
const PROXY_ERROR_PAGE: &str = concat!(
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n",
    "<body><h1>Bad Gateway</h1>\n",
    "<p>The proxy server received an invalid response from an upstream server.</p>\n",
    "</body></html>\n",
);

/// True for `/api/alerts` and `/api/alerts/`, ignoring case as ASP.NET routing does.
pub(super) fn is_alerts_path(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    path.eq_ignore_ascii_case("/api/alerts")
}

/// The caller as identified by its bearer token.
struct Caller {
    tenant_key: String,
    tenant_id: String,
    forbidden: bool,
}

pub(super) async fn handle(shared: &Arc<Shared>, parts: &Parts) -> HttpResponse {
    let pairs: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|query| url::form_urlencoded::parse(query.as_bytes()).into_owned().collect())
        .unwrap_or_default();

    let fault = shared.lock().faults.pop_front();
    let response = match fault {
        None => respond_normally(shared, parts, &pairs),
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            respond_normally(shared, parts, &pairs)
        }
        Some(Fault::Truncated) => truncate(respond_normally(shared, parts, &pairs)).await,
        Some(Fault::Status { status, retry_after_secs, body }) => status_response(status, retry_after_secs, body),
        Some(Fault::EmptyOk) => json_response(StatusCode::OK, ""),
        Some(Fault::Html) => text_response(StatusCode::OK, "text/html; charset=utf-8", PROXY_ERROR_PAGE),
        Some(Fault::NotArray) => json_response(StatusCode::OK, r#"{"value":[]}"#),
        Some(Fault::Unauthorized) => unauthorized("Authorization has been denied for this request."),
    };

    let response = if accepts_gzip(parts) { gzip(response).await } else { response };
    let gzip = response.headers().contains_key(CONTENT_ENCODING);
    let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_string);

    let mut state = shared.lock();
    let tenant_id = authenticate(&state, parts).ok().map(|caller| caller.tenant_id);
    tracing::debug!(
        tenant = tenant_id.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        query = parts.uri.query().unwrap_or_default(),
        "emulator served /api/alerts"
    );
    state.record(RecordedRequest {
        path: parts.uri.path().to_string(),
        query: pairs,
        status: response.status().as_u16(),
        tenant_id,
        user_agent,
        gzip,
    });
    response
}

/// True when `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(parts: &Parts) -> bool {
    parts.headers.get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let mut fields = item.split(';').map(str::trim);
        let coding = fields.next().unwrap_or_default();
        let refused = fields.any(|p| p.replace(' ', "").eq_ignore_ascii_case("q=0"));
        coding.eq_ignore_ascii_case("gzip") && !refused
    })
}

/// Compresses a successful response's body with gzip.
async fn gzip(response: HttpResponse) -> HttpResponse {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let compressed = std::io::Write::write_all(&mut encoder, &bytes).and_then(|()| encoder.finish());
    match compressed {
        Ok(compressed) => {
            parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            HttpResponse::from_parts(parts, Full::new(compressed.into()))
        }
        // Only an allocation failure could fail the write, and then the plain body is still correct.
        Err(_) => HttpResponse::from_parts(parts, Full::new(bytes)),
    }
}

/// Handles a request that no fault replaces.
fn respond_normally(shared: &Shared, parts: &Parts, pairs: &[(String, String)]) -> HttpResponse {
    if parts.method != Method::GET {
        return method_not_allowed("GET");
    }
    let state = shared.lock();
    let caller = match authenticate(&state, parts) {
        Ok(caller) => caller,
        Err(message) => return unauthorized(message),
    };
    if caller.forbidden {
        let message = format!(
            "Tenant '{}' is not onboarded to Microsoft Defender for Endpoint or has no SIEM integration enabled.",
            caller.tenant_id
        );
        return api_error(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let query = match query::parse(pairs, Utc::now()) {
        Ok(query) => query,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    json_response(StatusCode::OK, select(&state, &caller.tenant_key, &query))
}

/// Identifies the caller from the `Authorization` header, or returns the
/// message of a 401 response.
fn authenticate(state: &State, parts: &Parts) -> Result<Caller, &'static str> {
    let Some(header) = parts.headers.get(AUTHORIZATION) else {
        return Err("The Authorization header is missing. Send 'Authorization: Bearer <access token>'.");
    };
    let header = header.to_str().unwrap_or_default().trim();
    let token = match header.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("Bearer") => token.trim(),
        _ => return Err("The Authorization header must have the form 'Bearer <access token>'."),
    };
    let Some(issued) = state.tokens.get(token) else {
        return Err("The access token is invalid. Request a new token.");
    };
    if issued.expires_at <= Instant::now() {
        return Err("The access token has expired. Request a new token.");
    }
    let Some(tenant) = state.tenants.get(&issued.tenant_key) else {
        return Err("The access token is invalid. Request a new token.");
    };
    Ok(Caller {
        tenant_key: issued.tenant_key.clone(),
        tenant_id: tenant.id.clone(),
        forbidden: tenant.credentials.as_ref().is_some_and(|spec| spec.forbidden),
    })
}

/// Builds the response body: the matching detections as a JSON array,
/// ascending by `LastProcessedTimeUtc`, each in its stored JSON text.
fn select(state: &State, tenant_key: &str, query: &AlertQuery) -> String {
    let Some(tenant) = state.tenants.get(tenant_key) else {
        return "[]".to_string();
    };
    let mut selected: Vec<_> = tenant.detections.iter().filter(|detection| query.matches(detection)).collect();
    // A stable sort keeps insertion order among equal times.
    selected.sort_by_key(|detection| detection.last_processed);
    if let Some(limit) = query.limit {
        let skip = selected.len().saturating_sub(limit);
        selected.drain(..skip);
    }

    let length: usize = selected.iter().map(|detection| detection.json.len() + 1).sum();
    let mut body = String::with_capacity(length + 2);
    body.push('[');
    for (index, detection) in selected.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(&detection.json);
    }
    body.push(']');
    body
}

fn unauthorized(message: &str) -> HttpResponse {
    let mut response = api_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn api_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let body = json!({ "error": { "code": code, "message": message } });
    json_response(status, body.to_string())
}

/// Cuts a successful response's body in the middle, keeping the status.
async fn truncate(response: HttpResponse) -> HttpResponse {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let cut = bytes.slice(..bytes.len() / 2);
    HttpResponse::from_parts(parts, Full::new(cut))
}

/// Builds the response of a `Status` fault. A body that looks like JSON is
/// labelled as JSON, anything else as plain text.
fn status_response(status: u16, retry_after_secs: Option<u64>, body: String) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let trimmed = body.trim_start();
    let content_type = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        "application/json; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = text_response(status, content_type, body);
    if let Some(secs) = retry_after_secs {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
