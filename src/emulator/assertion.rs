//! Checks a client assertion (certificate credential) as Azure AD does.
//! The certificate named by `x5t` must be registered for the tenant, and the
//! RS256 signature must verify with its public key. The claims must name the
//! client, the token URL and a time range that includes now.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::StatusCode;
use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use serde_json::Value;

use crate::auth::{rsa_public_key, thumbprint, ASSERTION_TYPE};

/// Clock skew Azure AD tolerates on `nbf` and `exp`, in seconds (an estimate:
/// Microsoft documents no exact value).
const CLOCK_SKEW_SECS: i64 = 300;

// NOTE: 50027, 700021, 700024 and 700027 follow the codes Azure AD sends for
// these cases; 700212 (audience) and 700025 (reused jti) are the emulator's
// own choice and may differ from Azure AD.

/// A rejection: HTTP status, OAuth `error`, AADSTS code and message.
pub(super) type Rejection = (StatusCode, &'static str, u32, String);

/// The request fields and tenant certificates a check needs.
pub(super) struct AssertionCheck<'a> {
    pub assertion_type: &'a str,
    pub assertion: Option<&'a str>,
    pub client_id: &'a str,
    /// URLs the `aud` claim may name: the token URL as http and as https.
    pub audiences: &'a [String],
    /// DER certificates registered for the tenant's app.
    pub certificates: &'a [Vec<u8>],
    pub now: i64,
}

/// Verifies the assertion and returns its `jti`.
pub(super) fn verify(check: &AssertionCheck<'_>, seen_ids: &HashSet<String>) -> Result<String, Rejection> {
    if check.assertion_type != ASSERTION_TYPE {
        return Err(malformed(format!(
            "The client_assertion_type '{}' is not supported; use '{ASSERTION_TYPE}'.",
            check.assertion_type
        )));
    }
    let Some(assertion) = check.assertion else {
        return Err(malformed("The request body must contain the following parameter: 'client_assertion'.".into()));
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return Err(malformed("The client assertion is not a JWT with three parts.".into()));
    };
    let header = decode_json(header).ok_or_else(|| malformed("The JWT header is not base64url JSON.".into()))?;
    let claims = decode_json(claims).ok_or_else(|| malformed("The JWT payload is not base64url JSON.".into()))?;
    let signature =
        URL_SAFE_NO_PAD.decode(signature).map_err(|_| malformed("The JWT signature is not base64url.".into()))?;
    if header["alg"] != "RS256" {
        return Err(malformed(format!("The JWT algorithm {} is not supported; use RS256.", header["alg"])));
    }

    let x5t = header["x5t"].as_str().unwrap_or_default();
    let certificate = check.certificates.iter().find(|der| thumbprint(der) == x5t).ok_or_else(|| {
        invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. The certificate with identifier '{x5t}' used to sign the client assertion is not registered on application '{}'.",
                check.client_id
            ),
        )
    })?;
    let public_key = rsa_public_key(certificate)
        .ok_or_else(|| invalid_client(700027, "The registered certificate has no RSA key.".into()))?;
    let signed = &assertion[..assertion.len() - parts[2].len() - 1];
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| invalid_client(700027, "Client assertion contains an invalid signature.".into()))?;

    if claims["iss"] != check.client_id || claims["sub"] != check.client_id {
        return Err(invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.".into(),
        ));
    }
    let audience = claims["aud"].as_str().unwrap_or_default();
    if !check.audiences.iter().any(|expected| expected == audience) {
        return Err(invalid_client(
            700212,
            format!("The audience '{audience}' of the client assertion is not the token endpoint of this request."),
        ));
    }
    let (Some(not_before), Some(expires)) = (claims["nbf"].as_i64(), claims["exp"].as_i64()) else {
        return Err(malformed("The client assertion has no numeric nbf and exp claims.".into()));
    };
    if not_before > check.now + CLOCK_SKEW_SECS || expires <= check.now - CLOCK_SKEW_SECS {
        return Err(invalid_client(
            700024,
            format!("Client assertion is not within its valid time range. Current time: {}, assertion valid from {not_before} to {expires}.", check.now),
        ));
    }
    let id = claims["jti"].as_str().unwrap_or_default().to_string();
    if id.is_empty() || seen_ids.contains(&id) {
        return Err(invalid_client(700025, "The client assertion's jti is missing or was used before.".into()));
    }
    Ok(id)
}

fn decode_json(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

fn malformed(message: String) -> Rejection {
    (StatusCode::BAD_REQUEST, "invalid_request", 50027, message)
}

fn invalid_client(code: u32, message: String) -> Rejection {
    (StatusCode::UNAUTHORIZED, "invalid_client", code, message)
}
