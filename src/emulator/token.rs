//! The Azure AD token endpoint for the client credentials grant, v1
//! (`resource`) and v2.0 (`scope`).
//!
//! Errors follow Azure AD: a JSON body with `error`, an `error_description`
//! that starts with an `AADSTS` code and ends with trace id, correlation id
//! and timestamp lines, and the same values as separate fields.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use hyper::header::{HeaderValue, CACHE_CONTROL, PRAGMA};
use hyper::StatusCode;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::server::{json_response, HttpResponse};
use super::assertion::{self, AssertionCheck};
use super::state::{base64_url, IssuedToken, Shared, State};
use super::{ExpiryFormat, TenantSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenVersion {
    /// `/oauth2/token`: requires `resource`, and the response includes
    /// `expires_on`, `not_before` and `resource`.
    V1,
    /// `/oauth2/v2.0/token`: requires `scope`, and the response includes
    /// only the expiry durations, as Azure AD v2.0 does.
    V2,
}

/// Length of the random part of an access token, in bytes.
const TOKEN_BYTES: usize = 48;

pub(super) fn handle(
    shared: &Arc<Shared>,
    tenant_id: &str,
    version: TokenVersion,
    body: &[u8],
    audiences: &[String],
) -> HttpResponse {
    let mut form: HashMap<String, String> = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(body) {
        // Like Azure AD, the first occurrence of a repeated field counts.
        form.entry(name.into_owned()).or_insert_with(|| value.into_owned());
    }

    let mut state = shared.lock();
    state.token_requests += 1;
    match check_request(&state, tenant_id, version, &form, audiences) {
        Ok((tenant_key, assertion_id)) => {
            if let Some(id) = assertion_id {
                state.assertion_ids.insert(id);
            }
            tracing::debug!(tenant = tenant_id, "emulator issued a token");
            issue_token(&mut state, tenant_key, version, &form)
        }
        Err(error) => {
            tracing::debug!(tenant = tenant_id, code = error.code, "emulator rejected a token request");
            aad_error(&mut state, error)
        }
    }
}

/// A rejected token request, rendered by [`aad_error`].
struct AadError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    message: String,
}

impl AadError {
    fn missing_parameter(name: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            code: 900144,
            message: format!("The request body must contain the following parameter: '{name}'."),
        }
    }
}

/// Checks the request in Azure AD's order (tenant, grant, client, secret,
/// resource) and returns the tenant's key and the `jti` of a client assertion.
fn check_request(
    state: &State,
    tenant_id: &str,
    version: TokenVersion,
    form: &HashMap<String, String>,
    audiences: &[String],
) -> Result<(String, Option<String>), AadError> {
    let field = |name: &str| form.get(name).map(String::as_str).filter(|value| !value.is_empty());

    let credentials = state.tenant(tenant_id).and_then(|tenant| tenant.credentials.as_ref());
    let Some(credentials) = credentials else {
        return Err(AadError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            code: 90002,
            message: format!(
                "Tenant '{tenant_id}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        });
    };

    let grant_type = field("grant_type").ok_or_else(|| AadError::missing_parameter("grant_type"))?;
    if grant_type != "client_credentials" {
        return Err(AadError {
            status: StatusCode::BAD_REQUEST,
            error: "unsupported_grant_type",
            code: 70003,
            message: format!("The app requested an unsupported grant type '{grant_type}'."),
        });
    }

    let client_id = field("client_id").ok_or_else(|| AadError::missing_parameter("client_id"))?;
    if client_id != credentials.client_id {
        return Err(AadError {
            status: StatusCode::BAD_REQUEST,
            error: "unauthorized_client",
            code: 700016,
            message: format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant_id}'. This can happen if the application has not been installed by the administrator of the tenant."
            ),
        });
    }

    let mut assertion_id = None;
    if let Some(assertion_type) = field("client_assertion_type") {
        let certificates = state.tenant(tenant_id).map(|t| t.certificates.as_slice()).unwrap_or_default();
        let check = AssertionCheck {
            assertion_type,
            assertion: field("client_assertion"),
            client_id,
            audiences,
            certificates,
            now: Utc::now().timestamp(),
        };
        let id = assertion::verify(&check, &state.assertion_ids)
            .map_err(|(status, error, code, message)| AadError { status, error, code, message })?;
        assertion_id = Some(id);
    } else {
        check_secret(field("client_secret"), credentials, client_id)?;
    }

    let target = match version {
        TokenVersion::V1 => "resource",
        TokenVersion::V2 => "scope",
    };
    field(target).ok_or_else(|| AadError::missing_parameter(target))?;

    Ok((tenant_id.to_ascii_lowercase(), assertion_id))
}

fn check_secret(client_secret: Option<&str>, credentials: &TenantSpec, client_id: &str) -> Result<(), AadError> {
    let Some(client_secret) = client_secret else {
        return Err(AadError {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            code: 7000218,
            message: "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
                .to_string(),
        });
    };
    if client_secret != credentials.client_secret {
        return Err(AadError {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            code: 7000215,
            message: format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        });
    }
    Ok(())
}

fn issue_token(
    state: &mut State,
    tenant_key: String,
    version: TokenVersion,
    form: &HashMap<String, String>,
) -> HttpResponse {
    let now = Instant::now();
    let lifetime = state.options.token_lifetime;
    let format = state.options.expiry_format;
    state.purge_expired_tokens(now);

    let access_token = base64_url(&state.rng.bytes(TOKEN_BYTES));
    state.tokens.insert(access_token.clone(), IssuedToken { tenant_key, expires_at: now + lifetime });

    let lifetime_secs = lifetime.as_secs();
    let issued_at = Utc::now().timestamp();
    let mut body = Map::new();
    body.insert("token_type".into(), "Bearer".into());
    insert_expiry(&mut body, "expires_in", lifetime_secs as i64, format);
    insert_expiry(&mut body, "ext_expires_in", lifetime_secs as i64, format);
    if version == TokenVersion::V1 {
        insert_expiry(&mut body, "expires_on", issued_at + lifetime_secs as i64, format);
        insert_expiry(&mut body, "not_before", issued_at, format);
        let resource = form.get("resource").cloned().unwrap_or_default();
        body.insert("resource".into(), Value::String(resource));
    }
    body.insert("access_token".into(), Value::String(access_token));

    let mut response = json_response(StatusCode::OK, Value::Object(body).to_string());
    add_no_store(&mut response);
    response
}

fn insert_expiry(body: &mut Map<String, Value>, name: &str, value: i64, format: ExpiryFormat) {
    match format {
        ExpiryFormat::Number => {
            body.insert(name.into(), Value::from(value));
        }
        ExpiryFormat::String => {
            body.insert(name.into(), Value::String(value.to_string()));
        }
        ExpiryFormat::Missing => {}
    }
}

fn aad_error(state: &mut State, error: AadError) -> HttpResponse {
    let trace_id = state.rng.guid();
    let correlation_id = state.rng.guid();
    let timestamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
    let code = error.code;
    let description = format!(
        "AADSTS{code}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
        error.message
    );
    let body = json!({
        "error": error.error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    let mut response = json_response(error.status, body.to_string());
    add_no_store(&mut response);
    response
}

fn add_no_store(response: &mut HttpResponse) {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store, no-cache"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
}
