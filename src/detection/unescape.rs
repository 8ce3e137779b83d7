//! Decoding of JSON strings that contain escapes.
//!
//! serde_json did this before, through a deserializer and a visitor per
//! string: about 3,500 instructions per detection of `scripts/bench-e2e.sh`
//! (callgrind), mostly set-up and a scratch buffer per short string. This
//! decoder is meant to accept the strings serde_json 1.0 accepts as a
//! `String`: UTF-8 text, no control characters, the eight short escapes,
//! and `\uXXXX` escapes whose UTF-16 surrogates come in pairs. The tests
//! compare both decoders on 20,000 random strings.

/// The reason a JSON string could not be decoded, mostly in serde_json's
/// words. Offsets count bytes from the string's opening quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnescapeError {
    #[error("EOF while parsing a string at byte {0} of the string")]
    Unterminated(usize),
    #[error("control character (\\u0000-\\u001F) found while parsing a string at byte {0} of the string")]
    ControlCharacter(usize),
    #[error("invalid escape at byte {0} of the string")]
    InvalidEscape(usize),
    /// A low surrogate escape without a high one before it, or a high one
    /// followed by a `\u` escape that is no low surrogate. serde_json calls
    /// both a "lone leading surrogate", which misnames the first.
    #[error("unpaired UTF-16 surrogate in a \\u escape at byte {0} of the string (JSON allows it, but it is not a character)")]
    LoneSurrogate(usize),
    /// A high surrogate escape followed by no `\u` escape, which serde_json
    /// reports as an "unexpected end of hex escape".
    #[error("UTF-16 high surrogate escape not followed by a low surrogate escape at byte {0} of the string (JSON allows it, but it is not a character)")]
    UnexpectedEndOfHexEscape(usize),
    #[error("invalid unicode code point at byte {0} of the string")]
    InvalidUtf8(usize),
}

/// Appends the text of the JSON string `json`, given with its quotes, to
/// `out`. Byte offsets in errors count from the opening quote. On error,
/// `out` may have part of the text appended.
pub fn unescape_into(json: &[u8], out: &mut String) -> Result<(), UnescapeError> {
    let inner = match json {
        [b'"', inner @ .., b'"'] => inner,
        _ => return Err(UnescapeError::Unterminated(json.len())),
    };
    out.reserve(inner.len());
    let mut run_start = 0;
    while let Some(offset) = memchr::memchr(b'\\', &inner[run_start..]) {
        let backslash = run_start + offset;
        push_run(&inner[run_start..backslash], run_start, out)?;
        run_start = push_escape(inner, backslash, out).map_err(|error| error.shifted(1))?;
    }
    push_run(&inner[run_start..], run_start, out)
}

/// Appends a run of text without escapes, at `offset` of the string's
/// inner text, after checking that it has no quote or control character
/// and is UTF-8. Runs end at a backslash or at the end, which are
/// character boundaries.
fn push_run(run: &[u8], offset: usize, out: &mut String) -> Result<(), UnescapeError> {
    // No early exit, so the compiler checks many bytes per instruction.
    let special = run.iter().fold(false, |found, &byte| found | (byte < 0x20) | (byte == b'"'));
    if special {
        // Offsets in errors count the opening quote.
        if let Some(i) = run.iter().position(|&byte| byte < 0x20 || byte == b'"') {
            let at = offset + i + 1;
            return Err(if run[i] == b'"' { UnescapeError::Unterminated(at) } else { UnescapeError::ControlCharacter(at) });
        }
    }
    match std::str::from_utf8(run) {
        Ok(text) => {
            out.push_str(text);
            Ok(())
        }
        Err(error) => Err(UnescapeError::InvalidUtf8(offset + error.valid_up_to() + 1)),
    }
}

/// Appends the escape that starts with the backslash at `inner[start]` and
/// returns the index just past it. Offsets in errors are indexes of `inner`.
fn push_escape(inner: &[u8], start: usize, out: &mut String) -> Result<usize, UnescapeError> {
    let Some(&letter) = inner.get(start + 1) else {
        // serde_json reads the closing quote as the escape letter.
        return Err(UnescapeError::InvalidEscape(start + 1));
    };
    let short = match letter {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return push_unicode_escape(inner, start, out),
        _ => return Err(UnescapeError::InvalidEscape(start + 1)),
    };
    out.push(short);
    Ok(start + 2)
}

/// Appends a `\uXXXX` escape, or a surrogate pair of two, starting with the
/// backslash at `inner[start]`, and returns the index just past it.
fn push_unicode_escape(inner: &[u8], start: usize, out: &mut String) -> Result<usize, UnescapeError> {
    let first = hex_escape(inner, start + 2)?;
    let mut end = start + 6;
    let code = match first {
        0xDC00..=0xDFFF => return Err(UnescapeError::LoneSurrogate(end - 1)),
        0xD800..=0xDBFF => {
            if inner.get(end) != Some(&b'\\') || inner.get(end + 1) != Some(&b'u') {
                return Err(UnescapeError::UnexpectedEndOfHexEscape(end));
            }
            let second = hex_escape(inner, end + 2)?;
            end += 6;
            if !(0xDC00..=0xDFFF).contains(&second) {
                return Err(UnescapeError::LoneSurrogate(end - 1));
            }
            0x1_0000 + ((u32::from(first) - 0xD800) << 10) + (u32::from(second) - 0xDC00)
        }
        other => u32::from(other),
    };
    // Every value outside the surrogate ranges, and every pair, is a char.
    out.push(char::from_u32(code).ok_or(UnescapeError::InvalidEscape(start))?);
    Ok(end)
}

/// Reads the four hex digits at `inner[start..]`.
fn hex_escape(inner: &[u8], start: usize) -> Result<u16, UnescapeError> {
    let mut value = 0u16;
    for offset in 0..4 {
        // Past the end, serde_json reads the closing quote, which is no digit.
        let digit = inner.get(start + offset).and_then(|&byte| (byte as char).to_digit(16));
        let Some(digit) = digit else {
            return Err(UnescapeError::InvalidEscape(start + offset));
        };
        value = value << 4 | digit as u16;
    }
    Ok(value)
}

impl UnescapeError {
    /// Returns the same error with its offset moved by `by` bytes.
    fn shifted(self, by: usize) -> Self {
        use UnescapeError::*;
        match self {
            Unterminated(at) => Unterminated(at + by),
            ControlCharacter(at) => ControlCharacter(at + by),
            InvalidEscape(at) => InvalidEscape(at + by),
            LoneSurrogate(at) => LoneSurrogate(at + by),
            UnexpectedEndOfHexEscape(at) => UnexpectedEndOfHexEscape(at + by),
            InvalidUtf8(at) => InvalidUtf8(at + by),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(json: &[u8]) -> Result<String, UnescapeError> {
        let mut out = String::new();
        unescape_into(json, &mut out).map(|()| out)
    }

    fn serde(json: &[u8]) -> Option<String> {
        serde_json::from_slice::<String>(json).ok()
    }

    #[test]
    fn unescape_decodes_every_escape() {
        let json = br#""a\"b\\c\/d\be\ff\ng\rh\ti\u00e9\u4e2d\ud83d\ude00\u0000""#;
        assert_eq!(ours(json).unwrap(), "a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti\u{e9}\u{4e2d}\u{1f600}\u{0}");
    }

    #[test]
    fn unescape_keeps_text_between_escapes() {
        assert_eq!(ours(br#""C:\\Windows\\System32\\cmd.exe /c ""#).unwrap(), r"C:\Windows\System32\cmd.exe /c ");
        assert_eq!(ours("\"\u{4e2d}\u{6587}\\n\u{1f600}\"".as_bytes()).unwrap(), "\u{4e2d}\u{6587}\n\u{1f600}");
        assert_eq!(ours(br#""""#).unwrap(), "");
    }

    #[test]
    fn unescape_rejects_what_serde_json_rejects() {
        let cases: &[(&[u8], UnescapeError)] = &[
            (br#""\ud800""#, UnescapeError::UnexpectedEndOfHexEscape(7)),
            (br#""\ud800x""#, UnescapeError::UnexpectedEndOfHexEscape(7)),
            (br#""\ud800\n""#, UnescapeError::UnexpectedEndOfHexEscape(7)),
            (br#""\ud800\u0041""#, UnescapeError::LoneSurrogate(12)),
            (br#""\udc00""#, UnescapeError::LoneSurrogate(6)),
            (br#""\u12""#, UnescapeError::InvalidEscape(5)),
            (br#""\u12g4""#, UnescapeError::InvalidEscape(5)),
            (br#""\x""#, UnescapeError::InvalidEscape(2)),
            (br#""\""#, UnescapeError::InvalidEscape(2)),
            (b"\"a\x01b\"", UnescapeError::ControlCharacter(2)),
            (b"\"a\\n\xff\"", UnescapeError::InvalidUtf8(4)),
            (b"\"\xc3\"", UnescapeError::InvalidUtf8(1)),
            (b"\"abc", UnescapeError::Unterminated(4)),
            (b"\"", UnescapeError::Unterminated(1)),
        ];
        for (json, expected) in cases {
            assert_eq!(ours(json), Err(*expected), "{}", String::from_utf8_lossy(json));
            assert_eq!(serde(json), None, "serde_json also rejects {}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn unescape_error_text_names_the_problem() {
        let error = ours(br#""\udc00""#).unwrap_err().to_string();
        assert!(error.starts_with("unpaired UTF-16 surrogate in a \\u escape at byte 6"), "{error}");
        let error = ours(br#""x\ud800y""#).unwrap_err().to_string();
        assert!(error.starts_with("UTF-16 high surrogate escape not followed by a low surrogate escape at byte 8"), "{error}");
        let error = ours(b"\"a\x01\"").unwrap_err().to_string();
        assert!(error.starts_with("control character (\\u0000-\\u001F) found while parsing a string"), "{error}");
    }

    /// Random strings built from pieces that exercise every branch give the
    /// same text, or an error, from both decoders.
    #[test]
    fn unescape_agrees_with_serde_json() {
        let pieces: &[&[u8]] = &[
            b"a", b"Z", b" ", b"/", b"\\\\", b"\\\"", b"\\/", b"\\b", b"\\f", b"\\n", b"\\r", b"\\t", b"\\u0041", b"\\u00E9",
            b"\\uFFFF", b"\\uD83D", b"\\uDE00", b"\\uDBFF\\uDFFF", b"\\ud800\\udc00", b"\\u", b"\\u00", b"\\q", b"\\", b"\x7f",
            b"\x1f", b"\xe4\xb8\xad", b"\xe4\xb8", b"\xf0\x9f\x98\x80", b"\xff", b"\xed\xa0\x80", b"\"",
        ];
        // A fixed-seed xorshift, so a failure repeats.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut json = vec![b'"'];
            for _ in 0..next() % 8 {
                json.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            json.push(b'"');
            let expected = serde(&json);
            let actual = ours(&json).ok();
            assert_eq!(actual, expected, "{}", String::from_utf8_lossy(&json));
        }
    }
}
