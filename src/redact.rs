//! Text for messages: known secrets removed from what came from outside
//! (response bodies, error descriptions), and error chains on one line.

/// Replaces each secret in `text`, also in its URL-encoded form (a server
/// that echoes a form-encoded request shows it that way), with `[redacted]`.
/// Secrets shorter than 4 characters are ignored: they would match by chance.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        for form in [secret.to_string(), encoded.clone(), encoded.replace('+', "%20")] {
            if out.contains(&form) {
                out = out.replace(&form, "[redacted]");
            }
        }
    }
    out
}

/// Returns the URL `text` for messages, with its user name, password and
/// query string replaced by `redacted`, because each may carry a
/// credential. Text that is not a URL is returned as it is.
pub fn url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text.trim()) else {
        return unparsed_url(text);
    };
    // Both setters fail only for URLs that cannot have a user (no host),
    // and such a URL has none to hide.
    if !url.username().is_empty() {
        let _ = url.set_username("redacted");
    }
    if url.password().is_some() {
        let _ = url.set_password(Some("redacted"));
    }
    if url.query().is_some() {
        url.set_query(Some("redacted"));
    }
    if url.fragment().is_some() {
        url.set_fragment(Some("redacted"));
    }
    url.to_string()
}

/// Hides the parts of text that failed to parse as a URL where a URL keeps
/// credentials: everything before the last `@` (after `://`, when the text
/// has it), and everything after the first `?`.
fn unparsed_url(text: &str) -> String {
    let mut redacted = text.to_string();
    // The user part first: a password may contain the `?` of the query.
    if let Some(at) = redacted.rfind('@') {
        let user_start = redacted.find("://").map_or(0, |scheme_end| scheme_end + 3);
        if at > user_start {
            redacted.replace_range(user_start..at, "redacted");
        }
    }
    if let Some(query) = redacted.find('?') {
        redacted.replace_range(query + 1.., "redacted");
    }
    redacted
}

/// Returns the parts of the URL `text` that may be credentials, for a
/// redactor of response text: the user name, the password, `user:password`
/// (sent base64-encoded as Basic authentication), the query string and
/// each query value, decoded and as written. Parts shorter than 4
/// characters are left out, because they would match by chance.
pub fn url_secrets(text: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(text.trim()) else {
        return Vec::new();
    };
    let decode = |part: &str| percent_encoding::percent_decode_str(part).decode_utf8_lossy().into_owned();
    let mut secrets = Vec::new();
    let user = url.username();
    let password = url.password().unwrap_or("");
    for part in [user, password] {
        secrets.push(part.to_string());
        secrets.push(decode(part));
    }
    if !user.is_empty() || !password.is_empty() {
        secrets.push(format!("{}:{}", decode(user), decode(password)));
    }
    if let Some(query) = url.query() {
        secrets.push(query.to_string());
        for (_, value) in url.query_pairs() {
            secrets.push(value.into_owned());
        }
        for pair in query.split('&') {
            secrets.push(pair.split_once('=').map_or(pair, |(_, value)| value).to_string());
        }
    }
    secrets.retain(|secret| secret.len() >= 4);
    secrets.sort();
    secrets.dedup();
    secrets
}

/// An error and its sources on one line ("error sending request: connection
/// refused"), because HTTP client errors name the cause only in a source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_url_encoded_forms_are_removed() {
        let secret = "Ab+c/d=e f";
        let text = "echo: client_secret=Ab%2Bc%2Fd%3De+f and Ab+c/d=e f and Ab%2Bc%2Fd%3De%20f";
        let cleaned = redact(text, &[secret]);
        assert!(!cleaned.contains("Ab"), "{cleaned}");
        assert_eq!(cleaned.matches("[redacted]").count(), 3);
    }

    #[test]
    fn url_hides_user_password_and_query() {
        let redacted = url("https://user:p%40ss@collector.example:8443/ingest/path?token=abc123&x=1#frag");
        assert_eq!(redacted, "https://redacted:redacted@collector.example:8443/ingest/path?redacted#redacted");
        assert_eq!(url("https://TOKEN@collector.example/"), "https://redacted@collector.example/");
        assert_eq!(url("http://127.0.0.1:8088"), "http://127.0.0.1:8088/");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn unparsable_url_hides_user_and_query() {
        let redacted = url("https://alice:pw-secret-123@collector.example:99999/ingest?token=q-secret");
        assert_eq!(redacted, "https://redacted@collector.example:99999/ingest?redacted");
        assert_eq!(url("https://a:b@c@splunk example:8088"), "https://redacted@splunk example:8088");
        assert_eq!(url("http://aliceUser:S3cret?Pass@127.0.0.1:1/"), "http://redacted@127.0.0.1:1/");
        assert_eq!(url("T0ken-value@collector.example"), "redacted@collector.example");
    }

    #[test]
    fn url_secrets_cover_basic_auth_and_query() {
        let secrets = url_secrets("https://alice:p%40ss-word@collector.example/ingest?token=query-secret&id=xy");
        for expected in ["alice", "p%40ss-word", "p@ss-word", "alice:p@ss-word", "token=query-secret&id=xy", "query-secret"] {
            assert!(secrets.iter().any(|s| s == expected), "{expected} missing from {secrets:?}");
        }
        assert!(!secrets.iter().any(|s| s == "xy"), "short values are left out: {secrets:?}");
        assert!(url_secrets("https://collector.example/ingest").is_empty());
    }

    #[test]
    fn short_secrets_are_left_alone() {
        assert_eq!(redact("abc", &["abc"]), "abc");
    }
}
