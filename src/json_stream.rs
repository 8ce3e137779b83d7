//! Splits a JSON array arriving in chunks into its elements, so a response of
//! any size is decoded with memory bounded by one element plus one chunk.
//!
//! An element that is an object is checked as it is found, by the same
//! scanner that reads a detection's key fields, so the poller does not scan
//! it a second time. An object cut by the end of the buffer is checked again
//! once more bytes arrived. Any other element, an invalid object and a very
//! long one are split by tracking strings, escapes and nesting, and checked
//! later on their own. Anything that is not one complete top-level array is
//! reported with what arrived instead.

use crate::detection::{scan_object_prefix, ObjectKeys, ObjectPrefix};

/// Error in the body of a response, worded for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArrayError {
    #[error("expected a JSON array but the body starts with {0}")]
    NotArray(String),
    #[error("the body is empty")]
    Empty,
    #[error("the body ended inside the JSON array after {0} complete elements (truncated response)")]
    Truncated(usize),
    #[error("invalid JSON after element {index}: unexpected {found}")]
    Syntax { index: usize, found: String },
    #[error("unexpected data after the end of the JSON array: {0}")]
    Trailing(String),
}

/// How much of a body error messages show.
const PREVIEW_BYTES: usize = 120;

/// Stray `]` in one response after which the splitter still reads on. More
/// of them make the body more likely something other than a broken array.
const MAX_STRAY_CLOSERS: usize = 100;

/// Nesting levels whose bracket kind the byte scan remembers. serde_json
/// rejects more than 128 levels anyway, so a deeper element is invalid and
/// only counted beyond this.
const TRACKED_LEVELS: usize = 1024;
/// How much of a body that is not an array is kept before it is reported:
/// enough to remove a whole secret before the preview is cut.
const KEEP_BYTES: usize = 4096;
/// A UTF-8 byte order mark.
const UTF8_BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// Bytes gathered before they are scanned: with many elements per scan,
/// few are cut by the end of the buffer and take the slow way.
const SCAN_AHEAD_BYTES: usize = 64 * 1024;

/// One element of the array, as bytes.
#[derive(Debug)]
pub struct RawElement {
    pub bytes: Vec<u8>,
    /// The key fields of an object that passed the key check while it was
    /// split; `None` for an element still to be checked.
    pub keys: Option<ObjectKeys>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    BeforeArray,
    /// The body is not an array; bytes are kept only to show its start.
    NotArray,
    /// After `[` or after `,`: an element (or `]` right after `[`) comes next.
    BeforeElement { first: bool },
    InElement,
    AfterElement,
    Done,
}

#[derive(Debug)]
pub struct ArraySplitter {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already scanned.
    scanned: usize,
    /// Start of the current element in `buffer`.
    start: usize,
    state: State,
    depth: u32,
    /// The open brackets of the element in the byte scan, innermost last,
    /// up to [`TRACKED_LEVELS`] of them; `depth` counts all.
    open: Vec<u8>,
    in_string: bool,
    escaped: bool,
    elements: usize,
    seen_any: bool,
    /// Texts removed from previews, such as the request's bearer token.
    secrets: Vec<String>,
    /// Objects are checked while they are split (off only to compare).
    check_objects: bool,
    /// The check also builds each object's field table.
    field_tables: bool,
    /// Unscanned bytes gathered before a scan, `SCAN_AHEAD_BYTES` but in tests.
    scan_ahead: usize,
    /// An object cut by the end of the buffer waits for more bytes.
    waiting: bool,
    /// The body has ended: nothing waits.
    ending: bool,
    /// Bytes of the body dropped from the front of `buffer`.
    drained: usize,
    /// Bytes of a byte order mark found at the start of the body.
    bom_bytes: usize,
    /// Stray `]` taken for the end of the array so far.
    strays: usize,
    /// The start of the text after the first `]` that seemed to end the
    /// array, for the error when the array does not end again.
    trailing: Option<String>,
}

/// The outcome of [`ArraySplitter::check_object`] for one object.
enum Checked {
    Emitted,
    Wait,
    ByteScan,
}

impl Default for ArraySplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl ArraySplitter {
    pub fn new() -> Self {
        Self {
            buffer: Vec::new(),
            scanned: 0,
            start: 0,
            state: State::BeforeArray,
            depth: 0,
            open: Vec::new(),
            in_string: false,
            escaped: false,
            elements: 0,
            seen_any: false,
            secrets: Vec::new(),
            check_objects: true,
            field_tables: false,
            scan_ahead: SCAN_AHEAD_BYTES,
            waiting: false,
            ending: false,
            drained: 0,
            bom_bytes: 0,
            strays: 0,
            trailing: None,
        }
    }

    /// Creates a splitter whose error previews never show any of `secrets`.
    pub fn with_secrets(secrets: Vec<String>) -> Self {
        Self { secrets, ..Self::new() }
    }

    /// Makes the check of each object build its field table too, for sinks
    /// that read fields (see [`crate::detection::Fields`]).
    pub fn with_field_tables(self, field_tables: bool) -> Self {
        Self { field_tables, ..self }
    }

    /// Returns a printable start of `bytes`, with the secrets removed first.
    fn preview_of(&self, bytes: &[u8]) -> String {
        let kept = &bytes[..bytes.len().min(KEEP_BYTES)];
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        preview(crate::redact::redact(&String::from_utf8_lossy(kept), &secrets).as_bytes())
    }

    /// Number of complete elements found so far.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Feeds one chunk and appends every element it completes to `out`.
    /// Bytes are gathered until there are enough to scan, and [`finish`]
    /// scans the rest.
    ///
    /// [`finish`]: ArraySplitter::finish
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        if !chunk.is_empty() {
            self.seen_any = true;
        }
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() - self.scanned < self.scan_ahead {
            return Ok(());
        }
        self.flush(out)
    }

    /// Scans the bytes gathered so far, also for a body that cannot go on.
    pub fn flush(&mut self, out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        if self.state == State::NotArray {
            return self.not_array_preview();
        }
        while self.scanned < self.buffer.len() {
            if self.state == State::InElement && self.in_string && !self.escaped {
                // Inside a string only `"` and `\` matter: jump to the next one.
                match memchr::memchr2(b'"', b'\\', &self.buffer[self.scanned..]) {
                    Some(offset) => self.scanned += offset,
                    None => {
                        self.scanned = self.buffer.len();
                        break;
                    }
                }
            }
            let byte = self.buffer[self.scanned];
            let at = self.scanned;
            self.scanned += 1;
            self.step(byte, at, out)?;
            if std::mem::take(&mut self.waiting) {
                break;
            }
        }
        self.compact();
        Ok(())
    }

    /// Ends the body: scans what is left, and fails unless exactly one
    /// complete array arrived.
    pub fn finish(&mut self, out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        self.ending = true;
        self.flush(out)?;
        match self.state {
            State::Done => Ok(()),
            State::BeforeArray if !self.seen_any || self.buffer.iter().all(u8::is_ascii_whitespace) => {
                Err(ArrayError::Empty)
            }
            State::BeforeArray | State::NotArray => Err(ArrayError::NotArray(self.preview_of(&self.buffer))),
            _ => match self.trailing.take() {
                Some(preview) => Err(ArrayError::Trailing(preview)),
                None => Err(ArrayError::Truncated(self.elements)),
            },
        }
    }

    /// Reports a body that is not an array once enough of it arrived to show
    /// what it is; `finish` reports a shorter one.
    fn not_array_preview(&mut self) -> Result<(), ArrayError> {
        if self.buffer.len() >= KEEP_BYTES {
            return Err(ArrayError::NotArray(self.preview_of(&self.buffer)));
        }
        self.scanned = self.buffer.len();
        Ok(())
    }

    fn step(&mut self, byte: u8, at: usize, out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        match self.state {
            State::BeforeArray => match byte {
                // A UTF-8 byte order mark at the start of the body is tolerated.
                _ if self.drained + at == self.bom_bytes && UTF8_BOM.get(self.bom_bytes) == Some(&byte) => {
                    self.bom_bytes += 1;
                }
                // Anything after part of a mark is not JSON.
                b'[' if self.bom_bytes % UTF8_BOM.len() == 0 => self.state = State::BeforeElement { first: true },
                b if b.is_ascii_whitespace() && self.bom_bytes % UTF8_BOM.len() == 0 => {}
                _ => {
                    self.buffer.drain(..at);
                    self.scanned = self.buffer.len();
                    self.state = State::NotArray;
                    return self.not_array_preview();
                }
            },
            State::NotArray => {}
            State::BeforeElement { first } => match byte {
                b if b.is_ascii_whitespace() => {}
                b']' if first => self.state = State::Done,
                // `[a,]`: the `]` ends the array, or is a stray one if more
                // elements follow (see State::Done).
                b']' => self.state = State::Done,
                b',' => return Err(self.syntax(byte)),
                b'{' if self.check_objects => match self.check_object(at, out) {
                    Checked::Emitted => {}
                    Checked::Wait => self.waiting = true,
                    Checked::ByteScan => self.start_element(byte, at, out)?,
                },
                _ => self.start_element(byte, at, out)?,
            },
            State::InElement => self.scan_element_byte(byte, at, out)?,
            State::AfterElement => match byte {
                b if b.is_ascii_whitespace() => {}
                b',' => self.state = State::BeforeElement { first: false },
                b']' => self.state = State::Done,
                // Anything else after an element (a stray `}`, the rest of an
                // element a stray bracket ended, or the next element without
                // a comma) starts an element of its own, so the rest is kept.
                _ => self.start_element(byte, at, out)?,
            },
            State::Done => match byte {
                b if b.is_ascii_whitespace() => {}
                // More elements follow, so the `]` that seemed to end the
                // array was a stray one: it becomes an invalid element.
                b',' if self.strays < MAX_STRAY_CLOSERS => {
                    self.stray_closer(out);
                    self.state = State::BeforeElement { first: false };
                }
                // `]]`: one of them is stray, and more may follow.
                b']' if self.strays < MAX_STRAY_CLOSERS => self.stray_closer(out),
                // Other text after the `]`: it was a stray one if the array
                // goes on. If the body ends before another `]`, the text is
                // reported as data after the array.
                _ if self.strays < MAX_STRAY_CLOSERS => {
                    if self.trailing.is_none() {
                        self.trailing = Some(self.preview_of(&self.buffer[at..]));
                    }
                    self.stray_closer(out);
                    self.start_element(byte, at, out)?;
                }
                _ => return Err(ArrayError::Trailing(self.preview_of(&self.buffer[at..]))),
            },
        }
        Ok(())
    }

    /// Starts the byte scan of an element at its first byte.
    fn start_element(&mut self, byte: u8, at: usize, out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        self.start = at;
        self.state = State::InElement;
        self.depth = 0;
        self.open.clear();
        self.in_string = false;
        self.escaped = false;
        self.scan_element_byte(byte, at, out)
    }

    fn scan_element_byte(&mut self, byte: u8, at: usize, out: &mut Vec<RawElement>) -> Result<(), ArrayError> {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
                self.end_if_top(at + 1, out);
            }
            return Ok(());
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.open.len() < TRACKED_LEVELS {
                    self.open.push(byte);
                }
            }
            b'}' | b']' if self.depth > 0 => {
                self.close(byte);
                self.end_if_top(at + 1, out);
            }
            // A scalar at the top level ends at the separator that follows
            // it, and so does an invalid element that starts with `}`.
            b',' | b']' if self.depth == 0 => {
                self.emit(at, out);
                self.state = if byte == b',' { State::BeforeElement { first: false } } else { State::Done };
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the object starting at `at` and emits it when it is valid and
    /// complete in the buffer. An object cut by the end of the buffer waits
    /// for more bytes, unless the body has ended or the object is already
    /// `scan_ahead` bytes long, so a huge element is not scanned over and
    /// over. Such an object and an invalid one are left to the byte scan.
    fn check_object(&mut self, at: usize, out: &mut Vec<RawElement>) -> Checked {
        match scan_object_prefix(&self.buffer[at..], self.field_tables) {
            ObjectPrefix::Complete(len, keys) => {
                out.push(RawElement { bytes: self.buffer[at..at + len].to_vec(), keys: Some(keys) });
                self.elements += 1;
                self.start = at + len;
                self.scanned = at + len;
                self.state = State::AfterElement;
                Checked::Emitted
            }
            ObjectPrefix::Cut if !self.ending && self.buffer.len() - at < self.scan_ahead => {
                self.scanned = at;
                Checked::Wait
            }
            ObjectPrefix::Cut | ObjectPrefix::Invalid => Checked::ByteScan,
        }
    }

    /// Closes brackets for the closing `byte`. In an invalid element it may
    /// close a bracket of the other kind: then it also closes every bracket
    /// opened since a matching one, as if they had been closed, or else the
    /// innermost one. The element stays whole and invalid, and the next one
    /// starts where it would had the brackets matched. `{"X": [1, 2},`
    /// thus ends at its `}` instead of taking in the elements after it.
    fn close(&mut self, byte: u8) {
        if self.depth as usize > self.open.len() {
            // The innermost levels are past TRACKED_LEVELS: their kind is
            // not remembered, so one of them closes.
            self.depth -= 1;
            return;
        }
        let opener = if byte == b'}' { b'{' } else { b'[' };
        let levels = match self.open.iter().rposition(|&open| open == opener) {
            Some(position) => self.open.len() - position,
            None => 1,
        };
        self.open.truncate(self.open.len() - levels);
        self.depth -= levels as u32;
    }

    /// Emits a `]` that turned out not to end the array as an invalid element.
    fn stray_closer(&mut self, out: &mut Vec<RawElement>) {
        self.strays += 1;
        out.push(RawElement { bytes: b"]".to_vec(), keys: None });
        self.elements += 1;
    }

    fn end_if_top(&mut self, end: usize, out: &mut Vec<RawElement>) {
        if self.depth == 0 {
            self.emit(end, out);
            self.state = State::AfterElement;
        }
    }

    fn emit(&mut self, end: usize, out: &mut Vec<RawElement>) {
        let bytes = self.buffer[self.start..end].trim_ascii_end().to_vec();
        out.push(RawElement { bytes, keys: None });
        self.elements += 1;
        self.start = end;
    }

    /// Drops the bytes that belong to finished elements.
    fn compact(&mut self) {
        let keep_from = match self.state {
            State::InElement => self.start,
            State::NotArray => 0,
            _ => self.scanned,
        };
        if keep_from > 0 {
            self.drained += keep_from;
            self.buffer.drain(..keep_from);
            self.scanned -= keep_from;
            self.start = self.start.saturating_sub(keep_from);
        }
    }

    fn syntax(&self, byte: u8) -> ArrayError {
        ArrayError::Syntax { index: self.elements, found: format!("{:?}", byte as char) }
    }
}

/// Returns the first bytes of a body, printable, for error messages.
pub fn preview(bytes: &[u8]) -> String {
    const MAX: usize = PREVIEW_BYTES;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let cleaned: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let ellipsis = if bytes.len() > MAX { "..." } else { "" };
    format!("{:?}{ellipsis}", cleaned.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_in_chunks(body: &str, chunk: usize) -> Result<Vec<String>, ArrayError> {
        let mut splitter = ArraySplitter { scan_ahead: 0, ..ArraySplitter::new() };
        let mut out = Vec::new();
        for piece in body.as_bytes().chunks(chunk.max(1)) {
            splitter.push(piece, &mut out)?;
        }
        splitter.finish(&mut out)?;
        Ok(out.into_iter().map(|e| String::from_utf8(e.bytes).unwrap()).collect())
    }

    #[test]
    fn splits_objects_at_every_chunk_size() {
        let body = r#" [ {"a":"x,]}\"y","b":[1,{"c":2}]} , {"d":"使用者"} ,3, "s" , null ] "#;
        for chunk in 1..body.len() + 1 {
            let elements = split_in_chunks(body, chunk).unwrap();
            assert_eq!(
                elements,
                vec![r#"{"a":"x,]}\"y","b":[1,{"c":2}]}"#, r#"{"d":"使用者"}"#, "3", r#""s""#, "null"],
                "chunk size {chunk}"
            );
        }
    }

    /// A bracket closed by the other kind makes its element invalid, but
    /// the element still ends where its brackets end, so the elements after
    /// it are split as usual.
    #[test]
    fn mismatched_brackets_end_their_element() {
        let broken = [r#"{"FullId":"r2","X":[1,2}"#, r#"{"FullId":"r2","X":{"a":1]}"#, r#"{"FullId":"r2","X":[{"a":[1}]}"#, r#"{"FullId":"r2","X":[1,2]]"#];
        for element in broken {
            let body = format!("[{{\"FullId\":\"r1\"}},\n{element},\n{{\"FullId\":\"r3\"}}]");
            for chunk in [1, 3, 16, body.len()] {
                let elements = split_in_chunks(&body, chunk).unwrap();
                assert_eq!(elements, [r#"{"FullId":"r1"}"#, element, r#"{"FullId":"r3"}"#], "{element} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn nesting_past_tracked_levels_still_splits() {
        let levels = TRACKED_LEVELS + 500;
        let deep = "[".repeat(levels) + &"]".repeat(levels);
        let body = format!("[{deep},{{\"FullId\":\"r3\"}}]");
        let elements = split_in_chunks(&body, 4096).unwrap();
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0], deep);
    }

    #[test]
    fn byte_order_mark_only_at_start() {
        for chunk in 1..8 {
            assert_eq!(split_in_chunks("\u{FEFF}[1]", chunk).unwrap(), ["1"], "chunk size {chunk}");
            let late = split_in_chunks("\n\u{FEFF}[1]", chunk).unwrap_err();
            assert!(matches!(late, ArrayError::NotArray(_)), "chunk size {chunk}: {late}");
        }
        for body in [b"\xBF\xBF\xBF[]".as_slice(), b"\xEF\xBB[]", b"\xEF []"] {
            let mut splitter = ArraySplitter { scan_ahead: 0, ..ArraySplitter::new() };
            let mut out = Vec::new();
            let result = splitter.push(body, &mut out).and_then(|()| splitter.finish(&mut out));
            assert!(matches!(result, Err(ArrayError::NotArray(_))), "{body:?}: {result:?}");
        }
        let mut splitter = ArraySplitter::new();
        let spaces_then_mark = [vec![b' '; SCAN_AHEAD_BYTES], "\u{FEFF}[1]".as_bytes().to_vec()].concat();
        let mut out = Vec::new();
        let result = splitter.push(&spaces_then_mark, &mut out).and_then(|()| splitter.finish(&mut out));
        assert!(matches!(result, Err(ArrayError::NotArray(_))), "{result:?}");
    }

    /// Elements complete before an error are handed over with it.
    #[test]
    fn elements_before_a_cut_reach_the_caller() {
        let mut splitter = ArraySplitter::new();
        let mut out = Vec::new();
        splitter.push(br#"[{"FullId":"a"},{"FullId":"b"},{"Full"#, &mut out).unwrap();
        assert_eq!(splitter.finish(&mut out), Err(ArrayError::Truncated(2)));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn empty_array_has_no_elements() {
        assert_eq!(split_in_chunks("[]", 1).unwrap().len(), 0);
        assert_eq!(split_in_chunks(" [ \n ] \n", 3).unwrap().len(), 0);
    }

    #[test]
    fn empty_body_is_an_error() {
        assert_eq!(split_in_chunks("", 4), Err(ArrayError::Empty));
        assert_eq!(split_in_chunks("  \n", 4), Err(ArrayError::Empty));
    }

    #[test]
    fn html_is_reported_with_its_start() {
        let err = split_in_chunks("<html><body>502 Bad Gateway</body></html>", 7).unwrap_err();
        assert!(err.to_string().contains("<html><body>502 Bad Gateway"), "{err}");
    }

    #[test]
    fn object_is_not_an_array() {
        let err = split_in_chunks(r#"{"value":[]}"#, 5).unwrap_err();
        assert!(matches!(err, ArrayError::NotArray(_)), "{err}");
    }

    #[test]
    fn truncated_body_counts_complete_elements() {
        assert_eq!(split_in_chunks(r#"[{"a":1},{"b":"#, 3), Err(ArrayError::Truncated(1)));
        assert_eq!(split_in_chunks(r#"[{"a":1},"#, 3), Err(ArrayError::Truncated(1)));
        assert_eq!(split_in_chunks("[", 3), Err(ArrayError::Truncated(0)));
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let err = split_in_chunks("[1] [2]", 2).unwrap_err();
        assert!(matches!(err, ArrayError::Trailing(_)), "{err}");
    }

    #[test]
    fn misplaced_separators_are_errors() {
        assert!(matches!(split_in_chunks("[,1]", 1), Err(ArrayError::Syntax { .. })));
        assert!(matches!(split_in_chunks("[1,,2]", 1), Err(ArrayError::Syntax { .. })));
    }

    /// A stray closing bracket between elements becomes an invalid element
    /// of its own, so the elements after it are still split.
    #[test]
    fn stray_closers_between_elements_are_elements() {
        let cases: &[(&str, &[&str])] = &[
            (r#"[{"a":1}}]"#, &[r#"{"a":1}"#, "}"]),
            (r#"[{"a":1}},{"b":2}]"#, &[r#"{"a":1}"#, "}", r#"{"b":2}"#]),
            (r#"[{"a":1}] ,{"b":2}]"#, &[r#"{"a":1}"#, "]", r#"{"b":2}"#]),
            (r#"[{"a":[1}},{"b":2}]"#, &[r#"{"a":[1}"#, "}", r#"{"b":2}"#]),
            (r#"[{"a":1},],{"b":2}]"#, &[r#"{"a":1}"#, "]", r#"{"b":2}"#]),
            (r#"[{"a":1}]]"#, &[r#"{"a":1}"#, "]"]),
            (r#"[{"a":1}],],{"b":2}]"#, &[r#"{"a":1}"#, "]", "]", r#"{"b":2}"#]),
            (r#"[{"a":1},]"#, &[r#"{"a":1}"#]),
            (r#"[{"F":"b1",]"a":1},{"b":2}]"#, &[r#"{"F":"b1",]"#, r#""a""#, ":1}", r#"{"b":2}"#]),
            (r#"[[1,}2],{"b":2}]"#, &[r#"[1,}"#, "2", "]", r#"{"b":2}"#]),
            (r#"[{"a":1} {"b":2}]"#, &[r#"{"a":1}"#, r#"{"b":2}"#]),
            (r#"[{"a":1}]) ,{"b":2}]"#, &[r#"{"a":1}"#, "]", ")", r#"{"b":2}"#]),
        ];
        for (body, expected) in cases {
            for chunk in [1, 4, body.len()] {
                assert_eq!(split_in_chunks(body, chunk).unwrap(), *expected, "{body} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn buffer_stays_small_across_many_elements() {
        let mut splitter = ArraySplitter::new();
        let mut out = Vec::new();
        splitter.push(b"[", &mut out).unwrap();
        for _ in 0..10_000 {
            splitter.push(br#"{"FullId":"x"},"#, &mut out).unwrap();
            out.clear();
            assert!(splitter.buffer.len() < SCAN_AHEAD_BYTES + 64);
        }
    }

    /// An element's text, and its dedupe key, time and fields (names and
    /// texts, or the field table's error), or `None` if invalid.
    type Checked = (Vec<u8>, Option<(Vec<u8>, Option<String>, FieldList)>);
    type FieldList = Result<Vec<(String, Option<String>)>, String>;

    /// Converts one element as the poller does.
    fn checked(element: RawElement) -> Checked {
        let bytes = element.bytes.clone();
        let Ok(text) = String::from_utf8(element.bytes) else { return (bytes, None) };
        let detection = match element.keys {
            Some(keys) => Some(crate::detection::Detection::from_scanned(text, keys)),
            None => crate::detection::Detection::from_string(text).ok(),
        };
        let keys = detection.map(|d| {
            let fields = match d.field_error() {
                Some(error) => Err(error.to_string()),
                None => Ok(d.fields().map(|(name, value)| (name.to_string(), value.text().map(|t| t.into_owned()))).collect()),
            };
            (d.dedupe_id().into_owned(), d.last_processed().map(|t| t.to_rfc3339()), fields)
        });
        (bytes, keys)
    }

    fn split_checked(
        body: &[u8],
        chunk: usize,
        scan_ahead: usize,
        check_objects: bool,
        field_tables: bool,
    ) -> (Vec<Checked>, Result<(), ArrayError>) {
        let mut splitter = ArraySplitter { scan_ahead, check_objects, field_tables, ..ArraySplitter::new() };
        let mut out = Vec::new();
        let mut result = body.chunks(chunk).try_for_each(|piece| splitter.push(piece, &mut out));
        if result.is_ok() {
            result = splitter.finish(&mut out);
        }
        (out.into_iter().map(checked).collect(), result)
    }

    /// Checking objects while splitting, with or without building their
    /// field tables, gives the same elements, keys, fields and errors as
    /// splitting first and checking each element after, on arrays of valid,
    /// invalid and cut elements in any chunking.
    #[test]
    fn checking_while_splitting_changes_nothing() {
        let samples: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../tests/data/detections.json")).expect("sample detections");
        let mut pieces: Vec<Vec<u8>> = samples.iter().take(4).map(|s| s.to_string().into_bytes()).collect();
        pieces.extend(
            [
                r#"{"FullId":"a\u0041","LastProcessedTimeUtc":"2026-01-01T00:00:00.1234567Z","N":[1,{"x":"]}"}]}"#,
                r#"{ "Full\u0049d" : 42 , "LastProcessedTimeUtc" : null }"#,
                r#"{"FullId":"x\ud800"}"#,
                r#"{"\ud800":1}"#,
                r#"{"FullId":"bad" "x":1}"#,
                r#"{"FullId":"cut"#,
                r#"{"FullId":tru}"#,
                r#"{"a":"x"]"#,
                r#"{"a":1}}"#,
                r#"{"a":01}"#,
                r#"{"a":"\u12"}"#,
                "{\"a\":\"tab\there\"}",
                "[1,2]",
                "7",
                r#""s""#,
                "null",
                "{}",
                r#"{"FullId":"n","a":[1,,2]}"#,
                r#"{"a":{"b" 1}}"#,
            ]
            .map(|piece| piece.as_bytes().to_vec()),
        );
        pieces.push(b"{\"FullId\":\"\xff\"}".to_vec());
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut below = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for round in 0..3_000 {
            let mut body = b"[".to_vec();
            for i in 0..1 + below(6) {
                if i > 0 {
                    body.extend_from_slice([",", " ,\n", ",\t"][below(3)].as_bytes());
                }
                body.extend_from_slice(&pieces[below(pieces.len())]);
            }
            if below(8) != 0 {
                body.extend_from_slice([b"]".as_slice(), b" ]\n", b"]x"][below(3)]);
            }
            let chunk = 1 + below(body.len());
            let scan_ahead = [0, 1, 50, 700][below(4)];
            let checked = split_checked(&body, chunk, scan_ahead, true, false);
            let plain = split_checked(&body, chunk, scan_ahead, false, false);
            assert_eq!(checked, plain, "round {round}: {:?} in chunks of {chunk}", String::from_utf8_lossy(&body));
            let with_tables = split_checked(&body, chunk, scan_ahead, true, true);
            assert_eq!(with_tables, plain, "round {round} with field tables: {:?} in chunks of {chunk}", String::from_utf8_lossy(&body));
        }
    }
}
