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
    fn short_secrets_are_left_alone() {
        assert_eq!(redact("abc", &["abc"]), "abc");
    }
}
