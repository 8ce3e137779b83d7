//! Removal of configured secrets from text that a receiver sent back.
//!
//! A receiver may echo the request in an error response, and with it the
//! sink's credentials. Every response body that goes into a sink error (and
//! from there into logs) or into a dead-letter reason is built through
//! [`Redactor::excerpt`], which replaces each secret with `[redacted]`.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

/// The text that takes the place of a secret.
pub const REDACTED: &str = "[redacted]";

/// The secrets of one sink, in every form in which a receiver may echo them.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    /// Secrets and their encoded forms, longest first, so a secret that
    /// contains another is replaced whole.
    patterns: Vec<String>,
}

impl Redactor {
    /// Builds a redactor for `secrets`: each value as is, JSON-escaped,
    /// percent-encoded (upper- and lower-case hex, and the form encoding
    /// with `+` for space) and base64-encoded (standard and URL-safe
    /// alphabets, with and without padding). Empty values are skipped.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).flat_map(encoded_forms).collect();
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Self { patterns }
    }

    /// Replaces every secret in `text` with [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        if self.patterns.is_empty() {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match self.patterns.iter().find(|p| rest.starts_with(p.as_str())) {
                Some(pattern) => {
                    out.push_str(REDACTED);
                    rest = &rest[pattern.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }

    /// Returns the start of a response body as one line of text, for error
    /// messages and dead-letter reasons: secrets redacted, control characters
    /// (line breaks included) turned into spaces, then cut to at most `max`
    /// bytes. Redacting first means a cut never leaves a piece of a secret.
    pub fn excerpt(&self, body: &[u8], max: usize) -> String {
        let redacted = self.redact(&String::from_utf8_lossy(body));
        let one_line: String = redacted.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let text = one_line.trim();
        let mut end = text.len().min(max);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end < text.len() {
            format!("{}... ({} bytes in all)", &text[..end], body.len())
        } else {
            text.to_string()
        }
    }
}

/// Returns `secret` in the forms listed at [`Redactor::new`].
fn encoded_forms(secret: &str) -> Vec<String> {
    let bytes = secret.as_bytes();
    let json = serde_json::to_string(secret).unwrap_or_default();
    let json = json.trim_matches('"').to_string();
    // JSON may also escape `/` as `\/` (PHP's json_encode does by default).
    let json_slashes = json.replace('/', "\\/");
    let mut forms = vec![
        secret.to_string(),
        json,
        json_slashes,
        percent_encode(bytes, true),
        percent_encode(bytes, false),
        url::form_urlencoded::byte_serialize(bytes).collect(),
    ];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(bytes));
    }
    forms.retain(|form| !form.is_empty());
    forms
}

/// Percent-encodes every byte except the unreserved characters of RFC 3986.
fn percent_encode(bytes: &[u8], upper: bool) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else if upper {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok/en+with space&more=";

    #[test]
    fn redacts_every_encoded_form() {
        let redactor = Redactor::new([TOKEN]);
        let forms = [
            TOKEN.to_string(),
            "tok%2Fen%2Bwith%20space%26more%3D".to_string(),
            "tok%2fen%2bwith%20space%26more%3d".to_string(),
            "tok%2Fen%2Bwith+space%26more%3D".to_string(),
            STANDARD.encode(TOKEN),
            STANDARD_NO_PAD.encode(TOKEN),
            URL_SAFE.encode(TOKEN),
            URL_SAFE_NO_PAD.encode(TOKEN),
        ];
        for form in forms {
            let text = format!("echo: <{form}>");
            assert_eq!(redactor.redact(&text), "echo: <[redacted]>", "{form}");
        }
    }

    #[test]
    fn redacts_json_escaped_secret() {
        let redactor = Redactor::new(["quote\"back\\slash"]);
        let body = serde_json::json!({ "authorization": "quote\"back\\slash" }).to_string();
        assert_eq!(redactor.redact(&body), r#"{"authorization":"[redacted]"}"#);
    }

    #[test]
    fn redacts_json_with_escaped_slashes() {
        let redactor = Redactor::new(["Sig/val=="]);
        let body = r#"{"params":{"sig":"Sig\/val=="}}"#;
        assert_eq!(redactor.redact(body), r#"{"params":{"sig":"[redacted]"}}"#);
    }

    #[test]
    fn longer_secret_replaced_whole() {
        let redactor = Redactor::new(["abc123", "Splunk abc123"]);
        assert_eq!(redactor.redact("Authorization: Splunk abc123, again abc123"), "Authorization: [redacted], again [redacted]");
    }

    #[test]
    fn excerpt_never_cuts_a_secret() {
        let secret = "s3cr3t-value-that-is-long";
        let redactor = Redactor::new([secret]);
        let body = format!("{}{secret}{}", "x".repeat(1010), "y".repeat(100));
        let excerpt = redactor.excerpt(body.as_bytes(), 1024);
        assert!(!excerpt.contains("s3cr3t"), "{excerpt}");
        assert!(excerpt.ends_with(&format!("... ({} bytes in all)", body.len())), "{excerpt}");
    }

    #[test]
    fn excerpt_without_secrets_keeps_text() {
        let redactor = Redactor::default();
        assert_eq!(redactor.excerpt(b"  schema mismatch \n", 1024), "schema mismatch");
        assert_eq!(redactor.excerpt(b"line one\r\nline\ttwo", 1024), "line one  line two");
        assert_eq!(redactor.excerpt("ééé".as_bytes(), 3), "é... (6 bytes in all)");
    }
}
