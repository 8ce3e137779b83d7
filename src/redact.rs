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
        return text.to_string();
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
    fn short_secrets_are_left_alone() {
        assert_eq!(redact("abc", &["abc"]), "abc");
    }
}
