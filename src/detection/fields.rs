//! The field table of a detection: one pass over its JSON text that records
//! where each field's name and value sit, instead of building a
//! `serde_json::Map`.
//!
//! A name or string value without escapes is a byte range of the raw text.
//! Those with escapes are decoded into one string shared by the table. A
//! detection thus needs at most three allocations (entries, name index and
//! decoded strings) rather than two or more per field, and an entry takes
//! 20 bytes. The table follows the object's order. A
//! repeated name keeps the position of its first occurrence and the value of
//! its last, as `serde_json::Map` with `preserve_order` does.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::LazyLock;

use hashbrown::HashTable;

use super::scan::{Kind, Member, Members};
use super::unescape::{unescape_into, UnescapeError};

/// The place of a name or value: a byte range of the raw text, or of the
/// decoded strings for a string that had escapes. Offsets are `u32` to keep
/// the table small, because every detection carries one.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Converts `range`, which [`Fields::parse`] checked to fit in `u32`.
    fn of(range: Range<usize>) -> Self {
        Self { start: range.start as u32, end: range.end as u32 }
    }

    fn of_text(self, text: &str) -> &str {
        &text[self.start as usize..self.end as usize]
    }

    fn of_bytes(self, bytes: &[u8]) -> &[u8] {
        &bytes[self.start as usize..self.end as usize]
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Null,
    Bool(bool),
    /// The number's JSON text, as sent.
    Number,
    String,
    /// A string that had escapes, in the decoded strings.
    DecodedString,
    /// An object or array, as its raw JSON text.
    Nested,
}

/// One field's value, borrowed from its detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValue<'a> {
    Null,
    Bool(bool),
    /// The number exactly as the API wrote it (for example `1E400` or a
    /// 30-digit integer), where a `serde_json::Value` would rewrite an
    /// exponent as `1e+400`.
    Number(&'a str),
    /// The decoded string.
    String(&'a str),
    /// An object or array as raw JSON text.
    Nested(&'a str),
}

impl<'a> FieldValue<'a> {
    /// Renders the value as field text; `None` for null and the empty string.
    /// Numbers keep their JSON text, and nested values become compact JSON,
    /// so no non-empty value is lost.
    pub fn text(self) -> Option<Cow<'a, str>> {
        match self {
            FieldValue::Null => None,
            FieldValue::String("") => None,
            FieldValue::String(text) | FieldValue::Number(text) => Some(Cow::Borrowed(text)),
            FieldValue::Bool(true) => Some(Cow::Borrowed("true")),
            FieldValue::Bool(false) => Some(Cow::Borrowed("false")),
            FieldValue::Nested(json) => Some(compact_json(json)),
        }
    }

    /// Returns the value as a string when it is one.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            FieldValue::String(text) => Some(text),
            _ => None,
        }
    }
}

/// Removes the whitespace between the tokens of valid JSON text and keeps
/// everything else as sent: numbers (`1E400`), escapes (`\u00e9`) and
/// repeated keys. Re-serializing through `serde_json::Value` would respell
/// numbers and decode escapes, which changes what the API sent.
pub fn compact_json(json: &str) -> Cow<'_, str> {
    let mut compact = String::new();
    // The text from here on has not been copied to `compact` yet.
    let mut kept_from = 0;
    let mut in_string = false;
    let mut escaped = false;
    for (i, b) in json.bytes().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            // Whitespace is ASCII, so both ends are character boundaries.
            compact.push_str(&json[kept_from..i]);
            kept_from = i + 1;
        }
    }
    if kept_from == 0 {
        return Cow::Borrowed(json);
    }
    compact.push_str(&json[kept_from..]);
    Cow::Owned(compact)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    name: Span,
    /// The name had escapes and is in the decoded strings.
    name_decoded: bool,
    /// Unused for null and booleans.
    value: Span,
    slot: Slot,
}

/// The fields of one detection, see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    /// In the object's order, each name once.
    entries: Vec<Entry>,
    /// Indexes into `entries`, hashed by name, for lookups.
    by_name: HashTable<u32>,
    /// The names and string values that had escapes, decoded one after another.
    decoded: String,
}

/// Hashes field names with a seed chosen at random per process, so names
/// cannot be picked to collide.
fn name_hash(name: &[u8]) -> u64 {
    static STATE: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);
    STATE.hash_one(name)
}

impl Fields {
    /// Parses the JSON object `raw`. Fails on text that is not one valid JSON
    /// object, on a string with a lone UTF-16 surrogate, on nesting deeper
    /// than serde_json allows (127 levels, the object included), and on text
    /// of 4 GiB or more.
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::check_size(raw.len())?;
        // Two fields per 40 bytes is about what the API sends.
        let mut fields = Self::with_capacity((raw.len() / 40).clamp(8, 256));
        for member in Members::new(raw).map_err(|e| e.to_string())? {
            fields.add(raw.as_bytes(), &member.map_err(|e| e.to_string())?)?;
        }
        Ok(fields)
    }

    /// Fails when the offsets of an object of `len` bytes do not fit the
    /// table's `u32`.
    pub(super) fn check_size(len: usize) -> Result<(), String> {
        match u32::try_from(len) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("a detection of {len} bytes is too large for a field table (the limit is 4 GiB)")),
        }
    }

    /// Creates an empty table with room for `fields` fields.
    pub(super) fn with_capacity(fields: usize) -> Self {
        Fields { entries: Vec::with_capacity(fields), by_name: HashTable::with_capacity(fields), decoded: String::new() }
    }

    /// Adds the member the scanner found in `raw`, the object's text from its
    /// opening brace. `raw` may still hold bytes that are not UTF-8, and the
    /// table is only used once the whole text has passed that check: the
    /// spans of names and values without escapes are then UTF-8 too.
    pub(super) fn add(&mut self, raw: &[u8], member: &Member) -> Result<(), String> {
        let (name, name_decoded) = if member.name_escaped {
            let name = self.decode(&raw[member.name.clone()]).map_err(|e| format!("field name at byte {}: {e}", member.name.start))?;
            (name, true)
        } else {
            (Span::of(member.name_inner()), false)
        };
        let (slot, value) = self.slot(raw, member).map_err(|e| {
            let text = if name_decoded { name.of_bytes(self.decoded.as_bytes()) } else { name.of_bytes(raw) };
            format!("field {:?}: {e}", String::from_utf8_lossy(text))
        })?;
        self.insert(raw, Entry { name, name_decoded, value, slot });
        Ok(())
    }

    /// Decodes a JSON string with escapes, given with its quotes, onto the
    /// end of the decoded strings, and returns its span there.
    ///
    /// `json` is a byte slice because the split builds tables before the
    /// object's UTF-8 is checked, so the decoder checks the string's UTF-8.
    fn decode(&mut self, json: &[u8]) -> Result<Span, UnescapeError> {
        if self.decoded.capacity() == 0 {
            // Room for the usual few escaped paths and command lines at once,
            // instead of growing the string a step at a time.
            self.decoded.reserve(json.len().max(256));
        }
        let start = self.decoded.len();
        if let Err(error) = unescape_into(json, &mut self.decoded) {
            self.decoded.truncate(start);
            return Err(error);
        }
        Ok(Span::of(start..self.decoded.len()))
    }

    /// Sorts one member's value into its slot. A string is decoded only when
    /// it has escapes; an object or array is parsed once to check it.
    fn slot(&mut self, raw: &[u8], member: &Member) -> Result<(Slot, Span), String> {
        let value = Span::of(member.value.clone());
        let slot = match member.kind {
            Kind::String => return Ok((Slot::String, Span::of(member.value_inner()))),
            Kind::EscapedString => {
                let decoded = self.decode(&raw[member.value.clone()]).map_err(|e| e.to_string())?;
                return Ok((Slot::DecodedString, decoded));
            }
            Kind::Nested => {
                // The scanner only found the value's end. Parsing it inside an
                // array spends the level the enclosing object took, so the
                // limit is serde_json's 128 levels for the whole detection.
                let value = &raw[member.value.clone()];
                let mut wrapped = Vec::with_capacity(value.len() + 2);
                wrapped.push(b'[');
                wrapped.extend_from_slice(value);
                wrapped.push(b']');
                serde_json::from_slice::<serde_json::Value>(&wrapped).map_err(|e| e.to_string())?;
                Slot::Nested
            }
            Kind::True => Slot::Bool(true),
            Kind::False => Slot::Bool(false),
            Kind::Null => Slot::Null,
            Kind::Number => Slot::Number,
        };
        Ok((slot, value))
    }

    fn name<'a>(&'a self, raw: &'a str, entry: &Entry) -> &'a str {
        if entry.name_decoded {
            entry.name.of_text(&self.decoded)
        } else {
            entry.name.of_text(raw)
        }
    }

    /// Appends a field, or gives a repeated name its new value in place.
    fn insert(&mut self, raw: &[u8], entry: Entry) {
        let decoded = self.decoded.as_bytes();
        let name_of = |entry: &Entry| if entry.name_decoded { entry.name.of_bytes(decoded) } else { entry.name.of_bytes(raw) };
        let name = name_of(&entry);
        let hash = name_hash(name);
        let entries = &self.entries;
        match self.by_name.find(hash, |&i| name_of(&entries[i as usize]) == name) {
            Some(&index) => {
                let first = &mut self.entries[index as usize];
                first.value = entry.value;
                first.slot = entry.slot;
            }
            None => {
                // A field count beyond u32 would need a detection of several GB.
                let index = self.entries.len() as u32;
                self.by_name.insert_unique(hash, index, |&i| name_hash(name_of(&entries[i as usize])));
                self.entries.push(entry);
            }
        }
    }

    /// Returns the value of field `name`, resolved against the detection's raw text.
    pub fn get<'a>(&'a self, raw: &'a str, name: &str) -> Option<FieldValue<'a>> {
        let &index = self.by_name.find(name_hash(name.as_bytes()), |&i| self.name(raw, &self.entries[i as usize]) == name)?;
        Some(self.value(raw, &self.entries[index as usize]))
    }

    /// Iterates over every field in the object's order.
    pub fn iter<'a>(&'a self, raw: &'a str) -> impl Iterator<Item = (&'a str, FieldValue<'a>)> + 'a {
        self.entries.iter().map(move |entry| (self.name(raw, entry), self.value(raw, entry)))
    }

    /// Iterates over every field in the object's order, like [`Fields::iter`],
    /// without resolving a value until [`FieldRef::value`] is called.
    pub fn refs<'a>(&'a self, raw: &'a str) -> impl Iterator<Item = FieldRef<'a>> + 'a {
        self.entries.iter().map(move |entry| FieldRef { fields: self, raw, entry })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn value<'a>(&'a self, raw: &'a str, entry: &Entry) -> FieldValue<'a> {
        match entry.slot {
            Slot::Null => FieldValue::Null,
            Slot::Bool(b) => FieldValue::Bool(b),
            Slot::Number => FieldValue::Number(entry.value.of_text(raw)),
            Slot::String => FieldValue::String(entry.value.of_text(raw)),
            Slot::DecodedString => FieldValue::String(entry.value.of_text(&self.decoded)),
            Slot::Nested => FieldValue::Nested(entry.value.of_text(raw)),
        }
    }
}

/// One field of a table, for callers that need the values of only some fields.
#[derive(Debug, Clone, Copy)]
pub struct FieldRef<'a> {
    fields: &'a Fields,
    raw: &'a str,
    entry: &'a Entry,
}

impl<'a> FieldRef<'a> {
    pub fn name(self) -> &'a str {
        self.fields.name(self.raw, self.entry)
    }

    pub fn value(self) -> FieldValue<'a> {
        self.fields.value(self.raw, self.entry)
    }
}

/// Appends the string serde_json decoded to a `String`, without a string
/// of its own in between.
/// Decodes a JSON string with escapes, given with its quotes; fails on a
/// lone UTF-16 surrogate.
pub(super) fn decode_string(json: &[u8]) -> Result<Box<str>, UnescapeError> {
    let mut text = String::new();
    unescape_into(json, &mut text)?;
    Ok(text.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(fields: &Fields, raw: &str, name: &str) -> Option<String> {
        fields.get(raw, name).and_then(FieldValue::text).map(Cow::into_owned)
    }

    /// The documented limit: 127 levels of nesting, the object included,
    /// parse; 128 do not.
    #[test]
    fn nesting_limit_counts_the_object() {
        let nested = |arrays: usize| format!(r#"{{"E":{}1{}}}"#, "[".repeat(arrays), "]".repeat(arrays));
        assert!(Fields::parse(&nested(126)).is_ok());
        let error = Fields::parse(&nested(127)).unwrap_err();
        assert!(error.contains("recursion limit"), "{error}");
    }

    #[test]
    fn spans_and_decoded_values_resolve() {
        let raw = r#"{"A":"plain","B\u0041":"tab\tand \"quote\"","N":-1.50e3,"T":true,"F":false,"Z":null,"O":{ "k" : [1, "x"] }}"#;
        let fields = Fields::parse(raw).unwrap();
        assert_eq!(fields.get(raw, "A"), Some(FieldValue::String("plain")));
        assert_eq!(fields.get(raw, "BA"), Some(FieldValue::String("tab\tand \"quote\"")));
        assert_eq!(fields.get(raw, "N"), Some(FieldValue::Number("-1.50e3")));
        assert_eq!(fields.get(raw, "T"), Some(FieldValue::Bool(true)));
        assert_eq!(fields.get(raw, "F"), Some(FieldValue::Bool(false)));
        assert_eq!(fields.get(raw, "Z"), Some(FieldValue::Null));
        assert_eq!(fields.get(raw, "O"), Some(FieldValue::Nested(r#"{ "k" : [1, "x"] }"#)));
        assert_eq!(text_of(&fields, raw, "O").as_deref(), Some(r#"{"k":[1,"x"]}"#));
        assert_eq!(fields.get(raw, "Missing"), None);
    }

    #[test]
    fn nested_values_keep_their_text_without_whitespace() {
        let raw = r#"{"O":{ "n" : [1E400, -0, 1.50e3, 123456789012345678901234567890] ,"s":"a b\t\u00e9 \" }" , "s":2 },"A":[],"W":[ ]}"#;
        let fields = Fields::parse(raw).unwrap();
        assert_eq!(
            text_of(&fields, raw, "O").as_deref(),
            Some(r#"{"n":[1E400,-0,1.50e3,123456789012345678901234567890],"s":"a b\t\u00e9 \" }","s":2}"#)
        );
        assert_eq!(text_of(&fields, raw, "A").as_deref(), Some("[]"));
        assert_eq!(text_of(&fields, raw, "W").as_deref(), Some("[]"));
        for json in ["[1,2]", "{}", r#"{"a":"\\"}"#] {
            assert!(matches!(compact_json(json), Cow::Borrowed(_)), "{json} was copied");
        }
        assert_eq!(compact_json("\r\n[ \"\\\\\" , 1 ]\t"), r#"["\\",1]"#);
    }

    #[test]
    fn order_follows_the_object() {
        let raw = r#"{"Zeta":1,"Alpha":2,"Mid":3}"#;
        let fields = Fields::parse(raw).unwrap();
        let names: Vec<&str> = fields.iter(raw).map(|(name, _)| name).collect();
        assert_eq!(names, ["Zeta", "Alpha", "Mid"]);
    }

    #[test]
    fn repeated_names_keep_first_place_last_value() {
        let raw = r#"{"A":"1","B":"2","A":"3","C":"4","B":"5","A":"6"}"#;
        let fields = Fields::parse(raw).unwrap();
        let pairs: Vec<(&str, Option<&str>)> = fields.iter(raw).map(|(name, value)| (name, value.as_str())).collect();
        assert_eq!(pairs, [("A", Some("6")), ("B", Some("5")), ("C", Some("4"))]);
        assert_eq!(fields.get(raw, "A"), Some(FieldValue::String("6")));
        assert_eq!(fields.len(), 3);
    }

    #[test]
    fn escaped_name_equal_to_plain_name_is_repeated() {
        let raw = r#"{"A":"first","\u0041":"second"}"#;
        let fields = Fields::parse(raw).unwrap();
        assert_eq!(fields.len(), 1);
        assert_eq!(fields.get(raw, "A"), Some(FieldValue::String("second")));
    }

    #[test]
    fn same_as_serde_json_map_on_samples() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/detections.json")).unwrap();
        let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_str(&text).unwrap();
        for item in &items {
            let raw = item.get();
            let fields = Fields::parse(raw).unwrap();
            let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw).unwrap();
            let ours: Vec<(&str, Option<String>)> =
                fields.iter(raw).map(|(name, value)| (name, value.text().map(Cow::into_owned))).collect();
            let theirs: Vec<(&str, Option<String>)> =
                map.iter().map(|(name, value)| (name.as_str(), crate::detection::json_value_text(value).map(Cow::into_owned))).collect();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn invalid_text_is_an_error() {
        for raw in [
            r#"{"A":"x\ud800y"}"#,
            r#"{"A\ud800":"x"}"#,
            r#"{"A":["\udc00"]}"#,
            r#"{"A":1,}"#,
            r#"{"A":1} x"#,
            "[1]",
            "",
        ] {
            assert!(Fields::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error() {
        let deep = format!(r#"{{"E":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        let error = Fields::parse(&deep).unwrap_err();
        assert!(error.contains("\"E\""), "{error}");
    }

    #[test]
    fn nesting_limit_counts_the_enclosing_object() {
        // The object is one level, so a value may have 127 more, as in a
        // serde_json::Map parse of the whole text.
        for depth in [120, 126, 127, 128, 129] {
            let raw = format!(r#"{{"E":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
            let map = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&raw);
            assert_eq!(Fields::parse(&raw).is_ok(), map.is_ok(), "depth {depth}");
        }
    }

    #[test]
    fn numbers_keep_their_text() {
        let raw = r#"{"A":1E400,"B":-0,"C":1.50e3,"D":123456789012345678901234567890,"E":-1.5E-7}"#;
        let fields = Fields::parse(raw).unwrap();
        for (name, text) in [("A", "1E400"), ("B", "-0"), ("C", "1.50e3"), ("D", "123456789012345678901234567890"), ("E", "-1.5E-7")] {
            assert_eq!(text_of(&fields, raw, name).as_deref(), Some(text), "{name}");
        }
    }
}
