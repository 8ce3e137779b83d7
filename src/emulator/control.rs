//! The `/_emulator/` control API for clients in another process; the module
//! documentation of `emulator` lists its requests.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::server::{json_response, method_not_allowed, text_response, HttpResponse};
use super::state::{Shared, StoredDetection};
use super::{data, Fault};

/// Upper bound on `count`, so a typo cannot exhaust memory.
const MAX_COUNT: u64 = 100_000;

pub(super) fn handle(
    shared: &Arc<Shared>,
    method: &Method,
    action: &str,
    query: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    let expected = match action {
        "faults" | "detections" | "tokens/revoke" => Method::POST,
        "stats" => Method::GET,
        _ => {
            let message = format!(
                "unknown control endpoint /_emulator/{action}; use faults, detections, tokens/revoke or stats\n"
            );
            return text_response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", message);
        }
    };
    if *method != expected {
        return method_not_allowed(if expected == Method::GET { "GET" } else { "POST" });
    }

    let result = match action {
        "faults" => queue_faults(shared, body).map(|value| value.to_string()),
        "detections" => add_detections(shared, query, body),
        "tokens/revoke" => {
            shared.lock().tokens.clear();
            Ok(json!({ "revoked": true }).to_string())
        }
        _ => Ok(stats(shared).to_string()),
    };
    match result {
        Ok(text) => json_response(StatusCode::OK, text),
        Err(message) => json_response(StatusCode::BAD_REQUEST, json!({ "error": message }).to_string()),
    }
}

fn queue_faults(shared: &Shared, body: &[u8]) -> Result<Value, String> {
    let request: Value = serde_json::from_slice(body).map_err(|error| format!("invalid JSON body: {error}"))?;
    let Value::Object(request) = request else {
        return Err("the body must be a JSON object describing one fault".to_string());
    };
    let fault = parse_fault(&request)?;
    let count = optional_u64(&request, "count")?.unwrap_or(1);
    if count == 0 || count > MAX_COUNT {
        return Err(format!("count must be from 1 to {MAX_COUNT}, got {count}"));
    }

    let mut state = shared.lock();
    for _ in 0..count {
        state.faults.push_back(fault.clone());
    }
    Ok(json!({ "queued": state.faults.len() }))
}

/// Parses one fault object; `kind` defaults to `status` when `status` is given.
pub(super) fn parse_fault(request: &Map<String, Value>) -> Result<Fault, String> {
    let kind = match request.get("kind") {
        None if request.contains_key("status") => "status",
        None => {
            return Err(
                "missing \"kind\": use status, empty, html, truncated, not_array, slow or unauthorized".to_string()
            )
        }
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => return Err(format!("\"kind\" must be a string, got {other}")),
    };
    match kind {
        "status" => {
            let status = optional_u64(request, "status")?.ok_or("a status fault needs \"status\", such as 429")?;
            let status = u16::try_from(status)
                .ok()
                .filter(|status| (100..=999).contains(status))
                .ok_or_else(|| format!("\"status\" must be an HTTP status from 100 to 999, got {status}"))?;
            let body = match request.get("body") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(body)) => body.clone(),
                Some(other) => other.to_string(),
            };
            Ok(Fault::Status { status, retry_after_secs: optional_u64(request, "retry_after_secs")?, body })
        }
        "empty" => Ok(Fault::EmptyOk),
        "html" => Ok(Fault::Html),
        "truncated" => Ok(Fault::Truncated),
        "not_array" => Ok(Fault::NotArray),
        "unauthorized" => Ok(Fault::Unauthorized),
        "slow" => {
            let secs = request
                .get("secs")
                .and_then(Value::as_f64)
                .ok_or("a slow fault needs \"secs\", a number of seconds such as 3 or 0.5")?;
            let delay = Duration::try_from_secs_f64(secs)
                .map_err(|_| format!("\"secs\" must be a non-negative number of seconds, got {secs}"))?;
            Ok(Fault::Slow(delay))
        }
        other => Err(format!(
            "unknown fault kind \"{other}\": use status, empty, html, truncated, not_array, slow or unauthorized"
        )),
    }
}

fn optional_u64(request: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("\"{name}\" must be a non-negative whole number, got {value}")),
    }
}

/// Adds detections and returns the JSON text of the array of those added.
fn add_detections(shared: &Shared, query: Option<&str>, body: &[u8]) -> Result<String, String> {
    let mut tenant = None;
    let mut count = None;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "tenant" => tenant = Some(value.into_owned()),
            "count" => {
                let parsed = value
                    .parse::<u64>()
                    .ok()
                    .filter(|count| (1..=MAX_COUNT).contains(count))
                    .ok_or_else(|| format!("count must be a whole number from 1 to {MAX_COUNT}, got '{value}'"))?;
                count = Some(parsed as usize);
            }
            _ => {}
        }
    }
    let tenant = match tenant {
        Some(tenant) => tenant,
        None => only_tenant(shared)?,
    };

    if !body.iter().all(u8::is_ascii_whitespace) {
        let texts = super::parse_detection_texts(body)
            .map_err(|error| format!("the body must be a JSON array of detections: {error}"))?;
        let stored: Vec<StoredDetection> = texts.iter().map(|text| StoredDetection::from_text(text.get())).collect();
        shared.lock().tenant_mut(&tenant).detections.extend(stored);
        let texts: Vec<&str> = texts.iter().map(|text| text.get()).collect();
        return Ok(format!("[{}]", texts.join(",")));
    }

    let added: Vec<Value> = (0..count.unwrap_or(1)).map(|_| data::new_detection(shared, &tenant)).collect();
    Ok(Value::Array(added).to_string())
}

fn only_tenant(shared: &Shared) -> Result<String, String> {
    let state = shared.lock();
    let mut tenants = state.tenants.values();
    match (tenants.next(), tenants.next()) {
        (Some(tenant), None) => Ok(tenant.id.clone()),
        (None, _) => Err("the emulator has no tenant yet; pass ?tenant=ID".to_string()),
        (Some(_), Some(_)) => Err("the emulator has several tenants; pass ?tenant=ID".to_string()),
    }
}

fn stats(shared: &Shared) -> Value {
    let state = shared.lock();
    let mut sorted: Vec<_> = state.tenants.values().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut tenants = Map::new();
    for tenant in sorted {
        tenants.insert(tenant.id.clone(), json!({ "detections": tenant.detections.len() }));
    }
    json!({
        "tenants": tenants,
        "alerts_requests": state.alerts_requests,
        "token_requests": state.token_requests,
        "faults_queued": state.faults.len(),
    })
}
