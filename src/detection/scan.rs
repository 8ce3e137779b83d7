//! One pass over the JSON text of an object that finds where each member's
//! name and value sit and checks the grammar on the way, decoding nothing.
//!
//! Callers decode what they use: names and strings with escapes, through
//! serde_json, and objects and arrays nested in a value, which this scanner
//! only locates. It accepts exactly the objects serde_json accepts when it
//! skips values it does not keep, which the tests check on mutated samples.

use std::ops::Range;

/// The type of a member's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A string without escapes: its text is the range inside the quotes.
    String,
    /// A string with escapes, to decode before use.
    EscapedString,
    Number,
    True,
    False,
    Null,
    /// An object or array. Only its end was found; its content is unchecked.
    Nested,
}

/// One `"name": value` member of the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    /// The name with its quotes.
    pub name: Range<usize>,
    pub name_escaped: bool,
    /// The value's JSON text; a string's includes its quotes.
    pub value: Range<usize>,
    pub kind: Kind,
}

impl Member {
    /// Returns the range of the name without its quotes (for a name without
    /// escapes, its text).
    pub fn name_inner(&self) -> Range<usize> {
        self.name.start + 1..self.name.end - 1
    }

    /// Returns the range of a string value without its quotes.
    pub fn value_inner(&self) -> Range<usize> {
        self.value.start + 1..self.value.end - 1
    }
}

/// The reason the text is not one JSON object, and the byte where that
/// became clear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} at byte {at}")]
pub struct SyntaxError {
    problem: &'static str,
    at: usize,
}

/// The members of one JSON object, in the text's order.
///
/// After the last member the iterator checks that only whitespace follows
/// the object, unless the object is embedded in longer text. On an error it
/// yields that error and ends. An error at the end of the text means the
/// text ended too soon.
pub(super) struct Members<'a> {
    bytes: &'a [u8],
    pos: usize,
    first: bool,
    done: bool,
    /// The object ends at its closing brace, whatever follows.
    embedded: bool,
}

impl<'a> Members<'a> {
    /// Starts on `raw`, which must open with `{` (after whitespace).
    pub fn new(raw: &'a str) -> Result<Self, SyntaxError> {
        Self::start(raw.as_bytes(), false)
    }

    /// Starts on an object at the start of `bytes` that may be followed by
    /// more text, such as an element of an array. [`Members::end`] then
    /// gives the object's length.
    pub fn embedded(bytes: &'a [u8]) -> Result<Self, SyntaxError> {
        Self::start(bytes, true)
    }

    fn start(bytes: &'a [u8], embedded: bool) -> Result<Self, SyntaxError> {
        let mut members = Self { bytes, pos: 0, first: true, done: false, embedded };
        members.skip_whitespace();
        if members.peek() != Some(b'{') {
            return Err(members.error("expected `{` to open an object"));
        }
        members.pos += 1;
        Ok(members)
    }

    /// Returns the scan's position, which is just after the closing brace
    /// once every member was read.
    pub fn end(&self) -> usize {
        self.pos
    }

    /// Returns the text being scanned.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn error(&self, problem: &'static str) -> SyntaxError {
        SyntaxError { problem, at: self.pos }
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Reads the next member, or `None` after the closing `}`.
    fn member(&mut self) -> Result<Option<Member>, SyntaxError> {
        // The end of the object, or the separator before this member.
        self.skip_whitespace();
        match (self.peek(), self.first) {
            (Some(b'}'), _) => {
                self.pos += 1;
                if self.embedded {
                    return Ok(None);
                }
                self.skip_whitespace();
                return match self.peek() {
                    None => Ok(None),
                    Some(_) => Err(self.error("unexpected text after the object")),
                };
            }
            (_, true) => self.first = false,
            (Some(b','), false) => {
                self.pos += 1;
                self.skip_whitespace();
            }
            (None, false) => return Err(self.error("the object is not closed")),
            (Some(_), false) => return Err(self.error("expected `,` or `}` after a value")),
        }

        // The name and the colon.
        match self.peek() {
            Some(b'"') => {}
            None => return Err(self.error("the object is not closed")),
            Some(_) => return Err(self.error("expected a field name in double quotes")),
        }
        let name_start = self.pos;
        let name_escaped = self.string()?;
        let name = name_start..self.pos;
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return Err(self.error("expected `:` after a field name"));
        }
        self.pos += 1;

        self.skip_whitespace();
        let value_start = self.pos;
        let kind = self.value()?;
        Ok(Some(Member { name, name_escaped, value: value_start..self.pos, kind }))
    }

    fn value(&mut self) -> Result<Kind, SyntaxError> {
        let kind = match self.peek() {
            Some(b'"') => {
                if self.string()? {
                    Kind::EscapedString
                } else {
                    Kind::String
                }
            }
            Some(b'{' | b'[') => {
                self.skip_nested()?;
                Kind::Nested
            }
            Some(b't') => self.literal(b"true", Kind::True)?,
            Some(b'f') => self.literal(b"false", Kind::False)?,
            Some(b'n') => self.literal(b"null", Kind::Null)?,
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Kind::Number
            }
            _ => return Err(self.error("expected a value")),
        };
        Ok(kind)
    }

    fn literal(&mut self, word: &[u8], kind: Kind) -> Result<Kind, SyntaxError> {
        let rest = &self.bytes[self.pos..];
        if !rest.starts_with(word) {
            if word.starts_with(rest) {
                // Cut short by the end of the text.
                self.pos = self.bytes.len();
            }
            return Err(self.error("expected a value"));
        }
        self.pos += word.len();
        Ok(kind)
    }

    /// Reads a string from its opening quote to past its closing one;
    /// returns whether it has escapes. Escapes are checked for form only:
    /// whether a `\u` escape is a valid code point is up to the decoder.
    fn string(&mut self) -> Result<bool, SyntaxError> {
        self.pos += 1;
        let mut escaped = false;
        loop {
            let Some(offset) = find_string_special(&self.bytes[self.pos..]) else {
                self.pos = self.bytes.len();
                return Err(self.error("a string is not closed"));
            };
            self.pos += offset;
            match self.bytes[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                _ => return Err(self.error("control character in a string (it must be escaped)")),
            }
        }
    }

    /// Steps over one escape, from its backslash.
    fn escape(&mut self) -> Result<(), SyntaxError> {
        match self.bytes.get(self.pos + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
            Some(b'u') => {
                let digits = &self.bytes[self.pos + 2..(self.pos + 6).min(self.bytes.len())];
                if !digits.iter().all(u8::is_ascii_hexdigit) {
                    return Err(self.error("invalid \\u escape (it needs four hexadecimal digits)"));
                }
                if digits.len() < 4 {
                    self.pos = self.bytes.len();
                    return Err(self.error("a string is not closed"));
                }
                self.pos += 6;
            }
            None => {
                self.pos = self.bytes.len();
                return Err(self.error("a string is not closed"));
            }
            Some(_) => return Err(self.error("invalid escape in a string")),
        }
        Ok(())
    }

    /// Reads `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Result<(), SyntaxError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.required_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.required_digits()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn required_digits(&mut self) -> Result<(), SyntaxError> {
        if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
            return Err(self.error("invalid number"));
        }
        self.digits();
        Ok(())
    }

    /// Finds the end of an object or array by its brackets, stepping over
    /// strings. Its grammar inside is left to the caller.
    fn skip_nested(&mut self) -> Result<(), SyntaxError> {
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err(self.error("an object or array in a value is not closed")),
                Some(b'"') => {
                    self.string()?;
                    continue;
                }
                Some(b'{' | b'[') => depth += 1,
                Some(b'}' | b']') => {
                    depth -= 1;
                    if depth == 0 {
                        self.pos += 1;
                        return Ok(());
                    }
                }
                Some(_) => {}
            }
            self.pos += 1;
        }
    }
}

impl Iterator for Members<'_> {
    type Item = Result<Member, SyntaxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let member = self.member().transpose();
        self.done = !matches!(member, Some(Ok(_)));
        member
    }
}

/// Returns the index of the first `"`, `\` or control character (below
/// 0x20) in `bytes`: sixteen bytes at a time with SSE2, which every x86_64
/// processor has, and eight at a time elsewhere.
fn find_string_special(bytes: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        find_string_special_sse2(bytes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        find_string_special_swar(bytes)
    }
}

/// [`find_string_special`] with SSE2: a byte is special when it equals `"`
/// or `\`, or when the unsigned minimum of it and 0x1F is the byte itself.
#[cfg(target_arch = "x86_64")]
fn find_string_special_sse2(bytes: &[u8]) -> Option<usize> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let mut chunks = bytes.chunks_exact(16);
    let mut offset = 0;
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are
    // always available, and each load reads one whole 16-byte chunk.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let control = _mm_set1_epi8(0x1F);
        for chunk in &mut chunks {
            let block = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let special = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(block, quote), _mm_cmpeq_epi8(block, backslash)),
                _mm_cmpeq_epi8(_mm_min_epu8(block, control), block),
            );
            let mask = _mm_movemask_epi8(special) as u32;
            if mask != 0 {
                return Some(offset + mask.trailing_zeros() as usize);
            }
            offset += 16;
        }
    }
    find_string_special_swar(chunks.remainder()).map(|i| offset + i)
}

/// [`find_string_special`] eight bytes at a time in plain integers. For
/// each word `w`, a byte below 0x20 sets its top bit in
/// `(w - 0x20..20) & !w & 0x80..80`, and an equal byte sets it in the same
/// expression on `w ^ byte*0x01..01`. A borrow can flag a byte above a real
/// match, never below, so the lowest flag is always a true match.
fn find_string_special_swar(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, limit: u8| x.wrapping_sub(ONES * u64::from(limit)) & !x & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let flags = below(word, 0x20) | below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1);
        if flags != 0 {
            return Some(offset + flags.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    chunks.remainder().iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|i| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(raw: &str) -> Result<Vec<(String, Kind, String)>, SyntaxError> {
        Members::new(raw)?
            .map(|m| m.map(|m| (raw[m.name_inner()].to_string(), m.kind, raw[m.value].to_string())))
            .collect()
    }

    #[test]
    fn finds_every_member_and_kind() {
        let raw = r#" { "a" : "x" , "b\n":"y\"z", "c":-1.5e+3,"d":true,"e":false,"f":null,"g":[1,{"h":"]"}],"i":{} } "#;
        let found = members(raw).unwrap();
        assert_eq!(
            found,
            vec![
                ("a".into(), Kind::String, r#""x""#.into()),
                (r"b\n".into(), Kind::EscapedString, r#""y\"z""#.into()),
                ("c".into(), Kind::Number, "-1.5e+3".into()),
                ("d".into(), Kind::True, "true".into()),
                ("e".into(), Kind::False, "false".into()),
                ("f".into(), Kind::Null, "null".into()),
                ("g".into(), Kind::Nested, r#"[1,{"h":"]"}]"#.into()),
                ("i".into(), Kind::Nested, "{}".into()),
            ]
        );
        assert_eq!(members("{}").unwrap(), vec![]);
        assert_eq!(members(" \r\n\t{ }\n").unwrap(), vec![]);
    }

    #[test]
    fn rejects_what_json_does_not_allow() {
        for raw in [
            "", "[]", "{", "{,}", r#"{"a":1,}"#, r#"{"a" 1}"#, r#"{"a":}"#, r#"{a:1}"#, r#"{"a":1}x"#, r#"{"a":1}}"#,
            r#"{"a":01}"#, r#"{"a":1.}"#, r#"{"a":.5}"#, r#"{"a":1e}"#, r#"{"a":-}"#, r#"{"a":+1}"#, r#"{"a":tru}"#,
            r#"{"a":"x\q"}"#, r#"{"a":"\u12g4"}"#, "{\"a\":\"x\ty\"}", "{\"a\x01\":1}", r#"{"a":"x"#, r#"{"a":"x\"#,
            r#"{"a":[1,2}"#, r#"{"a":[1"#, r#"{"a":1 "b":2}"#, r#"{"a":NaN}"#,
        ] {
            assert!(members(raw).is_err(), "{raw:?} was accepted");
        }
    }

    #[test]
    fn special_bytes_are_found_at_every_offset() {
        for special in [b'"', b'\\', 0x00, 0x1f] {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 20];
                bytes[at] = special;
                assert_eq!(find_string_special(&bytes), Some(at), "byte {special:#x} at {at}");
            }
        }
        assert_eq!(find_string_special("é使用者 !#[]~\x7f".as_bytes()), None);
    }

    /// Every byte value at every offset of buffers up to 40 bytes long, among
    /// ASCII and high filler bytes and before a closing quote, against a
    /// plain byte-by-byte search. Each platform runs the versions it has.
    #[test]
    fn special_byte_searches_match_plain_search() {
        let plain = |bytes: &[u8]| bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
        type Search = fn(&[u8]) -> Option<usize>;
        let searches: Vec<(&str, Search)> = vec![
            ("swar", find_string_special_swar),
            #[cfg(target_arch = "x86_64")]
            ("sse2", find_string_special_sse2),
        ];
        for len in 0..40 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    for filler in [b'a', 0xE4, 0x7F, 0x20, 0x21, 0xFF] {
                        let mut bytes = vec![filler; len];
                        bytes[at] = byte;
                        if at + 1 < len {
                            bytes[len - 1] = b'"';
                        }
                        for (name, search) in &searches {
                            assert_eq!(search(&bytes), plain(&bytes), "{name}: byte {byte:#x} at {at} of {len}, filler {filler:#x}");
                        }
                    }
                }
            }
        }
    }
}

/// The scanner against serde_json on mutated detections: the same texts
/// must be accepted, with the same fields.
#[cfg(test)]
mod differential {

    use serde_json::Value;

    use crate::detection::{scan_object_prefix, Detection, FieldValue, ObjectPrefix};

    /// Detections to mutate: the samples, compact and pretty, and short
    /// objects with escapes, numbers and nesting.
    fn seeds() -> Vec<String> {
        let samples: Vec<Value> =
            serde_json::from_str(include_str!("../../tests/data/detections.json")).expect("sample detections");
        let mut seeds: Vec<String> = samples.iter().take(6).map(|s| s.to_string()).collect();
        seeds.push(serde_json::to_string_pretty(&samples[0]).unwrap());
        seeds.extend(
            [
                r#"{"FullId":"a\u0041\n","LastProcessedTimeUtc":"2026-01-01T00:00:00Z","N":-0.5E-7,"B":[true,false,null,{"x":"]}\""}],"E":{}}"#,
                r#"{"Full\u0049d":42,"S":"\ud83d\ude00 \\ \/ \b\f\r\t","Z":0,"Y":1e400,"X":[[[]]],"W":"使用者"}"#,
                r#" { "FullId" : "s" , "Deep" : { "a" : [ 1 , 2.25 , { } ] } } "#,
                r#"{"FullId":7,"A":0,"B":-12.5e3,"C":[-0,2E+1],"D":1E400,"E":0.001,"F":true,"G":null}"#,
            ]
            .map(String::from),
        );
        seeds
    }

    /// A small xorshift generator, so every run tests the same texts.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    fn mutate(seed: &str, rng: &mut Rng) -> String {
        const PIECES: [&str; 26] = [
            "\"", "\\", "{", "}", "[", "]", ",", ":", " ", "\n", "\u{1}", "\u{7f}", "u", "0", "-", "+", "e", ".", "t",
            "n", "\\u", "\\ud800", "\\udc00", "é", "1E400", "[{\"a\":[1]}]",
        ];
        let mut chars: Vec<char> = seed.chars().collect();
        for _ in 0..1 + rng.below(3) {
            let mut at = rng.below(chars.len() + 1);
            // Most edits land on a structural character or digit, where
            // the grammar has the most to check.
            if rng.below(4) != 0 {
                at += chars[at..].iter().position(|c| "\":,{}[]\\0123456789-".contains(*c)).unwrap_or(0);
                at += rng.below(2);
                at = at.min(chars.len());
            }
            match rng.below(4) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => {
                    let piece = PIECES[rng.below(PIECES.len())];
                    chars.splice(at..at, piece.chars());
                }
                2 if at < chars.len() => chars[at] = PIECES[rng.below(PIECES.len())].chars().next().unwrap_or(' '),
                // Cut the end, where the closing brackets are.
                _ => chars.truncate(chars.len().saturating_sub(1 + rng.below(3))),
            }
        }
        chars.into_iter().collect()
    }

    /// Returns what serde_json makes of `text`: whether the key check accepts it
    /// (an object that serde_json skips without decoding a string), and its
    /// fields when every name and value parses.
    fn reference(text: &str) -> (bool, Option<serde_json::Map<String, Value>>) {
        let keys_ok = text.trim_start().starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
        let fields = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
        (keys_ok, fields)
    }

    fn same_value(ours: FieldValue<'_>, theirs: &Value) -> bool {
        match (ours, theirs) {
            (FieldValue::Null, Value::Null) => true,
            (FieldValue::Bool(a), Value::Bool(b)) => a == *b,
            (FieldValue::String(a), Value::String(b)) => a == b,
            // Numbers are compared as serde_json reads them, which may
            // spell an exponent differently than the text.
            (FieldValue::Number(a) | FieldValue::Nested(a), b) => serde_json::from_str::<Value>(a).is_ok_and(|a| a == *b),
            _ => false,
        }
    }

    /// Checks that building the field table during the split changes
    /// neither what the split accepts nor the table: the detection gets the
    /// same fields, or the same error, as a table built later from its text.
    fn compare_split(text: &str) {
        let mut array_rest = text.trim_start().as_bytes().to_vec();
        array_rest.extend_from_slice(b",{\"next\":1}]");
        let with = scan_object_prefix(&array_rest, true);
        let without = scan_object_prefix(&array_rest, false);
        let (len, keys) = match (with, without) {
            (ObjectPrefix::Complete(len, keys), ObjectPrefix::Complete(len_without, _)) => {
                assert_eq!(len, len_without, "object end differs on {text:?}");
                (len, keys)
            }
            (ObjectPrefix::Cut, ObjectPrefix::Cut) | (ObjectPrefix::Invalid, ObjectPrefix::Invalid) => return,
            _ => panic!("the split with field tables accepts or rejects differently on {text:?}"),
        };
        let Ok(object) = std::str::from_utf8(&array_rest[..len]) else { return };
        let split = Detection::from_scanned(object.to_string(), keys);
        assert!(split.fields.get().is_some(), "no field table from the split of {text:?}");
        let later = Detection::from_checked_string(object.to_string());
        assert_eq!(split.field_error(), later.field_error(), "field table error differs on {text:?}");
        assert!(split.fields().eq(later.fields()), "field table differs on {text:?}");
        assert_eq!(split.full_id(), later.full_id(), "FullId differs on {text:?}");
    }

    fn compare(text: &str) {
        compare_split(text);
        let (keys_ok, fields) = reference(text);
        let detection = Detection::from_json_text(text);
        assert_eq!(detection.is_ok(), keys_ok, "key check differs on {text:?}: {:?}", detection.err());
        let Ok(detection) = detection else { return };
        assert_eq!(detection.field_error().is_none(), fields.is_some(), "field table differs on {text:?}");
        let Some(fields) = fields else { return };
        let ours: Vec<(&str, FieldValue<'_>)> = detection.fields().collect();
        assert_eq!(ours.len(), fields.len(), "field count differs on {text:?}");
        for ((name, value), (their_name, their_value)) in ours.into_iter().zip(&fields) {
            assert_eq!(name, their_name, "field order differs on {text:?}");
            assert!(same_value(value, their_value), "field {name:?} differs on {text:?}");
        }
        let ours = detection.full_id();
        match fields.get("FullId") {
            None | Some(Value::Null) => assert_eq!(ours, None, "FullId differs on {text:?}"),
            Some(Value::String(id)) if id.is_empty() => assert_eq!(ours, None, "FullId differs on {text:?}"),
            Some(Value::String(id)) => assert_eq!(ours.as_deref(), Some(id.as_str()), "FullId differs on {text:?}"),
            Some(other) => {
                let ours = ours.and_then(|id| serde_json::from_str::<Value>(&id).ok());
                assert_eq!(ours.as_ref(), Some(other), "FullId differs on {text:?}");
            }
        }
    }

    #[test]
    fn mutated_detections_parse_as_serde_json_parses_them() {
        let seeds = seeds();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for seed in &seeds {
            compare(seed);
        }
        let short = seeds.iter().filter(|s| s.len() < 200).collect::<Vec<_>>();
        for round in 0..60_000 {
            // Short seeds are cheap: two rounds in three use them.
            let seed = match round % 3 {
                0 => &seeds[rng.below(seeds.len())],
                _ => short[rng.below(short.len())],
            };
            compare(&mutate(seed, &mut rng));
        }
    }
}
