//! The detection type: the API's JSON object kept byte for byte, plus a
//! field table (see [`Fields`]) for encoders that need individual values.
//!
//! The raw text is what JSON sinks write, so a detection reaches them exactly
//! as the API sent it: unknown fields, number precision and key order included.
//! Encoders read fields through [`Detection::text`], which accepts the odd
//! types a hostile or changed API may send (a number where a string is usual,
//! a null, a nested object) instead of failing the whole batch.

use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::timefmt;

mod fields;
mod scan;
mod unescape;

use scan::{Kind, Member, Members, SyntaxError};

pub use fields::{compact_json, FieldRef, FieldValue, Fields};

/// One detection as received.
///
/// Construction reads only `FullId` and `LastProcessedTimeUtc` and checks
/// that the text is one JSON object. The field table is built on first use,
/// so sinks that forward the raw JSON never pay for it.
#[derive(Debug, Clone)]
pub struct Detection {
    raw: Box<str>,
    /// Set at construction, except by [`Detection::from_checked_string`].
    keys: OnceLock<KeyFields>,
    fields: OnceLock<Result<Fields, String>>,
}

/// The two fields the poller needs: `FullId` as text, and
/// `LastProcessedTimeUtc` parsed once, as the poller, the outbox index and
/// the checkpoint all read it.
#[derive(Debug, Clone, Default)]
struct KeyFields {
    full_id: Option<FullId>,
    last_processed: Option<DateTime<Utc>>,
}

/// `FullId` as text, remembering what the API sent, so a number `42` and a
/// string `"42"` stay two different detections.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FullId {
    text: KeyText,
    kind: IdKind,
}

/// The text of a key field: a byte range of the detection's raw text when
/// it needs no decoding (nearly always, and then without an allocation),
/// or the decoded string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyText {
    Raw { start: u32, end: u32 },
    Decoded(Box<str>),
}

impl KeyText {
    /// Refers to `raw[range]`, or copies it when the offsets do not fit
    /// `u32` (a detection of 4 GiB or more).
    fn of_range(raw: &str, range: std::ops::Range<usize>) -> Self {
        match (u32::try_from(range.start), u32::try_from(range.end)) {
            (Ok(start), Ok(end)) => Self::Raw { start, end },
            _ => Self::Decoded(raw[range].into()),
        }
    }

    fn text<'a>(&'a self, raw: &'a str) -> &'a str {
        match self {
            KeyText::Raw { start, end } => &raw[*start as usize..*end as usize],
            KeyText::Decoded(text) => text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    /// A JSON string, decoded.
    String,
    /// A string that cannot be decoded (a lone surrogate), as its JSON text.
    Undecodable,
    /// A number, boolean, object or array, as its JSON text.
    Json,
}

/// First byte of every dedupe key that is not a decoded string `FullId`.
/// UTF-8 never contains 0xFF, so such a key cannot equal a string's.
const NOT_A_STRING: u8 = 0xFF;

/// Reason one element of a response cannot be handled as a detection.
#[derive(Debug, thiserror::Error)]
pub enum DetectionError {
    #[error("array element is not a JSON object but {0}")]
    NotAnObject(&'static str),
    #[error("array element is not valid JSON: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("array element is not valid JSON: {0}")]
    Syntax(#[from] SyntaxError),
}

/// The positions of an object's two key fields, found by its key check, and
/// the field table when the check built it too.
#[derive(Debug, Clone)]
pub struct ObjectKeys {
    full_id: Option<Member>,
    last_processed: Option<Member>,
    fields: Option<Result<Fields, String>>,
}

/// Room in a field table built before the object's length is known. The
/// API sends about 50 fields. 56 fills the name index's 64 buckets to the
/// 7/8 that hashbrown allows, where 64 would double them.
const USUAL_FIELD_COUNT: usize = 56;

impl ObjectKeys {
    /// Runs the key check over every member and keeps the key fields. With
    /// `build_fields`, the same pass builds the field table, so a sink that
    /// needs it does not scan the text again.
    ///
    /// Nothing needs to be decoded for the check to pass: JSON's grammar
    /// allows a lone UTF-16 surrogate such as `\ud800` in any string, a name
    /// included, and JSON sinks forward such a detection as it is. A name
    /// that cannot be decoded is neither key field. Nested objects and
    /// arrays are checked the way serde_json skips a value, which has no
    /// depth limit. A repeated key keeps its last value. A field table that
    /// cannot be built (see [`Fields::parse`]) does not fail the check: the
    /// detection keeps the table's error, as when the table is built later.
    fn read(members: &mut Members<'_>, build_fields: bool) -> Result<Self, DetectionError> {
        let text = members.bytes();
        let mut fields = build_fields.then(|| Ok(Fields::with_capacity(USUAL_FIELD_COUNT)));
        let mut keys = Self { full_id: None, last_processed: None, fields: None };
        for member in members.by_ref() {
            let member = member?;
            // A nested value the table parsed is valid JSON, so the check
            // need not parse it again.
            let mut nested_checked = false;
            if let Some(Ok(table)) = &mut fields {
                match table.add(text, &member) {
                    Ok(()) => nested_checked = true,
                    Err(error) => fields = Some(Err(error)),
                }
            }
            if member.kind == Kind::Nested && !nested_checked {
                serde_json::from_slice::<serde::de::IgnoredAny>(&text[member.value.clone()])?;
            }
            // Names are compared as bytes: an unescaped name needs no
            // decoding, and one that is not UTF-8 or cannot be decoded
            // matches neither key.
            let decoded;
            let name = if member.name_escaped {
                decoded = fields::decode_string(&text[member.name.clone()]).unwrap_or_default();
                decoded.as_bytes()
            } else {
                &text[member.name_inner()]
            };
            match name {
                b"FullId" => keys.full_id = Some(member),
                b"LastProcessedTimeUtc" => keys.last_processed = Some(member),
                _ => {}
            }
        }
        keys.fields = fields.map(|table| table.and_then(|table| Fields::check_size(members.end()).map(|()| table)));
        Ok(keys)
    }

    fn resolve(self, text: &str) -> (KeyFields, Option<Result<Fields, String>>) {
        let full_id = self.full_id.and_then(|m| key_text(text, &m)).map(|(text, kind)| FullId { text, kind });
        let last_processed = self.last_processed.and_then(|m| key_text(text, &m)).and_then(|(key, _)| timefmt::parse(key.text(text)));
        (KeyFields { full_id, last_processed }, self.fields)
    }
}

/// Decodes the JSON string `json`, given with its quotes; `None` when it
/// is not a valid JSON string.
pub fn decode_json_string(json: &[u8]) -> Option<String> {
    let mut text = String::new();
    unescape::unescape_into(json, &mut text).ok().map(|()| text)
}

/// The result of the key check on a JSON object at the start of some bytes.
pub enum ObjectPrefix {
    /// A valid object of this many bytes, and its key fields.
    Complete(usize, ObjectKeys),
    /// The bytes end before the object does, with no error so far.
    Cut,
    /// Not a valid object: the caller finds its end the slow way and
    /// checks it again for the reason.
    Invalid,
}

/// Runs the key check on a JSON object at the start of `bytes`, which may
/// continue after it (the rest of an array). With `build_fields`, the field
/// table is built in the same pass.
pub fn scan_object_prefix(bytes: &[u8], build_fields: bool) -> ObjectPrefix {
    let Ok(mut members) = Members::embedded(bytes) else { return ObjectPrefix::Invalid };
    match ObjectKeys::read(&mut members, build_fields) {
        Ok(keys) => ObjectPrefix::Complete(members.end(), keys),
        // An error at the very end may be the bytes running out: more of
        // them decide.
        Err(_) if members.end() == bytes.len() => ObjectPrefix::Cut,
        Err(_) => ObjectPrefix::Invalid,
    }
}

/// Returns the text of a key field's value: a string unescaped, or its raw
/// JSON when it cannot be unescaped (a lone surrogate), and anything else as
/// its JSON text. Null and the empty string give `None`.
fn key_text(raw: &str, member: &Member) -> Option<(KeyText, IdKind)> {
    let json = &raw[member.value.clone()];
    let (text, kind) = match member.kind {
        Kind::Null => return None,
        Kind::String if member.value_inner().is_empty() => return None,
        Kind::String => (KeyText::of_range(raw, member.value_inner()), IdKind::String),
        Kind::EscapedString => match fields::decode_string(json.as_bytes()) {
            Ok(text) if text.is_empty() => return None,
            Ok(text) => (KeyText::Decoded(text), IdKind::String),
            Err(_) => (KeyText::of_range(raw, member.value.clone()), IdKind::Undecodable),
        },
        _ => (KeyText::of_range(raw, member.value.clone()), IdKind::Json),
    };
    Some((text, kind))
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
            Ok(keys) => Ok(Self { raw: text.into_boxed_str(), keys: OnceLock::from(keys), fields: OnceLock::new() }),
            Err(error) => Err((text, error)),
        }
    }

    /// Wraps text that was checked before, as [`Detection::from_string`]
    /// checks it (the poller's outbox entries), without checking it again.
    /// The key fields are read on first use. Text that is not a JSON object
    /// after all gives a detection without key fields and without a field
    /// table, never an error.
    pub fn from_checked_string(text: String) -> Self {
        Self { raw: text.into_boxed_str(), keys: OnceLock::new(), fields: OnceLock::new() }
    }

    fn key_fields(&self) -> &KeyFields {
        self.keys.get_or_init(|| Self::keys(&self.raw).unwrap_or_default())
    }

    /// Checks that `text` is one JSON object and reads the two key fields.
    fn keys(text: &str) -> Result<KeyFields, DetectionError> {
        if !text.trim_start().starts_with('{') {
            let value: Value = serde_json::from_str(text)?;
            return Err(DetectionError::NotAnObject(json_type_name(&value)));
        }
        Ok(ObjectKeys::read(&mut Members::new(text)?, false)?.resolve(text).0)
    }

    /// Wraps an array element whose key check was done while the array was
    /// split (see [`scan_object_prefix`]). `text` is the scanned object.
    /// When the split built the field table, the detection keeps it.
    pub fn from_scanned(text: String, keys: ObjectKeys) -> Self {
        let (keys, fields) = keys.resolve(&text);
        let fields = fields.map_or_else(OnceLock::new, OnceLock::from);
        Self { raw: text.into_boxed_str(), keys: OnceLock::from(keys), fields }
    }

    /// Returns the JSON text exactly as the API sent it.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    fn parsed(&self) -> &Result<Fields, String> {
        self.fields.get_or_init(|| Fields::parse(&self.raw))
    }

    /// Returns whether the field table has been built, for tests that check
    /// it is built only when needed.
    #[cfg(test)]
    pub(crate) fn field_table_built(&self) -> bool {
        self.fields.get().is_some()
    }

    /// Iterates over every field in the object's order, parsing them on first
    /// use. Yields nothing when the text cannot be parsed into fields (see
    /// [`Detection::field_error`]).
    pub fn fields(&self) -> impl Iterator<Item = (&str, FieldValue<'_>)> + '_ {
        self.table().iter(&self.raw)
    }

    /// Iterates over every field like [`Detection::fields`], resolving a
    /// value only when [`FieldRef::value`] is called.
    pub fn field_refs(&self) -> impl Iterator<Item = FieldRef<'_>> + '_ {
        self.table().refs(&self.raw)
    }

    /// Returns the field table, or an empty one when it cannot be built.
    fn table(&self) -> &Fields {
        static EMPTY: LazyLock<Fields> = LazyLock::new(Fields::default);
        self.parsed().as_ref().unwrap_or(&EMPTY)
    }

    /// Returns why the fields cannot be parsed, for example a string with a lone
    /// UTF-16 surrogate or 128 or more levels of nesting. Encoders that need
    /// fields must not encode such a detection: its fields would be missing.
    pub fn field_error(&self) -> Option<&str> {
        self.parsed().as_ref().err().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<FieldValue<'_>> {
        self.parsed().as_ref().ok()?.get(&self.raw, name)
    }

    pub fn has_field(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Returns a field as text, or `None` when it is missing, null or an empty
    /// string. Numbers and booleans give their JSON text and nested values
    /// their compact JSON, so no non-empty value is lost.
    ///
    /// When the field table cannot be built (see [`Detection::field_error`]),
    /// the field is looked up with the scanner alone, so routing still reads
    /// `Severity` when another field contains a lone surrogate. A value that
    /// cannot be decoded, and a nested value, then give their raw JSON text.
    pub fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.parsed() {
            Ok(fields) => fields.get(&self.raw, name).and_then(FieldValue::text),
            Err(_) => self.scanned_text(name),
        }
    }

    /// Finds the last member called `name` with the scanner and returns its
    /// text as [`key_text`] does. Members whose names cannot be decoded are
    /// skipped.
    fn scanned_text(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut found = None;
        for member in Members::new(&self.raw).ok()? {
            let member = member.ok()?;
            let matches = if member.name_escaped {
                fields::decode_string(&self.raw.as_bytes()[member.name.clone()]).is_ok_and(|decoded| &*decoded == name)
            } else {
                &self.raw[member.name_inner()] == name
            };
            if matches {
                found = Some(member);
            }
        }
        key_text(&self.raw, &found?).map(|(text, _)| Cow::Owned(text.text(&self.raw).to_string()))
    }

    /// Returns the ranges in [`Detection::raw`] of each top-level member's
    /// name (with its quotes) and value, in order, decoding nothing.
    pub(crate) fn raw_members(&self) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
        Members::new(&self.raw).ok()?.map(|member| member.ok().map(|m| (m.name, m.value))).collect()
    }

    /// `FullId` as text (a number or other non-string value as its JSON text).
    pub fn full_id(&self) -> Option<Cow<'_, str>> {
        self.key_fields().full_id.as_ref().map(|id| Cow::Borrowed(id.text.text(&self.raw)))
    }

    /// Returns the deduplication key: `FullId`, unique per detection (two
    /// detections of one alert share `AlertId` but not `FullId`).
    ///
    /// A string `FullId` is the key as it is. A non-string `FullId`, a string
    /// that cannot be decoded and a detection without `FullId` (keyed by its
    /// whole text) get keys that start with [`NOT_A_STRING`] and a label, so
    /// `42` and `"42"` differ and no kind can equal another.
    pub fn dedupe_id(&self) -> Cow<'_, [u8]> {
        let marked = |label: &str, text: &str| {
            let mut key = Vec::with_capacity(1 + label.len() + text.len());
            key.push(NOT_A_STRING);
            key.extend_from_slice(label.as_bytes());
            key.extend_from_slice(text.as_bytes());
            Cow::Owned(key)
        };
        match &self.key_fields().full_id {
            Some(FullId { text, kind: IdKind::String }) => Cow::Borrowed(text.text(&self.raw).as_bytes()),
            Some(FullId { text, kind: IdKind::Undecodable }) => marked("string:", text.text(&self.raw)),
            Some(FullId { text, kind: IdKind::Json }) => marked("json:", text.text(&self.raw)),
            None => marked("raw:", &self.raw),
        }
    }

    /// `LastProcessedTimeUtc`, the field the API filters `sinceTimeUtc` on.
    pub fn last_processed(&self) -> Option<DateTime<Utc>> {
        self.key_fields().last_processed
    }

    pub fn alert_time(&self) -> Option<DateTime<Utc>> {
        self.text("AlertTime").and_then(|t| timefmt::parse(&t))
    }
}

/// Renders a `serde_json` value as field text, or `None` for null and the
/// empty string. Unlike [`FieldValue::text`], numbers and nested values are
/// written by serde_json, which may respell them.
pub fn json_value_text(value: &Value) -> Option<Cow<'_, str>> {
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
    fn number_and_string_full_ids_are_different_keys() {
        let number = Detection::from_json_text(r#"{"FullId":42}"#).unwrap();
        let string = Detection::from_json_text(r#"{"FullId":"42"}"#).unwrap();
        assert_eq!(number.full_id(), string.full_id());
        assert_ne!(number.dedupe_id(), string.dedupe_id());
    }

    /// Each kind of dedupe key (string, other JSON, undecodable string, no
    /// FullId) stays apart from strings that spell the others' keys.
    #[test]
    fn dedupe_ids_of_kinds_never_collide() {
        let texts = [
            r#"{"FullId":42}"#,
            r#"{"FullId":"42"}"#,
            r#"{"FullId":"\u0000json:42"}"#,
            r#"{"FullId":"\u00ffjson:42"}"#,
            r#"{"FullId":"a\ud800"}"#,
            r#"{"FullId":"\"a\\ud800\""}"#,
            r#"{"Other":1}"#,
            r#"{"FullId":"raw:{\"Other\":1}"}"#,
        ];
        let ids: Vec<Vec<u8>> = texts.iter().map(|t| Detection::from_json_text(t).unwrap().dedupe_id().into_owned()).collect();
        for (i, a) in ids.iter().enumerate() {
            for (j, b) in ids.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{} and {} share a dedupe key", texts[i], texts[j]);
            }
        }
    }

    #[test]
    fn repeated_key_keeps_the_last_value() {
        let d = Detection::from_json_text(r#"{"FullId":"a","FullId":"b","LastProcessedTimeUtc":"x"}"#).unwrap();
        assert_eq!(d.full_id().as_deref(), Some("b"));
        assert_eq!(d.text("FullId").as_deref(), Some("b"));
    }

    #[test]
    fn unparsable_fields_are_reported_not_emptied_silently() {
        let surrogate = Detection::from_json_text(r#"{"FullId":"s1","Description":"x\ud800y"}"#).unwrap();
        assert!(surrogate.field_error().is_some());
        let deep = format!(r#"{{"FullId":"d1","E":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        let deep = Detection::from_json_text(&deep).unwrap();
        assert!(deep.field_error().is_some());
        let fine = Detection::from_json_text(r#"{"FullId":"f1","Score":1e400,"ReportID":123456789012345678901234567890}"#).unwrap();
        assert_eq!(fine.field_error(), None);
        assert_eq!(fine.text("ReportID").as_deref(), Some("123456789012345678901234567890"));
        assert!(fine.text("Score").is_some_and(|t| t.contains("400")));
    }

    #[test]
    fn undecodable_name_is_no_key() {
        let d = Detection::from_json_text(r#"{"Full\ud800Id":"x","FullId":"real","\udc00":"y"}"#).unwrap();
        assert_eq!(d.full_id().as_deref(), Some("real"));
        let d = Detection::from_json_text(r#"{"FullI\u0064\ud800":"x"}"#).unwrap();
        assert_eq!(d.full_id(), None);
    }

    #[test]
    fn lone_surrogate_full_id_kept_raw() {
        let d = Detection::from_json_text(r#"{"FullId":"a\ud800b"}"#).unwrap();
        assert_eq!(d.full_id().as_deref(), Some(r#""a\ud800b""#));
    }

    #[test]
    fn fields_readable_despite_a_broken_table() {
        // A lone surrogate in a value and in a name: the detection is valid
        // JSON, and only its field table fails.
        let text = r#"{"Severity":"Low","Title":"x\ud800y","Severity":"High","Cat\u0065gory":"Malware","Deep":[[1]],"Bad\ud800":1}"#;
        let d = Detection::from_json_text(text).unwrap();
        assert!(d.field_error().is_some());
        assert_eq!(d.raw(), text);
        assert_eq!(d.text("Severity").as_deref(), Some("High"));
        assert_eq!(d.text("Category").as_deref(), Some("Malware"));
        assert_eq!(d.text("Title").as_deref(), Some(r#""x\ud800y""#));
        assert_eq!(d.text("Deep").as_deref(), Some("[[1]]"));
        assert_eq!(d.text("Missing"), None);
    }

    #[test]
    fn checked_text_reads_keys_on_first_use() {
        let text = r#"{"FullId":42,"LastProcessedTimeUtc":"2026-01-01T00:00:00Z","Severity":"High"}"#;
        let plain = Detection::from_json_text(text).unwrap();
        let checked = Detection::from_checked_string(text.to_string());
        assert_eq!(checked.dedupe_id(), plain.dedupe_id());
        assert_eq!(checked.full_id(), plain.full_id());
        assert_eq!(checked.last_processed(), plain.last_processed());
        assert_eq!(checked.text("Severity").as_deref(), Some("High"));
        assert_eq!(checked.raw(), text);
    }

    #[test]
    fn checked_text_that_is_invalid_has_no_keys() {
        let checked = Detection::from_checked_string("[1]".to_string());
        assert_eq!(checked.full_id(), None);
        assert_eq!(checked.last_processed(), None);
        assert!(checked.field_error().is_some());
    }

    #[test]
    fn invalid_json_object_is_rejected() {
        let err = Detection::from_json_text(r#"{"FullId" "x"}"#).unwrap_err();
        assert!(matches!(err, DetectionError::Syntax(_)), "{err}");
    }

    #[test]
    fn non_object_element_is_rejected() {
        let err = Detection::from_json_text("[1]").unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
    }
}
