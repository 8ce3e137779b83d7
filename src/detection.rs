//! The detection type: the API's JSON object kept byte for byte, plus a parsed
//! field map for encoders that need individual values.
//!
//! The raw text is what JSON sinks write, so a detection reaches them exactly
//! as the API sent it: unknown fields, number precision and key order included.
//! Encoders read fields through [`Detection::text`], which accepts the odd
//! types a hostile or changed API may send (a number where a string is usual,
//! a null, a nested object) instead of failing the whole batch.

use std::borrow::Cow;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::timefmt;

/// One detection as received.
///
/// Construction reads only `FullId` and `LastProcessedTimeUtc` (and checks
/// that the text is one valid JSON object); the full field map is parsed on
/// first use, so sinks that forward the raw JSON never pay for it.
#[derive(Debug, Clone)]
pub struct Detection {
    raw: Box<str>,
    full_id: Option<Box<str>>,
    last_processed: Option<Box<str>>,
    fields: OnceLock<Map<String, Value>>,
}

/// Why one element of a response cannot be handled as a detection.
#[derive(Debug, thiserror::Error)]
pub enum DetectionError {
    #[error("array element is not a JSON object but {0}")]
    NotAnObject(&'static str),
    #[error("array element is not valid JSON: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// The two fields the poller needs; every other field is skipped unparsed.
#[derive(Deserialize)]
struct Keys {
    #[serde(rename = "FullId", default)]
    full_id: Option<Value>,
    #[serde(rename = "LastProcessedTimeUtc", default)]
    last_processed: Option<Value>,
}

impl Detection {
    /// Parses one array element of an API response.
    pub fn from_raw(raw: &RawValue) -> Result<Self, DetectionError> {
        Self::from_json_text(raw.get())
    }

    /// Parses a detection from its JSON text (for example an outbox entry).
    pub fn from_json_text(text: &str) -> Result<Self, DetectionError> {
        Self::from_string(text.to_string()).map_err(|(_, e)| e)
    }

    /// Like [`Detection::from_json_text`], keeping `text` without a copy; on
    /// failure the text comes back with the error.
    pub fn from_string(text: String) -> Result<Self, (String, DetectionError)> {
        match Self::keys(&text) {
            Ok((full_id, last_processed)) => {
                Ok(Self { raw: text.into_boxed_str(), full_id, last_processed, fields: OnceLock::new() })
            }
            Err(error) => Err((text, error)),
        }
    }

    /// Checks that `text` is one JSON object and reads the two key fields.
    #[allow(clippy::type_complexity)]
    fn keys(text: &str) -> Result<(Option<Box<str>>, Option<Box<str>>), DetectionError> {
        // serde would also accept a JSON array for a struct, so check the shape first.
        if !text.trim_start().starts_with('{') {
            let value: Value = serde_json::from_str(text)?;
            return Err(DetectionError::NotAnObject(json_type_name(&value)));
        }
        let keys: Keys = match serde_json::from_str(text) {
            Ok(keys) => keys,
            Err(error) => {
                return Err(match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(_)) | Err(_) => DetectionError::Invalid(error),
                    Ok(other) => DetectionError::NotAnObject(json_type_name(&other)),
                })
            }
        };
        let as_text = |v: Option<Value>| v.as_ref().and_then(value_text).map(|t| Box::from(t.as_ref()));
        Ok((as_text(keys.full_id), as_text(keys.last_processed)))
    }

    /// The JSON text exactly as the API sent it.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Every field, parsed on first use.
    pub fn fields(&self) -> &Map<String, Value> {
        self.fields.get_or_init(|| serde_json::from_str(&self.raw).unwrap_or_default())
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields().get(name)
    }

    /// Returns a field as text, or `None` when it is missing, null or an empty
    /// string. Numbers and booleans give their JSON text and nested values
    /// their compact JSON, so no non-empty value is lost.
    pub fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        self.fields().get(name).and_then(value_text)
    }

    /// The deduplication key: `FullId`, unique per detection (two detections
    /// of one alert share `AlertId` but not `FullId`).
    pub fn full_id(&self) -> Option<Cow<'_, str>> {
        self.full_id.as_deref().map(Cow::Borrowed)
    }

    /// `LastProcessedTimeUtc`, the field the API filters `sinceTimeUtc` on.
    pub fn last_processed(&self) -> Option<DateTime<Utc>> {
        self.last_processed.as_deref().and_then(timefmt::parse)
    }

    pub fn alert_time(&self) -> Option<DateTime<Utc>> {
        self.text("AlertTime").and_then(|t| timefmt::parse(&t))
    }
}

/// Renders a JSON value as field text; `None` for null and the empty string.
pub fn value_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        nested => Some(Cow::Owned(nested.to_string())),
    }
}

pub fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_text_is_kept_byte_for_byte() {
        let text = r#"{"FullId":"a:b","ReportID":12345678901234567890123,"Extra":{"k":[1,2]}}"#;
        let d = Detection::from_json_text(text).unwrap();
        assert_eq!(d.raw(), text);
    }

    #[test]
    fn text_accepts_odd_types() {
        let d = Detection::from_json_text(
            r#"{"FullId":42,"A":null,"B":"","C":true,"D":{"x":1},"E":"é|="}"#,
        )
        .unwrap();
        assert_eq!(d.full_id().as_deref(), Some("42"));
        assert_eq!(d.text("A"), None);
        assert_eq!(d.text("B"), None);
        assert_eq!(d.text("C").as_deref(), Some("true"));
        assert_eq!(d.text("D").as_deref(), Some(r#"{"x":1}"#));
        assert_eq!(d.text("E").as_deref(), Some("é|="));
        assert_eq!(d.text("Missing"), None);
    }

    #[test]
    fn invalid_json_object_is_rejected() {
        let err = Detection::from_json_text(r#"{"FullId" "x"}"#).unwrap_err();
        assert!(matches!(err, DetectionError::Invalid(_)), "{err}");
    }

    #[test]
    fn non_object_element_is_rejected() {
        let err = Detection::from_json_text("[1]").unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
    }
}
